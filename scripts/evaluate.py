r"""Runs a recipe's evaluators (``task.evaluators(config)``) on a training workdir or an HF directory.

BLIP-2 stage 1: zero-shot image-text retrieval on the embedded COCO splits. Qwen-VL: the
held-out loss and greedy captions of the held-out photos scored with CIDEr / BLEU-4 beside the
most-frequent-caption baseline:

  python scripts/evaluate.py --config configs/qwen3_vl/sft.py:tiny --workdir runs/qwen_sft

BLIP-2 stage 2: zero-shot captions of the held-out photos (CIDEr / BLEU-4 beside the
most-frequent-caption baseline) and zero-shot VQA on data/vqa (VQA soft accuracy beside the
most-frequent-answer baseline), on a workdir or an HF ``Blip2ForConditionalGeneration`` directory:

  python scripts/evaluate.py --config configs/blip2/stage2_opt.py:tiny --workdir runs/blip2_stage2
  python scripts/evaluate.py --config configs/blip2/stage2_opt.py:opt2.7b \
      --hf_checkpoint /path/to/blip2-opt-2.7b --output /tmp/eval.json

BLIP-2 retrieval:

  python scripts/evaluate.py --config configs/blip2/stage1.py:tiny --workdir runs/blip2_tiny \
      --splits=val,train
  python scripts/evaluate.py --config configs/blip2/stage1.py:vitg \
      --hf_checkpoint /path/to/blip2-itm-vit-g --config.data.image_size=224

ITC ranking, then ITM re-ranking of the top ``config.eval.k_test`` candidates; recall@1/5/10 in
both directions, printed beside a random ranking's. Results go to stdout and, as JSON, to
``--output`` (default ``<workdir>/eval_results.json``).
"""
import json
import logging
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from absl import app, flags  # noqa: E402
from ml_collections import config_flags  # noqa: E402

config_flags.DEFINE_config_file("config", None, "Config file (path.py[:variant]).",
                                lock_config=True)
flags.DEFINE_string("workdir", None, "Training workdir whose checkpoint to evaluate.")
flags.DEFINE_integer("step", None, "Checkpoint step (default: latest).")
flags.DEFINE_string("hf_checkpoint", None, "Evaluate an HF directory (BLIP-2 retrieval, or Qwen3-VL / "
                    "Qwen3-VL-MoE / Qwen2.5-VL for the Qwen recipes).")
flags.DEFINE_string("output", None, "Where to write the JSON results.")
flags.DEFINE_list("splits", None, "Splits to evaluate (default: config.eval.splits), e.g. val,train.")
flags.mark_flags_as_required(["config"])
FLAGS = flags.FLAGS


def main(argv):
  del argv
  logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
  for name in ("absl", "jax._src.xla_bridge", "orbax"):
    logging.getLogger(name).setLevel(logging.WARNING)
  import jax
  import vlm
  from vlm.tasks import get_task
  from vlm.train import checkpoint
  config = FLAGS.config
  task = get_task(config.task)
  if FLAGS.splits:
    if "splits" not in config.eval:
      raise app.UsageError(f"--splits applies to retrieval tasks; {config.task} has none")
    with config.unlocked():
      config.eval.splits = list(FLAGS.splits)
  if FLAGS.hf_checkpoint:  # either family: vlm.load_pretrained reads the directory's model_type
    import jax.numpy as jnp
    with config.unlocked():
      config.init.hf_checkpoint = FLAGS.hf_checkpoint
    kw = {"dtype": {"float32": jnp.float32, "bfloat16": jnp.bfloat16,
                    "float16": jnp.float16}[config.model.dtype]}
    if "scan_layers" in config.model:
      kw["scan_layers"] = bool(config.model.scan_layers)
    if config.model.get("scan_vision"):  # Qwen only (load_pretrained refuses it for BLIP-2)
      kw["scan_vision"] = True
    model, params, _ = vlm.load_pretrained(FLAGS.hf_checkpoint, **kw)
    want = task.build_model(config)  # a module only: no parameters are made
    kind = lambda m: f"{type(m).__name__} ({type(getattr(m.config, 'llm', None)).__name__})"
    if kind(model) != kind(want):
      raise ValueError(f"{FLAGS.hf_checkpoint} holds a {kind(model)} but --config {config.task} "
                       f"builds a {kind(want)}: pick the config of that model (e.g. "
                       "stage2_opt.py for OPT, stage2_t5.py for FlanT5)")
    step = 0
  elif FLAGS.workdir:
    _, saved = checkpoint.saved_run_config(FLAGS.workdir)
    for key in ("task", "model.preset"):
      a, b = saved, config
      for part in key.split("."):
        a, b = a.get(part), b.get(part)
      if a != b:
        raise ValueError(f"{FLAGS.workdir} was trained with {key}={a!r} but --config has {b!r}: "
                         "pass the run's config file and variant")
    model = task.build_model(config)
    step, params = checkpoint.restore_params(FLAGS.workdir, FLAGS.step)
  else:
    raise app.UsageError("give --workdir (a training run) or --hf_checkpoint (an HF directory)")
  params = jax.device_put(params)
  results = {name: fn(model, params, step, writer=None)
             for name, fn in task.evaluators(config).items()}
  output = FLAGS.output or (os.path.join(FLAGS.workdir, "eval_results.json") if FLAGS.workdir
                            else "eval_results.json")
  with open(output, "w") as f:
    json.dump({"step": step, **results}, f, indent=2)
  print(f"wrote {os.path.abspath(output)}")


if __name__ == "__main__":
  from vlm.train.cli import ConfigError, check_config_argv  # noqa: E402
  try:
    check_config_argv(sys.argv)
  except ConfigError as e:
    sys.exit(f"error: {e}")
  try:
    app.run(main)
  except (ValueError, FileNotFoundError) as e:  # they name the file / key and the fix
    if os.environ.get("VLM_TRACEBACK"):
      raise
    sys.exit(f"error: {type(e).__name__}: {e}")
