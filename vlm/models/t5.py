"""T5 v1.1 / FlanT5 encoder-decoder in Flax linen (HF ``T5ForConditionalGeneration``).

Math: HF ``transformers/models/t5/modeling_t5.py`` (4.57.1) and Raffel et al. 2020, "Exploring the
Limits of Transfer Learning with a Unified Text-to-Text Transformer", section 2.1; the gated-GELU
FFN of T5 v1.1 is Shazeer 2020, "GLU Variants Improve Transformer". In BLIP-2 stage 2 this is the
frozen LLM (BLIP-2 spec section 4.3).

* Pre-norm blocks with T5's RMS LayerNorm (no mean subtraction, no bias, statistics in float32;
  :class:`vlm.nn.layers.RMSNorm`), no biases anywhere, attention scores NOT scaled (scale 1.0).
* Relative position bias (HF ``T5Attention.compute_bias``): an ``[num_buckets, num_heads]`` table
  owned by each stack (HF stores it in block 0; the converter maps it), bidirectional buckets in
  the encoder, causal ones in the decoder, computed once and added to the scores of every layer's
  self-attention (HF shares block 0's bias with all blocks). Cross-attention has no position bias.
* FFN: ``wo(dropout(act(wi_0 x) * wi_1 x))`` when ``is_gated_act`` (``feed_forward_proj =
  "gated-..."``), else ``wo(dropout(act(wi x)))``. The activation is ``dense_act_fn`` as HF
  resolves it (:class:`T5Config`); BLIP-2's FlanT5 configs say ``"gelu"`` (exact erf GELU).
* Dropout (``deterministic=False``, rng ``"dropout"``) where HF has it: on the embeddings, on the
  attention probabilities, after the gated product inside the FFN, on every sublayer output before
  its residual add, and after each stack's final norm.
* LM head: untied ``lm_head`` [D, V]; tied models use ``shared`` with the decoder output scaled by
  ``d_model ** -0.5`` first (HF ``T5ForConditionalGeneration.forward``).

Parameter tree (mirrors the HF keys, see :mod:`vlm.convert.hf_t5`)::

  shared/embedding [V, D]
  encoder/relative_attention_bias/embedding [buckets, H]
  encoder/layers_{i}/layer_0/{layer_norm/scale, SelfAttention/{q,k,v,o}/kernel}
  encoder/layers_{i}/layer_1/{layer_norm/scale, DenseReluDense/{wi_0,wi_1,wo}/kernel}
  encoder/final_layer_norm/scale
  decoder/... as the encoder, plus layer_1/EncDecAttention/{q,k,v,o}; the FFN is layer_2
  lm_head/kernel [D, V] (untied only)

With ``scan_layers=True`` the ``layers_{i}`` of each stack become one ``layers`` subtree with a
leading ``LAYERS`` axis (:func:`vlm.models.qwen3.stack_layers` / ``unstack_layers`` convert).

Precision: float32 is exact HF. For float16/bfloat16 compute, ``wo`` runs in float32 (HF keeps it
in float32 for FlanT5: ``_keep_in_fp32_modules = ["wo"]``), which makes HF's residual stream
float32 from the first FFN on; vlm keeps the residual stream float32 throughout for these dtypes.
Attention scores and softmax are float32 (:mod:`vlm.nn.attention`). HF's float16 ``clamp`` of the
hidden states is not copied (nothing overflows with float32 residuals).
"""
from __future__ import annotations

import dataclasses
import math
from typing import Any, Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from vlm.nn import layers
from vlm.nn import partitioning as P
from vlm.nn.attention import (cache_masks, cached_attention, causal_padding_mask,
                              dot_product_attention, init_kv_cache)

Dtype = Any

_HALF = (jnp.dtype(jnp.float16), jnp.dtype(jnp.bfloat16))


def _is_half(dtype) -> bool:
  return jnp.dtype(dtype) in _HALF


def _residual_dtype(dtype):
  """float32 residual stream for float16/bfloat16 compute (see the module docstring)."""
  return jnp.float32 if _is_half(dtype) else dtype


def _parse_ff_proj(feed_forward_proj: str) -> tuple[str, bool]:
  """HF ``T5Config.__init__``: "gated-ACT" / "ACT" -> (act, gated); "gated-gelu" -> gelu_new."""
  parts = feed_forward_proj.split("-")
  if (len(parts) > 1 and parts[0] != "gated") or len(parts) > 2:
    raise ValueError(f"feed_forward_proj {feed_forward_proj!r} is not of the form 'gated-ACT' or "
                     "'ACT' (e.g. 'gated-gelu' or 'relu')")
  act = parts[-1]
  if feed_forward_proj == "gated-gelu":  # HF's backwards-compatibility rule
    act = "gelu_new"
  return act, parts[0] == "gated"


@dataclasses.dataclass(frozen=True)
class T5Config:
  """T5 configuration with HF ``T5Config`` field names (defaults: a FlanT5-XL-like model).

  ``dense_act_fn`` / ``is_gated_act``: None derives them from ``feed_forward_proj`` exactly as HF
  ``T5Config.__init__`` does (``"gated-gelu"`` -> ``"gelu_new"``, gated; ``"relu"`` -> ``"relu"``,
  not gated). An explicit value wins, as in HF, where a ``config.json`` entry overrides the derived
  attribute: BLIP-2's FlanT5 configs say ``"dense_act_fn": "gelu"`` with ``"gated-gelu"`` and HF
  then runs the exact erf GELU. ``decoder_start_token_id`` is the first decoder input
  (:func:`shift_right`).

  Raises:
    ValueError: non-positive sizes, a malformed ``feed_forward_proj``, an unknown activation, or
      ``num_buckets`` / ``max_distance`` that cannot form T5 buckets.
  """
  vocab_size: int = 32128
  d_model: int = 2048
  d_kv: int = 64
  d_ff: int = 5120
  num_layers: int = 24
  num_decoder_layers: int | None = None
  num_heads: int = 32
  relative_attention_num_buckets: int = 32
  relative_attention_max_distance: int = 128
  dropout_rate: float = 0.1
  layer_norm_epsilon: float = 1e-6
  feed_forward_proj: str = "gated-gelu"
  dense_act_fn: str | None = None
  is_gated_act: bool | None = None
  tie_word_embeddings: bool = False
  pad_token_id: int = 0
  eos_token_id: int = 1
  decoder_start_token_id: int = 0
  initializer_factor: float = 1.0

  def __post_init__(self):
    for name in ("vocab_size", "d_model", "d_kv", "d_ff", "num_layers", "num_heads"):
      v = getattr(self, name)
      if not isinstance(v, (int, np.integer)) or v < 1:
        raise ValueError(f"T5Config.{name} must be a positive int, got {v!r}")
    if self.num_decoder_layers is None:
      object.__setattr__(self, "num_decoder_layers", self.num_layers)
    if self.num_decoder_layers < 1:
      raise ValueError(f"T5Config.num_decoder_layers must be >= 1, got {self.num_decoder_layers}")
    act, gated = _parse_ff_proj(self.feed_forward_proj)
    if self.dense_act_fn is None:
      object.__setattr__(self, "dense_act_fn", act)
    if self.is_gated_act is None:
      object.__setattr__(self, "is_gated_act", gated)
    layers.activation(self.dense_act_fn)
    nb, md = self.relative_attention_num_buckets, self.relative_attention_max_distance
    if nb < 4 or md <= nb // 4:
      raise ValueError(f"relative_attention_num_buckets ({nb}) must be >= 4 and "
                       f"relative_attention_max_distance ({md}) > num_buckets // 4")
    if not 0.0 <= self.dropout_rate < 1.0:
      raise ValueError(f"T5Config.dropout_rate must be in [0, 1), got {self.dropout_rate}")

  @property
  def inner_dim(self) -> int:
    return self.num_heads * self.d_kv

  @classmethod
  def from_hf_config(cls, d: Mapping[str, Any]) -> "T5Config":
    """From an HF ``T5Config`` dict (``config.json`` / ``to_dict()``); unknown keys are ignored.

    Missing fields take HF's class defaults (``T5Config()``: 512 wide, 6 layers, 8 heads,
    ``feed_forward_proj="relu"``, ``tie_word_embeddings=True``); ``dense_act_fn`` and
    ``is_gated_act`` override the values derived from ``feed_forward_proj`` when present (as in
    HF). A missing/None ``decoder_start_token_id`` becomes ``pad_token_id`` (the T5 convention).

    Raises:
      ValueError: ``model_type`` present and not "t5", or an invalid config (see the class).
    """
    model_type = d.get("model_type", "t5")
    if model_type != "t5":
      raise ValueError(f"config has model_type {model_type!r}; expected 't5'")
    hf_defaults = dict(vocab_size=32128, d_model=512, d_kv=64, d_ff=2048, num_layers=6,
                       num_heads=8, relative_attention_num_buckets=32,
                       relative_attention_max_distance=128, dropout_rate=0.1,
                       layer_norm_epsilon=1e-6, feed_forward_proj="relu",
                       tie_word_embeddings=True, pad_token_id=0, eos_token_id=1,
                       initializer_factor=1.0)
    kw = {k: d.get(k, v) for k, v in hf_defaults.items()}
    kw["num_decoder_layers"] = d.get("num_decoder_layers")
    kw["dense_act_fn"] = d.get("dense_act_fn")
    kw["is_gated_act"] = d.get("is_gated_act")
    start = d.get("decoder_start_token_id")
    kw["decoder_start_token_id"] = kw["pad_token_id"] if start is None else start
    return cls(**kw)

  def to_hf_config(self) -> dict:
    """The HF ``config.json`` dict of a ``T5ForConditionalGeneration`` with this config
    (``dense_act_fn`` and ``is_gated_act`` written explicitly, so HF runs the same FFN)."""
    return {
        "architectures": ["T5ForConditionalGeneration"],
        "model_type": "t5",
        "vocab_size": self.vocab_size, "d_model": self.d_model, "d_kv": self.d_kv,
        "d_ff": self.d_ff, "num_layers": self.num_layers,
        "num_decoder_layers": self.num_decoder_layers, "num_heads": self.num_heads,
        "relative_attention_num_buckets": self.relative_attention_num_buckets,
        "relative_attention_max_distance": self.relative_attention_max_distance,
        "dropout_rate": self.dropout_rate, "layer_norm_epsilon": self.layer_norm_epsilon,
        "feed_forward_proj": self.feed_forward_proj, "dense_act_fn": self.dense_act_fn,
        "is_gated_act": self.is_gated_act, "tie_word_embeddings": self.tie_word_embeddings,
        "pad_token_id": self.pad_token_id, "eos_token_id": self.eos_token_id,
        "decoder_start_token_id": self.decoder_start_token_id,
        "initializer_factor": self.initializer_factor, "is_encoder_decoder": True,
        "use_cache": True,
    }

  def num_parameters(self) -> int:
    """Analytic parameter count of :class:`T5ForConditionalGeneration` (HF's; tied: once)."""
    d, inner, ff = self.d_model, self.inner_dim, self.d_ff
    attn = 4 * d * inner
    ffn = (3 if self.is_gated_act else 2) * d * ff
    rel = self.relative_attention_num_buckets * self.num_heads
    enc = self.num_layers * (attn + ffn + 2 * d) + rel + d
    dec = self.num_decoder_layers * (2 * attn + ffn + 3 * d) + rel + d
    emb = self.vocab_size * d * (1 if self.tie_word_embeddings else 2)
    return emb + enc + dec


T5_PRESETS: dict[str, T5Config] = {
    # google/flan-t5-xl config.json (dense_act_fn "gelu_new" as HF derives it); BLIP-2's
    # Salesforce/blip2-flan-t5-xl overrides it to "gelu":
    # t5_preset("flan_t5_xl", dense_act_fn="gelu")
    "flan_t5_xl": T5Config(vocab_size=32128, d_model=2048, d_kv=64, d_ff=5120, num_layers=24,
                           num_decoder_layers=24, num_heads=32, feed_forward_proj="gated-gelu",
                           tie_word_embeddings=False),
    # google/flan-t5-xxl config.json
    "flan_t5_xxl": T5Config(vocab_size=32128, d_model=4096, d_kv=64, d_ff=10240, num_layers=24,
                            num_decoder_layers=24, num_heads=64, feed_forward_proj="gated-gelu",
                            tie_word_embeddings=False),
    # tiny model with the real vocabulary (so the real T5 tokenizer works), for tests and smoke runs
    "t5_tiny": T5Config(vocab_size=32128, d_model=256, d_kv=64, d_ff=512, num_layers=4,
                        num_decoder_layers=4, num_heads=4, feed_forward_proj="gated-gelu",
                        tie_word_embeddings=False),
}


def t5_preset(name: str, **overrides) -> T5Config:
  """A preset of :data:`T5_PRESETS` with fields replaced by ``overrides``.

  Raises:
    KeyError: unknown ``name`` (the message lists the presets).
  """
  if name not in T5_PRESETS:
    raise KeyError(f"unknown T5 preset {name!r}; known: {sorted(T5_PRESETS)}")
  return dataclasses.replace(T5_PRESETS[name], **overrides)


def shift_right(labels, decoder_start_token_id: int, pad_token_id: int):
  """Decoder inputs from labels (HF ``T5PreTrainedModel._shift_right``).

  ``out[:, 0] = decoder_start_token_id``, ``out[:, 1:] = labels[:, :-1]``, then ``-100`` (ignored
  label) -> ``pad_token_id``. int [B, L] -> int [B, L] (same dtype).
  """
  labels = jnp.asarray(labels)
  start = jnp.full(labels.shape[:-1] + (1,), decoder_start_token_id, labels.dtype)
  shifted = jnp.concatenate([start, labels[..., :-1]], axis=-1)
  return jnp.where(shifted == -100, jnp.asarray(pad_token_id, labels.dtype), shifted)


# ------------------------------------------------------------------------------------------------
# Relative position buckets.


def _bucket_table(num_buckets: int, max_distance: int) -> np.ndarray:
  """int32 [max_distance + 1]: bucket of a non-negative distance n (one direction), n clipped.

  HF ``T5Attention._relative_position_bucket`` for ``n >= 0`` with ``num_buckets`` buckets: exact
  below ``num_buckets // 2``, then logarithmic up to ``max_distance``, in float32 arithmetic as
  HF's torch code (a table, so no float rounding of XLA vs torch can move a boundary).
  """
  max_exact = num_buckets // 2
  n = np.arange(max_distance + 1)
  ratio = np.maximum(n, 1).astype(np.float32) / np.float32(max_exact)
  large = (np.log(ratio) / np.float32(math.log(max_distance / max_exact))
           * np.float32(num_buckets - max_exact))
  large = max_exact + np.maximum(large, 0.0).astype(np.int64)
  large = np.minimum(large, num_buckets - 1)
  return np.where(n < max_exact, n, large).astype(np.int32)


def relative_position_bucket(relative_position, bidirectional: bool, num_buckets: int = 32,
                             max_distance: int = 128):
  """T5 bucket of ``memory_position - query_position`` (HF ``_relative_position_bucket``).

  Args:
    relative_position: int array, any shape.
    bidirectional: encoder (half the buckets per direction) vs decoder (only ``<= 0`` counts;
      keys after the query fall in bucket 0).
  Returns:
    int32, same shape, in ``[0, num_buckets)``.
  """
  rp = jnp.asarray(relative_position, jnp.int32)
  offset = 0
  if bidirectional:
    num_buckets //= 2
    offset = jnp.where(rp > 0, num_buckets, 0)
    n = jnp.abs(rp)
  else:
    n = -jnp.minimum(rp, 0)
  table = jnp.asarray(_bucket_table(num_buckets, max_distance))
  return offset + table[jnp.minimum(n, max_distance)]


# ------------------------------------------------------------------------------------------------
# Layers.


def _normal(std: float):
  return nn.initializers.normal(stddev=std)


class T5Attention(nn.Module):
  """T5 attention (HF ``T5Attention``): q/k/v/o without bias, scores unscaled, optional bias.

  Call args:
    x: [B, L, D] (normed) queries' source.
    kv: [B, S, D] keys/values' source (cross-attention) or None (self-attention).
    bias: float32 additive score bias broadcastable to [B, H, L, S] (the relative position bias)
      or None. With a cache: ``(bias_cache [1, H, L, T] or None, bias_new [1, H, L, L])``.
    mask: bool broadcastable to [B, H, L, S]; with a cache ``(mask_cache, mask_new)`` of
      :func:`vlm.nn.attention.cache_masks` (``mask_cache`` None for a prefill into an empty cache).
    cache: None or ``(k_cache, v_cache)`` each [B, H, T, d_kv] (self-attention only).
    deterministic: disables the attention-probability dropout (``dropout_rate``).
  Returns:
    (out [B, L, D] in ``dtype`` (float32 for float16 compute), None or (k_new, v_new) [B, L, H,
    d_kv] with a cache).
  """
  config: T5Config
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x, kv, bias, mask, cache=None, deterministic: bool = True):
    cfg = self.config
    d, h, hd = cfg.d_model, cfg.num_heads, cfg.d_kv
    f = cfg.initializer_factor
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype, use_bias=False)
    q = layers.Dense(h * hd, kernel_axes=(P.EMBED, P.HEADS), name="q",
                     kernel_init=_normal(f * (d * hd) ** -0.5), **kw)(x)
    src = x if kv is None else kv
    k = layers.Dense(h * hd, kernel_axes=(P.EMBED, P.HEADS), name="k",
                     kernel_init=_normal(f * d ** -0.5), **kw)(src)
    v = layers.Dense(h * hd, kernel_axes=(P.EMBED, P.HEADS), name="v",
                     kernel_init=_normal(f * d ** -0.5), **kw)(src)
    b, length = x.shape[:2]
    q = q.reshape(b, length, h, hd)
    k = k.reshape(b, src.shape[1], h, hd)
    v = v.reshape(b, src.shape[1], h, hd)
    new = None
    if cache is not None:
      ck, cv = cache
      mask_cache, mask_new = mask
      bias_cache, bias_new = bias
      o = cached_attention(q, k, v, ck, cv, mask_cache, mask_new, 1.0, self.dtype,
                           bias_cache=bias_cache, bias_new=bias_new)
      new = (k, v)
    else:
      use_dropout = not deterministic and cfg.dropout_rate > 0.0
      o = dot_product_attention(q, k, v, mask=mask, bias=bias, scale=1.0,
                                dropout_rate=cfg.dropout_rate,
                                dropout_rng=self.make_rng("dropout") if use_dropout else None,
                                deterministic=not use_dropout, dtype=self.dtype)
    o = o.reshape(b, length, h * hd)
    out = layers.Dense(d, kernel_axes=(P.HEADS, P.EMBED), name="o", wide_float16=True,
                       kernel_init=_normal(f * (h * hd) ** -0.5), **kw)(o)
    return out, new


class T5DenseReluDense(nn.Module):
  """HF ``T5DenseGatedActDense`` (``is_gated_act``) or ``T5DenseActDense``. [B,L,D] -> [B,L,D].

  ``wo`` is always computed in float32 (input and kernel cast; HF ``_keep_in_fp32_modules``) and
  returns float32. For float16 compute ``wi_0``/``wi_1`` and their product are float32 (wide
  Dense); for bfloat16 they stay bfloat16 as in HF.
  """
  config: T5Config
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x, deterministic: bool = True):
    cfg = self.config
    f = cfg.initializer_factor
    act = layers.activation(cfg.dense_act_fn)
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype, use_bias=False, wide_float16=True,
              kernel_axes=(P.EMBED, P.MLP), kernel_init=_normal(f * cfg.d_model ** -0.5))
    if cfg.is_gated_act:
      hidden = act(layers.Dense(cfg.d_ff, name="wi_0", **kw)(x)) * layers.Dense(
          cfg.d_ff, name="wi_1", **kw)(x)
    else:
      hidden = act(layers.Dense(cfg.d_ff, name="wi", **kw)(x))
    hidden = nn.Dropout(cfg.dropout_rate)(hidden, deterministic=deterministic)
    return layers.Dense(cfg.d_model, kernel_axes=(P.MLP, P.EMBED), name="wo", use_bias=False,
                        dtype=jnp.float32, param_dtype=self.param_dtype,
                        kernel_init=_normal(f * cfg.d_ff ** -0.5))(hidden)


class T5LayerSelfAttention(nn.Module):
  """``h + dropout(SelfAttention(layer_norm(h)))`` (HF ``T5LayerSelfAttention``)."""
  config: T5Config
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, h, bias, mask, cache=None, deterministic: bool = True):
    cfg = self.config
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    u = layers.RMSNorm(cfg.layer_norm_epsilon, name="layer_norm", **kw)(h)
    a, new = T5Attention(cfg, name="SelfAttention", **kw)(u, None, bias, mask, cache,
                                                         deterministic)
    a = nn.Dropout(cfg.dropout_rate)(a, deterministic=deterministic)
    return h + jnp.asarray(a, h.dtype), new


class T5LayerCrossAttention(nn.Module):
  """``h + dropout(EncDecAttention(layer_norm(h), encoder states))`` (HF ``T5LayerCrossAttention``;
  no position bias)."""
  config: T5Config
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, h, enc, enc_mask, deterministic: bool = True):
    cfg = self.config
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    u = layers.RMSNorm(cfg.layer_norm_epsilon, name="layer_norm", **kw)(h)
    a, _ = T5Attention(cfg, name="EncDecAttention", **kw)(u, enc, None, enc_mask, None,
                                                          deterministic)
    a = nn.Dropout(cfg.dropout_rate)(a, deterministic=deterministic)
    return h + jnp.asarray(a, h.dtype)


class T5LayerFF(nn.Module):
  """``h + dropout(DenseReluDense(layer_norm(h)))`` (HF ``T5LayerFF``)."""
  config: T5Config
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, h, deterministic: bool = True):
    cfg = self.config
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    u = layers.RMSNorm(cfg.layer_norm_epsilon, name="layer_norm", **kw)(h)
    m = T5DenseReluDense(cfg, name="DenseReluDense", **kw)(u, deterministic)
    m = nn.Dropout(cfg.dropout_rate)(m, deterministic=deterministic)
    return h + jnp.asarray(m, h.dtype)


class T5Block(nn.Module):
  """One encoder or decoder block (HF ``T5Block``), with an ``nn.scan``-compatible signature.

  Call args:
    h: [B, L, D] residual stream (carry).
    xs: ``(cache_k [B, H, T, d_kv] | None, cache_v | None)``.
    bias, mask: self-attention score bias and mask (see :class:`T5Attention`).
    enc, enc_mask: decoder only: encoder states [B, S, D] and bool [B, 1, 1, S].
    deterministic: disables dropout.
  Returns:
    (h [B, L, D], (k_new, v_new) [B, L, H, d_kv] with a cache, else (None, None)).
  """
  config: T5Config
  is_decoder: bool = False
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, h, xs, bias, mask, enc, enc_mask, deterministic: bool = True):
    cfg = self.config
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    ck, cv = xs
    cache = None if ck is None else (ck, cv)
    h, new = T5LayerSelfAttention(cfg, name="layer_0", **kw)(h, bias, mask, cache, deterministic)
    ff_name = "layer_1"
    if self.is_decoder:
      h = T5LayerCrossAttention(cfg, name="layer_1", **kw)(h, enc, enc_mask, deterministic)
      ff_name = "layer_2"
    h = T5LayerFF(cfg, name=ff_name, **kw)(h, deterministic)
    h = P.constrain(h, (P.BATCH, P.LENGTH, P.EMBED))
    return h, (None, None) if new is None else new


class T5Stack(nn.Module):
  """Encoder or decoder stack (HF ``T5Stack`` minus the embedding lookup).

  Owns ``relative_attention_bias`` (HF block 0's table), the blocks and ``final_layer_norm``.
  Call: ``(inputs_embeds [B, L, D], mask, bias, enc=None, enc_mask=None, kv_cache=None,
  deterministic=True)`` with the mask and bias prepared by :class:`T5ForConditionalGeneration`
  (the bias from :meth:`position_bias`). Returns (hidden [B, L, D] after the final norm and
  dropout, in ``dtype``; (k_new, v_new) [NL, B, L, H, d_kv] with a cache, else None).
  """
  config: T5Config
  is_decoder: bool = False
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32
  scan_layers: bool = False
  remat: bool = False

  def setup(self):
    cfg = self.config
    self.relative_attention_bias = layers.Embed(
        cfg.relative_attention_num_buckets, cfg.num_heads, axes=(None, P.HEADS),
        dtype=self.dtype, param_dtype=self.param_dtype,
        embedding_init=_normal(cfg.initializer_factor * cfg.d_model ** -0.5))
    self.final_layer_norm = layers.RMSNorm(cfg.layer_norm_epsilon, dtype=self.dtype,
                                           param_dtype=self.param_dtype)
    self.dropout = nn.Dropout(cfg.dropout_rate)
    n = cfg.num_decoder_layers if self.is_decoder else cfg.num_layers
    block = T5Block
    if self.remat:  # argument 7 (self = 0) is the Python bool ``deterministic``
      block = nn.remat(block, prevent_cse=not self.scan_layers, static_argnums=(7,))
    kw = dict(is_decoder=self.is_decoder, dtype=self.dtype, param_dtype=self.param_dtype)
    if self.scan_layers:
      scanned = nn.scan(block, variable_axes={"params": 0},
                        split_rngs={"params": True, "dropout": True},
                        in_axes=(0,) + (nn.broadcast,) * 5, length=n,
                        metadata_params={nn.PARTITION_NAME: P.LAYERS})
      self.layers = scanned(self.config, **kw)
    else:
      self.layers = [block(self.config, **kw) for _ in range(n)]

  def position_bias(self, query_positions, key_positions):
    """float32 [1, H, Lq, Lk] bias for int query positions [Lq] and key positions [Lk]."""
    cfg = self.config
    buckets = relative_position_bucket(key_positions[None, :] - query_positions[:, None],
                                       bidirectional=not self.is_decoder,
                                       num_buckets=cfg.relative_attention_num_buckets,
                                       max_distance=cfg.relative_attention_max_distance)
    table = jnp.asarray(self.relative_attention_bias.embedding, jnp.float32)
    return jnp.transpose(table[buckets], (2, 0, 1))[None]

  def __call__(self, inputs_embeds, mask, bias, enc=None, enc_mask=None, kv_cache=None,
               deterministic: bool = True):
    h = self.dropout(inputs_embeds, deterministic=deterministic)
    h = jnp.asarray(h, _residual_dtype(self.dtype))
    h = P.constrain(h, (P.BATCH, P.LENGTH, P.EMBED))
    ck = cv = None
    if kv_cache is not None:
      ck, cv = kv_cache
    if self.scan_layers:
      h, (nk, nv) = self.layers(h, (ck, cv), bias, mask, enc, enc_mask, deterministic)
    else:
      nks, nvs = [], []
      for i, layer in enumerate(self.layers):
        xs = (None, None) if ck is None else (ck[i], cv[i])
        h, (k_i, v_i) = layer(h, xs, bias, mask, enc, enc_mask, deterministic)
        nks.append(k_i)
        nvs.append(v_i)
      nk = None if ck is None else jnp.stack(nks)
      nv = None if cv is None else jnp.stack(nvs)
    h = self.final_layer_norm(h)
    h = self.dropout(h, deterministic=deterministic)
    return h, (None if ck is None else (nk, nv))


def init_cache(config: T5Config, batch: int, max_length: int, dtype: Dtype = jnp.float32) -> dict:
  """Empty decoder self-attention cache for :meth:`T5ForConditionalGeneration.decode`.

  Returns ``{"k": [NL, B, H, T, d_kv], "v": same, "mask": bool [B, T]}`` with NL =
  ``num_decoder_layers`` and T = ``max_length`` (:func:`vlm.nn.attention.init_kv_cache`);
  ``mask`` marks slots holding real tokens. Cross-attention keys/values are not cached (they are
  recomputed from the encoder states at every step).
  """
  return init_kv_cache(config.num_decoder_layers, batch, config.num_heads, max_length,
                       config.d_kv, dtype)


def _bool_mask(mask, shape, name):
  if mask is None:
    return jnp.ones(shape, bool)
  if tuple(mask.shape) != tuple(shape):
    raise ValueError(f"{name} must be [B, L] = {tuple(shape)} (1 = real token), got "
                     f"{tuple(mask.shape)}")
  return jnp.asarray(mask, bool)


class T5ForConditionalGeneration(nn.Module):
  """T5 / FlanT5 encoder-decoder LM (HF ``T5ForConditionalGeneration``).

  Attributes:
    config: :class:`T5Config`.
    dtype: compute dtype (float32, bfloat16 or float16; see the module docstring).
    param_dtype: parameter storage dtype.
    scan_layers: each stack runs its blocks under ``nn.scan`` (params ``layers/...`` with a
      leading ``LAYERS`` axis).
    remat: wrap each block in ``nn.remat``.
  Methods:
    embed(input_ids int [B, L]) -> [B, L, D] in ``dtype``: the ``shared`` table, not scaled.
    encode(inputs_embeds [B, S, D], attention_mask [B, S] or None, deterministic=True)
      -> [B, S, D] in ``dtype``: encoder incl. ``final_layer_norm`` and its dropout.
    decode(decoder_input_ids int [B, L], encoder_hidden_states [B, S, D],
      encoder_attention_mask [B, S] or None, decoder_attention_mask [B, L] or None,
      kv_cache=None, cache_index=None, deterministic=True, return_hidden=False)
      -> (float32 logits [B, L, V] or, with ``return_hidden``, the decoder output [B, L, D] in
      ``dtype``; new cache or None). Without a cache the decoder self-attention is causal and
      masked by ``decoder_attention_mask``. With ``kv_cache`` (:func:`init_cache`) and
      ``cache_index`` (int scalar, slot of the first new token; a static Python 0 means an empty
      cache), the L new tokens are written at slots ``cache_index..cache_index+L-1`` and attend
      to the valid earlier slots and causally to themselves; ``decoder_attention_mask`` then
      covers the new tokens only. Positions for the relative bias are slot indices (as HF's
      ``cache_position``). Cached decoding equals the uncached decode.
    logits(hidden [..., D]) -> float32 [..., V]: ``lm_head``; tied models use ``shared`` after
      scaling by ``d_model ** -0.5``.
    __call__(inputs_embeds, attention_mask, decoder_input_ids, decoder_attention_mask=None,
      deterministic=True) -> float32 logits [B, L, V]; touches every parameter (use it for init).
  Raises:
    ValueError: wrong ranks/widths/mask shapes, ``kv_cache`` without ``cache_index`` or with the
      wrong layer count / batch.
  """
  config: T5Config
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32
  scan_layers: bool = False
  remat: bool = False

  def setup(self):
    cfg = self.config
    self.shared = layers.Embed(cfg.vocab_size, cfg.d_model, dtype=self.dtype,
                               param_dtype=self.param_dtype,
                               embedding_init=_normal(cfg.initializer_factor))
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype, scan_layers=self.scan_layers,
              remat=self.remat)
    self.encoder = T5Stack(cfg, is_decoder=False, **kw)
    self.decoder = T5Stack(cfg, is_decoder=True, **kw)
    if not cfg.tie_word_embeddings:
      self.lm_head = layers.Dense(cfg.vocab_size, kernel_axes=(P.EMBED, P.VOCAB), use_bias=False,
                                  dtype=self.dtype, param_dtype=self.param_dtype,
                                  kernel_init=_normal(cfg.initializer_factor))

  def embed(self, input_ids):
    if input_ids.ndim != 2:
      raise ValueError(f"input_ids must be int [B, L], got shape {input_ids.shape}")
    return self.shared(input_ids)

  def _check_embeds(self, x, name):
    if x.ndim != 3 or x.shape[-1] != self.config.d_model:
      raise ValueError(f"{name} must be [B, L, d_model={self.config.d_model}], got {x.shape}")

  def encode(self, inputs_embeds, attention_mask=None, deterministic: bool = True):
    self._check_embeds(inputs_embeds, "inputs_embeds")
    b, s, _ = inputs_embeds.shape
    mask = _bool_mask(attention_mask, (b, s), "attention_mask")[:, None, None, :]
    pos = jnp.arange(s, dtype=jnp.int32)
    bias = self.encoder.position_bias(pos, pos)
    h, _ = self.encoder(inputs_embeds, mask, bias, deterministic=deterministic)
    return h

  def decode(self, decoder_input_ids, encoder_hidden_states, encoder_attention_mask=None,
             decoder_attention_mask=None, kv_cache=None, cache_index=None,
             deterministic: bool = True, return_hidden: bool = False):
    cfg = self.config
    x = self.embed(decoder_input_ids)
    self._check_embeds(encoder_hidden_states, "encoder_hidden_states")
    b, length = decoder_input_ids.shape
    if encoder_hidden_states.shape[0] != b:
      raise ValueError(f"encoder_hidden_states batch {encoder_hidden_states.shape[0]} != "
                       f"decoder_input_ids batch {b}")
    s = encoder_hidden_states.shape[1]
    enc_mask = _bool_mask(encoder_attention_mask, (b, s),
                          "encoder_attention_mask")[:, None, None, :]
    dec_mask = _bool_mask(decoder_attention_mask, (b, length), "decoder_attention_mask")
    enc = jnp.asarray(encoder_hidden_states, self.dtype)
    new_pos = jnp.arange(length, dtype=jnp.int32)
    cache = None
    if kv_cache is None:
      mask = causal_padding_mask(dec_mask, b, length)
      bias = self.decoder.position_bias(new_pos, new_pos)
    else:
      if cache_index is None:
        raise ValueError("cache_index is required with kv_cache (slot of the first new token)")
      expected = (cfg.num_decoder_layers, b)
      if tuple(kv_cache["k"].shape[:2]) != expected or kv_cache["mask"].shape[0] != b:
        raise ValueError(f"kv_cache k must be [NL, B, H, T, d_kv] with NL, B = {expected}, got "
                         f"{kv_cache['k'].shape}; build it with init_cache")
      bias_new = self.decoder.position_bias(new_pos, new_pos)  # relative: independent of offset
      if isinstance(cache_index, int) and cache_index == 0:
        mask = (None, causal_padding_mask(dec_mask, b, length))
        bias = (None, bias_new)
      else:
        mask = cache_masks(dec_mask, kv_cache["mask"], cache_index)
        slots = jnp.arange(kv_cache["mask"].shape[1], dtype=jnp.int32)
        q_pos = jnp.asarray(cache_index, jnp.int32) + new_pos
        bias = (self.decoder.position_bias(q_pos, slots), bias_new)
      cache = (kv_cache["k"], kv_cache["v"])
    h, new = self.decoder(x, mask, bias, enc, enc_mask, cache, deterministic)
    new_cache = None
    if kv_cache is not None:
      nk, nv = new
      idx = jnp.asarray(cache_index, jnp.int32)
      start = (0, 0, 0, idx, 0)
      heads_first = lambda t, c: jnp.asarray(jnp.swapaxes(t, 2, 3), c.dtype)  # [NL,B,H,L,hd]
      new_cache = {
          "k": jax.lax.dynamic_update_slice(kv_cache["k"], heads_first(nk, kv_cache["k"]), start),
          "v": jax.lax.dynamic_update_slice(kv_cache["v"], heads_first(nv, kv_cache["v"]), start),
          "mask": jax.lax.dynamic_update_slice(kv_cache["mask"], dec_mask, (0, idx))}
    if return_hidden:
      if self.is_initializing():
        self.logits(h[:, :1])
      return h, new_cache
    return self.logits(h), new_cache

  def logits(self, hidden):
    cfg = self.config
    if cfg.tie_word_embeddings:
      scaled = jnp.asarray(hidden, self.dtype) * jnp.asarray(cfg.d_model ** -0.5, self.dtype)
      out = self.shared.attend(scaled)
    else:
      out = self.lm_head(hidden)
    return jnp.asarray(out, jnp.float32)

  def __call__(self, inputs_embeds, attention_mask, decoder_input_ids, decoder_attention_mask=None,
               deterministic: bool = True):
    enc = self.encode(inputs_embeds, attention_mask, deterministic)
    logits, _ = self.decode(decoder_input_ids, enc, attention_mask, decoder_attention_mask,
                            deterministic=deterministic)
    return logits
