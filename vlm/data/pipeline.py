"""grain input pipelines for BLIP-2 stage 1: checkpointable training stream and retrieval eval data.

Training (:func:`build_blip2_train_loader`) is a ``grain.DataLoader``:

  CocoCaptionsSource -> drop bad records found at build time (:func:`validate_records`)
  -> IndexSampler(shuffle, seed, num_epochs=None, ShardOptions(process_index, process_count,
     drop_remainder=True)) -> Blip2TrainTransform (RandomMap: image load + random resized crop +
     hflip + CLIP normalise; pre_caption + tokenize) -> Batch(global_batch // process_count,
     drop_remainder=True)

Each process yields numpy batches ``{"pixel_values": float32 [b, S, S, 3], "input_ids": int32
[b, T], "attention_mask": int32 [b, T], "image_id": int32 [b]}`` with ``b = global_batch_size //
process_count``. The iterator (``iter(loader)``) has ``get_state() -> bytes`` / ``set_state``
and is saved with orbax through :func:`iterator_checkpoint_args`.

Evaluation: :func:`build_retrieval_eval_data` loads a whole split and never skips (ground truth
must be complete); :func:`validate_retrieval_split` runs its image and caption checks cheaply so
the trainer can fail before the first step instead of after training.
"""
from __future__ import annotations

import collections
import concurrent.futures
import dataclasses
import os
from typing import Any, Sequence

import grain
import numpy as np

from vlm.data import image as image_lib
from vlm.data.paths import resolve_path
from vlm.data.sources import CocoCaptionsSource, SubsetSource, load_coco_retrieval
from vlm.data.text import Blip2Tokenizer, caption_problem, pre_caption

_ON_BAD_SAMPLE = ("skip", "raise")
_VALIDATE_IMAGES = ("decode", "header")
_MAX_REPORTED = 20


def _get(cfg: Any, name: str, default: Any) -> Any:
  """Reads ``cfg.name`` from a ConfigDict / dataclass / namespace, or ``default`` if absent."""
  if isinstance(cfg, dict):
    return cfg.get(name, default)
  try:
    return getattr(cfg, name)
  except (AttributeError, KeyError):
    return default


def split_paths(data_cfg: Any, split: str) -> tuple[str, str]:
  """(annotation json, image dir) of ``split`` ("train" | "val"), resolved.

  Raises:
    ValueError: another split name.
  """
  if split not in ("train", "val"):
    raise ValueError(f"split must be 'train' or 'val', got {split!r}")
  root = resolve_path(_get(data_cfg, "root", "data/coco"))
  ann_name = _get(data_cfg, f"{split}_annotations", f"captions_{split}2017.json")
  ann = os.path.join(root, ann_name)
  image_dir = os.path.join(root, _get(data_cfg, "image_dir", "images"))
  return ann, image_dir


class IteratorStateMismatchError(ValueError):
  """A saved data-iterator state that belongs to another data stream (other sources, batch
  size, row length, seed or process layout). The checkpoint is intact; resuming it exactly with
  this config is impossible. :func:`vlm.train.checkpoint.restore_latest` reports it as a
  config mismatch (never as a damaged checkpoint)."""


@dataclasses.dataclass
class DataStats:
  """Bad-sample accounting of one source.

  Attributes:
    n_records: records in the annotation file (one per caption).
    n_kept: records that stream.
    n_skipped: records dropped (``n_records - n_kept``).
    reasons: count per reason: ``"missing_image"``, ``"empty_image"``, ``"corrupt_image"``,
      ``"empty_caption"`` (no visible character after ``pre_caption``, see
      :func:`vlm.data.text.has_visible_text`), ``"invalid_text"`` (a lone surrogate that cannot
      be UTF-8 encoded / tokenized).
    examples: up to 20 ``(record index, image path, reason)`` of dropped records.
  """
  n_records: int
  n_kept: int
  n_skipped: int
  reasons: dict[str, int]
  examples: list[tuple[int, str, str]]

  def as_dict(self) -> dict[str, Any]:
    return dataclasses.asdict(self)


def validate_records(
    source: CocoCaptionsSource,
    *,
    max_words: int = 50,
    validate_images: str = "decode",
    on_bad_sample: str = "skip",
    num_threads: int = 8,
) -> tuple[np.ndarray, DataStats]:
  """Scans every record once and finds the usable ones (deterministic, done at build time).

  A record is bad if its image is missing, empty (0 bytes) or not decodable by Pillow, or its
  caption is unusable (:func:`vlm.data.text.caption_problem`): ``"invalid_text"`` if the raw
  caption holds a lone surrogate (would crash the tokenizer), ``"empty_caption"`` if nothing
  visible is left after :func:`pre_caption` (only whitespace, control, zero-width/format or
  combining characters). Image problems take precedence. Each distinct image file is checked
  once.

  Args:
    source: records with ``image_path`` and ``caption``.
    max_words: ``pre_caption`` word limit.
    validate_images: ``"decode"`` (full decode, exact) or ``"header"`` (open + verify).
    on_bad_sample: ``"skip"`` drops bad records; ``"raise"`` raises on the first one.
    num_threads: threads used to check image files.

  Returns:
    ``(kept_indices int64 [n_kept], stats)``.

  Raises:
    image_lib.BadSampleError: in ``"raise"`` mode, naming the file (or caption) and the reason.
    ValueError: on invalid option values, or if no record is usable.
  """
  if on_bad_sample not in _ON_BAD_SAMPLE:
    raise ValueError(f"on_bad_sample must be one of {_ON_BAD_SAMPLE}, got {on_bad_sample!r}")
  if validate_images not in _VALIDATE_IMAGES:
    raise ValueError(f"validate_images must be one of {_VALIDATE_IMAGES}, got "
                     f"{validate_images!r}")
  n = len(source)
  records = [source[i] for i in range(n)]
  paths = sorted({r["image_path"] for r in records})
  decode = validate_images == "decode"
  with concurrent.futures.ThreadPoolExecutor(max(1, num_threads)) as pool:
    image_status = dict(zip(paths, pool.map(
        lambda p: image_lib.check_image_file(p, decode=decode), paths)))
  kept, reasons, examples = [], collections.Counter(), []
  for i, rec in enumerate(records):
    status = image_status[rec["image_path"]]
    reason = None
    if status is not None:
      reason = f"{status}_image"
      detail = f"image file {status}: {rec['image_path']}"
    else:
      problem = caption_problem(
          rec["caption"], max_words,
          where=f"caption_id={rec['caption_id']} (image {rec['image_path']})")
      if problem is not None:
        reason, detail = problem
    if reason is None:
      kept.append(i)
      continue
    if on_bad_sample == "raise":
      raise image_lib.BadSampleError(
          f"bad sample at record {i} of {source!r}: {detail}. Fix the data or set "
          "data_cfg.on_bad_sample='skip'.")
    reasons[reason] += 1
    if len(examples) < _MAX_REPORTED:
      examples.append((i, rec["image_path"], reason))
  if not kept:
    raise ValueError(f"all {n} records of {source!r} are bad ({dict(reasons)}); nothing to train "
                     "on. Check data_cfg.root / image_dir.")
  stats = DataStats(n_records=n, n_kept=len(kept), n_skipped=n - len(kept),
                    reasons=dict(reasons), examples=examples)
  return np.asarray(kept, dtype=np.int64), stats


class Blip2TrainTransform(grain.transforms.RandomMap):
  """Per-record training preprocessing (spec §6.4 ``blip2_image_train``, §6.5, §2.8).

  Maps ``{"image_path", "caption", "image_id", ...}`` to ``{"pixel_values": float32 [S, S, 3],
  "input_ids": int32 [T], "attention_mask": int32 [T], "image_id": int32 []}`` using the
  per-record ``rng`` grain derives from the sampler seed and the global record index. A
  per-image record ``{"image_path", "captions": [...], "image_id"}`` (CapFilt,
  :class:`PerImageSource`) uses one of its captions drawn uniformly with that rng, so every use
  of the image draws anew and the draw is reproducible and resumes exactly. With a
  ``text_processor`` (BLIP-2 stage 2, :class:`vlm.data.stage2_text.Stage2TextProcessor`) the
  text arrays are its output instead of the BERT tokens.

  If an image that passed build-time validation still fails to decode (only possible with
  ``validate_images="header"``), ``"skip"`` mode deterministically substitutes a record drawn
  from ``source`` with the same rng (counted in ``self.load_time_substitutions``, per process
  or worker); ``"raise"`` mode raises :class:`BadSampleError` naming the file.
  """

  def __init__(self, *, tokenizer: Blip2Tokenizer, image_size: int, max_text_len: int,
               crop_scale: Sequence[float], hflip: bool, max_words: int, on_bad_sample: str,
               source=None, text_processor=None):
    self.tokenizer = tokenizer
    self.text_processor = text_processor
    self.image_size = int(image_size)
    self.max_text_len = int(max_text_len)
    self.crop_scale = tuple(float(s) for s in crop_scale)
    self.hflip = bool(hflip)
    self.max_words = int(max_words)
    self.on_bad_sample = on_bad_sample
    self.source = source
    self.load_time_substitutions = 0

  def _process(self, record: dict[str, Any], rng: np.random.Generator) -> dict[str, np.ndarray]:
    img = image_lib.load_rgb(record["image_path"])
    pixels = image_lib.preprocess_train(img, self.image_size, rng, self.crop_scale, self.hflip)
    caption = record.get("caption")
    if caption is None:  # a per-image record (CapFilt): one of its captions, drawn at each use
      captions = record["captions"]
      caption = captions[int(rng.integers(len(captions)))]
    out = {"pixel_values": pixels, "image_id": np.asarray(record["image_id"], dtype=np.int32)}
    if self.text_processor is not None:
      out.update(self.text_processor(caption, rng))
      return out
    ids, mask = self.tokenizer.tokenize([pre_caption(caption, self.max_words)],
                                        self.max_text_len)
    out.update(input_ids=ids[0], attention_mask=mask[0])
    return out

  def random_map(self, element: dict[str, Any], rng: np.random.Generator):
    try:
      return self._process(element, rng)
    except image_lib.BadSampleError:
      if self.on_bad_sample == "raise" or self.source is None:
        raise
      last = None
      for _ in range(16):
        self.load_time_substitutions += 1
        substitute = self.source[int(rng.integers(len(self.source)))]
        try:
          return self._process(substitute, rng)
        except image_lib.BadSampleError as e:
          last = e
      raise image_lib.BadSampleError(
          f"could not find a decodable substitute for {element['image_path']} after 16 tries; "
          f"last error: {last}. Use data_cfg.validate_images='decode'.")


class PerImageSource:
  """One record per image with all its usable captions, over a per-caption source.

  Record ``i`` is ``{"image_path", "image_id", "captions": [raw captions]}`` for the ``i``-th
  distinct image of ``source`` (first-occurrence order). CapFilt files hold several synthetic
  and human captions per image; training draws one per use (:class:`Blip2TrainTransform`), the
  paper's "randomly sample one of the captions" (BLIP-2 section 3.4).

  Args:
    source: a validated per-caption source (records with ``image_path``, ``image_id``,
      ``caption``), e.g. ``SubsetSource(CocoCaptionsSource(...), kept)``.
  """

  def __init__(self, source):
    groups: dict[str, dict[str, Any]] = {}
    for i in range(len(source)):
      r = source[i]
      g = groups.setdefault(r["image_path"], {"image_path": r["image_path"],
                                               "image_id": r["image_id"], "captions": []})
      g["captions"].append(r["caption"])
    self._records = list(groups.values())
    self._repr = f"PerImageSource({source!r}, num_images={len(self._records)})"

  def __len__(self) -> int:
    return len(self._records)

  def __getitem__(self, index: int) -> dict[str, Any]:
    r = self._records[index]
    return dict(r, captions=list(r["captions"]))

  def __repr__(self) -> str:
    return self._repr


class Blip2TrainLoader(grain.DataLoader):
  """``grain.DataLoader`` plus the bad-sample :class:`DataStats` and batch geometry.

  Attributes:
    stats: :class:`DataStats` of the training source.
    loader_stats: ``stats.as_dict()``.
    per_process_batch_size: b = global_batch_size // process_count.
    process_index, process_count: the data shard this loader reads.
  """

  def __init__(self, *, stats: DataStats, per_process_batch_size: int, process_index: int,
               process_count: int, **kwargs):
    super().__init__(**kwargs)
    self.stats = stats
    self.per_process_batch_size = per_process_batch_size
    self.process_index = process_index
    self.process_count = process_count

  @property
  def loader_stats(self) -> dict[str, Any]:
    return self.stats.as_dict()


def check_loader_args(global_batch_size: int, seed: Any, process_index: int,
                      process_count: int) -> None:
  """The checks every training loader makes on its sharding arguments.

  Raises:
    ValueError: a process index outside ``[0, process_count)``, a global batch that is not a
      positive multiple of the process count, or a seed that is not an int in ``[0, 2**32)``.
  """
  if process_count < 1 or not 0 <= process_index < process_count:
    raise ValueError(f"need 0 <= process_index < process_count, got process_index="
                     f"{process_index}, process_count={process_count}")
  if global_batch_size < 1 or global_batch_size % process_count:
    raise ValueError(f"global_batch_size={global_batch_size} must be a positive multiple of the "
                     f"process count {process_count} (each process loads an equal share)")
  if not isinstance(seed, (int, np.integer)) or not 0 <= int(seed) < 2**32:
    raise ValueError(f"seed must be an int in [0, 2**32), got {seed!r}")


def training_source(data_cfg: Any, *, max_words: int, on_bad_sample: str):
  """The validated training records of ``data_cfg``: ``(source, DataStats)``.

  Bad records are dropped (:func:`validate_records`); ``data_cfg.caption_sampling`` then picks
  one record per caption (``"per_caption"``, default) or per image (``"per_image"``,
  :class:`PerImageSource`).

  Raises:
    ValueError: an unknown ``caption_sampling``; what :func:`validate_records` raises.
  """
  sampling = _get(data_cfg, "caption_sampling", "per_caption")
  if sampling not in ("per_caption", "per_image"):
    raise ValueError(f"data.caption_sampling must be 'per_caption' (each caption a record) or "
                     f"'per_image' (each image a record, one caption drawn per use), got "
                     f"{sampling!r}")
  ann, image_dir = split_paths(data_cfg, "train")
  source = CocoCaptionsSource(ann, image_dir)
  kept, stats = validate_records(
      source, max_words=max_words, on_bad_sample=on_bad_sample,
      validate_images=_get(data_cfg, "validate_images", "decode"))
  kept_source = SubsetSource(source, kept)
  if sampling == "per_image":
    kept_source = PerImageSource(kept_source)
  return kept_source, stats


def build_blip2_train_loader(
    data_cfg: Any,
    *,
    global_batch_size: int,
    seed: int,
    process_index: int | None = None,
    process_count: int | None = None,
    text_processor=None,
) -> Blip2TrainLoader:
  """Builds the checkpointable, infinitely repeating, per-process-sharded training loader.

  Shuffling is a deterministic function of ``seed`` (reshuffled every epoch); augmentation
  randomness is a function of ``seed`` and the global record position, so the same seed gives
  the same batches and restoring an iterator state resumes the exact stream. Process ``p`` of
  ``P`` reads a disjoint 1/P shard of the (validated) records.

  Args:
    data_cfg: ConfigDict (see :func:`vlm.data.config.default_blip2_data_config`).
    global_batch_size: batch summed over processes; must be divisible by ``process_count``.
    seed: non-negative 32-bit int.
    process_index, process_count: data shard; default ``jax.process_index()`` /
      ``jax.process_count()``.
    text_processor: None (stage 1: BERT tokens) or a callable ``(caption, rng) -> dict of int32
      arrays`` (stage 2: :class:`vlm.data.stage2_text.Stage2TextProcessor`), whose keys replace
      ``input_ids`` / ``attention_mask`` in each batch.
    ``data_cfg.caption_sampling``: ``"per_caption"`` (default; every caption a record) or
      ``"per_image"`` (every image a record, one of its captions drawn at each use: CapFilt).

  Returns:
    :class:`Blip2TrainLoader` (a ``grain.DataLoader``); ``iter(loader)`` yields numpy dicts
    ``pixel_values`` float32 [b, S, S, 3], ``input_ids`` int32 [b, T], ``attention_mask`` int32
    [b, T], ``image_id`` int32 [b], with b = global_batch_size // process_count, T =
    ``max_text_len``, S = ``image_size``.

  Raises:
    ValueError: bad batch size / process layout / option values, all records bad, fewer kept
      records than processes.
    FileNotFoundError: annotation or vocab file missing.
    BadSampleError: a bad record in ``on_bad_sample="raise"`` mode (names the file).
  """
  if process_index is None or process_count is None:
    import jax  # pylint: disable=g-import-not-at-top
    process_index = jax.process_index() if process_index is None else process_index
    process_count = jax.process_count() if process_count is None else process_count
  check_loader_args(global_batch_size, seed, process_index, process_count)
  seed = int(seed)
  per_process = global_batch_size // process_count
  on_bad_sample = _get(data_cfg, "on_bad_sample", "skip")
  max_words = int(_get(data_cfg, "max_words", 50))

  kept_source, stats = training_source(data_cfg, max_words=max_words,
                                       on_bad_sample=on_bad_sample)
  if len(kept_source) < process_count:
    raise ValueError(f"only {len(kept_source)} usable records for {process_count} processes")

  tokenizer = Blip2Tokenizer(_get(data_cfg, "vocab_file",
                                  "vlm/assets/tokenizers/bert-base-uncased/vocab.txt"))
  transform = Blip2TrainTransform(
      tokenizer=tokenizer,
      image_size=_get(data_cfg, "image_size", 224),
      max_text_len=_get(data_cfg, "max_text_len", 32),
      crop_scale=_get(data_cfg, "crop_scale", (0.5, 1.0)),
      hflip=_get(data_cfg, "hflip", True),
      max_words=max_words,
      on_bad_sample=on_bad_sample,
      source=kept_source,
      text_processor=text_processor)
  worker_count = int(_get(data_cfg, "worker_count", 0))
  if worker_count > 0:
    # grain's worker processes read absl flags; outside absl.app.run they are unparsed.
    from absl import flags  # pylint: disable=g-import-not-at-top
    if not flags.FLAGS.is_parsed():
      flags.FLAGS.mark_as_parsed()
  shard_options = grain.sharding.ShardOptions(
      shard_index=process_index, shard_count=process_count, drop_remainder=True)
  sampler = grain.samplers.IndexSampler(
      num_records=len(kept_source), shard_options=shard_options, shuffle=True,
      num_epochs=None, seed=seed)
  return Blip2TrainLoader(
      stats=stats, per_process_batch_size=per_process, process_index=process_index,
      process_count=process_count,
      data_source=kept_source, sampler=sampler,
      operations=[transform, grain.transforms.Batch(per_process, drop_remainder=True)],
      worker_count=worker_count,
      worker_buffer_size=int(_get(data_cfg, "worker_buffer_size", 1)),
      shard_options=shard_options)


def iterator_checkpoint_args(iterator, save: bool):
  """Orbax ``CheckpointArgs`` for a grain iterator, for a ``CheckpointManager`` composite item.

  Usage (item name is free, e.g. ``"data_iter"``)::

    mngr.save(step, args=ocp.args.Composite(
        state=ocp.args.StandardSave(train_state),
        data_iter=iterator_checkpoint_args(it, save=True)))
    restored = mngr.restore(step, args=ocp.args.Composite(
        state=ocp.args.StandardRestore(abstract_state),
        data_iter=iterator_checkpoint_args(it, save=False)))
    # `it` (a fresh iter(loader) built with the same config, seed and process layout) now
    # continues where the saved one stopped; restored["data_iter"] is `it`.

  Each process writes/reads its own ``process_<i>-of-<n>.json`` (grain ``CheckpointHandler``).

  Args:
    iterator: ``iter(loader)`` (grain ``DataLoaderIterator`` or ``DatasetIterator``).
    save: True for saving, False for restoring into ``iterator`` in place.

  Returns:
    ``grain.checkpoint.CheckpointSave(item=iterator)`` or ``CheckpointRestore(item=iterator)``.

  Raises:
    ValueError: if ``iterator`` lacks ``get_state``/``set_state``.
  """
  if not (hasattr(iterator, "get_state") and hasattr(iterator, "set_state")):
    raise ValueError(f"expected a grain iterator with get_state/set_state (iter(loader)), got "
                     f"{type(iterator).__name__}")
  if save:
    return grain.checkpoint.CheckpointSave(item=iterator)
  return grain.checkpoint.CheckpointRestore(item=iterator)


def _retrieval_caption_problems(data: dict[str, Any], max_words: int) -> list[str]:
  """Messages for the unusable captions of a :func:`load_coco_retrieval` split (all of them)."""
  problems = []
  for t, (text, caption_id) in enumerate(zip(data["texts"], data["text_ids"])):
    image = data["image_paths"][int(data["txt2img"][t])]
    problem = caption_problem(text, max_words,
                              where=f"text {t} (caption_id={int(caption_id)}, image {image})")
    if problem is not None:
      problems.append(f"{problem[0]}: {problem[1]}")
  return problems


def _raise_bad_split(split: str, ann: str, n_images: int, n_texts: int,
                     bad_images: Sequence[str], bad_texts: Sequence[str]) -> None:
  """Raises one BadSampleError listing (the first 20 of) every bad image and caption."""
  def listing(items):
    more = len(items) - _MAX_REPORTED
    return "; ".join(items[:_MAX_REPORTED]) + (f"; ... and {more} more" if more > 0 else "")

  parts = []
  if bad_images:
    parts.append(f"{len(bad_images)} of {n_images} image files are bad [{listing(bad_images)}]")
  if bad_texts:
    parts.append(f"{len(bad_texts)} of {n_texts} captions are bad [{listing(bad_texts)}]")
  raise image_lib.BadSampleError(
      f"retrieval split {split!r} ({ann}) cannot be evaluated: {', and '.join(parts)}. Retrieval "
      "ground truth must be complete, so evaluation never skips samples: replace or re-encode "
      "the bad image files, fix or remove those captions (or their images) in the annotation "
      f"file, or point data_cfg.root / {split}_annotations at a clean split.")


def validate_retrieval_split(data_cfg: Any, split: str = "val", *,
                             num_threads: int = 8) -> dict[str, Any]:
  """Checks a retrieval split up front (call before training so a bad held-out image or caption
  fails at step 0, not in the evaluation after training).

  Parses the annotation file (:func:`load_coco_retrieval`), checks every distinct image file of
  the split with :func:`vlm.data.image.check_image_file` (full decode, or header + ``verify()``
  when ``data_cfg.validate_images == "header"``; ``num_threads`` threads) and every caption
  with :func:`vlm.data.text.caption_problem` (``data_cfg.max_words``), i.e. exactly what
  :func:`build_retrieval_eval_data` would reject. Nothing is resized or tokenized.

  Args:
    data_cfg: data ConfigDict (``root``, ``{split}_annotations``, ``image_dir``,
      ``validate_images``, ``max_words``).
    split: ``"val"`` or ``"train"``.
    num_threads: threads used to check image files.

  Returns:
    ``{"split": str, "annotation_file": str (resolved path), "num_images": int (N_img, captioned
    images), "num_texts": int (N_txt)}``.

  Raises:
    BadSampleError: if any image is missing / empty / corrupt or any caption is empty or
      invalid; one message names the split, the annotation file, the counts, the first 20 bad
      files (with the reason) and the first 20 bad captions (text index, caption id, image),
      and the fix.
    FileNotFoundError / ValueError: annotation file missing or malformed (as
      :func:`load_coco_retrieval`), bad ``split`` or ``validate_images`` value.
  """
  validate_images = _get(data_cfg, "validate_images", "decode")
  if validate_images not in _VALIDATE_IMAGES:
    raise ValueError(f"validate_images must be one of {_VALIDATE_IMAGES}, got "
                     f"{validate_images!r}")
  ann, image_dir = split_paths(data_cfg, split)
  data = load_coco_retrieval(ann, image_dir)
  decode = validate_images == "decode"
  paths = list(dict.fromkeys(data["image_paths"]))
  with concurrent.futures.ThreadPoolExecutor(max(1, num_threads)) as pool:
    statuses = list(pool.map(lambda p: image_lib.check_image_file(p, decode=decode), paths))
  bad_images = [f"{status}: {path}" for path, status in zip(paths, statuses) if status is not None]
  bad_texts = _retrieval_caption_problems(data, int(_get(data_cfg, "max_words", 50)))
  if bad_images or bad_texts:
    _raise_bad_split(split, resolve_path(ann), len(data["image_paths"]), len(data["texts"]),
                     bad_images, bad_texts)
  return {
      "split": split,
      "annotation_file": resolve_path(ann),
      "num_images": len(data["image_paths"]),
      "num_texts": len(data["texts"]),
  }


def build_retrieval_eval_data(data_cfg: Any, split: str = "val",
                              num_threads: int = 8) -> dict[str, Any]:
  """Loads a whole retrieval split for evaluation (spec §7.1, LAVIS ``compute_sim_matrix``).

  Images: ``blip_image_eval`` (bicubic resize to S x S, CLIP normalise). Texts: ``pre_caption``
  then tokenised with ``padding="max_length", max_length=eval_max_text_len`` (35).

  Args:
    data_cfg: data ConfigDict.
    split: ``"val"`` or ``"train"``.
    num_threads: threads for image decoding.

  Returns:
    dict: ``pixel_values`` float32 [N_img, S, S, 3], ``input_ids`` int32 [N_txt, T_eval],
    ``attention_mask`` int32 [N_txt, T_eval], ``img2txt`` list[list[int]], ``txt2img`` int64
    [N_txt], ``image_ids`` int64 [N_img], ``texts`` list[str] (cleaned captions),
    ``image_paths`` list[str].

  Raises:
    BadSampleError: an image is missing/empty/corrupt, or a caption is empty / invalid (see
      :func:`vlm.data.text.caption_problem`; all such captions are named, checked before any
      image is decoded). Retrieval ground truth must be complete, so eval never skips; the
      message names the file or the records. :func:`validate_retrieval_split` runs the same
      checks cheaply before training.
    FileNotFoundError / ValueError: as :func:`load_coco_retrieval`.
  """
  ann, image_dir = split_paths(data_cfg, split)
  data = load_coco_retrieval(ann, image_dir)
  size = int(_get(data_cfg, "image_size", 224))
  max_words = int(_get(data_cfg, "max_words", 50))
  bad_texts = _retrieval_caption_problems(data, max_words)
  if bad_texts:
    _raise_bad_split(split, resolve_path(ann), len(data["image_paths"]), len(data["texts"]), (),
                     bad_texts)
  tokenizer = Blip2Tokenizer(_get(data_cfg, "vocab_file",
                                  "vlm/assets/tokenizers/bert-base-uncased/vocab.txt"))

  def load(path):
    return image_lib.preprocess_eval(image_lib.load_rgb(path), size)

  with concurrent.futures.ThreadPoolExecutor(max(1, num_threads)) as pool:
    pixel_values = np.stack(list(pool.map(load, data["image_paths"])))
  texts = [pre_caption(t, max_words) for t in data["texts"]]
  input_ids, attention_mask = tokenizer.tokenize(
      texts, int(_get(data_cfg, "eval_max_text_len", 35)))
  return {
      "pixel_values": pixel_values,
      "input_ids": input_ids,
      "attention_mask": attention_mask,
      "img2txt": data["img2txt"],
      "txt2img": data["txt2img"],
      "image_ids": data["image_ids"],
      "texts": texts,
      "image_paths": data["image_paths"],
  }
