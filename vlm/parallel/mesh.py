"""Device mesh and logical-axis rules from a config, validated before anything compiles.

The mesh has named axes ``data`` (pure data parallelism), ``fsdp`` (data parallelism with
parameters and optimizer state sharded, ZeRO-3 style) and ``tensor`` (Megatron-style model
parallelism over heads / MLP / vocabulary), plus ``expert`` for MoE models and ``context``
(context parallelism: the decoder's token axis, logical ``SEQUENCE``, split over it; attention
all-gathers keys and values, ``vlm.nn.attention.attention(sharded=True)``). Sizes come from
``config.mesh.shape`` (a dict; one entry may be -1 = "all remaining devices"; an absent axis has
size 1).
"""
from __future__ import annotations

import logging
import math
from typing import Any, Mapping, Sequence

import flax.linen as nn
import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from vlm.nn import partitioning as P

MESH_AXES = ("data", "fsdp", "tensor", "expert", "context")

# Priority-ordered: flax assigns each logical axis the first rule whose mesh axes are still free in
# that array, so an activation (batch, length, embed) gets batch -> (data, fsdp) and leaves embed
# replicated, while a parameter (embed, mlp) gets embed -> fsdp and mlp -> tensor.
DEFAULT_RULES: tuple[tuple[str, Any], ...] = (
    # Vision towers (Qwen ViTs): rows data-parallel over BATCH's axes and then these (qwen_vit.
    # constrain_rows keeps the longest prefix that divides the rows; listed first so that EMBED
    # does not take fsdp from them), weights replicated over tensor (VISION_HEADS / VISION_MLP
    # below; fsdp-sharded through EMBED); the merged features are then resharded to the LLM's
    # (batch, ...) layout.
    (P.VISION_BATCH, ("data", "fsdp", "expert", "context", "tensor")),
    (P.BATCH, ("data", "fsdp")),
    (P.EMBED, "fsdp"),
    (P.HEADS, "tensor"),
    (P.MLP, "tensor"),
    (P.VOCAB, "tensor"),
    (P.EXPERT, "expert"),
    (P.SEQUENCE, "context"),
    (P.KV, None),
    (P.LENGTH, None),
    (P.LAYERS, None),
    (P.VISION_HEADS, None),
    (P.VISION_MLP, None),
)


def resolve_mesh_shape(shape: Mapping[str, int], num_devices: int) -> dict[str, int]:
  """Fills a -1 entry and checks the product against ``num_devices``.

  Args:
    shape: mesh axis name -> size; names must be among ``MESH_AXES``; at most one -1.
    num_devices: devices available (``jax.device_count()``).
  Returns:
    axis name -> size for all of ``MESH_AXES`` (missing axes get 1).
  Raises:
    ValueError: unknown axis, non-positive size, two -1 entries, or a product that does not
      equal the device count (the message gives both and how to fix the config).
  """
  unknown = set(shape) - set(MESH_AXES)
  if unknown:
    raise ValueError(f"unknown mesh axes {sorted(unknown)}; valid axes are {MESH_AXES}")
  sizes = {a: int(shape.get(a, 1)) for a in MESH_AXES}
  free = [a for a, s in sizes.items() if s == -1]
  bad = [a for a, s in sizes.items() if s == 0 or s < -1]
  if bad:
    raise ValueError(f"mesh axis sizes must be positive or -1, got {dict(shape)}")
  if len(free) > 1:
    raise ValueError(f"at most one mesh axis may be -1, got {free} in {dict(shape)}")
  fixed = math.prod(s for s in sizes.values() if s != -1)
  if free:
    if num_devices % fixed:
      raise ValueError(
          f"mesh {dict(shape)} cannot fit {num_devices} devices: the fixed axes multiply to "
          f"{fixed}, which does not divide {num_devices}. Change config.mesh.shape.")
    sizes[free[0]] = num_devices // fixed
  total = math.prod(sizes.values())
  if total != num_devices:
    raise ValueError(
        f"mesh {dict(shape)} needs {total} devices but {num_devices} are available; set "
        f"config.mesh.shape so the sizes multiply to {num_devices} (or use -1 for one axis).")
  return sizes


def make_mesh(shape: Mapping[str, int], devices: Sequence[jax.Device] | None = None, *,
              interconnect_order: bool | None = None) -> Mesh:
  """Builds a ``jax.sharding.Mesh`` with axes ``MESH_AXES`` from ``shape`` (see resolve_mesh_shape).

  Args:
    devices: default ``jax.devices()``; also a compile-only TPU topology's devices (AOT).
    interconnect_order: order the devices for the TPU/GPU interconnect with
      ``jax.experimental.mesh_utils.create_device_mesh`` (default: on TPU/GPU when ``devices`` are
      all of this run's devices); otherwise, or if that cannot order them (logged), a plain
      reshape (always on CPU).
  """
  devices = list(devices if devices is not None else jax.devices())
  sizes = resolve_mesh_shape(shape, len(devices))
  dims = tuple(sizes[a] for a in MESH_AXES)
  if interconnect_order is None:
    interconnect_order = (devices[0].platform in ("tpu", "gpu")
                          and len(devices) == jax.device_count())
  arr = None
  if interconnect_order and devices[0].platform in ("tpu", "gpu"):
    from jax.experimental import mesh_utils
    try:
      arr = mesh_utils.create_device_mesh(dims, devices=devices)
    except (ValueError, NotImplementedError, AssertionError) as e:
      logging.getLogger("vlm").warning(
          "mesh %s: devices not ordered for the interconnect (%s); using their listed order",
          dict(sizes), e)
  if arr is None:
    arr = np.asarray(devices, dtype=object).reshape(dims)
  return Mesh(arr, MESH_AXES)


def rules_from_config(rules: Sequence[Sequence[Any]] | None) -> tuple[tuple[str, Any], ...]:
  """Normalises a rules table from a config (lists become tuples); ``None`` -> DEFAULT_RULES.

  Raises:
    ValueError: a rule that names a mesh axis outside ``MESH_AXES``.
  """
  if rules is None:
    return DEFAULT_RULES
  out = []
  for rule in rules:
    name, axes = rule
    if isinstance(axes, list):
      axes = tuple(axes)
    for a in (axes if isinstance(axes, tuple) else (axes,)):
      if a is not None and a not in MESH_AXES:
        raise ValueError(f"logical rule {rule!r} names mesh axis {a!r}; valid: {MESH_AXES}")
    out.append((name, axes))
  return tuple(out)


def data_parallel_size(mesh: Mesh, rules) -> int:
  """Number of ways the batch axis is split under ``rules`` on ``mesh``."""
  spec = nn.logical_to_mesh_axes((P.BATCH,), rules)[0]
  if spec is None:
    return 1
  names = spec if isinstance(spec, tuple) else (spec,)
  return math.prod(mesh.shape[n] for n in names)


def check_batch_size(global_batch_size: int, mesh: Mesh, rules) -> None:
  """Raises ValueError unless the global batch splits evenly over the batch-sharding mesh axes."""
  n = data_parallel_size(mesh, rules)
  if global_batch_size % n:
    raise ValueError(
        f"global batch size {global_batch_size} is not divisible by the {n} data-parallel shards "
        f"of mesh {dict(mesh.shape)}; pick a batch size that is a multiple of {n}.")


def context_parallel_size(mesh: Mesh, rules) -> int:
  """Number of ways the decoder's token axis (logical ``SEQUENCE``) is split under ``rules``."""
  spec = nn.logical_to_mesh_axes((P.SEQUENCE,), rules)[0]
  if spec is None:
    return 1
  names = spec if isinstance(spec, tuple) else (spec,)
  return math.prod(mesh.shape[n] for n in names)


def check_sequence_length(length: int, mesh: Mesh, rules) -> None:
  """Raises ValueError unless rows of ``length`` tokens split evenly over the context shards."""
  n = context_parallel_size(mesh, rules)
  if length % n:
    raise ValueError(
        f"row length {length} is not divisible by the {n} context-parallel shards of mesh "
        f"{dict(mesh.shape)}; pick a max_length that is a multiple of {n}.")


def logical_sharding(mesh: Mesh, rules, axes: Sequence[str | None]) -> NamedSharding:
  """NamedSharding for an array with logical ``axes``."""
  return NamedSharding(mesh, nn.logical_to_mesh_axes(tuple(axes), rules))


def batch_sharding(mesh: Mesh, rules, ndim: int) -> NamedSharding:
  """Sharding of a batch array with ``ndim`` dims: leading axis over the batch mesh axes."""
  return logical_sharding(mesh, rules, (P.BATCH,) + (None,) * (ndim - 1))


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, PartitionSpec())


def fit_shardings(abstract_params, shardings, log_fn=None):
  """Replicates every parameter dim whose size does not split over its mesh axes.

  E.g. BLIP-2's 30,523-row vocabulary cannot split over ``tensor=2``; that dim is then replicated
  (and reported through ``log_fn``) instead of failing at compile time.
  Returns the adjusted NamedSharding tree.
  """
  def fix(path, leaf, sh):
    spec = list(sh.spec) + [None] * (leaf.ndim - len(sh.spec))
    changed = False
    for i, (dim, axes) in enumerate(zip(leaf.shape, spec)):
      if axes is None:
        continue
      names = axes if isinstance(axes, tuple) else (axes,)
      n = math.prod(sh.mesh.shape[a] for a in names)
      if dim % n:
        spec[i] = None
        changed = True
    if changed and log_fn is not None:
      log_fn(f"replicating undividable dims of {jax.tree_util.keystr(path)} {leaf.shape} "
             f"(spec {sh.spec} -> {PartitionSpec(*spec)})")
    return NamedSharding(sh.mesh, PartitionSpec(*spec)) if changed else sh

  return jax.tree_util.tree_map_with_path(fix, abstract_params, shardings)


def _is_axes(x) -> bool:
  return isinstance(x, tuple)


def batch_shardings(mesh: Mesh, rules, batch: Mapping[str, Any],
                    axes: Mapping[str, Any] | None = None) -> dict:
  """NamedSharding per batch array from its logical axes (nested dicts allowed).

  Args:
    mesh, rules: device mesh and logical-axis rules.
    batch: the batch (arrays, ``jax.ShapeDtypeStruct`` or anything with ``ndim``/``shape``),
      possibly nested dicts, e.g. ``{"input_ids": [B, L], "position_ids": [3, B, L],
      "vision": {"segment_ids": [B, Np]}}``.
    axes: the same structure with a tuple of logical axis names (or None) per array, e.g.
      ``{"position_ids": (None, "batch", "length"), ...}``; ``None`` = every array split on its
      leading axis over the batch mesh axes (the BLIP-2 layout).
  Returns:
    a dict like ``batch`` of ``NamedSharding``.
  Raises:
    ValueError: a key of ``batch`` without axes (or the reverse), or axes whose length differs
      from the array's rank; the message names the key path.
  """
  out = {}
  for k, v in batch.items():
    if isinstance(v, Mapping):
      sub = None if axes is None else axes.get(k)
      if axes is not None and not isinstance(sub, Mapping):
        raise ValueError(f"batch key {k!r} is a dict but its logical axes are {sub!r}; give a "
                         "dict of axes tuples for it")
      try:
        out[k] = batch_shardings(mesh, rules, v, sub)
      except ValueError as e:
        raise ValueError(f"{k}/{e}") from None
      continue
    ndim = len(v.shape)
    if axes is None:
      out[k] = batch_sharding(mesh, rules, ndim)
      continue
    if k not in axes:
      raise ValueError(f"batch key {k!r} (shape {tuple(v.shape)}) has no logical axes; add it "
                       f"to the task's batch_axes (it has {sorted(axes)})")
    ax = axes[k]
    if not _is_axes(ax) or len(ax) != ndim:
      raise ValueError(f"batch key {k!r} has shape {tuple(v.shape)} (rank {ndim}) but logical "
                       f"axes {ax!r}; give one name (or None) per dimension")
    out[k] = logical_sharding(mesh, rules, ax)
  if axes is not None:
    extra = sorted(set(axes) - set(batch))
    if extra:
      raise ValueError(f"batch_axes names keys {extra} that the batch lacks (it has "
                       f"{sorted(batch)})")
  return out


def global_batch_from_host(batch: Mapping[str, Any], mesh: Mesh, rules,
                           axes: Mapping[str, Any] | None = None) -> dict:
  """Assembles per-process numpy batches into global jax.Arrays sharded by logical axes.

  Each process passes its own slice: along the dimension whose logical axis maps to mesh axes
  that span processes (``"batch"``), its length is the global length / process count (e.g.
  ``position_ids [3, b, L]`` with ``b = B / processes``); ``jax.make_array_from_process_local_data``
  stitches them together (works on one host too). Nested dicts keep their structure.

  Args:
    batch: host arrays (nested dicts allowed).
    axes: logical axes per key (see :func:`batch_shardings`); None = leading axis = batch.
  Raises:
    ValueError: see :func:`batch_shardings`.
  """
  shardings = batch_shardings(mesh, rules, {k: _as_shaped(v) for k, v in batch.items()}, axes)
  return _place(batch, shardings)


def _as_shaped(v):
  if isinstance(v, Mapping):
    return {k: _as_shaped(x) for k, x in v.items()}
  return np.asarray(v)


def _place(batch, shardings):
  out = {}
  for k, v in batch.items():
    if isinstance(v, Mapping):
      out[k] = _place(v, shardings[k])
    else:
      out[k] = jax.make_array_from_process_local_data(shardings[k], np.asarray(v))
  return out
