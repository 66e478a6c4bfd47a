"""Tests for vlm.data.text: LAVIS pre_caption and the BERT WordPiece tokenizer vs HF BertTokenizer."""
import json
import os
import pickle

import numpy as np
import pytest

from vlm.data.paths import REPO_ROOT
from vlm.data.text import Blip2Tokenizer, pre_caption

VOCAB = os.path.join(REPO_ROOT, "vlm/assets/tokenizers/bert-base-uncased/vocab.txt")
COCO = os.path.join(REPO_ROOT, "data/coco")


def _all_captions():
  caps = []
  for split in ("train", "val"):
    with open(os.path.join(COCO, f"captions_{split}2017.json")) as f:
      caps += [a["caption"] for a in json.load(f)["annotations"]]
  return caps


@pytest.fixture(scope="module")
def tok():
  return Blip2Tokenizer()


@pytest.fixture(scope="module")
def hf_tok():
  transformers = pytest.importorskip("transformers")
  t = transformers.BertTokenizer(vocab_file=VOCAB)
  t.add_special_tokens({"bos_token": "[DEC]"})
  return t


@pytest.mark.parametrize("raw,expected", [
    ("A man (riding) a horse!!  ", "a man riding a horse"),
    ("Hello.World", "hello world"),
    ('He said: "hi"; ok~ #1 *star*', "he said hi ok 1 star"),
    ("A dog.\n", "a dog"),
    ("a\tb", "a\tb"),            # a single non-space whitespace char is not collapsed
    ("a\t\tb  c", "a b c"),      # runs of >= 2 whitespace become one space
    ("it's, fine? yes-no/maybe", "it's, fine? yes-no/maybe"),  # , ? ' - / are kept
    ("...!!!", ""),
    ("  Leading and trailing  ", "leading and trailing"),
])
def test_pre_caption_examples(raw, expected):
  assert pre_caption(raw) == expected


def test_pre_caption_max_words_and_prompt():
  text = " ".join(f"w{i}" for i in range(60))
  out = pre_caption(text)
  assert out.split(" ") == [f"w{i}" for i in range(50)]
  assert pre_caption(text, max_words=3) == "w0 w1 w2"
  assert pre_caption("A Cat.", prompt="a photo of ") == "a photo of a cat"


def test_pre_caption_errors():
  with pytest.raises(ValueError, match="str"):
    pre_caption(None)
  with pytest.raises(ValueError, match="max_words"):
    pre_caption("x", max_words=0)


def test_special_ids(tok):
  assert tok.vocab_size == 30523
  assert (tok.pad_token_id, tok.unk_token_id, tok.cls_token_id, tok.sep_token_id,
          tok.mask_token_id, tok.dec_token_id) == (0, 100, 101, 102, 103, 30522)


def test_tokenize_layout_and_truncation(tok):
  ids, mask = tok.tokenize(["a cat", " ".join(["dog"] * 40), ""], max_length=8)
  assert ids.dtype == np.int32 and mask.dtype == np.int32 and ids.shape == (3, 8)
  assert ids[0, 0] == 101 and ids[0, 3] == 102 and (ids[0, 4:] == 0).all()
  np.testing.assert_array_equal(mask[0], [1, 1, 1, 1, 0, 0, 0, 0])
  assert ids[1, 0] == 101 and ids[1, -1] == 102 and mask[1].all()
  np.testing.assert_array_equal(ids[2], [101, 102, 0, 0, 0, 0, 0, 0])
  ids1, _ = tok.tokenize("a cat", 8)
  np.testing.assert_array_equal(ids1[0], ids[0])
  assert tok.decode(ids[0]) == "a cat"


def test_tokenize_errors(tok):
  with pytest.raises(ValueError, match="max_length"):
    tok.tokenize(["x"], 1)
  with pytest.raises(ValueError, match=r"texts\[1\]"):
    tok.tokenize(["x", 3], 8)
  with pytest.raises(FileNotFoundError, match="vocab"):
    Blip2Tokenizer("/nonexistent/vocab.txt")


def test_pickle_roundtrip(tok):
  tok2 = pickle.loads(pickle.dumps(tok))
  np.testing.assert_array_equal(tok2.tokenize(["a red bus"], 10)[0], tok.tokenize(["a red bus"], 10)[0])


@pytest.mark.parametrize("max_length", [32, 35])
def test_matches_hf_bert_tokenizer_on_coco(tok, hf_tok, max_length):
  caps = [pre_caption(c) for c in _all_captions()]
  assert len(caps) == 1322
  ids, mask = tok.tokenize(caps, max_length)
  ref = hf_tok(caps, padding="max_length", truncation=True, max_length=max_length,
               return_tensors="np")
  np.testing.assert_array_equal(ids, ref["input_ids"])
  np.testing.assert_array_equal(mask, ref["attention_mask"])


def test_matches_hf_on_edge_cases(tok, hf_tok):
  texts = ["Café naïve résumé", "東京 tower", "x" * 150, "don't stop", "a\u200bb \x00c",
           "UPPER lower MiXeD 123,456.7", "[DEC] a photo", "emoji 🙂 test", "   ",
           " ".join(["supercalifragilistic"] * 20)]
  ids, mask = tok.tokenize(texts, 16)
  ref = hf_tok(texts, padding="max_length", truncation=True, max_length=16, return_tensors="np")
  np.testing.assert_array_equal(ids, ref["input_ids"])
  np.testing.assert_array_equal(mask, ref["attention_mask"])
