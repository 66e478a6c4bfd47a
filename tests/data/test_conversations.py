"""Qwen-VL data sources (vlm.data.conversations): LLaVA/Qwen JSON and JSONL, the messages form,
COCO captions as caption rows and chat turns, OK-VQA, text-only, and every bad-record class."""
import json

import numpy as np
import pytest
from PIL import Image

from vlm.data import conversations as conv
from vlm.data.image import BadSampleError


def test_demo_image_and_video_files_parse():
  samples, problems = conv.load_conversations("data/qwen_sft/single_images.json")
  assert problems == [] and len(samples) == 3
  s = samples[0]
  assert s.kind == "chat" and len(s.images) == 1 and s.videos == ()
  assert s.images[0].endswith("data/qwen_sft/demo/images/10095.png")
  assert [m["role"] for m in s.messages] == ["user", "assistant"]
  assert s.messages[0]["content"].endswith("<image>") and s.messages[1]["content"] == "Yes"
  videos, problems = conv.load_conversations("data/qwen_sft/activitynet_qa/video.json")
  assert problems == [] and len(videos) == 3 and all(len(v.videos) == 1 for v in videos)
  # the first record's clip is not shipped: a counted missing_video, the others are usable
  checks = [conv.check_sample_files(v) for v in videos]
  assert checks[0][0] == "missing_video" and "v_7bUu05RIksU.mp4" in checks[0][1]
  assert checks[1] is None and checks[2] is None


def _img(path, size=(20, 30)):
  Image.fromarray(np.zeros(size + (3,), np.uint8)).save(path)
  return str(path)


def test_jsonl_messages_form_lists_and_text_only(tmp_path):
  _img(tmp_path / "a.png")
  _img(tmp_path / "b.png")
  rows = [
      {"images": ["a.png", "b.png"], "messages": [
          {"role": "system", "content": "sys"},
          {"role": "user", "content": "<image> and <image>?"},
          {"role": "assistant", "content": "two"}]},
      {"conversations": [{"from": "human", "value": "hi"}, {"from": "gpt", "value": "hello"}]},
  ]
  path = tmp_path / "d.jsonl"
  path.write_text("\n".join(json.dumps(r) for r in rows) + "\n\n")
  samples, problems = conv.load_conversations(str(path))
  assert problems == []
  assert samples[0].images == (str(tmp_path / "a.png"), str(tmp_path / "b.png"))
  assert [m["role"] for m in samples[0].messages] == ["system", "user", "assistant"]
  assert samples[1].images == () and samples[1].videos == ()
  assert samples[1].where.endswith("d.jsonl:line 2")


def test_every_bad_record_class_is_counted(tmp_path):
  _img(tmp_path / "a.png")
  good = {"image": "a.png", "conversations": [{"from": "human", "value": "<image>q"},
                                               {"from": "gpt", "value": "a"}]}
  bad = {
      "placeholder_mismatch": {"image": ["a.png", "a.png"], "conversations": [
          {"from": "human", "value": "<image>q"}, {"from": "gpt", "value": "a"}]},
      "no_assistant_turn": {"conversations": [{"from": "human", "value": "q"}]},
      "unknown_role": {"conversations": [{"from": "robot", "value": "q"},
                                         {"from": "gpt", "value": "a"}]},
      "malformed": {"conversations": []},
  }
  lines = [json.dumps(good)] + [json.dumps(r) for r in bad.values()]
  lines.append(json.dumps({"conversations": [{"from": "human", "value": "x <|image_pad|> y"},
                                             {"from": "gpt", "value": "a"}]}))
  raw = "\n".join(lines).encode() + b"\n"
  surrogate = b'{"conversations": [{"from": "human", "value": "bad \\ud800"}, ' \
              b'{"from": "gpt", "value": "a"}]}\n'
  latin1 = '{"conversations": [{"from": "human", "value": "caf\xe9"}]}\n'.encode("latin1")
  path = tmp_path / "bad.jsonl"
  path.write_bytes(raw + surrogate + latin1)
  samples, problems = conv.load_conversations(str(path))
  assert len(samples) == 1
  reasons = [p.reason for p in problems]
  assert sorted(reasons) == sorted(list(bad) + ["placeholder_mismatch", "invalid_text",
                                                "invalid_utf8"])
  utf8 = next(p for p in problems if p.reason == "invalid_utf8")
  offset = len(raw) + len(surrogate) + latin1.index(b"\xe9")
  assert f"byte offset {offset}" in utf8.detail and "bad.jsonl" in utf8.detail
  assert "line 8" in utf8.where
  with pytest.raises(BadSampleError, match="placeholder_mismatch|tags but the record"):
    conv.load_conversations(str(path), on_bad_sample="raise")


def test_non_utf8_json_file_names_file_and_offset(tmp_path):
  path = tmp_path / "latin.json"
  text = '[{"conversations": [{"from": "human", "value": "caf\xe9"}]}]'
  path.write_bytes(text.encode("latin1"))
  with pytest.raises(ValueError, match=rf"latin.json.*byte offset {text.index(chr(0xe9))}"):
    conv.load_conversations(str(path))
  with pytest.raises(FileNotFoundError):
    conv.load_conversations(str(tmp_path / "nope.json"))


def test_coco_captions_as_caption_rows_and_chat_turns():
  rows, problems = conv.coco_caption_samples("data/coco/captions_train2017.json",
                                             "data/coco/images", mode="caption")
  assert problems == [] and len(rows) == 527
  assert rows[0].kind == "caption" and rows[0].messages[0]["content"] == "<image>"
  chat, _ = conv.coco_caption_samples("data/coco/captions_train2017.json", "data/coco/images",
                                      mode="chat", prompt="Describe it.")
  assert chat[0].kind == "chat" and chat[0].messages[0]["content"] == "<image>\nDescribe it."
  assert chat[0].messages[1]["content"] == rows[0].messages[1]["content"]
  with pytest.raises(ValueError, match="mode"):
    conv.coco_caption_samples("data/coco/captions_train2017.json", "data/coco/images",
                              mode="pairs")


def test_okvqa_questions_as_qa_turns():
  train, problems = conv.okvqa_samples("data/vqa/okvqa_on_coco_real_captions.json",
                                       "data/coco/images", split="train")
  val, _ = conv.okvqa_samples("data/vqa/okvqa_on_coco_real_captions.json",
                              "data/coco/images", split="val")
  assert problems == [] and (len(train), len(val)) == (19, 28)
  assert all(conv.check_sample_files(s) is None for s in train[:3])
  assert train[0].messages[1]["content"] == "project"


def test_check_sample_files_reasons(tmp_path):
  (tmp_path / "empty.png").write_bytes(b"")
  (tmp_path / "bad.png").write_bytes(b"not an image at all")
  (tmp_path / "empty.mp4").write_bytes(b"")
  (tmp_path / "bad.mp4").write_bytes(b"\x00" * 100)
  msgs = ({"role": "user", "content": "x"}, {"role": "assistant", "content": "y"})
  cases = {"missing_image": ("images", "nope.png"), "empty_image": ("images", "empty.png"),
           "corrupt_image": ("images", "bad.png"), "missing_video": ("videos", "nope.mp4"),
           "empty_video": ("videos", "empty.mp4"), "corrupt_video": ("videos", "bad.mp4")}
  for reason, (field, name) in cases.items():
    s = conv.Sample(messages=msgs, where="rec", **{field: (str(tmp_path / name),)})
    got = conv.check_sample_files(s)
    assert got is not None and got[0] == reason and name in got[1] and "rec" in got[1]


def test_load_source_dispatch_and_errors():
  samples, _ = conv.load_sources([
      {"type": "conversations", "path": "data/qwen_sft/single_images.json", "repeat": 2},
      {"type": "okvqa", "path": "data/vqa/okvqa_on_coco_real_captions.json",
       "image_dir": "data/coco/images"}])
  assert len(samples) == 6 + 47
  with pytest.raises(ValueError, match="unknown data source type"):
    conv.load_source({"type": "webdataset"})
  with pytest.raises(ValueError, match="lacks the key 'image_dir'"):
    conv.load_source({"type": "okvqa", "path": "x.json"})
