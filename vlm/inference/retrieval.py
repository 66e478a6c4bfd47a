"""Image-text retrieval scoring and metrics (host-side numpy, pure functions).

Source: BLIP-2 spec section 7.1; LAVIS ``lavis/models/blip2_models/blip2_qformer.py``
(``compute_sim_matrix``) and ``lavis/tasks/retrieval.py`` (``_report_metrics``).

Named axes: ``N_img`` images, ``N_txt`` texts (captions). ``img2txt[i]`` lists the ground-truth
caption indices of image ``i``; ``txt2img[t]`` is the image of caption ``t``.
"""
from __future__ import annotations

from typing import Callable, Sequence

import numpy as np

KS = (1, 5, 10)


def _ragged(img2txt, n_img: int | None = None, n_txt: int | None = None) -> list[np.ndarray]:
  """Normalises ``img2txt`` (list of lists, or a 2-D int array padded with negative values)."""
  if isinstance(img2txt, np.ndarray) and img2txt.ndim == 2:
    rows = [r[r >= 0] for r in img2txt]
  else:
    rows = [np.asarray(r, dtype=np.int64).reshape(-1) for r in img2txt]
  if n_img is not None and len(rows) != n_img:
    raise ValueError(f"img2txt has {len(rows)} entries but there are {n_img} images; give one list "
                     "of ground-truth caption indices per image")
  for i, r in enumerate(rows):
    if r.size == 0:
      raise ValueError(f"image {i} has no ground-truth caption in img2txt; every image needs one")
    if n_txt is not None and (r.min() < 0 or r.max() >= n_txt):
      raise ValueError(f"img2txt[{i}] = {r.tolist()} has indices outside [0, {n_txt})")
  return rows


def _ranks_of(scores: np.ndarray, gt: np.ndarray) -> np.ndarray:
  """0-based rank of column ``gt[r]`` in row ``r`` of ``scores`` (descending, ties: lower index)."""
  s_gt = scores[np.arange(scores.shape[0]), gt][:, None]
  cols = np.arange(scores.shape[1])[None, :]
  better = (scores > s_gt) | ((scores == s_gt) & (cols < gt[:, None]))
  return better.sum(axis=1)


def _summary(i2t_ranks: np.ndarray, t2i_ranks: np.ndarray, ks=KS) -> dict[str, float]:
  out = {}
  for name, ranks in (("i2t", i2t_ranks), ("t2i", t2i_ranks)):
    vals = [100.0 * float(np.mean(ranks < k)) for k in ks]
    for k, v in zip(ks, vals):
      out[f"{name}_r{k}"] = v
    out[f"{name}_mean"] = float(np.mean(vals))
  out["r_mean"] = out["mean"] = (out["i2t_mean"] + out["t2i_mean"]) / 2.0
  return out


def recall_at_k(scores_i2t, scores_t2i, img2txt, txt2img, *, chunk: int = 256) -> dict[str, float]:
  """Retrieval recall@{1,5,10} in percent, LAVIS ``_report_metrics`` semantics.

  i2t: an image is a hit at K if ANY of its ground-truth captions ranks within the top K (its rank
  is the best rank among its captions). t2i: a caption is a hit at K if its image ranks within the
  top K. Ranking is by descending score; ties are broken towards the lower index (a stable
  descending sort; LAVIS' ``np.argsort(...)[::-1]`` leaves ties implementation-defined).

  Args:
    scores_i2t: [N_img, N_txt] float scores (higher = better match).
    scores_t2i: [N_txt, N_img] float scores, or None for ``scores_i2t.T`` (they differ after
      re-ranking, see :func:`rerank_top_k`).
    img2txt: ``N_img`` sequences of ground-truth caption indices (ragged), or an [N_img, G] int
      array padded with negative values.
    txt2img: [N_txt] int, image index of each caption.
    chunk: rows processed at once (memory bound).
  Returns:
    dict with ``i2t_r1, i2t_r5, i2t_r10, i2t_mean, t2i_r1, t2i_r5, t2i_r10, t2i_mean, r_mean,
    mean`` (floats in percent; ``*_mean`` = mean of the three recalls; ``r_mean`` (LAVIS name) and
    its alias ``mean`` = ``(i2t_mean + t2i_mean) / 2``).
  Raises:
    ValueError: on shape mismatches or out-of-range / missing ground truth.
  """
  scores_i2t = np.asarray(scores_i2t)
  if scores_i2t.ndim != 2:
    raise ValueError(f"scores_i2t must be [N_img, N_txt], got shape {scores_i2t.shape}")
  n_img, n_txt = scores_i2t.shape
  scores_t2i = scores_i2t.T if scores_t2i is None else np.asarray(scores_t2i)
  if scores_t2i.shape != (n_txt, n_img):
    raise ValueError(f"scores_t2i must be [N_txt, N_img] = {(n_txt, n_img)}, got "
                     f"{scores_t2i.shape}")
  rows = _ragged(img2txt, n_img, n_txt)
  txt2img = np.asarray(txt2img, dtype=np.int64).reshape(-1)
  if txt2img.shape != (n_txt,) or txt2img.min() < 0 or txt2img.max() >= n_img:
    raise ValueError(f"txt2img must be [N_txt] = ({n_txt},) with values in [0, {n_img}), got shape "
                     f"{txt2img.shape}")
  # i2t: flatten (image, gt caption) pairs, rank each, keep the best per image.
  pair_img = np.concatenate([np.full(r.size, i) for i, r in enumerate(rows)])
  pair_txt = np.concatenate(rows)
  pair_rank = np.empty(pair_img.size, np.int64)
  for s in range(0, pair_img.size, chunk):
    sl = slice(s, s + chunk)
    pair_rank[sl] = _ranks_of(scores_i2t[pair_img[sl]], pair_txt[sl])
  i2t_ranks = np.full(n_img, np.iinfo(np.int64).max)
  np.minimum.at(i2t_ranks, pair_img, pair_rank)
  t2i_ranks = np.empty(n_txt, np.int64)
  for s in range(0, n_txt, chunk):
    sl = slice(s, s + chunk)
    t2i_ranks[sl] = _ranks_of(scores_t2i[sl], txt2img[sl])
  return _summary(i2t_ranks, t2i_ranks)


def chance_recall(n_img: int, n_txt: int, img2txt) -> dict[str, float]:
  """Expected recall@{1,5,10} (percent) of a uniformly random ranking.

  Same keys as :func:`recall_at_k`.

  i2t: an image with ``g`` ground-truth captions is a hit at K with probability
  ``1 - C(n_txt - g, K) / C(n_txt, K) = 1 - prod_{t<g} (n_txt - K - t) / (n_txt - t)``, averaged
  over images. t2i: ``min(K, n_img) / n_img`` (one ground-truth image per caption).

  Args:
    n_img: number of images.
    n_txt: number of captions.
    img2txt: as in :func:`recall_at_k` (only the counts per image are used).
  Returns:
    dict of floats in percent.
  Raises:
    ValueError: if ``img2txt`` does not have ``n_img`` non-empty entries.
  """
  rows = _ragged(img2txt, n_img, n_txt)
  counts = [r.size for r in rows]

  def p_hit(g: int, k: int) -> float:
    k = min(k, n_txt)
    miss = 1.0
    for t in range(g):
      miss *= max(n_txt - k - t, 0) / (n_txt - t)
    return 1.0 - miss

  out = {}
  i2t = [100.0 * float(np.mean([p_hit(g, k) for g in counts])) for k in KS]
  t2i = [100.0 * min(k, n_img) / n_img for k in KS]
  for name, vals in (("i2t", i2t), ("t2i", t2i)):
    for k, v in zip(KS, vals):
      out[f"{name}_r{k}"] = v
    out[f"{name}_mean"] = float(np.mean(vals))
  out["r_mean"] = out["mean"] = (out["i2t_mean"] + out["t2i_mean"]) / 2.0
  return out


# Entries outside the ITM shortlist score ``sims - OUTSIDE_OFFSET``: far below any shortlisted
# ``itm_logit + sims`` (cosines are in [-1, 1] and ITM logits are O(10)).
OUTSIDE_OFFSET = 1e4


def rerank_top_k(sims, k: int,
                 itm_score_fn: Callable[[np.ndarray, np.ndarray], Sequence[float]]):
  """Two-stage retrieval scores: ITC shortlist, re-scored by ITM (LAVIS ``compute_sim_matrix``).

  For each image the top-``k`` texts by ``sims`` get ``itm_score(image, text) + sims[image, text]``;
  symmetrically for each text over images. Every other entry is ``sims - OUTSIDE_OFFSET``: below
  every shortlisted entry, in ITC order. LAVIS writes -100 there instead, which only matters when
  ``k`` is smaller than the largest recall@K reported (LAVIS uses k=128 >= 10); keeping the ITC
  order makes recall@10 meaningful for the small ``k`` of CPU runs and changes nothing otherwise.
  ``itm_score_fn`` is called ONCE with the distinct shortlisted pairs (a pair shortlisted in both
  directions is scored once); the caller batches the model calls itself.

  Args:
    sims: [N_img, N_txt] float, ITC similarities (raw cosine max over queries, no temperature).
    k: shortlist size (LAVIS ``k_test``, 128 for COCO); clipped to the number of candidates.
    itm_score_fn: ``(image_indices [n] int64, text_indices [n] int64) -> [n]`` float, the ITM
      positive-class logit averaged over the queries for each pair.
  Returns:
    ``(scores_i2t [N_img, N_txt], scores_t2i [N_txt, N_img])`` float32 numpy arrays.
  Raises:
    ValueError: if ``sims`` is not 2-D, ``k < 1``, or ``itm_score_fn`` returns the wrong shape.
  Source: spec section 7.1 steps 3-5.
  """
  sims = np.asarray(sims, dtype=np.float32)
  if sims.ndim != 2:
    raise ValueError(f"sims must be [N_img, N_txt], got shape {sims.shape}")
  if k < 1:
    raise ValueError(f"k must be >= 1, got {k}")
  n_img, n_txt = sims.shape
  k_t, k_i = min(k, n_txt), min(k, n_img)
  top_txt = np.argpartition(-sims, k_t - 1, axis=1)[:, :k_t]          # [N_img, k_t]
  top_img = np.argpartition(-sims.T, k_i - 1, axis=1)[:, :k_i]        # [N_txt, k_i]
  i2t_img = np.repeat(np.arange(n_img), k_t)
  i2t_txt = top_txt.reshape(-1)
  t2i_txt = np.repeat(np.arange(n_txt), k_i)
  t2i_img = top_img.reshape(-1)
  flat = np.concatenate([i2t_img * n_txt + i2t_txt, t2i_img * n_txt + t2i_txt]).astype(np.int64)
  pairs, inverse = np.unique(flat, return_inverse=True)
  image_idx, text_idx = pairs // n_txt, pairs % n_txt
  itm = np.asarray(itm_score_fn(image_idx, text_idx), dtype=np.float32).reshape(-1)
  if itm.shape != image_idx.shape:
    raise ValueError(f"itm_score_fn returned {itm.size} scores for {image_idx.size} pairs; it must "
                     "return one score per (image, text) pair")
  itm = itm[inverse]
  itm_i2t, itm_t2i = itm[:i2t_img.size], itm[i2t_img.size:]
  scores_i2t = sims - OUTSIDE_OFFSET
  scores_i2t[i2t_img, i2t_txt] = itm_i2t + sims[i2t_img, i2t_txt]
  scores_t2i = sims.T - OUTSIDE_OFFSET
  scores_t2i[t2i_txt, t2i_img] = itm_t2i + sims[t2i_img, t2i_txt]
  return scores_i2t.astype(np.float32), scores_t2i.astype(np.float32)
