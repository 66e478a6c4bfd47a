"""``load_pretrained``: one entry point from an HF checkpoint directory to (model, params, processor).

Dispatches on ``config.json``'s ``model_type``:
  * ``qwen3_vl``, ``qwen3_vl_moe`` -> :class:`vlm.models.qwen3_vl.Qwen3VL` +
    :class:`vlm.data.qwen_processor.Qwen3VLProcessor` (left padding, for generation);
  * ``qwen2_5_vl`` -> :class:`vlm.models.qwen3_vl.Qwen2_5_VL` + ``Qwen2_5_VLProcessor``;
  * ``blip-2`` -> :class:`vlm.models.blip2.Blip2Stage1` + :class:`vlm.data.text.Blip2Tokenizer`.
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


def load_pretrained(path: str | os.PathLike) -> tuple[Any, dict, Any]:
  """Loads an HF checkpoint directory as a vlm model.

  Args:
    path: directory with ``config.json`` and safetensors weights (HF ``save_pretrained`` layout).
  Returns:
    ``(model, params, processor)``: a Flax module, its ``"params"`` collection (float32 jnp
    arrays), and the matching processor (Qwen: a left-padding ``Qwen3VLProcessor`` /
    ``Qwen2_5_VLProcessor``; BLIP-2: a :class:`vlm.data.text.Blip2Tokenizer`).
  Raises:
    FileNotFoundError: no ``config.json`` in ``path``.
    ValueError: unsupported ``model_type`` (the supported ones are listed), or weights that do
      not match the config (from the converters).
  """
  path = os.fspath(path)
  cfg_file = os.path.join(path, "config.json")
  if not os.path.exists(cfg_file):
    raise FileNotFoundError(f"no config.json in {path!r}: pass an HF save_pretrained directory")
  with open(cfg_file) as fh:
    model_type = json.load(fh).get("model_type")
  if model_type in QWEN_TYPES:
    from vlm.convert.hf_qwen3_vl import load_hf_qwen3_vl
    from vlm.models.qwen3_vl import Qwen2_5_VL, Qwen2_5_VLConfig, Qwen3VL
    config, params = load_hf_qwen3_vl(path)
    model = Qwen2_5_VL(config) if isinstance(config, Qwen2_5_VLConfig) else Qwen3VL(config)
    return model, params, _qwen_processor(path, config)
  if model_type in BLIP2_TYPES:
    from vlm.convert.hf_blip2 import load_hf_blip2
    from vlm.data.text import Blip2Tokenizer
    from vlm.models.blip2 import Blip2Stage1
    config, params = load_hf_blip2(path)
    return Blip2Stage1(config), params, Blip2Tokenizer()
  raise ValueError(f"{cfg_file} has model_type {model_type!r}; load_pretrained supports "
                   f"{QWEN_TYPES + BLIP2_TYPES}")
