"""Qwen2.5-VL video path of vlm.data.qwen_processor vs HF transformers 4.57.1.

Reference: ``transformers/models/qwen2_vl/video_processing_qwen2_vl.py`` (``Qwen2VLVideoProcessor``,
the video processor of ``Qwen2_5_VLProcessor``) and ``qwen2_5_vl/processing_qwen2_5_vl.py``
(``second_per_grid_ts``).

torchvision is not installed, so that module cannot be imported normally (its top level imports
``torchvision.transforms.v2.functional``, used only by ``_preprocess``). It is imported here with
empty stand-in ``torchvision`` modules so that HF's own ``sample_frames`` runs (with real torch);
nothing of torchvision is executed. Frames are then decoded by HF's PyAV reader
(``video_utils.read_video_pyav``) at HF's indices and patchified by the slow
``Qwen2VLImageProcessor(videos=...)`` (the PIL twin of the video processor's torchvision
``_preprocess``), and HF's real ``Qwen2_5_VLProcessor.__call__`` computes ``second_per_grid_ts``,
the placeholder expansion and the token ids around that stand-in video processor.
"""
import dataclasses
import importlib
import math
import os
import sys
import types
from functools import partial
from unittest import mock

import numpy as np
import pytest

from vlm.data import qwen_processor as qp
from vlm.data.paths import REPO_ROOT

torch = pytest.importorskip("torch")  # before the stubbed import: torch must load only once
transformers = pytest.importorskip("transformers")
pytest.importorskip("av")

VIDEO = os.path.join(REPO_ROOT, "data/video")
KINETICS = os.path.join(VIDEO, "kinetics_arm_wrestling.mp4")  # 280 frames, 28 fps, 340x256
BIKES = os.path.join(VIDEO, "bikes.mp4")  # 250 frames, 25 fps, 640x272
TOKENIZER = os.path.join(REPO_ROOT, qp.DEFAULT_TOKENIZER_FILE)


@pytest.fixture(scope="module")
def hf_video_cls():
  """HF ``Qwen2VLVideoProcessor`` class, imported with stand-in torchvision modules."""
  # Import everything the module needs first, so that only it and the stubs are new (and removed
  # again from sys.modules when patch.dict exits).
  import transformers.image_processing_utils  # noqa: F401
  import transformers.models.qwen2_vl.image_processing_qwen2_vl  # noqa: F401
  import transformers.processing_utils  # noqa: F401
  import transformers.video_processing_utils  # noqa: F401
  import transformers.video_utils  # noqa: F401
  names = ("torchvision", "torchvision.transforms", "torchvision.transforms.v2",
           "torchvision.transforms.v2.functional")
  stubs = {name: types.ModuleType(name) for name in names}
  with mock.patch.dict(sys.modules, stubs):
    module = importlib.import_module("transformers.models.qwen2_vl.video_processing_qwen2_vl")
  return module.Qwen2VLVideoProcessor


def _hf_sample(cls, total, video_fps=None, tp=2, min_frames=4, max_frames=768, **kw):
  """HF ``sample_frames`` called unbound on a stand-in ``self`` holding the class defaults."""
  from transformers.video_utils import VideoMetadata
  fake_self = types.SimpleNamespace(num_frames=cls.num_frames, fps=cls.fps,
                                    temporal_patch_size=tp, min_frames=min_frames,
                                    max_frames=max_frames)
  meta = VideoMetadata(total_num_frames=total, fps=video_fps)
  return cls.sample_frames(fake_self, meta, temporal_patch_size=tp, min_frames=min_frames,
                           max_frames=max_frames, **kw).numpy().astype(np.int64)


def _check_same(cls, total, video_fps=None, tp=2, min_frames=4, max_frames=768, **kw):
  """Our indices == HF's, except HF's occasional out-of-range last index ``total``."""
  ref = _hf_sample(cls, total, video_fps, tp, min_frames, max_frames, **kw)
  ours = qp.sample_frame_indices_qwen2_vl(total, video_fps, kw.get("fps"), kw.get("num_frames"),
                                          min_frames, max_frames, tp)
  extra = len(ref) - len(ours)
  assert extra in (0, 1), (total, video_fps, tp, kw, ref, ours)
  if extra:
    assert ref[-1] == total, (total, kw, ref[-3:])
  if total >= 16384 and torch.backends.cpu.get_cpu_capability() == "AVX512":
    # Long videos: torch's float32 rounding follows its SIMD width; 8 lanes are emulated.
    assert np.abs(ours - ref[:len(ours)]).max() <= 1
  else:
    np.testing.assert_array_equal(ours, ref[:len(ours)], err_msg=str((total, video_fps, tp, kw)))
  assert ours.dtype == np.int64 and (ours < total).all()
  return ours, extra


# ------------------------------------------------------------------------------ sampling rule


CASES = [  # (total_frames, video_fps, tp, min_frames, max_frames, kwargs)
    (280, 28.0, 2, 4, 768, dict(fps=2.0)),      # 20 frames, every 14th
    (250, 25.0, 2, 4, 768, dict(fps=0.5)),      # 5 -> floor to 4
    (250, 25.0, 2, 4, 768, dict(fps=0.1)),      # 2.5 -> min_frames 4
    (300, 29.97, 2, 4, 768, dict(fps=2.0)),     # non-integer rate: 20.02 -> 20
    (367, 23.976, 2, 4, 768, dict(fps=2.0)),    # torch arange yields 31 elements, last = 367
    (30, 30.0, 2, 4, 768, dict(fps=26.0)),      # 26 of 30 frames: also an out-of-range extra
    (100, 10.0, 2, 4, 768, dict(fps=50.0)),     # capped by total_frames
    (9, 30.0, 2, 4, 768, dict(fps=2.0)),        # min_frames 4 on a 9-frame clip
    (5, 30.0, 2, 4, 768, dict(fps=2.0)),        # total 5: cap floor(5/2)*2 = 4
    (3, 30.0, 2, 4, 768, dict(fps=2.0)),        # total 3 < min_frames: 2 frames
    (2, 24.0, 2, 4, 768, dict(fps=2.0)),        # shortest possible clip
    (1001, 30.0, 2, 4, 7, dict(fps=2.0)),       # odd max_frames -> 6
    (100000, 30.0, 2, 4, 768, dict(fps=2.0)),   # long video: max_frames
    (17665, 30.0, 2, 4, 768, dict(fps=2.0)),    # 768 frames; float32 rounding moves an index
    (90, 30.0, 3, 4, 768, dict(fps=2.0)),       # temporal_patch_size 3
    (250, 25.0, 2, 4, 768, dict(num_frames=6)),
    (250, 25.0, 2, 4, 768, dict(num_frames=5)),   # round(2.5) = 2 -> 4 (half to even)
    (250, 25.0, 2, 4, 768, dict(num_frames=7)),   # round(3.5) = 4 -> 8
    (250, 25.0, 2, 4, 768, dict(num_frames=3)),   # round(1.5) = 2 -> 4
    (250, None, 2, 4, 768, dict(num_frames=250)),  # no metadata fps needed
    (250, 25.0, 2, 4, 768, dict(num_frames=1000 // 4)),
    (100, 30.0, 2, 4, 768, dict(num_frames=58)),  # 58 of 100: another extra-element case
    (20000, 30.0, 2, 4, 768, dict(num_frames=2000)),  # no max_frames clip with num_frames
]


def test_sampling_matches_hf_cases(hf_video_cls):
  extras = 0
  for total, vfps, tp, lo, hi, kw in CASES:
    _, extra = _check_same(hf_video_cls, total, vfps, tp, lo, hi, **kw)
    extras += extra
  assert extras >= 3  # the out-of-range-extra path is exercised
  # Worked values (HF's arithmetic, by hand).
  assert qp.sample_frame_indices_qwen2_vl(280, 28.0).tolist() == list(range(0, 280, 14))
  assert qp.sample_frame_indices_qwen2_vl(250, 25.0, fps=0.5).tolist() == [0, 62, 125, 187]
  assert qp.sample_frame_indices_qwen2_vl(3, 30.0).tolist() == [0, 1]
  assert len(qp.sample_frame_indices_qwen2_vl(367, 23.976)) == 30
  assert len(qp.sample_frame_indices_qwen2_vl(250, None, None, 5)) == 4
  assert len(qp.sample_frame_indices_qwen2_vl(250, None, None, 7)) == 8
  # Every frame when neither fps nor num_frames (HF do_sample_frames=False).
  np.testing.assert_array_equal(qp.sample_frame_indices_qwen2_vl(7, 30.0, None), np.arange(7))


def test_sampling_matches_hf_sweep(hf_video_cls):
  rng = np.random.default_rng(0)
  n = 0
  for _ in range(700):
    total = int(rng.integers(1, 3000)) if rng.random() < 0.8 else int(rng.integers(3000, 400000))
    vfps = float(rng.choice([23.976, 24.0, 25.0, 29.97, 30.0, 60.0, float(rng.uniform(1, 120))]))
    tp = int(rng.choice([2, 2, 2, 1, 3]))
    lo = int(rng.integers(1, 9))
    hi = int(rng.integers(lo, 1000))
    if rng.random() < 0.75:
      kw = dict(fps=float(rng.choice([0.5, 1.0, 2.0, 4.0, float(rng.uniform(0.05, 30))])))
    else:
      kw = dict(num_frames=int(rng.integers(tp, max(tp + 1, min(total, 1500) + 1))))
    count = (round(kw["num_frames"] / tp) * tp if "num_frames" in kw else
             math.floor(min(max(total / vfps * kw["fps"], lo),
                            math.floor(min(hi, total) / tp) * tp, total) / tp) * tp)
    if count < 1 or count > total:
      continue  # error cases: see test_sampling_errors_match_hf
    _check_same(hf_video_cls, total, vfps, tp, lo, hi, **kw)
    n += 1
  assert n > 500


def test_sampling_errors_match_hf(hf_video_cls):
  # Both fps and num_frames: HF raises ValueError too.
  with pytest.raises(ValueError, match="mutually exclusive"):
    _hf_sample(hf_video_cls, 100, 25.0, fps=2.0, num_frames=8)
  with pytest.raises(ValueError, match="mutually exclusive"):
    qp.sample_frame_indices_qwen2_vl(100, 25.0, fps=2.0, num_frames=8)
  # More frames than the video has (103 -> round(51.5) * 2 = 104 > 100; 101 -> 100 is fine).
  with pytest.raises(ValueError, match="can't be sampled"):
    _hf_sample(hf_video_cls, 100, 25.0, num_frames=103)
  with pytest.raises(ValueError, match="can't be sampled: num_frames=103 rounds to 104 frames"):
    qp.sample_frame_indices_qwen2_vl(100, 25.0, fps=None, num_frames=103)
  _check_same(hf_video_cls, 100, 25.0, num_frames=101)
  # fps without the video's rate.
  with pytest.raises(ValueError, match="metadata"):
    _hf_sample(hf_video_cls, 100, None, fps=2.0)
  with pytest.raises(ValueError, match="frame rate"):
    qp.sample_frame_indices_qwen2_vl(100, None, fps=2.0)
  # A count that rounds to 0: HF divides by zero, we say why.
  for total, kw in [(1, dict(fps=2.0)), (100, dict(num_frames=1))]:
    with pytest.raises(ZeroDivisionError):
      _hf_sample(hf_video_cls, total, 30.0, **kw)
    with pytest.raises(ValueError, match="rounds down to 0"):
      qp.sample_frame_indices_qwen2_vl(total, 30.0, kw.get("fps"), kw.get("num_frames"))
  with pytest.raises(ValueError, match="rounds down to 0"):
    qp.sample_frame_indices_qwen2_vl(100, 30.0, max_frames=1)
  with pytest.raises(ValueError, match="no frames"):
    qp.sample_frame_indices_qwen2_vl(0, 30.0)
  # Config-level checks.
  with pytest.raises(ValueError, match="mutually exclusive"):
    dataclasses.replace(qp.QWEN2_5_VL_PROCESSOR, num_frames=8)
  with pytest.raises(ValueError, match="samples by fps only"):
    qp.QwenProcessorConfig(num_frames=8, fps=None)
  with pytest.raises(ValueError, match="frame_sampling must be"):
    qp.QwenProcessorConfig(frame_sampling="qwen25")
  with pytest.raises(ValueError, match="num_frames must be"):
    dataclasses.replace(qp.QWEN2_5_VL_PROCESSOR, fps=None, num_frames=0)


def test_default_config_matches_hf_class(hf_video_cls):
  cfg = qp.QWEN2_5_VL_PROCESSOR
  assert cfg.frame_sampling == "qwen2_vl" and qp.QWEN3_VL_PROCESSOR.frame_sampling == "qwen3"
  assert (cfg.min_frames, cfg.max_frames) == (hf_video_cls.min_frames, hf_video_cls.max_frames)
  assert cfg.temporal_patch_size == hf_video_cls.temporal_patch_size
  assert (cfg.patch_size, cfg.merge_size) == (hf_video_cls.patch_size, hf_video_cls.merge_size)
  assert cfg.video_min_pixels == hf_video_cls.size["shortest_edge"] == hf_video_cls.min_pixels
  assert cfg.video_max_pixels == hf_video_cls.size["longest_edge"] == hf_video_cls.max_pixels
  np.testing.assert_allclose(cfg.image_mean, hf_video_cls.image_mean)
  np.testing.assert_allclose(cfg.image_std, hf_video_cls.image_std)
  # HF's class does not sample by default (every frame); the processor assumes fps 2.0 for
  # second_per_grid_ts. Our default samples at that fps (documented on QWEN2_5_VL_PROCESSOR).
  assert hf_video_cls.do_sample_frames is False and hf_video_cls.fps is None
  assert cfg.fps == 2.0 and cfg.num_frames is None


# ------------------------------------------------------------------------------ end to end


class _PilVideoProcessor:
  """Stand-in for ``Qwen2VLVideoProcessor`` inside HF's ``Qwen2_5_VLProcessor``.

  Gets frames already sampled by HF's ``sample_frames`` + PyAV reader and patchifies them with the
  slow ``Qwen2VLImageProcessor`` video branch (same resize/normalise/flatten as the torchvision
  ``_preprocess``, PIL instead of torchvision resize).
  """

  def __init__(self, cfg):
    self.temporal_patch_size = cfg.temporal_patch_size
    self.merge_size = cfg.merge_size
    self.image_processor = transformers.Qwen2VLImageProcessor(
        patch_size=cfg.patch_size, temporal_patch_size=cfg.temporal_patch_size,
        merge_size=cfg.merge_size, image_mean=list(cfg.image_mean),
        image_std=list(cfg.image_std), min_pixels=cfg.video_min_pixels,
        max_pixels=cfg.video_max_pixels)

  def __call__(self, videos, **kwargs):
    return self.image_processor(images=None, videos=videos, return_tensors="np")


@pytest.fixture(scope="module")
def hf_tok():
  return transformers.Qwen2TokenizerFast(tokenizer_file=TOKENIZER, pad_token="<|endoftext|>",
                                         eos_token="<|im_end|>", unk_token=None, bos_token=None)


@pytest.mark.parametrize("clip,fps,num_frames", [
    (KINETICS, 2.0, None),  # the default config: 20 frames, second_per_grid_ts 1.0
    (BIKES, 0.5, None),     # 5 -> 4 frames, second_per_grid_ts 4.0
    (BIKES, None, 7),       # fixed count 7 -> 8 frames; HF's processor default fps 2.0 -> 1.0
])
def test_processor_matches_hf(clip, fps, num_frames, hf_video_cls, hf_tok):
  from transformers.video_utils import read_video_pyav
  cfg = dataclasses.replace(qp.QWEN2_5_VL_PROCESSOR, fps=fps, num_frames=num_frames)
  proc = qp.Qwen2_5_VLProcessor(cfg, qp.Qwen3Tokenizer())
  prompt = proc.apply_chat_template([{"role": "user", "content": [
      {"type": "video", "video": clip}, {"type": "text", "text": "What happens?"}]}])
  out = proc(text=prompt, videos=clip)

  # HF: its sample_frames + its PyAV reader.
  fake_self = types.SimpleNamespace(num_frames=None, fps=None, temporal_patch_size=2,
                                    min_frames=cfg.min_frames, max_frames=cfg.max_frames)
  sampler = partial(hf_video_cls.sample_frames, fake_self,
                    **({"fps": fps} if fps is not None else {"num_frames": num_frames}))
  hf_frames, meta = read_video_pyav(clip, sample_indices_fn=sampler)
  frames, ts = qp.load_video(clip, fps, cfg.min_frames, cfg.max_frames,
                             frame_sampling="qwen2_vl", num_frames=num_frames)
  assert frames.shape == hf_frames.shape and len(frames) % 2 == 0
  np.testing.assert_array_equal(frames, hf_frames)
  np.testing.assert_allclose(ts, np.asarray(meta.frames_indices[:len(frames)]) / meta.fps)

  # HF's Qwen2_5_VLProcessor.__call__ around the stand-in video processor (the processor's class
  # check is skipped: without torchvision its expected class is a dummy).
  with mock.patch.object(transformers.ProcessorMixin, "check_argument_for_proper_class",
                         lambda self, name, arg: type(arg)):
    hf_proc = transformers.Qwen2_5_VLProcessor(
        image_processor=transformers.Qwen2VLImageProcessor(), tokenizer=hf_tok,
        video_processor=_PilVideoProcessor(cfg))
  kwargs = {} if fps is None else {"fps": fps}
  ref = hf_proc(text=[prompt], videos=[list(hf_frames)], return_tensors="np", **kwargs)
  np.testing.assert_array_equal(out["video_grid_thw"], ref["video_grid_thw"])
  assert out["pixel_values_videos"].shape == ref["pixel_values_videos"].shape
  assert out["pixel_values_videos"].dtype == np.float32
  diff = float(np.abs(out["pixel_values_videos"] - ref["pixel_values_videos"]).max())
  assert diff <= 1e-5, diff
  np.testing.assert_array_equal(out["input_ids"], ref["input_ids"])
  np.testing.assert_array_equal(out["attention_mask"], ref["attention_mask"])
  want = cfg.temporal_patch_size / (fps if fps is not None else 2.0)
  assert out["second_per_grid_ts"].dtype == np.float32 and out["second_per_grid_ts"].shape == (1,)
  np.testing.assert_array_equal(out["second_per_grid_ts"],
                                np.asarray(ref["second_per_grid_ts"], np.float32))
  assert float(out["second_per_grid_ts"][0]) == want
  assert int(out["video_grid_thw"][0, 0]) == len(frames) // 2


def test_processor_bad_request_raises(hf_video_cls):
  from transformers.video_utils import read_video_pyav
  cfg = dataclasses.replace(qp.QWEN2_5_VL_PROCESSOR, fps=None, num_frames=300)  # bikes: 250
  proc = qp.Qwen2_5_VLProcessor(cfg, qp.Qwen3Tokenizer())
  with pytest.raises(ValueError, match="can't be sampled"):
    proc(videos=BIKES)
  fake_self = types.SimpleNamespace(num_frames=None, fps=None, temporal_patch_size=2,
                                    min_frames=4, max_frames=768)
  with pytest.raises(ValueError, match="can't be sampled"):
    read_video_pyav(BIKES, sample_indices_fn=partial(hf_video_cls.sample_frames, fake_self,
                                                     num_frames=300))
  with pytest.raises(ValueError, match="samples by fps only"):
    qp.load_video(BIKES, None)
