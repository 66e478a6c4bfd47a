r"""Train a vlm model from an ml_collections config.

  python scripts/train.py --config configs/blip2/stage1.py:tiny --workdir runs/blip2_tiny \
      [--config.total_steps=100 ...]

Rerunning with the same --workdir resumes from its latest checkpoint. Bad data, a checkpoint that
does not fit the config, a full disk or a NaN loss end the run with one ``error: ...`` line that
names the record, key or file and the fix (``VLM_TRACEBACK=1`` shows the traceback). On a multi-host TPU pod run
the same command on every host; jax.distributed is initialised when --multihost is set (or the
TPU environment provides it).
"""
import logging
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from absl import app, flags  # noqa: E402
from ml_collections import config_flags  # noqa: E402

config_flags.DEFINE_config_file("config", None, "Config file (path.py[:variant]).",
                                lock_config=True)
flags.DEFINE_string("workdir", None, "Directory for checkpoints, metrics and results.")
flags.DEFINE_bool("multihost", False, "Call jax.distributed.initialize() first.")
flags.DEFINE_string("compilation_cache", "~/.cache/vlm/jax",
                    "Persistent XLA compilation cache (a resumed run skips recompiling); '' = off.")
flags.mark_flags_as_required(["config", "workdir"])
FLAGS = flags.FLAGS


def main(argv):
  del argv
  logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
  for name in ("absl", "jax._src.xla_bridge", "orbax"):
    logging.getLogger(name).setLevel(logging.WARNING)
  import jax
  if FLAGS.multihost:
    jax.distributed.initialize()
  if FLAGS.compilation_cache:
    jax.config.update("jax_compilation_cache_dir", os.path.expanduser(FLAGS.compilation_cache))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 5.0)
  from vlm.data.image import BadSampleError
  from vlm.train import checkpoint, loop
  try:
    results = loop.run(FLAGS.config, FLAGS.workdir)
  except (BadSampleError, checkpoint.CheckpointMismatchError, checkpoint.CheckpointSaveError,
          loop.NonFiniteLossError, FileNotFoundError, ValueError) as e:
    # errors that name the record / file / key and the fix: one line, no library traceback
    if os.environ.get("VLM_TRACEBACK"):
      raise
    sys.exit(f"error: {type(e).__name__}: {e}\n(set VLM_TRACEBACK=1 to see the traceback)")
  logging.info("finished at step %d", results["step"])
  if results["stopped_by"] and results["state"] is None:
    # Preempted during startup or the first compile: the compile thread is abandoned, and letting
    # the interpreter tear it down mid-compile aborts the process. Nothing is left to save.
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


if __name__ == "__main__":
  from vlm.train.cli import ConfigError, check_config_argv  # noqa: E402
  try:
    check_config_argv(sys.argv)
  except ConfigError as e:
    sys.exit(f"error: {e}")
  app.run(main)
