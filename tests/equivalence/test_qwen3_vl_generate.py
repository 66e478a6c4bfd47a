"""Generation with ``vlm.inference.generate`` against HF ``generate`` (float32, tiny random models).

* A tiny random ``Qwen3VLForConditionalGeneration`` (same shape as test_qwen3_vl.py) is saved with
  ``save_pretrained`` and read with ``vlm.load_pretrained``; greedy generation of 20 tokens on a
  left-padded batch of two prompts with one image each must equal HF ``generate(do_sample=False)``
  token for token (eos set to an id that only stops a row if both models emit it).
* ``scripts/generate.py`` (as a subprocess) and ``scripts/convert_hf.py`` (in-process) on a
  tiny model with the real Qwen3 vocabulary size and a real COCO photo.
"""
import importlib.util
import json
import os
import subprocess
import sys

import numpy as np
import torch

import jax

from transformers import Qwen3VLConfig as HFConfig, Qwen3VLForConditionalGeneration

import vlm
from tests.equivalence.qwen_hf_utils import randomize_hf
from vlm.inference.generate import compiled, generate

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
IMG, VID, VS, VE, PAD, EOS = 250, 251, 252, 253, 0, 254
VISION = dict(depth=2, hidden_size=32, num_heads=2, intermediate_size=64, out_hidden_size=64,
              deepstack_visual_indexes=[0, 1], num_position_embeddings=16, patch_size=8,
              temporal_patch_size=2, spatial_merge_size=2)
TEXT = dict(vocab_size=256, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2, head_dim=16, rms_norm_eps=1e-6,
            rope_theta=10000.0, max_position_embeddings=256,
            rope_scaling={"rope_type": "default", "mrope_section": [4, 2, 2],
                          "mrope_interleaved": True})
GRIDS = np.array([[1, 4, 6], [1, 2, 4]])   # 6 and 2 merged tokens
VGRIDS = np.array([[2, 4, 4]])             # 2 frame groups of 4 merged tokens
NEW = 20


def _inputs():
  rng = np.random.RandomState(0)
  txt = lambda n: list(rng.randint(1, 200, size=n))
  blk = lambda g: [VS] + [IMG] * (int(np.prod(g)) // 4) + [VE]
  rows = [txt(3) + blk(GRIDS[0]) + txt(4), txt(2) + blk(GRIDS[1]) + txt(2)]
  n = max(map(len, rows))
  ids = np.full((2, n), PAD, np.int64)
  mask = np.zeros((2, n), np.int64)
  for i, r in enumerate(rows):
    ids[i, n - len(r):] = r
    mask[i, n - len(r):] = 1
  pixels = rng.standard_normal((int(np.prod(GRIDS, axis=1).sum()), 3 * 2 * 8 * 8))
  return ids, mask, pixels.astype(np.float32)


def _video_inputs():
  """Row 0: image 0 and a video of two frame groups (each behind its own timestamp text);
  row 1 (left padded): image 1."""
  rng = np.random.RandomState(1)
  txt = lambda n: list(rng.randint(1, 200, size=n))
  blk = lambda n, tok: [VS] + [tok] * n + [VE]
  t, h, w = VGRIDS[0]
  video = sum((txt(2) + blk(h * w // 4, VID) for _ in range(t)), [])
  rows = [txt(2) + blk(6, IMG) + txt(1) + video + txt(2), txt(3) + blk(2, IMG) + txt(2)]
  n = max(map(len, rows))
  ids = np.full((2, n), PAD, np.int64)
  mask = np.zeros((2, n), np.int64)
  for i, r in enumerate(rows):
    ids[i, n - len(r):] = r
    mask[i, n - len(r):] = 1
  pixels = rng.standard_normal((int(np.prod(VGRIDS)), 3 * 2 * 8 * 8)).astype(np.float32)
  return ids, mask, pixels


def test_greedy_matches_hf(tmp_path):
  torch.manual_seed(0)
  cfg = HFConfig(vision_config=VISION, text_config=TEXT, image_token_id=IMG, video_token_id=VID,
                 vision_start_token_id=VS, vision_end_token_id=VE)
  cfg._attn_implementation = "eager"
  hf = randomize_hf(Qwen3VLForConditionalGeneration(cfg), 1)
  hf.save_pretrained(tmp_path, safe_serialization=True)
  ids, mask, pixels = _inputs()

  def hf_generate(eos, **kw):
    with torch.no_grad():
      out = hf.generate(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask),
                        pixel_values=torch.tensor(pixels), image_grid_thw=torch.tensor(GRIDS),
                        do_sample=False, max_new_tokens=NEW, eos_token_id=eos,
                        pad_token_id=PAD, **kw).numpy()[:, ids.shape[1]:]
    return np.pad(out, ((0, 0), (0, NEW - out.shape[1])), constant_values=PAD)

  want = hf_generate(EOS)

  model, params, processor = vlm.load_pretrained(tmp_path)
  assert processor.padding_side == "left" and processor.config.patch_size == 8
  batch = dict(input_ids=ids, attention_mask=mask, pixel_values=pixels, image_grid_thw=GRIDS)
  got = generate(model, params, batch, max_new_tokens=NEW, eos_token_ids=[EOS],
                 pad_token_id=PAD)
  print("hf  ", want.tolist())
  print("vlm ", got.tolist())
  np.testing.assert_array_equal(got, want)
  # per-row stop: row 0's 4th token as eos (pads after it, as HF; row 1 stops later or never)
  stop = int(want[0, 3])
  want_stop = hf_generate(stop)
  got_stop = generate(model, params, batch, max_new_tokens=NEW, eos_token_ids=stop,
                      pad_token_id=PAD)
  print("stop", stop, got_stop.tolist())
  assert (want_stop == PAD).any()
  np.testing.assert_array_equal(got_stop, want_stop)
  fns = compiled(model, 0.0, 1.0, PAD)  # two generate calls: one compile each
  assert fns.prefill._cache_size() == 1 and fns.decode._cache_size() == 1
  # fewer new tokens (same bucket) and a batch of one row: no new decode compile for the former
  got_short = generate(model, params, batch, max_new_tokens=NEW - 3, eos_token_ids=[EOS],
                       pad_token_id=PAD)
  np.testing.assert_array_equal(got_short, want[:, :NEW - 3])
  assert fns.prefill._cache_size() == 1 and fns.decode._cache_size() == 1
  one = {k: v[1:] for k, v in batch.items() if k in ("input_ids", "attention_mask")}
  one.update(pixel_values=pixels[GRIDS[0].prod():], image_grid_thw=GRIDS[1:])
  np.testing.assert_array_equal(
      generate(model, params, one, max_new_tokens=NEW, eos_token_ids=[EOS], pad_token_id=PAD),
      want[1:])

  # HF's repetition penalty (prompt ids incl. padding, and generated tokens), greedy
  want_rep = hf_generate(EOS, repetition_penalty=1.5)
  got_rep = generate(model, params, batch, max_new_tokens=NEW, eos_token_ids=EOS,
                     pad_token_id=PAD, repetition_penalty=1.5)
  print("repetition_penalty 1.5", got_rep.tolist())
  assert (want_rep != want).any()  # the penalty changes the greedy path here
  np.testing.assert_array_equal(got_rep, want_rep)

  # images and a video in one batch (packed images then videos, Qwen3-VL per-frame blocks)
  vids, vmask, vpix = _video_inputs()
  with torch.no_grad():
    want_v = hf.generate(input_ids=torch.tensor(vids), attention_mask=torch.tensor(vmask),
                         pixel_values=torch.tensor(pixels), image_grid_thw=torch.tensor(GRIDS),
                         pixel_values_videos=torch.tensor(vpix),
                         video_grid_thw=torch.tensor(VGRIDS), do_sample=False,
                         max_new_tokens=8, eos_token_id=EOS,
                         pad_token_id=PAD).numpy()[:, vids.shape[1]:]
  got_v = generate(model, params, dict(input_ids=vids, attention_mask=vmask, pixel_values=pixels,
                                       image_grid_thw=GRIDS, pixel_values_videos=vpix,
                                       video_grid_thw=VGRIDS),
                   max_new_tokens=8, eos_token_ids=EOS, pad_token_id=PAD)
  print("video", got_v.tolist())
  np.testing.assert_array_equal(got_v, want_v)
  # sampling runs, is reproducible for a fixed key and stays in the vocabulary
  s1 = generate(model, params, batch, max_new_tokens=4, eos_token_ids=[EOS], pad_token_id=PAD,
                temperature=0.8, top_p=0.9, rng=jax.random.PRNGKey(1))
  s2 = generate(model, params, batch, max_new_tokens=4, eos_token_ids=[EOS], pad_token_id=PAD,
                temperature=0.8, top_p=0.9, rng=jax.random.PRNGKey(1))
  np.testing.assert_array_equal(s1, s2)
  assert s1.shape == (2, 4) and ((s1 >= 0) & (s1 < 256)).all()


def _script(name):
  spec = importlib.util.spec_from_file_location(name, os.path.join(REPO, "scripts", f"{name}.py"))
  mod = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(mod)
  return mod


def test_generate_script_real_vocab(tmp_path):
  """Tiny widths, the real Qwen3 vocabulary and special-token ids, a COCO photo."""
  torch.manual_seed(0)
  vision = dict(depth=1, hidden_size=16, num_heads=2, intermediate_size=32, out_hidden_size=16,
                deepstack_visual_indexes=[0], num_position_embeddings=16, patch_size=16,
                temporal_patch_size=2, spatial_merge_size=2)
  text = dict(vocab_size=151936, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
              num_attention_heads=2, num_key_value_heads=1, head_dim=8, rms_norm_eps=1e-6,
              rope_theta=10000.0, max_position_embeddings=4096, tie_word_embeddings=True,
              rope_scaling={"rope_type": "default", "mrope_section": [2, 1, 1],
                            "mrope_interleaved": True})
  cfg = HFConfig(vision_config=vision, text_config=text, tie_word_embeddings=True)
  randomize_hf(Qwen3VLForConditionalGeneration(cfg), 2).save_pretrained(tmp_path / "hf")
  # the released Instruct sampling defaults (spec 7.7): the script must pick them up
  (tmp_path / "hf" / "generation_config.json").write_text(json.dumps({
      "do_sample": True, "temperature": 0.7, "top_k": 20, "top_p": 0.8,
      "eos_token_id": [151645, 151643], "pad_token_id": 151643}))
  mod = _script("generate")
  photo = os.path.join(REPO, "data", "coco", "images", "000000000139.jpg")
  seeded = [mod.run(str(tmp_path / "hf"), photo, "Hi", max_new_tokens=4, seed=s,
                    max_pixels=128 * 128) for s in (0, 0, 1)]
  greedy = [mod.run(str(tmp_path / "hf"), photo, "Hi", max_new_tokens=4, seed=s,
                    max_pixels=128 * 128, temperature=0.0) for s in (0, 1)]
  assert seeded[0] == seeded[1] and greedy[0] == greedy[1]
  assert len({seeded[0], seeded[2], greedy[0]}) > 1  # the checkpoint's sampling is on
  photo = os.path.join(REPO, "data", "coco", "images", "000000000139.jpg")
  cmd = [sys.executable, os.path.join(REPO, "scripts", "generate.py"),
         f"--checkpoint={tmp_path / 'hf'}", f"--image={photo}",
         "--prompt=What is in the picture and the clip?", "--max_new_tokens=5",
         f"--max_pixels={128 * 128}", f"--video={os.path.join(REPO, 'data', 'video', 'bikes.mp4')}"]
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  env.pop("XLA_FLAGS", None)
  proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120, env=env, cwd=REPO)
  assert proc.returncode == 0, proc.stderr[-3000:]
  print("generated:", repr(proc.stdout))
  assert proc.stdout.strip()
  n = _script("convert_hf").convert(str(tmp_path / "hf"), str(tmp_path / "rt"))
  assert n > 151936 * 16
