"""vlm.data.llm_tokenizers: OPT and T5 ids, batching and decoding equal HF's on every real text.

References: ``transformers.GPT2Tokenizer`` configured like ``facebook/opt-*`` (BOS ``</s>``
prepended, ``</s>`` bos/eos/unk, ``<pad>`` pad) on a ``vocab.json`` this test writes itself from
GPT-2's ``encoder.json`` and fairseq's ``dict.txt``; ``transformers.T5Tokenizer`` (SentencePiece
``spiece.model``) and ``T5TokenizerFast``. The source files come from ``<repo>/../shared/data``
(CI has that copy beside the repository); tests that need them skip when it is missing.
"""
import json
import os
import pickle

import numpy as np
import pytest

from vlm.data.llm_tokenizers import (LLMTokenizer, llm_tokenizer, opt_tokenizer,
                                     opt_vocab_from_fairseq, t5_tokenizer)
from vlm.data.paths import REPO_ROOT

SHARED = os.path.join(os.path.dirname(REPO_ROOT), "shared", "data")
GPT2_DIR = os.path.join(SHARED, "tokenizers", "gpt2-opt")
T5_DIR = os.path.join(SHARED, "tokenizers", "t5")
T5_JSON = os.path.join(REPO_ROOT, "vlm/assets/tokenizers/t5/tokenizer.json")
OPT_ASSET = os.path.join(REPO_ROOT, "vlm/assets/tokenizers/gpt2-opt")


def _need(path):
  if not os.path.exists(path):
    pytest.skip(f"{path} is missing (the shared data copy belongs at <repo>/../shared)")
  return path


def _texts():
  """All COCO captions, all OK-VQA questions with the LAVIS prompts, and edge cases."""
  texts = []
  for split in ("train", "val"):
    with open(os.path.join(REPO_ROOT, "data/coco", f"captions_{split}2017.json")) as f:
      texts += [a["caption"] for a in json.load(f)["annotations"]]
  # data/vqa holds the same file as shared/data/vqa (copied into the repository).
  with open(os.path.join(REPO_ROOT, "data/vqa/okvqa_on_coco_real_captions.json")) as f:
    questions = [q["question"] for q in json.load(f)["questions"]]
  assert len(texts) == 1322 and len(questions) == 47
  texts.append("a photo of")
  for q in questions:
    texts += [q, f"Question: {q} Answer:", f"Question: {q} Short answer:"]
  texts += ["", " ", "  two leading spaces", "trailing  ", "tab\tand\nnew line", "don't  can't",
            "café naïve Ünïcode 日本語 🙂 ½", "a </s> inside", "<pad> pad", "<extra_id_0> x",
            "100,000 dogs... (really?!)", "x" * 300, "Hello world"]
  return texts


TEXTS = _texts()


@pytest.fixture(scope="module")
def opt():
  return opt_tokenizer()


@pytest.fixture(scope="module")
def t5():
  return t5_tokenizer()


def _write_opt_vocab(tmp_path):
  """The OPT vocab.json, written independently of the code under test: specials 0..3, the k-th
  dict.txt row (a GPT-2 id) -> 4 + k, the first three madeupwords, then <mask>."""
  with open(os.path.join(_need(GPT2_DIR), "encoder.json")) as f:
    enc = json.load(f)
  gpt2 = {v: k for k, v in enc.items()}
  vocab = {"<s>": 0, "<pad>": 1, "</s>": 2, "<unk>": 3}
  with open(os.path.join(GPT2_DIR, "dict.txt")) as f:
    rows = [line.split()[0] for line in f]
  for k, r in enumerate(rows[:len(gpt2) + 3]):
    vocab[gpt2[int(r)] if r.isdigit() else r] = 4 + k
  vocab["<mask>"] = len(vocab)
  path = tmp_path / "vocab.json"
  path.write_text(json.dumps(vocab))
  return str(path), vocab


@pytest.fixture(scope="module")
def hf_opt(tmp_path_factory):
  transformers = pytest.importorskip("transformers")
  vocab_file, _ = _write_opt_vocab(tmp_path_factory.mktemp("opt"))
  return transformers.GPT2Tokenizer(
      vocab_file=vocab_file, merges_file=os.path.join(GPT2_DIR, "vocab.bpe"),
      bos_token="</s>", eos_token="</s>", unk_token="</s>", pad_token="<pad>",
      add_bos_token=True)


@pytest.fixture(scope="module")
def hf_t5_fast():
  transformers = pytest.importorskip("transformers")
  return transformers.T5TokenizerFast(tokenizer_file=T5_JSON, clean_up_tokenization_spaces=True)


@pytest.fixture(scope="module")
def hf_t5_slow():
  transformers = pytest.importorskip("transformers")
  pytest.importorskip("sentencepiece")
  return transformers.T5Tokenizer(vocab_file=os.path.join(_need(T5_DIR), "spiece.model"),
                                  legacy=True, clean_up_tokenization_spaces=True)


def test_known_ids(opt, t5):
  # Checks published with the vocabularies (shared/data/README.md).
  assert opt.encode_ids("Hello world", add_special_tokens=False) == [31414, 232]
  assert opt.encode_ids("Hello world") == [2, 31414, 232]
  assert opt.encode_ids(" the", False) == [5] and opt.encode_ids(".", False) == [4]
  assert t5.encode_ids("Hello world") == [8774, 296, 1]
  assert t5.encode_ids("The <extra_id_0> walks in <extra_id_1> park") == [
      37, 32099, 10681, 16, 32098, 2447, 1]
  assert (opt.name, opt.vocab_size, opt.pad_token_id, opt.eos_token_id, opt.bos_token_id) == (
      "opt", 50265, 1, 2, 2)
  assert (t5.name, t5.vocab_size, t5.pad_token_id, t5.eos_token_id, t5.bos_token_id) == (
      "t5", 32100, 0, 1, None)
  assert llm_tokenizer("opt").encode_ids("a") == opt.encode_ids("a")
  assert llm_tokenizer("t5").encode_ids("a") == t5.encode_ids("a")


def test_bundled_opt_vocab_is_the_fairseq_remap(tmp_path):
  _, expected = _write_opt_vocab(tmp_path)
  with open(os.path.join(OPT_ASSET, "vocab.json")) as f:
    assert json.load(f) == expected
  assert opt_vocab_from_fairseq(os.path.join(GPT2_DIR, "encoder.json"),
                                os.path.join(GPT2_DIR, "dict.txt")) == expected
  with open(os.path.join(OPT_ASSET, "merges.txt"), "rb") as a, \
       open(os.path.join(GPT2_DIR, "vocab.bpe"), "rb") as b:
    assert a.read() == b.read()
  # The raw GPT-2 + fairseq directory gives the same tokenizer.
  raw = opt_tokenizer(GPT2_DIR)
  assert raw.vocab_size == 50265
  assert raw.batch_encode(TEXTS[:50], max_length=20)[0].tolist() == \
      opt_tokenizer().batch_encode(TEXTS[:50], max_length=20)[0].tolist()


def _check_against_hf(ours: LLMTokenizer, hf, texts):
  want = hf(texts, add_special_tokens=True)["input_ids"]
  got = [ours.encode_ids(t) for t in texts]
  bad = [(t, g, w) for t, g, w in zip(texts, got, want) if g != w]
  assert not bad, f"{len(bad)} of {len(texts)} texts differ, first: {bad[0]}"
  bare = hf(texts, add_special_tokens=False)["input_ids"]
  assert [ours.encode_ids(t, add_special_tokens=False) for t in texts] == bare
  for length, side in ((12, "right"), (40, "left"), (40, "right")):
    hf.padding_side = side
    ref = hf(texts, max_length=length, padding="max_length", truncation=True)
    ids, mask = ours.batch_encode(texts, max_length=length, padding_side=side)
    assert ids.dtype == np.int32 and mask.dtype == np.int32 and ids.shape == (len(texts), length)
    np.testing.assert_array_equal(ids, np.asarray(ref["input_ids"]))
    np.testing.assert_array_equal(mask, np.asarray(ref["attention_mask"]))
  hf.padding_side = "right"
  return got


def test_opt_ids_equal_hf(opt, hf_opt):
  got = _check_against_hf(opt, hf_opt, TEXTS)
  # Byte-level BPE is lossless: decoding (after the BOS) gives the text back, special tokens
  # written in the text included; skipping special tokens drops those.
  for t, ids in zip(TEXTS, got):
    assert ids[0] == 2 and opt.decode(ids[1:], skip_special_tokens=False) == t
    if "</s>" not in t and "<pad>" not in t:
      assert opt.decode(ids) == t
  assert opt.decode(opt.encode_ids("a </s> inside")) == "a  inside"
  assert opt.batch_decode(got[:200]) == hf_opt.batch_decode(got[:200], skip_special_tokens=True)
  ids, _ = opt.batch_encode(TEXTS[:200], max_length=30)
  assert opt.batch_decode(ids) == hf_opt.batch_decode(ids.tolist(), skip_special_tokens=True)
  assert opt.decode(ids[0], skip_special_tokens=False) == hf_opt.decode(ids[0].tolist())


def test_t5_ids_equal_hf_sentencepiece(t5, hf_t5_slow):
  _check_against_hf(t5, hf_t5_slow, TEXTS)


def test_t5_ids_and_decode_equal_hf_fast(t5, hf_t5_fast):
  got = _check_against_hf(t5, hf_t5_fast, TEXTS)
  assert t5.batch_decode(got) == hf_t5_fast.batch_decode(got, skip_special_tokens=True)
  ids, _ = t5.batch_encode(TEXTS[:200], max_length=30)
  assert t5.batch_decode(ids) == hf_t5_fast.batch_decode(ids.tolist(), skip_special_tokens=True)
  assert t5.decode(ids[0], skip_special_tokens=False) == hf_t5_fast.decode(ids[0].tolist())
  # Plain captions survive the round trip up to the spaces before punctuation.
  assert t5.decode(t5.encode_ids("A man riding a wave on top of a surfboard.")) == \
      "A man riding a wave on top of a surfboard."


def test_truncation_keeps_special_tokens(opt, t5):
  text = "one two three four five six"
  o = opt.encode_ids(text, add_special_tokens=False)
  ids, mask = opt.batch_encode([text], max_length=3)
  assert ids[0].tolist() == [2] + o[:2] and mask[0].tolist() == [1, 1, 1]
  t = t5.encode_ids(text, add_special_tokens=False)
  ids, _ = t5.batch_encode([text], max_length=3)
  assert ids[0].tolist() == t[:2] + [1]
  ids, mask = t5.batch_encode(text, max_length=1)
  assert ids.tolist() == [[1]] and mask.tolist() == [[1]]
  ids, _ = opt.batch_encode([text], max_length=3, add_special_tokens=False)
  assert ids[0].tolist() == o[:3]
  ids, mask = opt.batch_encode([], max_length=4)
  assert ids.shape == (0, 4) and mask.shape == (0, 4)


def test_errors(opt, t5):
  with pytest.raises(ValueError, match=r"texts\[1\].*U\+D800"):
    opt.batch_encode(["fine", "bad \ud800 text"], max_length=8)
  with pytest.raises(ValueError, match=r"text contains a lone surrogate U\+DC00 at character 2"):
    t5.encode_ids("ab\udc00")
  with pytest.raises(ValueError, match=r"texts\[0\] is int"):
    t5.batch_encode([3], max_length=8)
  with pytest.raises(ValueError, match=r"texts\[1\] is .* tokens long.*truncation=True"):
    t5.batch_encode(["a", "a long text with many words"], max_length=4, truncation=False)
  with pytest.raises(ValueError, match="padding_side"):
    opt.batch_encode(["a"], max_length=4, padding_side="middle")
  with pytest.raises(ValueError, match="max_length"):
    opt.batch_encode(["a"], max_length=0)
  with pytest.raises(ValueError, match=r"ids\[1\] = 50265 is outside the opt vocabulary"):
    opt.decode([2, 50265])
  with pytest.raises(ValueError, match=r"ids\[0\] = -1"):
    t5.decode(np.array([-1, 3]))
  with pytest.raises(ValueError, match="not an integer"):
    t5.decode([1.5])
  with pytest.raises(ValueError, match=r"1-D id sequence, got shape \(1, 2\)"):
    t5.decode(np.array([[3, 4]]))
  with pytest.raises(ValueError, match="unknown LLM tokenizer kind 'llama'"):
    llm_tokenizer("llama")
  with pytest.raises(FileNotFoundError, match="no OPT tokenizer"):
    opt_tokenizer("/nonexistent/dir")
  with pytest.raises(FileNotFoundError, match="no T5 tokenizer.json"):
    t5_tokenizer("/nonexistent/dir")


def test_pickle(opt, t5):
  for tok in (opt, t5):
    back = pickle.loads(pickle.dumps(tok))
    assert back.encode_ids("Question: what is it? Answer:") == \
        tok.encode_ids("Question: what is it? Answer:")
    assert back.vocab_size == tok.vocab_size
