"""Training loses nothing: damaged checkpoints, a full disk, config changes on resume, preemption
during the first compile, kill -9, and logs that a resumed run does not duplicate.

Every case builds its own damage (truncated files, removed manifests, emptied metadata, a missing
item, a fake full disk, a failing background write) on checkpoints of the micro recipe, and
checks the run's final parameters against an uninterrupted run bit for bit.
"""
import errno
import glob
import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import threading
import time

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest

from tests.train.micro import micro_config
from vlm.train import checkpoint as ckpt
from vlm.train import loop

TOTAL = 6
# A restore that fails part-way leaves tensorstore futures that are never awaited; pytest reports
# each as an unraisable-exception warning. They are the damage the tests inflict on purpose.
pytestmark = pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")
LOSS_KEYS = ("train/loss", "train/loss_itc", "train/loss_itm", "train/loss_itg", "train/lr")


def _params(res):
  return jax.device_get(res["state"].params)


def _assert_same_params(a, b):
  jax.tree.map(lambda x, y: np.testing.assert_array_equal(np.asarray(x), np.asarray(y)), a, b)


def _losses(workdir):
  rows = [json.loads(l) for l in open(os.path.join(workdir, "metrics.jsonl"))]
  return [(r["step"],) + tuple(r[k] for k in LOSS_KEYS) for r in rows if "train/loss" in r]


@pytest.fixture(scope="module")
def straight(tmp_path_factory):
  """An uninterrupted 6-step run: (workdir, final params)."""
  wd = str(tmp_path_factory.mktemp("straight"))
  res = loop.run(micro_config(TOTAL), wd)
  assert res["step"] == TOTAL
  return wd, _params(res)


@pytest.fixture(scope="module")
def stopped_at_4(tmp_path_factory):
  """A run of the same recipe stopped (as if preempted) at step 4: checkpoints 1 (orbax's initial
  save), 2 and 4, metrics logged up to step 4."""
  wd = str(tmp_path_factory.mktemp("stopped"))
  res = loop.run(micro_config(TOTAL), wd, stop_after=4)
  assert res["step"] == 4
  assert sorted(os.listdir(os.path.join(wd, "checkpoints"))) == ["1", "2", "4"]
  return wd


def _truncate_largest_array_file(step_dir):
  files = [f for f in glob.glob(os.path.join(step_dir, "state", "**", "d", "*"), recursive=True)
           if os.path.isfile(f)]
  big = max(files, key=os.path.getsize)
  with open(big, "r+b") as f:
    f.truncate(os.path.getsize(big) // 2)


DAMAGE = {
    "truncated_array_file": _truncate_largest_array_file,
    "missing_manifest": lambda d: os.remove(os.path.join(d, "state", "manifest.ocdbt")),
    "emptied_metadata": lambda d: open(os.path.join(d, "metadata", "metadata"), "w").close(),
    "emptied_array_metadata": lambda d: open(os.path.join(d, "state", "_METADATA"), "w").close(),
    "missing_item": lambda d: shutil.rmtree(os.path.join(d, "data_iter")),
    "missing_state": lambda d: shutil.rmtree(os.path.join(d, "state")),
}


@pytest.mark.parametrize("damage", sorted(DAMAGE))
def test_damaged_newest_checkpoint_is_moved_aside_and_the_previous_one_resumes(
    damage, straight, stopped_at_4, tmp_path, caplog):
  wd = str(tmp_path / "run")
  shutil.copytree(stopped_at_4, wd)
  DAMAGE[damage](os.path.join(wd, "checkpoints", "4"))
  # One kind of damage runs to the end and is compared bit for bit with the uninterrupted run;
  # the others stop after one resumed step (the same code path, less CPU time).
  full = damage == "truncated_array_file"
  with caplog.at_level(logging.WARNING, logger="vlm.train"):
    res = loop.run(micro_config(TOTAL), wd, stop_after=None if full else 3)
  assert res["step"] == (TOTAL if full else 3)
  if full:
    _assert_same_params(_params(res), straight[1])
  # The damaged step is kept, moved out of the way, and said so in one line.
  assert os.path.isdir(os.path.join(wd, ckpt.DAMAGED_DIR, "4"))
  # (only vlm's own records: asyncio may log an earlier test's abandoned tensorstore reads here,
  # and their paths contain "test_damaged_...")
  lines = [r.getMessage() for r in caplog.records
           if r.name.startswith("vlm") and "damaged" in r.getMessage()]
  assert len(lines) == 1, lines
  assert "step 4" in lines[0] and "resumed from step 2" in lines[0], lines[0]
  assert os.path.join(ckpt.DAMAGED_DIR, "4") in lines[0]
  # Its logs equal the uninterrupted run's: the replayed steps are not duplicated.
  assert _losses(wd) == _losses(straight[0])[:res["step"]]


def test_every_checkpoint_damaged_starts_over_and_keeps_them(stopped_at_4, straight, tmp_path,
                                                             caplog):
  wd = str(tmp_path / "run")
  shutil.copytree(stopped_at_4, wd)
  for step in ("1", "2", "4"):
    DAMAGE["missing_manifest"](os.path.join(wd, "checkpoints", step))
  with caplog.at_level(logging.WARNING, logger="vlm.train"):
    res = loop.run(micro_config(TOTAL), wd)
  assert res["step"] == TOTAL
  _assert_same_params(_params(res), straight[1])
  assert sorted(os.listdir(os.path.join(wd, ckpt.DAMAGED_DIR))) == ["1", "2", "4"]
  assert any("no intact checkpoint" in r.getMessage() for r in caplog.records)
  assert _losses(wd) == _losses(straight[0])


def test_evaluate_restore_skips_a_damaged_checkpoint(stopped_at_4, tmp_path):
  from vlm.train import checkpoint as restore
  wd = str(tmp_path / "run")
  shutil.copytree(stopped_at_4, wd)
  # The state's arrays are unreadable. (A truncated data file is not used here: a params-only
  # read touches only the params' bytes, so it finds step 4 intact whenever the cut falls in the
  # optimizer state's part of the shared OCDBT file, which depends on the write order.)
  DAMAGE["missing_manifest"](os.path.join(wd, "checkpoints", "4"))
  step, params = restore.restore_params(wd)
  assert step == 2
  assert "vision_model" in params
  # Evaluation only reads: nothing is moved.
  assert sorted(os.listdir(os.path.join(wd, "checkpoints"))) == ["1", "2", "4"]


def test_resume_with_another_model_size_is_refused_before_compiling(stopped_at_4, tmp_path):
  wd = str(tmp_path / "run")
  shutil.copytree(stopped_at_4, wd)
  c = micro_config(TOTAL)
  c.model.overrides = {"image_text_hidden_size": 24}  # a wider ITC projection
  with pytest.raises(ckpt.CheckpointMismatchError) as e:
    loop.run(c, wd)
  msg = str(e.value)
  assert "model.overrides.image_text_hidden_size: '<absent>' -> 24" in msg
  assert "shape" in msg and len(msg) < 2000, msg
  # Nothing was moved or written.
  assert sorted(os.listdir(os.path.join(wd, "checkpoints"))) == ["1", "2", "4"]
  assert not os.path.exists(os.path.join(wd, ckpt.DAMAGED_DIR))


def test_resume_with_another_batch_size_warns_with_the_change(stopped_at_4, tmp_path, caplog):
  wd = str(tmp_path / "run")
  shutil.copytree(stopped_at_4, wd)
  with caplog.at_level(logging.WARNING, logger="vlm.train"):
    res = loop.run(micro_config(TOTAL, global_batch_size=16), wd, stop_after=5)
  assert res["step"] == 5
  warn = [r.getMessage() for r in caplog.records if "changed config" in r.getMessage()]
  assert len(warn) == 1 and "global_batch_size: 8 -> 16" in warn[0], warn


def test_config_changes_lists_each_key():
  saved = {"a": 1, "b": {"c": [1, 2], "d": "x"}, "gone": 0}
  now = {"a": 1, "b": {"c": [1, 3], "d": "x"}, "new": 2}
  assert ckpt.config_changes(saved, now) == [
      ("b.c", [1, 2], [1, 3]), ("gone", 0, "<absent>"), ("new", "<absent>", 2)]


def test_full_disk_fails_the_save_at_once_and_keeps_the_last_good(stopped_at_4, tmp_path,
                                                                   monkeypatch):
  wd = str(tmp_path / "run")
  shutil.copytree(stopped_at_4, wd)
  monkeypatch.setattr(ckpt, "free_bytes", lambda directory: 1 << 20)
  with pytest.raises(ckpt.CheckpointSaveError) as e:
    loop.run(micro_config(TOTAL), wd)
  msg = str(e.value)
  assert "not enough disk space" in msg and "step 6" in msg and "last good checkpoint is step 4" \
      in msg, msg
  assert sorted(os.listdir(os.path.join(wd, "checkpoints"))) == ["1", "2", "4"]


class _FailingFuture:
  """An orbax future whose background write hits ENOSPC."""

  def result(self, timeout=None):
    time.sleep(0.2)
    raise OSError(errno.ENOSPC, "No space left on device (simulated)")


def test_failed_background_save_stops_the_run_at_the_next_step(tmp_path, monkeypatch, straight):
  real = ocp.StandardCheckpointHandler.async_save
  calls = {"n": 0}

  async def failing(self, *a, **k):
    futures = await real(self, *a, **k)
    calls["n"] += 1
    return list(futures or []) + [_FailingFuture()]

  monkeypatch.setattr(ocp.StandardCheckpointHandler, "async_save", failing)
  with pytest.raises(ckpt.CheckpointSaveError) as e:
    loop.run(micro_config(TOTAL), str(tmp_path))
  assert calls["n"] == 1  # reported before a second save was attempted
  assert "No space left" in str(e.value) and "there is no earlier checkpoint" in str(e.value)
  monkeypatch.undo()
  # No finished checkpoint: the rerun starts over and equals the uninterrupted run.
  res = loop.run(micro_config(TOTAL), str(tmp_path))
  _assert_same_params(_params(res), straight[1])


def test_sigterm_during_the_first_compile_exits_at_once(tmp_path, monkeypatch):
  def slow_compile(self, *a, **k):
    time.sleep(30)
    raise RuntimeError("compile abandoned")

  monkeypatch.setattr(jax.stages.Lowered, "compile", slow_compile)
  timer = threading.Timer(1.0, os.kill, (os.getpid(), signal.SIGTERM))
  t0 = time.perf_counter()
  timer.start()
  res = loop.run(micro_config(TOTAL), str(tmp_path))
  took = time.perf_counter() - t0
  assert res["stopped_by"] == "SIGTERM" and res["state"] is None and res["step"] == 0
  assert took < 25, took  # not the 30 s of the compile
  assert not os.listdir(os.path.join(tmp_path, "checkpoints"))


_CHILD = r"""
import os, sys
sys.path.insert(0, {root!r})
import jax
jax.config.update("jax_default_matmul_precision", "highest")
jax.config.update("jax_compilation_cache_dir", {cache!r})
jax.config.update("jax_persistent_cache_min_compile_time_secs", 1.0)
from tests.train.micro import micro_config
from vlm.train import loop
loop.run(micro_config({total}), {workdir!r})
"""


def test_kill_9_mid_run_resumes_bit_exact(straight, tmp_path):
  """A hard kill (no handler runs) between checkpoints: the rerun resumes from the last finished
  checkpoint and ends with the uninterrupted run's parameters and logs."""
  import tempfile
  root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
  wd = str(tmp_path / "run")
  code = _CHILD.format(root=root, cache=jax.config.jax_compilation_cache_dir
                       or os.path.join(tempfile.gettempdir(), "vlm-tests-jax-cache"),
                       total=TOTAL, workdir=wd)
  env = dict(os.environ)
  proc = subprocess.Popen([sys.executable, "-c", code], env=env, cwd=root,
                          stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
  deadline = time.time() + 300
  metrics = os.path.join(wd, "metrics.jsonl")
  try:
    while time.time() < deadline and proc.poll() is None:
      if (os.path.isdir(os.path.join(wd, "checkpoints", "2"))
          and os.path.isfile(metrics) and '"step": 3' in open(metrics).read()):
        break
      time.sleep(0.05)
    assert proc.poll() is None, proc.stderr.read().decode()[-3000:]
    proc.send_signal(signal.SIGKILL)
    proc.wait(30)
  finally:
    if proc.poll() is None:
      proc.kill()
  assert proc.returncode == -signal.SIGKILL
  res = loop.run(micro_config(TOTAL), wd)
  assert res["step"] == TOTAL
  _assert_same_params(_params(res), straight[1])
  assert _losses(wd) == _losses(straight[0])


def test_tensorboard_of_a_resumed_run_has_no_duplicate_points(stopped_at_4, tmp_path):
  event_accumulator = pytest.importorskip(
      "tensorboard.backend.event_processing.event_accumulator")
  wd = str(tmp_path / "run")
  shutil.copytree(stopped_at_4, wd)
  DAMAGE["missing_manifest"](os.path.join(wd, "checkpoints", "4"))  # replay steps 3 and 4
  loop.run(micro_config(TOTAL), wd)
  acc = event_accumulator.EventAccumulator(os.path.join(wd, "tensorboard"))
  acc.Reload()
  steps = [e.step for e in acc.Scalars("train/loss")]
  assert steps == [1, 2, 3, 4, 5, 6], steps
