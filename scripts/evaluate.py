r"""Zero-shot image-text retrieval of a BLIP-2 stage-1 model on the embedded COCO splits.

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
flags.DEFINE_string("hf_checkpoint", None, "Evaluate an HF Blip2ForImageTextRetrieval directory.")
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
  from vlm.models.blip2 import Blip2Stage1
  from vlm.tasks import blip2_stage1
  from vlm.train import checkpoint
  config = FLAGS.config
  if FLAGS.splits:
    with config.unlocked():
      config.eval.splits = list(FLAGS.splits)
  if FLAGS.hf_checkpoint:
    from vlm.convert import hf_blip2
    model_config, params = hf_blip2.load_hf_blip2(FLAGS.hf_checkpoint)
    model = Blip2Stage1(config=model_config, dtype=blip2_stage1.dtype_of(config.model.dtype))
    step = 0
  elif FLAGS.workdir:
    model = blip2_stage1.build_model(config)
    step, params = checkpoint.restore_params(FLAGS.workdir, FLAGS.step)
  else:
    raise app.UsageError("give --workdir (a training run) or --hf_checkpoint (an HF directory)")
  params = jax.device_put(params)
  results = {name: fn(model, params, step, writer=None)
             for name, fn in blip2_stage1.evaluators(config).items()}
  output = FLAGS.output or (os.path.join(FLAGS.workdir, "eval_results.json") if FLAGS.workdir
                            else "eval_results.json")
  with open(output, "w") as f:
    json.dump({"step": step, **results}, f, indent=2)
  logging.info("wrote %s", output)


if __name__ == "__main__":
  from vlm.train.cli import ConfigError, check_config_argv  # noqa: E402
  try:
    check_config_argv(sys.argv)
  except ConfigError as e:
    sys.exit(f"error: {e}")
  app.run(main)
