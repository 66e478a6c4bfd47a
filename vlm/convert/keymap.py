"""Declarative HF <-> vlm key tables: one walk, used by every converter built on them.

An entry is ``(hf key, flax path, op, hf shape)``: ``op`` ``"linear"`` transposes (HF Linear
``weight`` [out, in] <-> flax ``kernel`` [in, out]), ``"copy"`` keeps the array. Every problem is
collected (missing, unknown and wrongly shaped keys, all listed) so one error names them all.
"""
from __future__ import annotations

from typing import Any, Iterable, Mapping, Sequence

import numpy as np

Entry = tuple[str, tuple[str, ...], str, tuple[int, ...]]


def format_keys(keys: Iterable[str], limit: int = 20) -> str:
  """The first ``limit`` sorted keys joined, and how many more there are."""
  keys = sorted(keys)
  more = f" ... and {len(keys) - limit} more" if len(keys) > limit else ""
  return ", ".join(keys[:limit]) + more


def hf_to_flat(ours: Mapping[str, Any], entries: Sequence[Entry], problems: list[str], *,
               optional: Iterable[str] = (), name_prefix: str = "",
               dtype: Any = None) -> dict[tuple[str, ...], np.ndarray]:
  """HF arrays (keys as in ``entries``) -> ``{flax path: array}``.

  Args:
    ours: the HF keys of this table (other parts of the checkpoint already removed).
    entries: the key table.
    problems: appended with "missing keys", "unknown keys" (other than ``optional``) and shape
      mismatches; the caller raises once.
    name_prefix: prepended to key names in the messages (e.g. ``"language_model."``).
    dtype: cast the arrays (None keeps them).
  """
  expected = {e[0] for e in entries}
  missing = sorted(expected - set(ours))
  unknown = sorted(set(ours) - expected - set(optional))
  if missing:
    problems.append(f"missing keys: {format_keys(name_prefix + k for k in missing)}")
  if unknown:
    problems.append(f"unknown keys: {format_keys(name_prefix + k for k in unknown)}")
  flat = {}
  for hf_key, path, op, shape in entries:
    if hf_key not in ours:
      continue
    x = np.asarray(ours[hf_key])
    if tuple(x.shape) != shape:
      problems.append(f"{name_prefix}{hf_key} has shape {tuple(x.shape)}, expected {shape}")
      continue
    x = np.ascontiguousarray(x.T) if op == "linear" else x
    flat[path] = x if dtype is None else x.astype(dtype)
  return flat


def flat_to_hf(flat: Mapping[tuple[str, ...], Any], entries: Sequence[Entry],
               problems: list[str], *, prefix: str = "") -> dict[str, np.ndarray]:
  """``{flax path: array}`` -> HF arrays (keys ``prefix + hf key``); missing, unknown and
  wrongly shaped params are appended to ``problems``."""
  expected = {e[1] for e in entries}
  missing = sorted("/".join(p) for p in expected - set(flat))
  unknown = sorted("/".join(p) for p in set(flat) - expected)
  if missing:
    problems.append(f"missing params: {format_keys(missing)}")
  if unknown:
    problems.append(f"unknown params: {format_keys(unknown)}")
  state = {}
  for hf_key, path, op, shape in entries:
    if path not in flat:
      continue
    x = np.asarray(flat[path])
    x = np.ascontiguousarray(x.T) if op == "linear" else x
    if tuple(x.shape) != shape:
      problems.append(f"param {'/'.join(path)} gives HF shape {tuple(x.shape)}, expected {shape}")
      continue
    state[prefix + hf_key] = x
  return state
