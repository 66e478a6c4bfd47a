"""Tests for vlm.objectives (ITC, ITM, ITG/LM losses), expected values computed by hand."""
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from vlm.objectives import itc, itm, lm


def _normed(rng, *shape):
  x = rng.normal(size=shape)
  return x / np.linalg.norm(x, axis=-1, keepdims=True)


def _hand_soft_ce(logits, targets):
  """mean_i -sum_j t_ij * (l_ij - logsumexp_j l_ij), with explicit loops."""
  total = 0.0
  for i in range(len(logits)):
    m = max(logits[i])
    lse = m + math.log(sum(math.exp(v - m) for v in logits[i]))
    total += -sum(t * (v - lse) for t, v in zip(targets[i], logits[i]))
  return total / len(logits)


def _hand_sims(img, txt, temp):
  b, q, _ = img.shape
  i2t = [[max(float(np.dot(img[i, k], txt[j])) for k in range(q)) / temp for j in range(b)]
         for i in range(b)]
  t2i = [[max(float(np.dot(txt[i], img[j, k])) for k in range(q)) / temp for j in range(b)]
         for i in range(b)]
  return i2t, t2i


# ----------------------------------------------------------------------------------------- ITC

def test_itc_similarities_by_hand():
  img = np.array([[[1.0, 0.0], [0.0, 1.0]],
                  [[0.6, 0.8], [-1.0, 0.0]]])
  txt = np.array([[0.8, 0.6], [0.0, -1.0]])
  temp = 0.5
  # sim_i2t[0,0] = max(0.8, 0.6)/0.5 = 1.6 ; [0,1] = max(0, -1)/0.5 = 0
  # sim_i2t[1,0] = max(0.48+0.48, -0.8)/0.5 = 1.92 ; [1,1] = max(-0.8, 0)/0.5 = 0
  expected_i2t = np.array([[1.6, 0.0], [1.92, 0.0]])
  s_i2t, s_t2i = itc.itc_similarities(jnp.asarray(img), jnp.asarray(txt), temp)
  np.testing.assert_allclose(s_i2t, expected_i2t, atol=1e-6)
  np.testing.assert_allclose(s_t2i, expected_i2t.T, atol=1e-6)
  assert s_i2t.dtype == jnp.float32


@pytest.mark.parametrize("eps", [0.0, 0.1])
def test_itc_loss_diagonal_by_hand(eps):
  rng = np.random.default_rng(0)
  b = 3
  img, txt, temp = _normed(rng, b, 2, 4), _normed(rng, b, 4), 0.07
  i2t, t2i = _hand_sims(img, txt, temp)
  targets = [[(1 - eps) * (i == j) + eps / b for j in range(b)] for i in range(b)]
  expected = (_hand_soft_ce(i2t, targets) + _hand_soft_ce(t2i, targets)) / 2
  loss, aux = itc.itc_loss(jnp.asarray(img), jnp.asarray(txt), temp, label_smoothing=eps)
  np.testing.assert_allclose(float(loss), expected, rtol=1e-5)
  np.testing.assert_allclose(aux["sim_i2t"], i2t, rtol=1e-5)
  np.testing.assert_allclose(aux["sim_t2i"], t2i, rtol=1e-5)


@pytest.mark.parametrize("eps", [0.0, 0.1, 0.3])
def test_itc_loss_matches_torch_cross_entropy(eps):
  rng = np.random.default_rng(1)
  b = 5
  img, txt, temp = _normed(rng, b, 3, 8), _normed(rng, b, 8), 0.1
  loss, aux = itc.itc_loss(jnp.asarray(img, jnp.float32), jnp.asarray(txt, jnp.float32), temp,
                           label_smoothing=eps)
  target = torch.arange(b)
  def torch_ce(sim):
    return F.cross_entropy(torch.tensor(np.asarray(sim)), target, label_smoothing=eps)

  ref = (torch_ce(aux["sim_i2t"]) + torch_ce(aux["sim_t2i"])) / 2
  np.testing.assert_allclose(float(loss), float(ref), rtol=1e-5)


def test_itc_loss_image_ids_by_hand():
  rng = np.random.default_rng(2)
  b = 3
  ids = [7, 3, 7]
  img, txt, temp = _normed(rng, b, 2, 3), _normed(rng, b, 3), 0.2
  i2t, t2i = _hand_sims(img, txt, temp)
  targets = []
  for i in range(b):
    pos = [1.0 if ids[i] == ids[j] else 0.0 for j in range(b)]
    targets.append([0.9 * p / sum(pos) + 0.1 / b for p in pos])
  expected = (_hand_soft_ce(i2t, targets) + _hand_soft_ce(t2i, targets)) / 2
  loss, _ = itc.itc_loss(jnp.asarray(img), jnp.asarray(txt), temp, image_ids=jnp.asarray(ids))
  np.testing.assert_allclose(float(loss), expected, rtol=1e-5)
  # Distinct ids reduce exactly to the diagonal branch.
  l_ids, _ = itc.itc_loss(jnp.asarray(img), jnp.asarray(txt), temp, image_ids=jnp.arange(b))
  l_diag, _ = itc.itc_loss(jnp.asarray(img), jnp.asarray(txt), temp)
  np.testing.assert_allclose(float(l_ids), float(l_diag), rtol=1e-6)


def test_itc_gradient_semantics():
  rng = np.random.default_rng(3)
  img = jnp.asarray(_normed(rng, 4, 3, 5), jnp.float32)
  txt = jnp.asarray(_normed(rng, 4, 5), jnp.float32)
  temp = jnp.asarray(0.1, jnp.float32)

  def part(name, sg):
    return lambda i, t, tp: itc.itc_loss(i, t, tp, stop_gradient_keys=sg)[1][name]

  @jax.jit
  def all_grads(i, t, tp):
    return [jax.grad(part(n, sg), argnums=(0, 1, 2))(i, t, tp)
            for n, sg in (("loss_i2t", True), ("loss_t2i", True), ("loss_i2t", False))]

  (i2t_img, i2t_txt, i2t_temp), (t2i_img, t2i_txt, t2i_temp), (nosg_img, nosg_txt, _) = (
      all_grads(img, txt, temp))
  assert float(jnp.abs(i2t_txt).max()) == 0.0
  assert float(jnp.abs(i2t_img).max()) > 0.0 and float(jnp.abs(i2t_temp)) > 0.0
  assert float(jnp.abs(t2i_img).max()) == 0.0
  assert float(jnp.abs(t2i_txt).max()) > 0.0 and float(jnp.abs(t2i_temp)) > 0.0
  # Without stop-gradient both directions reach both towers.
  assert float(jnp.abs(nosg_txt).max()) > 0.0 and float(jnp.abs(nosg_img).max()) > 0.0
  # Forward value does not depend on the stop-gradient switch.
  a = itc.itc_loss(img, txt, temp, stop_gradient_keys=True)[0]
  b = itc.itc_loss(img, txt, temp, stop_gradient_keys=False)[0]
  np.testing.assert_allclose(float(a), float(b), rtol=1e-7)


def test_itc_jit_and_errors():
  rng = np.random.default_rng(4)
  img = jnp.asarray(_normed(rng, 3, 2, 4), jnp.float32)
  txt = jnp.asarray(_normed(rng, 3, 4), jnp.float32)
  f = jax.jit(lambda i, t, tp, ids: itc.itc_loss(i, t, tp, image_ids=ids)[0])
  eager = itc.itc_loss(img, txt, 0.1, image_ids=jnp.array([0, 1, 0]))[0]
  np.testing.assert_allclose(float(f(img, txt, 0.1, jnp.array([0, 1, 0]))), float(eager), rtol=1e-6)
  with pytest.raises(ValueError, match="batch size"):
    itc.itc_loss(img, txt[:2], 0.1)
  with pytest.raises(ValueError, match=r"\[B, Q, E\]"):
    itc.itc_loss(img[:, 0], txt, 0.1)
  with pytest.raises(ValueError, match="image_ids"):
    itc.itc_loss(img, txt, 0.1, image_ids=jnp.array([0, 1]))


# ----------------------------------------------------------------------------------------- ITM

# One compiled sampler (2048 keys, B = 6) shared by the hard-negative tests: compiling
# jax.random.categorical dominates their run time on CPU.
_B = 6
_KEYS = jax.random.split(jax.random.PRNGKey(0), 2048)
_sample_many = jax.jit(jax.vmap(itm.sample_hard_negatives, in_axes=(0, None, None, None)))


def _random_sims(seed):
  sim = jnp.asarray(np.random.default_rng(seed).normal(size=(_B, _B)) * 3, jnp.float32)
  return sim, sim.T


def test_hard_negatives_never_positive():
  sim_i2t, sim_t2i = _random_sims(5)
  ni, nt = _sample_many(_KEYS, sim_i2t, sim_t2i, None)
  assert ni.shape == (len(_KEYS), _B) and ni.dtype == jnp.int32 and nt.dtype == jnp.int32
  ni, nt = np.asarray(ni), np.asarray(nt)
  assert not np.any(ni == np.arange(_B)) and not np.any(nt == np.arange(_B))
  # Distinct image ids are the same as no ids: identical samples for identical keys.
  ni2, nt2 = _sample_many(_KEYS, sim_i2t, sim_t2i, jnp.arange(_B))
  np.testing.assert_array_equal(ni2, ni)
  np.testing.assert_array_equal(nt2, nt)
  ids = np.array([0, 0, 1, 2, 2, 2])
  ni, nt = _sample_many(_KEYS, sim_i2t, sim_t2i, jnp.asarray(ids))
  ni, nt = np.asarray(ni), np.asarray(nt)
  assert not np.any(ids[ni] == ids) and not np.any(ids[nt] == ids)
  # Row 2 (the only sample of id 1) can pick any other sample.
  assert set(ni[:, 2].tolist()) == {0, 1, 3, 4, 5}


def test_hard_negatives_follow_softmax():
  # Diagonal is huge but masked. Row 0 strongly prefers index 2; row 1 is uniform over the others.
  sim = 50.0 * np.eye(_B, dtype=np.float32)
  sim[0, 2] = 12.0
  sim = jnp.asarray(sim)
  ni, nt = _sample_many(_KEYS, sim, sim, jnp.arange(_B))
  ni, nt = np.asarray(ni), np.asarray(nt)
  assert np.mean(ni[:, 0] == 2) > 0.99 and np.mean(nt[:, 0] == 2) > 0.99
  counts = np.bincount(ni[:, 1], minlength=_B) / len(_KEYS)
  assert counts[1] == 0.0
  np.testing.assert_allclose(np.delete(counts, 1), 0.2, atol=0.04)


def test_hard_negatives_fallback():
  sim_i2t, sim_t2i = _random_sims(6)
  # Every sample shares one image id: uniform over all j != i.
  ni, nt = _sample_many(_KEYS, sim_i2t, sim_t2i, jnp.zeros((_B,), jnp.int32))
  ni, nt = np.asarray(ni), np.asarray(nt)
  assert np.all((ni >= 0) & (ni < _B))
  assert np.all(ni != np.arange(_B)) and np.all(nt != np.arange(_B))
  counts = np.bincount(ni[:, 0], minlength=_B) / len(_KEYS)
  assert counts[0] == 0.0
  np.testing.assert_allclose(counts[1:], 0.2, atol=0.04)
  # B == 1 returns the sample itself.
  ni, nt = itm.sample_hard_negatives(jax.random.PRNGKey(0), jnp.ones((1, 1)), jnp.ones((1, 1)))
  assert ni.tolist() == [0] and nt.tolist() == [0]
  with pytest.raises(ValueError, match="square"):
    itm.sample_hard_negatives(jax.random.PRNGKey(0), jnp.ones((2, 3)), jnp.ones((3, 2)))


def test_itm_loss_by_hand():
  logits = np.array([[0.0, 2.0], [1.0, -1.0], [0.5, 0.2]])
  labels = np.array([1, 1, 0])
  nll = []
  for row, y in zip(logits, labels):
    lse = math.log(math.exp(row[0]) + math.exp(row[1]))
    nll.append(lse - row[y])
  loss, acc = itm.itm_loss(jnp.asarray(logits), jnp.asarray(labels))
  np.testing.assert_allclose(float(loss), sum(nll) / 3, rtol=1e-6)
  np.testing.assert_allclose(float(acc), 2 / 3, rtol=1e-6)
  ref = F.cross_entropy(torch.tensor(logits), torch.tensor(labels))
  np.testing.assert_allclose(float(loss), float(ref), rtol=1e-6)


def test_build_itm_batch_layout_and_gradient():
  b, nv, dv, t = 3, 2, 2, 4
  emb = jnp.arange(b * nv * dv, dtype=jnp.float32).reshape(b, nv, dv)
  ids = jnp.arange(b * t, dtype=jnp.int32).reshape(b, t)
  mask = jnp.array([[1, 1, 1, 0], [1, 1, 0, 0], [1, 1, 1, 1]])
  neg_img = jnp.array([2, 0, 1], jnp.int32)
  neg_txt = jnp.array([1, 2, 0], jnp.int32)
  e3, i3, m3, y3 = itm.build_itm_batch(emb, ids, mask, neg_img, neg_txt)
  assert e3.shape == (3 * b, nv, dv) and i3.shape == (3 * b, t) and m3.shape == (3 * b, t)
  np.testing.assert_array_equal(e3[:b], emb)
  np.testing.assert_array_equal(e3[b:2 * b], emb[np.array([2, 0, 1])])
  np.testing.assert_array_equal(e3[2 * b:], emb)
  np.testing.assert_array_equal(i3[:b], ids)
  np.testing.assert_array_equal(i3[b:2 * b], ids)
  np.testing.assert_array_equal(i3[2 * b:], ids[np.array([1, 2, 0])])
  np.testing.assert_array_equal(m3[2 * b:], mask[np.array([1, 2, 0])])
  np.testing.assert_array_equal(m3[b:2 * b], mask)
  assert y3.tolist() == [1, 1, 1, 0, 0, 0, 0, 0, 0] and y3.dtype == jnp.int32
  # Each image is used twice as itself plus once per time it is picked as a negative.
  g = jax.grad(lambda e: jnp.sum(itm.build_itm_batch(e, ids, mask, neg_img, neg_txt)[0]))(emb)
  np.testing.assert_array_equal(g, jnp.full_like(emb, 3.0))
  with pytest.raises(ValueError, match="batch sizes"):
    itm.build_itm_batch(emb, ids[:2], mask[:2], neg_img, neg_txt)


# ------------------------------------------------------------------------------------ ITG / LM

def _hand_smoothed_ce(logits, labels, mask, eps):
  total, count = 0.0, 0
  for row, y, m in zip(logits, labels, mask):
    if not m:
      continue
    mx = max(row)
    lse = mx + math.log(sum(math.exp(v - mx) for v in row))
    nll = lse - row[y]
    uniform = sum(lse - v for v in row) / len(row)
    total += (1 - eps) * nll + eps * uniform
    count += 1
  return total / count


def test_cross_entropy_by_hand():
  rng = np.random.default_rng(7)
  logits = rng.normal(size=(4, 5))
  labels = np.array([3, -100, 0, 4])
  mask = labels != -100
  for eps in (0.0, 0.1):
    expected = _hand_smoothed_ce(logits, labels, mask, eps)
    got = lm.cross_entropy_with_label_smoothing(jnp.asarray(logits), jnp.asarray(labels),
                                                jnp.asarray(mask), eps)
    np.testing.assert_allclose(float(got), expected, rtol=1e-6)


@pytest.mark.parametrize("eps", [0.0, 0.1])
def test_cross_entropy_matches_torch(eps):
  rng = np.random.default_rng(8)
  logits = rng.normal(size=(3, 6, 5)).astype(np.float32) * 3
  labels = rng.integers(0, 5, size=(3, 6))
  labels[rng.random(size=(3, 6)) < 0.3] = -100
  ref = F.cross_entropy(torch.tensor(logits).reshape(-1, 5), torch.tensor(labels).reshape(-1),
                        ignore_index=-100, label_smoothing=eps)
  got = lm.cross_entropy_with_label_smoothing(jnp.asarray(logits), jnp.asarray(labels),
                                              jnp.asarray(labels != -100), eps)
  np.testing.assert_allclose(float(got), float(ref), rtol=1e-5)
  # bf16 logits are upcast: the result is float32.
  got16 = lm.cross_entropy_with_label_smoothing(
      jnp.asarray(logits, jnp.bfloat16), jnp.asarray(labels), jnp.asarray(labels != -100), eps)
  assert got16.dtype == jnp.float32


def test_cross_entropy_all_masked_is_zero():
  got = lm.cross_entropy_with_label_smoothing(jnp.ones((2, 5)), jnp.array([1, 2]),
                                              jnp.array([False, False]), 0.1)
  assert float(got) == 0.0


def test_itg_inputs():
  ids = jnp.array([[101, 5, 6, 102], [101, 7, 102, 0]], jnp.int32)
  dec = lm.itg_inputs(ids, 30522)
  assert dec.tolist() == [[30522, 5, 6, 102], [30522, 7, 102, 0]] and dec.dtype == jnp.int32


def test_itg_loss_by_hand():
  rng = np.random.default_rng(9)
  b, t, v = 2, 4, 5
  logits = rng.normal(size=(b, t, v))
  ids = np.array([[4, 1, 2, 3], [4, 2, 3, 0]])      # second row: last token is a pad
  mask = np.array([[1, 1, 1, 1], [1, 1, 1, 0]])
  flat_logits, flat_labels, flat_mask = [], [], []
  for i in range(b):
    for pos in range(t - 1):                         # logits at pos predict ids at pos + 1
      flat_logits.append(logits[i, pos])
      flat_labels.append(ids[i, pos + 1])
      flat_mask.append(mask[i, pos + 1] == 1)
  expected = _hand_smoothed_ce(flat_logits, flat_labels, flat_mask, 0.1)
  got = lm.itg_loss(jnp.asarray(logits), jnp.asarray(ids), jnp.asarray(mask))
  np.testing.assert_allclose(float(got), expected, rtol=1e-6)
  # Pads' logits and labels do not matter.
  logits2 = logits.copy()
  logits2[1, 2] += 100.0
  got2 = lm.itg_loss(jnp.asarray(logits2), jnp.asarray(ids), jnp.asarray(mask))
  np.testing.assert_allclose(float(got2), float(got), rtol=1e-6)


def test_next_token_loss_matches_torch():
  rng = np.random.default_rng(10)
  logits = rng.normal(size=(2, 3, 5)).astype(np.float32)
  targets = rng.integers(0, 5, size=(2, 3))
  loss_mask = np.array([[0, 1, 1], [1, 1, 0]])
  ref_labels = np.where(loss_mask == 1, targets, -100)
  ref = F.cross_entropy(torch.tensor(logits).reshape(-1, 5), torch.tensor(ref_labels).reshape(-1))
  got = jax.jit(lm.next_token_loss)(jnp.asarray(logits), jnp.asarray(targets),
                                    jnp.asarray(loss_mask))
  np.testing.assert_allclose(float(got), float(ref), rtol=1e-6)
