"""Model registry: ``build(name, preset, ...)`` -> linen module.

The registry is explicit (no import-by-string magic): each entry names the module class and the
preset family it accepts. Imports are deferred so ``import vlm.models`` stays light.
"""
from __future__ import annotations

import importlib
from typing import Any

from vlm.models import presets

# name -> (module path, class name, config class name the module accepts)
REGISTRY: dict[str, tuple[str, str, str]] = {
    "blip2_stage1": ("vlm.models.blip2", "Blip2Stage1", "Blip2Config"),
    "blip2_stage2": ("vlm.models.blip2", "Blip2Stage2", "Blip2Stage2Config"),  # OPT or FlanT5
    "qwen3_vl": ("vlm.models.qwen3_vl", "Qwen3VL", "Qwen3VLConfig"),  # also Qwen3-VL-MoE
    "qwen2_5_vl": ("vlm.models.qwen3_vl", "Qwen2_5_VL", "Qwen2_5_VLConfig"),
}


def get_class(name: str):
  """The module class registered as ``name``.

  Raises:
    KeyError: unknown name (lists the known ones).
  """
  if name not in REGISTRY:
    raise KeyError(f"unknown model {name!r}; registered: {sorted(REGISTRY)}")
  module, cls, _ = REGISTRY[name]
  return getattr(importlib.import_module(module), cls)


def build(name: str, preset: str, preset_overrides: dict | None = None, **module_kwargs: Any):
  """Instantiates model ``name`` with preset config ``preset`` (top-level fields replaced by
  ``preset_overrides``) and module fields such as ``dtype``, ``param_dtype``.

  Raises:
    KeyError: unknown model or preset name.
    ValueError: a preset of another family (e.g. a BLIP-2 preset for ``qwen3_vl``, or a Qwen3-VL
      preset for ``qwen2_5_vl``).
  """
  config = presets.get_preset(preset, **(preset_overrides or {}))
  cls = get_class(name)
  want = REGISTRY[name][2]
  if type(config).__name__ != want:
    raise ValueError(f"model {name!r} takes a {want} preset, but {preset!r} is a "
                     f"{type(config).__name__}; pick a preset of that family")
  return cls(config=config, **module_kwargs)


def vision_model(config: presets.Blip2VisionConfig, **kwargs):
  """The BLIP-2 image encoder for ``config.kind`` ("eva" or "clip")."""
  if config.kind == "eva":
    from vlm.models.eva_vit import EvaVisionModel
    return EvaVisionModel(config=config, **kwargs)
  from vlm.models.clip_vit import ClipVisionModel
  return ClipVisionModel(config=config, **kwargs)
