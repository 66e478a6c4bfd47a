r"""Captions photos or answers questions about them with a BLIP-2 stage-2 model (OPT or FlanT5).

  python scripts/caption.py --checkpoint runs/blip2_stage2 --image data/coco/images/000000000139.jpg
  python scripts/caption.py --checkpoint /path/to/blip2-opt-2.7b --image photo.jpg \
      --prompt "Question: what is the man holding? Answer:" --max_new_tokens 10 --length_penalty -1

``--checkpoint`` is a vlm training workdir (``configs/blip2/stage2_*.py``; the newest intact
checkpoint and its run config are read) or an HF ``Blip2ForConditionalGeneration`` directory
(``save_pretrained`` layout, safetensors). Decoding is LAVIS's: beam search with 5 beams, at most
30 new tokens (spec 4.4); ``--temperature > 0`` samples instead (nucleus, ``--top_p``; beams
default to 1 then). The prompt
defaults to the paper's captioning prompt "a photo of"; ``--prompt ""`` captions without one.
Several ``--image`` flags caption several photos in one batch; a photo that cannot be read is
reported on stderr and skipped (exit status 1 if none could be read). One line per photo:
``<path>\t<text>``.
"""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from absl import app, flags  # noqa: E402

FLAGS = flags.FLAGS


def define_flags():
  flags.DEFINE_string("checkpoint", None, "A vlm stage-2 workdir or an HF "
                      "Blip2ForConditionalGeneration directory.")
  flags.DEFINE_multi_string("image", None, "Photo(s) to caption (repeat the flag for several).")
  flags.DEFINE_string("prompt", "a photo of", "Text the LLM continues after the visual prompt "
                      "(VQA: 'Question: ... Answer:'; '' for none).")
  flags.DEFINE_integer("num_beams", None, "Beams (1 = greedy or sampling); default 5, or 1 with "
                       "--temperature > 0.")
  flags.DEFINE_integer("max_new_tokens", 30, "Most tokens to generate.")
  flags.DEFINE_integer("min_new_tokens", 1, "Fewest tokens before a stop token may end the text.")
  flags.DEFINE_float("length_penalty", 1.0, "Beam search length penalty (HF; VQA uses -1).")
  flags.DEFINE_float("temperature", 0.0, "> 0 samples (with --num_beams 1).")
  flags.DEFINE_float("top_p", 0.9, "Nucleus mass when sampling.")
  flags.DEFINE_integer("seed", 0, "Sampling seed.")
  flags.DEFINE_integer("step", None, "Workdir checkpoint step (default: newest intact).")
  flags.mark_flags_as_required(["checkpoint", "image"])


def load_model(checkpoint: str, step=None):
  """``(model, params, image_size)`` of a stage-2 workdir or HF directory.

  Raises:
    FileNotFoundError: neither a workdir nor an HF directory.
    ValueError: a workdir of another task, or an HF directory that is not a stage-2 BLIP-2.
  """
  if os.path.isdir(os.path.join(checkpoint, "checkpoints")):
    from vlm.tasks import get_task
    from vlm.train.checkpoint import restore_run
    _, config, params = restore_run(checkpoint, step)
    if config.task != "blip2_stage2":
      raise ValueError(f"{checkpoint} is a {config.task!r} run; captioning needs a BLIP-2 stage-2 "
                       "run (configs/blip2/stage2_opt.py or stage2_t5.py)")
    return get_task(config.task).build_model(config), params, int(config.data.image_size)
  if os.path.isfile(os.path.join(checkpoint, "config.json")):
    import vlm
    from vlm.models.blip2 import Blip2Stage2
    model, params, _ = vlm.load_pretrained(checkpoint)
    if not isinstance(model, Blip2Stage2):
      raise ValueError(f"{checkpoint} holds a {type(model).__name__}; captioning needs an HF "
                       "Blip2ForConditionalGeneration (OPT or FlanT5) directory")
    return model, params, model.config.vision.image_size
  raise FileNotFoundError(f"{checkpoint} is neither a vlm workdir (no checkpoints/) nor an HF "
                          "directory (no config.json)")


def main(argv):
  del argv
  import jax
  from vlm.inference.blip2_generate import Blip2Generator, load_images
  from absl import logging as absl_logging
  absl_logging.set_verbosity(absl_logging.ERROR)  # orbax's per-item read-only notices
  num_beams = FLAGS.num_beams if FLAGS.num_beams is not None else (
      1 if FLAGS.temperature > 0 else 5)
  model, params, size = load_model(FLAGS.checkpoint, FLAGS.step)
  pixels, ok, errors = load_images(FLAGS.image, size)
  for path, why in errors:
    print(f"skipped {path}: {why}", file=sys.stderr)
  if not ok:
    sys.exit("error: no photo could be read")
  gen = Blip2Generator(model, params)
  texts = gen.generate(pixels, FLAGS.prompt, num_beams=num_beams,
                       max_new_tokens=FLAGS.max_new_tokens, min_new_tokens=FLAGS.min_new_tokens,
                       length_penalty=FLAGS.length_penalty, temperature=FLAGS.temperature,
                       top_p=FLAGS.top_p, rng=jax.random.PRNGKey(FLAGS.seed))
  for i, text in zip(ok, texts):
    print(f"{FLAGS.image[i]}\t{text}")


if __name__ == "__main__":
  define_flags()
  try:
    app.run(main)
  except (ValueError, FileNotFoundError) as e:
    sys.exit(f"error: {e}")
