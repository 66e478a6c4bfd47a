"""Packing of tokenised Qwen3-VL samples (vlm.data.packing): segment ids, per-segment MRoPE
positions, labels inside segments, the per-row patch buffer and visual_token_index."""
import functools
import os
import tempfile

import chex
import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image

from vlm.data import conversations as conv
from vlm.data import packing
from vlm.data.qwen_batch import QwenSampleEncoder, processor_config_for
from vlm.models.qwen_presets import qwen_config

L, NP = 160, 96


@functools.lru_cache(maxsize=None)
def _setup():
  """Tiny-budget encoder and three samples: two images (different sizes) in one conversation, a
  text-only multi-turn conversation, one real video clip."""
  mc = qwen_config("qwen3_vl_tiny")
  cfg = processor_config_for(mc, dict(min_pixels=32 * 32, max_pixels=64 * 64,
                                      video_min_pixels=32 * 32, video_max_pixels=4 * 64 * 64,
                                      max_frames=4))
  enc = QwenSampleEncoder(mc, cfg, max_length=L, max_patches=NP)
  d = tempfile.mkdtemp(prefix="vlm-pack-")
  rng = np.random.default_rng(0)
  paths = []
  for i, (h, w) in enumerate([(64, 64), (40, 90)]):
    p = os.path.join(d, f"{i}.png")
    Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(p)
    paths.append(p)
  a = conv.Sample(messages=({"role": "user", "content": "<image>What is it?<image>"},
                            {"role": "assistant", "content": "Two photos."}),
                  images=tuple(paths), where="a")
  b = conv.Sample(messages=({"role": "system", "content": "Be brief."},
                            {"role": "user", "content": "Hello"},
                            {"role": "assistant", "content": "Hi there."},
                            {"role": "user", "content": "Bye"},
                            {"role": "assistant", "content": "Bye!"}), where="b")
  c = conv.Sample(messages=({"role": "user", "content": "<video>\nWhat happens?"},
                            {"role": "assistant", "content": "Bikes pass by."}),
                  videos=("data/video/bikes.mp4",), where="c")
  return enc, (a, b, c)


@pytest.fixture
def encoder():
  return _setup()[0]


@pytest.fixture
def samples():
  return _setup()[1]


def test_first_fit_is_deterministic_and_respects_both_budgets():
  rows, left = packing.first_fit([5, 5, 3, 8, 2], [4, 8, 0, 0, 4], num_rows=2, max_length=10,
                                 max_patches=8)
  assert rows == [[0, 2, 4], [1]]
  assert left == [3]
  with pytest.raises(ValueError, match="exceeds an empty row"):
    packing.first_fit([11], [0], num_rows=1, max_length=10, max_patches=8)


def _batch(encoder, samples):
  toks = [encoder.encode(s) for s in samples]
  batch = packing.assemble_batch([toks[:2], toks[2:]], max_length=L, max_patches=NP,
                                 vision_config=encoder.model_config.vision,
                                 pad_token_id=encoder.tokenizer.pad_token_id)
  return toks, batch


def test_schema_shapes_and_padding(encoder, samples):
  toks, batch = _batch(encoder, samples)
  f = encoder.model_config.vision.patch_dim
  chex.assert_shape(batch["input_ids"], (2, L))
  chex.assert_shape(batch["position_ids"], (3, 2, L))
  chex.assert_shape(batch["pixel_values"], (2, NP, f))
  chex.assert_shape(batch["vision"]["pos_embed_index"], (2, 4, NP))
  assert batch["input_ids"].dtype == np.int32 and batch["loss_mask"].dtype == np.float32
  seg = batch["segment_ids"]
  n0 = toks[0].num_tokens + toks[1].num_tokens
  assert (seg[0, :toks[0].num_tokens] == 1).all() and (seg[0, toks[0].num_tokens:n0] == 2).all()
  pad = seg == 0
  assert pad[0, n0:].all() and pad[1, toks[2].num_tokens:].all()
  assert (batch["input_ids"][pad] == encoder.tokenizer.pad_token_id).all()
  for key in ("labels", "loss_mask"):
    assert (batch[key][pad] == 0).all()
  assert (batch["position_ids"][:, pad] == 0).all()
  assert (batch["visual_token_index"][pad] == -1).all()
  p0 = toks[0].num_patches + toks[1].num_patches
  assert (batch["pixel_values"][0, p0:] == 0).all() and (batch["vision"]["segment_ids"][0, p0:]
                                                         == 0).all()
  assert packing.packing_efficiency(batch) == pytest.approx(
      (n0 + toks[2].num_tokens) / (2 * L))


def test_second_segment_positions_restart(encoder, samples):
  toks, batch = _batch(encoder, samples)
  n = toks[0].num_tokens
  pos = batch["position_ids"][:, 0]
  assert (pos[:, n] == 0).all(), "segment 2 starts at position 0 on all three MRoPE rows"
  np.testing.assert_array_equal(pos[:, :n], toks[0].position_ids)
  np.testing.assert_array_equal(pos[:, n:n + toks[1].num_tokens], toks[1].position_ids)
  # the video sample keeps its own (timestamped, per-temporal-patch) positions
  np.testing.assert_array_equal(batch["position_ids"][:, 1, :toks[2].num_tokens],
                                toks[2].position_ids)
  assert toks[2].position_ids[0, 0] == 0


def test_labels_never_cross_segments(encoder, samples):
  toks, batch = _batch(encoder, samples)
  seg, ids, labels, mask = (batch[k] for k in ("segment_ids", "input_ids", "labels", "loss_mask"))
  for b in range(2):
    for t in range(L - 1):
      if seg[b, t] and seg[b, t + 1] == seg[b, t]:
        assert labels[b, t] == ids[b, t + 1]
      else:
        assert labels[b, t] == 0 and mask[b, t] == 0, (b, t)
  # loss_mask at t is the target mask of token t + 1 of the same sample
  n = toks[0].num_tokens
  np.testing.assert_array_equal(mask[0, :n - 1], toks[0].target_mask[1:])
  np.testing.assert_array_equal(mask[0, n:n + toks[1].num_tokens - 1], toks[1].target_mask[1:])


class VisualTokenIndexTest(chex.TestCase):

  @chex.variants(with_jit=True, without_jit=True)
  def test_visual_token_index_gathers_each_segments_features(self):
    """Merged feature r of a row = its patch rows 4r..4r+3; gathering by visual_token_index (as
    the model does, under jit and not) gives every placeholder the features of its own sample."""
    enc, smp = _setup()
    toks, batch = _batch(enc, smp)
    unit = enc.model_config.vision.spatial_merge_size ** 2

    @self.variant
    def gather(pixels, index):
      merged = pixels.reshape(pixels.shape[0], -1, unit * pixels.shape[-1])
      return jnp.take_along_axis(merged, jnp.maximum(index, 0)[..., None], axis=1)

    got = np.asarray(gather(jnp.asarray(batch["pixel_values"]),
                            jnp.asarray(batch["visual_token_index"])))
    layout = [(0, 0, toks[0]), (0, toks[0].num_tokens, toks[1]), (1, 0, toks[2])]
    for b, t0, tok in layout:
      vi = tok.visual_index
      sl = slice(t0, t0 + tok.num_tokens)
      seg_vi = batch["visual_token_index"][b, sl]
      n_visual = int(np.prod(tok.grid_thw, axis=1).sum()) // unit if len(tok.grid_thw) else 0
      assert (seg_vi >= 0).sum() == n_visual
      own = tok.pixel_values.reshape(-1, unit * tok.pixel_values.shape[-1])
      chex.assert_trees_all_close(got[b, sl][vi >= 0], own[vi[vi >= 0]])


def test_vision_tables_cover_the_rows_grids(encoder, samples):
  toks, batch = _batch(encoder, samples)
  seg = batch["vision"]["segment_ids"]
  # row 0: two images (sample a) -> vision segments 1, 2; text-only b adds none
  assert sorted(set(seg[0].tolist()) - {0}) == [1, 2]
  # row 1: a video with t temporal patches -> t vision segments
  t = int(toks[2].grid_thw[0, 0])
  assert sorted(set(seg[1].tolist()) - {0}) == list(range(1, t + 1))


def test_row_without_images_and_overflow_errors(encoder, samples):
  toks = [encoder.encode(s) for s in samples]
  vis = encoder.model_config.vision
  batch = packing.assemble_batch([[toks[1]], []], max_length=L, max_patches=NP,
                                 vision_config=vis, pad_token_id=0)
  assert (batch["pixel_values"] == 0).all() and (batch["vision"]["segment_ids"] == 0).all()
  assert (batch["segment_ids"][1] == 0).all()
  with pytest.raises(ValueError, match="overflows"):
    packing.assemble_batch([[toks[0]] * 6], max_length=L, max_patches=NP, vision_config=vis,
                           pad_token_id=0)
  empty = packing.empty_batch(2, L, NP, vis)
  assert {k: v.shape for k, v in empty.items() if k != "vision"} == {
      k: v.shape for k, v in batch.items() if k != "vision"}
