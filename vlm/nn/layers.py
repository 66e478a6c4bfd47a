"""Building blocks with logical axis names: Dense, Embed, LayerNorm, activations.

All layers take ``dtype`` (computation) and ``param_dtype`` (storage) fields. LayerNorm computes
its statistics in float32 whatever ``dtype`` is (BLIP-2 spec section 9, item 4: LAVIS runs every
LayerNorm in fp32 under autocast); RMSNorm normalises in float32 too.

float16 (max 65,504) is handled so that nothing overflows silently where float32 would not
(bfloat16 and float32 run exactly the code they ran before; nothing below changes them):

* Every float16 matmul (:class:`Dense`, :meth:`Embed.attend`) accumulates in float32 and adds the
  bias in float32 before its one cast.
* ``Dense(wide_float16=True)`` keeps the float32 result (no cast down) and accepts inputs beyond
  the float16 range: :func:`split_rows` divides each input row by a power of two (exact) so that
  it fits, the float16 x float16 product accumulates in float32, and the scale is multiplied back
  in float32. The models use it for every projection whose *output* is not bounded by a
  normalisation: the MLP expansions (SwiGLU gate/up, GELU fc1), the projections back into the
  residual stream (MLP down/fc2, attention output), the merger MLPs.
* :func:`residual_dtype` is float32 for float16 compute: the models keep their residual streams
  (and the Q-Former's pre-LayerNorm sums) in float32, because measured checkpoints exceed 65,504
  there (Qwen2.5-VL-3B ViT block 31: MLP output and residual beyond the float16 range,
  llama.cpp issue 17534 / vLLM PR 13968; Qwen3-VL-2B ViT ``linear_fc1`` output, unsloth-zoo PR
  787). HF transformers 4.57.1 computes these in float16 without a clamp (inf, then NaN); a T5-style
  clamp would be silently wrong, so neither is copied.

What remains float16 under float16 compute: normalised activations (LayerNorm/RMSNorm outputs),
projections of them whose outputs are not kept wide (q/k/v, the patch embedding), softmax
probabilities (in [0, 1]) and attention outputs (convex combinations of the values). Those exceed
65,504 only with weights far outside trained ranges.
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


def is_float16(dtype) -> bool:
  """True when ``dtype`` (any jnp-understood dtype, or None) is float16."""
  return dtype is not None and jnp.dtype(dtype) == jnp.float16


def residual_dtype(dtype) -> Any:
  """dtype of residual streams for compute ``dtype``: float32 for float16, else ``dtype``."""
  return jnp.float32 if is_float16(dtype) else dtype


def wide_dtype(dtype) -> Any:
  """``preferred_element_type`` for a matmul in ``dtype``: float32 for float16, else None (the
  backend default, so bfloat16 and float32 compile exactly as before)."""
  return jnp.float32 if is_float16(dtype) else None


def split_rows(x, dtype=jnp.float16):
  """Splits ``x`` into ``(m, s)`` with ``x == m * s`` per row, ``|m| <= 2**14``, for float16 matmuls.

  ``s`` is a power of two per row (over the last axis), at least 1, so ``x / s`` is exact in
  float32 and only the cast of ``m`` to ``dtype`` rounds (as a plain cast would, for rows inside
  the float16 range). ``s`` carries no gradient (``m * s`` is differentiated as ``x``).

  Args:
    x: float [..., K], any float dtype (typically float32 values beyond the float16 range).
    dtype: dtype of ``m`` (float16).
  Returns:
    ``(m [..., K] in dtype, s float32 [..., 1])``. Rows holding inf/NaN give NaN (as the product
    would).
  """
  x32 = jnp.asarray(x, jnp.float32)
  amax = jnp.max(jnp.abs(x32), axis=-1, keepdims=True)
  exponent = jnp.maximum(jnp.ceil(jnp.log2(amax)) - 14.0, 0.0)  # log2(0) = -inf -> s = 1
  s = jax.lax.stop_gradient(jnp.exp2(exponent))
  return jnp.asarray(x32 / s, dtype), s


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
    wide_float16: only when ``dtype`` is float16: rows of ``x`` are pre-scaled with
      :func:`split_rows` (so float32 inputs beyond 65,504 are fine) and the result stays float32
      (see the module docstring). No effect for other dtypes.
  Shapes: ``x`` [..., in] -> [..., features], in ``dtype``, or float32 for float16 compute with
  ``wide_float16``. float16 products always accumulate in float32 and add the bias in float32.
  """
  features: int
  kernel_axes: Sequence[str | None] = (P.EMBED, P.MLP)
  use_bias: bool = True
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32
  kernel_init: Initializer = default_kernel_init
  bias_init: Initializer = nn.initializers.zeros
  precision: Any = None
  wide_float16: bool = False

  @nn.compact
  def __call__(self, x):
    kernel = self.param("kernel", P.with_axes(self.kernel_init, self.kernel_axes),
                        (x.shape[-1], self.features), self.param_dtype)
    if is_float16(self.dtype):
      return self._float16(x, kernel)
    x = jnp.asarray(x, self.dtype)
    y = jnp.einsum("...i,io->...o", x, jnp.asarray(kernel, self.dtype), precision=self.precision)
    if self.use_bias:
      bias = self.param("bias", P.with_axes(self.bias_init, (self.kernel_axes[-1],)),
                        (self.features,), self.param_dtype)
      y = y + jnp.asarray(bias, self.dtype)
    return y

  def _float16(self, x, kernel):
    """float16 path: float32 accumulation and bias; wide: row pre-scaling, float32 result."""
    scale = None
    if self.wide_float16:
      x, scale = split_rows(x, jnp.float16)
    else:
      x = jnp.asarray(x, jnp.float16)
    y = jnp.einsum("...i,io->...o", x, jnp.asarray(kernel, jnp.float16), precision=self.precision,
                   preferred_element_type=jnp.float32)
    if scale is not None:
      y = y * scale
    if self.use_bias:
      bias = self.param("bias", P.with_axes(self.bias_init, (self.kernel_axes[-1],)),
                        (self.features,), self.param_dtype)
      y = y + jnp.asarray(bias, jnp.float32)
    return y if self.wide_float16 else jnp.asarray(y, jnp.float16)


class Embed(nn.Module):
  """Lookup table ``embedding`` [num_embeddings, features] with axes (VOCAB, EMBED).

  ``__call__(ids)``: int [...] -> [..., features]. ``attend(x)``: [..., features] ->
  [..., num_embeddings], the tied output projection, in ``dtype`` (float32 for float16 compute:
  accumulated and returned in float32, these are logits).
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
                      jnp.asarray(self.embedding, self.dtype), precision=precision,
                      preferred_element_type=wide_dtype(self.dtype))


class LayerNorm(nn.Module):
  """LayerNorm over the last axis with float32 statistics; params ``scale``, ``bias`` [features].

  The input may be any float dtype (float32 residuals under float16 compute); the whole
  normalisation runs in float32 and the output is cast to ``dtype``.
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
