"""BLIP-2 stage-1 objective: ITC + ITM + ITG on one batch (LAVIS ``Blip2Qformer.forward``).

BLIP-2 spec section 3. The batch is the *global* batch (``jax.jit`` over sharded arrays), so the
all-gathers of LAVIS are implicit; ITC's gathered keys are detached through
``stop_gradient_keys`` exactly as LAVIS' ``concat_all_gather`` detaches them, and the hard-negative
image embeddings keep their gradient as LAVIS' ``all_gather_with_grad`` does.
"""
from __future__ import annotations

from typing import Any, Mapping

import jax
import jax.numpy as jnp

from vlm.objectives import itc, itm, lm


def blip2_stage1_loss(model, params, batch: Mapping[str, jax.Array], rng: jax.Array, *,
                      deterministic: bool = False, label_smoothing: float = 0.1,
                      itc_use_image_ids: bool = False, itm_exclude_same_image: bool = True
                      ) -> tuple[jax.Array, dict[str, Any]]:
  """Sum of the three stage-1 losses and their parts.

  Args:
    model: a :class:`vlm.models.blip2.Blip2Stage1`.
    params: its parameters (unboxed).
    batch: ``pixel_values`` float [B,S,S,3], ``input_ids`` int [B,T] ([CLS] ... [SEP] pads),
      ``attention_mask`` int [B,T], ``image_id`` int [B].
    rng: PRNG key; split into dropout keys per pass and the hard-negative sampling key.
    deterministic: disables dropout (the ViT never has dropout; it is frozen and in eval mode).
    label_smoothing: for ITC and ITG (0.1 in LAVIS).
    itc_use_image_ids: use LAVIS' image-id ITC branch (same-image pairs are positives) instead
      of the paper's diagonal targets.
    itm_exclude_same_image: never sample a negative that shows the positive's image (by id).
  Returns:
    (loss, metrics) with metrics ``loss``, ``loss_itc``, ``loss_itm``, ``loss_itg``, ``itm_acc``,
    ``temp``.
  """
  keys = jax.random.split(rng, 4)
  variables = {"params": params}

  def apply(method, *args, key):
    return model.apply(variables, *args, deterministic=deterministic, method=method,
                       rngs={"dropout": key})

  image_ids = batch.get("image_id")
  image_embeds = model.apply(variables, batch["pixel_values"], deterministic=True,
                             method=model.encode_image)
  # One pass over [queries; [DEC] text] with the UniLM mask serves ITC's image side and ITG.
  dec_ids = lm.itg_inputs(batch["input_ids"], model.config.dec_token_id)
  image_feats, lm_logits = apply(model.image_features_and_itg_logits, image_embeds, dec_ids,
                                 batch["attention_mask"], key=keys[0])
  _, text_feat = apply(model.text_features, batch["input_ids"], batch["attention_mask"],
                       key=keys[1])
  temp = model.apply(variables, method=model.temperature)

  loss_itc, sims = itc.itc_loss(image_feats, text_feat, temp, label_smoothing=label_smoothing,
                                image_ids=image_ids if itc_use_image_ids else None)

  neg_image, neg_text = itm.sample_hard_negatives(
      keys[2], sims["sim_i2t"], sims["sim_t2i"],
      image_ids=image_ids if itm_exclude_same_image else None)
  embeds3, ids3, mask3, labels3 = itm.build_itm_batch(
      image_embeds, batch["input_ids"], batch["attention_mask"], neg_image, neg_text)
  itm_logits = apply(model.itm_logits, embeds3, ids3, mask3, key=keys[3])
  loss_itm, itm_acc = itm.itm_loss(itm_logits, labels3)

  loss_itg = lm.itg_loss(lm_logits, dec_ids, batch["attention_mask"],
                         label_smoothing=label_smoothing)

  loss = loss_itc + loss_itm + loss_itg
  metrics = dict(loss=loss, loss_itc=loss_itc, loss_itm=loss_itm, loss_itg=loss_itg,
                 itm_acc=itm_acc, temp=jnp.asarray(temp, jnp.float32))
  return loss, metrics
