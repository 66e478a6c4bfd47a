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
from typing import Sequence

import numpy as np
from PIL import Image

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


class BadSampleError(ValueError):
  """A training/eval sample that cannot be used (missing, empty or undecodable image, or an
  empty caption). The message names the offending file or record."""


def load_rgb(path: str) -> Image.Image:
  """Opens and fully decodes an image file as RGB.

  Args:
    path: image file path.

  Returns:
    A decoded ``PIL.Image.Image`` in mode ``"RGB"`` (H x W x 3 uint8 pixels).

  Raises:
    BadSampleError: if the file is missing, is empty (0 bytes), or Pillow cannot decode it
      (corrupt or truncated data); the message names ``path`` and the reason.
  """
  if not os.path.isfile(path):
    raise BadSampleError(f"image file missing: {path}")
  if os.path.getsize(path) == 0:
    raise BadSampleError(f"image file is empty (0 bytes): {path}")
  try:
    with Image.open(path) as img:
      img.load()
      return img.convert("RGB")
  except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as e:
    raise BadSampleError(f"image file is corrupt or not decodable by Pillow: {path} ({e})") from e


def check_image_file(path: str, decode: bool = True) -> str | None:
  """Cheap validity check used to drop bad samples before training.

  Args:
    path: image file path.
    decode: True fully decodes the pixels (exact: catches truncated JPEGs); False only opens
      the header and runs ``Image.verify()`` (fast but some truncated files pass).

  Returns:
    None if the image is usable, else a short reason: ``"missing"``, ``"empty"`` or ``"corrupt"``.
  """
  if not os.path.isfile(path):
    return "missing"
  if os.path.getsize(path) == 0:
    return "empty"
  try:
    with Image.open(path) as img:
      if decode:
        img.load()
      else:
        img.verify()
  except (OSError, SyntaxError, ValueError, Image.DecompressionBombError):
    return "corrupt"
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
