"""Language-modelling losses: BLIP-2 ITG, a dense causal LM helper, and the chunked LM loss.

Sources:
  * BLIP-2 ITG: spec section 3.4 and section 9 item 11; LAVIS
    ``lavis/models/blip2_models/blip2_qformer.py`` (``loss_lm``) and ``Qformer.py``
    (``BertLMHeadModel.forward``: shifted ``CrossEntropyLoss(reduction="mean", label_smoothing=0.1)``).
  * Chunked next-token loss (:func:`chunked_next_token_loss`): the same cross-entropy as HF
    ``transformers/loss/loss_utils.py`` ``ForCausalLMLoss`` (float32 logits, ``ignore_index``
    positions excluded), evaluated over sequence chunks from the final hidden states so that the
    ``[B, L, V]`` float32 logits never exist; z-loss from PaLM (Chowdhery et al. 2022, section 5:
    ``z_loss * log(Z)^2`` with ``z_loss = 1e-4``).

Named axes: ``B`` batch, ``T``/``L`` text length, ``C`` chunk length, ``D`` model width, ``V``
vocabulary.
"""
from __future__ import annotations

from typing import Callable, Union

import jax
import jax.numpy as jnp
import numpy as np


def cross_entropy_with_label_smoothing(logits, labels, mask, label_smoothing: float = 0.0):
  """Token cross-entropy with label smoothing, mean over the unmasked positions.

  PyTorch ``CrossEntropyLoss(label_smoothing=eps, ignore_index=..., reduction="mean")`` semantics:
  per position ``(1 - eps) * (-log p[label]) + eps * mean_c(-log p[c])``, averaged over positions
  where ``mask`` is True. Computed in float32 whatever the logits dtype. If no position is unmasked
  the result is 0 (PyTorch would give NaN).

  Args:
    logits: [..., V] float.
    labels: [...] int; values at masked positions are ignored (may be -100).
    mask: [...] bool (or 0/1), True where the position counts.
    label_smoothing: eps in [0, 1].
  Returns:
    Scalar float32.
  Raises:
    ValueError: on mismatched shapes or eps outside [0, 1].
  """
  if labels.shape != logits.shape[:-1] or jnp.shape(mask) != labels.shape:
    raise ValueError(f"expected logits [..., V] with labels and mask [...]; got logits "
                     f"{logits.shape}, labels {labels.shape}, mask {jnp.shape(mask)}")
  if not 0.0 <= label_smoothing <= 1.0:
    raise ValueError(f"label_smoothing must be in [0, 1], got {label_smoothing}")
  mask = jnp.asarray(mask).astype(bool)
  logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
  safe_labels = jnp.where(mask, labels, 0).astype(jnp.int32)
  nll = -jnp.take_along_axis(logp, safe_labels[..., None], axis=-1)[..., 0]
  per_token = nll
  if label_smoothing > 0.0:
    per_token = (1.0 - label_smoothing) * nll + label_smoothing * (-jnp.mean(logp, axis=-1))
  weights = mask.astype(jnp.float32)
  return jnp.sum(per_token * weights) / jnp.maximum(jnp.sum(weights), 1.0)


def itg_inputs(input_ids, dec_token_id: int):
  """Decoder ids for ITG: position 0 ([CLS]) replaced by the [DEC] token.

  Args:
    input_ids: [B, T] int tokenized captions starting with [CLS].
    dec_token_id: the [DEC] id (30522 for the BLIP-2 BERT tokenizer, ``Blip2Config.dec_token_id``).
  Returns:
    [B, T] int, same dtype as ``input_ids``.
  Raises:
    ValueError: if ``input_ids`` is not [B, T].
  Source: spec section 3.4 (``decoder_input_ids[:, 0] = bos_token_id``).
  """
  if input_ids.ndim != 2:
    raise ValueError(f"input_ids must be [B, T], got shape {input_ids.shape}")
  return input_ids.at[:, 0].set(jnp.asarray(dec_token_id, input_ids.dtype))


def itg_loss(logits, input_ids, attention_mask, label_smoothing: float = 0.1):
  """BLIP-2 ITG loss: shifted, label-smoothed cross-entropy over the non-pad text tokens.

  ``logits[:, t]`` predicts ``input_ids[:, t + 1]``; targets whose ``attention_mask`` is 0 (pads)
  are ignored (LAVIS sets them to -100 from ``input_ids == pad``). The final [SEP] is a target.

  Args:
    logits: [B, T, V] float, LM-head logits over the text positions only.
    input_ids: [B, T] int, the decoder ids (first token already [DEC], see :func:`itg_inputs`).
    attention_mask: [B, T] 0/1 or bool text mask.
    label_smoothing: eps (LAVIS: 0.1).
  Returns:
    Scalar float32, mean over the non-ignored targets.
  Raises:
    ValueError: on mismatched shapes.
  Source: spec section 3.4; LAVIS ``Qformer.py`` ``BertLMHeadModel.forward``.
  """
  if (logits.ndim != 3 or input_ids.shape != logits.shape[:2]
      or attention_mask.shape != input_ids.shape):
    raise ValueError(f"itg_loss expects logits [B, T, V], input_ids and attention_mask [B, T]; got "
                     f"{logits.shape}, {input_ids.shape}, {attention_mask.shape}")
  return cross_entropy_with_label_smoothing(
      logits[:, :-1], input_ids[:, 1:], attention_mask[:, 1:] != 0, label_smoothing)


def next_token_loss(logits, targets, loss_mask):
  """Causal LM cross-entropy (no smoothing) on already aligned targets.

  The caller does the shift: ``targets[b, t]`` is the token that ``logits[b, t]`` must predict
  (for a sequence ``x``: ``logits = f(x)[:, :-1]``, ``targets = x[:, 1:]``).

  Args:
    logits: [B, T, V] float.
    targets: [B, T] int; ignored where ``loss_mask`` is False.
    loss_mask: [B, T] bool or 0/1, True for positions that count (e.g. answer tokens, not prompt,
      image placeholders or pads).
  Returns:
    Scalar float32, mean over the positions where ``loss_mask`` is set (0 if there are none).
  Raises:
    ValueError: on mismatched shapes.
  Source: spec section 4 (stage-2 LM loss, ``CrossEntropyLoss`` with ignore_index -100).
  """
  return cross_entropy_with_label_smoothing(logits, targets, jnp.asarray(loss_mask) != 0, 0.0)


# --------------------------------------------------------------------------------------------
# Chunked next-token loss from hidden states (Qwen3-VL training; scope item 5 of issue 8).
# --------------------------------------------------------------------------------------------

LogitsFn = Callable[[jax.Array], jax.Array]


def _as_logits_fn(head: Union[LogitsFn, jax.Array]) -> LogitsFn:
  """A callable ``[B, C, D] -> float32 [B, C, V]`` from a callable or an LM-head kernel ``[D, V]``."""
  if callable(head):
    return head
  kernel = jnp.asarray(head)
  if kernel.ndim != 2:
    raise ValueError(f"the LM head must be a callable [B, C, D] -> [B, C, V] or a kernel [D, V]; "
                     f"got an array of shape {kernel.shape}")
  return lambda h: jnp.einsum("bcd,dv->bcv", h, kernel, preferred_element_type=jnp.float32)


def _chunk_sums(logits_fn: LogitsFn, z_loss: float, h, y, w):
  """Per-chunk sums of one chunk: (loss, nll, z term, correct-argmax weight).

  Args:
    h: [B, C, D] hidden states; y: [B, C] int targets; w: [B, C] float32 loss weights.
  Returns:
    Four float32 scalars. The ``[B, C, V]`` float32 logits live only inside this function.
  """
  logits = logits_fn(h).astype(jnp.float32)
  if logits.shape[:2] != h.shape[:2]:
    raise ValueError(f"logits_fn must map [B, C, D] -> [B, C, V]; got {h.shape} -> {logits.shape}")
  lse = jax.nn.logsumexp(logits, axis=-1)                                   # [B, C]
  # Pick the target logit by comparison with an iota rather than a gather: the same arithmetic,
  # and it partitions cleanly when the vocabulary axis of the logits is sharded.
  hit = jax.lax.broadcasted_iota(jnp.int32, logits.shape, 2) == y[..., None].astype(jnp.int32)
  target_logit = jnp.sum(jnp.where(hit, logits, 0.0), axis=-1)              # [B, C]
  nll = lse - target_logit
  z = jnp.float32(z_loss) * jnp.square(lse)
  # Greedy accuracy: the first maximum is the argmax (``jnp.argmax`` tie rule).
  correct = (jnp.argmax(logits, axis=-1) == y).astype(jnp.float32)
  return (jnp.sum((nll + z) * w), jnp.sum(nll * w), jnp.sum(z * w), jnp.sum(correct * w))


def chunked_next_token_loss(hidden, head, labels, loss_mask, *, chunk_size: int = 512,
                            z_loss: float = 0.0):
  """Next-token cross-entropy summed over loss tokens, computed chunk by chunk over the sequence.

  The sequence axis is cut into ``L // chunk_size`` chunks (plus one shorter tail chunk when
  ``chunk_size`` does not divide ``L``). Each chunk projects its hidden states to float32 logits
  ``[B, C, V]``, reduces them to per-token losses and discards them; the chunks run under
  ``lax.scan`` with ``jax.checkpoint`` on the body, so the backward pass recomputes each chunk's
  logits instead of storing them. Neither the forward nor the backward pass ever holds ``[B, L, V]``
  float32 logits, only one chunk's ``[B, C, V]`` (plus its softmax in the backward pass).

  Memory, measured from ``compiled.memory_analysis().temp_size_in_bytes`` of
  ``jit(value_and_grad)`` w.r.t. hidden and kernel (XLA CPU, jax 0.10.2, float32, B=1, D=64,
  V=32,000; ``tests/objectives/test_lm_loss.py::test_compiled_memory_is_chunk_sized``): with
  C=512 the temporaries are 264 MB at L=8192 and the same at L=16384 (about four chunk-sized
  ``[B, C, V]`` float32 buffers of 65.5 MB: logits, softmax, their cotangents), against
  ``B*L*V*4`` = 1,049 MB for the logits alone and 3,146 MB of temporaries for the dense
  computation at L=8192. Memory grows with ``B*C*V``, not ``B*L*V``.

  Per loss token ``t`` (``loss_mask[b, t] > 0``)::

      loss_t = logsumexp(z_t) - z_t[labels_t] + z_loss * logsumexp(z_t)^2,   z_t = head(hidden_t)

  and the returned sum is ``sum_t loss_mask_t * loss_t``.

  Normalisation is the caller's: divide the sum by the number of loss tokens of the *global* batch
  (under ``jit`` over a sharded batch the sums below are already global; with gradient
  accumulation add the sums and counts of the microbatches, then divide once). This equals HF's
  ``ForCausalLMLoss`` mean for one batch. :func:`next_token_loss_mean` does the division.

  Args:
    hidden: [B, L, D] float (any float dtype), final hidden states (after the final norm).
    head: either a callable ``chunk [B, C, D] -> [B, C, V]`` (cast to float32; e.g. the model's
      LM-head apply, closing over its parameters, gradients flow to them) or an LM-head kernel
      ``[D, V]`` (``einsum`` with float32 accumulation; pass ``embedding.T`` for tied weights).
    labels: [B, L] int, already shifted on the host: ``labels[b, t]`` is the target of position
      ``t`` (batch schema, ``/work/notes/common.md``). Values where ``loss_mask`` is 0 are ignored
      (any value, -100 included). Where ``loss_mask`` > 0 they must lie in ``[0, V)``: when the
      arrays are concrete this is checked, under ``jit`` an out-of-range label silently scores
      ``logsumexp`` (target logit 0).
    loss_mask: [B, L] float32 (or bool/0-1) weights; 1.0 where ``labels`` is trained on.
    chunk_size: C, tokens per chunk (> 0); values >= L give one chunk of L.
    z_loss: PaLM z-loss coefficient (0 disables; PaLM uses 1e-4).
  Returns:
    ``(loss_sum, num_tokens, metrics)``: float32 scalars ``loss_sum`` (cross-entropy plus z-loss,
    summed over loss tokens) and ``num_tokens`` (``sum(loss_mask)``), and a dict of float32 scalar
    sums ``{"nll_sum", "z_loss_sum", "correct_sum"}`` (``correct_sum``: loss tokens whose argmax
    logit is the label, for accuracy = correct_sum / num_tokens).
  Raises:
    ValueError: on shapes that do not match ``hidden [B, L, D]``, ``labels``/``loss_mask [B, L]``,
      a non-positive ``chunk_size``, a negative ``z_loss``, a head that is neither callable nor a
      ``[D, V]`` kernel, or (concrete arrays only) labels outside ``[0, V)`` at loss positions.
  """
  hidden = jnp.asarray(hidden)
  if hidden.ndim != 3:
    raise ValueError(f"hidden must be [B, L, D], got shape {hidden.shape}")
  B, L, _ = hidden.shape
  if jnp.shape(labels) != (B, L) or jnp.shape(loss_mask) != (B, L):
    raise ValueError(f"labels and loss_mask must be [B, L] = {(B, L)} like hidden {hidden.shape}; "
                     f"got labels {jnp.shape(labels)}, loss_mask {jnp.shape(loss_mask)}")
  if int(chunk_size) <= 0:
    raise ValueError(f"chunk_size must be a positive number of tokens, got {chunk_size}")
  if z_loss < 0:
    raise ValueError(f"z_loss must be >= 0, got {z_loss}")
  if not callable(head):
    kernel_shape = jnp.shape(head)
    if len(kernel_shape) != 2 or kernel_shape[0] != hidden.shape[-1]:
      raise ValueError(f"the LM-head kernel must be [D, V] with D = {hidden.shape[-1]}; "
                       f"got {kernel_shape}")
    _check_label_range(labels, loss_mask, kernel_shape[1])
  logits_fn = _as_logits_fn(head)
  labels = jnp.asarray(labels).astype(jnp.int32)
  weights = jnp.asarray(loss_mask).astype(jnp.float32)
  labels = jnp.where(weights != 0, labels, 0)

  chunk = min(int(chunk_size), L)
  n_full, tail = divmod(L, chunk)
  body = jax.checkpoint(lambda h, y, w: _chunk_sums(logits_fn, z_loss, h, y, w), prevent_cse=False)

  def split(x):  # [B, n*C, ...] -> [n, B, C, ...]
    x = x[:, :n_full * chunk]
    x = x.reshape((B, n_full, chunk) + x.shape[2:])
    return jnp.moveaxis(x, 1, 0)

  def step(carry, xs):
    return tuple(c + s for c, s in zip(carry, body(*xs))), None

  zero = jnp.zeros((), jnp.float32)
  totals, _ = jax.lax.scan(step, (zero,) * 4, (split(hidden), split(labels), split(weights)))
  if tail:
    s = slice(n_full * chunk, L)
    totals = tuple(a + b for a, b in zip(totals, body(hidden[:, s], labels[:, s], weights[:, s])))
  loss_sum, nll_sum, z_sum, correct = totals
  metrics = {"nll_sum": nll_sum, "z_loss_sum": z_sum, "correct_sum": correct}
  return loss_sum, jnp.sum(weights), metrics


def _check_label_range(labels, loss_mask, vocab_size: int):
  """Eager check (skipped for tracers) that labels at loss positions lie in [0, vocab_size)."""
  if isinstance(labels, jax.core.Tracer) or isinstance(loss_mask, jax.core.Tracer):
    return  # under jit/grad tracing: values unknown, nothing to check
  y = np.asarray(labels)
  m = np.asarray(loss_mask) != 0
  bad = m & ((y < 0) | (y >= vocab_size))
  if bad.any():
    b, t = map(int, np.argwhere(bad)[0])
    raise ValueError(f"labels[{b}, {t}] = {int(y[b, t])} is a loss position (loss_mask != 0) but "
                     f"outside the vocabulary [0, {vocab_size}); {int(bad.sum())} such positions. "
                     "Set loss_mask to 0 where there is no target (e.g. the last token of each "
                     "segment, padding).")


def next_token_loss_mean(hidden, head, labels, loss_mask, *, chunk_size: int = 512,
                         z_loss: float = 0.0):
  """Mean next-token loss over the loss tokens of this batch (:func:`chunked_next_token_loss` / count).

  Equals HF ``ForCausalLMLoss`` (``reduction="mean"`` over non-ignored targets) for the same
  logits, targets and mask, plus the z-loss term when ``z_loss`` > 0. Use it when this batch *is*
  the global batch; with gradient accumulation sum :func:`chunked_next_token_loss` over the
  microbatches and divide once instead.

  Args / Raises: as :func:`chunked_next_token_loss`.
  Returns:
    ``(mean, metrics)``: float32 scalar ``loss_sum / max(num_tokens, 1)`` (0 when no token is a
    loss token) and the metrics dict of :func:`chunked_next_token_loss` with ``num_tokens`` and
    ``accuracy`` added.
  """
  total, count, metrics = chunked_next_token_loss(hidden, head, labels, loss_mask,
                                                  chunk_size=chunk_size, z_loss=z_loss)
  denom = jnp.maximum(count, 1.0)
  metrics = dict(metrics, num_tokens=count, accuracy=metrics["correct_sum"] / denom)
  return total / denom, metrics
