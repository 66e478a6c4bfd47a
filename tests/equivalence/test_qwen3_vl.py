"""Qwen3-VL / Qwen3-VL-MoE end to end against HF transformers 4.57.1 (float32, tiny random configs).

A tiny random ``Qwen3VLForConditionalGeneration`` (and ``Qwen3VLMoeForConditionalGeneration``) is
saved with ``save_pretrained``; ``load_hf_qwen3_vl`` reads it, and vlm's logits (host position ids,
packed vision call, placeholder gather, DeepStack, interleaved MRoPE) must match HF's on a
left-padded batch holding three images of different sizes. ``save_hf_qwen3_vl`` must write a
directory that HF loads to the same weights and that vlm reads back identically.
"""
import dataclasses

import numpy as np
import pytest
import torch

import jax
import jax.numpy as jnp

from transformers import Qwen3VLConfig as HFConfig, Qwen3VLForConditionalGeneration
from transformers import Qwen3VLMoeConfig as HFMoeConfig, Qwen3VLMoeForConditionalGeneration

from tests.equivalence.qwen_hf_utils import randomize_hf
from vlm.convert.hf_qwen3_vl import load_hf_qwen3_vl, save_hf_qwen3_vl
from vlm.models.qwen3_vl import Qwen3VL, decode_position_ids, init_cache, visual_token_index
from vlm.models.qwen_vit import vision_inputs
from vlm.models.rope_index import qwen3_vl_get_rope_index

TOL = 1e-5
IMG, VID, VS, VE, PAD = 250, 251, 252, 253, 0
VISION = dict(depth=2, hidden_size=32, num_heads=2, intermediate_size=64, out_hidden_size=64,
              deepstack_visual_indexes=[0, 1], num_position_embeddings=16, patch_size=8,
              temporal_patch_size=2, spatial_merge_size=2)
TEXT = dict(vocab_size=256, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2, head_dim=16, rms_norm_eps=1e-6,
            rope_theta=10000.0, max_position_embeddings=256,
            rope_scaling={"rope_type": "default", "mrope_section": [4, 2, 2],
                          "mrope_interleaved": True})
MOE = dict(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32, decoder_sparse_step=1)
GRIDS = np.array([[1, 4, 6], [1, 4, 4], [1, 2, 4]])   # 6, 4 and 2 merged tokens
VGRIDS = np.array([[2, 4, 4]])                         # 2 frame groups of 4 merged tokens


def _hf_model(moe):
  torch.manual_seed(0)
  if moe:
    cfg = HFMoeConfig(vision_config=VISION, text_config={**TEXT, **MOE}, image_token_id=IMG,
                      video_token_id=VID, vision_start_token_id=VS, vision_end_token_id=VE)
    cls = Qwen3VLMoeForConditionalGeneration
  else:
    cfg = HFConfig(vision_config=VISION, text_config=TEXT, image_token_id=IMG,
                   video_token_id=VID, vision_start_token_id=VS, vision_end_token_id=VE)
    cls = Qwen3VLForConditionalGeneration
  cfg._attn_implementation = "eager"
  return randomize_hf(cls(cfg), 1 + moe)


def _inputs():
  """Row 0: two images (4x6, 4x4 patches); row 1 (left padded): one 2x4 image, then a video of
  two frame groups, each behind its own timestamp text (Qwen3-VL processor layout)."""
  rng = np.random.RandomState(0)
  txt = lambda n: list(rng.randint(1, 200, size=n))
  blk = lambda g, tok=IMG: [VS] + [tok] * (int(np.prod(g)) // 4) + [VE]
  t, h, w = VGRIDS[0]
  video = sum((txt(2) + blk((1, h, w), VID) for _ in range(t)), [])
  rows = [txt(3) + blk(GRIDS[0]) + txt(2) + blk(GRIDS[1]) + txt(3),
          txt(2) + blk(GRIDS[2]) + txt(1) + video + txt(2)]
  n = max(map(len, rows))
  ids = np.full((2, n), PAD, np.int64)
  mask = np.zeros((2, n), np.int64)
  for i, r in enumerate(rows):
    ids[i, n - len(r):] = r
    mask[i, n - len(r):] = 1
  patch_dim = 3 * 2 * VISION["patch_size"] ** 2
  n_img, n_vid = int(np.prod(GRIDS, axis=1).sum()), int(np.prod(VGRIDS, axis=1).sum())
  pixels = rng.standard_normal((n_img + n_vid, patch_dim)).astype(np.float32)
  return ids, mask, pixels[:n_img], pixels[n_img:]


@pytest.mark.parametrize("moe", [False, True], ids=["dense", "moe"])
def test_logits_and_round_trip(tmp_path, moe):
  hf = _hf_model(moe)
  hf.save_pretrained(tmp_path / "hf", safe_serialization=True)
  ids, mask, img_px, vid_px = _inputs()
  with torch.no_grad():
    want = hf(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask),
              pixel_values=torch.tensor(img_px), image_grid_thw=torch.tensor(GRIDS),
              pixel_values_videos=torch.tensor(vid_px),
              video_grid_thw=torch.tensor(VGRIDS)).logits.numpy()

  config, params = load_hf_qwen3_vl(str(tmp_path / "hf"))
  assert (config.text.num_experts > 0) == moe
  pos, _ = qwen3_vl_get_rope_index(ids, GRIDS, VGRIDS, mask, 2, IMG, VID, VS)
  # one packed vision call: images, then videos (visual_token_index numbers them that way)
  tables = vision_inputs(config.vision, np.concatenate([GRIDS, VGRIDS]))
  index = visual_token_index(ids, IMG, VID, image_grid_thw=GRIDS, video_grid_thw=VGRIDS)
  model = Qwen3VL(config)
  apply = jax.jit(model.apply)
  got, _ = apply({"params": params}, jnp.asarray(ids, jnp.int32), jnp.asarray(pos, jnp.int32),
                 jnp.asarray(mask, bool), jnp.asarray(np.concatenate([img_px, vid_px])), tables,
                 jnp.asarray(index))
  real = mask.astype(bool)
  err = float(np.abs(np.asarray(got)[real] - want[real]).max())
  print(f"qwen3_vl{'_moe' if moe else ''} logits max abs err {err:.2e}")
  assert err <= TOL

  # prefill all but the last 2 tokens into a KV cache, then decode them one by one (MoE: the
  # decode steps route through the "gather" expert path, as "auto" does for small batches)
  if moe:
    model = Qwen3VL(dataclasses.replace(config, text=dataclasses.replace(
        config.text, moe_implementation="gather")))
  n = ids.shape[1] - 2
  p_pos, deltas = qwen3_vl_get_rope_index(ids[:, :n], GRIDS, VGRIDS, mask[:, :n], 2, IMG, VID,
                                          VS)
  cache = init_cache(config.text, ids.shape[0], ids.shape[1])
  _, cache = apply({"params": params}, jnp.asarray(ids[:, :n], jnp.int32),
                   jnp.asarray(p_pos, jnp.int32), jnp.asarray(mask[:, :n], bool),
                   jnp.asarray(np.concatenate([img_px, vid_px])), tables,
                   jnp.asarray(index[:, :n]), cache, 0)
  step = jax.jit(lambda p, i, q, m, c, ci: model.apply(p, i, q, m, kv_cache=c, cache_index=ci))
  for s in range(n, ids.shape[1]):
    d_pos = decode_position_ids(deltas, s, 1)
    np.testing.assert_array_equal(d_pos, pos[:, :, s:s + 1])
    out, cache = step({"params": params}, jnp.asarray(ids[:, s:s + 1], jnp.int32),
                      jnp.asarray(d_pos, jnp.int32), jnp.asarray(mask[:, s:s + 1], bool),
                      cache, s)
    err_d = float(np.abs(np.asarray(out)[:, 0] - want[:, s]).max())
    print(f"decode step {s} max abs err {err_d:.2e}")
    assert err_d <= TOL

  # vlm -> HF directory -> HF weights identical; and back to vlm identically.
  save_hf_qwen3_vl(config, params, str(tmp_path / "vlm"))
  cls = type(hf)
  hf2 = cls.from_pretrained(tmp_path / "vlm")
  sd1, sd2 = hf.state_dict(), hf2.state_dict()
  assert sorted(sd1) == sorted(sd2)
  for k in sd1:
    np.testing.assert_array_equal(sd1[k].numpy(), sd2[k].numpy(), err_msg=k)
  config2, params2 = load_hf_qwen3_vl(str(tmp_path / "vlm"))
  assert config2 == config
  jax.tree_util.tree_map(np.testing.assert_array_equal, params, params2)

  # scanned decoder and vision tower through the public entry: stacked params, same logits,
  # same HF export
  import vlm
  model_s, params_s, _ = vlm.load_pretrained(tmp_path / "hf", scan_layers=True, remat=True,
                                             scan_vision=True)
  assert model_s.scan_layers and model_s.remat and model_s.scan_vision
  assert "layers" in params_s["language_model"] and "layers_0" not in params_s["language_model"]
  assert "blocks" in params_s["visual"] and "blocks_0" not in params_s["visual"]
  got_s, _ = jax.jit(model_s.apply)({"params": params_s}, jnp.asarray(ids, jnp.int32),
                                    jnp.asarray(pos, jnp.int32), jnp.asarray(mask, bool),
                                    jnp.asarray(np.concatenate([img_px, vid_px])), tables,
                                    jnp.asarray(index))
  err_s = float(np.abs(np.asarray(got_s)[real] - want[real]).max())
  print(f"scanned logits max abs err {err_s:.2e}")
  assert err_s <= TOL
  save_hf_qwen3_vl(config, params_s, str(tmp_path / "vlm_scan"))
  _, params3 = load_hf_qwen3_vl(str(tmp_path / "vlm_scan"))
  jax.tree_util.tree_map(np.testing.assert_array_equal, params, params3)


def test_key_errors(tmp_path):
  from safetensors.numpy import load_file, save_file
  hf = _hf_model(False)
  hf.save_pretrained(tmp_path, safe_serialization=True)
  state = load_file(str(tmp_path / "model.safetensors"))
  state["model.visual.extra.weight"] = np.zeros(3, np.float32)
  del state["model.language_model.norm.weight"]
  save_file(state, str(tmp_path / "model.safetensors"), metadata={"format": "pt"})
  with pytest.raises(ValueError, match=r"unknown checkpoint keys: model\.visual\.extra\.weight.*"
                                       r"missing from the checkpoint: language_model/norm/scale"):
    load_hf_qwen3_vl(str(tmp_path))


def test_qwen2_5_vl(tmp_path):
  """Qwen2.5-VL: window ViT, Qwen2 text (q/k/v bias), sectioned MRoPE with the video time index,
  no DeepStack; HF's saved layout loads, and vlm's saved directory loads back into HF."""
  from transformers import Qwen2_5_VLConfig as HF25Config, Qwen2_5_VLForConditionalGeneration
  from vlm.models.qwen3_vl import Qwen2_5_VL, Qwen2_5_VLConfig
  from vlm.models.rope_index import qwen2_5_vl_get_rope_index

  torch.manual_seed(0)
  vision = dict(depth=2, hidden_size=32, num_heads=2, intermediate_size=64, out_hidden_size=64,
                patch_size=8, temporal_patch_size=2, spatial_merge_size=2, window_size=32,
                fullatt_block_indexes=[1], tokens_per_second=2)
  text = {k: v for k, v in TEXT.items() if k not in ("head_dim", "rope_scaling")}
  text["rope_scaling"] = {"type": "mrope", "mrope_section": [2, 3, 3]}
  hf_cfg = HF25Config(vision_config=vision, text_config=text, image_token_id=IMG,
                      video_token_id=VID, vision_start_token_id=VS, vision_end_token_id=VE)
  hf_cfg._attn_implementation = "eager"
  hf = randomize_hf(Qwen2_5_VLForConditionalGeneration(hf_cfg), 3)
  hf.save_pretrained(tmp_path / "hf", safe_serialization=True)

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
  n_img, n_vid = int(np.prod(grids, axis=1).sum()), int(np.prod(vgrids, axis=1).sum())
  px = rng.standard_normal((n_img + n_vid, 3 * 2 * 64)).astype(np.float32)
  secs = [1.0]
  with torch.no_grad():
    want = hf(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask),
              pixel_values=torch.tensor(px[:n_img]), image_grid_thw=torch.tensor(grids),
              pixel_values_videos=torch.tensor(px[n_img:]), video_grid_thw=torch.tensor(vgrids),
              second_per_grid_ts=torch.tensor(secs)).logits.numpy()

  config, params = load_hf_qwen3_vl(str(tmp_path / "hf"))
  assert isinstance(config, Qwen2_5_VLConfig) and not config.text.use_qk_norm
  pos, _ = qwen2_5_vl_get_rope_index(ids, grids, vgrids, mask, 2, IMG, VID, VS, secs,
                                     config.vision.tokens_per_second)
  tables = vision_inputs(config.vision, np.concatenate([grids, vgrids]))
  index = visual_token_index(ids, IMG, VID, image_grid_thw=grids, video_grid_thw=vgrids)
  got, _ = jax.jit(Qwen2_5_VL(config).apply)(
      {"params": params}, jnp.asarray(ids, jnp.int32), jnp.asarray(pos, jnp.int32),
      jnp.asarray(mask, bool), jnp.asarray(px), tables, jnp.asarray(index))
  real = mask.astype(bool)
  err = float(np.abs(np.asarray(got)[real] - want[real]).max())
  print(f"qwen2_5_vl logits max abs err {err:.2e}")
  assert err <= TOL

  save_hf_qwen3_vl(config, params, str(tmp_path / "vlm"))
  hf2 = Qwen2_5_VLForConditionalGeneration.from_pretrained(tmp_path / "vlm")
  sd1, sd2 = hf.state_dict(), hf2.state_dict()
  assert sorted(sd1) == sorted(sd2)
  for k in sd1:
    np.testing.assert_array_equal(sd1[k].numpy(), sd2[k].numpy(), err_msg=k)


def test_bfloat16_sharded_round_trip(tmp_path):
  """bf16 checkpoints (the released dtype) load bit-exactly through the own safetensors reader,
  and a sharded bf16 save loads back into HF unchanged."""
  hf = _hf_model(False).to(torch.bfloat16)
  hf.save_pretrained(tmp_path / "hf", safe_serialization=True, max_shard_size="100KB")
  assert (tmp_path / "hf" / "model.safetensors.index.json").exists()
  config, params = load_hf_qwen3_vl(str(tmp_path / "hf"), dtype=jnp.bfloat16)
  q = params["language_model"]["layers_1"]["self_attn"]["q_proj"]["kernel"]
  assert q.dtype == jnp.bfloat16
  ref = hf.model.language_model.layers[1].self_attn.q_proj.weight.detach().float().numpy().T
  np.testing.assert_array_equal(np.asarray(q, np.float32), ref)
  save_hf_qwen3_vl(config, params, str(tmp_path / "vlm"), max_shard_size="100KB")
  hf2 = Qwen3VLForConditionalGeneration.from_pretrained(tmp_path / "vlm", dtype=torch.bfloat16)
  sd1, sd2 = hf.state_dict(), hf2.state_dict()
  assert sorted(sd1) == sorted(sd2)
  for k in sd1:
    assert torch.equal(sd1[k], sd2[k]), k
