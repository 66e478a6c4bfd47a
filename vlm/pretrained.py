"""``load_pretrained``: one entry point from an HF checkpoint directory to (model, params, processor).

Dispatches on ``config.json``'s ``model_type``:
  * ``qwen3_vl``, ``qwen3_vl_moe`` -> :class:`vlm.models.qwen3_vl.Qwen3VL` +
    :class:`vlm.data.qwen_processor.Qwen3VLProcessor` (left padding, for generation);
  * ``qwen2_5_vl`` -> :class:`vlm.models.qwen3_vl.Qwen2_5_VL` + ``Qwen2_5_VLProcessor``;
  * ``blip-2`` with ``architectures: [Blip2ForConditionalGeneration]`` (OPT or FlanT5) ->
    :class:`vlm.models.blip2.Blip2Stage2` + its :class:`vlm.data.llm_tokenizers.LLMTokenizer`;
  * other ``blip-2`` (retrieval) -> :class:`vlm.models.blip2.Blip2Stage1` +
    :class:`vlm.data.text.Blip2Tokenizer`.
Weights are read by :mod:`vlm.convert.hf_qwen3_vl` / :mod:`vlm.convert.hf_blip2`.
"""
from __future__ import annotations

import dataclasses
import json
import os
from typing import Any

QWEN_TYPES = ("qwen3_vl", "qwen3_vl_moe", "qwen2_5_vl")
BLIP2_TYPES = ("blip-2",)


def _qwen_processor(path: str, config) -> Any:
  """Processor whose patch/merge sizes follow the model's vision config; pixel budgets, mean/std
  from ``preprocessor_config.json`` when the directory has one."""
  from vlm.data.qwen_processor import Qwen2_5_VLProcessor, Qwen3VLProcessor
  from vlm.models.qwen3_vl import Qwen2_5_VLConfig
  cls = Qwen2_5_VLProcessor if isinstance(config, Qwen2_5_VLConfig) else Qwen3VLProcessor
  v = config.vision
  kw = dict(patch_size=v.patch_size, temporal_patch_size=v.temporal_patch_size,
            merge_size=v.spatial_merge_size)
  pre = os.path.join(path, "preprocessor_config.json")
  if os.path.exists(pre):
    with open(pre) as fh:
      d = json.load(fh)
    size = d.get("size") or {}
    lo = size.get("shortest_edge", d.get("min_pixels"))
    hi = size.get("longest_edge", d.get("max_pixels"))
    if lo is not None and hi is not None:
      kw.update(min_pixels=int(lo), max_pixels=int(hi))
    for key in ("image_mean", "image_std"):
      if d.get(key) is not None:
        kw[key] = tuple(float(x) for x in d[key])
  pcfg = dataclasses.replace(cls.default_config, **kw)
  return cls(pcfg, padding_side="left")


def _is_blip2_stage2(cfg_file: str) -> bool:
  """An HF BLIP-2 config of ``Blip2ForConditionalGeneration`` (a language model attached)."""
  with open(cfg_file) as fh:
    d = json.load(fh)
  return "Blip2ForConditionalGeneration" in (d.get("architectures") or [])


def load_pretrained(path: str | os.PathLike, *, dtype: Any = None, param_dtype: Any = None,
                    scan_layers: bool = False, remat: bool = False,
                    moe_implementation: str | None = None,
                    scan_vision: bool = False) -> tuple[Any, dict, Any]:
  """Loads an HF checkpoint directory as a vlm model.

  Args:
    path: directory with ``config.json`` and safetensors weights (HF ``save_pretrained`` layout).
    dtype: compute dtype of the module (default float32), e.g. ``jnp.bfloat16``.
    param_dtype: dtype of the returned parameters (default float32; ``jnp.bfloat16`` keeps a
      bf16 checkpoint at half the memory).
    scan_layers, remat: Qwen and BLIP-2 stage 2: decoder layers under ``nn.scan`` (parameters
      returned stacked, ``language_model/layers``) and rematerialised, for training; BLIP-2
      (both stages): also the vision blocks and Q-Former layers (``.../encoder/layers``).
    moe_implementation: Qwen MoE only: ``"auto"``, ``"dense"``, ``"ragged"`` or ``"gather"``
      expert evaluation (``Qwen3TextConfig.moe_implementation``); None keeps the default
      ("auto").
    scan_vision: Qwen only: the vision tower's blocks under ``nn.scan`` (parameters returned
      stacked, ``visual/blocks``; ``Qwen3VL.scan_vision``).
  Returns:
    ``(model, params, processor)``: a Flax module, its ``"params"`` collection (jnp arrays of
    ``param_dtype``), and the matching processor (Qwen: a left-padding ``Qwen3VLProcessor`` /
    ``Qwen2_5_VLProcessor``; BLIP-2: a :class:`vlm.data.text.Blip2Tokenizer`).
  Raises:
    FileNotFoundError: no ``config.json`` in ``path``.
    ValueError: unsupported ``model_type`` (the supported ones are listed), weights that do
      not match the config (from the converters), Qwen-only options on a BLIP-2 checkpoint, or
      ``scan_layers`` on a model that mixes dense and MoE layers.
  """
  import jax
  import jax.numpy as jnp
  import numpy as np
  if moe_implementation not in (None, "auto", "dense", "ragged", "gather"):
    raise ValueError(f"moe_implementation must be 'auto', 'dense', 'ragged' or 'gather', got "
                     f"{moe_implementation!r}")  # checked before any weight is read
  dtype = jnp.float32 if dtype is None else dtype
  param_dtype = jnp.float32 if param_dtype is None else param_dtype
  path = os.fspath(path)
  cfg_file = os.path.join(path, "config.json")
  if not os.path.exists(cfg_file):
    raise FileNotFoundError(f"no config.json in {path!r}: pass an HF save_pretrained directory")
  with open(cfg_file) as fh:
    model_type = json.load(fh).get("model_type")
  if model_type in QWEN_TYPES:
    from vlm.convert.hf_qwen3_vl import load_hf_qwen3_vl
    from vlm.models.qwen3_vl import Qwen2_5_VL, Qwen2_5_VLConfig, Qwen3VL
    config, params = load_hf_qwen3_vl(path, np.dtype(param_dtype), scan_layers=scan_layers,
                                      scan_vision=scan_vision)
    if moe_implementation is not None:
      config = dataclasses.replace(
          config, text=dataclasses.replace(config.text, moe_implementation=moe_implementation))
    cls = Qwen2_5_VL if isinstance(config, Qwen2_5_VLConfig) else Qwen3VL
    model = cls(config, dtype=dtype, param_dtype=param_dtype, scan_layers=scan_layers,
                remat=remat, scan_vision=scan_vision)
    return model, params, _qwen_processor(path, config)
  if model_type in BLIP2_TYPES and _is_blip2_stage2(cfg_file):
    if moe_implementation is not None or scan_vision:
      raise ValueError(f"moe_implementation and scan_vision apply to Qwen checkpoints only; "
                       f"{path} is BLIP-2")
    from vlm.convert.hf_blip2 import load_hf_blip2_stage2
    from vlm.data.llm_tokenizers import llm_tokenizer
    from vlm.models.blip2 import Blip2Stage2
    config, params = load_hf_blip2_stage2(path, scan_layers=scan_layers)
    params = jax.tree_util.tree_map(lambda x: jnp.asarray(x, param_dtype), params)
    model = Blip2Stage2(config, dtype=dtype, param_dtype=param_dtype, scan_layers=scan_layers,
                        remat=remat)
    return model, params, llm_tokenizer(config.llm_kind)
  if model_type in BLIP2_TYPES:
    if scan_vision or moe_implementation is not None:
      raise ValueError("scan_vision and moe_implementation apply to Qwen checkpoints only; "
                       f"{path} is BLIP-2")
    from vlm.convert.hf_blip2 import load_hf_blip2
    from vlm.data.text import Blip2Tokenizer
    from vlm.models.blip2 import Blip2Stage1
    config, params = load_hf_blip2(path, scan_layers=scan_layers)
    params = jax.tree_util.tree_map(lambda x: jnp.asarray(x, param_dtype), params)
    model = Blip2Stage1(config, dtype=dtype, param_dtype=param_dtype, scan_layers=scan_layers,
                        remat=remat)
    return model, params, Blip2Tokenizer()
  raise ValueError(f"{cfg_file} has model_type {model_type!r}; load_pretrained supports "
                   f"{QWEN_TYPES + BLIP2_TYPES}")
