"""Caption scoring (vlm.inference.captioning): pycocoevalcap CIDEr/BLEU-4 and the most-frequent baseline."""
import shutil

import pytest

from vlm.inference import captioning

REFS = {
    1: ["A dog runs across the green grass.", "a brown dog running on a lawn",
        "A dog is running in a field.", "a puppy sprints over grass", "The dog runs outside."],
    2: ["A man riding a bike down the street.", "a person on a bicycle in a city",
        "A cyclist rides along a road.", "man riding his bicycle on the road", "A man bikes."],
    3: ["A plate of food with broccoli and rice.", "a meal of rice and vegetables on a plate",
        "Broccoli and rice served on a white plate.", "a dish with rice and broccoli",
        "Food on a plate."],
    4: ["Two giraffes standing near a tree.", "a pair of giraffes by a tall tree",
        "Giraffes eating leaves from a tree.", "two giraffes in the zoo", "Giraffes and a tree."],
}
TOKENIZERS = ["basic"] + (["ptb"] if shutil.which("java") else [])


@pytest.mark.parametrize("tokenizer", TOKENIZERS)
def test_identical_beats_unrelated_beats_nothing(tokenizer):
  exact = {k: v[0] for k, v in REFS.items()}
  shuffled = {1: REFS[3][0], 2: REFS[4][0], 3: REFS[1][0], 4: REFS[2][0]}
  good = captioning.score_captions(exact, REFS, tokenizer=tokenizer)
  bad = captioning.score_captions(shuffled, REFS, tokenizer=tokenizer)
  empty = captioning.score_captions({k: "" for k in REFS}, REFS, tokenizer=tokenizer)
  assert set(good) == {"CIDEr", "BLEU-1", "BLEU-2", "BLEU-3", "BLEU-4"}
  # A copy of a reference matches itself exactly: high n-gram precision everywhere.
  assert good["BLEU-4"] > 0.5 and good["CIDEr"] > 2.0, good
  assert bad["BLEU-4"] < 0.05 and bad["CIDEr"] < 0.3, bad
  assert good["CIDEr"] > bad["CIDEr"] >= empty["CIDEr"] == 0.0
  assert empty["BLEU-4"] < 1e-6


def test_ptb_and_basic_tokenizers_agree_on_plain_captions():
  if not shutil.which("java"):
    pytest.skip("java is not installed: the COCO PTB tokenizer cannot run here")
  caps = ["A man, riding a bike.", "", "café au lait!", "two\nlines", "Hello   World..."]
  assert captioning._ptb_tokenize(caps) == captioning._basic_tokenize(caps) == [
      "a man riding a bike", "", "café au lait", "two lines", "hello world"]


def test_missing_java_is_a_clear_error(monkeypatch):
  monkeypatch.setattr(captioning.shutil, "which", lambda name: None)
  with pytest.raises(RuntimeError, match="need Java.*default-jre-headless.*tokenizer='basic'"):
    captioning.score_captions({1: "a dog"}, {1: ["a dog"]})


def test_bad_inputs_are_clear_errors():
  with pytest.raises(ValueError, match="predictions is empty"):
    captioning.score_captions({}, REFS, tokenizer="basic")
  with pytest.raises(ValueError, match=r"have no prediction, e.g. \[3, 4\]"):
    captioning.score_captions({1: "a dog", 2: "a man"}, REFS, tokenizer="basic")
  with pytest.raises(ValueError, match=r"have no references, e.g. \[99\]"):
    captioning.score_captions({**{k: "x" for k in REFS}, 99: "a cat"}, REFS, tokenizer="basic")
  with pytest.raises(ValueError, match="image 1 must be a non-empty list"):
    captioning.score_captions({1: "a dog"}, {1: []}, tokenizer="basic")
  with pytest.raises(TypeError, match="prediction for image 1 must be one caption string"):
    captioning.score_captions({1: ["a dog"]}, {1: ["a dog"]}, tokenizer="basic")
  with pytest.raises(ValueError, match="tokenizer must be"):
    captioning.score_captions({1: "a dog"}, {1: ["a dog"]}, tokenizer="nltk")


def test_most_frequent_caption_baseline_is_the_normalised_mode():
  train = {10: ["A man riding a wave on a surfboard.", "a dog"],
           11: ["a man riding a wave on a surfboard", "A cat."],
           12: ["A MAN  riding a wave on a surfboard !", "a dog."]}
  assert captioning.most_frequent_caption_baseline(train) == "a man riding a wave on a surfboard"
  # Ties go to the first seen.
  assert captioning.most_frequent_caption_baseline(["b", "a", "a.", "B!"]) == "b"
  with pytest.raises(ValueError, match="no non-empty training caption"):
    captioning.most_frequent_caption_baseline(["", "  ", "."])


def test_baseline_scores_below_a_good_model():
  train = [REFS[1][1], "a dog running on a lawn", "a brown dog running on a lawn.", "a cat"]
  caption, base = captioning.score_baseline(train, REFS, tokenizer="basic")
  assert caption == "a brown dog running on a lawn"
  model = captioning.score_captions({k: v[1] for k, v in REFS.items()}, REFS, tokenizer="basic")
  assert model["CIDEr"] > base["CIDEr"] and model["BLEU-4"] > base["BLEU-4"]
  table = captioning.format_caption_scores(model, base, caption)
  assert "baseline (most frequent)" in table and caption in table


def test_ptb_scores_equal_the_coco_toolkit_pipeline():
  """Same numbers as pycocoevalcap's own PTBTokenizer -> Bleu(4) / Cider (the COCO eval recipe)."""
  if not shutil.which("java"):
    pytest.skip("java is not installed: the COCO PTB tokenizer cannot run here")
  from pycocoevalcap.bleu.bleu import Bleu
  from pycocoevalcap.cider.cider import Cider
  from pycocoevalcap.tokenizer.ptbtokenizer import PTBTokenizer
  preds = {1: "a dog running on the grass", 2: "a man rides a bike on a street",
           3: "a plate with rice", 4: "a giraffe near trees"}
  tok = PTBTokenizer()
  gts = tok.tokenize({k: [{"caption": c} for c in v] for k, v in REFS.items()})
  res = tok.tokenize({k: [{"caption": c}] for k, c in preds.items()})
  bleu, _ = Bleu(4).compute_score(gts, res, verbose=0)
  cider, _ = Cider().compute_score(gts, res)
  got = captioning.score_captions(preds, REFS)
  assert got["BLEU-4"] == pytest.approx(bleu[3], abs=1e-12)
  assert got["CIDEr"] == pytest.approx(cider, abs=1e-12)
  assert 0.0 < got["BLEU-4"] < 1.0 and got["CIDEr"] > 0.0, got
