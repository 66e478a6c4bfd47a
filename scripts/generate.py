r"""Generates text about an image (and optionally a video) with a Qwen3-VL / Qwen2.5-VL checkpoint.

  python scripts/generate.py --checkpoint /path/to/Qwen3-VL-2B-Instruct \
      --image data/coco/images/000000000139.jpg --prompt "Describe this image." \
      --max_new_tokens 40

The checkpoint is an HF ``save_pretrained`` directory (read with :func:`vlm.load_pretrained`). The
prompt goes through the model's chat template as one user turn holding the image (and the video,
when given) then the text; the decoded answer is printed to stdout.

Images are read with :func:`vlm.data.image.load_rgb` (EXIF orientation applied) and resized to at
most ``--max_pixels`` (default :data:`DEFAULT_MAX_PIXELS`, about 1k visual tokens, not the
checkpoint's 16.7M-pixel budget: see the flag's help). Before anything is compiled the request's
memory is estimated (:func:`vlm.inference.generate.estimate_generate_memory`) and compared with
the device's (:func:`vlm.inference.generate.device_memory_limit`); a request that cannot fit
fails at once with the numbers and a ``--max_pixels`` value that fits, instead of an
out-of-memory crash minutes later. Large images are reported on stderr with their visual token
count.
"""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from absl import app, flags  # noqa: E402

FLAGS = flags.FLAGS

DEFAULT_MAX_PIXELS = 1024 * 32 * 32
"""Default image pixel budget of this script: 1,048,576 px = 1024 visual tokens on Qwen3-VL
(patch 16, merge 2; about 1337 on Qwen2.5-VL, patch 14). The vision tower attends densely over all
patches, float32 scores ``[heads, N, N]`` per block: at this budget N = 4096 patches, about 1 GiB
per attention matrix for 16 heads, and a prompt of ~1k tokens, which a 16 GB laptop holds next to
a 2B model. The checkpoint's own budget (Qwen3-VL: 16,777,216 px = 16,384 visual tokens) turns a
6000x6000 photo into N = 65,536 patches, 256 GiB per attention matrix."""


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
  flags.DEFINE_integer("num_beams", 1, "Beam search with this many beams (HF generate(num_beams=n, "
                       "do_sample=False)); > 1 decodes greedily (the checkpoint's sampling "
                       "settings are ignored). 1 = greedy / sampling.")
  flags.DEFINE_float("length_penalty", 1.0, "Beam search: hypotheses ranked by sum of log-probs / "
                     "new_tokens ** length_penalty (> 0 favours longer answers).")
  flags.DEFINE_integer(
      "max_pixels", DEFAULT_MAX_PIXELS,
      "Image pixel budget: larger images are downscaled (aspect kept) to at most this many "
      "pixels. Default 1024*32*32 = 1048576 = 1024 visual tokens on Qwen3-VL (~1337 on "
      "Qwen2.5-VL), because the vision tower's attention is dense, [heads, N, N] float32 over "
      "N = pixels / patch^2 patches: the checkpoint's own budget (16777216 px on Qwen3-VL) makes "
      "a 6000x6000 photo 65536 patches = 256 GiB per attention matrix and 16384 prompt tokens. "
      "0 = the checkpoint's own budget (HF's preprocessor default). Requests estimated not to "
      "fit in memory fail before compiling, with a value that fits.")
  flags.DEFINE_integer(
      "video_max_pixels", 0,
      "Video pixel budget (Qwen3-VL: over the whole clip; Qwen2.5-VL: per frame). 0 = the "
      "checkpoint's own budget.")
  flags.mark_flags_as_required(["checkpoint"])


def _with_budgets(config, max_pixels: int | None, video_max_pixels: int | None):
  """The processor config with the image / video pixel budgets replaced (None or 0: unchanged)."""
  import dataclasses
  if max_pixels:
    config = dataclasses.replace(config, max_pixels=int(max_pixels),
                                 min_pixels=min(config.min_pixels, int(max_pixels)))
  if video_max_pixels:
    config = dataclasses.replace(config, video_max_pixels=int(video_max_pixels),
                                 video_min_pixels=min(config.video_min_pixels,
                                                      int(video_max_pixels)))
  return config


def _resized_batch(batch, config, image_size, video_budget: int | None):
  """Shapes-only batch (what ``estimate_generate_memory`` reads) for the image of
  ``image_size`` (W, H) under ``config``'s budget and, with ``video_budget``, the video frames
  re-fitted to it; None when ``video_budget`` is below the smallest clip."""
  import numpy as np

  from vlm.data import qwen_processor as qp

  ids = np.asarray(batch["input_ids"])
  unit = config.merge_size ** 2
  out = {"input_ids": None}
  tokens = ids.shape[1]
  if image_size is not None:
    old = int(np.prod(batch["image_grid_thw"][0])) // unit
    rh, rw = qp.smart_resize(image_size[1], image_size[0], config.factor, config.min_pixels,
                             config.max_pixels)
    grid = np.array([[1, rh // config.patch_size, rw // config.patch_size]])
    out["image_grid_thw"] = grid
    tokens += int(np.prod(grid)) // unit - old
  if batch.get("video_grid_thw") is not None:
    vgrid = np.asarray(batch["video_grid_thw"]).reshape(-1, 3)
    if video_budget:
      t, h, w = (int(x) for x in vgrid[0])
      height, width = h * config.patch_size, w * config.patch_size
      try:
        if config.video_budget == "clip":
          rh, rw = qp.smart_resize_video(t * config.temporal_patch_size, height, width,
                                         config.temporal_patch_size, config.factor,
                                         min(config.video_min_pixels, video_budget), video_budget)
        else:
          rh, rw = qp.smart_resize(height, width, config.factor,
                                   min(config.video_min_pixels, video_budget), video_budget)
      except ValueError:
        return None
      new = np.array([[t, rh // config.patch_size, rw // config.patch_size]])
      tokens += (int(np.prod(new)) - int(np.prod(vgrid[0]))) // unit
      vgrid = new
    out["video_grid_thw"] = vgrid
  out["input_ids"] = np.zeros((1, tokens), np.int64)
  return out


def check_memory(model, params, batch, max_new_tokens: int, config, image_size=None,
                 has_video: bool = False, num_beams: int = 1) -> dict:
  """Estimates the request's memory and raises if it does not fit, suggesting budgets that do.

  Args:
    model, params, batch, max_new_tokens: as :func:`vlm.inference.generate.generate`.
    config: the processor config the batch was made with.
    image_size: (width, height) of the source image, or None.
    has_video: the batch holds a video.
    num_beams: beams of the generation (the KV cache and logits count ``batch x num_beams``).

  Returns:
    The estimate (:func:`vlm.inference.generate.estimate_generate_memory`).

  Raises:
    vlm.inference.generate.GenerateMemoryError: (a ValueError) raised before anything is
      compiled; names the estimate and the device memory in GiB, the image size, its patch and
      visual token counts, and ``--max_pixels N`` (``--video_max_pixels N``) values estimated to
      fit, or says that the parameters alone do not fit.
  """
  import numpy as np

  from vlm.inference import generate as G

  est = G.estimate_generate_memory(model, params, batch, max_new_tokens, num_beams=num_beams)
  limit = G.device_memory_limit()
  if limit is None or est["total"] <= limit:
    return est
  gib = lambda n: f"{n / 2 ** 30:.2f} GiB"
  unit = config.merge_size ** 2
  what = []
  if image_size is not None:
    grid = np.asarray(batch["image_grid_thw"])[0]
    n = int(np.prod(grid))
    what.append(f"the {image_size[0]}x{image_size[1]} image becomes "
                f"{grid[2] * config.patch_size}x{grid[1] * config.patch_size} px = {n} patches, "
                f"{n // unit} visual tokens (image budget {config.max_pixels} px)")
  if has_video:
    vgrid = np.asarray(batch["video_grid_thw"]).reshape(-1, 3)[0]
    n = int(np.prod(vgrid))
    what.append(f"the video becomes {n} patches, {n // unit} visual tokens (video budget "
                f"{config.video_max_pixels} px)")
  what.append(f"prompt {np.asarray(batch['input_ids']).shape[1]} tokens, max_new_tokens "
              f"{max_new_tokens}")
  # largest budgets that fit: shrink the image first, then the video too
  import dataclasses
  fix = None
  for scale in [0.85 ** k for k in range(1, 60)]:
    cand = config
    if image_size is not None:
      px = max(1, int(config.max_pixels * scale) // config.factor ** 2) * config.factor ** 2
      cand = dataclasses.replace(cand, max_pixels=px, min_pixels=min(config.min_pixels, px))
    for video_budget in ([None] + ([int(config.video_max_pixels * scale)] if has_video else [])):
      shapes = _resized_batch(batch, cand, image_size, video_budget)
      if shapes is None:
        continue
      trial = G.estimate_generate_memory(model, params, shapes, max_new_tokens,
                                         num_beams=num_beams)
      if trial["total"] <= limit:
        fix = (cand, video_budget, shapes, trial)
        break
    if fix is not None:
      break
  if fix is None:
    hint = (f"even the smallest images do not fit: the parameters alone take "
            f"{gib(est['params'])}; use a smaller checkpoint, fewer --max_new_tokens or a device "
            "with more memory")
  else:
    cand, video_budget, shapes, trial = fix
    flags_ = []
    if image_size is not None:
      tokens = int(np.prod(shapes["image_grid_thw"][0])) // unit
      flags_.append(f"--max_pixels {cand.max_pixels} (~{tokens} visual tokens)")
    if video_budget:
      flags_.append(f"--video_max_pixels {video_budget}")
    hint = (f"rerun with {' '.join(flags_) or 'fewer --max_new_tokens'} (estimated "
            f"{gib(trial['total'])})")
  raise G.GenerateMemoryError(
      f"scripts/generate.py: this request needs an estimated {G.format_memory_estimate(est)}, "
      f"more than the {gib(limit)} this device has: {'; '.join(what)}. {hint}.")


def _report(path: str, image_size, batch, config) -> None:
  """stderr note with the visual token count of a downscaled or large image."""
  import numpy as np
  grid = np.asarray(batch["image_grid_thw"])[0]
  tokens = int(np.prod(grid)) // config.merge_size ** 2
  w, h = image_size
  rw, rh = int(grid[2]) * config.patch_size, int(grid[1]) * config.patch_size
  if w * h > config.max_pixels or tokens >= 1024:
    print(f"image {path}: {w}x{h} px -> {rw}x{rh} px, {tokens} visual tokens (image budget "
          f"{config.max_pixels} px; --max_pixels changes it)", file=sys.stderr)


def run(checkpoint: str, image: str | None, prompt: str, video: str | None = None,
        max_new_tokens: int = 20, temperature: float | None = None, top_p: float | None = None,
        seed: int = 0, max_pixels: int | None = DEFAULT_MAX_PIXELS, top_k: int | None = None,
        repetition_penalty: float | None = None, video_max_pixels: int | None = None,
        num_beams: int = 1, length_penalty: float = 1.0) -> str:
  """Loads ``checkpoint``, generates for one chat turn and returns the decoded answer.

  Sampling settings left None come from the checkpoint's ``generation_config.json``
  (:func:`vlm.inference.generate.load_generation_config`), else greedy without filters.
  ``num_beams > 1`` runs beam search (greedy: the checkpoint's sampling settings are ignored;
  an explicit ``temperature > 0`` is refused) with ``length_penalty``.
  ``max_pixels`` (default :data:`DEFAULT_MAX_PIXELS`) / ``video_max_pixels`` replace the
  processor's pixel budgets; None or 0 keeps the checkpoint's own.

  Raises:
    ValueError: a non-Qwen-VL checkpoint, or inputs the processor rejects.
    vlm.data.image.BadSampleError: (a ValueError) an image file that cannot be decoded.
    vlm.inference.generate.GenerateMemoryError: (a ValueError) a request estimated not to fit in
      the device's memory (see :func:`check_memory`), raised before compiling.
    FileNotFoundError: missing checkpoint or media files.
  """
  import jax

  import vlm
  from vlm.data.image import load_rgb
  from vlm.inference import generate as G

  model, params, processor = vlm.load_pretrained(checkpoint)
  if not hasattr(processor, "apply_chat_template"):
    raise ValueError(f"{checkpoint} is not a generative Qwen-VL checkpoint "
                     f"(got {type(model).__name__}); scripts/generate.py needs Qwen3-VL/Qwen2.5-VL")
  processor.config = _with_budgets(processor.config, max_pixels, video_max_pixels)
  content = []
  images = videos = None
  image_size = None
  if image is not None:
    if not os.path.exists(image):
      raise FileNotFoundError(f"image not found: {image}")
    pil = load_rgb(image)
    image_size = pil.size
    images = [pil]
    content.append({"type": "image"})
  if video is not None:
    if not os.path.exists(video):
      raise FileNotFoundError(f"video not found: {video}")
    videos = [video]
    content.append({"type": "video"})
  content.append({"type": "text", "text": prompt})
  text = processor.apply_chat_template([{"role": "user", "content": content}])
  batch = processor(text=[text], images=images, videos=videos)
  if image is not None:
    _report(image, image_size, batch, processor.config)
  check_memory(model, params, batch, max_new_tokens, processor.config, image_size,
               video is not None, num_beams=num_beams)
  tok = processor.tokenizer
  settings = dict(eos_token_ids=[tok.eos_token_id, tok.pad_token_id],
                  pad_token_id=tok.pad_token_id)
  settings.update(G.load_generation_config(checkpoint))
  given = dict(temperature=temperature, top_p=top_p, top_k=top_k,
               repetition_penalty=repetition_penalty)
  if num_beams > 1:  # beam search is greedy: drop the checkpoint's sampling defaults
    for key in ("temperature", "top_p", "top_k"):
      settings.pop(key, None)
  settings.update({k: v for k, v in given.items() if v is not None})
  if num_beams > 1:
    settings.update(num_beams=num_beams, length_penalty=length_penalty)
  eos = settings["eos_token_ids"]
  out = G.generate(model, params, batch, max_new_tokens=max_new_tokens,
                   rng=jax.random.PRNGKey(seed), check_memory=False, **settings)
  ids = [int(t) for t in out[0]]
  for stop in eos:
    if stop in ids:
      ids = ids[:ids.index(stop)]
  return tok.decode(ids, skip_special_tokens=True)


def main(argv):
  del argv
  print(run(FLAGS.checkpoint, FLAGS.image, FLAGS.prompt, FLAGS.video, FLAGS.max_new_tokens,
            FLAGS.temperature, FLAGS.top_p, FLAGS.seed, FLAGS.max_pixels, FLAGS.top_k,
            FLAGS.repetition_penalty, FLAGS.video_max_pixels, FLAGS.num_beams,
            FLAGS.length_penalty))


if __name__ == "__main__":
  define_flags()
  app.run(main)
