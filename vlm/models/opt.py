"""OPT decoder-only language model (HF ``OPTForCausalLM``) in Flax linen.

Source of the math: HF transformers 4.57.1 ``transformers/models/opt/modeling_opt.py``
(``OPTLearnedPositionalEmbedding``, ``OPTAttention``, ``OPTDecoderLayer``, ``OPTDecoder``,
``OPTForCausalLM``) and the BLIP-2 design spec section 4.2 (OPT as the frozen LLM of stage 2).

* Token embeddings ``embed_tokens`` [V, Dw] (``Dw = word_embed_proj_dim``, no scaling), optional
  ``project_in`` Dw -> D, plus learned positions ``embed_positions`` [P + 2, D]. Positions come from
  the attention mask, ``pos = cumsum(mask) * mask - 1`` (pads get -1), looked up at ``pos + 2``
  (:data:`POSITION_OFFSET`), so left padding does not shift the positions of real tokens.
* ``num_hidden_layers`` layers, each ``self_attn`` (q/k/v/out projections with bias, scale
  ``hd ** -0.5``, causal + key-padding mask) and ``fc1 -> act -> fc2``, both residual. Pre-LN
  (``do_layer_norm_before=True``, OPT-125m..66b except 350m): ``self_attn_layer_norm`` and
  ``final_layer_norm`` normalise each sublayer's input; post-LN: they normalise the residual sums.
  Dropout (``config.dropout``) on both sublayer outputs, attention dropout on the probabilities.
* A model-level ``final_layer_norm`` only when ``do_layer_norm_before`` (HF ``OPTDecoder``), then
  optional ``project_out`` D -> Dw, and the LM head ``lm_head`` [Dw, V] (tied to ``embed_tokens``
  when ``tie_word_embeddings``; then there is no ``lm_head`` parameter).

Parameter tree (names follow the HF keys, see :mod:`vlm.convert.hf_opt`):
``embed_tokens/embedding``, ``embed_positions/embedding``, ``project_in/kernel``?, ``project_out/kernel``?,
``layers_{i}/{self_attn/{q_proj,k_proj,v_proj,out_proj}/{kernel,bias}, self_attn_layer_norm,
fc1, fc2, final_layer_norm}``, ``final_layer_norm``?, ``lm_head/kernel``?. With
``scan_layers=True`` the ``layers_{i}`` subtrees become one ``layers`` subtree with a leading
``LAYERS`` axis (convert with :func:`vlm.models.qwen3.stack_layers` / ``unstack_layers``).

float16 compute (``dtype=jnp.float16``) follows ``vlm.nn.layers``: the residual stream is float32
(:func:`vlm.nn.layers.residual_dtype`), ``out_proj``, ``fc1`` and ``fc2`` are wide Dense layers
(float32 results, inputs beyond 65,504 pre-scaled), attention scores and LayerNorm statistics are
float32, logits are float32. bfloat16 and float32 run in the compute dtype.
"""
from __future__ import annotations

import dataclasses
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from vlm.nn import layers
from vlm.nn import partitioning as P
from vlm.nn.attention import (cache_masks, cached_attention, causal_padding_mask,
                              dot_product_attention, init_kv_cache)

Dtype = Any

POSITION_OFFSET = 2  # HF OPTLearnedPositionalEmbedding.offset: row = position id + 2

# HF OPTConfig.__init__ defaults (used for keys an HF config dict leaves out).
_HF_DEFAULTS = dict(vocab_size=50272, hidden_size=768, num_hidden_layers=12, ffn_dim=3072,
                    max_position_embeddings=2048, do_layer_norm_before=True,
                    word_embed_proj_dim=None, dropout=0.1, attention_dropout=0.0,
                    num_attention_heads=12, activation_function="relu", init_std=0.02,
                    pad_token_id=1, bos_token_id=2, eos_token_id=2, enable_bias=True,
                    layer_norm_elementwise_affine=True, tie_word_embeddings=True)


@dataclasses.dataclass(frozen=True)
class OPTConfig:
  """OPT configuration with the HF ``OPTConfig`` field names (defaults: facebook/opt-2.7b).

  ``word_embed_proj_dim`` None (or equal to ``hidden_size``, normalised to None) means no
  ``project_in``/``project_out``; otherwise the embeddings and the LM head are ``Dw`` wide and
  projected to/from ``hidden_size`` (HF OPT-350m). Use :attr:`embed_dim` for the resolved width.
  Raises:
    ValueError: non-positive sizes, ``hidden_size`` not divisible by the heads, an unknown
      activation, dropout outside [0, 1).
  """
  vocab_size: int = 50272
  hidden_size: int = 2560
  num_hidden_layers: int = 32
  ffn_dim: int = 10240
  num_attention_heads: int = 32
  max_position_embeddings: int = 2048
  do_layer_norm_before: bool = True
  word_embed_proj_dim: int | None = None
  activation_function: str = "relu"
  dropout: float = 0.1
  attention_dropout: float = 0.0
  enable_bias: bool = True
  layer_norm_elementwise_affine: bool = True
  pad_token_id: int = 1
  bos_token_id: int = 2
  eos_token_id: int = 2
  init_std: float = 0.02
  tie_word_embeddings: bool = True

  def __post_init__(self):
    for name in ("vocab_size", "hidden_size", "num_hidden_layers", "ffn_dim",
                 "num_attention_heads", "max_position_embeddings"):
      v = getattr(self, name)
      if not isinstance(v, int) or isinstance(v, bool) or v < 1:
        raise ValueError(f"OPTConfig.{name} must be a positive int, got {v!r}")
    if self.hidden_size % self.num_attention_heads:
      raise ValueError(f"OPTConfig.hidden_size {self.hidden_size} must be divisible by "
                       f"num_attention_heads {self.num_attention_heads}")
    if self.word_embed_proj_dim is not None:
      if not isinstance(self.word_embed_proj_dim, int) or self.word_embed_proj_dim < 1:
        raise ValueError(f"OPTConfig.word_embed_proj_dim must be None or a positive int, got "
                         f"{self.word_embed_proj_dim!r}")
      if self.word_embed_proj_dim == self.hidden_size:
        object.__setattr__(self, "word_embed_proj_dim", None)
    layers.activation(self.activation_function)  # ValueError listing the known names
    for name in ("dropout", "attention_dropout"):
      if not 0.0 <= getattr(self, name) < 1.0:
        raise ValueError(f"OPTConfig.{name} must be in [0, 1), got {getattr(self, name)!r}")
    if isinstance(self.eos_token_id, list):
      object.__setattr__(self, "eos_token_id", tuple(self.eos_token_id))

  @property
  def embed_dim(self) -> int:
    """Width of the token embeddings and of the LM head input (``Dw``)."""
    return self.word_embed_proj_dim or self.hidden_size

  @property
  def head_dim(self) -> int:
    return self.hidden_size // self.num_attention_heads

  @classmethod
  def from_hf_config(cls, d: dict) -> "OPTConfig":
    """From an HF ``config.json`` dict of ``model_type`` "opt" (or a BLIP-2 ``text_config``).

    Keys it leaves out take HF ``OPTConfig``'s defaults (not this class's); other keys are ignored.
    Raises:
      ValueError: another ``model_type``; ``_remove_final_layer_norm`` set (pre-4.20 fine-tunes,
        not supported); the field checks of the class.
    """
    if d.get("model_type", "opt") != "opt":
      raise ValueError(f"not an OPT config: model_type {d.get('model_type')!r} (expected 'opt')")
    if d.get("_remove_final_layer_norm", False):
      raise ValueError("OPT configs with _remove_final_layer_norm=True (pre-4.20 metaseq "
                       "fine-tunes) are not supported; remove the key if the checkpoint has "
                       "model.decoder.final_layer_norm weights")
    kw = {k: d.get(k, v) for k, v in _HF_DEFAULTS.items()}
    return cls(**kw)

  def to_hf_config(self) -> dict:
    """HF ``config.json`` dict that transformers' ``OPTConfig`` / ``OPTForCausalLM`` read back."""
    d = {k: getattr(self, k) for k in _HF_DEFAULTS}
    d["word_embed_proj_dim"] = self.embed_dim
    if isinstance(d["eos_token_id"], tuple):
      d["eos_token_id"] = list(d["eos_token_id"])
    d.update(model_type="opt", architectures=["OPTForCausalLM"], layerdrop=0.0,
             _remove_final_layer_norm=False, use_cache=True, torch_dtype="float32")
    return d

  def num_parameters(self) -> int:
    """Analytic parameter count of :class:`OPTForCausalLM` (HF counts the tied head once)."""
    d, dw, f, v = self.hidden_size, self.embed_dim, self.ffn_dim, self.vocab_size
    b = 1 if self.enable_bias else 0
    ln = 2 * d if self.layer_norm_elementwise_affine else 0
    per_layer = 4 * (d * d + b * d) + (d * f + b * f) + (f * d + b * d) + 2 * ln
    n = v * dw + (self.max_position_embeddings + POSITION_OFFSET) * d
    n += self.num_hidden_layers * per_layer
    if self.do_layer_norm_before:
      n += ln
    if dw != d:
      n += 2 * d * dw
    if not self.tie_word_embeddings:
      n += dw * v
    return n


OPT_PRESETS: dict[str, OPTConfig] = {
    # facebook/opt-2.7b config.json
    "opt_2.7b": OPTConfig(),
    # facebook/opt-6.7b config.json
    "opt_6.7b": OPTConfig(hidden_size=4096, ffn_dim=16384, num_hidden_layers=32,
                          num_attention_heads=32),
    # tiny random model for tests and CPU runs; vocab kept at 50272 for the real OPT tokenizer,
    # 128 positions cover BLIP-2's 32 queries + 32 text tokens + generated tokens
    "opt_tiny": OPTConfig(hidden_size=256, num_hidden_layers=4, num_attention_heads=4,
                          ffn_dim=1024, max_position_embeddings=128),
}


def opt_preset(name: str, **overrides) -> OPTConfig:
  """The preset ``name`` of :data:`OPT_PRESETS` with dataclass fields replaced by ``overrides``.

  Raises:
    KeyError: unknown preset (lists the known names).
    TypeError: an override that is not an :class:`OPTConfig` field.
  """
  if name not in OPT_PRESETS:
    raise KeyError(f"unknown OPT preset {name!r}; known: {sorted(OPT_PRESETS)}")
  return dataclasses.replace(OPT_PRESETS[name], **overrides)


def opt_position_ids(attention_mask) -> jax.Array:
  """HF OPT position ids from a 0/1 mask [B, L]: ``cumsum(mask) * mask - 1`` (int32 [B, L]).

  Real tokens get 0, 1, 2, ... in order whatever the padding side; pads get -1. The embedding
  lookup adds :data:`POSITION_OFFSET` (so pads read row 1).
  """
  m = jnp.asarray(attention_mask, jnp.int32)
  return jnp.cumsum(m, axis=1) * m - 1


def init_cache(config: OPTConfig, batch: int, max_length: int, dtype: Dtype = jnp.float32):
  """Empty KV cache for :class:`OPTForCausalLM` (:func:`vlm.nn.attention.init_kv_cache`).

  Returns ``{"k": [NL, B, H, T, hd], "v": same, "mask": bool [B, T]}`` with ``T = max_length``;
  ``mask`` marks slots holding real (non-pad) tokens.
  """
  return init_kv_cache(config.num_hidden_layers, batch, config.num_attention_heads, max_length,
                       config.head_dim, dtype)


class _PlainLayerNorm(nn.Module):
  """LayerNorm without parameters (HF ``elementwise_affine=False``), float32 statistics."""
  epsilon: float = 1e-5
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  def __call__(self, x):
    x32 = jnp.asarray(x, jnp.float32)
    mean = jnp.mean(x32, axis=-1, keepdims=True)
    var = jnp.mean(jnp.square(x32 - mean), axis=-1, keepdims=True)
    return jnp.asarray((x32 - mean) * jax.lax.rsqrt(var + self.epsilon), self.dtype)


def _layer_norm(config: OPTConfig, name: str | None = None, **kw):
  """HF ``nn.LayerNorm(eps=1e-5, elementwise_affine=config.layer_norm_elementwise_affine)``."""
  if config.layer_norm_elementwise_affine:
    return layers.LayerNorm(1e-5, name=name, **kw)
  return _PlainLayerNorm(1e-5, name=name, **kw)


class OPTAttention(nn.Module):
  """Multi-head causal self-attention (HF ``OPTAttention``), [B, L, D] -> [B, L, D].

  Call args:
    x: [B, L, D].
    mask: without a cache, bool broadcastable to [B, 1, L, L]; with one, the pair
      ``(mask_cache [B, 1, 1, T] or None, mask_new [B, 1, L, L])`` (:func:`cache_masks`).
    cache: None or this layer's ``(k, v)`` each [B, H, T, hd] before the call (only read).
    deterministic: disables attention dropout (rng "dropout"); the cached path never drops.
  Returns:
    (out [B, L, D] (float32 for float16 compute), None or ``(k_new, v_new)`` [B, L, H, hd]).
  """
  config: OPTConfig
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x, mask, cache=None, deterministic: bool = True):
    cfg = self.config
    batch, length, _ = x.shape
    h, hd, d = cfg.num_attention_heads, cfg.head_dim, cfg.hidden_size
    dense = lambda name, axes, wide=False: layers.Dense(
        d, kernel_axes=axes, use_bias=cfg.enable_bias, name=name, dtype=self.dtype,
        param_dtype=self.param_dtype, kernel_init=nn.initializers.normal(cfg.init_std),
        wide_float16=wide)
    q = dense("q_proj", (P.EMBED, P.HEADS))(x).reshape(batch, length, h, hd)
    k = dense("k_proj", (P.EMBED, P.HEADS))(x).reshape(batch, length, h, hd)
    v = dense("v_proj", (P.EMBED, P.HEADS))(x).reshape(batch, length, h, hd)
    q, k, v = (jnp.asarray(t, self.dtype) for t in (q, k, v))
    if cache is not None:
      mask_cache, mask_new = mask
      o = cached_attention(q, k, v, cache[0], cache[1], mask_cache, mask_new, hd ** -0.5,
                           self.dtype)
      new = (k, v)
    else:
      use_dropout = not deterministic and cfg.attention_dropout > 0.0
      o = dot_product_attention(
          q, k, v, mask=mask, scale=hd ** -0.5, dropout_rate=cfg.attention_dropout,
          dropout_rng=self.make_rng("dropout") if use_dropout else None,
          deterministic=not use_dropout, dtype=self.dtype)
      new = None
    out = dense("out_proj", (P.HEADS, P.EMBED), True)(o.reshape(batch, length, d))
    return out, new


class OPTDecoderLayer(nn.Module):
  """One OPT layer (HF ``OPTDecoderLayer``), pre-LN or post-LN per ``do_layer_norm_before``.

  The call signature is that of an ``nn.scan`` body (both layer layouts use it).
  Call args:
    h: [B, L, D] residual stream (float32 for float16 compute).
    xs: ``(cache_k, cache_v)`` each [B, H, T, hd], or ``(None, None)`` without a cache.
    mask: see :class:`OPTAttention`.
    deterministic: disables dropout (rng "dropout").
  Returns:
    (h [B, L, D] in the residual dtype, (k_new, v_new) [B, L, H, hd] or (None, None)).
  """
  config: OPTConfig
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, h, xs, mask, deterministic: bool = True):
    cfg = self.config
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    rdt = layers.residual_dtype(self.dtype)
    pre = cfg.do_layer_norm_before
    ck, cv = xs
    cache = None if ck is None else (ck, cv)
    attn_norm = _layer_norm(cfg, "self_attn_layer_norm", **kw)
    ffn_norm = _layer_norm(cfg, "final_layer_norm", **kw)
    dropout = nn.Dropout(cfg.dropout)

    x = attn_norm(h) if pre else h
    a, new = OPTAttention(cfg, name="self_attn", **kw)(x, mask, cache, deterministic)
    h = h + jnp.asarray(dropout(a, deterministic=deterministic), rdt)
    if not pre:
      h = jnp.asarray(attn_norm(h), rdt)

    x = ffn_norm(h) if pre else h
    dense = lambda f, name, axes: layers.Dense(
        f, kernel_axes=axes, use_bias=cfg.enable_bias, name=name, wide_float16=True,
        kernel_init=nn.initializers.normal(cfg.init_std), **kw)
    m = dense(cfg.ffn_dim, "fc1", (P.EMBED, P.MLP))(x)
    m = layers.activation(cfg.activation_function)(m)
    m = dense(cfg.hidden_size, "fc2", (P.MLP, P.EMBED))(m)
    h = h + jnp.asarray(dropout(m, deterministic=deterministic), rdt)
    if not pre:
      h = jnp.asarray(ffn_norm(h), rdt)
    h = P.constrain(h, (P.BATCH, P.LENGTH, P.EMBED))
    return h, (None, None) if new is None else new


class OPTForCausalLM(nn.Module):
  """OPT causal LM (HF ``OPTForCausalLM``: ``OPTDecoder`` + ``lm_head``), taking embeddings.

  Attributes:
    config: :class:`OPTConfig`.
    dtype / param_dtype: compute / storage dtypes (float32, bfloat16, float16; module docstring).
    scan_layers: run the layers under ``nn.scan`` (params ``layers/...`` with a leading LAYERS
      axis).
    remat: wrap each layer in ``nn.remat``.

  Methods:
    embed(input_ids int [B, L]) -> [B, L, Dw] word embeddings (no scaling, no positions).
    logits(hidden [..., Dw]) -> float32 [..., V] (tied ``embed_tokens`` or ``lm_head``).
    __call__(inputs_embeds [B, L, Dw], attention_mask=None, position_ids=None, kv_cache=None,
      cache_index=None, deterministic=True, return_hidden=False)
      -> (logits float32 [B, L, V], or with ``return_hidden`` the hidden states [B, L, Dw] after
      the final norm and ``project_out``; the new kv_cache or None).

      ``attention_mask`` 0/1 or bool [B, L] (None: all real); left or right padding. Pad queries
      give finite garbage. ``position_ids`` int [B, L] (None: HF's rule
      :func:`opt_position_ids`; with a cache it continues over the whole sequence, counting the
      real tokens in ``kv_cache["mask"][:, :cache_index]``), looked up at ``+ POSITION_OFFSET``;
      ids beyond ``max_position_embeddings - 1`` read NaN (``jnp.take`` fill). ``kv_cache`` from
      :func:`init_cache`: the new tokens are written at slots ``cache_index .. cache_index+L-1``
      and attend to the valid old slots and causally to themselves; a Python ``cache_index=0``
      means an empty cache (prefill). ``deterministic=False`` turns on dropout (rng "dropout").
  Raises:
    ValueError: bad shapes of ``inputs_embeds``/``attention_mask``/``position_ids``, a cache
      without ``cache_index`` or of the wrong layout.
  """
  config: OPTConfig
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32
  scan_layers: bool = False
  remat: bool = False

  def setup(self):
    cfg = self.config
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    init = nn.initializers.normal(cfg.init_std)
    self.embed_tokens = layers.Embed(cfg.vocab_size, cfg.embed_dim, embedding_init=init, **kw)
    self.embed_positions = layers.Embed(cfg.max_position_embeddings + POSITION_OFFSET,
                                        cfg.hidden_size, axes=(None, P.EMBED),
                                        embedding_init=init, **kw)
    if cfg.embed_dim != cfg.hidden_size:
      self.project_in = layers.Dense(cfg.hidden_size, kernel_axes=(None, P.EMBED),
                                     use_bias=False, kernel_init=init, **kw)
      self.project_out = layers.Dense(cfg.embed_dim, kernel_axes=(P.EMBED, None),
                                      use_bias=False, kernel_init=init, **kw)
    if cfg.do_layer_norm_before:
      self.final_layer_norm = _layer_norm(cfg, **kw)
    if not cfg.tie_word_embeddings:
      self.lm_head = layers.Dense(cfg.vocab_size, kernel_axes=(P.EMBED, P.VOCAB), use_bias=False,
                                  kernel_init=init, **kw)
    layer_cls = OPTDecoderLayer
    if self.remat:  # argument 4 (self = 0) is the Python bool ``deterministic``
      layer_cls = nn.remat(layer_cls, prevent_cse=not self.scan_layers, static_argnums=(4,))
    if self.scan_layers:
      scanned = nn.scan(layer_cls, variable_axes={"params": 0},
                        split_rngs={"params": True, "dropout": True},
                        in_axes=(0, nn.broadcast, nn.broadcast),
                        length=cfg.num_hidden_layers,
                        metadata_params={nn.PARTITION_NAME: P.LAYERS})
      self.layers = scanned(cfg, **kw)
    else:
      self.layers = [layer_cls(cfg, **kw) for _ in range(cfg.num_hidden_layers)]

  def embed(self, input_ids):
    if input_ids.ndim != 2:
      raise ValueError(f"input_ids must be int [B, L], got shape {input_ids.shape}")
    return self.embed_tokens(input_ids)

  def logits(self, hidden):
    if self.config.tie_word_embeddings:
      out = self.embed_tokens.attend(hidden)
    else:
      out = self.lm_head(hidden)
    return jnp.asarray(out, jnp.float32)

  def __call__(self, inputs_embeds, attention_mask=None, position_ids=None, kv_cache=None,
               cache_index=None, deterministic: bool = True, return_hidden: bool = False):
    cfg = self.config
    if inputs_embeds.ndim != 3 or inputs_embeds.shape[-1] != cfg.embed_dim:
      raise ValueError(f"inputs_embeds must be [B, L, {cfg.embed_dim}] (word_embed_proj_dim), "
                       f"got {inputs_embeds.shape}; embed token ids with OPTForCausalLM.embed")
    batch, length, _ = inputs_embeds.shape
    if attention_mask is None:
      attention_mask = jnp.ones((batch, length), bool)
    if tuple(attention_mask.shape) != (batch, length):
      raise ValueError(f"attention_mask must be [B, L] = {(batch, length)}, got "
                       f"{attention_mask.shape}")
    attention_mask = jnp.asarray(attention_mask, bool)
    if position_ids is not None and tuple(position_ids.shape) != (batch, length):
      raise ValueError(f"position_ids must be int [B, L] = {(batch, length)}, got "
                       f"{position_ids.shape}")

    ck = cv = new_cache_mask = None
    past = None
    if kv_cache is not None:
      if cache_index is None:
        raise ValueError("cache_index is required with kv_cache (slot of the first new token)")
      want = (cfg.num_hidden_layers, batch, cfg.num_attention_heads)
      if (kv_cache["k"].ndim != 5 or tuple(kv_cache["k"].shape[:3]) != want
          or kv_cache["k"].shape[4] != cfg.head_dim or kv_cache["mask"].shape[0] != batch):
        raise ValueError(f"kv_cache k must be [NL, B, H, T, hd] with NL, B, H = {want} and hd = "
                         f"{cfg.head_dim}, got {kv_cache['k'].shape}; build it with init_cache")
      static_empty = isinstance(cache_index, int) and cache_index == 0
      if static_empty:
        mask = (None, causal_padding_mask(attention_mask, batch, length))
      else:
        mask = cache_masks(attention_mask, kv_cache["mask"], cache_index)
      cache_index = jnp.asarray(cache_index, jnp.int32)
      if not static_empty:  # real tokens already in the cache (HF: cumsum over the whole mask)
        slots = jnp.arange(kv_cache["mask"].shape[1])
        past = jnp.sum(kv_cache["mask"] & (slots[None, :] < cache_index), axis=1,
                       dtype=jnp.int32)
      new_cache_mask = jax.lax.dynamic_update_slice(kv_cache["mask"], attention_mask,
                                                    (0, cache_index))
      ck, cv = kv_cache["k"], kv_cache["v"]
    else:
      mask = causal_padding_mask(attention_mask, batch, length)

    if position_ids is None:
      m = jnp.asarray(attention_mask, jnp.int32)
      count = jnp.cumsum(m, axis=1) if past is None else past[:, None] + jnp.cumsum(m, axis=1)
      position_ids = count * m - 1
    pos = self.embed_positions(jnp.asarray(position_ids, jnp.int32) + POSITION_OFFSET)

    if self.is_initializing():  # init from embeddings still creates the (untied) token table
      self.embed_tokens(jnp.zeros((1, 1), jnp.int32))
    rdt = layers.residual_dtype(self.dtype)
    x = inputs_embeds
    if cfg.embed_dim != cfg.hidden_size:
      x = self.project_in(x)
    h = jnp.asarray(x, rdt) + jnp.asarray(pos, rdt)
    h = P.constrain(h, (P.BATCH, P.LENGTH, P.EMBED))
    if self.scan_layers:
      h, (nk, nv) = self.layers(h, (ck, cv), mask, deterministic)
    else:
      nks, nvs = [], []
      for i, layer in enumerate(self.layers):
        xs = (None, None) if ck is None else (ck[i], cv[i])
        h, (k_i, v_i) = layer(h, xs, mask, deterministic)
        nks.append(k_i)
        nvs.append(v_i)
      nk = None if ck is None else jnp.stack(nks)
      nv = None if cv is None else jnp.stack(nvs)
    if cfg.do_layer_norm_before:
      h = self.final_layer_norm(h)
    if cfg.embed_dim != cfg.hidden_size:
      h = self.project_out(h)
    h = jnp.asarray(h, self.dtype)

    new_cache = None
    if kv_cache is not None:  # one write of every layer's new keys/values
      start = (0, 0, 0, cache_index, 0)
      heads_first = lambda x, c: jnp.asarray(jnp.swapaxes(x, 2, 3), c.dtype)  # [NL,B,H,L,hd]
      new_cache = {"k": jax.lax.dynamic_update_slice(ck, heads_first(nk, ck), start),
                   "v": jax.lax.dynamic_update_slice(cv, heads_first(nv, cv), start),
                   "mask": new_cache_mask}
    if return_hidden:
      if self.is_initializing():
        self.logits(h[:, :1])  # init with return_hidden still creates lm_head
      return h, new_cache
    return self.logits(h), new_cache
