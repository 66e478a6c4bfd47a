"""HF OPT checkpoints (``OPTForCausalLM``, or the ``language_model`` of BLIP-2) <-> vlm params.

Pure numpy (:mod:`vlm.convert.safetensors_io`): no torch, no transformers. Key map (HF names from
``transformers/models/opt/modeling_opt.py``; ``{p}`` = ``prefix``, ``model.decoder.`` for
``OPTForCausalLM`` and ``language_model.model.decoder.`` inside HF
``Blip2ForConditionalGeneration``):

==========================================================  ======================================
HF key                                                      vlm path (:class:`OPTForCausalLM`)
==========================================================  ======================================
``{p}embed_tokens.weight`` [V, Dw]                          ``embed_tokens/embedding``
``{p}embed_positions.weight`` [P + 2, D]                    ``embed_positions/embedding``
``{p}project_in.weight`` [D, Dw] / ``project_out`` [Dw, D]  ``project_in|project_out/kernel`` (.T)
``{p}layers.{i}.self_attn.{q,k,v,out}_proj.weight|bias``    ``layers_{i}/self_attn/..._proj/kernel``
                                                            (.T) ``|bias``
``{p}layers.{i}.fc1|fc2.weight|bias``                       ``layers_{i}/fc1|fc2/kernel (.T)|bias``
``{p}layers.{i}.self_attn_layer_norm|final_layer_norm``     ``layers_{i}/...|/scale|bias``
``.weight|bias``
``{p}final_layer_norm.weight|bias`` (pre-LN only)           ``final_layer_norm/scale|bias``
``lm_head.weight`` [V, Dw] (untied only)                    ``lm_head/kernel`` [Dw, V]
==========================================================  ======================================

The LM head key is ``prefix`` with ``model.decoder.`` replaced by ``lm_head.weight`` (pass
``lm_head_key`` otherwise). Tied configs: a checkpoint's ``lm_head.weight`` may be absent or
equal to ``embed_tokens``, and is not written. Scanned trees (``layers/...`` with a leading layer
axis) are accepted and produced with ``scan_layers=True``.
"""
from __future__ import annotations

import json
import os
from typing import Any, Mapping

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from vlm.convert.safetensors_io import read_safetensors_dir, write_safetensors_dir
from vlm.models.opt import POSITION_OFFSET, OPTConfig
from vlm.models.qwen3 import unstack_layers

DEFAULT_PREFIX = "model.decoder."

# (HF key after the prefix, vlm path, HF shape, transpose between HF [out, in] and vlm [in, out])
_Entry = tuple[str, tuple[str, ...], tuple[int, ...], bool]


def _lm_head_key(prefix: str, lm_head_key: str | None) -> str:
  if lm_head_key is not None:
    return lm_head_key
  if not prefix.endswith(DEFAULT_PREFIX):
    raise ValueError(f"cannot derive the lm_head key from prefix {prefix!r} (it does not end in "
                     f"{DEFAULT_PREFIX!r}); pass lm_head_key=")
  return prefix[:-len(DEFAULT_PREFIX)] + "lm_head.weight"


def _entries(config: OPTConfig) -> list[_Entry]:
  """Every HF tensor of the decoder (suffix after ``prefix``), its vlm path, HF shape, transpose."""
  d, dw, f = config.hidden_size, config.embed_dim, config.ffn_dim
  out: list[_Entry] = [
      ("embed_tokens.weight", ("embed_tokens", "embedding"), (config.vocab_size, dw), False),
      ("embed_positions.weight", ("embed_positions", "embedding"),
       (config.max_position_embeddings + POSITION_OFFSET, d), False)]
  if dw != d:
    out.append(("project_in.weight", ("project_in", "kernel"), (d, dw), True))
    out.append(("project_out.weight", ("project_out", "kernel"), (dw, d), True))

  def linear(hf, path, d_in, d_out):
    rows = [(f"{hf}.weight", path + ("kernel",), (d_out, d_in), True)]
    if config.enable_bias:
      rows.append((f"{hf}.bias", path + ("bias",), (d_out,), False))
    return rows

  def norm(hf, path):
    if not config.layer_norm_elementwise_affine:
      return []
    return [(f"{hf}.weight", path + ("scale",), (d,), False),
            (f"{hf}.bias", path + ("bias",), (d,), False)]

  for i in range(config.num_hidden_layers):
    hf, path = f"layers.{i}.", (f"layers_{i}",)
    for proj in ("q_proj", "k_proj", "v_proj", "out_proj"):
      out += linear(hf + "self_attn." + proj, path + ("self_attn", proj), d, d)
    out += norm(hf + "self_attn_layer_norm", path + ("self_attn_layer_norm",))
    out += linear(hf + "fc1", path + ("fc1",), d, f)
    out += linear(hf + "fc2", path + ("fc2",), f, d)
    out += norm(hf + "final_layer_norm", path + ("final_layer_norm",))
  if config.do_layer_norm_before:
    out += norm("final_layer_norm", ("final_layer_norm",))
  return out


def _format(keys, limit: int = 20) -> str:
  keys = sorted(keys)
  more = f" ... and {len(keys) - limit} more" if len(keys) > limit else ""
  return ", ".join(keys[:limit]) + more


def opt_params_from_hf_state(state: Mapping[str, np.ndarray], config: OPTConfig,
                             prefix: str = DEFAULT_PREFIX, *, scan_layers: bool = False,
                             lm_head_key: str | None = None, ignore_other_keys: bool = False,
                             dtype: Any = None) -> dict:
  """HF state dict (numpy arrays) -> the ``"params"`` collection of :class:`OPTForCausalLM`.

  Args:
    state: HF key -> array (e.g. from :func:`vlm.convert.safetensors_io.read_safetensors_dir`).
    config: the model's :class:`OPTConfig`.
    prefix: prefix of the decoder keys (``"model.decoder."``; BLIP-2:
      ``"language_model.model.decoder."``).
    scan_layers: stack the layers (``layers/...`` with a leading layer axis).
    lm_head_key: HF key of the LM head (default: derived from ``prefix``).
    ignore_other_keys: skip keys outside ``prefix`` and the LM head (a BLIP-2 state dict's
      vision/Q-Former keys); otherwise they are reported as unknown.
    dtype: numpy dtype of the returned arrays (None: keep each array's dtype).
  Returns:
    nested dict of numpy arrays (Linear weights transposed to [in, out] kernels).
  Raises:
    ValueError: unknown keys, missing keys or shape mismatches (all listed); a tied config whose
      checkpoint ``lm_head.weight`` differs from ``embed_tokens`` (set tie_word_embeddings=False).
  """
  head_key = _lm_head_key(prefix, lm_head_key)
  entries = {prefix + hf: (path, shape, t) for hf, path, shape, t in _entries(config)}
  flat: dict[tuple[str, ...], np.ndarray] = {}
  unknown, bad, errors = [], [], []
  for key, value in state.items():
    if key == head_key:
      continue
    if key not in entries:
      if key.startswith(prefix) or not ignore_other_keys:
        unknown.append(key)
      continue
    path, shape, transpose = entries[key]
    value = np.asarray(value)
    if tuple(value.shape) != shape:
      bad.append(f"{key} {tuple(value.shape)} (expected {shape})")
      continue
    flat[path] = value.T if transpose else value
  missing = [k for k in entries if k not in state]
  embed_key = prefix + "embed_tokens.weight"
  if config.tie_word_embeddings:
    if head_key in state and embed_key in state and not np.array_equal(
        np.asarray(state[head_key]), np.asarray(state[embed_key])):
      errors.append(f"{head_key} differs from {embed_key} but the config ties them; set "
                    "tie_word_embeddings=False")
  elif head_key not in state:
    missing.append(head_key)
  else:
    head = np.asarray(state[head_key])
    if tuple(head.shape) != (config.vocab_size, config.embed_dim):
      bad.append(f"{head_key} {tuple(head.shape)} (expected "
                 f"{(config.vocab_size, config.embed_dim)})")
    else:
      flat[("lm_head", "kernel")] = head.T
  if unknown:
    errors.append(f"unknown checkpoint keys: {_format(unknown)}")
  if missing:
    errors.append(f"keys missing from the checkpoint: {_format(missing)}")
  if bad:
    errors.append(f"shape mismatches: {_format(bad)}")
  if errors:
    raise ValueError("HF OPT state does not match the OPTConfig (prefix "
                     f"{prefix!r}): " + "; ".join(errors))
  cast = (lambda a: np.ascontiguousarray(a)) if dtype is None else (
      lambda a: np.ascontiguousarray(np.asarray(a, dtype)))
  params = flax.traverse_util.unflatten_dict({k: cast(v) for k, v in flat.items()})
  if scan_layers:  # numpy stacking (host memory), the layout of vlm.models.qwen3.stack_layers
    n = config.num_hidden_layers
    per_layer = [params.pop(f"layers_{i}") for i in range(n)]
    params["layers"] = jax.tree_util.tree_map(lambda *xs: np.stack(xs), *per_layer)
  return params


def hf_state_from_opt_params(params: Mapping[str, Any], config: OPTConfig,
                             prefix: str = DEFAULT_PREFIX, *,
                             lm_head_key: str | None = None) -> dict[str, np.ndarray]:
  """:class:`OPTForCausalLM` params (unscanned or scanned, boxed or not, with or without the outer
  ``{"params": ...}``) -> HF state dict of numpy arrays (no ``lm_head.weight`` when tied, as HF
  ``save_pretrained`` writes it).

  Raises:
    ValueError: params whose paths or shapes differ from what ``config`` needs (listed).
  """
  if "params" in params and len(params) == 1:
    params = params["params"]
  params = nn.unbox(dict(params))
  if "layers" in params:  # scanned: back to layers_{i}
    params = unstack_layers(params)
  flat = {k: np.asarray(v) for k, v in flax.traverse_util.flatten_dict(params).items()}
  want = {path: (hf, shape, t) for hf, path, shape, t in _entries(config)}
  if not config.tie_word_embeddings:
    want[("lm_head", "kernel")] = (None, (config.vocab_size, config.embed_dim), True)
  extra = ["/".join(k) for k in flat if k not in want]
  missing = ["/".join(k) for k in want if k not in flat]
  bad = [f"{'/'.join(k)} {v.shape}" for k, v in flat.items() if k in want and
         tuple(v.T.shape if want[k][2] else v.shape) != want[k][1]]
  if extra or missing or bad:
    raise ValueError(f"OPT params do not match the OPTConfig: unexpected [{_format(extra)}]; "
                     f"missing [{_format(missing)}]; wrong shape [{_format(bad)}]")
  head_key = _lm_head_key(prefix, lm_head_key)
  state = {}
  for path, (hf, _, transpose) in want.items():
    v = flat[path]
    state[head_key if hf is None else prefix + hf] = np.ascontiguousarray(v.T if transpose else v)
  return state


def load_hf_opt(path: str, dtype=np.float32, scan_layers: bool = False) -> tuple[OPTConfig, dict]:
  """Loads an HF ``OPTForCausalLM`` ``save_pretrained`` directory (safetensors, single or sharded).

  Args:
    path: directory with ``config.json`` and ``model.safetensors`` or an index + shards.
    dtype: numpy dtype of the returned arrays (e.g. ``jnp.bfloat16``).
    scan_layers: return the layers stacked for ``OPTForCausalLM(..., scan_layers=True)``.
  Returns:
    ``(config, params)``: params is the ``"params"`` collection as jnp arrays.
  Raises:
    FileNotFoundError: no config.json or no weights.
    ValueError: not an OPT config; unknown/missing keys or shape mismatches (listed).
  """
  cfg_file = os.path.join(path, "config.json")
  if not os.path.exists(cfg_file):
    raise FileNotFoundError(f"no config.json in {path}")
  with open(cfg_file) as fh:
    config = OPTConfig.from_hf_config(json.load(fh))
  state = read_safetensors_dir(path)
  try:
    params = opt_params_from_hf_state(state, config, scan_layers=scan_layers, dtype=dtype)
  except ValueError as e:
    raise ValueError(f"{path}: {e}") from None
  return config, _to_jnp(params)


def _to_jnp(tree):
  if isinstance(tree, Mapping):
    return {k: _to_jnp(v) for k, v in tree.items()}
  return jnp.asarray(tree)


def save_hf_opt(config: OPTConfig, params: Mapping[str, Any], path: str,
                max_shard_size: int | str | None = None) -> None:
  """Writes ``config.json`` + ``model.safetensors`` (or shards of at most ``max_shard_size``
  bytes + index) that transformers' ``OPTForCausalLM.from_pretrained`` loads and
  :func:`load_hf_opt` reads back identically.

  Raises:
    ValueError: as :func:`hf_state_from_opt_params`.
  """
  state = hf_state_from_opt_params(params, config)
  os.makedirs(path, exist_ok=True)
  with open(os.path.join(path, "config.json"), "w") as fh:
    json.dump(config.to_hf_config(), fh, indent=2)
  write_safetensors_dir(state, path, max_shard_size)
