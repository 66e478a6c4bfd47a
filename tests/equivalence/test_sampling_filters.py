"""Sampling filters of vlm.inference.generate against HF transformers 4.57.1's logits processors
(TopKLogitsWarper, TopPLogitsWarper, RepetitionPenaltyLogitsProcessor) on random logits, and
load_generation_config."""
import json

import jax.numpy as jnp
import numpy as np
import pytest
import torch
from transformers.generation.logits_process import (RepetitionPenaltyLogitsProcessor,
                                                    TopKLogitsWarper, TopPLogitsWarper)

from vlm.inference.generate import (apply_repetition_penalty, filter_top_k, filter_top_p,
                                    load_generation_config)


def _logits(b=3, v=50, seed=0):
  return np.random.default_rng(seed).standard_normal((b, v)).astype(np.float32) * 3


@pytest.mark.parametrize("k", [1, 5, 20, 49])
def test_top_k_matches_hf(k):
  x = _logits()
  x[0, :3] = x[0, 10]  # ties at the k-th value are kept by both
  want = TopKLogitsWarper(k)(None, torch.tensor(x)).numpy()
  got = np.asarray(filter_top_k(jnp.asarray(x), k))
  np.testing.assert_array_equal(np.isfinite(got), np.isfinite(want))
  np.testing.assert_array_equal(got[np.isfinite(got)], want[np.isfinite(want)])


@pytest.mark.parametrize("p", [0.1, 0.5, 0.8, 0.99])
def test_top_p_keeps_what_hf_keeps(p):
  x = _logits(seed=1)
  want = TopPLogitsWarper(p)(None, torch.tensor(x)).numpy()
  got = np.asarray(filter_top_p(jnp.asarray(x), p))
  np.testing.assert_array_equal(np.isfinite(got), np.isfinite(want))


@pytest.mark.parametrize("penalty", [0.7, 1.3])
def test_repetition_penalty_matches_hf(penalty):
  x = _logits(seed=2)
  ids = np.random.default_rng(3).integers(0, x.shape[1], size=(x.shape[0], 12))
  want = RepetitionPenaltyLogitsProcessor(penalty)(torch.tensor(ids), torch.tensor(x)).numpy()
  seen = np.zeros(x.shape, bool)
  seen[np.arange(x.shape[0])[:, None], ids] = True
  got = np.asarray(apply_repetition_penalty(jnp.asarray(x), jnp.asarray(seen), penalty))
  np.testing.assert_allclose(got, want, rtol=1e-6, atol=0)


def test_load_generation_config(tmp_path):
  assert load_generation_config(tmp_path) == {}
  (tmp_path / "generation_config.json").write_text(json.dumps({
      "do_sample": True, "temperature": 0.7, "top_k": 20, "top_p": 0.8,
      "repetition_penalty": 1.0, "eos_token_id": [151645, 151643], "pad_token_id": 151643}))
  assert load_generation_config(tmp_path) == dict(
      temperature=0.7, top_k=20, top_p=0.8, repetition_penalty=1.0,
      eos_token_ids=[151645, 151643], pad_token_id=151643)
  (tmp_path / "generation_config.json").write_text(json.dumps({"eos_token_id": 2}))
  assert load_generation_config(tmp_path) == dict(temperature=0.0, eos_token_ids=[2])
  (tmp_path / "generation_config.json").write_text("[1]")
  with pytest.raises(ValueError, match="JSON object"):
    load_generation_config(tmp_path)
