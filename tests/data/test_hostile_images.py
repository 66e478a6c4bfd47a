"""Odd and broken image files through every vlm entry point that opens images.

Entry points: ``vlm.data.image.load_rgb`` / ``check_image_file`` / ``to_rgb``, the BLIP-2 eval
preprocessing (``preprocess_eval(load_rgb(path))``, as ``pipeline.load_eval_split``), the Qwen
``preprocess_image`` with a path and ``Qwen3VLProcessor()(images=[path])``, and ``load_video``.
Every file is built here with Pillow / numpy / PyAV in ``tmp_path``.
"""
import pathlib
import pickle
import re
import struct
import warnings
import zlib

import numpy as np
import pytest
from PIL import Image, ImageOps

from vlm.data import image as im
from vlm.data import qwen_processor as qp

S = 32  # BLIP eval size used here (any size works; small keeps the tests fast)
QCFG = qp.QwenProcessorConfig(min_pixels=32 * 32, max_pixels=64 * 64)  # small Qwen budget

# Displayed pixels for each EXIF orientation, from the stored [H, W, C] array (EXIF 2.3 §4.6.4).
ORIENT = {
    2: lambda a: a[:, ::-1],                         # mirrored left-right
    3: lambda a: a[::-1, ::-1],                      # rotated 180
    4: lambda a: a[::-1],                            # mirrored top-bottom
    5: lambda a: a.transpose(1, 0, 2),               # transposed (main diagonal)
    6: lambda a: np.rot90(a, -1),                    # stored rotated: display turns 90 CW
    7: lambda a: a[::-1, ::-1].transpose(1, 0, 2),   # transverse (anti-diagonal)
    8: lambda a: np.rot90(a, 1),                     # display turns 90 CCW
}


def _asym(h=6, w=10, seed=0):
  """Asymmetric uint8 [h, w, 3] (random, so any wrong flip/rotation changes the pixels)."""
  return np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)


def _exif(orientation):
  exif = Image.Exif()
  exif[0x0112] = orientation
  return exif


def _blip(rgb):
  """Reference BLIP eval pixels for the expected uint8 RGB array."""
  return im.preprocess_eval(Image.fromarray(np.ascontiguousarray(rgb)), S)


def _assert_all_paths(path, expected):
  """``expected`` uint8 [H, W, 3]: what every entry point must decode ``path`` to."""
  expected = np.ascontiguousarray(expected)
  assert im.check_image_file(path, decode=True) is None
  assert im.check_image_file(path, decode=False) is None
  img = im.load_rgb(path)
  assert img.mode == "RGB"
  np.testing.assert_array_equal(np.asarray(img), expected)
  np.testing.assert_array_equal(im.preprocess_eval(im.load_rgb(path), S), _blip(expected))
  patches, grid = qp.preprocess_image(path, QCFG)
  ref_patches, ref_grid = qp.preprocess_image(expected, QCFG)
  np.testing.assert_array_equal(grid, ref_grid)
  np.testing.assert_array_equal(patches, ref_patches)


# ------------------------------------------------------------------------------ EXIF orientation


@pytest.mark.parametrize("fmt", ["png", "jpg"])
@pytest.mark.parametrize("orientation", sorted(ORIENT))
def test_exif_orientation(tmp_path, fmt, orientation):
  a = _asym()
  path = str(tmp_path / f"o{orientation}.{fmt}")
  Image.fromarray(a).save(path, exif=_exif(orientation), **({"quality": 95} if fmt == "jpg" else {}))
  with Image.open(path) as raw:
    assert raw.getexif()[0x0112] == orientation
    stored = np.asarray(raw.convert("RGB"))  # JPEG: the lossy decode, not `a`
    hf_style = np.asarray(ImageOps.exif_transpose(raw).convert("RGB"))
  if fmt == "png":
    np.testing.assert_array_equal(stored, a)
  expected = ORIENT[orientation](stored)
  np.testing.assert_array_equal(hf_style, expected)
  h, w = a.shape[:2]
  assert expected.shape[:2] == ((w, h) if orientation >= 5 else (h, w))
  _assert_all_paths(path, expected)


def test_orientation_1_and_bad_values_keep_pixels(tmp_path):
  a = _asym()
  for value in (1, 0, 9):
    path = str(tmp_path / f"o{value}.png")
    Image.fromarray(a).save(path, exif=_exif(value))
    _assert_all_paths(path, a)


def test_exif_transpose_through_qwen_processor_call(tmp_path):
  a = _asym(40, 70)
  path = str(tmp_path / "portrait.png")
  Image.fromarray(a).save(path, exif=_exif(6))
  proc = qp.Qwen3VLProcessor(config=QCFG)
  prompt = proc.apply_chat_template(
      [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "?"}]}])
  out = proc(text=prompt, images=[path])
  ref = proc(text=prompt, images=[np.ascontiguousarray(ORIENT[6](a))])
  np.testing.assert_array_equal(out["image_grid_thw"], ref["image_grid_thw"])
  np.testing.assert_array_equal(out["pixel_values"], ref["pixel_values"])
  np.testing.assert_array_equal(out["input_ids"], ref["input_ids"])


# ------------------------------------------------------------------------------ modes


def test_16bit_png_gradient(tmp_path):
  g = np.linspace(0, 65535, 8 * 64).round().astype(np.uint16).reshape(8, 64)
  path = str(tmp_path / "g16.png")
  Image.fromarray(g).save(path)
  with Image.open(path) as raw:
    assert raw.mode == "I;16"
    assert np.asarray(raw.convert("RGB")).mean() > 240  # Pillow's plain convert clips to white
  expected = np.repeat((g >> 8).astype(np.uint8)[:, :, None], 3, axis=2)
  assert expected[0, 0, 0] == 0 and expected[-1, -1, 0] == 255 and 100 < expected.mean() < 155
  _assert_all_paths(path, expected)


@pytest.mark.parametrize("mode", ["I;16", "I;16L", "I;16B", "I;16N"])
def test_16bit_modes_in_memory(mode):
  g = np.array([[0, 255, 256, 257, 32768, 65279, 65280, 65535]], dtype=np.uint16)
  dtype = ">u2" if mode == "I;16B" else "<u2"
  img = Image.frombytes(mode, (8, 1), g.astype(dtype).tobytes())
  out = np.asarray(im.to_rgb(img))
  assert out[0, :, 0].tolist() == [0, 0, 1, 1, 128, 254, 255, 255]
  assert (out == out[:, :, :1]).all()


def test_16bit_rgb_png_matches_grey_rule(tmp_path):
  # Pillow opens 16-bit RGB PNGs as 8-bit RGB by keeping the high byte; the grey rule is the same.
  v = np.array([[0, 0x01FF, 0x0180, 0x7FFF, 0xFFFF]], dtype=np.uint16)
  rgb16 = np.repeat(v[:, :, None], 3, axis=2)
  raw = b"".join(b"\x00" + row.astype(">u2").tobytes() for row in rgb16)

  def chunk(tag, data):
    return struct.pack(">I", len(data)) + tag + data + struct.pack(">I", zlib.crc32(tag + data))

  path = tmp_path / "rgb16.png"
  path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", 5, 1, 16, 2, 0, 0, 0))
                   + chunk(b"IDAT", zlib.compress(raw)) + chunk(b"IEND", b""))
  grey16 = tmp_path / "grey16.png"
  Image.fromarray(v).save(grey16)
  np.testing.assert_array_equal(np.asarray(im.load_rgb(str(path))),
                                np.asarray(im.load_rgb(str(grey16))))


@pytest.mark.parametrize("values, expected", [
    ([-5, 0, 7, 128, 255], [0, 0, 7, 128, 255]),                    # max <= 255: 8-bit
    ([-5, 0, 255, 256, 65535], [0, 0, 0, 1, 255]),                  # max <= 65535: v >> 8
    ([0, 100000, 200000, 400000], [0, 64, 128, 255]),               # larger: max -> 255
])
def test_mode_I_tiff(tmp_path, values, expected):
  path = str(tmp_path / "i32.tif")
  Image.fromarray(np.array([values], dtype=np.int32)).save(path)
  with Image.open(path) as raw:
    assert raw.mode == "I"
  _assert_all_paths(path, np.repeat(np.array([expected], np.uint8)[:, :, None], 3, axis=2))


@pytest.mark.parametrize("values, expected", [
    ([0.0, 0.25, 0.5, 1.0], [0, 64, 128, 255]),                     # in [0, 1]: * 255
    ([0.0, 1.0, 2.0, 254.6], [0, 1, 2, 255]),                       # else 0..255 data
    ([-3.0, 12.4, 300.0, float("nan")], [0, 12, 255, 0]),           # clipped; NaN -> 0
    ([0.5, float("inf"), -float("inf"), 1.0], [0, 255, 0, 1]),
])
def test_mode_F_tiff(tmp_path, values, expected):
  path = str(tmp_path / "f.tif")
  Image.fromarray(np.array([values], dtype=np.float32)).save(path)
  with Image.open(path) as raw:
    assert raw.mode == "F"
  _assert_all_paths(path, np.repeat(np.array([expected], np.uint8)[:, :, None], 3, axis=2))


def test_LA_and_RGBA_drop_alpha(tmp_path):
  a = _asym()
  alpha = np.zeros(a.shape[:2], np.uint8)
  alpha[:, 5:] = 255  # left half fully transparent: its stored colour is kept, as HF
  rgba = np.dstack([a, alpha])
  path = str(tmp_path / "rgba.png")
  Image.fromarray(rgba, "RGBA").save(path)
  _assert_all_paths(path, a)
  la = np.dstack([a[:, :, 0], alpha])
  path = str(tmp_path / "la.png")
  Image.fromarray(la, "LA").save(path)
  _assert_all_paths(path, np.repeat(a[:, :, :1], 3, axis=2))


@pytest.mark.parametrize("transparency", ["index", "bytes"])
def test_palette_with_transparency(tmp_path, transparency):
  palette = _asym(1, 256, seed=3).reshape(-1)
  idx = np.random.default_rng(4).integers(0, 256, (6, 10), dtype=np.uint8)
  img = Image.fromarray(idx, "P")
  img.putpalette(palette.tolist())
  path = str(tmp_path / "p.png")
  trns = 0 if transparency == "index" else bytes(range(256))
  img.save(path, transparency=trns)
  with Image.open(path) as raw:
    assert raw.mode == "P" and "transparency" in raw.info
  expected = palette.reshape(256, 3)[idx]
  with warnings.catch_warnings():
    warnings.simplefilter("error")  # no "should be converted to RGBA" warning either
    _assert_all_paths(path, expected)


def test_cmyk_tiff(tmp_path):
  cmyk = np.random.default_rng(5).integers(0, 256, (6, 10, 4), dtype=np.uint8)
  cmyk[0, 0] = (255, 0, 0, 0)    # cyan
  cmyk[0, 1] = (0, 0, 0, 255)    # black
  cmyk[0, 2] = (0, 0, 0, 0)      # white
  path = str(tmp_path / "cmyk.tif")
  Image.fromarray(cmyk, "CMYK").save(path)
  inv = 255 - cmyk.astype(np.int64)
  expected = np.rint(inv[:, :, :3] * inv[:, :, 3:] / 255).astype(np.uint8)
  assert expected[0, :3].tolist() == [[0, 255, 255], [0, 0, 0], [255, 255, 255]]
  _assert_all_paths(path, expected)


def test_bilevel_and_grey(tmp_path):
  bits = np.random.default_rng(6).integers(0, 2, (6, 10)).astype(bool)
  path = str(tmp_path / "b.png")
  Image.fromarray(bits).save(path)
  with Image.open(path) as raw:
    assert raw.mode == "1"
  _assert_all_paths(path, np.repeat((bits * 255).astype(np.uint8)[:, :, None], 3, axis=2))
  grey = _asym()[:, :, 0]
  path = str(tmp_path / "l.png")
  Image.fromarray(grey, "L").save(path)
  _assert_all_paths(path, np.repeat(grey[:, :, None], 3, axis=2))


def test_ordinary_modes_match_hf_convert_to_rgb():
  pytest.importorskip("transformers")
  from transformers.image_transforms import convert_to_rgb
  a = _asym(8, 12)
  rgba = Image.fromarray(np.dstack([a, a[:, :, 0]]), "RGBA")
  p = Image.fromarray(a[:, :, 0], "P")
  p.putpalette(_asym(1, 256, seed=7).reshape(-1).tolist())
  p.info["transparency"] = 3
  images = [Image.fromarray(a), rgba, rgba.convert("LA"), rgba.convert("L"), rgba.convert("1"),
            Image.fromarray(a).convert("YCbCr"), Image.fromarray(a).convert("CMYK"), p,
            Image.fromarray(a).convert("HSV")]
  for img in images:
    np.testing.assert_array_equal(np.asarray(im.to_rgb(img)), np.asarray(convert_to_rgb(img)),
                                  err_msg=img.mode)
  rgb = images[0]
  assert im.to_rgb(rgb) is rgb


def test_to_rgb_errors():
  with pytest.raises(TypeError, match="PIL.Image"):
    im.to_rgb(np.zeros((2, 2, 3), np.uint8))
  with pytest.raises(ValueError, match="'La'"):
    im.to_rgb(Image.new("La", (2, 2)))


def test_ycbcr_jpeg(tmp_path):
  a = _asym()
  path = str(tmp_path / "ycc.jpg")
  Image.fromarray(a).convert("YCbCr").save(path, quality=95)
  with Image.open(path) as raw:
    expected = np.asarray(raw.convert("RGB"))
  _assert_all_paths(path, expected)


# ------------------------------------------------------------------------------ broken files


def _bad_files(tmp_path):
  good = str(tmp_path / "good.jpg")
  Image.fromarray(_asym(64, 64)).save(good)
  data = open(good, "rb").read()
  trunc = tmp_path / "trunc.jpg"
  trunc.write_bytes(data[: len(data) // 2])
  empty = tmp_path / "empty.jpg"
  empty.write_bytes(b"")
  folder = tmp_path / "x.jpg"
  folder.mkdir()
  text = tmp_path / "x.png"
  text.write_text("not an image\n" * 10)
  return {"trunc": (str(trunc), "corrupt", "corrupt|truncated"),
          "empty": (str(empty), "empty", "empty"),
          "dir": (str(folder), "missing", "directory"),
          "text": (str(text), "corrupt", "corrupt|cannot identify"),
          "missing": (str(tmp_path / "nope.jpg"), "missing", "missing")}


@pytest.mark.parametrize("kind", ["trunc", "empty", "dir", "text", "missing"])
def test_bad_files_name_the_path(tmp_path, kind):
  path, reason, words = _bad_files(tmp_path)[kind]
  assert im.check_image_file(path, decode=True) == reason
  if kind != "trunc":  # the header check cannot see a truncated body (documented)
    assert im.check_image_file(path, decode=False) == reason
  calls = [
      lambda: im.load_rgb(path),
      lambda: im.preprocess_eval(im.load_rgb(path), S),
      lambda: qp.preprocess_image(path, QCFG),
      lambda: qp.Qwen3VLProcessor(config=QCFG)(text="<|vision_start|><|image_pad|><|vision_end|>",
                                               images=[path]),
  ]
  for call in calls:
    with pytest.raises(im.BadSampleError) as e:
      call()
    assert path in str(e.value)
    assert e.value.reason == reason
    assert re.search(words, str(e.value)), str(e.value)


def test_bad_file_pathlike(tmp_path):
  path, _, _ = _bad_files(tmp_path)["trunc"]
  with pytest.raises(im.BadSampleError, match="trunc.jpg"):
    im.load_rgb(pathlib.Path(path))
  with pytest.raises(im.BadSampleError, match="trunc.jpg"):
    qp.preprocess_image(pathlib.Path(path), QCFG)
  assert im.check_image_file(pathlib.Path(path)) == "corrupt"


def test_decompression_bomb_names_file(tmp_path, monkeypatch):
  path = str(tmp_path / "big.png")
  Image.fromarray(_asym(30, 30)).save(path)
  monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 100)  # 900 px > 2 * 100: Pillow refuses
  for call in (lambda: im.load_rgb(path), lambda: qp.preprocess_image(path, QCFG)):
    with pytest.raises(im.BadSampleError, match="decompression bomb") as e:
      call()
    assert path in str(e.value)
  assert im.check_image_file(path) == "corrupt"
  assert im.check_image_file(path, decode=False) == "corrupt"


def test_check_agrees_with_load(tmp_path):
  """Every file check_image_file(decode=True) accepts loads, every one it rejects raises."""
  files = [p for p, _, _ in _bad_files(tmp_path).values()] + [str(tmp_path / "good.jpg")]
  for i, mode in enumerate(["RGBA", "LA", "P", "CMYK", "1", "L", "I", "F", "I;16"]):
    img = Image.new(mode, (5, 4))
    ext = "tif" if mode in ("I", "F", "CMYK") else "png"
    files.append(str(tmp_path / f"m{i}.{ext}"))
    img.save(files[-1])
  for path in files:
    status = im.check_image_file(path)
    if status is None:
      assert im.load_rgb(path).mode == "RGB"
    else:
      with pytest.raises(im.BadSampleError):
        im.load_rgb(path)


def test_bad_sample_error_pickles():
  e = pickle.loads(pickle.dumps(im.BadSampleError("image file missing: x", "missing")))
  assert str(e) == "image file missing: x" and e.reason == "missing"


# ------------------------------------------------------------------------------ videos


def _write_video(path, n=12, faststart=False):
  av = pytest.importorskip("av")
  options = {"movflags": "faststart"} if faststart else {}
  with av.open(str(path), "w", options=options) as c:
    s = c.add_stream("mpeg4", rate=8)
    s.width, s.height, s.pix_fmt = 64, 48, "yuv420p"
    for i in range(n):
      frame = av.VideoFrame.from_ndarray(_asym(48, 64, seed=i), format="rgb24")
      for pkt in s.encode(frame):
        c.mux(pkt)
    for pkt in s.encode():
      c.mux(pkt)


def test_bad_videos_name_the_path(tmp_path):
  pytest.importorskip("av")
  good = tmp_path / "good.mp4"
  _write_video(good, n=40)
  data = good.read_bytes()
  folder = tmp_path / "clip.mp4"
  folder.mkdir()
  empty = tmp_path / "empty.mp4"
  empty.write_bytes(b"")
  trunc = tmp_path / "trunc.mp4"  # index at the end: nothing usable
  trunc.write_bytes(data[: len(data) // 2])
  text = tmp_path / "text.mp4"
  text.write_text("not a video\n" * 10)
  for path, words in [(folder, "directory"), (empty, "empty"), (trunc, "could not decode"),
                      (text, "could not decode"), (tmp_path / "nope.mp4", "not found")]:
    with pytest.raises(ValueError, match=words) as e:
      qp.load_video(str(path))
    assert str(path) in str(e.value)


def test_truncated_faststart_video_warns(tmp_path):
  pytest.importorskip("av")
  good = tmp_path / "good.mp4"
  _write_video(good, n=40, faststart=True)
  frames, _ = qp.load_video(str(good))
  assert frames.shape[0] == 10
  data = good.read_bytes()
  trunc = tmp_path / "trunc.mp4"  # index at the front: the first frames still decode
  trunc.write_bytes(data[: int(len(data) * 0.6)])
  with pytest.warns(UserWarning, match="trunc.mp4.*reports 40 frames"):
    frames, ts = qp.load_video(str(trunc))
  assert frames.shape[1:] == (48, 64, 3) and len(frames) == len(ts) and len(frames) % 2 == 0
