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

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from vlm.nn import moe  # noqa: E402


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
  a = p.parse_args(argv)
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


def main(argv=None):
  a = _parse(argv)
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
