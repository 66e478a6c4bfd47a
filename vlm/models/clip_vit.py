"""CLIP ViT-L/14 image encoder of BLIP-2 (LAVIS ``clip_vit.py`` layout, HF ``CLIPVisionModel`` names).

Source of the math: BLIP-2 spec sections 1.3 and 9 (items 1, 3-5); HF
``transformers/models/clip/modeling_clip.py`` (``CLIPVisionEmbeddings``, ``CLIPAttention``,
``CLIPMLP``, ``CLIPEncoderLayer``, ``CLIPVisionTransformer``).

Differences from the EVA tower (:mod:`vlm.models.eva_vit`): the patch projection has no bias,
``pre_layrnorm`` (HF spelling) is applied after adding positions, attention has separate
``q_proj``/``k_proj``/``v_proj``/``out_proj`` all with biases, the MLP uses QuickGELU (from
``config.hidden_act``), LNs use ``config.layer_norm_eps`` (1e-5). CLIP's own final norm
(``ln_post``) is NOT applied: the blocks' output goes straight into the BLIP-2 ``post_layernorm``
(LAVIS ``ln_vision``). HF ``CLIPVisionModel.last_hidden_state`` is the tensor before that norm.

Parameter tree::

  embeddings/{class_embedding [1,1,Dv], patch_embedding/kernel [p,p,C,Dv],
              position_embedding [1,N+1,Dv]}
  pre_layrnorm
  encoder/layers_{i}/{layer_norm1, self_attn/{q_proj,k_proj,v_proj,out_proj}, layer_norm2,
                      mlp/{fc1, fc2}}      (scan_layers=True: encoder/layers, leading LAYERS axis)
  post_layernorm

float16: as the EVA tower (:mod:`vlm.models.eva_vit`): float32 scores and residual stream, wide
``fc1``/``fc2``/``out_proj`` (the MLP and ``VisionEncoder`` are shared); safe, not refused.
"""
from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax.numpy as jnp

from vlm.models.eva_vit import (ACTIVATION_AXES, EvaBlock, VisionEmbeddings, VisionEncoder,
                                validate_pixel_values)
from vlm.models.presets import Blip2VisionConfig
from vlm.nn import layers
from vlm.nn import partitioning as P
from vlm.nn.attention import dot_product_attention

Dtype = Any


class ClipAttention(nn.Module):
  """Multi-head self-attention with separate q/k/v/out projections, all with bias.

  Scores ``q k^T * hd**-0.5`` (float32), no mask. Shapes: [B, L, Dv] -> [B, L, Dv] in ``dtype``
  (float32 for float16 compute: ``out_proj`` is wide).
  """
  config: Blip2VisionConfig
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x):
    cfg = self.config
    b, l, d = x.shape
    h = cfg.num_attention_heads
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    q = layers.Dense(d, kernel_axes=(P.EMBED, P.HEADS), name="q_proj", **kw)(x)
    k = layers.Dense(d, kernel_axes=(P.EMBED, P.HEADS), name="k_proj", **kw)(x)
    v = layers.Dense(d, kernel_axes=(P.EMBED, P.HEADS), name="v_proj", **kw)(x)
    split = lambda t: t.reshape(b, l, h, d // h)
    out = dot_product_attention(split(q), split(k), split(v), dtype=self.dtype)
    return layers.Dense(d, kernel_axes=(P.HEADS, P.EMBED), name="out_proj", wide_float16=True,
                        **kw)(out.reshape(b, l, d))


class ClipBlock(EvaBlock):
  """Pre-LN CLIP residual block (HF ``CLIPEncoderLayer``; LAVIS ``ResidualAttentionBlock``):
  :class:`EvaBlock` with :class:`ClipAttention` (q/k/v all with bias, ``out_proj``).

  Shapes: [B, L, Dv] -> [B, L, Dv]; output constrained to (BATCH, LENGTH, EMBED).
  """
  attention_cls = ClipAttention


class ClipVisionModel(nn.Module):
  """BLIP-2 CLIP ViT image encoder.

  ``image_embeds = post_layernorm(encoder(pre_layrnorm(embeddings(pixel_values))))`` with
  ``post_layernorm`` eps ``config.post_layernorm_eps``; CLIP's final ``ln_post`` is not applied
  (spec section 1.3).

  Attributes:
    config: a ``Blip2VisionConfig`` with ``kind == "clip"``.
    dtype: computation dtype (LayerNorm statistics, attention scores and softmax stay float32;
      float16 as in the module docstring).
    param_dtype: parameter storage dtype.
    remat: rematerialise each block.
    scan_layers: the blocks under ``nn.scan`` (params ``encoder/layers`` with a leading LAYERS
      axis, as in :mod:`vlm.models.eva_vit`).
  Call: ``pixel_values`` float [B, S, S, C] NHWC -> ``image_embeds`` [B, N+1, Dv] in ``dtype``.
    With ``return_pre_post_layernorm=True`` returns the blocks' output before ``post_layernorm``
    instead (= HF ``CLIPVisionModel`` ``last_hidden_state``; float32 for float16 compute, the
    residual dtype).
  Raises:
    ValueError: when ``config.kind`` is not "clip", or ``pixel_values`` does not have shape
      [B, image_size, image_size, num_channels] (checked before any compute).
  """
  config: Blip2VisionConfig
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32
  remat: bool = False
  scan_layers: bool = False

  @nn.compact
  def __call__(self, pixel_values, return_pre_post_layernorm: bool = False):
    cfg = self.config
    if cfg.kind != "clip":
      raise ValueError(f"ClipVisionModel needs a vision config with kind='clip', got "
                       f"{cfg.kind!r}; use EvaVisionModel for kind='eva'")
    validate_pixel_values(pixel_values, cfg)
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    x = VisionEmbeddings(cfg, use_bias=False, name="embeddings", **kw)(pixel_values)
    x = layers.LayerNorm(epsilon=cfg.layer_norm_eps, name="pre_layrnorm", **kw)(x)
    x = VisionEncoder(cfg, block=ClipBlock, remat=self.remat, scan_layers=self.scan_layers,
                      name="encoder", **kw)(x)
    post_layernorm = layers.LayerNorm(epsilon=cfg.post_layernorm_eps, name="post_layernorm", **kw)
    if return_pre_post_layernorm:
      if self.is_initializing():
        post_layernorm(x)
      return x
    return P.constrain(post_layernorm(x), ACTIVATION_AXES)
