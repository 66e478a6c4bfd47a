"""Qwen2.5-VL greedy generation with ``vlm.inference.generate`` equals HF ``generate`` (float32,
tiny random model loaded with ``vlm.load_pretrained``; left-padded batch with two images and a
video, window ViT, sectioned MRoPE with the video time index from ``second_per_grid_ts``)."""
import numpy as np
import torch

from transformers import Qwen2_5_VLConfig as HF25Config, Qwen2_5_VLForConditionalGeneration

import vlm
from tests.equivalence.qwen_hf_utils import randomize_hf
from vlm.inference.generate import generate
from vlm.models.qwen3_vl import Qwen2_5_VL

IMG, VID, VS, VE, PAD, EOS = 250, 251, 252, 253, 0, 254
NEW = 12


def test_qwen2_5_vl_greedy_matches_hf(tmp_path):
  torch.manual_seed(0)
  vision = dict(depth=2, hidden_size=32, num_heads=2, intermediate_size=64, out_hidden_size=64,
                patch_size=8, temporal_patch_size=2, spatial_merge_size=2, window_size=32,
                fullatt_block_indexes=[1], tokens_per_second=2)
  text = dict(vocab_size=256, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
              num_attention_heads=4, num_key_value_heads=2, rms_norm_eps=1e-6,
              rope_theta=10000.0, max_position_embeddings=256,
              rope_scaling={"type": "mrope", "mrope_section": [2, 3, 3]})
  cfg = HF25Config(vision_config=vision, text_config=text, image_token_id=IMG,
                   video_token_id=VID, vision_start_token_id=VS, vision_end_token_id=VE)
  cfg._attn_implementation = "eager"
  hf = randomize_hf(Qwen2_5_VLForConditionalGeneration(cfg), 3)
  hf.save_pretrained(tmp_path, safe_serialization=True)

  rng = np.random.RandomState(1)
  txt = lambda n: list(rng.randint(1, 200, size=n))
  blk = lambda g, tok: [VS] + [tok] * (int(np.prod(g)) // 4) + [VE]
  grids, vgrids = np.array([[1, 6, 8], [1, 2, 4]]), np.array([[2, 4, 4]])
  rows = [txt(2) + blk(grids[0], IMG) + txt(2) + blk(grids[1], IMG) + txt(2),
          txt(1) + blk(vgrids[0], VID) + txt(3)]
  n = max(map(len, rows))
  ids = np.full((2, n), PAD, np.int64)
  mask = np.zeros((2, n), np.int64)
  for i, r in enumerate(rows):
    ids[i, n - len(r):], mask[i, n - len(r):] = r, 1
  n_img = int(np.prod(grids, axis=1).sum())
  px = rng.standard_normal((n_img + int(np.prod(vgrids)), 3 * 2 * 64)).astype(np.float32)
  secs = np.array([1.0], np.float32)
  with torch.no_grad():
    want = hf.generate(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask),
                       pixel_values=torch.tensor(px[:n_img]), image_grid_thw=torch.tensor(grids),
                       pixel_values_videos=torch.tensor(px[n_img:]),
                       video_grid_thw=torch.tensor(vgrids),
                       second_per_grid_ts=torch.tensor(secs), do_sample=False,
                       max_new_tokens=NEW, eos_token_id=EOS, pad_token_id=PAD).numpy()
  want = want[:, n:]
  want = np.pad(want, ((0, 0), (0, NEW - want.shape[1])), constant_values=PAD)

  model, params, processor = vlm.load_pretrained(tmp_path)
  assert isinstance(model, Qwen2_5_VL) and processor.config.patch_size == 8
  batch = dict(input_ids=ids, attention_mask=mask, pixel_values=px[:n_img], image_grid_thw=grids,
               pixel_values_videos=px[n_img:], video_grid_thw=vgrids, second_per_grid_ts=secs)
  got = generate(model, params, batch, max_new_tokens=NEW, eos_token_ids=EOS, pad_token_id=PAD)
  print("hf ", want.tolist())
  print("vlm", got.tolist())
  np.testing.assert_array_equal(got, want)
