"""Building blocks with logical axis names: Dense, Embed, LayerNorm, activations.

All layers take ``dtype`` (computation) and ``param_dtype`` (storage) fields. LayerNorm computes
its statistics in float32 whatever ``dtype`` is (BLIP-2 spec section 9, item 4: LAVIS runs every
LayerNorm in fp32 under autocast).
"""
from __future__ import annotations

from typing import Any, Callable, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from vlm.nn import partitioning as P

Dtype = Any
Initializer = Callable[..., jax.Array]

default_kernel_init = nn.initializers.normal(stddev=0.02)


def gelu_exact(x):
  """GELU with the erf form (PyTorch ``nn.GELU()``/HF ``"gelu"``); flax's default is tanh."""
  return jax.nn.gelu(x, approximate=False)


def quick_gelu(x):
  """OpenAI CLIP's QuickGELU: ``x * sigmoid(1.702 x)``."""
  return x * jax.nn.sigmoid(1.702 * x)


def gelu_tanh(x):
  """GELU with the tanh approximation (HF ``"gelu_pytorch_tanh"``)."""
  return jax.nn.gelu(x, approximate=True)


ACTIVATIONS = {
    "gelu": gelu_exact,
    "quick_gelu": quick_gelu,
    "gelu_pytorch_tanh": gelu_tanh,
    "gelu_new": gelu_tanh,
    "relu": jax.nn.relu,
    "silu": jax.nn.silu,
}


def activation(name: str) -> Callable:
  """Returns the activation called ``name`` (HF ``hidden_act`` spelling).

  Raises:
    ValueError: for an unknown name, listing the known ones.
  """
  try:
    return ACTIVATIONS[name]
  except KeyError:
    raise ValueError(f"unknown activation {name!r}; known: {sorted(ACTIVATIONS)}") from None


class Dense(nn.Module):
  """``y = x @ kernel + bias`` over the last axis, with logical axes on both parameters.

  Attributes:
    features: output width.
    kernel_axes: logical names of ``kernel`` ([in, out]); the bias takes ``kernel_axes[-1]``.
    use_bias: whether to add a bias.
  Shapes: ``x`` [..., in] -> [..., features].
  """
  features: int
  kernel_axes: Sequence[str | None] = (P.EMBED, P.MLP)
  use_bias: bool = True
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32
  kernel_init: Initializer = default_kernel_init
  bias_init: Initializer = nn.initializers.zeros
  precision: Any = None

  @nn.compact
  def __call__(self, x):
    kernel = self.param("kernel", P.with_axes(self.kernel_init, self.kernel_axes),
                        (x.shape[-1], self.features), self.param_dtype)
    x = jnp.asarray(x, self.dtype)
    y = jnp.einsum("...i,io->...o", x, jnp.asarray(kernel, self.dtype), precision=self.precision)
    if self.use_bias:
      bias = self.param("bias", P.with_axes(self.bias_init, (self.kernel_axes[-1],)),
                        (self.features,), self.param_dtype)
      y = y + jnp.asarray(bias, self.dtype)
    return y


class Embed(nn.Module):
  """Lookup table ``embedding`` [num_embeddings, features] with axes (VOCAB, EMBED).

  ``__call__(ids)``: int [...] -> [..., features]. ``attend(x)``: [..., features] ->
  [..., num_embeddings], the tied output projection.
  """
  num_embeddings: int
  features: int
  axes: Sequence[str | None] = (P.VOCAB, P.EMBED)
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32
  embedding_init: Initializer = default_kernel_init

  def setup(self):
    self.embedding = self.param("embedding", P.with_axes(self.embedding_init, self.axes),
                                (self.num_embeddings, self.features), self.param_dtype)

  def __call__(self, ids):
    if not jnp.issubdtype(ids.dtype, jnp.integer):
      raise ValueError(f"Embed expects integer ids, got dtype {ids.dtype}")
    return jnp.take(jnp.asarray(self.embedding, self.dtype), ids, axis=0)

  def attend(self, x, precision=None):
    return jnp.einsum("...d,vd->...v", jnp.asarray(x, self.dtype),
                      jnp.asarray(self.embedding, self.dtype), precision=precision)


class LayerNorm(nn.Module):
  """LayerNorm over the last axis with float32 statistics; params ``scale``, ``bias`` [features].

  Output is cast back to ``dtype``.
  """
  epsilon: float = 1e-5
  use_bias: bool = True
  axis_name: str | None = P.EMBED
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x):
    features = x.shape[-1]
    scale = self.param("scale", P.with_axes(nn.initializers.ones, (self.axis_name,)),
                       (features,), self.param_dtype)
    x32 = jnp.asarray(x, jnp.float32)
    mean = jnp.mean(x32, axis=-1, keepdims=True)
    var = jnp.mean(jnp.square(x32 - mean), axis=-1, keepdims=True)
    y = (x32 - mean) * jax.lax.rsqrt(var + self.epsilon) * jnp.asarray(scale, jnp.float32)
    if self.use_bias:
      bias = self.param("bias", P.with_axes(nn.initializers.zeros, (self.axis_name,)),
                        (features,), self.param_dtype)
      y = y + jnp.asarray(bias, jnp.float32)
    return jnp.asarray(y, self.dtype)


class RMSNorm(nn.Module):
  """RMSNorm over the last axis; param ``scale`` [features] (logical axis ``axis_name``).

  Rounding as HF ``Qwen2RMSNorm`` / ``Qwen3RMSNorm`` (Qwen3-VL spec section 11 item 6):
  normalise in float32, cast to ``dtype``, then multiply by ``scale`` in ``dtype``; multiplying
  in float32 and casting once differs by about one ulp per element in bfloat16.
  Shapes: [..., features] -> same, in ``dtype``.
  """
  epsilon: float = 1e-6
  axis_name: str | None = P.EMBED
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x):
    scale = self.param("scale", P.with_axes(nn.initializers.ones, (self.axis_name,)),
                       (x.shape[-1],), self.param_dtype)
    x32 = jnp.asarray(x, jnp.float32)
    y = x32 * jax.lax.rsqrt(jnp.mean(jnp.square(x32), axis=-1, keepdims=True) + self.epsilon)
    return jnp.asarray(scale, self.dtype) * jnp.asarray(y, self.dtype)
