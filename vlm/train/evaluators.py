"""BLIP-2 zero-shot image-text retrieval evaluation (LAVIS ``compute_sim_matrix``; spec section 7.1).

ITC ranks every text for every image (and the reverse) by the max-over-queries cosine; the top
``k_test`` candidates of each row are re-scored with ``ITM positive logit + ITC similarity``;
recall@1/5/10 are reported in both directions beside the recall of a random ranking.
All model calls are jitted once per shape: inputs are cut into fixed-size chunks and the last
chunk is padded.
"""
from __future__ import annotations

import logging
import time
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np

from vlm.inference import retrieval

log = logging.getLogger("vlm.eval")


def _chunked(fn: Callable, arrays: tuple[np.ndarray, ...], batch_size: int) -> np.ndarray:
  """Applies ``fn(*chunk)`` over the leading axis in fixed-size chunks (last one padded)."""
  n = arrays[0].shape[0]
  outs = []
  for start in range(0, n, batch_size):
    chunk = [a[start:start + batch_size] for a in arrays]
    m = chunk[0].shape[0]
    if m < batch_size:
      chunk = [np.concatenate([c, np.repeat(c[-1:], batch_size - m, axis=0)]) for c in chunk]
    outs.append(np.asarray(jax.device_get(fn(*chunk)))[:m])
  return np.concatenate(outs)


class Blip2RetrievalModel:
  """Jitted feature and ITM functions of a :class:`vlm.models.blip2.Blip2Stage1`."""

  def __init__(self, model, params, batch_size: int = 64):
    self.batch_size = batch_size
    variables = {"params": params}
    self._embed = jax.jit(lambda x: model.apply(variables, x, method=model.encode_image))
    self._img = jax.jit(lambda e: model.apply(variables, e, method=model.image_features)[1])
    self._txt = jax.jit(lambda i, m: model.apply(variables, i, m, method=model.text_features)[1])
    self._itm = jax.jit(lambda e, i, m: model.apply(variables, e, i, m,
                                                    method=model.itm_logits)[:, 1])

  def image_embeds(self, pixel_values: np.ndarray) -> np.ndarray:
    """[N,S,S,3] -> image_embeds [N,Nv,Dv] (host)."""
    return _chunked(self._embed, (pixel_values,), self.batch_size)

  def image_feats(self, image_embeds: np.ndarray) -> np.ndarray:
    """[N,Nv,Dv] -> l2-normalised per-query features [N,Q,E]."""
    return _chunked(self._img, (image_embeds,), self.batch_size)

  def text_feats(self, input_ids: np.ndarray, attention_mask: np.ndarray) -> np.ndarray:
    """[M,T] -> l2-normalised [CLS] features [M,E]."""
    return _chunked(self._txt, (input_ids, attention_mask), self.batch_size)

  def itm_scores(self, image_embeds, input_ids, attention_mask) -> np.ndarray:
    """Paired ITM positive-class logits [n] for aligned rows."""
    return _chunked(self._itm, (image_embeds, input_ids, attention_mask), self.batch_size)


def evaluate_retrieval(model, params, data: dict[str, Any], *, k_test: int,
                       batch_size: int = 64) -> dict[str, float]:
  """Zero-shot retrieval on one split.

  Args:
    model, params: a Blip2Stage1 and its parameters.
    data: from ``vlm.data.pipeline.build_retrieval_eval_data``: ``pixel_values`` [N,S,S,3],
      ``input_ids``/``attention_mask`` [M,T], ``img2txt`` (list of caption indices per image),
      ``txt2img`` [M].
    k_test: candidates re-ranked by ITM per row (LAVIS uses 128 on COCO 5k).
    batch_size: chunk size of every jitted call.
  Returns:
    ``i2t_r1, i2t_r5, i2t_r10, t2i_r1, t2i_r5, t2i_r10, r_mean`` (percent) for ITC+ITM, the same
    prefixed ``itc_`` for the ITC ranking alone, and ``chance_*`` for a random ranking.
  """
  t0 = time.perf_counter()
  rm = Blip2RetrievalModel(model, params, batch_size)
  embeds = rm.image_embeds(np.asarray(data["pixel_values"]))
  img_f = rm.image_feats(embeds)
  txt_f = rm.text_feats(np.asarray(data["input_ids"]), np.asarray(data["attention_mask"]))
  sims = np.einsum("iqe,te->itq", img_f, txt_f).max(-1)
  ids = np.asarray(data["input_ids"])
  mask = np.asarray(data["attention_mask"])

  def itm_score_fn(image_index, text_index):
    image_index = np.asarray(image_index)
    text_index = np.asarray(text_index)
    return rm.itm_scores(embeds[image_index], ids[text_index], mask[text_index])

  k = min(k_test, sims.shape[0], sims.shape[1])
  scores_i2t, scores_t2i = retrieval.rerank_top_k(sims, k, itm_score_fn)
  txt2img = np.asarray(data["txt2img"])
  img2txt = data["img2txt"]
  out = retrieval.recall_at_k(np.asarray(scores_i2t), np.asarray(scores_t2i), img2txt, txt2img)
  itc = retrieval.recall_at_k(sims, sims.T, img2txt, txt2img)
  chance = retrieval.chance_recall(sims.shape[0], sims.shape[1], img2txt)
  result = {k_: float(v) for k_, v in out.items()}
  result.update({f"itc_{k_}": float(v) for k_, v in itc.items()})
  result.update({f"chance_{k_}": float(v) for k_, v in chance.items()})
  result["seconds"] = time.perf_counter() - t0
  return result


def format_results(split: str, r: dict[str, float], n_img: int, n_txt: int) -> str:
  """A small table: recall@1/5/10 both ways for ITC+ITM, ITC alone and chance."""
  rows = [f"zero-shot retrieval, {split} split ({n_img} images, {n_txt} captions):",
          f"  {'':10s} {'i2t R@1':>8s} {'R@5':>7s} {'R@10':>7s}   {'t2i R@1':>8s} {'R@5':>7s} "
          f"{'R@10':>7s}"]
  for name, p in (("ITC+ITM", ""), ("ITC only", "itc_"), ("chance", "chance_")):
    rows.append(f"  {name:10s} {r[p + 'i2t_r1']:8.2f} {r[p + 'i2t_r5']:7.2f} "
                f"{r[p + 'i2t_r10']:7.2f}   {r[p + 't2i_r1']:8.2f} {r[p + 't2i_r5']:7.2f} "
                f"{r[p + 't2i_r10']:7.2f}")
  return "\n".join(rows)


def run_retrieval_evals(model, params, config, writer=None, step: int = 0) -> dict[str, Any]:
  """Runs retrieval on every split in ``config.eval.splits``; prints and logs the results."""
  from vlm.data import pipeline as data_pipeline
  results = {}
  for split in config.eval.splits:
    data = data_pipeline.build_retrieval_eval_data(config.data, split=split)
    r = evaluate_retrieval(model, params, data, k_test=config.eval.k_test,
                           batch_size=config.eval.batch_size)
    n_img, n_txt = len(data["img2txt"]), len(data["txt2img"])
    print(format_results(split, r, n_img, n_txt), flush=True)
    if writer is not None:
      writer.write(step, {k: v for k, v in r.items() if not k.startswith("chance_")},
                   prefix=f"eval_{split}")
    results[split] = dict(r, num_images=n_img, num_texts=n_txt)
  return results
