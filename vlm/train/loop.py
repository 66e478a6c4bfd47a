"""``run(config, workdir)``: the training loop (impure: files, clocks, logging, checkpoints).

The loop knows no model family: ``config.task`` names a task module (:mod:`vlm.tasks`) that
supplies the model, batches and their logical axes, data, initial weights, loss, evaluators and
what to log. The loop does the rest: mesh, sharded state, the jitted step (with gradient
accumulation over ``config.microbatches``), checkpoints, metrics, preemption.

Order of restoration: the workdir's own latest checkpoint > the task's ``init_params``
(pretrained weights the task knows how to read) followed by ``config.init.workdir`` (an earlier stage's workdir: the
parameters whose path and shape match) > scratch.

Several processes (``jax.distributed`` started by ``scripts/train.py``): the same code runs in
every process; each reads its share of the data (``train_data(process_index, process_count)``),
assembles the global batch from the per-process pieces, places its own shards of the initial
weights, and writes its own checkpoint shards; process 0 alone writes metrics, TensorBoard and
``eval_results.json``.
"""
from __future__ import annotations

import contextlib
import json
import logging
import os
import threading
import time
from typing import Any

import flax.linen as nn
import jax
import ml_collections
import numpy as np

from vlm import tasks as tasks_lib
from vlm.parallel import mesh as mesh_lib
from vlm.train import checkpoint as ckpt
from vlm.train import metrics as metrics_lib
from vlm.train import optim
from vlm.train import step as step_lib

log = logging.getLogger("vlm.train")


class NonFiniteLossError(FloatingPointError):
  """The loss became NaN or infinite; the message names the step."""


def get_task(config: ml_collections.ConfigDict):
  """The task module named by ``config.task`` (see :func:`vlm.tasks.get_task`)."""
  name = config.get("task", None)
  if not name:
    raise ValueError("config.task is not set; name a task of vlm/tasks (registered: "
                     f"{', '.join(sorted(tasks_lib.TASKS))})")
  return tasks_lib.get_task(name)


def build_model(config: ml_collections.ConfigDict):
  """The model of ``config``'s task (``task.build_model(config)``)."""
  return get_task(config).build_model(config)


def validate_config(config) -> None:
  """Checks that need no devices or compilation; raises ValueError with the fix."""
  if config.total_steps <= 0:
    raise ValueError(f"total_steps must be positive, got {config.total_steps}")
  if config.global_batch_size <= 0:
    raise ValueError(f"global_batch_size must be positive, got {config.global_batch_size}")
  if config.global_batch_size % jax.process_count():
    raise ValueError(f"global_batch_size {config.global_batch_size} is not divisible by the "
                     f"{jax.process_count()} processes")
  if config.optim.total_steps != config.total_steps:
    raise ValueError("config.optim.total_steps must equal config.total_steps (the schedule "
                     "length); set both")
  optim.learning_rate_schedule(config.optim)  # warmup shorter than training, before compiling
  micro = config.get("microbatches", 1)
  if not isinstance(micro, int) or micro < 1:
    raise ValueError(f"microbatches must be a positive int, got {micro!r}")
  if config.global_batch_size % micro:
    raise ValueError(f"global_batch_size {config.global_batch_size} is not divisible by "
                     f"microbatches={micro}")


def _check_microbatches(config, mesh, rules) -> None:
  micro = config.get("microbatches", 1)
  n = mesh_lib.data_parallel_size(mesh, rules)
  per = config.global_batch_size // micro
  if micro > 1 and per % n:
    raise ValueError(f"a microbatch of {per} rows (global_batch_size {config.global_batch_size} / "
                     f"microbatches {micro}) does not split over the {n} data-parallel shards "
                     f"of mesh {dict(mesh.shape)}; pick microbatches so that "
                     f"global_batch_size / microbatches is a multiple of {n}")


def _params_init(config, task, model):
  """``fn(params, shardings)``: the task's pretrained weights, then ``config.init.workdir``."""
  workdir = config.init.get("workdir", "") if "init" in config else ""

  def transform(params, shardings):
    params = task.init_params(config, model, params, shardings)
    if workdir:
      params = ckpt.init_params_from_workdir(params, shardings, workdir)
    return params

  return transform


Preempted = ckpt.Preempted  # raised by start-up work when a preemption notice arrives


def _compile_responsively(step_fn, args, preempt: "ckpt.PreemptionFlag", poll_s: float = 0.2):
  """Lowers ``step_fn`` on ``args`` here, compiles it on a worker thread and waits for it while
  watching ``preempt``, so a SIGTERM during a long compile is acted on at once.

  Returns the compiled executable. Raises :class:`Preempted` if the flag is set first (the
  daemon compile thread is abandoned); re-raises the compile error otherwise.
  """
  lowered = step_fn.lower(*args)
  box: dict[str, Any] = {}

  def work():
    try:
      box["compiled"] = lowered.compile()
    except BaseException as e:  # surfaced in the main thread
      box["error"] = e

  worker = threading.Thread(target=work, name="vlm-compile", daemon=True)
  worker.start()
  while worker.is_alive():
    if preempt.wait(poll_s):
      raise Preempted()
    worker.join(0)
  if "error" in box:
    raise box["error"]
  return box["compiled"]


def run(config: ml_collections.ConfigDict, workdir: str, *, stop_after: int | None = None
        ) -> dict[str, Any]:
  """Trains per ``config`` in ``workdir``; resumes from the workdir's newest intact checkpoint.

  Before anything compiles: the config, mesh, batch size and the task's batch axes are checked,
  the training data are validated (bad records are counted skips), the task's ``validate`` hook
  runs (e.g. checking held-out evaluation data: a bad record is an error now, not after training),
  and a checkpoint is restored (damaged ones are
  moved to ``workdir/checkpoints_damaged``; a config whose state does not fit the checkpoint is
  refused; other config changes are listed in a warning). SIGTERM is watched from the start:
  during startup or the first compile it ends the run at once (nothing new to save); during
  training it saves the current step and exits.

  Args:
    config: names its task (``config.task``, see :mod:`vlm.tasks` for the fields the loop
      reads); the files under ``configs/`` build them.
    workdir: checkpoints, TensorBoard events, ``metrics.jsonl`` and ``eval_results.json``.
    stop_after: behave as if preempted once this many steps have run in total (tests of
      preemption and exact resume).
  Returns a dict with the final ``step``, the last logged ``train_metrics``, ``stopped_by``,
  ``eval`` results (when run) and the final ``state`` (None if stopped before the first step).
  Raises:
    ValueError: invalid config, unknown task, mesh, batch size or batch axes (before anything
      compiles).
    vlm.data.image.BadSampleError: a bad record found by the task's checks, before compiling.
    ckpt.CheckpointMismatchError: the workdir's checkpoint does not fit this config.
    ckpt.CheckpointSaveError: a checkpoint could not be written (disk full...); the last good
      checkpoint is kept and named.
    NonFiniteLossError: NaN/inf loss (the message names the step).
  """
  preempt = ckpt.PreemptionFlag()
  try:
    return _run(config, workdir, stop_after, preempt)
  finally:
    preempt.restore_handlers()


def _stopped_early(preempt, step) -> dict[str, Any]:
  name = preempt.signal_name or "preemption"
  log.warning("%s received before the first step: nothing new to save (the workdir's checkpoint "
              "is at step %s), exiting", name, "none" if step is None else step)
  return {"step": step or 0, "train_metrics": {}, "stopped_by": name, "state": None}


def _run(config, workdir, stop_after, preempt) -> dict[str, Any]:
  validate_config(config)
  task = get_task(config)
  os.makedirs(workdir, exist_ok=True)
  mesh = mesh_lib.make_mesh(dict(config.mesh.shape))
  rules = mesh_lib.rules_from_config(config.mesh.get("rules"))
  mesh_lib.check_batch_size(config.global_batch_size, mesh, rules)
  _check_microbatches(config, mesh, rules)
  model = task.build_model(config)
  axes = task.batch_axes(config)
  example = task.example_batch(config, 1)
  mesh_lib.batch_shardings(mesh, rules, example, axes)  # keys and ranks agree, before any data

  data_iter, data_stats = task.train_data(config, seed=config.seed,
                                          process_index=jax.process_index(),
                                          process_count=jax.process_count())
  log.info("training data: %s", data_stats)
  if hasattr(task, "validate"):
    task.validate(config)
  if preempt.is_set():
    return _stopped_early(preempt, None)

  tx = optim.make_optimizer(config.optim)
  rng = jax.random.key(config.seed, impl=config.get("prng_impl", "threefry2x32"))
  init_rng, step_rng = jax.random.split(rng)

  def init_fn(key):
    return task.init_model(model, key, example)

  manager = ckpt.make_manager(workdir, save_interval_steps=config.checkpoint.every_steps,
                              max_to_keep=config.checkpoint.max_to_keep,
                              async_save=config.checkpoint.async_save)
  has_checkpoint = bool(manager.all_steps())
  frozen = list(config.optim.frozen)

  def fresh_state(with_init):
    with nn.logical_axis_rules(rules):
      return step_lib.create_train_state_from_init(
          init_fn, init_rng, tx, frozen, mesh, rules,
          params_transform=_params_init(config, task, model) if with_init else None)

  try:
    state, state_shardings, mask = fresh_state(not has_checkpoint)
  except Preempted:  # e.g. during the task's init_params (an LLM warm-up)
    manager.close()
    return _stopped_early(preempt, None)
  latest = None
  if has_checkpoint:
    abstract = ckpt.abstract_like(state, state_shardings)
    del state
    latest, state, _ = ckpt.restore_latest(
        manager, abstract, data_iter, workdir=workdir,
        config=json.loads(config.to_json_best_effort()))
    if latest is None:  # every checkpoint was damaged and moved aside: start over.
      state, state_shardings, mask = fresh_state(True)
    else:
      log.info("resumed from step %d in %s", latest, workdir)
  trainable_abstract = optim.partition(state.params, mask)[0]
  if config.optim.get("lr_multipliers", None):
    optim.lr_multipliers(trainable_abstract, list(config.optim.lr_multipliers))  # checks regexes
  n_train = sum(int(np.prod(v.shape)) for v in jax.tree.leaves(trainable_abstract))
  n_total = sum(int(np.prod(v.shape)) for v in jax.tree.leaves(state.params))
  log.info("parameters: %.2fM total, %.2fM trainable", n_total / 1e6, n_train / 1e6)

  loss_kwargs = dict(config.get("loss", {}))
  first = next(data_iter)
  step_fn = step_lib.jit_train_step(model, tx, mask, task.loss_fn, loss_kwargs,
                                    state_shardings, mesh, rules, first, batch_axes=axes,
                                    microbatches=config.get("microbatches", 1))
  start = int(jax.device_get(state.step))
  schedule = optim.learning_rate_schedule(config.optim)
  writer = metrics_lib.MetricWriter(workdir, start_step=start)
  bar = None
  pending = None  # (step, metrics) of the previous step, checked one step late (no stall).
  last_logged: dict[str, float] = {}
  batch_np = first
  stopped_by = None
  unit = task.THROUGHPUT_UNIT
  log_keys = tuple(task.LOG_KEYS)

  meta_base = {"config": config.to_json_best_effort(),
               "data_stats": json.loads(json.dumps(data_stats, default=str))}

  saved = {"step": latest}

  def save(step, force=False):
    if saved["step"] == step:
      return
    if force or manager.should_save(step):
      ckpt.save(manager, step, state, data_iter, dict(meta_base, step=int(step)), force=force)
      saved["step"] = step

  def check(pending):
    step, m = pending
    loss = float(jax.device_get(m["loss"]))
    if not np.isfinite(loss):
      parts = {k: float(jax.device_get(v)) for k, v in m.items()}
      raise NonFiniteLossError(f"non-finite loss {loss} at step {step} (metrics {parts}); the "
                               "last good checkpoint is in " + os.path.join(workdir, "checkpoints"))

  final_step = start
  try:
    with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
      if start < config.total_steps:
        try:
          step_fn = _compile_responsively(
              step_fn, (state, mesh_lib.global_batch_from_host(batch_np, mesh, rules, axes),
                        step_rng), preempt)
        except Preempted:
          writer.close()
          manager.close()
          return _stopped_early(preempt, latest)
      bar = metrics_lib.progress_bar(config.total_steps, start)
      window_t0, window_units = time.perf_counter(), 0
      for step in range(start, config.total_steps):
        batch = mesh_lib.global_batch_from_host(batch_np, mesh, rules, axes)
        state, m = step_fn(state, batch, step_rng)
        if pending is not None:
          check(pending)
        pending = (step, m)
        ckpt.check_background_save(manager)
        window_units += task.count_units(batch_np) * jax.process_count()
        done = step + 1
        if done % config.log_every_steps == 0 or done == config.total_steps:
          check(pending)
          elapsed = time.perf_counter() - window_t0
          last_logged = {k: float(v) for k, v in jax.device_get(m).items()}
          last_logged["lr"] = float(schedule(step))
          last_logged[f"{unit}_per_s"] = window_units / max(elapsed, 1e-9)
          writer.write(done, last_logged)
          bar.set_postfix({k: f"{last_logged[k]:.3f}" for k in log_keys if k in last_logged} |
                          {"lr": f"{last_logged['lr']:.1e}",
                           f"{unit}/s": f"{last_logged[f'{unit}_per_s']:.1f}"})
          window_t0, window_units = time.perf_counter(), 0
        bar.update(1)
        save(done)
        if (preempt.is_set() or manager.reached_preemption(done)
            or (stop_after is not None and done >= stop_after and done < config.total_steps)):
          stopped_by = preempt.signal_name or "preemption"
          check(pending)
          save(done, force=True)
          log.warning("%s received: saved step %d, exiting", stopped_by, done)
          break
        if done < config.total_steps:
          batch_np = next(data_iter)
      if pending is not None:
        check(pending)
      final_step = int(jax.device_get(state.step))
      save(final_step, force=True)
      ckpt.wait_for_saves(manager)
  finally:
    try:
      manager.wait_until_finished()
    except Exception:  # pylint: disable=broad-except
      pass  # already reported by wait_for_saves / check_background_save on the normal path
    if bar is not None:
      bar.close()

  results: dict[str, Any] = {"step": final_step, "train_metrics": last_logged,
                             "stopped_by": stopped_by, "state": state}
  if stopped_by is None and config.get("eval", {}).get("at_end", False):
    evals = task.evaluators(config)
    if evals:
      results["eval"] = {}
      if jax.process_count() > 1:
        # Evaluators jit functions that close over the parameters, which jax refuses for arrays
        # spanning processes: every process evaluates on a local copy on its first device (the
        # parameters are gathered on every host; for a model that does not fit one host, evaluate
        # the checkpoint with scripts/evaluate.py instead), without the global mesh.
        from jax.experimental import multihost_utils
        eval_params = jax.device_put(multihost_utils.process_allgather(state.params, tiled=True),
                                     jax.local_devices()[0])
        context = contextlib.nullcontext()
      else:
        eval_params, context = state.params, jax.set_mesh(mesh)
      with context, nn.logical_axis_rules(rules):
        for name, fn in evals.items():
          results["eval"][name] = fn(model, eval_params, final_step, writer=writer)
      if jax.process_index() == 0:  # every process evaluates (the arrays span them); one writes
        with open(os.path.join(workdir, "eval_results.json"), "w") as f:
          json.dump(results["eval"], f, indent=2)
  writer.close()
  manager.close()
  return results
