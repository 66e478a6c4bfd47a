"""Timing helpers shared by the benchmark scripts (``benchmark.py``, ``benchmark_generate.py``).

Not a test module and not part of ``vlm``: scripts import it as a sibling file.
"""
from __future__ import annotations

import platform
import statistics
import time


def cpu_model() -> str:
  """The CPU's model name (``/proc/cpuinfo``), else what ``platform`` knows."""
  try:
    with open("/proc/cpuinfo") as fh:
      for line in fh:
        if line.startswith("model name"):
          return line.split(":", 1)[1].strip()
  except OSError:
    pass
  return platform.processor() or platform.machine()


def timeit_interleaved(fns: dict, iters: int, warmup: int, settle_s: float) -> dict:
  """``name -> (fn, setup)``: median / all wall times (s) of ``fn(setup())`` (``fn(None)`` when
  ``setup`` is None; setup runs untimed), alternating the contenders every iteration so that a
  change of machine load (shared CPUs) hits every one alike.

  Before each timed call the process sleeps ``settle_s`` seconds: idle worker threads of the
  other library (XLA's Eigen pool, torch's OpenMP pool) keep spinning for a while after a call
  and would steal the cores of the next one.
  Returns ``{name: {"median_s": float, "times_s": [float]}}``.
  """
  for _ in range(warmup):
    for fn, setup in fns.values():
      fn(setup() if setup else None)
  times = {name: [] for name in fns}
  for _ in range(iters):
    for name, (fn, setup) in fns.items():
      state = setup() if setup else None
      time.sleep(settle_s)
      t0 = time.perf_counter()
      fn(state)
      times[name].append(time.perf_counter() - t0)
  return {name: {"median_s": statistics.median(t), "times_s": t} for name, t in times.items()}


def timeit(fn, iters: int, warmup: int, settle_s: float, setup=None) -> dict:
  """:func:`timeit_interleaved` for one contender: ``{"median_s", "times_s"}``."""
  return timeit_interleaved({"fn": (fn, setup)}, iters, warmup, settle_s)["fn"]


def jax_matmul_peak(n: int = 2048, dtype: str = "float32", iters: int = 3,
                    settle_s: float = 0.3) -> dict:
  """The matmul peak of this process's default JAX device: a jitted ``jnp.dot`` of two
  ``[n, n]`` matrices (``2 n^3`` FLOPs), median of ``iters`` timed calls after one warm-up.

  Returns ``{"flops_per_s": float, "median_s": float, "n": n, "dtype": dtype}``.
  """
  import jax
  import jax.numpy as jnp
  dt = jnp.dtype(dtype)
  a = jax.random.normal(jax.random.PRNGKey(1), (n, n), dt)
  b = jax.random.normal(jax.random.PRNGKey(2), (n, n), dt)
  mm = jax.jit(jnp.dot).lower(a, b).compile()
  t = timeit(lambda _: jax.block_until_ready(mm(a, b)), iters, 1, settle_s)
  return {"flops_per_s": 2 * n ** 3 / t["median_s"], "median_s": t["median_s"], "n": n,
          "dtype": str(dt)}


def torch_matmul_peak(n: int = 2048, iters: int = 3, settle_s: float = 0.3) -> dict:
  """Like :func:`jax_matmul_peak` for ``torch.mm`` of two float32 ``[n, n]`` CPU matrices with
  torch's current thread setting. Returns the same keys."""
  import torch
  g = torch.Generator().manual_seed(1)
  a = torch.randn(n, n, generator=g)
  b = torch.randn(n, n, generator=g)
  t = timeit(lambda _: torch.mm(a, b), iters, 1, settle_s)
  return {"flops_per_s": 2 * n ** 3 / t["median_s"], "median_s": t["median_s"], "n": n,
          "dtype": "float32"}


def xla_flops(compiled) -> float | None:
  """'flops' of ``compiled.cost_analysis()`` (a dict, or a list of dicts in some jax versions);
  None where the backend does not report it."""
  try:
    cost = compiled.cost_analysis()
  except Exception:  # noqa: BLE001 - some backends do not implement it
    return None
  if isinstance(cost, (list, tuple)):
    cost = cost[0] if cost else None
  if not cost or "flops" not in cost:
    return None
  return float(cost["flops"])


def environment(torch_module=None) -> dict:
  """Versions, devices and thread settings of this process (jax always, torch when given), for
  the header of a benchmark's output."""
  import os
  import flax
  import jax
  import numpy as np
  cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
  env = {"python": platform.python_version(), "jax": jax.__version__, "flax": flax.__version__,
         "numpy": np.__version__, "jax_backend": jax.default_backend(),
         "jax_devices": [str(d) for d in jax.devices()], "cpu": cpu_model(),
         "os_cpu_count": os.cpu_count(), "cores_visible (XLA pool)": cores,
         "XLA_FLAGS": os.environ.get("XLA_FLAGS", ""),
         "jax_matmul_precision": str(jax.config.jax_default_matmul_precision),
         "load_average": os.getloadavg() if hasattr(os, "getloadavg") else None}
  if torch_module is not None:
    import transformers
    env.update({"torch": torch_module.__version__, "transformers": transformers.__version__,
                "torch_num_threads": torch_module.get_num_threads(),
                "torch_num_interop_threads": torch_module.get_num_interop_threads()})
  return env


def matmul_peak_contenders(n: int = 2048, with_torch: bool = True) -> dict:
  """``{"peak/jnp.dot": (fn, None), "peak/torch.mm": (fn, None)}`` for
  :func:`timeit_interleaved`: the calls behind :func:`jax_matmul_peak` / :func:`torch_matmul_peak`
  (float32 ``[n, n] @ [n, n]``, ``2 n^3`` FLOPs, compiled here), to be timed among a benchmark's
  own contenders so that the peak is measured under the same (shared-machine) load as the work
  it is compared with. :func:`peak_flops_per_s` turns their timings into FLOP/s.
  """
  import jax
  import jax.numpy as jnp
  a = jax.random.normal(jax.random.PRNGKey(1), (n, n), jnp.float32)
  b = jax.random.normal(jax.random.PRNGKey(2), (n, n), jnp.float32)
  mm = jax.jit(jnp.dot).lower(a, b).compile()
  out = {"peak/jnp.dot": (lambda _: jax.block_until_ready(mm(a, b)), None)}
  if with_torch:
    import torch
    g = torch.Generator().manual_seed(1)
    ta, tb = torch.randn(n, n, generator=g), torch.randn(n, n, generator=g)
    out["peak/torch.mm"] = (lambda _: torch.mm(ta, tb), None)
  return out


def peak_flops_per_s(timings: dict, n: int = 2048) -> dict:
  """``{"jax": FLOP/s, "torch": FLOP/s}`` from the ``peak/*`` entries of
  :func:`timeit_interleaved`'s result (medians; absent entries are left out)."""
  names = {"jax": "peak/jnp.dot", "torch": "peak/torch.mm"}
  return {k: 2 * n ** 3 / timings[v]["median_s"] for k, v in names.items() if v in timings}
