"""Compiled memory of attention forward + backward: dense ``xla`` vs blockwise ``chunked``.

Usage::

  python scripts/benchmark_attention_memory.py                 # L = 4k, 8k, 16k, 32k; B=1,
                                                               # 4 heads, head_dim 64 and 128
  python scripts/benchmark_attention_memory.py --lengths 4096,8192 --head_dims 128 \\
      --heads 16 --kv_heads 8 --dtype bfloat16
  python scripts/benchmark_attention_memory.py --run           # also execute the chunked step
                                                               # once per length (timed)
  python scripts/benchmark_attention_memory.py --json /tmp/attn_mem.json

What it does: for every length L and head dim D it builds the training computation of one
attention call, ``value_and_grad(sum(attention(q, k, v, segment_ids, causal=True) * c))`` with
respect to q, k and v (q [1, L, H, D], k/v [1, L, Hkv, D], int32 segment ids [1, L] as an input,
so the compiler cannot exploit them), jits it for the default backend with
``jax.jit(...).lower(...).compile()``, and prints the compiled ``memory_analysis()``: temporary
bytes (buffers the program allocates besides its arguments and outputs: for ``xla`` the float32
[B, H, L, L] scores, probabilities and their cotangents; for ``chunked`` only O(L x block)
blocks and O(L x D) accumulators) and ``total`` = arguments + outputs + temporaries, an upper
bound of the bytes live at the peak (XLA:CPU's own ``peak_memory_in_bytes`` counts only the
arguments and outputs; it goes into ``--json`` as reported). Nothing of the
dense version is executed, so 32k ``xla`` is only compiled (its buffers would need tens of GiB);
``--xla_max_length`` skips it above a length with a printed note.

Columns: ``temp`` temporary bytes; ``total`` as above; ``x prev`` growth against the previous
(half) length: about 2 is linear, 4 quadratic; ``xla/chunked`` the saving.

This is a benchmark, not a test: pytest never runs it (tests/nn/test_attention.py checks the
linear growth at 4k -> 8k).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from vlm.nn.attention import attention  # noqa: E402


def _train_step(implementation: str, block_size: int):
  def loss(q, k, v, segment_ids, cotangent):
    out = attention(q, k, v, segment_ids=segment_ids, causal=True,
                    implementation=implementation, block_size=block_size)
    return jnp.sum(out.astype(jnp.float32) * cotangent)
  return jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2)))


def _specs(length, heads, kv_heads, head_dim, dtype):
  s = jax.ShapeDtypeStruct
  return (s((1, length, heads, head_dim), dtype), s((1, length, kv_heads, head_dim), dtype),
          s((1, length, kv_heads, head_dim), dtype), s((1, length), jnp.int32),
          s((1, length, heads, head_dim), jnp.float32))


def measure(implementation, length, heads, kv_heads, head_dim, dtype, block_size):
  """Compile the step; returns dict(temp, peak, argument, output bytes, compile_s, compiled)."""
  t0 = time.perf_counter()
  compiled = _train_step(implementation, block_size).lower(
      *_specs(length, heads, kv_heads, head_dim, dtype)).compile()
  seconds = time.perf_counter() - t0
  m = compiled.memory_analysis()
  peak = getattr(m, "peak_memory_in_bytes", 0) or None
  return dict(temp=int(m.temp_size_in_bytes), peak=None if peak is None else int(peak),
              argument=int(m.argument_size_in_bytes), output=int(m.output_size_in_bytes),
              compile_s=seconds, compiled=compiled)


def _packed_segments(length, rng):
  """Random packed row: segments of 256..L/2 tokens, then padding (the last ~5%)."""
  seg = np.zeros((1, length), np.int32)
  pos, sid, end = 0, 1, int(length * 0.95)
  while pos < end:
    n = min(int(rng.integers(256, max(257, length // 2))), end - pos)
    seg[0, pos:pos + n] = sid
    pos, sid = pos + n, sid + 1
  return seg


def _mib(x):
  return "-" if x is None else f"{x / 2**20:,.1f} MiB"


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--lengths", default="4096,8192,16384,32768")
  p.add_argument("--head_dims", default="64,128")
  p.add_argument("--heads", type=int, default=4)
  p.add_argument("--kv_heads", type=int, default=4)
  p.add_argument("--dtype", default="float32", choices=("float32", "bfloat16", "float16"))
  p.add_argument("--block_size", type=int, default=512)
  p.add_argument("--implementations", default="xla,chunked")
  p.add_argument("--xla_max_length", type=int, default=32768,
                 help="compile the dense xla step only up to this length")
  p.add_argument("--run", action="store_true",
                 help="also execute the chunked step once per length (after one warm-up call)")
  p.add_argument("--json", default=None, help="write the rows here")
  args = p.parse_args(argv)
  lengths = [int(x) for x in args.lengths.split(",")]
  head_dims = [int(x) for x in args.head_dims.split(",")]
  impls = args.implementations.split(",")
  dtype = jnp.dtype(args.dtype)
  print(f"jax {jax.__version__}, backend {jax.default_backend()}, B=1, heads {args.heads} "
        f"(kv {args.kv_heads}), {dtype.name}, causal packed rows, block {args.block_size}; "
        "value_and_grad w.r.t. q, k, v")
  rows = []
  for d in head_dims:
    print(f"\nhead_dim {d}")
    header = (f"{'L':>7} {'impl':>8} {'temp':>14} {'x prev':>7} {'total':>14} {'args+out':>12} "
              f"{'compile':>8} {'xla/chunked':>12}")
    print(header)
    print("-" * len(header))
    prev = {}
    for length in lengths:
      temps = {}
      for impl in impls:
        if impl == "xla" and length > args.xla_max_length:
          print(f"{length:>7} {impl:>8}   skipped (--xla_max_length={args.xla_max_length})")
          continue
        r = measure(impl, length, args.heads, args.kv_heads, d, dtype, args.block_size)
        temps[impl] = r["temp"]
        growth = f"{r['temp'] / prev[impl]:.2f}" if prev.get(impl) else "-"
        prev[impl] = r["temp"]
        saving = (f"{temps['xla'] / temps['chunked']:.1f}x"
                  if impl == "chunked" and "xla" in temps and temps["chunked"] else "")
        total = r["argument"] + r["output"] + r["temp"]
        line = (f"{length:>7} {impl:>8} {_mib(r['temp']):>14} {growth:>7} {_mib(total):>14} "
                f"{_mib(r['argument'] + r['output']):>12} {r['compile_s']:>7.1f}s {saving:>12}")
        row = dict(head_dim=d, length=length, implementation=impl, temp_bytes=r["temp"],
                   total_bytes=total, reported_peak_bytes=r["peak"], argument_bytes=r["argument"],
                   output_bytes=r["output"], compile_s=round(r["compile_s"], 2))
        if args.run and impl == "chunked":
          rng = np.random.default_rng(0)
          inputs = [jnp.asarray(rng.standard_normal(s.shape), s.dtype)
                    for s in _specs(length, args.heads, args.kv_heads, d, dtype)]
          inputs[3] = jnp.asarray(_packed_segments(length, rng))
          jax.block_until_ready(r["compiled"](*inputs))
          t0 = time.perf_counter()
          value, grads = jax.block_until_ready(r["compiled"](*inputs))
          row["run_s"] = round(time.perf_counter() - t0, 3)
          row["finite"] = bool(np.isfinite(float(value)) and all(
              bool(jnp.isfinite(g).all()) for g in grads))
          line += f"  run {row['run_s']:.2f}s finite={row['finite']}"
        print(line, flush=True)
        rows.append(row)
  if args.json:
    with open(args.json, "w") as fh:
      json.dump(rows, fh, indent=1)
    print(f"\nwrote {args.json}")


if __name__ == "__main__":
  main()
