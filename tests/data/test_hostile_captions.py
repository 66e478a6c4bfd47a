"""Hostile captions and annotation files: every case is a counted skip or a clear, named error.

Everything is built in tmp_path (nothing downloaded): invisible captions, lone surrogates,
non-UTF-8 files, non-integer / duplicate ids, bad held-out splits, and the tokenizers.
"""
import json
import os
import unicodedata
import warnings

import numpy as np
import pytest
from PIL import Image

from vlm.data import pipeline
from vlm.data.config import default_blip2_data_config
from vlm.data.image import BadSampleError
from vlm.data.qwen_processor import Qwen3Tokenizer
from vlm.data.sources import CocoCaptionsSource, load_coco_retrieval
from vlm.data.text import (Blip2Tokenizer, caption_problem, find_unencodable_char,
                           has_visible_text, pre_caption)

S, T = 16, 12
ANN = "captions_train2017.json"
VAL = "captions_val2017.json"

INVISIBLE = [
    "", "   ", " ...!! ", "\u200b", "\ufeff", "\u2060", "\u200b\u200c\u200d", "\u200e\u200f",
    "\u202a\u202e\u202c", "\u2066\u2069", "\u061c", "\x00\x01\x1f", "\x7f\x85\x9f", "\t\n\r",
    "\u0301", "\u0301\u0308\u20dd", "\u00a0\u3000\u2003", "\u2028\u2029", "\ufffd\ufffd",
    "\U000e0001\U000e0041", "\ue000", "\u0378", " \u200b . \ufeff ",
]
VISIBLE = ["a", "e\u0301", "\u00e9", "??", "\u732b", "\U0001f600", "1", "\u200ba dog\u200b", "$"]


def _write(root, n_images=8, caps_per_image=3, name=ANN, also_val=True):
  """Synthetic COCO dir: images 1000+i (random 24x32 JPEGs), caption k = 'A photo number k.'."""
  img_dir = root / "images"
  img_dir.mkdir(parents=True, exist_ok=True)
  rng = np.random.default_rng(0)
  images, anns = [], []
  for i in range(n_images):
    fname = f"{i:04d}.jpg"
    Image.fromarray(rng.integers(0, 256, (24, 32, 3), dtype=np.uint8)).save(img_dir / fname)
    images.append({"id": 1000 + i, "file_name": fname})
    for c in range(caps_per_image):
      k = i * caps_per_image + c
      anns.append({"id": k, "image_id": 1000 + i, "caption": f"A photo number {k}."})
  d = {"images": images, "annotations": anns}
  _dump(root / name, d)
  if also_val:
    _dump(root / VAL, d)
  return d


def _dump(path, d):
  # ensure_ascii (the default) writes lone surrogates as valid JSON escapes ("\ud800").
  path.write_text(json.dumps(d), encoding="utf-8")


def _cfg(root, **kw):
  cfg = default_blip2_data_config()
  cfg.root = str(root)
  cfg.image_size = S
  cfg.max_text_len = T
  cfg.update(kw)
  return cfg


def _src(root, name=ANN):
  return CocoCaptionsSource(str(root / name), str(root / "images"))


def _retrieval(root, name=VAL):
  return load_coco_retrieval(str(root / name), str(root / "images"))


@pytest.fixture
def synth(tmp_path):
  _write(tmp_path)
  return tmp_path


@pytest.fixture(scope="module")
def bert():
  return Blip2Tokenizer()


# ------------------------------------------------------------------------------------------
# 1. invisible captions


@pytest.mark.parametrize("text", INVISIBLE)
def test_invisible_captions_have_no_visible_text(text, bert):
  assert not has_visible_text(pre_caption(text))
  assert caption_problem(text)[0] == "empty_caption"
  ids, mask = bert.tokenize([pre_caption(text)], 8)
  assert mask.sum() <= 3  # at most [CLS] [UNK] [SEP] (unassigned code points give [UNK])


@pytest.mark.parametrize("text", VISIBLE)
def test_visible_captions_pass(text):
  assert has_visible_text(pre_caption(text)) and caption_problem(text) is None


def test_rule_covers_everything_the_bert_normalizer_strips(bert):
  """Any BMP character the tokenizer turns into bare [CLS] [SEP] is invisible by the rule."""
  chars = [chr(c) for c in range(0x10000) if not 0xD800 <= c < 0xE000]
  encs = bert._tokenizer.encode_batch(chars)  # pylint: disable=protected-access
  stripped = [c for c, e in zip(chars, encs) if len(e.ids) == 2]
  assert len(stripped) > 1000  # controls, format, private use, separators, marks
  leaked = [(hex(ord(c)), unicodedata.category(c)) for c in stripped if has_visible_text(c)]
  assert not leaked


def test_invisible_and_surrogate_captions_are_counted_skips(synth):
  d = json.loads((synth / ANN).read_text())
  d["annotations"][0]["caption"] = "\u200b\ufeff\u2060"
  d["annotations"][4]["caption"] = "a dog \ud800 on a mat"
  d["annotations"][5]["caption"] = "\u202e\u0301 \x85"
  _dump(synth / ANN, d)
  src = _src(synth)
  assert src[4]["caption"] == "a dog \ud800 on a mat"  # valid JSON, decodes to a lone surrogate
  kept, stats = pipeline.validate_records(src)
  assert 0 not in kept and 4 not in kept and 5 not in kept and len(kept) == 21
  assert stats.n_skipped == 3 and stats.reasons == {"empty_caption": 2, "invalid_text": 1}
  img = lambda i: str(synth / "images" / f"{i:04d}.jpg")
  assert stats.examples == [(0, img(0), "empty_caption"), (4, img(1), "invalid_text"),
                            (5, img(1), "empty_caption")]
  with pytest.raises(BadSampleError, match=r"record 0 .*caption_id=0 .*0000\.jpg.*empty after "
                                           r"pre_caption.*\\u200b"):
    pipeline.validate_records(src, on_bad_sample="raise")
  d["annotations"][0]["caption"] = "fine"
  _dump(synth / ANN, d)
  with pytest.raises(BadSampleError, match=r"record 4 .*caption_id=4 .*0001\.jpg.* lone "
                                           r"surrogate U\+D800 at character 6"):
    pipeline.validate_records(_src(synth), on_bad_sample="raise")


def _number_ids(bert, k):
  return tuple(bert.encode_ids(f"a photo number {k}")[4:-1])


def test_train_loader_streams_only_good_captions(synth, bert):
  d = json.loads((synth / ANN).read_text())
  d["annotations"][0]["caption"] = "\ufeff"
  d["annotations"][7]["caption"] = "\udc00 photo number 7"
  _dump(synth / ANN, d)
  loader = pipeline.build_blip2_train_loader(_cfg(synth), global_batch_size=4, seed=0,
                                             process_index=0, process_count=1)
  st = loader.stats
  assert st.n_records == 24 and st.n_kept == 22 and st.n_skipped == 2
  assert st.reasons == {"empty_caption": 1, "invalid_text": 1}
  assert [(i, r) for i, _, r in st.examples] == [(0, "empty_caption"), (7, "invalid_text")]
  it = iter(loader)
  batches = [next(it) for _ in range(11)]  # two epochs of the 22 good records
  seen = []
  for b in batches:
    assert (b["attention_mask"].sum(1) > 2).all()  # no empty text trains
    seen += [tuple(row[4:row.tolist().index(102)]) for row in b["input_ids"]]
  assert len(set(seen)) == 22
  assert _number_ids(bert, 0) not in seen and _number_ids(bert, 7) not in seen
  with pytest.raises(BadSampleError, match=r"caption_id=0 .*empty after pre_caption"):
    pipeline.build_blip2_train_loader(_cfg(synth, on_bad_sample="raise"), global_batch_size=4,
                                      seed=0, process_index=0, process_count=1)


# ------------------------------------------------------------------------------------------
# 2. tokenizers name the text and the position of a lone surrogate


def test_blip2_tokenizer_names_surrogate(bert):
  assert find_unencodable_char("ok") is None and find_unencodable_char("ab\udfffc") == 2
  with pytest.raises(ValueError, match=r"texts\[1\] contains a lone surrogate U\+D800 at "
                                       r"character 2"):
    bert.tokenize(["fine", "ab\ud800cd"], 8)
  with pytest.raises(ValueError, match=r"texts\[0\] contains a lone surrogate U\+DC00 at "
                                       r"character 0"):
    bert.tokenize("\udc00", 8)
  with pytest.raises(ValueError, match=r"U\+DBFF at character 1"):
    bert.encode_ids("x\udbff")
  # a proper pair (JSON "\ud83d\ude00") decodes to one astral character and is fine
  assert json.loads('"\\ud83d\\ude00"') == "\U0001f600"
  assert bert.tokenize([json.loads('"a \\ud83d\\ude00"')], 8)[1].sum() == 4


def test_qwen_tokenizer_names_surrogate():
  tok = Qwen3Tokenizer()
  assert tok.encode("hello") == tok.encode_batch(["hello"])[0]
  with pytest.raises(ValueError, match=r"text contains a lone surrogate U\+D800 at character 3"):
    tok.encode("abc\ud800")
  with pytest.raises(ValueError, match=r"texts\[2\] contains a lone surrogate U\+DFFF at "
                                       r"character 0"):
    tok.encode_batch(["a", "b", "\udfff!"])
  with pytest.raises(ValueError, match=r"texts\[1\] must be a str, got int"):
    tok.encode_batch(["a", 3])
  with pytest.raises(ValueError, match="got one str"):
    tok.encode_batch("abc")


# ------------------------------------------------------------------------------------------
# 3. non-UTF-8 annotation files


def test_non_utf8_annotation_file_names_file_and_offset(synth):
  d = json.loads((synth / ANN).read_text())
  d["annotations"][3]["caption"] = "un caf\u00e9 au lait"
  raw = json.dumps(d, ensure_ascii=False).encode("latin-1")
  (synth / ANN).write_bytes(raw)
  offset = raw.index(b"\xe9")
  for load in (_src, lambda r: _retrieval(r, ANN)):
    with pytest.raises(ValueError, match=rf"{ANN} is not UTF-8 text: byte offset {offset} "
                                         r"\(line 1\).*re-encode it as UTF-8"):
      load(synth)
  (synth / ANN).write_bytes(json.dumps(d).encode("utf-16"))
  with pytest.raises(ValueError, match=r"UTF-16.*byte offset"):
    _src(synth)
  (synth / ANN).write_bytes(b"\xef\xbb\xbf" + json.dumps(d).encode("utf-8"))  # UTF-8 BOM is ok
  assert len(_src(synth)) == 24


# ------------------------------------------------------------------------------------------
# 4. non-integer ids


@pytest.mark.parametrize("value", ["abc", 1.5, 1000.0, None, True, "1000", [1000]])
@pytest.mark.parametrize("where", [("images", 1, "id"), ("annotations", 2, "image_id"),
                                   ("annotations", 5, "id")])
def test_non_integer_ids_name_file_and_record(synth, where, value):
  key, index, field = where
  d = json.loads((synth / ANN).read_text())
  d[key][index][field] = value
  _dump(synth / ANN, d)
  pattern = rf"{ANN}: {key}\[{index}\]\['{field}'\] must be a JSON integer"
  if value == "1000":
    pattern += r".*without quotes"
  with pytest.raises(ValueError, match=pattern):
    _src(synth)
  with pytest.raises(ValueError, match=pattern):
    _retrieval(synth, ANN)


def test_bad_file_name_is_named(synth):
  d = json.loads((synth / ANN).read_text())
  d["images"][3]["file_name"] = 17
  _dump(synth / ANN, d)
  with pytest.raises(ValueError, match=r"images\[3\]\['file_name'\] must be a non-empty str"):
    _src(synth)


# ------------------------------------------------------------------------------------------
# 5. duplicate ids


def test_duplicate_image_id_with_other_file_is_an_error(synth):
  d = json.loads((synth / VAL).read_text())
  d["images"].append({"id": 1002, "file_name": "other.jpg"})
  _dump(synth / VAL, d)
  pattern = (rf"{VAL}: images\[2\] and images\[8\] both have id=1002 but different file names "
             r"\('0002\.jpg' vs 'other\.jpg'\)")
  with pytest.raises(ValueError, match=pattern):
    _src(synth, VAL)
  with pytest.raises(ValueError, match=pattern):
    _retrieval(synth)


def test_exact_duplicates_are_collapsed_with_a_warning(synth):
  d = json.loads((synth / VAL).read_text())
  d["images"].append(dict(d["images"][2]))
  d["annotations"].append(dict(d["annotations"][4]))
  _dump(synth / VAL, d)
  with pytest.warns(UserWarning, match=r"2 exact duplicate entries ignored"):
    src = _src(synth, VAL)
  assert len(src) == 24 and [src[i]["caption_id"] for i in range(24)] == list(range(24))
  with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    r = _retrieval(synth)
  assert len(r["image_paths"]) == 8 and len(r["texts"]) == 24
  assert r["img2txt"][1] == [3, 4, 5]
  np.testing.assert_array_equal(r["text_ids"], np.arange(24))


def test_duplicate_caption_id_with_other_content_is_an_error(synth):
  d = json.loads((synth / VAL).read_text())
  d["annotations"].append({"id": 4, "image_id": 1001, "caption": "something else"})
  _dump(synth / VAL, d)
  with pytest.raises(ValueError, match=r"annotations\[4\] and annotations\[24\] both have id=4 "
                                       r"but differ"):
    _src(synth, VAL)
  with pytest.raises(ValueError, match=r"annotations\[4\] and annotations\[24\]"):
    _retrieval(synth)


# ------------------------------------------------------------------------------------------
# 6. held-out split validated before training


def test_validate_retrieval_split_ok(synth):
  out = pipeline.validate_retrieval_split(_cfg(synth), "val")
  assert out == {"split": "val", "annotation_file": str(synth / VAL), "num_images": 8,
                 "num_texts": 24}
  assert pipeline.validate_retrieval_split(_cfg(synth, validate_images="header"),
                                           "train")["num_texts"] == 24


def test_validate_retrieval_split_names_every_bad_file_and_caption(synth):
  img = synth / "images"
  os.remove(img / "0001.jpg")
  (img / "0002.jpg").write_bytes(b"")
  data = (img / "0005.jpg").read_bytes()
  (img / "0005.jpg").write_bytes(data[: int(len(data) * 0.8)])  # header intact, pixels cut
  d = json.loads((synth / VAL).read_text())
  d["annotations"][9]["caption"] = "\u200b"
  d["annotations"][10]["caption"] = "x\ud800"
  _dump(synth / VAL, d)
  with pytest.raises(BadSampleError) as e:
    pipeline.validate_retrieval_split(_cfg(synth), "val")
  msg = str(e.value)
  assert "retrieval split 'val'" in msg and VAL in msg
  assert "3 of 8 image files are bad" in msg and "2 of 24 captions are bad" in msg
  assert "missing: " + str(img / "0001.jpg") in msg and "empty: " + str(img / "0002.jpg") in msg
  assert "corrupt: " + str(img / "0005.jpg") in msg
  assert "caption_id=9," in msg and "empty_caption" in msg
  assert "caption_id=10," in msg and "U+D800 at character 1" in msg
  assert "replace or re-encode" in msg
  # header mode only opens + verifies: the truncated JPEG passes, the others do not
  with pytest.raises(BadSampleError, match=r"2 of 8 image files are bad") as e:
    pipeline.validate_retrieval_split(_cfg(synth, validate_images="header"), "val")
  assert "0005.jpg" not in str(e.value)
  # the eval loader rejects the same captions, naming them, before decoding any image
  with pytest.raises(BadSampleError, match=r"2 of 24 captions are bad.*caption_id=9,.*"
                                           r"caption_id=10,"):
    pipeline.build_retrieval_eval_data(_cfg(synth), "val")


def test_validate_retrieval_split_caps_the_listing(tmp_path):
  _write(tmp_path, n_images=25, caps_per_image=1)
  for p in (tmp_path / "images").iterdir():
    p.unlink()
  with pytest.raises(BadSampleError, match=r"25 of 25 image files are bad.*\.\.\. and 5 more"):
    pipeline.validate_retrieval_split(_cfg(tmp_path), "val")


def test_validate_retrieval_split_bad_annotation_and_options(synth):
  (synth / VAL).write_bytes(b'{"images": [], "annotations": [\xff]}')
  with pytest.raises(ValueError, match=r"not UTF-8 text: byte offset 31"):
    pipeline.validate_retrieval_split(_cfg(synth), "val")
  with pytest.raises(ValueError, match="split"):
    pipeline.validate_retrieval_split(_cfg(synth), "test")
  with pytest.raises(ValueError, match="validate_images"):
    pipeline.validate_retrieval_split(_cfg(synth, validate_images="none"), "train")
