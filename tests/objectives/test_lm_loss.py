"""Chunked next-token loss (vlm.objectives.lm.chunked_next_token_loss) against the dense
computation, HF ``ForCausalLMLoss`` (transformers 4.57.1 ``transformers/loss/loss_utils.py``), and
its compiled memory."""
import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from transformers.loss.loss_utils import ForCausalLMLoss

from vlm.objectives import lm

jax.config.update("jax_default_matmul_precision", "highest")


def _problem(seed, B=2, L=13, D=8, V=37, p_mask=0.7):
  rng = np.random.RandomState(seed)
  hidden = rng.standard_normal((B, L, D)).astype(np.float32)
  kernel = rng.standard_normal((D, V)).astype(np.float32)
  labels = rng.randint(0, V, size=(B, L)).astype(np.int32)
  mask = (rng.rand(B, L) < p_mask).astype(np.float32)
  mask[0, 0] = 1.0
  labels[mask == 0] = -100  # ignored values may be anything
  return hidden, kernel, labels, mask


def _dense(hidden, kernel, labels, mask, z_loss=0.0):
  """Reference: full [B, L, V] float32 logits, log-softmax, masked sum."""
  logits = jnp.einsum("bld,dv->blv", hidden, kernel)
  lse = jax.nn.logsumexp(logits, axis=-1)
  safe = jnp.where(mask > 0, labels, 0)
  nll = lse - jnp.take_along_axis(logits, safe[..., None], axis=-1)[..., 0]
  return jnp.sum((nll + z_loss * lse ** 2) * mask), jnp.sum(mask)


class ChunkedLossTest(chex.TestCase):

  @chex.variants(with_jit=True, without_jit=True)
  def test_equals_dense_values_and_gradients(self):
    # L = 13: chunks of 4 leave a tail of 1 (with z-loss); 32 >= L (one chunk); 1 (13 chunks).
    for chunk, z in [(4, 1e-2), (32, 0.0), (1, 0.0)]:
      hidden, kernel, labels, mask = _problem(chunk)

      def chunked(h, k):
        s, n, m = lm.chunked_next_token_loss(h, k, labels, mask, chunk_size=chunk, z_loss=z)
        return s, (n, m)

      def dense(h, k):
        s, n = _dense(h, k, labels, mask, z)
        return s, n

      (s, (n, m)), g = self.variant(jax.value_and_grad(chunked, argnums=(0, 1), has_aux=True))(
          hidden, kernel)
      (s_ref, n_ref), g_ref = jax.value_and_grad(dense, argnums=(0, 1), has_aux=True)(
          hidden, kernel)
      chex.assert_trees_all_close((s, n), (s_ref, n_ref), atol=1e-6, rtol=1e-6)
      chex.assert_trees_all_close(g, g_ref, atol=1e-6, rtol=1e-6)
      chex.assert_shape(g[0], hidden.shape)
      chex.assert_trees_all_close(m["nll_sum"] + m["z_loss_sum"], s, atol=1e-5, rtol=1e-6)
      assert float(n) == float(mask.sum())


def test_callable_head_gradient_reaches_its_parameters():
  """A logits_fn closing over parameters (how the model's LM head is passed) gets gradients."""
  hidden, kernel, labels, mask = _problem(3, L=10)
  bias = np.random.RandomState(4).standard_normal((kernel.shape[1],)).astype(np.float32)

  def chunked(k, b):
    fn = lambda h: h @ k + b
    return lm.chunked_next_token_loss(hidden, fn, labels, mask, chunk_size=3)[0]

  def dense(k, b):
    logits = hidden @ k + b
    lse = jax.nn.logsumexp(logits, -1)
    safe = jnp.where(mask > 0, labels, 0)
    return jnp.sum((lse - jnp.take_along_axis(logits, safe[..., None], -1)[..., 0]) * mask)

  chex.assert_trees_all_close(jax.jit(jax.grad(chunked, argnums=(0, 1)))(kernel, bias),
                              jax.grad(dense, argnums=(0, 1))(kernel, bias), atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("seed", [0, 1])
def test_mean_equals_hf_for_causal_lm_loss(seed):
  """HF labels are unshifted with -100 masking; vlm labels are shifted on the host."""
  rng = np.random.RandomState(seed)
  B, L, V = 3, 11, 29
  logits = rng.standard_normal((B, L, V)).astype(np.float32) * 3
  hf_labels = rng.randint(0, V, size=(B, L)).astype(np.int64)
  hf_labels[rng.rand(B, L) < 0.3] = -100
  hf_labels[2, :4] = -100  # a left-padded row
  ref = ForCausalLMLoss(torch.from_numpy(logits), torch.from_numpy(hf_labels), vocab_size=V).item()

  labels = np.zeros((B, L), np.int32)
  labels[:, :-1] = hf_labels[:, 1:]
  mask = (labels != -100).astype(np.float32)
  mask[:, -1] = 0.0
  # The logits themselves are the "hidden states" and the head is the identity.
  mean, metrics = lm.next_token_loss_mean(logits, lambda h: h, labels, mask, chunk_size=4)
  np.testing.assert_allclose(float(mean), ref, atol=1e-6, rtol=1e-6)
  assert float(metrics["num_tokens"]) == float((hf_labels[:, 1:] != -100).sum())
  want_acc = ((logits[:, :-1].argmax(-1) == labels[:, :-1]) * mask[:, :-1]).sum() / mask.sum()
  np.testing.assert_allclose(float(metrics["accuracy"]), want_acc, atol=1e-7)


def test_no_loss_tokens_gives_zero_mean_and_finite_gradient():
  hidden, kernel, labels, _ = _problem(5)
  mask = np.zeros(labels.shape, np.float32)
  f = lambda h: lm.next_token_loss_mean(h, kernel, labels, mask, chunk_size=4)[0]
  assert float(f(hidden)) == 0.0
  chex.assert_tree_all_finite(jax.grad(f)(hidden))


def test_compiled_memory_is_chunk_sized():
  """jit(value_and_grad) w.r.t. hidden and kernel at B=1, L=8192, V=32,000, chunk 512 (compile only).

  Measured on XLA CPU (jax 0.10.2): chunked temp 264 MB at L=8192 and the same at L=16384, dense
  [B, L, V] computation 3,146 MB, B*L*V*4 = 1,049 MB, one chunk's logits 65.5 MB.
  """
  D, V, C = 64, 32_000, 512
  chunk_bytes = C * V * 4
  temps = {}
  for L in (8192, 16384):
    spec = lambda *s, dt=jnp.float32: jax.ShapeDtypeStruct(s, dt)
    f = lambda h, k, y, m: (lambda s, n, _: s / n)(
        *lm.chunked_next_token_loss(h, k, y, m, chunk_size=C))
    compiled = jax.jit(jax.value_and_grad(f, argnums=(0, 1))).lower(
        spec(1, L, D), spec(D, V), spec(1, L, dt=jnp.int32), spec(1, L)).compile()
    temps[L] = compiled.memory_analysis().temp_size_in_bytes
  full_logits = 1 * 8192 * V * 4
  assert temps[8192] < full_logits / 3, (temps, full_logits)
  assert temps[8192] < 6 * chunk_bytes, (temps, chunk_bytes)
  # Independent of the sequence length, apart from [B, L]-sized (not [B, L, V]) buffers.
  assert temps[16384] - temps[8192] < 16384 * D * 4 * 4, temps


def test_bad_inputs_raise_clear_errors():
  hidden, kernel, labels, mask = _problem(0)
  with pytest.raises(ValueError, match=r"hidden must be \[B, L, D\]"):
    lm.chunked_next_token_loss(hidden[0], kernel, labels, mask)
  with pytest.raises(ValueError, match="labels and loss_mask must be"):
    lm.chunked_next_token_loss(hidden, kernel, labels[:, 1:], mask)
  with pytest.raises(ValueError, match="chunk_size"):
    lm.chunked_next_token_loss(hidden, kernel, labels, mask, chunk_size=0)
  with pytest.raises(ValueError, match=r"kernel must be \[D, V\]"):
    lm.chunked_next_token_loss(hidden, kernel.T, labels, mask)
  bad = labels.copy()
  bad[0, 0] = kernel.shape[1]  # loss position (mask[0, 0] = 1) with a label outside [0, V)
  with pytest.raises(ValueError, match=r"labels\[0, 0\] = 37 is a loss position"):
    lm.chunked_next_token_loss(hidden, kernel, bad, mask)
  with pytest.raises(ValueError, match="z_loss"):
    lm.chunked_next_token_loss(hidden, kernel, labels, mask, z_loss=-1.0)


def test_existing_losses_unchanged():
  """itg_loss / next_token_loss (BLIP-2) still work next to the chunked loss."""
  hidden, kernel, labels, mask = _problem(7)
  logits = jnp.einsum("bld,dv->blv", hidden, kernel)
  dense = lm.next_token_loss(logits, labels, mask)
  chunked, _ = lm.next_token_loss_mean(hidden, kernel, labels, mask, chunk_size=5)
  np.testing.assert_allclose(float(chunked), float(dense), atol=1e-6)
