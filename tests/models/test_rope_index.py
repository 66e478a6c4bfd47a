"""vlm.models.rope_index against HF ``get_rope_index`` (transformers 4.57.1).

HF's method only reads ``self.config``; it is called unbound on a holder of a real HF config, so no
model is built.
"""
import types

import numpy as np
import pytest
import torch
from transformers.models.qwen2_5_vl.configuration_qwen2_5_vl import Qwen2_5_VLConfig
from transformers.models.qwen2_5_vl.modeling_qwen2_5_vl import Qwen2_5_VLModel
from transformers.models.qwen3_vl.configuration_qwen3_vl import Qwen3VLConfig
from transformers.models.qwen3_vl.modeling_qwen3_vl import Qwen3VLModel

from vlm.models.rope_index import qwen2_5_vl_get_rope_index, qwen3_vl_get_rope_index

IMG, VID, VS, VE, PAD = 250, 251, 252, 253, 0
Q3 = types.SimpleNamespace(config=Qwen3VLConfig(image_token_id=IMG, video_token_id=VID,
                                                vision_start_token_id=VS))
Q25 = types.SimpleNamespace(config=Qwen2_5_VLConfig(image_token_id=IMG, video_token_id=VID,
                                                    vision_start_token_id=VS,
                                                    vision_config={"tokens_per_second": 2}))


def _block(token, grid):
  t, h, w = grid
  return [VS] + [token] * (t * h * w // 4) + [VE]


def _video_q3(grid, ts_len=3):
  """Qwen3-VL video: per temporal patch, timestamp text + its own vision block."""
  t, h, w = grid
  out = []
  for k in range(t):
    out += [10 + k] * ts_len + _block(VID, (1, h, w))
  return out


def _batch(rows, left=True):
  n = max(len(r) for r in rows)
  ids = np.full((len(rows), n), PAD, np.int64)
  mask = np.zeros((len(rows), n), np.int64)
  for i, r in enumerate(rows):
    sl = slice(n - len(r), n) if left else slice(0, len(r))
    ids[i, sl] = r
    mask[i, sl] = 1
  return ids, mask


def _t(x):
  return None if x is None else torch.as_tensor(np.asarray(x))


def _check_q3(ids, mask, img, vid):
  want_pos, want_d = Qwen3VLModel.get_rope_index(Q3, _t(ids), _t(img), _t(vid), _t(mask))
  got_pos, got_d = qwen3_vl_get_rope_index(ids, img, vid, mask, 2, IMG, VID, VS)
  np.testing.assert_array_equal(got_pos, want_pos.numpy())
  np.testing.assert_array_equal(got_d, want_d.numpy())
  return got_pos


def test_text_only():
  ids, mask = _batch([[1, 2, 3, 4, 5], [6, 7]])
  _check_q3(ids, mask, None, None)
  _check_q3(ids, None, None, None)


def test_spec_worked_example():
  ids = np.array([[1, 2] + _block(IMG, (1, 4, 6)) + [3, 4]])
  pos = _check_q3(ids, None, np.array([[1, 4, 6]]), None)
  np.testing.assert_array_equal(pos[:, 0], [[0, 1, 2, 3, 3, 3, 3, 3, 3, 6, 7, 8],
                                            [0, 1, 2, 3, 3, 3, 4, 4, 4, 6, 7, 8],
                                            [0, 1, 2, 3, 4, 5, 3, 4, 5, 6, 7, 8]])


@pytest.mark.parametrize("left", [True, False])
def test_two_images_video_mixed_padding(left):
  g1, g2, gv, g3 = (1, 4, 6), (1, 2, 2), (2, 4, 4), (1, 6, 4)
  rows = [[1, 2] + _block(IMG, g1) + [3] + _block(IMG, g2) + [4, 5],      # two images
          [6] + _video_q3(gv) + [7],                                      # one video
          [8] + _block(IMG, g3) + [9] + _video_q3((1, 2, 4), 2) + [5]]    # mixed
  ids, mask = _batch(rows, left)
  img = np.array([g1, g2, g3])
  vid = np.array([gv, (1, 2, 4)])
  _check_q3(ids, mask, img, vid)


def test_video_spec_example():
  ids = np.array([[1] + _video_q3((2, 4, 4)) + [2]])
  pos = _check_q3(ids, None, None, np.array([[2, 4, 4]]))
  np.testing.assert_array_equal(pos[0, 0], [0, 1, 2, 3, 4, 5, 5, 5, 5, 7, 8, 9, 10, 11, 12, 12,
                                            12, 12, 14, 15])


@pytest.mark.parametrize("secs,hf_int", [(None, False), ([1.0, 2.0], False), ([0.5, 1.5], True)])
def test_qwen2_5(secs, hf_int):
  rows = [[1] + _block(IMG, (1, 4, 6)) + [2] + _block(VID, (3, 4, 4)) + [3],
          [4, 5] + _block(VID, (2, 2, 4)) + [6]]
  ids, mask = _batch(rows)
  img, vid = np.array([[1, 4, 6]]), np.array([[3, 4, 4], [2, 2, 4]])
  want_pos, want_d = Qwen2_5_VLModel.get_rope_index(
      Q25, _t(ids), _t(img), _t(vid), None if secs is None else torch.tensor(secs), _t(mask))
  got_pos, got_d = qwen2_5_vl_get_rope_index(ids, img, vid, mask, 2, IMG, VID, VS, secs, 2,
                                             hf_int_seconds=hf_int)
  np.testing.assert_array_equal(got_pos, want_pos.numpy())
  np.testing.assert_array_equal(got_d, want_d.numpy())


def test_qwen2_5_float_seconds():
  ids = np.array([[1] + _block(VID, (3, 4, 4)) + [2]])
  pos, _ = qwen2_5_vl_get_rope_index(ids, None, [[3, 4, 4]], None, 2, IMG, VID, VS, [0.5], 2)
  np.testing.assert_array_equal(pos[0, 0, 2::4][:3], [2, 3, 4])


def test_errors():
  ids = np.array([[1] + _block(IMG, (1, 4, 4))])
  with pytest.raises(ValueError, match="more image blocks"):
    qwen3_vl_get_rope_index(ids, None, [[1, 2, 2]], None, 2, IMG, VID, VS)
  with pytest.raises(ValueError, match="overrun"):
    qwen3_vl_get_rope_index(ids, [[1, 8, 8]], None, None, 2, IMG, VID, VS)
  with pytest.raises(ValueError, match=r"\[N, 3\]"):
    qwen3_vl_get_rope_index(ids, [1, 4, 4], None, None, 2, IMG, VID, VS)


def test_visual_token_index_and_decode_positions():
  from vlm.models.qwen3_vl import decode_position_ids, visual_token_index
  ids = np.array([[PAD, 1, VS, IMG, IMG, VE, VS, VID, VE],
                  [1, VS, IMG, VE, 2, VS, VID, VID, VE]])
  idx = visual_token_index(ids, IMG, VID, image_grid_thw=[[1, 4, 2], [1, 2, 2]],
                           video_grid_thw=[[1, 2, 2], [2, 2, 2]])
  np.testing.assert_array_equal(idx, [[-1, -1, -1, 0, 1, -1, -1, 3, -1],
                                      [-1, -1, 2, -1, -1, -1, 4, 5, -1]])
  idx = visual_token_index(ids, IMG, VID, video_offset=8)
  assert idx[0, 7] == 8 and idx[1, 7] == 10
  with pytest.raises(ValueError, match="3 image placeholder tokens but image_grid_thw needs 4"):
    visual_token_index(ids, IMG, VID, image_grid_thw=[[1, 4, 4]])
  pos = decode_position_ids(np.array([[-3], [2]]), 9, 2)
  assert pos.shape == (3, 2, 2)
  np.testing.assert_array_equal(pos[1], [[6, 7], [11, 12]])
