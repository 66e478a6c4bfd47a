"""MoE load-balancing loss (vlm.objectives.moe) against HF ``load_balancing_loss_func``
(transformers 4.57.1 ``models/qwen3_vl_moe/modeling_qwen3_vl_moe.py``) on random router logits."""
import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from transformers.models.qwen3_vl_moe.modeling_qwen3_vl_moe import load_balancing_loss_func

from vlm.objectives import moe


def _logits(seed, n_layers=3, B=2, L=7, E=8, scale=2.0):
  rng = np.random.RandomState(seed)
  return [rng.standard_normal((B * L, E)).astype(np.float32) * scale for _ in range(n_layers)]


def _hf(layers, E, K, mask=None):
  t = tuple(torch.from_numpy(x).requires_grad_(True) for x in layers)
  m = None if mask is None else torch.from_numpy(mask)
  out = load_balancing_loss_func(t, E, K, m)
  out.backward()
  return out.item(), [x.grad.numpy() for x in t]


class LoadBalancingTest(chex.TestCase):

  @chex.variants(with_jit=True, without_jit=True)
  def test_equals_hf_with_and_without_padding(self):
    B, L, E = 2, 7, 8
    mask = np.ones((B, L), np.int64)
    mask[1, :3] = 0  # a left-padded row
    mask[0, -1] = 0
    for seed, K, m in [(0, 2, None), (1, 2, mask), (2, 1, mask)]:
      layers = _logits(seed, B=B, L=L, E=E)
      want, want_grads = _hf(layers, E, K, m)
      loss_and_grad = self.variant(jax.value_and_grad(
          lambda xs: moe.load_balancing_loss(xs, E, K, m)))
      got, grads = loss_and_grad([jnp.asarray(x) for x in layers])
      np.testing.assert_allclose(float(got), want, atol=1e-6, rtol=1e-6)
      chex.assert_trees_all_close(grads, want_grads, atol=1e-6, rtol=1e-6)
    # A stacked [NL, T, E] array (scanned layers) gives the same value.
    np.testing.assert_allclose(float(moe.load_balancing_loss(np.stack(layers), E, K, m)), want,
                               atol=1e-6, rtol=1e-6)


def test_padding_changes_the_loss_and_pads_are_ignored():
  B, L, E, K = 2, 6, 4, 2
  layers = _logits(5, n_layers=2, B=B, L=L, E=E)
  mask = np.ones((B, L), np.int64)
  mask[1, 4:] = 0
  masked = float(moe.load_balancing_loss(layers, E, K, mask))
  assert abs(masked - float(moe.load_balancing_loss(layers, E, K))) > 1e-4
  # Changing the logits of pad tokens leaves the masked loss unchanged.
  noisy = [x.copy() for x in layers]
  pad_rows = np.flatnonzero(mask.reshape(-1) == 0)
  for x in noisy:
    x[pad_rows] = 100.0 * np.random.RandomState(0).standard_normal((len(pad_rows), E))
  np.testing.assert_allclose(float(moe.load_balancing_loss(noisy, E, K, mask)), masked, atol=1e-6)


def test_uniform_router_gives_top_k():
  """Balanced routing: every expert gets 1/E of each choice and prob 1/E -> loss = K."""
  E, K = 4, 2
  # Token t prefers experts t % E and (t + 1) % E by a tiny margin: f = 1/E per (k, e).
  base = np.zeros((8, E), np.float32)
  for t in range(8):
    base[t, t % E] = 1e-3
    base[t, (t + 1) % E] = 5e-4
  np.testing.assert_allclose(float(moe.load_balancing_loss([base], E, K)), K, atol=1e-3)


def test_bad_inputs_raise_clear_errors():
  layers = _logits(0, B=2, L=7, E=8)
  with pytest.raises(ValueError, match="router_logits is empty"):
    moe.load_balancing_loss([], 8, 2)
  with pytest.raises(ValueError, match="num_experts=4"):
    moe.load_balancing_loss(layers, 4, 2)
  with pytest.raises(ValueError, match="top_k"):
    moe.load_balancing_loss(layers, 8, 9)
  with pytest.raises(ValueError, match=r"B\*L = T = 14"):
    moe.load_balancing_loss(layers, 8, 2, np.ones((2, 8)))
  with pytest.raises(ValueError, match="same"):
    moe.load_balancing_loss([layers[0], layers[1][:5]], 8, 2)
