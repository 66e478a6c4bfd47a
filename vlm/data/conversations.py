"""Qwen-VL training data sources, normalised into one :class:`Sample` type.

Formats read here (host only, plain Python + Pillow/PyAV for file checks):

* LLaVA / Qwen-VL conversation files, JSON (a list of records) or JSONL (one record per line), as
  in QwenLM/Qwen3-VL ``qwen-vl-finetune/demo/`` (``single_images.json``, ``video.json``)::

    {"image": "a.jpg" | ["a.jpg", "b.jpg"], "video": "v.mp4" | [...],
     "conversations": [{"from": "human" | "gpt" | "system", "value": "<image>\\nQuestion"}, ...]}

  The ``messages`` form ``[{"role": "user" | "assistant" | "system", "content": str}]`` is
  accepted too (roles ``human``/``gpt`` map to ``user``/``assistant``). ``<image>`` / ``<video>``
  tags mark where each image / video goes, in order; the tag count must equal the number of
  images / videos (else ``placeholder_mismatch``: the LLaVA convention makes the tags explicit,
  and guessing where a missing one goes would change the sample). Records without
  ``image``/``video`` are text-only conversations. Relative
  media paths resolve against ``image_root`` / ``video_root`` (default: the file's directory).
* COCO captions (``captions_*.json``) as pre-training caption rows (``kind="caption"``: the image
  followed by its caption, the loss on the caption) or as chat turns (user ``"<image>\\n"`` +
  prompt, assistant = the caption).
* OK-VQA questions on COCO photos (``okvqa_on_coco_real_captions.json`` of the embedded data) as
  question/answer chat turns (the most frequent human answer as the target).

Every record becomes a :class:`Sample`; a record that cannot be used is reported as a
:class:`Problem` with a short reason (counted by the pipeline) or, with ``on_bad_sample="raise"``,
raised as :class:`vlm.data.image.BadSampleError` naming the file and record. Reasons produced here:
``invalid_utf8`` (a JSONL line that is not UTF-8: file, line and byte offset), ``malformed`` (not an
object, no conversation, a turn that is not ``{from, value}``), ``unknown_role``,
``no_assistant_turn``, ``placeholder_mismatch`` (tag count != image/video count, or a literal
``<|image_pad|>``-style special token in the text), ``invalid_text`` (a lone surrogate),
``empty_caption``; and from :func:`check_sample_files`: ``missing_image``, ``empty_image``,
``corrupt_image``, ``missing_video``, ``empty_video``, ``corrupt_video``.
"""
from __future__ import annotations

import codecs
import dataclasses
import json
import os
from typing import Any, Iterable, Mapping, Sequence

from vlm.data import image as image_lib
from vlm.data.paths import resolve_path
from vlm.data.sources import CocoCaptionsSource, _read_json
from vlm.data.text import describe_unencodable, has_visible_text

IMAGE_TAG = "<image>"
VIDEO_TAG = "<video>"
ROLES = ("system", "user", "assistant")
_ROLE_ALIASES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant",
                 "system": "system"}
# Special tokens that must never appear literally in data text (they would be matched as tokens
# and misalign vision features or turn boundaries).
_SPECIAL_TEXT = ("<|image_pad|>", "<|video_pad|>", "<|vision_start|>", "<|vision_end|>",
                 "<|im_start|>", "<|im_end|>", "<|endoftext|>")
DEFAULT_CAPTION_PROMPT = "Describe this image in one sentence."
DEFAULT_VQA_PROMPT = "Answer the question using a single word or phrase."


@dataclasses.dataclass(frozen=True)
class Sample:
  """One training example before tokenisation.

  Attributes:
    messages: ``({"role": "system"|"user"|"assistant", "content": str}, ...)``; contents hold one
      ``<image>`` tag per entry of ``images`` and one ``<video>`` tag per entry of ``videos``, in
      order of appearance over the whole conversation.
    images: image file paths (resolved), in tag order.
    videos: video file paths (resolved), in tag order.
    kind: ``"chat"`` (rendered with the chat template; loss on assistant turns) or ``"caption"``
      (pre-training row: the vision blocks, then the assistant text as plain text and
      ``<|endoftext|>``; loss on that text).
    where: ``"<file>:<record>"`` naming the record in errors.
  """
  messages: tuple[Mapping[str, str], ...]
  images: tuple[str, ...] = ()
  videos: tuple[str, ...] = ()
  kind: str = "chat"
  where: str = ""


@dataclasses.dataclass(frozen=True)
class Problem:
  """A record that was not turned into a :class:`Sample`: ``where`` (file:record), ``reason``
  (short key, counted) and ``detail`` (the full message)."""
  where: str
  reason: str
  detail: str


class _Bad(Exception):
  """Internal: a record problem (reason, message)."""

  def __init__(self, reason: str, message: str):
    super().__init__(message)
    self.reason = reason


def _check_text(text: Any, where: str) -> str:
  if not isinstance(text, str):
    raise _Bad("malformed", f"{where} must be a string, got {type(text).__name__}: {text!r}")
  msg = describe_unencodable(text, where)
  if msg is not None:
    raise _Bad("invalid_text", msg)
  for token in _SPECIAL_TEXT:
    at = text.find(token)
    if at != -1:
      raise _Bad("placeholder_mismatch",
                 f"{where} contains the literal special token {token} at character {at}; mark "
                 f"images with {IMAGE_TAG} and videos with {VIDEO_TAG} instead (a literal "
                 "special token would shift vision features or turn boundaries)")
  return text


def _media_list(value: Any, root: str, key: str, where: str) -> tuple[str, ...]:
  if value is None:
    return ()
  items = [value] if isinstance(value, str) else value
  if not isinstance(items, (list, tuple)) or not all(isinstance(p, str) and p for p in items):
    raise _Bad("malformed", f"{where}: {key!r} must be a path or a list of paths, got {value!r}")
  out = []
  for p in items:
    path = p if os.path.isabs(p) else os.path.join(root, p)
    out.append(os.path.normpath(path))
  return tuple(out)


def sample_from_record(record: Any, where: str, *, image_root: str, video_root: str | None = None,
                       kind: str = "chat") -> Sample:
  """Normalises one LLaVA/Qwen conversation record (see the module docstring) into a Sample.

  Args:
    record: the decoded JSON object.
    where: ``"<file>:<index>"`` for messages.
    image_root: directory relative image paths resolve against.
    video_root: same for videos (default ``image_root``).
    kind: ``"chat"`` or ``"caption"``.

  Returns:
    :class:`Sample`.

  Raises:
    vlm.data.image.BadSampleError: with ``.reason`` one of ``malformed``, ``unknown_role``,
      ``no_assistant_turn``, ``placeholder_mismatch``, ``invalid_text``; the message names
      ``where`` and the turn.
  """
  try:
    return _sample_from_record(record, where, image_root, video_root or image_root, kind)
  except _Bad as e:
    raise image_lib.BadSampleError(f"{where}: {e}", e.reason) from None


def _sample_from_record(record, where, image_root, video_root, kind) -> Sample:
  if not isinstance(record, Mapping):
    raise _Bad("malformed", f"a record must be a JSON object, got {type(record).__name__}")
  turns = record.get("conversations", record.get("messages"))
  if not isinstance(turns, (list, tuple)) or not turns:
    raise _Bad("malformed", "the record needs a non-empty 'conversations' (or 'messages') list")
  messages = []
  for t, turn in enumerate(turns):
    if not isinstance(turn, Mapping):
      raise _Bad("malformed", f"turn {t} must be an object with from/value, got {turn!r}")
    role = turn.get("from", turn.get("role"))
    content = turn.get("value", turn.get("content"))
    mapped = _ROLE_ALIASES.get(role) if isinstance(role, str) else None
    if mapped is None:
      raise _Bad("unknown_role", f"turn {t} has role {role!r}; use one of human/gpt/system "
                 "(or user/assistant/system)")
    messages.append({"role": mapped, "content": _check_text(content, f"turn {t} text")})
  if not any(m["role"] == "assistant" for m in messages):
    raise _Bad("no_assistant_turn", "the conversation has no assistant (gpt) turn: nothing to "
               "train on")
  images = _media_list(record.get("image", record.get("images")), image_root, "image", where)
  videos = _media_list(record.get("video", record.get("videos")), video_root, "video", where)
  n_img = sum(m["content"].count(IMAGE_TAG) for m in messages)
  n_vid = sum(m["content"].count(VIDEO_TAG) for m in messages)
  if n_img != len(images) or n_vid != len(videos):
    raise _Bad("placeholder_mismatch",
               f"the text has {n_img} {IMAGE_TAG} and {n_vid} {VIDEO_TAG} tags but the record "
               f"lists {len(images)} image(s) and {len(videos)} video(s); put exactly one tag per "
               "image/video where it belongs in the conversation")
  return Sample(messages=tuple(messages), images=images, videos=videos, kind=kind, where=where)


def _iter_jsonl(path: str) -> Iterable[tuple[int, Any, Problem | None]]:
  """(line number, record, problem) for each non-blank line of a JSONL file (bytes-level so a
  non-UTF-8 line is reported with its byte offset instead of failing the file)."""
  with open(path, "rb") as f:
    raw = f.read()
  offset = len(codecs.BOM_UTF8) if raw.startswith(codecs.BOM_UTF8) else 0
  for lineno, line in enumerate(raw[offset:].split(b"\n"), start=1):
    start = offset
    offset += len(line) + 1
    if not line.strip():
      continue
    where = f"{path}:line {lineno}"
    try:
      text = line.decode("utf-8")
    except UnicodeDecodeError as e:
      at = start + e.start
      yield lineno, None, Problem(where, "invalid_utf8", (
          f"{path} line {lineno} is not UTF-8: byte offset {at} holds "
          f"{raw[at:at + 4]!r} ({e.reason}); re-encode the file as UTF-8 (e.g. iconv -f latin1 "
          "-t utf-8)"))
      continue
    try:
      yield lineno, json.loads(text), None
    except json.JSONDecodeError as e:
      yield lineno, None, Problem(where, "malformed", f"{path} line {lineno} is not JSON: {e}")


def _raise_or_keep(problem: Problem, problems: list[Problem], on_bad_sample: str) -> None:
  if on_bad_sample == "raise":
    raise image_lib.BadSampleError(
        f"bad sample {problem.where}: {problem.detail}. Fix the data or set "
        "data_cfg.on_bad_sample='skip'.", problem.reason)
  problems.append(problem)


def _check_mode(on_bad_sample: str) -> None:
  if on_bad_sample not in ("skip", "raise"):
    raise ValueError(f"on_bad_sample must be 'skip' or 'raise', got {on_bad_sample!r}")


def load_conversations(path: str, *, image_root: str | None = None, video_root: str | None = None,
                       kind: str = "chat", on_bad_sample: str = "skip"
                       ) -> tuple[list[Sample], list[Problem]]:
  """Reads a LLaVA/Qwen conversation file (``.json``: a list of records; ``.jsonl``: one per
  line).

  Args:
    path: the file (relative paths via :func:`vlm.data.paths.resolve_path`).
    image_root, video_root: bases of relative media paths (default: the file's directory).
    kind: ``"chat"`` or ``"caption"`` (see :class:`Sample`).
    on_bad_sample: ``"skip"`` (bad records become :class:`Problem` s) or ``"raise"``.

  Returns:
    ``(samples, problems)`` in file order.

  Raises:
    FileNotFoundError: no such file.
    ValueError: a ``.json`` file that is not UTF-8 (names the file, byte offset and line) or not
      JSON, or whose top level is not a list.
    vlm.data.image.BadSampleError: the first bad record with ``on_bad_sample="raise"``.
  """
  _check_mode(on_bad_sample)
  resolved = resolve_path(path)
  if not os.path.isfile(resolved):
    raise FileNotFoundError(f"conversation file not found: {path!r} (resolved to {resolved!r})")
  base = os.path.dirname(resolved)
  image_root = resolve_path(image_root) if image_root else base
  video_root = resolve_path(video_root) if video_root else image_root
  samples: list[Sample] = []
  problems: list[Problem] = []
  if resolved.endswith(".jsonl"):
    entries = ((f"{resolved}:line {lineno}", rec, problem)
               for lineno, rec, problem in _iter_jsonl(resolved))
  else:
    data = _read_json(resolved)
    if not isinstance(data, list):
      raise ValueError(f"conversation file {resolved} must hold a JSON list of records, got "
                       f"{type(data).__name__} (use .jsonl for one record per line)")
    entries = ((f"{resolved}:record {i}", rec, None) for i, rec in enumerate(data))
  for where, rec, problem in entries:  # in file order, so "raise" names the first bad record
    if problem is not None:
      _raise_or_keep(problem, problems, on_bad_sample)
      continue
    try:
      samples.append(sample_from_record(rec, where, image_root=image_root,
                                        video_root=video_root, kind=kind))
    except image_lib.BadSampleError as e:
      _raise_or_keep(Problem(where, e.reason, str(e)), problems, on_bad_sample)
  return samples, problems


def coco_caption_samples(annotation_json: str, image_dir: str, *, mode: str = "caption",
                         prompt: str = DEFAULT_CAPTION_PROMPT, on_bad_sample: str = "skip"
                         ) -> tuple[list[Sample], list[Problem]]:
  """COCO captions as samples, one per caption.

  Args:
    annotation_json: COCO ``captions_*.json``.
    image_dir: its image directory.
    mode: ``"caption"`` (pre-training row: image then caption, loss on the caption) or ``"chat"``
      (user ``"<image>\\n" + prompt``, assistant = the caption).
    prompt: the user instruction in ``"chat"`` mode.
    on_bad_sample: ``"skip"`` or ``"raise"``.

  Returns:
    ``(samples, problems)``; problems are ``invalid_text`` (lone surrogate) and
    ``empty_caption`` (nothing visible) captions. Image files are checked later
    (:func:`check_sample_files`).

  Raises:
    ValueError: bad ``mode`` or annotation file (as :class:`vlm.data.sources.CocoCaptionsSource`).
    vlm.data.image.BadSampleError: the first bad caption with ``on_bad_sample="raise"``.
  """
  _check_mode(on_bad_sample)
  if mode not in ("caption", "chat"):
    raise ValueError(f"COCO caption mode must be 'caption' or 'chat', got {mode!r}")
  source = CocoCaptionsSource(annotation_json, resolve_path(image_dir))
  samples, problems = [], []
  for i in range(len(source)):
    rec = source[i]
    where = f"{source.annotation_json}:caption_id={rec['caption_id']}"
    caption = " ".join(rec["caption"].split())  # COCO captions carry stray newlines/spaces
    msg = describe_unencodable(rec["caption"], where)
    if msg is not None:
      _raise_or_keep(Problem(where, "invalid_text", msg), problems, on_bad_sample)
      continue
    if not has_visible_text(caption) or any(t in caption for t in _SPECIAL_TEXT):
      reason = "empty_caption" if not has_visible_text(caption) else "placeholder_mismatch"
      _raise_or_keep(Problem(where, reason, f"{where}: unusable caption {rec['caption']!r}"),
                     problems, on_bad_sample)
      continue
    user = IMAGE_TAG if mode == "caption" else f"{IMAGE_TAG}\n{prompt}"
    samples.append(Sample(
        messages=({"role": "user", "content": user}, {"role": "assistant", "content": caption}),
        images=(rec["image_path"],), kind="caption" if mode == "caption" else "chat",
        where=where))
  return samples, problems


def okvqa_samples(questions_json: str, image_dir: str, *, split: str | None = None,
                  prompt: str = DEFAULT_VQA_PROMPT, on_bad_sample: str = "skip"
                  ) -> tuple[list[Sample], list[Problem]]:
  """OK-VQA questions (``{"questions": [{"file_name", "question", "answer", "okvqa_split"}]}``)
  as chat samples: user ``"<image>\\n{question}\\n{prompt}"``, assistant ``answer`` (the top
  human answer; LLaVA-1.5 short-answer VQA prompt by default).

  Args:
    questions_json: the OK-VQA json (e.g. ``data/vqa/okvqa_on_coco_real_captions.json``).
    image_dir: directory with the ``file_name`` images (``data/coco/images``).
    split: keep only ``okvqa_split == split`` (``"train"``/``"val"``), or all (None).
    prompt: appended instruction line ("" for none).
    on_bad_sample: ``"skip"`` or ``"raise"``.

  Returns:
    ``(samples, problems)``.

  Raises:
    ValueError: not UTF-8 (file, byte offset), not JSON, or no ``questions`` list.
    vlm.data.image.BadSampleError: the first bad question with ``on_bad_sample="raise"``.
  """
  _check_mode(on_bad_sample)
  path = resolve_path(questions_json)
  data = _read_json(path)
  if not isinstance(data, Mapping) or not isinstance(data.get("questions"), list):
    raise ValueError(f"{path}: expected an object with a 'questions' list (OK-VQA format)")
  image_dir = resolve_path(image_dir)
  samples, problems = [], []
  for i, q in enumerate(data["questions"]):
    where = f"{path}:question {i}"
    if split is not None and isinstance(q, Mapping) and q.get("okvqa_split") != split:
      continue
    try:
      if not isinstance(q, Mapping) or not isinstance(q.get("file_name"), str):
        raise _Bad("malformed", "a question needs 'file_name', 'question' and 'answer'")
      question = _check_text(q.get("question"), "question").strip()
      answer = _check_text(q.get("answer"), "answer").strip()
      if not has_visible_text(question) or not has_visible_text(answer):
        raise _Bad("empty_caption", "empty question or answer")
    except _Bad as e:
      _raise_or_keep(Problem(where, e.reason, f"{where}: {e}"), problems, on_bad_sample)
      continue
    user = f"{IMAGE_TAG}\n{question}" + (f"\n{prompt}" if prompt else "")
    samples.append(Sample(
        messages=({"role": "user", "content": user}, {"role": "assistant", "content": answer}),
        images=(os.path.join(image_dir, q["file_name"]),), where=where))
  return samples, problems


def _video_problem(path: str) -> tuple[str, str] | None:
  """(reason, message) if ``path`` is not an openable video with a video stream."""
  if os.path.isdir(path) or not os.path.isfile(path):
    return "missing_video", f"video file missing: {path}"
  if os.path.getsize(path) == 0:
    return "empty_video", f"video file is empty (0 bytes): {path}"
  import av  # pylint: disable=import-outside-toplevel
  try:
    with av.open(path) as container:
      if not container.streams.video:
        return "corrupt_video", f"{path} has no video stream"
      next(container.decode(container.streams.video[0]))
  except (av.error.FFmpegError, StopIteration, OSError, ValueError) as e:
    return "corrupt_video", f"could not decode {path} as a video: {type(e).__name__}: {e}"
  return None


def check_sample_files(sample: Sample, decode_images: bool = True,
                       cache: dict[str, tuple[str, str] | None] | None = None
                       ) -> tuple[str, str] | None:
  """``(reason, message)`` for the first unusable image/video file of ``sample``, or None.

  Images go through :func:`vlm.data.image.check_image_file` (full decode when
  ``decode_images``); videos are opened with PyAV and their first frame decoded (a truncated
  tail is still caught when the clip is decoded, see :func:`vlm.data.qwen_processor.load_video`).

  Args:
    sample: the sample.
    decode_images: full image decode (exact) or header + ``verify()`` only.
    cache: optional ``{path: result}`` shared across samples (each file checked once).

  Returns:
    None, or a reason in ``missing_image|empty_image|corrupt_image|missing_video|empty_video|
    corrupt_video`` and a message naming the file and the record.
  """
  cache = {} if cache is None else cache
  for kind, paths in (("image", sample.images), ("video", sample.videos)):
    for p in paths:
      if p not in cache:
        if kind == "image":
          status = image_lib.check_image_file(p, decode=decode_images)
          cache[p] = None if status is None else (f"{status}_image",
                                                  f"image file {status}: {p}")
        else:
          cache[p] = _video_problem(p)
      if cache[p] is not None:
        reason, msg = cache[p]
        return reason, f"{sample.where}: {msg}"
  return None


def load_source(spec: Mapping[str, Any], on_bad_sample: str = "skip"
                ) -> tuple[list[Sample], list[Problem]]:
  """Loads one entry of ``data_cfg.sources`` (see :func:`vlm.data.config.default_qwen_data_config`).

  ``spec["type"]`` selects the reader: ``"conversations"`` (``path``, optional ``image_root``,
  ``video_root``, ``kind``), ``"coco_captions"`` (``annotations``, ``image_dir``, optional
  ``mode`` "caption"/"chat", ``prompt``) or ``"okvqa"`` (``path``, ``image_dir``, optional
  ``split``, ``prompt``). ``spec["repeat"]`` (int >= 1, default 1) lists the samples that many
  times (simple up-weighting of a small source).

  Raises:
    ValueError: unknown type, missing keys, bad repeat; plus what the reader raises.
  """
  spec = dict(spec)
  kind = spec.get("type")
  try:
    if kind == "conversations":
      samples, problems = load_conversations(
          spec["path"], image_root=spec.get("image_root"), video_root=spec.get("video_root"),
          kind=spec.get("kind", "chat"), on_bad_sample=on_bad_sample)
    elif kind == "coco_captions":
      samples, problems = coco_caption_samples(
          spec["annotations"], spec["image_dir"], mode=spec.get("mode", "caption"),
          prompt=spec.get("prompt", DEFAULT_CAPTION_PROMPT), on_bad_sample=on_bad_sample)
    elif kind == "okvqa":
      samples, problems = okvqa_samples(
          spec["path"], spec["image_dir"], split=spec.get("split"),
          prompt=spec.get("prompt", DEFAULT_VQA_PROMPT), on_bad_sample=on_bad_sample)
    else:
      raise ValueError(f"unknown data source type {kind!r} in {spec}; use 'conversations', "
                       "'coco_captions' or 'okvqa'")
  except KeyError as e:
    raise ValueError(f"data source {spec} lacks the key {e.args[0]!r}") from None
  repeat = spec.get("repeat", 1)
  if not isinstance(repeat, int) or isinstance(repeat, bool) or repeat < 1:
    raise ValueError(f"data source repeat must be an int >= 1, got {repeat!r}")
  return samples * repeat, problems


def load_sources(specs: Sequence[Mapping[str, Any]], on_bad_sample: str = "skip"
                 ) -> tuple[list[Sample], list[Problem]]:
  """All sources of a data config, concatenated in config order (see :func:`load_source`)."""
  samples, problems = [], []
  for spec in specs:
    s, p = load_source(spec, on_bad_sample)
    samples += s
    problems += p
  return samples, problems
