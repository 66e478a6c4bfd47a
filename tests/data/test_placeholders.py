"""Vision placeholders checked per sample and per image (Qwen3-VL / Qwen2.5-VL).

The processor used to check only the batch totals: a row with one placeholder block too few next
to a row with one too many (e.g. a stray literal ``<|image_pad|>`` typed in a prompt) passed, and
images landed in the wrong sample. Now: nested ``images=[[...], [...]]`` are checked row by row,
every placeholder must sit in its ``<|vision_start|>..<|vision_end|>`` block, and
:func:`vlm.models.rope_index.check_vision_tokens` matches every token run against its grid (in the
processor and in :func:`vlm.inference.generate.prepare_inputs`, for hand-built ``input_ids``).
"""
import dataclasses
import os

import numpy as np
import pytest
from PIL import Image

from tests.data.test_qwen_processor import (COCO, TOKENIZER, VIDEO, _hf_image_processor,
                                            _hf_processor)
from vlm.data import qwen_processor as qp
from vlm.inference.generate import prepare_inputs
from vlm.models.qwen_presets import qwen_config
from vlm.models.rope_index import check_vision_tokens

transformers = pytest.importorskip("transformers")

IMG, VID, VS, VE = 151655, 151656, 151652, 151653
BLOCK = "<|vision_start|><|image_pad|><|vision_end|>"
BIKES = os.path.join(VIDEO, "bikes.mp4")


@pytest.fixture(scope="module")
def tok():
  return qp.Qwen3Tokenizer()


def _images():
  """Three images of different sizes (so their grids differ): 384x256, 254x384, 64x96."""
  a = Image.open(os.path.join(COCO, "000000000139.jpg")).convert("RGB")
  b = Image.open(os.path.join(COCO, "000000000802.jpg")).convert("RGB")
  c = (np.random.default_rng(0).random((64, 96, 3)) * 255).astype(np.uint8)
  return a, b, c


def _prompt(proc, n_images, n_videos=0, text="Describe."):
  content = ([{"type": "image"}] * n_images + [{"type": "video"}] * n_videos
             + [{"type": "text", "text": text}])
  return proc.apply_chat_template([{"role": "user", "content": content}])


def test_swapped_counts_nested_names_the_row(tok):
  """Row 0 has one block too few and row 1 one too many: the totals agree (3 = 3), so only the
  per-row check (nested input) can see that image b would be given to row 1."""
  proc = qp.Qwen3VLProcessor(tokenizer=tok)
  a, b, c = _images()
  texts = [_prompt(proc, 1), _prompt(proc, 2)]
  with pytest.raises(ValueError, match=r"row 0: the text has 1 image placeholder block\(s\) but 2"):
    proc(text=texts, images=[[a, b], [c]])
  texts = [_prompt(proc, 2), _prompt(proc, 0)]  # row 0 one too many, row 1 one too few
  with pytest.raises(ValueError, match=r"row 0: the text has 2 <\|image_pad\|> .* only 1 images"):
    proc(text=texts, images=[[a], [b]])
  with pytest.raises(ValueError, match="2 lists for 1 texts"):
    proc(text=texts[:1], images=[[a], [b]])
  with pytest.raises(ValueError, match="mixes per-sample lists"):
    proc(text=texts, images=[[a], b])


def test_stray_literal_placeholder_flat_input(tok):
  """A literal ``<|image_pad|>`` in the user's text, with flat (HF-style) images: the error names
  the row and the character offset instead of shifting image 1 into row 0."""
  proc = qp.Qwen3VLProcessor(tokenizer=tok)
  a, b, _ = _images()
  stray = _prompt(proc, 1, text="What does <|image_pad|> mean?")
  texts = [_prompt(proc, 1), stray]
  at = stray.index("<|image_pad|> mean")
  with pytest.raises(ValueError, match=f"row 1: <\\|image_pad\\|> at character {at} is not inside"):
    proc(text=texts, images=[a, b])
  doubled = BLOCK.replace("<|image_pad|>", "<|image_pad|>" * 2)
  with pytest.raises(ValueError, match="row 0: .* at character 16 is not inside"):
    proc(text=[doubled], images=[a, b])
  with pytest.raises(ValueError, match="row 0: <\\|video_pad\\|> at character 3 is not inside"):
    proc(text=["Hi <|video_pad|>"], videos=[BIKES])
  with pytest.raises(ValueError, match="at character 0"):
    qp.expand_vision_placeholders("<|image_pad|>", [[1, 4, 4]])
  # the chat template always writes the block form, with or without vision ids
  for vision_id in (False, True):
    text = proc.apply_chat_template([{"role": "user", "content": [
        {"type": "image"}, {"type": "video"}, {"type": "image"}, {"type": "text", "text": "?"}]}],
        add_vision_id=vision_id)
    assert [k for k, _ in qp.find_vision_placeholders(text)] == ["image", "video", "image"]


def test_normal_batches_nested_equals_flat_and_hf(tok):
  """Two images in one row, none in another: nested and flat input give the same arrays, equal
  to HF's Qwen3VLProcessor (which accepts both forms too)."""
  proc = qp.Qwen3VLProcessor(tokenizer=tok, padding_side="left")
  a, b, c = _images()
  texts = [_prompt(proc, 2, text="Compare."), _prompt(proc, 0, text="Hi"), _prompt(proc, 1)]
  flat = proc(text=texts, images=[a, b, c])
  nested = proc(text=texts, images=[[a, b], [], [c]])
  assert flat.keys() == nested.keys()
  for key in flat:
    np.testing.assert_array_equal(flat[key], nested[key])
  hf_tok = transformers.Qwen2TokenizerFast(
      tokenizer_file=TOKENIZER, pad_token="<|endoftext|>", eos_token="<|im_end|>", unk_token=None,
      bos_token=None)
  from transformers.models.qwen3_vl.video_processing_qwen3_vl import Qwen3VLVideoProcessor
  hf = _hf_processor(transformers.Qwen3VLProcessor, _hf_image_processor(qp.QWEN3_VL_PROCESSOR),
                     hf_tok, Qwen3VLVideoProcessor())
  hf.tokenizer.padding_side = "left"
  ref = hf(text=texts, images=[[a, b], [], [c]], padding=True, return_tensors="np")
  np.testing.assert_array_equal(nested["input_ids"], ref["input_ids"])
  np.testing.assert_array_equal(nested["attention_mask"], ref["attention_mask"])
  np.testing.assert_array_equal(nested["image_grid_thw"], ref["image_grid_thw"])
  # Qwen2.5-VL: same checks, its own patch size
  proc25 = qp.Qwen2_5_VLProcessor(tokenizer=tok)
  texts25 = [_prompt(proc25, 1), _prompt(proc25, 2)]
  hf25 = _hf_processor(transformers.Qwen2_5_VLProcessor,
                       _hf_image_processor(qp.QWEN2_5_VL_PROCESSOR), hf_tok,
                       Qwen3VLVideoProcessor())
  hf25.tokenizer.padding_side = "right"
  out25 = proc25(text=texts25, images=[[c], [a, b]])
  ref25 = hf25(text=texts25, images=[c, a, b], padding=True, return_tensors="np")
  np.testing.assert_array_equal(out25["input_ids"], ref25["input_ids"])
  np.testing.assert_array_equal(out25["image_grid_thw"], ref25["image_grid_thw"])
  with pytest.raises(ValueError, match="row 0: the text has 1 image placeholder"):
    proc25(text=texts25, images=[[c, a], [b]])


def test_image_paths_reach_preprocess_image(tok):
  proc = qp.Qwen3VLProcessor(tokenizer=tok)
  path = os.path.join(COCO, "000000000139.jpg")
  by_path = proc(text=[_prompt(proc, 1)], images=[path])
  by_image = proc(text=[_prompt(proc, 1)], images=[Image.open(path)])
  np.testing.assert_array_equal(by_path["input_ids"], by_image["input_ids"])
  np.testing.assert_array_equal(by_path["pixel_values"], by_image["pixel_values"])


@pytest.mark.parametrize("cls", [qp.Qwen3VLProcessor, qp.Qwen2_5_VLProcessor])
def test_video_and_image_rows(cls, tok):
  """A row with an image and a video (Qwen3-VL: one run per temporal patch; Qwen2.5-VL: one run
  per video) next to an image-only row; nested videos=[[clip], []] as well."""
  cfg = dataclasses.replace(cls.default_config, fps=0.5)
  proc = cls(cfg, tok)
  a, _, c = _images()
  texts = [_prompt(proc, 1, 1, "What happens?"), _prompt(proc, 1)]
  flat = proc(text=texts, images=[a, c], videos=[BIKES])
  nested = proc(text=texts, images=[[a], [c]], videos=[[BIKES], []])
  for key in flat:
    np.testing.assert_array_equal(flat[key], nested[key])
  t, h, w = flat["video_grid_thw"][0].tolist()
  runs = np.diff(np.flatnonzero(np.diff(np.concatenate(
      [[0], (flat["input_ids"][0] == VID).astype(int), [0]]))).reshape(-1, 2), axis=1).ravel()
  assert runs.tolist() == ([h * w // 4] * t if cfg.video_timestamps else [t * h * w // 4])
  with pytest.raises(ValueError, match=r"row 0: the text has 1 <\|image_pad\|> and 1 "
                                       r"<\|video_pad\|> placeholders but only 1 images and 0"):
    proc(text=texts, images=[[a], [c]], videos=[[], [BIKES]])


def _hand_built(rows_blocks):
  """input_ids for rows of ``[text] + [VS] + run + [VE]`` blocks; ``rows_blocks`` holds per row the
  (token, run length) of each block. Right padded with 0."""
  rows = []
  for blocks in rows_blocks:
    r = [11, 12]
    for token, n in blocks:
      r += [VS] + [token] * n + [VE, 13]
    rows.append(r)
  n = max(map(len, rows))
  ids = np.zeros((len(rows), n), np.int64)
  mask = np.zeros((len(rows), n), np.int64)
  for i, r in enumerate(rows):
    ids[i, :len(r)] = r
    mask[i, :len(r)] = 1
  return ids, mask


@pytest.mark.parametrize("name", ["qwen3_vl_tiny", "qwen2_5_vl_3b"])
def test_prepare_inputs_hand_built_ids(name):
  """One image token moved from row 0 to row 1 keeps the batch total, so only the per-image check
  sees it; one token removed or added anywhere is caught too."""
  config = qwen_config(name)
  grids = np.array([[1, 4, 6], [1, 2, 4]])  # 6 and 2 merged tokens
  dim = config.vision.patch_dim
  pixels = np.zeros((int(np.prod(grids, axis=1).sum()), dim), np.float32)

  def batch(rows):
    ids, mask = _hand_built(rows)
    return {"input_ids": ids, "attention_mask": mask, "pixel_values": pixels,
            "image_grid_thw": grids}

  out = prepare_inputs(config, batch([[(IMG, 6)], [(IMG, 2)]]), pad_token_id=0)
  assert out["visual_token_index"].max() == 7
  with pytest.raises(ValueError, match="row 0: image 0 .* needs 6 placeholder tokens, found a "
                                       "run of 5 at column 3"):
    prepare_inputs(config, batch([[(IMG, 5)], [(IMG, 3)]]), pad_token_id=0)
  with pytest.raises(ValueError, match="row 1: image 1 .* needs 2 placeholder tokens, found a "
                                       "run of 3"):
    prepare_inputs(config, batch([[(IMG, 6)], [(IMG, 3)]]), pad_token_id=0)
  with pytest.raises(ValueError, match="row 0: image 0 .* found a run of 5"):
    prepare_inputs(config, batch([[(IMG, 5)], [(IMG, 2)]]), pad_token_id=0)
  ids = batch([[(IMG, 6)], [(IMG, 2)]])
  ids["input_ids"][1, 1] = IMG  # a stray image token outside any block
  with pytest.raises(ValueError, match="row 1: the image placeholder run at column 1 does not "
                                       "follow a <\\|vision_start\\|>"):
    prepare_inputs(config, ids, pad_token_id=0)
  # a video: Qwen3-VL expects one run per temporal patch, Qwen2.5-VL one run per video
  vgrid = np.array([[2, 2, 4]])
  split = "qwen3" in name
  rows = [[(IMG, 6)], [(IMG, 2)] + ([(VID, 2), (VID, 2)] if split else [(VID, 4)])]
  ids, mask = _hand_built(rows)
  vb = {"input_ids": ids, "attention_mask": mask, "pixel_values": pixels, "image_grid_thw": grids,
        "pixel_values_videos": np.zeros((16, dim), np.float32), "video_grid_thw": vgrid}
  prepare_inputs(config, vb, pad_token_id=0)
  ids, mask = _hand_built([rows[0], [(IMG, 2)] + ([(VID, 4)] if split else [(VID, 2)] * 2)])
  with pytest.raises(ValueError, match="row 1: video 0 .* found a run of"):
    prepare_inputs(config, dict(vb, input_ids=ids, attention_mask=mask), pad_token_id=0)


def test_check_vision_tokens_direct():
  kw = dict(image_token_id=IMG, video_token_id=VID, vision_start_id=VS, merge_size=2)
  ids = np.array([[0, 0, 1, VS, IMG, IMG, VE, VS, VID, VE, 2, VS, VID, VE]])
  mask = (ids != 0).astype(int)
  check_vision_tokens(ids, mask, [[1, 2, 4]], [[2, 2, 2]], **kw)  # left padded
  with pytest.raises(ValueError, match="row 0: video 0 temporal patch 0 .* needs 2 placeholder "
                                       "tokens, found a run of 1 at column 8"):
    check_vision_tokens(ids, mask, [[1, 2, 4]], [[2, 2, 4]], **kw)
  with pytest.raises(ValueError, match="image 1 .* has no placeholder run"):
    check_vision_tokens(ids, mask, [[1, 2, 4], [1, 2, 2]], [[2, 2, 2]], **kw)
  with pytest.raises(ValueError, match="row 0: a run of 1 video placeholder tokens at column 8 but "
                                       "video_grid_thw has only 0"):
    check_vision_tokens(ids, mask, [[1, 2, 4]], None, **kw)
  check_vision_tokens(ids[:, :10], None, [[1, 2, 4]], [[1, 2, 2]], **kw)
