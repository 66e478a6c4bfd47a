"""Qwen3-VL / Qwen3-VL-MoE / Qwen2.5-VL training as a task of the trainer (stages A, B, C, SFT).

One recipe module for every Qwen-VL stage; a stage is a config (``configs/qwen3_vl/*.py``, built
by :func:`qwen_vl_config`):

* **A** (vision-language alignment): the ViT, the patch merger and the DeepStack mergers train,
  the LLM is frozen; variant ``merger_only`` trains only the mergers (the Qwen3-VL report's first
  stage, arXiv:2511.21631 section 3). Pre-training rows: image + caption, loss on the caption.
* **B** (multimodal pre-training): everything trains, 8,192-token packed rows.
* **C** (long context): everything trains, 32,768-token packed rows (chunked attention).
* **SFT** (instruction tuning): everything trains on chat turns, loss on assistant tokens only.

Pieces: the model is :class:`vlm.models.qwen3_vl.Qwen3VL` (or ``Qwen2_5_VL``) from a preset or an
HF ``config.json``; the data is the packed, checkpointable stream of
:func:`vlm.data.qwen_batch.build_qwen_train_loader` (batch schema in :mod:`vlm.data.packing`);
the loss is next-token cross-entropy over ``loss_mask`` tokens from the final hidden states in
sequence chunks (:func:`vlm.objectives.lm.chunked_next_token_loss`, never ``[B, L, V]`` float32
logits) plus, for MoE models, ``router_aux_loss_coef`` x the load-balancing loss of HF
``load_balancing_loss_func`` (:func:`vlm.objectives.moe.load_balancing_loss`, padding masked);
initial weights come from an HF directory (:func:`vlm.convert.hf_qwen3_vl.load_hf_qwen3_vl`)
placed leaf by leaf into their shardings; evaluation is the held-out loss and greedy captions of
the held-out COCO photos scored with CIDEr / BLEU-4 beside the most-frequent-caption baseline.

Loss normalisation: the token losses are summed over the global batch and divided by its number
of loss tokens (``metrics["loss_weight"]`` carries that count, so gradient accumulation over
microbatches gives exactly the big-batch gradient). This equals HF
``Qwen3VLForConditionalGeneration(labels=...)`` for the same batch (HF shifts ``labels`` on the
device; here the batch builder shifts them on the host inside each packed sample).
"""
from __future__ import annotations

import dataclasses
import json
import logging
import os
from typing import Any, Mapping

import flax
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from vlm.nn import partitioning as P

log = logging.getLogger("vlm.train")

LOG_KEYS = ("loss", "nll", "aux_loss", "accuracy")
THROUGHPUT_UNIT = "tokens"

# Parameter groups by path (the "vision" group includes the patch embedding, the learned
# position table and the DeepStack mergers: everything under ``visual/``).
VISION = r"^visual/"
MERGERS = r"^visual/(merger|deepstack_merger_list_\d+)/"
LLM = r"^(language_model|lm_head)/"
FROZEN = {
    "a": [LLM],
    "a_merger_only": [LLM, r"^visual/(?!(merger|deepstack_merger_list_\d+)/)"],
    "b": [],
    "c": [],
    "sft": [],
}


def dtype_of(name: str):
  """``"float32" | "bfloat16" | "float16"`` -> the jnp dtype. Raises ValueError otherwise."""
  try:
    return {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}[name]
  except KeyError:
    raise ValueError(f"dtype must be float32, bfloat16 or float16, got {name!r}") from None


def model_config(config):
  """The :class:`~vlm.models.qwen3_vl.Qwen3VLConfig` (or ``Qwen2_5_VLConfig``) of the run: the
  ``config.json`` of ``config.init.hf_checkpoint`` when set, else ``config.model.preset``; text
  fields in ``config.model.text_overrides`` (e.g. ``moe_implementation``) are replaced.

  Raises:
    FileNotFoundError: an HF directory without ``config.json``.
    KeyError: an unknown preset (the known ones are listed).
  """
  from vlm.convert.hf_qwen3_vl import config_from_hf
  from vlm.models import presets
  hf_dir = config.init.get("hf_checkpoint", "")
  if hf_dir:
    path = os.path.join(hf_dir, "config.json")
    if not os.path.isfile(path):
      raise FileNotFoundError(f"config.init.hf_checkpoint={hf_dir!r} has no config.json; pass an "
                              "HF save_pretrained directory of Qwen3-VL, Qwen3-VL-MoE or "
                              "Qwen2.5-VL")
    with open(path) as fh:
      cfg = config_from_hf(json.load(fh))
  else:
    cfg = presets.get_preset(config.model.preset)
  overrides = dict(config.model.get("text_overrides", {}) or {})
  if overrides:
    cfg = dataclasses.replace(cfg, text=dataclasses.replace(cfg.text, **overrides))
  return cfg


def build_model(config):
  """``Qwen3VL`` / ``Qwen2_5_VL`` with the run's dtypes and ``scan_layers`` / ``remat`` /
  ``scan_vision`` (``config.model.*``; ``scan_vision`` absent = False)."""
  from vlm.models.qwen3_vl import Qwen2_5_VL, Qwen2_5_VLConfig, Qwen3VL
  cfg = model_config(config)
  cls = Qwen2_5_VL if isinstance(cfg, Qwen2_5_VLConfig) else Qwen3VL
  return cls(cfg, dtype=dtype_of(config.model.dtype), param_dtype=dtype_of(config.model.param_dtype),
             scan_layers=bool(config.model.get("scan_layers", False)),
             remat=bool(config.model.get("remat", False)),
             scan_vision=bool(config.model.get("scan_vision", False)))


def _pad_token_id(config) -> int:
  from vlm.data import qwen_processor as qp
  return qp.Qwen3Tokenizer(config.data.get("tokenizer_file", qp.DEFAULT_TOKENIZER_FILE)).pad_token_id


def example_batch(config, batch_size: int = 1) -> dict[str, Any]:
  """An all-padding batch of the packed schema (:func:`vlm.data.packing.empty_batch`)."""
  from vlm.data import packing
  cfg = model_config(config)
  return packing.empty_batch(batch_size, int(config.data.max_length), int(config.data.max_patches),
                             cfg.vision, _pad_token_id(config))


def _model_args(batch):
  return (batch["input_ids"], batch["position_ids"], None, batch["pixel_values"], batch["vision"],
          batch["visual_token_index"])


def init_model(model, rng, batch):
  """``model.init`` on an example batch -> boxed params (every vision and text parameter)."""
  return model.init(rng, *_model_args(batch), segment_ids=batch["segment_ids"])["params"]


def batch_axes(config) -> dict[str, Any]:
  """Logical axes of the packed schema: rows split over the data-parallel axes, the token axis
  of the token-level arrays (ids, segment ids, positions [3, B, L], labels, loss mask,
  ``visual_token_index``) over the context-parallel axis (logical ``SEQUENCE`` -> mesh
  ``context``); the patch buffers and vision tables stay whole per row (replicated over
  ``context``: every context shard picks its own tokens' features from the row's merged
  features)."""
  from vlm.models.qwen_vit import Qwen2_5_VLVisionConfig
  cfg = model_config(config)
  if isinstance(cfg.vision, Qwen2_5_VLVisionConfig):
    vision = {"segment_ids": (P.BATCH, None), "rope_positions": (P.BATCH, None, None),
              "window_index": (P.BATCH, None), "window_inverse": (P.BATCH, None),
              "window_segment_ids": (P.BATCH, None)}
  else:
    vision = {"segment_ids": (P.BATCH, None), "rope_positions": (P.BATCH, None, None),
              "pos_embed_index": (P.BATCH, None, None), "pos_embed_weight": (P.BATCH, None, None)}
  row = (P.BATCH, P.SEQUENCE)
  return {"input_ids": row, "segment_ids": row, "position_ids": (None, P.BATCH, P.SEQUENCE),
          "labels": row, "loss_mask": row, "pixel_values": (P.BATCH, None, None),
          "vision": vision, "visual_token_index": row}


def count_units(batch) -> int:
  """Real (non-padding) tokens of a host batch."""
  return int((np.asarray(batch["segment_ids"]) > 0).sum())


def train_data(config, *, seed: int, process_index: int, process_count: int):
  """The packed Qwen stream of this process and its bad-sample statistics."""
  from vlm.data import qwen_batch
  loader = qwen_batch.build_qwen_train_loader(
      config.data, model_config(config), global_batch_size=config.global_batch_size, seed=seed,
      process_index=process_index, process_count=process_count)
  stats = dict(loader.loader_stats)
  log.info("training data: %d samples kept", len(loader.samples))
  return iter(loader), stats


def validate(config) -> None:
  """Checks before compiling: the held-out photos and captions of the evaluation exist and
  decode (a bad one fails now, not after training)."""
  if not config.eval.at_end or not config.eval.get("caption_split", ""):
    return
  from vlm.data import pipeline as data_pipeline
  summary = data_pipeline.validate_retrieval_split(config.eval.data, config.eval.caption_split)
  log.info("evaluation split %s: %s", config.eval.caption_split, summary)


# ------------------------------------------------------------------------------------------------
# Loss.


def loss_fn(model, params, batch, rng, *, chunk_size: int = 512, z_loss: float = 0.0,
            router_aux_loss: bool = True, router_aux_loss_coef: float | None = None):
  """Mean next-token loss over the batch's loss tokens (+ MoE load balancing) and metrics.

  Args:
    model: ``Qwen3VL``; params: its ``"params"``; batch: the packed schema (global batch or a
      microbatch); rng: unused (no dropout in the released configs' training).
    chunk_size: tokens per logits chunk (memory ``B x chunk_size x V`` float32).
    z_loss: PaLM z-loss coefficient (0 = off).
    router_aux_loss: add the MoE load-balancing loss (MoE models only).
    router_aux_loss_coef: its weight; None = the model config's ``router_aux_loss_coef``
      (HF's default 0.001).
  Returns:
    ``(loss, metrics)``: ``loss`` = ``nll_sum / tokens + coef * aux``; metrics ``loss``, ``nll``,
    ``aux_loss``, ``z_loss``, ``accuracy`` (greedy next-token), ``loss_weight`` (loss tokens).
  """
  del rng
  from vlm.models import qwen3
  from vlm.nn.attention import context_parallel_size
  from vlm.objectives import lm, moe
  text = model.config.text
  is_moe = bool(getattr(text, "num_experts", 0))
  mutable = ["intermediates"] if is_moe and router_aux_loss else False
  out = model.apply({"params": params}, *_model_args(batch), segment_ids=batch["segment_ids"],
                    return_hidden=True, mutable=mutable)
  (hidden, _), state = out if mutable else (out, {})
  head = qwen3.lm_head_kernel(params, text.tie_word_embeddings)
  labels, loss_mask = batch["labels"], batch["loss_mask"]
  cp = context_parallel_size()
  if cp > 1 and hidden.shape[1] % cp == 0:
    # context parallelism: each shard's tokens become rows of their own ([B, L] -> [B*cp, L/cp],
    # the labels are already shifted on the host), so the chunked loss runs on local tokens
    # instead of scanning chunks of the whole (gathered) sequence; same sums
    b, l = labels.shape
    fold = lambda x: x.reshape((b * cp, l // cp) + x.shape[2:])
    hidden, labels, loss_mask = fold(hidden), fold(labels), fold(loss_mask)
  loss_sum, count, m = lm.chunked_next_token_loss(hidden, head, labels, loss_mask,
                                                  chunk_size=chunk_size, z_loss=z_loss)
  denom = jnp.maximum(count, 1.0)
  loss = loss_sum / denom
  aux = jnp.zeros((), jnp.float32)
  if mutable:
    logits = qwen3.router_logits(state["intermediates"])
    if logits:
      aux = moe.load_balancing_loss(logits, text.num_experts, text.num_experts_per_tok,
                                    attention_mask=batch["segment_ids"] != 0)
      coef = text.router_aux_loss_coef if router_aux_loss_coef is None else router_aux_loss_coef
      loss = loss + jnp.float32(coef) * aux
  metrics = {"loss": loss, "nll": m["nll_sum"] / denom, "aux_loss": aux,
             "z_loss": m["z_loss_sum"] / denom, "accuracy": m["correct_sum"] / denom,
             "loss_weight": count}
  return loss, metrics


# ------------------------------------------------------------------------------------------------
# Initial weights.


def init_params(config, model, params, shardings):
  """``config.init.hf_checkpoint``: an HF Qwen3-VL / Qwen3-VL-MoE / Qwen2.5-VL directory whose
  weights replace every parameter (read on the host, placed leaf by leaf into ``shardings``).

  Raises:
    ValueError: a checkpoint that does not match the model (listed by the converter) or the
      run's layer layout.
  """
  hf_dir = config.init.get("hf_checkpoint", "")
  if not hf_dir:
    return params
  from vlm.convert.hf_qwen3_vl import load_hf_qwen3_vl
  from vlm.tasks import place_like
  _, loaded = load_hf_qwen3_vl(hf_dir, np.float32, scan_layers=model.scan_layers,
                              scan_vision=model.scan_vision)
  flat = flax.traverse_util.flatten_dict(params)
  flat_sh = flax.traverse_util.flatten_dict(shardings)
  host = flax.traverse_util.flatten_dict(loaded)
  missing = sorted("/".join(k) for k in flat if k not in host)
  extra = sorted("/".join(k) for k in host if k not in flat)
  bad = sorted(f"{'/'.join(k)} {tuple(np.shape(host[k]))} vs {tuple(v.shape)}"
               for k, v in flat.items() if k in host and tuple(np.shape(host[k])) != tuple(v.shape))
  if missing or extra or bad:
    raise ValueError(f"{hf_dir} does not fit the model: missing {missing[:10]}, unexpected "
                     f"{extra[:10]}, shapes {bad[:10]}")
  out = {k: place_like(np.asarray(host[k]), flat_sh[k], dtype=v.dtype) for k, v in flat.items()}
  log.info("initialised every parameter from HF checkpoint %s", hf_dir)
  return flax.traverse_util.unflatten_dict(out)


# ------------------------------------------------------------------------------------------------
# Evaluation.


def _heldout_loss(config, model, params, *, num_batches: int) -> dict[str, float]:
  """Mean next-token loss over ``num_batches`` packed batches of ``config.eval.loss_sources``."""
  from vlm.data import qwen_batch
  data_cfg = ml_collections.ConfigDict(config.data.to_dict())
  data_cfg.sources = list(config.eval.loss_sources)
  loader = qwen_batch.build_qwen_train_loader(
      data_cfg, model.config, global_batch_size=config.eval.batch_size, seed=0)
  step = jax.jit(lambda p, b: loss_fn(model, p, b, None, **dict(config.loss))[1])
  total = count = correct = 0.0
  it = iter(loader)
  for _ in range(num_batches):
    m = jax.device_get(step(params, next(it)))
    w = float(m["loss_weight"])
    total += float(m["nll"]) * w
    correct += float(m["accuracy"]) * w
    count += w
  return {"loss": total / max(count, 1.0), "accuracy": correct / max(count, 1.0),
          "tokens": int(count), "samples": len(loader.samples)}


def _caption_eval(config, model, params) -> dict[str, Any]:
  """Greedy captions of the held-out COCO photos scored against their human captions
  (:func:`vlm.inference.captioning.evaluate_held_out_captions`)."""
  from vlm.data import qwen_batch
  from vlm.data import qwen_processor as qp
  from vlm.data.conversations import DEFAULT_CAPTION_PROMPT
  from vlm.inference import captioning
  from vlm.inference import generate as G

  ecfg = config.eval
  proc_cfg = qwen_batch.processor_config_for(model.config,
                                            dict(config.data.get("processor", {}) or {}))
  tok = qp.Qwen3Tokenizer(config.data.get("tokenizer_file", qp.DEFAULT_TOKENIZER_FILE))
  processor = qp.Qwen3VLProcessor(proc_cfg, tok, padding_side="left")
  if type(model).__name__ == "Qwen2_5_VL":
    processor = qp.Qwen2_5_VLProcessor(proc_cfg, tok, padding_side="left")
  prompt = processor.apply_chat_template(
      [{"role": "user", "content": [{"type": "image"},
                                    {"type": "text", "text": ecfg.get("caption_prompt",
                                                                      DEFAULT_CAPTION_PROMPT)}]}])
  eos = [tok.token_to_id(qp.IM_END), tok.token_to_id(qp.ENDOFTEXT)]

  def caption_batch(paths):
    batch = processor(text=[prompt] * len(paths), images=[[p] for p in paths])
    out = G.generate(model, params, batch, max_new_tokens=int(ecfg.max_new_tokens),
                     eos_token_ids=eos, pad_token_id=tok.pad_token_id)
    return [tok.decode([int(t) for t in row if int(t) not in eos and int(t) != tok.pad_token_id],
                       skip_special_tokens=True) for row in np.asarray(out)]

  return captioning.evaluate_held_out_captions(
      caption_batch, ecfg.data, split=ecfg.caption_split,
      max_images=int(ecfg.get("max_images", 0)), batch_size=int(ecfg.batch_size),
      tokenizer=ecfg.caption_tokenizer, label="greedy")


def evaluators(config) -> dict[str, Any]:
  """``heldout_loss`` (when ``config.eval.loss_sources``) and ``captions`` (when
  ``config.eval.caption_split``)."""
  out = {}
  if config.eval.get("loss_sources"):
    def heldout(model, params, step, *, writer=None):
      r = _heldout_loss(config, model, params, num_batches=int(config.eval.loss_batches))
      print(f"held-out loss {r['loss']:.4f}, next-token accuracy {r['accuracy']:.3f} "
            f"({r['tokens']} tokens)")
      if writer is not None:
        writer.write(step, {"eval/heldout_loss": r["loss"], "eval/heldout_accuracy": r["accuracy"]})
      return r
    out["heldout_loss"] = heldout
  if config.eval.get("caption_split"):
    def captions(model, params, step, *, writer=None):
      r = _caption_eval(config, model, params)
      if writer is not None:
        writer.write(step, {"eval/CIDEr": r["scores"]["CIDEr"], "eval/BLEU-4": r["scores"]["BLEU-4"]})
      return r
    out["captions"] = captions
  return out


# ------------------------------------------------------------------------------------------------
# Configs (the files in configs/qwen3_vl/ call this).

VARIANTS = ("tiny", "2b", "8b", "30b_a3b", "235b_a22b")
_PRESETS = {"tiny": "qwen3_vl_tiny", "2b": "qwen3_vl_2b", "8b": "qwen3_vl_8b",
            "30b_a3b": "qwen3_vl_30b_a3b", "235b_a22b": "qwen3_vl_235b_a22b"}


def qwen_vl_config(stage: str, variant: str | None = None) -> ml_collections.ConfigDict:
  """The config of one Qwen-VL stage (``a``, ``a_merger_only``, ``b``, ``c``, ``sft``) and size.

  ``tiny`` runs on a CPU with the embedded data (random-weight Qwen3-VL at test size, real
  tokenizer and vocabulary). The released sizes take the Qwen3-VL report's settings where it
  gives them (row lengths 8,192 for A/B and 32,768 for C; which parameters train per stage) and
  common choices where it does not (AdamW b2 0.95, weight decay 0.1, cosine decay, peak LRs
  below; stated here, not claimed as the report's).

  Raises:
    ValueError: unknown stage or variant (the valid ones are listed).
  """
  from vlm.data.config import default_qwen_data_config
  variant = variant or "tiny"
  if stage not in FROZEN:
    raise ValueError(f"unknown stage {stage!r}; use one of {sorted(FROZEN)}")
  if variant not in VARIANTS:
    raise ValueError(f"unknown variant {variant!r}; use one of {', '.join(VARIANTS)}")
  tiny = variant == "tiny"
  c = ml_collections.ConfigDict()
  c.variant = variant
  c.stage = stage
  c.task = "qwen_vl"
  c.seed = 0
  c.prng_impl = "threefry2x32"
  # text_overrides: Qwen3TextConfig fields, e.g. attention_implementation ("xla" dense mask,
  # "chunked" blockwise, "splash" TPU kernel, "cudnn", "auto") and moe_implementation.
  attn = ("chunked" if tiny else "auto") if stage == "c" else ("xla" if tiny else "auto")
  c.model = ml_collections.ConfigDict(dict(
      preset=_PRESETS[variant], dtype="float32" if tiny else "bfloat16", param_dtype="float32",
      scan_layers=not tiny, remat=not tiny, scan_vision=not tiny,
      text_overrides={"attention_implementation": attn, "attention_block_size": 512}))
  # hf_checkpoint: an HF Qwen3-VL / Qwen3-VL-MoE / Qwen2.5-VL directory (its config.json
  # replaces the preset); workdir: an earlier stage's workdir (matching parameters are taken).
  c.init = ml_collections.ConfigDict(dict(hf_checkpoint="", workdir=""))

  c.data = default_qwen_data_config()
  caption_rows = [{"type": "coco_captions", "annotations": "data/coco/captions_train2017.json",
                   "image_dir": "data/coco/images", "mode": "caption"}]
  if stage in ("a", "a_merger_only", "b", "c"):
    c.data.sources = caption_rows if stage.startswith("a") else (caption_rows
                                                                 + list(c.data.sources))
  length = {"a": 8192, "a_merger_only": 8192, "b": 8192, "c": 32768, "sft": 8192}[stage]
  # Np ~ 1.5 L keeps rows full at these pixel budgets (measured packing efficiency 0.95-0.98)
  c.data.max_length = 512 if tiny else length
  c.data.max_patches = 768 if tiny else length * 3 // 2
  if tiny and stage == "c":
    c.data.max_length, c.data.max_patches = 2048, 3072
  # chunk_size: tokens per logits chunk; on CPU with a 152k vocabulary small chunks (64) run
  # about twice as fast as 256 (the [B, C, V] float32 logits then stay closer to the caches)
  c.loss = ml_collections.ConfigDict(dict(chunk_size=64 if tiny else 1024, z_loss=0.0,
                                          router_aux_loss=True, router_aux_loss_coef=None))

  c.total_steps = 80 if tiny else {"a": 10_000, "a_merger_only": 5_000, "b": 100_000,
                                   "c": 20_000, "sft": 10_000}[stage]
  c.global_batch_size = 2 if tiny else {"c": 256}.get(stage, 1024)
  c.microbatches = 1
  peak = {"a": 1e-4, "a_merger_only": 1e-3, "b": 5e-5, "c": 2e-5, "sft": 1e-5}[stage]
  c.optim = ml_collections.ConfigDict(dict(
      lr=3e-3 if tiny else peak, min_lr=(3e-4 if tiny else peak / 10), warmup_lr=0.0,
      warmup_steps=8 if tiny else max(100, c.total_steps // 50),
      total_steps=c.get_ref("total_steps"),
      b1=0.9, b2=0.95, eps=1e-8, weight_decay=0.1, grad_clip_norm=1.0,
      frozen=list(FROZEN[stage]), lr_multipliers=[]))
  c.mesh = ml_collections.ConfigDict(dict(
      shape={"data": 1, "fsdp": -1, "tensor": 1, "expert": 1}, rules=None))
  c.checkpoint = ml_collections.ConfigDict(dict(every_steps=20 if tiny else 1000,
                                                max_to_keep=3, async_save=True))
  c.log_every_steps = 10 if tiny else 50
  c.eval = ml_collections.ConfigDict(dict(
      at_end=True,
      loss_sources=[{"type": "coco_captions", "annotations": "data/coco/captions_val2017.json",
                     "image_dir": "data/coco/images",
                     "mode": "caption" if stage != "sft" else "chat"}],
      loss_batches=4, batch_size=8 if tiny else 64,
      caption_split="val" if stage == "sft" else "", max_images=0, max_new_tokens=20,
      caption_tokenizer="ptb",
      data=ml_collections.ConfigDict(dict(root="data/coco", image_dir="images",
                                          train_annotations="captions_train2017.json",
                                          val_annotations="captions_val2017.json",
                                          image_size=224, max_words=50,
                                          validate_images="decode", num_threads=4))))
  return c


MOE_VARIANTS = ("30b_a3b", "235b_a22b")


def expert_parallel(c: ml_collections.ConfigDict, expert: int = 8) -> ml_collections.ConfigDict:
  """Routed expert parallelism for the MoE variants (others are returned unchanged).

  Sets ``moe_implementation="routed"`` (tokens sent to their experts' devices and back,
  :func:`vlm.nn.moe.routed_expert_mlp`), an ``expert`` mesh axis of ``expert`` devices (the 128
  experts of Qwen3-VL-30B-A3B / 235B-A22B: 16 per device at 8; ``fsdp=-1`` takes the rest) and
  rules that also split the batch over ``expert``: outside the MoE layers the expert axis is
  data parallelism (attention and the dense parameters would otherwise be computed 8 times), so
  the global batch must divide over data x fsdp x expert = all devices. Override on the command
  line with ``--config.mesh.shape.expert=N`` (N must divide the expert count).
  """
  if c.variant not in MOE_VARIANTS:
    return c
  from vlm.parallel import mesh as mesh_lib
  c.model.text_overrides.moe_implementation = "routed"
  c.mesh.shape.expert = expert
  batch_axes = ("data", "fsdp", "expert")
  c.mesh.rules = [(name, batch_axes if name == P.BATCH else axes)
                  for name, axes in mesh_lib.DEFAULT_RULES]
  return c


# ------------------------------------------------------------------------------------------------
# Export: a training workdir -> an HF directory (scripts/convert_hf.py --from_workdir).

_SIDE_FILES = ("preprocessor_config.json", "video_preprocessor_config.json", "chat_template.json",
               "chat_template.jinja")
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.json", "merges.txt",
                    "special_tokens_map.json", "added_tokens.json")


def _processor_files(model_cfg, proc) -> dict[str, dict]:
  """HF ``preprocessor_config.json`` / ``video_preprocessor_config.json`` for the processor
  settings ``proc`` (:class:`vlm.data.qwen_processor.QwenProcessorConfig`)."""
  from vlm.models.qwen3_vl import Qwen2_5_VLConfig
  qwen25 = isinstance(model_cfg, Qwen2_5_VLConfig)
  processor = "Qwen2_5_VLProcessor" if qwen25 else "Qwen3VLProcessor"
  common = dict(do_convert_rgb=True, do_resize=True, do_rescale=True,
                rescale_factor=float(proc.rescale_factor), do_normalize=True,
                image_mean=list(proc.image_mean), image_std=list(proc.image_std),
                patch_size=int(proc.patch_size), temporal_patch_size=int(proc.temporal_patch_size),
                merge_size=int(proc.merge_size), processor_class=processor)
  image = dict(common, image_processor_type="Qwen2VLImageProcessorFast",
               min_pixels=int(proc.min_pixels), max_pixels=int(proc.max_pixels),
               size={"shortest_edge": int(proc.min_pixels), "longest_edge": int(proc.max_pixels)})
  video = dict(common, video_processor_type=("Qwen2VLVideoProcessor" if qwen25
                                             else "Qwen3VLVideoProcessor"),
               size={"shortest_edge": int(proc.video_min_pixels),
                     "longest_edge": int(proc.video_max_pixels)},
               do_sample_frames=True, min_frames=int(proc.min_frames),
               max_frames=int(proc.max_frames))
  if proc.fps is not None:
    video["fps"] = float(proc.fps)
  return {"preprocessor_config.json": image, "video_preprocessor_config.json": video}


def export_hf(workdir: str, output: str, step: int | None = None, *,
              model_config_path: str | None = None, max_shard_size: int | str | None = None,
              overwrite: bool = False) -> dict[str, Any]:
  """Writes a Qwen-VL training workdir's parameters as an HF ``save_pretrained`` directory.

  ``output`` gets ``config.json`` + ``model.safetensors`` (or shards + index) that transformers'
  ``Qwen3VLForConditionalGeneration`` / ``Qwen3VLMoeForConditionalGeneration`` /
  ``Qwen2_5_VLForConditionalGeneration.from_pretrained`` and :func:`vlm.load_pretrained` load
  (weights via :func:`vlm.convert.hf_qwen3_vl.save_hf_qwen3_vl`; scanned decoder layers are
  unstacked), the tokenizer the run trained with (the files next to
  ``config.data.tokenizer_file``), and ``preprocessor_config.json`` /
  ``video_preprocessor_config.json`` / ``generation_config.json`` / chat templates: copied from
  the run's ``config.init.hf_checkpoint`` directory when it has them, else written from the
  run's processor settings (``config.data.processor``) and the tokenizer's ``<|im_end|>`` /
  ``<|endoftext|>`` ids (greedy decoding).

  The model config is the run's (:func:`model_config` of the config saved in the checkpoint:
  the HF ``config.json`` the run was initialised from, else its preset), or
  ``model_config_path`` (an HF directory or ``config.json``) when given.

  Args:
    workdir: the training workdir; ``step``: its checkpoint (None: the newest intact one,
      damaged newer ones are skipped with a warning, see :func:`vlm.train.checkpoint.restore_run`).
    output: the directory to write (created).
    max_shard_size: e.g. ``"2GB"`` to shard the safetensors (None: one file).
    overwrite: allow a non-empty ``output`` (its old weight files are removed first).
  Returns:
    ``{"step", "output", "model_type", "num_params", "files"}``.
  Raises:
    FileNotFoundError: no (intact) checkpoint in ``workdir``; the run's
      ``init.hf_checkpoint`` directory is gone and no ``model_config_path`` was given.
    ValueError: ``workdir`` is not a Qwen-VL run (another ``config.task``); a ``step`` that is
      absent or damaged; parameters that do not fit the model config (listed).
    FileExistsError: ``output`` is not empty and ``overwrite`` is False.
  """
  import shutil
  from vlm.convert.hf_qwen3_vl import config_from_hf, config_to_hf, save_hf_qwen3_vl
  from vlm.data import qwen_batch
  from vlm.data import qwen_processor as qp
  from vlm.data.paths import resolve_path

  output = os.path.abspath(output)
  if os.path.isdir(output) and os.listdir(output) and not overwrite:
    raise FileExistsError(f"{output} is not empty; pick a new directory or pass overwrite=True "
                          "(--overwrite)")
  from vlm.train import checkpoint as ckpt
  step, config, params = ckpt.restore_run(workdir, step)
  task = config.get("task", None)
  if task != "qwen_vl":
    raise ValueError(f"{workdir} was trained with task {task!r}, not 'qwen_vl': the HF export "
                     "of a workdir supports Qwen3-VL / Qwen3-VL-MoE / Qwen2.5-VL runs only (for "
                     "BLIP-2 checkpoints use vlm.convert.hf_blip2.save_hf_blip2)")
  init_dir = config.init.get("hf_checkpoint", "") if "init" in config else ""
  init_dir = resolve_path(init_dir) if init_dir else ""
  if model_config_path:
    path = model_config_path
    if os.path.isdir(path):
      path = os.path.join(path, "config.json")
    if not os.path.isfile(path):
      raise FileNotFoundError(f"model config {model_config_path!r}: no such config.json")
    with open(path) as fh:
      model_cfg = config_from_hf(json.load(fh))
  else:
    if init_dir and not os.path.isfile(os.path.join(init_dir, "config.json")):
      raise FileNotFoundError(
          f"{workdir} was initialised from {init_dir}, which has no config.json any more: pass "
          "that model's config.json with --model_config (model_config_path=...)")
    with config.unlocked():
      if init_dir:
        config.init.hf_checkpoint = init_dir
      model_cfg = model_config(config)

  if os.path.isdir(output):
    for name in os.listdir(output):
      if name.endswith(".safetensors") or name == "model.safetensors.index.json":
        os.remove(os.path.join(output, name))
  save_hf_qwen3_vl(model_cfg, params, output, max_shard_size)

  # Tokenizer: the files next to the tokenizer.json the run trained with.
  tok_file = resolve_path(config.data.get("tokenizer_file", qp.DEFAULT_TOKENIZER_FILE))
  tok = qp.Qwen3Tokenizer(tok_file)
  tok_dir = os.path.dirname(tok_file)
  shutil.copyfile(tok_file, os.path.join(output, "tokenizer.json"))
  for name in _TOKENIZER_FILES[1:]:
    if os.path.isfile(os.path.join(tok_dir, name)):
      shutil.copyfile(os.path.join(tok_dir, name), os.path.join(output, name))
  # Processor, chat template, generation defaults: the initial checkpoint's, else the run's.
  for name in _SIDE_FILES:
    if init_dir and os.path.isfile(os.path.join(init_dir, name)):
      shutil.copyfile(os.path.join(init_dir, name), os.path.join(output, name))
  proc = qwen_batch.processor_config_for(model_cfg, dict(config.data.get("processor", {}) or {}))
  for name, content in _processor_files(model_cfg, proc).items():
    if not os.path.isfile(os.path.join(output, name)):
      with open(os.path.join(output, name), "w") as fh:
        json.dump(content, fh, indent=2)
  gen_src = os.path.join(init_dir, "generation_config.json") if init_dir else ""
  gen = None
  if gen_src and os.path.isfile(gen_src):
    with open(gen_src) as fh:
      gen = json.load(fh)
    if not isinstance(gen, dict) or gen.get("eos_token_id") is None:
      gen = None  # a bare save_pretrained file without stop tokens: write ours
  if gen is None:
    gen = {"bos_token_id": tok.pad_token_id, "eos_token_id": [tok.eos_token_id, tok.pad_token_id],
           "pad_token_id": tok.pad_token_id, "do_sample": False}
  with open(os.path.join(output, "generation_config.json"), "w") as fh:
    json.dump(gen, fh, indent=2)

  num = sum(int(np.size(v)) for v in jax.tree.leaves(params))
  model_type = config_to_hf(model_cfg)["model_type"]
  log.info("exported %s step %d (%s, %d parameters) to %s", workdir, step, model_type, num,
           output)
  return {"step": step, "output": output, "model_type": model_type, "num_params": num,
          "files": sorted(os.listdir(output))}
