"""Qwen3-VL / Qwen2.5-VL host-side processor: resize, patchify, video sampling, chat template.

Host only (numpy + Pillow + PyAV + the Rust ``tokenizers`` library); no torch, no transformers.
Spec: ``qwen3vl_spec.md`` §9 (processor), §7.2 (video timestamps), §11 item 18/19 (rounding, fast vs
slow resize). HF references: ``qwen2_vl/image_processing_qwen2_vl.py`` (``smart_resize``, the *slow*
``Qwen2VLImageProcessor``: PIL bicubic resize on uint8, float64 rescale cast to float32, float32
normalise, merge-window patch flattening), ``qwen3_vl/video_processing_qwen3_vl.py`` (Qwen3-VL
frame sampling, clip-budget ``smart_resize``), ``qwen2_vl/video_processing_qwen2_vl.py`` (the
``Qwen2VLVideoProcessor`` that HF's ``Qwen2_5_VLProcessor`` uses: Qwen2-VL/2.5-VL frame sampling,
per-frame budget), ``qwen3_vl/processing_qwen3_vl.py`` (placeholder expansion and timestamps),
``qwen2_5_vl/processing_qwen2_5_vl.py`` (``second_per_grid_ts``).

Pipeline choice (spec §11 item 19): images and video frames are resized with Pillow's bicubic filter
on uint8 exactly like the slow HF image processor, so ``pixel_values`` are bit-identical to
``Qwen2VLImageProcessor``. HF's default *fast* processors resize with torchvision's antialiased
bicubic instead and differ by a few uint8 levels at some pixels; models see that as a small input
perturbation, not a format difference.

Layouts:
* ``patches`` float32 ``[N, C*Tp*P*P]``, rows in merge-window order (temporal patch, block row,
  block col, intra row, intra col), columns in Conv3d weight order (channel, frame, pixel row,
  pixel col), spec §9.3.
* ``grid_thw`` int64 ``[3]`` per image/video = (temporal patches, patch rows, patch cols);
  processors stack them into ``[num_images, 3]``.
"""
from __future__ import annotations

import dataclasses
import math
import os
from typing import Any, Mapping, Sequence

import numpy as np
from PIL import Image
from tokenizers import Tokenizer

from vlm.data.paths import resolve_path
from vlm.models.rope_index import check_vision_tokens

DEFAULT_TOKENIZER_FILE = "vlm/assets/tokenizers/qwen3/tokenizer.json"

ENDOFTEXT = "<|endoftext|>"
IM_START = "<|im_start|>"
IM_END = "<|im_end|>"
VISION_START = "<|vision_start|>"
VISION_END = "<|vision_end|>"
IMAGE_PAD = "<|image_pad|>"
VIDEO_PAD = "<|video_pad|>"

OPENAI_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
QWEN2_5_VL_SYSTEM_PROMPT = "You are a helpful assistant."


@dataclasses.dataclass(frozen=True)
class QwenProcessorConfig:
  """Image/video preprocessing settings (spec §9, released ``preprocessor_config.json`` values).

  Defaults are the released Qwen3-VL configs; :data:`QWEN2_5_VL_PROCESSOR` holds Qwen2.5-VL's.

  Attributes:
    patch_size: P, pixels per patch side (16 Qwen3-VL, 14 Qwen2.5-VL).
    temporal_patch_size: Tp, frames per temporal patch (2).
    merge_size: M, patches per merge-window side (2).
    image_mean, image_std: per-channel RGB normalisation after rescaling.
    rescale_factor: multiplies uint8 values before normalisation (1/255).
    min_pixels, max_pixels: image pixel budget for :func:`smart_resize`.
    video_min_pixels, video_max_pixels: video pixel budget.
    video_budget: ``"clip"`` (Qwen3-VL: the budget covers all frames, :func:`smart_resize_video`) or
      ``"frame"`` (Qwen2-VL/2.5-VL video processor: per-frame :func:`smart_resize`).
    frame_sampling: which reference frame-sampling rule file paths go through: ``"qwen3"``
      (:func:`sample_frame_indices`, HF ``Qwen3VLVideoProcessor.sample_frames``) or ``"qwen2_vl"``
      (:func:`sample_frame_indices_qwen2_vl`, HF ``Qwen2VLVideoProcessor.sample_frames``, used by
      Qwen2-VL and Qwen2.5-VL).
    fps: frames per second to sample (> 0). With ``"qwen2_vl"`` it may be None: then ``num_frames``
      frames are taken, or every frame when ``num_frames`` is None too (HF
      ``do_sample_frames=False``). ``"qwen3"`` needs a number.
    num_frames: ``"qwen2_vl"`` only: a fixed frame count (rounded to a multiple of
      ``temporal_patch_size``) instead of ``fps``; None (default) samples by ``fps``.
    min_frames, max_frames: bounds of the fps-derived frame count.
    video_timestamps: Qwen3-VL textual timestamps per temporal patch (spec §7.2); False for 2.5-VL.
    default_system_prompt: system turn inserted by the chat template when the conversation has none
      (None for Qwen3-VL, "You are a helpful assistant." for Qwen2.5-VL, spec §11 item 25).

  Raises:
    ValueError: on non-positive sizes, min > max pixel budgets, mean/std without 3 entries or a zero
      std, an unknown ``video_budget``/``frame_sampling``, a non-positive ``fps``/``num_frames``,
      both ``fps`` and ``num_frames`` set, or ``"qwen3"`` sampling without ``fps`` or with
      ``num_frames``.
  """
  patch_size: int = 16
  temporal_patch_size: int = 2
  merge_size: int = 2
  image_mean: tuple[float, ...] = (0.5, 0.5, 0.5)
  image_std: tuple[float, ...] = (0.5, 0.5, 0.5)
  rescale_factor: float = 1.0 / 255.0
  min_pixels: int = 65536
  max_pixels: int = 16777216
  video_min_pixels: int = 4096
  video_max_pixels: int = 25165824
  video_budget: str = "clip"
  frame_sampling: str = "qwen3"
  fps: float | None = 2.0
  num_frames: int | None = None
  min_frames: int = 4
  max_frames: int = 768
  video_timestamps: bool = True
  default_system_prompt: str | None = None

  def __post_init__(self):
    for name in ("patch_size", "temporal_patch_size", "merge_size", "min_pixels", "max_pixels",
                 "video_min_pixels", "video_max_pixels", "min_frames", "max_frames"):
      value = getattr(self, name)
      if not isinstance(value, (int, np.integer)) or isinstance(value, bool) or value < 1:
        raise ValueError(f"QwenProcessorConfig.{name} must be a positive int, got {value!r}")
    if self.min_pixels > self.max_pixels or self.video_min_pixels > self.video_max_pixels:
      raise ValueError("QwenProcessorConfig: min pixel budgets must be <= max budgets, got "
                       f"images {self.min_pixels}..{self.max_pixels}, "
                       f"videos {self.video_min_pixels}..{self.video_max_pixels}")
    if self.min_frames > self.max_frames:
      raise ValueError(f"min_frames={self.min_frames} must be <= max_frames={self.max_frames}")
    if (len(self.image_mean) != 3 or len(self.image_std) != 3
        or min(abs(s) for s in self.image_std) == 0):
      raise ValueError("image_mean/image_std need 3 (RGB) entries and a non-zero std, got "
                       f"{self.image_mean} / {self.image_std}")
    if self.video_budget not in ("clip", "frame"):
      raise ValueError(f"video_budget must be 'clip' (Qwen3-VL) or 'frame' (Qwen2.5-VL), "
                       f"got {self.video_budget!r}")
    if self.frame_sampling not in ("qwen3", "qwen2_vl"):
      raise ValueError(f"frame_sampling must be 'qwen3' (Qwen3-VL) or 'qwen2_vl' (Qwen2-VL / "
                       f"Qwen2.5-VL), got {self.frame_sampling!r}")
    if self.fps is not None and not (isinstance(self.fps, (int, float, np.number))
                                     and not isinstance(self.fps, bool)
                                     and np.isfinite(self.fps) and self.fps > 0):
      raise ValueError(f"fps must be > 0 (or None with frame_sampling='qwen2_vl'), "
                       f"got {self.fps!r}")
    if self.num_frames is not None and not (isinstance(self.num_frames, (int, np.integer))
                                            and self.num_frames >= 1):
      raise ValueError(f"num_frames must be a positive int or None, got {self.num_frames!r}")
    if self.frame_sampling == "qwen3" and (self.fps is None or self.num_frames is not None):
      raise ValueError("frame_sampling='qwen3' samples by fps only: set fps > 0 and "
                       f"num_frames=None (got fps={self.fps!r}, num_frames={self.num_frames!r}); "
                       "use frame_sampling='qwen2_vl' for a fixed frame count")
    if self.fps is not None and self.num_frames is not None:
      raise ValueError(f"fps={self.fps} and num_frames={self.num_frames} are mutually exclusive "
                       "(as in HF Qwen2VLVideoProcessor.sample_frames): set one of them to None")

  @property
  def factor(self) -> int:
    """Resize granularity in pixels: ``patch_size * merge_size``."""
    return self.patch_size * self.merge_size


QWEN3_VL_PROCESSOR = QwenProcessorConfig()
"""Released Qwen3-VL image + video preprocessor configs (spec §9)."""

QWEN2_5_VL_PROCESSOR = QwenProcessorConfig(
    patch_size=14, image_mean=OPENAI_CLIP_MEAN, image_std=OPENAI_CLIP_STD,
    min_pixels=3136, max_pixels=12845056,
    video_min_pixels=128 * 28 * 28, video_max_pixels=768 * 28 * 28, video_budget="frame",
    frame_sampling="qwen2_vl", fps=2.0, num_frames=None, min_frames=4, max_frames=768,
    video_timestamps=False, default_system_prompt=QWEN2_5_VL_SYSTEM_PROMPT)
"""Released Qwen2.5-VL image config (spec §9, §9.7) + HF ``Qwen2VLVideoProcessor`` video defaults.

Video values are the class defaults of ``qwen2_vl/video_processing_qwen2_vl.py`` (the video
processor HF's ``AutoVideoProcessor`` maps ``qwen2_5_vl`` to): ``min_pixels = 128*28*28``,
``max_pixels = 768*28*28``, ``temporal_patch_size = 2``, ``min_frames = 4``, ``max_frames = 768``,
and its ``sample_frames`` rule (``frame_sampling="qwen2_vl"``). One deliberate choice: that class
has ``do_sample_frames = False`` and ``fps = None`` (every decoded frame is used), while
``Qwen2_5_VLProcessor.__call__`` computes ``second_per_grid_ts`` with ``fps = 2.0`` when no fps is
passed. Here file paths are sampled at ``fps = 2.0`` so the frames and ``second_per_grid_ts``
agree (HF with ``do_sample_frames=True, fps=2.0``); ``dataclasses.replace(QWEN2_5_VL_PROCESSOR,
fps=None)`` reproduces the every-frame default.
"""


# ----------------------------------------------------------------------------------------------
# Resizing.


def _check_aspect(height: int, width: int) -> None:
  if height < 1 or width < 1:
    raise ValueError(f"image height and width must be >= 1, got {height}x{width}")
  ratio = max(height, width) / min(height, width)
  if ratio > 200:
    raise ValueError(f"absolute aspect ratio must be smaller than 200, got {ratio} for a "
                     f"{height}x{width} (HxW) input; crop or pad it to a less extreme shape")


def smart_resize(height: int, width: int, factor: int = 32, min_pixels: int = 65536,
                 max_pixels: int = 16777216) -> tuple[int, int]:
  """Target (height, width): multiples of ``factor`` with ``min_pixels <= h*w <= max_pixels``.

  Spec §9.1 / HF ``qwen2_vl.image_processing_qwen2_vl.smart_resize``: round each side to the nearest
  multiple of ``factor`` (Python ``round``, half-to-even: 720/32 = 22.5 -> 22); if the area is above
  ``max_pixels`` scale both sides by ``sqrt(h*w/max_pixels)`` and floor to multiples (at least
  ``factor``); if below ``min_pixels`` scale up and ceil.

  Args:
    height, width: source size in pixels.
    factor: ``patch_size * merge_size`` (32 for Qwen3-VL, 28 for Qwen2.5-VL).
    min_pixels, max_pixels: pixel budget.

  Returns:
    ``(resized_height, resized_width)`` ints.

  Raises:
    ValueError: if a side is < 1 or ``max(h, w) / min(h, w) > 200``.
  """
  _check_aspect(height, width)
  h_bar = round(height / factor) * factor
  w_bar = round(width / factor) * factor
  if h_bar * w_bar > max_pixels:
    beta = math.sqrt((height * width) / max_pixels)
    h_bar = max(factor, math.floor(height / beta / factor) * factor)
    w_bar = max(factor, math.floor(width / beta / factor) * factor)
  elif h_bar * w_bar < min_pixels:
    beta = math.sqrt(min_pixels / (height * width))
    h_bar = math.ceil(height * beta / factor) * factor
    w_bar = math.ceil(width * beta / factor) * factor
  return h_bar, w_bar


def smart_resize_video(num_frames: int, height: int, width: int, temporal_factor: int = 2,
                       factor: int = 32, min_pixels: int = 4096,
                       max_pixels: int = 25165824) -> tuple[int, int]:
  """Qwen3-VL video frame size: like :func:`smart_resize` with the budget over the whole clip.

  Spec §9.6 / HF ``qwen3_vl.video_processing_qwen3_vl.smart_resize``: the area test uses
  ``round(num_frames / temporal_factor) * temporal_factor * h_bar * w_bar`` and the scale factor
  ``sqrt(num_frames * h * w / max_pixels)``, so longer clips get smaller frames.

  Args:
    num_frames: number of sampled frames.
    height, width: frame size in pixels.
    temporal_factor: temporal patch size (2).
    factor: ``patch_size * merge_size``.
    min_pixels, max_pixels: pixel budget for all frames together.

  Returns:
    ``(resized_height, resized_width)`` ints shared by all frames.

  Raises:
    ValueError: if ``num_frames < temporal_factor``, a side is ``< factor``, or the aspect ratio
      exceeds 200.
  """
  if num_frames < temporal_factor:
    raise ValueError(f"a video needs at least temporal_factor={temporal_factor} frames, got "
                     f"{num_frames}; pad the frames (repeat the last one) first")
  if height < factor or width < factor:
    raise ValueError(f"video frames must be at least {factor}x{factor} pixels, "
                     f"got {height}x{width}")
  _check_aspect(height, width)
  h_bar = round(height / factor) * factor
  w_bar = round(width / factor) * factor
  t_bar = round(num_frames / temporal_factor) * temporal_factor
  if t_bar * h_bar * w_bar > max_pixels:
    beta = math.sqrt((num_frames * height * width) / max_pixels)
    h_bar = max(factor, math.floor(height / beta / factor) * factor)
    w_bar = max(factor, math.floor(width / beta / factor) * factor)
  elif t_bar * h_bar * w_bar < min_pixels:
    beta = math.sqrt(min_pixels / (num_frames * height * width))
    h_bar = math.ceil(height * beta / factor) * factor
    w_bar = math.ceil(width * beta / factor) * factor
  return h_bar, w_bar


def _to_rgb_uint8(img: Any) -> np.ndarray:
  """PIL image (any mode) or uint8 ``[H, W, 3]`` / ``[H, W, 4]`` / ``[H, W]`` array -> uint8
  ``[H, W, 3]``.

  PIL images go through :func:`vlm.data.image.to_rgb` (HF's ``convert("RGB")`` for ordinary
  modes, so normal images stay bit-identical with HF; 16-bit / 32-bit / float grey scaled to 8
  bits instead of clipped; alpha dropped, as HF). RGBA arrays drop the alpha the same way.

  Raises:
    ValueError: non-uint8 or non-channels-last arrays, unconvertible PIL modes, other types.
  """
  if isinstance(img, Image.Image):
    from vlm.data.image import to_rgb  # pylint: disable=import-outside-toplevel
    return np.asarray(to_rgb(img), dtype=np.uint8)
  if isinstance(img, np.ndarray):
    if img.dtype != np.uint8:
      raise ValueError("image arrays must be uint8 [H, W, 3] with values 0..255, got dtype "
                       f"{img.dtype}; convert with (x * 255).round().astype(np.uint8) first")
    if img.ndim == 2:
      return np.repeat(img[:, :, None], 3, axis=2)
    if img.ndim == 3 and img.shape[2] == 3:
      return img
    if img.ndim == 3 and img.shape[2] == 4:
      return np.asarray(Image.fromarray(img, "RGBA").convert("RGB"))
    raise ValueError(f"image arrays must be channels-last [H, W, 3], got shape {img.shape}")
  raise ValueError(f"expected a PIL.Image or a uint8 numpy array, got {type(img).__name__}")


def _resize_uint8(rgb: np.ndarray, height: int, width: int) -> np.ndarray:
  """Pillow bicubic resize of uint8 ``[H, W, 3]`` (HF slow ``image_transforms.resize``)."""
  if rgb.shape[0] == height and rgb.shape[1] == width:
    return rgb
  return np.asarray(Image.fromarray(rgb).resize((width, height), resample=Image.BICUBIC))


def _normalize(frames: np.ndarray, config: QwenProcessorConfig) -> np.ndarray:
  """uint8 ``[F, H, W, 3]`` -> float32 ``[F, 3, H, W]``: ``(x * rescale - mean) / std``.

  Same rounding as HF's slow path: the rescale is computed in float64 and cast to float32, then
  the mean/std arithmetic runs in float32.
  """
  x = (frames.astype(np.float64) * config.rescale_factor).astype(np.float32)
  mean = np.asarray(config.image_mean, dtype=np.float32)
  std = np.asarray(config.image_std, dtype=np.float32)
  x = (x - mean) / std
  return np.ascontiguousarray(x.transpose(0, 3, 1, 2))


def flatten_patches(frames: np.ndarray, patch_size: int, temporal_patch_size: int,
                    merge_size: int) -> tuple[np.ndarray, np.ndarray]:
  """Cuts ``[F, C, H, W]`` frames into merge-window-ordered patch rows (spec §9.3).

  Frames are padded to a multiple of ``temporal_patch_size`` by repeating the last frame.

  Args:
    frames: float32 ``[F, C, H, W]`` with ``H, W`` multiples of ``patch_size * merge_size``.
    patch_size, temporal_patch_size, merge_size: P, Tp, M.

  Returns:
    ``(patches float32 [t*h*w, C*Tp*P*P], grid_thw int64 [3])``.

  Raises:
    ValueError: if ``frames`` is not 4-D or ``H``/``W`` is not a multiple of ``P*M``.
  """
  if frames.ndim != 4:
    raise ValueError(f"frames must be [F, C, H, W], got shape {frames.shape}")
  n, c, height, width = frames.shape
  unit = patch_size * merge_size
  if n < 1 or height % unit or width % unit:
    raise ValueError("frames must be non-empty with H and W multiples of "
                     f"patch_size*merge_size={unit}, got shape {frames.shape}; resize with "
                     "smart_resize first")
  if n % temporal_patch_size:
    extra = temporal_patch_size - n % temporal_patch_size
    frames = np.concatenate([frames, np.repeat(frames[-1:], extra, axis=0)], axis=0)
  gt = frames.shape[0] // temporal_patch_size
  gh, gw = height // patch_size, width // patch_size
  x = frames.reshape(gt, temporal_patch_size, c, gh // merge_size, merge_size, patch_size,
                     gw // merge_size, merge_size, patch_size)
  x = x.transpose(0, 3, 6, 4, 7, 2, 1, 5, 8)
  patches = x.reshape(gt * gh * gw, c * temporal_patch_size * patch_size * patch_size)
  return patches, np.array([gt, gh, gw], dtype=np.int64)


def preprocess_image(img: Any, config: QwenProcessorConfig = QWEN3_VL_PROCESSOR
                     ) -> tuple[np.ndarray, np.ndarray]:
  """One image -> ``(patches float32 [h*w, 3*Tp*P*P], grid_thw int64 [3] = (1, h, w))``.

  Spec §9.1-9.3: convert to RGB, :func:`smart_resize` (image budget), Pillow bicubic resize on
  uint8, rescale + normalise, repeat the frame ``temporal_patch_size`` times, flatten in
  merge-window order. Bit-identical to HF slow ``Qwen2VLImageProcessor`` with the same settings.

  Args:
    img: ``PIL.Image`` (any mode), uint8 ``[H, W, 3]``/``[H, W]`` array, or an image file path
      (``str`` / ``os.PathLike``; absolute, relative to the cwd, or relative to the repository
      root) opened with :func:`vlm.data.image.load_rgb` (full decode, EXIF orientation applied,
      mode rules of :func:`vlm.data.image.to_rgb`). PIL images are used as they are (no EXIF
      transpose, as HF's image processor).
    config: processor settings.

  Returns:
    ``(patches, grid_thw)`` with ``h = resized_height / P``, ``w = resized_width / P``.

  Raises:
    vlm.data.image.BadSampleError: (a ValueError) for a path that is missing, a directory, empty
      or not decodable (truncated, not an image, too large); the message names the file.
    ValueError: bad image type/dtype/shape, or an aspect ratio above 200.
  """
  if isinstance(img, (str, os.PathLike)):
    from vlm.data.image import load_rgb  # pylint: disable=import-outside-toplevel
    img = load_rgb(resolve_path(img))
  rgb = _to_rgb_uint8(img)
  rh, rw = smart_resize(rgb.shape[0], rgb.shape[1], config.factor, config.min_pixels,
                        config.max_pixels)
  frames = _normalize(_resize_uint8(rgb, rh, rw)[None], config)
  return flatten_patches(frames, config.patch_size, config.temporal_patch_size, config.merge_size)


def preprocess_video(frames: np.ndarray, config: QwenProcessorConfig = QWEN3_VL_PROCESSOR
                     ) -> tuple[np.ndarray, np.ndarray]:
  """Video frames -> ``(patches float32 [t*h*w, 3*Tp*P*P], grid_thw int64 [3] = (t, h, w))``.

  Spec §9.6 (Qwen3-VL) / §9.7: one size for all frames from :func:`smart_resize_video`
  (``video_budget="clip"``) or :func:`smart_resize` with the video limits (``"frame"``), Pillow
  bicubic resize, rescale + normalise, pad to a multiple of Tp by repeating the last frame,
  ``t = padded_frames / Tp``, flatten as §9.3.

  Args:
    frames: uint8 ``[F, H, W, 3]`` (e.g. from :func:`load_video`), ``F >= 1``.
    config: processor settings.

  Returns:
    ``(patches, grid_thw)``.

  Raises:
    ValueError: if ``frames`` is not uint8 ``[F, H, W, 3]`` with F >= 1, or the size checks of the
      resize function fail.
  """
  frames = np.asarray(frames)
  if frames.dtype != np.uint8 or frames.ndim != 4 or frames.shape[-1] != 3 or frames.shape[0] < 1:
    raise ValueError(f"video frames must be uint8 [F, H, W, 3] with F >= 1, got {frames.dtype} "
                     f"{frames.shape}")
  n, height, width, _ = frames.shape
  tp = config.temporal_patch_size
  if config.video_budget == "clip":
    padded = n + (-n) % tp
    rh, rw = smart_resize_video(padded, height, width, tp, config.factor,
                                config.video_min_pixels, config.video_max_pixels)
  else:
    rh, rw = smart_resize(height, width, config.factor, config.video_min_pixels,
                          config.video_max_pixels)
  resized = np.stack([_resize_uint8(f, rh, rw) for f in frames])
  return flatten_patches(_normalize(resized, config), config.patch_size, tp, config.merge_size)


# ----------------------------------------------------------------------------------------------
# Video decoding, frame sampling and timestamps.


def sample_frame_indices(total_frames: int, video_fps: float, fps: float = 2.0, min_frames: int = 4,
                         max_frames: int = 768) -> np.ndarray:
  """Qwen3-VL frame sampling (spec §9.6, HF ``Qwen3VLVideoProcessor.sample_frames``).

  ``n = int(total_frames / video_fps * fps)``, clipped to ``[min_frames, max_frames]`` and then to
  ``total_frames``; indices ``round_half_even(linspace(0, total_frames - 1, n))``.

  Args:
    total_frames: frames in the file.
    video_fps: the file's frame rate.
    fps: frames per second to sample.
    min_frames, max_frames: clip bounds for the count.

  Returns:
    int64 ``[n]`` frame indices (non-decreasing).

  Raises:
    ValueError: if ``total_frames < 1`` or a rate is not positive.
  """
  if total_frames < 1:
    raise ValueError(f"the video has no frames (total_frames={total_frames})")
  if not video_fps > 0 or not fps > 0:
    raise ValueError(f"video_fps and fps must be > 0, got {video_fps} and {fps}")
  n = int(total_frames / video_fps * fps)
  n = min(min(max(n, min_frames), max_frames), total_frames)
  return np.linspace(0, total_frames - 1, n).round().astype(np.int64)


_TORCH_FLOAT_LANES = 8
"""float32 lanes of one ``at::vec::Vectorized<float>`` in torch's AVX2 and default CPU builds."""


def _torch_arange_float32_int(total: int, count: int) -> np.ndarray:
  """``torch.arange(0, total, total / count).int()`` on CPU, reproduced with numpy.

  That is the index formula of HF ``Qwen2VLVideoProcessor.sample_frames``. Torch builds a float32
  tensor (default dtype) of ``size = ceil(total / step)`` elements, ``step = total / count`` in
  float64 (``aten/src/ATen/native/RangeFactories.cpp``). Its CPU kernel
  (``native/cpu/RangeFactoriesKernel.cpp``) fills runs of ``2 * lanes`` elements with
  ``Vectorized<float>::arange(float32(i0 * step), step)``, i.e. ``float32(float32(i0 * step) + j *
  step)`` for lane ``j`` of the vector starting at ``i0``, and the remaining tail with
  ``float32(i * step)``; ``.int()`` truncates. Reproduced for ``lanes = 8`` (AVX2/default builds)
  and one parallel chunk (``size <= 16384``). The float32 rounding matters only for long videos:
  for ``total < ~17000`` frames the result equals the exact ``floor(i * total / count)``.
  ``size`` is sometimes ``count + 1`` with the last element equal to ``total`` (out of range), e.g.
  ``total=367, count=30``; callers drop it.

  Args:
    total: frames in the video, >= 1.
    count: frames requested, >= 1.

  Returns:
    int64 ``[count]`` or ``[count + 1]`` non-decreasing indices in ``[0, total]``.
  """
  step = total / count
  size = math.ceil(total / step)
  i = np.arange(size, dtype=np.int64)
  lane = i % _TORCH_FLOAT_LANES
  base = ((i - lane) * step).astype(np.float32).astype(np.float64)
  vector = (base + lane * step).astype(np.float32)
  tail = (i * step).astype(np.float32)
  vector_end = size // (2 * _TORCH_FLOAT_LANES) * (2 * _TORCH_FLOAT_LANES)
  return np.where(i < vector_end, vector, tail).astype(np.int64)


def sample_frame_indices_qwen2_vl(total_frames: int, video_fps: float | None = None,
                                  fps: float | None = 2.0, num_frames: int | None = None,
                                  min_frames: int = 4, max_frames: int = 768,
                                  temporal_patch_size: int = 2) -> np.ndarray:
  """Qwen2-VL / Qwen2.5-VL frame sampling (HF ``Qwen2VLVideoProcessor.sample_frames``).

  Reference: ``transformers/models/qwen2_vl/video_processing_qwen2_vl.py`` (4.57.1), the video
  processor of ``Qwen2_5_VLProcessor``. With ``Tp = temporal_patch_size``:

  * ``num_frames`` given: ``n = round(num_frames / Tp) * Tp`` (Python ``round``, half to even:
    ``num_frames=5`` -> 4, ``7`` -> 8); no ``min_frames``/``max_frames`` clipping.
  * else ``fps`` given: ``cap = floor(min(max_frames, total_frames) / Tp) * Tp``,
    ``n = total_frames / video_fps * fps`` (a float), ``n = min(max(n, min_frames), cap,
    total_frames)``, ``n = floor(n / Tp) * Tp``.
  * neither: every frame, ``arange(total_frames)`` (HF ``do_sample_frames=False``).

  Indices are ``torch.arange(0, total_frames, total_frames / n).int()`` (float32 arithmetic, see
  :func:`_torch_arange_float32_int`), i.e. ``floor(k * total_frames / n)`` for ``k < n`` up to
  float32 rounding in very long videos. When torch's arange yields an extra ``n``-th element equal
  to ``total_frames`` (out of range: HF's torchcodec decoder fails on it, its PyAV reader skips it),
  it is dropped, so exactly ``n`` indices come back.

  Args:
    total_frames: frames in the file.
    video_fps: the file's frame rate (needed when sampling by ``fps``).
    fps: frames per second to sample, or None.
    num_frames: fixed number of frames (mutually exclusive with ``fps``), or None.
    min_frames, max_frames: bounds of the fps-derived count.
    temporal_patch_size: Tp; the count is a multiple of it (except in the every-frame mode).

  Returns:
    int64 ``[n]`` non-decreasing frame indices in ``[0, total_frames)``.

  Raises:
    ValueError: if ``total_frames < 1``; both ``fps`` and ``num_frames`` are set (as HF); ``fps``
      is set without a positive ``video_fps`` (as HF) or is not positive; ``num_frames < 1`` or
      ``temporal_patch_size < 1``; the count exceeds ``total_frames`` (HF: "Video can't be
      sampled"); or the count rounds to 0 frames (``num_frames < Tp / 2``, or a video or
      ``max_frames`` shorter than ``Tp``), where HF fails with ``ZeroDivisionError``.
  """
  if total_frames < 1:
    raise ValueError(f"the video has no frames (total_frames={total_frames})")
  if temporal_patch_size < 1:
    raise ValueError(f"temporal_patch_size must be >= 1, got {temporal_patch_size}")
  if fps is not None and num_frames is not None:
    raise ValueError(f"fps={fps} and num_frames={num_frames} are mutually exclusive (HF "
                     "Qwen2VLVideoProcessor.sample_frames): pass only one of them")
  tp = temporal_patch_size
  if num_frames is not None:
    if num_frames < 1:
      raise ValueError(f"num_frames must be >= 1, got {num_frames}")
    count = round(num_frames / tp) * tp
  elif fps is not None:
    if not fps > 0:
      raise ValueError(f"fps must be > 0, got {fps}")
    if video_fps is None or not video_fps > 0:
      raise ValueError(f"sampling at fps={fps} needs the video's frame rate, got "
                       f"video_fps={video_fps}; pass it or use a fixed num_frames")
    cap = math.floor(min(max_frames, total_frames) / tp) * tp
    count = total_frames / video_fps * fps
    count = min(min(max(count, min_frames), cap), total_frames)
    count = math.floor(count / tp) * tp
  else:
    return np.arange(total_frames, dtype=np.int64)
  if count > total_frames:
    raise ValueError(f"the video can't be sampled: num_frames={num_frames} rounds to {count} "
                     f"frames (a multiple of temporal_patch_size={tp}) > total_frames="
                     f"{total_frames}; ask for fewer frames or sample by fps")
  if count < 1:
    raise ValueError(f"the video can't be sampled: the frame count rounds down to 0 (multiples "
                     f"of temporal_patch_size={tp}; total_frames={total_frames}, "
                     f"max_frames={max_frames}, num_frames={num_frames}); a clip needs at least "
                     f"{tp} frames, and num_frames must round (Python round) to a positive "
                     f"multiple of {tp}")
  indices = _torch_arange_float32_int(total_frames, count)
  return indices[indices < total_frames]


def _decode_frames(path: str, wanted: set[int]) -> tuple[dict[int, np.ndarray], int]:
  """Decodes the first video stream; keeps RGB frames whose decode index is in ``wanted``."""
  import av  # PyAV; imported lazily so image-only users do not pay for it.

  kept: dict[int, np.ndarray] = {}
  count = 0
  with av.open(path) as container:
    stream = container.streams.video[0]
    for count, frame in enumerate(container.decode(stream), start=1):
      if count - 1 in wanted:
        kept[count - 1] = frame.to_ndarray(format="rgb24")
  return kept, count


def load_video(path: str, fps: float | None = 2.0, min_frames: int = 4, max_frames: int = 768,
               temporal_patch_size: int = 2, *, frame_sampling: str = "qwen3",
               num_frames: int | None = None) -> tuple[np.ndarray, np.ndarray]:
  """Decodes and samples a video file with PyAV (spec §9.6).

  Frame count and rate come from the container (``stream.frames``, ``stream.average_rate``; 24 fps
  if the rate is unknown, as HF). Indices follow :func:`sample_frame_indices` (Qwen3-VL,
  ``frame_sampling="qwen3"``) or :func:`sample_frame_indices_qwen2_vl` (Qwen2-VL / Qwen2.5-VL,
  ``"qwen2_vl"``; same frames as HF's PyAV reader ``video_utils.read_video_pyav`` with
  ``Qwen2VLVideoProcessor.sample_frames``); frame ``i`` is at
  ``i / video_fps`` seconds. The sampled frames are padded to a multiple of
  ``temporal_patch_size`` by repeating the last frame and its timestamp (HF pads the index list the
  same way before computing timestamps). If the stream reports no frame count, or fewer frames
  decode than reported, the frames are counted by decoding and the sampling is redone.

  Args:
    path: video file (absolute, relative to the cwd, or relative to the repository root).
    fps, min_frames, max_frames: sampling settings (Qwen3-VL and Qwen2.5-VL defaults: 2, 4, 768).
      ``fps=None`` is allowed with ``"qwen2_vl"`` only.
    temporal_patch_size: Tp, the padding multiple (and the count multiple of ``"qwen2_vl"``).
    frame_sampling: ``"qwen3"`` or ``"qwen2_vl"``.
    num_frames: ``"qwen2_vl"`` only: a fixed frame count instead of ``fps``.

  Returns:
    ``(frames uint8 [F, H, W, 3], timestamps float64 [F] seconds)``, ``F % Tp == 0``.

  Warns:
    UserWarning: naming ``path`` when fewer frames decode than the container reports (e.g. a
      truncated file whose index is at the front); the decodable frames are sampled.

  Raises:
    ValueError: naming ``path``, if the file does not exist, is a directory, is empty (0 bytes),
      is not a decodable video (corrupt or truncated; FFmpeg's error is chained), has no video
      stream, or has no decodable frames; on an
      unknown ``frame_sampling``, ``"qwen3"`` without ``fps`` or with ``num_frames``; or when the
      sampling function rejects the request (e.g. ``num_frames`` above the frame count).
  """
  import av

  if frame_sampling == "qwen3":
    if fps is None or num_frames is not None:
      raise ValueError("frame_sampling='qwen3' samples by fps only: pass fps > 0 and no num_frames "
                       "(use frame_sampling='qwen2_vl' for a fixed frame count)")
  elif frame_sampling != "qwen2_vl":
    raise ValueError(f"frame_sampling must be 'qwen3' or 'qwen2_vl', got {frame_sampling!r}")

  def pick(total_frames: int, video_fps: float) -> np.ndarray:
    try:
      if frame_sampling == "qwen3":
        return sample_frame_indices(total_frames, video_fps, fps, min_frames, max_frames)
      return sample_frame_indices_qwen2_vl(total_frames, video_fps, fps, num_frames, min_frames,
                                           max_frames, temporal_patch_size)
    except ValueError as e:
      raise ValueError(f"{path!r} ({total_frames} frames at {video_fps:g} fps): {e}") from e

  resolved = resolve_path(path)
  if os.path.isdir(resolved):
    raise ValueError(f"video path is a directory, not a file: {path!r} (resolved to "
                     f"{resolved!r})")
  if not os.path.isfile(resolved):
    raise ValueError(f"video file not found: {path!r} (resolved to {resolved!r})")
  if os.path.getsize(resolved) == 0:
    raise ValueError(f"video file is empty (0 bytes): {path!r} (resolved to {resolved!r})")
  try:
    with av.open(resolved) as container:
      if not container.streams.video:
        raise ValueError(f"{path!r} has no video stream")
      stream = container.streams.video[0]
      total = int(stream.frames or 0)
      video_fps = float(stream.average_rate) if stream.average_rate else 24.0
    reported = total > 0
    if total < 1:
      _, total = _decode_frames(resolved, set())
    if total < 1:
      raise ValueError(f"no frames could be decoded from {path!r}")
    indices = pick(total, video_fps)
    kept, decoded = _decode_frames(resolved, set(indices.tolist()))
    if decoded < total:
      if decoded < 1:
        raise ValueError(f"no frames could be decoded from {path!r}")
      if reported:
        import warnings  # pylint: disable=import-outside-toplevel
        warnings.warn(f"{path!r}: the container reports {total} frames but only {decoded} "
                      "decode (truncated file?); sampling the decodable frames", stacklevel=2)
      indices = pick(decoded, video_fps)
      kept, _ = _decode_frames(resolved, set(indices.tolist()))
  except av.error.FFmpegError as e:  # not a video, truncated, unsupported codec
    raise ValueError(f"could not decode {path!r} as a video: {e}") from e
  idx = indices.tolist()
  if len(idx) % temporal_patch_size:
    idx += [idx[-1]] * (temporal_patch_size - len(idx) % temporal_patch_size)
  frames = np.stack([kept[i] for i in idx])
  timestamps = np.array([i / video_fps for i in idx], dtype=np.float64)
  return frames, timestamps


def temporal_patch_timestamps(timestamps: Sequence[float],
                              temporal_patch_size: int = 2) -> list[float]:
  """One time per temporal patch: mean of its first and last frame times (spec §9.6).

  Args:
    timestamps: per-frame seconds (padded to a multiple of Tp by repeating the last one if needed).
    temporal_patch_size: Tp.

  Returns:
    ``ceil(F / Tp)`` floats, ``(ts[k*Tp] + ts[k*Tp + Tp - 1]) / 2``.

  Raises:
    ValueError: if ``timestamps`` is empty.
  """
  ts = [float(t) for t in timestamps]
  if not ts:
    raise ValueError("timestamps must not be empty")
  if len(ts) % temporal_patch_size:
    ts += [ts[-1]] * (temporal_patch_size - len(ts) % temporal_patch_size)
  tp = temporal_patch_size
  return [(ts[i] + ts[i + tp - 1]) / 2 for i in range(0, len(ts), tp)]


def format_timestamp(seconds: float) -> str:
  """Qwen3-VL timestamp text ``"<{seconds:.1f} seconds>"`` (spec §7.2; 0.25 -> "<0.2 seconds>")."""
  return f"<{seconds:.1f} seconds>"


# ----------------------------------------------------------------------------------------------
# Chat template and placeholder expansion.


def _render_content(content: Any, counters: dict[str, int], add_vision_id: bool) -> str:
  if isinstance(content, str):
    return content
  if not isinstance(content, (list, tuple)):
    raise ValueError("message content must be a str or a list of items, got "
                     f"{type(content).__name__}")
  out = []
  for item in content:
    if not isinstance(item, Mapping):
      raise ValueError(f"content items must be dicts, got {item!r}")
    kind = item.get("type")
    if kind is None:  # {"image": ...} / {"video": ...} without "type", as HF accepts
      kind = "image" if "image" in item else "video" if "video" in item else None
    if kind == "text":
      out.append(item["text"])
    elif kind in ("image", "image_url"):
      counters["image"] += 1
      prefix = f"Picture {counters['image']}: " if add_vision_id else ""
      out.append(f"{prefix}{VISION_START}{IMAGE_PAD}{VISION_END}")
    elif kind == "video":
      counters["video"] += 1
      prefix = f"Video {counters['video']}: " if add_vision_id else ""
      out.append(f"{prefix}{VISION_START}{VIDEO_PAD}{VISION_END}")
    else:
      raise ValueError(f"unknown content item {item!r}: expected a dict with type 'text' (and "
                       "'text'), 'image' or 'video'")
  return "".join(out)


def apply_chat_template(messages: Sequence[Mapping[str, Any]], add_generation_prompt: bool = True,
                        add_vision_id: bool = False, default_system_prompt: str | None = None,
                        thinking: bool = False) -> str:
  """Renders a conversation as Qwen ChatML (spec §9.5; Qwen2.5-VL system default per §11 item 25).

  Each turn is ``<|im_start|>{role}\\n{content}<|im_end|>\\n``. Content is a string or a list of
  items ``{"type": "text", "text": ...}``, ``{"type": "image", ...}`` ->
  ``<|vision_start|><|image_pad|><|vision_end|>``, ``{"type": "video", ...}`` ->
  ``<|vision_start|><|video_pad|><|vision_end|>``, concatenated without separators; with
  ``add_vision_id`` each is prefixed ``Picture {n}: `` / ``Video {n}: ``. If
  ``default_system_prompt`` is set and the first message is not a system message, a system turn with
  it is prepended (Qwen2.5-VL). The generation prompt is ``<|im_start|>assistant\\n`` (plus
  ``<think>\\n`` when ``thinking``, Qwen3-VL Thinking models). Tool calls are not supported.

  Args:
    messages: dicts with ``role`` in {"system", "user", "assistant"} and ``content``.
    add_generation_prompt: append the assistant header.
    add_vision_id: number pictures/videos.
    default_system_prompt: see above (None for Qwen3-VL).
    thinking: Thinking-model generation prompt.

  Returns:
    The prompt string (placeholders not yet expanded; see :func:`expand_vision_placeholders`).

  Raises:
    ValueError: on an empty conversation, an unknown role, or bad content items.
  """
  if not messages:
    raise ValueError("messages must hold at least one message")
  counters = {"image": 0, "video": 0}
  parts = []
  if default_system_prompt is not None and messages[0].get("role") != "system":
    parts.append(f"{IM_START}system\n{default_system_prompt}{IM_END}\n")
  for message in messages:
    role = message.get("role")
    if role not in ("system", "user", "assistant"):
      raise ValueError(f"unsupported role {role!r}: use 'system', 'user' or 'assistant'")
    body = _render_content(message.get("content", ""), counters, add_vision_id)
    parts.append(f"{IM_START}{role}\n{body}{IM_END}\n")
  if add_generation_prompt:
    parts.append(f"{IM_START}assistant\n" + ("<think>\n" if thinking else ""))
  return "".join(parts)


def find_vision_placeholders(text: str, row: int | None = None) -> list[tuple[str, int]]:
  """The image/video placeholders of one prompt, each checked to sit in its block.

  Every ``<|image_pad|>`` must be exactly ``<|vision_start|><|image_pad|><|vision_end|>`` and
  every ``<|video_pad|>`` exactly ``<|vision_start|><|video_pad|><|vision_end|>`` (what
  :func:`apply_chat_template`, and HF's chat template, write for ``{"type": "image"}`` /
  ``{"type": "video"}`` items). A bare placeholder (e.g. the literal text ``<|image_pad|>`` typed in
  a prompt) or two inside one block is rejected: expanding it would consume the next image's grid
  and shift every later image's features into the wrong sample.

  Args:
    text: one unexpanded prompt.
    row: batch row, only used in error messages.

  Returns:
    ``[(kind, offset)]`` in order of appearance; kind is "image" or "video", offset the character
    index of the placeholder in ``text``.

  Raises:
    ValueError: naming the row and character offset of a placeholder outside its block.
  """
  found = []
  for kind, pad in (("image", IMAGE_PAD), ("video", VIDEO_PAD)):
    at = text.find(pad)
    while at != -1:
      before = at >= len(VISION_START) and text.startswith(VISION_START, at - len(VISION_START))
      if not (before and text.startswith(VISION_END, at + len(pad))):
        where = "" if row is None else f"row {row}: "
        raise ValueError(
            f"{where}{pad} at character {at} is not inside a {VISION_START}{pad}{VISION_END} "
            f"block (context: {text[max(0, at - 40):at + len(pad) + 40]!r}); each {kind} needs "
            "exactly one such block (apply_chat_template writes it). A stray or doubled "
            "placeholder would misalign the image features, so literal placeholder text is "
            "not allowed in prompts")
      found.append((at, kind))
      at = text.find(pad, at + len(pad))
  return [(kind, at) for at, kind in sorted(found)]


def expand_vision_placeholders(text: str, image_grid_thw: Sequence[Sequence[int]] = (),
                               video_grid_thw: Sequence[Sequence[int]] = (),
                               video_timestamps: Sequence[Sequence[float]] | None = None,
                               merge_size: int = 2, *, row: int | None = None
                               ) -> tuple[str, int, int]:
  """Expands ``<|image_pad|>`` / ``<|video_pad|>`` placeholder blocks in order of appearance.

  HF ``Qwen3VLProcessor``/``Qwen2_5_VLProcessor.__call__`` (spec §9.4, §7.2): the k-th
  ``<|image_pad|>`` becomes ``t*h*w / M^2`` copies for ``image_grid_thw[k]``. Videos without
  timestamps (Qwen2.5-VL) likewise become ``t*h*w / M^2`` ``<|video_pad|>``. With timestamps
  (Qwen3-VL) the block ``<|vision_start|><|video_pad|><|vision_end|>`` becomes, per temporal
  patch k, ``"<{ts_k:.1f} seconds>" <|vision_start|> <|video_pad|> x h*w/M^2 <|vision_end|>``.

  Every placeholder must sit in its ``<|vision_start|>..<|vision_end|>`` block
  (:func:`find_vision_placeholders`). Unlike HF, which also expands a bare ``<|video_pad|>`` ("vllm
  may input video token directly") and any stray ``<|image_pad|>``, a bare or doubled placeholder
  is an error here: it silently shifts the features of every later image.

  Args:
    text: one prompt.
    image_grid_thw, video_grid_thw: grids of the images/videos still to place, in order.
    video_timestamps: per video, one time per temporal patch (:func:`temporal_patch_timestamps`),
      or None for Qwen2.5-VL style.
    merge_size: M.
    row: batch row, only used in error messages.

  Returns:
    ``(expanded_text, images_used, videos_used)``.

  Raises:
    ValueError: a placeholder outside its block, more placeholders than grids, or a timestamp list
      of the wrong length (messages name ``row`` when given).
  """
  where = "" if row is None else f"row {row}: "
  found = find_vision_placeholders(text, row)
  n_img = sum(kind == "image" for kind, _ in found)
  n_vid = len(found) - n_img
  if n_img > len(image_grid_thw) or n_vid > len(video_grid_thw):
    raise ValueError(f"{where}the text has {n_img} {IMAGE_PAD} and {n_vid} {VIDEO_PAD} "
                     f"placeholders but only {len(image_grid_thw)} images and "
                     f"{len(video_grid_thw)} videos are left for it")
  merge = merge_size * merge_size
  sentinel = "\x00IMG\x00"
  for k in range(n_img):
    n = int(np.prod(image_grid_thw[k])) // merge
    text = text.replace(IMAGE_PAD, sentinel * n, 1)
  text = text.replace(sentinel, IMAGE_PAD)
  sentinel = "\x00VID\x00"
  block = f"{VISION_START}{VIDEO_PAD}{VISION_END}"
  for k in range(n_vid):
    t, h, w = (int(v) for v in video_grid_thw[k])
    if video_timestamps is None:
      text = text.replace(VIDEO_PAD, sentinel * (t * h * w // merge), 1)
    else:
      ts = list(video_timestamps[k])
      if len(ts) != t:
        raise ValueError(f"{where}video {k}: {len(ts)} timestamps for grid_t={t}; pass one per "
                         "temporal patch")
      per = h * w // merge
      expanded = "".join(f"{format_timestamp(s)}{VISION_START}{sentinel * per}{VISION_END}"
                         for s in ts)
      text = text.replace(block, expanded, 1)
  text = text.replace(sentinel, VIDEO_PAD)
  return text, n_img, n_vid


# ----------------------------------------------------------------------------------------------
# Tokenizer and processors.


class Qwen3Tokenizer:
  """Qwen2/Qwen3 byte-level BPE tokenizer over ``tokenizer.json`` (the Rust ``tokenizers`` library).

  Same ids as HF ``Qwen2TokenizerFast`` on that file: no BOS/EOS are added; the added special tokens
  (``<|im_start|>``, ``<|vision_start|>``, ``<|image_pad|>``, ...) are matched as whole tokens in
  the text (spec §9.4 ids). ``pad_token_id`` is ``<|endoftext|>`` = 151643.

  Args:
    tokenizer_file: path to ``tokenizer.json`` (default: the bundled copy in ``vlm/assets``).

  Raises:
    ValueError: if the file is missing or lacks one of the Qwen-VL special tokens.
  """

  def __init__(self, tokenizer_file: str = DEFAULT_TOKENIZER_FILE):
    path = resolve_path(tokenizer_file)
    if not os.path.isfile(path):
      raise ValueError(f"tokenizer file not found: {tokenizer_file!r} (resolved to {path!r})")
    self._tok = Tokenizer.from_file(path)
    ids = {}
    for token in (ENDOFTEXT, IM_START, IM_END, VISION_START, VISION_END, IMAGE_PAD, VIDEO_PAD):
      token_id = self._tok.token_to_id(token)
      if token_id is None:
        raise ValueError(f"{path} has no {token} token: use the Qwen2/Qwen3 tokenizer.json")
      ids[token] = token_id
    self.pad_token_id = ids[ENDOFTEXT]
    self.eos_token_id = ids[IM_END]
    self.im_start_id = ids[IM_START]
    self.vision_start_id = ids[VISION_START]
    self.vision_end_id = ids[VISION_END]
    self.image_token_id = ids[IMAGE_PAD]
    self.video_token_id = ids[VIDEO_PAD]

  def __len__(self) -> int:
    return self._tok.get_vocab_size(with_added_tokens=True)

  def token_to_id(self, token: str) -> int | None:
    """Id of ``token`` or None."""
    return self._tok.token_to_id(token)

  @staticmethod
  def _check_text(text: Any, where: str) -> None:
    """Raises ValueError naming ``where`` if ``text`` is not a str or holds a lone surrogate."""
    if not isinstance(text, str):
      raise ValueError(f"{where} must be a str, got {type(text).__name__}: {text!r}")
    try:
      text.encode("utf-8")
    except UnicodeEncodeError as e:
      raise ValueError(
          f"{where} contains a lone surrogate U+{ord(text[e.start]):04X} at character "
          f"{e.start}, which cannot be encoded as UTF-8 (a JSON '\\ud8xx' escape without its "
          f"pair?): {text[max(0, e.start - 20):e.start + 20]!r}. Fix or drop that text.") from None

  def encode(self, text: str) -> list[int]:
    """Token ids of ``text`` (no special tokens added).

    Raises:
      ValueError: if ``text`` is not a str, or holds a lone surrogate (U+D800..U+DFFF, not UTF-8
        encodable); the message gives the character position.
    """
    self._check_text(text, "text")
    return self._tok.encode(text, add_special_tokens=False).ids

  def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
    """Token ids for each string (parallel in Rust).

    Raises:
      ValueError: if ``texts`` is a single str (use :meth:`encode`), or ``texts[i]`` is not a str
        or holds a lone surrogate; the message names ``i`` and the character position.
    """
    if isinstance(texts, str):
      raise ValueError("encode_batch expects a sequence of str, got one str (use encode)")
    texts = list(texts)
    for i, text in enumerate(texts):
      self._check_text(text, f"texts[{i}]")
    return [e.ids for e in self._tok.encode_batch(texts, add_special_tokens=False)]

  def decode(self, ids: Sequence[int], skip_special_tokens: bool = False) -> str:
    """Text of ``ids``."""
    return self._tok.decode([int(i) for i in ids], skip_special_tokens=skip_special_tokens)


def pad_sequences(seqs: Sequence[Sequence[int]], pad_id: int, padding_side: str = "right",
                  max_length: int | None = None) -> tuple[np.ndarray, np.ndarray]:
  """Pads id lists to one length -> ``(input_ids int64 [B, L], attention_mask int64 [B, L])``.

  Args:
    seqs: token id lists.
    pad_id: filler id (mask 0).
    padding_side: "right" or "left" (use left for batched generation, spec §7.4).
    max_length: pad to this length (default: the longest sequence).

  Raises:
    ValueError: on an unknown side or a sequence longer than ``max_length`` (no truncation: it could
      cut vision placeholders, spec §11 item 24).
  """
  if padding_side not in ("left", "right"):
    raise ValueError(f"padding_side must be 'left' or 'right', got {padding_side!r}")
  longest = max((len(s) for s in seqs), default=0)
  length = longest if max_length is None else max_length
  if longest > length:
    raise ValueError(f"a sequence has {longest} tokens > max_length={length}; raise max_length "
                     "(truncation is not supported since it could cut vision placeholders)")
  ids = np.full((len(seqs), length), pad_id, dtype=np.int64)
  mask = np.zeros((len(seqs), length), dtype=np.int64)
  for b, s in enumerate(seqs):
    if not len(s):
      continue
    sl = slice(length - len(s), length) if padding_side == "left" else slice(0, len(s))
    ids[b, sl] = s
    mask[b, sl] = 1
  return ids, mask


def _as_list(x, kind_check) -> list:
  if x is None:
    return []
  return [x] if kind_check(x) else list(x)


def _split_per_sample(x, outer_types: tuple, inner_types: tuple, name: str
                      ) -> tuple[Any, list[int] | None]:
  """``(flat items, per-sample counts)`` for nested input (one list per text, e.g.
  ``images=[[a], [b, c]]``), else ``(x, None)``. ValueError when per-sample lists and single items
  are mixed."""
  if not isinstance(x, outer_types) or not any(isinstance(e, inner_types) for e in x):
    return x, None
  if not all(isinstance(e, inner_types) for e in x):
    raise ValueError(f"{name} mixes per-sample lists and single {name}: pass either a flat list "
                     "(consumed in order across the batch) or one list per text")
  return [item for e in x for item in e], [len(e) for e in x]


class Qwen3VLProcessor:
  """Text + images + videos -> numpy model inputs for Qwen3-VL (HF ``Qwen3VLProcessor``, spec §9).

  Args:
    config: image/video settings (default :data:`QWEN3_VL_PROCESSOR`).
    tokenizer: a :class:`Qwen3Tokenizer` (default: the bundled ``tokenizer.json``).
    padding_side: "right" (training) or "left" (batched generation).
  """

  default_config = QWEN3_VL_PROCESSOR

  def __init__(self, config: QwenProcessorConfig | None = None,
               tokenizer: Qwen3Tokenizer | None = None, padding_side: str = "right"):
    self.config = config if config is not None else self.default_config
    self.tokenizer = tokenizer if tokenizer is not None else Qwen3Tokenizer()
    if padding_side not in ("left", "right"):
      raise ValueError(f"padding_side must be 'left' or 'right', got {padding_side!r}")
    self.padding_side = padding_side

  def apply_chat_template(self, messages: Sequence[Mapping[str, Any]],
                          add_generation_prompt: bool = True, add_vision_id: bool = False,
                          thinking: bool = False) -> str:
    """:func:`apply_chat_template` with this model's default system prompt."""
    return apply_chat_template(messages, add_generation_prompt, add_vision_id,
                               self.config.default_system_prompt, thinking)

  def _load_videos(self, videos) -> list[tuple[np.ndarray, np.ndarray | None]]:
    cfg = self.config
    out = []
    for v in _as_list(videos, lambda x: isinstance(x, (str, os.PathLike, tuple))
                      or (isinstance(x, np.ndarray) and x.ndim == 4)):
      if isinstance(v, (str, os.PathLike)):
        out.append(load_video(os.fspath(v), cfg.fps, cfg.min_frames, cfg.max_frames,
                              cfg.temporal_patch_size, frame_sampling=cfg.frame_sampling,
                              num_frames=cfg.num_frames))
      elif isinstance(v, tuple) and len(v) == 2:
        out.append((np.asarray(v[0]), np.asarray(v[1], dtype=np.float64)))
      elif isinstance(v, np.ndarray):
        out.append((v, None))
      else:
        raise ValueError("each video must be a file path, a (frames uint8 [F,H,W,3], "
                         "timestamps [F]) tuple from load_video, or a frames array; got "
                         f"{type(v).__name__}")
    return out

  def _video_text_info(self, clips, grids):
    """Per-video timestamps for the text (Qwen3-VL)."""
    out = []
    for (frames, ts), grid in zip(clips, grids):
      if ts is None:
        raise ValueError("Qwen3-VL needs frame timestamps for the prompt: pass videos as file "
                         "paths or (frames, timestamps) tuples from load_video")
      if len(ts) != len(frames):
        raise ValueError(f"got {len(ts)} timestamps for {len(frames)} frames")
      out.append(temporal_patch_timestamps(ts, self.config.temporal_patch_size))
    return out

  def _extra_video_outputs(self, clips) -> dict[str, np.ndarray]:
    return {}

  def __call__(self, text: str | Sequence[str] | None = None, images=None, videos=None,
               padding_side: str | None = None,
               max_length: int | None = None) -> dict[str, np.ndarray]:
    """Processes a batch.

    Args:
      text: prompt string(s), usually from :meth:`apply_chat_template`, with one placeholder block
        ``<|vision_start|><|image_pad|><|vision_end|>`` (or the video block) per image/video, in
        order. A bare or doubled placeholder is an error (:func:`find_vision_placeholders`).
      images: one image or a list; each a ``PIL.Image``, a uint8 ``[H, W, 3]`` array or an image
        file path (``str`` / ``os.PathLike``, see :func:`preprocess_image`). Either flat (HF style:
        consumed in order across the batch) or nested, one list per text
        (``images=[[img_a], [img_b, img_c]]``, ``[]`` for a text-only row): then each row's
        placeholder count is checked against its own list and errors name the row.
      videos: one video or a list (flat or nested per text like ``images``; the per-text lists
        must be ``list`` objects since a tuple is one video); each a file path (decoded with
        :func:`load_video` using the config's ``frame_sampling``, fps/num_frames, min/max frames),
        a ``(frames, timestamps)`` tuple, or (Qwen2.5-VL only) a bare uint8 ``[F, H, W, 3]``
        array. Arrays are used as given (no sampling).
      padding_side: overrides the instance default.
      max_length: pad to this length instead of the longest prompt.

    Returns:
      dict with ``input_ids``/``attention_mask`` int64 ``[B, L]`` (when ``text`` is given),
      ``pixel_values`` float32 ``[sum t*h*w, 3*Tp*P*P]`` and ``image_grid_thw`` int64 ``[n_img, 3]``
      (when images are given, flattened in batch order), ``pixel_values_videos``/
      ``video_grid_thw`` (when videos are given), and for Qwen2.5-VL ``second_per_grid_ts``
      float32 ``[n_vid]``.

    Raises:
      ValueError: if placeholder and image/video counts differ (per row with nested input, for the
        batch with flat input), a placeholder sits outside its block, nested input has a list
        count other than the number of texts, the tokenised runs do not match the grids
        (:func:`vlm.models.rope_index.check_vision_tokens`), on bad inputs, or when a video file
        cannot be sampled as configured (see :func:`load_video`).
      vlm.data.image.BadSampleError: (a ValueError) an image path that cannot be read.
    """
    cfg = self.config
    out: dict[str, np.ndarray] = {}
    images, image_counts = _split_per_sample(images, (list, tuple), (list, tuple), "images")
    videos, video_counts = _split_per_sample(videos, (list,), (list,), "videos")
    imgs = _as_list(images, lambda x: isinstance(x, (Image.Image, np.ndarray, str, os.PathLike)))
    image_grids: list[np.ndarray] = []
    if imgs:
      results = [preprocess_image(im, cfg) for im in imgs]
      out["pixel_values"] = np.concatenate([r[0] for r in results], axis=0)
      image_grids = [r[1] for r in results]
      out["image_grid_thw"] = np.stack(image_grids)
    clips = self._load_videos(videos)
    video_grids: list[np.ndarray] = []
    if clips:
      results = [preprocess_video(frames, cfg) for frames, _ in clips]
      out["pixel_values_videos"] = np.concatenate([r[0] for r in results], axis=0)
      video_grids = [r[1] for r in results]
      out["video_grid_thw"] = np.stack(video_grids)
      out.update(self._extra_video_outputs(clips))
    if text is None:
      return out
    texts = [text] if isinstance(text, str) else text
    if not isinstance(texts, (list, tuple)) or not all(isinstance(t, str) for t in texts):
      raise ValueError(f"text must be a string or a list of strings, got {type(text).__name__}")
    for name, counts in (("images", image_counts), ("videos", video_counts)):
      if counts is not None and len(counts) != len(texts):
        raise ValueError(f"{name} is nested (one list per text) with {len(counts)} lists for "
                         f"{len(texts)} texts; pass one list per text ([] for a row without)")
    stamps = self._video_text_info(clips, video_grids) if (clips and cfg.video_timestamps) else None
    expanded = []
    used_i = used_v = 0
    for row, t in enumerate(texts):
      want_i = None if image_counts is None else image_counts[row]
      want_v = None if video_counts is None else video_counts[row]
      row_i = image_grids[used_i:] if want_i is None else image_grids[used_i:used_i + want_i]
      row_v = video_grids[used_v:] if want_v is None else video_grids[used_v:used_v + want_v]
      row_ts = None if stamps is None else stamps[used_v:used_v + len(row_v)]
      e, ni, nv = expand_vision_placeholders(t, row_i, row_v, row_ts, cfg.merge_size, row=row)
      for kind, n, want in (("image", ni, want_i), ("video", nv, want_v)):
        if want is not None and n != want:
          raise ValueError(f"row {row}: the text has {n} {kind} placeholder block(s) but {want} "
                           f"{kind}(s) were given for it (nested {kind}s: one list per text)")
      expanded.append(e)
      used_i += ni
      used_v += nv
    if used_i != len(image_grids) or used_v != len(video_grids):
      raise ValueError(f"the text has {used_i} image and {used_v} video placeholders but "
                       f"{len(image_grids)} images and {len(video_grids)} videos were given; add "
                       f"one {VISION_START}{IMAGE_PAD}{VISION_END} (or video block) per input")
    ids = self.tokenizer.encode_batch(expanded)
    out["input_ids"], out["attention_mask"] = pad_sequences(
        ids, self.tokenizer.pad_token_id, padding_side or self.padding_side, max_length)
    check_vision_tokens(
        out["input_ids"], out["attention_mask"], out.get("image_grid_thw"),
        out.get("video_grid_thw"), image_token_id=self.tokenizer.image_token_id,
        video_token_id=self.tokenizer.video_token_id,
        vision_start_id=self.tokenizer.vision_start_id, merge_size=cfg.merge_size,
        split_video_frames=cfg.video_timestamps)
    return out


class Qwen2_5_VLProcessor(Qwen3VLProcessor):
  """Qwen2.5-VL processor (HF ``Qwen2_5_VLProcessor``, spec §9.7).

  Differences from :class:`Qwen3VLProcessor`: :data:`QWEN2_5_VL_PROCESSOR` settings (patch 14, CLIP
  mean/std, per-frame video budget, HF ``Qwen2VLVideoProcessor`` frame sampling
  :func:`sample_frame_indices_qwen2_vl` for file paths), default system prompt in the chat
  template, one run of ``t*h*w/4`` ``<|video_pad|>`` per video without timestamps, and
  ``second_per_grid_ts`` for MRoPE (spec §7.6).

  ``second_per_grid_ts`` (float32 ``[n_vid]``, one value per video) is computed as HF
  ``qwen2_5_vl/processing_qwen2_5_vl.py`` does: ``temporal_patch_size / fps`` with the sampling
  fps (``config.fps``), and HF's default ``fps = 2.0`` when none is set (``num_frames`` or
  every-frame sampling; HF then reports ``Tp / 2.0`` too, whatever the real frame spacing). HF
  returns a list of Python floats, which becomes a float32 tensor under ``return_tensors="pt"``.
  """

  default_config = QWEN2_5_VL_PROCESSOR

  def _extra_video_outputs(self, clips) -> dict[str, np.ndarray]:
    fps = self.config.fps if self.config.fps is not None else 2.0  # HF processor default
    value = self.config.temporal_patch_size / fps
    return {"second_per_grid_ts": np.full((len(clips),), value, dtype=np.float32)}
