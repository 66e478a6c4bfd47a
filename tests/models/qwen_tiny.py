"""Tiny random Qwen-VL configs, well-conditioned random weights and packed-row builders shared by
the model tests (host numpy; the batch layout is the shared Qwen training batch contract of
/work/notes/common.md: segment_ids, per-segment MRoPE positions, one patch buffer per row,
visual_token_index into that row's merged features)."""
from __future__ import annotations

import dataclasses

import jax
import numpy as np

from vlm.models import qwen_vit
from vlm.models.qwen3 import Qwen3TextConfig
from vlm.models.qwen3_vl import Qwen2_5_VLConfig, Qwen3VLConfig, visual_token_index
from vlm.models.rope_index import qwen2_5_vl_get_rope_index, qwen3_vl_get_rope_index

IMG, VID, VS, VE, PAD = 250, 251, 252, 253, 0
TEXT = dict(vocab_size=256, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2, head_dim=16, rms_norm_eps=1e-6,
            rope_theta=10000.0)
MOE = dict(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32)


def config(kind: str, **text_overrides):
  """``kind``: "dense" (Qwen3-VL with 2 DeepStack taps), "moe" (Qwen3-VL-MoE) or "q25"
  (Qwen2.5-VL: window ViT, Qwen2 text, sectioned MRoPE)."""
  tok = dict(image_token_id=IMG, video_token_id=VID, vision_start_token_id=VS,
             vision_end_token_id=VE)
  if kind == "q25":
    vision = qwen_vit.Qwen2_5_VLVisionConfig(depth=2, hidden_size=32, num_heads=2,
                                             intermediate_size=32, out_hidden_size=64,
                                             patch_size=4, window_size=16,
                                             fullatt_block_indexes=[1], tokens_per_second=2)
    text = Qwen3TextConfig(**TEXT, attention_bias=True, o_proj_bias=False, use_qk_norm=False,
                           mrope_section=(2, 3, 3), **text_overrides)
    return Qwen2_5_VLConfig(vision=vision, text=text, **tok)
  vision = qwen_vit.Qwen3VLVisionConfig(depth=2, hidden_size=32, num_heads=2, intermediate_size=32,
                                        out_hidden_size=64, patch_size=4,
                                        num_position_embeddings=16, deepstack_visual_indexes=[0, 1])
  extra = MOE if kind == "moe" else {}
  text = Qwen3TextConfig(**TEXT, **extra, mrope_section=(4, 2, 2), mrope_interleaved=True,
                         **text_overrides)
  return Qwen3VLConfig(vision=vision, text=text, **tok)


def spread(params, seed: int):
  """Well-conditioned random weights in place of init's 0.02 normal (which makes attention almost
  uniform and hides masking errors): matrices N(0, 1/fan_in) (fan_in = second-to-last dim),
  vectors 1 + 0.1 N, stacked/expert tensors likewise per slice."""
  leaves, tree = jax.tree_util.tree_flatten(params)
  keys = jax.random.split(jax.random.PRNGKey(seed), len(leaves))
  new = [1.0 + 0.1 * jax.random.normal(k, x.shape, x.dtype) if x.ndim == 1 else
         jax.random.normal(k, x.shape, x.dtype) / np.sqrt(x.shape[-2])
         for k, x in zip(keys, leaves)]
  return jax.tree_util.tree_unflatten(tree, new)


@dataclasses.dataclass
class Sample:
  """One unpacked sample: token ids [L] and its images/videos (grids and HF-layout patches)."""
  ids: np.ndarray
  image_grids: np.ndarray | None
  video_grids: np.ndarray | None
  pixels: np.ndarray  # [N, F]: images then videos

  @property
  def grids(self):
    parts = [g for g in (self.image_grids, self.video_grids) if g is not None]
    return np.concatenate(parts) if parts else None


def make_samples(cfg, seed: int = 0) -> list[Sample]:
  """Three samples: text + image (4x6 patches) + text; text + video (2 temporal patches of 4x4;
  Qwen3-VL: one block per frame group behind its timestamp text, Qwen2.5-VL: one block) + a
  second image (2x4); text only."""
  rng = np.random.RandomState(seed)
  txt = lambda n: list(rng.randint(1, 200, size=n))
  blk = lambda n, tok: [VS] + [tok] * n + [VE]
  f = cfg.vision.patch_dim
  pix = lambda grids: rng.standard_normal((int(np.prod(grids, axis=1).sum()), f)).astype(np.float32)
  img_a = np.array([[1, 4, 6]])
  vid = np.array([[2, 4, 4]])
  img_b = np.array([[1, 2, 4]])
  if cfg.model_type == "qwen2_5_vl":
    video = blk(8, VID)
  else:
    video = sum((txt(2) + blk(4, VID) for _ in range(2)), [])
  s1 = Sample(np.array(txt(3) + blk(6, IMG) + txt(4)), img_a, None, pix(img_a))
  s2 = Sample(np.array(txt(2) + blk(2, IMG) + txt(1) + video + txt(3)), img_b, vid,
              np.concatenate([pix(img_b), pix(vid)]))
  s3 = Sample(np.array(txt(9)), None, None, np.zeros((0, f), np.float32))
  return [s1, s2, s3]


def rope_index(cfg, ids, image_grids, video_grids, mask=None):
  """Position ids [3, B, L] of (a batch of) unpacked samples with vlm.models.rope_index."""
  m = cfg.vision.spatial_merge_size
  if cfg.model_type == "qwen2_5_vl":
    pos, _ = qwen2_5_vl_get_rope_index(ids, image_grids, video_grids, mask, m, IMG, VID, VS,
                                       tokens_per_second=cfg.vision.tokens_per_second)
  else:
    pos, _ = qwen3_vl_get_rope_index(ids, image_grids, video_grids, mask, m, IMG, VID, VS)
  return pos


def pack_row(cfg, samples: list[Sample], length: int, max_patches: int) -> dict:
  """One packed row: segments 1..S in order, per-segment restarting positions, one patch buffer
  (each sample's images then videos, in row order) and the row-local visual_token_index."""
  unit = cfg.vision.spatial_merge_size ** 2
  ids = np.full(length, PAD, np.int32)
  seg = np.zeros(length, np.int32)
  pos = np.zeros((3, length), np.int32)
  index = np.full(length, -1, np.int32)
  pixels = np.zeros((max_patches, cfg.vision.patch_dim), np.float32)
  grids, t, p = [], 0, 0
  for s_id, s in enumerate(samples, start=1):
    n = len(s.ids)
    ids[t:t + n] = s.ids
    seg[t:t + n] = s_id
    pos[:, t:t + n] = rope_index(cfg, s.ids[None], s.image_grids, s.video_grids)[:, 0]
    local = visual_token_index(s.ids[None], IMG, VID, image_grid_thw=s.image_grids,
                               video_grid_thw=s.video_grids)[0]
    index[t:t + n] = np.where(local >= 0, local + p // unit, -1)
    pixels[p:p + len(s.pixels)] = s.pixels
    if s.grids is not None:
      grids.append(s.grids)
    t, p = t + n, p + len(s.pixels)
  if t > length or p > max_patches:
    raise ValueError(f"row needs {t} tokens / {p} patches, got {length} / {max_patches}")
  tables = qwen_vit.vision_inputs(cfg.vision, np.concatenate(grids), max_patches)
  return dict(input_ids=ids, segment_ids=seg, position_ids=pos, pixel_values=pixels,
              vision=tables, visual_token_index=index, num_patches=p, grids=np.concatenate(grids))


def stack_rows(rows: list[dict]) -> dict:
  """Per-row dicts of :func:`pack_row` -> the training batch ([B, ...]; positions [3, B, L])."""
  out = {k: np.stack([r[k] for r in rows]) for k in ("input_ids", "segment_ids",
                                                     "pixel_values", "visual_token_index")}
  out["position_ids"] = np.stack([r["position_ids"] for r in rows], axis=1)
  out["vision"] = {k: np.stack([r["vision"][k] for r in rows]) for k in rows[0]["vision"]}
  return out


def packed_form(cfg, rows: list[dict]):
  """The same batch in today's generation layout: one packed [Np_total, F] vision call over every
  row's patches, visual_token_index into that call's merged rows. Returns (pixels, tables, index)."""
  unit = cfg.vision.spatial_merge_size ** 2
  pixels = np.concatenate([r["pixel_values"][:r["num_patches"]] for r in rows])
  tables = qwen_vit.vision_inputs(cfg.vision, np.concatenate([r["grids"] for r in rows]))
  index, offset = [], 0
  for r in rows:
    i = r["visual_token_index"]
    index.append(np.where(i >= 0, i + offset, -1))
    offset += r["num_patches"] // unit
  return pixels, tables, np.stack(index).astype(np.int32)
