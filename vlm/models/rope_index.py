"""Host-side (numpy) MRoPE position ids for Qwen3-VL and Qwen2.5-VL prompts.

Source: /work/shared/design/qwen3vl_spec.md section 7 (``get_rope_index``); HF
``Qwen3VLModel.get_rope_index`` and ``Qwen2_5_VLModel.get_rope_index`` (transformers 4.57.1).

Each sequence is scanned left to right (padding removed). Text tokens advance all three position
rows by one; a visual block of ``gt x gh x gw`` merged tokens (``gh = h // M``, ``gw = w // M``)
starts at ``s0 = text_len + previous max + 1`` and gets ``(s0 + T, s0 + row, s0 + col)``; the text
after it resumes at the block's maximum + 1. Pads get 1 on every row. ``rope_deltas[b] = max + 1 -
L`` with ``L`` the padded length, so decode positions are ``cache_len + rope_deltas``.

Qwen3-VL splits every video into ``t`` blocks of ``(1, h, w)`` (one per temporal patch, each with
its own ``<|vision_start|>`` and timestamp text), so ``T`` is 0 inside a block. Qwen2.5-VL keeps one
block per video with ``T = floor(k * second_per_grid_t * tokens_per_second)`` for temporal patch k.

The grids are consumed in order of appearance over the flattened batch (sample 0's images, then
sample 1's, ...), exactly as the processor packs ``pixel_values``.
Only the totals are checked here; :func:`check_vision_tokens` checks, row by row and image by
image, that every placeholder run has the length of the grid it will consume (called by the
processor and by ``vlm.inference.generate.prepare_inputs``).
"""
from __future__ import annotations

import numpy as np


def _as_grid(grid, name):
  if grid is None:
    return None
  g = np.asarray(grid, np.int64)
  if g.ndim != 2 or g.shape[1] != 3:
    raise ValueError(f"{name} must be int [N, 3] rows (t, h, w), got shape {g.shape}")
  if (g <= 0).any():
    raise ValueError(f"{name} must be positive, got {g.tolist()}")
  return g


def _text_only(input_ids, attention_mask):
  b, l = input_ids.shape
  if attention_mask is None:
    pos = np.broadcast_to(np.arange(l, dtype=np.int64), (3, b, l)).copy()
    return pos, np.zeros((b, 1), np.int64)
  m = attention_mask.astype(np.int64)
  pos = np.cumsum(m, axis=-1) - 1
  pos[m == 0] = 1
  pos = np.broadcast_to(pos, (3, b, l)).copy()
  deltas = pos.max(axis=(0, 2))[:, None] + 1 - l
  return pos, deltas.astype(np.int64)


def _rope_index(input_ids, image_grid_thw, video_grid_thw, attention_mask, spatial_merge_size,
                image_token_id, video_token_id, vision_start_token_id, image_time, video_time):
  """Shared scan. ``image_time(gt)`` / ``video_time(video_index, gt)`` -> int [gt] T offsets."""
  ids = np.asarray(input_ids)
  if ids.ndim != 2:
    raise ValueError(f"input_ids must be int [B, L], got shape {ids.shape}")
  if attention_mask is not None:
    attention_mask = np.asarray(attention_mask)
    if attention_mask.shape != ids.shape:
      raise ValueError(f"attention_mask must have the shape of input_ids {ids.shape}, got "
                       f"{attention_mask.shape}")
  if image_grid_thw is None and video_grid_thw is None:
    return _text_only(ids, attention_mask)
  if attention_mask is None:
    attention_mask = np.ones_like(ids)
  valid = attention_mask == 1
  m = int(spatial_merge_size)
  b, l = ids.shape
  position_ids = np.ones((3, b, l), np.int64)
  deltas = np.zeros((b, 1), np.int64)
  image_index = video_index = 0
  for i in range(b):
    tok = ids[i][valid[i]]
    starts = np.flatnonzero(tok == vision_start_token_id)
    nxt = tok[starts[starts + 1 < len(tok)] + 1]
    rem_i = int((nxt == image_token_id).sum())
    rem_v = int((nxt == video_token_id).sum())
    img_at = np.flatnonzero(tok == image_token_id)
    vid_at = np.flatnonzero(tok == video_token_id)
    chunks = []
    st = 0
    for _ in range(rem_i + rem_v):
      later_i = img_at[img_at >= st] if rem_i > 0 else ()
      later_v = vid_at[vid_at >= st] if rem_v > 0 else ()
      ed_i = int(later_i[0]) if len(later_i) else len(tok) + 1
      ed_v = int(later_v[0]) if len(later_v) else len(tok) + 1
      if ed_i < ed_v:
        if image_index >= len(image_grid_thw if image_grid_thw is not None else ()):
          raise ValueError(f"sample {i} has more image blocks than image_grid_thw rows")
        t, h, w = image_grid_thw[image_index].tolist()
        t_off = image_time(t)
        image_index += 1
        rem_i -= 1
        ed = ed_i
      else:
        if video_index >= len(video_grid_thw if video_grid_thw is not None else ()):
          raise ValueError(f"sample {i} has more video blocks than video_grid_thw rows")
        t, h, w = video_grid_thw[video_index].tolist()
        t_off = video_time(video_index, t)
        video_index += 1
        rem_v -= 1
        ed = ed_v
      gh, gw = h // m, w // m
      text_len = ed - st
      s0 = int(chunks[-1].max()) + 1 if chunks else 0
      chunks.append(np.broadcast_to(np.arange(text_len, dtype=np.int64) + s0, (3, text_len)))
      tt = np.repeat(t_off, gh * gw)
      hh = np.tile(np.repeat(np.arange(gh, dtype=np.int64), gw), t)
      ww = np.tile(np.arange(gw, dtype=np.int64), t * gh)
      chunks.append(np.stack([tt, hh, ww]) + text_len + s0)
      st = ed + t * gh * gw
    if st < len(tok):
      s0 = int(chunks[-1].max()) + 1 if chunks else 0
      n = len(tok) - st
      chunks.append(np.broadcast_to(np.arange(n, dtype=np.int64) + s0, (3, n)))
    pos = np.concatenate(chunks, axis=1) if chunks else np.zeros((3, 0), np.int64)
    if pos.shape[1] != len(tok):
      raise ValueError(f"sample {i}: visual blocks overrun the sequence ({pos.shape[1]} positions "
                       f"for {len(tok)} tokens); placeholder runs must have t*h*w/{m * m} tokens")
    position_ids[:, i, valid[i]] = pos
    deltas[i, 0] = (int(pos.max()) + 1 if pos.size else 0) - l
  return position_ids, deltas


def qwen3_vl_get_rope_index(input_ids, image_grid_thw, video_grid_thw, attention_mask,
                            spatial_merge_size: int, image_token_id: int, video_token_id: int,
                            vision_start_token_id: int):
  """Qwen3-VL MRoPE position ids (spec 7.1-7.4; HF ``Qwen3VLModel.get_rope_index``).

  Args:
    input_ids: int [B, L]; each visual block is ``<|vision_start|>`` followed by its run of
      ``image_token_id``/``video_token_id`` placeholders (``t*h*w / M^2`` tokens per image,
      ``h*w / M^2`` per video temporal patch).
    image_grid_thw: int [Ni, 3] or None, in order of appearance over the flattened batch.
    video_grid_thw: int [Nv, 3] or None; each row is split into ``t`` blocks ``(1, h, w)``.
    attention_mask: 0/1 or bool [B, L] (1 = real token; left or right padding) or None.
    spatial_merge_size: M.
    image_token_id, video_token_id, vision_start_token_id: special token ids.
  Returns:
    ``(position_ids int64 [3, B, L], rope_deltas int64 [B, 1])``; pads get position 1.
  Raises:
    ValueError: bad shapes, more visual blocks than grid rows, or placeholder runs that overrun
      the sequence.
  """
  video = _as_grid(video_grid_thw, "video_grid_thw")
  if video is not None:
    video = np.repeat(video, video[:, 0], axis=0)
    video[:, 0] = 1
  return _rope_index(input_ids, _as_grid(image_grid_thw, "image_grid_thw"), video,
                     attention_mask, spatial_merge_size, image_token_id, video_token_id,
                     vision_start_token_id, lambda t: np.arange(t, dtype=np.int64),
                     lambda _, t: np.arange(t, dtype=np.int64))


def qwen2_5_vl_get_rope_index(input_ids, image_grid_thw, video_grid_thw, attention_mask,
                              spatial_merge_size: int, image_token_id: int, video_token_id: int,
                              vision_start_token_id: int, second_per_grid_ts=None,
                              tokens_per_second: float = 2, hf_int_seconds: bool = False):
  """Qwen2.5-VL MRoPE position ids (spec 7.6; HF ``Qwen2_5_VLModel.get_rope_index``).

  Same arguments and results as :func:`qwen3_vl_get_rope_index`, except that videos are one block
  each with temporal offsets ``T_k = int(k * second_per_grid_t * tokens_per_second)`` (images: 0).

  Args:
    second_per_grid_ts: float [Nv] seconds per temporal patch (processor output; 1.0 when None).
    tokens_per_second: ``vision_config.tokens_per_second``.
    hf_int_seconds: False (default): the product is computed in float64 and truncated at the end
      (original Qwen code; agrees with HF whenever ``second_per_grid_t`` is an integer, e.g. the
      default fps=2). True: reproduce transformers 4.57.1, which first truncates
      ``second_per_grid_t`` to an integer (0.5 -> 0 collapses all T offsets; spec 7.6 pitfall).
  Raises:
    ValueError: as :func:`qwen3_vl_get_rope_index`, or ``second_per_grid_ts`` shorter than the
      number of videos.
  """
  video = _as_grid(video_grid_thw, "video_grid_thw")
  secs = None
  if second_per_grid_ts is not None:
    secs = np.asarray(second_per_grid_ts, np.float64).reshape(-1)
    if video is not None and len(secs) < len(video):
      raise ValueError(f"second_per_grid_ts has {len(secs)} entries for {len(video)} videos")

  def video_time(index, t):
    s = 1.0 if secs is None else float(secs[index])
    if hf_int_seconds:
      s = float(int(s))
    return np.trunc(np.arange(t, dtype=np.float64) * s * tokens_per_second).astype(np.int64)

  return _rope_index(input_ids, _as_grid(image_grid_thw, "image_grid_thw"), video,
                     attention_mask, spatial_merge_size, image_token_id, video_token_id,
                     vision_start_token_id, lambda t: np.zeros(t, np.int64), video_time)


def _runs(flags: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
  """Starts and lengths of the runs of True in a bool [L] array."""
  edges = np.diff(np.concatenate([[0], flags.astype(np.int8), [0]]))
  starts = np.flatnonzero(edges == 1)
  return starts, np.flatnonzero(edges == -1) - starts


def check_vision_tokens(input_ids, attention_mask, image_grid_thw, video_grid_thw, *,
                        image_token_id: int, video_token_id: int, vision_start_id: int,
                        merge_size: int, split_video_frames: bool = True) -> None:
  """Checks that every image/video placeholder run sits where its grid says (host numpy, no jax).

  :func:`qwen3_vl_get_rope_index` / :func:`qwen2_5_vl_get_rope_index` and
  :func:`vlm.models.qwen3_vl.visual_token_index` consume the grids in order over the flattened
  batch and only the batch totals are checked there, so a row with one placeholder too few next to
  a row with one too many would silently give sample 0's features to sample 1. This scans each row
  (real tokens only, ``attention_mask == 1``), finds every contiguous run of ``image_token_id``
  (``video_token_id``) and matches the runs, in order, against the grids:

  * image ``k``: one run of ``t*h*w / M^2`` tokens;
  * video ``k`` with ``split_video_frames`` (Qwen3-VL: each temporal patch is its own
    ``<ts><|vision_start|>...<|vision_end|>`` block): ``t`` runs of ``h*w / M^2`` tokens; without
    (Qwen2.5-VL): one run of ``t*h*w / M^2``;
  * every run starts right after ``vision_start_id`` (that is how the rope index finds blocks).

  Args:
    input_ids: int [B, L] (left or right padded).
    attention_mask: 0/1 or bool [B, L], or None (all real).
    image_grid_thw, video_grid_thw: int [N, 3] (t, h, w) in batch order, or None (no images /
      videos: then any placeholder run is an error).
    image_token_id, video_token_id, vision_start_id: special token ids.
    merge_size: M (``spatial_merge_size``).
    split_video_frames: True for Qwen3-VL, False for Qwen2.5-VL (see above).

  Raises:
    ValueError: bad shapes, or a run that is not preceded by ``vision_start_id``, has the wrong
      length for its image/video, has no grid left, or grids left over with no run; the message
      names the row, the column in ``input_ids``, the image/video index and expected vs found.
  """
  ids = np.asarray(input_ids)
  if ids.ndim != 2:
    raise ValueError(f"input_ids must be int [B, L], got shape {ids.shape}")
  mask = np.ones(ids.shape, bool) if attention_mask is None else np.asarray(attention_mask)
  if mask.shape != ids.shape:
    raise ValueError(f"attention_mask {mask.shape} must have the shape of input_ids {ids.shape}")
  mask = mask.astype(bool)
  unit = int(merge_size) ** 2
  expected = {}
  for kind, grid in (("image", _as_grid(image_grid_thw, "image_grid_thw")),
                     ("video", _as_grid(video_grid_thw, "video_grid_thw"))):
    runs = []  # (item index, temporal patch or None, tokens, grid)
    for k, (t, h, w) in enumerate(grid.tolist() if grid is not None else []):
      if kind == "video" and split_video_frames:
        runs += [(k, f, h * w // unit, (t, h, w)) for f in range(t)]
      else:
        runs.append((k, None, t * h * w // unit, (t, h, w)))
    expected[kind] = runs
  used = {"image": 0, "video": 0}
  for row in range(ids.shape[0]):
    cols = np.flatnonzero(mask[row])
    tok = ids[row, cols]
    for kind, token_id in (("image", image_token_id), ("video", video_token_id)):
      starts, lengths = _runs(tok == token_id)
      for s, n in zip(starts.tolist(), lengths.tolist()):
        col = int(cols[s])
        if s == 0 or tok[s - 1] != vision_start_id:
          raise ValueError(f"row {row}: the {kind} placeholder run at column {col} does not "
                           f"follow a <|vision_start|> token ({vision_start_id}); every run must "
                           f"sit in a <|vision_start|>...<|vision_end|> block")
        runs = expected[kind]
        if used[kind] >= len(runs):
          n_items = runs[-1][0] + 1 if runs else 0
          raise ValueError(f"row {row}: a run of {n} {kind} placeholder tokens at column {col} "
                           f"but {kind}_grid_thw has only {n_items} {kind}(s), all placed "
                           "before it; pass one grid per placeholder block")
        k, frame, want, grid = runs[used[kind]]
        if n != want:
          what = f"{kind} {k}" + (f" temporal patch {frame}" if frame is not None else "")
          raise ValueError(f"row {row}: {what} (grid t,h,w={list(grid)}, merge {merge_size}) "
                           f"needs {want} placeholder tokens, found a run of {n} at column "
                           f"{col}; placeholders and images/videos are misaligned")
        used[kind] += 1
  for kind, runs in expected.items():
    if used[kind] < len(runs):
      k, frame, want, grid = runs[used[kind]]
      what = f"{kind} {k}" + (f" temporal patch {frame}" if frame is not None else "")
      raise ValueError(f"{what} (grid t,h,w={list(grid)}) has no placeholder run: the input_ids "
                       f"hold {used[kind]} of the {len(runs)} {kind} runs that {kind}_grid_thw "
                       "needs (a truncated prompt, or fewer placeholder blocks than "
                       f"{kind}s)")
