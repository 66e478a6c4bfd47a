"""Beam search of ``vlm.inference.generate`` (through ``vlm.inference.decoding.beam_search``) against
HF ``generate(num_beams=5, do_sample=False)`` on a tiny random Qwen3-VL (float32).

A left-padded batch of two prompts of different lengths, one with an image and one text only;
the stop ids are tokens HF's unconstrained beam search emits often, so hypotheses end early
(finished-hypothesis bookkeeping, padding after the stop token, the length penalty and the
early-stopping heuristic all matter). The generation pad id is not 0 (HF pads finished beams with
``pad_token_id or eos_token_id[0]``).
"""
import collections

import numpy as np
import pytest
import torch
from transformers import Qwen3VLConfig as HFConfig, Qwen3VLForConditionalGeneration

import vlm
from tests.equivalence.qwen_hf_utils import randomize_hf
from vlm.inference.generate import compiled, estimate_generate_memory, generate

IMG, VID, VS, VE, PAD, GEN_PAD = 250, 251, 252, 253, 0, 249
VISION = dict(depth=1, hidden_size=32, num_heads=2, intermediate_size=64, out_hidden_size=64,
              deepstack_visual_indexes=[0], num_position_embeddings=16, patch_size=8,
              temporal_patch_size=2, spatial_merge_size=2)
TEXT = dict(vocab_size=256, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2, head_dim=16, rms_norm_eps=1e-6,
            rope_theta=10000.0, max_position_embeddings=256,
            rope_scaling={"rope_type": "default", "mrope_section": [4, 2, 2],
                          "mrope_interleaved": True})
GRID = np.array([[1, 4, 6]])  # 6 merged tokens
NEW, BEAMS = 24, 5


def _inputs():
  rng = np.random.RandomState(0)
  txt = lambda n: list(rng.randint(1, 200, size=n))
  rows = [txt(3) + [VS] + [IMG] * 6 + [VE] + txt(4), txt(5)]
  n = max(map(len, rows))
  ids = np.full((2, n), PAD, np.int64)
  mask = np.zeros((2, n), np.int64)
  for i, r in enumerate(rows):
    ids[i, n - len(r):] = r
    mask[i, n - len(r):] = 1
  pixels = rng.standard_normal((int(np.prod(GRID)), 3 * 2 * 8 * 8)).astype(np.float32)
  return ids, mask, pixels


@pytest.fixture(scope="module")
def models(tmp_path_factory):
  torch.manual_seed(0)
  cfg = HFConfig(vision_config=VISION, text_config=TEXT, image_token_id=IMG, video_token_id=VID,
                 vision_start_token_id=VS, vision_end_token_id=VE)
  cfg._attn_implementation = "eager"
  hf = randomize_hf(Qwen3VLForConditionalGeneration(cfg), 3)
  path = tmp_path_factory.mktemp("qwen_beam")
  hf.save_pretrained(path, safe_serialization=True)
  model, params, _ = vlm.load_pretrained(path)
  return hf, model, params


def _hf(hf, ids, mask, pixels, eos, **kw):
  with torch.no_grad():
    out = hf.generate(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask),
                      pixel_values=torch.tensor(pixels), image_grid_thw=torch.tensor(GRID),
                      do_sample=False, num_beams=BEAMS, max_new_tokens=NEW, eos_token_id=eos,
                      pad_token_id=GEN_PAD, **kw).numpy()[:, ids.shape[1]:]
  return np.pad(out, ((0, 0), (0, NEW - out.shape[1])), constant_values=GEN_PAD)


def test_beam_search_matches_hf(models):
  hf, model, params = models
  ids, mask, pixels = _inputs()
  batch = dict(input_ids=ids, attention_mask=mask, pixel_values=pixels, image_grid_thw=GRID)
  # stop ids: per row the most frequent token after the 3rd of an unconstrained beam search
  free = _hf(hf, ids, mask, pixels, eos=255)
  eos = sorted({collections.Counter(r[3:].tolist()).most_common(1)[0][0] for r in free})
  runs = [dict(), dict(length_penalty=2.0, early_stopping=True, min_new_tokens=3),
          dict(length_penalty=1.0, early_stopping="never", min_new_tokens=2)]
  outs = []
  for kw in runs:
    want = _hf(hf, ids, mask, pixels, eos=eos, **kw)
    got = generate(model, params, batch, max_new_tokens=NEW, eos_token_ids=eos,
                   pad_token_id=GEN_PAD, num_beams=BEAMS, **kw)
    print(kw, "eos", eos, "\nhf ", want.tolist(), "\nvlm", got.tolist())
    np.testing.assert_array_equal(got, want)
    assert (want == GEN_PAD).any(1).all()  # every row's best hypothesis ended before NEW tokens
    outs.append(got)
  assert (outs[0] != outs[1]).any()  # the settings change the result
  # beam search differs from greedy here, and a new max_new_tokens in the bucket does not recompile
  greedy = generate(model, params, batch, max_new_tokens=NEW, eos_token_ids=eos,
                    pad_token_id=GEN_PAD)
  assert (greedy != outs[0]).any()
  fns = compiled(model, 0.0, 1.0, GEN_PAD)
  n = fns.beam._cache_size()
  short = generate(model, params, batch, max_new_tokens=NEW - 4, eos_token_ids=eos,
                   pad_token_id=GEN_PAD, num_beams=BEAMS)
  assert fns.beam._cache_size() == n and short.shape == (2, NEW - 4)


def test_beam_settings_are_checked(models):
  _, model, params = models
  ids, mask, _ = _inputs()
  batch = dict(input_ids=ids[1:], attention_mask=mask[1:])
  kw = dict(max_new_tokens=4, eos_token_ids=[1], pad_token_id=GEN_PAD)
  for bad, match in [(dict(num_beams=0), "num_beams"),
                     (dict(num_beams=2, temperature=0.7, rng=0), "temperature=0"),
                     (dict(num_beams=2, repetition_penalty=1.2), "repetition_penalty"),
                     (dict(num_beams=2, early_stopping="sometimes"), "early_stopping"),
                     (dict(num_beams=2, length_penalty=float("nan")), "length_penalty"),
                     (dict(min_new_tokens=-1), "min_new_tokens")]:
    with pytest.raises(ValueError, match=match):
      generate(model, params, batch, **kw, **bad)


def test_memory_estimate_counts_beams(models):
  _, model, params = models
  ids, mask, _ = _inputs()
  batch = dict(input_ids=ids, attention_mask=mask, image_grid_thw=GRID)
  one = estimate_generate_memory(model, params, batch, NEW)
  five = estimate_generate_memory(model, params, batch, NEW, num_beams=5)
  assert five["kv_cache"] == 6 * one["kv_cache"]  # the prefill's B rows + B * 5 beam rows
  assert five["decode"] == 5 * one["decode"]
  assert five["prefill_activations"] == one["prefill_activations"]  # the prefill runs B rows
