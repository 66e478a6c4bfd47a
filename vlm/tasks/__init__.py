"""Recipes as tasks: the trainer (:mod:`vlm.train.loop`) knows no model family.

A task is a plain module of functions (no base classes) listed in :data:`TASKS` and named by the
config (``config.task = "blip2_stage1"``; a module outside vlm is named by its dotted path,
``config.task = "tests.train.fake_task"``). The loop imports it with :func:`get_task` and calls
only what is listed here; everything family-specific (models, data, losses, weights,
evaluation, what to log) lives in the task. A new recipe is one task module plus its configs; a
new stage of an existing family is a config. ``vlm/tasks/blip2_stage1.py`` is the reference
implementation; ``tests/train/test_fake_task.py`` drives the loop with a ten-line linear task.

Interface (all functions take the run's ``ml_collections.ConfigDict`` first; ``B`` is the
per-process batch ``config.global_batch_size // jax.process_count()``):

``build_model(config) -> flax.linen.Module``
    The model (preset, dtypes, scan/remat switches from ``config.model``).

``example_batch(config, batch_size) -> dict``
    Host numpy arrays of the real batch schema with ``batch_size`` rows (values may be zeros):
    same keys, nesting, dtypes and non-batch dimensions as a batch of :func:`train_data`. The
    loop calls it with ``batch_size=1`` for parameter initialisation and shape checks.

``init_model(model, rng, batch) -> params``
    ``model.init(rng, ...)["params"]`` from an example batch (the model's boxed parameters, with
    their logical partitioning). Traced only (``jax.eval_shape`` / ``jax.jit`` with
    ``out_shardings``), so parameters are created directly in their shardings.

``batch_axes(config) -> dict``
    Logical axis names per batch key, nested like the batch, one name (or None) per dimension,
    using :mod:`vlm.nn.partitioning` names. Exactly one ``"batch"`` per array (the dimension split
    over the data-parallel mesh axes, and the one microbatching splits). E.g. Qwen:
    ``{"input_ids": ("batch", "length"), "position_ids": (None, "batch", "length"),
    "pixel_values": ("batch", None, None), "vision": {"segment_ids": ("batch", None), ...}}``.

``train_data(config, *, seed, process_index, process_count) -> (iterator, stats)``
    ``iterator``: yields this process's share of each global batch (host numpy dicts; the
    ``"batch"`` dimension of every array has ``global_batch_size // process_count`` rows) and is
    checkpointable by ``grain.checkpoint`` (a ``grain`` DataLoader / DatasetIterator: it has
    ``get_state()`` / ``set_state()``). ``stats``: a JSON-able dict (bad-sample counts ...) that
    is logged and saved in the checkpoint metadata.

``init_params(config, model, params, shardings) -> params``
    Pretrained weights (an HF directory, BERT, ...) applied to freshly initialised ``params``
    (sharded ``jax.Array`` tree; ``shardings`` the matching ``NamedSharding`` tree). Must not
    fetch global arrays to a host (``jax.device_get`` fails for arrays spanning processes):
    build host numpy per leaf from the files and place it with
    :func:`vlm.tasks.place_like` (``jax.make_array_from_callback``, each process materialises
    only its addressable shards). Return ``params`` unchanged when nothing is configured. The
    loop calls it only for a fresh run (never when resuming), then applies
    ``config.init.workdir`` (an earlier stage's workdir; generic, see
    :func:`vlm.train.checkpoint.init_params_from_workdir`).

``loss_fn(model, params, batch, rng, **config.loss) -> (loss, metrics)``
    Pure, jitted inside the train step on the global batch (or one microbatch of it). ``loss``
    a float32 scalar; ``metrics`` a flat dict of scalars that includes ``"loss"``. Optionally
    ``metrics["loss_weight"]``: the weight of this (micro)batch in a weighted mean (e.g. its
    number of loss tokens, with ``loss`` the mean over them); with ``config.microbatches > 1``
    the accumulated gradient is then exactly the big-batch gradient of the token-weighted mean.

``evaluators(config) -> {name: fn}``
    ``fn(model, params, step, *, writer=None) -> dict`` of results (JSON-able), run after
    training when ``config.eval.at_end``; the loop saves ``{name: result}`` to
    ``<workdir>/eval_results.json``. An evaluator prints/logs its own table (``writer`` is the
    run's :class:`vlm.train.metrics.MetricWriter`, or None). Return ``{}`` for none.

``LOG_KEYS``: tuple of metric names shown in the progress bar (``lr`` and the throughput are
    added by the loop). Every metric of ``loss_fn`` goes to TensorBoard and ``metrics.jsonl``.

``THROUGHPUT_UNIT``: e.g. ``"images"`` or ``"tokens"``; logged as ``<unit>_per_s``.

``count_units(batch) -> int``: the throughput units in one host batch of this process (e.g.
    its rows, or ``loss_mask.sum()``); the loop multiplies by ``jax.process_count()``.

``validate(config) -> None`` (optional): checks run before anything compiles (e.g. held-out
    evaluation data), raising a clear error.

Config fields the loop itself reads: ``task``, ``seed``, ``prng_impl`` (optional),
``total_steps``, ``global_batch_size``, ``microbatches`` (optional, default 1), ``optim`` (see
:mod:`vlm.train.optim`, incl. ``frozen`` and ``lr_multipliers``), ``mesh.shape``/``mesh.rules``,
``checkpoint.{every_steps,max_to_keep,async_save}``, ``log_every_steps``, ``loss`` (passed to
``loss_fn``), ``init.workdir`` (optional), ``eval.at_end``.
"""
from __future__ import annotations

import importlib
import importlib.util
from types import ModuleType
from typing import Any

import jax
import numpy as np

# name -> module path; imported on first use so that a task's heavy imports stay lazy.
TASKS: dict[str, str] = {
    "blip2_stage1": "vlm.tasks.blip2_stage1",
    "blip2_stage2": "vlm.tasks.blip2_stage2",  # OPT / FlanT5 behind the Q-Former
    "qwen_vl": "vlm.tasks.qwen_vl",  # Qwen3-VL / Qwen2.5-VL stages A, B, C and SFT
}

REQUIRED = ("build_model", "example_batch", "init_model", "batch_axes", "train_data",
            "init_params", "loss_fn", "evaluators", "LOG_KEYS", "THROUGHPUT_UNIT", "count_units")


def get_task(name: str) -> ModuleType:
  """The task module registered as ``name``, or the module at the dotted path ``name`` (a task
  kept outside vlm, e.g. ``"tests.train.fake_task"``: importable from the working directory).

  Raises:
    ValueError: an unknown name (the message lists the registered tasks), or a module lacking
      part of the interface (the message lists what is missing).
  """
  path = TASKS.get(name)
  if path is None and "." in name:
    try:
      path = name if importlib.util.find_spec(name) is not None else None
    except ImportError:  # a parent package that does not exist
      path = None
  if path is None:
    raise ValueError(f"unknown task {name!r}; registered tasks: {', '.join(sorted(TASKS))} "
                     "(set config.task to one of them or to a task module's dotted path, or "
                     "register a new one in vlm/tasks/__init__.py)")
  module = importlib.import_module(path)
  missing = [a for a in REQUIRED if not hasattr(module, a)]
  if missing:
    raise ValueError(f"task module {path} lacks {missing} of the task interface "
                     "(see vlm/tasks/__init__.py)")
  return module


def place_like(host: Any, sharding: jax.sharding.Sharding, dtype=None) -> jax.Array:
  """A host array placed in ``sharding`` without gathering: ``jax.make_array_from_callback``
  asks for each addressable shard's slice, so every process only puts its own shards on its
  devices (the host array itself is read from a file on every process).

  Args:
    host: numpy array of the global shape.
    sharding: the target sharding; ``dtype`` an optional cast.
  """
  host = np.asarray(host)
  if dtype is not None:
    host = host.astype(dtype)
  return jax.make_array_from_callback(host.shape, sharding, lambda index: host[index])
