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
