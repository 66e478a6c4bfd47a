"""Caption evaluation: CIDEr and BLEU-4 from ``pycocoevalcap``, and the most-frequent-caption baseline.

Source: the COCO caption evaluation toolkit (Chen et al. 2015, "Microsoft COCO Captions: Data
Collection and Evaluation Server"; ``pycocoevalcap`` 1.2: ``tokenizer/ptbtokenizer.py``,
``bleu/bleu.py``, ``cider/cider.py``). Captions are tokenised as the toolkit does — the Stanford
PTB tokenizer (``stanford-corenlp-3.4.1.jar``, shipped inside ``pycocoevalcap``, run with ``java``;
lower-cased, the toolkit's punctuation tokens removed) — then scored with its ``Bleu(4)`` (corpus
BLEU, ``closest`` reference length) and ``Cider`` (CIDEr-D, n = 4, sigma = 6; the document
frequencies come from the references of the evaluated set, so CIDEr needs more than one image:
with a single image every idf is 0 and so is CIDEr).

The Java call is made here rather than through ``pycocoevalcap.tokenizer.PTBTokenizer`` because that
class writes its temporary file into the installed package directory (fails on read-only
installs), ignores a failed ``java`` run, and silently misaligns captions when the output has a
different number of lines; this module checks all three and names the fix. ``tokenizer="basic"``
is a pure-Python approximation for machines without Java (its scores are close to, not equal to,
the official ones; say which one a reported number used).
"""
from __future__ import annotations

import collections
import os
import re
import shutil
import subprocess
import tempfile
import unicodedata
from typing import Hashable, Iterable, Mapping, Sequence, Union

# The tokens the COCO toolkit drops after PTB tokenisation (pycocoevalcap tokenizer/ptbtokenizer.py).
_COCO_PUNCTUATION = frozenset(["''", "'", "``", "`", "-LRB-", "-RRB-", "-LCB-", "-RCB-", ".", "?",
                               "!", ",", ":", "-", "--", "...", ";"])
_PTB_CLASS = "edu.stanford.nlp.process.PTBTokenizer"
_JAR = "stanford-corenlp-3.4.1.jar"


def _one_line(text: str) -> str:
  """The caption on one line: every line break Python or Java knows becomes a space."""
  return " ".join(text.splitlines())


def _ptb_tokenize(captions: Sequence[str]) -> list[str]:
  """COCO-toolkit tokenisation of ``captions`` through the Stanford PTB tokenizer (needs ``java``).

  Raises:
    RuntimeError: if ``java`` is not on PATH, ``pycocoevalcap`` (with its jar) is missing, the
      tokenizer fails, or it returns a different number of lines than captions given.
  """
  java = shutil.which("java")
  if java is None:
    raise RuntimeError(
        "CIDEr/BLEU with the COCO tokenizer need Java: pycocoevalcap's PTB tokenizer runs "
        f"{_JAR} with `java`, and no `java` is on PATH. Install a JRE (Debian/Ubuntu: "
        "`apt-get install -y default-jre-headless`), or call score_captions(..., "
        "tokenizer='basic') for the pure-Python approximation (not the official numbers).")
  try:
    from pycocoevalcap.tokenizer import ptbtokenizer
  except ImportError as e:
    raise RuntimeError("caption scoring needs pycocoevalcap: `pip install pycocoevalcap` "
                       "(it is in vlm's install_requires)") from e
  jar = os.path.join(os.path.dirname(os.path.abspath(ptbtokenizer.__file__)), _JAR)
  if not os.path.isfile(jar):
    raise RuntimeError(f"pycocoevalcap is installed without its tokenizer jar ({jar} is missing); "
                       "reinstall it: `pip install --force-reinstall pycocoevalcap`")
  with tempfile.TemporaryDirectory(prefix="vlm-ptb-") as tmp:
    path = os.path.join(tmp, "captions.txt")
    with open(path, "w", encoding="utf-8") as f:
      f.write("\n".join(_one_line(c) for c in captions))
    proc = subprocess.run([java, "-cp", jar, _PTB_CLASS, "-preserveLines", "-lowerCase",
                           "-encoding", "utf-8", path], capture_output=True, check=False)
  if proc.returncode != 0:
    raise RuntimeError(f"the PTB tokenizer ({java} -cp {jar} {_PTB_CLASS}) exited with status "
                       f"{proc.returncode}: {proc.stderr.decode('utf-8', 'replace')[-2000:]}")
  lines = proc.stdout.decode("utf-8").split("\n")
  if lines and lines[-1] == "" and len(lines) == len(captions) + 1:
    lines = lines[:-1]
  if len(lines) != len(captions):
    raise RuntimeError(f"the PTB tokenizer returned {len(lines)} lines for {len(captions)} "
                       "captions; refusing to score misaligned captions")
  return [" ".join(w for w in line.rstrip().split(" ") if w and w not in _COCO_PUNCTUATION)
          for line in lines]


_BASIC_TOKEN = re.compile(r"\w+(?:'\w+)?|[^\w\s]")


def _basic_tokenize(captions: Sequence[str]) -> list[str]:
  """Pure-Python approximation of the COCO tokenisation: lower-case, words, punctuation dropped."""
  out = []
  for c in captions:
    toks = _BASIC_TOKEN.findall(unicodedata.normalize("NFKC", _one_line(c)).lower())
    out.append(" ".join(t for t in toks if re.match(r"\w", t)))
  return out


def _validate(predictions, references):
  if not isinstance(predictions, Mapping) or not isinstance(references, Mapping):
    raise TypeError("predictions must be {image_id: caption} and references {image_id: [caption, "
                    f"...]}}; got {type(predictions).__name__} and {type(references).__name__}")
  if not predictions:
    raise ValueError("no predictions to score: predictions is empty (did caption generation run "
                     "on the held-out images?)")
  missing_refs = [k for k in predictions if k not in references]
  if missing_refs:
    raise ValueError(f"{len(missing_refs)} predicted image ids have no references, e.g. "
                     f"{missing_refs[:5]}; score only images of the reference split")
  missing_preds = [k for k in references if k not in predictions]
  if missing_preds:
    raise ValueError(f"{len(missing_preds)} reference image ids have no prediction, e.g. "
                     f"{missing_preds[:5]}; predict every held-out image or pass only the "
                     "references of the predicted images")
  for k, p in predictions.items():
    if not isinstance(p, str):
      raise TypeError(f"prediction for image {k!r} must be one caption string, got "
                      f"{type(p).__name__}")
  for k, refs in references.items():
    if isinstance(refs, str) or not isinstance(refs, Sequence) or not refs:
      raise ValueError(f"references for image {k!r} must be a non-empty list of caption strings, "
                       f"got {refs!r}")
    bad = [r for r in refs if not isinstance(r, str)]
    if bad:
      raise TypeError(f"references for image {k!r} contain a non-string {bad[0]!r}")


def score_captions(predictions: Mapping[Hashable, str],
                   references: Mapping[Hashable, Sequence[str]], *,
                   tokenizer: str = "ptb") -> dict[str, float]:
  """Corpus CIDEr (CIDEr-D) and BLEU-1..4 of one predicted caption per image against its references.

  Args:
    predictions: ``{image_id: caption}``, one generated caption per image (an empty string is
      allowed and scores 0 for that image).
    references: ``{image_id: [caption, ...]}`` with the same ids (COCO: the 5 human captions).
    tokenizer: ``"ptb"`` (default; the COCO toolkit's Stanford PTB tokenizer, needs ``java``) or
      ``"basic"`` (pure Python, approximate).
  Returns:
    ``{"CIDEr": float, "BLEU-4": float, "BLEU-1": ..., "BLEU-2": ..., "BLEU-3": ...}`` on the
    toolkit's 0..1 scale for BLEU and 0..10 for CIDEr (papers print both x100).
  Raises:
    ValueError: empty ``predictions``, ids present in one mapping and not the other (the message
      lists some), an image with no references, an unknown ``tokenizer``.
    TypeError: non-string captions or non-mapping inputs.
    RuntimeError: ``tokenizer="ptb"`` without ``java`` on PATH (the message says how to install it)
      or a failed tokenizer run.
  """
  _validate(predictions, references)
  if tokenizer not in ("ptb", "basic"):
    raise ValueError(f"tokenizer must be 'ptb' (COCO toolkit, needs java) or 'basic', got "
                     f"{tokenizer!r}")
  from pycocoevalcap.bleu.bleu import Bleu
  from pycocoevalcap.cider.cider import Cider

  ids = list(references)
  flat, owners = [], []
  for k in ids:
    flat.append(predictions[k])
    owners.append(("res", k))
    for r in references[k]:
      flat.append(r)
      owners.append(("gts", k))
  tokens = (_ptb_tokenize if tokenizer == "ptb" else _basic_tokenize)(flat)
  res = {i: [] for i in range(len(ids))}
  gts = {i: [] for i in range(len(ids))}
  index = {k: i for i, k in enumerate(ids)}
  for (kind, k), tok in zip(owners, tokens):
    (res if kind == "res" else gts)[index[k]].append(tok)
  bleu, _ = Bleu(4).compute_score(gts, res, verbose=0)
  cider, _ = Cider().compute_score(gts, res)
  out = {"CIDEr": float(cider), "BLEU-4": float(bleu[3])}
  out.update({f"BLEU-{n}": float(bleu[n - 1]) for n in (1, 2, 3)})
  return out


def normalize_caption(text: str) -> str:
  """Caption normal form for counting duplicates: NFKC, lower case, single spaces, no end punctuation.

  ``"A dog on a beach.  "`` and ``"a dog on a beach"`` are the same caption.
  """
  text = " ".join(unicodedata.normalize("NFKC", text).lower().split())
  return text.rstrip(" .!?;,").strip()


def most_frequent_caption_baseline(
    train_captions: Union[Iterable[str], Mapping[Hashable, Sequence[str]]]) -> str:
  """The trivial baseline: the most frequent normalised training caption, given to every photo.

  Args:
    train_captions: training captions, as an iterable of strings or ``{image_id: [captions]}``.
  Returns:
    The modal caption in :func:`normalize_caption` form; ties go to the caption seen first.
  Raises:
    ValueError: if there is no non-empty caption. TypeError: a non-string caption.
  """
  if isinstance(train_captions, Mapping):
    train_captions = (c for caps in train_captions.values() for c in caps)
  counts = collections.Counter()
  for c in train_captions:
    if not isinstance(c, str):
      raise TypeError(f"training captions must be strings, got {type(c).__name__}: {c!r}")
    n = normalize_caption(c)
    if n:
      counts[n] += 1
  if not counts:
    raise ValueError("no non-empty training caption to build the most-frequent-caption baseline")
  return counts.most_common(1)[0][0]  # Counter keeps first-insertion order among equal counts


def score_baseline(train_captions, references: Mapping[Hashable, Sequence[str]], *,
                   tokenizer: str = "ptb") -> tuple[str, dict[str, float]]:
  """Score :func:`most_frequent_caption_baseline` on ``references`` (same caption for every image).

  Returns:
    ``(caption, scores)`` with ``scores`` as :func:`score_captions`.
  Raises:
    As :func:`most_frequent_caption_baseline` and :func:`score_captions`.
  """
  caption = most_frequent_caption_baseline(train_captions)
  return caption, score_captions({k: caption for k in references}, references,
                                 tokenizer=tokenizer)


def format_caption_scores(model: Mapping[str, float], baseline: Mapping[str, float],
                          baseline_caption: str = "") -> str:
  """Two-line table of the model's and the baseline's CIDEr and BLEU-4 (x100, as papers print)."""
  lines = [f"{'':<28}{'CIDEr':>8}{'BLEU-4':>8}"]
  for name, s in (("model", model), ("baseline (most frequent)", baseline)):
    lines.append(f"{name:<28}{100 * s['CIDEr']:8.1f}{100 * s['BLEU-4']:8.1f}")
  if baseline_caption:
    lines.append(f"baseline caption: {baseline_caption!r}")
  return "\n".join(lines)


def evaluate_held_out_captions(caption_batch, data_cfg, *, split: str = "val",
                               max_images: int = 0, batch_size: int = 16,
                               tokenizer: str = "ptb", label: str = "") -> dict:
  """Captions the photos of a held-out COCO split and scores them beside the baseline.

  The one captioning evaluator of every model family: the family supplies ``caption_batch``
  (its own processor and generation); loading the split, batching, the most-frequent-caption
  baseline (:func:`score_baseline`, over the training captions), the scores
  (:func:`score_captions`) and the printed table are shared.

  Args:
    caption_batch: ``fn(image_paths: list[str]) -> list[str]``, one caption per photo.
    data_cfg: data config with ``root``, ``{split}_annotations``, ``image_dir`` (and the train
      split, for the baseline).
    split: the held-out split ("val").
    max_images: first N photos only (0: all).
    batch_size: photos per ``caption_batch`` call.
    tokenizer: ``"ptb"`` or ``"basic"`` (see :func:`score_captions`).
    label: what generated the captions, for the printed header (e.g. "beam 5").
  Returns:
    ``{"scores", "baseline", "baseline_caption", "num_images", "tokenizer", "seconds",
    "examples"}`` (JSON-able).
  Raises:
    ValueError: ``caption_batch`` returning another number of captions than photos; the
      errors of :func:`score_captions` (e.g. RuntimeError without java for "ptb").
  """
  import os
  import time
  from vlm.data import pipeline as data_pipeline
  from vlm.data.sources import load_coco_retrieval
  ann, image_dir = data_pipeline.split_paths(data_cfg, split)
  data = load_coco_retrieval(ann, image_dir)
  images = list(data["image_paths"])[: int(max_images) or None]
  refs = {i: [data["texts"][t] for t in data["img2txt"][i]] for i in range(len(images))}
  train_ann, train_dir = data_pipeline.split_paths(data_cfg, "train")
  train = load_coco_retrieval(train_ann, train_dir)
  baseline_caption, baseline = score_baseline(train["texts"], refs, tokenizer=tokenizer)
  predictions = {}
  t0 = time.perf_counter()
  for start in range(0, len(images), int(batch_size)):
    chunk = images[start:start + int(batch_size)]
    out = list(caption_batch(chunk))
    if len(out) != len(chunk):
      raise ValueError(f"caption_batch returned {len(out)} captions for {len(chunk)} photos")
    predictions.update({start + j: str(c).strip() for j, c in enumerate(out)})
  seconds = time.perf_counter() - t0
  scores = score_captions(predictions, refs, tokenizer=tokenizer)
  print(f"captions of {len(images)} held-out photos ({split}{', ' + label if label else ''}, "
        f"{seconds:.0f}s):")
  print(format_caption_scores(scores, baseline, baseline_caption))
  examples = [{"image": os.path.basename(images[i]), "prediction": predictions[i],
               "reference": refs[i][0]} for i in range(min(3, len(images)))]
  for e in examples:
    print(f"  {e['image']}: {e['prediction']!r} (human: {e['reference']!r})")
  return {"scores": scores, "baseline": baseline, "baseline_caption": baseline_caption,
          "num_images": len(images), "tokenizer": tokenizer, "seconds": seconds,
          "examples": examples}
