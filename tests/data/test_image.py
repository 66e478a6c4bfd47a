"""Tests for vlm.data.image: loading, torchvision-style random resized crop, eval resize vs HF."""
import glob
import math
import os

import numpy as np
import pytest
from PIL import Image

from vlm.data import image as im
from vlm.data.paths import REPO_ROOT

PHOTOS = sorted(glob.glob(os.path.join(REPO_ROOT, "data/coco/images/*.jpg")))


def _save_jpeg(path, w=40, h=30, seed=0):
  arr = np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)
  Image.fromarray(arr).save(path, format="JPEG")
  return path


def test_load_rgb_ok_and_converts_mode(tmp_path):
  img = im.load_rgb(PHOTOS[0])
  assert img.mode == "RGB" and img.width > 0
  gray = tmp_path / "g.png"
  Image.fromarray(np.full((5, 7), 128, np.uint8), mode="L").save(gray)
  g = im.load_rgb(str(gray))
  assert g.mode == "RGB" and g.size == (7, 5)
  assert np.asarray(g)[0, 0].tolist() == [128, 128, 128]


def test_load_rgb_bad_files(tmp_path):
  with pytest.raises(im.BadSampleError, match="missing.*nope.jpg"):
    im.load_rgb(str(tmp_path / "nope.jpg"))
  empty = tmp_path / "empty.jpg"
  empty.write_bytes(b"")
  with pytest.raises(im.BadSampleError, match="empty.*empty.jpg"):
    im.load_rgb(str(empty))
  junk = tmp_path / "junk.jpg"
  junk.write_bytes(b"this is not a jpeg" * 10)
  with pytest.raises(im.BadSampleError, match="corrupt.*junk.jpg"):
    im.load_rgb(str(junk))
  good = _save_jpeg(str(tmp_path / "good.jpg"), 64, 64)
  data = open(good, "rb").read()
  trunc = tmp_path / "trunc.jpg"
  trunc.write_bytes(data[: len(data) // 2])
  with pytest.raises(im.BadSampleError, match="trunc.jpg"):
    im.load_rgb(str(trunc))
  assert issubclass(im.BadSampleError, ValueError)
  assert im.check_image_file(str(trunc), decode=True) == "corrupt"
  assert im.check_image_file(str(junk), decode=False) == "corrupt"
  assert im.check_image_file(str(empty)) == "empty"
  assert im.check_image_file(str(tmp_path / "x.jpg")) == "missing"
  assert im.check_image_file(good) is None


def test_random_resized_crop_params_properties():
  rng = np.random.default_rng(0)
  for _ in range(300):
    w, h = int(rng.integers(20, 500)), int(rng.integers(20, 500))
    top, left, ch, cw = im.random_resized_crop_params(w, h, (0.5, 1.0), (3 / 4, 4 / 3), rng)
    assert 0 <= top and top + ch <= h and 0 <= left and left + cw <= w and ch > 0 and cw > 0
    in_range = 3 / 4 * 0.8 <= cw / ch <= 4 / 3 * 1.25 and cw * ch >= 0.4 * w * h
    fallback_ok = (top, left) == ((h - ch) // 2, (w - cw) // 2)
    assert in_range or fallback_ok


def _torchvision_get_params(w, h, scale, ratio, rng):
  """torchvision RandomResizedCrop.get_params written out independently (numpy draws)."""
  for _ in range(10):
    target = w * h * rng.uniform(*scale)
    aspect = math.exp(rng.uniform(math.log(ratio[0]), math.log(ratio[1])))
    cw = int(round(math.sqrt(target * aspect)))
    ch = int(round(math.sqrt(target / aspect)))
    if 0 < cw <= w and 0 < ch <= h:
      return int(rng.integers(0, h - ch + 1)), int(rng.integers(0, w - cw + 1)), ch, cw
  r = w / h
  if r < ratio[0]:
    cw, ch = w, int(round(w / ratio[0]))
  elif r > ratio[1]:
    cw, ch = int(round(h * ratio[1])), h
  else:
    cw, ch = w, h
  return (h - ch) // 2, (w - cw) // 2, ch, cw


def test_random_resized_crop_matches_torchvision_algorithm():
  for seed in range(200):
    w, h = [(384, 256), (256, 384), (100, 20), (50, 50)][seed % 4]
    got = im.random_resized_crop_params(w, h, (0.5, 1.0), (3 / 4, 4 / 3),
                                        np.random.default_rng(seed))
    ref = _torchvision_get_params(w, h, (0.5, 1.0), (3 / 4, 4 / 3), np.random.default_rng(seed))
    assert got == ref, (seed, w, h)


def test_random_resized_crop_fallback_center():
  # 1000x10: no crop with area >= 50% and ratio <= 4/3 fits -> centred crop, ratio clamped.
  top, left, ch, cw = im.random_resized_crop_params(1000, 10, (0.5, 1.0), (3 / 4, 4 / 3),
                                                    np.random.default_rng(0))
  assert (ch, cw) == (10, 13) and top == 0 and left == (1000 - 13) // 2
  top, left, ch, cw = im.random_resized_crop_params(10, 1000, (0.5, 1.0), (3 / 4, 4 / 3),
                                                    np.random.default_rng(0))
  assert (ch, cw) == (13, 10) and left == 0 and top == (1000 - 13) // 2
  with pytest.raises(ValueError, match="scale"):
    im.random_resized_crop_params(10, 10, (0.9, 0.5), (3 / 4, 4 / 3), np.random.default_rng(0))


def test_random_resized_crop_is_crop_then_bicubic_resize():
  img = im.load_rgb(PHOTOS[1])
  out = im.random_resized_crop(img, 48, rng=np.random.default_rng(7))
  top, left, ch, cw = im.random_resized_crop_params(img.width, img.height, (0.5, 1.0),
                                                    (3 / 4, 4 / 3), np.random.default_rng(7))
  ref = img.crop((left, top, left + cw, top + ch)).resize((48, 48), Image.BICUBIC)
  assert out.size == (48, 48)
  np.testing.assert_array_equal(np.asarray(out), np.asarray(ref))


def test_hflip_normalize_and_train_determinism():
  img = im.load_rgb(PHOTOS[2])
  np.testing.assert_array_equal(np.asarray(im.hflip(img)), np.asarray(img)[:, ::-1])
  arr = np.array([[[0, 128, 255]]], dtype=np.uint8)
  out = im.normalize(arr)
  assert out.dtype == np.float32 and out.shape == (1, 1, 3)
  expected = (np.array([0, 128, 255]) / 255.0 - np.array(im.CLIP_MEAN)) / np.array(im.CLIP_STD)
  np.testing.assert_allclose(out[0, 0], expected, rtol=1e-6)
  with pytest.raises(ValueError, match="H, W, 3"):
    im.normalize(np.zeros((4, 4)))
  a = im.preprocess_train(img, 32, np.random.default_rng(5))
  b = im.preprocess_train(img, 32, np.random.default_rng(5))
  c = im.preprocess_train(img, 32, np.random.default_rng(6))
  assert a.shape == (32, 32, 3) and a.dtype == np.float32
  np.testing.assert_array_equal(a, b)
  assert not np.array_equal(a, c)


@pytest.mark.parametrize("size", [224, 364])
def test_eval_matches_hf_blip_image_processor(size):
  transformers = pytest.importorskip("transformers")
  from transformers.image_utils import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD, PILImageResampling
  proc = transformers.BlipImageProcessor(
      size={"height": size, "width": size}, resample=PILImageResampling.BICUBIC,
      do_rescale=True, do_normalize=True, image_mean=OPENAI_CLIP_MEAN, image_std=OPENAI_CLIP_STD,
      do_convert_rgb=True)
  imgs = [im.load_rgb(p) for p in PHOTOS[:6]]
  ref = proc(imgs, return_tensors="np")["pixel_values"].transpose(0, 2, 3, 1)
  ours = np.stack([im.preprocess_eval(x, size) for x in imgs])
  assert ours.shape == (6, size, size, 3) and ours.dtype == np.float32
  np.testing.assert_allclose(ours, ref, atol=1e-5, rtol=0)
