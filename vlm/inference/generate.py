"""Batched autoregressive generation for Qwen3-VL / Qwen3-VL-MoE / Qwen2.5-VL (:class:`Qwen3VL`).

Host side (numpy): the prompt is left-padded to a length bucket, MRoPE position ids and
``rope_deltas`` come from :mod:`vlm.models.rope_index` (spec 7.1-7.6), images then videos are packed
into one vision call (:func:`vlm.models.qwen_vit.vision_inputs`) and every placeholder token gets
its merged row (:func:`vlm.models.qwen3_vl.visual_token_index`).

Device side (:func:`compiled`): one jitted prefill fills a KV cache of ``prompt_len +
round_up(max_new_tokens, 32)`` slots (:func:`vlm.models.qwen3.init_cache`; ``Qwen3VL.logits`` is
intercepted so that only the last position is projected to the vocabulary), then one jitted
decode call runs the whole token loop on the device as a ``lax.while_loop``: the family-agnostic
loops of :mod:`vlm.inference.decoding` (:func:`~vlm.inference.decoding.sample_loop`, or
:func:`~vlm.inference.decoding.beam_search` when ``num_beams > 1``) with the Qwen step (position
ids ``cache_index + rope_deltas`` on all three MRoPE rows, spec 7.5; the loop exits early once
every row has stopped). Prompt length, batch size (:func:`batch_bucket`) and new-token count are
bucketed, so a new request within the buckets does not recompile. Greedy (``temperature == 0``),
temperature + top-k + nucleus (top-p) sampling, or beam search (HF ``num_beams``,
``length_penalty``, ``early_stopping``); each row stops at its first stop token, later
positions are filled with ``pad_token_id`` (HF ``generate`` semantics).

Before compiling, :func:`generate` compares :func:`estimate_generate_memory` (shapes only: params,
the vision tower's dense [heads, Np, Np] attention over all packed patches, KV cache, prefill
activations) with :func:`device_memory_limit` and raises :class:`GenerateMemoryError` for a
request that cannot fit (``check_memory=False`` skips it).
"""
from __future__ import annotations

from typing import Any, Mapping, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import linen as nn

from vlm.inference import decoding
from vlm.inference.decoding import (apply_repetition_penalty, filter_top_k, filter_top_p,  # noqa: F401
                                    sample_tokens)
from vlm.models import qwen_vit
from vlm.models.qwen3 import init_cache
from vlm.models.qwen3_vl import Qwen2_5_VLConfig, Qwen3VL, visual_token_index
from vlm.models.rope_index import (check_vision_tokens, qwen2_5_vl_get_rope_index,
                                   qwen3_vl_get_rope_index)

PROMPT_BUCKET = 64
PATCH_BUCKET = 256
NEW_TOKEN_BUCKET = 32


def _round_up(n: int, m: int) -> int:
  return max(m, -(-n // m) * m)


def left_pad(input_ids, attention_mask, length: int, pad_token_id: int):
  """Moves every row's real tokens to the right end of a ``[B, length]`` array (left padding).

  Args:
    input_ids: int [B, L]; attention_mask: 0/1 or bool [B, L] (left or right padded).
    length: target length >= the longest real row.
    pad_token_id: id written at the padded slots.
  Returns:
    ``(ids int64 [B, length], mask int64 [B, length])``.
  Raises:
    ValueError: on shape mismatches or rows longer than ``length``.
  """
  ids = np.asarray(input_ids)
  mask = np.asarray(attention_mask).astype(bool)
  if ids.ndim != 2 or mask.shape != ids.shape:
    raise ValueError(f"input_ids and attention_mask must both be [B, L], got {ids.shape} and "
                     f"{mask.shape}")
  out = np.full((ids.shape[0], length), pad_token_id, np.int64)
  out_mask = np.zeros((ids.shape[0], length), np.int64)
  for i in range(ids.shape[0]):
    real = ids[i][mask[i]]
    if len(real) > length:
      raise ValueError(f"row {i} has {len(real)} tokens, more than the length {length}")
    if len(real):
      out[i, length - len(real):] = real
      out_mask[i, length - len(real):] = 1
  return out, out_mask


def batch_bucket(batch: int) -> int:
  """Batch sizes compiled for: 1, 2, 4, 8, then multiples of 8 (extra rows are copies of row 0,
  finished from the start, and dropped from the output)."""
  if batch < 1:
    raise ValueError(f"batch must be >= 1, got {batch}")
  return 1 << (batch - 1).bit_length() if batch <= 8 else _round_up(batch, 8)


QWEN_CACHE_AXES = {"k": 1, "v": 1, "mask": 0}
"""Batch axis of each leaf of :func:`vlm.models.qwen3.init_cache`'s cache (for
:func:`vlm.inference.decoding.beam_search`)."""


class GenerateFns(NamedTuple):
  """The jitted device functions of :func:`generate` for one model and sampling setting.

  ``prefill(params, input_ids, position_ids, attention_mask, pixel_values, vision_tables,
  visual_token_index, kv_cache, rng, seen) -> (first_logits float32 [B, V], kv_cache)``: the
  vision tower and the whole prompt through the decoder into an empty cache; only the last
  position is projected to the vocabulary (``rng`` and ``seen`` are not read: the first token is
  picked by the decode loop).

  ``decode(params, first_logits, kv_cache, rope_deltas, prompt_len, max_new_tokens, eos, rng,
  done, seen, min_new_tokens=None) -> (tokens int32 [B, N], steps int32 [])``:
  :func:`vlm.inference.decoding.sample_loop` with the Qwen step (one ``lax.while_loop`` on the
  device, no host round trip per token). ``rope_deltas`` int32 [B, 1]; ``prompt_len`` (static
  int) is the prompt bucket; ``N = T - prompt_len`` is the output width (cache slots ``T`` minus
  the prompt); ``max_new_tokens`` (int32 scalar, <= N), ``eos`` (int32 [S], padded with -1),
  ``done`` (bool [B], rows finished from the start, e.g. batch padding) and ``min_new_tokens``
  (int32 scalar, None = 0) are data, so none recompiles. Row ``b`` stops after its first stop
  token; later slots hold ``pad_token_id``. ``steps`` counts decoder calls after the prefill.
  Token ``i`` is sampled with ``fold_in(rng, i)``; ``seen`` is bool [B, V] (tokens already in
  each sequence, for the repetition penalty) or None when the penalty is off.

  ``beam(params, first_logits, kv_cache, rope_deltas, prompt_len, max_new_tokens, eos, done,
  min_new_tokens, num_beams, length_penalty, early_stopping) -> (tokens int32 [B, N], scores
  float32 [B])``: :func:`vlm.inference.decoding.beam_search` with the Qwen step (the ``B``-row
  prefill cache is repeated for the beams inside); ``prompt_len``, ``num_beams``,
  ``length_penalty`` and ``early_stopping`` are static.
  """
  prefill: Any
  decode: Any
  beam: Any = None


_COMPILED: dict = {}


def _qwen_step(model, deltas):
  """The :mod:`vlm.inference.decoding` step of a :class:`Qwen3VL`: token ``tok`` [N] at cache slot
  ``index``, MRoPE position ``index + rope_deltas`` on all three rows (spec 7.5)."""
  def step(params, tok, cache, index):
    n = tok.shape[0]
    pos = jnp.broadcast_to((index + deltas)[None], (3, n, 1)).astype(jnp.int32)
    logits, cache = model.apply({"params": params}, tok[:, None], pos, jnp.ones((n, 1), bool),
                                kv_cache=cache, cache_index=index)
    return jnp.asarray(logits[:, -1], jnp.float32), cache
  return step


def compiled(model, temperature: float, top_p: float, pad_token_id: int, top_k: int = 0,
             repetition_penalty: float = 1.0) -> GenerateFns:
  """:class:`GenerateFns` jitted for one model / sampling setting, cached so that repeated
  :func:`generate` calls reuse the compilations (one per prompt, batch and new-token bucket)."""
  key = (id(model), temperature, top_p, pad_token_id, top_k, repetition_penalty)
  if key in _COMPILED and _COMPILED[key][0] is model:
    return _COMPILED[key][1]

  def last_only(next_fun, args, kwargs, context):
    # only the last prompt position's logits are needed: project [B, 1, D], not [B, Lp, V]
    if isinstance(context.module, Qwen3VL) and context.method_name == "logits" and args:
      args = (args[0][:, -1:],) + tuple(args[1:])
    return next_fun(*args, **kwargs)

  def prefill(params, ids, pos, mask, pixels, tables, index, cache, rng, seen):
    del rng, seen  # the first token is picked by the decode loop
    with nn.intercept_methods(last_only):
      logits, cache = model.apply({"params": params}, ids, pos, mask, pixels, tables, index,
                                  cache, 0)
    return jnp.asarray(logits[:, -1], jnp.float32), cache

  def decode(params, first, cache, deltas, prompt_len, max_new, eos, rng, done, seen,
             min_new=None):
    return decoding.sample_loop(
        _qwen_step(model, deltas), params, first, cache, start_index=prompt_len,
        width=cache["mask"].shape[1] - prompt_len, max_new_tokens=max_new, eos=eos,
        pad_token_id=pad_token_id, temperature=temperature, top_p=top_p, top_k=top_k,
        repetition_penalty=repetition_penalty, seen=seen,
        min_new_tokens=0 if min_new is None else min_new, rng=rng, done=done)

  def beam(params, first, cache, deltas, prompt_len, max_new, eos, done, min_new, num_beams,
           length_penalty, early_stopping):
    return decoding.beam_search(
        _qwen_step(model, jnp.repeat(deltas, num_beams, axis=0)), params, first, cache,
        QWEN_CACHE_AXES, start_index=prompt_len, width=cache["mask"].shape[1] - prompt_len,
        num_beams=num_beams, max_new_tokens=max_new, eos=eos, pad_token_id=pad_token_id,
        length_penalty=length_penalty, early_stopping=early_stopping, min_new_tokens=min_new,
        done=done)

  fns = GenerateFns(jax.jit(prefill, donate_argnums=(7,)),
                    jax.jit(decode, static_argnums=(4,)),  # the loop carry is updated in place
                    jax.jit(beam, static_argnums=(4, 9, 10, 11)))
  if len(_COMPILED) > 16:
    _COMPILED.clear()
  _COMPILED[key] = (model, fns)
  return fns


def prepare_inputs(config, batch: Mapping[str, Any], *, pad_token_id: int,
                   prompt_bucket: int = PROMPT_BUCKET, max_patches: int | None = None) -> dict:
  """Host-side prefill inputs (numpy) for :func:`generate`.

  Args:
    config: :class:`Qwen3VLConfig` or :class:`Qwen2_5_VLConfig`.
    batch: processor output (``input_ids``, ``attention_mask``, optional ``pixel_values`` +
      ``image_grid_thw``, ``pixel_values_videos`` + ``video_grid_thw``, ``second_per_grid_ts``).
    pad_token_id: id for padded slots.
    prompt_bucket: the prompt is left-padded to a multiple of this length.
    max_patches: packed patch bucket (multiple of M^2); default: the patch count rounded up to a
      multiple of 256.
  Returns:
    dict with ``input_ids`` int32 [B, Lp], ``attention_mask`` bool [B, Lp], ``position_ids`` int32
    [3, B, Lp], ``rope_deltas`` int64 [B, 1], and when there are pixels ``pixel_values`` float32
    [Np, F], ``vision_tables`` (dict), ``visual_token_index`` int32 [B, Lp]; else those three None.
  Raises:
    ValueError: missing keys, pixels without grids (or vice versa), pixel rows that do not match
      the grids, placeholder runs that do not match the grids row by row and image by image
      (:func:`vlm.models.rope_index.check_vision_tokens`: the row, the image/video and expected
      vs found are named; column positions refer to ``batch["input_ids"]``), a patch bucket that
      is too small, empty rows, token ids outside the vocabulary.
  """
  if "input_ids" not in batch:
    raise ValueError("batch needs input_ids (and attention_mask): pass the processor output")
  if not isinstance(prompt_bucket, (int, np.integer)) or prompt_bucket < 1:
    raise ValueError(f"prompt_bucket must be a positive int, got {prompt_bucket!r}")
  ids = np.asarray(batch["input_ids"])
  if ids.ndim != 2 or not np.issubdtype(ids.dtype, np.integer):
    raise ValueError(f"input_ids must be int [B, L], got {ids.dtype} {ids.shape}")
  mask = batch.get("attention_mask")
  mask = np.ones_like(ids) if mask is None else np.asarray(mask)
  if mask.shape != ids.shape:
    raise ValueError(f"attention_mask {mask.shape} must have the shape of input_ids {ids.shape}")
  real = mask.astype(bool)
  empty = np.flatnonzero(real.sum(1) == 0) if ids.size else np.arange(ids.shape[0])
  if ids.shape[0] == 0 or len(empty):
    raise ValueError(f"every row needs at least one real token; rows {empty.tolist()} are empty "
                     "(an empty prompt or an all-zero attention_mask row)")
  v = config.text.vocab_size
  bad = real & ((ids < 0) | (ids >= v))
  if bad.any():
    r, c = np.argwhere(bad)[0]
    raise ValueError(f"input_ids[{r}, {c}] = {int(ids[r, c])} is outside the vocabulary "
                     f"[0, {v}); tokenize with the model's tokenizer")
  lp = _round_up(int(real.sum(1).max()), prompt_bucket)
  given_ids, given_mask = ids, mask
  ids, mask = left_pad(ids, mask, lp, pad_token_id)

  grids, pixels = [], []
  image_grid = video_grid = None
  for px_key, grid_key in (("pixel_values", "image_grid_thw"),
                           ("pixel_values_videos", "video_grid_thw")):
    has_px, has_grid = batch.get(px_key) is not None, batch.get(grid_key) is not None
    if has_px != has_grid:
      raise ValueError(f"{px_key} and {grid_key} must be given together")
    if has_px:
      grid = np.asarray(batch[grid_key]).reshape(-1, 3)
      px = np.asarray(batch[px_key], np.float32)
      want = int(np.prod(grid, axis=1).sum())
      if px.ndim != 2 or px.shape[0] != want:
        raise ValueError(f"{px_key} must be [sum(t*h*w), C*Tp*P*P] = [{want}, ...] for "
                         f"{grid_key} {grid.tolist()}, got {px.shape}; pass the processor's "
                         "pixels and grids together, unmodified")
      grids.append(grid)
      pixels.append(px)
      if grid_key == "image_grid_thw":
        image_grid = grid
      else:
        video_grid = grid

  m = config.vision.spatial_merge_size
  if pixels:  # per row and per image: the totals alone would let a row's features slip a row
    check_vision_tokens(given_ids, given_mask, image_grid, video_grid,
                        image_token_id=config.image_token_id,
                        video_token_id=config.video_token_id,
                        vision_start_id=config.vision_start_token_id, merge_size=m,
                        split_video_frames=not isinstance(config, Qwen2_5_VLConfig))
  args = (ids, image_grid, video_grid, mask, m, config.image_token_id, config.video_token_id,
          config.vision_start_token_id)
  if isinstance(config, Qwen2_5_VLConfig):
    pos, deltas = qwen2_5_vl_get_rope_index(
        *args, second_per_grid_ts=batch.get("second_per_grid_ts"),
        tokens_per_second=config.vision.tokens_per_second)
  else:
    pos, deltas = qwen3_vl_get_rope_index(*args)

  out = dict(input_ids=ids.astype(np.int32), attention_mask=mask.astype(bool),
             position_ids=pos.astype(np.int32), rope_deltas=deltas,
             pixel_values=None, vision_tables=None, visual_token_index=None)
  if pixels:
    grid = np.concatenate(grids)
    packed = np.concatenate(pixels)
    np_ = max_patches if max_patches is not None else _round_up(packed.shape[0], PATCH_BUCKET)
    out["pixel_values"] = qwen_vit.pad_pixel_values(packed, np_)
    out["vision_tables"] = qwen_vit.vision_inputs(config.vision, grid, np_)
    out["visual_token_index"] = visual_token_index(
        ids, config.image_token_id, config.video_token_id, image_grid_thw=image_grid,
        video_grid_thw=video_grid, spatial_merge_size=m)
  elif ((ids == config.image_token_id) | (ids == config.video_token_id)).any():
    raise ValueError("input_ids hold image/video placeholders but the batch has no pixel_values; "
                     "pass the processor output with its images/videos")
  return out


class GenerateMemoryError(ValueError):
  """A generation request whose estimated memory (:func:`estimate_generate_memory`) exceeds what
  the device has (:func:`device_memory_limit`); raised before anything is compiled."""


def _grid_rows(batch: Mapping[str, Any], key: str) -> np.ndarray:
  grid = batch.get(key)
  return np.zeros((0, 3), np.int64) if grid is None else np.asarray(grid, np.int64).reshape(-1, 3)


def estimate_generate_memory(model, params, batch: Mapping[str, Any], max_new_tokens: int, *,
                             prompt_bucket: int = PROMPT_BUCKET,
                             new_token_bucket: int = NEW_TOKEN_BUCKET,
                             max_patches: int | None = None,
                             repetition_penalty: float = 1.0,
                             num_beams: int = 1) -> dict[str, int]:
  """Estimated peak memory of one :func:`generate` call, in bytes, from shapes only.

  An estimate, not a measurement: XLA may fuse or reuse buffers (lower) or keep extra temporaries
  (higher); it is meant to catch requests that cannot fit by a wide margin (a 6000x6000 photo at
  the processor's default 16.7M-pixel budget needs ~275 GB for one vision attention matrix)
  before minutes of preprocessing and compilation end in an out-of-memory crash. It reads only
  shapes: ``batch`` needs ``input_ids`` (+ ``attention_mask``) and the grids; pixels are not
  read, so candidate grids can be tried without running the processor.

  Counted, with B the batch bucket (:func:`batch_bucket`), Lp the prompt bucket, T = Lp +
  round_up(max_new_tokens, new_token_bucket) the cache length, Np the packed patch bucket of all
  images and videos (the vision tower runs them as ONE sequence, every block a dense
  segment/window-masked attention over all Np patches), ``isz`` the bytes of ``model.dtype``:

  * ``params``: bytes of every leaf of ``params`` (arrays or ``jax.ShapeDtypeStruct``).
  * ``vision_attention``: one block's scores and softmax, float32 ``[heads, Np, Np]`` each (plus
    the probabilities in the compute dtype when it is not float32) and the bool mask
    ``[Np, Np]``: quadratic in Np.
  * ``vision_activations``: per patch the float32 pixels, the residual stream, qkv, attention
    output and MLP hidden in ``isz``, plus the merged features and DeepStack copies.
  * ``kv_cache``: keys and values ``2 x [layers, B, kv_heads, T, head_dim]`` in ``isz``; with
    ``num_beams = n > 1`` the prefill cache of B rows plus its repetition for the beams, B * n
    rows (both exist while the beams' copy is made).
  * ``prefill_attention``: one decoder layer's float32 scores and softmax ``[B, heads, Lp, Lp]``.
  * ``prefill_activations``: the residual stream, embeddings and DeepStack features, q/k/v and
    the MLP hidden (all experts for an MoE decoder: prefill runs them densely) for ``[B, Lp]``
    tokens: linear in Lp.
  * ``decode``: float32 logits ``[B * n, V]`` with the sampler's sort buffers (beam search: the
    log-probabilities and candidate scores), and the repetition penalty's ``[B, V]`` mask.
  * ``total``: ``params + kv_cache + decode + max(vision phase, decoder prefill phase)``; the
    two phases run one after the other inside the prefill program.

  Args:
    model: a :class:`vlm.models.qwen3_vl.Qwen3VL` / ``Qwen2_5_VL`` (its ``config`` and ``dtype``).
    params: its parameter tree (or ``{"params": tree}``); ``{}`` counts 0 bytes.
    batch: processor output, or a dict with the same ``input_ids`` / ``attention_mask`` /
      ``image_grid_thw`` / ``video_grid_thw`` shapes.
    max_new_tokens: as :func:`generate`.
    prompt_bucket, new_token_bucket, max_patches, repetition_penalty, num_beams: as
      :func:`generate`.

  Returns:
    dict of int bytes with the keys above.

  Raises:
    ValueError: ``batch`` without ``input_ids`` or with a non-2-D ``input_ids``.
  """
  if "input_ids" not in batch:
    raise ValueError("batch needs input_ids (and attention_mask): pass the processor output")
  ids = np.asarray(batch["input_ids"])
  if ids.ndim != 2:
    raise ValueError(f"input_ids must be int [B, L], got shape {ids.shape}")
  mask = batch.get("attention_mask")
  real = np.ones(ids.shape, bool) if mask is None else np.asarray(mask).astype(bool)
  cfg, text = model.config, model.config.text
  isz = jnp.dtype(model.dtype).itemsize
  extra_probs = 0 if isz == 4 else isz  # the probabilities cast to the compute dtype
  b = batch_bucket(max(1, ids.shape[0]))
  lp = _round_up(int(real.sum(1).max()) if ids.size else 1, prompt_bucket)
  t = lp + _round_up(int(max_new_tokens), new_token_bucket)
  leaves = jax.tree.leaves(params)
  out = {"params": int(sum(int(np.prod(x.shape)) * jnp.dtype(x.dtype).itemsize for x in leaves))}

  vis = cfg.vision
  grids = np.concatenate([_grid_rows(batch, "image_grid_thw"), _grid_rows(batch, "video_grid_thw")])
  patches = int(np.prod(grids, axis=1).sum()) if len(grids) else 0
  n_p = 0 if not patches else (max_patches if max_patches is not None
                               else _round_up(patches, PATCH_BUCKET))
  n_deep = len(getattr(vis, "deepstack_visual_indexes", ()) or ())
  unit = vis.spatial_merge_size ** 2
  out["vision_attention"] = n_p * n_p * (vis.num_heads * (8 + extra_probs) + 1)
  out["vision_activations"] = n_p * (
      4 * vis.patch_dim + isz * (6 * vis.hidden_size + 2 * vis.intermediate_size)
      + isz * (1 + n_deep) * vis.out_hidden_size // unit)

  hd, d = text.head_dim, text.hidden_size
  rows = b * (num_beams + 1) if num_beams > 1 else b
  out["kv_cache"] = (2 * text.num_hidden_layers * rows * text.num_key_value_heads * t * hd * isz
                     + rows * t)
  out["prefill_attention"] = b * lp * lp * (text.num_attention_heads * (8 + extra_probs) + 1)
  mlp = (text.num_experts * text.moe_intermediate_size if text.num_experts
         else text.intermediate_size)
  qkv = (text.num_attention_heads + 2 * text.num_key_value_heads) * hd
  out["prefill_activations"] = b * lp * isz * ((4 + n_deep) * d + qkv + 3 * mlp)
  v = text.vocab_size
  out["decode"] = b * num_beams * v * 4 * 3 + (b * v if repetition_penalty != 1.0 else 0)
  vision_phase = out["vision_attention"] + out["vision_activations"]
  prefill_phase = out["prefill_attention"] + out["prefill_activations"]
  out["total"] = (out["params"] + out["kv_cache"] + out["decode"]
                  + max(vision_phase, prefill_phase))
  return out


def device_memory_limit(device=None) -> int | None:
  """Bytes a generation on ``device`` (default ``jax.devices()[0]``) may use in total,
  parameters included; None when unknown (the memory check is then skipped).

  GPU/TPU: ``device.memory_stats()["bytes_limit"]`` (the allocator's limit; parameters already on
  the device are part of what it holds). CPU: this process's resident memory
  (``/proc/self/statm``) plus the system's ``MemAvailable`` (``/proc/meminfo``), i.e. what the
  process can grow to with the parameters it already holds; without ``/proc``, the physical RAM
  ``os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")``.
  """
  import os
  device = device if device is not None else jax.devices()[0]
  if device.platform != "cpu":
    try:
      stats = device.memory_stats() or {}
    except Exception:  # pylint: disable=broad-except  # backends without memory_stats
      stats = {}
    limit = stats.get("bytes_limit")
    return int(limit) if limit else None
  try:
    page = os.sysconf("SC_PAGE_SIZE")
    with open("/proc/meminfo") as fh:
      avail = next(int(line.split()[1]) * 1024 for line in fh if line.startswith("MemAvailable:"))
    with open("/proc/self/statm") as fh:
      resident = int(fh.read().split()[1]) * page
    return avail + resident
  except (OSError, StopIteration, ValueError, IndexError):
    pass
  try:
    return int(os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE"))
  except (OSError, ValueError, AttributeError):
    return None


def format_memory_estimate(est: Mapping[str, int]) -> str:
  """One line: ``total X GiB = params ... + vision attention ... + ...`` (GiB, 2 decimals)."""
  gib = lambda n: f"{n / 2 ** 30:.2f} GiB"
  parts = ", ".join(f"{k.replace('_', ' ')} {gib(v)}" for k, v in est.items() if k != "total")
  return f"{gib(est['total'])} ({parts})"


def check_generate_memory(model, params, batch: Mapping[str, Any], max_new_tokens: int, *,
                          limit: int | None = None, hint: str | None = None,
                          **kwargs) -> dict[str, int]:
  """:func:`estimate_generate_memory` compared with ``limit`` (default
  :func:`device_memory_limit`); returns the estimate.

  Raises:
    GenerateMemoryError: (a ValueError) when the estimate exceeds the limit; the message gives
      both in GiB, the patch and prompt sizes, and ``hint`` (default: lower the processor's
      ``max_pixels``, or pass ``check_memory=False`` to try anyway).
  """
  est = estimate_generate_memory(model, params, batch, max_new_tokens, **kwargs)
  limit = device_memory_limit() if limit is None else limit
  if limit is not None and est["total"] > limit:
    grids = np.concatenate([_grid_rows(batch, "image_grid_thw"),
                            _grid_rows(batch, "video_grid_thw")])
    patches = int(np.prod(grids, axis=1).sum()) if len(grids) else 0
    hint = hint or ("lower the processor's max_pixels (dataclasses.replace(processor.config, "
                    "max_pixels=...)) or max_new_tokens, or pass check_memory=False to try anyway")
    raise GenerateMemoryError(
        f"this generation needs an estimated {format_memory_estimate(est)} but the device has "
        f"{limit / 2 ** 30:.2f} GiB: {patches} vision patches "
        f"({patches // model.config.vision.spatial_merge_size ** 2} visual tokens), prompt of "
        f"{np.asarray(batch['input_ids']).shape[1]} tokens; {hint}")
  return est


def generate(model, params, batch: Mapping[str, Any], *, max_new_tokens: int,
             eos_token_ids: int | Sequence[int], pad_token_id: int, temperature: float = 0.0,
             top_p: float = 1.0, top_k: int = 0, repetition_penalty: float = 1.0, rng=None,
             max_patches: int | None = None, prompt_bucket: int = PROMPT_BUCKET,
             new_token_bucket: int = NEW_TOKEN_BUCKET, check_memory: bool = True,
             num_beams: int = 1, length_penalty: float = 1.0,
             early_stopping: bool | str = False, min_new_tokens: int = 0) -> np.ndarray:
  """Generates up to ``max_new_tokens`` tokens after each prompt of a batch.

  Args:
    model: a :class:`vlm.models.qwen3_vl.Qwen3VL` (or ``Qwen2_5_VL``).
    params: its ``"params"`` collection (e.g. from ``load_hf_qwen3_vl``), or ``{"params": ...}``.
    batch: processor output (see :func:`prepare_inputs`); left or right padding.
    max_new_tokens: number of generated positions (>= 1).
    eos_token_ids: stop token id(s); a row stops after emitting one (it is kept in the output).
    pad_token_id: written after a row's stop token (and used to pad the prompt).
    temperature: 0 = greedy; > 0 samples from ``softmax(logits / temperature)``.
    top_p: nucleus sampling mass (1.0 = off); only used when sampling.
    top_k: keep the k most likely tokens before top-p (0 = off); only used when sampling.
    repetition_penalty: HF's repetition penalty (1.0 = off; greedy too): tokens already in the
      sequence, i.e. every id of ``batch["input_ids"]`` as given (padding included, as HF) and
      every generated token, have their logits divided (positive) or multiplied (negative) by it.
    The released Qwen3-VL Instruct defaults (``generation_config.json``) are temperature 0.7,
    top_k 20, top_p 0.8, repetition_penalty 1.0: :func:`load_generation_config` reads them.
    rng: ``jax.random`` key, required when ``temperature > 0``.
    max_patches: packed vision bucket (see :func:`prepare_inputs`).
    prompt_bucket: prompt lengths are rounded up to a multiple of this (one compile per bucket).
    new_token_bucket: the KV cache holds ``round_up(max_new_tokens, new_token_bucket)`` new
      slots; ``max_new_tokens`` within one bucket does not recompile. Batch sizes are bucketed by
      :func:`batch_bucket`. Compilations: one per (prompt, batch, new-token, patch) bucket.
    check_memory: before compiling, compare :func:`estimate_generate_memory` with
      :func:`device_memory_limit` and raise :class:`GenerateMemoryError` if it does not fit
      (arithmetic on shapes only; False skips it).
    num_beams: 1 = greedy / sampling; > 1 = beam search with that many beams (HF
      ``generate(num_beams=n, do_sample=False)``, :func:`vlm.inference.decoding.beam_search`;
      the best finished hypothesis of each row is returned). Greedy only: no sampling and no
      repetition penalty with beams.
    length_penalty: beam search: hypotheses are ranked by ``sum_logprobs / new_tokens **
      length_penalty`` (HF's default 1.0).
    early_stopping: beam search: ``False`` (HF default: stop a row when the best running beam
      cannot beat the worst of ``num_beams`` finished ones at its current length), ``True``
      (stop a row once it has ``num_beams`` finished hypotheses) or ``"never"``.
    min_new_tokens: the stop ids are masked until this many tokens are generated (HF
      ``MinNewTokensLengthLogitsProcessor``); data, so it does not recompile.
  Returns:
    int64 numpy [B, max_new_tokens].
  Raises:
    ValueError: bad sampling settings (non-finite temperature, top_p outside (0, 1], negative
      top_k, non-positive repetition penalty, a missing or malformed rng when sampling), bad
      beam settings (``num_beams`` < 1, sampling or a repetition penalty with ``num_beams >
      1``, ``early_stopping`` not True/False/"never", non-finite ``length_penalty``), a
      negative ``min_new_tokens``, stop ids that are not ints in the vocabulary, or bad inputs
      (see :func:`prepare_inputs`).
    GenerateMemoryError: (a ValueError) with ``check_memory``, a request estimated not to fit.
  """
  if not isinstance(max_new_tokens, (int, np.integer)) or max_new_tokens < 1:
    raise ValueError(f"max_new_tokens must be an int >= 1, got {max_new_tokens!r}")
  if not (np.isfinite(temperature) and temperature >= 0):
    raise ValueError(f"temperature must be finite and >= 0 (0 = greedy), got {temperature}")
  if not isinstance(pad_token_id, (int, np.integer)):
    raise ValueError(f"pad_token_id must be an int token id, got {pad_token_id!r}")
  if not 0.0 < top_p <= 1.0:
    raise ValueError(f"top_p must be in (0, 1], got {top_p}")
  if top_k < 0:
    raise ValueError(f"top_k must be >= 0 (0 = off), got {top_k}")
  if not repetition_penalty > 0:
    raise ValueError(f"repetition_penalty must be > 0 (1.0 = off), got {repetition_penalty}")
  if (not isinstance(num_beams, (int, np.integer)) or isinstance(num_beams, bool)
      or num_beams < 1):
    raise ValueError(f"num_beams must be an int >= 1 (1 = no beam search), got {num_beams!r}")
  if num_beams > 1 and temperature > 0:
    raise ValueError(f"beam search (num_beams={num_beams}) is greedy here: pass temperature=0 "
                     "(sampling with beams is not supported), or num_beams=1 to sample")
  if num_beams > 1 and repetition_penalty != 1.0:
    raise ValueError(f"beam search (num_beams={num_beams}) does not take a repetition penalty: "
                     "pass repetition_penalty=1.0, or num_beams=1")
  if not np.isfinite(length_penalty):
    raise ValueError(f"length_penalty must be finite, got {length_penalty}")
  if early_stopping not in (True, False, "never") or not isinstance(early_stopping, (bool, str)):
    raise ValueError(f"early_stopping must be True, False or 'never', got {early_stopping!r}")
  if not isinstance(min_new_tokens, (int, np.integer)) or min_new_tokens < 0:
    raise ValueError(f"min_new_tokens must be an int >= 0, got {min_new_tokens!r}")
  if temperature > 0 and rng is None:
    raise ValueError("sampling (temperature > 0) needs rng=jax.random.PRNGKey(seed)")
  if rng is None:
    rng = jax.random.PRNGKey(0)
  rng = jnp.asarray(rng) if not isinstance(rng, jax.Array) else rng
  if not (jax.dtypes.issubdtype(rng.dtype, jax.dtypes.prng_key)
          or (rng.dtype == jnp.uint32 and rng.shape == (2,))):
    raise ValueError(f"rng must be a jax.random key (jax.random.PRNGKey(seed) or "
                     f"jax.random.key(seed)), got {rng.dtype} {rng.shape}")
  if new_token_bucket < 1:
    raise ValueError(f"new_token_bucket must be >= 1, got {new_token_bucket}")
  if "params" in params and len(params) == 1:
    params = params["params"]
  eos = np.asarray(eos_token_ids).reshape(-1) if eos_token_ids is not None else np.zeros(0)
  if eos.size == 0 or not np.issubdtype(eos.dtype, np.integer):
    raise ValueError(f"eos_token_ids must be one or more int token ids, got {eos_token_ids!r}")
  if eos.min() < 0 or eos.max() >= model.config.text.vocab_size:
    raise ValueError(f"eos_token_ids {eos.tolist()} must lie in the vocabulary "
                     f"[0, {model.config.text.vocab_size})")
  # padded with -1 (never sampled) to a multiple of 8: the number of stop ids is not a shape
  eos = np.concatenate([eos, np.full(-len(eos) % 8, -1)]).astype(np.int32)
  config = model.config
  inp = prepare_inputs(config, batch, pad_token_id=pad_token_id, prompt_bucket=prompt_bucket,
                       max_patches=max_patches)
  if check_memory:
    check_generate_memory(model, params, batch, max_new_tokens, prompt_bucket=prompt_bucket,
                          new_token_bucket=new_token_bucket, max_patches=max_patches,
                          repetition_penalty=repetition_penalty, num_beams=int(num_beams))
  b, lp = inp["input_ids"].shape
  bb = batch_bucket(b)
  rows = np.concatenate([np.arange(b), np.zeros(bb - b, np.int64)])  # filler rows copy row 0
  take_rows = lambda x: None if x is None else np.asarray(x)[rows]
  width = _round_up(max_new_tokens, new_token_bucket)
  fns = compiled(model, float(temperature), float(top_p), int(pad_token_id), int(top_k),
                 float(repetition_penalty))
  seen = None
  if repetition_penalty != 1.0:
    v = config.text.vocab_size
    given = np.asarray(batch["input_ids"]).astype(np.int64)
    if given.min() < 0 or given.max() >= v:
      raise ValueError(f"input_ids hold ids outside the vocabulary [0, {v})")
    seen = np.zeros((b, v), bool)
    seen[np.arange(b)[:, None], given] = True
    seen = jnp.asarray(seen[rows])
  cache = init_cache(config.text, bb, lp + width, model.dtype)
  pixels = None if inp["pixel_values"] is None else jnp.asarray(inp["pixel_values"])
  first, cache = fns.prefill(
      params, jnp.asarray(take_rows(inp["input_ids"])),
      jnp.asarray(np.asarray(inp["position_ids"])[:, rows]),
      jnp.asarray(take_rows(inp["attention_mask"])), pixels, inp["vision_tables"],
      take_rows(inp["visual_token_index"]), cache, rng, seen)
  deltas = jnp.asarray(take_rows(inp["rope_deltas"]), jnp.int32)
  done = jnp.asarray(np.arange(bb) >= b)
  scalars = (jnp.asarray(max_new_tokens, jnp.int32), jnp.asarray(eos))
  if num_beams > 1:
    out, _ = fns.beam(params, first, cache, deltas, lp, *scalars, done,
                      jnp.asarray(min_new_tokens, jnp.int32), int(num_beams),
                      float(length_penalty), early_stopping)
  else:
    out, _ = fns.decode(params, first, cache, deltas, lp, *scalars, rng, done, seen,
                        jnp.asarray(min_new_tokens, jnp.int32))
  return np.asarray(out)[:b, :max_new_tokens].astype(np.int64)


def load_generation_config(path: str) -> dict:
  """Sampling defaults of a checkpoint directory's ``generation_config.json`` as
  :func:`generate` keyword arguments (``temperature``, ``top_p``, ``top_k``,
  ``repetition_penalty``, ``eos_token_ids``, ``pad_token_id``; only the keys the file sets).

  ``do_sample: false`` (or absent, HF's default) gives ``temperature=0`` (greedy). Qwen3-VL
  Instruct ships ``do_sample=true, temperature=0.7, top_k=20, top_p=0.8`` (spec 7.7). Returns
  ``{}`` when the file does not exist.
  Raises:
    ValueError: a file that is not a JSON object.
  """
  import json
  import os
  file = os.path.join(os.fspath(path), "generation_config.json")
  if not os.path.exists(file):
    return {}
  with open(file) as fh:
    d = json.load(fh)
  if not isinstance(d, dict):
    raise ValueError(f"{file} must hold a JSON object")
  out: dict[str, Any] = {}
  if d.get("do_sample"):
    for key in ("temperature", "top_p"):
      if d.get(key) is not None:
        out[key] = float(d[key])
    if d.get("top_k") is not None:
      out["top_k"] = int(d["top_k"])
  else:
    out["temperature"] = 0.0
  if d.get("repetition_penalty") is not None:
    out["repetition_penalty"] = float(d["repetition_penalty"])
  eos = d.get("eos_token_id")
  if eos is not None:
    out["eos_token_ids"] = [int(eos)] if np.isscalar(eos) else [int(e) for e in eos]
  if d.get("pad_token_id") is not None:
    out["pad_token_id"] = int(d["pad_token_id"])
  return out
