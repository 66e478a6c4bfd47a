"""BLIP-2 stage-1 image-text matching (ITM): hard-negative mining, batch layout and loss.

Source: BLIP-2 spec section 3.3 and section 9 item 10; LAVIS
``lavis/models/blip2_models/blip2_qformer.py`` (``Blip2Qformer.forward``, the ITM block, HEAD
version that masks the positives before the softmax). Everything works on the GLOBAL batch (the
LAVIS all-gathers are implicit under ``jax.jit`` with sharded global arrays); negative images are
taken with plain indexing, so gradients flow into the gathered image embeddings as with LAVIS
``all_gather_with_grad``.

Named axes: ``B`` global batch, ``Nv`` vision tokens, ``Dv`` vision width, ``T`` text length.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp


def _negative_logits(sim, positive):
  """Sampling logits: positives -> -inf; a row with no negative -> uniform over j != i."""
  b = sim.shape[0]
  not_self = ~jnp.eye(b, dtype=bool)
  logits = jnp.where(positive, -jnp.inf, sim.astype(jnp.float32))
  has_negative = jnp.any(~positive, axis=-1, keepdims=True)
  fallback = jnp.where(not_self, 0.0, -jnp.inf)
  return jnp.where(has_negative, logits, fallback)


def sample_hard_negatives(rng, sim_i2t, sim_t2i, image_ids=None):
  """Samples one hard negative image per text and one hard negative text per image.

  For text ``i`` the negative image ``j`` is drawn from ``softmax(sim_t2i[i])`` restricted to the
  non-positives; for image ``i`` the negative text ``j`` from ``softmax(sim_i2t[i])`` likewise.
  Positives are ``j == i``, or, when ``image_ids`` is given, every ``j`` with
  ``image_ids[j] == image_ids[i]`` (LAVIS HEAD: those logits are set to -10000 before the
  softmax; here they are -inf, i.e. probability exactly 0). Sampling uses
  ``jax.random.categorical`` on the masked logits; the similarities are wrapped in
  ``stop_gradient`` (LAVIS runs this under ``torch.no_grad``).

  Fallback: if a row has no valid negative (every sample in the batch shares that image id), the
  index is drawn uniformly from all ``j != i`` (LAVIS HEAD would sample from a uniform softmax over
  the whole row, including ``i``). If ``B == 1`` both outputs are ``[0]`` (the sample itself).

  Args:
    rng: PRNG key.
    sim_i2t: [B, B] float, temperature-scaled ITC logits (``aux["sim_i2t"]`` of ``itc_loss``).
    sim_t2i: [B, B] float, likewise (``aux["sim_t2i"]``).
    image_ids: optional [B] int image ids.
  Returns:
    ``(neg_image_index, neg_text_index)``, both [B] int32: ``neg_image_index[i]`` is the negative
    image for text ``i``, ``neg_text_index[i]`` the negative text for image ``i``.
  Raises:
    ValueError: if the similarity matrices are not square [B, B] of the same size or
      ``image_ids`` is not [B].
  Source: spec section 3.3; LAVIS ``blip2_qformer.py`` (``weights_t2i`` / ``weights_i2t``).
  """
  if sim_i2t.ndim != 2 or sim_i2t.shape[0] != sim_i2t.shape[1] or sim_t2i.shape != sim_i2t.shape:
    raise ValueError(f"sim_i2t and sim_t2i must both be square [B, B] over the global batch, got "
                     f"{sim_i2t.shape} and {sim_t2i.shape}")
  b = sim_i2t.shape[0]
  if image_ids is not None:
    image_ids = jnp.asarray(image_ids)
    if image_ids.shape != (b,):
      raise ValueError(f"image_ids must have shape [B] = ({b},), got {image_ids.shape}")
  if b == 1:
    zero = jnp.zeros((1,), jnp.int32)
    return zero, zero
  sim_i2t = jax.lax.stop_gradient(sim_i2t)
  sim_t2i = jax.lax.stop_gradient(sim_t2i)
  if image_ids is None:
    positive = jnp.eye(b, dtype=bool)
  else:
    positive = (image_ids[:, None] == image_ids[None, :]) | jnp.eye(b, dtype=bool)
  key_image, key_text = jax.random.split(rng)
  neg_image_index = jax.random.categorical(key_image, _negative_logits(sim_t2i, positive), axis=-1)
  neg_text_index = jax.random.categorical(key_text, _negative_logits(sim_i2t, positive), axis=-1)
  return neg_image_index.astype(jnp.int32), neg_text_index.astype(jnp.int32)


def build_itm_batch(image_embeds, input_ids, attention_mask, neg_image_index, neg_text_index):
  """Assembles the 3B-row ITM batch ``[positives; negative images; negative texts]``.

  Args:
    image_embeds: [B, Nv, Dv] float, vision tokens (after ``ln_vision``).
    input_ids: [B, T] int, text ids (with [CLS]).
    attention_mask: [B, T] int/bool text mask.
    neg_image_index: [B] int, hard negative image per text (from :func:`sample_hard_negatives`).
    neg_text_index: [B] int, hard negative text per image.
  Returns:
    ``(image_embeds [3B, Nv, Dv], input_ids [3B, T], attention_mask [3B, T], labels [3B] int32)``
    with images ``[E; E[neg_image_index]; E]``, texts ``[ids; ids; ids[neg_text_index]]`` (masks
    likewise) and labels ``[1] * B + [0] * 2B``. Gradients flow into the gathered negative images
    (plain indexing), as with LAVIS ``all_gather_with_grad``.
  Raises:
    ValueError: on inconsistent batch sizes or ranks.
  Source: spec section 3.3; LAVIS ``blip2_qformer.py`` (``text_ids_all``, ``image_embeds_all``).
  """
  if image_embeds.ndim != 3:
    raise ValueError(f"image_embeds must be [B, Nv, Dv], got shape {image_embeds.shape}")
  if input_ids.ndim != 2 or attention_mask.shape != input_ids.shape:
    raise ValueError(f"input_ids and attention_mask must both be [B, T], got {input_ids.shape} and "
                     f"{attention_mask.shape}")
  b = image_embeds.shape[0]
  if input_ids.shape[0] != b or neg_image_index.shape != (b,) or neg_text_index.shape != (b,):
    raise ValueError(f"batch sizes disagree: image_embeds {image_embeds.shape}, input_ids "
                     f"{input_ids.shape}, neg_image_index {neg_image_index.shape}, neg_text_index "
                     f"{neg_text_index.shape}; all must share the global batch size B")
  images = jnp.concatenate([image_embeds, image_embeds[neg_image_index], image_embeds], axis=0)
  ids = jnp.concatenate([input_ids, input_ids, input_ids[neg_text_index]], axis=0)
  mask = jnp.concatenate([attention_mask, attention_mask, attention_mask[neg_text_index]], axis=0)
  labels = jnp.concatenate([jnp.ones((b,), jnp.int32), jnp.zeros((2 * b,), jnp.int32)])
  return images, ids, mask, labels


def itm_loss(logits, labels):
  """Plain cross-entropy of the ITM head (no label smoothing).

  Args:
    logits: [N, 2] float, ITM logits (class 1 = match).
    labels: [N] int in {0, 1}.
  Returns:
    ``(loss, accuracy)``: scalar float32 mean cross-entropy and scalar float32
    ``mean(argmax(logits) == labels)``.
  Raises:
    ValueError: if the shapes are not [N, 2] and [N].
  Source: spec section 3.3 (``loss_itm = F.cross_entropy(vl_output, itm_labels)``).
  """
  if logits.ndim != 2 or logits.shape[-1] != 2 or labels.shape != logits.shape[:1]:
    raise ValueError(f"itm_loss expects logits [N, 2] and labels [N], got {logits.shape} and "
                     f"{labels.shape}")
  logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
  nll = -jnp.take_along_axis(logp, labels[:, None].astype(jnp.int32), axis=-1)[:, 0]
  accuracy = jnp.mean((jnp.argmax(logits, axis=-1) == labels).astype(jnp.float32))
  return jnp.mean(nll), accuracy
