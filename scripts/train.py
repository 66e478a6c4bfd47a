r"""Train a vlm model from an ml_collections config.

  python scripts/train.py --config configs/blip2/stage1.py:tiny --workdir runs/blip2_tiny \
      [--config.total_steps=100 ...]

Rerunning with the same --workdir resumes from its latest checkpoint. Bad data, a checkpoint that
does not fit the config, a full disk or a NaN loss end the run with one ``error: ...`` line that
names the record, key or file and the fix (``VLM_TRACEBACK=1`` shows the traceback).

Several processes (hosts): run the same command on every one of them, with

  --multihost                     on a TPU pod slice (or under Slurm / Open MPI): the cluster is
                                  auto-detected;
  --coordinator_address=HOST:PORT --num_processes=N --process_id=I [--local_device_ids=0,1,...]
                                  anywhere else (a GPU cluster, or N local processes for a test:
                                  --coordinator_address=127.0.0.1:PORT).

Every process reads its own share of the data, writes its own shards of the checkpoint, and
process 0 alone writes metrics, TensorBoard and the evaluation results.
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
flags.DEFINE_bool("multihost", False, "Start jax.distributed with cluster auto-detection (TPU pod "
                  "slice, Slurm, Open MPI); elsewhere use --coordinator_address and friends.")
flags.DEFINE_string("coordinator_address", None, "host:port of process 0 (multi-process run; "
                    "with --num_processes and --process_id).")
flags.DEFINE_integer("num_processes", None, "Number of processes of a multi-process run.")
flags.DEFINE_integer("process_id", None, "This process's index, 0..num_processes-1.")
flags.DEFINE_list("local_device_ids", None, "Optional: the local devices this process uses "
                  "(e.g. 0,1 for one process per pair of GPUs).")
flags.DEFINE_integer("stop_after", None, "Stop (saving a checkpoint) once this many steps have run "
                     "in total, as a preemption would; rerun the same command to continue.")
flags.DEFINE_string("compilation_cache", "~/.cache/vlm/jax",
                    "Persistent XLA compilation cache (a resumed run skips recompiling); '' = off.")
flags.mark_flags_as_required(["config", "workdir"])
FLAGS = flags.FLAGS


def main(argv):
  del argv
  logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
  for name in ("absl", "jax._src.xla_bridge", "orbax"):
    logging.getLogger(name).setLevel(logging.WARNING)
  from vlm.train.cli import ConfigError, init_distributed
  try:
    ids = [int(i) for i in FLAGS.local_device_ids or []]
  except ValueError:
    sys.exit(f"error: --local_device_ids={','.join(FLAGS.local_device_ids)} must be device "
             "numbers, e.g. --local_device_ids=0,1")
  try:
    init_distributed(multihost=FLAGS.multihost, coordinator_address=FLAGS.coordinator_address,
                     num_processes=FLAGS.num_processes, process_id=FLAGS.process_id,
                     local_device_ids=ids)
  except ConfigError as e:
    sys.exit(f"error: {e}")
  import jax
  if jax.process_count() > 1:
    logging.info("process %d of %d, %d local devices of %d", jax.process_index(),
                 jax.process_count(), jax.local_device_count(), jax.device_count())
  if FLAGS.compilation_cache:
    jax.config.update("jax_compilation_cache_dir", os.path.expanduser(FLAGS.compilation_cache))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 5.0)
  from vlm.data.image import BadSampleError
  from vlm.train import checkpoint, loop
  try:
    results = loop.run(FLAGS.config, FLAGS.workdir, stop_after=FLAGS.stop_after)
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
