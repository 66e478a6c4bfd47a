"""Family-agnostic decoding loops: greedy / sampled decoding and beam search, each one jittable
``lax.while_loop`` on the device with fixed shapes.

A model family plugs in through a ``step`` function and its KV cache::

  step(params, tokens int32 [N], cache, index int32 []) -> (logits float32 [N, V], cache)

``step`` feeds one token per row, written at cache slot ``index``, and returns the next-token
logits; the family closes over everything else (Qwen-VL: the MRoPE position ``index +
rope_deltas``; OPT: positions from the cache mask; T5: the encoder output held in the cache).
``N`` is the batch ``B`` for :func:`sample_loop` and ``B * num_beams`` for :func:`beam_search`.
``cache_batch_axes`` is a pytree with the structure of the cache giving, per leaf, its batch axis
(Qwen/OPT: ``{"k": 1, "v": 1, "mask": 0}``); beam search uses it to repeat rows for the beams
(:func:`repeat_cache`) and to reorder them after every step.

``first_logits`` float32 [B, V] are the prefill logits of the last prompt position;
``start_index`` is the cache slot of the first generated token (token ``i`` is fed at slot
``start_index + i``); ``width`` (static int) is the number of output slots (>= every
``max_new_tokens`` passed); ``eos`` is int32 [S] (stop ids padded with -1, so the number of stop
ids is not a shape); ``max_new_tokens`` and ``min_new_tokens`` are traced int32 scalars (no
recompiles). Both loops stop early once no row can change any more.

Semantics are HF transformers 4.57.1 ``GenerationMixin`` (``transformers/generation/utils.py``:
``_sample`` and ``_beam_search`` with ``_get_top_k_continuations``,
``_get_running_beams_for_next_iteration``, ``_update_finished_beams``,
``_check_early_stop_heuristic``, ``_beam_search_has_unfinished_sequences``; the EOS masks of
``MinNewTokensLengthLogitsProcessor`` / ``MinLengthLogitsProcessor`` in
``transformers/generation/logits_process.py``); beam search: Graves 2012 / Sutskever et al. 2014,
length penalty of Wu et al. 2016 (GNMT) as HF applies it.
"""
from __future__ import annotations

from typing import Any, Callable

import jax
import jax.numpy as jnp

NEG = -1.0e9  # HF's "impossible" score for beams (added, not -inf, so sums stay finite)


def filter_top_p(logits, top_p: float):
  """Nucleus filter (Holtzman et al. 2020; HF ``TopPLogitsWarper``): keeps the smallest set of
  highest-probability tokens whose mass reaches ``top_p`` (always the top token); the rest get
  ``-inf``. float [B, V] -> float [B, V]; ``top_p >= 1`` is off."""
  if top_p >= 1.0:
    return logits
  order = jnp.argsort(-logits, axis=-1)
  sorted_logits = jnp.take_along_axis(logits, order, axis=-1)
  probs = jax.nn.softmax(sorted_logits, axis=-1)
  before = jnp.cumsum(probs, axis=-1) - probs  # mass of strictly better tokens
  keep_sorted = before < top_p
  keep = jnp.zeros_like(keep_sorted).at[jnp.arange(logits.shape[0])[:, None], order].set(
      keep_sorted)
  return jnp.where(keep, logits, -jnp.inf)


def filter_top_k(logits, top_k: int):
  """Top-k filter (HF ``TopKLogitsWarper``): tokens scoring below the k-th largest logit get
  ``-inf`` (ties with it are kept). ``top_k <= 0`` or ``>= V`` is off. float [B, V] -> [B, V]."""
  if top_k <= 0 or top_k >= logits.shape[-1]:
    return logits
  kth = jax.lax.top_k(logits, top_k)[0][..., -1:]
  return jnp.where(logits < kth, -jnp.inf, logits)


def apply_repetition_penalty(logits, seen, penalty: float):
  """HF ``RepetitionPenaltyLogitsProcessor`` (CTRL, Keskar et al. 2019, section 4.1): the logit of
  every token already in the sequence is divided by ``penalty`` when positive and multiplied by
  it when negative. logits float [B, V]; seen bool [B, V]. ``penalty == 1`` is off."""
  if penalty == 1.0 or seen is None:
    return logits
  penalised = jnp.where(logits < 0, logits * penalty, logits / penalty)
  return jnp.where(seen, penalised, logits)


def sample_tokens(logits, rng, temperature: float, top_p: float, top_k: int = 0):
  """float [B, V] -> int32 [B]: argmax when ``temperature == 0``, else a draw from
  ``softmax(filter_top_p(filter_top_k(logits / temperature, top_k), top_p))`` (HF's warper order:
  temperature, top-k, top-p)."""
  logits = jnp.asarray(logits, jnp.float32)
  if temperature == 0.0:
    return jnp.argmax(logits, axis=-1).astype(jnp.int32)
  # shift by the max first: a tiny temperature then tends to greedy instead of overflowing
  scaled = (logits - jnp.max(logits, axis=-1, keepdims=True)) / temperature
  filtered = filter_top_p(filter_top_k(scaled, top_k), top_p)
  return jax.random.categorical(rng, filtered, axis=-1).astype(jnp.int32)


def eos_vocab_mask(eos, vocab_size: int):
  """bool [V]: True at the stop ids of ``eos`` (int32 [S], -1 entries ignored)."""
  return (jnp.arange(vocab_size, dtype=jnp.int32)[:, None] == eos[None, :]).any(-1)


def mask_eos(scores, eos, active):
  """The EOS columns of ``scores`` [..., V] set to ``-inf`` where ``active`` (a bool scalar) holds:
  HF ``MinNewTokensLengthLogitsProcessor`` while fewer than ``min_new_tokens`` tokens are
  generated (``MinLengthLogitsProcessor`` with ``min_length`` counting the prompt: pass
  ``min_new_tokens = min_length - input_ids.shape[-1]``, the decoder prompt for encoder-decoders)."""
  hit = eos_vocab_mask(eos, scores.shape[-1]) & active
  return jnp.where(hit, -jnp.inf, scores)


def top_k_stable(x, k: int):
  """``jax.lax.top_k(x, k)`` (values and indices along the last axis, equal values in index
  order) computed as ``k`` max / first-argmax passes instead of a sort.

  Same result as ``lax.top_k`` for non-NaN input. XLA's CPU backend sometimes lowers a
  ``top_k`` inside a ``while_loop`` to a full stable sort of the row (seen for the beams' [B,
  num_beams * V] candidates: ~0.2 s per call at V = 50272), which this form never does; for small
  ``k`` it costs a few passes over ``x``. float [..., N] -> (float [..., k], int32 [..., k]).
  """
  n = x.shape[-1]
  iota = jnp.arange(n, dtype=jnp.int32)
  taken = jnp.zeros(x.shape, bool)
  vals, idxs = [], []
  for _ in range(k):
    masked = jnp.where(taken, -jnp.inf, x)
    best = masked.max(-1, keepdims=True)
    idx = jnp.min(jnp.where((masked == best) & ~taken, iota, n), axis=-1)
    vals.append(best[..., 0])
    idxs.append(idx)
    taken = taken | (iota == idx[..., None])
  return jnp.stack(vals, -1), jnp.stack(idxs, -1)


def _is_eos(tokens, eos):
  return (tokens[..., None] == eos).any(-1)


def _check_width(width, name="width"):
  if not isinstance(width, int) or isinstance(width, bool) or width < 1:
    raise ValueError(f"{name} must be a static int >= 1 (the number of output slots), got "
                     f"{width!r}")


def sample_loop(step: Callable, params, first_logits, cache, *, start_index, width: int,
                max_new_tokens, eos, pad_token_id: int, temperature: float = 0.0,
                top_p: float = 1.0, top_k: int = 0, repetition_penalty: float = 1.0, seen=None,
                min_new_tokens=0, rng=None, done=None):
  """Greedy or sampled decoding, HF ``_sample`` semantics, as one ``lax.while_loop``.

  Token ``i`` (0-based) comes from the logits of the previous position: ``first_logits`` for
  ``i = 0``, else ``step(params, token_{i-1}, cache, start_index + i - 1)``. Logits processing
  in HF's order: repetition penalty (``seen``), the EOS mask while ``i < min_new_tokens``, then
  temperature / top-k / top-p (:func:`sample_tokens`; ``temperature == 0`` is greedy). Token ``i``
  is drawn with ``fold_in(rng, i)``. Row ``b`` stops after its first stop token (kept); later
  slots hold ``pad_token_id``; the loop ends when every row stopped or ``max_new_tokens`` tokens
  are out.

  Args:
    step: the family's one-token step (see the module docstring), batch ``B``.
    params: passed to ``step``.
    first_logits: float [B, V].
    cache: the family's cache after the prefill (``B`` rows).
    start_index: int32 [] cache slot of token 0.
    width: static int, output slots (>= ``max_new_tokens``).
    max_new_tokens: int32 [] (1..width).
    eos: int32 [S], stop ids padded with -1.
    pad_token_id: static int written after a row's stop token.
    temperature, top_p, top_k, repetition_penalty: static sampling settings (see
      :func:`sample_tokens`, :func:`apply_repetition_penalty`).
    seen: bool [B, V] tokens already in each sequence (repetition penalty), or None.
    min_new_tokens: int32 [] (0 = off).
    rng: a ``jax.random`` key (only read when ``temperature > 0``; None = PRNGKey(0)).
    done: bool [B] rows finished from the start (all ``pad_token_id``), or None.
  Returns:
    ``(tokens int32 [B, width], steps int32 [])``; ``steps`` counts ``step`` calls.
  Raises:
    ValueError: ``width`` not a positive static int, ``first_logits`` not 2-D.
  """
  _check_width(width)
  first_logits = jnp.asarray(first_logits, jnp.float32)
  if first_logits.ndim != 2:
    raise ValueError(f"first_logits must be float [B, V], got shape {first_logits.shape}")
  b = first_logits.shape[0]
  rows = jnp.arange(b)
  eos = jnp.asarray(eos, jnp.int32).reshape(-1)
  rng = jax.random.PRNGKey(0) if rng is None else rng
  done = jnp.zeros((b,), bool) if done is None else jnp.asarray(done, bool)
  max_new = jnp.asarray(max_new_tokens, jnp.int32)
  min_new = jnp.asarray(min_new_tokens, jnp.int32)
  start = jnp.asarray(start_index, jnp.int32)

  def pick(logits, seen, i):
    logits = apply_repetition_penalty(jnp.asarray(logits, jnp.float32), seen, repetition_penalty)
    logits = mask_eos(logits, eos, i < min_new)
    return sample_tokens(logits, jax.random.fold_in(rng, i), temperature, top_p, top_k)

  mark = lambda seen, tok: None if seen is None else seen.at[rows, tok].set(True)
  first = jnp.where(done, pad_token_id, pick(first_logits, seen, jnp.asarray(0, jnp.int32)))
  out = jnp.full((b, width), pad_token_id, jnp.int32).at[:, 0].set(first)
  done = done | _is_eos(first, eos)
  seen = mark(seen, first)

  def cond(carry):
    i, _, _, done, _, _ = carry
    return (i < max_new) & ~done.all()

  def body(carry):
    i, cache, out, done, tok, seen = carry
    logits, cache = step(params, tok, cache, start + i - 1)  # token i - 1 at its slot
    new = jnp.where(done, pad_token_id, pick(logits, seen, i))
    out = jax.lax.dynamic_update_slice(out, new[:, None], (0, i))
    return i + 1, cache, out, done | _is_eos(new, eos), new, mark(seen, new)

  init = (jnp.asarray(1, jnp.int32), cache, out, done, first, seen)
  steps, _, out, _, _, _ = jax.lax.while_loop(cond, body, init)
  return out, steps - 1


def _leaves_axes(cache, cache_batch_axes):
  leaves, tree = jax.tree_util.tree_flatten(cache)
  axes = tree.flatten_up_to(cache_batch_axes)
  return leaves, axes, tree


def cache_rows(cache, cache_batch_axes) -> int:
  """The batch size of ``cache`` (size of the first leaf along its batch axis)."""
  leaves, axes, _ = _leaves_axes(cache, cache_batch_axes)
  if not leaves:
    raise ValueError("the cache has no arrays; beam search needs the family's KV cache")
  return leaves[0].shape[axes[0]]


def repeat_cache(cache, cache_batch_axes, n: int):
  """Every batch row of ``cache`` repeated ``n`` times (``b0, b0, .., b1, b1, ..``), as HF
  ``_expand_inputs_for_generation`` expands the inputs for beams: leaf shapes ``[.., B, ..]`` ->
  ``[.., B * n, ..]`` along the axis that ``cache_batch_axes`` names."""
  leaves, axes, tree = _leaves_axes(cache, cache_batch_axes)
  return jax.tree_util.tree_unflatten(
      tree, [jnp.repeat(x, n, axis=a) for x, a in zip(leaves, axes)])


def gather_cache(cache, cache_batch_axes, index):
  """Rows ``index`` (int32 [N]) of every cache leaf along its batch axis (beam reordering, HF
  ``Cache.reorder_cache``)."""
  leaves, axes, tree = _leaves_axes(cache, cache_batch_axes)
  return jax.tree_util.tree_unflatten(
      tree, [jnp.take(x, index, axis=a) for x, a in zip(leaves, axes)])


def _early_stopping_mode(early_stopping) -> str:
  if early_stopping is True or early_stopping is False:
    return str(early_stopping)
  if early_stopping == "never":
    return "never"
  raise ValueError(f"early_stopping must be True, False or 'never' (HF GenerationConfig), got "
                   f"{early_stopping!r}")


def beam_search(step: Callable, params, first_logits, cache, cache_batch_axes: Any, *,
                start_index, width: int, num_beams: int, max_new_tokens, eos, pad_token_id: int,
                length_penalty: float = 1.0, early_stopping: bool | str = False,
                min_new_tokens=0, done=None):
  """Beam search with HF transformers 4.57.1 ``_beam_search`` semantics (``do_sample=False``,
  ``num_return_sequences=1``), as one ``lax.while_loop`` with fixed shapes.

  Per generated token ``i`` (0-based) and batch row: log-softmax of the logits of each running
  beam (float32), EOS masked to ``-inf`` while ``i < min_new_tokens``, plus the beam's running sum
  of log-probabilities (at ``i = 0`` beam 0 scores 0 and the others -1e9, so only one copy of
  the prompt expands). Over the ``num_beams * V`` candidates:

  * the candidates among the top ``num_beams`` ranks that end in a stop token, or every one of
    them once ``i + 1 == max_new_tokens``, are offered to the row's finished hypotheses with
    score ``sum_logprobs / (i + 1) ** length_penalty`` (``i + 1`` new tokens, the stop token
    included); the best ``num_beams`` hypotheses are kept;
  * the best ``num_beams`` candidates that do not end in a stop token become the running beams
    (their caches gathered from their parents, HF ``reorder_cache``).

  A row stops accepting hypotheses once it is "done": with ``early_stopping=True`` when it holds
  ``num_beams`` finished hypotheses; otherwise, once all ``num_beams`` slots are finished, when
  the best running score divided by ``L ** length_penalty`` is no better than the worst finished
  score, with ``L = i + 1`` (``False``; also ``True``, and ``"never"`` with ``length_penalty <=
  0``) or ``L = max_new_tokens`` (``"never"`` with ``length_penalty > 0``): HF's
  ``_check_early_stop_heuristic``. The loop ends when every row is done or ``max_new_tokens``
  tokens are out. The returned sequence of a row is its best finished hypothesis.

  Args:
    step: the family's one-token step (module docstring), batch ``B * num_beams``.
    params: passed to ``step``.
    first_logits: float [B, V], prefill logits of the last prompt position (one row per prompt).
    cache: the family's cache after the prefill, with ``B`` rows (repeated here with
      :func:`repeat_cache`) or ``B * num_beams`` rows (already repeated, ``b0, b0, .., b1, ..``).
    cache_batch_axes: per-leaf batch axes of ``cache`` (same pytree structure).
    start_index: int32 [] cache slot of token 0.
    width: static int, output slots (>= ``max_new_tokens``).
    num_beams: static int >= 1.
    max_new_tokens: int32 [] (1..width).
    eos: int32 [S], stop ids padded with -1.
    pad_token_id: static int written after a hypothesis' stop token. (HF pads with
      ``pad_token_id or eos_token_id[0]``, i.e. with the first stop id when ``pad_token_id`` is 0.)
    length_penalty: static float, exponent of the length normalisation (0 = raw sums; > 0
      favours longer, < 0 shorter hypotheses).
    early_stopping: ``True``, ``False`` or ``"never"`` (HF ``GenerationConfig.early_stopping``).
    min_new_tokens: int32 [] (0 = off).
    done: bool [B] rows finished from the start (all ``pad_token_id``, score 0), or None.
  Returns:
    ``(tokens int32 [B, width], scores float32 [B])``: the best finished hypothesis per row
    (``pad_token_id`` after it) and its length-penalised score (HF ``sequences_scores``).
  Raises:
    ValueError: bad ``num_beams``, ``width``, ``early_stopping``, shapes, or a cache whose batch
      size is neither ``B`` nor ``B * num_beams``.

  Differences from HF: none in the selected tokens as long as every row has at least
  ``num_beams`` candidates with finite scores that do not end in a stop token (HF keeps
  ``max(2, 1 + #eos) * num_beams`` candidates, which guarantees that), and no exact float ties.
  """
  _check_width(width)
  if not isinstance(num_beams, int) or isinstance(num_beams, bool) or num_beams < 1:
    raise ValueError(f"num_beams must be a static int >= 1, got {num_beams!r}")
  mode = _early_stopping_mode(early_stopping)
  length_penalty = float(length_penalty)
  first_logits = jnp.asarray(first_logits, jnp.float32)
  if first_logits.ndim != 2:
    raise ValueError(f"first_logits must be float [B, V] (one row per prompt), got shape "
                     f"{first_logits.shape}")
  b, v = first_logits.shape
  n = num_beams
  if n > v:
    raise ValueError(f"num_beams {n} is larger than the vocabulary {v}")
  rows = cache_rows(cache, cache_batch_axes)
  if rows == b:
    cache = repeat_cache(cache, cache_batch_axes, n)
  elif rows != b * n:
    raise ValueError(f"the cache has {rows} rows; beam search needs B = {b} (first_logits rows) "
                     f"or B * num_beams = {b * n}")
  eos = jnp.asarray(eos, jnp.int32).reshape(-1)
  done = jnp.zeros((b,), bool) if done is None else jnp.asarray(done, bool)
  max_new = jnp.asarray(max_new_tokens, jnp.int32)
  min_new = jnp.asarray(min_new_tokens, jnp.int32)
  start = jnp.asarray(start_index, jnp.int32)
  batch = jnp.arange(b)[:, None]
  lp = jnp.float32(length_penalty)

  def select(i, logits, state):
    """One HF beam step for token i: logits float [B, n, V] of the running beams."""
    run_tok, run_score, pool_tok, pool_score, pool_fin, open_ = state
    logp = jax.nn.log_softmax(logits, axis=-1)
    logp = mask_eos(logp, eos, i < min_new)
    scores = (logp + run_score[:, :, None]).reshape(b, n * v)
    last = i + 1 >= max_new
    # finished candidates: the top n ranks ending in a stop id (all of them at the last token)
    top_s, top_i = top_k_stable(scores, n)
    top_parent, top_id = top_i // v, (top_i % v).astype(jnp.int32)
    just = _is_eos(top_id, eos) | last
    gen_len = (i + 1).astype(jnp.float32)
    full = pool_fin.all(-1, keepdims=True) & (mode == "True")
    offer = just & open_[:, None] & ~full
    cand_score = jnp.where(offer, top_s / gen_len ** lp, NEG)
    cand_tok = run_tok[batch, top_parent].at[:, :, i].set(top_id)
    merged = jnp.concatenate([pool_score, cand_score], 1)
    keep = jax.lax.top_k(merged, n)[1]
    pool_score = jnp.take_along_axis(merged, keep, 1)
    pool_tok = jnp.take_along_axis(jnp.concatenate([pool_tok, cand_tok], 1), keep[:, :, None], 1)
    pool_fin = jnp.take_along_axis(jnp.concatenate([pool_fin, offer], 1), keep, 1)
    # running beams: the best n candidates not ending in a stop id
    live = jnp.tile(jnp.where(eos_vocab_mask(eos, v), NEG, 0.0), n)[None, :]
    run_s, run_i = top_k_stable(scores + live, n)
    parent, run_id = run_i // v, (run_i % v).astype(jnp.int32)
    run_tok = run_tok[batch, parent].at[:, :, i].set(run_id)
    # HF _check_early_stop_heuristic after the token (cur_len - prompt = i + 1)
    hyp_len = max_new.astype(jnp.float32) if (mode == "never" and length_penalty > 0) else gen_len
    best = run_s[:, :1] / hyp_len ** lp
    worst = jnp.where(pool_fin, pool_score.min(-1, keepdims=True), NEG)
    open_ = open_ & (best > worst).any(-1)
    state = (run_tok, run_s, pool_tok, pool_score, pool_fin, open_)
    flat_parent = (jnp.arange(b)[:, None] * n + parent).reshape(-1)
    return state, run_id.reshape(-1), flat_parent

  def alive(state):
    _, _, _, _, pool_fin, open_ = state
    full = pool_fin.all(-1) & (mode == "True")
    return (open_ & ~full & ~done).any()

  run_score = jnp.tile(jnp.asarray([0.0] + [NEG] * (n - 1), jnp.float32), (b, 1))
  state = (jnp.full((b, n, width), pad_token_id, jnp.int32), run_score,
           jnp.full((b, n, width), pad_token_id, jnp.int32), jnp.full((b, n), NEG, jnp.float32),
           jnp.zeros((b, n), bool), ~done)
  first = jnp.broadcast_to(first_logits[:, None, :], (b, n, v))
  state, tok, parent = select(jnp.asarray(0, jnp.int32), first, state)

  def cond(carry):
    i, state = carry[0], carry[1]
    return (i < max_new) & alive(state)

  def body(carry):
    i, state, cache, tok, parent = carry
    cache = gather_cache(cache, cache_batch_axes, parent)
    logits, cache = step(params, tok, cache, start + i - 1)
    state, tok, parent = select(i, jnp.asarray(logits, jnp.float32).reshape(b, n, v), state)
    return i + 1, state, cache, tok, parent

  init = (jnp.asarray(1, jnp.int32), state, cache, tok, parent)
  _, state, _, _, _ = jax.lax.while_loop(cond, body, init)
  pool_tok, pool_score = state[2], state[3]
  tokens = jnp.where(done[:, None], pad_token_id, pool_tok[:, 0])
  return tokens, jnp.where(done, 0.0, pool_score[:, 0])
