r"""Compile a recipe's real train step ahead of time for a TPU topology (or simulated CPU devices)
on this machine, and report per-chip memory, FLOPs, collective traffic and compile time.

  pip install -e ".[tpu]"   # libtpu: TPU topology descriptions, no TPU needed
  python scripts/aot_compile.py --config configs/qwen3_vl/stage_b.py:235b_a22b --topology v5p-512 \
      [--config.mesh.shape.expert=8 ...] [--json out.json] [--markdown] [--dump_hlo step.hlo]
  python scripts/aot_compile.py --config configs/blip2/stage1.py:tiny --topology cpu:8

Topologies: v5e-N / v6e-N (N chips), v5p-N / v4-N (N TensorCores, 2 per chip), raw libtpu names
such as v5p:4x8x8 or v5e:16x16, and cpu:N. The mesh is the config's ``mesh.shape`` (-1 fills the
topology). Exit status: 0 when it fits, 2 when the per-chip total exceeds the chip's HBM (the
message names the overshoot and what to change), 1 for a bad config / topology.
``--markdown`` prints the README table row; ``--markdown_from a.json b.json`` prints the table of
earlier ``--json`` outputs.
"""
import json
import os
import re
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _ensure_cpu_devices(argv) -> None:
  """For ``--topology cpu:N``: ask XLA for N host devices (only effective before jax starts)."""
  topo = None
  for i, a in enumerate(argv):
    if a.startswith("--topology="):
      topo = a.split("=", 1)[1]
    elif a == "--topology" and i + 1 < len(argv):
      topo = argv[i + 1]
  m = re.fullmatch(r"cpu:(\d+)", (topo or "").strip())
  if m and "jax" not in sys.modules:
    flags = re.sub(r"--xla_force_host_platform_device_count=\d+", "",
                   os.environ.get("XLA_FLAGS", ""))
    os.environ["XLA_FLAGS"] = (flags + f" --xla_force_host_platform_device_count={m.group(1)}"
                               ).strip()


_ensure_cpu_devices(sys.argv)
# compile only: libtpu opens no TPU, so it may be loaded by several processes (see vlm/train/aot.py)
os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")

from absl import app, flags  # noqa: E402
from ml_collections import config_flags  # noqa: E402

config_flags.DEFINE_config_file("config", None, "Config file (path.py[:variant]).",
                                lock_config=True)
flags.DEFINE_string("topology", None, "v5e-256, v5p-512, v6e-256, v5p:4x8x8, v5e:16x16, cpu:8 ...")
flags.DEFINE_string("json", "", "Write the report (and every parameter's PartitionSpec) here.")
flags.DEFINE_bool("markdown", False, "Also print the README table row.")
flags.DEFINE_string("dump_hlo", "", "Write the compiled per-chip HLO text here.")
FLAGS = flags.FLAGS


def _config_name(argv) -> str:
  for i, a in enumerate(argv):
    if a.startswith("--config="):
      return a.split("=", 1)[1]
    if a == "--config" and i + 1 < len(argv):
      return argv[i + 1]
  return ""


def run(config, topology: str, *, config_name: str = "", json_path: str = "",
        markdown: bool = False, hlo_path: str = "", out=print) -> int:
  """Compiles, prints the report, writes ``json_path``; returns the exit status (0 fits, 2 does
  not fit). Raises TopologyError / ValueError for a bad topology or config."""
  from vlm.train import aot
  try:
    report = aot.compile_train_step(config, topology, config_name=config_name, hlo_path=hlo_path)
  except aot.DoesNotFitError as e:  # the TPU compiler itself ran out of HBM
    out(f"error: does not fit: {e}")
    if markdown:
      out(aot.markdown_header())
      out(aot.markdown_row(e.row))
    if json_path:
      with open(json_path, "w") as f:
        json.dump(e.row, f, indent=1)
    return 2
  out(report.summary())
  if markdown:
    out(aot.markdown_header())
    out(aot.markdown_row(report.to_json()))
  if json_path:
    os.makedirs(os.path.dirname(os.path.abspath(json_path)), exist_ok=True)
    with open(json_path, "w") as f:
      json.dump(report.to_json(), f, indent=1)
  try:
    aot.check_fits(report)
  except aot.DoesNotFitError as e:
    out(f"error: does not fit: {e}")
    return 2
  return 0


def main(argv):
  del argv
  import logging
  logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(name)s: %(message)s")
  if FLAGS.topology is None:
    sys.exit("error: --topology is required (e.g. v5p-512, v5e:16x16, cpu:8)")
  try:
    code = run(FLAGS.config, FLAGS.topology, config_name=_config_name(sys.argv),
               json_path=FLAGS.json, markdown=FLAGS.markdown, hlo_path=FLAGS.dump_hlo)
  except ValueError as e:
    if os.environ.get("VLM_TRACEBACK"):
      raise
    sys.exit(f"error: {type(e).__name__}: {e}\n(set VLM_TRACEBACK=1 to see the traceback)")
  sys.exit(code)


def markdown_from(paths) -> str:
  """The README table from ``--json`` files."""
  from vlm.train import aot
  rows = [aot.markdown_header()]
  for p in paths:
    with open(p) as f:
      rows.append(aot.markdown_row(json.load(f)))
  return "\n".join(rows)


if __name__ == "__main__":
  if len(sys.argv) > 1 and sys.argv[1] == "--markdown_from":
    print(markdown_from(sys.argv[2:]))
    sys.exit(0)
  from vlm.train.cli import ConfigError, check_config_argv  # noqa: E402
  try:
    check_config_argv(sys.argv)
  except ConfigError as e:
    sys.exit(f"error: {e}")
  app.run(main)
