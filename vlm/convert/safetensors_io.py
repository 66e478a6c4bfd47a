"""safetensors checkpoint files and HF directories (single file or shards + index), numpy only.

One reader and writer for every converter (:mod:`vlm.convert.hf_blip2`,
:mod:`vlm.convert.hf_qwen3_vl`). They are written here rather than taken from ``safetensors``'
numpy backend because that backend cannot read or write BF16, the dtype of every released Qwen-VL
checkpoint. File format: u64 little-endian header size, JSON header
``{name: {dtype, shape, data_offsets [begin, end)}}`` relative to the data section, then the data.
No pickle is ever read.
"""
from __future__ import annotations

import json
import os
import re
from typing import Any, Mapping

import ml_dtypes
import numpy as np

SAFE_WEIGHTS_NAME = "model.safetensors"
SAFE_WEIGHTS_INDEX_NAME = "model.safetensors.index.json"


def parse_size(size: int | str) -> int:
  """Bytes from an int or a string like ``"5GB"``, ``"200MB"``, ``"2GiB"``.

  Raises:
    ValueError: an unparseable size.
  """
  if isinstance(size, int):
    return size
  m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMG]i?B|B)?\s*", size, flags=re.IGNORECASE)
  if not m:
    raise ValueError(f"max_shard_size must be an int (bytes) or like '5GB'/'200MB', got {size!r}")
  unit = (m.group(2) or "B").upper()
  scale = {"B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "KIB": 2**10, "MIB": 2**20,
           "GIB": 2**30}[unit]
  return int(float(m.group(1)) * scale)


_ST_DTYPES = {"F64": np.float64, "F32": np.float32, "F16": np.float16,
              "BF16": ml_dtypes.bfloat16, "I64": np.int64, "I32": np.int32, "I16": np.int16,
              "I8": np.int8, "U8": np.uint8, "BOOL": np.bool_}
_ST_NAMES = {np.dtype(v): k for k, v in _ST_DTYPES.items()}


def read_safetensors_file(filename: str) -> dict[str, np.ndarray]:
  """All tensors of one ``.safetensors`` file as numpy arrays (BF16 as ``ml_dtypes.bfloat16``).

  Raises:
    ValueError: a truncated/corrupt header or an unsupported dtype.
  """
  with open(filename, "rb") as fh:
    raw = fh.read(8)
    if len(raw) != 8:
      raise ValueError(f"{filename} is not a safetensors file (shorter than 8 bytes)")
    n = int.from_bytes(raw, "little")
    try:
      header = json.loads(fh.read(n))
    except ValueError as e:
      raise ValueError(f"{filename}: corrupt safetensors header ({e})") from None
  out = {}
  for name, info in header.items():
    if name == "__metadata__":
      continue
    if info["dtype"] not in _ST_DTYPES:
      raise ValueError(f"{filename}: tensor {name} has unsupported dtype {info['dtype']}; "
                       f"supported: {sorted(_ST_DTYPES)}")
    dt = np.dtype(_ST_DTYPES[info["dtype"]])
    begin, end = info["data_offsets"]
    count = (end - begin) // dt.itemsize
    arr = np.fromfile(filename, dtype=dt, count=count, offset=8 + n + begin)
    out[name] = arr.reshape(info["shape"])
  return out


def read_safetensors_dir(path: str) -> dict[str, np.ndarray]:
  """Reads ``model.safetensors`` or every shard named by ``model.safetensors.index.json``.

  Raises:
    FileNotFoundError: neither file exists; ValueError: the index names a missing shard.
  """
  single = os.path.join(path, SAFE_WEIGHTS_NAME)
  index = os.path.join(path, SAFE_WEIGHTS_INDEX_NAME)
  if os.path.exists(single):
    files = [single]
  elif os.path.exists(index):
    with open(index) as fh:
      files = [os.path.join(path, f) for f in sorted(set(json.load(fh)["weight_map"].values()))]
    absent = [f for f in files if not os.path.exists(f)]
    if absent:
      raise ValueError(f"{index} names shards that do not exist: {absent}")
  else:
    raise FileNotFoundError(f"no {SAFE_WEIGHTS_NAME} or {SAFE_WEIGHTS_INDEX_NAME} in {path}")
  state = {}
  for f in files:
    state.update(read_safetensors_file(f))
  return state


def write_safetensors_file(state: Mapping[str, np.ndarray], filename: str) -> None:
  """Writes ``state`` (numpy arrays, BF16 allowed) as one safetensors file (metadata pt).

  Raises:
    ValueError: an unsupported dtype.
  """
  header: dict[str, Any] = {"__metadata__": {"format": "pt"}}
  offset = 0
  arrays = []
  for name in sorted(state):
    a = np.ascontiguousarray(state[name])
    if a.dtype not in _ST_NAMES:
      raise ValueError(f"tensor {name} has unsupported dtype {a.dtype}")
    header[name] = {"dtype": _ST_NAMES[a.dtype], "shape": list(a.shape),
                    "data_offsets": [offset, offset + a.nbytes]}
    offset += a.nbytes
    arrays.append(a)
  blob = json.dumps(header, separators=(",", ":")).encode()
  blob += b" " * (-len(blob) % 8)
  with open(filename, "wb") as fh:
    fh.write(len(blob).to_bytes(8, "little"))
    fh.write(blob)
    for a in arrays:
      fh.write(a.tobytes())


def write_safetensors_dir(state: Mapping[str, np.ndarray], path: str,
                          max_shard_size: int | str | None = None) -> None:
  """``model.safetensors``, or shards of at most ``max_shard_size`` bytes + HF index."""
  os.makedirs(path, exist_ok=True)
  if max_shard_size is None:
    write_safetensors_file(state, os.path.join(path, SAFE_WEIGHTS_NAME))
    return
  limit = parse_size(max_shard_size)
  shards: list[dict[str, np.ndarray]] = [{}]
  used = 0
  for key in sorted(state):
    nbytes = np.asarray(state[key]).nbytes
    if shards[-1] and used + nbytes > limit:
      shards.append({})
      used = 0
    shards[-1][key] = state[key]
    used += nbytes
  weight_map = {}
  for i, shard in enumerate(shards):
    name = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
    write_safetensors_file(shard, os.path.join(path, name))
    weight_map.update({k: name for k in shard})
  total = sum(np.asarray(v).nbytes for v in state.values())
  with open(os.path.join(path, SAFE_WEIGHTS_INDEX_NAME), "w") as fh:
    json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, fh, indent=2,
              sort_keys=True)
