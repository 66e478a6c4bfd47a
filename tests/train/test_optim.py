"""Optimizer groups: frozen regexes, weight-decay mask, schedule."""
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from vlm.train import optim

PARAMS = {
    "vision_model": {"encoder": {"layers_0": {"fc": {"kernel": jnp.ones((2, 3)),
                                                     "bias": jnp.ones(3)}}},
                     "post_layernorm": {"scale": jnp.ones(3), "bias": jnp.zeros(3)}},
    "query_tokens": jnp.ones((1, 4, 3)),
    "temp": jnp.asarray(0.07),
    "qformer": {"dense": {"kernel": jnp.ones((3, 3)), "bias": jnp.ones(3)}},
}
FROZEN = [r"^vision_model/(?!post_layernorm)"]


def test_trainable_mask_and_partition_roundtrip():
  mask = optim.trainable_mask(PARAMS, FROZEN)
  assert not mask[("vision_model", "encoder", "layers_0", "fc", "kernel")]
  assert mask[("vision_model", "post_layernorm", "scale")]
  assert mask[("temp",)] and mask[("query_tokens",)]
  train, frozen = optim.partition(PARAMS, mask)
  assert "encoder" not in train["vision_model"] and "post_layernorm" not in frozen["vision_model"]
  merged = optim.merge(train, frozen)
  np.testing.assert_equal(jax_to_np(merged), jax_to_np(PARAMS))


def jax_to_np(t):
  import jax
  return jax.tree.map(np.asarray, t)


def test_frozen_pattern_typo_is_an_error():
  with pytest.raises(ValueError, match="matches no parameter"):
    optim.trainable_mask(PARAMS, [r"^visual_encoder/"])
  with pytest.raises(ValueError, match="freeze every parameter"):
    optim.trainable_mask(PARAMS, [r".*"])


def test_decay_mask_follows_the_lavis_2023_rule():
  m = optim.decay_mask(PARAMS)
  assert m["query_tokens"] and m["qformer"]["dense"]["kernel"]
  assert not m["temp"] and not m["qformer"]["dense"]["bias"]
  assert not m["vision_model"]["post_layernorm"]["scale"]


def _cfg(**kw):
  c = ml_collections.ConfigDict(dict(lr=1e-4, min_lr=1e-5, warmup_lr=1e-6, warmup_steps=10,
                                     total_steps=100, b1=0.9, b2=0.98, eps=1e-8,
                                     weight_decay=0.05, grad_clip_norm=0.0))
  c.update(kw)
  return c


def test_schedule_warmup_then_cosine():
  s = optim.learning_rate_schedule(_cfg())
  assert float(s(0)) == pytest.approx(1e-6)
  assert float(s(10)) == pytest.approx(1e-4)
  assert float(s(55)) == pytest.approx(1e-5 + (1e-4 - 1e-5) * 0.5, rel=1e-4)
  assert float(s(100)) == pytest.approx(1e-5)
  with pytest.raises(ValueError, match="must be smaller than total_steps"):
    optim.learning_rate_schedule(_cfg(warmup_steps=200))


def test_adamw_decays_only_masked_leaves():
  import jax
  tx = optim.make_optimizer(_cfg(lr=0.1, warmup_lr=0.1, min_lr=0.1, weight_decay=0.5))
  params = {"w": jnp.ones((2, 2)), "b": jnp.ones(2)}
  state = tx.init(params)
  zero = jax.tree.map(jnp.zeros_like, params)
  updates, _ = tx.update(zero, state, params)
  np.testing.assert_allclose(updates["w"], -0.1 * 0.5 * np.ones((2, 2)), rtol=1e-6)
  np.testing.assert_allclose(updates["b"], 0.0)
