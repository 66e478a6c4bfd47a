r"""CapFilt (BLIP-2 section 3.4): synthetic captions for the training photos, ranked with the human
ones, the top-k per image written as a COCO-captions file that training reads one caption per use.

  python scripts/capfilt.py --captioner runs/blip2_stage2 --scorer runs/blip2_tiny \
      --annotations data/coco/captions_train2017.json --image_dir data/coco/images \
      --output runs/capfilt/captions_capfilt.json --num_samples 10 --top_k 2 --seed 0

``--captioner``: a BLIP-2 stage-2 training workdir (task ``blip2_stage2``) or an HF
``Blip2ForConditionalGeneration`` directory; it samples ``--num_samples`` captions per image with
nucleus sampling (``--top_p`` 0.9) after ``--prompt``. ``--scorer``: a BLIP-2 stage-1 training
workdir (task ``blip2_stage1``) or an HF ``Blip2ForImageTextRetrieval`` directory; its ITC
image-text similarity ranks the synthetic and human captions (the paper used CLIP ViT-L/14, whose
weights do not install offline here). See :mod:`vlm.inference.capfilt` for the rules (degenerate
and duplicate captions, unreadable images, determinism).

Prints the counts (images, synthetic vs human kept, skips, seconds), three examples and the
``scripts/train.py`` flags that train on the output with one kept caption drawn per use
(``--config.data.caption_sampling=per_image``). The run's statistics go to
``<output>.stats.json``.
"""
import json
import logging
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from absl import app, flags  # noqa: E402

FLAGS = flags.FLAGS


def define_flags():
  """Command-line flags (defined only when run as a script, so tests can import ``run``)."""
  flags.DEFINE_string("captioner", None, "Stage-2 training workdir or HF "
                      "Blip2ForConditionalGeneration directory (samples the captions).")
  flags.DEFINE_string("scorer", None, "Stage-1 training workdir or HF Blip2ForImageTextRetrieval "
                      "directory (ranks captions by ITC image-text similarity).")
  flags.DEFINE_string("annotations", "data/coco/captions_train2017.json",
                      "Source COCO-captions json (the human captions).")
  flags.DEFINE_string("image_dir", "data/coco/images", "Directory of the images' file_name.")
  flags.DEFINE_string("output", "runs/capfilt/captions_capfilt.json", "Output COCO-captions json.")
  flags.DEFINE_integer("num_samples", 10, "Captions sampled per image (paper: 10).")
  flags.DEFINE_integer("top_k", 2, "Captions kept per image (paper: 2).")
  flags.DEFINE_float("top_p", 0.9, "Nucleus sampling mass (paper: 0.9).")
  flags.DEFINE_float("temperature", 1.0, "Sampling temperature (> 0).")
  flags.DEFINE_integer("max_new_tokens", 30, "Longest synthetic caption in LLM tokens.")
  flags.DEFINE_integer("min_new_tokens", 5, "Shortest synthetic caption in LLM tokens.")
  flags.DEFINE_string("prompt", "a photo of", "Text the captioner continues (not stored).")
  flags.DEFINE_integer("batch_size", 8, "Images per generate call (x num_samples rows).")
  flags.DEFINE_integer("max_images", None, "Only the first N images of the file (default: all).")
  flags.DEFINE_integer("seed", 0, "Sampling seed.")
  flags.mark_flags_as_required(["captioner", "scorer"])


def run(captioner: str, scorer: str, annotations: str, image_dir: str, output: str, *,
        num_samples: int = 10, top_k: int = 2, top_p: float = 0.9, temperature: float = 1.0,
        max_new_tokens: int = 30, min_new_tokens: int = 5, prompt: str = "a photo of",
        batch_size: int = 8, max_images: int | None = None, seed: int = 0) -> dict:
  """Loads both models, runs :func:`vlm.inference.capfilt.capfilt`, writes ``output`` and
  ``output.stats.json``, prints the summary. Returns the stats dict (with ``output``,
  ``train_flags`` and ``examples``).

  Raises:
    FileNotFoundError: a directory that is neither a workdir nor an HF model directory, missing
      annotation file.
    ValueError: a directory of the wrong kind (stage 1 as captioner, stage 2 as scorer), bad
      settings.
  """
  import jax

  from vlm.data.paths import resolve_path
  from vlm.inference import capfilt as C

  if not os.path.isdir(resolve_path(image_dir)):
    raise FileNotFoundError(f"--image_dir {image_dir} is not a directory (the folder of the "
                            "annotation file's file_name images)")
  gen, size, cap_desc = C.load_captioner(captioner)
  score_fn, score_desc = C.load_scorer(scorer)
  gen.params = jax.device_put(gen.params)
  print(f"captioner: {cap_desc}, {size} px; scorer: ITC of {score_desc}, {score_fn.image_size} px")

  def progress(done, total):
    logging.info("capfilt: %d / %d images", done, total)

  coco, stats = C.capfilt(
      gen, score_fn, annotations, image_dir, num_samples=num_samples, top_k=top_k, top_p=top_p,
      temperature=temperature, max_new_tokens=max_new_tokens, min_new_tokens=min_new_tokens,
      prompt=prompt, batch_size=batch_size, seed=seed, image_size=size, max_images=max_images,
      progress=progress)
  s = stats.as_dict()
  if s["images"] and not s["images_scored"]:
    raise ValueError(f"none of the {s['images']} images could be read (e.g. {s['skipped'][0]}); "
                     f"check --image_dir {image_dir}; nothing written")
  path = C.write_captions(coco, output)
  kept = s["kept_synthetic"] + s["kept_human"]
  print(f"CapFilt: {s['images']} images in {s['seconds']:.1f}s "
        f"({s['images'] / max(s['seconds'], 1e-9):.2f} images/s), {s['images_scored']} ranked, "
        f"{s['images_skipped']} skipped (unreadable, kept with {s['kept_human_unscored']} unscored "
        "human captions)")
  print(f"  candidates: {s['synthetic_sampled']} synthetic sampled ({s['synthetic_degenerate']} "
        f"degenerate, {s['synthetic_duplicates']} duplicates dropped) + {s['human_captions']} "
        f"human ({s['human_degenerate']} unusable, {s['human_duplicates']} duplicates dropped) -> "
        f"{s['candidates']} ranked")
  print(f"  kept (top {top_k} per image): {kept} = {s['kept_synthetic']} synthetic "
        f"({100 * s['kept_synthetic'] / max(kept, 1):.0f}%) + {s['kept_human']} human; mean score "
        f"{s['mean_kept_score']:.4f} kept vs {s['mean_candidate_score']:.4f} over all candidates")
  for e in s["skipped"][:5]:
    print(f"  skipped {e[0]}: {e[1]}")
  by_image, examples = {}, []
  for a in coco["annotations"]:
    by_image.setdefault(a["image_id"], []).append(a)
  names = {im["id"]: im["file_name"] for im in coco["images"]}
  for image_id, anns in by_image.items():
    if len(examples) == 3:
      break
    if anns[0]["score"] is None:
      continue
    examples.append({"image": names.get(image_id), "kept": [
        {"caption": a["caption"], "source": a["source"], "score": a["score"]} for a in anns]})
  for e in examples:
    print(f"  {e['image']}:")
    for a in e["kept"]:
      print(f"    {a['score']:.4f} {a['source']:9s} {a['caption']!r}")
  flags_ = C.train_flags(path, annotations, image_dir)
  if os.path.isdir(os.path.join(scorer, "checkpoints")):  # the stage-1 run initialises stage 2
    flags_.append(f"--config.init.stage1_workdir={os.path.abspath(scorer)}")
  print(f"wrote {path} ({len(coco['annotations'])} captions for {len(coco['images'])} images)")
  print("train on it (one kept caption drawn per use; stage2_t5.py and stage1.py the same):")
  print("  python scripts/train.py --config configs/blip2/stage2_opt.py:tiny --workdir "
        "runs/blip2_stage2_capfilt \\\n      " + " \\\n      ".join(flags_))
  s.update(output=path, train_flags=flags_, examples=examples, captioner=cap_desc,
           scorer=score_desc)
  with open(path + ".stats.json", "w") as f:
    json.dump(s, f, indent=2)
  return s


def main(argv):
  del argv
  logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
  for name in ("absl", "jax._src.xla_bridge", "orbax"):
    logging.getLogger(name).setLevel(logging.WARNING)
  try:
    run(FLAGS.captioner, FLAGS.scorer, FLAGS.annotations, FLAGS.image_dir, FLAGS.output,
        num_samples=FLAGS.num_samples, top_k=FLAGS.top_k, top_p=FLAGS.top_p,
        temperature=FLAGS.temperature, max_new_tokens=FLAGS.max_new_tokens,
        min_new_tokens=FLAGS.min_new_tokens, prompt=FLAGS.prompt, batch_size=FLAGS.batch_size,
        max_images=FLAGS.max_images, seed=FLAGS.seed)
  except (FileNotFoundError, ValueError) as e:
    sys.exit(f"error: {e}")


if __name__ == "__main__":
  define_flags()
  app.run(main)
