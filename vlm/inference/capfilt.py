"""CapFilt: synthetic captions for the training photos, ranked with the human ones by image-text
similarity, the top ``k`` per image written as a COCO-captions file.

Method (BLIP-2 paper section 3.4, Li et al. 2023, arXiv:2301.12597; the bootstrapping of BLIP,
Li et al. 2022, section 3.3): for every training image the captioner (here the BLIP-2 stage-2
model, :class:`vlm.inference.blip2_generate.Blip2Generator`) samples ``N`` captions with nucleus
sampling (``top_p`` 0.9, paper N = 10); they are ranked together with the image's original
captions by an image-text similarity, the top two are kept, and pre-training draws one of the kept
captions at random each time it uses the image (``data.caption_sampling="per_image"``,
:class:`vlm.data.pipeline.PerImageSource`).

Differences from the paper, on purpose:

* **Scorer.** BLIP-2 ranks with CLIP ViT-L/14. No CLIP weights install offline here, so the
  default scorer (:class:`ItcScorer`) is the stage-1 model's own ITC similarity: the maximum over
  the query outputs of ``image_feats [Q,E] . text_feat [E]`` (both l2-normalised, LAVIS
  ``Blip2Qformer``; the same score as zero-shot retrieval,
  :func:`vlm.tasks.blip2_stage1.evaluate_retrieval`). Any callable
  ``(pixel_values float32 [B,S,S,3], captions: list of B lists of str) -> list of B float arrays``
  can replace it (a CLIP scorer, for instance); an optional ``image_size`` attribute says which
  resolution it wants (default: the captioner's).
* **Synthetic captions without the prompt.** The captioner continues ``prompt`` ("a photo of");
  the stored caption is the continuation only, as BLIP's CapFilt strips its prompt
  (``caption[len(prompt):]``). Training prepends its own prompt (``data.prompt``).
* **Degenerate and duplicate candidates.** A synthetic caption that is empty or holds no visible
  character after :func:`vlm.data.text.pre_caption`, or a lone surrogate
  (:func:`vlm.data.text.caption_problem`), is dropped before ranking; so are human captions with
  those problems (training would drop them anyway). Candidates whose ``pre_caption`` forms are
  equal are collapsed into the first one (human captions come first, so a synthetic copy of a
  human caption is counted as a duplicate and the human one stays).
* **Unreadable images** (missing, empty, not decodable) are counted skips. They stay in
  ``images`` and keep all their usable human captions, unscored (``"score": null``), so the
  output never holds less of the original data than the input; the training loader's own
  validation drops them if they are still unreadable then.
* **Ties** (equal scores) keep candidate order: human captions first, then synthetic ones in
  sampling order.

Determinism: ``batch_size`` images are captioned per generate call (``N`` rows each) with the
key ``fold_in(PRNGKey(seed), index of the batch's first image)``; the output is a function of the
annotation file, the weights, ``seed``, ``batch_size`` and the settings.

Output: ``{"info", "licenses", "images", "annotations"}`` in COCO-captions format. ``images`` is
the input's list unchanged (its first ``max_images`` entries when that is given). Every
annotation has a fresh unique integer ``id`` (1, 2, ... in output order), ``image_id``,
``caption`` and the extra fields ``"source"`` (``"synthetic"`` or ``"human"``), ``"score"``
(float, or None for an unreadable image) and, for human captions, ``"original_id"``. Per image
the kept captions are sorted by decreasing score.
"""
from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import tempfile
import time
from typing import Any, Callable, Sequence

import jax
import numpy as np

from vlm.data.text import caption_problem, pre_caption

log = logging.getLogger("vlm.inference")

ScoreFn = Callable[[np.ndarray, Sequence[Sequence[str]]], list]
"""``(pixel_values float32 [B,S,S,3], captions: B lists of str) -> B float arrays [n_b]``."""


# -------------------------------------------------------------------------------------------------
# Scorer
# -------------------------------------------------------------------------------------------------

class ItcScorer:
  """Stage-1 ITC image-text similarity (the CapFilt ranking score used here instead of CLIP).

  ``score(image, caption) = max_q image_feats[q] . text_feat`` with ``image_feats`` [Q,E] the
  l2-normalised projected query outputs and ``text_feat`` [E] the l2-normalised projected [CLS]
  output of the Q-Former (BLIP-2 section 3.1, LAVIS ``Blip2Qformer.forward`` ``sim_i2t``), in
  [-1, 1]. Captions are cleaned with :func:`vlm.data.text.pre_caption` (``max_words``) and
  tokenised with the BERT WordPiece tokenizer to ``max_text_len`` tokens, as in training.

  Args:
    model: a :class:`vlm.models.blip2.Blip2Stage1`; params: its ``"params"``.
    image_size: S of the pixels it expects (the run's ``data.image_size``).
    max_text_len: T of the text tokens (the run's ``data.max_text_len``).
    max_words: ``pre_caption`` word limit.
    tokenizer: a :class:`vlm.data.text.Blip2Tokenizer` (default: the bundled vocabulary).
    batch_size: rows per jitted call (the last chunk padded, so one compile per function).
  """

  def __init__(self, model, params, *, image_size: int, max_text_len: int = 32,
               max_words: int = 50, tokenizer=None, batch_size: int = 64):
    from vlm.data.text import Blip2Tokenizer
    from vlm.tasks.blip2_stage1 import Blip2RetrievalModel
    if isinstance(params, dict) and set(params) == {"params"}:
      params = params["params"]
    self.image_size = int(image_size)
    self.max_text_len = int(max_text_len)
    self.max_words = int(max_words)
    self.tokenizer = tokenizer or Blip2Tokenizer()
    self._rm = Blip2RetrievalModel(model, params, batch_size)

  def image_feats(self, pixel_values: np.ndarray) -> np.ndarray:
    """float [B,S,S,3] -> l2-normalised per-query features float32 [B,Q,E]."""
    return self._rm.image_feats(self._rm.image_embeds(np.asarray(pixel_values, np.float32)))

  def text_feats(self, captions: Sequence[str]) -> np.ndarray:
    """Raw captions -> l2-normalised text features float32 [M,E]."""
    texts = [pre_caption(c, self.max_words) for c in captions]
    ids, mask = self.tokenizer.tokenize(texts, self.max_text_len)
    return self._rm.text_feats(ids, mask)

  def __call__(self, pixel_values: np.ndarray, captions: Sequence[Sequence[str]]) -> list:
    """ITC similarities: one float32 array [n_b] per image ``b`` over ``captions[b]``.

    Raises:
      ValueError: ``captions`` is not one list per image.
    """
    pixel_values = np.asarray(pixel_values, np.float32)
    if len(captions) != pixel_values.shape[0]:
      raise ValueError(f"{len(captions)} caption lists for {pixel_values.shape[0]} images; give "
                       "one list per image")
    img = self.image_feats(pixel_values)
    flat = [c for cs in captions for c in cs]
    if not flat:
      return [np.zeros((0,), np.float32) for _ in captions]
    txt = self.text_feats(flat)
    out, start = [], 0
    for b, cs in enumerate(captions):
      t = txt[start:start + len(cs)]
      start += len(cs)
      out.append(np.einsum("qe,te->tq", img[b], t).max(-1).astype(np.float32)
                 if len(cs) else np.zeros((0,), np.float32))
    return out


# -------------------------------------------------------------------------------------------------
# Loading models from directories
# -------------------------------------------------------------------------------------------------

def _is_workdir(path: str) -> bool:
  return os.path.isdir(os.path.join(path, "checkpoints"))


def _is_hf_dir(path: str) -> bool:
  return os.path.isfile(os.path.join(path, "config.json"))


def load_captioner(path: str):
  """The captioner of a stage-2 training workdir (task ``blip2_stage2``) or an HF
  ``Blip2ForConditionalGeneration`` directory.

  Returns:
    ``(Blip2Generator, image_size, description)``.
  Raises:
    FileNotFoundError: ``path`` is neither a workdir (``checkpoints/``) nor an HF directory
      (``config.json``).
    ValueError: a stage-1 run or an HF retrieval checkpoint (the message says which flag takes it).
  """
  from vlm.inference.blip2_generate import Blip2Generator
  if _is_workdir(path):
    from vlm.tasks import get_task
    from vlm.train.checkpoint import restore_run
    step, config, params = restore_run(path)
    if config.task != "blip2_stage2":
      raise ValueError(f"--captioner {path} is a {config.task!r} run; the captioner must be a BLIP-2 "
                       f"stage-2 run (task 'blip2_stage2', configs/blip2/stage2_*.py) or an HF "
                       "Blip2ForConditionalGeneration directory"
                       + (" (a stage-1 run goes to --scorer)" if config.task == "blip2_stage1"
                          else ""))
    model = get_task(config.task).build_model(config)
    return (Blip2Generator(model, params), int(config.data.image_size),
            f"stage-2 run {path} step {step} ({config.model.preset})")
  if _is_hf_dir(path):
    from vlm.convert.hf_blip2 import is_conditional_generation, load_hf_blip2_stage2
    from vlm.models.blip2 import Blip2Stage2
    if not is_conditional_generation(path):
      raise ValueError(f"--captioner {path} is not an HF Blip2ForConditionalGeneration directory "
                       "(its config.json lists other architectures; a retrieval checkpoint goes "
                       "to --scorer)")
    config, params = load_hf_blip2_stage2(path)
    return (Blip2Generator(Blip2Stage2(config), params), int(config.vision.image_size),
            f"HF BLIP-2 {path} ({config.llm_kind})")
  raise FileNotFoundError(f"--captioner {path}: neither a training workdir (no checkpoints/) nor "
                          "an HF model directory (no config.json)")


def load_scorer(path: str, batch_size: int = 64) -> tuple[ItcScorer, str]:
  """The ITC scorer of a stage-1 training workdir (task ``blip2_stage1``) or an HF
  ``Blip2ForImageTextRetrieval`` directory.

  Returns:
    ``(ItcScorer, description)``.
  Raises:
    FileNotFoundError: neither a workdir nor an HF directory.
    ValueError: a stage-2 run or an HF generation checkpoint (no text side to score with).
  """
  from vlm.data.text import Blip2Tokenizer
  if _is_workdir(path):
    from vlm.tasks import get_task
    from vlm.train.checkpoint import restore_run
    step, config, params = restore_run(path)
    if config.task != "blip2_stage1":
      raise ValueError(f"--scorer {path} is a {config.task!r} run; the scorer must be a BLIP-2 "
                       "stage-1 run (task 'blip2_stage1', configs/blip2/stage1.py) or an HF "
                       "Blip2ForImageTextRetrieval directory: only stage 1 has the text encoder "
                       "for image-text similarity"
                       + (" (a stage-2 run goes to --captioner)" if config.task == "blip2_stage2"
                          else ""))
    model = get_task(config.task).build_model(config)
    d = config.data
    scorer = ItcScorer(model, params, image_size=int(d.image_size),
                       max_text_len=int(d.max_text_len), max_words=int(d.get("max_words", 50)),
                       tokenizer=Blip2Tokenizer(d.get("vocab_file",
                                                      "vlm/assets/tokenizers/bert-base-uncased/"
                                                      "vocab.txt")),
                       batch_size=batch_size)
    return scorer, f"stage-1 run {path} step {step} ({config.model.preset})"
  if _is_hf_dir(path):
    from vlm.convert.hf_blip2 import is_conditional_generation, load_hf_blip2
    from vlm.models.blip2 import Blip2Stage1
    if is_conditional_generation(path):
      raise ValueError(f"--scorer {path} is an HF Blip2ForConditionalGeneration (captioning) "
                       "directory; the scorer needs image-text similarity: a "
                       "Blip2ForImageTextRetrieval directory or a stage-1 run (this one goes to "
                       "--captioner)")
    config, params = load_hf_blip2(path)
    scorer = ItcScorer(Blip2Stage1(config), params, image_size=int(config.vision.image_size),
                       batch_size=batch_size)
    return scorer, f"HF BLIP-2 retrieval {path}"
  raise FileNotFoundError(f"--scorer {path}: neither a training workdir (no checkpoints/) nor an "
                          "HF model directory (no config.json)")


# -------------------------------------------------------------------------------------------------
# CapFilt
# -------------------------------------------------------------------------------------------------

@dataclasses.dataclass
class CapfiltStats:
  """Counts of one :func:`capfilt` run.

  Attributes:
    images: images processed; images_scored: of those, read and ranked; images_skipped: unreadable
      (kept with their unscored human captions); skipped: ``(path, reason)`` of each.
    synthetic_sampled: captions generated (``images_scored * num_samples``);
      synthetic_degenerate: dropped as empty / invisible / invalid text; synthetic_duplicates:
      collapsed into an earlier equal candidate (human or synthetic).
    human_captions: human captions of the processed images; human_degenerate: dropped as unusable;
      human_duplicates: collapsed.
    candidates: ranked candidates in all.
    kept_synthetic / kept_human: kept after ranking; kept_human_unscored: human captions of
      skipped images.
    mean_kept_score / mean_candidate_score: means over ranked images (NaN when none).
    seconds: wall time.
  """
  images: int = 0
  images_scored: int = 0
  images_skipped: int = 0
  skipped: list = dataclasses.field(default_factory=list)
  synthetic_sampled: int = 0
  synthetic_degenerate: int = 0
  synthetic_duplicates: int = 0
  human_captions: int = 0
  human_degenerate: int = 0
  human_duplicates: int = 0
  candidates: int = 0
  kept_synthetic: int = 0
  kept_human: int = 0
  kept_human_unscored: int = 0
  mean_kept_score: float = float("nan")
  mean_candidate_score: float = float("nan")
  seconds: float = 0.0

  def as_dict(self) -> dict[str, Any]:
    return dataclasses.asdict(self)


def _usable(caption: str, max_words: int) -> str | None:
  """The ``pre_caption`` form used to find duplicates, or None for a degenerate caption."""
  if not isinstance(caption, str) or caption_problem(caption, max_words) is not None:
    return None
  return pre_caption(caption, max_words)


def _check_settings(num_samples, top_k, top_p, temperature, max_new_tokens, min_new_tokens,
                    batch_size, seed, max_images):
  def is_int(x):
    return isinstance(x, (int, np.integer)) and not isinstance(x, bool)
  if not is_int(num_samples) or num_samples < 1:
    raise ValueError(f"num_samples must be an int >= 1 (captions sampled per image; the paper "
                     f"uses 10), got {num_samples!r}")
  if not is_int(top_k) or top_k < 1:
    raise ValueError(f"top_k must be an int >= 1 (captions kept per image; the paper keeps 2), "
                     f"got {top_k!r}")
  if not 0.0 < float(top_p) <= 1.0:
    raise ValueError(f"top_p must be in (0, 1] (nucleus mass; the paper uses 0.9), got {top_p}")
  if not (math.isfinite(float(temperature)) and float(temperature) > 0):
    raise ValueError(f"temperature must be > 0 (CapFilt samples), got {temperature}")
  if not is_int(max_new_tokens) or max_new_tokens < 1:
    raise ValueError(f"max_new_tokens must be an int >= 1, got {max_new_tokens!r}")
  if not is_int(min_new_tokens) or not 0 <= min_new_tokens <= max_new_tokens:
    raise ValueError(f"min_new_tokens must be an int in [0, max_new_tokens={max_new_tokens}], got "
                     f"{min_new_tokens!r}")
  if not is_int(batch_size) or batch_size < 1:
    raise ValueError(f"batch_size must be an int >= 1 (images per generate call), got "
                     f"{batch_size!r}")
  if not is_int(seed) or not 0 <= seed < 2 ** 32:
    raise ValueError(f"seed must be an int in [0, 2**32), got {seed!r}")
  if max_images is not None and (not is_int(max_images) or max_images < 1):
    raise ValueError(f"max_images must be None (all) or an int >= 1, got {max_images!r}")


def _human_rows(captions, max_words: int, stats) -> list[tuple[int, str, str]]:
  """An image's usable human captions ``(original_id, caption, key)``, duplicates collapsed
  (counted in ``stats``)."""
  rows, keys = [], set()
  for cid, cap in captions:
    stats.human_captions += 1
    k = _usable(cap, max_words)
    if k is None:
      stats.human_degenerate += 1
    elif k in keys:
      stats.human_duplicates += 1
    else:
      keys.add(k)
      rows.append((cid, cap, k))
  return rows


def _candidates(human_rows, synthetic, max_words: int, stats) -> list[tuple[str, str, Any]]:
  """``(caption, source, original_id)`` to rank: the human rows, then the usable synthetic
  captions that repeat none of them (degenerate and duplicate ones counted in ``stats``)."""
  cands = [(cap, "human", cid) for cid, cap, _ in human_rows]
  keys = {k for _, _, k in human_rows}
  for cap in synthetic:
    stats.synthetic_sampled += 1
    cap = cap.strip()
    k = _usable(cap, max_words)
    if k is None:
      stats.synthetic_degenerate += 1
    elif k in keys:
      stats.synthetic_duplicates += 1
    else:
      keys.add(k)
      cands.append((cap, "synthetic", None))
  return cands


def _checked_scores(scores, cands, path: str) -> np.ndarray:
  """One finite float64 score per candidate, or a ValueError naming the image."""
  s = np.asarray(scores, np.float64).reshape(-1)
  if s.shape[0] != len(cands) or not np.all(np.isfinite(s)):
    raise ValueError(f"the scorer returned {s.tolist()} for the {len(cands)} candidates of "
                     f"{path}; it must return one finite score per caption")
  return s


def capfilt(captioner, scorer: ScoreFn, annotations: str, image_dir: str, *,
            num_samples: int = 10, top_k: int = 2, top_p: float = 0.9, temperature: float = 1.0,
            max_new_tokens: int = 30, min_new_tokens: int = 5, prompt: str = "a photo of",
            batch_size: int = 8, seed: int = 0, image_size: int | None = None,
            max_images: int | None = None, max_words: int = 50,
            progress: Callable[[int, int], None] | None = None
            ) -> tuple[dict[str, Any], CapfiltStats]:
  """Captions, ranks and filters the images of a COCO-captions file (see the module docstring).

  Args:
    captioner: a :class:`vlm.inference.blip2_generate.Blip2Generator` (anything with its
      ``generate(pixels, prompts, num_beams=, temperature=, top_p=, max_new_tokens=,
      min_new_tokens=, rng=) -> list[str]``).
    scorer: ``(pixel_values [B,S,S,3], captions: B lists) -> B float arrays`` (e.g.
      :class:`ItcScorer`); its ``image_size`` attribute, if any, is the resolution it is fed.
    annotations: the source COCO-captions json; image_dir: the directory of its ``file_name``s
      (relative paths resolve against the cwd, then the repository root).
    num_samples: N captions sampled per image (nucleus sampling, ``top_p``, ``temperature``).
    top_k: captions kept per image (fewer when an image has fewer usable candidates).
    max_new_tokens / min_new_tokens: bounds on each synthetic caption's length in LLM tokens.
    prompt: the text the captioner continues (not stored in the caption).
    batch_size: images per generate call (``batch_size * num_samples`` rows).
    seed: sampling seed.
    image_size: the captioner's input S (default ``captioner.model.config.vision.image_size``).
    max_images: process only the first images of the file (None: all).
    max_words: ``pre_caption`` word limit used to detect degenerate and duplicate captions.
    progress: called as ``progress(images_done, images_total)`` after each batch.
  Returns:
    ``(coco, stats)``: the COCO-captions dict and :class:`CapfiltStats`.
  Raises:
    FileNotFoundError / ValueError: a missing or malformed annotation file (from
      :class:`vlm.data.sources.CocoCaptionsSource`); bad settings (the message names the
      argument); a scorer that returns the wrong number or non-finite scores.
  """
  from vlm.data.sources import CocoCaptionsSource, _read_json
  from vlm.inference.blip2_generate import load_images
  _check_settings(num_samples, top_k, top_p, temperature, max_new_tokens, min_new_tokens,
                  batch_size, seed, max_images)
  t0 = time.perf_counter()
  source = CocoCaptionsSource(annotations, image_dir)  # validates the file
  raw = _read_json(source.annotation_json)
  images = list(raw["images"])[:max_images] if max_images else list(raw["images"])
  human: dict[int, list[tuple[int, str]]] = {}
  for i in range(len(source)):
    r = source[i]
    human.setdefault(r["image_id"], []).append((r["caption_id"], r["caption"]))
  order, seen = [], set()
  for img in images:  # one entry per distinct image id, first occurrence
    if int(img["id"]) not in seen:
      seen.add(int(img["id"]))
      order.append((int(img["id"]), os.path.join(source.image_dir, img["file_name"])))
  cap_size = int(image_size or captioner.model.config.vision.image_size)
  score_size = int(getattr(scorer, "image_size", None) or cap_size)
  key = jax.random.PRNGKey(int(seed))
  stats = CapfiltStats(images=len(order))
  out_anns: list[dict[str, Any]] = []
  kept_scores, cand_scores = [], []

  def emit(image_id, caption, src, score, original_id=None):
    a = {"id": len(out_anns) + 1, "image_id": image_id, "caption": caption, "source": src,
         "score": score}
    if original_id is not None:
      a["original_id"] = original_id
    out_anns.append(a)

  humans_of = lambda image_id: _human_rows(human.get(image_id, []), max_words, stats)

  for start in range(0, len(order), batch_size):
    chunk = order[start:start + batch_size]
    pixels, ok, errors = load_images([p for _, p in chunk], cap_size)
    ok_score = ok
    if score_size != cap_size and ok:
      score_pixels, ok_s, errors_s = load_images([chunk[i][1] for i in ok], score_size)
      ok_score = [ok[j] for j in ok_s]
      errors = errors + errors_s
      keep = [ok.index(i) for i in ok_score]
      pixels = pixels[keep]
    elif ok:
      score_pixels = pixels
    bad = sorted(set(range(len(chunk))) - set(ok_score))
    reasons = dict(errors)
    for i in bad:  # unreadable: kept with its usable human captions, unscored
      image_id, path = chunk[i]
      stats.images_skipped += 1
      stats.skipped.append((path, reasons.get(path, "unreadable")))
      for cid, cap, _ in humans_of(image_id):
        emit(image_id, cap, "human", None, cid)
        stats.kept_human_unscored += 1
    if not ok_score:
      if progress:
        progress(min(start + batch_size, len(order)), len(order))
      continue
    rows = np.repeat(pixels, num_samples, axis=0)
    synthetic = captioner.generate(
        rows, prompt, num_beams=1, temperature=float(temperature), top_p=float(top_p),
        max_new_tokens=int(max_new_tokens), min_new_tokens=int(min_new_tokens),
        rng=jax.random.fold_in(key, start))
    candidates = [_candidates(humans_of(chunk[i][0]),
                              synthetic[j * num_samples:(j + 1) * num_samples], max_words, stats)
                  for j, i in enumerate(ok_score)]
    scores = scorer(score_pixels, [[c for c, _, _ in cs] for cs in candidates])
    if len(scores) != len(candidates):
      raise ValueError(f"the scorer returned {len(scores)} score arrays for {len(candidates)} "
                       "images; it must return one per image")
    for j, i in enumerate(ok_score):
      image_id, path = chunk[i]
      s = _checked_scores(scores[j], candidates[j], path)
      stats.images_scored += 1
      stats.candidates += len(candidates[j])
      cand_scores.extend(s.tolist())
      for r in np.argsort(-s, kind="stable")[:top_k]:  # ties keep candidate order
        cap, src, cid = candidates[j][r]
        emit(image_id, cap, src, float(s[r]), cid)
        kept_scores.append(float(s[r]))
        if src == "human":
          stats.kept_human += 1
        else:
          stats.kept_synthetic += 1
    if progress:
      progress(min(start + batch_size, len(order)), len(order))
  stats.mean_kept_score = float(np.mean(kept_scores)) if kept_scores else float("nan")
  stats.mean_candidate_score = float(np.mean(cand_scores)) if cand_scores else float("nan")
  stats.seconds = time.perf_counter() - t0
  info = dict(raw.get("info") or {})
  info["capfilt"] = {
      "source_annotations": os.path.basename(source.annotation_json),
      "num_samples": int(num_samples), "top_k": int(top_k), "top_p": float(top_p),
      "temperature": float(temperature), "max_new_tokens": int(max_new_tokens),
      "min_new_tokens": int(min_new_tokens), "prompt": prompt, "seed": int(seed),
      "batch_size": int(batch_size), "scorer": type(scorer).__name__,
      "method": "BLIP-2 section 3.4 CapFilt; ranking by the scorer's image-text similarity "
                "(ItcScorer: stage-1 ITC, not the paper's CLIP ViT-L/14)"}
  coco = {"info": info, "licenses": raw.get("licenses", []), "images": images,
          "annotations": out_anns}
  return coco, stats


def write_captions(coco: dict[str, Any], path: str) -> str:
  """Writes ``coco`` as JSON to ``path`` atomically (temp file + rename; folders created).

  Returns the absolute path. Scores of unreadable images are written as ``null``.
  """
  path = os.path.abspath(path)
  os.makedirs(os.path.dirname(path), exist_ok=True)
  fd, tmp = tempfile.mkstemp(dir=os.path.dirname(path), suffix=".tmp")
  try:
    with os.fdopen(fd, "w") as f:
      json.dump(coco, f, allow_nan=False)
    os.replace(tmp, path)
  except BaseException:
    if os.path.exists(tmp):
      os.remove(tmp)
    raise
  return path


def train_flags(output: str, annotations: str, image_dir: str) -> list[str]:
  """The ``scripts/train.py`` overrides that train on a CapFilt file (one caption per use).

  :func:`vlm.data.pipeline.split_paths` joins ``data.root`` with ``train_annotations`` and
  ``image_dir`` (an absolute path wins the join), and the held-out split is read from
  ``data.root`` too, so ``root`` stays the source dataset's folder (where ``captions_val2017.json``
  lives) and the other two are absolute paths.
  """
  from vlm.data.paths import resolve_path
  root = os.path.dirname(resolve_path(annotations))
  return [f"--config.data.root={root}",
          f"--config.data.train_annotations={os.path.abspath(output)}",
          f"--config.data.image_dir={resolve_path(image_dir)}",
          "--config.data.caption_sampling=per_image"]
