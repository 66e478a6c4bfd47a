"""Zero-shot VQA evaluation: the OK-VQA data on the bundled COCO photos, VQA answer normalization,
soft accuracy and the most-frequent-answer baseline.

Data: ``data/vqa/okvqa_on_coco_real_captions.json`` (47 OK-VQA v1.1 questions, Marino et al.,
CVPR 2019, each on one photo of ``data/coco/images``; ``data/vqa/SOURCE.md`` gives the provenance).
Every question carries ``answer_scores`` {answer: soft score}, the VQAv2-style per-answer accuracy
``min(1, #humans who gave it / 3)`` computed from the 10 human answers (1.0 or 0.667 here; the raw
answers are not shipped). A prediction scores the soft score of its normalized form, 0 if absent.

Normalization follows the official VQA evaluation (``vqaEval.py``, Antol et al., "VQA: Visual
Question Answering", ICCV 2015; the copy LAVIS uses is ``lavis/common/vqa_tools/vqa_eval.py``); see
:func:`normalize_answer`. Note the official metric averages ``min(1, matches / 3)`` over the ten
leave-one-annotator-out subsets of the raw answers; the shipped scores are the common
per-answer approximation (LXMERT / BUTD style), so numbers here are "VQA soft accuracy", close to
but not identical with the official score.
"""
from __future__ import annotations

import collections
import json
import math
import os
import re
from typing import Any, Hashable, Mapping, Sequence

from vlm.data.paths import resolve_path
from vlm.data.text import describe_unencodable

DEFAULT_VQA_FILE = "data/vqa/okvqa_on_coco_real_captions.json"
DEFAULT_IMAGE_DIR = "data/coco/images"

# -- normalization (rules of the official vqaEval.py; own implementation) -----------------------

# Punctuation that the official script removes or turns into a space (``'``, ``:``, ``.`` and
# e.g. ``#$%&*^|~`` are not in it; ``.`` has its own rule).
_PUNCT = (";", "/", "[", "]", '"', "{", "}", "(", ")", "=", "+", "\\", "_", "-", ">", "<", "@",
          "`", ",", "?", "!")
_DIGIT_COMMA_DIGIT = re.compile(r"\d,\d")
_PERIOD_NOT_BEFORE_DIGIT = re.compile(r"\.(?!\d)")
# The official call passes re.UNICODE (= 32) as the ``count`` argument of ``sub``: at most 32
# periods are removed. Kept for exactness (no real answer has that many).
_MAX_PERIODS = 32
_NUMBER_WORDS = {"none": "0", "zero": "0", "one": "1", "two": "2", "three": "3", "four": "4",
                 "five": "5", "six": "6", "seven": "7", "eight": "8", "nine": "9", "ten": "10"}
_ARTICLES = frozenset(("a", "an", "the"))

# Contractions the official table restores (spelled with their apostrophes). A word is replaced by
# the contraction when it equals the contraction with exactly one of its apostrophes left out
# ("dont" -> "don't"; "couldnt've" and "couldn'tve" -> "couldn't've", but not "couldntve").
_CONTRACTIONS = (
    "ain't aren't can't could've couldn't couldn't've didn't doesn't don't hadn't hadn't've hasn't "
    "haven't he'd he'd've he's how'd how'll how's isn't it'd it'd've it'll ma'am mightn't "
    "mightn't've might've mustn't must've needn't not've o'clock oughtn't 'ow's'at shan't she'd've "
    "should've shouldn't shouldn't've somebody'd've somebody'll somebody's someone'd someone'd've "
    "someone'll someone's something'd something'd've something'll that's there'd there'd've "
    "there're there's they'd they'd've they'll they're they've 'twas wasn't we'd've we've "
    "weren't what'll what're what's what've when's where'd where's where've who'd who'd've who'll "
    "who's who've why'll why're why's won't would've wouldn't wouldn't've y'all y'all'll "
    "y'all'd've you'd you'd've you'll you're you've").split()


def _contraction_table() -> dict[str, str]:
  table = {}
  for word in _CONTRACTIONS:
    for i, ch in enumerate(word):
      if ch == "'":
        table[word[:i] + word[i + 1:]] = word
  # Quirks of the official table, kept for exactness: one reversed entry; its entries "Id've",
  # "I'dve", "Im", "Ive" have a capital I and never match (words are lower-cased first), and
  # "let's", "she's" map to themselves, so those are left out.
  table["somebody'd"] = "somebodyd"
  return table


_CONTRACTION_OF = _contraction_table()


def _process_punctuation(text: str) -> str:
  """Official ``processPunctuation``: each listed mark is deleted if it touches a space anywhere
  in the text or the text has a digit-comma-digit, else replaced by a space; then periods not
  followed by a digit are deleted."""
  out = text
  delete_all = _DIGIT_COMMA_DIGIT.search(text) is not None
  for p in _PUNCT:
    if delete_all or (p + " ") in text or (" " + p) in text:
      out = out.replace(p, "")
    else:
      out = out.replace(p, " ")
  return _PERIOD_NOT_BEFORE_DIGIT.sub("", out, count=_MAX_PERIODS)


def _process_digit_article(text: str) -> str:
  """Official ``processDigitArticle``: lower-case, split on whitespace, number words -> digits,
  drop articles, restore contractions, join with single spaces."""
  words = [_NUMBER_WORDS.get(w, w) for w in text.lower().split()]
  words = [w for w in words if w not in _ARTICLES]
  return " ".join(_CONTRACTION_OF.get(w, w) for w in words)


def normalize_answer(text: str) -> str:
  """Normalizes an answer like the official VQA evaluation script (``vqaEval.py``, Antol et al.).

  Steps, in order:

  1. newlines and tabs become spaces; leading/trailing whitespace is stripped;
  2. punctuation: each of ``; / [ ] " { } ( ) = + \\ _ - > < @ ` , ? !`` is deleted when it is
     next to a space somewhere in the answer, or when the answer contains a digit-comma-digit
     (``1,000``), and otherwise replaced by a space (``black-white`` -> ``black white``,
     ``yes!`` -> ``yes``, ``1,000`` -> ``1000``); then every ``.`` not followed by a digit is
     deleted (``3.5`` keeps its point; at most 32, as in the official call);
  3. lower-case, split on whitespace; the number words ``none zero one ... ten`` become digits
     (``none`` -> ``0``); the articles ``a an the`` are dropped;
  4. apostrophe-less contractions are restored (``dont`` -> ``don't``, ``whats`` -> ``what's``;
     the official table's entries, quirks included, see ``_CONTRACTIONS``);
  5. words are joined with single spaces.

  Apostrophes, colons and ``#$%&*^|~`` are kept as they are.

  Args:
    text: a predicted or human answer.

  Returns:
    The normalized answer ("" for an empty one).

  Raises:
    ValueError: if ``text`` is not a str.
  """
  if not isinstance(text, str):
    raise ValueError(f"an answer must be a str, got {type(text).__name__}: {text!r}")
  text = text.replace("\n", " ").replace("\t", " ").strip()
  return _process_digit_article(_process_punctuation(text))


def postprocess_answer(text: str) -> str:
  """A generated answer as LAVIS scores it: the first line of the stripped text, stripped.

  LAVIS ``blip2_opt.py`` ``predict_answers`` stops OPT at the newline token and strips the
  decoded text; ``blip2_t5.py`` decodes with ``skip_special_tokens=True``. Taking the first line
  covers generators that ran past a newline. (LAVIS's optional spaCy lemmatization is not done.)

  Raises:
    ValueError: if ``text`` is not a str.
  """
  if not isinstance(text, str):
    raise ValueError(f"a generated answer must be a str, got {type(text).__name__}: {text!r}")
  text = text.strip()
  return text.splitlines()[0].strip() if text else ""


# -- data ----------------------------------------------------------------------------------------


def load_vqa(path: str = DEFAULT_VQA_FILE, image_dir: str = DEFAULT_IMAGE_DIR, *,
             check_images: bool = True) -> list[dict[str, Any]]:
  """Reads the OK-VQA-on-COCO questions (``{"questions": [...]}``, see ``data/vqa/SOURCE.md``).

  Each record needs ``question_id`` (int, unique), ``question`` (non-empty str), ``file_name``
  (an image in ``image_dir``), ``answer_scores`` ({answer: score in [0, 1]}, non-empty) and
  ``answer`` (the top answer, one of ``answer_scores``).

  Args:
    path: the json file; relative paths resolve with :func:`vlm.data.paths.resolve_path`.
    image_dir: directory holding the ``file_name`` photos.
    check_images: raise if an image file is missing.

  Returns:
    One dict per question, in file order: ``question_id`` (int), ``question`` (str, stripped),
    ``image`` (absolute image path), ``answers`` ({normalized answer: soft score}; answers that
    normalize alike keep the highest score), ``answer`` (the normalized top answer) and
    ``split`` (``okvqa_split``, or None).

  Raises:
    FileNotFoundError: the json file, or (``check_images``) an image, is missing (names the
      record).
    ValueError: the file is not UTF-8 JSON with a ``questions`` list, or a record is malformed
      (the message names the file, the record index and question_id, and the field).
  """
  file = resolve_path(path)
  if not os.path.isfile(file):
    raise FileNotFoundError(f"VQA file not found: {path!r} (resolved to {file!r}); the bundled "
                            f"one is {DEFAULT_VQA_FILE}")
  try:
    with open(file, encoding="utf-8") as f:
      data = json.load(f)
  except UnicodeDecodeError as e:
    raise ValueError(f"{file} is not UTF-8 text (byte {e.start}): {e.reason}") from e
  except json.JSONDecodeError as e:
    raise ValueError(f"{file} is not valid JSON: {e}") from e
  if not isinstance(data, Mapping) or not isinstance(data.get("questions"), list):
    raise ValueError(f"{file}: expected an object with a 'questions' list (OK-VQA-on-COCO format)")
  images = resolve_path(image_dir)
  out, seen = [], {}
  for i, rec in enumerate(data["questions"]):
    where = f"{file}: questions[{i}]"
    if not isinstance(rec, Mapping):
      raise ValueError(f"{where} is a {type(rec).__name__}, expected an object")
    qid = rec.get("question_id")
    if isinstance(qid, bool) or not isinstance(qid, int):
      raise ValueError(f"{where}: 'question_id' must be an int, got {qid!r}")
    where = f"{where} (question_id {qid})"
    if qid in seen:
      raise ValueError(f"{where}: question_id repeats questions[{seen[qid]}]")
    seen[qid] = i
    question = rec.get("question")
    if not isinstance(question, str) or not question.strip():
      raise ValueError(f"{where}: 'question' must be a non-empty str, got {question!r}")
    msg = describe_unencodable(question, f"{where}: 'question'")
    if msg is not None:
      raise ValueError(msg)
    name = rec.get("file_name")
    if not isinstance(name, str) or not name or os.path.isabs(name):
      raise ValueError(f"{where}: 'file_name' must be an image name relative to the image "
                       f"directory, got {name!r}")
    image = os.path.join(images, name)
    if check_images and not os.path.isfile(image):
      raise FileNotFoundError(f"{where}: image {image} not found (image_dir={image_dir!r})")
    scores = rec.get("answer_scores")
    if not isinstance(scores, Mapping) or not scores:
      raise ValueError(f"{where}: 'answer_scores' must be a non-empty {{answer: score}} object, "
                       f"got {scores!r}")
    answers: dict[str, float] = {}
    for ans, score in scores.items():
      if (isinstance(score, bool) or not isinstance(score, (int, float))
          or not math.isfinite(score) or not 0 <= score <= 1):
        raise ValueError(f"{where}: the score of answer {ans!r} must be a number in [0, 1], "
                         f"got {score!r}")
      msg = describe_unencodable(ans, f"{where}: answer")
      if msg is not None:
        raise ValueError(msg)
      key = normalize_answer(ans)
      if not key:
        raise ValueError(f"{where}: answer {ans!r} is empty after normalization")
      answers[key] = max(answers.get(key, 0.0), float(score))
    top = rec.get("answer")
    if not isinstance(top, str) or normalize_answer(top) not in answers:
      raise ValueError(f"{where}: 'answer' must be one of the answer_scores keys, got {top!r}")
    out.append({"question_id": qid, "question": question.strip(), "image": image,
                "answers": answers, "answer": normalize_answer(top),
                "split": rec.get("okvqa_split")})
  if not out:
    raise ValueError(f"{file}: the 'questions' list is empty")
  return out


# -- scores --------------------------------------------------------------------------------------


def vqa_soft_accuracy(predictions: Mapping[Hashable, str],
                      dataset: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
  """VQA soft accuracy of predicted answers.

  Each question scores ``answers.get(normalize_answer(prediction), 0)`` (the VQAv2-style
  ``min(1, #humans / 3)`` encoded in the file); the accuracy is the mean over questions.

  Args:
    predictions: {question_id: answer text} for every question of ``dataset`` (raw generated
      text is fine: it is normalized here; pass it through :func:`postprocess_answer` first).
    dataset: records from :func:`load_vqa` (``question_id`` and ``answers`` are used).

  Returns:
    ``{"accuracy": float in [0, 1], "n": number of questions, "per_question": {qid: score}}``.

  Raises:
    ValueError: an empty dataset, a question without a prediction, a prediction for an id not
      in the dataset (both name the first such id and the count), or a non-str prediction.
  """
  if not dataset:
    raise ValueError("the VQA dataset is empty")
  ids = [rec["question_id"] for rec in dataset]
  missing = [q for q in ids if q not in predictions]
  if missing:
    raise ValueError(f"{len(missing)} of {len(ids)} questions have no prediction, first "
                     f"question_id {missing[0]!r} (prediction keys must be the int question_ids)")
  known = set(ids)
  extra = [q for q in predictions if q not in known]
  if extra:
    raise ValueError(f"{len(extra)} predictions are for question_ids not in the dataset, first "
                     f"{extra[0]!r}")
  per_question = {}
  for rec in dataset:
    pred = predictions[rec["question_id"]]
    if not isinstance(pred, str):
      raise ValueError(f"the prediction for question_id {rec['question_id']} is "
                       f"{type(pred).__name__}, expected str: {pred!r}")
    per_question[rec["question_id"]] = float(rec["answers"].get(normalize_answer(pred), 0.0))
  return {"accuracy": sum(per_question.values()) / len(per_question), "n": len(per_question),
          "per_question": per_question}


def most_frequent_answer_baseline(dataset: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
  """The single most common (normalized) top answer, predicted for every question.

  Ties go to the answer that occurs first in ``dataset``. Note it is computed on the evaluated
  questions themselves (a small set has no separate train split worth the name), so it is an
  optimistic "prior only" floor.

  Returns:
    ``{"answer": str, "count": int (questions whose top answer it is), "accuracy": float in
    [0, 1], "n": int}``, scored with :func:`vqa_soft_accuracy`.

  Raises:
    ValueError: an empty dataset.
  """
  if not dataset:
    raise ValueError("the VQA dataset is empty")
  counts = collections.Counter(rec["answer"] for rec in dataset)
  answer, count = counts.most_common(1)[0]  # most_common keeps first-seen order among ties
  scores = vqa_soft_accuracy({rec["question_id"]: answer for rec in dataset}, dataset)
  return {"answer": answer, "count": count, "accuracy": scores["accuracy"], "n": scores["n"]}


def format_vqa_scores(model: Mapping[str, Any], baseline: Mapping[str, Any]) -> str:
  """Table of the model's and the baseline's VQA soft accuracy (x100, as papers print).

  Args:
    model: a :func:`vqa_soft_accuracy` result.
    baseline: a :func:`most_frequent_answer_baseline` result.
  """
  lines = [f"{'':<36}{'VQA acc':>8}{'n':>6}"]
  for name, s in (("model", model), ("baseline (most frequent answer*)", baseline)):
    lines.append(f"{name:<36}{100 * s['accuracy']:8.1f}{s['n']:6d}")
  if baseline.get("answer"):
    lines.append(f"*baseline answer: {baseline['answer']!r}, the commonest top answer of these "
                 "same questions (an optimistic prior-only floor)")
  return "\n".join(lines)
