"""HF Qwen3-VL / Qwen3-VL-MoE / Qwen2.5-VL checkpoint directory <-> (config, vlm params).

Pure numpy (:mod:`vlm.convert.safetensors_io`): no torch, no transformers, no pickle.

Key map (spec /work/shared/design/qwen3vl_spec.md section 10; CONTRACT.md naming rule):
``model.visual.X`` -> ``visual/X``, ``model.language_model.X`` -> ``language_model/X``,
``lm_head.weight`` -> ``lm_head/kernel`` (absent, and ignored if present, when
``text_config.tie_word_embeddings``). Qwen2.5-VL's legacy Hub layout (``visual.X``, ``model.X``)
is accepted on load. A list index is glued to its parent (``layers.3`` -> ``layers_3``); Linear
``weight`` [out, in] -> ``kernel`` [in, out]; the Conv3d patch embedding [Dv, C, Tp, P, P] ->
``kernel`` [C*Tp*P*P, Dv]; ``embed_tokens``/``pos_embed`` ``weight`` -> ``embedding``; 1-D norm
weights -> ``scale``; the fused MoE tensors ``mlp.experts.gate_up_proj`` [E, D, 2I] and
``mlp.experts.down_proj`` [E, I, D] keep their names and layout.
"""
from __future__ import annotations

import dataclasses
import json
import os
from typing import Any, Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from vlm.convert.safetensors_io import read_safetensors_dir, write_safetensors_dir
from vlm.models.qwen3_vl import Qwen2_5_VLConfig, Qwen3VL, Qwen3VLConfig, init_params
from vlm.models.qwen3 import stack_layers, unstack_layers
from vlm.models.qwen_vit import stack_blocks, unstack_blocks

_QWEN3_TYPES = ("qwen3_vl", "qwen3_vl_moe")
_QWEN25_TYPES = ("qwen2_5_vl",)
_FUSED = ("gate_up_proj", "down_proj")


# ------------------------------------------------------------------------------------------------
# Configs.


def config_from_hf(d: Mapping[str, Any]) -> Qwen3VLConfig:
  """HF ``config.json`` dict -> :class:`Qwen3VLConfig` / :class:`Qwen2_5_VLConfig`.

  Raises:
    ValueError: unsupported ``model_type``.
  """
  mt = d.get("model_type")
  if mt in _QWEN3_TYPES:
    cfg = Qwen3VLConfig.from_hf_dict(d)
    if mt == "qwen3_vl_moe":  # HF 4.57.1 always renormalises the top-k router weights
      cfg = dataclasses.replace(cfg, text=dataclasses.replace(cfg.text, norm_topk_prob=True))
    return cfg
  if mt in _QWEN25_TYPES:
    return Qwen2_5_VLConfig.from_hf_dict(d)
  raise ValueError(f"config.json has model_type {mt!r}; expected one of "
                   f"{_QWEN3_TYPES + _QWEN25_TYPES}")


def config_to_hf(config: Qwen3VLConfig) -> dict:
  """:class:`Qwen3VLConfig` / :class:`Qwen2_5_VLConfig` -> HF ``config.json`` dict."""
  t = config.text
  qwen25 = isinstance(config, Qwen2_5_VLConfig)
  moe = t.num_experts > 0
  if qwen25:
    mt, arch = "qwen2_5_vl", "Qwen2_5_VLForConditionalGeneration"
  elif moe:
    mt, arch = "qwen3_vl_moe", "Qwen3VLMoeForConditionalGeneration"
  else:
    mt, arch = "qwen3_vl", "Qwen3VLForConditionalGeneration"
  text = dict(model_type=f"{mt}_text", vocab_size=t.vocab_size, hidden_size=t.hidden_size,
              intermediate_size=t.intermediate_size, num_hidden_layers=t.num_hidden_layers,
              num_attention_heads=t.num_attention_heads,
              num_key_value_heads=t.num_key_value_heads, hidden_act=t.hidden_act,
              rms_norm_eps=t.rms_norm_eps, rope_theta=t.rope_theta,
              tie_word_embeddings=t.tie_word_embeddings, attention_dropout=t.attention_dropout,
              rope_scaling={"rope_type": "default", "type": "default",
                            "mrope_section": list(t.mrope_section),
                            **({} if qwen25 else {"mrope_interleaved": True})})
  if not qwen25:
    text.update(head_dim=t.head_dim, attention_bias=t.attention_bias)
  if moe:
    text.update(num_experts=t.num_experts, num_experts_per_tok=t.num_experts_per_tok,
                moe_intermediate_size=t.moe_intermediate_size,
                decoder_sparse_step=t.decoder_sparse_step,
                mlp_only_layers=list(t.mlp_only_layers), norm_topk_prob=t.norm_topk_prob,
                router_aux_loss_coef=t.router_aux_loss_coef)
  vision = {f.name: getattr(config.vision, f.name) for f in dataclasses.fields(config.vision)}
  vision = {k: list(v) if isinstance(v, tuple) else v for k, v in vision.items()}
  vision["model_type"] = "qwen2_5_vl" if qwen25 else f"{mt}"
  return dict(model_type=mt, architectures=[arch], text_config=text, vision_config=vision,
              image_token_id=config.image_token_id, video_token_id=config.video_token_id,
              vision_start_token_id=config.vision_start_token_id,
              vision_end_token_id=config.vision_end_token_id,
              tie_word_embeddings=t.tie_word_embeddings)


# ------------------------------------------------------------------------------------------------
# Key map.


def _flat(tree, prefix=()):
  out = {}
  for k, v in tree.items():
    if isinstance(v, Mapping):
      out.update(_flat(v, prefix + (k,)))
    else:
      out[prefix + (k,)] = v
  return out


def _unflat(flat):
  tree: dict = {}
  for path, v in flat.items():
    node = tree
    for p in path[:-1]:
      node = node.setdefault(p, {})
    node[path[-1]] = v
  return tree


def expected_shapes(config: Qwen3VLConfig) -> dict[tuple[str, ...], tuple[int, ...]]:
  """Flat vlm param paths -> shapes that :class:`Qwen3VL` ``init`` creates (traced, no compute)."""
  shapes = jax.eval_shape(lambda: init_params(Qwen3VL(config), jax.random.key(0)))
  return {k: tuple(v.shape) for k, v in _flat(shapes).items()}


def _hf_path(key: str) -> tuple[str, ...] | None:
  """HF key -> (vlm module path..., HF leaf name); None for keys outside the model."""
  if key.startswith("model.visual.") or key.startswith("model.language_model."):
    key = key[len("model."):]
  elif key.startswith("visual."):
    pass
  elif key.startswith("model."):
    key = "language_model." + key[len("model."):]
  elif not key.startswith("lm_head."):
    return None
  path: list[str] = []
  parts = key.split(".")
  for p in parts[:-1]:
    if p.isdigit() and path:
      path[-1] = f"{path[-1]}_{p}"
    else:
      path.append(p)
  return tuple(path) + (parts[-1],)


def _to_vlm(key: str, value: np.ndarray) -> tuple[tuple[str, ...], np.ndarray] | None:
  hp = _hf_path(key)
  if hp is None:
    return None
  mod, leaf = hp[:-1], hp[-1]
  if leaf == "bias":
    return mod + ("bias",), value
  if leaf in _FUSED and mod and mod[-1] == "experts":
    return mod + (leaf,), value
  if leaf != "weight":
    return None
  if mod[-1] in ("embed_tokens", "pos_embed"):
    return mod + ("embedding",), value
  if mod[-2:] == ("patch_embed", "proj"):
    return mod + ("kernel",), value.reshape(value.shape[0], -1).T
  if value.ndim == 1:
    return mod + ("scale",), value
  return mod + ("kernel",), value.T


def _from_vlm(path: tuple[str, ...], value: np.ndarray, legacy: bool) -> tuple[str, np.ndarray]:
  mod, leaf = path[:-1], path[-1]
  parts = []
  for p in mod:
    head, _, tail = p.rpartition("_")
    if head and tail.isdigit():
      parts += [head, tail]
    else:
      parts.append(p)
  if leaf == "kernel":  # the patch-embedding kernel is reshaped to Conv3d layout by the caller
    v, hf_leaf = value.T, "weight"
  elif leaf in ("embedding", "scale"):
    v, hf_leaf = value, "weight"
  else:
    v, hf_leaf = value, leaf
  name = ".".join(parts + [hf_leaf])
  if name.startswith("lm_head."):
    return name, v
  if legacy:
    name = name if name.startswith("visual.") else "model." + name[len("language_model."):]
  else:
    name = "model." + name
  return name, v


def _format(keys, limit=20):
  keys = sorted(keys)
  more = f" ... and {len(keys) - limit} more" if len(keys) > limit else ""
  return ", ".join(keys[:limit]) + more


# ------------------------------------------------------------------------------------------------
# Load / save.


def load_hf_qwen3_vl(path: str, dtype=np.float32, scan_layers: bool = False,
                     scan_vision: bool = False) -> tuple[Qwen3VLConfig, dict]:
  """Loads an HF Qwen3-VL / Qwen3-VL-MoE / Qwen2.5-VL ``save_pretrained`` directory.

  Args:
    path: directory with ``config.json`` and ``model.safetensors`` (or a sharded
      ``model.safetensors.index.json`` + shards).
    dtype: numpy dtype of the returned arrays (e.g. ``jnp.bfloat16`` to keep a bf16 checkpoint
      as is).
    scan_layers: return the decoder layers stacked for ``Qwen3VL(config, scan_layers=True)``
      (``language_model/layers/...`` with a leading layer axis, :func:`vlm.models.qwen3.stack_layers`)
      instead of ``language_model/layers_{i}``.
    scan_vision: return the vision blocks stacked for ``Qwen3VL(config, scan_vision=True)``
      (``visual/blocks/...`` with a leading layer axis, :func:`vlm.models.qwen_vit.stack_blocks`)
      instead of ``visual/blocks_{i}``.
  Returns:
    ``(config, params)``: params is the ``"params"`` collection of :class:`Qwen3VL`
    (``{"visual": ..., "language_model": ..., "lm_head"?: ...}``) as jnp arrays.
  Raises:
    FileNotFoundError: missing config.json or weights.
    ValueError: unsupported model type; unknown checkpoint keys, missing parameters or shape
      mismatches (all listed).
  """
  cfg_file = os.path.join(path, "config.json")
  if not os.path.exists(cfg_file):
    raise FileNotFoundError(f"no config.json in {path}")
  with open(cfg_file) as fh:
    config = config_from_hf(json.load(fh))
  state = read_safetensors_dir(path)
  want = expected_shapes(config)
  flat: dict[tuple[str, ...], np.ndarray] = {}
  unknown = []
  for key, value in state.items():
    if key.endswith("inv_freq"):
      continue
    if key == "lm_head.weight" and config.text.tie_word_embeddings:
      continue
    got = _to_vlm(key, np.asarray(value))
    if got is None or got[0] not in want:
      unknown.append(key)
      continue
    flat[got[0]] = got[1]
  missing = ["/".join(k) for k in want if k not in flat]
  bad = [f"{'/'.join(k)} {v.shape} (expected {want[k]})" for k, v in flat.items()
         if tuple(v.shape) != want[k]]
  errors = []
  if unknown:
    errors.append(f"unknown checkpoint keys: {_format(unknown)}")
  if missing:
    errors.append(f"parameters missing from the checkpoint: {_format(missing)}")
  if bad:
    errors.append(f"shape mismatches: {_format(bad)}")
  if errors:
    raise ValueError(f"{path} does not match {type(config).__name__} from its config.json: "
                     + "; ".join(errors))
  params = _unflat({k: jnp.asarray(np.asarray(v, dtype)) for k, v in flat.items()})
  if scan_layers:
    if not config.text.homogeneous:
      raise ValueError(f"{path}: scan_layers=True needs every decoder layer to have the same MLP "
                       "kind, but this config mixes dense and MoE layers; load with "
                       "scan_layers=False")
    params["language_model"] = stack_layers(params["language_model"])
  if scan_vision:
    params["visual"] = stack_blocks(params["visual"])
  return config, params


def hf_state_from_params(config: Qwen3VLConfig, params: Mapping[str, Any],
                         legacy: bool = False) -> dict[str, np.ndarray]:
  """vlm params (unscanned, or scanned ``language_model/layers`` and/or ``visual/blocks``) -> HF
  state dict (numpy).
  ``legacy``: Qwen2.5-VL Hub key layout.

  Raises:
    ValueError: params whose paths/shapes differ from what ``config`` needs (listed).
  """
  if "params" in params and len(params) == 1:
    params = params["params"]
  params = dict(nn.unbox(dict(params)))
  if "layers" in params.get("language_model", {}):  # scanned decoder: back to layers_{i}
    params["language_model"] = unstack_layers(params["language_model"])
  if "blocks" in params.get("visual", {}):  # scanned vision tower: back to blocks_{i}
    params["visual"] = unstack_blocks(params["visual"])
  want = expected_shapes(config)
  flat = {k: np.asarray(v) for k, v in _flat(params).items()}
  extra = ["/".join(k) for k in flat if k not in want]
  missing = ["/".join(k) for k in want if k not in flat]
  bad = ["/".join(k) for k, v in flat.items() if k in want and tuple(v.shape) != want[k]]
  if extra or missing or bad:
    raise ValueError(f"params do not match the config: unexpected {_format(extra)}; missing "
                     f"{_format(missing)}; wrong shape {_format(bad)}")
  state = {}
  for path, value in flat.items():
    name, v = _from_vlm(path, value, legacy)
    if path[-2:] == ("proj", "kernel") and path[-3] == "patch_embed":
      c = config.vision
      v = v.reshape(v.shape[0], c.in_channels, c.temporal_patch_size, c.patch_size, c.patch_size)
    state[name] = np.ascontiguousarray(v)
  return state


def save_hf_qwen3_vl(config: Qwen3VLConfig, params: Mapping[str, Any], path: str,
                     max_shard_size: int | str | None = None) -> None:
  """Writes ``config.json`` + ``model.safetensors`` (or shards + index) that transformers'
  ``Qwen3VLForConditionalGeneration`` / ``Qwen3VLMoeForConditionalGeneration`` /
  ``Qwen2_5_VLForConditionalGeneration.from_pretrained`` loads, and :func:`load_hf_qwen3_vl`
  reads back identically.

  Raises:
    ValueError: as :func:`hf_state_from_params`.
  """
  state = hf_state_from_params(config, params)
  os.makedirs(path, exist_ok=True)
  with open(os.path.join(path, "config.json"), "w") as fh:
    json.dump(config_to_hf(config), fh, indent=2)
  write_safetensors_dir(state, path, max_shard_size)
