"""HF <-> vlm parameter maps for the BLIP-2 image encoders, and position-table interpolation.

Pure numpy: no torch, no transformers. State dicts are ``{key: np.ndarray}`` (torch CPU tensors
also work because they convert with ``np.asarray``).

* ``kind == "eva"``: keys of HF ``Blip2VisionModel`` (inside ``Blip2ForImageTextRetrieval`` and
  friends they sit under ``vision_model.``). Spec section 1.4.
* ``kind == "clip"``: keys of HF ``CLIPVisionModel`` (``vision_model.`` prefix there), where
  ``vision_model.post_layernorm`` holds the BLIP-2 ``post_layernorm`` (LAVIS ``ln_vision``), not
  CLIP's own final norm. Spec section 1.3. HF ``CLIPVisionEmbeddings`` stores ``class_embedding``
  as [Dv] and ``position_embedding`` as an ``nn.Embedding`` [N+1, Dv]; vlm uses [1,1,Dv] and
  [1,N+1,Dv] for both kinds.

Mapping rules (see /work/coord/CONTRACT.md): ``"."`` -> ``"/"``, ``layers.{i}`` -> ``layers_{i}``,
Linear ``weight`` [out,in] -> ``kernel`` [in,out], LayerNorm ``weight`` -> ``scale``, Conv2d
``weight`` [O,I,kh,kw] -> ``kernel`` [kh,kw,I,O]. Every map is a transpose or reshape, so
``vision_to_hf(vision_from_hf(sd)) == sd`` exactly (same keys, values, dtypes).
"""
from __future__ import annotations

import math
from typing import Any, Mapping, Sequence

import flax
import numpy as np

from vlm.models.presets import Blip2VisionConfig

# op names: "copy" (same shape), "linear" (transpose 2-D), "conv" (OIHW <-> HWIO),
# "reshape" (to the flax shape given by the entry; inverse reshapes to the HF shape).
_Entry = tuple[str, tuple[str, ...], str, tuple[int, ...], tuple[int, ...]]


def _linear(hf: str, flax_path: tuple[str, ...], d_in: int, d_out: int, bias: bool = True):
  out = [(f"{hf}.weight", flax_path + ("kernel",), "linear", (d_out, d_in), (d_in, d_out))]
  if bias:
    out.append((f"{hf}.bias", flax_path + ("bias",), "copy", (d_out,), (d_out,)))
  return out


def _layer_norm(hf: str, flax_path: tuple[str, ...], d: int):
  return [(f"{hf}.weight", flax_path + ("scale",), "copy", (d,), (d,)),
          (f"{hf}.bias", flax_path + ("bias",), "copy", (d,), (d,))]


def _entries(config: Blip2VisionConfig) -> list[_Entry]:
  """All (hf key without prefix, flax path, op, hf shape, flax shape) for ``config``."""
  d, f, p, c = config.hidden_size, config.intermediate_size, config.patch_size, config.num_channels
  n1 = config.num_positions
  emb = ("embeddings",)
  out: list[_Entry] = []
  conv = ("embeddings.patch_embedding.weight", emb + ("patch_embedding", "kernel"), "conv",
          (d, c, p, p), (p, p, c, d))
  if config.kind == "eva":
    out += [
        ("embeddings.class_embedding", emb + ("class_embedding",), "copy", (1, 1, d), (1, 1, d)),
        conv,
        ("embeddings.patch_embedding.bias", emb + ("patch_embedding", "bias"), "copy", (d,),
         (d,)),
        ("embeddings.position_embedding", emb + ("position_embedding",), "copy", (1, n1, d),
         (1, n1, d)),
    ]
  else:
    out += [
        ("embeddings.class_embedding", emb + ("class_embedding",), "reshape", (d,), (1, 1, d)),
        conv,
        ("embeddings.position_embedding.weight", emb + ("position_embedding",), "reshape",
         (n1, d), (1, n1, d)),
    ]
    out += _layer_norm("pre_layrnorm", ("pre_layrnorm",), d)
  for i in range(config.num_hidden_layers):
    hf, fl = f"encoder.layers.{i}", ("encoder", f"layers_{i}")
    out += _layer_norm(f"{hf}.layer_norm1", fl + ("layer_norm1",), d)
    if config.kind == "eva":
      out += _linear(f"{hf}.self_attn.qkv", fl + ("self_attn", "qkv"), d, 3 * d,
                     bias=config.qkv_bias)
      out += _linear(f"{hf}.self_attn.projection", fl + ("self_attn", "projection"), d, d)
    else:
      for name in ("q_proj", "k_proj", "v_proj", "out_proj"):
        out += _linear(f"{hf}.self_attn.{name}", fl + ("self_attn", name), d, d)
    out += _layer_norm(f"{hf}.layer_norm2", fl + ("layer_norm2",), d)
    out += _linear(f"{hf}.mlp.fc1", fl + ("mlp", "fc1"), d, f)
    out += _linear(f"{hf}.mlp.fc2", fl + ("mlp", "fc2"), f, d)
  out += _layer_norm("post_layernorm", ("post_layernorm",), d)
  return out


def _to_flax(x: np.ndarray, op: str, flax_shape) -> np.ndarray:
  if op == "linear":
    return np.ascontiguousarray(x.T)
  if op == "conv":
    return np.ascontiguousarray(x.transpose(2, 3, 1, 0))
  if op == "reshape":
    return x.reshape(flax_shape)
  return x


def _to_hf(x: np.ndarray, op: str, hf_shape) -> np.ndarray:
  if op == "linear":
    return np.ascontiguousarray(x.T)
  if op == "conv":
    return np.ascontiguousarray(x.transpose(3, 2, 0, 1))
  if op == "reshape":
    return x.reshape(hf_shape)
  return x


def _format_keys(keys: Sequence[str], limit: int = 20) -> str:
  keys = sorted(keys)
  more = f" ... and {len(keys) - limit} more" if len(keys) > limit else ""
  return ", ".join(keys[:limit]) + more


def vision_from_hf(state_dict: Mapping[str, Any], config: Blip2VisionConfig,
                   prefix: str = "vision_model.") -> dict:
  """Converts HF vision weights into the vlm parameter tree of the vision model.

  Args:
    state_dict: ``{hf_key: array}``. Only keys that start with ``prefix`` are read; others (e.g.
      the Q-Former of a full BLIP-2 checkpoint) are ignored. Use ``prefix=""`` for the state dict
      of a bare HF ``Blip2VisionModel``.
    config: the vision config; ``config.kind`` selects the EVA or CLIP key layout and every shape
      is checked against it.
    prefix: the key prefix of the vision tower.
  Returns:
    Nested dict of numpy arrays with the structure of ``EvaVisionModel``/``ClipVisionModel``
    params (no ``nn.Partitioned`` boxes), dtypes as given.
  Raises:
    ValueError: naming every missing key, every unknown key under ``prefix`` and every array
      whose shape does not match ``config``.
  """
  entries = _entries(config)
  ours = {k[len(prefix):]: v for k, v in state_dict.items() if k.startswith(prefix)}
  expected = {e[0] for e in entries}
  missing = sorted(expected - set(ours))
  unknown = sorted(set(ours) - expected)
  problems = []
  if missing:
    hint = ""
    if not ours:
      hint = (f" (no key starts with {prefix!r}; pass prefix='' for a bare vision-model state "
              "dict)")
    problems.append(f"missing keys: {_format_keys([prefix + k for k in missing])}{hint}")
  if unknown:
    problems.append(f"unknown keys: {_format_keys([prefix + k for k in unknown])}")
  params: dict = {}
  for hf_key, path, op, hf_shape, flax_shape in entries:
    if hf_key not in ours:
      continue
    x = np.asarray(ours[hf_key])
    if tuple(x.shape) != tuple(hf_shape):
      hint = ""
      if "position_embedding" in hf_key:
        hint = (" (a different image size: resize the table with "
                "interpolate_position_embedding or set config.image_size)")
      problems.append(f"{prefix + hf_key} has shape {tuple(x.shape)}, expected {hf_shape} for "
                      f"this {config.kind} config{hint}")
      continue
    node = params
    for name in path[:-1]:
      node = node.setdefault(name, {})
    node[path[-1]] = _to_flax(x, op, flax_shape)
  if problems:
    raise ValueError(f"cannot convert HF {config.kind} vision weights: " + "; ".join(problems))
  return params


def vision_to_hf(params: Mapping[str, Any], config: Blip2VisionConfig,
                 prefix: str = "vision_model.") -> dict[str, np.ndarray]:
  """Converts a vlm vision parameter tree back to HF keys (inverse of :func:`vision_from_hf`).

  Args:
    params: the vision model's params (``variables["params"]``), plain or ``nn.Partitioned``
      boxed, dict or FrozenDict, jax or numpy leaves.
    config: the vision config (selects the key layout; shapes are checked).
    prefix: prepended to every HF key.
  Returns:
    ``{prefix + hf_key: np.ndarray}`` (contiguous arrays, dtypes as stored in ``params``).
  Raises:
    ValueError: naming missing or unknown parameter paths and shape mismatches.
  """
  params = flax.core.meta.unbox(flax.core.unfreeze(params))
  flat = {tuple(k): v for k, v in flax.traverse_util.flatten_dict(params).items()}
  entries = _entries(config)
  expected = {e[1] for e in entries}
  missing = sorted("/".join(p) for p in expected - set(flat))
  unknown = sorted("/".join(p) for p in set(flat) - expected)
  problems = []
  if missing:
    problems.append(f"missing params: {_format_keys(missing)}")
  if unknown:
    problems.append(f"unknown params: {_format_keys(unknown)}")
  out: dict[str, np.ndarray] = {}
  for hf_key, path, op, hf_shape, flax_shape in entries:
    if path not in flat:
      continue
    x = np.asarray(flat[path])
    if tuple(x.shape) != tuple(flax_shape):
      problems.append(f"param {'/'.join(path)} has shape {tuple(x.shape)}, expected "
                      f"{flax_shape} for this {config.kind} config")
      continue
    out[prefix + hf_key] = _to_hf(x, op, hf_shape)
  if problems:
    raise ValueError(f"cannot convert vlm {config.kind} vision params: " + "; ".join(problems))
  return out


def _cubic_resize_matrix(in_size: int, out_size: int, a: float = -0.75) -> np.ndarray:
  """[out_size, in_size] float64 matrix of torch ``mode="bicubic", align_corners=False``.

  Source index ``(dst + 0.5) * in/out - 0.5`` (not clamped, as torch does for cubic), Keys kernel
  with ``a = -0.75``, taps ``floor(src) - 1 .. floor(src) + 2`` clamped to the edge.
  """
  scale = in_size / out_size
  m = np.zeros((out_size, in_size), np.float64)
  for dst in range(out_size):
    src = (dst + 0.5) * scale - 0.5
    i0 = math.floor(src)
    t = src - i0
    for k, dist in zip(range(-1, 3), (1.0 + t, t, 1.0 - t, 2.0 - t)):
      if dist <= 1.0:
        w = ((a + 2.0) * dist - (a + 3.0)) * dist * dist + 1.0
      else:
        w = ((a * dist - 5.0 * a) * dist + 8.0 * a) * dist - 4.0 * a
      m[dst, min(max(i0 + k, 0), in_size - 1)] += w
  return m


def interpolate_position_embedding(pos_embed, new_grid: int | tuple[int, int]) -> np.ndarray:
  """Resizes a ViT position table to a new patch grid, keeping the class-token row.

  Same result as HF/LAVIS: the [n, n] grid of patch rows is resized with torch
  ``F.interpolate(mode="bicubic", align_corners=False)`` (Keys cubic, a = -0.75, edge clamp) and
  the class-token row is kept as is (spec sections 1.1 and 9, item 24; HF
  ``Blip2VisionEmbeddings.interpolate_pos_encoding``). Computed in float64, returned in the input
  dtype.

  Args:
    pos_embed: [1, 1 + n*n, D] (numpy or jax array).
    new_grid: m (square grid) or (height, width) in patches.
  Returns:
    np.ndarray [1, 1 + height*width, D].
  Raises:
    ValueError: if ``pos_embed`` is not [1, 1 + n*n, D] or ``new_grid`` is not positive.
  """
  pos = np.asarray(pos_embed)
  if pos.ndim != 3 or pos.shape[0] != 1:
    raise ValueError(f"pos_embed must have shape [1, 1 + n*n, D], got {pos.shape}")
  n = math.isqrt(pos.shape[1] - 1)
  if n * n != pos.shape[1] - 1 or n == 0:
    raise ValueError(f"pos_embed has {pos.shape[1] - 1} patch rows, which is not a square grid; "
                     "expected shape [1, 1 + n*n, D]")
  gh, gw = (new_grid, new_grid) if isinstance(new_grid, (int, np.integer)) else tuple(new_grid)
  if gh <= 0 or gw <= 0:
    raise ValueError(f"new_grid must be positive, got {new_grid}")
  d = pos.shape[2]
  grid = pos[0, 1:].astype(np.float64).reshape(n, n, d)
  rows, cols = _cubic_resize_matrix(n, gh), _cubic_resize_matrix(n, gw)
  resized = np.einsum("hi,wj,ijd->hwd", rows, cols, grid).reshape(gh * gw, d)
  out = np.concatenate([pos[0, :1].astype(np.float64), resized], axis=0)[None]
  return out.astype(pos.dtype)
