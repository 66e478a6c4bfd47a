"""The Qwen-VL task loss against HF transformers 4.57.1 (float32, tiny random configs).

``Qwen3VLForConditionalGeneration(labels=...)`` / ``Qwen3VLMoeForConditionalGeneration(labels=...,
output_router_logits=True)`` on a right-padded batch of two rows (row 0: two images; row 1: an
image and a video) against :func:`vlm.tasks.qwen_vl.loss_fn` on the same rows written in the
training batch schema (host-shifted labels, ``loss_mask``, per-row patch buffers, segment ids):
the loss within 1e-5, the MoE load-balancing term within 1e-6, and the gradient of every
parameter within 1e-5 of torch's ``backward()`` (HF names via the converter, which only
transposes and reshapes).
"""
import numpy as np
import pytest
import torch

import chex
import jax
import jax.numpy as jnp

from tests.equivalence import test_qwen3_vl as ref
from vlm.convert.hf_qwen3_vl import hf_state_from_params, load_hf_qwen3_vl
from vlm.models.qwen3_vl import Qwen3VL, visual_token_index
from vlm.models.qwen_vit import vision_inputs
from vlm.models.rope_index import qwen3_vl_get_rope_index
from vlm.tasks import qwen_vl

TOL = 1e-5
NP = 128  # patch buffer per row


def _rows():
  """Unpadded token rows, their image grids and video grids, and their patches."""
  rng = np.random.RandomState(0)
  txt = lambda n: list(rng.randint(1, 200, size=n))
  blk = lambda g, tok=ref.IMG: [ref.VS] + [tok] * (int(np.prod(g)) // 4) + [ref.VE]
  t, h, w = ref.VGRIDS[0]
  video = sum((txt(2) + blk((1, h, w), ref.VID) for _ in range(t)), [])
  rows = [txt(3) + blk(ref.GRIDS[0]) + txt(2) + blk(ref.GRIDS[1]) + txt(5),
          txt(2) + blk(ref.GRIDS[2]) + txt(1) + video + txt(4)]
  grids = [ref.GRIDS[:2], ref.GRIDS[2:]]
  vgrids = [np.zeros((0, 3), np.int64), ref.VGRIDS]
  f = 3 * 2 * ref.VISION["patch_size"] ** 2
  pixels = [rng.standard_normal((int(np.prod(g, axis=1).sum()) + int(np.prod(v, axis=1).sum()),
                                 f)).astype(np.float32) for g, v in zip(grids, vgrids)]
  return rows, grids, vgrids, pixels


def _batches(config):
  rows, grids, vgrids, pixels = _rows()
  n = max(map(len, rows))
  b = len(rows)
  ids = np.zeros((b, n), np.int64)
  mask = np.zeros((b, n), np.int64)
  for i, r in enumerate(rows):
    ids[i, :len(r)], mask[i, :len(r)] = r, 1
  vision_tok = (ids == ref.IMG) | (ids == ref.VID)
  hf_labels = np.where(mask.astype(bool) & ~vision_tok, ids, -100)
  # HF inputs: images of all rows, then videos, flattened
  img_px = np.concatenate([p[:int(np.prod(g, axis=1).sum())] for p, g in zip(pixels, grids)])
  vid_px = np.concatenate([p[int(np.prod(g, axis=1).sum()):] for p, g in zip(pixels, grids)])
  hf = dict(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask),
            pixel_values=torch.tensor(img_px), image_grid_thw=torch.tensor(ref.GRIDS),
            pixel_values_videos=torch.tensor(vid_px), video_grid_thw=torch.tensor(ref.VGRIDS),
            labels=torch.tensor(hf_labels))
  # vlm training schema: per-row positions, patches, tables and gather index
  position_ids = np.zeros((3, b, n), np.int32)
  pv = np.zeros((b, NP, pixels[0].shape[1]), np.float32)
  index = np.full((b, n), -1, np.int32)
  tables = []
  for i in range(b):
    row_ids, row_mask = ids[i:i + 1], mask[i:i + 1]
    vg = vgrids[i] if len(vgrids[i]) else None
    pos, _ = qwen3_vl_get_rope_index(row_ids, grids[i], vg, row_mask, 2, ref.IMG, ref.VID, ref.VS)
    position_ids[:, i] = np.where(row_mask[0].astype(bool), pos[:, 0], 0)
    pv[i, :len(pixels[i])] = pixels[i]
    n_img = int(np.prod(grids[i], axis=1).sum()) // 4
    index[i] = visual_token_index(row_ids, ref.IMG, ref.VID, video_offset=n_img)[0]
    tables.append(vision_inputs(config.vision, np.concatenate([grids[i], vgrids[i]]),
                                max_patches=NP))
  labels = np.zeros((b, n), np.int32)
  labels[:, :-1] = ids[:, 1:]
  loss_mask = (hf_labels[:, 1:] != -100).astype(np.float32)
  loss_mask = np.concatenate([loss_mask, np.zeros((b, 1), np.float32)], axis=1)
  batch = {"input_ids": ids.astype(np.int32), "segment_ids": mask.astype(np.int32),
           "position_ids": position_ids, "labels": labels * (loss_mask > 0),
           "loss_mask": loss_mask, "pixel_values": pv,
           "vision": {k: np.stack([t[k] for t in tables]) for k in tables[0]},
           "visual_token_index": index}
  return hf, batch


@pytest.mark.parametrize("moe", [False, True], ids=["dense", "moe"])
def test_loss_and_gradients_match_hf(tmp_path, moe):
  hf_model = ref._hf_model(moe)
  hf_model.save_pretrained(tmp_path, safe_serialization=True)
  config, params = load_hf_qwen3_vl(str(tmp_path))
  hf_in, batch = _batches(config)
  kwargs = {"output_router_logits": True} if moe else {}
  out = hf_model(**hf_in, **kwargs)
  out.loss.backward()
  want_grads = {k: v.grad.numpy() for k, v in hf_model.named_parameters() if v.grad is not None}

  model = Qwen3VL(config)
  # chunk_size 8 does not divide the row length: the tail chunk is exercised too
  fn = jax.jit(jax.value_and_grad(
      lambda p: qwen_vl.loss_fn(model, p, batch, None, chunk_size=8), has_aux=True))
  (loss, metrics), grads = fn(params)
  chex.assert_tree_all_finite(grads)
  err = abs(float(loss) - float(out.loss))
  print(f"{'moe' if moe else 'dense'} loss vlm {float(loss):.6f} HF {float(out.loss):.6f} "
        f"err {err:.2e}")
  assert err <= TOL
  assert float(metrics["loss_weight"]) == float((hf_in["labels"][:, 1:] != -100).sum())
  if moe:
    aux_err = abs(float(metrics["aux_loss"]) - float(out.aux_loss))
    print(f"aux loss err {aux_err:.2e}")
    assert float(out.aux_loss) > 0 and aux_err <= 1e-6
  else:
    assert float(metrics["aux_loss"]) == 0.0

  got = hf_state_from_params(config, jax.device_get(grads))
  # HF keeps the model under model.* and tied heads out of named_parameters
  want = {k: v for k, v in want_grads.items()}
  missing = sorted(set(want) - set(got))
  assert not missing, missing[:5]
  worst = max((float(np.abs(got[k] - want[k]).max()), k) for k in want)
  print(f"max gradient err {worst[0]:.2e} ({worst[1]}) over {len(want)} parameters")
  assert worst[0] <= TOL
  # every trainable tensor received a gradient somewhere (nothing silently detached)
  nonzero = [k for k in want if np.abs(got[k]).max() > 0]
  assert len(nonzero) >= len(want) - 2


def test_packed_loss_is_token_weighted_mean(tmp_path):
  """Both rows packed into one row (two segments) give the token-weighted mean of the rows'
  losses: the loss of the packed batch equals the loss of the padded two-row batch."""
  hf_model = ref._hf_model(False)
  hf_model.save_pretrained(tmp_path, safe_serialization=True)
  config, params = load_hf_qwen3_vl(str(tmp_path))
  _, batch = _batches(config)
  model = Qwen3VL(config)
  lengths = batch["segment_ids"].sum(1)
  n = int(lengths.sum())
  packed = {"vision": {}}
  for k in ("input_ids", "labels", "loss_mask", "visual_token_index"):
    parts = [batch[k][i, :lengths[i]] for i in range(2)]
    if k == "visual_token_index":
      off = int((batch["vision"]["segment_ids"][0] > 0).sum()) // 4
      parts[1] = np.where(parts[1] >= 0, parts[1] + off, -1)
    packed[k] = np.concatenate(parts)[None]
  packed["segment_ids"] = np.concatenate([np.full(lengths[0], 1), np.full(lengths[1], 2)])[None]
  packed["position_ids"] = np.concatenate(
      [batch["position_ids"][:, i, :lengths[i]] for i in range(2)], axis=1)[:, None]
  rows, grids, vgrids, pixels = _rows()
  pv = np.zeros((1, 2 * NP, pixels[0].shape[1]), np.float32)
  allpx = np.concatenate(pixels)
  pv[0, :len(allpx)] = allpx
  packed["pixel_values"] = pv
  t = vision_inputs(config.vision, np.concatenate([grids[0], vgrids[0], grids[1], vgrids[1]]),
                    max_patches=2 * NP)
  packed["vision"] = {k: v[None] for k, v in t.items()}
  assert packed["input_ids"].shape == (1, n)
  f = jax.jit(lambda p, b: qwen_vl.loss_fn(model, p, b, None, chunk_size=16))
  loss_rows, m_rows = f(params, batch)
  loss_packed, m_packed = f(params, packed)
  per_row = [f(params, jax.tree.map(lambda x: x[i:i + 1] if x.shape[0] == 2 else x[:, i:i + 1],
                                    batch))
             for i in range(2)]
  weights = [float(m["loss_weight"]) for _, m in per_row]
  mean = sum(float(l) * w for (l, _), w in zip(per_row, weights)) / sum(weights)
  print(f"packed {float(loss_packed):.6f} rows {float(loss_rows):.6f} weighted mean {mean:.6f}")
  np.testing.assert_allclose(float(loss_packed), mean, atol=1e-5)
  np.testing.assert_allclose(float(loss_rows), mean, atol=1e-5)


@pytest.mark.parametrize("implementation", ["chunked", "splash"])
def test_attention_implementations_equal_xla(tmp_path, implementation):
  """The decoder's blockwise attention (segment ids instead of a dense mask) gives the loss and
  the gradients of the dense path within 1e-5 (block 16 over rows of ~70 tokens: several blocks,
  a partial tail block, padding); ``splash`` runs in Pallas interpret mode on CPU."""
  import dataclasses
  hf_model = ref._hf_model(True)
  hf_model.save_pretrained(tmp_path, safe_serialization=True)
  config, params = load_hf_qwen3_vl(str(tmp_path))
  _, batch = _batches(config)
  out = {}
  for impl in ("xla", implementation):
    cfg = dataclasses.replace(config, text=dataclasses.replace(
        config.text, attention_implementation=impl, attention_block_size=16))
    model = Qwen3VL(cfg)
    fn = jax.jit(jax.value_and_grad(
        lambda p: qwen_vl.loss_fn(model, p, batch, None, chunk_size=16), has_aux=True))
    out[impl] = fn(params)
  (l0, _), g0 = out["xla"]
  (l1, _), g1 = out[implementation]
  print(f"{implementation}: loss err {abs(float(l0) - float(l1)):.2e}")
  np.testing.assert_allclose(float(l1), float(l0), atol=TOL)
  chex.assert_trees_all_close(g1, g0, atol=TOL)


def test_qwen2_5_vl_loss_and_gradients_match_hf(tmp_path):
  """Qwen2.5-VL (window-attention ViT, Qwen2 decoder, sectioned MRoPE): the task loss on per-row
  patch buffers (window tables per row) equals ``Qwen2_5_VLForConditionalGeneration(labels=)``
  and every parameter gradient equals torch's within 1e-5."""
  from transformers import Qwen2_5_VLConfig as HF25Config, Qwen2_5_VLForConditionalGeneration
  from vlm.models.qwen3_vl import Qwen2_5_VL
  from vlm.models.rope_index import qwen2_5_vl_get_rope_index
  torch.manual_seed(0)
  vision = dict(depth=2, hidden_size=32, num_heads=2, intermediate_size=64, out_hidden_size=64,
                patch_size=8, temporal_patch_size=2, spatial_merge_size=2, window_size=32,
                fullatt_block_indexes=[1], tokens_per_second=2)
  text = {k: v for k, v in ref.TEXT.items() if k not in ("head_dim", "rope_scaling")}
  text["rope_scaling"] = {"type": "mrope", "mrope_section": [2, 3, 3]}
  hf_cfg = HF25Config(vision_config=vision, text_config=text, image_token_id=ref.IMG,
                      video_token_id=ref.VID, vision_start_token_id=ref.VS,
                      vision_end_token_id=ref.VE)
  hf_cfg._attn_implementation = "eager"
  hf_model = ref.randomize_hf(Qwen2_5_VLForConditionalGeneration(hf_cfg), 3)
  hf_model.save_pretrained(tmp_path, safe_serialization=True)
  config, params = load_hf_qwen3_vl(str(tmp_path))

  rng = np.random.RandomState(2)
  txt = lambda n: list(rng.randint(1, 200, size=n))
  blk = lambda g: [ref.VS] + [ref.IMG] * (int(np.prod(g)) // 4) + [ref.VE]
  grids = [np.array([[1, 6, 8], [1, 2, 4]]), np.array([[1, 4, 4]])]
  rows = [txt(2) + blk(grids[0][0]) + txt(2) + blk(grids[0][1]) + txt(4),
          txt(3) + blk(grids[1][0]) + txt(6)]
  f = 3 * 2 * 64
  pixels = [rng.standard_normal((int(np.prod(g, axis=1).sum()), f)).astype(np.float32)
            for g in grids]
  b, n = 2, max(map(len, rows))
  ids = np.zeros((b, n), np.int64)
  mask = np.zeros((b, n), np.int64)
  for i, r in enumerate(rows):
    ids[i, :len(r)], mask[i, :len(r)] = r, 1
  hf_labels = np.where(mask.astype(bool) & (ids != ref.IMG), ids, -100)
  out = hf_model(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask),
                 pixel_values=torch.tensor(np.concatenate(pixels)),
                 image_grid_thw=torch.tensor(np.concatenate(grids)),
                 labels=torch.tensor(hf_labels))
  out.loss.backward()
  want = {k: v.grad.numpy() for k, v in hf_model.named_parameters() if v.grad is not None}

  npatch = 128
  position_ids = np.zeros((3, b, n), np.int32)
  pv = np.zeros((b, npatch, f), np.float32)
  index = np.full((b, n), -1, np.int32)
  tables = []
  for i in range(b):
    pos, _ = qwen2_5_vl_get_rope_index(ids[i:i + 1], grids[i], None, mask[i:i + 1], 2, ref.IMG,
                                       ref.VID, ref.VS, None, config.vision.tokens_per_second)
    position_ids[:, i] = np.where(mask[i].astype(bool), pos[:, 0], 0)
    pv[i, :len(pixels[i])] = pixels[i]
    index[i] = visual_token_index(ids[i:i + 1], ref.IMG, ref.VID)[0]
    tables.append(vision_inputs(config.vision, grids[i], max_patches=npatch))
  labels = np.zeros((b, n), np.int32)
  labels[:, :-1] = ids[:, 1:]
  loss_mask = np.concatenate([(hf_labels[:, 1:] != -100), np.zeros((b, 1), bool)], 1)
  batch = {"input_ids": ids.astype(np.int32), "segment_ids": mask.astype(np.int32),
           "position_ids": position_ids, "labels": labels * loss_mask,
           "loss_mask": loss_mask.astype(np.float32), "pixel_values": pv,
           "vision": {k: np.stack([t[k] for t in tables]) for k in tables[0]},
           "visual_token_index": index}
  model = Qwen2_5_VL(config)
  (loss, _), grads = jax.jit(jax.value_and_grad(
      lambda p: qwen_vl.loss_fn(model, p, batch, None, chunk_size=8), has_aux=True))(params)
  err = abs(float(loss) - float(out.loss))
  got = hf_state_from_params(config, jax.device_get(grads))
  worst = max((float(np.abs(got[k] - want[k]).max()), k) for k in want)
  print(f"qwen2.5-vl loss err {err:.2e}, max gradient err {worst[0]:.2e} ({worst[1]}) over "
        f"{len(want)} parameters")
  assert err <= TOL and worst[0] <= TOL
