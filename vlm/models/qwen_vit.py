"""Qwen3-VL and Qwen2.5-VL vision towers (packed patch sequences, static shapes), host and device.

Source of the math: /work/shared/design/qwen3vl_spec.md sections 3 (Qwen3-VL ViT), 4 (Qwen2.5-VL
window-attention ViT), 10 (checkpoint keys) and 11 (numerics); HF ``transformers`` 4.57.1
``models/qwen3_vl/modeling_qwen3_vl.py`` (``Qwen3VLVisionModel``, ``Qwen3VLVisionPatchEmbed``,
``fast_pos_embed_interpolate``, ``rot_pos_emb``, ``Qwen3VLVisionPatchMerger``,
``Qwen3VLVisionBlock``) and ``models/qwen2_5_vl/modeling_qwen2_5_vl.py``
(``Qwen2_5_VisionTransformerPretrainedModel``: ``get_window_index``, ``fullatt_block_indexes``,
``Qwen2RMSNorm`` (``vlm.nn.layers.RMSNorm``), SwiGLU MLP, ``Qwen2_5_VLPatchMerger``).

The work is split in two (architecture.md, "Fixed shapes for variable images"):

* **Host** (numpy, in the data pipeline): :func:`vision_inputs_from_grids` turns the
  ``grid_thw`` rows of one packed sequence into per-patch index arrays -- segment ids, (row, col)
  rotary coordinates, the 4-corner bilinear position-table indices/weights (Qwen3-VL) and the
  window permutation/segments (Qwen2.5-VL) -- padded to a fixed ``max_patches`` bucket.
* **Device** (Flax linen): :class:`Qwen3VLVisionModel` and :class:`Qwen2_5_VLVisionModel` only
  gather by those indices, so every packing of images into the same bucket has the same shapes and
  compiles once.

Named axes in shapes: ``B`` optional leading batch of packed sequences, ``Np`` padded patch count
(``max_patches``), ``U = Np / M**2`` merge units (one LLM token each), ``F = C*Tp*P*P`` flattened
patch width, ``Dv`` width, ``Hv`` heads, ``hd`` head dim, ``Iv`` MLP width, ``Dout`` output width.
``M`` = ``spatial_merge_size``.

Sequence layout: patches of all images/videos of one packed sequence are concatenated in input
order, each grid row ``(t, h, w)`` in HF's merge-window order (for each temporal patch, 2x2
windows in raster order, each window's 4 patches in raster order), then zero rows up to ``Np``.
Padding has segment id 0; real segments are numbered from 1, one per (grid row, temporal patch)
as HF's ``cu_seqlens``. Attention allows query i -> key j iff ``segment_ids[i] == segment_ids[j]``,
so real tokens never see padding (padding tokens see only padding); the merged outputs of padded
merge units are set to zero.

Attention implementation (the towers' ``attention_implementation`` / ``attention_block_size``
module attributes, vlm settings that are not part of the HF vision config; :class:`Qwen3VL
<vlm.models.qwen3_vl.Qwen3VL>` passes its text config's values): ``"xla"`` builds the dense
``[B, 1, Np, Np]`` segment mask and calls :func:`vlm.nn.attention.dot_product_attention` (memory
O(Np**2) per head); every other choice (``"chunked"``, ``"splash"``, ``"cudnn"``, ``"auto"``) calls
the segment-aware :func:`vlm.nn.attention.attention` with the per-row segment ids (Qwen2.5-VL
windowed blocks: the window segment ids), non-causal, so no ``[Np, Np]`` array exists and the
blocks of different images (or windows) are skipped by ``chunked``. ``"auto"`` resolving to
``"xla"`` takes the dense path.

float16 (``dtype=jnp.float16``): computed safely, not refused (decision per path; mechanism in
``vlm.nn.layers``). Measured reports put real checkpoints beyond 65,504 in exactly these towers:
the Qwen2.5-VL-3B ViT's last block (SwiGLU ``down_proj`` output and the residual after it;
llama.cpp issue 17534, vLLM PR 13968, which clamps) and the Qwen3-VL-2B ViT ``linear_fc1`` output
(unsloth-zoo PR 787); HF 4.57.1 has no float16 guard here (no clamp: inf, then NaN in the merged
features). Here, for float16 compute: attention scores are float32 (``vlm.nn.attention``); the
residual stream is float32 (:func:`vlm.nn.layers.residual_dtype`); the MLP expansions
(``gate_proj``/``up_proj``, ``linear_fc1``), their activation product, the projections back into
the residual (``down_proj``, ``linear_fc2``, ``attn/proj``) and the merger MLPs produce float32
(``Dense(wide_float16=True)``: float16 x float16 products, float32 accumulation, rows pre-scaled
into float16 range); LayerNorm/RMSNorm normalise in float32. The towers then return float32
features (the decoder's float32 residual takes them as they are). bfloat16 and float32 compute
exactly what they did before.

Parameter trees mirror the HF keys under ``model.visual.`` (CONTRACT.md rule)::

  Qwen3VLVisionModel:
    patch_embed/proj/{kernel [F, Dv], bias [Dv]}  (Conv3d [Dv, C, Tp, P, P] -> reshape(Dv, F).T)
    pos_embed/embedding [G*G, Dv]
    blocks_{i}/{norm1, norm2 (LayerNorm eps 1e-6), attn/{qkv [Dv, 3Dv] (+bias), proj},
                mlp/{linear_fc1, linear_fc2}}
    merger/{norm [Dv], linear_fc1 [4Dv, 4Dv], linear_fc2 [4Dv, Dout]}
    deepstack_merger_list_{k}/{norm [4Dv], linear_fc1, linear_fc2}
  Qwen2_5_VLVisionModel:
    patch_embed/proj/kernel [F, Dv]   (no bias)
    blocks_{i}/{norm1, norm2 (RMSNorm scale), attn/{qkv, proj}, mlp/{gate_proj, up_proj, down_proj}}
    merger/{ln_q/scale [Dv], mlp_0 [4Dv, 4Dv], mlp_2 [4Dv, Dout]}

With ``scan_layers=True`` the ``blocks_{i}`` subtrees are one ``blocks`` subtree whose leaves carry
a leading layer axis (:func:`stack_blocks`); Qwen2.5-VL's full-attention blocks are picked per
layer inside the scan, Qwen3-VL's DeepStack taps are collected in a [K, B, Np, Dv] buffer.

Sharding (``vlm.nn.partitioning``): activations' rows carry ``VISION_BATCH`` (data-parallel over
every mesh axis that divides them, :func:`constrain_rows`), attention/MLP weights
``VISION_HEADS`` / ``VISION_MLP`` (replicated over ``tensor`` by default), so the tower is
data-parallel while the LLM is tensor-parallel; under a mesh ``splash`` runs in a shard_map over
the rows.
"""
from __future__ import annotations

import dataclasses
import re
from typing import Any, Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from vlm.models.qwen3 import stack_layers, unstack_layers
from vlm.nn import layers
from vlm.nn import partitioning as P
from vlm.nn import rope
from vlm.nn.attention import (IMPLEMENTATIONS, attention, dot_product_attention,
                              resolve_implementation)

Dtype = Any

ACTIVATION_AXES = (P.VISION_BATCH, P.LENGTH, P.EMBED)
VISION_ROPE_THETA = 10000.0


# ----------------------------------------------------------------------------------------------
# Configs (HF field names)
# ----------------------------------------------------------------------------------------------


def _from_dict(cls, d: Mapping[str, Any]):
  """Builds ``cls`` from an HF ``vision_config`` dict, ignoring keys the dataclass lacks."""
  names = {f.name for f in dataclasses.fields(cls)}
  return cls(**{k: v for k, v in d.items() if k in names})


@dataclasses.dataclass(frozen=True)
class Qwen3VLVisionConfig:
  """Qwen3-VL vision tower (HF ``Qwen3VLVisionConfig``; spec sections 1.1, 3).

  Defaults are HF's class defaults (which match no released model: always read the real config,
  spec 1.2). ``deepstack_visual_indexes`` are 0-based block indexes whose outputs feed the
  DeepStack mergers. Lists given for tuple fields are converted to tuples.

  Raises:
    ValueError: when ``hidden_size`` is not divisible by ``num_heads``, the head dim is not a
      multiple of 4 (2-D RoPE splits half of it between rows and columns), the position table is
      not a square, or a DeepStack index is outside ``[0, depth)`` or repeated.
  """
  depth: int = 27
  hidden_size: int = 1152
  hidden_act: str = "gelu_pytorch_tanh"
  intermediate_size: int = 4304
  num_heads: int = 16
  in_channels: int = 3
  patch_size: int = 16
  spatial_merge_size: int = 2
  temporal_patch_size: int = 2
  out_hidden_size: int = 3584
  num_position_embeddings: int = 2304
  deepstack_visual_indexes: tuple[int, ...] = (8, 16, 24)
  initializer_range: float = 0.02

  def __post_init__(self):
    object.__setattr__(self, "deepstack_visual_indexes", tuple(self.deepstack_visual_indexes))
    _check_heads(self.hidden_size, self.num_heads)
    g = int(round(self.num_position_embeddings ** 0.5))
    if g * g != self.num_position_embeddings:
      raise ValueError(f"num_position_embeddings {self.num_position_embeddings} is not a perfect "
                       "square; the learned position table must be G x G")
    idx = self.deepstack_visual_indexes
    if len(set(idx)) != len(idx) or any(not 0 <= i < self.depth for i in idx):
      raise ValueError(f"deepstack_visual_indexes {idx} must be distinct block indexes in "
                       f"[0, depth={self.depth})")

  @property
  def head_dim(self) -> int:
    return self.hidden_size // self.num_heads

  @property
  def num_grid_per_side(self) -> int:
    return int(round(self.num_position_embeddings ** 0.5))

  @property
  def patch_dim(self) -> int:
    """Width F of one flattened patch row of ``pixel_values`` (C * Tp * P * P)."""
    return self.in_channels * self.temporal_patch_size * self.patch_size ** 2

  @classmethod
  def from_dict(cls, d: Mapping[str, Any]) -> "Qwen3VLVisionConfig":
    return _from_dict(cls, d)


@dataclasses.dataclass(frozen=True)
class Qwen2_5_VLVisionConfig:
  """Qwen2.5-VL vision tower (HF ``Qwen2_5_VLVisionConfig``; spec sections 1.3, 4).

  Defaults are HF's class defaults; released models use ``hidden_size=1280`` and ``out_hidden_size``
  = the text width (spec 1.3). ``window_size`` is in pixels; windows hold
  ``window_size / spatial_merge_size / patch_size`` merge units per side.

  Raises:
    ValueError: on heads/head-dim problems (as :class:`Qwen3VLVisionConfig`), a ``window_size``
      that is not a positive multiple of ``spatial_merge_size * patch_size``, or full-attention
      block indexes outside ``[0, depth)``.
  """
  depth: int = 32
  hidden_size: int = 3584
  hidden_act: str = "silu"
  intermediate_size: int = 3420
  num_heads: int = 16
  in_channels: int = 3
  patch_size: int = 14
  spatial_merge_size: int = 2
  temporal_patch_size: int = 2
  tokens_per_second: int = 4
  window_size: int = 112
  out_hidden_size: int = 3584
  fullatt_block_indexes: tuple[int, ...] = (7, 15, 23, 31)
  initializer_range: float = 0.02

  def __post_init__(self):
    object.__setattr__(self, "fullatt_block_indexes", tuple(self.fullatt_block_indexes))
    _check_heads(self.hidden_size, self.num_heads)
    unit = self.spatial_merge_size * self.patch_size
    if self.window_size <= 0 or self.window_size % unit:
      raise ValueError(f"window_size {self.window_size} must be a positive multiple of "
                       f"spatial_merge_size * patch_size = {unit}")
    if any(not 0 <= i < self.depth for i in self.fullatt_block_indexes):
      raise ValueError(f"fullatt_block_indexes {self.fullatt_block_indexes} must lie in "
                       f"[0, depth={self.depth})")

  @property
  def head_dim(self) -> int:
    return self.hidden_size // self.num_heads

  @property
  def patch_dim(self) -> int:
    return self.in_channels * self.temporal_patch_size * self.patch_size ** 2

  @classmethod
  def from_dict(cls, d: Mapping[str, Any]) -> "Qwen2_5_VLVisionConfig":
    return _from_dict(cls, d)


def _check_heads(hidden_size: int, num_heads: int) -> None:
  if hidden_size % num_heads:
    raise ValueError(f"hidden_size {hidden_size} is not divisible by num_heads {num_heads}")
  if (hidden_size // num_heads) % 4:
    raise ValueError(f"head dim {hidden_size // num_heads} must be a multiple of 4 for the "
                     "vision 2-D RoPE (half of it rotates with rows, half with columns)")


# ----------------------------------------------------------------------------------------------
# Host side (numpy)
# ----------------------------------------------------------------------------------------------


def _validate_grids(grid_thw, spatial_merge_size: int) -> np.ndarray:
  grid = np.asarray(grid_thw)
  if grid.ndim != 2 or grid.shape[1] != 3 or grid.shape[0] == 0:
    raise ValueError(f"grid_thw must be a non-empty integer array [N, 3] of (t, h, w) rows, got "
                     f"shape {grid.shape}")
  if not np.issubdtype(grid.dtype, np.integer):
    raise ValueError(f"grid_thw must hold integers (patch counts), got dtype {grid.dtype}")
  if (grid <= 0).any():
    raise ValueError(f"grid_thw entries must be positive, got {grid.tolist()}")
  m = spatial_merge_size
  if (grid[:, 1] % m).any() or (grid[:, 2] % m).any():
    raise ValueError(f"grid heights and widths must be multiples of spatial_merge_size={m} "
                     f"(the processor resizes to multiples of patch_size * {m}), got "
                     f"{grid.tolist()}")
  return grid.astype(np.int64)


def merge_window_coords(h: int, w: int, spatial_merge_size: int) -> tuple[np.ndarray, np.ndarray]:
  """(row, col) patch coordinates of one temporal patch in merge-window (ViT sequence) order.

  Sequence index ``n = ((bi * (w/M) + bj) * M + ii) * M + ij`` holds patch
  ``(bi*M + ii, bj*M + ij)`` (spec 3.3, 3.8; HF ``rot_pos_emb``).
  Returns: two int64 arrays [h*w].
  """
  m = spatial_merge_size
  bi, bj, ii, ij = np.meshgrid(np.arange(h // m), np.arange(w // m), np.arange(m), np.arange(m),
                               indexing="ij")
  return (bi * m + ii).reshape(-1), (bj * m + ij).reshape(-1)


def torch_linspace_f32(start: float, end: float, steps: int) -> np.ndarray:
  """float32 ``torch.linspace(start, end, steps)`` as the PyTorch CPU kernel computes it.

  The kernel takes ``step = (end - start) / (steps - 1)`` in float32, then ``start + step*i`` for
  ``i < steps // 2`` and ``end - step*(steps-1-i)`` otherwise. The compiled kernel fuses the
  multiply-add (one rounding), reproduced here by evaluating in float64 (the float32 x integer
  product is exact there) and rounding once; this matched torch 2.13 exactly for every size
  2..2000 tried (spec 3.2 warns of ~1-ulp differences with the unfused formula).
  Returns: float32 [steps].
  """
  if steps < 2:
    raise ValueError(f"linspace needs at least 2 steps here, got {steps}")
  a, b = np.float32(start), np.float32(end)
  step = np.float32(np.float32(b - a) / np.float32(steps - 1))
  i = np.arange(steps, dtype=np.float64)
  lo = np.float64(a) + np.float64(step) * i
  hi = np.float64(b) - np.float64(step) * (steps - 1 - i)
  return np.where(i < steps // 2, lo, hi).astype(np.float32)


def _pos_embed_tables(h: int, w: int, grid_side: int, rows, cols):
  """4-corner bilinear indices/weights (HF ``fast_pos_embed_interpolate``) for one temporal patch.

  Returns: int64 [4, h*w], float32 [4, h*w] in the order given by ``rows``/``cols``.
  """
  g = grid_side
  hs, ws = torch_linspace_f32(0, g - 1, h), torch_linspace_f32(0, g - 1, w)
  h0, w0 = hs.astype(np.int64), ws.astype(np.int64)
  h1, w1 = np.minimum(h0 + 1, g - 1), np.minimum(w0 + 1, g - 1)
  dh, dw = (hs - h0.astype(np.float32)), (ws - w0.astype(np.float32))
  one = np.float32(1)
  dh, dw = dh[rows], dw[cols]
  idx = np.stack([h0[rows] * g + w0[cols], h0[rows] * g + w1[cols],
                  h1[rows] * g + w0[cols], h1[rows] * g + w1[cols]])
  wt = np.stack([(one - dh) * (one - dw), (one - dh) * dw, dh * (one - dw), dh * dw])
  return idx, wt.astype(np.float32)


def _window_tables(t: int, h: int, w: int, m: int, window_units: int):
  """Qwen2.5-VL window permutation of one grid row (HF ``get_window_index``; spec 4.2).

  Returns: merge-unit permutation int64 [t*h*w/M^2] (local ids) and the merge-unit count of each
  non-empty window, in order.
  """
  lh, lw = h // m, w // m
  ws = window_units
  ids = np.arange(t * lh * lw).reshape(t, lh, lw)
  pad_h, pad_w = ws - lh % ws, ws - lw % ws   # a whole empty window when divisible, as HF
  padded = np.full((t, lh + pad_h, lw + pad_w), -1, np.int64)
  padded[:, :lh, :lw] = ids
  nh, nw = (lh + pad_h) // ws, (lw + pad_w) // ws
  win = padded.reshape(t, nh, ws, nw, ws).transpose(0, 1, 3, 2, 4).reshape(t * nh * nw, ws * ws)
  counts = (win >= 0).sum(-1)
  flat = win.reshape(-1)
  return flat[flat >= 0], counts[counts > 0]


def vision_inputs_from_grids(grid_thw, spatial_merge_size: int = 2, *,
                             num_position_embeddings: int | None = None,
                             window_size: int | None = None, patch_size: int | None = None,
                             max_patches: int | None = None) -> dict[str, np.ndarray]:
  """Host-side index arrays for one packed sequence of images/videos (spec 3.2-3.4, 3.8, 4.2).

  Args:
    grid_thw: int [N, 3] rows ``(t, h, w)`` in patches (HF ``image_grid_thw``/``video_grid_thw``),
      in the order their patches appear in ``pixel_values``.
    spatial_merge_size: M (2 for every released model).
    num_position_embeddings: G*G of the learned table; when given (Qwen3-VL) the bilinear
      interpolation tables are returned.
    window_size, patch_size: when both given (Qwen2.5-VL), the window permutation is returned;
      windows hold ``window_size // M // patch_size`` merge units per side.
    max_patches: fixed bucket size Np >= sum(t*h*w), a multiple of M*M; default: no padding.
  Returns:
    dict of numpy arrays over the Np padded patches (padding rows are 0):
      ``segment_ids`` int32 [Np]: 1.. per (grid row, temporal patch), 0 for padding.
      ``rope_positions`` int32 [Np, 2]: (row, col) in the patch grid.
      with ``num_position_embeddings``: ``pos_embed_index`` int32 [4, Np] and
        ``pos_embed_weight`` float32 [4, Np], corners (h0,w0), (h0,w1), (h1,w0), (h1,w1).
      with ``window_size``: ``window_index`` int32 [U] (ViT merge-unit order -> window order;
        position u of the permuted sequence holds unit ``window_index[u]``; padded units map to
        themselves at the end), ``window_inverse`` int32 [U] (its inverse, HF
        ``argsort(window_index)``), ``window_segment_ids`` int32 [Np] (1.. per non-empty window,
        indexed by position in the *permuted* sequence, 0 for padding).
  Raises:
    ValueError: on a malformed ``grid_thw``, sides not divisible by M, a bucket that is too small
      or not a multiple of M*M, or ``window_size`` without ``patch_size`` (or vice versa).
  """
  m = spatial_merge_size
  grid = _validate_grids(grid_thw, m)
  unit = m * m
  n = int((grid[:, 0] * grid[:, 1] * grid[:, 2]).sum())
  np_ = n if max_patches is None else int(max_patches)
  if np_ < n:
    raise ValueError(f"max_patches={np_} is smaller than the {n} patches of grids "
                     f"{grid.tolist()}; use a larger bucket")
  if np_ % unit:
    raise ValueError(f"max_patches={np_} must be a multiple of spatial_merge_size**2={unit}")
  if (window_size is None) != (patch_size is None):
    raise ValueError("pass both window_size and patch_size (Qwen2.5-VL window attention) or "
                     "neither")

  seg = np.zeros(np_, np.int32)
  rope_pos = np.zeros((np_, 2), np.int32)
  out: dict[str, np.ndarray] = {}
  if num_position_embeddings is not None:
    g = int(round(num_position_embeddings ** 0.5))
    if g * g != num_position_embeddings:
      raise ValueError(f"num_position_embeddings {num_position_embeddings} is not a square")
    pe_idx = np.zeros((4, np_), np.int32)
    pe_wt = np.zeros((4, np_), np.float32)
  if window_size is not None:
    window_units = window_size // m // patch_size
    if window_units <= 0:
      raise ValueError(f"window_size {window_size} is smaller than one merge unit "
                       f"({m} x {patch_size} pixels)")
    win_index = np.arange(np_ // unit, dtype=np.int64)
    win_seg = np.zeros(np_, np.int32)

  offset, seg_id, win_id, unit_offset = 0, 0, 0, 0
  for t, h, w in grid.tolist():
    rows, cols = merge_window_coords(h, w, m)
    hw = h * w
    if num_position_embeddings is not None:
      idx, wt = _pos_embed_tables(h, w, g, rows, cols)
    for _ in range(t):
      seg_id += 1
      sl = slice(offset, offset + hw)
      seg[sl] = seg_id
      rope_pos[sl, 0], rope_pos[sl, 1] = rows, cols
      if num_position_embeddings is not None:
        pe_idx[:, sl], pe_wt[:, sl] = idx, wt
      offset += hw
    if window_size is not None:
      perm, counts = _window_tables(t, h, w, m, window_units)
      units = t * hw // unit
      win_index[unit_offset:unit_offset + units] = perm + unit_offset
      pos = unit_offset * unit
      for c in counts.tolist():
        win_id += 1
        win_seg[pos:pos + c * unit] = win_id
        pos += c * unit
      unit_offset += units

  out["segment_ids"] = seg
  out["rope_positions"] = rope_pos
  if num_position_embeddings is not None:
    out["pos_embed_index"] = pe_idx
    out["pos_embed_weight"] = pe_wt
  if window_size is not None:
    out["window_index"] = win_index.astype(np.int32)
    out["window_inverse"] = np.argsort(win_index, kind="stable").astype(np.int32)
    out["window_segment_ids"] = win_seg
  return out


def vision_inputs(config: Qwen3VLVisionConfig | Qwen2_5_VLVisionConfig, grid_thw,
                  max_patches: int | None = None) -> dict[str, np.ndarray]:
  """:func:`vision_inputs_from_grids` with the options ``config``'s model needs.

  The result's keys are exactly the keyword arguments of that model's ``__call__`` after
  ``pixel_values``: ``model.apply(params, pixel_values, **vision_inputs(config, grid, Np))``.
  Raises: ValueError as :func:`vision_inputs_from_grids`, or for an unknown config type.
  """
  if isinstance(config, Qwen3VLVisionConfig):
    return vision_inputs_from_grids(grid_thw, config.spatial_merge_size,
                                    num_position_embeddings=config.num_position_embeddings,
                                    max_patches=max_patches)
  if isinstance(config, Qwen2_5_VLVisionConfig):
    return vision_inputs_from_grids(grid_thw, config.spatial_merge_size,
                                    window_size=config.window_size, patch_size=config.patch_size,
                                    max_patches=max_patches)
  raise ValueError(f"expected a Qwen3VLVisionConfig or Qwen2_5_VLVisionConfig, got "
                   f"{type(config).__name__}")


def pad_pixel_values(pixel_values, max_patches: int) -> np.ndarray:
  """Pads HF-layout ``pixel_values`` [N, F] with zero rows to [max_patches, F] (numpy).

  Raises: ValueError if the input is not 2-D or has more than ``max_patches`` rows.
  """
  x = np.asarray(pixel_values)
  if x.ndim != 2:
    raise ValueError(f"pixel_values must be [num_patches, C*Tp*P*P] (HF processor layout), got "
                     f"shape {x.shape}")
  if x.shape[0] > max_patches:
    raise ValueError(f"{x.shape[0]} patches do not fit max_patches={max_patches}")
  return np.concatenate([x, np.zeros((max_patches - x.shape[0], x.shape[1]), x.dtype)])


# ----------------------------------------------------------------------------------------------
# Device side (Flax linen)
# ----------------------------------------------------------------------------------------------


def vision_rope_angles(rope_positions, head_dim: int) -> jax.Array:
  """ViT 2-D RoPE angles of the patch tokens, from ``vlm.nn.rope.vision_rope`` (spec 3.3).

  Only moves the (row, col) axis to the front as :func:`vlm.nn.rope.vision_rope` expects; the
  spectrum (``inverse_frequencies(hd/2, 10000)``), the axial assignment and the angles are the
  library's (HF ``Qwen3VLVisionRotaryEmbedding`` + ``rot_pos_emb``).
  Args:
    rope_positions: int [(B,) Np, 2] (row, col) from :func:`vision_inputs`.
    head_dim: ViT head dim ``hd`` (multiple of 4).
  Returns:
    float32 [(B,) Np, hd/2] angles for :func:`vlm.nn.rope.rotate`.
  Raises:
    ValueError: last axis not 2, or ``head_dim`` not divisible by 4.
  """
  pos = jnp.asarray(rope_positions)
  if pos.ndim < 2 or pos.shape[-1] != 2:
    raise ValueError(f"rope_positions must be int [..., Np, 2] (row, col), got {pos.shape}")
  return rope.vision_rope(jnp.moveaxis(pos, -1, 0), head_dim, VISION_ROPE_THETA)


def constrain_rows(x, axes=ACTIVATION_AXES[1:], lead: int = 0):
  """Sharding constraint on a vision activation [B, ...]: rows data-parallel over as many mesh
  axes as divide them, the other dimensions on ``axes`` (default ``(LENGTH, EMBED)``); no-op
  outside a mesh + logical rules. ``lead`` leading dimensions before the rows stay unsharded
  (e.g. the DeepStack buffer [K, B, Np, Dv] with ``lead=1``).

  The rows' mesh axes are those of ``BATCH`` (the LLM's data parallelism, e.g. ``data, fsdp`` or
  with expert parallelism ``data, fsdp, expert``) followed by the other axes of
  ``VISION_BATCH`` (default ``data, fsdp, expert, context, tensor``: the tower is data-parallel
  over the LLM's expert, context and tensor axes too), cut to the longest prefix whose size
  divides ``B`` (e.g. 2 rows on data=2, tensor=4 stay on data). A dimension in ``axes`` that
  would use one of those mesh axes stays unsharded. Returns ``x`` constrained (same values).
  """
  keep = _row_mesh_axes(x.shape[lead])
  if keep is None:
    return x
  rules = nn.get_logical_axis_rules()
  rest = [None if set(_axis_names(a)) & set(keep) else a
          for a in nn.logical_to_mesh_axes((P.VISION_BATCH,) + tuple(axes), rules)[1:]]
  spec = [None] * lead + [tuple(keep) if keep else None] + rest
  return jax.lax.with_sharding_constraint(x, jax.sharding.PartitionSpec(*spec))


def _axis_names(spec) -> tuple:
  return () if spec is None else (spec if isinstance(spec, tuple) else (spec,))


def _row_mesh_axes(rows: int) -> tuple[str, ...] | None:
  """The mesh axes of :func:`constrain_rows` for ``rows`` rows; None without a mesh + rules."""
  rules = nn.get_logical_axis_rules()
  mesh = jax.sharding.get_abstract_mesh()
  if not rules or mesh.empty:
    return None
  order = list(_axis_names(nn.logical_to_mesh_axes((P.BATCH,), rules)[0]))
  order += [a for a in _axis_names(nn.logical_to_mesh_axes((P.VISION_BATCH,), rules)[0])
            if a not in order]
  keep, size = [], 1
  for name in order:
    if rows % (size * mesh.shape[name]):
      break
    keep.append(name)
    size *= mesh.shape[name]
  return tuple(keep)


def _segment_mask(segment_ids):
  """[B, L] int -> bool [B, 1, L, L], True where the two tokens share a segment id."""
  return (segment_ids[:, :, None] == segment_ids[:, None, :])[:, None]


def _gather_units(x, index, unit: int):
  """Permutes merge units: x [B, U*unit, ...] , index int [B, U] -> x grouped [B, U*unit, ...]."""
  b, n = x.shape[:2]
  xu = x.reshape(b, n // unit, unit, *x.shape[2:])
  idx = index.reshape(b, -1, *([1] * (xu.ndim - 2)))
  return jnp.take_along_axis(xu, idx, axis=1).reshape(x.shape)


def _check_implementation(implementation: str, block_size: int) -> None:
  if implementation not in IMPLEMENTATIONS:
    raise ValueError(f"vision attention_implementation must be one of {IMPLEMENTATIONS}, got "
                     f"{implementation!r}")
  if block_size < 1:
    raise ValueError(f"vision attention_block_size must be >= 1, got {block_size}")


class VisionAttention(nn.Module):
  """Fused-qkv self-attention with 2-D RoPE, confined to segments (spec 3.5; HF
  ``Qwen3VLVisionAttention`` / ``Qwen2_5_VLVisionAttention``).

  ``qkv`` [Dv, 3Dv] (+bias): output features [q | k | v], heads contiguous in each third;
  ``proj`` [Dv, Dv] (+bias). Scale ``hd ** -0.5``; scores and softmax in float32. q and k are
  rotated by :func:`vlm.nn.rope.rotate` (rotate-half pairing, float32 arithmetic, cast back: HF
  ``apply_rotary_pos_emb_vision``). Query i attends key j iff ``segment_ids[i] ==
  segment_ids[j]`` (HF's per-``cu_seqlens`` attention; padding id 0 attends padding).

  Attributes:
    implementation: ``"xla"`` (dense [B, 1, L, L] mask, :func:`vlm.nn.attention.
      dot_product_attention`) or any other of ``vlm.nn.attention.IMPLEMENTATIONS`` (segment-aware
      :func:`vlm.nn.attention.attention`, non-causal; ``"auto"`` resolving to ``"xla"`` takes the
      dense path).
    block_size: block length of ``chunked`` / ``splash``.
  Shapes: x [B, L, Dv], angles float32 [B, L, hd/2], segment_ids int [B, L] -> [B, L, Dv] in
  ``dtype`` (float32 for float16 compute: ``proj`` feeds the float32 residual).
  Raises:
    ValueError: an unknown implementation (or one unavailable here, e.g. ``cudnn`` off GPU).
  """
  num_heads: int
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32
  implementation: str = "xla"
  block_size: int = 512

  @nn.compact
  def __call__(self, x, angles, segment_ids):
    b, l, d = x.shape
    h = self.num_heads
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    qkv = layers.Dense(3 * d, kernel_axes=(P.EMBED, P.VISION_HEADS), name="qkv", **kw)(x)
    qkv = qkv.reshape(b, l, 3, h, d // h)
    q, k, v = qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]
    q, k = rope.rotate(q, angles), rope.rotate(k, angles)
    _check_implementation(self.implementation, self.block_size)
    impl = resolve_implementation(self.implementation, key_length=l, head_dim=d // h,
                                  dtype=self.dtype, has_segments=True)
    if impl == "xla":
      out = dot_product_attention(q, k, v, mask=_segment_mask(segment_ids), dtype=self.dtype)
    else:
      run = lambda q, k, v, s: attention(q, k, v, segment_ids=s, causal=False,
                                         implementation=impl, block_size=self.block_size,
                                         dtype=self.dtype)
      rows = _row_mesh_axes(b) if impl == "splash" else None
      if rows is not None:  # a Pallas kernel is not partitioned by GSPMD: whole rows per device
        mesh = jax.sharding.get_abstract_mesh()
        spec = lambda n: jax.sharding.PartitionSpec(rows or None, *([None] * (n - 1)))
        run = jax.shard_map(run, mesh=mesh, in_specs=(spec(4),) * 3 + (spec(2),),
                            out_specs=spec(4), check_vma=False)
      out = run(q, k, v, segment_ids)
    return layers.Dense(d, kernel_axes=(P.VISION_HEADS, P.EMBED), name="proj", wide_float16=True,
                        **kw)(out.reshape(b, l, d))


class VisionBlock(nn.Module):
  """Pre-norm vision block: ``x + attn(norm1(x))``, then ``+ mlp(norm2(x))`` (spec 3.5, 4.1).

  The config's type picks the reference: :class:`Qwen3VLVisionConfig` gives HF
  ``Qwen3VLVisionBlock`` (LayerNorm eps 1e-6, GELU-tanh MLP ``linear_fc2(act(linear_fc1(x)))``);
  :class:`Qwen2_5_VLVisionConfig` gives HF ``Qwen2_5_VLVisionBlock`` (RMSNorm eps 1e-6, SwiGLU MLP
  ``down_proj(act(gate_proj(x)) * up_proj(x))`` with biases). Shapes: x [B, L, Dv], angles
  float32 [B, L, hd/2], segment_ids int [B, L] -> [B, L, Dv], in
  :func:`vlm.nn.layers.residual_dtype` of ``dtype`` (float32 for float16).
  ``attention_implementation`` / ``attention_block_size``: as :class:`VisionAttention`.
  """
  config: Qwen3VLVisionConfig | Qwen2_5_VLVisionConfig
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32
  attention_implementation: str = "xla"
  attention_block_size: int = 512

  def __call__(self, x, angles, segment_ids):
    return self.block(x, angles, segment_ids)

  @nn.compact
  def block(self, x, angles, segment_ids):
    """The block itself (``__call__``); a method of its own so that the scanned body
    (:class:`_ScannedVisionBlock`) can rematerialise it alone."""
    cfg = self.config
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    if isinstance(cfg, Qwen2_5_VLVisionConfig):
      norm, mlp = (lambda name: layers.RMSNorm(1e-6, name=name, **kw)), _Qwen2_5_VLVisionMlp
    else:
      norm, mlp = (lambda name: layers.LayerNorm(epsilon=1e-6, name=name, **kw)), _Qwen3VLVisionMlp
    attn = VisionAttention(cfg.num_heads, implementation=self.attention_implementation,
                           block_size=self.attention_block_size, name="attn", **kw)
    x = x + attn(norm("norm1")(x), angles, segment_ids)
    y = mlp(cfg, name="mlp", **kw)(norm("norm2")(x))
    return constrain_rows(x + y)


class _ScannedVisionBlock(VisionBlock):
  """``nn.scan`` body over the tower's blocks (one stacked parameter tree ``blocks/...`` with a
  leading ``LAYERS`` axis; same subtree as each unscanned ``blocks_{i}``).

  Per-layer inputs ``xs = (full int32 [], slot int32 [])``: a block with ``full`` attends within
  ``full_segments`` (Qwen2.5-VL's ``fullatt_block_indexes``), the others within
  ``window_segments``; a block with ``slot >= 0`` writes its output into ``taps[slot]`` (the
  DeepStack buffer), others leave it untouched (an exact select of the same values, one
  [B, Np, Dv] slice read and written per layer). With ``remat`` only the block itself is
  rematerialised, so the tap buffer is never saved per layer.

  Call: ``((x [B, Np, Dv], taps [K, B, Np, Dv] or None), xs, angles [B, Np, hd/2],
  full_segments int [B, Np], window_segments int [B, Np]) -> ((x, taps), None)``.
  """
  remat: bool = False

  def __call__(self, carry, xs, angles, full_segments, window_segments):
    x, taps = carry
    full, slot = xs
    segments = jnp.where(full > 0, full_segments, window_segments)
    fn = VisionBlock.block
    if self.remat:
      fn = nn.remat(fn, prevent_cse=False)
    x = fn(self, x, angles, segments)
    if taps is not None:
      at = jnp.maximum(slot, 0)
      old = jax.lax.dynamic_index_in_dim(taps, at, 0, keepdims=False)
      taps = constrain_rows(jax.lax.dynamic_update_index_in_dim(
          taps, jnp.where(slot >= 0, jnp.asarray(x, taps.dtype), old), at, 0), lead=1)
    return (x, taps), None


def _scanned_blocks(cfg, depth: int, remat: bool, **kw):
  """The ``nn.scan`` of :class:`_ScannedVisionBlock` over ``depth`` layers, named ``blocks``."""
  scan = nn.scan(_ScannedVisionBlock, variable_axes={"params": 0, "intermediates": 0},
                 split_rngs={"params": True, "dropout": True},
                 in_axes=(0, nn.broadcast, nn.broadcast, nn.broadcast), length=depth,
                 metadata_params={nn.PARTITION_NAME: P.LAYERS})
  return scan(cfg, remat=remat, name="blocks", **kw)


_BLOCK_KEY = re.compile(r"^blocks_(\d+)$")


def stack_blocks(visual: Mapping[str, Any]) -> dict:
  """Unscanned -> scanned vision tree: ``blocks_0 .. blocks_{N-1}`` become one ``blocks`` entry
  whose leaves carry a leading layer axis (the layout of ``scan_layers=True``); other entries are
  kept. A tree already scanned (or without blocks) is returned as is. Uses
  :func:`vlm.models.qwen3.stack_layers`.

  Args: ``visual``: the tower's params (e.g. ``params["visual"]``).
  Raises: ValueError: non-contiguous block indices or blocks of different structures.
  """
  blocks = {f"layers_{m.group(1)}": v for k, v in visual.items()
            if (m := _BLOCK_KEY.match(str(k)))}
  out = {k: v for k, v in visual.items() if not _BLOCK_KEY.match(str(k))}
  if blocks:
    if "blocks" in out:
      raise ValueError("vision tree has both 'blocks' and 'blocks_{i}' entries")
    try:
      out["blocks"] = stack_layers(blocks)["layers"]
    except ValueError as e:
      raise ValueError(f"vision blocks: {e}".replace("layers", "blocks")) from None
  return out


def unstack_blocks(visual: Mapping[str, Any]) -> dict:
  """Scanned -> unscanned vision tree (inverse of :func:`stack_blocks`, via
  :func:`vlm.models.qwen3.unstack_layers`); an unscanned tree is returned as is."""
  out = {k: v for k, v in visual.items() if k != "blocks"}
  if "blocks" in visual:
    for k, v in unstack_layers({"layers": visual["blocks"]}).items():
      out[k.replace("layers_", "blocks_")] = v
  return out


class _Qwen3VLVisionMlp(nn.Module):
  """``linear_fc2(act(linear_fc1(x)))``, act = ``config.hidden_act`` (tanh GELU).

  [B, L, Dv] -> [B, L, Dv] in ``dtype``; for float16 compute ``linear_fc1``, the activation and
  the result are float32 (module docstring).
  """
  config: Qwen3VLVisionConfig
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x):
    cfg = self.config
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    y = layers.Dense(cfg.intermediate_size, kernel_axes=(P.EMBED, P.VISION_MLP), name="linear_fc1",
                     wide_float16=True, **kw)(x)
    y = layers.activation(cfg.hidden_act)(y)
    return layers.Dense(cfg.hidden_size, kernel_axes=(P.VISION_MLP, P.EMBED), name="linear_fc2",
                        wide_float16=True, **kw)(y)


class _PatchEmbed(nn.Module):
  """Conv3d with kernel = stride = (Tp, P, P) on pre-cut patches == a Dense on the flattened patch.

  HF feeds ``pixel_values`` [N, C*Tp*P*P] flattened in (c, t, py, px) order and views each row as
  [C, Tp, P, P], so the Conv3d weight [Dv, C, Tp, P, P] reshaped to [Dv, F] and transposed is the
  Dense ``proj/kernel`` [F, Dv] (spec 3.1, 10.1). Shapes: [B, Np, F] -> [B, Np, Dv].
  """
  features: int
  use_bias: bool = True
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x):
    return layers.Dense(self.features, kernel_axes=(None, P.EMBED), use_bias=self.use_bias,
                        dtype=self.dtype, param_dtype=self.param_dtype, name="proj")(x)


def _batched(pixel_values, patch_dim: int, arrays: dict[str, Any], per_patch_rank: dict[str, int]):
  """Validates inputs and adds a leading batch axis when ``pixel_values`` is [Np, F].

  ``per_patch_rank`` gives each array's unbatched rank. Returns (squeeze, pixel_values [B, Np, F],
  dict of batched jnp arrays).
  """
  shape = tuple(getattr(pixel_values, "shape", ()))
  if len(shape) not in (2, 3) or shape[-1] != patch_dim:
    raise ValueError(f"pixel_values must be [Np, {patch_dim}] or [B, Np, {patch_dim}] (HF "
                     f"processor layout, C*Tp*P*P per patch row), got shape {shape}")
  if not jnp.issubdtype(pixel_values.dtype, jnp.floating):
    raise ValueError(f"pixel_values must be floating point, got dtype {pixel_values.dtype}")
  squeeze = len(shape) == 2
  np_ = shape[-2]
  out = {}
  for name, a in arrays.items():
    a = jnp.asarray(a)
    rank = per_patch_rank[name]
    if a.ndim != rank + (0 if squeeze else 1):
      raise ValueError(f"{name} has shape {a.shape}, which does not match pixel_values {shape} "
                       "(use the arrays from vision_inputs_from_grids, stacked like the pixels)")
    out[name] = a[None] if squeeze else a
  if not squeeze and any(v.shape[0] != shape[0] for v in out.values()):
    raise ValueError(f"batch sizes differ: pixel_values {shape}, "
                     f"{ {k: v.shape for k, v in out.items()} }")
  seg = out["segment_ids"]
  if seg.shape[-1] != np_:
    raise ValueError(f"segment_ids covers {seg.shape[-1]} patches but pixel_values has {np_} "
                     "rows; pad both to the same max_patches")
  x = jnp.asarray(pixel_values)
  return squeeze, (x[None] if squeeze else x), out


class Qwen3VLVisionPatchMerger(nn.Module):
  """2x2 patch merger (HF ``Qwen3VLVisionPatchMerger``; spec 3.6).

  ``use_postshuffle_norm=False`` (``merger``): LayerNorm(Dv) per patch, then concatenate each 4
  consecutive patches; ``True`` (``deepstack_merger_list_k``): concatenate, then LayerNorm(4Dv).
  Then ``linear_fc2(gelu_erf(linear_fc1(.)))``.
  Shapes: [B, Np, Dv] -> [B, Np/4, Dout] in ``dtype`` (float32 for float16 compute: wide MLP).
  """
  config: Qwen3VLVisionConfig
  use_postshuffle_norm: bool = False
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x):
    cfg = self.config
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    b, n, d = x.shape
    unit = cfg.spatial_merge_size ** 2
    norm = layers.LayerNorm(epsilon=1e-6, name="norm", **kw)
    if self.use_postshuffle_norm:
      x = norm(x.reshape(b, n // unit, unit * d))
    else:
      x = norm(x).reshape(b, n // unit, unit * d)
    x = layers.Dense(unit * d, kernel_axes=(P.EMBED, P.VISION_MLP), name="linear_fc1", wide_float16=True,
                     **kw)(x)
    x = layers.gelu_exact(x)
    return layers.Dense(cfg.out_hidden_size, kernel_axes=(P.VISION_MLP, P.EMBED), name="linear_fc2",
                        wide_float16=True, **kw)(x)


class Qwen3VLVisionModel(nn.Module):
  """Qwen3-VL ViT with DeepStack taps (HF ``Qwen3VLVisionModel``; spec 3).

  ``x = patch_embed(pixels) + bilinear(pos_embed)``; ``depth`` pre-LN blocks with 2-D RoPE and
  per-(image, temporal patch) attention; DeepStack mergers on the outputs of blocks
  ``deepstack_visual_indexes``; main merger on the last block's output.

  Attributes:
    config: :class:`Qwen3VLVisionConfig`.
    remat: rematerialise each block in the backward pass.
    scan_layers: run the blocks under one ``nn.scan`` (compile time flat in depth); params
      ``blocks/...`` with a leading ``LAYERS`` axis instead of ``blocks_{i}``
      (:func:`stack_blocks` / :func:`unstack_blocks`); same values and gradients.
    attention_implementation: ``"xla"`` (dense [B, 1, Np, Np] segment mask) or another of
      ``vlm.nn.attention.IMPLEMENTATIONS`` (segment-aware, module docstring); a vlm setting.
    attention_block_size: block length of ``chunked`` / ``splash``.
  Call args (the last four = ``vision_inputs(config, grid_thw, max_patches)``):
    pixel_values: float [Np, F] or [B, Np, F] (HF layout, zero rows for padding).
    segment_ids: int [(B,) Np]; rope_positions: int [(B,) Np, 2];
    pos_embed_index: int [(B,) 4, Np]; pos_embed_weight: float [(B,) 4, Np].
  Returns:
    ``(merged [(B,) Np/4, Dout], [deepstack_k [(B,) Np/4, Dout] for each DeepStack index])`` in
    ``dtype`` (float32 for float16 compute, module docstring); rows of padded merge units are
    zero; the real rows follow the input order.
  Raises:
    ValueError: on shapes inconsistent with the config or with each other, or an unknown
      attention implementation.
  """
  config: Qwen3VLVisionConfig
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32
  remat: bool = False
  scan_layers: bool = False
  attention_implementation: str = "xla"
  attention_block_size: int = 512

  @nn.compact
  def __call__(self, pixel_values, segment_ids, rope_positions, pos_embed_index,
               pos_embed_weight):
    cfg = self.config
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    unit = cfg.spatial_merge_size ** 2
    squeeze, x, a = _batched(
        pixel_values, cfg.patch_dim,
        dict(segment_ids=segment_ids, rope_positions=rope_positions,
             pos_embed_index=pos_embed_index, pos_embed_weight=pos_embed_weight),
        dict(segment_ids=1, rope_positions=2, pos_embed_index=2, pos_embed_weight=2))
    b, n, _ = x.shape
    if n % unit:
      raise ValueError(f"the padded patch count {n} must be a multiple of {unit}")

    x = _PatchEmbed(cfg.hidden_size, use_bias=True, name="patch_embed", **kw)(
        jnp.asarray(x, self.dtype))
    table = layers.Embed(cfg.num_position_embeddings, cfg.hidden_size, axes=(None, P.EMBED),
                         name="pos_embed", **kw)
    corners = table(jnp.asarray(a["pos_embed_index"], jnp.int32))      # [B, 4, Np, Dv]
    wt = jnp.asarray(a["pos_embed_weight"], self.dtype)[..., None]      # [B, 4, Np, 1]
    pe = corners[:, 0] * wt[:, 0] + corners[:, 1] * wt[:, 1]
    pe = pe + corners[:, 2] * wt[:, 2]
    pe = pe + corners[:, 3] * wt[:, 3]
    x = jnp.asarray(x, layers.residual_dtype(self.dtype)) + pe  # float32 residual for float16
    x = constrain_rows(x)

    angles = vision_rope_angles(a["rope_positions"], cfg.head_dim)
    seg = jnp.asarray(a["segment_ids"], jnp.int32)
    valid = (seg.reshape(b, n // unit, unit)[..., 0] > 0)[..., None]

    _check_implementation(self.attention_implementation, self.attention_block_size)
    attn_kw = dict(attention_implementation=self.attention_implementation,
                   attention_block_size=self.attention_block_size)
    taps = {layer: k for k, layer in enumerate(cfg.deepstack_visual_indexes)}
    deepstack = [None] * len(taps)

    def deepstack_merge(k, h):
      ds = Qwen3VLVisionPatchMerger(cfg, use_postshuffle_norm=True,
                                    name=f"deepstack_merger_list_{k}", **kw)(h)
      deepstack[k] = constrain_rows(jnp.where(valid, ds, 0))

    if self.scan_layers:  # one scan; the tapped block outputs collected in a [K, ...] buffer
      slot = np.array([taps.get(i, -1) for i in range(cfg.depth)], np.int32)
      buf = constrain_rows(jnp.zeros((len(taps),) + x.shape, x.dtype), lead=1) if taps else None
      xs = (jnp.zeros(cfg.depth, jnp.int32), jnp.asarray(slot))
      (x, buf), _ = _scanned_blocks(cfg, cfg.depth, self.remat, **attn_kw, **kw)(
          (x, buf), xs, angles, seg, seg)
      for k in range(len(taps)):
        deepstack_merge(k, buf[k])
    else:
      block_cls = nn.remat(VisionBlock) if self.remat else VisionBlock
      for i in range(cfg.depth):
        x = block_cls(cfg, name=f"blocks_{i}", **attn_kw, **kw)(x, angles, seg)
        if i in taps:
          deepstack_merge(taps[i], x)
    merged = Qwen3VLVisionPatchMerger(cfg, use_postshuffle_norm=False, name="merger", **kw)(x)
    merged = constrain_rows(jnp.where(valid, merged, 0))
    if squeeze:
      return merged[0], [d[0] for d in deepstack]
    return merged, deepstack


class _Qwen2_5_VLVisionMlp(nn.Module):
  """``down_proj(act(gate_proj(x)) * up_proj(x))``, all with bias (HF ``Qwen2_5_VLMLP``).

  [B, L, Dv] -> [B, L, Dv] in ``dtype``; for float16 compute gate, up, their product and the
  result are float32 and the product's rows are pre-scaled for the float16 ``down_proj`` product
  (module docstring), so an intermediate or output above 65,504 stays finite.
  """
  config: Qwen2_5_VLVisionConfig
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x):
    cfg = self.config
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype, wide_float16=True)
    gate = layers.Dense(cfg.intermediate_size, kernel_axes=(P.EMBED, P.VISION_MLP), name="gate_proj",
                        **kw)(x)
    up = layers.Dense(cfg.intermediate_size, kernel_axes=(P.EMBED, P.VISION_MLP), name="up_proj",
                      **kw)(x)
    y = layers.activation(cfg.hidden_act)(gate) * up
    return layers.Dense(cfg.hidden_size, kernel_axes=(P.VISION_MLP, P.EMBED), name="down_proj",
                        **kw)(y)


class Qwen2_5_VLPatchMerger(nn.Module):
  """``mlp_2(gelu_erf(mlp_0(concat4(ln_q(x)))))`` (HF ``Qwen2_5_VLPatchMerger``; spec 4.1).

  Shapes: [B, Np, Dv] -> [B, Np/4, Dout] in ``dtype`` (float32 for float16 compute: wide MLP).
  """
  config: Qwen2_5_VLVisionConfig
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x):
    cfg = self.config
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    b, n, d = x.shape
    unit = cfg.spatial_merge_size ** 2
    x = layers.RMSNorm(name="ln_q", **kw)(x).reshape(b, n // unit, unit * d)
    x = layers.Dense(unit * d, kernel_axes=(P.EMBED, P.VISION_MLP), name="mlp_0", wide_float16=True,
                     **kw)(x)
    x = layers.gelu_exact(x)
    return layers.Dense(cfg.out_hidden_size, kernel_axes=(P.VISION_MLP, P.EMBED), name="mlp_2",
                        wide_float16=True, **kw)(x)


class Qwen2_5_VLVisionModel(nn.Module):
  """Qwen2.5-VL window-attention ViT (HF ``Qwen2_5_VisionTransformerPretrainedModel``; spec 4).

  ``x = patch_embed(pixels)`` (no bias, no absolute positions); merge units permuted into window
  order by ``window_index`` (rotary coordinates and segment ids with them); blocks in
  ``fullatt_block_indexes`` attend within each (image, temporal patch), the others within each
  window; merger; merged rows put back in input order with ``window_inverse``.

  Attributes:
    config: :class:`Qwen2_5_VLVisionConfig`.
    remat: rematerialise each block in the backward pass.
    scan_layers: run the blocks under one ``nn.scan`` (compile time flat in depth); params
      ``blocks/...`` with a leading ``LAYERS`` axis instead of ``blocks_{i}``
      (:func:`stack_blocks` / :func:`unstack_blocks`); same values and gradients.
    attention_implementation: ``"xla"`` (dense [B, 1, Np, Np] masks) or another of
      ``vlm.nn.attention.IMPLEMENTATIONS`` (segment-aware with the image segment ids in the
      full-attention blocks and the window segment ids in the others; module docstring).
    attention_block_size: block length of ``chunked`` / ``splash``.
  Call args (the last five = ``vision_inputs(config, grid_thw, max_patches)``):
    pixel_values: float [Np, F] or [B, Np, F]; segment_ids int [(B,) Np];
    rope_positions int [(B,) Np, 2]; window_index, window_inverse int [(B,) Np/4];
    window_segment_ids int [(B,) Np] (indexed by permuted position).
  Returns:
    merged [(B,) Np/4, Dout] in ``dtype`` (float32 for float16 compute, module docstring), input
    order, zero rows for padded merge units.
  Raises:
    ValueError: on shapes inconsistent with the config or with each other, or an unknown
      attention implementation.
  """
  config: Qwen2_5_VLVisionConfig
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32
  remat: bool = False
  scan_layers: bool = False
  attention_implementation: str = "xla"
  attention_block_size: int = 512

  @nn.compact
  def __call__(self, pixel_values, segment_ids, rope_positions, window_index, window_inverse,
               window_segment_ids):
    cfg = self.config
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    unit = cfg.spatial_merge_size ** 2
    squeeze, x, a = _batched(
        pixel_values, cfg.patch_dim,
        dict(segment_ids=segment_ids, rope_positions=rope_positions, window_index=window_index,
             window_inverse=window_inverse, window_segment_ids=window_segment_ids),
        dict(segment_ids=1, rope_positions=2, window_index=1, window_inverse=1,
             window_segment_ids=1))
    b, n, _ = x.shape
    if n % unit or a["window_index"].shape[-1] != n // unit:
      raise ValueError(f"the padded patch count {n} must be a multiple of {unit} and "
                       f"window_index must have {n // unit} entries, got "
                       f"{a['window_index'].shape[-1]}")

    x = _PatchEmbed(cfg.hidden_size, use_bias=False, name="patch_embed", **kw)(
        jnp.asarray(x, self.dtype))
    x = jnp.asarray(x, layers.residual_dtype(self.dtype))  # float32 residual for float16
    win = jnp.asarray(a["window_index"], jnp.int32)
    x = constrain_rows(_gather_units(x, win, unit))
    pos = _gather_units(jnp.asarray(a["rope_positions"], jnp.int32), win, unit)
    seg = _gather_units(jnp.asarray(a["segment_ids"], jnp.int32), win, unit)
    angles = vision_rope_angles(pos, cfg.head_dim)
    window_seg = jnp.asarray(a["window_segment_ids"], jnp.int32)

    _check_implementation(self.attention_implementation, self.attention_block_size)
    attn_kw = dict(attention_implementation=self.attention_implementation,
                   attention_block_size=self.attention_block_size)
    if self.scan_layers:  # one scan; each layer's flag picks image or window segments
      full = np.array([i in cfg.fullatt_block_indexes for i in range(cfg.depth)], np.int32)
      xs = (jnp.asarray(full), jnp.full(cfg.depth, -1, jnp.int32))
      (x, _), _ = _scanned_blocks(cfg, cfg.depth, self.remat, **attn_kw, **kw)(
          (x, None), xs, angles, seg, window_seg)
    else:
      block_cls = nn.remat(VisionBlock) if self.remat else VisionBlock
      for i in range(cfg.depth):
        segments = seg if i in cfg.fullatt_block_indexes else window_seg
        x = block_cls(cfg, name=f"blocks_{i}", **attn_kw, **kw)(x, angles, segments)
    merged = Qwen2_5_VLPatchMerger(cfg, name="merger", **kw)(x)
    inv = jnp.asarray(a["window_inverse"], jnp.int32)
    merged = jnp.take_along_axis(merged, inv[..., None], axis=1)
    seg_in = jnp.asarray(a["segment_ids"], jnp.int32)
    valid = (seg_in.reshape(b, n // unit, unit)[..., 0] > 0)[..., None]
    merged = constrain_rows(jnp.where(valid, merged, 0))
    return merged[0] if squeeze else merged
