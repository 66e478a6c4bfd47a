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

:func:`attention` is the segment-aware entry point for training: grouped-query heads, packed rows
(``segment_ids``), the causal mask, and a choice of implementation (``xla`` dense, ``chunked``
blockwise online softmax with O(L x block) memory forward and backward, the TPU ``splash`` Pallas
kernel, ``cudnn`` via ``jax.nn.dot_product_attention``, ``auto``). ``scripts/
benchmark_attention_memory.py`` measures the compiled memory of xla vs chunked at 4k-32k tokens.
With ``sharded=True`` it runs under ``jax.shard_map`` on the current mesh, including **context
parallelism** (the token axis split over the ``context`` mesh axis: local queries, all-gathered
keys/values, causal mask by global position); :func:`context_parallel_size` says how many shards.
"""
from __future__ import annotations

import math
from functools import partial
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from vlm.nn import partitioning as P


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


# --------------------------------------------------------------------------------------------------
# Segment-aware attention with selectable implementations.
# --------------------------------------------------------------------------------------------------

IMPLEMENTATIONS = ("xla", "chunked", "splash", "cudnn", "auto")

# "auto" picks "chunked" over "xla" from this key length on (dense float32 scores of one 2,048 x
# 2,048 head are 16 MiB; the quadratic [B, H, Lq, Lk] buffer dominates from about there).
AUTO_CHUNKED_MIN_LENGTH = 2048
# "auto" on GPU with segment ids uses cuDNN only up to this key length: the segment mask reaches
# cuDNN as a dense [B, 1, Lq, Lk] bias (see :func:`_cudnn_arguments`), so beyond it chunked wins.
AUTO_CUDNN_MAX_MASKED_LENGTH = 8192

_NEG = float(jnp.finfo(jnp.float32).min)
_PAD_SEGMENT = -1  # segment id of the positions the implementations pad on internally


def attention(query, key, value, *, segment_ids=None, kv_segment_ids=None, causal: bool = False,
              scale: float | None = None, implementation: str = "xla", block_size: int = 512,
              dtype: Any = None, precision: Any = None, dropout_rate: float = 0.0,
              dropout_rng=None, deterministic: bool = True, interpret: bool | None = None,
              sharded: bool = False):
  """Grouped-query attention confined to segments, with a choice of implementation.

  Every implementation computes the same function (up to float rounding)::

    allowed[b, i, j] = (segment_ids[b, i] == kv_segment_ids[b, j])
                       and (not causal or j <= i + (Lk - Lq))
    out[b, i, h] = sum_j softmax_j(scale * q[b, i, h] . k[b, j, h // G] | allowed) v[b, j, h // G]

  with ``G = Hq // Hkv`` query heads per key/value head (query head ``h`` reads key/value head
  ``h // G``, the grouping of HF ``repeat_kv``). The causal diagonal is aligned at the *end*: the
  last query sits at the last key (the usual convention for ``Lq < Lk``, e.g. new tokens after a
  prefix); for ``Lq == Lk`` it is plain ``j <= i``. Segment id 0 is padding by the vlm batch
  contract, but it is treated like any other id: padding tokens attend to padding tokens, so their
  rows are finite (and are masked out of the loss by the caller). Segment ids must be >= 0; the
  implementations pad lengths internally with id -1.

  A query row with *no* allowed key (possible only when ``kv_segment_ids`` differs from
  ``segment_ids`` or with ``causal`` and ``Lq > Lk``) returns 0 in ``xla`` and ``chunked``; the
  kernels (``splash``, ``cudnn``) require every row to have a key and leave such rows undefined.

  Implementations:
    * ``"xla"``: dense masked einsum (:func:`dot_product_attention`), float32 scores; memory
      O(B * Hq * Lq * Lk) in the forward and the backward. The only one with attention dropout.
    * ``"chunked"``: blockwise online softmax in pure JAX (FlashAttention, Dao et al. 2022,
      Algorithm 1; Rabe & Staats 2021, "Self-attention does not need O(n^2) memory"), a
      ``jax.custom_vjp`` whose residuals are only ``q, k, v, out`` and the float32 log-sum-exp,
      and whose backward recomputes each score block (FlashAttention-2, Dao 2023, Algorithm 2):
      memory O(B * Hq * (Lq + Lk) * D + B * Hq * block_size**2) forward and backward. Key blocks a
      query block cannot see are skipped: above the causal diagonal (loop bounds), and blocks whose
      segment id ranges are disjoint (``lax.cond``, so several images in one ViT row or several
      packed samples cost close to their own lengths). Lengths that are not multiples of
      ``block_size`` are padded internally.
    * ``"splash"``: the TPU Pallas splash-attention kernel
      (``jax.experimental.pallas.ops.tpu.splash_attention``, ``make_splash_mha``) with
      ``SegmentIds`` and a ``CausalMask(offset=Lk - Lq)``; lengths padded to the kernel block (a
      multiple of 128). On CPU it runs in Pallas interpret mode (slow; for tests). Under a sharded
      ``jit`` the Pallas call is not partitioned by GSPMD: wrap the call in ``shard_map`` over the
      batch / head axes (attention is independent per row and head).
    * ``"cudnn"``: ``jax.nn.dot_product_attention(implementation="cudnn")`` (cuDNN flash attention;
      float16/bfloat16 only). Without segment ids it uses cuDNN's causal mask (O(L) memory); with
      segment ids their equality mask is passed as ``mask`` (cuDNN receives it as a dense
      [B, 1, Lq, Lk] bias, so memory O(B * Lq * Lk) for that bias only).
    * ``"auto"``: ``splash`` on TPU; ``cudnn`` on GPU when the compute dtype is float16/bfloat16,
      ``D <= 128`` and either no segment ids or ``Lk <= AUTO_CUDNN_MAX_MASKED_LENGTH`` (8192);
      otherwise ``chunked`` when ``Lk >= AUTO_CHUNKED_MIN_LENGTH`` (2048), else ``xla``.
      :func:`resolve_implementation` returns the choice.

  Args:
    query: [B, Lq, Hq, D].
    key: [B, Lk, Hkv, D], ``Hq % Hkv == 0``.
    value: [B, Lk, Hkv, D].
    segment_ids: optional int [B, Lq] (>= 0); queries attend only keys with the same id. None:
      one segment (no padding).
    kv_segment_ids: optional int [B, Lk]; default ``segment_ids`` (which then needs Lq == Lk).
    causal: query i sees key j only for ``j <= i + Lk - Lq``.
    scale: multiplier on the scores; default ``D ** -0.5``.
    implementation: one of ``IMPLEMENTATIONS``.
    block_size: query/key block length of ``chunked`` and ``splash`` (splash rounds it to a
      multiple of 128); clipped to the sequence length.
    dtype: result dtype (default ``query.dtype``), also the dtype of the probabilities and values
      in the ``probs @ v`` product; scores, softmax and accumulations are float32.
    precision: ``lax.Precision`` of the einsums (``xla`` and ``chunked``).
    dropout_rate, dropout_rng, deterministic: attention-probability dropout, ``xla`` only.
    interpret: ``splash`` only: run the Pallas kernel in interpret mode (``pallas_call(...,
      interpret=True)`` via ``make_splash_mha(interpret=...)``); default: False on TPU, True on
      CPU (tests), and an error on other backends.
    sharded: run under ``jax.shard_map`` on the current mesh (``jax.set_mesh``) with the flax
      logical rules in scope (``nn.logical_axis_rules``): rows over the mesh axes of
      ``partitioning.BATCH``, heads over those of ``HEADS`` (each only where it divides), and
      **context parallelism** over those of ``partitioning.SEQUENCE`` (the ``context`` mesh axis
      in ``vlm.parallel.mesh.DEFAULT_RULES``): each device keeps its Lq/cp queries, all-gathers
      keys, values and key segment ids (exact; memory O(Lk) keys per device), and masks
      causally by global position (``j <= i + s * Lq/cp + Lk - Lq`` on shard ``s``), so packed
      segments and the causal diagonal are intact across shards. Without a mesh, or with one
      context shard and an implementation other than ``splash`` (GSPMD partitions those over
      rows and heads itself), it is the plain call. The causal work is not load balanced (shard
      ``s`` computes ``s + 1`` of ``cp`` key blocks' worth; the chunked/kernel paths skip the
      rest). Q/K/V arrive in the layout [B, L, H, D] sharded (or resharded) as above.
  Returns:
    [B, Lq, Hq, D] in ``dtype``.
  Raises:
    ValueError: unknown ``implementation`` (the message lists the choices); ``cudnn`` without a
      GPU backend or with float32 inputs; ``splash`` where Pallas splash attention is missing;
      dropout with an implementation other than ``xla``; bad ranks, head counts or segment shapes;
      with ``sharded`` and context parallelism: lengths not divisible by the context shards,
      attention dropout.
  """
  if query.ndim != 4 or key.ndim != 4 or value.ndim != 4:
    raise ValueError(f"attention expects [B, L, H, D] inputs, got query {query.shape}, key "
                     f"{key.shape}, value {value.shape}")
  b, lq, hq, d = query.shape
  lk, hkv = key.shape[1], key.shape[2]
  if value.shape[:3] != key.shape[:3] or key.shape[0] != b or key.shape[3] != d:
    raise ValueError(f"key {key.shape} and value {value.shape} must be [B, Lk, Hkv, D] with B and "
                     f"D of query {query.shape}")
  if hq % hkv:
    raise ValueError(f"query heads ({hq}) must be a multiple of key/value heads ({hkv})")
  if kv_segment_ids is None and segment_ids is not None:
    if lq != lk:
      raise ValueError(f"segment_ids alone need Lq == Lk (got {lq} and {lk}); pass "
                       "kv_segment_ids [B, Lk] too")
    kv_segment_ids = segment_ids
  if (segment_ids is None) != (kv_segment_ids is None):
    raise ValueError("pass segment_ids together with kv_segment_ids (or neither)")
  if segment_ids is not None:
    segment_ids = jnp.asarray(segment_ids, jnp.int32)
    kv_segment_ids = jnp.asarray(kv_segment_ids, jnp.int32)
    if segment_ids.shape != (b, lq) or kv_segment_ids.shape != (b, lk):
      raise ValueError(f"segment_ids must be [B, Lq] = {(b, lq)} and kv_segment_ids [B, Lk] = "
                       f"{(b, lk)}; got {segment_ids.shape} and {kv_segment_ids.shape}")
  dtype = jnp.dtype(dtype or query.dtype)
  if scale is None:
    scale = d ** -0.5
  scale = float(scale)
  impl = resolve_implementation(implementation, key_length=lk, head_dim=d, dtype=dtype,
                                has_segments=segment_ids is not None)
  if impl != "xla" and not deterministic and dropout_rate > 0.0:
    raise ValueError(f"attention dropout is implemented only by implementation='xla' (got "
                     f"{impl!r} with dropout_rate={dropout_rate}); set the attention dropout to 0")
  run = partial(_run_implementation, impl, causal=causal, scale=scale, block_size=block_size,
                dtype=dtype, precision=precision, dropout_rate=dropout_rate,
                dropout_rng=dropout_rng, deterministic=deterministic, interpret=interpret)
  if sharded:
    return _sharded_attention(run, impl, query, key, value, segment_ids, kv_segment_ids,
                              causal=causal, dropout=not deterministic and dropout_rate > 0.0)
  return run(query, key, value, segment_ids, kv_segment_ids)


def _run_implementation(impl, query, key, value, segment_ids, kv_segment_ids, causal_offset=None,
                        *, causal, scale, block_size, dtype, precision, dropout_rate, dropout_rng,
                        deterministic, interpret):
  """The chosen implementation on (local) arrays; ``causal_offset`` as :func:`_allowed_mask`."""
  if impl == "xla":
    return _xla_attention(query, key, value, segment_ids, kv_segment_ids, causal, scale, dtype,
                          precision, dropout_rate, dropout_rng, deterministic, causal_offset)
  if impl == "chunked":
    return _chunked_attention(query, key, value, segment_ids, kv_segment_ids, causal, scale,
                              block_size, dtype, precision, causal_offset)
  if impl == "splash":
    return _splash_attention(query, key, value, segment_ids, kv_segment_ids, causal, scale,
                             block_size, dtype, interpret, causal_offset)
  return _cudnn_attention(query, key, value, segment_ids, kv_segment_ids, causal, scale, dtype,
                          causal_offset)


# --------------------------------------------------------------------------------------------------
# Context parallelism: queries stay on their shard, keys/values are all-gathered.
# --------------------------------------------------------------------------------------------------


def _mesh_axes_of(logical: str, mesh) -> tuple[str, ...]:
  """Mesh axes (of size > 1, present in ``mesh``) that the current flax logical rules give the
  logical axis ``logical``; () without rules or when it is replicated."""
  import flax.linen as nn
  rules = nn.get_logical_axis_rules()
  if not rules:
    return ()
  spec = nn.logical_to_mesh_axes((logical,), rules)[0]
  if spec is None:
    return ()
  names = spec if isinstance(spec, tuple) else (spec,)
  return tuple(a for a in names if a in mesh.axis_names and mesh.shape[a] > 1)


def _current_mesh():
  mesh = jax.sharding.get_abstract_mesh()
  return None if mesh is None or mesh.empty else mesh


def context_parallel_size(sequence_axis: str = P.SEQUENCE) -> int:
  """Number of shards the current mesh (``jax.set_mesh``) and flax logical rules
  (``nn.logical_axis_rules``) split the logical axis ``sequence_axis`` into (default
  ``partitioning.SEQUENCE``, the decoder's token axis: the ``context`` mesh axis under
  ``vlm.parallel.mesh.DEFAULT_RULES``); 1 without a mesh or rules."""
  mesh = _current_mesh()
  if mesh is None:
    return 1
  return math.prod(mesh.shape[a] for a in _mesh_axes_of(sequence_axis, mesh))


def _spec_entry(axes: tuple[str, ...]):
  if not axes:
    return None
  return axes[0] if len(axes) == 1 else axes


def _sharded_attention(run, impl, query, key, value, segment_ids, kv_segment_ids, *, causal,
                       dropout):
  """:func:`attention` under ``shard_map`` on the current mesh (see its ``sharded`` argument).

  Per device: queries [B/dp, Lq/cp, Hq/tp, D] stay local; keys, values and key segment ids are
  all-gathered over the context axes (exact; ``all_gather``'s transpose, a reduce-scatter, returns
  the key/value gradients to their shards); the causal diagonal is offset by the shard's first
  query position ``s * Lq/cp`` so the mask is the one of the global positions. Kernels with a
  static mask (``splash``, ``cudnn``) get one branch per context shard (``lax.switch``).
  """
  mesh = _current_mesh()
  if mesh is None:
    return run(query, key, value, segment_ids, kv_segment_ids)
  ctx = _mesh_axes_of(P.SEQUENCE, mesh)
  cp = math.prod(mesh.shape[a] for a in ctx)
  if cp == 1 and impl != "splash":
    return run(query, key, value, segment_ids, kv_segment_ids)  # GSPMD partitions it as is
  b, lq, hq, _ = query.shape
  lk, hkv = key.shape[1], key.shape[2]
  if lq % cp or lk % cp:
    raise ValueError(f"context parallelism over mesh axes {ctx} ({cp} shards) needs query and key "
                     f"lengths divisible by {cp}, got {lq} and {lk}; pad the rows "
                     f"(config.data.max_length) to a multiple of {cp}")
  if cp > 1 and dropout:
    raise ValueError("attention dropout is not supported with context parallelism (mesh axes "
                     f"{ctx}); set the attention dropout to 0")
  fits = lambda axes, *dims: all(d % math.prod(mesh.shape[a] for a in axes) == 0 for d in dims)
  batch_axes = tuple(a for a in _mesh_axes_of(P.BATCH, mesh) if a not in ctx)
  batch_axes = batch_axes if fits(batch_axes, b) else ()
  head_axes = tuple(a for a in _mesh_axes_of(P.HEADS, mesh) if a not in ctx + batch_axes)
  head_axes = head_axes if fits(head_axes, hq, hkv) else ()
  bs, cs, hs = _spec_entry(batch_axes), _spec_entry(ctx), _spec_entry(head_axes)
  heads_spec = jax.sharding.PartitionSpec(bs, cs, hs, None)
  seg_spec = jax.sharding.PartitionSpec(bs, cs)
  lq_local = lq // cp
  has_segments = segment_ids is not None

  def local(q, k, v, *segs):
    qs, ks = segs if has_segments else (None, None)
    if cp > 1:
      gather = lambda x: jax.lax.all_gather(x, ctx, axis=1, tiled=True)
      k, v = gather(k), gather(v)
      ks = gather(ks) if has_segments else None
      shard = jax.lax.axis_index(ctx)
    else:
      shard = 0
    if not causal or cp == 1:
      return run(q, k, v, qs, ks)
    base = lk - lq  # the global end-aligned diagonal, shifted by this shard's first query
    if impl in ("splash", "cudnn"):  # static masks: one branch per shard
      branches = [partial(lambda s, *a: run(*a, causal_offset=base + s * lq_local), s)
                  for s in range(cp)]
      return jax.lax.switch(shard, branches, q, k, v, qs, ks)
    return run(q, k, v, qs, ks, causal_offset=base + shard * lq_local)

  args = (query, key, value) + ((segment_ids, kv_segment_ids) if has_segments else ())
  specs = (heads_spec,) * 3 + ((seg_spec,) * 2 if has_segments else ())
  # check_vma=False: the blockwise loops carry values whose varying-axes types differ by branch
  return jax.shard_map(local, mesh=mesh, in_specs=specs, out_specs=heads_spec,
                       check_vma=False)(*args)


def _backend() -> str:
  """The platform "auto" chooses for: the current mesh's devices (an AOT compile for a TPU
  topology picks the TPU kernels), else jax's default backend."""
  return P.mesh_platform()


def resolve_implementation(implementation: str, *, key_length: int, head_dim: int, dtype: Any,
                           has_segments: bool) -> str:
  """The implementation :func:`attention` runs for ``implementation`` (resolves ``"auto"``).

  Raises:
    ValueError: unknown name (lists ``IMPLEMENTATIONS``); ``cudnn`` off GPU or in a dtype other
      than float16/bfloat16.
  """
  if implementation not in IMPLEMENTATIONS:
    raise ValueError(f"unknown attention implementation {implementation!r}; choose one of "
                     f"{', '.join(IMPLEMENTATIONS)}")
  backend = _backend()
  cudnn_dtype = jnp.dtype(dtype) in (jnp.dtype(jnp.float16), jnp.dtype(jnp.bfloat16))
  if implementation == "auto":
    if backend == "tpu":
      return "splash"
    if (backend == "gpu" and cudnn_dtype and head_dim <= 128
        and (not has_segments or key_length <= AUTO_CUDNN_MAX_MASKED_LENGTH)):
      return "cudnn"
    return "chunked" if key_length >= AUTO_CHUNKED_MIN_LENGTH else "xla"
  if implementation == "cudnn":
    if backend != "gpu":
      raise ValueError(f"attention implementation 'cudnn' needs a CUDA GPU backend, but the JAX "
                       f"backend is {backend!r}; use 'chunked' or 'xla' here (or 'splash' on TPU)")
    if not cudnn_dtype:
      raise ValueError(f"attention implementation 'cudnn' supports float16/bfloat16 only, got "
                       f"{jnp.dtype(dtype).name}; pass dtype=bfloat16 or use 'chunked'")
  return implementation


def _allowed_mask(segment_ids, kv_segment_ids, causal: bool, lq: int, lk: int, causal_offset=None):
  """Bool [B or 1, 1, Lq, Lk] of :func:`attention`'s ``allowed``, or None when all is allowed.

  ``causal_offset`` (int or traced int32 scalar): query i sees key j iff ``j <= i + offset``;
  default ``Lk - Lq``."""
  mask = None
  if segment_ids is not None:
    mask = (segment_ids[:, :, None] == kv_segment_ids[:, None, :])[:, None]
  if causal:
    offset = lk - lq if causal_offset is None else causal_offset
    tri = (jnp.arange(lk)[None, :] <= jnp.arange(lq)[:, None] + offset)[None, None]
    mask = tri if mask is None else mask & tri
  return mask


def _xla_attention(query, key, value, segment_ids, kv_segment_ids, causal, scale, dtype,
                   precision, dropout_rate, dropout_rng, deterministic, causal_offset=None):
  groups = query.shape[2] // key.shape[2]
  if groups > 1:
    key = jnp.repeat(key, groups, axis=2)
    value = jnp.repeat(value, groups, axis=2)
  mask = _allowed_mask(segment_ids, kv_segment_ids, causal, query.shape[1], key.shape[1],
                       causal_offset)
  out = dot_product_attention(query, key, value, mask=mask, scale=scale,
                              dropout_rate=dropout_rate, dropout_rng=dropout_rng,
                              deterministic=deterministic, dtype=dtype, precision=precision)
  if mask is not None:  # rows without any allowed key: 0 (as chunked), not the uniform average
    has_key = jnp.any(mask, axis=-1)[:, 0, :, None, None]  # [B, Lq, 1, 1]
    out = jnp.where(has_key, out, jnp.zeros((), out.dtype))
  return out


# ----------------------------------------- chunked ------------------------------------------------


def _round_up(x: int, m: int) -> int:
  return -(-x // m) * m


def _pad_axis(x, axis: int, length: int, value=0):
  if x.shape[axis] == length:
    return x
  pad = [(0, 0)] * x.ndim
  pad[axis] = (0, length - x.shape[axis])
  return jnp.pad(x, pad, constant_values=value)


def _chunked_attention(query, key, value, segment_ids, kv_segment_ids, causal, scale, block_size,
                       dtype, precision, causal_offset=None):
  b, lq, hq, d = query.shape
  lk, hkv = key.shape[1], key.shape[2]
  if block_size < 1:
    raise ValueError(f"block_size must be positive, got {block_size}")
  bq, bk = min(block_size, lq), min(block_size, lk)
  lqp, lkp = _round_up(lq, bq), _round_up(lk, bk)
  if segment_ids is None:
    segment_ids = jnp.zeros((b, lq), jnp.int32)
    kv_segment_ids = jnp.zeros((b, lk), jnp.int32)
  qs = _pad_axis(segment_ids, 1, lqp, _PAD_SEGMENT)
  ks = _pad_axis(kv_segment_ids, 1, lkp, _PAD_SEGMENT)
  # [B, L, H, D] -> [B, Hkv, G, L, D] (q) and [B, Hkv, L, D] (k, v).
  q = _pad_axis(query, 1, lqp).reshape(b, lqp, hkv, hq // hkv, d).transpose(0, 2, 3, 1, 4)
  k = _pad_axis(key, 1, lkp).transpose(0, 2, 1, 3)
  v = _pad_axis(value, 1, lkp).transpose(0, 2, 1, 3)
  cfg = _ChunkConfig(causal=bool(causal), scale=scale, block_q=bq, block_k=bk,
                     dtype=jnp.dtype(dtype), precision=precision)
  offset = jnp.asarray(lk - lq if causal_offset is None else causal_offset, jnp.int32)
  out = _flash(cfg, q, k, v, qs, ks, offset)  # [B, Hkv, G, Lqp, D]
  out = out.transpose(0, 3, 1, 2, 4).reshape(b, lqp, hq, d)
  return out[:, :lq]


class _ChunkConfig(NamedTuple):
  causal: bool
  scale: float
  block_q: int
  block_k: int
  dtype: Any
  precision: Any


def _blocks(x, axis: int, block: int):
  """Split ``axis`` into blocks and move the block index to the front."""
  n = x.shape[axis] // block
  x = x.reshape(x.shape[:axis] + (n, block) + x.shape[axis + 1:])
  return jnp.moveaxis(x, axis, 0)


def _unblocks(x, axis: int):
  """Inverse of :func:`_blocks` (block index at the front -> ``axis``)."""
  x = jnp.moveaxis(x, 0, axis)
  return x.reshape(x.shape[:axis] + (x.shape[axis] * x.shape[axis + 1],) + x.shape[axis + 2:])


def _block_mask(cfg: _ChunkConfig, i, j, qs_i, ks_j, offset):
  """Bool [B, 1, 1, bq, bk] allowed pairs of query block i and key block j.

  ``offset`` (int32 scalar, may be traced): query i sees key j iff ``j <= i + offset`` (``Lk - Lq``
  of the unpadded lengths; plus the shard's first query position under context parallelism)."""
  mask = qs_i[:, :, None] == ks_j[:, None, :]
  if cfg.causal:
    qpos = i * cfg.block_q + jnp.arange(cfg.block_q)
    kpos = j * cfg.block_k + jnp.arange(cfg.block_k)
    mask = mask & (kpos[None, :] <= qpos[:, None] + offset)[None]
  return mask[:, None, None]


def _segments_overlap(q_lo, q_hi, k_lo, k_hi):
  """Whether some batch row's query and key block id ranges overlap (else the block is skipped)."""
  return jnp.any((q_hi >= k_lo) & (k_hi >= q_lo))


def _causal_key_blocks(cfg: _ChunkConfig, i, num_k, offset):
  """Key blocks 0..hi-1 hold keys that query block i may see under the causal mask."""
  last_query = i * cfg.block_q + cfg.block_q - 1 + offset
  return jnp.clip(jnp.floor_divide(last_query, cfg.block_k) + 1, 0, num_k)


def _causal_first_query_block(cfg: _ChunkConfig, j, num_q, offset):
  """First query block that may see key block j under the causal mask."""
  # smallest i with i * bq + bq - 1 + offset >= j * bk
  need = j * cfg.block_k - offset - (cfg.block_q - 1)
  return jnp.clip(-jnp.floor_divide(-need, cfg.block_q), 0, num_q)


def _scores(cfg: _ChunkConfig, q_i, k_j):
  s = jnp.einsum("bhgqd,bhkd->bhgqk", q_i, k_j, precision=cfg.precision,
                 preferred_element_type=jnp.float32)
  return s * cfg.scale


def _flash_forward(cfg: _ChunkConfig, q, k, v, qs, ks, offset):
  """out [B, Hkv, G, Lqp, D] (cfg.dtype) and float32 log-sum-exp [B, Hkv, G, Lqp]."""
  b, hkv, g, lqp, d = q.shape
  nq, nk = lqp // cfg.block_q, k.shape[2] // cfg.block_k
  kb, vb, ksb = _blocks(k, 2, cfg.block_k), _blocks(v, 2, cfg.block_k), _blocks(ks, 1, cfg.block_k)
  k_lo, k_hi = ksb.min(-1), ksb.max(-1)  # [nk, B]

  def query_block(args):
    i, q_i, qs_i = args
    q_lo, q_hi = qs_i.min(-1), qs_i.max(-1)

    def step(j, carry):
      def compute(carry):
        m, l, acc = carry
        k_j, v_j, ks_j = kb[j], vb[j], ksb[j]
        mask = _block_mask(cfg, i, j, qs_i, ks_j, offset)
        s = jnp.where(mask, _scores(cfg, q_i, k_j), _NEG)
        m_new = jnp.maximum(m, s.max(-1))
        p = jnp.where(mask, jnp.exp(s - m_new[..., None]), 0.0)
        alpha = jnp.exp(m - m_new)
        l = alpha * l + p.sum(-1)
        pv = jnp.einsum("bhgqk,bhkd->bhgqd", p.astype(cfg.dtype), v_j.astype(cfg.dtype),
                        precision=cfg.precision, preferred_element_type=jnp.float32)
        return m_new, l, alpha[..., None] * acc + pv

      return jax.lax.cond(_segments_overlap(q_lo, q_hi, k_lo[j], k_hi[j]), compute,
                          lambda c: c, carry)

    init = (jnp.full((b, hkv, g, cfg.block_q), _NEG, jnp.float32),
            jnp.zeros((b, hkv, g, cfg.block_q), jnp.float32),
            jnp.zeros((b, hkv, g, cfg.block_q, d), jnp.float32))
    hi = _causal_key_blocks(cfg, i, nk, offset) if cfg.causal else nk
    m, l, acc = jax.lax.fori_loop(0, hi, step, init)
    has_key = l > 0
    out = acc / jnp.where(has_key, l, 1.0)[..., None]
    lse = jnp.where(has_key, m + jnp.log(jnp.where(has_key, l, 1.0)), 0.0)
    return out.astype(cfg.dtype), lse

  out, lse = jax.lax.map(query_block, (jnp.arange(nq), _blocks(q, 3, cfg.block_q),
                                       _blocks(qs, 1, cfg.block_q)))
  return _unblocks(out, 3), _unblocks(lse, 3)


@partial(jax.custom_vjp, nondiff_argnums=(0,))
def _flash(cfg: _ChunkConfig, q, k, v, qs, ks, offset):
  return _flash_forward(cfg, q, k, v, qs, ks, offset)[0]


def _flash_fwd(cfg, q, k, v, qs, ks, offset):
  out, lse = _flash_forward(cfg, q, k, v, qs, ks, offset)
  return out, (q, k, v, qs, ks, offset, out, lse)


def _flash_bwd(cfg, residuals, d_out):
  """FlashAttention-2 backward: one pass over key blocks, recomputing each score block."""
  q, k, v, qs, ks, offset, out, lse = residuals
  b, hkv, g, lqp, d = q.shape
  nq, nk = lqp // cfg.block_q, k.shape[2] // cfg.block_k
  # delta_i = sum_d dO_i * O_i  (= sum_j P_ij dP_ij), float32 [B, Hkv, G, Lqp]
  delta = jnp.sum(d_out.astype(jnp.float32) * out.astype(jnp.float32), axis=-1)
  qb, dob = _blocks(q, 3, cfg.block_q), _blocks(d_out, 3, cfg.block_q)
  lseb, deltab = _blocks(lse, 3, cfg.block_q), _blocks(delta, 3, cfg.block_q)
  qsb = _blocks(qs, 1, cfg.block_q)
  q_lo, q_hi = qsb.min(-1), qsb.max(-1)  # [nq, B]

  def key_block(dq, args):
    j, k_j, v_j, ks_j = args
    k_lo, k_hi = ks_j.min(-1), ks_j.max(-1)

    def step(i, carry):
      def compute(carry):
        dk_j, dv_j, dq = carry
        q_i, do_i = qb[i], dob[i].astype(cfg.dtype)
        mask = _block_mask(cfg, i, j, qsb[i], ks_j, offset)
        p = jnp.where(mask, jnp.exp(_scores(cfg, q_i, k_j) - lseb[i][..., None]), 0.0)
        dv_j = dv_j + jnp.einsum("bhgqk,bhgqd->bhkd", p.astype(cfg.dtype), do_i,
                                 precision=cfg.precision, preferred_element_type=jnp.float32)
        dp = jnp.einsum("bhgqd,bhkd->bhgqk", do_i, v_j.astype(cfg.dtype),
                        precision=cfg.precision, preferred_element_type=jnp.float32)
        ds = (p * (dp - deltab[i][..., None]) * cfg.scale).astype(cfg.dtype)
        dk_j = dk_j + jnp.einsum("bhgqk,bhgqd->bhkd", ds, q_i.astype(cfg.dtype),
                                 precision=cfg.precision, preferred_element_type=jnp.float32)
        dq_i = jnp.einsum("bhgqk,bhkd->bhgqd", ds, k_j.astype(cfg.dtype),
                          precision=cfg.precision, preferred_element_type=jnp.float32)
        dq = jax.lax.dynamic_update_index_in_dim(dq, dq[i] + dq_i, i, 0)
        return dk_j, dv_j, dq

      return jax.lax.cond(_segments_overlap(q_lo[i], q_hi[i], k_lo, k_hi), compute,
                          lambda c: c, carry)

    init = (jnp.zeros((b, hkv, cfg.block_k, d), jnp.float32),
            jnp.zeros((b, hkv, cfg.block_k, d), jnp.float32), dq)
    lo = _causal_first_query_block(cfg, j, nq, offset) if cfg.causal else 0
    dk_j, dv_j, dq = jax.lax.fori_loop(lo, nq, step, init)
    return dq, (dk_j, dv_j)

  dq0 = jnp.zeros((nq, b, hkv, g, cfg.block_q, d), jnp.float32)
  dq, (dk, dv) = jax.lax.scan(
      key_block, dq0, (jnp.arange(nk), _blocks(k, 2, cfg.block_k), _blocks(v, 2, cfg.block_k),
                       _blocks(ks, 1, cfg.block_k)))
  return (_unblocks(dq, 3).astype(q.dtype), _unblocks(dk, 2).astype(k.dtype),
          _unblocks(dv, 2).astype(v.dtype), None, None, None)


_flash.defvjp(_flash_fwd, _flash_bwd)


# ----------------------------------------- splash -------------------------------------------------


def _splash_attention(query, key, value, segment_ids, kv_segment_ids, causal, scale, block_size,
                      dtype, interpret, causal_offset=None):
  try:
    from jax.experimental.pallas.ops.tpu import splash_attention as splash
  except ImportError as e:  # pragma: no cover - depends on the installed jax
    raise ValueError(f"attention implementation 'splash' needs jax.experimental.pallas.ops.tpu."
                     f"splash_attention, which this jax {jax.__version__} lacks ({e}); use "
                     "'chunked'") from e
  backend = _backend()
  if interpret is None:
    if backend not in ("tpu", "cpu"):
      raise ValueError(f"attention implementation 'splash' is a TPU kernel and the JAX backend is "
                       f"{backend!r}; use 'cudnn' or 'chunked' there (or interpret=True to "
                       "emulate it, slowly)")
    interpret = backend == "cpu"  # Pallas interpret mode: emulation for tests on CPU
  b, lq, hq, d = query.shape
  lk, hkv = key.shape[1], key.shape[2]
  lanes = 128  # the kernel's block sizes must be multiples of the TPU lane width
  block = max(lanes, (block_size // lanes) * lanes)
  bq, bk = min(block, _round_up(lq, lanes)), min(block, _round_up(lk, lanes))
  lqp, lkp = _round_up(lq, bq), _round_up(lk, bk)
  if lqp > lq and lkp == lk:
    lkp += bk  # padded query rows need a padded key to attend (else their softmax is undefined)
  if segment_ids is None:
    segment_ids = jnp.zeros((b, lq), jnp.int32)
    kv_segment_ids = jnp.zeros((b, lk), jnp.int32)
  qs = _pad_axis(segment_ids, 1, lqp, _PAD_SEGMENT)
  ks = _pad_axis(kv_segment_ids, 1, lkp, _PAD_SEGMENT)
  # The kernel does not scale the scores; it takes [H, L, D] per batch row.
  q = _pad_axis(query * jnp.asarray(scale, query.dtype), 1, lqp).transpose(0, 2, 1, 3)
  k = _pad_axis(key, 1, lkp).transpose(0, 2, 1, 3)
  v = _pad_axis(value, 1, lkp).transpose(0, 2, 1, 3)
  if causal:
    head_mask = splash.CausalMask((lqp, lkp),
                                  offset=lk - lq if causal_offset is None else int(causal_offset))
  else:
    head_mask = splash.FullMask((lqp, lkp))
  mask = splash.MultiHeadMask([head_mask] * hq)
  sizes = splash.BlockSizes(block_q=bq, block_kv=bk, block_kv_compute=bk, block_q_dkv=bq,
                            block_kv_dkv=bk, block_kv_dkv_compute=bk, block_q_dq=bq,
                            block_kv_dq=bk)
  kernel = splash.make_splash_mha(mask, block_sizes=sizes, head_shards=1, q_seq_shards=1,
                                  interpret=interpret)
  run = lambda q_b, k_b, v_b, qs_b, ks_b: kernel(
      q_b, k_b, v_b, segment_ids=splash.SegmentIds(q=qs_b, kv=ks_b))
  out = jax.vmap(run)(q, k, v, qs, ks)  # [B, Hq, Lqp, D]
  return out.transpose(0, 2, 1, 3)[:, :lq].astype(dtype)


# ----------------------------------------- cudnn --------------------------------------------------


def _cudnn_arguments(query, key, value, segment_ids, kv_segment_ids, causal, scale,
                     causal_offset=None):
  """Keyword arguments of ``jax.nn.dot_product_attention`` computing :func:`attention`.

  cuDNN's causal mask (``is_causal``) is aligned at the top-left corner, which equals the
  end-aligned one only for Lq == Lk; otherwise the causal triangle joins the boolean ``mask``.
  Segments go in ``mask`` as their equality matrix [B, 1, Lq, Lk].
  """
  lq, lk = query.shape[1], key.shape[1]
  offset = lk - lq if causal_offset is None else int(causal_offset)
  mask = None
  if segment_ids is not None:
    mask = (segment_ids[:, :, None] == kv_segment_ids[:, None, :])[:, None]
  is_causal = bool(causal) and offset == 0
  if causal and offset != 0:
    tri = (jnp.arange(lk)[None, :] <= jnp.arange(lq)[:, None] + offset)[None, None]
    mask = tri if mask is None else mask & tri
  return dict(query=query, key=key, value=value, mask=mask, is_causal=is_causal, scale=scale)


def _cudnn_attention(query, key, value, segment_ids, kv_segment_ids, causal, scale, dtype,
                     causal_offset=None):
  cdtype = jnp.dtype(dtype)
  args = _cudnn_arguments(query.astype(cdtype), key.astype(cdtype), value.astype(cdtype),
                          segment_ids, kv_segment_ids, causal, scale, causal_offset)
  return jax.nn.dot_product_attention(**args, implementation="cudnn").astype(dtype)


# --------------------------------------------------------------------------------------------------
# Attention over a fixed-size KV cache (autoregressive decoding), shared by every decoder.
# --------------------------------------------------------------------------------------------------


def causal_padding_mask(attention_mask, batch: int, length: int, segment_ids=None):
  """Boolean attention mask [B, 1, L, L] (True = attend) without a cache.

  Causal AND key validity (``attention_mask`` [B, L], True = real token) AND, with
  ``segment_ids`` int [B, L], equal segment ids (packed rows: each sample attends only to its own
  earlier tokens; padding, id 0, attends only to earlier padding, so no row is empty and nothing
  is NaN).
  """
  pos = jnp.arange(length)
  causal = pos[None, :] <= pos[:, None]
  mask = causal[None, None] & attention_mask[:, None, None, :]
  if segment_ids is not None:
    mask = mask & (segment_ids[:, None, :, None] == segment_ids[:, None, None, :])
  return mask


def init_kv_cache(num_layers: int, batch: int, kv_heads: int, max_length: int, head_dim: int,
                  dtype: Any = jnp.float32) -> dict:
  """An empty KV cache in the layout every vlm decoder uses (Qwen3, OPT, the T5 decoder).

  Returns ``{"k": [NL, B, kvH, T, hd], "v": same, "mask": bool [B, T]}``: layers stacked on the
  leading axis (scanned or not), heads before slots as HF's cache (see :func:`cached_attention`),
  ``mask`` marking the slots that hold real (non-pad) tokens. Batch axes for beam search:
  ``{"k": 1, "v": 1, "mask": 0}``.
  """
  shape = (num_layers, batch, kv_heads, max_length, head_dim)
  return {"k": jnp.zeros(shape, dtype), "v": jnp.zeros(shape, dtype),
          "mask": jnp.zeros((batch, max_length), bool)}


def cache_masks(attention_mask, cache_mask, cache_index):
  """Masks of cached attention (see :func:`cached_attention`).

  Args:
    attention_mask: bool [B, L], real new tokens.
    cache_mask: bool [B, T], slots that held real tokens *before* this call.
    cache_index: int32 scalar, slot of the first new token; slots ``>= cache_index`` of the old
      cache are stale and never attended.
  Returns:
    ``(mask_cache bool [B, 1, 1, T], mask_new bool [B, 1, L, L])``: old slots every new token may
    read, and causal attention among the new tokens.
  """
  length = attention_mask.shape[1]
  slots = jnp.arange(cache_mask.shape[1])
  mask_cache = (cache_mask & (slots[None, :] < cache_index))[:, None, None, :]
  return mask_cache, causal_padding_mask(attention_mask, attention_mask.shape[0], length)


def cached_attention(q, k_new, v_new, k_cache, v_cache, mask_cache, mask_new, scale: float,
                     dtype: Any = jnp.float32, bias_cache=None, bias_new=None):
  """Attention of ``L`` new tokens over an old KV cache plus themselves, without copying the cache.

  The scores against the cache and against the new keys are computed separately, joined on the key
  axis for one float32 softmax, and the two value sums added: the result equals attention over
  the cache with the new keys written at their slots (HF ``DynamicCache.update`` + ``sdpa``), but
  the cache is only read (no ``dynamic_update_slice`` copy, no GQA ``repeat`` of the cache: query
  heads are grouped as ``[kvH, rep]``, head ``j`` reads KV head ``j // rep`` as HF ``repeat_kv``).

  Args:
    q: [B, L, H, hd] (post-RoPE). k_new, v_new: [B, L, kvH, hd].
    k_cache, v_cache: [B, kvH, T, hd] (any dtype; cast to ``dtype``). Heads before slots, as
      HF's cache, so both products batch over (B, kvH) with the cache in its stored layout.
    mask_cache: bool [B, 1, 1 or L, T]; mask_new: bool [B, 1, L, L] (see
      :func:`cache_masks`). A query with no valid key gets a uniform average (finite).
    scale: score scale (``head_dim ** -0.5``; T5 uses 1.0).
    bias_cache, bias_new: optional float additive score biases (T5's relative position bias),
      broadcastable to [B, H, L, T] and [B, H, L, L]; added after scaling, before masking.
  Scores and both value products accumulate in float32 (finite in float16 for scores beyond
  65,504); the probabilities are cast to ``dtype`` for the value products.
  Returns:
    [B, L, H, hd] in ``dtype``.
  """
  b, l, h, hd = q.shape
  kvh = k_new.shape[2]
  q = jnp.asarray(q, dtype).reshape(b, l, kvh, h // kvh, hd)
  neg = jnp.finfo(jnp.float32).min
  s_new = jnp.einsum("blgrd,bmgd->bgrlm", q, jnp.asarray(k_new, dtype),
                     preferred_element_type=jnp.float32)
  s_new = s_new * scale
  if bias_new is not None:
    s_new = s_new + _group_heads(bias_new, kvh)
  s_new = jnp.where(mask_new[:, :, None], s_new, neg)
  if mask_cache is None:  # empty cache (prefill): attention among the new tokens only
    p = jax.nn.softmax(s_new, axis=-1).astype(dtype)
    o = jnp.einsum("bgrlm,bmgd->blgrd", p, jnp.asarray(v_new, dtype),
                   preferred_element_type=jnp.float32)
    return jnp.asarray(o, dtype).reshape(b, l, h, hd)
  s_cache = jnp.einsum("blgrd,bgtd->bgrlt", q, jnp.asarray(k_cache, dtype),
                       preferred_element_type=jnp.float32)
  s_cache = s_cache * scale
  if bias_cache is not None:
    s_cache = s_cache + _group_heads(bias_cache, kvh)
  s_cache = jnp.where(mask_cache[:, :, None], s_cache, neg)
  t = s_cache.shape[-1]
  p = jax.nn.softmax(jnp.concatenate([s_cache, s_new], axis=-1), axis=-1).astype(dtype)
  o = (jnp.einsum("bgrlt,bgtd->blgrd", p[..., :t], jnp.asarray(v_cache, dtype),
                  preferred_element_type=jnp.float32)
       + jnp.einsum("bgrlm,bmgd->blgrd", p[..., t:], jnp.asarray(v_new, dtype),
                    preferred_element_type=jnp.float32))
  return jnp.asarray(o, dtype).reshape(b, l, h, hd)




def _group_heads(bias, kv_heads: int):
  """[B or 1, H or 1, L, K] -> [B or 1, kvH, H/kvH or 1, L, K] (the grouped layout of the scores)."""
  bias = jnp.asarray(bias, jnp.float32)
  if bias.shape[1] == 1:
    return bias[:, :, None]
  return bias.reshape(bias.shape[0], kv_heads, bias.shape[1] // kv_heads, *bias.shape[2:])
