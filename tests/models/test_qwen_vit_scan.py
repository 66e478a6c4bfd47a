"""The Qwen vision towers under ``nn.scan`` (issue 10, "compile time flat in depth"): with the same
weights (unscanned ``blocks_{i}`` stacked by ``qwen_vit.stack_blocks``) the scanned tower gives
the unscanned tower's merged and DeepStack features and parameter gradients, with and without
remat, on two rows of several images plus padding; Qwen2.5-VL's per-layer full/window choice
survives the scan (checked against a swapped assignment); the stack/unstack helpers round-trip."""
from __future__ import annotations

import dataclasses
import functools

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tests.models import qwen_tiny as T
from vlm.models import qwen_vit

jax.config.update("jax_default_matmul_precision", "highest")

ROWS = [np.array([[1, 4, 8], [1, 2, 4], [1, 4, 4]]), np.array([[2, 4, 4], [1, 2, 2]])]
NP = 80
TOL = 1e-6


def _config(kind):
  cfg = T.config(kind).vision
  if kind == "q25":  # windowed blocks 0, 2, 4; full attention 1, 3
    return dataclasses.replace(cfg, depth=5, fullatt_block_indexes=(1, 3))
  return dataclasses.replace(cfg, depth=5, deepstack_visual_indexes=(3, 0, 4))  # unsorted taps


@functools.lru_cache(maxsize=None)
def _setup(kind):
  cfg = _config(kind)
  cls = qwen_vit.Qwen2_5_VLVisionModel if kind == "q25" else qwen_vit.Qwen3VLVisionModel
  rng = np.random.default_rng(1)
  pixels = rng.standard_normal((len(ROWS), NP, cfg.patch_dim)).astype(np.float32)
  tables = [qwen_vit.vision_inputs(cfg, g, NP) for g in ROWS]
  for b, g in enumerate(ROWS):
    pixels[b, int(np.prod(g, axis=1).sum()):] = 0
  stacked = {k: np.stack([t[k] for t in tables]) for k in tables[0]}
  params = T.spread(jax.jit(cls(cfg).init)(jax.random.PRNGKey(0), pixels, **stacked), 3)
  return cfg, cls, nn.unbox(params)["params"], pixels, stacked


def _value_and_grad(model, pixels, tables):
  weights = jax.random.normal(jax.random.PRNGKey(7), (4, NP // 4, 64))

  def f(params):
    out = model.apply({"params": params}, pixels, **tables)
    feats = [out[0], *out[1]] if isinstance(out, tuple) else [out]
    loss = sum(jnp.sum(jnp.sin(x) * weights[i]) for i, x in enumerate(feats)) / (NP // 4)
    return loss, out
  return jax.jit(jax.value_and_grad(f, has_aux=True))


@pytest.mark.parametrize("kind", ["dense", "q25"])
def test_scanned_tower_equals_unscanned_values_and_gradients(kind):
  cfg, cls, params, pixels, tables = _setup(kind)
  (loss, out), grads = _value_and_grad(cls(cfg), pixels, tables)(params)
  stacked = qwen_vit.stack_blocks(params)
  assert "blocks" in stacked and not any(k.startswith("blocks_") for k in stacked)
  assert stacked["blocks"]["attn"]["qkv"]["kernel"].shape[0] == cfg.depth
  # init of the scanned tower creates exactly this layout
  shapes = jax.eval_shape(cls(cfg, scan_layers=True).init, jax.random.PRNGKey(0), pixels,
                          **tables)["params"]
  assert jax.tree.map(lambda a: a.shape, nn.unbox(shapes)) == jax.tree.map(jnp.shape, stacked)
  for remat in ((True,) if kind == "dense" else (False,)):  # both paths, one compile per tower
    (loss_s, out_s), grads_s = _value_and_grad(cls(cfg, scan_layers=True, remat=remat), pixels,
                                               tables)(stacked)
    g_ref = qwen_vit.stack_blocks(grads)
    err_out = max(float(jnp.max(jnp.abs(a - b))) for a, b in
                  zip(jax.tree.leaves(out_s), jax.tree.leaves(out)))
    err_g = max(float(jnp.max(jnp.abs(a - b))) for a, b in
                zip(jax.tree.leaves(grads_s), jax.tree.leaves(g_ref)))
    print(f"{kind} remat={remat}: outputs max abs diff {err_out:.2e}, gradients {err_g:.2e}")
    assert abs(float(loss_s) - float(loss)) <= TOL
    chex.assert_trees_all_close(out_s, out, atol=TOL, rtol=0)
    chex.assert_trees_all_close(grads_s, g_ref, atol=TOL, rtol=0)
  if kind == "dense":  # every DeepStack tap is a different block's output
    assert len(out) == 2 and len(out[1]) == 3
    assert min(float(jnp.max(jnp.abs(a - b))) for i, a in enumerate(out[1])
               for b in out[1][i + 1:]) > 1e-2


def test_qwen25_scanned_full_attention_flags_matter():
  """The scan's per-layer flag picks the segments: another full-attention assignment changes the
  outputs (so the equality above does not hold by accident)."""
  cfg, cls, params, pixels, tables = _setup("q25")
  stacked = qwen_vit.stack_blocks(params)
  ref = cls(cfg, scan_layers=True).apply({"params": stacked}, pixels, **tables)
  other = dataclasses.replace(cfg, fullatt_block_indexes=(0, 2))
  got = cls(other, scan_layers=True).apply({"params": stacked}, pixels, **tables)
  assert float(jnp.max(jnp.abs(got - ref))) > 1e-3


def test_stack_unstack_round_trip_and_errors():
  _, _, params, _, _ = _setup("dense")
  stacked = qwen_vit.stack_blocks(params)
  back = qwen_vit.unstack_blocks(stacked)
  assert sorted(back) == sorted(params)
  chex.assert_trees_all_equal(back, params)
  assert qwen_vit.stack_blocks(stacked) is not None and "blocks" in qwen_vit.stack_blocks(stacked)
  chex.assert_trees_all_equal(qwen_vit.unstack_blocks(params), params)
  gap = {k: v for k, v in params.items() if k != "blocks_1"}
  with pytest.raises(ValueError, match="blocks"):
    qwen_vit.stack_blocks(gap)
