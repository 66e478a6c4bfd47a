"""BLIP-2 image preprocessing with Pillow + numpy (spec §6.4, LAVIS ``blip_processors.py``).

* train (``blip2_image_train``): :func:`random_resized_crop` (scale (0.5, 1), ratio (3/4, 4/3),
  bicubic) -> :func:`hflip` with p=0.5 -> :func:`normalize`.
* eval (``blip_image_eval`` / HF ``BlipImageProcessor``): :func:`resize_eval` (bicubic to S x S,
  aspect ratio not kept) -> :func:`normalize`.

Layout: HWC float32 (vlm uses NHWC ``pixel_values``; HF/torch use NCHW).
"""
from __future__ import annotations

import math
import os
import struct
from typing import Sequence

import numpy as np
from PIL import Image, ImageOps

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


class BadSampleError(ValueError):
  """A training/eval sample that cannot be used (missing, empty or undecodable image, or an
  empty caption). The message names the offending file or record.

  Attributes:
    reason: for image files, the short reason :func:`check_image_file` reports (``"missing"``,
      ``"empty"`` or ``"corrupt"``); None when not about an image file.
  """

  def __init__(self, message: str, reason: str | None = None):
    super().__init__(message)
    self.reason = reason


_BIT_DEPTH_8 = 255
_BIT_DEPTH_16 = 65535


def _gray_to_rgb(gray: np.ndarray) -> Image.Image:
  """uint8 ``[H, W]`` -> RGB PIL image (the grey value in all three channels)."""
  return Image.fromarray(np.ascontiguousarray(gray, dtype=np.uint8), mode="L").convert("RGB")


def to_rgb(img: Image.Image) -> Image.Image:
  """Converts an in-memory PIL image of any mode to 8-bit ``"RGB"``.

  Rules (the ordinary modes give exactly HF's result: transformers 4.57.1
  ``image_transforms.convert_to_rgb`` and ``image_utils.load_image`` both call
  ``PIL.Image.convert("RGB")``; only the high-bit-depth modes, which that call clips to almost
  all white, are handled differently):

  * ``RGB``: returned as is (the same object).
  * ``1``, ``L``, ``P``, ``CMYK``, ``YCbCr``, ``RGBX``, ``HSV``, ``LAB``: Pillow's
    ``convert("RGB")`` (``CMYK``: ``R = round((255 - C) * (255 - K) / 255)``, likewise G from M
    and B from Y).
  * Alpha (``LA``, ``PA``, ``RGBA``, ``RGBa``, and ``P``/``L``/``RGB`` with a ``transparency``
    entry): the alpha is dropped, not composited: each pixel keeps its stored colour, like HF
    4.57.1 ``convert_to_rgb`` (so a pixel that is fully transparent shows the colour stored
    under it, e.g. black). ``P`` images with per-entry (bytes) transparency convert without
    Pillow's "should be converted to RGBA" warning; the input image is not modified.
  * ``I;16``, ``I;16L``, ``I;16B``, ``I;16N`` (16-bit grey, e.g. 16-bit PNG): ``v >> 8``, the
    same reduction Pillow itself applies when it opens 16-bit RGB/RGBA PNGs and TIFFs.
  * ``I`` (32-bit signed grey, e.g. from TIFF): negatives become 0; then, from the image's
    maximum, 8-bit data (max <= 255) is kept as is, 16-bit data (max <= 65535) is ``v >> 8``,
    and anything larger is scaled linearly so that the maximum is 255 (``round(v * 255 / max)``).
    (This rule reads the data, so a 16-bit image whose values all lie <= 255 is kept as 8-bit.)
  * ``F`` (32-bit float grey): NaN becomes 0; if every value lies in [0, 1] the image is taken
    as normalised and mapped by ``round(v * 255)``, otherwise as 0..255 data: ``round(v)``
    clipped to 0..255 (+inf -> 255, -inf -> 0). ``round`` here is ``np.rint`` (half to even).

  Args:
    img: ``PIL.Image.Image`` of any mode, any size. EXIF orientation is *not* applied here
      (in-memory images are taken as they are, like HF's image processors); :func:`load_rgb`
      applies it when opening a file.

  Returns:
    A ``PIL.Image.Image`` in mode ``"RGB"`` (uint8 pixels ``[H, W, 3]``), the same size.

  Raises:
    TypeError: if ``img`` is not a PIL image.
    ValueError: if Pillow cannot convert the mode to RGB (e.g. ``La``); the message names the
      mode.
  """
  if not isinstance(img, Image.Image):
    raise TypeError(f"expected a PIL.Image.Image, got {type(img).__name__}")
  mode = img.mode
  if mode == "RGB":
    return img
  if mode.startswith("I;16"):
    return _gray_to_rgb(np.asarray(img).astype(np.uint16) >> 8)
  if mode == "I":
    v = np.maximum(np.asarray(img, dtype=np.int64), 0)
    vmax = int(v.max()) if v.size else 0
    if vmax <= _BIT_DEPTH_8:
      gray = v
    elif vmax <= _BIT_DEPTH_16:
      gray = v >> 8
    else:
      gray = np.rint(v.astype(np.float64) * (255.0 / vmax))
    return _gray_to_rgb(gray.astype(np.uint8))
  if mode == "F":
    v = np.nan_to_num(np.asarray(img, dtype=np.float64), nan=0.0, posinf=np.inf, neginf=-np.inf)
    if v.size and v.min() >= 0.0 and v.max() <= 1.0:
      v = v * 255.0
    return _gray_to_rgb(np.clip(np.rint(v), 0, 255).astype(np.uint8))
  if mode == "P" and isinstance(img.info.get("transparency"), bytes):
    img = img.copy()  # drop the alpha table without touching the caller's image
    del img.info["transparency"]
  try:
    return img.convert("RGB")
  except ValueError as e:
    raise ValueError(f"cannot convert an image of mode {mode!r} to RGB: {e}") from e


def _open_rgb(path: str, decode: bool) -> Image.Image | None:
  """Shared body of :func:`load_rgb` (``decode=True``) and :func:`check_image_file`.

  ``decode=False`` only opens the header and runs ``Image.verify()`` and returns None.

  Raises:
    BadSampleError: with ``reason`` set, naming ``path``.
  """
  if os.path.isdir(path):
    raise BadSampleError(f"image path is a directory, not a file: {path}", "missing")
  if not os.path.isfile(path):
    raise BadSampleError(f"image file missing: {path}", "missing")
  if os.path.getsize(path) == 0:
    raise BadSampleError(f"image file is empty (0 bytes): {path}", "empty")
  try:
    with Image.open(path) as img:
      if not decode:
        img.verify()
        return None
      img.load()
      img = ImageOps.exif_transpose(img)
      return to_rgb(img)
  except Image.DecompressionBombError as e:
    raise BadSampleError(
        f"image file is too large to decode safely (possible decompression bomb): {path} ({e}); "
        "if the file is trusted, raise PIL.Image.MAX_IMAGE_PIXELS", "corrupt") from e
  except (OSError, SyntaxError, ValueError, EOFError, struct.error, IndexError, KeyError,
          TypeError, ZeroDivisionError) as e:
    # Pillow plugins raise all of these on malformed data (OSError covers truncated files and
    # UnidentifiedImageError; SyntaxError/struct.error malformed headers and EXIF blocks).
    raise BadSampleError(f"image file is corrupt or not decodable by Pillow: {path} "
                         f"({type(e).__name__}: {e})", "corrupt") from e


def load_rgb(path: str | os.PathLike) -> Image.Image:
  """Opens and fully decodes an image file as RGB: the one place vlm opens image files.

  Steps: existence / directory / 0-byte checks, ``Image.open`` (Pillow's decompression-bomb
  limit ``PIL.Image.MAX_IMAGE_PIXELS`` applies unchanged: Pillow refuses images above twice that
  many pixels), a full decode (catches truncated data), the EXIF orientation
  (``PIL.ImageOps.exif_transpose``, as HF's ``image_utils.load_image`` and image viewers do; tags
  2..8), then :func:`to_rgb` (16-bit, float, alpha and palette rules documented there).

  Args:
    path: image file path (``str`` or ``os.PathLike``), used as given (not resolved).

  Returns:
    A decoded ``PIL.Image.Image`` in mode ``"RGB"`` (H x W x 3 uint8 pixels), upright; H x W are
    the displayed size (swapped w.r.t. the stored size for orientations 5..8).

  Raises:
    BadSampleError: (a ``ValueError``) if the path is missing or a directory, the file is empty
      (0 bytes), too large (decompression bomb), or Pillow cannot decode it (not an image,
      corrupt or truncated data, unreadable EXIF, unconvertible mode); the message names
      ``path`` and the reason, ``.reason`` is the :func:`check_image_file` reason.
  """
  path = os.fspath(path)
  return _open_rgb(path, decode=True)


def check_image_file(path: str | os.PathLike, decode: bool = True) -> str | None:
  """Cheap validity check used to drop bad samples before training.

  Args:
    path: image file path.
    decode: True runs exactly :func:`load_rgb` (full decode, EXIF transpose, mode conversion),
      so a file accepted here always loads. False only opens the header and runs
      ``Image.verify()``: fast, but some truncated files pass and then fail in :func:`load_rgb`.

  Returns:
    None if the image is usable, else a short reason: ``"missing"`` (no file, or a directory),
    ``"empty"`` (0 bytes) or ``"corrupt"`` (not decodable, including too large); the full
    message is what :func:`load_rgb` raises.
  """
  try:
    _open_rgb(os.fspath(path), decode=decode)
  except BadSampleError as e:
    return e.reason
  return None


def random_resized_crop_params(
    width: int,
    height: int,
    scale: Sequence[float],
    ratio: Sequence[float],
    rng: np.random.Generator,
) -> tuple[int, int, int, int]:
  """Crop box of torchvision ``RandomResizedCrop.get_params`` (same algorithm, numpy RNG).

  Up to 10 attempts: area fraction ~ U(scale), log aspect ratio ~ U(log ratio); the box
  ``w = round(sqrt(A * r)), h = round(sqrt(A / r))`` is accepted if it fits, with a uniform
  top-left corner. Otherwise falls back to the largest centred crop whose aspect ratio is
  clamped to ``ratio``.

  Args:
    width, height: source image size in pixels.
    scale: (min, max) fraction of the image area.
    ratio: (min, max) aspect ratio w/h.
    rng: numpy Generator (grain passes one per record).

  Returns:
    ``(top, left, crop_height, crop_width)`` in pixels.

  Raises:
    ValueError: on empty images or invalid ``scale``/``ratio`` ranges.
  """
  if width < 1 or height < 1:
    raise ValueError(f"image must be non-empty, got {width}x{height}")
  if not (0 < scale[0] <= scale[1]):
    raise ValueError(f"scale must satisfy 0 < min <= max, got {tuple(scale)}")
  if not (0 < ratio[0] <= ratio[1]):
    raise ValueError(f"ratio must satisfy 0 < min <= max, got {tuple(ratio)}")
  area = width * height
  log_lo, log_hi = math.log(ratio[0]), math.log(ratio[1])
  for _ in range(10):
    target_area = area * rng.uniform(scale[0], scale[1])
    aspect = math.exp(rng.uniform(log_lo, log_hi))
    w = int(round(math.sqrt(target_area * aspect)))
    h = int(round(math.sqrt(target_area / aspect)))
    if 0 < w <= width and 0 < h <= height:
      top = int(rng.integers(0, height - h + 1))
      left = int(rng.integers(0, width - w + 1))
      return top, left, h, w
  in_ratio = width / height
  if in_ratio < min(ratio):
    w = width
    h = int(round(w / min(ratio)))
  elif in_ratio > max(ratio):
    h = height
    w = int(round(h * max(ratio)))
  else:
    w, h = width, height
  return (height - h) // 2, (width - w) // 2, h, w


def random_resized_crop(
    img: Image.Image,
    size: int,
    scale: Sequence[float] = (0.5, 1.0),
    ratio: Sequence[float] = (3 / 4, 4 / 3),
    *,
    rng: np.random.Generator,
) -> Image.Image:
  """torchvision ``RandomResizedCrop(size, scale, ratio, BICUBIC)`` on a PIL image.

  Args:
    img: PIL image (any size).
    size: output side S.
    scale, ratio: see :func:`random_resized_crop_params`.
    rng: numpy Generator.

  Returns:
    S x S PIL image: the crop box resized with bicubic filtering.
  """
  top, left, h, w = random_resized_crop_params(img.width, img.height, scale, ratio, rng)
  return img.crop((left, top, left + w, top + h)).resize((size, size), Image.BICUBIC)


def hflip(img: Image.Image) -> Image.Image:
  """Mirrors the image left-right (torchvision ``hflip``)."""
  return img.transpose(Image.FLIP_LEFT_RIGHT)


def resize_eval(img: Image.Image, size: int) -> Image.Image:
  """LAVIS ``blip_image_eval`` / HF ``BlipImageProcessor`` resize: bicubic to S x S, aspect
  ratio not preserved, no crop."""
  return img.resize((size, size), Image.BICUBIC)


def normalize(arr) -> np.ndarray:
  """``ToTensor`` (/255) then OpenAI-CLIP mean/std normalisation (spec §6.4).

  Args:
    arr: uint8 pixels [H, W, 3] (or a PIL RGB image).

  Returns:
    float32 [H, W, 3] ``(arr / 255 - CLIP_MEAN) / CLIP_STD``.

  Raises:
    ValueError: if the input is not [H, W, 3].
  """
  x = np.asarray(arr)
  if x.ndim != 3 or x.shape[-1] != 3:
    raise ValueError(f"normalize expects RGB pixels [H, W, 3], got shape {x.shape}")
  x = x.astype(np.float32) / np.float32(255.0)
  mean = np.asarray(CLIP_MEAN, dtype=np.float32)
  std = np.asarray(CLIP_STD, dtype=np.float32)
  return (x - mean) / std


def preprocess_train(img: Image.Image, size: int, rng: np.random.Generator,
                     crop_scale: Sequence[float] = (0.5, 1.0), flip: bool = True) -> np.ndarray:
  """``blip2_image_train``: random resized crop -> random hflip (p=0.5) -> normalise.

  Returns:
    float32 [S, S, 3].
  """
  out = random_resized_crop(img, size, crop_scale, rng=rng)
  if flip and rng.random() < 0.5:
    out = hflip(out)
  return normalize(out)


def preprocess_eval(img: Image.Image, size: int) -> np.ndarray:
  """``blip_image_eval``: bicubic resize to S x S -> normalise. Returns float32 [S, S, 3]."""
  return normalize(resize_eval(img, size))
