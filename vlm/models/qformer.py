"""BLIP-2 Querying Transformer (Q-Former): BERT layers with query-only cross-attention.

Math: BLIP-2 spec sections 2.2-2.4 (/work/shared/design/blip2_spec.md); reference implementation
HF ``transformers/models/blip_2/modeling_blip_2.py`` (``Blip2QFormerModel``, ``Blip2QFormerLayer``,
``Blip2TextEmbeddings``) and LAVIS ``lavis/models/blip2_models/Qformer.py``.

Named axes in shapes: ``B`` batch, ``L`` sequence (queries ++ text), ``Q`` queries
(``query_length``), ``T`` text tokens, ``Nv`` image tokens, ``D`` Q-Former width, ``Dv``
image-encoder width, ``H`` heads, ``Dh`` head dim.

Parameter tree (mirrors HF, see /work/coord/CONTRACT.md)::

  layernorm/{scale,bias}
  encoder/layer_{i}/attention/{attention/{query,key,value}, output/{dense,LayerNorm}}
  encoder/layer_{i}/crossattention/...            (only when i % cross_attention_frequency == 0)
  encoder/layer_{i}/{intermediate_query/dense, output_query/{dense,LayerNorm}}
  encoder/layer_{i}/{intermediate/dense, output/{dense,LayerNorm}}  (if use_qformer_text_input)

With ``scan_layers=True`` the layers run under ``nn.scan`` over GROUPS of
``cross_attention_frequency`` consecutive layers (a group = one layer with cross-attention followed
by ``frequency - 1`` without, so every scanned step has the same parameter structure):
``encoder/layer_{g*f+j}`` becomes ``encoder/layers/layer_{j}`` with a leading ``LAYERS`` axis
[num_hidden_layers / f, ...] (BLIP-2: 6 groups of 2). Convert with :func:`stack_qformer_layers`
/ :func:`unstack_qformer_layers`. ``num_hidden_layers`` must be a multiple of ``f``.

float16 (``dtype=jnp.float16``; LAVIS trains the Q-Former under fp16 autocast): computed safely,
not refused. The layers are post-LayerNorm, so the residual stream itself is normalised; what can
exceed 65,504 is the FFN intermediate and the pre-LayerNorm sum ``dense(h) + residual``. For
float16 compute the attention scores are float32 (``vlm.nn.attention``), ``intermediate*/dense``
and its GELU, ``output*/dense`` and the attention ``output/dense`` produce float32
(``Dense(wide_float16=True)``: float16 x float16 products, float32 accumulation, input rows
pre-scaled into float16 range), and the residual sum is formed in float32 inside LayerNorm's
float32 computation. bfloat16 and float32 compute what they did before.
"""
from __future__ import annotations

import re
from typing import Any, Callable, Mapping

import flax.linen as nn
import jax.numpy as jnp

from vlm.models.presets import QFormerConfig
from vlm.nn import layers
from vlm.nn import partitioning as P
from vlm.nn.attention import dot_product_attention

Dtype = Any


def _kernel_init(config: QFormerConfig):
  """BERT init: N(0, initializer_range) for Linear weights and embeddings (HF ``_init_weights``)."""
  return nn.initializers.normal(stddev=config.initializer_range)


class QFormerMultiHeadAttention(nn.Module):
  """Query/key/value projections and scaled dot-product attention.

  HF ``Blip2QFormerMultiHeadAttention``.

  ``__call__(x [B,Lq,D], kv [B,Lk,Dk] | None, mask bool broadcastable to [B,H,Lq,Lk] | None,
  deterministic) -> [B,Lq,D]`` (heads concatenated, before the output projection). With
  ``kv=None`` it is self-attention; otherwise cross-attention with key/value taken from ``kv``.
  Attention-probability dropout (``attention_probs_dropout_prob``) uses the ``"dropout"`` rng.
  """
  config: QFormerConfig
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x, kv=None, mask=None, deterministic: bool = True):
    cfg = self.config
    heads = cfg.num_attention_heads
    head_dim = cfg.hidden_size // heads
    dense = lambda name: layers.Dense(cfg.hidden_size, kernel_axes=(P.EMBED, P.HEADS), name=name,
                                      dtype=self.dtype, param_dtype=self.param_dtype,
                                      kernel_init=_kernel_init(cfg))
    source = x if kv is None else kv
    q = dense("query")(x)
    k = dense("key")(source)
    v = dense("value")(source)
    split = lambda t: t.reshape(t.shape[:-1] + (heads, head_dim))
    rate = cfg.attention_probs_dropout_prob
    use_dropout = not deterministic and rate > 0.0
    out = dot_product_attention(
        split(q), split(k), split(v), mask=mask, dropout_rate=rate,
        dropout_rng=self.make_rng("dropout") if use_dropout else None,
        deterministic=not use_dropout, dtype=self.dtype)
    return out.reshape(out.shape[:-2] + (heads * head_dim,))


class QFormerSelfOutput(nn.Module):
  """``LayerNorm(Dropout(dense(h)) + residual)``, [B,L,in] -> [B,L,D].

  HF ``Blip2QFormerSelfOutput`` (``in_axis=HEADS``, after attention) and ``Blip2QFormerOutput``
  (``in_axis=MLP``, after the FFN; see :class:`QFormerOutput`) are the same computation. For
  float16 compute ``dense`` and the sum are float32 (module docstring); output in ``dtype``.
  """
  config: QFormerConfig
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32
  in_axis: str = P.HEADS

  @nn.compact
  def __call__(self, h, residual, deterministic: bool = True):
    cfg = self.config
    h = layers.Dense(cfg.hidden_size, kernel_axes=(self.in_axis, P.EMBED), name="dense",
                     dtype=self.dtype, param_dtype=self.param_dtype,
                     kernel_init=_kernel_init(cfg), wide_float16=True)(h)
    h = nn.Dropout(cfg.hidden_dropout_prob)(h, deterministic=deterministic)
    return layers.LayerNorm(epsilon=cfg.layer_norm_eps, name="LayerNorm", dtype=self.dtype,
                            param_dtype=self.param_dtype)(h + residual)


class QFormerAttention(nn.Module):
  """Attention block with its post-LN residual (HF ``Blip2QFormerAttention``).

  Submodules ``attention`` (q/k/v) and ``output`` (dense + LayerNorm). ``__call__(x [B,Lq,D],
  kv [B,Lk,Dk] | None, mask, deterministic) -> [B,Lq,D]``.
  """
  config: QFormerConfig
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x, kv=None, mask=None, deterministic: bool = True):
    kw = dict(config=self.config, dtype=self.dtype, param_dtype=self.param_dtype)
    a = QFormerMultiHeadAttention(**kw, name="attention")(x, kv, mask, deterministic)
    return QFormerSelfOutput(**kw, name="output")(a, x, deterministic)


class QFormerIntermediate(nn.Module):
  """``act(dense(h))``, [B,L,D] -> [B,L,intermediate_size] (HF ``Blip2QFormerIntermediate``).

  In ``dtype``; float32 for float16 compute (wide ``dense``, module docstring).
  """
  config: QFormerConfig
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, h):
    cfg = self.config
    h = layers.Dense(cfg.intermediate_size, kernel_axes=(P.EMBED, P.MLP), name="dense",
                     dtype=self.dtype, param_dtype=self.param_dtype,
                     kernel_init=_kernel_init(cfg), wide_float16=True)(h)
    return layers.activation(cfg.hidden_act)(h)


class QFormerOutput(QFormerSelfOutput):
  """FFN output: ``LayerNorm(Dropout(dense(h)) + residual)``, [B,L,I] -> [B,L,D] (HF
  ``Blip2QFormerOutput``)."""
  in_axis: str = P.MLP


class QFormerLayer(nn.Module):
  """One Q-Former layer (spec section 2.3; HF ``Blip2QFormerLayer``).

  Shared self-attention over all ``L`` positions; then, when ``query_length > 0``, the first
  ``query_length`` positions cross-attend to ``encoder_hidden_states`` (only if this layer has
  cross-attention) and go through the query FFN, while the remaining positions go through the text
  FFN. With ``query_length == 0`` every position uses the text FFN.

  ``__call__(x [B,L,D], self_mask bool [B,1,Lq|1,L] | None, encoder_hidden_states [B,Nv,Dv] | None,
  encoder_mask bool [B,1,1,Nv] | None, query_length: int, deterministic: bool) -> [B,L,D]``.

  Raises:
    ValueError: cross-attention layer with queries but no ``encoder_hidden_states``; text positions
      given to a Q-Former built with ``use_qformer_text_input=False``.
  """
  config: QFormerConfig
  layer_idx: int
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x, self_mask, encoder_hidden_states, encoder_mask, query_length: int,
               deterministic: bool):
    cfg = self.config
    kw = dict(config=cfg, dtype=self.dtype, param_dtype=self.param_dtype)
    length = x.shape[1]
    h = QFormerAttention(**kw, name="attention")(x, None, self_mask, deterministic)

    def text_ffn(t):
      if not cfg.use_qformer_text_input:
        raise ValueError(
            "this Q-Former has no text FFN (use_qformer_text_input=False) but got "
            f"{t.shape[1]} text positions (sequence length {length}, query_length {query_length}); "
            "pass query_length equal to the sequence length or build it with "
            "use_qformer_text_input=True")
      i = QFormerIntermediate(**kw, name="intermediate")(t)
      return QFormerOutput(**kw, name="output")(i, t, deterministic)

    if query_length > 0:
      hq = h[:, :query_length]
      if cfg.has_cross_attention(self.layer_idx):
        if encoder_hidden_states is None:
          raise ValueError(f"Q-Former layer {self.layer_idx} cross-attends to the image but "
                           "encoder_hidden_states is None; pass the image embeddings [B,Nv,Dv]")
        hq = QFormerAttention(**kw, name="crossattention")(hq, encoder_hidden_states,
                                                            encoder_mask, deterministic)
      i = QFormerIntermediate(**kw, name="intermediate_query")(hq)
      y = QFormerOutput(**kw, name="output_query")(i, hq, deterministic)
      if length > query_length:
        y = jnp.concatenate([y, text_ffn(h[:, query_length:])], axis=1)
    else:
      y = text_ffn(h)
    return P.constrain(y, (P.BATCH, P.LENGTH, P.EMBED))


def self_attention_mask(attention_mask, batch: int, length: int):
  """Turns a Q-Former attention mask into a bool mask broadcastable to [B,H,L,L] (True = attend).

  Args:
    attention_mask: None (attend everywhere), [B,L] key padding (0/1 or bool), or [B,L,L] full
      mask (0/1 or bool; row = query position, column = key position).
    batch, length: expected ``B`` and ``L``.
  Returns:
    None, bool [B,1,1,L] or bool [B,1,L,L].
  Raises:
    ValueError: for another rank or a shape that does not match [B,L] / [B,L,L].
  """
  if attention_mask is None:
    return None
  m = jnp.asarray(attention_mask)
  if m.ndim == 2 and m.shape == (batch, length):
    return m.astype(bool)[:, None, None, :]
  if m.ndim == 3 and m.shape == (batch, length, length):
    return m.astype(bool)[:, None, :, :]
  raise ValueError(f"attention_mask must be [B,L]={batch, length} key padding or "
                   f"[B,L,L]={batch, length, length} full mask, got shape {m.shape}")


class QFormerModel(nn.Module):
  """The Q-Former encoder: embedding LayerNorm + dropout, then ``num_hidden_layers`` layers.

  Spec sections 2.2-2.3; HF ``Blip2QFormerModel`` (whose ``query_embeds`` argument is our
  ``hidden_states``). No pooler, no final LayerNorm.

  Attributes:
    config: :class:`QFormerConfig`.
    remat: wrap each layer in ``nn.remat`` (recompute activations in the backward pass).
    scan_layers: the layers under ``nn.scan`` over groups of ``cross_attention_frequency`` layers
      (params ``encoder/layers/layer_{j}`` with a leading LAYERS axis; module docstring).
  Call args:
    hidden_states: float [B,L,D], query embeddings ++ text embeddings, BEFORE the embedding
      LayerNorm (``qformer/layernorm`` is applied here, to every position).
    query_length: static int ``Q`` in [0, L]; leading positions that cross-attend and use the
      query FFN.
    attention_mask: None, [B,L] key padding (0/1 or bool) or [B,L,L] full mask (e.g. the ITG
      UniLM mask of spec section 2.4).
    encoder_hidden_states: [B,Nv,Dv] image embeddings, required when ``query_length > 0``.
    deterministic: disables dropout; when False a ``"dropout"`` rng must be supplied.
    encoder_attention_mask: optional [B,Nv] image padding mask (default: all ones).
  Returns:
    float [B,L,D] (``dtype``).
  Raises:
    ValueError: bad ranks/shapes, ``query_length`` outside [0, L], width not ``hidden_size``;
      ``scan_layers`` with ``num_hidden_layers`` not a multiple of ``cross_attention_frequency``.
  """
  config: QFormerConfig
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32
  remat: bool = False
  scan_layers: bool = False

  @nn.compact
  def __call__(self, hidden_states, query_length: int = 0, attention_mask=None,
               encoder_hidden_states=None, deterministic: bool = True,
               encoder_attention_mask=None):
    cfg = self.config
    if hidden_states.ndim != 3 or hidden_states.shape[-1] != cfg.hidden_size:
      raise ValueError(f"hidden_states must be [B,L,{cfg.hidden_size}], got {hidden_states.shape}")
    batch, length, _ = hidden_states.shape
    query_length = int(query_length)
    if not 0 <= query_length <= length:
      raise ValueError(f"query_length must be in [0, {length}] (the sequence length), "
                       f"got {query_length}")
    self_mask = self_attention_mask(attention_mask, batch, length)
    encoder_mask = None
    if encoder_hidden_states is not None:
      if encoder_hidden_states.ndim != 3 or encoder_hidden_states.shape[0] != batch:
        raise ValueError(f"encoder_hidden_states must be [B={batch},Nv,Dv], got "
                         f"{encoder_hidden_states.shape}")
      if encoder_hidden_states.shape[-1] != cfg.encoder_hidden_size:
        raise ValueError(f"encoder_hidden_states width {encoder_hidden_states.shape[-1]} != "
                         f"config.encoder_hidden_size {cfg.encoder_hidden_size}")
      encoder_hidden_states = jnp.asarray(encoder_hidden_states, self.dtype)
      if encoder_attention_mask is not None:
        encoder_mask = self_attention_mask(encoder_attention_mask, batch,
                                           encoder_hidden_states.shape[1])

    x = layers.LayerNorm(epsilon=cfg.layer_norm_eps, name="layernorm", dtype=self.dtype,
                         param_dtype=self.param_dtype)(hidden_states)
    x = nn.Dropout(cfg.hidden_dropout_prob)(x, deterministic=deterministic)
    x = P.constrain(x, (P.BATCH, P.LENGTH, P.EMBED))
    f = cfg.cross_attention_frequency
    if self.scan_layers and cfg.num_hidden_layers % f:
      raise ValueError(f"scan_layers needs the Q-Former's num_hidden_layers "
                       f"({cfg.num_hidden_layers}) to be a multiple of cross_attention_frequency "
                       f"({f}): the scan runs over groups of {f} layers; set scan_layers=False")
    layer_cls = QFormerLayer
    if self.remat:
      # Arguments counted with self at 0: query_length (5) and deterministic (6) are static.
      layer_cls = nn.remat(QFormerLayer, static_argnums=(5, 6), prevent_cse=not self.scan_layers)
    encoder = _Encoder(config=cfg, layer_cls=layer_cls, scan_layers=self.scan_layers,
                       dtype=self.dtype, param_dtype=self.param_dtype, name="encoder")
    return encoder(x, self_mask, encoder_hidden_states, encoder_mask, query_length, deterministic)


class _LayerGroup(nn.Module):
  """``count`` consecutive layers ``layer_{j}`` (layer indices ``first + j``); with
  ``scan_body=True`` an ``nn.scan`` body returning ``(x, None)``."""
  config: QFormerConfig
  layer_cls: Callable = QFormerLayer
  count: int = 1
  first: int = 0
  scan_body: bool = False
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x, self_mask, encoder_hidden_states, encoder_mask, query_length: int,
               deterministic: bool):
    for j in range(self.count):
      x = self.layer_cls(config=self.config, layer_idx=self.first + j, dtype=self.dtype,
                         param_dtype=self.param_dtype, name=f"layer_{j}")(
                             x, self_mask, encoder_hidden_states, encoder_mask, query_length,
                             deterministic)
    return (x, None) if self.scan_body else x


class _Encoder(nn.Module):
  """Holds ``layer_{i}`` so the tree reads ``encoder/layer_{i}`` as in HF; with ``scan_layers``
  one scanned ``layers`` group of ``cross_attention_frequency`` layers instead."""
  config: QFormerConfig
  layer_cls: Callable = QFormerLayer
  scan_layers: bool = False
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x, self_mask, encoder_hidden_states, encoder_mask, query_length: int,
               deterministic: bool):
    cfg = self.config
    args = (self_mask, encoder_hidden_states, encoder_mask, query_length, deterministic)
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    if self.scan_layers:
      f = cfg.cross_attention_frequency
      # Group-relative indices 0..f-1 have the cross-attention pattern of g*f + j.
      scanned = nn.scan(_LayerGroup, variable_axes={"params": 0},
                        split_rngs={"params": True, "dropout": True},
                        in_axes=(nn.broadcast,) * len(args),
                        length=cfg.num_hidden_layers // f,
                        metadata_params={nn.PARTITION_NAME: P.LAYERS})
      x, _ = scanned(cfg, self.layer_cls, count=f, scan_body=True, name="layers", **kw)(x, *args)
      return x
    for i in range(cfg.num_hidden_layers):
      x = self.layer_cls(config=cfg, layer_idx=i, name=f"layer_{i}", **kw)(x, *args)
    return x


_QFORMER_LAYER_KEY = re.compile(r"^layer_(\d+)$")


def stack_qformer_layers(encoder: Mapping[str, Any], config: QFormerConfig) -> dict:
  """Unscanned -> scanned Q-Former ``encoder`` subtree: ``layer_{g*f+j}`` -> ``layers/layer_{j}``
  with leaves stacked on a new leading axis of size ``num_hidden_layers / f``
  (``f = config.cross_attention_frequency``). A tree without ``layer_{i}`` keys (already scanned)
  is returned unchanged. Reuses :func:`vlm.models.qwen3.stack_layers`.

  Raises:
    ValueError: a layer count that is not ``config.num_hidden_layers`` or not a multiple of ``f``,
      or layers of one group position with different structures.
  """
  from vlm.models.qwen3 import stack_layers
  idx = sorted(int(m.group(1)) for k in encoder if (m := _QFORMER_LAYER_KEY.match(str(k))))
  if not idx:
    return dict(encoder)
  f = config.cross_attention_frequency
  if idx != list(range(config.num_hidden_layers)) or len(idx) % f:
    raise ValueError(f"Q-Former encoder has layers {idx}; stacking needs layer_0 .. "
                     f"layer_{config.num_hidden_layers - 1} in groups of "
                     f"cross_attention_frequency={f}")
  out = {k: v for k, v in encoder.items() if not _QFORMER_LAYER_KEY.match(str(k))}
  groups = {f"layers_{g}": {f"layer_{j}": encoder[f"layer_{g * f + j}"] for j in range(f)}
            for g in range(len(idx) // f)}
  out["layers"] = stack_layers(groups)["layers"]
  return out


def unstack_qformer_layers(encoder: Mapping[str, Any], config: QFormerConfig) -> dict:
  """Scanned -> unscanned Q-Former ``encoder`` subtree (inverse of :func:`stack_qformer_layers`;
  a tree without ``layers`` is returned unchanged). Reuses
  :func:`vlm.models.qwen3.unstack_layers`."""
  from vlm.models.qwen3 import unstack_layers
  if "layers" not in encoder:
    return dict(encoder)
  f = config.cross_attention_frequency
  out = {k: v for k, v in encoder.items() if k != "layers"}
  groups = unstack_layers({"layers": encoder["layers"]})
  for gk, group in groups.items():
    g = int(gk.split("_")[1])
    for jk, layer in group.items():
      out[f"layer_{g * f + int(jk.split('_')[1])}"] = layer
  return out


class Blip2TextEmbeddings(nn.Module):
  """Word + absolute position embeddings of the Q-Former text, prefixed by query embeddings.

  Spec section 2.2; HF ``Blip2TextEmbeddings``. No token-type embedding, no LayerNorm (that is
  ``qformer/layernorm`` inside :class:`QFormerModel`). Queries get no position embedding and text
  positions start at 0 even when queries are prepended.

  Params: ``word_embeddings/embedding`` [vocab_size, D] (VOCAB, EMBED),
  ``position_embeddings/embedding`` [max_position_embeddings, D] (None, EMBED).
  ``__call__(input_ids int [B,T] | None, query_embeds [B,Q,D] | None) -> [B,Q+T,D]``.
  ``attend(x [...,D]) -> [...,vocab_size]``: the tied decoder ``x @ word_embeddings^T``.

  Raises:
    ValueError: both inputs None, ``T > max_position_embeddings``, batch mismatch.
  """
  config: QFormerConfig
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  def setup(self):
    cfg = self.config
    self.word_embeddings = layers.Embed(cfg.vocab_size, cfg.hidden_size, dtype=self.dtype,
                                        param_dtype=self.param_dtype,
                                        embedding_init=_kernel_init(cfg))
    self.position_embeddings = layers.Embed(cfg.max_position_embeddings, cfg.hidden_size,
                                            axes=(None, P.EMBED), dtype=self.dtype,
                                            param_dtype=self.param_dtype,
                                            embedding_init=_kernel_init(cfg))

  def __call__(self, input_ids=None, query_embeds=None):
    cfg = self.config
    if input_ids is None:
      if query_embeds is None:
        raise ValueError("Blip2TextEmbeddings needs input_ids, query_embeds or both")
      return jnp.asarray(query_embeds, self.dtype)
    if input_ids.ndim != 2:
      raise ValueError(f"input_ids must be [B,T], got shape {input_ids.shape}")
    length = input_ids.shape[1]
    if length > cfg.max_position_embeddings:
      raise ValueError(f"text length {length} exceeds max_position_embeddings "
                       f"{cfg.max_position_embeddings}; truncate the text")
    x = self.word_embeddings(input_ids) + self.position_embeddings(jnp.arange(length))[None]
    if query_embeds is not None:
      if query_embeds.shape[0] != input_ids.shape[0]:
        raise ValueError(f"query_embeds batch {query_embeds.shape[0]} != input_ids batch "
                         f"{input_ids.shape[0]}")
      x = jnp.concatenate([jnp.asarray(query_embeds, self.dtype), x], axis=1)
    return x

  def attend(self, x):
    return self.word_embeddings.attend(x)
