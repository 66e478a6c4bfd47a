"""Qwen3-VL / Qwen3-VL-MoE and Qwen2.5-VL vision-language models (prefill and cached decoding).

Composition (spec /work/shared/design/qwen3vl_spec.md sections 2, 6, 7, 8; HF
``Qwen3VLModel.forward`` / ``Qwen3VLForConditionalGeneration``, ``Qwen2_5_VLModel.forward``):

1. ``x = embed_tokens(input_ids)`` [B, L, D].
2. One packed vision call over all images and videos of the batch gives merged features
   [Nm, D] (plus, for Qwen3-VL, one DeepStack tensor [Nm, D] per ``deepstack_visual_indexes``);
   or, for training batches, one patch buffer per row (``pixel_values`` [B, Np, F], tables
   stacked over rows) gives [B, Np/M^2, D] per row.
3. ``visual_token_index`` [B, L] (host, :func:`visual_token_index`) names the merged row of each
   placeholder token (-1 elsewhere; with per-row buffers, the row of *that batch row's* merged
   features): placeholder embeddings are **replaced** by those rows, and DeepStack entry k,
   gathered the same way, is added after decoder layer k at visual positions only (so in a
   packed row each segment receives exactly its own images' DeepStack features).
4. Rotary angles from ``position_ids`` [3, B, L] (host, :mod:`vlm.models.rope_index`) with
   ``vlm.nn.rope.mrope``: interleaved T/H/W frequencies for Qwen3-VL, sections for Qwen2.5-VL.
5. Decoder (:class:`vlm.models.qwen3.Qwen3Model`; dense or MoE), final norm, ``lm_head`` (or the
   tied embedding), float32 logits.

Packed training rows (the shared batch contract): ``segment_ids`` [B, L] (1..S per sample,
0 = padding) confine causal attention to each sample; ``position_ids`` restart per segment
(``rope_index`` run per sample); ``return_hidden=True`` returns the final normed hidden states
for a chunked loss (``Qwen3VL.logits`` via ``apply(..., method=Qwen3VL.logits)``, or
:func:`vlm.models.qwen3.lm_head_kernel`); MoE router logits are sown into ``intermediates``
(:func:`vlm.models.qwen3.router_logits`).

Parameter tree (HF safetensors keys minus the ``model.`` prefix, CONTRACT.md naming rule):
``visual/...`` (vlm.models.qwen_vit), ``language_model/{embed_tokens, layers_{i}, norm}``
(vlm.models.qwen3), ``lm_head/kernel`` [D, V] unless ``text.tie_word_embeddings``.

Images and videos share the tower: pack ``pixel_values = concat(image patches, video patches)``
and build the tables with ``qwen_vit.vision_inputs(config.vision, concat(image_grid_thw,
video_grid_thw), max_patches)``; :func:`visual_token_index` numbers image placeholders first,
then video placeholders, which matches that packing. Packing both into one call equals HF's two
calls (every vision op is per patch, per merge unit or per (image, temporal patch) segment).

float16 compute (``dtype=jnp.float16``) is supported and safe against float16 overflow, not
refused: the vision towers return float32 features and the decoder keeps a float32 residual
stream, so the token embeddings are taken into float32 before the features replace them (see
``vlm.nn.layers``, ``vlm.models.qwen_vit`` and ``vlm.models.qwen3`` for the per-path decisions).
bfloat16 and float32 are unchanged.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Mapping

import flax.linen as nn
import jax.numpy as jnp
import numpy as np

from vlm.models import qwen_vit
from vlm.models.qwen3 import Qwen3Model, Qwen3TextConfig, init_cache
from vlm.nn import layers
from vlm.nn import partitioning as P
from vlm.nn import rope

Dtype = Any

__all__ = ["Qwen3VLConfig", "Qwen2_5_VLConfig", "Qwen3VL", "Qwen2_5_VL", "visual_token_index",
           "decode_position_ids", "init_cache", "init_params", "dummy_inputs"]


def _text_dict(d: Mapping[str, Any], default_type: str) -> dict:
  text = dict(d.get("text_config") or {})
  if not text:  # legacy flat layout (Qwen2.5-VL Hub configs): text fields at the top level
    text = {k: v for k, v in d.items() if k != "vision_config"}
  text.setdefault("model_type", default_type)
  if "tie_word_embeddings" not in text and "tie_word_embeddings" in d:
    text["tie_word_embeddings"] = d["tie_word_embeddings"]
  return text


@dataclasses.dataclass(frozen=True)
class Qwen3VLConfig:
  """Qwen3-VL (dense or MoE) configuration (HF ``Qwen3VLConfig`` / ``Qwen3VLMoeConfig``).

  Attributes:
    vision: :class:`vlm.models.qwen_vit.Qwen3VLVisionConfig`; ``out_hidden_size`` must equal
      ``text.hidden_size``.
    text: :class:`vlm.models.qwen3.Qwen3TextConfig` (``num_experts > 0`` for Qwen3-VL-MoE) with
      ``mrope_section`` (sum = ``head_dim / 2``); Qwen3-VL always uses the interleaved layout.
    image_token_id, video_token_id, vision_start_token_id, vision_end_token_id: special tokens.
  Raises:
    ValueError: width or MRoPE section mismatches, token ids outside the vocabulary.
  """
  vision: qwen_vit.Qwen3VLVisionConfig
  text: Qwen3TextConfig
  image_token_id: int = 151655
  video_token_id: int = 151656
  vision_start_token_id: int = 151652
  vision_end_token_id: int = 151653

  interleaved = True
  model_type = "qwen3_vl"

  def __post_init__(self):
    if self.vision.out_hidden_size != self.text.hidden_size:
      raise ValueError(f"vision.out_hidden_size {self.vision.out_hidden_size} must equal "
                       f"text.hidden_size {self.text.hidden_size} (merged features replace "
                       "token embeddings)")
    sec = self.text.mrope_section
    if sec is None:
      sec = (24, 20, 20)  # HF default when rope_scaling has no mrope_section
      object.__setattr__(self, "text", dataclasses.replace(self.text, mrope_section=sec))
    if len(sec) != 3 or sum(sec) != self.text.head_dim // 2:
      raise ValueError(f"text.mrope_section {sec} must have 3 entries summing to head_dim/2 = "
                       f"{self.text.head_dim // 2}")
    if self.interleaved:  # fail at config time, not inside a traced forward
      rope.interleaved_owner(self.text.head_dim // 2, sec)
    for name in ("image_token_id", "video_token_id", "vision_start_token_id"):
      if not 0 <= getattr(self, name) < self.text.vocab_size:
        raise ValueError(f"{name}={getattr(self, name)} is outside the vocabulary "
                         f"[0, {self.text.vocab_size})")

  @property
  def deepstack(self) -> bool:
    return True

  @classmethod
  def from_hf_dict(cls, d: Mapping[str, Any]) -> "Qwen3VLConfig":
    """From an HF ``config.json`` dict (``model_type`` qwen3_vl or qwen3_vl_moe)."""
    moe = "moe" in str(d.get("model_type", ""))
    text = Qwen3TextConfig.from_hf_dict(
        _text_dict(d, "qwen3_vl_moe_text" if moe else "qwen3_vl_text"))
    if text.mrope_section is not None:
      text = dataclasses.replace(text, mrope_interleaved=True)
    vision = qwen_vit.Qwen3VLVisionConfig.from_dict(d.get("vision_config") or {})
    kw = {k: d[k] for k in ("image_token_id", "video_token_id", "vision_start_token_id",
                            "vision_end_token_id") if d.get(k) is not None}
    return cls(vision=vision, text=text, **kw)


@dataclasses.dataclass(frozen=True)
class Qwen2_5_VLConfig(Qwen3VLConfig):
  """Qwen2.5-VL configuration (HF ``Qwen2_5_VLConfig``): window-attention ViT
  (:class:`vlm.models.qwen_vit.Qwen2_5_VLVisionConfig`), Qwen2 text (q/k/v bias), sectioned MRoPE
  (default ``mrope_section`` (16, 24, 24)), no DeepStack. Raises as :class:`Qwen3VLConfig`."""
  vision: qwen_vit.Qwen2_5_VLVisionConfig
  text: Qwen3TextConfig
  image_token_id: int = 151655
  video_token_id: int = 151656
  vision_start_token_id: int = 151652
  vision_end_token_id: int = 151653

  interleaved = False
  model_type = "qwen2_5_vl"

  def __post_init__(self):
    if self.text.mrope_section is None:
      object.__setattr__(self, "text", dataclasses.replace(self.text, mrope_section=(16, 24, 24)))
    super().__post_init__()

  @property
  def deepstack(self) -> bool:
    return False

  @classmethod
  def from_hf_dict(cls, d: Mapping[str, Any]) -> "Qwen2_5_VLConfig":
    """From an HF ``config.json`` dict (nested ``text_config`` or the legacy flat layout)."""
    text = Qwen3TextConfig.from_hf_dict(_text_dict(d, "qwen2_5_vl_text"))
    text = dataclasses.replace(text, mrope_interleaved=False)
    vision = qwen_vit.Qwen2_5_VLVisionConfig.from_dict(d.get("vision_config") or {})
    kw = {k: d[k] for k in ("image_token_id", "video_token_id", "vision_start_token_id",
                            "vision_end_token_id") if d.get(k) is not None}
    return cls(vision=vision, text=text, **kw)


# ------------------------------------------------------------------------------------------------
# Host helpers.


def visual_token_index(input_ids, image_token_id: int, video_token_id: int, *,
                       video_offset: int | None = None, image_grid_thw=None, video_grid_thw=None,
                       spatial_merge_size: int = 2) -> np.ndarray:
  """Row of the merged visual features for every placeholder token (host numpy).

  Image placeholders are numbered 0, 1, ... in row-major order over (B, L) (HF's
  ``masked_scatter`` order); video placeholders continue at ``video_offset`` (default: the number of
  image placeholders, i.e. videos packed right after the images in the vision call).

  Args:
    input_ids: int [B, L].
    image_token_id, video_token_id: placeholder ids.
    video_offset: merged row of the first video token (e.g. the padded image bucket size / M^2).
    image_grid_thw, video_grid_thw: optional int [N, 3]; when given, the placeholder counts are
      checked against ``sum(t*h*w) / M^2`` (HF raises on a mismatch too, spec pitfall 24).
    spatial_merge_size: M.
  Returns:
    int32 [B, L]: merged row index, -1 for text tokens.
  Raises:
    ValueError: ``input_ids`` not 2-D, or placeholder counts that do not match the grids.
  """
  ids = np.asarray(input_ids)
  if ids.ndim != 2:
    raise ValueError(f"input_ids must be int [B, L], got shape {ids.shape}")
  unit = spatial_merge_size ** 2
  img, vid = ids == image_token_id, ids == video_token_id
  n_img, n_vid = int(img.sum()), int(vid.sum())
  for name, grid, n in (("image", image_grid_thw, n_img), ("video", video_grid_thw, n_vid)):
    if grid is not None:
      want = int(np.prod(np.asarray(grid).reshape(-1, 3), axis=1).sum()) // unit
      if want != n:
        raise ValueError(f"{n} {name} placeholder tokens but {name}_grid_thw needs {want} "
                         f"(sum t*h*w / {unit}); the prompt was truncated or the grids are wrong")
  out = np.full(ids.shape, -1, np.int32)
  out[img] = np.arange(n_img, dtype=np.int32)
  off = n_img if video_offset is None else int(video_offset)
  out[vid] = off + np.arange(n_vid, dtype=np.int32)
  return out


def decode_position_ids(rope_deltas, cache_index: int, length: int = 1) -> np.ndarray:
  """Position ids [3, B, length] for tokens after the prefill: ``cache_index + rope_deltas + i``
  on all three rows (spec 7.5). ``rope_deltas`` int [B, 1] from the prefill's get_rope_index."""
  d = np.asarray(rope_deltas).reshape(-1, 1)
  pos = cache_index + d + np.arange(length)[None]
  return np.broadcast_to(pos, (3,) + pos.shape).astype(np.int64)


def dummy_inputs(config: Qwen3VLConfig) -> tuple:
  """The smallest valid ``Qwen3VL.__call__`` arguments (one image of one merge window and its two
  placeholder tokens): ``(input_ids, position_ids, attention_mask, pixel_values, vision_tables,
  visual_token_index)``; enough for ``init`` to create every parameter."""
  m = config.vision.spatial_merge_size
  tables = qwen_vit.vision_inputs(config.vision, np.array([[1, m, m]]))
  pixels = jnp.zeros((m * m, config.vision.patch_dim), jnp.float32)
  ids = jnp.full((1, 1), config.image_token_id, jnp.int32)
  return ids, jnp.zeros((3, 1, 1), jnp.int32), None, pixels, tables, jnp.zeros((1, 1), jnp.int32)


def init_params(model: "Qwen3VL", rng) -> dict:
  """Randomly initialised ``"params"`` of ``model`` (every vision and text parameter, unboxed,
  in ``model.param_dtype``; scanned layouts follow ``model.scan_layers``). For shapes only, wrap
  it: ``jax.eval_shape(lambda: init_params(model, key))`` allocates nothing."""
  return nn.unbox(model.init(rng, *dummy_inputs(model.config)))["params"]


# ------------------------------------------------------------------------------------------------
# Model.


class Qwen3VL(nn.Module):
  """Qwen3-VL / Qwen3-VL-MoE (``config`` a :class:`Qwen3VLConfig`) and Qwen2.5-VL (a
  :class:`Qwen2_5_VLConfig`; also available as :class:`Qwen2_5_VL`) causal VLM.

  Attributes:
    config: model configuration.
    scan_layers, remat: passed to the decoder (:class:`vlm.models.qwen3.Qwen3Model`); ``remat``
      also to the vision tower.
    scan_vision: the vision tower's blocks under ``nn.scan`` (its ``scan_layers``: params
      ``visual/blocks/...`` with a leading ``LAYERS`` axis instead of ``visual/blocks_{i}``;
      :func:`vlm.models.qwen_vit.stack_blocks` converts), so its compile time does not grow with
      depth. Independent of ``scan_layers`` (a decoder mixing dense and MoE layers cannot scan,
      its tower can).
  The text config's ``attention_implementation`` / ``attention_block_size`` (vlm settings) choose
  the attention of the decoder's uncached path and of the vision tower alike.
  Call args:
    input_ids: int [B, L].
    position_ids: int [3, B, L] (rows T, H, W) from ``rope_index`` (prefill) or
      :func:`decode_position_ids` (decode).
    attention_mask: bool/0-1 [B, L] (True = real token) or None.
    pixel_values: float [Np, F] packed patches of all images then videos of the whole batch
      (zero rows for padding); or [B, Np, F], one buffer per batch row (training batches); or
      None (text only / decode).
    vision_tables: ``qwen_vit.vision_inputs(config.vision, grid_thw, Np)`` (dict of arrays), with
      ``pixel_values``; for [B, Np, F] pixels, each row's tables stacked on a leading B axis
      (e.g. segment_ids [B, Np], rope_positions [B, Np, 2], pos_embed_index [B, 4, Np]; Qwen2.5-VL
      window_index [B, Np/4] ...).
    visual_token_index: int [B, L] (-1 at text tokens); required with ``pixel_values``. For the
      packed [Np, F] form it indexes the merged rows of the whole call (:func:`visual_token_index`);
      for [B, Np, F] it indexes row b's own merged features (0 .. Np/M^2 - 1).
    kv_cache, cache_index: as :class:`vlm.models.qwen3.Qwen3Model` (``init_cache(config.text, B,
      T)``).
    deterministic: disables dropout.
    segment_ids: int [B, L] or None: packed samples 1..S, 0 = padding; attention causal within
      equal ids (combined with ``attention_mask`` when both are given).
    return_hidden: return the final normed hidden states [B, L, D] (in ``dtype``; float32 for
      float16 compute) instead of logits.
  Returns:
    (logits float32 [B, L, V] or hidden [B, L, D], new kv_cache or None).
  Raises:
    ValueError: inconsistent shapes, ``pixel_values`` without tables or index, per-row buffers
      whose batch differs from ``input_ids``'.
  Intermediates: with ``mutable=["intermediates"]`` MoE router logits are sown per layer
  (:func:`vlm.models.qwen3.router_logits`).
  ``init`` must be given ``pixel_values`` (any small grid) so that the ``visual`` parameters are
  created; calls without pixels touch only the decoder and head.
  """
  config: Qwen3VLConfig
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32
  scan_layers: bool = False
  remat: bool = False
  scan_vision: bool = False

  def setup(self):
    cfg = self.config
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    # the text config's attention choice (a vlm setting) also routes the ViT's packed images
    vis_kw = dict(attention_implementation=cfg.text.attention_implementation,
                  attention_block_size=cfg.text.attention_block_size, remat=self.remat,
                  scan_layers=self.scan_vision)
    if isinstance(cfg.vision, qwen_vit.Qwen2_5_VLVisionConfig):
      self.visual = qwen_vit.Qwen2_5_VLVisionModel(cfg.vision, **vis_kw, **kw)
    else:
      self.visual = qwen_vit.Qwen3VLVisionModel(cfg.vision, **vis_kw, **kw)
    self.language_model = Qwen3Model(cfg.text, scan_layers=self.scan_layers, remat=self.remat,
                                     **kw)
    if not cfg.text.tie_word_embeddings:
      self.lm_head = layers.Dense(cfg.text.vocab_size, kernel_axes=(P.EMBED, P.VOCAB),
                                  use_bias=False, **kw)

  def rope_angles(self, position_ids):
    """int [3, B, L] -> float32 [B, L, head_dim/2] MRoPE angles."""
    t = self.config.text
    return rope.mrope(jnp.asarray(position_ids), t.head_dim, t.rope_theta, t.mrope_section,
                      interleaved=self.config.interleaved)

  def logits(self, hidden):
    """[..., D] -> float32 [..., V] (matmul in ``dtype``); any leading axes, so a chunked loss can
    call it on a slice: ``model.apply(variables, hidden[:, i:j], method=Qwen3VL.logits)``."""
    if self.config.text.tie_word_embeddings:
      out = self.language_model.embed_tokens.attend(hidden)
    else:
      out = self.lm_head(hidden)
    return jnp.asarray(out, jnp.float32)

  def __call__(self, input_ids, position_ids, attention_mask=None, pixel_values=None,
               vision_tables=None, visual_token_index=None, kv_cache=None, cache_index=None,
               deterministic: bool = True, segment_ids=None, return_hidden: bool = False):
    cfg = self.config
    if input_ids.ndim != 2:
      raise ValueError(f"input_ids must be int [B, L], got shape {input_ids.shape}")
    b, l = input_ids.shape
    if tuple(position_ids.shape) != (3, b, l):
      raise ValueError(f"position_ids must be [3, B, L] = {(3, b, l)}, got {position_ids.shape}; "
                       "build them with vlm.models.rope_index")
    # float32 for float16 compute: the residual dtype, also that of the float16 towers' features
    x = jnp.asarray(self.language_model.embed(input_ids), layers.residual_dtype(self.dtype))
    deepstack = visual_mask = None
    if pixel_values is not None:
      if vision_tables is None or visual_token_index is None:
        raise ValueError("pixel_values needs vision_tables (qwen_vit.vision_inputs) and "
                         "visual_token_index (qwen3_vl.visual_token_index)")
      if tuple(visual_token_index.shape) != (b, l):
        raise ValueError(f"visual_token_index must be [B, L] = {(b, l)}, got "
                         f"{visual_token_index.shape}")
      if pixel_values.ndim not in (2, 3):
        raise ValueError(f"pixel_values must be packed [Np, F] or per row [B, Np, F], got shape "
                         f"{pixel_values.shape}")
      per_row = pixel_values.ndim == 3
      if per_row and pixel_values.shape[0] != b:
        raise ValueError(f"per-row pixel_values [B, Np, F] has B={pixel_values.shape[0]} but "
                         f"input_ids has B={b}; stack one patch buffer per batch row")
      out = self.visual(pixel_values, **vision_tables)
      merged, ds_list = out if cfg.deepstack else (out, [])
      if per_row:  # the tower's rows (VISION_BATCH: data-parallel over tensor too) -> LLM layout
        merged = P.constrain(merged, (P.BATCH, P.LENGTH, P.EMBED))
        ds_list = [P.constrain(d, (P.BATCH, P.LENGTH, P.EMBED)) for d in ds_list]
      idx = jnp.asarray(visual_token_index, jnp.int32)
      visual_mask = idx >= 0
      rows = jnp.clip(idx, 0, merged.shape[-2] - 1)

      def gather(feats):
        feats = jnp.asarray(feats, x.dtype)
        if per_row:  # [B, U, D]: row b's placeholders read row b's features
          picked = jnp.take_along_axis(feats, rows[..., None], axis=1)
        else:        # [U, D]: one packed call for the whole batch
          picked = feats[rows]
        return jnp.where(visual_mask[..., None], picked, 0)

      x = jnp.where(visual_mask[..., None], gather(merged), x)
      if ds_list:
        deepstack = [gather(d) for d in ds_list]
    h, cache = self.language_model(x, self.rope_angles(position_ids), attention_mask, deepstack,
                                   visual_mask if deepstack else None, kv_cache, cache_index,
                                   deterministic, segment_ids)
    if return_hidden:
      if self.is_initializing():
        self.logits(h[:, :1])  # init with return_hidden still creates lm_head
      return h, cache
    return self.logits(h), cache


class Qwen2_5_VL(Qwen3VL):
  """Qwen2.5-VL: :class:`Qwen3VL` with a :class:`Qwen2_5_VLConfig` (window-attention ViT, Qwen2
  decoder, sectioned MRoPE, no DeepStack). Same call signature and parameter layout."""
  config: Qwen2_5_VLConfig
