"""End-to-end runs of the training loop on the embedded COCO data with the micro preset.

Every run uses the same config shape, so the persistent compilation cache (tests/conftest.py)
compiles the train step once for the whole file.

Covers: metrics/TensorBoard/checkpoint files, exact resume after a preemption (same parameters as
an uninterrupted run, which implies the same batches and random draws), the NaN guard, and clear
config errors raised before compilation.
"""
import json
import os
import signal

import jax
import numpy as np
import pytest

from vlm.train import loop

from tests.train.micro import micro_config


def test_run_writes_metrics_checkpoints_and_eval(tmp_path):
  c = micro_config(**{"eval.at_end": True, "eval.k_test": 3,
                                     "eval.splits": ["val"], "eval.batch_size": 64})
  res = loop.run(c, str(tmp_path))
  assert res["step"] == 4 and res["stopped_by"] is None
  for k in ("loss", "loss_itc", "loss_itm", "loss_itg", "itm_acc", "lr", "images_per_s"):
    assert np.isfinite(res["train_metrics"][k]), k
  rows = [json.loads(l) for l in open(tmp_path / "metrics.jsonl")]
  assert [r["step"] for r in rows if "train/loss" in r] == [1, 2, 3, 4]
  assert os.listdir(tmp_path / "tensorboard")
  assert {"2", "4"} <= set(os.listdir(tmp_path / "checkpoints"))
  from vlm.train import checkpoint as restore
  step, params = restore.restore_params(str(tmp_path))
  assert step == 4
  jax.tree.map(lambda x, y: np.testing.assert_array_equal(np.asarray(x), np.asarray(y)), params,
               jax.device_get(res["state"].params))
  with pytest.raises(FileNotFoundError, match="no checkpoints"):
    restore.restore_params(str(tmp_path / "nowhere"))
  ev = json.load(open(tmp_path / "eval_results.json"))["val"]
  assert ev["num_images"] == 159 and ev["num_texts"] == 795
  for k in ("i2t_r1", "i2t_r5", "i2t_r10", "t2i_r1", "t2i_r5", "t2i_r10"):
    assert 0.0 <= ev[k] <= 100.0
  assert ev["chance_t2i_r1"] == pytest.approx(100 / 159, rel=1e-6)


def _hand_composed(config, n_steps):
  """The BLIP-2 task composed by hand: its model, data, loss and axes through step.train_step."""
  import flax.linen as nn
  from vlm import tasks
  from vlm.parallel import mesh as mesh_lib
  from vlm.train import optim, step as step_lib
  task = tasks.get_task(config.task)
  mesh = mesh_lib.make_mesh(dict(config.mesh.shape))
  rules = mesh_lib.DEFAULT_RULES
  model = task.build_model(config)
  example = task.example_batch(config, 1)
  tx = optim.make_optimizer(config.optim)
  init_rng, step_rng = jax.random.split(jax.random.key(config.seed, impl=config.prng_impl))
  with nn.logical_axis_rules(rules):
    state, shardings, mask = step_lib.create_train_state_from_init(
        lambda k: task.init_model(model, k, example), init_rng, tx, list(config.optim.frozen),
        mesh, rules)
  it, _ = task.train_data(config, seed=config.seed, process_index=0, process_count=1)
  batch = next(it)
  axes = task.batch_axes(config)
  fn = step_lib.jit_train_step(model, tx, mask, task.loss_fn, dict(config.loss), shardings, mesh,
                               rules, batch, batch_axes=axes)
  metrics = []
  with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
    for _ in range(n_steps):
      state, m = fn(state, mesh_lib.global_batch_from_host(batch, mesh, rules, axes), step_rng)
      metrics.append({k: float(v) for k, v in jax.device_get(m).items()})
      batch = next(it)
  return state, metrics


def test_resume_after_preemption_is_exact(tmp_path):
  straight = loop.run(micro_config(), str(tmp_path / "a"))
  # The loop is exactly the task's pieces composed by hand (same losses, bit for bit).
  ref_state, ref_metrics = _hand_composed(micro_config(), 4)
  rows = [json.loads(l) for l in open(tmp_path / "a" / "metrics.jsonl")]
  assert len(rows) == 4
  for row, m in zip(rows, ref_metrics):
    for k in ("loss", "loss_itc", "loss_itm", "loss_itg", "itm_acc", "grad_norm"):
      assert row[f"train/{k}"] == m[k], (row["step"], k, row[f"train/{k}"], m[k])
  jax.tree.map(lambda x, y: np.testing.assert_array_equal(np.asarray(x), np.asarray(y)),
               jax.device_get(straight["state"].params), jax.device_get(ref_state.params))
  first = loop.run(micro_config(), str(tmp_path / "b"), stop_after=2)
  assert first["stopped_by"] is not None and first["step"] == 2
  resumed = loop.run(micro_config(), str(tmp_path / "b"))
  assert resumed["step"] == 4
  a = jax.device_get(straight["state"].params)
  b = jax.device_get(resumed["state"].params)
  jax.tree.map(lambda x, y: np.testing.assert_array_equal(x, y), a, b)
  ma = jax.device_get(straight["state"].opt_state)
  mb = jax.device_get(resumed["state"].opt_state)
  jax.tree.map(lambda x, y: np.testing.assert_array_equal(x, y), ma, mb)


def test_sigterm_saves_and_exits(tmp_path, monkeypatch):
  from vlm.train import metrics as metrics_lib
  real = metrics_lib.MetricWriter.write

  def write_then_signal(self, step, scalars, prefix="train"):
    real(self, step, scalars, prefix)
    if step == 1:
      os.kill(os.getpid(), signal.SIGTERM)

  monkeypatch.setattr(metrics_lib.MetricWriter, "write", write_then_signal)
  res = loop.run(micro_config(), str(tmp_path))
  assert res["stopped_by"] == "SIGTERM" and res["step"] == 1
  assert "1" in os.listdir(tmp_path / "checkpoints")


def test_nan_loss_stops_with_the_step(tmp_path, monkeypatch):
  import vlm.objectives.stage1 as stage1
  real = stage1.blip2_stage1_loss

  def nan_loss(*a, **k):
    loss, m = real(*a, **k)
    return loss * np.nan, dict(m, loss=loss * np.nan)

  monkeypatch.setattr(stage1, "blip2_stage1_loss", nan_loss)
  with pytest.raises(loop.NonFiniteLossError, match="at step 0"):
    loop.run(micro_config(), str(tmp_path))


@pytest.mark.parametrize("over,msg", [
    ({"mesh.shape": {"data": 3}}, "needs 3 devices"),
    ({"global_batch_size": 6}, "not divisible"),
    ({"optim.warmup_steps": 99}, "must be smaller than total_steps"),
])
def test_bad_config_is_a_clear_error(tmp_path, over, msg):
  with pytest.raises(ValueError, match=msg):
    loop.run(micro_config(**over), str(tmp_path))
