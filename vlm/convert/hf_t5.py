"""HF ``T5ForConditionalGeneration`` checkpoints <-> vlm ``T5ForConditionalGeneration`` params.

Pure numpy (no torch, no transformers). Key mapping (HF ``transformers/models/t5/modeling_t5.py``
names; Linear ``weight`` [out, in] -> ``kernel`` [in, out] transposed, T5LayerNorm ``weight`` ->
``scale``, Embedding ``weight`` -> ``embedding``; S = encoder | decoder)::

  shared.weight                                   shared/embedding
  S.block.0.layer.0.SelfAttention.relative_attention_bias.weight
                                                  S/relative_attention_bias/embedding
  S.block.{i}.layer.0.layer_norm.weight           S/layers_{i}/layer_0/layer_norm/scale
  S.block.{i}.layer.0.SelfAttention.{q,k,v,o}.weight
                                        S/layers_{i}/layer_0/SelfAttention/{q,k,v,o}/kernel
  decoder.block.{i}.layer.1.{layer_norm, EncDecAttention.{q,k,v,o}}
                                                  decoder/layers_{i}/layer_1/...
  S.block.{i}.layer.{1 enc | 2 dec}.{layer_norm, DenseReluDense.{wi_0,wi_1,wo | wi,wo}}
                                                  S/layers_{i}/layer_{1|2}/...
  S.final_layer_norm.weight                       S/final_layer_norm/scale
  lm_head.weight                                  lm_head/kernel (untied models only)

``encoder.embed_tokens.weight`` / ``decoder.embed_tokens.weight`` (and ``lm_head.weight`` of a tied
model) are tied copies of ``shared.weight``: accepted on load when equal to it, not written (HF
``save_pretrained`` drops them too). ``decoder.block.0.layer.1.EncDecAttention.
relative_attention_bias.weight`` (old checkpoints; HF ignores it on load) is ignored.
``prefix`` puts every key under a parent module, e.g. ``"language_model."`` inside HF
``Blip2ForConditionalGeneration``; keys outside the prefix are then left to the caller.
"""
from __future__ import annotations

import json
import os
from typing import Any, Mapping

import flax
import jax
import numpy as np

from vlm.convert import keymap
from vlm.convert.safetensors_io import read_safetensors_dir, write_safetensors_dir
from vlm.models.qwen3 import stack_layers, unstack_layers
from vlm.models.t5 import T5Config

CONFIG_NAME = "config.json"
_IGNORED = ("decoder.block.0.layer.1.EncDecAttention.relative_attention_bias.weight",)
_TIED_COPIES = ("encoder.embed_tokens.weight", "decoder.embed_tokens.weight")

# (hf key without prefix, flax path, op, hf shape); op "linear" transposes, "copy" keeps.
_Entry = tuple[str, tuple[str, ...], str, tuple[int, ...]]


def t5_entries(config: T5Config) -> list[_Entry]:
  """Every HF key of a ``T5ForConditionalGeneration`` with its vlm (unscanned) path."""
  d, inner, ff = config.d_model, config.inner_dim, config.d_ff
  out: list[_Entry] = [("shared.weight", ("shared", "embedding"), "copy",
                        (config.vocab_size, d))]

  def attention(hf, path):
    return [(f"{hf}.{n}.weight", path + (n, "kernel"), "linear",
             (d, inner) if n == "o" else (inner, d)) for n in ("q", "k", "v", "o")]

  def norm(hf, path):
    return [(f"{hf}.weight", path + ("scale",), "copy", (d,))]

  def ffn(hf, path):
    names = ("wi_0", "wi_1") if config.is_gated_act else ("wi",)
    e = [(f"{hf}.DenseReluDense.{n}.weight", path + ("DenseReluDense", n, "kernel"), "linear",
          (ff, d)) for n in names]
    e.append((f"{hf}.DenseReluDense.wo.weight", path + ("DenseReluDense", "wo", "kernel"),
              "linear", (d, ff)))
    return e + norm(f"{hf}.layer_norm", path + ("layer_norm",))

  for stack, n in (("encoder", config.num_layers), ("decoder", config.num_decoder_layers)):
    out.append((f"{stack}.block.0.layer.0.SelfAttention.relative_attention_bias.weight",
                (stack, "relative_attention_bias", "embedding"), "copy",
                (config.relative_attention_num_buckets, config.num_heads)))
    for i in range(n):
      hf, path = f"{stack}.block.{i}.layer", (stack, f"layers_{i}")
      out += norm(f"{hf}.0.layer_norm", path + ("layer_0", "layer_norm"))
      out += attention(f"{hf}.0.SelfAttention", path + ("layer_0", "SelfAttention"))
      if stack == "decoder":
        out += norm(f"{hf}.1.layer_norm", path + ("layer_1", "layer_norm"))
        out += attention(f"{hf}.1.EncDecAttention", path + ("layer_1", "EncDecAttention"))
        out += ffn(f"{hf}.2", path + ("layer_2",))
      else:
        out += ffn(f"{hf}.1", path + ("layer_1",))
    out += norm(f"{stack}.final_layer_norm", (stack, "final_layer_norm"))
  if not config.tie_word_embeddings:
    out.append(("lm_head.weight", ("lm_head", "kernel"), "linear", (config.vocab_size, d)))
  return out


def t5_params_from_hf_state(state: Mapping[str, np.ndarray], config: T5Config, prefix: str = "",
                            scan_layers: bool = False, dtype: Any = None) -> dict:
  """HF state dict (numpy) -> :class:`T5ForConditionalGeneration` params.

  Args:
    state: ``{hf key: array}``; with a non-empty ``prefix`` only the keys starting with it are
      read (the rest belong to the caller, e.g. the BLIP-2 vision tower).
    config: the model's :class:`T5Config`.
    prefix: prepended to every HF key (``"language_model."`` for HF BLIP-2).
    scan_layers: return the stacked layout (``layers`` with a leading layer axis).
    dtype: cast every array to it (None keeps the stored dtypes).
  Returns:
    nested dict of numpy arrays (no ``{"params": ...}`` level, no partitioning boxes).
  Raises:
    ValueError: missing, unknown or wrongly shaped keys, or tied copies (``embed_tokens``, tied
      ``lm_head``) that differ from ``shared.weight`` (all listed).
  """
  ours = {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}
  entries = t5_entries(config)
  optional = set(_TIED_COPIES) | set(_IGNORED)
  if config.tie_word_embeddings:
    optional.add("lm_head.weight")
  problems = []
  flat = keymap.hf_to_flat(ours, entries, problems, optional=optional, name_prefix=prefix,
                           dtype=dtype)
  shared = ours.get("shared.weight")
  for key in sorted((set(_TIED_COPIES) | {"lm_head.weight"}) & optional & set(ours)):
    if shared is not None and (np.shape(ours[key]) != np.shape(shared)
                               or not np.array_equal(np.asarray(ours[key]), np.asarray(shared))):
      problems.append(f"{prefix}{key} differs from {prefix}shared.weight but the model ties them "
                      "(tie_word_embeddings / T5's shared input embedding)")
  if problems:
    raise ValueError("cannot convert the HF T5 checkpoint: " + "; ".join(problems))
  params = flax.traverse_util.unflatten_dict(flat)
  if scan_layers:
    params = {k: (stack_layers(v) if k in ("encoder", "decoder") else v)
              for k, v in params.items()}
    params = _to_numpy(params)
  return params


def _to_numpy(tree):
  return jax.tree_util.tree_map(np.asarray, tree)


def _plain(params: Mapping[str, Any]) -> Mapping[str, Any]:
  """Drops a ``{"params": ...}`` level and partitioning boxes."""
  params = flax.core.meta.unbox(params)
  if "params" in params and len(params) == 1:
    params = params["params"]
  return params


def hf_state_from_t5_params(params: Mapping[str, Any], config: T5Config, prefix: str = "",
                            scan_layers: bool = False) -> dict[str, np.ndarray]:
  """:class:`T5ForConditionalGeneration` params -> HF state dict (numpy), as ``save_pretrained``
  writes it: ``shared.weight`` without its tied ``embed_tokens`` copies; ``lm_head.weight`` only
  when untied. Dtypes are kept.

  Args:
    params: plain or boxed, with or without a ``{"params": ...}`` level.
    scan_layers: ``params`` has the stacked layout.
  Raises:
    ValueError: missing, unknown or wrongly shaped params (all listed); a layer layout that
      contradicts ``scan_layers``.
  """
  params = _plain(params)
  for stack in ("encoder", "decoder"):
    has_scanned = isinstance(params.get(stack), Mapping) and "layers" in params[stack]
    if has_scanned != scan_layers:
      raise ValueError(f"params/{stack} {'has' if has_scanned else 'lacks'} the stacked 'layers' "
                       f"subtree but scan_layers={scan_layers}; pass scan_layers={has_scanned}")
  if scan_layers:
    params = {k: (unstack_layers(v) if k in ("encoder", "decoder") else v)
              for k, v in params.items()}
  problems = []
  state = keymap.flat_to_hf(flax.traverse_util.flatten_dict(dict(params)), t5_entries(config),
                            problems, prefix=prefix)
  if problems:
    raise ValueError("cannot convert T5 params to HF: " + "; ".join(problems))
  return state


def load_hf_t5(path: str, dtype: Any = np.float32, scan_layers: bool = False
               ) -> tuple[T5Config, dict]:
  """Loads a local HF ``T5ForConditionalGeneration`` directory (``save_pretrained`` layout).

  Args:
    path: directory with ``config.json`` and ``model.safetensors`` or a sharded
      ``model.safetensors.index.json`` + shards.
    dtype: dtype of the returned arrays (None keeps the stored ones).
    scan_layers: return the stacked layout.
  Returns:
    ``(config, params)`` with params a nested dict of numpy arrays.
  Raises:
    FileNotFoundError: no config.json or weights; ValueError: not a T5 config, or missing /
      unknown / wrongly shaped keys (see :func:`t5_params_from_hf_state`).
  """
  config_file = os.path.join(path, CONFIG_NAME)
  if not os.path.exists(config_file):
    raise FileNotFoundError(f"no {CONFIG_NAME} in {path}")
  with open(config_file) as fh:
    config = T5Config.from_hf_config(json.load(fh))
  state = read_safetensors_dir(path)
  return config, t5_params_from_hf_state(state, config, scan_layers=scan_layers, dtype=dtype)


def save_hf_t5(config: T5Config, params: Mapping[str, Any], path: str,
               max_shard_size: int | str | None = None, scan_layers: bool = False) -> None:
  """Writes an HF ``T5ForConditionalGeneration`` directory loadable with ``from_pretrained``:
  ``config.json`` (:meth:`T5Config.to_hf_config`) and ``model.safetensors``, or shards of at most
  ``max_shard_size`` (bytes or e.g. ``"200MB"``) plus ``model.safetensors.index.json``.

  Raises:
    ValueError: missing / unknown / wrongly shaped params.
  """
  state = hf_state_from_t5_params(params, config, scan_layers=scan_layers)
  os.makedirs(path, exist_ok=True)
  write_safetensors_dir(state, path, max_shard_size)
  with open(os.path.join(path, CONFIG_NAME), "w") as fh:
    json.dump(config.to_hf_config(), fh, indent=2, sort_keys=True)
