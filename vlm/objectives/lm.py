"""Language-modelling losses: BLIP-2 ITG (image-grounded text generation) and a causal LM helper.

Source: BLIP-2 spec section 3.4 and section 9 item 11; LAVIS
``lavis/models/blip2_models/blip2_qformer.py`` (``loss_lm``) and ``Qformer.py``
(``BertLMHeadModel.forward``: shifted ``CrossEntropyLoss(reduction="mean", label_smoothing=0.1)``).

Named axes: ``B`` batch, ``T`` text length, ``V`` vocabulary.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp


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
