"""Several processes, and checkpoints that move between topologies.

``scripts/train.py`` is run as 2 local processes (``--coordinator_address=127.0.0.1:<port>
--num_processes=2 --process_id=i``, 4 simulated CPU devices each) on the fake linear task
(tests/train/fake_config.py, which initialises a parameter through ``init_params``). Checked:

* its parameters after 6 steps equal those of one process with 8 devices on the same mesh
  (data=2, fsdp=4) and the same global batches, within 1e-6 (not bitwise: the cross-process
  reductions of the loss and gradients run through gloo, which adds the 8 shards' partial sums in
  another order than XLA's in-process all-reduce; float32 addition is not associative, so the
  last bits differ, ~1e-8 here);
* a 2-process run stopped at step 3 (``--stop_after=3``) and rerun resumes exactly: bitwise the
  parameters of the uninterrupted 2-process run;
* each process saved its own data-iterator position; process 0 alone wrote ``metrics.jsonl``;
* ``scripts/evaluate.py`` on ONE device evaluates that 8-device, 2-process checkpoint, as the
  run's own evaluation at its end did (every process evaluates, process 0 writes);
* resuming it with another process count is refused with a message naming both counts (the
  checkpoint is left in place, not moved aside as damaged).

In-process (8 devices): a checkpoint saved on mesh data=2,fsdp=4 restores bitwise onto one device
and onto other meshes (fsdp=8, fsdp=4 x tensor=2), and training resumed on mesh fsdp=8 continues
the run (within 1e-6 of the uninterrupted run on the original mesh; reduction order again).
"""
from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

from tests.train import fake_config
from tests.train import fake_task
from vlm.train import checkpoint as ckpt
from vlm.train import loop

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
CONFIG = os.path.join("tests", "train", "fake_config.py")
TIMEOUT_S = 240


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def _env(devices: int) -> dict:
  env = dict(os.environ)
  # set before the child imports jax: its own device count, the same XLA options as this process
  env["XLA_FLAGS"] = (f"--xla_force_host_platform_device_count={devices} "
                      "--xla_backend_optimization_level=0")
  env["JAX_PLATFORMS"] = "cpu"
  return env


def _launch(workdir, *extra, processes: int = 2, devices: int = 4):
  """Starts ``scripts/train.py`` as ``processes`` local processes; returns their Popen list."""
  port = _free_port()
  procs = []
  for i in range(processes):
    log = open(os.path.join(os.path.dirname(workdir), f"{os.path.basename(workdir)}.{i}.log"),
               "w")
    procs.append(subprocess.Popen(
        [sys.executable, "scripts/train.py", f"--config={CONFIG}", f"--workdir={workdir}",
         f"--coordinator_address=127.0.0.1:{port}", f"--num_processes={processes}",
         f"--process_id={i}", "--compilation_cache=", *extra],
        cwd=ROOT, env=_env(devices), stdout=log, stderr=subprocess.STDOUT))
    procs[-1].log_path = log.name
  return procs


def _wait(procs):
  deadline = time.time() + TIMEOUT_S
  for p in procs:
    try:
      p.wait(timeout=max(1.0, deadline - time.time()))
    except subprocess.TimeoutExpired:
      for q in procs:
        q.kill()
      raise
  for p in procs:
    if p.returncode != 0:
      tail = open(p.log_path).read()[-3000:] if hasattr(p, "log_path") else ""
      raise AssertionError(f"{p.args} exited with {p.returncode}:\n{tail}")


def _max_diff(a, b) -> float:
  return max(float(np.max(np.abs(np.asarray(x, np.float64) - np.asarray(y, np.float64))))
             for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)))


def _assert_bitwise(a, b):
  assert jax.tree.structure(a) == jax.tree.structure(b)
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
  """The 2-process run (scripts/train.py, 6 steps, checkpoints 1, 3, 6) and, meanwhile, the
  1-process 8-device run of the same config here."""
  root = tmp_path_factory.mktemp("runs")
  two = str(root / "two")
  procs = _launch(two, "--config.eval.at_end=True")  # evaluators run on every process
  try:
    one = loop.run(fake_config.get_config(), str(root / "one"))
  finally:
    _wait(procs)
  return {"root": root, "two": two, "one": str(root / "one"),
          "one_params": jax.device_get(one["state"].params)}


def _from_step_3(workdir, dst):
  """A copy of ``workdir`` as a run stopped after step 3 (its later checkpoint removed)."""
  shutil.copytree(workdir, dst)
  shutil.rmtree(os.path.join(dst, "checkpoints", "6"))
  return str(dst)


def test_two_processes_equal_one_resume_exactly_and_evaluate_on_one_device(runs, tmp_path):
  straight = runs["two"]
  resumed_dir = _from_step_3(straight, tmp_path / "resumed")
  resume = _launch(resumed_dir)
  evaluate = subprocess.Popen(  # one device reads the 8-device, 2-process checkpoint
      [sys.executable, "scripts/evaluate.py", f"--config={CONFIG}", f"--workdir={straight}",
       f"--output={tmp_path / 'eval.json'}"],
      cwd=ROOT, env=_env(1), stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
  _wait(resume)
  out = evaluate.communicate(timeout=TIMEOUT_S)[0].decode()
  assert evaluate.returncode == 0, out[-3000:]

  step, two = ckpt.restore_params(straight)
  assert step == 6
  diff = _max_diff(two, runs["one_params"])
  print(f"2 processes x 4 devices vs 1 process x 8 devices after 6 steps: max |diff| {diff:.3g}")
  assert diff <= 1e-6
  # the task's init_params ran in both processes (head bias 0.25 before training)
  assert abs(float(two["head"]["bias"][0]) - 0.25) < 0.1
  step, resumed = ckpt.restore_params(resumed_dir)
  assert step == 6
  _assert_bitwise(resumed, two)  # resumed from step 3 by 2 processes: exactly the same run

  d = os.path.join(straight, "checkpoints", "6", "data_iter")
  assert {"process_0-of-2.json", "process_1-of-2.json"} <= set(os.listdir(d))
  assert ckpt.saved_process_count(os.path.join(straight, "checkpoints"), 6) == 2
  for wd in (straight, resumed_dir):  # process 0 alone writes, the resumed run continues it
    rows = [json.loads(l) for l in open(os.path.join(wd, "metrics.jsonl"))]
    assert [r["step"] for r in rows if "train/loss" in r] == [1, 2, 3, 4, 5, 6]

  # evaluate.py on one device == the fake task's evaluator on the restored numpy parameters
  c = fake_config.get_config()
  expect = fake_task.evaluators(c)["heldout"](fake_task.build_model(c), two, 6)
  got = json.load(open(tmp_path / "eval.json"))
  assert got["step"] == 6 and abs(got["heldout"]["mse"] - expect["mse"]) < 1e-6, (got, expect)
  at_end = json.load(open(os.path.join(straight, "eval_results.json")))  # written by process 0
  assert abs(at_end["heldout"]["mse"] - expect["mse"]) < 1e-6, (at_end, expect)

  # this process (1 process, 8 devices) may not resume the 2-process run: refused, nothing moved
  with pytest.raises(ckpt.CheckpointMismatchError, match="saved by 2.*--num_processes=2"):
    loop.run(_with(fake_config.get_config(), total_steps=8), straight)
  assert not os.path.exists(os.path.join(straight, ckpt.DAMAGED_DIR))
  assert "6" in os.listdir(os.path.join(straight, "checkpoints"))


def _with(c, **over):
  from tests.train.micro import set_dotted
  return set_dotted(c, over)


def _abstract_state(config, mesh_shape):
  """The train state's ShapeDtypeStructs and shardings for ``config`` on a mesh of this shape."""
  import flax.linen as nn
  from vlm import tasks
  from vlm.parallel import mesh as mesh_lib
  from vlm.train import optim
  from vlm.train import step as step_lib
  task = tasks.get_task(config.task)
  model = task.build_model(config)
  mesh = mesh_lib.make_mesh(mesh_shape)
  rules = mesh_lib.DEFAULT_RULES
  example = task.example_batch(config, 1)
  tx = optim.make_optimizer(config.optim)
  with nn.logical_axis_rules(rules):
    state, shardings, _ = step_lib.create_train_state_from_init(
        lambda k: task.init_model(model, k, example), jax.random.key(0), tx,
        list(config.optim.frozen), mesh, rules)
  return ckpt.abstract_like(state, shardings), mesh


def test_restore_onto_one_device_and_resume_on_another_mesh(runs, tmp_path):
  """The 1-process run's step-3 checkpoint (mesh data=2 x fsdp=4) onto one device, onto other
  meshes, and resumed on mesh fsdp=8 to step 6."""
  saved = _from_step_3(runs["one"], tmp_path / "saved")
  _, host = ckpt.restore_params(saved)

  # evaluation on one device: straight into a single-device sharding
  one = jax.sharding.SingleDeviceSharding(jax.devices()[0])
  target = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=one), host)
  _, on_one = ckpt.restore_params(saved, target=target)
  assert all(x.sharding == one for x in jax.tree.leaves(on_one))
  _assert_bitwise(on_one, host)

  # the full train state onto other meshes: the shardings of the new mesh, the same values
  for shape in ({"data": 1, "fsdp": 8, "tensor": 1}, {"data": 1, "fsdp": 4, "tensor": 2}):
    c = _with(fake_config.get_config(), **{"mesh.shape": shape})
    abstract, mesh = _abstract_state(c, shape)
    manager = ckpt.make_manager(saved, save_interval_steps=3, async_save=False)
    try:
      it, _ = fake_task.train_data(c, seed=c.seed, process_index=0, process_count=1)
      step, state, _ = ckpt.restore_latest(manager, abstract, it, workdir=saved)
    finally:
      manager.close()
    assert step == 3 and not os.path.exists(os.path.join(saved, ckpt.DAMAGED_DIR))
    kernel = state.params["encoder"]["kernel"]
    assert kernel.sharding.mesh.shape == mesh.shape
    assert kernel.sharding == abstract.params["encoder"]["kernel"].sharding
    _assert_bitwise(jax.device_get(state.params), host)

  # training resumed on mesh fsdp=8 continues the data=2 x fsdp=4 run
  cont = loop.run(_with(fake_config.get_config(), **{"mesh.shape": {"data": 1, "fsdp": 8,
                                                                     "tensor": 1}}), saved)
  assert cont["step"] == 6
  assert cont["state"].params["encoder"]["kernel"].sharding.mesh.shape["fsdp"] == 8
  diff = _max_diff(jax.device_get(cont["state"].params), runs["one_params"])
  print(f"resumed at step 3 on fsdp=8 vs uninterrupted on data=2,fsdp=4: max |diff| {diff:.3g}")
  assert diff <= 1e-6


def test_multi_process_flags_are_checked():
  from vlm.train import cli
  assert cli.init_distributed() is False  # no flags: one process, nothing started
  with pytest.raises(cli.ConfigError, match="without --num_processes, --process_id"):
    cli.init_distributed(coordinator_address="127.0.0.1:1234")
  with pytest.raises(cli.ConfigError, match=r"--process_id=2 is not in \[0, --num_processes=2\)"):
    cli.init_distributed(coordinator_address="127.0.0.1:1234", num_processes=2, process_id=2)
  with pytest.raises(cli.ConfigError, match="needs a port"):
    cli.init_distributed(coordinator_address="127.0.0.1", num_processes=2, process_id=0)
  with pytest.raises(cli.ConfigError, match="--local_device_ids applies to a multi-process run"):
    cli.init_distributed(local_device_ids=[0])
  # --multihost where no cluster can be detected: one line naming the explicit flags (a fresh
  # process: jax.distributed must start before any jax computation)
  env = {k: v for k, v in _env(1).items()
         if not k.startswith(("SLURM_", "OMPI_", "PMI_", "TPU_", "CLOUD_TPU", "MEGASCALE"))}
  code = ("from vlm.train import cli\ntry:\n  cli.init_distributed(multihost=True)\n"
          "except cli.ConfigError as e:\n  print(e)")
  out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True,
                       text=True, timeout=TIMEOUT_S)
  assert out.returncode == 0, out.stderr[-2000:]
  assert "--multihost found no cluster to join" in out.stdout, out.stdout[-2000:]
  assert "--coordinator_address=<process 0 host>:<port> --num_processes=N" in out.stdout
