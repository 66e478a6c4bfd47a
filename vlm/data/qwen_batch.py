"""The Qwen-VL training batch builder: samples -> tokenised examples -> packed, fixed-shape batches.

One path for Qwen3-VL (and Qwen2.5-VL) training data, through the vlm Qwen processor
(:mod:`vlm.data.qwen_processor`: :func:`preprocess_image`, :func:`load_video`,
:func:`preprocess_video`, :func:`apply_chat_template`, :func:`expand_vision_placeholders`,
:class:`Qwen3Tokenizer`) and the host MRoPE index (:func:`vlm.models.rope_index.
qwen3_vl_get_rope_index`, ``qwen2_5_vl_get_rope_index`` for Qwen2.5-VL):

1. :class:`QwenSampleEncoder` turns one :class:`vlm.data.conversations.Sample` into a
   :class:`TokenizedSample` (token ids, per-token target mask, MRoPE positions of the sample
   alone, its patches and grids, and the merged-feature row of each placeholder).
2. :mod:`vlm.data.packing` packs tokenised samples into rows of ``max_length`` tokens with a
   fixed patch buffer of ``max_patches`` rows per row (the batch schema of
   ``notes/common.md``).
3. :func:`build_qwen_train_loader` is the grain-checkpointable training stream: build-time
   validation of every record, a deterministic per-epoch shuffle from the seed, per-process
   sharding, repetition over epochs, packing, and an iterator whose state restores to produce
   exactly the same next batch.

Loss-mask rules (what is trained on):

* ``kind="chat"`` (instruction tuning): the tokens of each assistant turn's content plus its
  closing ``<|im_end|>``; never the ``<|im_start|>assistant\\n`` header, the ``\\n`` after
  ``<|im_end|>``, system/user turns, or vision tokens. This is what Qwen's own SFT recipe and
  LLaMA-Factory train on, minus the trailing ``\\n`` (generation stops at ``<|im_end|>``, so that
  newline is never produced by the model; training on it would only teach a token that is never
  sampled).
* ``kind="caption"`` (stage A/B pre-training rows): the sample is rendered without the chat
  template as ``<vision blocks><caption><|endoftext|>``; the caption tokens and the
  ``<|endoftext|>`` are trained on, the vision blocks are not.

Targets are shifted on the host inside each sample (``labels[t] = input_ids[t + 1]``), so a
packed row never predicts across samples.
"""
from __future__ import annotations

import collections
import concurrent.futures
import dataclasses
import hashlib
import os
from typing import Any, Mapping, Sequence

import grain
import numpy as np

from vlm.data import conversations as conv
from vlm.data import image as image_lib
from vlm.data import packing
from vlm.data.pipeline import check_loader_args
from vlm.data import qwen_processor as qp
from vlm.models import rope_index

_MAX_REPORTED = 20


@dataclasses.dataclass
class TokenizedSample:
  """One sample ready for packing (host numpy).

  Attributes:
    input_ids: int32 [n] token ids (placeholders expanded).
    target_mask: float32 [n]; 1.0 where token t is a *target* (predicted from token t-1), i.e. an
      assistant / caption token (see the module docstring). Packing turns it into ``loss_mask``
      on the shifted labels.
    position_ids: int32 [3, n] MRoPE (t, h, w) positions of the sample alone, starting at 0.
    pixel_values: float32 [p, F] the sample's patches: its images in order, then its videos.
    grid_thw: int64 [k, 3] one row per image then per video (same order as the patches).
    visual_index: int32 [n] row of the sample's merged visual features (``p / M^2`` rows, images
      then videos) for each placeholder token, -1 for text tokens.
    where: the record (file:index) for messages.
  """
  input_ids: np.ndarray
  target_mask: np.ndarray
  position_ids: np.ndarray
  pixel_values: np.ndarray
  grid_thw: np.ndarray
  visual_index: np.ndarray
  where: str = ""

  @property
  def num_tokens(self) -> int:
    return int(self.input_ids.shape[0])

  @property
  def num_patches(self) -> int:
    return int(self.pixel_values.shape[0])


def _encode_with_offsets(tokenizer: qp.Qwen3Tokenizer, text: str):
  """The Rust ``tokenizers.Encoding`` of ``text`` (ids and character offsets, no special tokens
  added): the same ids as :meth:`Qwen3Tokenizer.encode`, plus the offsets the loss mask needs."""
  return tokenizer._tok.encode(text, add_special_tokens=False)  # pylint: disable=protected-access


def _split_tags(text: str) -> list[dict[str, Any]]:
  """``"a<image>b"`` -> content items for :func:`qp.apply_chat_template`."""
  items: list[dict[str, Any]] = []
  pos = 0
  while True:
    i, v = text.find(conv.IMAGE_TAG, pos), text.find(conv.VIDEO_TAG, pos)
    cands = [(at, tag) for at, tag in ((i, conv.IMAGE_TAG), (v, conv.VIDEO_TAG)) if at != -1]
    if not cands:
      break
    at, tag = min(cands)
    if at > pos:
      items.append({"type": "text", "text": text[pos:at]})
    items.append({"type": "image" if tag == conv.IMAGE_TAG else "video"})
    pos = at + len(tag)
  if pos < len(text):
    items.append({"type": "text", "text": text[pos:]})
  return items


def _tags_to_blocks(text: str) -> str:
  return (text.replace(conv.IMAGE_TAG, f"{qp.VISION_START}{qp.IMAGE_PAD}{qp.VISION_END}")
          .replace(conv.VIDEO_TAG, f"{qp.VISION_START}{qp.VIDEO_PAD}{qp.VISION_END}"))


def processor_config_for(model_config, overrides: Mapping[str, Any] | None = None
                         ) -> qp.QwenProcessorConfig:
  """The released processor settings of ``model_config``'s family (Qwen3-VL or Qwen2.5-VL) with
  ``overrides`` (fields of :class:`vlm.data.qwen_processor.QwenProcessorConfig`, e.g.
  ``max_pixels``) applied; patch/merge/temporal sizes are taken from the model's vision config.

  Raises:
    ValueError: an unknown override field, or values the processor config rejects.
  """
  from vlm.models.qwen3_vl import Qwen2_5_VLConfig  # pylint: disable=import-outside-toplevel
  base = (qp.QWEN2_5_VL_PROCESSOR if isinstance(model_config, Qwen2_5_VLConfig)
          else qp.QWEN3_VL_PROCESSOR)
  v = model_config.vision
  fields = {f.name for f in dataclasses.fields(qp.QwenProcessorConfig)}
  kw = dict(overrides or {})
  unknown = sorted(set(kw) - fields)
  if unknown:
    raise ValueError(f"unknown processor setting(s) {unknown}; valid: {sorted(fields)}")
  kw.update(patch_size=v.patch_size, temporal_patch_size=v.temporal_patch_size,
            merge_size=v.spatial_merge_size)
  for k in ("image_mean", "image_std"):
    if k in kw:
      kw[k] = tuple(kw[k])
  return dataclasses.replace(base, **kw)


class QwenSampleEncoder:
  """:class:`vlm.data.conversations.Sample` -> :class:`TokenizedSample`.

  Args:
    model_config: :class:`vlm.models.qwen3_vl.Qwen3VLConfig` (or ``Qwen2_5_VLConfig``): token
      ids, merge size, Qwen2.5-VL ``tokens_per_second``.
    processor_config: image/video settings (default :func:`processor_config_for`).
    tokenizer: :class:`vlm.data.qwen_processor.Qwen3Tokenizer` (default: the bundled file).
    max_length: L; longer samples raise ``BadSampleError(reason="too_long")``.
    max_patches: Np; samples with more patches raise ``reason="too_many_patches"``.

  Raises:
    ValueError: processor and model disagree on patch/merge sizes.
  """

  def __init__(self, model_config, processor_config: qp.QwenProcessorConfig | None = None,
               tokenizer: qp.Qwen3Tokenizer | None = None, *, max_length: int | None = None,
               max_patches: int | None = None):
    from vlm.models.qwen3_vl import Qwen2_5_VLConfig  # pylint: disable=import-outside-toplevel
    self.model_config = model_config
    self.is_qwen2_5 = isinstance(model_config, Qwen2_5_VLConfig)
    self.config = processor_config or processor_config_for(model_config)
    v = model_config.vision
    if (self.config.patch_size, self.config.merge_size, self.config.temporal_patch_size) != (
        v.patch_size, v.spatial_merge_size, v.temporal_patch_size):
      raise ValueError(f"processor patch/merge/temporal sizes {self.config.patch_size}/"
                       f"{self.config.merge_size}/{self.config.temporal_patch_size} differ from "
                       f"the model's {v.patch_size}/{v.spatial_merge_size}/"
                       f"{v.temporal_patch_size}")
    self.tokenizer = tokenizer or qp.Qwen3Tokenizer()
    self.max_length = max_length
    self.max_patches = max_patches
    tok = self.tokenizer
    self._vision_ids = np.array([tok.image_token_id, tok.video_token_id, tok.vision_start_id,
                                 tok.vision_end_id], np.int64)
    for name, mine in (("image_token_id", tok.image_token_id),
                       ("video_token_id", tok.video_token_id),
                       ("vision_start_token_id", tok.vision_start_id)):
      if getattr(model_config, name) != mine:
        raise ValueError(f"model {name}={getattr(model_config, name)} but the tokenizer has "
                         f"{mine}; use the model's tokenizer.json")

  # -- pieces -------------------------------------------------------------------------------

  def _vision(self, sample: conv.Sample):
    cfg = self.config
    patches, img_grids, vid_grids, stamps, secs = [], [], [], [], []
    for path in sample.images:
      p, g = qp.preprocess_image(path, cfg)  # BadSampleError (ValueError) names the file
      patches.append(p)
      img_grids.append(g)
    for path in sample.videos:
      if not os.path.isfile(path):
        raise image_lib.BadSampleError(f"video file missing: {path}", "missing_video")
      if os.path.getsize(path) == 0:
        raise image_lib.BadSampleError(f"video file is empty (0 bytes): {path}", "empty_video")
      try:
        frames, ts = qp.load_video(path, cfg.fps, cfg.min_frames, cfg.max_frames,
                                   cfg.temporal_patch_size, frame_sampling=cfg.frame_sampling,
                                   num_frames=cfg.num_frames)
        p, g = qp.preprocess_video(frames, cfg)
      except ValueError as e:
        raise image_lib.BadSampleError(f"{sample.where}: video {path}: {e}",
                                       "corrupt_video") from e
      patches.append(p)
      vid_grids.append(g)
      stamps.append(qp.temporal_patch_timestamps(ts, cfg.temporal_patch_size))
      fps = cfg.fps if cfg.fps is not None else 2.0
      secs.append(cfg.temporal_patch_size / fps)
    return patches, img_grids, vid_grids, stamps, secs

  def _render(self, sample: conv.Sample, img_grids, vid_grids, stamps
              ) -> tuple[str, list[tuple[int, int]]]:
    """Expanded prompt text and the character spans that are targets."""
    cfg = self.config
    stamps_arg = stamps if cfg.video_timestamps else None
    pieces: list[tuple[str, bool]] = []  # (text, is target)
    used_i = used_v = 0

    def expand(text):
      nonlocal used_i, used_v
      e, ni, nv = qp.expand_vision_placeholders(
          text, img_grids[used_i:], vid_grids[used_v:],
          None if stamps_arg is None else stamps_arg[used_v:], cfg.merge_size)
      used_i += ni
      used_v += nv
      return e

    if sample.kind == "caption":
      for m in sample.messages:
        if m["role"] == "assistant":
          pieces.append((expand(_tags_to_blocks(m["content"])) + qp.ENDOFTEXT, True))
        elif m["role"] == "user":
          pieces.append((expand(_tags_to_blocks(m["content"])), False))
        # a system turn has no place in a plain pre-training row: dropped
    else:
      msgs = list(sample.messages)
      if cfg.default_system_prompt is not None and msgs[0]["role"] != "system":
        msgs.insert(0, {"role": "system", "content": cfg.default_system_prompt})
      for m in msgs:
        text = qp.apply_chat_template([{"role": m["role"], "content": _split_tags(m["content"])}],
                                      add_generation_prompt=False)
        text = expand(text)
        if m["role"] == "assistant":
          head = f"{qp.IM_START}assistant\n"
          pieces += [(head, False), (text[len(head):-1], True), ("\n", False)]
        else:
          pieces.append((text, False))
    if used_i != len(img_grids) or used_v != len(vid_grids):
      raise image_lib.BadSampleError(
          f"{sample.where}: {used_i} image / {used_v} video blocks rendered for "
          f"{len(img_grids)} images / {len(vid_grids)} videos", "placeholder_mismatch")
    text, spans, at = "", [], 0
    for piece, target in pieces:
      if target:
        spans.append((at, at + len(piece)))
      text += piece
      at += len(piece)
    return text, spans

  def encode(self, sample: conv.Sample) -> TokenizedSample:
    """Tokenises ``sample`` (images/videos decoded and patchified).

    Returns:
      :class:`TokenizedSample`.

    Raises:
      vlm.data.image.BadSampleError: ``.reason`` ``missing_image|empty_image|corrupt_image``
        (from :func:`vlm.data.image.load_rgb`), ``corrupt_video`` (missing, empty, undecodable or
        unsamplable clip), ``placeholder_mismatch`` (tags vs media, or token runs vs grids),
        ``no_assistant_turn`` (nothing to train on), ``too_long`` (> ``max_length`` tokens),
        ``too_many_patches`` (> ``max_patches``); the message names the record.
    """
    try:
      patches, img_grids, vid_grids, stamps, secs = self._vision(sample)
    except image_lib.BadSampleError as e:
      reason = e.reason if (e.reason or "").endswith("_video") else f"{e.reason or 'corrupt'}_image"
      raise image_lib.BadSampleError(f"{sample.where}: {e}", reason) from None
    except ValueError as e:  # e.g. an aspect ratio above 200
      raise image_lib.BadSampleError(f"{sample.where}: {e}", "corrupt_image") from None
    try:
      text, spans = self._render(sample, img_grids, vid_grids, stamps)
    except image_lib.BadSampleError:
      raise
    except ValueError as e:
      raise image_lib.BadSampleError(f"{sample.where}: {e}", "placeholder_mismatch") from None
    enc = _encode_with_offsets(self.tokenizer, text)
    ids = np.asarray(enc.ids, np.int64)
    n = len(ids)
    n_patches = int(sum(p.shape[0] for p in patches))
    if self.max_length is not None and n > self.max_length:
      raise image_lib.BadSampleError(
          f"{sample.where}: {n} tokens > max_length={self.max_length} (dropped whole: never cut "
          "through a vision block); raise max_length or lower max_pixels", "too_long")
    if self.max_patches is not None and n_patches > self.max_patches:
      raise image_lib.BadSampleError(
          f"{sample.where}: {n_patches} patches > max_patches={self.max_patches}; raise "
          "max_patches or lower max_pixels / video_max_pixels", "too_many_patches")
    offsets = np.asarray(enc.offsets, np.int64).reshape(n, 2)
    target = np.zeros(n, np.float32)
    for s, e in spans:
      target[(offsets[:, 0] >= s) & (offsets[:, 1] <= e)] = 1.0
    target[np.isin(ids, self._vision_ids)] = 0.0
    if not target.any():
      raise image_lib.BadSampleError(f"{sample.where}: no target token (empty assistant turn)",
                                     "no_assistant_turn")
    tok = self.tokenizer
    m = self.config.merge_size
    img = np.stack(img_grids) if img_grids else None
    vid = np.stack(vid_grids) if vid_grids else None
    try:
      rope_index.check_vision_tokens(
          ids[None], None, img, vid, image_token_id=tok.image_token_id,
          video_token_id=tok.video_token_id, vision_start_id=tok.vision_start_id, merge_size=m,
          split_video_frames=self.config.video_timestamps)
    except ValueError as e:
      raise image_lib.BadSampleError(f"{sample.where}: {e}", "placeholder_mismatch") from None
    if self.is_qwen2_5:
      pos, _ = rope_index.qwen2_5_vl_get_rope_index(
          ids[None], img, vid, None, m, tok.image_token_id, tok.video_token_id,
          tok.vision_start_id, second_per_grid_ts=np.asarray(secs) if secs else None,
          tokens_per_second=self.model_config.vision.tokens_per_second)
    else:
      pos, _ = rope_index.qwen3_vl_get_rope_index(
          ids[None], img, vid, None, m, tok.image_token_id, tok.video_token_id,
          tok.vision_start_id)
    unit = m * m
    visual = np.full(n, -1, np.int32)
    n_img_rows = int(sum(int(np.prod(g)) for g in img_grids)) // unit
    is_img, is_vid = ids == tok.image_token_id, ids == tok.video_token_id
    visual[is_img] = np.arange(int(is_img.sum()), dtype=np.int32)
    visual[is_vid] = n_img_rows + np.arange(int(is_vid.sum()), dtype=np.int32)
    grids = img_grids + vid_grids
    f = self.model_config.vision.patch_dim
    return TokenizedSample(
        input_ids=ids.astype(np.int32), target_mask=target,
        position_ids=pos[:, 0].astype(np.int32),
        pixel_values=(np.concatenate(patches).astype(np.float32) if patches
                      else np.zeros((0, f), np.float32)),
        grid_thw=(np.stack(grids).astype(np.int64) if grids else np.zeros((0, 3), np.int64)),
        visual_index=visual, where=sample.where)


# ----------------------------------------------------------------------------------------------
# Build-time validation and the checkpointable packed training stream.


@dataclasses.dataclass
class QwenDataStats:
  """Bad-sample accounting of the Qwen training data.

  Attributes:
    n_records: records read from all sources.
    n_kept: samples that stream.
    n_skipped: ``n_records - n_kept``.
    reasons: count per reason (see :mod:`vlm.data.conversations` and
      :meth:`QwenSampleEncoder.encode`: ``too_long``, ``too_many_patches``, ...).
    examples: up to 20 ``(record, reason, message)`` of dropped records.
    num_tokens: total tokens of the kept samples (when prescanned, else 0).
  """
  n_records: int
  n_kept: int
  n_skipped: int
  reasons: dict[str, int]
  examples: list[tuple[str, str, str]]
  num_tokens: int = 0

  def as_dict(self) -> dict[str, Any]:
    return dataclasses.asdict(self)


def _get(cfg: Any, name: str, default: Any) -> Any:
  if isinstance(cfg, Mapping):
    return cfg.get(name, default)
  try:
    return getattr(cfg, name)
  except (AttributeError, KeyError):
    return default


def validate_samples(samples: Sequence[conv.Sample], problems: Sequence[conv.Problem],
                     encoder: QwenSampleEncoder | None = None, *, decode_images: bool = True,
                     on_bad_sample: str = "skip", num_threads: int = 4
                     ) -> tuple[list[conv.Sample], QwenDataStats, np.ndarray]:
  """Drops every unusable sample at build time (deterministic), so the stream never fails.

  With ``encoder`` every sample is fully encoded once (that opens every image and video, with
  the same reasons, and gives exact ``too_long`` / ``too_many_patches`` / placeholder-run counts
  and token lengths; pixel data is not kept). Without it, each distinct image/video file is
  checked once (:func:`vlm.data.conversations.check_sample_files`) and the length checks happen
  in the stream (counted skips).

  Args:
    samples, problems: from :func:`vlm.data.conversations.load_sources`.
    encoder: the :class:`QwenSampleEncoder` the stream will use, or None (files only).
    decode_images: full image decode (exact) or header check only.
    on_bad_sample: ``"skip"`` or ``"raise"`` (raise on the first bad sample).
    num_threads: threads for file checks and encoding.

  Returns:
    ``(kept samples, stats, num_tokens int64 [n_kept] (0 when not encoded))``.

  Raises:
    vlm.data.image.BadSampleError: in ``"raise"`` mode, naming the record and reason.
    ValueError: nothing usable is left (names the reasons and the first problems): raised before
      anything is compiled.
  """
  if on_bad_sample not in ("skip", "raise"):
    raise ValueError(f"on_bad_sample must be 'skip' or 'raise', got {on_bad_sample!r}")
  n_records = len(samples) + len(problems)
  reasons: collections.Counter = collections.Counter(p.reason for p in problems)
  examples = [(p.where, p.reason, p.detail) for p in problems[:_MAX_REPORTED]]
  if problems and on_bad_sample == "raise":
    p = problems[0]
    raise image_lib.BadSampleError(f"bad sample {p.where}: {p.detail}", p.reason)
  # With an encoder every file is opened by encode() anyway (same reasons), so only the
  # files-only mode probes them separately.
  files = [] if encoder is not None else sorted(
      {(p, "image") for s in samples for p in s.images}
      | {(p, "video") for s in samples for p in s.videos})

  def check(item):
    path, kind = item
    probe_sample = conv.Sample(messages=(), images=(path,) if kind == "image" else (),
                               videos=(path,) if kind == "video" else ())
    return conv.check_sample_files(probe_sample, decode_images)

  with concurrent.futures.ThreadPoolExecutor(max(1, num_threads)) as pool:
    probe = {path: res for (path, _), res in zip(files, pool.map(check, files))}

  def status(sample):
    for p in sample.images + sample.videos:
      if probe.get(p) is not None:
        reason, msg = probe[p]
        return reason, f"{sample.where}{msg}"
    if encoder is None:
      return 0
    try:
      return encoder.encode(sample).num_tokens
    except image_lib.BadSampleError as e:
      return e.reason or "bad_sample", str(e)

  with concurrent.futures.ThreadPoolExecutor(max(1, num_threads)) as pool:
    results = list(pool.map(status, samples))
  kept, lengths = [], []
  for sample, res in zip(samples, results):
    if isinstance(res, tuple):
      if on_bad_sample == "raise":
        detail = res[1] if res[1].startswith(sample.where) else f"{sample.where}: {res[1]}"
        raise image_lib.BadSampleError(f"bad sample {detail}. Fix the data or skip and count "
                                       "such samples (--config.data.on_bad_sample=skip).", res[0])
      reasons[res[0]] += 1
      if len(examples) < _MAX_REPORTED:
        examples.append((sample.where, res[0], res[1]))
    else:
      kept.append(sample)
      lengths.append(res)
  if not kept:
    first = "; ".join(f"{w}: {r}" for w, r, _ in examples[:5])
    raise ValueError(f"no usable training sample: all {n_records} records were dropped "
                     f"({dict(reasons)}; first: {first}). Check data_cfg.sources paths, "
                     "max_length / max_patches and the processor pixel budgets.")
  stats = QwenDataStats(n_records=n_records, n_kept=len(kept), n_skipped=n_records - len(kept),
                        reasons=dict(reasons), examples=examples,
                        num_tokens=int(sum(lengths)))
  return kept, stats, np.asarray(lengths, np.int64)


class QwenPackedIterator(grain.DatasetIterator):
  """Packed batches of one process's shard; checkpointable (``get_state``/``set_state``).

  Packing of one batch (deterministic): the samples carried over from the previous batch are
  tried first, in order, then new samples from the stream; each goes into the first of the B rows
  that still has room for its tokens (L) and patches (Np) (first fit). A sample that fits no row
  is carried over; the batch is closed when ``pack_window`` samples are carried (or all rows are
  full). So a sample waits at most one batch, and at most ``pack_window`` tokenised samples are
  held in memory.

  The state is ``{"next": stream position, "pending": [positions carried over], "skipped":
  {reason: count}, "examples": [...], "batches": int}`` (JSON): restoring re-encodes the carried
  samples from their positions (encoding is deterministic), so the next batch is bit-identical.
  A state is only valid for a loader with the same data, config, seed and process layout
  (``"fingerprint"`` is checked).

  Yields:
    dict (the schema of :mod:`vlm.data.packing`) with B = ``loader.per_process_batch_size``.

  Raises:
    ValueError: (from ``__next__``) if a whole epoch of the shard yields no usable sample.
  """

  def __init__(self, loader: "QwenTrainLoader"):
    super().__init__()
    self._loader = loader
    self._next = 0
    self._pending: list[tuple[int, TokenizedSample]] = []
    self._skipped: collections.Counter = collections.Counter()
    self._examples: list[list[str]] = []
    self._batches = 0
    self._pool = (concurrent.futures.ThreadPoolExecutor(loader.num_threads)
                  if loader.num_threads > 1 else None)
    self._ahead: dict[int, concurrent.futures.Future] = {}

  def _encode_at(self, k: int) -> TokenizedSample | image_lib.BadSampleError:
    try:
      return self._loader.encoder.encode(self._loader.sample_at(k))
    except image_lib.BadSampleError as e:
      return e

  def _encoded(self, k: int) -> TokenizedSample | image_lib.BadSampleError:
    """Encoding of stream position k; with threads, positions k..k+prefetch are encoded ahead
    (encoding is a pure function of the position, so this changes no result)."""
    if self._pool is None:
      return self._encode_at(k)
    for j in range(k, k + self._loader.prefetch):
      if j not in self._ahead:
        self._ahead[j] = self._pool.submit(self._encode_at, j)
    return self._ahead.pop(k).result()

  def _pull(self) -> tuple[int, TokenizedSample]:
    loader = self._loader
    misses = 0
    while True:
      k = self._next
      self._next += 1
      sample = loader.sample_at(k)
      try:
        item = self._encoded(k)
        if isinstance(item, image_lib.BadSampleError):
          raise item
        return k, item
      except image_lib.BadSampleError as e:
        if loader.on_bad_sample == "raise":
          raise
        self._skipped[e.reason or "bad_sample"] += 1
        if len(self._examples) < _MAX_REPORTED:
          self._examples.append([sample.where, e.reason or "bad_sample", str(e)])
        misses += 1
        if misses >= loader.shard_size:
          raise ValueError(f"no usable sample in a whole epoch ({loader.shard_size} samples) of "
                           f"process {loader.process_index}'s shard: {dict(self._skipped)}")

  def __next__(self) -> dict[str, Any]:
    loader = self._loader
    b, length, n_p = loader.per_process_batch_size, loader.max_length, loader.max_patches
    tokens_left, patches_left = [length] * b, [n_p] * b
    rows: list[list[TokenizedSample]] = [[] for _ in range(b)]
    carried: list[tuple[int, TokenizedSample]] = []
    queue = list(self._pending)
    while len(carried) < loader.pack_window and any(t > 0 for t in tokens_left):
      k, item = queue.pop(0) if queue else self._pull()
      for r in range(b):
        if item.num_tokens <= tokens_left[r] and item.num_patches <= patches_left[r]:
          rows[r].append(item)
          tokens_left[r] -= item.num_tokens
          patches_left[r] -= item.num_patches
          break
      else:
        carried.append((k, item))
    self._pending = carried + queue
    self._batches += 1
    return packing.assemble_batch(rows, max_length=length, max_patches=n_p,
                                  vision_config=loader.model_config.vision,
                                  pad_token_id=loader.encoder.tokenizer.pad_token_id)

  def get_state(self) -> dict[str, Any]:
    return {"next": self._next, "pending": [k for k, _ in self._pending],
            "skipped": dict(self._skipped), "examples": list(self._examples),
            "batches": self._batches, "fingerprint": self._loader.fingerprint}

  def set_state(self, state: Mapping[str, Any]) -> None:
    if state.get("fingerprint") != self._loader.fingerprint:
      from vlm.data.pipeline import IteratorStateMismatchError
      raise IteratorStateMismatchError(
          f"iterator state was saved by a different data stream (fingerprint "
          f"{state.get('fingerprint')!r} != {self._loader.fingerprint!r}): same "
          "sources, config, seed and process layout are needed to resume")
    self._next = int(state["next"])
    self._ahead.clear()
    self._pending = [(int(k), self._loader.encoder.encode(self._loader.sample_at(int(k))))
                     for k in state["pending"]]
    self._skipped = collections.Counter({str(k): int(v) for k, v in state["skipped"].items()})
    self._examples = [list(e) for e in state.get("examples", [])]
    self._batches = int(state.get("batches", 0))

  @property
  def skipped(self) -> dict[str, int]:
    """Samples skipped while streaming (per occurrence; 0 after a prescan)."""
    return dict(self._skipped)


class QwenTrainLoader:
  """The Qwen training stream of one process (see :func:`build_qwen_train_loader`).

  Attributes:
    stats: :class:`QwenDataStats` of the build-time validation; ``loader_stats`` its dict.
    encoder: the :class:`QwenSampleEncoder`.
    samples: the kept samples (all processes); ``shard``: this process's sample indices.
    per_process_batch_size, max_length, max_patches, pack_window: B, L, Np, window.
    process_index, process_count, seed, fingerprint.
  """

  def __init__(self, *, samples, stats, encoder, model_config, per_process_batch_size,
               max_length, max_patches, pack_window, seed, process_index, process_count,
               on_bad_sample, num_tokens, num_threads=1, prefetch=0):
    self.samples = samples
    self.stats = stats
    self.encoder = encoder
    self.model_config = model_config
    self.per_process_batch_size = per_process_batch_size
    self.max_length = max_length
    self.max_patches = max_patches
    self.pack_window = pack_window
    self.seed = seed
    self.process_index = process_index
    self.process_count = process_count
    self.on_bad_sample = on_bad_sample
    self.num_tokens = num_tokens
    self.num_threads = int(num_threads)
    self.prefetch = int(prefetch) or 4 * max(1, self.num_threads)
    self.shard_size = len(samples) // process_count
    self.shard = np.arange(process_index, self.shard_size * process_count, process_count)
    self._perm_cache: dict[int, np.ndarray] = {}
    h = hashlib.sha1()
    for s in samples:
      h.update(repr((s.where, s.kind, s.images, s.videos, s.messages)).encode("utf-8",
                                                                            "surrogatepass"))
    h.update(repr((seed, process_index, process_count, per_process_batch_size, max_length,
                   max_patches, pack_window, encoder.config)).encode())
    self.fingerprint = h.hexdigest()[:16]

  @property
  def loader_stats(self) -> dict[str, Any]:
    return self.stats.as_dict()

  def _perm(self, epoch: int) -> np.ndarray:
    if epoch not in self._perm_cache:
      if len(self._perm_cache) > 4:
        self._perm_cache.clear()
      rng = np.random.default_rng([self.seed, epoch])
      self._perm_cache[epoch] = rng.permutation(self.shard_size)
    return self._perm_cache[epoch]

  def sample_index_at(self, position: int) -> int:
    """Index into ``samples`` of stream position ``position`` (epoch ``position // shard_size``
    is a fresh permutation of the shard from ``(seed, epoch)``)."""
    epoch, j = divmod(int(position), self.shard_size)
    return int(self.shard[self._perm(epoch)[j]])

  def sample_at(self, position: int) -> conv.Sample:
    return self.samples[self.sample_index_at(position)]

  def __iter__(self) -> QwenPackedIterator:
    return QwenPackedIterator(self)

  def example_batch(self) -> dict[str, Any]:
    """An all-padding batch with the stream's shapes (B, L, Np) and dtypes."""
    return packing.empty_batch(self.per_process_batch_size, self.max_length, self.max_patches,
                               self.model_config.vision, self.encoder.tokenizer.pad_token_id)


def build_qwen_train_loader(data_cfg: Any, model_config, *, global_batch_size: int, seed: int,
                            process_index: int = 0, process_count: int = 1,
                            tokenizer: qp.Qwen3Tokenizer | None = None) -> QwenTrainLoader:
  """Builds the deterministic, resumable, per-process packed Qwen training stream.

  Steps: read ``data_cfg.sources`` (:func:`vlm.data.conversations.load_sources`), validate
  every record at build time (:func:`validate_samples`; with ``data_cfg.prescan`` every sample
  is encoded once, so too-long samples and bad files are dropped and counted before training
  and a dataset with nothing usable fails here, before any compile), shard the kept samples by
  process (``samples[p::P]``, equal shard sizes), shuffle each epoch with
  ``default_rng([seed, epoch])``, repeat forever, pack (:class:`QwenPackedIterator`).

  Args:
    data_cfg: see :func:`vlm.data.config.default_qwen_data_config` (``sources``, ``max_length``,
      ``max_patches``, ``pack_window``, ``processor`` overrides, ``on_bad_sample``,
      ``validate_images``, ``prescan``, ``num_threads``).
    model_config: :class:`vlm.models.qwen3_vl.Qwen3VLConfig` / ``Qwen2_5_VLConfig``.
    global_batch_size: rows summed over processes (a multiple of ``process_count``).
    seed: int in [0, 2**32).
    process_index, process_count: this process's data shard.
    tokenizer: default the bundled Qwen3 tokenizer (``data_cfg.tokenizer_file``).

  Returns:
    :class:`QwenTrainLoader`; ``iter(loader)`` is a :class:`QwenPackedIterator` (a grain
    ``DatasetIterator``: save it with :func:`vlm.data.pipeline.iterator_checkpoint_args`).

  Raises:
    ValueError: bad sizes/layout/seed, unknown processor settings, fewer kept samples than
      processes, or no usable sample.
    vlm.data.image.BadSampleError: the first bad sample with ``on_bad_sample="raise"``.
  """
  check_loader_args(global_batch_size, seed, process_index, process_count)
  max_length = int(_get(data_cfg, "max_length", 2048))
  max_patches = int(_get(data_cfg, "max_patches", 4096))
  unit = model_config.vision.spatial_merge_size ** 2
  if max_length < 2 or max_patches < unit or max_patches % unit:
    raise ValueError(f"max_length must be >= 2 and max_patches a positive multiple of {unit}, "
                     f"got {max_length}, {max_patches}")
  on_bad_sample = _get(data_cfg, "on_bad_sample", "skip")
  overrides = _get(data_cfg, "processor", None) or {}
  if hasattr(overrides, "to_dict"):
    overrides = overrides.to_dict()
  if tokenizer is None:
    tokenizer = qp.Qwen3Tokenizer(_get(data_cfg, "tokenizer_file", qp.DEFAULT_TOKENIZER_FILE))
  encoder = QwenSampleEncoder(model_config, processor_config_for(model_config, overrides),
                              tokenizer, max_length=max_length, max_patches=max_patches)
  specs = _get(data_cfg, "sources", None)
  if not specs:
    raise ValueError("data_cfg.sources is empty: list at least one source (see "
                     "vlm.data.config.default_qwen_data_config)")
  specs = [s.to_dict() if hasattr(s, "to_dict") else dict(s) for s in specs]
  samples, problems = conv.load_sources(specs, on_bad_sample)
  kept, stats, lengths = validate_samples(
      samples, problems, encoder if _get(data_cfg, "prescan", True) else None,
      decode_images=_get(data_cfg, "validate_images", "decode") == "decode",
      on_bad_sample=on_bad_sample, num_threads=int(_get(data_cfg, "num_threads", 4)))
  if len(kept) < process_count:
    raise ValueError(f"only {len(kept)} usable samples for {process_count} processes")
  per_process = global_batch_size // process_count
  window = int(_get(data_cfg, "pack_window", 0)) or 2 * per_process
  return QwenTrainLoader(
      samples=kept, stats=stats, encoder=encoder, model_config=model_config,
      per_process_batch_size=per_process, max_length=max_length, max_patches=max_patches,
      pack_window=window, seed=int(seed), process_index=process_index,
      process_count=process_count, on_bad_sample=on_bad_sample, num_tokens=lengths,
      num_threads=int(_get(data_cfg, "num_threads", 4)),
      prefetch=int(_get(data_cfg, "prefetch", 0)))
