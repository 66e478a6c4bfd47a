"""Mixture-of-experts auxiliary losses: the Switch-Transformer load-balancing loss as HF computes it.

Source: Fedus et al. 2021, "Switch Transformers", equations (4)-(6); transformers 4.57.1
``models/qwen3_vl_moe/modeling_qwen3_vl_moe.py`` ``load_balancing_loss_func`` (the function
``Qwen3VLMoeForConditionalGeneration.forward`` calls; ``qwen3_moe`` has the same one).

What HF 4.57.1 does with it (read from ``Qwen3VLMoeForConditionalGeneration.forward`` and checked
by running a tiny model): the aux loss is computed only when ``output_router_logits=True`` is
passed to ``forward`` as a keyword (setting ``config.output_router_logits`` does nothing: the model
reads ``kwargs``); then ``loss += config.text_config.router_aux_loss_coef * aux_loss`` (default
coefficient 0.001), with ``attention_mask`` (the 2-D ``[B, L]`` padding mask) masking pad tokens.
The router logits are those of every decoder layer, ``[B*L, E]`` each, including image/video
placeholder tokens.

Named axes: ``NL`` MoE layers, ``T`` tokens per layer (= ``B*L``), ``E`` experts, ``K`` top-k.
"""
from __future__ import annotations

from typing import Any, Optional, Sequence, Union

import jax
import jax.numpy as jnp


def _stack_layers(router_logits) -> jax.Array:
  """[NL, T, E] from a tuple/list of per-layer [T, E] (or [NL_i, T, E] scanned blocks) or an array."""
  if isinstance(router_logits, (list, tuple)):
    if not router_logits:
      raise ValueError("router_logits is empty: no MoE layer reported its router logits (was the "
                       "'intermediates' collection made mutable in the forward pass?)")
    layers = []
    for i, x in enumerate(router_logits):
      x = jnp.asarray(x)
      if x.ndim == 2:
        x = x[None]
      if x.ndim != 3:
        raise ValueError(f"router_logits[{i}] must be [T, E] (one layer) or [NL, T, E] (stacked "
                         f"layers); got shape {x.shape}")
      layers.append(x)
    shapes = {x.shape[1:] for x in layers}
    if len(shapes) != 1:
      raise ValueError(f"every layer's router logits must have the same [T, E]; got {sorted(shapes)}")
    return jnp.concatenate(layers, axis=0)
  x = jnp.asarray(router_logits)
  if x.ndim == 2:
    return x[None]
  if x.ndim != 3:
    raise ValueError(f"router_logits must be [NL, T, E], [T, E] or a list of [T, E]; got {x.shape}")
  return x


def load_balancing_loss(router_logits: Union[Sequence[Any], jax.Array], num_experts: int,
                        top_k: int, attention_mask: Optional[jax.Array] = None) -> jax.Array:
  """Switch-Transformer load-balancing loss, equal to HF ``load_balancing_loss_func``.

  With ``p = softmax(router_logits)`` over experts (float32) and ``S`` the top-``K`` experts of
  each token, pooled over *all* layers and tokens together (HF concatenates the layers, it does
  not average per-layer losses)::

      f[k, e] = mean over tokens of [S_k(token) == e]   (k-th choice routed to expert e)
      P[e]    = mean over tokens of p[token, e]
      loss    = E * sum_{k, e} f[k, e] * P[e]

  With ``attention_mask``, the means are over tokens whose mask is 1 (padding excluded); every
  layer uses the same mask. A perfectly balanced router gives ``K``. Gradients flow through ``P``
  only (the top-k choice is piecewise constant), as in HF.

  Args:
    router_logits: a tuple/list over layers of ``[T, E]`` arrays (HF ``outputs.router_logits``,
      or the Flax ``("router_logits", ...)`` sown values, see :func:`vlm.models.qwen3.router_logits`), or
      a stacked ``[NL, T, E]`` array (scanned layers). Any float dtype; computed in float32.
    num_experts: E; must equal the last axis of the logits.
    top_k: K experts per token (``config.num_experts_per_tok``), 1 <= K <= E.
    attention_mask: optional ``[B, L]`` 0/1 (or bool) with ``B*L == T``: 1 for real tokens, 0 for
      padding (for packed rows: ``segment_ids != 0``). Token ``t`` of a layer is row ``t // L``,
      column ``t % L`` (row-major flattening of ``[B, L]``, as the model flattens its tokens).
  Returns:
    Scalar float32 (multiply by ``router_aux_loss_coef`` and add to the LM loss).
  Raises:
    ValueError: on an empty list, shapes that differ across layers, an expert axis other than
      ``num_experts``, ``top_k`` outside ``[1, E]``, or a mask whose ``B*L`` differs from ``T``.
      (HF returns 0 for ``None`` or a non-tuple input; here those are errors or accepted stacks.)
  """
  logits = _stack_layers(router_logits).astype(jnp.float32)                   # [NL, T, E]
  n_layers, n_tokens, n_exp = logits.shape
  if n_exp != num_experts:
    raise ValueError(f"router logits have {n_exp} experts on their last axis but num_experts="
                     f"{num_experts}")
  if not 1 <= int(top_k) <= n_exp:
    raise ValueError(f"top_k must be in [1, {n_exp}], got {top_k}")
  probs = jax.nn.softmax(logits, axis=-1)                                       # [NL, T, E]
  _, chosen = jax.lax.top_k(probs, int(top_k))                                  # [NL, T, K]
  routed = jax.nn.one_hot(chosen, n_exp, dtype=jnp.float32)                     # [NL, T, K, E]
  if attention_mask is None:
    weights = jnp.ones((n_layers, n_tokens), jnp.float32)
  else:
    mask = jnp.asarray(attention_mask)
    if mask.ndim != 2 or mask.shape[0] * mask.shape[1] != n_tokens:
      raise ValueError(f"attention_mask must be [B, L] with B*L = T = {n_tokens} router tokens per "
                       f"layer; got shape {mask.shape}")
    weights = jnp.broadcast_to((mask != 0).reshape(1, n_tokens).astype(jnp.float32),
                               (n_layers, n_tokens))
  count = jnp.sum(weights)
  tokens_per_expert = jnp.einsum("ntke,nt->ke", routed, weights) / count        # [K, E]
  prob_per_expert = jnp.einsum("nte,nt->e", probs, weights) / count             # [E]
  return jnp.sum(tokens_per_expert * prob_per_expert[None, :]) * n_exp
