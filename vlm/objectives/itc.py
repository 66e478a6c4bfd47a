"""BLIP-2 stage-1 image-text contrastive (ITC) loss.

Source: BLIP-2 spec section 3.2 and LAVIS ``lavis/models/blip2_models/blip2_qformer.py``
(``Blip2Qformer.forward``, the ITC block). The functions work on the GLOBAL batch: under
``jax.jit`` with sharded global arrays the LAVIS ``concat_all_gather`` is implicit, the gathered
side is simply the full array. LAVIS detaches its gathered copies (including the local slice),
which ``stop_gradient_keys=True`` reproduces.

Named axes: ``B`` global batch, ``Q`` query tokens, ``E`` shared embedding size.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp


def _check_feats(image_feats, text_feat):
  if image_feats.ndim != 3:
    raise ValueError(f"image_feats must be [B, Q, E], got shape {image_feats.shape}")
  if text_feat.ndim != 2:
    raise ValueError(f"text_feat must be [B, E] (the projected [CLS] feature), got shape "
                     f"{text_feat.shape}")
  if image_feats.shape[0] != text_feat.shape[0] or image_feats.shape[2] != text_feat.shape[1]:
    raise ValueError(f"image_feats {image_feats.shape} and text_feat {text_feat.shape} disagree on "
                     "the batch size B or the embedding size E; both must come from the same batch "
                     "and the same projection width")


def _sim_i2t(image_feats, text_keys, temp):
  """sim_i2t[i, j] = max_q <image_feats[i, q], text_keys[j]> / temp, float32."""
  s = jnp.einsum("iqe,je->ijq", image_feats.astype(jnp.float32), text_keys.astype(jnp.float32))
  return jnp.max(s, axis=-1) / jnp.asarray(temp, jnp.float32)


def _sim_t2i(text_feat, image_keys, temp):
  """sim_t2i[i, j] = max_q <text_feat[i], image_keys[j, q]> / temp, float32."""
  s = jnp.einsum("ie,jqe->ijq", text_feat.astype(jnp.float32), image_keys.astype(jnp.float32))
  return jnp.max(s, axis=-1) / jnp.asarray(temp, jnp.float32)


def itc_similarities(image_feats, text_feat, temp):
  """Temperature-scaled image-text similarities, max over the query tokens.

  Args:
    image_feats: [B, Q, E] float, l2-normalised query features (``vision_proj`` output).
    text_feat: [B, E] float, l2-normalised text [CLS] features (``text_proj`` output).
    temp: scalar float temperature (the trainable ``temp`` parameter; no clamp, spec section 9.9).
  Returns:
    ``(sim_i2t, sim_t2i)``, both [B, B] float32:
    ``sim_i2t[i, j] = max_q <image_feats[i, q], text_feat[j]> / temp`` and
    ``sim_t2i[i, j] = max_q <text_feat[i], image_feats[j, q]> / temp``, so ``sim_t2i = sim_i2t.T``.
    The max is a hard max (gradient reaches the arg-max query only).
  Raises:
    ValueError: if the shapes are not [B, Q, E] and [B, E] with matching B and E.
  Source: spec section 3.2; LAVIS ``blip2_qformer.py`` (``sim_q2t`` / ``sim_t2q``).
  """
  _check_feats(image_feats, text_feat)
  return _sim_i2t(image_feats, text_feat, temp), _sim_t2i(text_feat, image_feats, temp)


def _soft_cross_entropy(logits, targets):
  """mean_i( -sum_j targets[i, j] * log_softmax(logits)[i, j] ), float32."""
  logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
  return jnp.mean(-jnp.sum(targets * logp, axis=-1))


def itc_targets(batch_size: int, *, label_smoothing: float = 0.1, image_ids=None):
  """Soft ITC targets [B, B] float32 (rows sum to 1).

  Without ``image_ids``: ``(1 - eps) * eye(B) + eps / B`` (PyTorch ``cross_entropy`` with
  ``label_smoothing=eps`` and diagonal targets). With ``image_ids`` [B] int (LAVIS image-id
  branch): ``pos[i, j] = (id_i == id_j)`` and ``t = (1 - eps) * pos / rowsum(pos) + eps / B``.
  LAVIS hard-codes the 0.9 / 0.1 split in that branch, which is ``eps = 0.1`` (the default); with a
  single positive per row both branches coincide.

  Raises:
    ValueError: if ``image_ids`` is not [B] or ``label_smoothing`` is outside [0, 1].
  """
  if not 0.0 <= label_smoothing <= 1.0:
    raise ValueError(f"label_smoothing must be in [0, 1], got {label_smoothing}")
  if image_ids is None:
    pos = jnp.eye(batch_size, dtype=jnp.float32)
  else:
    image_ids = jnp.asarray(image_ids)
    if image_ids.shape != (batch_size,):
      raise ValueError(f"image_ids must have shape [B] = ({batch_size},), got {image_ids.shape}")
    pos = (image_ids[:, None] == image_ids[None, :]).astype(jnp.float32)
  pos = pos / jnp.sum(pos, axis=-1, keepdims=True)
  return (1.0 - label_smoothing) * pos + label_smoothing / batch_size


def itc_loss(image_feats, text_feat, temp, *, label_smoothing: float = 0.1, image_ids=None,
             stop_gradient_keys: bool = True):
  """BLIP-2 image-text contrastive loss on the global batch.

  Args:
    image_feats: [B, Q, E] float, l2-normalised query features.
    text_feat: [B, E] float, l2-normalised text [CLS] features.
    temp: scalar float temperature (trainable; logits are ``sim / temp``).
    label_smoothing: eps of the smoothed targets (LAVIS: 0.1). In the image-id branch it is the
      weight of the uniform part (LAVIS hard-codes 0.1 there); see :func:`itc_targets`.
    image_ids: optional [B] int. When given, every pair with the same image id is a positive (LAVIS
      image-id branch, spec section 3.2 and section 9 item 27); otherwise the diagonal is.
    stop_gradient_keys: LAVIS distributed semantics (gathered copies are detached): the i2t
      direction uses ``stop_gradient(text_feat)`` as keys and the t2i direction uses
      ``stop_gradient(image_feats)``, so ``loss_i2t`` back-propagates only into image features,
      ``loss_t2i`` only into text features, both into ``temp``. ``False``: gradients flow both ways
      (LAVIS without an initialised process group).
  Returns:
    ``(loss, aux)``: ``loss`` scalar float32 ``= (CE_i2t + CE_t2i) / 2`` (batch means);
    ``aux`` dict with ``sim_i2t`` [B, B], ``sim_t2i`` [B, B] (float32, temperature scaled; the
    inputs of the ITM hard-negative sampler), ``loss_i2t`` and ``loss_t2i`` scalars.
  Raises:
    ValueError: on mismatched shapes, bad ``image_ids`` shape, or eps outside [0, 1].
  Source: spec section 3.2; LAVIS ``blip2_qformer.py`` (``loss_itc``).
  """
  _check_feats(image_feats, text_feat)
  if stop_gradient_keys:
    text_keys = jax.lax.stop_gradient(text_feat)
    image_keys = jax.lax.stop_gradient(image_feats)
  else:
    text_keys, image_keys = text_feat, image_feats
  sim_i2t = _sim_i2t(image_feats, text_keys, temp)
  sim_t2i = _sim_t2i(text_feat, image_keys, temp)
  targets = itc_targets(text_feat.shape[0], label_smoothing=label_smoothing, image_ids=image_ids)
  loss_i2t = _soft_cross_entropy(sim_i2t, targets)
  # pos is symmetric on the global batch, so the t2i targets equal the i2t targets.
  loss_t2i = _soft_cross_entropy(sim_t2i, targets)
  loss = (loss_i2t + loss_t2i) / 2.0
  aux = {"sim_i2t": sim_i2t, "sim_t2i": sim_t2i, "loss_i2t": loss_i2t, "loss_t2i": loss_t2i}
  return loss, aux
