"""Dense vs routed ("ragged", "gather") MoE expert layer timings (:mod:`vlm.nn.moe`).

Usage::

  python scripts/benchmark_moe.py                              # CPU-sized: T=512, D=256, I=128,
                                                               # E=16, k=2, float32
  python scripts/benchmark_moe.py --backward                   # forward + backward (grads of x
                                                               # and both weight tensors)
  python scripts/benchmark_moe.py --tokens 8192 --hidden 2048 --inter 768 --experts 128 \\
      --topk 8 --dtype bfloat16                                # one Qwen3-30B-A3B layer (GPU)
  python scripts/benchmark_moe.py --json /tmp/bench_moe.json

What it does: random tokens x [T, D], expert weights gate_up [E, D, 2I] and down [E, I, D]
(N(0, 1/fan_in)), routing from random router logits (softmax, top-k, renormalised, as
``Qwen3SparseMoeBlock``); jits :func:`vlm.nn.moe.dense_expert_mlp` and
:func:`vlm.nn.moe.ragged_expert_mlp` and :func:`vlm.nn.moe.gather_expert_mlp` (with ``--backward``: ``jax.grad`` of ``sum(y * c)`` w.r.t.
x, gate_up and down), checks that both give the same output, then reports the median wall time
of ``--iters`` calls after ``--warmup`` untimed ones, tokens/s, the matmul FLOPs each path is
asked for (dense 6*T*E*D*I, routed 6*T*k*D*I, forward) and the ratio dense time / ragged time
(> 1: ragged faster).

Expect ragged to be *slower* on CPU: XLA:CPU has no grouped-matmul kernel and jax lowers
``ragged_dot`` there as a masked dense dot over all E groups (k times the dense FLOPs). XLA:GPU
(jax 0.11.2) had no fast path either. Numbers measured when this was written (median times):

==============================================  ================  =========  =========
config                                          device            dense      ragged
==============================================  ================  =========  =========
default (T=512 D=256 I=128 E=16 k=2, f32) fwd   2-core CPU        25.6 ms    38.5 ms
default, ``--backward``                         2-core CPU        84.9 ms    143.2 ms
default, fwd                                    H200, jax 0.11.2  0.133 ms   0.174 ms
T=8192 D=2048 I=768 E=128 k=8 bf16, fwd         H200, jax 0.11.2  17.2 ms    118.1 ms
same, ``--backward``                            H200, jax 0.11.2  39.8 ms    360.4 ms
same with T=64, fwd                             H200, jax 0.11.2  1.13 ms    1.17 ms
==============================================  ================  =========  =========

The "gather" path (each token's k expert matrices gathered; what ``moe_implementation="auto"``
uses when T*k < E, i.e. decode) on a decode-sized call, 2-core CPU, float32, T=2 D=512 I=256
E=64 k=4: dense 97.2 ms, ragged 108.3 ms, gather 3.1 ms forward (31.8x); forward+backward
211.6 / 214.3 / 70.3 ms.

Expert parallelism (``moe_implementation="routed"``, :func:`vlm.nn.moe.routed_expert_mlp`)::

  python scripts/benchmark_moe.py --devices 8 --mesh expert=4,data=2 --backward
  python scripts/benchmark_moe.py --devices 8 --mesh expert=8 --backward
      # 8 simulated CPU devices: dense, ragged and routed jitted under the mesh (tokens split
      # over every mesh axis, expert weights over ``expert``), step times and ratios vs dense
  python scripts/benchmark_moe.py --preset 235b_a22b --tpu_topology v5p:2x2x2 \
      --mesh expert=8 --tokens_per_device 4096
      # libtpu AOT (no TPU needed): per-chip memory and FLOPs of one Qwen3-235B-A22B MoE layer's
      # forward+backward, dense vs routed (ragged all-to-all + megablox GMM)

Measured 2026-12-07, jax 0.10.2, on the shared 2-core CPU (load average ~19 from other jobs,
so only the ratios within one run mean anything): 8 simulated devices, T=512 D=256 I=128 E=16
k=2 float32, forward+backward, median of 10:

==================  =========  ================  ================
mesh                dense      ragged / dense    routed / dense
==================  =========  ================  ================
expert=4 x data=2   372.9 ms   2.05x             1.05x
expert=8            169.5 ms   2.15x             2.22x
==================  =========  ================  ================

(max |dense - routed| 1.5e-05 at jax's default CPU matmul precision, on gradients up to ~1e2.)
On CPU "routed" cannot win: XLA:CPU lowers ``ragged_dot`` as a masked dense dot over all local
experts and the whole worst-case receive buffer, and there is no ragged all-to-all (a dense
``all_to_all`` of worst-case blocks stands in). Its point is the TPU, where the grouped matmul
(megablox) only visits the rows received. AOT for a v5p:2x2x2 topology (8 chips, expert=8), one
Qwen3-235B-A22B MoE layer (D=4096 I=1536 E=128 k=8, bfloat16), 4,096 tokens per chip,
forward+backward, per chip:

=======  ==========  ==========  ===========  ========================  ==============
path     arguments   temps       total        FLOPs (compiler count)    FLOPs (actual)
=======  ==========  ==========  ===========  ========================  ==============
dense    0.59 GiB    6.25 GiB    7.66 GiB     52.8 T                    59.4 T
routed   0.59 GiB    9.75 GiB    10.94 GiB    26.4 T                    3.7 T
=======  ==========  ==========  ===========  ========================  ==============

"actual" = the analytic expert matmul FLOPs, 18 * rows * D * I per chip (rows = T_loc * E dense,
T_loc * k routed: 1/16). The compiler's count for routed is the megablox kernel's static estimate
over its whole receive buffer, which capacity-free dispatch sizes for the worst case (all tokens
of all 8 expert-axis devices to one device: 8x the average, 262,144 rows); the kernel's grid only
visits the tiles of the rows actually received. That buffer is also why routed needs 3.3 GiB more
temporaries per chip here (1.43x dense's total). Compile: dense 41 s, routed 92 s (this CPU).

This is a benchmark, not a test: pytest never runs it.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _preparse_devices(argv):
  """``--devices N`` must reach XLA_FLAGS before jax initialises its CPU backend."""
  pre = argparse.ArgumentParser(add_help=False)
  pre.add_argument("--devices", type=int, default=0)
  n = pre.parse_known_args(argv)[0].devices
  if n > 0 and "xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                               f" --xla_force_host_platform_device_count={n}")


if __name__ == "__main__":
  _preparse_devices(sys.argv[1:])

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from jax.sharding import NamedSharding, PartitionSpec  # noqa: E402

from vlm.nn import moe  # noqa: E402
from vlm.parallel import mesh as mesh_lib  # noqa: E402

PRESETS = {  # (hidden, inter, experts, topk) of one MoE layer (HF config.json of each model)
    "30b_a3b": (2048, 768, 128, 8),
    "235b_a22b": (4096, 1536, 128, 8),
}


def _parse(argv=None):
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  p.add_argument("--tokens", type=int, default=512, help="T = batch * length")
  p.add_argument("--hidden", type=int, default=256, help="D")
  p.add_argument("--inter", type=int, default=128, help="I (moe_intermediate_size)")
  p.add_argument("--experts", type=int, default=16, help="E")
  p.add_argument("--topk", type=int, default=2, help="k (num_experts_per_tok)")
  p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
  p.add_argument("--backward", action="store_true", help="time forward + backward")
  p.add_argument("--warmup", type=int, default=2)
  p.add_argument("--iters", type=int, default=10)
  p.add_argument("--seed", type=int, default=0)
  p.add_argument("--json", default=None, help="also write the results to this file")
  p.add_argument("--devices", type=int, default=0,
                 help="simulated CPU devices (sets --xla_force_host_platform_device_count)")
  p.add_argument("--mesh", default="",
                 help="run under this mesh, e.g. expert=4,data=2 (adds the 'routed' expert-"
                      "parallel implementation; tokens split over every mesh axis)")
  p.add_argument("--preset", default="", choices=[""] + sorted(PRESETS),
                 help="layer sizes of a Qwen3 MoE model (overrides --hidden/--inter/--experts/"
                      "--topk; bfloat16)")
  p.add_argument("--tpu_topology", default="",
                 help="AOT-compile dense vs routed for this libtpu topology (e.g. v5p:2x2x2) and "
                      "print per-chip memory and FLOPs instead of timing")
  p.add_argument("--tokens_per_device", type=int, default=0,
                 help="with --tpu_topology: tokens per chip (T = this * chips; default 4096)")
  a = p.parse_args(argv)
  if a.preset:
    a.hidden, a.inter, a.experts, a.topk = PRESETS[a.preset]
    a.dtype = "bfloat16"
  if not 0 < a.topk <= a.experts:
    p.error(f"--topk must be in [1, --experts={a.experts}], got {a.topk}")
  if min(a.tokens, a.hidden, a.inter, a.iters) < 1 or a.warmup < 0:
    p.error("--tokens, --hidden, --inter, --iters must be >= 1 and --warmup >= 0")
  return a


def _inputs(a):
  dt = jnp.dtype(a.dtype)
  kx, kg, kd, kr = jax.random.split(jax.random.key(a.seed), 4)
  x = jax.random.normal(kx, (a.tokens, a.hidden), jnp.float32).astype(dt)
  gate_up = (jax.random.normal(kg, (a.experts, a.hidden, 2 * a.inter), jnp.float32)
             / np.sqrt(a.hidden)).astype(dt)
  down = (jax.random.normal(kd, (a.experts, a.inter, a.hidden), jnp.float32)
          / np.sqrt(a.inter)).astype(dt)
  logits = jax.random.normal(kr, (a.tokens, a.experts), jnp.float32)
  w, ids = jax.lax.top_k(jax.nn.softmax(logits), a.topk)
  w = (w / jnp.sum(w, -1, keepdims=True)).astype(dt)
  return x, gate_up, down, ids, w


def _make(fn, backward):
  if not backward:
    return jax.jit(lambda x, gu, dn, ids, w: fn(x, gu, dn, ids, w, jax.nn.silu))

  def loss(x, gu, dn, ids, w):
    y = fn(x, gu, dn, ids, w, jax.nn.silu)
    return jnp.sum(y.astype(jnp.float32) * jnp.cos(jnp.arange(y.shape[-1], dtype=jnp.float32)))
  return jax.jit(jax.grad(loss, argnums=(0, 1, 2)))


def _time(f, args, warmup, iters):
  for _ in range(warmup):
    jax.block_until_ready(f(*args))
  times = []
  for _ in range(iters):
    t0 = time.perf_counter()
    jax.block_until_ready(f(*args))
    times.append(time.perf_counter() - t0)
  return statistics.median(times)


def _mesh_shape(text: str) -> dict[str, int]:
  try:
    return {k: int(v) for k, v in (kv.split("=") for kv in text.split(",") if kv)}
  except ValueError:
    raise SystemExit(f"--mesh must look like expert=4,data=2, got {text!r}") from None


def _sharded(mesh, args):
  """Places (x, gate_up, down, ids, w): tokens over every mesh axis, experts over ``expert``."""
  tok = NamedSharding(mesh, PartitionSpec(mesh.axis_names))
  ex = NamedSharding(mesh, PartitionSpec("expert"))
  return tuple(jax.device_put(v, sh) for v, sh in zip(args, (tok, ex, ex, tok, tok)))


def main_mesh(a):
  """Dense, ragged and routed under a mesh of simulated (or real) devices: step times."""
  mesh = mesh_lib.make_mesh(_mesh_shape(a.mesh), jax.devices())
  with jax.set_mesh(mesh):
    args = _sharded(mesh, _inputs(a))
    names = ("dense", "ragged", "routed")
    fns = {k: _make(moe.IMPLEMENTATIONS[k], a.backward) for k in names}
    outs = {k: f(*args) for k, f in fns.items()}
    as32 = lambda x: jnp.asarray(x, jnp.float32)
    err = {k: max(float(jnp.max(jnp.abs(as32(p) - as32(q))))
                  for p, q in zip(jax.tree.leaves(outs["dense"]), jax.tree.leaves(outs[k])))
           for k in names[1:]}
    t = {k: _time(f, args, a.warmup, a.iters) for k, f in fns.items()}
  what = "forward+backward" if a.backward else "forward"
  print(f"jax {jax.__version__} on {jax.default_backend()} ({jax.device_count()} devices, mesh "
        f"{dict(mesh.shape)}); {what}, {a.dtype}, T={a.tokens} D={a.hidden} I={a.inter} "
        f"E={a.experts} k={a.topk}")
  for k in names:
    extra = "" if k == "dense" else (f"  time / dense {t[k] / t['dense']:.2f}x, "
                                     f"max |dense - {k}| {err[k]:.1e}")
    print(f"  {k:6s}: {t[k] * 1e3:9.3f} ms{extra}")
  res = dict(vars(a), backend=jax.default_backend(), devices=jax.device_count(),
             mesh=dict(mesh.shape), jax=jax.__version__, host=platform.node(),
             times_s=t, ratio_vs_dense={k: t[k] / t["dense"] for k in names}, max_abs_diff=err)
  if a.json:
    with open(a.json, "w") as fh:
      json.dump(res, fh, indent=1)
  return res


def main_tpu(a):
  """AOT compile (libtpu, no TPU needed) of one MoE layer's forward+backward, dense vs routed:
  per-chip memory (``memory_analysis``) and FLOPs (``cost_analysis``)."""
  from jax.experimental import topologies
  os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
  topo = topologies.get_topology_desc(platform="tpu", topology_name=a.tpu_topology)
  chips = len(topo.devices)
  shape = _mesh_shape(a.mesh) if a.mesh else {"expert": chips}
  mesh = mesh_lib.make_mesh(shape, topo.devices)
  t = (a.tokens_per_device or 4096) * chips
  dt = jnp.dtype(a.dtype)
  tok = NamedSharding(mesh, PartitionSpec(mesh.axis_names))
  ex = NamedSharding(mesh, PartitionSpec("expert"))
  sds = lambda shp, d, sh: jax.ShapeDtypeStruct(shp, d, sharding=sh)
  e, d, i, k = a.experts, a.hidden, a.inter, a.topk
  args = (sds((t, d), dt, tok), sds((e, d, 2 * i), dt, ex), sds((e, i, d), dt, ex),
          sds((t, k), jnp.int32, tok), sds((t, k), dt, tok))
  print(f"AOT {a.tpu_topology} ({chips} chips, {topo.devices[0].device_kind}), mesh "
        f"{dict(mesh.shape)}; one MoE layer forward+backward, {a.dtype}, T={t} "
        f"({t // chips}/chip) D={d} I={i} E={e} k={k}")
  res = {}
  for name in ("dense", "routed"):
    f = _make(moe.IMPLEMENTATIONS[name], True)
    t0 = time.perf_counter()
    with jax.set_mesh(mesh):
      compiled = f.lower(*args).compile()
    secs = time.perf_counter() - t0
    mem = compiled.memory_analysis()
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    total = (mem.argument_size_in_bytes + mem.output_size_in_bytes + mem.temp_size_in_bytes
             - mem.alias_size_in_bytes)
    res[name] = dict(argument_bytes=mem.argument_size_in_bytes,
                     output_bytes=mem.output_size_in_bytes, temp_bytes=mem.temp_size_in_bytes,
                     total_bytes=total, flops=float(cost.get("flops", float("nan"))),
                     compile_s=secs)
    g = 2.0 ** 30
    print(f"  {name:6s}: per chip args {mem.argument_size_in_bytes / g:6.2f} GiB, temps "
          f"{mem.temp_size_in_bytes / g:6.2f} GiB, total {total / g:6.2f} GiB; "
          f"{res[name]['flops'] / 1e12:9.2f} TFLOP/chip; compiled in {secs:.0f} s")
  for key in ("temp_bytes", "total_bytes", "flops"):
    print(f"  routed / dense {key}: {res['routed'][key] / res['dense'][key]:.3f}")
  # matmul FLOPs per chip of forward+backward (3x the forward's 6*rows*D*I): dense runs E experts
  # per token, routed k. The compiler's count for routed is higher: the megablox kernel reports
  # 2*M*K*N for its whole static receive buffer (M = worst case n*T_loc*min(k, E/n) rows), while
  # its grid only visits the tiles of the rows actually received (about T_loc*k)
  n_ep = mesh.shape.get("expert", 1)
  bound = n_ep * (t // chips) * min(k, e // n_ep) / ((t // chips) * k)
  ideal = {"dense": 18 * t * e * d * i / chips, "routed": 18 * t * k * d * i / chips}
  print(f"  expert matmul FLOPs/chip, analytic: dense {ideal['dense'] / 1e12:.2f} T, routed "
        f"{ideal['routed'] / 1e12:.2f} T (ratio {ideal['routed'] / ideal['dense']:.4f}); routed "
        f"receive buffer = {bound:.0f}x the average rows (capacity-free worst case)")
  res["analytic_expert_flops_per_chip"] = ideal
  out = dict(vars(a), chips=chips, mesh=dict(mesh.shape), tokens=t, jax=jax.__version__,
             results=res)
  if a.json:
    with open(a.json, "w") as fh:
      json.dump(out, fh, indent=1)
  return out


def main(argv=None):
  a = _parse(argv)
  if a.tpu_topology:
    return main_tpu(a)
  if a.mesh:
    return main_mesh(a)
  args = _inputs(a)
  fns = {"dense": _make(moe.dense_expert_mlp, a.backward),
         "ragged": _make(moe.ragged_expert_mlp, a.backward),
         "gather": _make(moe.gather_expert_mlp, a.backward)}
  outs = {k: f(*args) for k, f in fns.items()}
  as32 = lambda x: jnp.asarray(x, jnp.float32)
  err = {k: max(float(jnp.max(jnp.abs(as32(p) - as32(q))))
                for p, q in zip(jax.tree.leaves(outs["dense"]), jax.tree.leaves(outs[k])))
         for k in ("ragged", "gather")}
  ref = max(float(jnp.max(jnp.abs(as32(p)))) for p in jax.tree.leaves(outs["dense"]))
  t = {k: _time(f, args, a.warmup, a.iters) for k, f in fns.items()}
  routed = 6 * a.tokens * a.topk * a.hidden * a.inter
  flops = {"dense": 6 * a.tokens * a.experts * a.hidden * a.inter, "ragged": routed,
           "gather": routed}
  res = dict(vars(a), backend=jax.default_backend(), device=str(jax.devices()[0].device_kind),
             jax=jax.__version__, host=platform.node(), max_abs_diff=err, max_abs_ref=ref,
             dense_s=t["dense"], ragged_s=t["ragged"], gather_s=t["gather"],
             speedup_ragged=t["dense"] / t["ragged"], speedup_gather=t["dense"] / t["gather"],
             fwd_flops_dense=flops["dense"], fwd_flops_ragged=flops["ragged"])
  what = "forward+backward" if a.backward else "forward"
  print(f"jax {jax.__version__} on {res['backend']} ({res['device']}); {what}, {a.dtype}, "
        f"T={a.tokens} D={a.hidden} I={a.inter} E={a.experts} k={a.topk}")
  for k in ("dense", "ragged", "gather"):
    print(f"  {k:6s}: {t[k] * 1e3:9.3f} ms  {a.tokens / t[k]:12.0f} tokens/s  "
          f"(forward matmul FLOPs {flops[k] / 1e9:.2f} G)")
  for k in ("ragged", "gather"):
    print(f"  dense/{k} time ratio: {t['dense'] / t[k]:.2f} (> 1: {k} faster); "
          f"max |dense - {k}| = {err[k]:.2e} (max |dense| {ref:.2e})")
  if a.json:
    with open(a.json, "w") as fh:
      json.dump(res, fh, indent=1)
  return res


if __name__ == "__main__":
  main()
