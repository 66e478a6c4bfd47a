"""COCO-captions data sources (grain ``RandomAccessDataSource`` protocol) and retrieval splits.

The annotation format is COCO ``captions_*.json``: ``{"images": [{"id", "file_name", ...}],
"annotations": [{"id", "image_id", "caption"}]}``.
"""
from __future__ import annotations

import hashlib
import json
import os
from typing import Any, Sequence

import numpy as np

from vlm.data.paths import resolve_path


def _load_coco_json(annotation_json: str, image_dir: str) -> tuple[str, str, dict]:
  """Reads and validates a COCO captions file; returns (json path, image dir, parsed dict)."""
  path = resolve_path(annotation_json)
  if not os.path.isfile(path):
    raise FileNotFoundError(
        f"COCO caption annotation file not found: {annotation_json!r} (resolved to {path!r}). "
        "Point data_cfg.root / *_annotations at a captions_*.json file.")
  try:
    with open(path, "r", encoding="utf-8") as f:
      data = json.load(f)
  except json.JSONDecodeError as e:
    raise ValueError(f"annotation file {path} is not valid JSON: {e}") from e
  if not isinstance(data, dict):
    raise ValueError(f"annotation file {path}: expected a JSON object with keys 'images' and "
                     f"'annotations' (COCO captions format), got {type(data).__name__}")
  for key in ("images", "annotations"):
    if key not in data:
      raise ValueError(f"annotation file {path}: missing top-level key {key!r}; expected COCO "
                       "captions format with 'images' and 'annotations'")
    if not isinstance(data[key], list):
      raise ValueError(f"annotation file {path}: {key!r} must be a list, got "
                       f"{type(data[key]).__name__}")
  for i, img in enumerate(data["images"]):
    for key in ("id", "file_name"):
      if not isinstance(img, dict) or key not in img:
        raise ValueError(f"annotation file {path}: images[{i}] is missing key {key!r}: {img!r}")
  for i, ann in enumerate(data["annotations"]):
    for key in ("id", "image_id", "caption"):
      if not isinstance(ann, dict) or key not in ann:
        raise ValueError(f"annotation file {path}: annotations[{i}] is missing key {key!r}: "
                         f"{ann!r}")
    if not isinstance(ann["caption"], str):
      raise ValueError(f"annotation file {path}: annotations[{i}]['caption'] must be a str, got "
                       f"{type(ann['caption']).__name__}")
  return path, resolve_path(image_dir), data


class CocoCaptionsSource:
  """One record per COCO caption, random access (grain ``RandomAccessDataSource``).

  Record ``i`` is ``{"image_path": str, "caption": str (raw), "image_id": int,
  "caption_id": int}`` for ``annotations[i]`` in file order.

  Args:
    annotation_json: COCO ``captions_*.json`` path (relative paths resolved via
      :func:`vlm.data.paths.resolve_path`).
    image_dir: directory holding the ``file_name`` images (file existence is not checked here;
      see :func:`vlm.data.pipeline.validate_records`).

  Raises:
    FileNotFoundError: if the annotation file does not exist.
    ValueError: if it is not COCO captions format (names the missing key), or an annotation
      refers to an ``image_id`` absent from ``images``.
  """

  def __init__(self, annotation_json: str, image_dir: str):
    self.annotation_json, self.image_dir, data = _load_coco_json(annotation_json, image_dir)
    files = {int(img["id"]): img["file_name"] for img in data["images"]}
    records = []
    for i, ann in enumerate(data["annotations"]):
      image_id = int(ann["image_id"])
      if image_id not in files:
        raise ValueError(f"annotation file {self.annotation_json}: annotations[{i}] has "
                         f"image_id={image_id}, which is not listed in 'images'")
      records.append({
          "image_path": os.path.join(self.image_dir, files[image_id]),
          "caption": ann["caption"],
          "image_id": image_id,
          "caption_id": int(ann["id"]),
      })
    self._records = records
    ids = np.asarray([[r["caption_id"], r["image_id"]] for r in records], dtype=np.int64)
    self._digest = hashlib.sha1(ids.tobytes()).hexdigest()[:12]

  def __len__(self) -> int:
    return len(self._records)

  def __getitem__(self, index: int) -> dict[str, Any]:
    return dict(self._records[index])

  def __repr__(self) -> str:
    # grain validates restored iterator states against repr(data_source): keep it stable and
    # independent of where the dataset is mounted (content digest, not absolute paths).
    return (f"CocoCaptionsSource(file={os.path.basename(self.annotation_json)!r}, "
            f"num_records={len(self)}, digest={self._digest})")


class SubsetSource:
  """A view of ``source`` restricted to ``indices`` (used to drop bad samples up front).

  Args:
    source: any random-access source.
    indices: kept record indices of ``source``, in order.
  """

  def __init__(self, source, indices: Sequence[int]):
    self.source = source
    self.indices = np.asarray(indices, dtype=np.int64)

  def __len__(self) -> int:
    return int(self.indices.shape[0])

  def __getitem__(self, index: int):
    return self.source[int(self.indices[index])]

  def __repr__(self) -> str:
    digest = hashlib.sha1(self.indices.tobytes()).hexdigest()[:12]
    return f"SubsetSource({self.source!r}, num_kept={len(self)}, digest={digest})"


def load_coco_retrieval(annotation_json: str, image_dir: str) -> dict[str, Any]:
  """Image/text lists and ground truth for retrieval evaluation (spec §7.1, LAVIS
  ``RetrievalEvalDataset``).

  Images keep the order of ``images`` in the file (images with no caption are dropped); each
  image's captions are numbered consecutively in annotation order.

  Args:
    annotation_json: COCO ``captions_*.json`` path.
    image_dir: directory of the image files.

  Returns:
    dict with ``image_paths`` list[str] (N_img), ``image_ids`` int64 [N_img], ``texts``
    list[str] (N_txt, raw captions), ``img2txt`` list[list[int]] (text indices of each image),
    ``txt2img`` int64 [N_txt] (image index of each text).

  Raises:
    FileNotFoundError / ValueError: as :class:`CocoCaptionsSource`.
  """
  path, img_dir, data = _load_coco_json(annotation_json, image_dir)
  captions: dict[int, list[str]] = {}
  for i, ann in enumerate(data["annotations"]):
    captions.setdefault(int(ann["image_id"]), []).append(ann["caption"])
  known = {int(img["id"]) for img in data["images"]}
  unknown = sorted(set(captions) - known)
  if unknown:
    raise ValueError(f"annotation file {path}: captions refer to image ids {unknown[:5]} that are "
                     "not listed in 'images'")
  image_paths, image_ids, texts, img2txt, txt2img = [], [], [], [], []
  for img in data["images"]:
    image_id = int(img["id"])
    caps = captions.get(image_id)
    if not caps:
      continue
    img_index = len(image_paths)
    image_paths.append(os.path.join(img_dir, img["file_name"]))
    image_ids.append(image_id)
    img2txt.append(list(range(len(texts), len(texts) + len(caps))))
    texts.extend(caps)
    txt2img.extend([img_index] * len(caps))
  if not image_paths:
    raise ValueError(f"annotation file {path} has no captioned images")
  return {
      "image_paths": image_paths,
      "image_ids": np.asarray(image_ids, dtype=np.int64),
      "texts": texts,
      "img2txt": img2txt,
      "txt2img": np.asarray(txt2img, dtype=np.int64),
  }
