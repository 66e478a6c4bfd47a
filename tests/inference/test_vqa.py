"""vlm.inference.vqa: VQA answer normalization, soft accuracy, baseline and the OK-VQA data."""
import json
import os

import pytest

from vlm.data.paths import REPO_ROOT
from vlm.inference.vqa import (format_vqa_scores, load_vqa, most_frequent_answer_baseline,
                               normalize_answer, postprocess_answer, vqa_soft_accuracy)

VQA_FILE = os.path.join(REPO_ROOT, "data/vqa/okvqa_on_coco_real_captions.json")


@pytest.mark.parametrize("raw,expected", [
    ("Two", "2"),                        # number words -> digits
    ("none", "0"),
    ("The dog.", "dog"),                 # article dropped, trailing period removed
    ("A  Cat\tand\nAN apple", "cat and apple"),
    ("black-white", "black white"),      # '-' touching no space -> a space
    ("yes !", "yes"),                    # ' !' in the text -> deleted
    ("t-shirt, jeans", "t shirt jeans"),  # ', ' deletes ','; '-' becomes a space
    ("(a) b", "b"),                      # '(' -> space, ') ' deletes ')', then 'a' is an article
    ("1,000", "1000"),                   # digit,digit: every listed mark is deleted
    ("3.5", "3.5"),                      # a period before a digit stays
    ("3.5.", "3.5"),
    ("Mr. Smith", "mr smith"),
    ("dont know", "don't know"),         # contractions restored
    ("whats up", "what's up"),
    ("couldnt've", "couldn't've"),
    ("couldntve", "couldntve"),          # not in the official table
    ("it's", "it's"),                    # apostrophes are kept
    ("im", "im"),                        # official 'Im' entry has a capital I: never matches
    ("somebody'd", "somebodyd"),         # official reversed entry
    ("#1: a*b", "#1: a*b"),              # ':', '#', '*' are not in the punctuation list
    ("  ", ""),
])
def test_normalize_answer_official_rules(raw, expected):
  assert normalize_answer(raw) == expected


def test_normalize_answer_rejects_non_str():
  with pytest.raises(ValueError, match="must be a str"):
    normalize_answer(3)


@pytest.mark.parametrize("raw,expected", [
    ("  surfing \n", "surfing"),
    ("red\nQuestion: what else?", "red"),
    ("\n\n blue sky \n more", "blue sky"),
    ("", ""),
    ("   ", ""),
])
def test_postprocess_answer(raw, expected):
  assert postprocess_answer(raw) == expected


def _write(tmp_path, questions, images=("a.jpg", "b.jpg", "c.jpg")):
  img_dir = tmp_path / "images"
  img_dir.mkdir(exist_ok=True)
  for name in images:
    (img_dir / name).write_bytes(b"not needed")
  path = tmp_path / "vqa.json"
  path.write_text(json.dumps({"questions": questions}))
  return str(path), str(img_dir)


TOY = [
    {"question_id": 1, "question": "What animal?", "file_name": "a.jpg",
     "answer_scores": {"cat": 1, "kitten": 0.667}, "answer": "cat"},
    {"question_id": 2, "question": "How many?", "file_name": "b.jpg",
     "answer_scores": {"2": 1}, "answer": "2"},
    {"question_id": 3, "question": "What color?", "file_name": "c.jpg",
     "answer_scores": {"red": 0.667, "Dark-Red": 1}, "answer": "Dark-Red"},
]


def test_toy_accuracy_and_baseline(tmp_path):
  data = load_vqa(*_write(tmp_path, TOY))
  assert [d["question_id"] for d in data] == [1, 2, 3]
  assert data[2]["answers"] == {"red": 0.667, "dark red": 1.0} and data[2]["answer"] == "dark red"
  assert data[0]["image"] == os.path.join(str(tmp_path), "images", "a.jpg")
  # Hand computed: "Kitten." -> kitten 0.667; "two" -> 2 -> 1.0; "blue" -> 0.
  s = vqa_soft_accuracy({1: "Kitten.", 2: "two", 3: "blue"}, data)
  assert s["n"] == 3 and s["per_question"] == {1: 0.667, 2: 1.0, 3: 0.0}
  assert s["accuracy"] == pytest.approx((0.667 + 1.0) / 3)
  assert vqa_soft_accuracy({1: "a cat", 2: "2", 3: "dark red"}, data)["accuracy"] == 1.0
  # Top answers cat / 2 / dark red each occur once: the first one wins; it scores 1 on q1 only.
  b = most_frequent_answer_baseline(data)
  assert (b["answer"], b["count"], b["n"]) == ("cat", 1, 3)
  assert b["accuracy"] == pytest.approx(1 / 3)
  table = format_vqa_scores(s, b)
  assert "VQA acc" in table and "55.6" in table and "33.3" in table and "'cat'" in table


def test_accuracy_errors(tmp_path):
  data = load_vqa(*_write(tmp_path, TOY))
  with pytest.raises(ValueError, match="1 of 3 questions have no prediction, first question_id 3"):
    vqa_soft_accuracy({1: "cat", 2: "2"}, data)
  with pytest.raises(ValueError, match="not in the dataset, first '1'"):
    vqa_soft_accuracy({1: "cat", 2: "2", 3: "x", "1": "cat"}, data)
  with pytest.raises(ValueError, match="question_id 2 is NoneType"):
    vqa_soft_accuracy({1: "cat", 2: None, 3: "x"}, data)
  with pytest.raises(ValueError, match="empty"):
    vqa_soft_accuracy({}, [])


@pytest.mark.parametrize("mutate,match", [
    (lambda q: q[1].pop("question_id"), r"questions\[1\]: 'question_id' must be an int"),
    (lambda q: q[1].update(question_id=1), r"questions\[1\] \(question_id 1\): question_id "
                                           r"repeats questions\[0\]"),
    (lambda q: q[0].update(question=" "), r"questions\[0\] \(question_id 1\): 'question'"),
    (lambda q: q[0].update(question="a\ud800b"), r"'question' contains a lone surrogate"),
    (lambda q: q[2].update(answer_scores={}), r"questions\[2\].*'answer_scores' must be"),
    (lambda q: q[2].update(answer_scores={"red": 2}), r"score of answer 'red' must be a number"),
    (lambda q: q[2].update(answer_scores={"the": 1}, answer="the"), "empty after normalization"),
    (lambda q: q[0].update(answer="dog"), r"questions\[0\].*'answer' must be one of"),
    (lambda q: q[0].update(file_name=None), r"'file_name' must be an image name"),
    (lambda q: q.append(7), r"questions\[3\] is a int, expected an object"),
])
def test_malformed_records(tmp_path, mutate, match):
  questions = json.loads(json.dumps(TOY))
  mutate(questions)
  with pytest.raises(ValueError, match=match):
    load_vqa(*_write(tmp_path, questions))


def test_file_errors(tmp_path):
  path, img = _write(tmp_path, TOY, images=("a.jpg", "b.jpg"))
  with pytest.raises(FileNotFoundError, match=r"questions\[2\] \(question_id 3\): image .*c.jpg"):
    load_vqa(path, img)
  assert len(load_vqa(path, img, check_images=False)) == 3
  with pytest.raises(FileNotFoundError, match="VQA file not found"):
    load_vqa(str(tmp_path / "nope.json"), img)
  bad = tmp_path / "bad.json"
  bad.write_text("{not json")
  with pytest.raises(ValueError, match="bad.json is not valid JSON"):
    load_vqa(str(bad), img)
  bad.write_text(json.dumps({"annotations": []}))
  with pytest.raises(ValueError, match="expected an object with a 'questions' list"):
    load_vqa(str(bad), img)
  bad.write_bytes(b'{"questions": ["\xff"]}')
  with pytest.raises(ValueError, match="not UTF-8"):
    load_vqa(str(bad), img)


def test_real_okvqa_file():
  data = load_vqa()  # defaults: data/vqa/okvqa_on_coco_real_captions.json, data/coco/images
  with open(VQA_FILE) as f:
    raw = json.load(f)["questions"]
  assert len(data) == 47 == len(raw)
  assert sum(d["split"] == "train" for d in data) == 19
  assert sum(d["split"] == "val" for d in data) == 28
  assert all(os.path.isfile(d["image"]) for d in data)
  # The file's answers are already in normalized form.
  for d, r in zip(data, raw):
    assert d["answers"] == {k: float(v) for k, v in r["answer_scores"].items()}
    assert d["answer"] == r["answer"]
  # Predicting the top answer scores its soft score; the baseline equals the raw-score count.
  oracle = vqa_soft_accuracy({d["question_id"]: d["answer"] for d in data}, data)
  assert oracle["accuracy"] == pytest.approx(sum(r["answer_scores"][r["answer"]] for r in raw)
                                             / 47)
  b = most_frequent_answer_baseline(data)
  tops = [r["answer"] for r in raw]
  assert b["count"] == max(tops.count(t) for t in tops) and tops.count(b["answer"]) == b["count"]
  assert b["accuracy"] == pytest.approx(sum(r["answer_scores"].get(b["answer"], 0) for r in raw)
                                        / 47)
  assert 0 < b["accuracy"] < oracle["accuracy"]
