"""COCO-captions data sources (grain ``RandomAccessDataSource`` protocol) and retrieval splits.

The annotation format is COCO ``captions_*.json``: ``{"images": [{"id", "file_name", ...}],
"annotations": [{"id", "image_id", "caption"}]}``.

Validation rules (every violation is a ValueError naming the file and the record index, raised
when the file is loaded, never mid-run):

* The file must be UTF-8 (a UTF-8 BOM is accepted); otherwise the error gives the byte offset,
  the line and how to re-encode it.
* ``images[].id``, ``annotations[].id`` and ``annotations[].image_id`` must be JSON integers.
  ``bool``, floats (also ``1.0``), ``null`` and strings are rejected, numeric strings like
  ``"42"`` too (COCO ids are integers; the message says to drop the quotes).
* ``file_name`` must be a non-empty str and ``caption`` a str. Caption *content* (empty,
  invisible, lone surrogates) is checked by :func:`vlm.data.pipeline.validate_records` /
  :func:`vlm.data.text.caption_problem`, so bad captions are counted skips, not load errors.
* An image id listed twice with different ``file_name`` is an error (both indices and names);
  an exact repeat (same id and file_name) is collapsed into the first entry.
* A caption id listed twice with a different ``image_id`` or caption is an error (both
  indices); an exact repeat is dropped (the caption would otherwise be trained on / counted as
  ground truth twice). Collapsed exact duplicates are reported in one ``UserWarning``.
* Every ``annotations[].image_id`` must be listed in ``images``.
"""
from __future__ import annotations

import codecs
import dataclasses
import hashlib
import json
import os
import warnings
from typing import Any, Sequence

import numpy as np

from vlm.data.paths import resolve_path


def _read_json(path: str) -> Any:
  """Reads a UTF-8 JSON file (a UTF-8 BOM is accepted); errors name the file and the byte."""
  with open(path, "rb") as f:
    raw = f.read()
  skip = len(codecs.BOM_UTF8) if raw.startswith(codecs.BOM_UTF8) else 0
  try:
    text = raw[skip:].decode("utf-8")
  except UnicodeDecodeError as e:
    offset = skip + e.start
    line = raw.count(b"\n", 0, offset) + 1
    hint = ""
    if raw.startswith((codecs.BOM_UTF16_LE, codecs.BOM_UTF16_BE)):
      hint = " (it starts with a UTF-16 byte-order mark: the file is UTF-16)"
    raise ValueError(
        f"annotation file {path} is not UTF-8 text{hint}: byte offset {offset} (line {line}) "
        f"holds {raw[offset:offset + 4]!r} ({e.reason}). Data files are read as UTF-8 JSON: "
        f"re-encode it as UTF-8 (e.g. `iconv -f <its encoding, e.g. latin1> -t utf-8 {path} > "
        "fixed.json`) and point the config's data source at the result.") from None
  try:
    return json.loads(text)
  except json.JSONDecodeError as e:
    raise ValueError(f"annotation file {path} is not valid JSON: {e}") from e


def _json_int(value: Any, path: str, where: str) -> int:
  """``value`` if it is a JSON integer (not bool, float, str or null), else a ValueError."""
  if isinstance(value, int) and not isinstance(value, bool):
    return value
  kind = "null" if value is None else type(value).__name__
  hint = ""
  if isinstance(value, str) and value.strip().lstrip("+-").isdigit():
    hint = f" (write it as the number {value.strip()} without quotes)"
  raise ValueError(f"annotation file {path}: {where} must be a JSON integer (COCO ids are "
                   f"integers), got {kind} {value!r}{hint}")


@dataclasses.dataclass
class _CocoCaptions:
  """A parsed, validated COCO captions file.

  Attributes:
    path, image_dir: resolved annotation file and image directory.
    files: image id -> file_name, in first-occurrence order of ``images`` (exact duplicate
      entries collapsed).
    annotations: ``(annotations index, caption id, image id, raw caption)`` in file order,
      exact duplicate annotations dropped.
  """
  path: str
  image_dir: str
  files: dict[int, str]
  annotations: list[tuple[int, int, int, str]]


def _load_coco_json(annotation_json: str, image_dir: str) -> _CocoCaptions:
  """Reads and validates a COCO captions file (see :class:`CocoCaptionsSource` for the rules).

  Raises:
    FileNotFoundError: the annotation file does not exist.
    ValueError: not UTF-8 (names the byte offset), not JSON, not COCO captions format (names the
      key), a non-integer id or non-str file_name / caption (names the record index), an image
      id listed twice with different file names or a caption id listed twice with different
      content (names both records).
  """
  path = resolve_path(annotation_json)
  if not os.path.isfile(path):
    raise FileNotFoundError(
        f"COCO caption annotation file not found: {annotation_json!r} (resolved to {path!r}). "
        "Point data_cfg.root / *_annotations at a captions_*.json file.")
  data = _read_json(path)
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
  files: dict[int, str] = {}
  first_image: dict[int, int] = {}
  duplicates = []
  for i, img in enumerate(data["images"]):
    for key in ("id", "file_name"):
      if not isinstance(img, dict) or key not in img:
        raise ValueError(f"annotation file {path}: images[{i}] is missing key {key!r}: {img!r}")
    image_id = _json_int(img["id"], path, f"images[{i}]['id']")
    name = img["file_name"]
    if not isinstance(name, str) or not name:
      raise ValueError(f"annotation file {path}: images[{i}]['file_name'] must be a non-empty "
                       f"str, got {name!r}")
    if image_id in files:
      j = first_image[image_id]
      if files[image_id] != name:
        raise ValueError(
            f"annotation file {path}: images[{j}] and images[{i}] both have id={image_id} but "
            f"different file names ({files[image_id]!r} vs {name!r}); every caption of that id "
            "would silently use one of them. Give each image a unique id.")
      duplicates.append(f"images[{i}] repeats images[{j}] (id={image_id})")
      continue
    files[image_id] = name
    first_image[image_id] = i
  annotations = []
  first_ann: dict[int, tuple[int, int, str]] = {}
  for i, ann in enumerate(data["annotations"]):
    for key in ("id", "image_id", "caption"):
      if not isinstance(ann, dict) or key not in ann:
        raise ValueError(f"annotation file {path}: annotations[{i}] is missing key {key!r}: "
                         f"{ann!r}")
    caption_id = _json_int(ann["id"], path, f"annotations[{i}]['id']")
    image_id = _json_int(ann["image_id"], path, f"annotations[{i}]['image_id']")
    caption = ann["caption"]
    if not isinstance(caption, str):
      raise ValueError(f"annotation file {path}: annotations[{i}]['caption'] must be a str, got "
                       f"{type(caption).__name__}")
    if caption_id in first_ann:
      j, other_image, other_caption = first_ann[caption_id]
      if (other_image, other_caption) != (image_id, caption):
        raise ValueError(
            f"annotation file {path}: annotations[{j}] and annotations[{i}] both have "
            f"id={caption_id} but differ (image_id {other_image} vs {image_id}, caption "
            f"{other_caption!r} vs {caption!r}). Give each caption a unique id.")
      duplicates.append(f"annotations[{i}] repeats annotations[{j}] (id={caption_id})")
      continue
    first_ann[caption_id] = (i, image_id, caption)
    annotations.append((i, caption_id, image_id, caption))
  if duplicates:
    warnings.warn(f"annotation file {path}: {len(duplicates)} exact duplicate entries ignored "
                  f"(first kept), e.g. {'; '.join(duplicates[:3])}", stacklevel=3)
  return _CocoCaptions(path=path, image_dir=resolve_path(image_dir), files=files,
                       annotations=annotations)


class CocoCaptionsSource:
  """One record per COCO caption, random access (grain ``RandomAccessDataSource``).

  Record ``i`` is ``{"image_path": str, "caption": str (raw), "image_id": int,
  "caption_id": int}`` for the ``i``-th annotation in file order (exact duplicate annotations
  dropped, see the module docstring).

  Args:
    annotation_json: COCO ``captions_*.json`` path (relative paths resolved via
      :func:`vlm.data.paths.resolve_path`).
    image_dir: directory holding the ``file_name`` images (file existence and caption content
      are not checked here; see :func:`vlm.data.pipeline.validate_records`).

  Raises:
    FileNotFoundError: if the annotation file does not exist.
    ValueError: if it is not UTF-8 JSON in COCO captions format (names the byte offset or the
      missing key), an id is not an integer, an id is duplicated inconsistently (names both
      records), or an annotation refers to an ``image_id`` absent from ``images``.
  """

  def __init__(self, annotation_json: str, image_dir: str):
    coco = _load_coco_json(annotation_json, image_dir)
    self.annotation_json, self.image_dir = coco.path, coco.image_dir
    records = []
    for i, caption_id, image_id, caption in coco.annotations:
      if image_id not in coco.files:
        raise ValueError(f"annotation file {self.annotation_json}: annotations[{i}] has "
                         f"image_id={image_id}, which is not listed in 'images'")
      records.append({
          "image_path": os.path.join(self.image_dir, coco.files[image_id]),
          "caption": caption,
          "image_id": image_id,
          "caption_id": caption_id,
      })
    self._records = records
    ids = np.asarray([[r["caption_id"], r["image_id"]] for r in records],
                     dtype=np.int64).reshape(-1, 2)
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

  Images keep the order of ``images`` in the file (images with no caption are dropped, exact
  duplicate entries count once); each image's captions are numbered consecutively in
  annotation order. Caption content is not checked here (see
  :func:`vlm.data.pipeline.validate_retrieval_split`).

  Args:
    annotation_json: COCO ``captions_*.json`` path.
    image_dir: directory of the image files.

  Returns:
    dict with ``image_paths`` list[str] (N_img), ``image_ids`` int64 [N_img], ``texts``
    list[str] (N_txt, raw captions), ``text_ids`` int64 [N_txt] (caption ids),
    ``img2txt`` list[list[int]] (text indices of each image), ``txt2img`` int64 [N_txt] (image
    index of each text).

  Raises:
    FileNotFoundError / ValueError: as :class:`CocoCaptionsSource` (also duplicate image ids
      with different file names), or if no image has a caption.
  """
  coco = _load_coco_json(annotation_json, image_dir)
  path = coco.path
  captions: dict[int, list[tuple[int, str]]] = {}
  for _, caption_id, image_id, caption in coco.annotations:
    captions.setdefault(image_id, []).append((caption_id, caption))
  unknown = sorted(set(captions) - set(coco.files))
  if unknown:
    raise ValueError(f"annotation file {path}: captions refer to image ids {unknown[:5]} that are "
                     "not listed in 'images'")
  image_paths, image_ids, texts, text_ids, img2txt, txt2img = [], [], [], [], [], []
  for image_id, file_name in coco.files.items():
    caps = captions.get(image_id)
    if not caps:
      continue
    img_index = len(image_paths)
    image_paths.append(os.path.join(coco.image_dir, file_name))
    image_ids.append(image_id)
    img2txt.append(list(range(len(texts), len(texts) + len(caps))))
    text_ids.extend(c[0] for c in caps)
    texts.extend(c[1] for c in caps)
    txt2img.extend([img_index] * len(caps))
  if not image_paths:
    raise ValueError(f"annotation file {path} has no captioned images")
  return {
      "image_paths": image_paths,
      "image_ids": np.asarray(image_ids, dtype=np.int64),
      "texts": texts,
      "text_ids": np.asarray(text_ids, dtype=np.int64),
      "img2txt": img2txt,
      "txt2img": np.asarray(txt2img, dtype=np.int64),
  }
