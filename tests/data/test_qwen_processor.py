"""vlm.data.qwen_processor vs HF transformers 4.57.1 (Qwen2VLImageProcessor, Qwen3VLProcessor, ...).

Images: bit-level comparison with the slow HF ``Qwen2VLImageProcessor`` (PIL bicubic) configured
like the released Qwen3-VL / Qwen2.5-VL preprocessors. Videos: HF's video processors need
torchvision (not installed), so frames sampled by ``load_video`` are patchified by
``Qwen2VLImageProcessor(videos=...)``, frame indices are re-derived from the spec §9.6 formula,
timestamps come from HF's ``Qwen3VLProcessor._calculate_timestamps``.
"""
import math
import os
from unittest import mock

import numpy as np
import pytest
from PIL import Image

from vlm.data import qwen_processor as qp
from vlm.data.paths import REPO_ROOT

transformers = pytest.importorskip("transformers")

COCO = os.path.join(REPO_ROOT, "data/coco/images")
VIDEO = os.path.join(REPO_ROOT, "data/video")
TOKENIZER = os.path.join(REPO_ROOT, qp.DEFAULT_TOKENIZER_FILE)
PHOTOS = ("000000000139.jpg", "000000000802.jpg", "000000003124.jpg")  # 384x256, 254x384, 384x311


def _photo(name):
  return Image.open(os.path.join(COCO, name))


def _odd_crop():
  return _photo("000000013473.jpg").crop((13, 7, 13 + 301, 7 + 97))  # 301x97 (W x H)


def _hf_image_processor(cfg, min_pixels=None, max_pixels=None):
  # min_pixels/max_pixels, not size=: in 4.57.1 Qwen2VLImageProcessor.__init__ drops a valid `size`.
  return transformers.Qwen2VLImageProcessor(
      patch_size=cfg.patch_size, temporal_patch_size=cfg.temporal_patch_size,
      merge_size=cfg.merge_size,
      image_mean=list(cfg.image_mean), image_std=list(cfg.image_std),
      min_pixels=min_pixels or cfg.min_pixels, max_pixels=max_pixels or cfg.max_pixels)


@pytest.fixture(scope="module")
def hf_tok():
  return transformers.Qwen2TokenizerFast(tokenizer_file=TOKENIZER, pad_token="<|endoftext|>",
                                         eos_token="<|im_end|>", unk_token=None, bos_token=None)


def _hf_processor(cls, image_processor, tokenizer, video_processor):
  # Without torchvision, transformers resolves BaseVideoProcessor to a dummy class, so the
  # processor's type check rejects any real video processor; skip only that check (the video
  # processor is never called here: HF reads only its merge_size on the image/text paths).
  with mock.patch.object(transformers.ProcessorMixin, "check_argument_for_proper_class",
                         lambda self, name, arg: type(arg)):
    return cls(image_processor=image_processor, tokenizer=tokenizer,
               video_processor=video_processor)


@pytest.fixture(scope="module")
def hf_qwen3_processor(hf_tok):
  from transformers.models.qwen3_vl.video_processing_qwen3_vl import Qwen3VLVideoProcessor
  return _hf_processor(transformers.Qwen3VLProcessor, _hf_image_processor(qp.QWEN3_VL_PROCESSOR),
                       hf_tok, Qwen3VLVideoProcessor())


@pytest.fixture(scope="module")
def tok():
  return qp.Qwen3Tokenizer()


# ------------------------------------------------------------------------------ smart_resize


def test_smart_resize_matches_hf():
  from transformers.models.qwen2_vl.image_processing_qwen2_vl import smart_resize as hf_resize
  from transformers.models.qwen3_vl.video_processing_qwen3_vl import smart_resize as hf_video_resize
  rng = np.random.default_rng(0)
  sizes = [(1080, 1920), (720, 1280), (100, 100), (4000, 6000), (48, 1000), (1, 1), (1, 200),
           (17, 3), (33, 97), (255, 257), (31, 6199), (6400, 32), (223, 224), (16, 16),
           (65535, 65535)]
  sizes += [tuple(int(v) for v in rng.integers(1, 3000, size=2)) for _ in range(300)]
  budgets = [(32, 65536, 16777216), (28, 3136, 12845056), (32, 4096, 200000),
             (28, 56 * 56, 28 * 28 * 1280)]
  n = 0
  for h, w in sizes:
    if max(h, w) / min(h, w) > 200:
      continue
    for factor, lo, hi in budgets:
      assert qp.smart_resize(h, w, factor, lo, hi) == hf_resize(h, w, factor, lo, hi), (h, w)
      n += 1
      for frames in (2, 5, 20, 121):
        if h >= factor and w >= factor:
          assert (qp.smart_resize_video(frames, h, w, 2, factor, lo, hi)
                  == hf_video_resize(frames, h, w, 2, factor, lo, hi)), (frames, h, w, factor)
  assert n > 1000
  # Spec §9.1 / §9.6.1 worked examples.
  assert qp.smart_resize(1080, 1920) == (1088, 1920)
  assert qp.smart_resize(720, 1280) == (704, 1280)
  assert qp.smart_resize(100, 100) == (256, 256)
  assert qp.smart_resize(4000, 6000) == (3328, 4992)
  assert qp.smart_resize(48, 1000) == (64, 1184)
  assert qp.smart_resize_video(20, 720, 1280) == (704, 1280)
  assert qp.smart_resize_video(120, 720, 1280) == (320, 608)


def test_smart_resize_errors():
  with pytest.raises(ValueError, match="aspect ratio must be smaller than 200"):
    qp.smart_resize(10, 2001)
  with pytest.raises(ValueError, match="aspect ratio must be smaller than 200"):
    qp.smart_resize(4020, 20)
  qp.smart_resize(10, 2000)  # exactly 200 is allowed, as in HF
  with pytest.raises(ValueError, match="at least temporal_factor"):
    qp.smart_resize_video(1, 64, 64)
  with pytest.raises(ValueError, match="at least 32x32"):
    qp.smart_resize_video(4, 31, 64)
  with pytest.raises(ValueError, match="uint8"):
    qp.preprocess_image(np.zeros((64, 64, 3), np.float32))


# ------------------------------------------------------------------------------ images


@pytest.mark.parametrize("name", list(PHOTOS) + ["odd_crop", "small_max_pixels"])
def test_image_patches_match_hf_qwen3(name):
  cfg = qp.QWEN3_VL_PROCESSOR
  if name == "odd_crop":
    img = _odd_crop()
  elif name == "small_max_pixels":  # exercises the scale-down branch
    cfg = qp.QwenProcessorConfig(min_pixels=1024, max_pixels=32 * 32 * 30)
    img = _photo(PHOTOS[2])
  else:
    img = _photo(name)
  patches, grid = qp.preprocess_image(img, cfg)
  ref = _hf_image_processor(cfg)(images=[img], return_tensors="np")
  np.testing.assert_array_equal(grid[None], ref["image_grid_thw"])
  assert patches.dtype == np.float32 and patches.shape == ref["pixel_values"].shape
  assert patches.shape[1] == 3 * 2 * 16 * 16
  diff = float(np.abs(patches - ref["pixel_values"]).max())
  assert diff <= 1e-5, diff


def test_image_patches_match_hf_qwen2_5():
  cfg = qp.QWEN2_5_VL_PROCESSOR
  hf = _hf_image_processor(cfg)
  for img in (_photo(PHOTOS[0]), _odd_crop()):
    patches, grid = qp.preprocess_image(img, cfg)
    ref = hf(images=[img], return_tensors="np")
    np.testing.assert_array_equal(grid[None], ref["image_grid_thw"])
    assert patches.shape[1] == 3 * 2 * 14 * 14
    assert float(np.abs(patches - ref["pixel_values"]).max()) <= 1e-5


def test_flatten_order_merge_windows():
  """Row r of the patches is patch (bh*M + ih, bw*M + iw) in merge-window order (spec §9.3)."""
  h, w, p = 4, 6, 2
  frames = np.arange(2 * 3 * h * p * w * p, dtype=np.float32).reshape(2, 3, h * p, w * p)
  patches, grid = qp.flatten_patches(frames, p, 2, 2)
  assert grid.tolist() == [1, h, w]
  r = 0
  for bh in range(h // 2):
    for bw in range(w // 2):
      for ih in range(2):
        for iw in range(2):
          y, x = (bh * 2 + ih) * p, (bw * 2 + iw) * p
          want = frames[:, :, y:y + p, x:x + p].transpose(1, 0, 2, 3).ravel()  # (C, Tp, P, P)
          np.testing.assert_array_equal(patches[r], want)
          r += 1


# ------------------------------------------------------------------------------ video


def _decode_all(path, wanted):
  import av
  out = {}
  with av.open(path) as c:
    for i, f in enumerate(c.decode(c.streams.video[0])):
      if i in wanted:
        out[i] = f.to_ndarray(format="rgb24")
  return out


@pytest.mark.parametrize("clip,fps", [("kinetics_arm_wrestling.mp4", 1.0), ("bikes.mp4", 0.5)])
def test_video_sampling_and_patches(clip, fps, hf_qwen3_processor):
  import av
  from transformers.models.qwen3_vl.video_processing_qwen3_vl import smart_resize as hf_video_resize
  path = os.path.join(VIDEO, clip)
  cfg = qp.QwenProcessorConfig(fps=fps)
  frames, ts = qp.load_video(path, fps=fps, min_frames=cfg.min_frames, max_frames=cfg.max_frames)
  with av.open(path) as c:
    total, vfps = c.streams.video[0].frames, float(c.streams.video[0].average_rate)
  # Spec §9.6 re-derivation.
  n = min(min(max(int(total / vfps * fps), 4), 768), total)
  idx = [int(v) for v in np.round(np.linspace(0, total - 1, n))]
  padded = idx + [idx[-1]] * (len(idx) % 2)
  assert len(frames) == len(padded) and len(frames) % 2 == 0
  np.testing.assert_allclose(ts, np.array(padded) / vfps, rtol=0, atol=0)
  ref_frames = _decode_all(path, set(idx))
  for k, i in enumerate(padded):
    np.testing.assert_array_equal(frames[k], ref_frames[i])
  # Timestamps per temporal patch: HF's own helper, and the exact text.
  per_patch = qp.temporal_patch_timestamps(ts)
  assert per_patch == hf_qwen3_processor._calculate_timestamps(idx, vfps, 2)
  # Patches: the same frames through HF's slow image processor (video branch).
  patches, grid = qp.preprocess_video(frames, cfg)
  rh, rw = hf_video_resize(len(frames), frames.shape[1], frames.shape[2], 2, 32,
                           cfg.video_min_pixels, cfg.video_max_pixels)
  assert grid.tolist() == [len(frames) // 2, rh // 16, rw // 16]
  hf = _hf_image_processor(cfg, cfg.video_min_pixels, cfg.video_max_pixels)
  ref = hf(images=None, videos=[list(frames)], return_tensors="np")
  np.testing.assert_array_equal(grid[None], ref["video_grid_thw"])
  diff = float(np.abs(patches - ref["pixel_values_videos"]).max())
  assert diff <= 1e-5, diff
  # Odd frame counts are padded with the last frame inside preprocess_video as well.
  p3, g3 = qp.preprocess_video(frames[:3], cfg)
  p4, g4 = qp.preprocess_video(np.concatenate([frames[:3], frames[2:3]]), cfg)
  assert g3.tolist() == g4.tolist() and np.array_equal(p3, p4)


def test_timestamp_format():
  assert qp.format_timestamp(0.25) == "<0.2 seconds>"
  assert qp.format_timestamp(1.25) == "<1.2 seconds>"
  assert qp.format_timestamp(0.26666) == "<0.3 seconds>"
  # Spec §9.6.1: 300 frames at 30 fps.
  idx = qp.sample_frame_indices(300, 30.0)
  assert idx.tolist() == [0, 16, 31, 47, 63, 79, 94, 110, 126, 142, 157, 173, 189, 205, 220, 236,
                          252, 268, 283, 299]
  texts = [qp.format_timestamp(t) for t in qp.temporal_patch_timestamps(idx / 30.0)]
  assert "".join(texts) == ("<0.3 seconds><1.3 seconds><2.4 seconds><3.4 seconds><4.5 seconds>"
                            "<5.5 seconds><6.6 seconds><7.6 seconds><8.7 seconds><9.7 seconds>")


def test_qwen3_video_prompt(tok, hf_tok, hf_qwen3_processor):
  path = os.path.join(VIDEO, "kinetics_arm_wrestling.mp4")
  cfg = qp.QwenProcessorConfig(fps=0.5)
  proc = qp.Qwen3VLProcessor(cfg, tok)
  prompt = proc.apply_chat_template([{"role": "user", "content": [
      {"type": "video", "video": path}, {"type": "text", "text": "What are they doing?"}]}])
  out = proc(text=prompt, videos=path)
  grid = out["video_grid_thw"][0]
  assert grid.tolist() == [3, 16, 22]  # 5 frames -> padded 6; 256x340 -> 256x352
  assert out["pixel_values_videos"].shape == (3 * 16 * 22, 1536)
  frames, ts = qp.load_video(path, fps=0.5)
  with_ts = proc(text=prompt, videos=[(frames, ts)])
  np.testing.assert_array_equal(with_ts["input_ids"], out["input_ids"])
  # HF-style expansion built independently from HF's timestamp helper.
  indices = [int(round(t * 28)) for t in ts]
  stamps = hf_qwen3_processor._calculate_timestamps(indices, 28.0, 2)
  per = 16 * 22 // 4
  video_text = "".join(
      f"<{s:.1f} seconds><|vision_start|>" + "<|video_pad|>" * per + "<|vision_end|>"
      for s in stamps)
  expected_text = prompt.replace("<|vision_start|><|video_pad|><|vision_end|>", video_text)
  assert "<1.2 seconds>" in expected_text
  expected = hf_tok(expected_text)["input_ids"]
  assert out["input_ids"][0].tolist() == expected
  assert int((out["input_ids"] == tok.video_token_id).sum()) == 3 * per
  with pytest.raises(ValueError, match="timestamps"):
    proc(text=prompt, videos=[frames])


# ------------------------------------------------------------------------------ chat + processor


def test_chat_template_format():
  msgs = [{"role": "system", "content": "Be brief."},
          {"role": "user", "content": [{"type": "image"}, {"type": "image"},
                                       {"type": "text", "text": "Compare them."}]},
          {"role": "assistant", "content": "Two photos."},
          {"role": "user", "content": "Which is older?"}]
  s = qp.apply_chat_template(msgs)
  assert s == ("<|im_start|>system\nBe brief.<|im_end|>\n"
               "<|im_start|>user\n<|vision_start|><|image_pad|><|vision_end|>"
               "<|vision_start|><|image_pad|><|vision_end|>Compare them.<|im_end|>\n"
               "<|im_start|>assistant\nTwo photos.<|im_end|>\n"
               "<|im_start|>user\nWhich is older?<|im_end|>\n<|im_start|>assistant\n")
  one = [{"role": "user",
          "content": [{"type": "image"}, {"type": "text", "text": "Describe this image."}]}]
  assert qp.apply_chat_template(one) == (
      "<|im_start|>user\n<|vision_start|><|image_pad|><|vision_end|>Describe this image."
      "<|im_end|>\n"
      "<|im_start|>assistant\n")  # spec §9.5 example
  assert qp.apply_chat_template(one, add_vision_id=True, thinking=True).endswith(
      "assistant\n<think>\n")
  assert "Picture 1: <|vision_start|>" in qp.apply_chat_template(one, add_vision_id=True)
  q25 = qp.Qwen2_5_VLProcessor(tokenizer=qp.Qwen3Tokenizer()).apply_chat_template(one)
  assert q25.startswith(
      "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\n")
  with pytest.raises(ValueError, match="unsupported role"):
    qp.apply_chat_template([{"role": "robot", "content": "x"}])


@pytest.mark.parametrize("side", ["right", "left"])
def test_input_ids_match_hf_qwen3_processor(side, tok, hf_qwen3_processor):
  proc = qp.Qwen3VLProcessor(tokenizer=tok, padding_side=side)
  chat = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "and"},
                                       {"type": "image"},
                                       {"type": "text", "text": " — what differs? Ünïcode ok"}]},
          {"role": "assistant", "content": "The second one is taller."},
          {"role": "user", "content": "Why?"}]
  short = [{"role": "user",
            "content": [{"type": "image"}, {"type": "text", "text": "Caption it."}]}]
  texts = [proc.apply_chat_template(chat), proc.apply_chat_template(short)]
  images = [_photo(PHOTOS[0]), _odd_crop(), _photo(PHOTOS[1])]
  out = proc(text=texts, images=images)
  hf_qwen3_processor.tokenizer.padding_side = side
  ref = hf_qwen3_processor(text=texts, images=images, padding=True, return_tensors="np")
  np.testing.assert_array_equal(out["input_ids"], ref["input_ids"])
  np.testing.assert_array_equal(out["attention_mask"], ref["attention_mask"])
  np.testing.assert_array_equal(out["image_grid_thw"], ref["image_grid_thw"])
  assert float(np.abs(out["pixel_values"] - ref["pixel_values"]).max()) <= 1e-5
  n_pad = int(sum(np.prod(g) // 4 for g in out["image_grid_thw"]))
  assert int((out["input_ids"] == 151655).sum()) == n_pad
  assert out["input_ids"].dtype == np.int64
  with pytest.raises(ValueError, match="placeholders"):
    proc(text=texts, images=images[:2])
  with pytest.raises(ValueError, match="1 image and 0 video placeholders but 2 images"):
    proc(text=texts[1], images=images[:2])


def test_qwen2_5_processor(tok, hf_tok):
  # Qwen2VLVideoProcessor imports torchvision at module level; any video processor object will do.
  from transformers.models.qwen3_vl.video_processing_qwen3_vl import Qwen3VLVideoProcessor
  cfg = qp.QWEN2_5_VL_PROCESSOR
  hf = _hf_processor(transformers.Qwen2_5_VLProcessor, _hf_image_processor(cfg), hf_tok,
                     Qwen3VLVideoProcessor())
  proc = qp.Qwen2_5_VLProcessor(tokenizer=tok)
  text = proc.apply_chat_template(
      [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Hi"}]}])
  img = _photo(PHOTOS[2])
  out, ref = proc(text=text, images=img), hf(text=[text], images=[img], return_tensors="np")
  np.testing.assert_array_equal(out["input_ids"], ref["input_ids"])
  assert float(np.abs(out["pixel_values"] - ref["pixel_values"]).max()) <= 1e-5
  # Video: one run of t*h*w/4 pads, no timestamps; second_per_grid_ts = Tp / fps.
  frames, _ = qp.load_video(os.path.join(VIDEO, "kinetics_arm_wrestling.mp4"), fps=0.5)
  vtext = proc.apply_chat_template(
      [{"role": "user", "content": [{"type": "video"}, {"type": "text", "text": "?"}]}])
  vout = proc(text=vtext, videos=[frames])
  t, h, w = vout["video_grid_thw"][0].tolist()
  # Per-frame budget (HF Qwen2VLVideoProcessor: >= 128*28*28 px): 256x340 is scaled up to 280x392.
  assert (h, w) == (20, 28) and t == 3
  expected = hf_tok(vtext.replace("<|video_pad|>", "<|video_pad|>" * (t * h * w // 4)))["input_ids"]
  assert vout["input_ids"][0].tolist() == expected
  np.testing.assert_array_equal(vout["second_per_grid_ts"], np.array([1.0], np.float32))
  assert not math.isnan(float(vout["pixel_values_videos"].sum()))
