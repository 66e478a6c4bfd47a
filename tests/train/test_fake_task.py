"""The trainer drives any task: a fake linear-regression task (tests/train/fake_task.py) runs,
logs its own keys and throughput unit, resumes exactly, accumulates gradients over microbatches
as one big batch, equals a hand-composed sequence of train steps, and initialises from an earlier
run's workdir without gathering parameters to the host."""
import json
import logging
import os

import chex
import jax
import numpy as np
import pytest

from tests.train import fake_task
from vlm import tasks
from vlm.parallel import mesh as mesh_lib
from vlm.train import checkpoint as ckpt
from vlm.train import loop
from vlm.train import metrics as metrics_lib
from vlm.train import optim
from vlm.train import step as step_lib


@pytest.fixture(autouse=True)
def _register(monkeypatch):
  monkeypatch.setitem(tasks.TASKS, "fake_linear", "tests.train.fake_task")


def _host(tree):
  return jax.tree.map(np.asarray, jax.device_get(tree))


def test_get_task_names_the_registered_tasks():
  with pytest.raises(ValueError, match="unknown task 'nope'; registered tasks: .*blip2_stage1"):
    tasks.get_task("nope")
  c = fake_task.get_config()
  del c.task
  with pytest.raises(ValueError, match="config.task is not set"):
    loop.run(c, "/nonexistent/never-created")


def test_fake_task_runs_logs_its_keys_and_resumes_exactly(tmp_path, monkeypatch):
  postfixes = []
  real_bar = metrics_lib.progress_bar

  def spy_bar(total, initial, enabled=None):
    bar = real_bar(total, initial, enabled=False)
    real = bar.set_postfix
    bar.set_postfix = lambda d, **k: (postfixes.append(dict(d)), real(d, **k))
    return bar

  monkeypatch.setattr(metrics_lib, "progress_bar", spy_bar)
  fake_task.VALIDATED.clear()
  straight = loop.run(fake_task.get_config(), str(tmp_path / "a"))
  assert straight["step"] == 4 and fake_task.VALIDATED == [128]
  m = straight["train_metrics"]
  assert {"loss", "mse", "weight_sum", "loss_weight", "lr", "tokens_per_s"} <= set(m)
  assert "loss_itc" not in m and "images_per_s" not in m
  assert set(postfixes[-1]) == {"loss", "mse", "weight_sum", "lr", "tokens/s"}
  rows = [json.loads(l) for l in open(tmp_path / "a" / "metrics.jsonl")]
  assert [r["step"] for r in rows if "train/mse" in r] == [1, 2, 3, 4]
  assert any("eval_heldout/mse" in r for r in rows)
  ev = json.load(open(tmp_path / "a" / "eval_results.json"))
  assert set(ev) == {"heldout"} and np.isfinite(ev["heldout"]["mse"])

  first = loop.run(fake_task.get_config(), str(tmp_path / "b"), stop_after=2)
  assert first["step"] == 2 and first["stopped_by"]
  resumed = loop.run(fake_task.get_config(), str(tmp_path / "b"))
  assert resumed["step"] == 4
  chex.assert_trees_all_equal(_host(straight["state"].params), _host(resumed["state"].params))
  chex.assert_trees_all_equal(_host(straight["state"].opt_state),
                              _host(resumed["state"].opt_state))
  rows_b = [json.loads(l) for l in open(tmp_path / "b" / "metrics.jsonl")]
  strip = lambda rs: [{k: v for k, v in r.items() if not k.endswith("_per_s")} for r in rs
                      if "train/loss" in r]
  assert strip(rows_b) == strip(rows)


def _hand_composed(config, n_steps):
  """The loop's work spelled out: task -> state -> jitted step over the task's batches."""
  task = tasks.get_task(config.task)
  mesh = mesh_lib.make_mesh(dict(config.mesh.shape))
  rules = mesh_lib.DEFAULT_RULES
  model = task.build_model(config)
  example = task.example_batch(config, 1)
  tx = optim.make_optimizer(config.optim)
  rng = jax.random.key(config.seed)
  init_rng, step_rng = jax.random.split(rng)
  state, shardings, mask = step_lib.create_train_state_from_init(
      lambda k: task.init_model(model, k, example), init_rng, tx, [], mesh, rules)
  it, _ = task.train_data(config, seed=config.seed, process_index=0, process_count=1)
  first = next(it)
  fn = step_lib.jit_train_step(model, tx, mask, task.loss_fn, dict(config.loss), shardings, mesh,
                               rules, first, batch_axes=task.batch_axes(config),
                               microbatches=config.microbatches)
  metrics, batch = [], first
  with jax.set_mesh(mesh):
    for _ in range(n_steps):
      state, m = fn(state, mesh_lib.global_batch_from_host(batch, mesh, rules,
                                                           task.batch_axes(config)), step_rng)
      metrics.append({k: float(v) for k, v in jax.device_get(m).items()})
      batch = next(it)
  return state, metrics


def test_loop_equals_hand_composed_train_steps(tmp_path):
  c = fake_task.get_config(**{"eval.at_end": False})
  res = loop.run(c, str(tmp_path))
  state, metrics = _hand_composed(c, 4)
  rows = [json.loads(l) for l in open(tmp_path / "metrics.jsonl")]
  for row, m in zip(rows, metrics):
    for k, v in m.items():
      assert row[f"train/{k}"] == v, (row["step"], k)
  chex.assert_trees_all_equal(_host(res["state"].params), _host(state.params))


@pytest.mark.parametrize("weighted", [True, False])
def test_microbatches_equal_the_big_batch(tmp_path, weighted):
  """With ``loss_weight`` the 4-microbatch step equals the 32-row step (1e-6 after 2 steps);
  without it each microbatch's mean counts equally, which is not the token-weighted mean."""
  over = {"eval.at_end": False, "total_steps": 2, "loss.weighted": weighted}
  big = loop.run(fake_task.get_config(**over), str(tmp_path / "big"))
  small = loop.run(fake_task.get_config(**over, microbatches=4), str(tmp_path / "small"))
  a, b = _host(big["state"].params), _host(small["state"].params)
  if weighted:
    chex.assert_trees_all_close(a, b, atol=1e-6, rtol=0)
    assert abs(big["train_metrics"]["loss"] - small["train_metrics"]["loss"]) < 1e-6
    assert small["train_metrics"]["loss_weight"] == big["train_metrics"]["loss_weight"]
  else:
    diff = max(float(np.abs(x - y).max()) for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)))
    assert diff > 1e-5, diff


def test_microbatches_must_split_over_the_data_shards(tmp_path):
  with pytest.raises(ValueError, match="does not split over the 8 data-parallel shards"):
    loop.run(fake_task.get_config(microbatches=8), str(tmp_path))
  with pytest.raises(ValueError, match="not divisible by microbatches=5"):
    loop.run(fake_task.get_config(microbatches=5), str(tmp_path))


def test_init_from_an_earlier_workdir_on_another_mesh(tmp_path, monkeypatch, caplog):
  """Stage 2 (an extra layer, 4 devices) starts from stage 1's workdir (8 devices): matching
  params are taken into the new shardings, the new layer keeps its init, nothing is device_get."""
  stage1 = loop.run(fake_task.get_config(**{"eval.at_end": False, "total_steps": 2}),
                    str(tmp_path / "s1"))
  s1 = _host(stage1["state"].params)
  c = fake_task.get_config(**{"eval.at_end": False, "total_steps": 2, "model.extra_layer": True,
                              "init.workdir": str(tmp_path / "s1"), "init.head_bias": 0.5,
                              "mesh.shape": {"data": 1, "fsdp": 4}})
  task = tasks.get_task("fake_linear")
  model = task.build_model(c)
  mesh = mesh_lib.make_mesh({"data": 1, "fsdp": 4}, devices=jax.devices()[:4])
  example = task.example_batch(c, 1)
  import flax.linen as nn
  with nn.logical_axis_rules(mesh_lib.DEFAULT_RULES):
    abstract, shardings = step_lib.param_shardings_of(
        lambda k: task.init_model(model, k, example), mesh, mesh_lib.DEFAULT_RULES)
    fresh = jax.jit(lambda k: nn.unbox(task.init_model(model, k, example)),
                    out_shardings=shardings)(jax.random.key(1))

  def no_device_get(*a, **k):
    raise AssertionError("init must not jax.device_get the global params")

  monkeypatch.setattr(jax, "device_get", no_device_get)
  with caplog.at_level(logging.INFO, logger="vlm.train"):
    params = loop._params_init(c, task, model)(fresh, shardings)
  monkeypatch.undo()
  # Taken from stage 1, in the 4-device shardings.
  got = _host(params)
  np.testing.assert_array_equal(got["encoder"]["kernel"], s1["encoder"]["kernel"])
  assert params["encoder"]["kernel"].sharding == shardings["encoder"]["kernel"]
  assert len(params["encoder"]["kernel"].sharding.device_set) == 4
  # The workdir overrides the task's own init (head bias 0.5), the new layer keeps its init.
  np.testing.assert_array_equal(got["head"]["bias"], s1["head"]["bias"])
  chex.assert_trees_all_equal(got["extra"], _host(fresh["extra"]))
  line = [r.getMessage() for r in caplog.records if "initialised 4 of 6" in r.getMessage()]
  assert line and "extra/bias" in line[0] and "extra/kernel" in line[0], caplog.text
  # Evaluation-style restore on yet another device count: host numpy, or into 2 devices.
  step, host = ckpt.restore_params(str(tmp_path / "s1"))
  assert step == 2
  chex.assert_trees_all_equal(host, s1)
  mesh2 = mesh_lib.make_mesh({"fsdp": 2}, devices=jax.devices()[:2])
  sh2 = jax.sharding.NamedSharding(mesh2, jax.sharding.PartitionSpec("fsdp"))
  _, part = ckpt.restore_params(str(tmp_path / "s1"), target={"encoder": {
      "kernel": jax.ShapeDtypeStruct((8, 16), np.float32, sharding=sh2)}})
  assert set(part) == {"encoder"} and part["encoder"]["kernel"].sharding == sh2
  np.testing.assert_array_equal(np.asarray(part["encoder"]["kernel"]), s1["encoder"]["kernel"])


def test_init_from_a_workdir_with_other_shapes_names_the_keys(tmp_path):
  loop.run(fake_task.get_config(**{"eval.at_end": False, "total_steps": 2}), str(tmp_path / "s1"))
  c = fake_task.get_config(**{"eval.at_end": False, "total_steps": 2, "model.hidden": 8,
                              "init.workdir": str(tmp_path / "s1")})
  with pytest.raises(ValueError, match="have other shapes") as e:
    loop.run(c, str(tmp_path / "s2"))
  msg = str(e.value)
  assert "encoder/kernel: (8, 16)" in msg and "(8, 8) here" in msg and "head/kernel" in msg
