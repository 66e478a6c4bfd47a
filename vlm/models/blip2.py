"""BLIP-2 stage 1: image encoder + Q-Former + ITC / ITM / ITG heads.

Math: BLIP-2 spec sections 2-3 and 5 (/work/shared/design/blip2_spec.md); references HF
``Blip2ForImageTextRetrieval`` (``transformers/models/blip_2/modeling_blip_2.py``) for the ITC and
ITM paths and LAVIS ``Blip2Qformer.forward`` for ITG (HF has no LM head).

Named axes: ``B`` batch, ``S`` image side, ``Nv`` image tokens (patches + class), ``Dv`` image
width, ``Q`` query tokens, ``T`` text tokens, ``D`` Q-Former width, ``E`` ITC feature width
(``image_text_hidden_size``), ``V`` Q-Former vocabulary.

The ITG pass is one pass over ``[Q; T]`` with the UniLM mask of spec section 2.4 instead of
LAVIS's KV-cache reuse; both give the same outputs because queries never attend to text (spec
section 3.4; checked in tests/equivalence/test_blip2_qformer.py).

float16 (``dtype=jnp.float16``): supported, computed safely (decisions in
:mod:`vlm.models.eva_vit`, :mod:`vlm.models.qformer`, ``vlm.nn.layers``). The heads here: the ITG
transform ``dense`` + GELU are float32 (wide) before their LayerNorm, the tied decoder
(``Embed.attend``) accumulates and returns float32, so ``itg_logits`` are float32; the ITC
features are L2-normalised in float32 (values in [-1, 1]) and the ITC similarities are computed in
float32 by ``vlm.objectives.itc``. bfloat16 and float32 compute what they did before.
"""
from __future__ import annotations

from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp

from vlm.models.clip_vit import ClipVisionModel
from vlm.models.eva_vit import EvaVisionModel
from vlm.models.presets import Blip2Config, QFormerConfig
from vlm.models.qformer import (Blip2TextEmbeddings, QFormerModel, stack_qformer_layers,
                                unstack_qformer_layers)
from vlm.nn import layers
from vlm.nn import partitioning as P

Dtype = Any


def l2_normalize(x, eps: float = 1e-12):
  """``x / max(||x||_2, eps)`` over the last axis (torch ``F.normalize``), computed in float32."""
  x32 = jnp.asarray(x, jnp.float32)
  norm = jnp.sqrt(jnp.sum(jnp.square(x32), axis=-1, keepdims=True))
  return jnp.asarray(x32 / jnp.maximum(norm, eps), x.dtype)


def itg_attention_mask(text_attention_mask, num_queries: int):
  """The multimodal causal (UniLM) self-attention mask of spec section 2.4.

  Queries attend only to queries; text position ``t`` attends to every query and to text
  positions ``<= t``; keys that are text padding are masked for every row.

  Args:
    text_attention_mask: [B,T] 0/1 or bool key padding of the text.
    num_queries: ``Q``.
  Returns:
    bool [B, Q+T, Q+T] (True = attend).
  """
  text_mask = jnp.asarray(text_attention_mask).astype(bool)
  batch, t = text_mask.shape
  q = num_queries
  top = jnp.concatenate([jnp.ones((q, q), bool), jnp.zeros((q, t), bool)], axis=1)
  bottom = jnp.concatenate([jnp.ones((t, q), bool), jnp.tril(jnp.ones((t, t), bool))], axis=1)
  pattern = jnp.concatenate([top, bottom], axis=0)
  keys = jnp.concatenate([jnp.ones((batch, q), bool), text_mask], axis=1)
  return pattern[None] & keys[:, None, :]


def layers_scanned(params) -> bool | None:
  """The layer layout of a BLIP-2 params tree (stage 1 or 2; plain or under ``"params"``):
  True when its vision tower / Q-Former hold a scanned ``encoder/layers`` subtree, False when
  they hold ``layers_{i}`` / ``layer_{i}``, None when the tree has neither part."""
  if "params" in params and len(params) == 1:
    params = params["params"]
  for part in ("vision_model", "qformer"):
    enc = params.get(part, {}).get("encoder", {}) if hasattr(params.get(part, {}), "get") else {}
    if enc:
      return "layers" in enc
  return None


def convert_layer_layout(params, config, scan_layers: bool):
  """A BLIP-2 params tree (stage 1 or stage 2, plain or under ``"params"``) with its vision
  tower and Q-Former in the scanned (``scan_layers=True``) or unscanned layout, whichever it was
  in (the LLM subtree and every other key are left as they are; partial trees, e.g. only the
  Q-Former, are fine).

  Scanned: ``vision_model/encoder/layers_{i}`` -> ``vision_model/encoder/layers`` [Lv, ...]
  (:func:`vlm.models.qwen3.stack_layers`) and ``qformer/encoder/layer_{g*f+j}`` ->
  ``qformer/encoder/layers/layer_{j}`` [Lq/f, ...]
  (:func:`vlm.models.qformer.stack_qformer_layers`).
  Leaves may be numpy (stacked on the host CPU device, returned as numpy), jax arrays or, for
  unstacking/stacking under ``jax.eval_shape``, tracers.

  Args:
    config: a :class:`~vlm.models.presets.Blip2Config` or ``Blip2Stage2Config`` (for the
      Q-Former's ``cross_attention_frequency`` and layer count).
  Raises:
    ValueError: layer counts that do not fit ``config`` (from the stacking helpers).
  """
  import numpy as np
  from vlm.models.qwen3 import stack_layers, unstack_layers
  if "params" in params and len(params) == 1:
    return {"params": convert_layer_layout(params["params"], config, scan_layers)}
  leaves = jax.tree_util.tree_leaves(params)
  host = bool(leaves) and all(isinstance(x, np.ndarray) for x in leaves)
  out = dict(params)

  def convert():
    if "vision_model" in out and "encoder" in out["vision_model"]:
      vm = dict(out["vision_model"])
      fn = stack_layers if scan_layers else unstack_layers
      vm["encoder"] = fn(dict(vm["encoder"]))
      out["vision_model"] = vm
    if "qformer" in out and "encoder" in out["qformer"]:
      qf = dict(out["qformer"])
      fn = stack_qformer_layers if scan_layers else unstack_qformer_layers
      qf["encoder"] = fn(dict(qf["encoder"]), config.qformer)
      out["qformer"] = qf

  if host:  # stack on the host, never on an accelerator
    try:
      device = jax.local_devices(backend="cpu")[0]
    except RuntimeError:  # no CPU backend in this process (JAX_PLATFORMS without cpu)
      device = None
    with jax.default_device(device):
      convert()
    return jax.tree.map(np.asarray, out)
  convert()
  return out


class Blip2LMHead(nn.Module):
  """BERT MLM head reused as the ITG causal-LM head (LAVIS ``Qformer.cls``; spec section 2.5).

  Tree: ``predictions/{transform/{dense, LayerNorm}, bias [V]}``; the decoder matrix is tied to
  the word embeddings and passed in as ``decoder`` (a function [..., D] -> [..., V]).
  ``__call__(h [B,T,D], decoder) -> logits [B,T,V] = decoder(LN(GELU(h W + b))) + bias``.
  """
  config: QFormerConfig
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, h, decoder: Callable):
    return _LMPredictions(self.config, self.dtype, self.param_dtype, name="predictions")(h, decoder)


class _LMPredictions(nn.Module):
  config: QFormerConfig
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, h, decoder: Callable):
    cfg = self.config
    h = _LMTransform(cfg, self.dtype, self.param_dtype, name="transform")(h)
    bias = self.param("bias", P.with_axes(nn.initializers.zeros, (P.VOCAB,)), (cfg.vocab_size,),
                      self.param_dtype)
    return decoder(h) + jnp.asarray(bias, self.dtype)


class _LMTransform(nn.Module):
  config: QFormerConfig
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, h):
    cfg = self.config
    h = layers.Dense(cfg.hidden_size, kernel_axes=(P.EMBED, P.MLP), name="dense", dtype=self.dtype,
                     param_dtype=self.param_dtype, wide_float16=True,
                     kernel_init=nn.initializers.normal(cfg.initializer_range))(h)
    h = layers.activation(cfg.hidden_act)(h)
    return layers.LayerNorm(epsilon=cfg.layer_norm_eps, name="LayerNorm", dtype=self.dtype,
                            param_dtype=self.param_dtype)(h)


class Blip2Stage1(nn.Module):
  """The BLIP-2 stage-1 model (LAVIS ``Blip2Qformer``; HF ``Blip2ForImageTextRetrieval`` + LM head).

  Parameters (see /work/coord/CONTRACT.md): ``vision_model``, ``query_tokens`` [1,Q,D],
  ``embeddings``, ``qformer``, ``vision_projection``, ``text_projection``, ``itm_head``,
  ``cls/predictions`` (ITG head, decoder tied to ``embeddings/word_embeddings``), ``temp`` [].
  Init: kernels and embeddings N(0, qformer.initializer_range), biases 0, LayerNorm 1/0,
  ``query_tokens`` N(0, 0.02), ``temp = config.temp_init``; the vision tower uses its own init.

  Attributes:
    config: :class:`Blip2Config`.
    dtype / param_dtype: computation / storage dtypes.
    remat: rematerialise vision blocks and Q-Former layers.
    scan_layers: vision blocks and Q-Former layers under ``nn.scan`` (compile time flat in
      depth; params ``vision_model/encoder/layers`` and ``qformer/encoder/layers/layer_{j}`` with
      a leading LAYERS axis; convert with :func:`convert_layer_layout`). Same outputs.

  Every method takes ``deterministic`` (default True); with False, dropout is active and a
  ``"dropout"`` rng must be given to ``apply``. Call methods with
  ``model.apply(variables, ..., method=Blip2Stage1.itm_logits)``.
  """
  config: Blip2Config
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32
  remat: bool = False
  scan_layers: bool = False

  def setup(self):
    cfg = self.config
    qcfg = cfg.qformer
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    vision_cls = EvaVisionModel if cfg.vision.kind == "eva" else ClipVisionModel
    self.vision_model = vision_cls(cfg.vision, remat=self.remat, scan_layers=self.scan_layers,
                                   **kw)
    self.query_tokens = self.param(
        "query_tokens", P.with_axes(nn.initializers.normal(0.02), (None, None, P.EMBED)),
        (1, cfg.num_query_tokens, qcfg.hidden_size), self.param_dtype)
    self.embeddings = Blip2TextEmbeddings(qcfg, **kw)
    self.qformer = QFormerModel(qcfg, remat=self.remat, scan_layers=self.scan_layers, **kw)
    init = nn.initializers.normal(qcfg.initializer_range)
    self.vision_projection = layers.Dense(cfg.image_text_hidden_size, kernel_axes=(P.EMBED, None),
                                          kernel_init=init, **kw)
    self.text_projection = layers.Dense(cfg.image_text_hidden_size, kernel_axes=(P.EMBED, None),
                                        kernel_init=init, **kw)
    self.itm_head = layers.Dense(2, kernel_axes=(P.EMBED, None), kernel_init=init, **kw)
    self.cls = Blip2LMHead(qcfg, **kw)
    self.temp = self.param("temp", P.with_axes(nn.initializers.constant(cfg.temp_init), ()), (),
                           self.param_dtype)

  # -- helpers ---------------------------------------------------------------------------------

  def _queries(self, batch: int):
    q = jnp.asarray(self.query_tokens, self.dtype)
    return jnp.broadcast_to(q, (batch,) + q.shape[1:])

  def _check_text(self, input_ids, attention_mask):
    if input_ids.ndim != 2:
      raise ValueError(f"input_ids must be [B,T], got shape {input_ids.shape}")
    if attention_mask is None:
      return jnp.ones(input_ids.shape, bool)
    if attention_mask.shape != input_ids.shape:
      raise ValueError(f"attention_mask shape {attention_mask.shape} != input_ids shape "
                       f"{input_ids.shape}; pass the [B,T] 0/1 text padding mask")
    return attention_mask

  def _check_pair(self, image_embeds, input_ids):
    if image_embeds.ndim != 3 or image_embeds.shape[0] != input_ids.shape[0]:
      raise ValueError(f"image_embeds must be [B,Nv,Dv] with the batch of input_ids "
                       f"{input_ids.shape}, got {image_embeds.shape}")

  # -- public methods --------------------------------------------------------------------------

  def encode_image(self, pixel_values, deterministic: bool = True):
    """Image tower + ``post_layernorm``: float [B,S,S,3] NHWC -> image_embeds [B,Nv,Dv].

    ``deterministic`` is accepted for a uniform API; the vision tower has no dropout.
    """
    del deterministic
    return self.vision_model(pixel_values)

  def image_features(self, image_embeds, deterministic: bool = True):
    """Query-only Q-Former pass (spec section 3.1, pass 1; HF ``Blip2VisionModelWithProjection``).

    Args:
      image_embeds: [B,Nv,Dv].
    Returns:
      (query_output [B,Q,D], image_feats [B,Q,E] = l2norm(vision_projection(query_output))).
    """
    if image_embeds.ndim != 3:
      raise ValueError(f"image_embeds must be [B,Nv,Dv], got shape {image_embeds.shape}")
    queries = self._queries(image_embeds.shape[0])
    out = self.qformer(queries, query_length=queries.shape[1], attention_mask=None,
                       encoder_hidden_states=image_embeds, deterministic=deterministic)
    return out, l2_normalize(self.vision_projection(out))

  def text_features(self, input_ids, attention_mask=None, deterministic: bool = True):
    """Text-only Q-Former pass (spec section 3.1, pass 2; HF ``Blip2TextModelWithProjection``).

    Args:
      input_ids: int [B,T] starting with [CLS].
      attention_mask: [B,T] 0/1 padding mask (default all ones).
    Returns:
      (text_output [B,T,D], text_feat [B,E] = l2norm(text_projection(text_output[:, 0]))).
    """
    attention_mask = self._check_text(input_ids, attention_mask)
    out = self.qformer(self.embeddings(input_ids), query_length=0, attention_mask=attention_mask,
                       encoder_hidden_states=None, deterministic=deterministic)
    return out, l2_normalize(self.text_projection(out[:, 0]))

  def itm_logits(self, image_embeds, input_ids, attention_mask=None, deterministic: bool = True):
    """Image-text matching logits for paired rows (spec section 3.3; HF ITM head).

    One bi-directional pass over ``[Q; T]`` with mask ``concat(ones(Q), attention_mask)``, then
    ``mean_q itm_head(H[:, :Q])``.

    Args:
      image_embeds: [B,Nv,Dv]; input_ids: int [B,T]; attention_mask: [B,T] 0/1.
    Returns:
      float [B,2] (class 1 = match).
    """
    attention_mask = self._check_text(input_ids, attention_mask)
    self._check_pair(image_embeds, input_ids)
    batch = input_ids.shape[0]
    queries = self._queries(batch)
    q = queries.shape[1]
    mask = jnp.concatenate([jnp.ones((batch, q), bool), jnp.asarray(attention_mask).astype(bool)],
                           axis=1)
    h = self.qformer(self.embeddings(input_ids, queries), query_length=q, attention_mask=mask,
                     encoder_hidden_states=image_embeds, deterministic=deterministic)
    return jnp.mean(self.itm_head(h[:, :q]), axis=1)

  def _itg_pass(self, image_embeds, input_ids, attention_mask, deterministic):
    attention_mask = self._check_text(input_ids, attention_mask)
    self._check_pair(image_embeds, input_ids)
    queries = self._queries(input_ids.shape[0])
    q = queries.shape[1]
    mask = itg_attention_mask(attention_mask, q)
    h = self.qformer(self.embeddings(input_ids, queries), query_length=q, attention_mask=mask,
                     encoder_hidden_states=image_embeds, deterministic=deterministic)
    return h[:, :q], self.cls(h[:, q:], self.embeddings.attend)

  def itg_logits(self, image_embeds, input_ids, attention_mask=None, deterministic: bool = True):
    """Image-grounded text generation logits (spec sections 2.4, 2.5, 3.4).

    One pass over ``[Q; T]`` with the UniLM mask (:func:`itg_attention_mask`); queries
    cross-attend and use the query FFN, text uses the text FFN; the LM head runs on the text
    positions only.

    Args:
      image_embeds: [B,Nv,Dv].
      input_ids: int [B,T], the first token already replaced by [DEC].
      attention_mask: [B,T] 0/1 text padding mask.
    Returns:
      float [B,T,V]; position t predicts token t+1 (shift in the loss).
    """
    return self._itg_pass(image_embeds, input_ids, attention_mask, deterministic)[1]

  def image_features_and_itg_logits(self, image_embeds, input_ids, attention_mask=None,
                                    deterministic: bool = True):
    """The ITG pass, also returning the ITC image features from its query positions.

    Queries never attend to text under the UniLM mask, so the query outputs of the ITG pass are
    the query-only pass's outputs (spec section 3.4; LAVIS reuses them through the KV cache).
    One Q-Former pass therefore serves both ITC's image side and ITG, as in LAVIS; with dropout
    the two uses share one dropout sample instead of two.

    Args:
      image_embeds: [B,Nv,Dv]; input_ids: int [B,T] with [DEC] first; attention_mask: [B,T].
    Returns:
      (image_feats [B,Q,E] l2-normalised, itg logits [B,T,V]).
    """
    query_output, logits = self._itg_pass(image_embeds, input_ids, attention_mask, deterministic)
    return l2_normalize(self.vision_projection(query_output)), logits

  def temperature(self):
    """The ITC temperature ``temp`` (scalar, trainable, no clamp; spec section 2.6)."""
    return self.temp

  def __call__(self, pixel_values, input_ids, attention_mask=None, deterministic: bool = True):
    """Runs every head once (touches every parameter; used for ``init``).

    Args:
      pixel_values: float [B,S,S,3]; input_ids: int [B,T]; attention_mask: [B,T].
    Returns:
      dict with ``image_embeds`` [B,Nv,Dv], ``image_feats`` [B,Q,E], ``text_feat`` [B,E],
      ``itm_logits`` [B,2], ``itg_logits`` [B,T,V], ``temp`` [].
    """
    image_embeds = self.encode_image(pixel_values, deterministic)
    _, image_feats = self.image_features(image_embeds, deterministic)
    _, text_feat = self.text_features(input_ids, attention_mask, deterministic)
    return dict(
        image_embeds=image_embeds,
        image_feats=image_feats,
        text_feat=text_feat,
        itm_logits=self.itm_logits(image_embeds, input_ids, attention_mask, deterministic),
        itg_logits=self.itg_logits(image_embeds, input_ids, attention_mask, deterministic),
        temp=self.temperature(),
    )


class Blip2Stage2(nn.Module):
  """BLIP-2 stage 2: frozen image encoder -> Q-Former -> ``language_projection`` -> frozen LLM.

  HF ``Blip2ForConditionalGeneration`` (``transformers/models/blip_2/modeling_blip_2.py``) and
  LAVIS ``Blip2OPT`` / ``Blip2T5`` (``lavis/models/blip2_models/blip2_opt.py``, ``blip2_t5.py``);
  BLIP-2 paper section 3.3 (Li et al. 2023, arXiv:2301.12597); spec section 4.

  The projected query outputs ``P = language_projection(Q-Former(queries, image))`` [B,Q,Dl] are
  a soft visual prompt. OPT (decoder-only): ``concat(P, embed(input_ids))`` with the mask
  ``concat(ones(B,Q), attention_mask)`` runs through the decoder (positions from the mask as HF,
  so padding between the queries and the text shifts nothing). FlanT5 (encoder-decoder): the same
  concatenation is the encoder input; ``decoder_input_ids`` run through the decoder. HF instead
  writes ``P`` into ``<image>`` placeholder positions of ``input_ids``; with the placeholders
  first (as its processor puts them) the two are the same computation.

  Parameters: ``vision_model`` (tower + ``post_layernorm`` = LAVIS ``ln_vision``),
  ``query_tokens`` [1,Q,D], ``qformer`` (stage-1 tree without the text FFN),
  ``language_projection`` (D -> Dl), ``language_model`` (:class:`vlm.models.opt.OPTForCausalLM`
  or :class:`vlm.models.t5.T5ForConditionalGeneration` tree). The stage-1 paths are identical, so a
  stage-1 checkpoint initialises the first three by path.

  Attributes:
    config: :class:`vlm.models.presets.Blip2Stage2Config`.
    dtype / param_dtype: compute / storage dtypes; ``llm_param_dtype`` (default ``param_dtype``)
      stores the frozen LLM, e.g. bfloat16 as LAVIS casts FlanT5.
    remat: rematerialise vision blocks, Q-Former layers and LLM layers.
    scan_layers: the vision blocks, the Q-Former layers (as :class:`Blip2Stage1`) and the LLM's
      layers under ``nn.scan`` (``.../layers`` subtrees with a leading LAYERS axis).
  Named axes: ``B`` batch, ``Q`` queries, ``T`` text tokens, ``Td`` decoder tokens, ``Dl`` LLM
  width, ``V`` LLM vocabulary.
  """
  config: Any  # Blip2Stage2Config
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32
  llm_param_dtype: Dtype | None = None
  remat: bool = False
  scan_layers: bool = False

  def setup(self):
    cfg = self.config
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    vision_cls = EvaVisionModel if cfg.vision.kind == "eva" else ClipVisionModel
    self.vision_model = vision_cls(cfg.vision, remat=self.remat, scan_layers=self.scan_layers,
                                   **kw)
    self.query_tokens = self.param(
        "query_tokens", P.with_axes(nn.initializers.normal(0.02), (None, None, P.EMBED)),
        (1, cfg.num_query_tokens, cfg.qformer.hidden_size), self.param_dtype)
    self.qformer = QFormerModel(cfg.qformer, remat=self.remat, scan_layers=self.scan_layers,
                                **kw)
    self.language_projection = layers.Dense(
        cfg.llm_hidden_size, kernel_axes=(None, P.EMBED),
        kernel_init=nn.initializers.normal(cfg.qformer.initializer_range), **kw)
    llm_kw = dict(dtype=self.dtype, param_dtype=self.llm_param_dtype or self.param_dtype,
                  scan_layers=self.scan_layers, remat=self.remat)
    if cfg.llm_kind == "t5":
      from vlm.models.t5 import T5ForConditionalGeneration
      self.language_model = T5ForConditionalGeneration(cfg.llm, **llm_kw)
    else:
      from vlm.models.opt import OPTForCausalLM
      self.language_model = OPTForCausalLM(cfg.llm, **llm_kw)

  def encode_image(self, pixel_values):
    """Frozen tower + ``post_layernorm``: float [B,S,S,3] NHWC -> image_embeds [B,Nv,Dv]."""
    return self.vision_model(pixel_values)

  def query_embeds(self, image_embeds, deterministic: bool = True):
    """The soft visual prompt: query-only Q-Former pass + ``language_projection``.

    Args:
      image_embeds: [B,Nv,Dv].
    Returns:
      [B,Q,Dl] in ``dtype``.
    """
    if image_embeds.ndim != 3:
      raise ValueError(f"image_embeds must be [B,Nv,Dv], got shape {image_embeds.shape}")
    q = jnp.asarray(self.query_tokens, self.dtype)
    q = jnp.broadcast_to(q, (image_embeds.shape[0],) + q.shape[1:])
    out = self.qformer(q, query_length=q.shape[1], attention_mask=None,
                       encoder_hidden_states=image_embeds, deterministic=deterministic)
    return self.language_projection(out)

  def embed_text(self, input_ids):
    """LLM input embeddings of ``input_ids`` [B,T] -> [B,T,Dl] (no scaling: OPT and T5 have none)."""
    return self.language_model.embed(input_ids)

  def prefix_inputs(self, prompt, input_ids, attention_mask):
    """``(concat(P, embed(input_ids)) [B,Q+T,Dl], concat(ones(B,Q), attention_mask) [B,Q+T])``.

    Raises:
      ValueError: ``input_ids`` not [B,T] with the batch of ``prompt``, or a mask of another shape.
    """
    if input_ids.ndim != 2 or input_ids.shape[0] != prompt.shape[0]:
      raise ValueError(f"input_ids must be [B,T] with B={prompt.shape[0]} (the images), got "
                       f"{input_ids.shape}")
    if attention_mask is None:
      attention_mask = jnp.ones(input_ids.shape, jnp.int32)
    if attention_mask.shape != input_ids.shape:
      raise ValueError(f"attention_mask shape {attention_mask.shape} != input_ids shape "
                       f"{input_ids.shape}")
    emb = self.embed_text(input_ids)
    x = jnp.concatenate([jnp.asarray(prompt, emb.dtype), emb], axis=1)
    mask = jnp.concatenate([jnp.ones(prompt.shape[:2], jnp.int32),
                            jnp.asarray(attention_mask, jnp.int32)], axis=1)
    return x, mask

  def lm_logits(self, hidden):
    """The LLM head on hidden states: [..., Dl] -> float32 [..., V]."""
    return self.language_model.logits(hidden)

  def __call__(self, pixel_values, input_ids, attention_mask=None, decoder_input_ids=None,
               decoder_attention_mask=None, deterministic: bool = True,
               llm_deterministic: bool | None = None, return_hidden: bool = False):
    """Teacher-forced forward.

    Args:
      pixel_values: float [B,S,S,3].
      input_ids: int [B,T] LLM tokens after the queries (OPT: ``</s>`` + caption; T5: the encoder
        text, e.g. the prompt or a caption prefix, ending in ``</s>``); attention_mask [B,T] 0/1.
      decoder_input_ids / decoder_attention_mask: [B,Td], T5 only (the shifted target).
      deterministic: disables the Q-Former's dropout; ``llm_deterministic`` (default: the same)
        the frozen LLM's (LAVIS leaves it active during training, spec 4.1).
      return_hidden: the LLM's last hidden states instead of logits (for a chunked loss).
    Returns:
      OPT: float32 logits [B,Q+T,V] (or hidden [B,Q+T,Dl]); position ``t`` predicts ``t+1``.
      T5: float32 logits [B,Td,V] (or hidden).
    Raises:
      ValueError: T5 without ``decoder_input_ids``; bad shapes.
    """
    llm_det = deterministic if llm_deterministic is None else llm_deterministic
    prompt = self.query_embeds(self.encode_image(pixel_values), deterministic)
    x, mask = self.prefix_inputs(prompt, input_ids, attention_mask)
    if self.config.llm_kind == "opt":
      out, _ = self.language_model(x, mask, deterministic=llm_det, return_hidden=return_hidden)
      return out
    if decoder_input_ids is None:
      raise ValueError("a FlanT5 stage-2 model needs decoder_input_ids (the shifted target)")
    enc = self.language_model.encode(x, mask, deterministic=llm_det)
    out, _ = self.language_model.decode(decoder_input_ids, enc, mask, decoder_attention_mask,
                                        deterministic=llm_det, return_hidden=return_hidden)
    return out
