"""Tests for vlm.inference.retrieval: recall@K, chance level and ITM re-ranking."""
import itertools
import math

import numpy as np
import pytest

from vlm.inference import retrieval


# 3 images, 4 captions: image 0 -> captions {0, 1}, image 1 -> {2}, image 2 -> {3}.
IMG2TXT = [[0, 1], [2], [3]]
TXT2IMG = [0, 0, 1, 2]
SCORES = np.array([
    [0.1, 0.9, 0.3, 0.2],    # image 0: order 1,2,3,0 -> best GT (caption 1) at rank 0
    [0.8, 0.7, 0.6, 0.1],    # image 1: order 0,1,2,3 -> GT caption 2 at rank 2
    [0.5, 0.4, 0.3, 0.2],    # image 2: order 0,1,2,3 -> GT caption 3 at rank 3
])


def test_recall_hand_case():
  # i2t ranks [0, 2, 3]: R@1 = 1/3, R@5 = R@10 = 3/3.
  # t2i (columns): caption 0 -> order imgs 1,2,0 -> GT 0 at rank 2; caption 1 -> order 0,1,2 -> 0;
  # caption 2 -> order 1,0,2 (0.6 > 0.3 = 0.3: tie between images 0 and 2, lower index first) -> 0;
  # caption 3 -> order 0,2,1 (0.2 = 0.2 tie, lower index first) -> GT 2 at rank 1.
  # t2i ranks [2, 0, 0, 1]: R@1 = 2/4, R@5 = R@10 = 4/4.
  r = retrieval.recall_at_k(SCORES, None, IMG2TXT, TXT2IMG)
  assert r["i2t_r1"] == pytest.approx(100 / 3)
  assert r["i2t_r5"] == pytest.approx(100.0) and r["i2t_r10"] == pytest.approx(100.0)
  assert r["t2i_r1"] == pytest.approx(50.0)
  assert r["t2i_r5"] == pytest.approx(100.0) and r["t2i_r10"] == pytest.approx(100.0)
  i2t_mean = (100 / 3 + 200) / 3
  t2i_mean = (50 + 200) / 3
  assert r["i2t_mean"] == pytest.approx(i2t_mean) and r["t2i_mean"] == pytest.approx(t2i_mean)
  assert r["r_mean"] == r["mean"] == pytest.approx((i2t_mean + t2i_mean) / 2)


def test_recall_padded_img2txt_and_separate_t2i():
  padded = np.array([[0, 1], [2, -1], [3, -1]])
  assert (retrieval.recall_at_k(SCORES, None, padded, TXT2IMG)
          == retrieval.recall_at_k(SCORES, None, IMG2TXT, TXT2IMG))
  # A separate t2i matrix that ranks every caption's image first.
  t2i = np.zeros((4, 3))
  t2i[np.arange(4), TXT2IMG] = 1.0
  r = retrieval.recall_at_k(SCORES, t2i, IMG2TXT, TXT2IMG, chunk=1)
  assert r["t2i_r1"] == pytest.approx(100.0) and r["i2t_r1"] == pytest.approx(100 / 3)


def _lavis_style_recall(scores_i2t, scores_t2i, img2txt, txt2img):
  """Reference with explicit loops in the style of LAVIS _report_metrics (stable sort)."""
  i2t = []
  for i, row in enumerate(scores_i2t):
    order = sorted(range(len(row)), key=lambda j: -row[j])
    i2t.append(min(order.index(t) for t in img2txt[i]))
  t2i = []
  for t, row in enumerate(scores_t2i):
    order = sorted(range(len(row)), key=lambda j: -row[j])
    t2i.append(order.index(txt2img[t]))
  return {f"{n}_r{k}": 100.0 * sum(r < k for r in ranks) / len(ranks)
          for n, ranks in (("i2t", i2t), ("t2i", t2i)) for k in (1, 5, 10)}


def test_recall_random_vs_loops():
  rng = np.random.default_rng(0)
  n_img, per = 12, 3
  txt2img = np.repeat(np.arange(n_img), per)
  rng.shuffle(txt2img)
  img2txt = [np.flatnonzero(txt2img == i).tolist() for i in range(n_img)]
  scores = rng.normal(size=(n_img, len(txt2img)))
  ref = _lavis_style_recall(scores, scores.T, img2txt, txt2img)
  got = retrieval.recall_at_k(scores, scores.T, img2txt, txt2img, chunk=5)
  for key, v in ref.items():
    assert got[key] == pytest.approx(v), key


def test_recall_errors():
  with pytest.raises(ValueError, match="no ground-truth"):
    retrieval.recall_at_k(SCORES, None, [[0, 1], [], [3]], TXT2IMG)
  with pytest.raises(ValueError, match="outside"):
    retrieval.recall_at_k(SCORES, None, [[0, 9], [2], [3]], TXT2IMG)
  with pytest.raises(ValueError, match="txt2img"):
    retrieval.recall_at_k(SCORES, None, IMG2TXT, [0, 0, 1])
  with pytest.raises(ValueError, match="img2txt has"):
    retrieval.recall_at_k(SCORES, None, IMG2TXT[:2], TXT2IMG)


def test_chance_recall_exact_enumeration():
  # Enumerate every ranking of the captions (4! = 24) and of the images (3! = 6): exact expectation.
  n_img, n_txt = 3, 4
  ks = (1, 5, 10)
  i2t = {k: 0.0 for k in ks}
  perms = list(itertools.permutations(range(n_txt)))
  for gt in IMG2TXT:
    for k in ks:
      hits = sum(any(p.index(t) < k for t in gt) for p in perms)
      i2t[k] += hits / len(perms) / n_img
  t2i = {k: 0.0 for k in ks}
  img_perms = list(itertools.permutations(range(n_img)))
  for img in TXT2IMG:
    for k in ks:
      t2i[k] += sum(p.index(img) < k for p in img_perms) / len(img_perms) / n_txt
  got = retrieval.chance_recall(n_img, n_txt, IMG2TXT)
  for k in ks:
    assert got[f"i2t_r{k}"] == pytest.approx(100 * i2t[k])
    assert got[f"t2i_r{k}"] == pytest.approx(100 * t2i[k])
  # i2t R@1 by hand: image 0 has 2 of 4 captions (1/2), the others 1 of 4 (1/4) -> (1/2+1/4+1/4)/3.
  assert got["i2t_r1"] == pytest.approx(100 * (0.5 + 0.25 + 0.25) / 3)


def test_chance_recall_monte_carlo():
  rng = np.random.default_rng(1)
  n_img, per = 40, 5
  txt2img = np.repeat(np.arange(n_img), per)
  img2txt = [list(range(i * per, (i + 1) * per)) for i in range(n_img)]
  acc = {}
  trials = 200
  for _ in range(trials):
    r = retrieval.recall_at_k(rng.random((n_img, n_img * per)), None, img2txt, txt2img)
    for key, v in r.items():
      acc[key] = acc.get(key, 0.0) + v / trials
  exact = retrieval.chance_recall(n_img, n_img * per, img2txt)
  # Closed form for K = 5 with g = 5 of 200 captions.
  assert exact["i2t_r5"] == pytest.approx(100 * (1 - math.comb(195, 5) / math.comb(200, 5)))
  assert exact["t2i_r10"] == pytest.approx(100 * 10 / 40)
  for key in exact:
    assert acc[key] == pytest.approx(exact[key], abs=2.5), key


def test_rerank_top_k():
  sims = np.array([
      [0.9, 0.1, 0.5, 0.3],
      [0.2, 0.8, 0.4, 0.6],
      [0.7, 0.0, 0.2, 0.95],
  ], np.float32)
  calls = []

  def itm_score(img_idx, txt_idx):
    calls.append((np.array(img_idx), np.array(txt_idx)))
    return 10.0 * img_idx + txt_idx                     # deterministic, easy to check

  scores_i2t, scores_t2i = retrieval.rerank_top_k(sims, 2, itm_score)
  # One call with the distinct shortlisted pairs: 6 i2t + 8 t2i pairs, 6 of them shared.
  assert len(calls) == 1
  got_pairs = set(zip(calls[0][0].tolist(), calls[0][1].tolist()))
  assert got_pairs == {(0, 0), (0, 1), (0, 2), (1, 1), (1, 2), (1, 3), (2, 0), (2, 3)}
  assert scores_i2t.shape == (3, 4) and scores_t2i.shape == (4, 3)
  top_txt = {0: {0, 2}, 1: {1, 3}, 2: {0, 3}}
  for i in range(3):
    for t in range(4):
      want = 10.0 * i + t + sims[i, t] if t in top_txt[i] else sims[i, t] - 1e4
      assert scores_i2t[i, t] == pytest.approx(want), (i, t)
  top_img = {0: {0, 2}, 1: {1, 0}, 2: {0, 1}, 3: {2, 1}}
  for t in range(4):
    for i in range(3):
      want = 10.0 * i + t + sims[i, t] if i in top_img[t] else sims[i, t] - 1e4
      assert scores_t2i[t, i] == pytest.approx(want), (t, i)
  # Outside the shortlist the ITC order is kept, below every shortlisted entry.
  assert scores_i2t[0].argsort()[::-1].tolist()[2:] == [3, 1]
  # k larger than the candidate count scores everything.
  full_i2t, full_t2i = retrieval.rerank_top_k(sims, 128, lambda a, b: np.zeros(len(a)))
  np.testing.assert_allclose(full_i2t, sims)
  np.testing.assert_allclose(full_t2i, sims.T)
  with pytest.raises(ValueError, match="one score per"):
    retrieval.rerank_top_k(sims, 2, lambda a, b: np.zeros(3))
