"""Model registry: ``build(name, preset, ...)`` -> linen module.

The registry is explicit (no import-by-string magic): each entry names the module class and the
preset family it accepts. Imports are deferred so ``import vlm.models`` stays light.
"""
from __future__ import annotations

import importlib
from typing import Any

from vlm.models import presets

# name -> (module path, class name)
REGISTRY: dict[str, tuple[str, str]] = {
    "blip2_stage1": ("vlm.models.blip2", "Blip2Stage1"),
    "qwen3_vl": ("vlm.models.qwen3_vl", "Qwen3VL"),        # also Qwen3-VL-MoE
    "qwen2_5_vl": ("vlm.models.qwen3_vl", "Qwen2_5_VL"),
}


def get_class(name: str):
  """The module class registered as ``name``.

  Raises:
    KeyError: unknown name (lists the known ones).
  """
  if name not in REGISTRY:
    raise KeyError(f"unknown model {name!r}; registered: {sorted(REGISTRY)}")
  module, cls = REGISTRY[name]
  return getattr(importlib.import_module(module), cls)


def build(name: str, preset: str, preset_overrides: dict | None = None, **module_kwargs: Any):
  """Instantiates model ``name`` with preset config ``preset`` (top-level fields replaced by
  ``preset_overrides``) and module fields such as ``dtype``, ``param_dtype``."""
  config = presets.get_preset(preset, **(preset_overrides or {}))
  return get_class(name)(config=config, **module_kwargs)


def vision_model(config: presets.Blip2VisionConfig, **kwargs):
  """The BLIP-2 image encoder for ``config.kind`` ("eva" or "clip")."""
  if config.kind == "eva":
    from vlm.models.eva_vit import EvaVisionModel
    return EvaVisionModel(config=config, **kwargs)
  from vlm.models.clip_vit import ClipVisionModel
  return ClipVisionModel(config=config, **kwargs)
