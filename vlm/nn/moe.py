"""Mixture-of-experts expert evaluation: dense mixing and dropless routed ("ragged") evaluation.

Both functions evaluate the same SwiGLU experts (Qwen3-MoE, HF ``Qwen3MoeSparseMoeBlock`` /
``Qwen3VLMoeTextSparseMoeBlock``; /work/shared/design/qwen3vl_spec.md section 5.2) with fused
weights ``gate_up`` [E, D, 2I] (columns ``[:I]`` gate, ``[I:]`` up, [in, out] layout) and ``down``
[E, I, D]:

    y[t] = sum_{j < k} w[t, j] * expert_{e[t, j]}(x[t]),
    expert_e(x) = (act(x @ gate_up[e][:, :I]) * (x @ gate_up[e][:, I:])) @ down[e],

where ``e[t, :]`` are the k distinct experts the router picked for token t and ``w[t, :]`` their
(possibly renormalised) probabilities.

* :func:`dense_expert_mlp` runs every expert on every token and mixes them with a [T, E] weight
  matrix that is zero outside the top-k (HF's eval path): E/k times the routed FLOPs and a
  [T, E, 2I] intermediate, but plain einsums that shard over any mesh axis.
* :func:`ragged_expert_mlp` is dropless sparse routing: the T*k (token, expert) assignments are
  sorted by expert (:func:`sort_by_expert`), the token rows gathered into expert-contiguous
  groups, and each expert's group multiplied by that expert's weights with
  ``jax.lax.ragged_dot`` (a grouped matmul); the weighted outputs are gathered back to token
  order and summed over the k assignments. No token is dropped and no capacity factor is used, so
  the result equals the dense one up to float summation order. The sort / group-size / grouped
  matmul recipe is the one MaxText's ``sparse_matmul`` MoE path uses (inspiration only; this is
  an independent implementation).
* :func:`gather_expert_mlp` gathers each token's k expert matrices and applies them with batched
  matmuls: T*k expert reads instead of E, the fast path for decode-sized calls (T*k < E);
  :func:`choose_implementation` resolves the config's ``"auto"`` to it or to dense.

Cost notes (measured with ``scripts/benchmark_moe.py``):

* ``ragged_dot`` is only as fast as its lowering. On TPU jax emits XLA's native ragged-dot
  instruction, a grouped matmul with routed FLOPs (k/E of the dense ones; not measured here).
  XLA:CPU has no grouped-matmul kernel: jax expands the rows to a
  masked [E, T*k, D] operand and runs a dense dot, i.e. k times the FLOPs of the *dense* path
  (CPU, T=512 D=256 I=128 E=16 k=2 float32: dense 25.6 ms, ragged 38.5 ms forward). XLA:GPU
  (jax 0.11.2, H200) has no fast grouped-matmul path either (a known upstream gap): at one
  Qwen3-30B-A3B layer (T=8192 D=2048 I=768 E=128 k=8, bfloat16) dense took 17 ms forward /
  40 ms forward+backward, ragged 118 ms / 360 ms; at T=64 (decode-sized) both took 1.1 ms.
  So "dense" is the faster choice on CPU and GPU today; "ragged" is for TPU and for jax/XLA
  versions whose ``ragged_dot`` lowers to a grouped GEMM (there its intermediates are
  O(T*k*I) instead of the dense O(T*E*I)).
* float16: with ``x`` in float16 the three evaluations accumulate every product in float32, form
  ``act(gate) * up`` in float32, pre-scale its rows with :func:`vlm.nn.layers.split_rows` before
  the float16 ``down`` product and return float32 (the caller's residual dtype,
  :func:`vlm.nn.layers.residual_dtype`): a SwiGLU intermediate or expert output above 65,504 stays
  finite (before: inf, then NaN). bfloat16 and float32 run the same operations as before. The
  router softmax (``vlm.models.qwen3.Qwen3SparseMoeBlock``) is float32 in every dtype.
* Sharding: the dense einsums partition over the ``expert`` mesh axis like any contraction. The
  ragged path sorts the flattened tokens globally, so under a batch-sharded mesh the partitioner
  gathers the token rows, and how XLA partitions ``ragged_dot`` over a sharded group (expert) axis
  depends on the backend (it may all-gather the expert weights). The results stay correct (tested
  on an 8-device data/tensor/expert CPU mesh), but with expert parallelism (``expert`` mesh
  axis > 1) use :func:`routed_expert_mlp`.
* :func:`routed_expert_mlp` ("routed") is expert parallelism: inside ``jax.shard_map`` every
  device sorts its own tokens' assignments, sends each row to the device that owns its expert
  with a ragged all-to-all over the ``expert`` mesh axis (receive buffers sized for the worst
  case: capacity-free, nothing dropped), runs its E/n local experts with a grouped matmul
  (``ragged_dot``, or the megablox Pallas GMM on TPU) and sends the results back. The ragged
  all-to-all is ``jax.lax.ragged_all_to_all`` on TPU/GPU; XLA:CPU cannot run it ("not
  supported by XLA:CPU ThunkEmitter", jax 0.10.2), so on CPU the same exchange is one dense
  ``all_to_all`` of per-destination blocks sized for the worst case. The recipe (sort, ragged
  all-to-all, grouped matmul, reverse) is the one MaxText's expert-parallel ``sparse_matmul``
  uses (inspiration only; independent implementation). Cost (``scripts/benchmark_moe.py``): on
  8 simulated CPU devices forward+backward takes 1.05x (expert=4 x data=2) to 2.2x (expert=8)
  the dense time (CPU's ragged_dot is a masked dense dot over the whole worst-case buffer). AOT
  for v5p (8 chips, expert=8), one Qwen3-235B-A22B layer, 4,096 tokens per chip, bfloat16: the
  expert matmuls are 1/16 of dense's (3.7 vs 59.4 TFLOP per chip, analytic; the compiler reports
  26.4 vs 52.8 because megablox's estimate counts the whole receive buffer), and the worst-case
  receive buffer (8x the average rows) costs 10.94 GiB per chip in all vs 7.66 GiB for dense.
  The trainer's real step of ``configs/qwen3_vl/stage_b.py:30b_a3b`` (4 layers, batch 8 of 1,024
  tokens, scanned + rematerialised, expert=8) compiles for v5p-16 with 24 ragged all-to-alls
  (4 layers x dispatch/return x forward, remat, backward); 25.4 GiB per chip.
"""
from __future__ import annotations

import functools
import math
from typing import Callable, NamedTuple, Sequence

import jax
import jax.numpy as jnp

from vlm.nn import layers
from vlm.nn import partitioning as P


class ExpertSort(NamedTuple):
  """Assignments of :func:`sort_by_expert`, all int32.

  Attributes:
    token_index: [T*k] token (row of ``x``) of each sorted assignment.
    expert_index: [T*k] expert of each sorted assignment (non-decreasing).
    group_sizes: [E] number of assignments per expert (sums to T*k; zero for unused experts).
    inverse: [T*k] position in the sorted order of flat assignment ``t*k + j``; gathering sorted
      rows with it restores token-major order.
  """
  token_index: jax.Array
  expert_index: jax.Array
  group_sizes: jax.Array
  inverse: jax.Array


def _check_experts(x, gate_up, down, expert_ids, weights):
  """Static shape checks shared by both expert evaluations; returns (T, D, E, I, k)."""
  if x.ndim != 2:
    raise ValueError(f"x must be [T, D] (flatten batch and length first), got shape {x.shape}")
  t, d = x.shape
  if gate_up.ndim != 3 or gate_up.shape[1] != d or gate_up.shape[2] % 2:
    raise ValueError(f"gate_up must be [E, D={d}, 2I] with an even last axis, got "
                     f"{gate_up.shape}")
  e, i = gate_up.shape[0], gate_up.shape[2] // 2
  if down.shape != (e, i, d):
    raise ValueError(f"down must be [E, I, D] = {(e, i, d)} to match gate_up {gate_up.shape}, "
                     f"got {down.shape}")
  if expert_ids.ndim != 2 or expert_ids.shape[0] != t:
    raise ValueError(f"expert_ids must be [T={t}, k], got {expert_ids.shape}")
  if weights.shape != expert_ids.shape:
    raise ValueError(f"weights must have the shape of expert_ids {expert_ids.shape}, got "
                     f"{weights.shape}")
  if not jnp.issubdtype(expert_ids.dtype, jnp.integer):
    raise ValueError(f"expert_ids must be integer, got {expert_ids.dtype}")
  return t, d, e, i, expert_ids.shape[1]


def _down(hidden, down_fn, float16: bool):
  """Applies ``down_fn`` (a product with the down kernels) to ``act(gate) * up``; in float16 the
  rows are split into a power-of-two scale and a float16 part first (see the module docstring)."""
  if not float16:
    return down_fn(hidden)
  m, s = layers.split_rows(hidden, jnp.float16)
  return down_fn(m) * s


def sort_by_expert(expert_ids, num_experts: int) -> ExpertSort:
  """Sorts the T*k (token, expert) assignments by expert id (stable: token order within a group).

  Args:
    expert_ids: int [T, k] experts chosen per token (values in ``[0, num_experts)``; ids outside
      that range are not checked under jit and would corrupt ``group_sizes``).
    num_experts: E, static.
  Returns:
    :class:`ExpertSort` (int32 arrays; see its attributes).
  Raises:
    ValueError: ``expert_ids`` not 2-D integer, or ``num_experts < 1``.
  """
  if expert_ids.ndim != 2 or not jnp.issubdtype(expert_ids.dtype, jnp.integer):
    raise ValueError(f"expert_ids must be an integer [T, k] array, got {expert_ids.dtype} "
                     f"{expert_ids.shape}")
  if num_experts < 1:
    raise ValueError(f"num_experts must be >= 1, got {num_experts}")
  k = expert_ids.shape[1]
  flat = jnp.asarray(expert_ids, jnp.int32).reshape(-1)  # [T*k], assignment a = t*k + j
  order = jnp.argsort(flat, stable=True).astype(jnp.int32)
  n = flat.shape[0]
  inverse = jnp.zeros((n,), jnp.int32).at[order].set(jnp.arange(n, dtype=jnp.int32))
  group_sizes = jnp.bincount(flat, length=num_experts).astype(jnp.int32)
  return ExpertSort(token_index=order // k, expert_index=flat[order], group_sizes=group_sizes,
                    inverse=inverse)


def ragged_expert_mlp(x, gate_up, down, expert_ids, weights,
                      activation: Callable[[jax.Array], jax.Array]):
  """Dropless routed SwiGLU experts with ``jax.lax.ragged_dot`` (see the module docstring).

  Computes ``y[t] = sum_j weights[t, j] * expert_{expert_ids[t, j]}(x[t])`` touching only the
  selected experts: sort assignments by expert, gather rows [T*k, D], grouped matmul with
  ``gate_up`` -> [T*k, 2I], ``act(gate) * up`` -> [T*k, I], grouped matmul with ``down`` ->
  [T*k, D], gather back to [T, k, D] and contract with ``weights`` over k.

  Args:
    x: [T, D] tokens, in the compute dtype.
    gate_up: [E, D, 2I] fused gate/up kernels (gate columns first), compute dtype.
    down: [E, I, D] down kernels, compute dtype.
    expert_ids: int [T, k] routed experts per token, distinct within a row (as ``top_k`` gives).
    weights: [T, k] routing weights (compute dtype).
    activation: elementwise gate activation (``vlm.nn.layers.activation(hidden_act)``).
  Returns:
    [T, D] in the dtype of ``x``, float32 when ``x`` is float16 (matmuls use jax's default
    precision and accumulation, float32 accumulation in float16; the final contraction over k is
    an einsum like the dense path's contraction over E).
  Raises:
    ValueError: inconsistent shapes (message names the offending argument).
  Differentiable in ``x``, ``gate_up``, ``down`` and ``weights``; works under ``jit``.
  """
  t, d, e, i, k = _check_experts(x, gate_up, down, expert_ids, weights)
  f16, wide = x.dtype == jnp.float16, layers.wide_dtype(x.dtype)
  s = sort_by_expert(expert_ids, e)
  rows = jnp.take(x, s.token_index, axis=0)                        # [T*k, D], expert-contiguous
  gu = jax.lax.ragged_dot(rows, gate_up, s.group_sizes,
                          preferred_element_type=wide)             # [T*k, 2I]
  hidden = activation(gu[:, :i]) * gu[:, i:]                       # [T*k, I]
  out = _down(hidden, lambda h: jax.lax.ragged_dot(h, down, s.group_sizes,
                                                   preferred_element_type=wide), f16)  # [T*k, D]
  out = jnp.take(out, s.inverse, axis=0).reshape(t, k, d)          # token-major [T, k, D]
  return jnp.einsum("tkd,tk->td", out, jnp.asarray(weights, out.dtype))


def dense_expert_mlp(x, gate_up, down, expert_ids, weights,
                     activation: Callable[[jax.Array], jax.Array]):
  """Every expert on every token, mixed by the top-k weights scattered to [T, E] (HF eval path).

  Args / Returns / Raises: as :func:`ragged_expert_mlp` ([T, D] in the dtype of ``x``, float32
  for float16). The
  per-token experts must be distinct (``top_k`` guarantees it): the one-hot scatter of weights to
  [T, E] sums duplicates, which would then count once per duplicate in both paths anyway.
  Cost: T*E expert evaluations and a [T, E, 2I] intermediate.
  """
  _, _, e, i, _ = _check_experts(x, gate_up, down, expert_ids, weights)
  f16, wide = x.dtype == jnp.float16, layers.wide_dtype(x.dtype)
  mix_dtype = layers.residual_dtype(x.dtype)
  onehot = jax.nn.one_hot(expert_ids, e, dtype=mix_dtype)             # [T, k, E]
  dense_w = jnp.einsum("tke,tk->te", onehot, jnp.asarray(weights, mix_dtype))
  gu = jnp.einsum("td,edf->tef", x, gate_up, preferred_element_type=wide)  # [T, E, 2I]
  hidden = activation(gu[..., :i]) * gu[..., i:]
  out = _down(hidden, lambda h: jnp.einsum("tei,eid->ted", h, down, preferred_element_type=wide),
              f16)
  return jnp.einsum("ted,te->td", out, dense_w)


def gather_expert_mlp(x, gate_up, down, expert_ids, weights,
                      activation: Callable[[jax.Array], jax.Array]):
  """Each token through its own k experts by gathering their weight matrices (decode path).

  ``gate_up[expert_ids]`` [T, k, D, 2I] and ``down[expert_ids]`` [T, k, I, D] are gathered and
  applied per (token, slot) with batched matmuls. Reads and computes T*k expert matrices instead
  of E: the right choice when ``T * k < E`` (generation: T = batch size; Qwen3-VL-30B-A3B has
  E=128, k=8, so one decode step of batch 1 reads 8 of 128 experts, 1/16 of the dense weight
  traffic); for larger T the gathered copies exceed the weights themselves and
  :func:`dense_expert_mlp` wins. Same result as the other two up to float summation order.

  Args / Returns / Raises: as :func:`ragged_expert_mlp` ([T, D] in the dtype of ``x``, float32
  for float16).
  """
  _, _, _, i, _ = _check_experts(x, gate_up, down, expert_ids, weights)
  f16, wide = x.dtype == jnp.float16, layers.wide_dtype(x.dtype)
  gu = jnp.einsum("td,tkdf->tkf", x, jnp.take(gate_up, expert_ids, axis=0),
                  preferred_element_type=wide)                               # [T, k, 2I]
  hidden = activation(gu[..., :i]) * gu[..., i:]
  down_k = jnp.take(down, expert_ids, axis=0)
  out = _down(hidden, lambda h: jnp.einsum("tki,tkid->tkd", h, down_k, preferred_element_type=wide),
              f16)
  return jnp.einsum("tkd,tk->td", out, jnp.asarray(weights, layers.residual_dtype(x.dtype)))


# --------------------------------------------------------------------------------------------
# Expert parallelism: routed dispatch of tokens to the experts' devices (shard_map + all-to-all)
# --------------------------------------------------------------------------------------------

_CHECK_VMA = True   # tests switch it off to cover the unchecked (megablox) transpose on CPU
DISPATCHES = ("auto", "ragged_all_to_all", "all_to_all")
GROUPED_MATMULS = ("auto", "ragged_dot", "megablox")


def _excl_cumsum(x, axis=-1):
  return jnp.cumsum(x, axis=axis) - x


def _padded_ragged_all_to_all(operand, output, input_offsets, send_sizes, output_offsets,
                              recv_sizes, *, axis_name: str, axis_size: int, capacity: int):
  """``jax.lax.ragged_all_to_all`` semantics from a dense ``jax.lax.all_to_all`` (XLA:CPU has no
  ragged all-to-all).

  Same arguments and result as ``ragged_all_to_all`` (slices ``i`` of ``len(send_sizes) / n`` go to
  device ``i // (len / n)``; ``output_offsets`` are offsets in the receiver's ``output``), except
  ``recv_sizes`` is not needed (the destinations travel with the rows). Each device packs the
  slices for one destination into a block of ``capacity`` rows ([n, capacity, ...] in all),
  sends the blocks with one all-to-all, and the receiver scatters the valid rows to their
  offsets. ``capacity`` must bound the rows any device sends to any one destination (the caller
  sizes it for the worst case, so nothing is dropped). Differentiable (gathers and a scatter).
  """
  del recv_sizes
  n = axis_size
  spd = send_sizes.shape[0] // n
  sizes = send_sizes.reshape(n, spd)
  ends = jnp.cumsum(sizes, axis=1)                                     # [n, spd]
  starts = ends - sizes
  p = jnp.arange(capacity, dtype=jnp.int32)
  j = jax.vmap(lambda e: jnp.searchsorted(e, p, side="right"))(ends)  # [n, cap] slice of row p
  j = jnp.minimum(j, spd - 1).astype(jnp.int32)
  valid = p[None, :] < ends[:, -1:]
  within = p[None, :] - jnp.take_along_axis(starts, j, axis=1)
  src = jnp.take_along_axis(input_offsets.reshape(n, spd), j, axis=1) + within
  dst = jnp.take_along_axis(output_offsets.reshape(n, spd), j, axis=1) + within
  src = jnp.where(valid, src, 0)
  dst = jnp.where(valid, dst, output.shape[0])                         # out of range: dropped
  block = jnp.take(operand, src.reshape(-1), axis=0).reshape((n, capacity) + operand.shape[1:])
  block = jnp.where(valid.reshape((n, capacity) + (1,) * (operand.ndim - 1)), block, 0)
  block = jax.lax.all_to_all(block, axis_name, 0, 0, tiled=True)
  dst = jax.lax.all_to_all(dst, axis_name, 0, 0, tiled=True)
  return output.at[dst.reshape(-1)].set(block.reshape((-1,) + operand.shape[1:]), mode="drop")


def _grouped_matmul(kind: str, rows, kernels, group_sizes, out_dtype):
  """``rows[group g] @ kernels[g]`` for expert-contiguous ``rows`` [M, K] (rows past
  ``sum(group_sizes)`` are padding); ``kind`` "ragged_dot" or "megablox" (TPU Pallas GMM)."""
  if kind == "ragged_dot":
    return jax.lax.ragged_dot(rows, kernels, group_sizes, preferred_element_type=out_dtype)
  from jax.experimental.pallas.ops.tpu.megablox import gmm  # noqa: PLC0415 (TPU only)
  m, kdim = rows.shape
  n = kernels.shape[2]
  tm = 128 if m >= 128 else -(-m // 8) * 8
  pad = -m % tm
  lhs = jnp.pad(rows, ((0, pad), (0, 0))) if pad else rows
  tiling = (tm, min(512, kdim), min(512, n))
  out_dtype = rows.dtype if out_dtype is None else out_dtype    # gmm accumulates in float32
  out = gmm(lhs, kernels.astype(rows.dtype), group_sizes.astype(jnp.int32), out_dtype, tiling)
  return out[:m] if pad else out


def _local_routed(x, gate_up, down, expert_ids, weights, activation, *, num_experts: int,
                  axis_name: str | None, axis_size: int, dispatch: str, matmul: str):
  """Per-device body of :func:`routed_expert_mlp` (inside ``shard_map``; ``axis_name`` None = one
  device, no collectives). x [t, D] local tokens; gate_up [E_loc, D, 2I], down [E_loc, I, D] the
  local experts (global experts ``me * E_loc + [0, E_loc)``); expert_ids/weights [t, k]."""
  t, d = x.shape
  k = expert_ids.shape[1]
  e_loc, i = gate_up.shape[0], gate_up.shape[2] // 2
  n = axis_size
  f16, wide = x.dtype == jnp.float16, layers.wide_dtype(x.dtype)
  s = sort_by_expert(expert_ids, num_experts)
  rows = jnp.take(x, s.token_index, axis=0)                  # [t*k, D], sorted by global expert
  mine = s.group_sizes                                        # [E] rows I send per expert
  if axis_name is None:
    grouped, sizes = rows, mine
  else:
    me = jax.lax.axis_index(axis_name)
    counts = jax.lax.all_gather(mine, axis_name)              # [n, E]: counts[src, expert]
    before = _excl_cumsum(counts, axis=0)                     # rows of lower sources, per expert
    totals = counts.sum(0).reshape(n, e_loc)                  # [owner, local expert]
    base = _excl_cumsum(totals, axis=1).reshape(-1)           # [E] start of expert's group
    sizes = jnp.take(totals, me, axis=0)                      # [E_loc] my experts' group sizes
    capacity = t * min(k, e_loc)           # most rows one device can send to one destination
    rows_in = n * capacity                 # worst case received: every token of every device
    if dispatch == "ragged_all_to_all":
      a2a = functools.partial(jax.lax.ragged_all_to_all, axis_name=axis_name)
    else:
      a2a = functools.partial(_padded_ragged_all_to_all, axis_name=axis_name, axis_size=n,
                              capacity=capacity)
    # forward: slice g (= owner * E_loc + e) of my sorted rows goes to the owner's group e,
    # after the rows of lower sources -> expert-major, source-minor on the receiver
    out_off = base + jnp.take(before, me, axis=0)
    recv = jnp.take(counts, me * e_loc + jnp.arange(e_loc), axis=1).reshape(-1)  # [src*E_loc+e]
    grouped = a2a(rows, jnp.zeros((rows_in, d), rows.dtype), _excl_cumsum(mine), mine, out_off,
                  recv)
  gu = _grouped_matmul(matmul, grouped, gate_up, sizes, wide)                    # [M, 2I]
  hidden = activation(gu[:, :i]) * gu[:, i:]
  out = _down(hidden, lambda h: _grouped_matmul(matmul, h, down, sizes, wide), f16)  # [M, D]
  if axis_name is not None:
    # back: my group e's rows of source src return to src's sorted position of expert g
    local = me * e_loc + jnp.arange(e_loc)
    in_off = (jnp.take(base, local)[None, :] + jnp.take(before, local, axis=1)).reshape(-1)
    back_off = jnp.take(_excl_cumsum(counts, axis=1), local, axis=1).reshape(-1)
    out = a2a(out, jnp.zeros((t * k, d), out.dtype), in_off, recv, back_off, mine)
  out = jnp.take(out, s.inverse, axis=0).reshape(t, k, d)                        # [t, k, D]
  return jnp.einsum("tkd,tk->td", out, jnp.asarray(weights, out.dtype))


def _token_axes_from_rules(mesh) -> tuple[str, ...]:
  """Mesh axes that shard the flattened [B*L] token axis: those of the current flax logical
  rules for ``batch`` then ``sequence`` (context parallelism) / ``length`` (so the shard_map's token split refines the activation
  layout without moving data), then every other mesh axis in mesh order."""
  axes = []
  try:
    import flax.linen as nn  # noqa: PLC0415
    rules = nn.get_logical_axis_rules()
    if rules:
      names = (P.BATCH, P.SEQUENCE, P.LENGTH)  # SEQUENCE: the context axis
      for spec in nn.logical_to_mesh_axes(names, rules):
        for a in (spec if isinstance(spec, tuple) else (spec,)):
          if a is not None and a in mesh.axis_names and a not in axes:
            axes.append(a)
  except (ImportError, ValueError):
    axes = []
  return tuple(axes) + tuple(a for a in mesh.axis_names if a not in axes)


def routed_expert_mlp(x, gate_up, down, expert_ids, weights,
                      activation: Callable[[jax.Array], jax.Array], *, mesh=None,
                      expert_axis: str = "expert", token_axes: Sequence[str] | None = None,
                      dispatch: str = "auto", matmul: str = "auto"):
  """Expert-parallel routed SwiGLU experts: tokens travel to their experts' devices and back.

  Same math and arguments as :func:`ragged_expert_mlp`. Under the mesh (``mesh`` or the one set
  with ``jax.set_mesh``) the computation is a ``jax.shard_map``:

  1. tokens [T, D] (and ``expert_ids`` / ``weights`` [T, k]) are split over ``token_axes`` (all
     mesh axes: every device gets T / #devices distinct tokens; the default order puts the
     axes that already shard the batch and length first, so the split is a local slice); the
     experts' ``gate_up`` / ``down`` are split over ``expert_axis`` (E / n experts per device;
     dims sharded over other axes, e.g. the embed dim over ``fsdp``, are all-gathered by the
     partitioner on entry and their gradients reduce-scattered);
  2. each device sorts its T_loc*k assignments by expert (:func:`sort_by_expert`); the per-expert
     counts of all devices are all-gathered over ``expert_axis`` ([n, E] ints) to compute offsets;
  3. a ragged all-to-all over ``expert_axis`` sends each row to the device owning its expert,
     landing expert-major (then by source device) in a receive buffer sized for the worst case
     (n * T_loc * min(k, E/n) rows: capacity-free, no token is ever dropped);
  4. the local experts run on their contiguous groups with a grouped matmul (``matmul``);
  5. the outputs return with the reverse ragged all-to-all, are put back in token order and
     combined with the router weights over k.

  ``dispatch``: "ragged_all_to_all" (``jax.lax.ragged_all_to_all``; TPU/GPU), "all_to_all" (the
  same exchange as one dense ``jax.lax.all_to_all`` of per-destination blocks of
  T_loc * min(k, E/n) rows, :func:`_padded_ragged_all_to_all`: XLA:CPU has no ragged all-to-all),
  "auto": the first on TPU/GPU, the second on CPU (platform of the mesh's devices, so an AOT
  compile for a TPU topology on a CPU host takes the TPU path). ``matmul``: "ragged_dot"
  (``jax.lax.ragged_dot``), "megablox" (the Pallas TPU grouped matmul
  ``jax.experimental.pallas.ops.tpu.megablox.gmm``, TPU only), "auto": megablox on TPU, else
  ragged_dot (Mosaic rejects bfloat16 GMMs traced under ``jax_default_matmul_precision=
  "highest"``: keep the default precision on TPU). Without a mesh (or a one-device mesh) the local sort + grouped matmul runs
  directly (= :func:`ragged_expert_mlp`).

  Tokens that do not split evenly over the devices are padded (zero rows, zero weights) inside and
  cut off again; the padded rows cost compute and a reshard, so pick B*L divisible by the device
  count. Equal to :func:`dense_expert_mlp` up to float summation order (tested: values and
  gradients within 1e-5 float32 on 8 CPU devices, expert=4 x data=2 and expert=8).

  Args:
    x, gate_up, down, expert_ids, weights, activation: as :func:`ragged_expert_mlp`.
    mesh: a ``Mesh`` / ``AbstractMesh``; None = ``jax.sharding.get_abstract_mesh()``.
    expert_axis: mesh axis sharding the experts (absent or size 1: no exchange).
    token_axes: mesh axes splitting the tokens, in order; None = derived from flax's current
      logical rules (``batch``, ``length``) then the remaining mesh axes. Must include every mesh
      axis of size > 1 except that duplicate work is allowed: axes left out replicate tokens.
    dispatch, matmul: see above.
  Returns:
    [T, D] in the dtype of ``x`` (float32 for float16 ``x``).
  Raises:
    ValueError: inconsistent shapes, an unknown ``dispatch`` / ``matmul``, an ``expert_axis``
      size that does not divide E, ``token_axes`` naming unknown axes or leaving out
      ``expert_axis``, "megablox" on a platform other than TPU.
  """
  t, d, e, i, k = _check_experts(x, gate_up, down, expert_ids, weights)
  if dispatch not in DISPATCHES:
    raise ValueError(f"dispatch must be one of {DISPATCHES}, got {dispatch!r}")
  if matmul not in GROUPED_MATMULS:
    raise ValueError(f"matmul must be one of {GROUPED_MATMULS}, got {matmul!r}")
  mesh = jax.sharding.get_abstract_mesh() if mesh is None else mesh
  platform = P.mesh_platform(mesh)
  if matmul == "auto":
    matmul = "megablox" if platform == "tpu" else "ragged_dot"
  if matmul == "megablox" and platform != "tpu":
    raise ValueError(f"matmul='megablox' needs TPU devices, the mesh has {platform!r} ones; use "
                     "'ragged_dot' or 'auto'")
  if dispatch == "auto":
    dispatch = "all_to_all" if platform == "cpu" else "ragged_all_to_all"
  local = functools.partial(_local_routed, activation=activation, num_experts=e,
                            dispatch=dispatch, matmul=matmul)
  if mesh.empty or math.prod(mesh.axis_sizes) == 1:
    return local(x, gate_up, down, expert_ids, weights, axis_name=None, axis_size=1)
  sizes = dict(zip(mesh.axis_names, mesh.axis_sizes))
  n = sizes.get(expert_axis, 1)
  if e % n:
    raise ValueError(f"the {e} experts do not split over mesh axis {expert_axis!r} of size {n}; "
                     "choose an expert mesh size that divides num_experts")
  token_axes = _token_axes_from_rules(mesh) if token_axes is None else tuple(token_axes)
  unknown = [a for a in token_axes if a not in sizes]
  if unknown:
    raise ValueError(f"token_axes {unknown} are not axes of the mesh {sizes}")
  if n > 1 and expert_axis not in token_axes:
    raise ValueError(f"token_axes {token_axes} must include the expert axis {expert_axis!r}: "
                     "each expert-axis device must bring its own tokens")
  shards = math.prod(sizes[a] for a in token_axes)
  pad = -t % shards
  if pad:                 # zero rows, zero weights, any distinct valid experts; cut off below
    x = jnp.pad(x, ((0, pad), (0, 0)))
    fill = (jnp.arange(pad, dtype=expert_ids.dtype)[:, None] +
            jnp.arange(k, dtype=expert_ids.dtype)[None, :]) % e
    expert_ids = jnp.concatenate([expert_ids, fill], axis=0)
    weights = jnp.pad(weights, ((0, pad), (0, 0)))
  tok = jax.sharding.PartitionSpec(token_axes)
  ex = jax.sharding.PartitionSpec(expert_axis if n > 1 else None)
  body = functools.partial(local, axis_name=expert_axis if n > 1 else None, axis_size=n)
  # the Pallas GMM's outputs carry no varying-axes type, so megablox runs unchecked (jax then
  # psums the cotangents of the replicated inputs itself; tested equal on CPU with check off)
  y = jax.shard_map(body, mesh=mesh, in_specs=(tok, ex, ex, tok, tok), out_specs=tok,
                    check_vma=matmul != "megablox" and _CHECK_VMA)(
      x, gate_up, down, expert_ids, weights)
  return y[:t] if pad else y


def choose_implementation(implementation: str, num_tokens: int, num_experts: int,
                          top_k: int) -> str:
  """Resolves ``"auto"``: ``"gather"`` when ``num_tokens * top_k < num_experts`` (decode-sized
  calls read fewer expert weights than the dense path), else ``"dense"``; other values pass
  through. All arguments are static Python ints (shapes at trace time)."""
  if implementation != "auto":
    return implementation
  return "gather" if num_tokens * top_k < num_experts else "dense"


IMPLEMENTATIONS = {"dense": dense_expert_mlp, "ragged": ragged_expert_mlp,
                   "gather": gather_expert_mlp, "routed": routed_expert_mlp}
