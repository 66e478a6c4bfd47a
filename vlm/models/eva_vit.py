"""EVA ViT-g/14 image encoder of BLIP-2, with HF ``Blip2VisionModel`` semantics.

Source of the math: BLIP-2 spec sections 1.1, 1.2 and 9 (items 1-6); HF
``transformers/models/blip_2/modeling_blip_2.py`` (``Blip2VisionEmbeddings``, ``Blip2Attention``,
``Blip2MLP``, ``Blip2EncoderLayer``, ``Blip2VisionModel``).

Named axes in shapes: ``B`` batch, ``S`` image side in pixels, ``C`` channels, ``N`` patches
(``(S / patch_size) ** 2``), ``Dv`` width, ``H`` heads, ``hd`` head dim, ``F`` MLP width.
Images are NHWC ``pixel_values`` [B, S, S, C] float.

Parameter tree (mirrors HF keys; see /work/coord/CONTRACT.md)::

  embeddings/{class_embedding [1,1,Dv], patch_embedding/{kernel [p,p,C,Dv], bias [Dv]},
              position_embedding [1,N+1,Dv]}
  encoder/layers_{i}/{layer_norm1, self_attn/{qkv [Dv,3Dv](+bias [3Dv]), projection},
                      layer_norm2, mlp/{fc1, fc2}}
  post_layernorm   (LAVIS ``ln_vision``; trainable even when the tower is frozen)

With ``scan_layers=True`` the blocks run under ``nn.scan`` (the compile no longer grows with the
depth) and ``encoder/layers_{i}`` become one ``encoder/layers`` subtree whose leaves carry a
leading ``LAYERS`` axis [num_hidden_layers, ...]; the two layouts convert with
:func:`vlm.models.qwen3.stack_layers` / :func:`~vlm.models.qwen3.unstack_layers` (for whole
BLIP-2 trees: :func:`vlm.models.blip2.convert_layer_layout`).

:class:`VisionEmbeddings`, :class:`VisionMlp` and :func:`validate_pixel_values` are shared with the
CLIP tower in :mod:`vlm.models.clip_vit`.

float16 (``dtype=jnp.float16``; LAVIS runs this tower in fp16 by default): computed safely, not
refused. Attention scores are float32 (``vlm.nn.attention``); the residual stream between the
blocks is float32 (:func:`vlm.nn.layers.residual_dtype`); ``fc1``, the GELU, ``fc2`` and the
attention output projection produce float32 (``Dense(wide_float16=True)``: float16 x float16
products with float32 accumulation, input rows pre-scaled into float16 range), so an MLP
intermediate or a residual channel above 65,504 stays finite; the patch embedding accumulates in
float32. ``post_layernorm`` returns ``dtype``. bfloat16 and float32 compute what they did before.
"""
from __future__ import annotations

from typing import Any, ClassVar

import flax.linen as nn
import jax.numpy as jnp

from vlm.models.presets import Blip2VisionConfig
from vlm.nn import layers
from vlm.nn import partitioning as P
from vlm.nn.attention import dot_product_attention

Dtype = Any

ACTIVATION_AXES = (P.BATCH, P.LENGTH, P.EMBED)


def validate_pixel_values(pixel_values, config: Blip2VisionConfig) -> None:
  """Checks that ``pixel_values`` is a float NHWC batch [B, S, S, C] matching ``config``.

  Raises:
    ValueError: if the rank is not 4, the spatial size is not ``config.image_size`` x
      ``config.image_size``, the channel count is not ``config.num_channels`` or the dtype is not
      floating point. The message says which and what layout is expected.
  """
  shape = tuple(getattr(pixel_values, "shape", ()))
  expected = f"[B, {config.image_size}, {config.image_size}, {config.num_channels}] (NHWC)"
  if len(shape) != 4:
    raise ValueError(f"pixel_values must have rank 4 with shape {expected}, got shape {shape}")
  if shape[3] != config.num_channels and shape[1] == config.num_channels:
    raise ValueError(f"pixel_values has shape {shape}, which looks NCHW; vlm expects {expected}: "
                     "transpose with x.transpose(0, 2, 3, 1)")
  if shape[1] != config.image_size or shape[2] != config.image_size:
    raise ValueError(f"pixel_values has spatial size {shape[1]}x{shape[2]} but the vision config "
                     f"expects {config.image_size}x{config.image_size}: resize the images or use a "
                     f"config with that image_size (shape must be {expected})")
  if shape[3] != config.num_channels:
    raise ValueError(f"pixel_values has {shape[3]} channels, expected {config.num_channels}; "
                     f"shape must be {expected}")
  if not jnp.issubdtype(pixel_values.dtype, jnp.floating):
    raise ValueError(f"pixel_values must be floating point (normalised images), got dtype "
                     f"{pixel_values.dtype}")


class VisionEmbeddings(nn.Module):
  """Patch embedding + class token + learned absolute positions.

  ``x = concat(class_embedding, patches @ kernel (+ bias)) + position_embedding``, with the class
  token at index 0 and patches in row-major order (HF ``Blip2VisionEmbeddings`` /
  ``CLIPVisionEmbeddings``; spec section 1.1 "Embedding"). The Conv2d with kernel = stride =
  patch_size is computed exactly as a reshape into patches followed by an einsum.

  Attributes:
    config: the vision config.
    use_bias: whether the patch projection has a bias (EVA: yes, CLIP: no).
  Shapes: ``pixel_values`` [B, S, S, C] -> [B, N+1, Dv] in ``dtype``.
  """
  config: Blip2VisionConfig
  use_bias: bool = True
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, pixel_values):
    cfg = self.config
    p, c, d = cfg.patch_size, cfg.num_channels, cfg.hidden_size
    init = layers.default_kernel_init
    class_embedding = self.param("class_embedding", P.with_axes(init, (None, None, P.EMBED)),
                                 (1, 1, d), self.param_dtype)
    position_embedding = self.param("position_embedding",
                                    P.with_axes(init, (None, None, P.EMBED)),
                                    (1, cfg.num_positions, d), self.param_dtype)
    patches = PatchEmbedding(patch_size=p, features=d, use_bias=self.use_bias, dtype=self.dtype,
                             param_dtype=self.param_dtype, name="patch_embedding")(pixel_values)
    b = patches.shape[0]
    cls = jnp.broadcast_to(jnp.asarray(class_embedding, self.dtype), (b, 1, d))
    x = jnp.concatenate([cls, patches], axis=1)
    x = x + jnp.asarray(position_embedding, self.dtype)
    return P.constrain(x, ACTIVATION_AXES)


class PatchEmbedding(nn.Module):
  """Non-overlapping patch projection (Conv2d with kernel = stride = ``patch_size``, VALID).

  Params: ``kernel`` [p, p, C, Dv] (torch Conv2d weight [Dv, C, p, p] transposed (2, 3, 1, 0)),
  optional ``bias`` [Dv].
  Shapes: [B, S, S, C] -> [B, (S/p)**2, Dv], patches in row-major order.
  """
  patch_size: int
  features: int
  use_bias: bool = True
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x):
    b, h, w, c = x.shape
    p = self.patch_size
    kernel = self.param("kernel", P.with_axes(layers.default_kernel_init,
                                              (None, None, None, P.EMBED)),
                        (p, p, c, self.features), self.param_dtype)
    gh, gw = h // p, w // p
    x = jnp.asarray(x, self.dtype).reshape(b, gh, p, gw, p, c)
    y = jnp.einsum("bhiwjc,ijcd->bhwd", x, jnp.asarray(kernel, self.dtype),
                   preferred_element_type=layers.wide_dtype(self.dtype))
    y = jnp.asarray(y, self.dtype)
    y = y.reshape(b, gh * gw, self.features)
    if self.use_bias:
      bias = self.param("bias", P.with_axes(nn.initializers.zeros, (P.EMBED,)),
                        (self.features,), self.param_dtype)
      y = y + jnp.asarray(bias, self.dtype)
    return y


class VisionMlp(nn.Module):
  """``fc2(act(fc1(x)))`` with ``act = vlm.nn.layers.activation(config.hidden_act)``.

  Shapes: [B, L, Dv] -> [B, L, Dv] in ``dtype`` (float32 for float16 compute: fc1, the
  activation and fc2 stay wide, module docstring); fc1 kernel (EMBED, MLP), fc2 kernel (MLP, EMBED).
  """
  config: Blip2VisionConfig
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x):
    cfg = self.config
    act = layers.activation(cfg.hidden_act)
    h = layers.Dense(cfg.intermediate_size, kernel_axes=(P.EMBED, P.MLP), dtype=self.dtype,
                     param_dtype=self.param_dtype, wide_float16=True, name="fc1")(x)
    h = act(h)
    return layers.Dense(cfg.hidden_size, kernel_axes=(P.MLP, P.EMBED), dtype=self.dtype,
                        param_dtype=self.param_dtype, wide_float16=True, name="fc2")(h)


class EvaAttention(nn.Module):
  """EVA self-attention with one fused ``qkv`` projection and an output ``projection``.

  ``qkv`` [Dv, 3Dv] has rows of the HF weight ordered [q | k | v], heads contiguous inside each
  third; its bias [3Dv] (when ``config.qkv_bias``) is HF's ``cat(q_bias, 0, v_bias)`` but is a free
  parameter here as in HF. Scores are ``q k^T * hd**-0.5`` (float32), no mask (spec section 1.1).
  Shapes: [B, L, Dv] -> [B, L, Dv] in ``dtype`` (float32 for float16 compute).
  """
  config: Blip2VisionConfig
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x):
    cfg = self.config
    b, l, d = x.shape
    h = cfg.num_attention_heads
    qkv = layers.Dense(3 * d, kernel_axes=(P.EMBED, P.HEADS), use_bias=cfg.qkv_bias,
                       dtype=self.dtype, param_dtype=self.param_dtype, name="qkv")(x)
    qkv = qkv.reshape(b, l, 3, h, d // h)
    q, k, v = qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]
    out = dot_product_attention(q, k, v, dtype=self.dtype)
    out = out.reshape(b, l, d)
    return layers.Dense(d, kernel_axes=(P.HEADS, P.EMBED), dtype=self.dtype,
                        param_dtype=self.param_dtype, wide_float16=True, name="projection")(out)


class EvaBlock(nn.Module):
  """Pre-LN transformer block (HF ``Blip2EncoderLayer``).

  ``x = x + attn(ln1(x)); x = x + mlp(ln2(x))``, LNs with ``config.layer_norm_eps``.
  Shapes: [B, L, Dv] -> [B, L, Dv]; the output carries the (BATCH, LENGTH, EMBED) constraint.
  The CLIP block is the same with another attention (``attention_cls``, a class attribute).
  With ``scan_body=True`` it is an ``nn.scan`` body: ``(x, None) -> (x, None)``.
  """
  config: Blip2VisionConfig
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32
  scan_body: bool = False
  attention_cls: ClassVar[type] = EvaAttention

  @nn.compact
  def __call__(self, x, unused_xs=None):
    cfg = self.config
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    h = layers.LayerNorm(epsilon=cfg.layer_norm_eps, name="layer_norm1", **kw)(x)
    x = x + self.attention_cls(cfg, name="self_attn", **kw)(h)
    h = layers.LayerNorm(epsilon=cfg.layer_norm_eps, name="layer_norm2", **kw)(x)
    x = x + VisionMlp(cfg, name="mlp", **kw)(h)
    x = P.constrain(x, ACTIVATION_AXES)
    return (x, None) if self.scan_body else x


class VisionEncoder(nn.Module):
  """``config.num_hidden_layers`` blocks, optionally rematerialised and/or scanned.

  Attributes:
    block: the block class (:class:`EvaBlock` or the CLIP block).
    remat: wrap each block in ``nn.remat`` (recompute activations in the backward pass).
    scan_layers: run the blocks under ``nn.scan``: one ``layers`` subtree with a leading
      ``LAYERS`` axis instead of ``layers_{i}`` (same outputs; compile time flat in depth).
  Shapes: [B, L, Dv] -> [B, L, Dv] in :func:`vlm.nn.layers.residual_dtype` of ``dtype`` (the
  input is cast to it first: float32 for float16 compute).
  """
  config: Blip2VisionConfig
  block: Any
  remat: bool = False
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32
  scan_layers: bool = False

  @nn.compact
  def __call__(self, x):
    block_cls = self.block
    if self.remat:
      block_cls = nn.remat(block_cls, prevent_cse=not self.scan_layers)
    x = jnp.asarray(x, layers.residual_dtype(self.dtype))
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    if self.scan_layers:
      scanned = nn.scan(block_cls, variable_axes={"params": 0}, split_rngs={"params": True},
                        length=self.config.num_hidden_layers,
                        metadata_params={nn.PARTITION_NAME: P.LAYERS})
      x, _ = scanned(self.config, scan_body=True, name="layers", **kw)(x, None)
      return x
    for i in range(self.config.num_hidden_layers):
      x = block_cls(self.config, name=f"layers_{i}", **kw)(x)
    return x


class EvaVisionModel(nn.Module):
  """BLIP-2 EVA ViT image encoder (HF ``Blip2VisionModel``, ``last_hidden_state``).

  ``image_embeds = post_layernorm(encoder(embeddings(pixel_values)))``; ``post_layernorm`` uses
  ``config.post_layernorm_eps`` (HF: 1e-6; LAVIS ``ln_vision``: 1e-5; spec section 1.2). There is no
  other final norm (spec section 9, item 1).

  Attributes:
    config: a ``Blip2VisionConfig`` with ``kind == "eva"``.
    dtype: computation dtype (LayerNorm statistics, attention scores and softmax stay float32;
      float16 as in the module docstring).
    param_dtype: parameter storage dtype.
    remat: rematerialise each block (saves activation memory when the tower is trained).
    scan_layers: the blocks under ``nn.scan`` (params ``encoder/layers`` with a leading LAYERS
      axis; module docstring).
  Call: ``pixel_values`` float [B, S, S, C] NHWC -> ``image_embeds`` [B, N+1, Dv] in ``dtype``.
  Raises:
    ValueError: when ``config.kind`` is not "eva", or ``pixel_values`` does not have shape
      [B, image_size, image_size, num_channels] (checked before any compute).
  """
  config: Blip2VisionConfig
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32
  remat: bool = False
  scan_layers: bool = False

  @nn.compact
  def __call__(self, pixel_values):
    cfg = self.config
    if cfg.kind != "eva":
      raise ValueError(f"EvaVisionModel needs a vision config with kind='eva', got {cfg.kind!r}; "
                       "use ClipVisionModel for kind='clip'")
    validate_pixel_values(pixel_values, cfg)
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    x = VisionEmbeddings(cfg, use_bias=True, name="embeddings", **kw)(pixel_values)
    x = VisionEncoder(cfg, block=EvaBlock, remat=self.remat, scan_layers=self.scan_layers,
                      name="encoder", **kw)(x)
    x = layers.LayerNorm(epsilon=cfg.post_layernorm_eps, name="post_layernorm", **kw)(x)
    return P.constrain(x, ACTIVATION_AXES)
