"""Ahead-of-time compilation of the real train step for a device topology, from a CPU machine.

:func:`compile_train_step` builds what :func:`vlm.train.loop.run` builds -- the task's model,
batch axes and initialiser, the optimizer of ``config.optim``, the parameter and optimizer-state
shardings (:func:`vlm.train.step.param_shardings_of`, :func:`vlm.train.step.state_sharding_tree`)
and the jitted step with the config's microbatches and loss arguments
(:func:`vlm.train.step.jit_train_step`) -- but with ``jax.ShapeDtypeStruct`` leaves instead of
arrays: nothing is initialised, no data is read, and the global batch is never allocated. The
step is lowered and compiled for the devices of a topology:

* ``v5e-256``, ``v5p-512``, ``v6e-256``: Cloud TPU accelerator types (``v5p-N`` counts
  TensorCores, i.e. N/2 chips; ``v5e-N`` / ``v6e-N`` count chips), mapped to the slice shapes of
  the Cloud TPU documentation (see :data:`TPU_GENERATIONS`);
* ``v5p:8x8x4``, ``v5e:16x16``, ``v6e:2x2``: a raw libtpu topology name
  (``jax.experimental.topologies.get_topology_desc``; needs libtpu, ``pip install -e ".[tpu]"``,
  but no TPU);
* ``cpu:N``: N simulated CPU devices (the process must have been started with
  ``XLA_FLAGS=--xla_force_host_platform_device_count=N`` or more; ``scripts/aot_compile.py``
  sets it).

The compiled executable's memory analysis (per chip), cost analysis and the collectives of its
HLO are summarised by :class:`AotReport`; :func:`check_fits` compares the per-chip total with the
chip's HBM.
"""
from __future__ import annotations

import dataclasses
import math
import os
import re
import time
from typing import Any, Mapping, Sequence

import flax.linen as nn
import jax
import numpy as np
from jax.sharding import Mesh

from vlm.parallel import mesh as mesh_lib
from vlm.train import optim
from vlm.train import step as step_lib
from vlm.train.state import TrainState

GiB = 1024 ** 3

# Compile-only use of libtpu opens no TPU, so several processes (tests run in parallel, a script
# next to a test) may load it at once; without this libtpu takes a per-machine lockfile and the
# second process fails ("Internal error when accessing libtpu multi-process lockfile"). Read when
# libtpu initialises, i.e. must be set before the first TPU topology or backend is created.
os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")

# HBM per chip and slice shapes by generation. Sources (Cloud TPU documentation, system
# architecture pages): https://cloud.google.com/tpu/docs/v5e ("16 GiB" HBM2 per chip; slice
# shapes 1x1 ... 16x16), https://cloud.google.com/tpu/docs/v5p ("95 GiB" HBM2e per chip; v5p-N
# names count TensorCores, 2 per chip; 3-D slice shapes such as 4x4x4 = v5p-128 and 4x8x8 =
# v5p-512), https://cloud.google.com/tpu/docs/v6e ("32 GiB" HBM per chip; 1x1 ... 16x16),
# https://cloud.google.com/tpu/docs/v4 (32 GiB per chip, v4-N counts TensorCores).
TPU_GENERATIONS: dict[str, dict[str, Any]] = {
    "v5e": dict(hbm_gib=16, cores_per_chip=1, dims=2, libtpu="v5e"),
    "v6e": dict(hbm_gib=32, cores_per_chip=1, dims=2, libtpu="v6e"),
    "v5p": dict(hbm_gib=95, cores_per_chip=2, dims=3, libtpu="v5p"),
    "v4": dict(hbm_gib=32, cores_per_chip=2, dims=3, libtpu="v4"),
}
_ALIASES = {"v5litepod": "v5e", "v5lite": "v5e", "v6litepod": "v6e", "v6lite": "v6e"}

VALID_FORMS = ("accelerator types v5e-N / v6e-N (N chips: 4, 8, 16, 32, 64, 128, 256), "
               "v5p-N / v4-N (N TensorCores = 2 x chips: 8, 16, 32, ..., e.g. v5p-512 = 256 "
               "chips), raw libtpu names v5e:16x16, v6e:8x8, v5p:8x8x4, v4:2x2x2, or cpu:N "
               "(N simulated CPU devices)")


class TopologyError(ValueError):
  """A topology name that cannot be used; the message lists the valid forms."""


class DoesNotFitError(ValueError):
  """The compiled step needs more memory per chip than the chip has (message: overshoot, fix).
  ``row``: what is known of the plan (config, topology, mesh, batch, needed / HBM bytes, compile
  time) for :func:`markdown_row`."""

  def __init__(self, message: str, row: dict | None = None):
    super().__init__(message)
    self.row = row or {}


@dataclasses.dataclass
class Topology:
  """Devices to compile for: ``name`` as given, ``platform`` (``tpu``/``cpu``), ``devices``
  (one per chip), ``generation`` (``v5e``... or ``cpu``), ``shape`` (libtpu name, e.g.
  ``v5p:4x8x8``) and ``hbm_bytes`` per chip (None for CPU)."""
  name: str
  platform: str
  devices: list
  generation: str
  shape: str
  hbm_bytes: int | None


def _slice_dims(chips: int, ndim: int) -> tuple[int, ...] | None:
  """The Cloud TPU slice shape of ``chips`` chips: 2-D ``a x b`` with b in {a, 2a}
  (2x2, 2x4, 4x4, ..., 16x16); 3-D from 2x2x1 by doubling the smallest extent
  (2x2x2, 2x2x4, 2x4x4, 4x4x4, 4x4x8, 4x8x8, 8x8x8, ...), or 4x4xk for other multiples of 64."""
  if chips < 4:  # libtpu's smallest slices: 2x2 (v5e/v6e), 2x2x1 (v4/v5p)
    return None
  if chips & (chips - 1) == 0:  # power of two
    if ndim == 2:
      a = 1 << (int(math.log2(chips)) // 2)
      return (a, chips // a)
    dims = [2, 2, 1]
    while math.prod(dims) < chips:
      i = int(np.argmin(dims[::-1]))  # the last smallest extent
      dims[2 - i] *= 2
    return tuple(sorted(dims))
  if ndim == 3 and chips % 64 == 0:
    return (4, 4, chips // 16)
  return None


def _tpu_devices(libtpu_name: str):
  try:
    from jax.experimental import topologies
  except ImportError as e:  # pragma: no cover - jax always has it
    raise TopologyError(f"jax.experimental.topologies is unavailable: {e}") from e
  try:
    topo = topologies.get_topology_desc(platform="tpu", topology_name=libtpu_name)
  except Exception as e:  # libtpu missing, or a shape it rejects
    msg = str(e).splitlines()[0] if str(e) else type(e).__name__
    hint = ("" if "libtpu" not in msg.lower() and "tpu" in msg.lower() else
            ' (is libtpu installed? pip install -e ".[tpu]")')
    raise TopologyError(f"TPU topology {libtpu_name!r} could not be created: {msg}{hint}. "
                        f"Valid forms: {VALID_FORMS}") from e
  return list(topo.devices)


def resolve_topology(spec: str) -> Topology:
  """Parses a topology name (see the module docstring) into its devices.

  Raises:
    TopologyError: an unknown form, generation, or chip count, or a ``cpu:N`` larger than the
      CPU devices of this process; the message lists the valid forms.
  """
  spec = spec.strip()
  m = re.fullmatch(r"cpu:(\d+)", spec)
  if m:
    n = int(m.group(1))
    cpus = jax.devices("cpu")
    if n < 1 or n > len(cpus):
      raise TopologyError(
          f"topology {spec!r} needs {n} CPU devices but this process has {len(cpus)}; start it "
          f"with XLA_FLAGS=--xla_force_host_platform_device_count={n} (scripts/aot_compile.py "
          "does this itself when jax is not yet imported)")
    return Topology(spec, "cpu", list(cpus[:n]), "cpu", spec, None)
  m = re.fullmatch(r"([a-z0-9]+)-(\d+)", spec)
  if m:
    gen = _ALIASES.get(m.group(1), m.group(1))
    if gen not in TPU_GENERATIONS:
      raise TopologyError(f"unknown TPU generation {m.group(1)!r} in {spec!r}; known: "
                          f"{', '.join(TPU_GENERATIONS)}. Valid forms: {VALID_FORMS}")
    g = TPU_GENERATIONS[gen]
    n = int(m.group(2))
    if n % g["cores_per_chip"]:
      raise TopologyError(f"{spec!r}: {gen}-N counts TensorCores ({g['cores_per_chip']} per "
                          f"chip), so N must be even. Valid forms: {VALID_FORMS}")
    chips = n // g["cores_per_chip"]
    dims = _slice_dims(chips, g["dims"])
    if dims is None:
      raise TopologyError(f"{spec!r}: no {gen} slice has {chips} chips. Valid forms: "
                          f"{VALID_FORMS}")
    shape = f"{g['libtpu']}:{'x'.join(map(str, dims))}"
  else:
    m = re.fullmatch(r"([a-z0-9]+):(\d+(?:x\d+)+)", spec)
    if not m:
      raise TopologyError(f"unknown topology {spec!r}. Valid forms: {VALID_FORMS}")
    gen = _ALIASES.get(m.group(1), m.group(1))
    if gen not in TPU_GENERATIONS:
      raise TopologyError(f"unknown TPU generation {m.group(1)!r} in {spec!r}; known: "
                          f"{', '.join(TPU_GENERATIONS)}. Valid forms: {VALID_FORMS}")
    g = TPU_GENERATIONS[gen]
    shape = f"{g['libtpu']}:{m.group(2)}"
  devices = _tpu_devices(shape)
  return Topology(spec, "tpu", devices, gen, shape, TPU_GENERATIONS[gen]["hbm_gib"] * GiB)


def abstract_train_state(init_fn, tx, frozen: Sequence[str], mesh: Mesh, rules
                         ) -> tuple[TrainState, TrainState, dict]:
  """The TrainState that :func:`vlm.train.step.create_train_state_from_init` would create, as
  ``jax.ShapeDtypeStruct`` leaves carrying their ``NamedSharding`` (nothing is allocated).

  Returns (abstract state, state shardings, trainable mask)."""
  with nn.logical_axis_rules(rules):
    params, p_shard = step_lib.param_shardings_of(init_fn, mesh, rules)
  mask = optim.trainable_mask(params, list(frozen))
  shardings = step_lib.state_sharding_tree(params, p_shard, tx, mask, mesh)
  opt = jax.eval_shape(tx.init, optim.partition(params, mask)[0])
  state = TrainState(step=jax.ShapeDtypeStruct((), np.int32), params=params, opt_state=opt)

  def with_sharding(x, s):
    return jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s)

  return jax.tree.map(with_sharding, state, shardings), shardings, mask


def _batch_dims(example, axes):
  """Like the batch: the index of each array's ``batch`` dimension (0 without axes)."""
  if axes is None:
    return jax.tree.map(lambda _: 0, example)
  return step_lib.batch_dims_from_axes(example, axes)


def abstract_batch(task, config, batch_size: int, axes) -> dict:
  """The task's example batch with ``batch_size`` rows, as ShapeDtypeStructs: the one-row host
  example is scaled along each array's ``batch`` dimension, so the global batch is never
  allocated."""
  one = task.example_batch(config, 1)
  dims = _batch_dims(one, axes)

  def scale(x, d):
    x = np.asarray(x)
    shape = list(x.shape)
    shape[d] = shape[d] * batch_size
    return jax.ShapeDtypeStruct(tuple(shape), x.dtype)

  return jax.tree.map(scale, one, dims)


# ---------------------------------------------------------------------------------------------
# HLO collectives

_COLLECTIVES = ("all-reduce", "all-gather", "reduce-scatter", "all-to-all", "collective-permute",
                "ragged-all-to-all")
_DTYPE_BYTES = {"pred": 1, "s4": 0.5, "u4": 0.5, "s8": 1, "u8": 1, "s16": 2, "u16": 2, "s32": 4,
                "u32": 4, "s64": 8, "u64": 8, "f16": 2, "bf16": 2, "f32": 4, "f64": 8, "c64": 8,
                "c128": 16, "f8e4m3fn": 1, "f8e5m2": 1, "f8e4m3b11fnuz": 1, "f8e4m3fnuz": 1,
                "f8e5m2fnuz": 1, "token": 0}
_SHAPE = re.compile(r"\b([a-z][a-z0-9]*)\[([0-9,]*)\]")
_INSTR = re.compile(r"^\s*(?:ROOT\s+)?%?([\w.\-]+)\s*=\s*(.*?)\s([a-z][a-z0-9\-]*)\((.*)$")
_COMP = re.compile(r"^\s*(ENTRY\s+)?%?([\w.\-]+)\s.*\{\s*$")
_CALLS = re.compile(r"\b(calls|body|condition|to_apply|true_computation|false_computation)"
                    r"=%?([\w.\-]+)")
_BRANCHES = re.compile(r"branch_computations=\{([^}]*)\}")
_TRIP = re.compile(r'"known_trip_count"\s*:\s*\{\s*"n"\s*:\s*"?(\d+)')


def _shape_bytes(text: str) -> int:
  total = 0.0
  for dtype, dims in _SHAPE.findall(text):
    if dtype not in _DTYPE_BYTES:
      continue
    n = math.prod(int(d) for d in dims.split(",") if d) if dims else 1
    total += n * _DTYPE_BYTES[dtype]
  return int(total)


def _dims(shape_text: str) -> list[int]:
  m = _SHAPE.search(shape_text)
  return [int(d) for d in m.group(2).split(",") if d] if m else []


def _conv_macs(lhs: list[int], rhs: list[int], out: list[int], attrs: str) -> float:
  """Multiply-adds of an HLO ``convolution``: per output element, the kernel's input features
  times the window taps that meet a real input element (not padding, not a hole from
  ``lhs_dilate``), counted exactly per spatial dim. The TPU compiler writes many matmuls as
  convolutions whose windows mostly see padding or dilation holes (a batched matmul: a window
  over a batch dim with ``lhs_dilate`` = its size; an outer product: a 64-wide window over a
  size-1 dim padded by 63 on each side); counting the whole window would overstate them by its
  area."""
  labels = re.search(r"dim_labels=(\w+)_(\w+)->(\w+)", attrs)
  if not labels or not rhs or not out:
    return 0.0
  lab_l, lab_k, lab_o = labels.groups()
  if (len(lab_l) != len(lhs) or len(lab_k) != len(rhs) or len(lab_o) != len(out)
      or "i" not in lab_k):
    return 0.0
  dims = sorted(c for c in lab_k if c.isdigit())
  window = re.search(r"window=\{([^}]*)\}", attrs)
  text = window.group(1) if window else ""

  def field(name, default):
    m = re.search(rf"\b{name}=([0-9x_\-]+)", text)
    return m.group(1).split("x") if m else [default] * len(dims)

  strides = [int(v) for v in field("stride", "1")]
  pads = [tuple(int(p) for p in v.split("_")) for v in field("pad", "0_0")]
  lhs_dil = [int(v) for v in field("lhs_dilate", "1")]
  rhs_dil = [int(v) for v in field("rhs_dilate", "1")]
  real_pairs, out_spatial = 1, 1
  for j, d in enumerate(dims):
    n_in, n_win, n_out = lhs[lab_l.index(d)], rhs[lab_k.index(d)], out[lab_o.index(d)]
    out_spatial *= n_out
    pos = (np.arange(n_out)[:, None] * strides[j] + np.arange(n_win)[None, :] * rhs_dil[j]
           - pads[j][0])
    real = (pos >= 0) & (pos % lhs_dil[j] == 0) & (pos // lhs_dil[j] < n_in)
    real_pairs *= int(real.sum())
  return float(math.prod(out) // max(out_spatial, 1) * real_pairs * rhs[lab_k.index("i")])


def hlo_stats(hlo_text: str) -> tuple[dict[str, dict[str, int]], float]:
  """(:func:`collective_stats`, matmul FLOPs) of an HLO module's text, every instruction
  weighted by how often it runs (see :func:`collective_stats`). The FLOPs are ``2 * output size
  * contracted size`` summed over ``dot`` and ``convolution`` instructions (TPU matmuls), so a
  scanned layer stack counts every layer, unlike XLA's cost analysis, which counts a loop body
  once; elementwise work and custom calls (Pallas kernels) are not counted."""
  comps: dict[str, list[tuple[str, str]]] = {}  # computation -> [(kind, result shape text)]
  edges: dict[str, list[tuple[str, Any]]] = {}  # -> [(callee, trip count or condition name)]
  branch_sets: dict[str, list[tuple[str, ...]]] = {}  # computation -> its conditionals' branches
  bounds: dict[str, list[int]] = {}  # computation -> its s32/s64 scalar constants
  less_than: set[str] = set()  # computations with a compare(..., direction=LT)
  matmul: dict[str, float] = {}  # computation -> its dot/convolution FLOPs (one run)
  entry = None
  current = None
  shapes: dict[str, str] = {}
  for line in hlo_text.splitlines():
    cm = _COMP.match(line)
    if cm and "=" not in line.split("{")[0].split("(")[0]:
      current = cm.group(2)
      comps.setdefault(current, [])
      edges.setdefault(current, [])
      shapes = {n: t for n, t in re.findall(r"([\w.\-]+): ([a-z][a-z0-9]*\[[0-9,]*\])", line)}
      if cm.group(1):
        entry = current
      continue
    if current is None:
      continue
    im = _INSTR.match(line)
    if not im:
      continue
    name, shape, op, rest = im.groups()
    shapes[name] = shape
    if op == "constant":
      c = re.fullmatch(r"\s*[su](?:32|64)\[\]\S*", shape)
      v = re.match(r"\s*(\d+)\)", rest)
      if c and v:
        bounds.setdefault(current, []).append(int(v.group(1)))
    elif op == "compare" and "direction=LT" in rest:
      less_than.add(current)
    elif op in ("dot", "convolution"):
      operands = re.findall(r"%([\w.\-]+)", rest.split(")", 1)[0])
      out_n = math.prod(_dims(shape))
      flops = 0.0
      if op == "dot" and operands:
        lhs = _dims(shapes.get(operands[0], ""))
        cd = re.search(r"lhs_contracting_dims=\{([0-9,]*)\}", rest)
        k = math.prod(lhs[int(i)] for i in cd.group(1).split(",") if i) if cd and lhs else 0
        flops = 2.0 * out_n * k
      elif op == "convolution" and len(operands) > 1:
        flops = 2.0 * _conv_macs(_dims(shapes.get(operands[0], "")),
                                 _dims(shapes.get(operands[1], "")), _dims(shape), rest)
      matmul[current] = matmul.get(current, 0.0) + flops
    trip: Any = 1
    if op == "while":
      t = _TRIP.search(rest)
      cond = re.search(r"\bcondition=%?([\w.\-]+)", rest)
      trip = int(t.group(1)) if t else ("cond", cond.group(1) if cond else "")
    branches = []  # a conditional runs one of these per execution
    for kind, callee in _CALLS.findall(rest):
      if kind in ("true_computation", "false_computation"):
        branches.append(callee)
      else:
        edges[current].append((callee, trip if kind == "body" else 1))
    for group in _BRANCHES.findall(rest):
      branches.extend(c.strip().lstrip("%") for c in group.split(","))
    for callee in branches:
      edges[current].append((callee, 1))
    if branches:
      branch_sets.setdefault(current, []).append(tuple(branches))
    base = op[:-5] if op.endswith("-done") else op
    if op.endswith("-start"):
      continue
    if base in _COLLECTIVES:
      comps[current].append((base, shape))
  if entry is None:
    return {}, 0.0
  mult: dict[str, int] = {}

  def trips(trip) -> int:
    if isinstance(trip, int):
      return trip
    # no known_trip_count (TPU HLO after loop rewrites): a condition `i < N` with one constant N
    # and a counter from 0, as lax.scan / fori_loop emit; otherwise counted once.
    cond = trip[1]
    consts = bounds.get(cond, [])
    return consts[0] if cond in less_than and len(consts) == 1 and consts[0] > 0 else 1

  def visit(name, factor, depth=0):
    if depth > 64:
      return
    mult[name] = mult.get(name, 0) + factor
    for callee, trip in edges.get(name, ()):
      visit(callee, factor * trips(trip), depth + 1)

  visit(entry, 1)
  out: dict[str, dict[str, int]] = {}
  for name, ops in comps.items():
    for kind, shape in ops:
      k = mult.get(name, 0)
      if not k:
        continue
      d = out.setdefault(kind, {"count": 0, "bytes": 0})
      d["count"] += k
      d["bytes"] += k * _shape_bytes(shape)
  # FLOPs: a conditional's branches count as the costliest one (collectives above count every
  # branch: an upper bound), a loop body times its trip count.
  branch_of = {name: {c for group in groups for c in group}
               for name, groups in branch_sets.items()}
  memo: dict[str, float] = {}

  def total(name, depth=0) -> float:
    if name in memo or depth > 64:
      return memo.get(name, 0.0)
    own = matmul.get(name, 0.0)
    inside = branch_of.get(name, set())
    own += sum(trips(trip) * total(callee, depth + 1)
               for callee, trip in edges.get(name, ()) if callee not in inside)
    own += sum(max(total(c, depth + 1) for c in group) for group in branch_sets.get(name, ()))
    memo[name] = own
    return own

  return out, total(entry)


def collective_stats(hlo_text: str) -> dict[str, dict[str, int]]:
  """Per collective kind, ``{"count": ops, "bytes": result bytes}`` of an (SPMD-partitioned,
  i.e. per-device) HLO module's text, each op weighted by how often it runs: an op in a
  ``while`` body (a scanned layer stack, microbatches) counts once per iteration, the trip count
  taken from the loop's ``known_trip_count`` or else from a condition ``i < N`` with a single
  integer constant N (the form ``lax.scan`` emits); other loops count once.
  Async pairs count once (the ``-done`` result); ``-start`` ops are skipped."""
  return hlo_stats(hlo_text)[0]


# ---------------------------------------------------------------------------------------------


@dataclasses.dataclass
class AotReport:
  """What :func:`compile_train_step` measured. Memory figures are bytes per chip (XLA's
  ``memory_analysis`` of the SPMD program); ``total_bytes`` = arguments + outputs - aliased
  (donated state) + temporaries + generated code. ``flops`` from ``cost_analysis`` (per chip;
  loops as XLA's cost model counts them), ``collectives`` from :func:`collective_stats`."""
  config: str
  topology: str
  platform: str
  chips: int
  mesh: dict[str, int]
  global_batch_size: int
  microbatches: int
  params: int
  trainable_params: int
  argument_bytes: int
  output_bytes: int
  alias_bytes: int
  temp_bytes: int
  code_bytes: int
  total_bytes: int
  hbm_bytes: int | None
  flops: float | None
  matmul_flops: float
  collectives: dict[str, dict[str, int]]
  lower_s: float
  compile_s: float
  param_specs: dict[str, str] = dataclasses.field(repr=False, default_factory=dict)

  @property
  def fits(self) -> bool | None:
    return None if self.hbm_bytes is None else self.total_bytes <= self.hbm_bytes

  def to_json(self) -> dict[str, Any]:
    d = dataclasses.asdict(self)
    d["fits"] = self.fits
    return d

  def summary(self) -> str:
    """Human-readable lines (GiB per chip, TFLOPs, collective bytes, times)."""
    g = lambda b: f"{b / GiB:.2f} GiB"  # noqa: E731
    hbm = f" of {g(self.hbm_bytes)} HBM ({'fits' if self.fits else 'DOES NOT FIT'})" \
        if self.hbm_bytes else ""
    lines = [
        f"config {self.config} on {self.topology} ({self.platform}, {self.chips} chips), mesh "
        + " ".join(f"{k}={v}" for k, v in self.mesh.items() if v > 1) + (
            "" if any(v > 1 for v in self.mesh.values()) else "(1 device)"),
        f"global batch {self.global_batch_size} in {self.microbatches} microbatch(es); "
        f"parameters {self.params / 1e9:.3f}B ({self.trainable_params / 1e9:.3f}B trainable)",
        f"memory per chip: arguments {g(self.argument_bytes)}, outputs {g(self.output_bytes)} "
        f"(aliased {g(self.alias_bytes)}), temporaries {g(self.temp_bytes)}, code "
        f"{g(self.code_bytes)}; total {g(self.total_bytes)}{hbm}",
        f"matmul flops per step per chip (HLO, every loop iteration): "
        f"{self.matmul_flops / 1e12:.2f} TFLOP (x{self.chips} chips = "
        f"{self.matmul_flops * self.chips / 1e15:.2f} PFLOP); XLA cost analysis (a loop body "
        "once): " + ("n/a" if self.flops is None else f"{self.flops / 1e12:.2f} TFLOP"),
        "collectives per step per chip: " + (", ".join(
            f"{k} {v['count']} ops {v['bytes'] / GiB:.2f} GiB"
            for k, v in sorted(self.collectives.items())) or "none"),
        f"lowering {self.lower_s:.1f} s, compile {self.compile_s:.1f} s",
    ]
    return "\n".join(lines)


def markdown_header() -> str:
  return ("| config | topology | mesh | batch | args GiB | temps GiB | total GiB / HBM | "
          "TFLOP/chip | compile s |\n|---|---|---|---|---|---|---|---|---|")


def markdown_row(r: Mapping[str, Any]) -> str:
  """One README table row from :meth:`AotReport.to_json` (or its JSON file)."""
  mesh = ",".join(f"{k}={v}" for k, v in r["mesh"].items() if v > 1) or "1"
  hbm = f" / {r['hbm_bytes'] / GiB:.0f}" if r.get("hbm_bytes") else ""
  if r.get("microbatches", 1) > 1:
    mesh += f" ({r['microbatches']} microbatches)"
  if "argument_bytes" not in r:  # the TPU compiler refused: no memory analysis
    return (f"| `{r['config']}` | {r['topology']} | {mesh} | {r['global_batch_size']} | - | - | "
            f"does not fit: needs {r['needed_bytes'] / GiB:.1f}{hbm} | - | "
            f"{r['compile_s']:.0f} |")
  flops = f"{r['matmul_flops'] / 1e12:.1f}" if r.get("matmul_flops") else "n/a"
  return (f"| `{r['config']}` | {r['topology']} | {mesh} | {r['global_batch_size']} | "
          f"{r['argument_bytes'] / GiB:.2f} | {r['temp_bytes'] / GiB:.2f} | "
          f"{r['total_bytes'] / GiB:.2f}{hbm} | {flops} | {r['compile_s']:.0f} |")


def _path_str(path) -> str:
  return "/".join(str(getattr(k, "key", getattr(k, "name", getattr(k, "idx", k)))) for k in path)


def param_specs(shardings) -> dict[str, str]:
  """``{"decoder/layers/attn/q/kernel": "PartitionSpec('fsdp', 'tensor')", ...}`` for every
  parameter of a NamedSharding tree."""
  return {_path_str(p): str(s.spec) for p, s in
          jax.tree_util.tree_flatten_with_path(shardings)[0]}


@dataclasses.dataclass
class TrainStepPlan:
  """The trainer's jitted step and its abstract arguments for one topology and mesh:
  ``step_fn(state, batch, rng)`` is :func:`vlm.train.step.jit_train_step`; ``state``, ``batch``
  and ``rng`` are ShapeDtypeStructs carrying their shardings; ``shardings`` the TrainState of
  NamedShardings; ``mask`` the trainable mask."""
  config: Any
  topology: Topology
  mesh: Mesh
  rules: Any
  step_fn: Any
  state: TrainState
  batch: dict
  rng: Any
  shardings: TrainState
  mask: dict

  def lower(self):
    """``step_fn.lower(state, batch, rng)`` under the mesh and rules, attention choosing its
    implementation for the topology's platform (:func:`vlm.nn.partitioning.mesh_platform`)."""
    with jax.set_mesh(self.mesh), nn.logical_axis_rules(self.rules):
      return self.step_fn.lower(self.state, self.batch, self.rng)


def plan_train_step(config, topology: Topology | str, *,
                    mesh_shape: Mapping[str, int] | None = None) -> TrainStepPlan:
  """What :func:`vlm.train.loop.run` builds for ``config``, for the devices of ``topology``, with
  nothing allocated: the same checks (config, mesh, batch and microbatch sizes, batch axes), the
  task's model / example batch / initialiser / batch axes, ``config.optim``'s optimizer, the
  state shardings and the jitted step with the config's microbatches and loss arguments.

  Args:
    config: a training config (``configs/*``).
    topology: a :class:`Topology` or a name for :func:`resolve_topology`.
    mesh_shape: overrides ``config.mesh.shape``.
  Raises:
    TopologyError, ValueError: bad topology, mesh, batch or microbatch sizes.
  """
  from vlm.train import loop

  topo = resolve_topology(topology) if isinstance(topology, str) else topology
  loop.validate_config(config)
  task = loop.get_task(config)
  mesh = mesh_lib.make_mesh(dict(mesh_shape or config.mesh.shape), topo.devices,
                            interconnect_order=True)
  rules = mesh_lib.rules_from_config(config.mesh.get("rules"))
  mesh_lib.check_batch_size(config.global_batch_size, mesh, rules)
  loop._check_microbatches(config, mesh, rules)  # pylint: disable=protected-access
  model = task.build_model(config)
  axes = task.batch_axes(config)
  example = task.example_batch(config, 1)
  mesh_lib.batch_shardings(mesh, rules, example, axes)
  tx = optim.make_optimizer(config.optim)

  def init_fn(key):
    return task.init_model(model, key, example)

  state, shardings, mask = abstract_train_state(init_fn, tx, list(config.optim.frozen), mesh,
                                                rules)
  batch = abstract_batch(task, config, config.global_batch_size, axes)
  batch_shard = mesh_lib.batch_shardings(mesh, rules, batch, axes)
  batch = jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                       batch, batch_shard)
  rng = jax.eval_shape(lambda: jax.random.key(
      config.seed, impl=config.get("prng_impl", "threefry2x32")))
  rng = jax.ShapeDtypeStruct(rng.shape, rng.dtype, sharding=mesh_lib.replicated(mesh))
  step_fn = step_lib.jit_train_step(model, tx, mask, task.loss_fn, dict(config.get("loss", {})),
                                    shardings, mesh, rules, batch, batch_axes=axes,
                                    microbatches=config.get("microbatches", 1))
  return TrainStepPlan(config, topo, mesh, rules, step_fn, state, batch, rng, shardings, mask)


def compile_train_step(config, topology: Topology | str, *, config_name: str = "",
                       mesh_shape: Mapping[str, int] | None = None,
                       hlo_path: str = "") -> AotReport:
  """Lowers and compiles the train step of ``config`` for ``topology`` (:func:`plan_train_step`)
  and measures it.

  Args:
    config, topology, mesh_shape: see :func:`plan_train_step`.
    config_name: shown in the report (the ``--config`` argument, ``<config file>:<variant>``).
    hlo_path: if set, the compiled (per-chip) HLO text is written there.
  Returns:
    an :class:`AotReport` (does not check the fit: see :func:`check_fits`).
  Raises:
    TopologyError, ValueError: bad topology, mesh, batch or microbatch sizes (before compiling).
  """
  plan = plan_train_step(config, topology, mesh_shape=mesh_shape)
  t0 = time.perf_counter()
  lowered = plan.lower()
  t1 = time.perf_counter()
  try:
    compiled = lowered.compile()
  except Exception as e:  # pylint: disable=broad-except
    oom = _hbm_overflow(str(e))
    if oom is None:
      raise
    need, have = oom
    row = dict(config=config_name, topology=plan.topology.name,
               mesh={k: int(v) for k, v in plan.mesh.shape.items()},
               global_batch_size=int(plan.config.global_batch_size),
               microbatches=int(plan.config.get("microbatches", 1)), fits=False,
               needed_bytes=need * GiB, hbm_bytes=plan.topology.hbm_bytes,
               compile_s=time.perf_counter() - t1, error=str(e).splitlines()[0][:300])
    raise DoesNotFitError(
        f"{config_name or 'the config'} on {plan.topology.name} (mesh "
        f"{_mesh_str(plan.mesh.shape)}): the TPU compiler ran out of HBM: {need:.2f} GiB needed "
        f"per chip, {have:.2f} GiB available: {need - have:.2f} GiB over "
        f"(compile {time.perf_counter() - t1:.0f} s). {_FIX}", row) from e
  t2 = time.perf_counter()
  if hlo_path:
    with open(hlo_path, "w") as f:
      f.write(compiled.as_text())
  return report_of(plan, compiled, config_name=config_name, lower_s=t1 - t0, compile_s=t2 - t1)


def report_of(plan: TrainStepPlan, compiled, *, config_name: str = "", lower_s: float = 0.0,
              compile_s: float = 0.0) -> AotReport:
  """The :class:`AotReport` of a compiled :class:`TrainStepPlan`."""
  mem = compiled.memory_analysis()
  arg = int(getattr(mem, "argument_size_in_bytes", 0))
  out = int(getattr(mem, "output_size_in_bytes", 0))
  alias = int(getattr(mem, "alias_size_in_bytes", 0))
  temp = int(getattr(mem, "temp_size_in_bytes", 0))
  code = int(getattr(mem, "generated_code_size_in_bytes", 0))
  cost = compiled.cost_analysis()
  if isinstance(cost, (list, tuple)):
    cost = cost[0] if cost else {}
  flops = float(cost["flops"]) if cost and "flops" in cost else None
  try:
    hlo = compiled.as_text()
  except Exception:  # pylint: disable=broad-except
    hlo = ""
  collectives, matmul_flops = hlo_stats(hlo)
  config = plan.config
  trainable = optim.partition(plan.state.params, plan.mask)[0]
  return AotReport(
      config=config_name, topology=plan.topology.name, platform=plan.topology.platform,
      chips=len(plan.topology.devices), mesh={k: int(v) for k, v in plan.mesh.shape.items()},
      global_batch_size=int(config.global_batch_size),
      microbatches=int(config.get("microbatches", 1)),
      params=sum(int(np.prod(x.shape)) for x in jax.tree.leaves(plan.state.params)),
      trainable_params=sum(int(np.prod(x.shape)) for x in jax.tree.leaves(trainable)),
      argument_bytes=arg, output_bytes=out, alias_bytes=alias, temp_bytes=temp, code_bytes=code,
      total_bytes=arg + out - alias + temp + code, hbm_bytes=plan.topology.hbm_bytes, flops=flops,
      matmul_flops=matmul_flops, collectives=collectives, lower_s=lower_s, compile_s=compile_s,
      param_specs=param_specs(plan.shardings.params))


def check_fits(report: AotReport) -> None:
  """Raises :class:`DoesNotFitError` naming the overshoot in GiB and what to change when the
  per-chip total exceeds the chip's HBM (no check for CPU devices)."""
  if report.fits is not False:
    return
  over = (report.total_bytes - report.hbm_bytes) / GiB
  raise DoesNotFitError(
      f"the train step needs {report.total_bytes / GiB:.2f} GiB per chip but a "
      f"{report.topology} chip has {report.hbm_bytes / GiB:.0f} GiB HBM: {over:.2f} GiB over "
      f"(arguments {report.argument_bytes / GiB:.2f} GiB = parameters and optimizer state, "
      f"temporaries {report.temp_bytes / GiB:.2f} GiB = activations). {_FIX}")


_FIX = ("To fit: shard the state over more chips (a larger fsdp/tensor/expert mesh axis or a "
        "bigger topology) to cut the arguments; raise --config.microbatches (gradient "
        "accumulation), lower --config.global_batch_size, or turn on --config.model.remat to cut "
        "the temporaries (activations).")
_GB = r"([0-9.]+)\s*([KMGT])i?B?"
_OOM = re.compile(r"(?:required|requirement)[^(]*\(" + _GB + r"\)[^(]*available HBM\s*\("
                  + _GB + r"\)", re.S)
_UNIT = {"K": 2 ** -20, "M": 2 ** -10, "G": 1.0, "T": 1024.0}


def _hbm_overflow(message: str) -> tuple[float, float] | None:
  """(needed GiB, available GiB) from the TPU compiler's RESOURCE_EXHAUSTED message (e.g.
  "the total memory required for HLO temporaries (289.52G) exceeds available HBM (95.74G)"),
  or None for any other error."""
  if "RESOURCE_EXHAUSTED" not in message or "HBM" not in message:
    return None
  m = _OOM.search(message)
  if not m:
    return (float("nan"), float("nan"))
  return (float(m.group(1)) * _UNIT[m.group(2)], float(m.group(3)) * _UNIT[m.group(4)])


def _mesh_str(shape) -> str:
  return ",".join(f"{k}={v}" for k, v in dict(shape).items() if v > 1) or "1 device"
