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
  axis > 1) the dense path is the one to use until a shard_map'd all-to-all dispatch exists.
"""
from __future__ import annotations

from typing import Callable, NamedTuple

import jax
import jax.numpy as jnp

from vlm.nn import layers


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


def choose_implementation(implementation: str, num_tokens: int, num_experts: int,
                          top_k: int) -> str:
  """Resolves ``"auto"``: ``"gather"`` when ``num_tokens * top_k < num_experts`` (decode-sized
  calls read fewer expert weights than the dense path), else ``"dense"``; other values pass
  through. All arguments are static Python ints (shapes at trace time)."""
  if implementation != "auto":
    return implementation
  return "gather" if num_tokens * top_k < num_experts else "dense"


IMPLEMENTATIONS = {"dense": dense_expert_mlp, "ragged": ragged_expert_mlp,
                   "gather": gather_expert_mlp}
