r"""Generates text about an image (and optionally a video) with a Qwen3-VL / Qwen2.5-VL checkpoint.

  python scripts/generate.py --checkpoint /path/to/Qwen3-VL-2B-Instruct \
      --image data/coco/images/000000000139.jpg --prompt "Describe this image." \
      --max_new_tokens 40

The checkpoint is an HF ``save_pretrained`` directory (read with :func:`vlm.load_pretrained`). The
prompt goes through the model's chat template as one user turn holding the image (and the video,
when given) then the text; the decoded answer is printed to stdout.
"""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from absl import app, flags  # noqa: E402

FLAGS = flags.FLAGS


def define_flags():
  """Command-line flags (defined only when run as a script, so tests can import ``run``)."""
  flags.DEFINE_string("checkpoint", None, "HF Qwen3-VL / Qwen2.5-VL checkpoint directory.")
  flags.DEFINE_string("image", None, "Image file.")
  flags.DEFINE_string("prompt", "Describe this image.", "User text.")
  flags.DEFINE_string("video", None, "Optional video file (decoded at the processor's fps).")
  flags.DEFINE_integer("max_new_tokens", 20, "Tokens to generate.")
  flags.DEFINE_float("temperature", None, "0 = greedy; > 0 samples. Default: the checkpoint's "
                     "generation_config.json (greedy when it has none or do_sample is false).")
  flags.DEFINE_float("top_p", None, "Nucleus sampling mass (default: generation_config.json, "
                     "else 1.0).")
  flags.DEFINE_integer("top_k", None, "Top-k before top-p (default: generation_config.json, "
                       "else 0 = off).")
  flags.DEFINE_float("repetition_penalty", None, "HF repetition penalty (default: "
                     "generation_config.json, else 1.0 = off).")
  flags.DEFINE_integer("seed", 0, "Sampling seed.")
  flags.DEFINE_integer("max_pixels", None, "Override the processor's image pixel budget.")
  flags.mark_flags_as_required(["checkpoint"])


def run(checkpoint: str, image: str | None, prompt: str, video: str | None = None,
        max_new_tokens: int = 20, temperature: float | None = None, top_p: float | None = None,
        seed: int = 0, max_pixels: int | None = None, top_k: int | None = None,
        repetition_penalty: float | None = None) -> str:
  """Loads ``checkpoint``, generates for one chat turn and returns the decoded answer.

  Sampling settings left None come from the checkpoint's ``generation_config.json``
  (:func:`vlm.inference.generate.load_generation_config`), else greedy without filters.

  Raises:
    ValueError: a non-Qwen-VL checkpoint, or inputs the processor rejects.
    FileNotFoundError: missing checkpoint or media files.
  """
  import dataclasses

  import jax
  from PIL import Image

  import vlm
  from vlm.inference.generate import generate, load_generation_config

  model, params, processor = vlm.load_pretrained(checkpoint)
  if not hasattr(processor, "apply_chat_template"):
    raise ValueError(f"{checkpoint} is not a generative Qwen-VL checkpoint "
                     f"(got {type(model).__name__}); scripts/generate.py needs Qwen3-VL/Qwen2.5-VL")
  if max_pixels is not None:
    processor.config = dataclasses.replace(
        processor.config, max_pixels=max_pixels,
        min_pixels=min(processor.config.min_pixels, max_pixels))
  content = []
  images = videos = None
  if image is not None:
    if not os.path.exists(image):
      raise FileNotFoundError(f"image not found: {image}")
    images = [Image.open(image).convert("RGB")]
    content.append({"type": "image"})
  if video is not None:
    if not os.path.exists(video):
      raise FileNotFoundError(f"video not found: {video}")
    videos = [video]
    content.append({"type": "video"})
  content.append({"type": "text", "text": prompt})
  text = processor.apply_chat_template([{"role": "user", "content": content}])
  batch = processor(text=[text], images=images, videos=videos)
  tok = processor.tokenizer
  settings = dict(eos_token_ids=[tok.eos_token_id, tok.pad_token_id],
                  pad_token_id=tok.pad_token_id)
  settings.update(load_generation_config(checkpoint))
  given = dict(temperature=temperature, top_p=top_p, top_k=top_k,
               repetition_penalty=repetition_penalty)
  settings.update({k: v for k, v in given.items() if v is not None})
  eos = settings["eos_token_ids"]
  out = generate(model, params, batch, max_new_tokens=max_new_tokens,
                 rng=jax.random.PRNGKey(seed), **settings)
  ids = [int(t) for t in out[0]]
  for stop in eos:
    if stop in ids:
      ids = ids[:ids.index(stop)]
  return tok.decode(ids, skip_special_tokens=True)


def main(argv):
  del argv
  print(run(FLAGS.checkpoint, FLAGS.image, FLAGS.prompt, FLAGS.video, FLAGS.max_new_tokens,
            FLAGS.temperature, FLAGS.top_p, FLAGS.seed, FLAGS.max_pixels, FLAGS.top_k,
            FLAGS.repetition_penalty))


if __name__ == "__main__":
  define_flags()
  app.run(main)
