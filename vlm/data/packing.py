"""Host-side packing of tokenised Qwen-VL samples into fixed-shape rows with segment ids.

A row holds whole samples (never a part of one: a vision block is never cut) in ``L`` token slots
and a patch buffer of ``Np`` rows. :func:`first_fit` decides which samples go in which row of a
batch (deterministic first fit, in the given order, on both budgets); :func:`assemble_batch`
writes the batch arrays of the shared schema (``notes/common.md``):

  input_ids int32 [B, L], segment_ids int32 [B, L] (1..S per row, 0 = padding),
  position_ids int32 [3, B, L] (each segment's own MRoPE positions, restarting at 0; 0 at padding),
  labels int32 [B, L] (``input_ids[t + 1]`` of the same segment, 0 at each segment's last token and
  at padding), loss_mask float32 [B, L] (the target mask of ``t + 1``), pixel_values float32
  [B, Np, F] (the row's samples' patches in row order, each sample's images then videos; zero
  rows after), vision: :func:`vlm.models.qwen_vit.vision_inputs` of the row's grids at
  ``max_patches=Np`` stacked over rows, visual_token_index int32 [B, L] (row of the row's merged
  features ``0..Np/M^2-1`` for each placeholder token, -1 at text and padding).

Reference for the semantics: packed-sequence training as in HF's
``DataCollatorWithFlattening`` (position ids restarting per sample, labels never crossing a
boundary), extended with per-segment 3-row MRoPE positions (HF ``get_rope_index`` per sample) and
the per-row vision buffer.
"""
from __future__ import annotations

from typing import Any, Sequence

import numpy as np

from vlm.models import qwen_vit


def first_fit(num_tokens: Sequence[int], num_patches: Sequence[int], *, num_rows: int,
              max_length: int, max_patches: int) -> tuple[list[list[int]], list[int]]:
  """Deterministic first-fit packing of items (in order) into ``num_rows`` rows.

  Item ``i`` goes into the first row whose remaining token budget (``max_length``) and patch
  budget (``max_patches``) both hold it; an item that fits no row is left over (for the next
  batch). Items larger than an empty row must be removed by the caller.

  Args:
    num_tokens, num_patches: per-item sizes.
    num_rows: B.
    max_length: L.
    max_patches: Np.

  Returns:
    ``(rows, leftover)``: ``rows[b]`` the item indices of row b in placement order; ``leftover``
    the indices that did not fit, in order.

  Raises:
    ValueError: an item larger than an empty row, or mismatched input lengths.
  """
  if len(num_tokens) != len(num_patches):
    raise ValueError("num_tokens and num_patches must have one entry per item")
  tokens_left = [max_length] * num_rows
  patches_left = [max_patches] * num_rows
  rows: list[list[int]] = [[] for _ in range(num_rows)]
  leftover = []
  for i, (n, p) in enumerate(zip(num_tokens, num_patches)):
    if n > max_length or p > max_patches:
      raise ValueError(f"item {i} ({n} tokens, {p} patches) exceeds an empty row "
                       f"({max_length} tokens, {max_patches} patches); drop it before packing")
    for b in range(num_rows):
      if n <= tokens_left[b] and p <= patches_left[b]:
        rows[b].append(i)
        tokens_left[b] -= n
        patches_left[b] -= p
        break
    else:
      leftover.append(i)
  return rows, leftover


def empty_vision_tables(vision_config, max_patches: int) -> dict[str, np.ndarray]:
  """Vision tables of a row without images (all padding), shaped like
  :func:`vlm.models.qwen_vit.vision_inputs` at ``max_patches``: zero ids/positions/weights, and
  for Qwen2.5-VL identity ``window_index``/``window_inverse`` (padded units map to themselves)."""
  m = vision_config.spatial_merge_size
  tables = qwen_vit.vision_inputs(vision_config, np.array([[1, m, m]]), max_patches=max_patches)
  out = {}
  for k, v in tables.items():
    if k in ("window_index", "window_inverse"):
      out[k] = np.arange(v.shape[0], dtype=v.dtype)
    else:
      out[k] = np.zeros_like(v)
  return out


def assemble_batch(rows: Sequence[Sequence[Any]], *, max_length: int, max_patches: int,
                   vision_config, pad_token_id: int) -> dict[str, Any]:
  """Writes packed rows as the batch schema (see the module docstring).

  Args:
    rows: B lists of tokenised samples (:class:`vlm.data.qwen_batch.TokenizedSample`: fields
      ``input_ids`` [n], ``target_mask`` [n], ``position_ids`` [3, n], ``pixel_values`` [p, F],
      ``grid_thw`` [k, 3], ``visual_index`` [n]); a row's samples must fit L and Np.
    max_length: L.
    max_patches: Np, a multiple of ``spatial_merge_size**2``.
    vision_config: the model's vision config (patch width F and the vision tables).
    pad_token_id: ``input_ids`` at padding.

  Returns:
    dict of host numpy arrays (``vision`` is a dict of [B, ...] arrays).

  Raises:
    ValueError: a row that overflows L or Np, or patch widths that differ from F.
  """
  b_size = len(rows)
  unit = vision_config.spatial_merge_size ** 2
  f = vision_config.patch_dim
  if max_patches % unit:
    raise ValueError(f"max_patches={max_patches} must be a multiple of {unit}")
  input_ids = np.full((b_size, max_length), pad_token_id, np.int32)
  segment_ids = np.zeros((b_size, max_length), np.int32)
  position_ids = np.zeros((3, b_size, max_length), np.int32)
  labels = np.zeros((b_size, max_length), np.int32)
  loss_mask = np.zeros((b_size, max_length), np.float32)
  pixel_values = np.zeros((b_size, max_patches, f), np.float32)
  visual = np.full((b_size, max_length), -1, np.int32)
  tables = []
  for b, row in enumerate(rows):
    t0 = p0 = 0
    grids = []
    for s, sample in enumerate(row, start=1):
      n, p = sample.num_tokens, sample.num_patches
      if t0 + n > max_length or p0 + p > max_patches:
        raise ValueError(f"row {b} overflows: {t0 + n} tokens > {max_length} or {p0 + p} "
                         f"patches > {max_patches}")
      if p and sample.pixel_values.shape[1] != f:
        raise ValueError(f"{sample.where}: patch width {sample.pixel_values.shape[1]} != {f}")
      sl = slice(t0, t0 + n)
      input_ids[b, sl] = sample.input_ids
      segment_ids[b, sl] = s
      position_ids[:, b, sl] = sample.position_ids
      labels[b, t0:t0 + n - 1] = sample.input_ids[1:]
      loss_mask[b, t0:t0 + n - 1] = sample.target_mask[1:]
      vi = sample.visual_index
      visual[b, sl] = np.where(vi >= 0, vi + p0 // unit, -1)
      pixel_values[b, p0:p0 + p] = sample.pixel_values
      if len(sample.grid_thw):
        grids.append(np.asarray(sample.grid_thw, np.int64))
      t0 += n
      p0 += p
    if grids:
      tables.append(qwen_vit.vision_inputs(vision_config, np.concatenate(grids),
                                           max_patches=max_patches))
    else:
      tables.append(empty_vision_tables(vision_config, max_patches))
  vision = {k: np.stack([t[k] for t in tables]) for k in tables[0]} if tables else {}
  return {
      "input_ids": input_ids,
      "segment_ids": segment_ids,
      "position_ids": position_ids,
      "labels": labels,
      "loss_mask": loss_mask,
      "pixel_values": pixel_values,
      "vision": vision,
      "visual_token_index": visual,
  }


def empty_batch(batch_size: int, max_length: int, max_patches: int, vision_config,
                pad_token_id: int = 151643) -> dict[str, Any]:
  """An all-padding batch of the schema's shapes and dtypes (for ``init`` / jit shapes)."""
  return assemble_batch([[] for _ in range(batch_size)], max_length=max_length,
                        max_patches=max_patches, vision_config=vision_config,
                        pad_token_id=pad_token_id)


def packing_efficiency(batch: dict[str, Any]) -> float:
  """Real tokens / (B * L) of a packed batch (``segment_ids > 0``)."""
  seg = np.asarray(batch["segment_ids"])
  return float((seg > 0).sum()) / float(seg.size)
