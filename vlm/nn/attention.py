"""Scaled dot-product attention shared by every model in vlm.

Shapes use named axes: ``B`` batch, ``Lq`` query length, ``Lk`` key length, ``H`` heads, ``D``
head dim. Masks are boolean (True = may attend) and broadcast to [B, H, Lq, Lk]; they are applied
with ``where(mask, scores, finfo.min)`` rather than an additive -10000 so that bf16 logits stay
safe (BLIP-2 spec section 9, item 22).

Precision, for every compute dtype: the scores ``q . k`` are accumulated and returned in float32
(``preferred_element_type``), scaled, biased, masked and soft-maxed in float32; the probabilities
are cast to the compute dtype (they lie in [0, 1]) and ``probs @ v`` accumulates in float32 before
one cast to the result dtype. So in float16 a score above 65,504 stays finite (before: the float16
einsum returned inf for it and the row became NaN), and the output, a convex combination of the
values, cannot overflow. float32 is unchanged; bfloat16 only loses the extra rounding of the
scores to bfloat16.
"""
from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp


def dot_product_attention(query, key, value, *, mask=None, bias=None, scale: float | None = None,
                          dropout_rate: float = 0.0, dropout_rng=None, deterministic: bool = True,
                          dtype: Any = None, precision: Any = None):
  """Multi-head attention on already projected heads.

  Args:
    query: [B, Lq, H, D].
    key: [B, Lk, H, D].
    value: [B, Lk, H, D].
    mask: optional bool, broadcastable to [B, H, Lq, Lk]; True where a query may attend a key.
    bias: optional float, broadcastable to [B, H, Lq, Lk], added to the scores.
    scale: multiplier on the scores; default ``D ** -0.5``.
    dropout_rate: dropout on the attention probabilities (active when not ``deterministic``).
    dropout_rng: PRNG key for that dropout.
    deterministic: disables dropout.
    dtype: result dtype (default ``query.dtype``); also the dtype of the probabilities in the
      ``probs @ value`` product.
  Returns:
    [B, Lq, H, D] in ``dtype``; finite whenever the inputs are (scores in float32).
  Raises:
    ValueError: on mismatched ranks or head counts.
  """
  if query.ndim != 4 or key.ndim != 4 or value.ndim != 4:
    raise ValueError(f"attention expects [B, L, H, D] inputs, got {query.shape}, {key.shape}, "
                     f"{value.shape}")
  if key.shape[2] != query.shape[2]:
    raise ValueError(f"query has {query.shape[2]} heads but key has {key.shape[2]}; repeat the "
                     "key/value heads first for grouped-query attention")
  dtype = dtype or query.dtype
  if scale is None:
    scale = query.shape[-1] ** -0.5
  scores = jnp.einsum("bqhd,bkhd->bhqk", query, key, precision=precision,
                      preferred_element_type=jnp.float32)
  scores = scores * scale
  if bias is not None:
    scores = scores + jnp.asarray(bias, jnp.float32)
  if mask is not None:
    scores = jnp.where(mask, scores, jnp.finfo(jnp.float32).min)
  probs = jax.nn.softmax(scores, axis=-1)
  if not deterministic and dropout_rate > 0.0:
    keep = jax.random.bernoulli(dropout_rng, 1.0 - dropout_rate, probs.shape)
    probs = jnp.where(keep, probs / (1.0 - dropout_rate), 0.0)
  probs = jnp.asarray(probs, dtype)
  out = jnp.einsum("bhqk,bkhd->bqhd", probs, jnp.asarray(value, dtype), precision=precision,
                   preferred_element_type=jnp.float32)
  return jnp.asarray(out, dtype)


def padding_mask(attention_mask):
  """[B, Lk] 0/1 key padding mask -> bool [B, 1, 1, Lk]."""
  return jnp.asarray(attention_mask, bool)[:, None, None, :]


def causal_mask(length: int):
  """Bool [1, 1, L, L] lower-triangular mask (i attends j iff j <= i)."""
  return jnp.tril(jnp.ones((length, length), bool))[None, None]
