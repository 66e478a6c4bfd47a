"""Equivalence of the Qwen3-VL / Qwen2.5-VL vision towers with HF transformers, plus host tables.

Tiny random HF ``Qwen3VLVisionModel`` and ``Qwen2_5_VisionTransformerPretrainedModel`` (float32,
eager attention) on a packed sequence of two images of different sizes and a 2-temporal-patch
video; vlm runs the same sequence exactly and padded into a larger bucket, and a second packing of
different image sizes into the same bucket must reuse the compiled program.
"""
from __future__ import annotations

import functools
import re

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from transformers.models.qwen2_5_vl.configuration_qwen2_5_vl import \
    Qwen2_5_VLVisionConfig as HFQwen25VisionConfig
from transformers.models.qwen2_5_vl.modeling_qwen2_5_vl import \
    Qwen2_5_VisionTransformerPretrainedModel
from transformers.models.qwen3_vl.configuration_qwen3_vl import \
    Qwen3VLVisionConfig as HFQwen3VisionConfig
from transformers.models.qwen3_vl.modeling_qwen3_vl import Qwen3VLVisionModel as HFQwen3Vision

from vlm.models import qwen_vit
from vlm.models.qwen_vit import (Qwen2_5_VLVisionConfig, Qwen2_5_VLVisionModel,
                                 Qwen3VLVisionConfig, Qwen3VLVisionModel, pad_pixel_values,
                                 vision_inputs, vision_inputs_from_grids)

TOL = 1e-5

Q3 = Qwen3VLVisionConfig(depth=3, hidden_size=32, num_heads=2, intermediate_size=64,
                         out_hidden_size=48, deepstack_visual_indexes=(0, 1),
                         num_position_embeddings=16, patch_size=16, temporal_patch_size=2,
                         spatial_merge_size=2)
Q25 = Qwen2_5_VLVisionConfig(depth=3, hidden_size=32, num_heads=2, intermediate_size=64,
                             out_hidden_size=48, patch_size=14, temporal_patch_size=2,
                             spatial_merge_size=2, window_size=56, fullatt_block_indexes=(1,))

# Two images of different sizes and a video with 2 temporal patches; then, for the same bucket,
# a different packing (other image sizes) that must not recompile.
Q3_GRIDS = np.array([[1, 4, 6], [1, 2, 2], [2, 4, 4]])        # 24 + 4 + 32 = 60 patches
Q3_GRIDS_B = np.array([[1, 6, 6], [1, 2, 4], [1, 4, 2]])      # 36 + 8 + 8 = 52 patches
Q3_BUCKET = 72
# Qwen2.5: windows of 2x2 merge units; 6x8 and 4x6 have partial windows, 4x4 divides exactly
# (HF then pads a whole empty window).
Q25_GRIDS = np.array([[1, 6, 8], [1, 2, 2], [2, 4, 4]])       # 48 + 4 + 32 = 84
Q25_GRIDS_B = np.array([[1, 4, 6], [2, 2, 6], [1, 6, 2]])     # 24 + 24 + 12 = 60
Q25_BUCKET = 96


def _randomize(model: torch.nn.Module, seed: int = 0, scale: float = 0.1) -> torch.nn.Module:
  """Random weights everywhere (norm scales around 1) so that no parameter is trivially 0/1."""
  gen = torch.Generator().manual_seed(seed)
  with torch.no_grad():
    for name, p in model.named_parameters():
      noise = torch.randn(p.shape, generator=gen)
      if re.search(r"(norm|ln_q)", name) and name.endswith("weight"):
        p.copy_(1.0 + 0.2 * noise)
      elif "pos_embed" in name:
        p.copy_(0.5 * noise)
      else:
        p.copy_(scale * noise)
  return model.eval()


def _to_flax(state_dict: dict) -> dict:
  """HF vision state dict (no prefix) -> nested flax params by the CONTRACT.md naming rule."""
  params: dict = {}
  for key, value in state_dict.items():
    w = value.detach().numpy().astype(np.float32)
    parts = key.split(".")
    path: list[str] = []
    for part in parts[:-1]:
      if part.isdigit():
        path[-1] = f"{path[-1]}_{part}"
      else:
        path.append(part)
    leaf = parts[-1]
    if leaf == "weight":
      if path[-1] == "proj" and path[-2] == "patch_embed":
        leaf, w = "kernel", w.reshape(w.shape[0], -1).T
      elif path[-1] == "pos_embed":
        leaf = "embedding"
      elif w.ndim == 1:
        leaf = "scale"
      else:
        leaf, w = "kernel", w.T
    node = params
    for p in path:
      node = node.setdefault(p, {})
    node[leaf] = jnp.asarray(w)
  return params


@functools.lru_cache(maxsize=None)
def _hf_qwen3():
  torch.manual_seed(0)
  cfg = HFQwen3VisionConfig(depth=Q3.depth, hidden_size=Q3.hidden_size, num_heads=Q3.num_heads,
                            intermediate_size=Q3.intermediate_size,
                            out_hidden_size=Q3.out_hidden_size,
                            deepstack_visual_indexes=list(Q3.deepstack_visual_indexes),
                            num_position_embeddings=Q3.num_position_embeddings,
                            patch_size=Q3.patch_size, temporal_patch_size=Q3.temporal_patch_size,
                            spatial_merge_size=Q3.spatial_merge_size)
  cfg._attn_implementation = "eager"
  return _randomize(HFQwen3Vision(cfg))


@functools.lru_cache(maxsize=None)
def _hf_qwen25():
  torch.manual_seed(0)
  cfg = HFQwen25VisionConfig(depth=Q25.depth, hidden_size=Q25.hidden_size,
                             num_heads=Q25.num_heads, intermediate_size=Q25.intermediate_size,
                             out_hidden_size=Q25.out_hidden_size, patch_size=Q25.patch_size,
                             temporal_patch_size=Q25.temporal_patch_size,
                             spatial_merge_size=Q25.spatial_merge_size,
                             window_size=Q25.window_size,
                             fullatt_block_indexes=list(Q25.fullatt_block_indexes))
  cfg._attn_implementation = "eager"
  return _randomize(Qwen2_5_VisionTransformerPretrainedModel(cfg), seed=1)


def _pixels(config, grids, seed):
  n = int(np.prod(grids, axis=1).sum())
  return np.random.default_rng(seed).standard_normal((n, config.patch_dim)).astype(np.float32)


TRACES = {"q3": 0, "q25": 0}


@functools.lru_cache(maxsize=None)
def _jitted(kind: str):
  """One jitted apply per tower; the Python body counts how often jax traces (= compiles) it."""
  model = Qwen3VLVisionModel(Q3) if kind == "q3" else Qwen2_5_VLVisionModel(Q25)

  @jax.jit
  def apply(params, pixel_values, inputs):
    TRACES[kind] += 1
    return model.apply({"params": params}, pixel_values, **inputs)

  return apply


def _max_abs(a, b) -> float:
  return float(np.max(np.abs(np.asarray(a, np.float64) - np.asarray(b, np.float64))))


def _run(kind, config, params, pixels, grids, bucket=None):
  inputs = vision_inputs(config, grids, max_patches=bucket)
  px = pixels if bucket is None else pad_pixel_values(pixels, bucket)
  return _jitted(kind)(params, jnp.asarray(px), {k: jnp.asarray(v) for k, v in inputs.items()})


@functools.lru_cache(maxsize=None)
def _hf_q3_outputs(grids_key: tuple, seed: int):
  grids = np.array(grids_key)
  px = _pixels(Q3, grids, seed)
  with torch.no_grad():
    merged, ds = _hf_qwen3()(torch.from_numpy(px), grid_thw=torch.from_numpy(grids))
  return px, merged.numpy(), [d.numpy() for d in ds]


def test_qwen3_vision_matches_hf_padded_and_no_recompile():
  params = _to_flax(_hf_qwen3().state_dict())
  n_units = int(np.prod(Q3_GRIDS, axis=1).sum()) // 4

  px, ref, ref_ds = _hf_q3_outputs(tuple(map(tuple, Q3_GRIDS)), 0)
  merged, ds = _run("q3", Q3, params, px, Q3_GRIDS)
  assert merged.shape == ref.shape == (n_units, Q3.out_hidden_size)
  assert len(ds) == len(ref_ds) == 2
  errs = [_max_abs(merged, ref)] + [_max_abs(d, r) for d, r in zip(ds, ref_ds)]
  print(f"qwen3 vision exact-length max abs err merged {errs[0]:.3e}, deepstack "
        f"{[f'{e:.3e}' for e in errs[1:]]}")
  assert max(errs) <= TOL, errs

  # Padded into a bucket: the same real rows, zero padded rows. Not bit-identical: XLA:CPU picks
  # a different GEMM blocking for a different row count (a plain x @ W differs by ~4e-6 relative
  # between 60 and 72 rows), so the bound is the equivalence tolerance.
  merged_p, ds_p = _run("q3", Q3, params, px, Q3_GRIDS, Q3_BUCKET)
  assert merged_p.shape == (Q3_BUCKET // 4, Q3.out_hidden_size)
  pad_errs = [_max_abs(merged_p[:n_units], merged)] + [
      _max_abs(a[:n_units], b) for a, b in zip(ds_p, ds)]
  print(f"qwen3 vision padded vs exact max abs diff {max(pad_errs):.3e}")
  assert max(pad_errs) <= TOL, pad_errs
  assert not np.any(np.asarray(merged_p[n_units:])) and not np.any(np.asarray(ds_p[0][n_units:]))
  traces = TRACES["q3"]

  # Other image sizes in the same bucket: same program, still equal to HF.
  px_b, ref_b, ref_ds_b = _hf_q3_outputs(tuple(map(tuple, Q3_GRIDS_B)), 1)
  n_b = ref_b.shape[0]
  merged_b, ds_b = _run("q3", Q3, params, px_b, Q3_GRIDS_B, Q3_BUCKET)
  assert TRACES["q3"] == traces, "a second packing in the same bucket recompiled"
  errs_b = [_max_abs(merged_b[:n_b], ref_b)] + [
      _max_abs(d[:n_b], r) for d, r in zip(ds_b, ref_ds_b)]
  print(f"qwen3 vision second packing (bucket {Q3_BUCKET}) max abs err {max(errs_b):.3e}")
  assert max(errs_b) <= TOL, errs_b


def test_qwen25_vision_matches_hf_padded_and_no_recompile():
  hf = _hf_qwen25()
  params = _to_flax(hf.state_dict())
  assert "bias" not in params["patch_embed"]["proj"]
  results = {}
  for grids, seed in ((Q25_GRIDS, 2), (Q25_GRIDS_B, 3)):
    px = _pixels(Q25, grids, seed)
    with torch.no_grad():
      ref = hf(torch.from_numpy(px), grid_thw=torch.from_numpy(grids)).numpy()
    results[seed] = (px, ref)

  px, ref = results[2]
  out = _run("q25", Q25, params, px, Q25_GRIDS)
  err = _max_abs(out, ref)
  print(f"qwen2.5 vision exact-length max abs err {err:.3e}")
  assert out.shape == ref.shape and err <= TOL, err

  out_p = _run("q25", Q25, params, px, Q25_GRIDS, Q25_BUCKET)
  n = ref.shape[0]
  pad_err = _max_abs(out_p[:n], out)
  print(f"qwen2.5 vision padded vs exact max abs diff {pad_err:.3e}")
  assert pad_err <= TOL and not np.any(np.asarray(out_p[n:]))
  traces = TRACES["q25"]

  px_b, ref_b = results[3]
  out_b = _run("q25", Q25, params, px_b, Q25_GRIDS_B, Q25_BUCKET)
  assert TRACES["q25"] == traces, "a second packing in the same bucket recompiled"
  err_b = _max_abs(out_b[:ref_b.shape[0]], ref_b)
  print(f"qwen2.5 vision second packing (bucket {Q25_BUCKET}) max abs err {err_b:.3e}")
  assert err_b <= TOL, err_b


def test_host_tables_match_hf():
  """Rotary coordinates, inv_freq, position interpolation (full 48x48 table) and windows."""
  # Rotary: HF's per-token angle table equals ours for every real patch.
  hf3 = _hf_qwen3()
  inputs = vision_inputs(Q3, Q3_GRIDS)
  with torch.no_grad():
    ref_rot = hf3.rot_pos_emb(torch.from_numpy(Q3_GRIDS)).numpy()
  angles = qwen_vit.vision_rope_angles(inputs["rope_positions"], Q3.head_dim)  # vlm.nn.rope
  np.testing.assert_array_equal(np.asarray(angles), ref_rot)
  dim = Q3.head_dim // 2
  exponents = np.arange(0, dim, 2, dtype=np.float32) / np.float32(dim)
  ours_inv = (1.0 / (np.float32(10000.0) ** exponents)).astype(np.float32)
  np.testing.assert_array_equal(ours_inv, hf3.rotary_pos_emb.inv_freq.numpy())

  # Bilinear interpolation with the released 48x48 table: bit-exact vs fast_pos_embed_interpolate.
  cfg = HFQwen3VisionConfig(depth=1, hidden_size=8, num_heads=2, intermediate_size=8,
                            out_hidden_size=8, num_position_embeddings=2304,
                            deepstack_visual_indexes=[])
  hf_big = _randomize(HFQwen3Vision(cfg))
  grids = np.array([[1, 30, 44], [2, 64, 90], [1, 2, 2], [1, 86, 24]])
  with torch.no_grad():
    ref_pe = hf_big.fast_pos_embed_interpolate(torch.from_numpy(grids)).numpy()
  host = vision_inputs_from_grids(grids, 2, num_position_embeddings=2304)
  table = hf_big.pos_embed.weight.detach().numpy()
  e = table[host["pos_embed_index"]]                          # [4, N, D]
  w = host["pos_embed_weight"][..., None]
  pe = ((e[0] * w[0] + e[1] * w[1]) + e[2] * w[2]) + e[3] * w[3]
  np.testing.assert_array_equal(pe, ref_pe)

  # Qwen2.5 windows: permutation equals HF's; window segments equal HF's cu_window_seqlens.
  hf25 = _hf_qwen25()
  for grids in (Q25_GRIDS, Q25_GRIDS_B, np.array([[1, 12, 16]])):
    win_idx, cu = hf25.get_window_index(torch.from_numpy(grids))
    host = vision_inputs(Q25, grids)
    np.testing.assert_array_equal(host["window_index"], win_idx.numpy())
    np.testing.assert_array_equal(host["window_inverse"], np.argsort(win_idx.numpy()))
    cu = np.unique(np.asarray(cu))
    np.testing.assert_array_equal(host["window_segment_ids"],
                                  np.repeat(np.arange(1, len(cu)), np.diff(cu)))
    hw = grids[:, 1] * grids[:, 2]
    np.testing.assert_array_equal(host["segment_ids"],
                                  np.repeat(np.arange(1, grids[:, 0].sum() + 1),
                                            np.repeat(hw, grids[:, 0])))


def test_host_errors_are_clear():
  with pytest.raises(ValueError, match="max_patches"):
    vision_inputs(Q3, Q3_GRIDS, max_patches=56)
  with pytest.raises(ValueError, match="multiple of spatial_merge_size"):
    vision_inputs(Q3, Q3_GRIDS, max_patches=62)
  with pytest.raises(ValueError, match="multiples of spatial_merge_size"):
    vision_inputs(Q3, np.array([[1, 3, 4]]))
  with pytest.raises(ValueError, match=r"\[N, 3\]"):
    vision_inputs(Q3, np.array([1, 4, 4]))
  with pytest.raises(ValueError, match="deepstack_visual_indexes"):
    Qwen3VLVisionConfig(depth=2, deepstack_visual_indexes=[2])
  with pytest.raises(ValueError, match="pixel_values"):
    Qwen3VLVisionModel(Q3).init(jax.random.PRNGKey(0), jnp.zeros((8, 10)),
                                **vision_inputs(Q3, np.array([[1, 2, 4]])))


@pytest.mark.parametrize("kind", ["q3", "q25"])
def test_param_tree_mirrors_hf_keys_with_logical_axes(kind):
  config, hf = (Q3, _hf_qwen3()) if kind == "q3" else (Q25, _hf_qwen25())
  model_cls = Qwen3VLVisionModel if kind == "q3" else Qwen2_5_VLVisionModel
  inputs = vision_inputs(config, np.array([[1, 2, 4]]), max_patches=12)
  px = jnp.zeros((12, config.patch_dim))
  for remat in (False, True):
    boxed = jax.eval_shape(lambda: model_cls(config, remat=remat).init(
        jax.random.PRNGKey(0), px, **inputs))["params"]
    leaves = jax.tree_util.tree_leaves(
        boxed, is_leaf=lambda x: isinstance(x, nn.LogicallyPartitioned))
    assert all(isinstance(x, nn.LogicallyPartitioned) for x in leaves)
    assert all(len(x.names) == x.value.ndim for x in leaves)
    shapes = jax.tree_util.tree_map(lambda x: x.shape, nn.unbox(boxed))
    ref = jax.tree_util.tree_map(lambda x: x.shape, _to_flax(hf.state_dict()))
    assert shapes == ref
