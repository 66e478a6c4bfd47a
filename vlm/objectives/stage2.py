"""BLIP-2 stage-2 loss: next-token cross-entropy of the frozen LLM behind the visual prompt.

LAVIS ``Blip2OPT.forward`` / ``Blip2T5.forward`` (spec section 4.2-4.3); HF
``Blip2ForConditionalGeneration.forward(labels=...)`` computes the same mean (cross-entropy over
the non-ignored targets, no label smoothing). Only the Q-Former, the query tokens, ``ln_vision``
and the projection are trained; the frozen parameters get no gradient because the train step
differentiates the trainable subset only (:mod:`vlm.train.step`).
"""
from __future__ import annotations

from typing import Any

import jax.numpy as jnp

from vlm.objectives.lm import next_token_loss_mean


def stage2_targets(model, hidden, batch: dict[str, Any]):
  """Aligns the LLM's hidden states with their targets.

  OPT: the hidden state at position ``Q - 1 + t`` (queries first) predicts ``input_ids[:, t]``,
  so ``hidden[:, Q-1 : Q-1+T]`` pairs with ``input_ids`` [B,T] (the last query predicts the BOS,
  as LAVIS' un-masked BOS label); T5: decoder position ``t`` predicts ``labels[:, t]``.

  Args:
    model: a :class:`vlm.models.blip2.Blip2Stage2`; hidden: [B,Q+T,Dl] (OPT) or [B,Td,D] (T5).
    batch: the stage-2 batch (``input_ids``/``labels``, ``loss_mask``).
  Returns:
    ``(hidden [B,T,Dl], labels int [B,T], loss_mask [B,T])``.
  """
  if model.config.llm_kind == "opt":
    q, t = model.config.num_query_tokens, batch["input_ids"].shape[1]
    return hidden[:, q - 1:q - 1 + t], batch["input_ids"], batch["loss_mask"]
  return hidden, batch["labels"], batch["loss_mask"]


def blip2_stage2_loss(model, params, batch, rng, *, llm_dropout: bool = True,
                      chunk_size: int = 512, z_loss: float = 0.0):
  """Stage-2 loss of one (micro)batch.

  Args:
    model: :class:`vlm.models.blip2.Blip2Stage2`; params: its parameters.
    batch: ``pixel_values`` [B,S,S,3], ``input_ids``/``attention_mask``/``loss_mask`` [B,T]; for
      FlanT5 also ``decoder_input_ids``/``decoder_attention_mask``/``labels`` [B,Td].
    rng: dropout key (the Q-Former's dropout is on in training, as LAVIS).
    llm_dropout: keep the frozen LLM's own dropout active (LAVIS never puts the LLM in eval mode,
      spec 4.1); False runs it deterministically.
    chunk_size, z_loss: see :func:`vlm.objectives.lm.chunked_next_token_loss` (the [B,T,V]
      logits are never held at once).
  Returns:
    ``(loss, metrics)``: float32 mean cross-entropy over the loss tokens; metrics ``loss``,
    ``accuracy`` (argmax = target), ``num_tokens`` and ``loss_weight`` (= ``num_tokens``, so
    gradient accumulation gives the big-batch token-weighted mean).
  """
  variables = {"params": params}
  hidden = model.apply(variables, batch["pixel_values"], batch["input_ids"],
                       batch["attention_mask"], batch.get("decoder_input_ids"),
                       batch.get("decoder_attention_mask"), deterministic=False,
                       llm_deterministic=not llm_dropout, return_hidden=True,
                       rngs={"dropout": rng})
  h, labels, mask = stage2_targets(model, hidden, batch)
  head = lambda x: model.apply(variables, x, method=model.lm_logits)
  loss, m = next_token_loss_mean(h, head, labels, mask, chunk_size=chunk_size, z_loss=z_loss)
  metrics = {"loss": loss, "accuracy": m["accuracy"], "num_tokens": m["num_tokens"],
             "loss_weight": m["num_tokens"]}
  return loss, {k: jnp.asarray(v, jnp.float32) for k, v in metrics.items()}
