"""BLIP-2 text preprocessing: LAVIS caption cleaning and a BERT WordPiece tokenizer.

Host-only (numpy + the Rust ``tokenizers`` library); no torch, no transformers.

* :func:`pre_caption` is LAVIS ``BlipCaptionProcessor.pre_caption`` (``blip_caption``), spec §6.5.
* :class:`Blip2Tokenizer` reproduces ``transformers.BertTokenizer`` for ``bert-base-uncased``
  with ``add_special_tokens({"bos_token": "[DEC]"})`` (spec §2.8): ``[PAD]=0, [UNK]=100,
  [CLS]=101, [SEP]=102, [MASK]=103, [DEC]=30522``; sequences are ``[CLS] tokens [SEP] [PAD]...``
  with HF ``padding="max_length", truncation=True`` semantics.
"""
from __future__ import annotations

import os
import re
import unicodedata
from typing import Sequence

import numpy as np
from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors

from vlm.data.paths import resolve_path

DEFAULT_VOCAB_FILE = "vlm/assets/tokenizers/bert-base-uncased/vocab.txt"

PAD_TOKEN, UNK_TOKEN, CLS_TOKEN, SEP_TOKEN, MASK_TOKEN, DEC_TOKEN = (
    "[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "[DEC]")

_PUNCT_TO_SPACE = re.compile(r"([.!\"()*#:;~])")
_MULTI_WHITESPACE = re.compile(r"\s{2,}")


def pre_caption(text: str, max_words: int = 50, prompt: str = "") -> str:
  """Cleans a caption exactly like LAVIS ``blip_caption`` (``BlipCaptionProcessor``).

  Steps (spec §6.5, LAVIS ``lavis/processors/blip_processors.py``): lower-case; replace each
  character of ``. ! " ( ) * # : ; ~`` by one space; collapse every run of >= 2 whitespace
  characters into a single space; ``rstrip("\\n")``; ``strip(" ")``; keep the first
  ``max_words`` space-separated words; finally prepend ``prompt`` (LAVIS ``prompt``, "" for
  stage 1).

  Args:
    text: raw caption.
    max_words: number of words kept (LAVIS default 50).
    prompt: string prepended after cleaning.

  Returns:
    The cleaned caption (may be "" when the caption held only punctuation/whitespace).

  Raises:
    ValueError: if ``text`` is not a ``str`` or ``max_words`` < 1.
  """
  if not isinstance(text, str):
    raise ValueError(f"pre_caption expects a str caption, got {type(text).__name__}: {text!r}")
  if max_words < 1:
    raise ValueError(f"max_words must be >= 1, got {max_words}")
  caption = _PUNCT_TO_SPACE.sub(" ", text.lower())
  caption = _MULTI_WHITESPACE.sub(" ", caption)
  caption = caption.rstrip("\n")
  caption = caption.strip(" ")
  words = caption.split(" ")
  if len(words) > max_words:
    caption = " ".join(words[:max_words])
  return prompt + caption


def find_unencodable_char(text: str) -> int | None:
  """Index of the first character of ``text`` that cannot be encoded as UTF-8, or None.

  Only lone surrogates (U+D800..U+DFFF) qualify: valid JSON such as ``"\\ud800"`` (an escape
  without its pair) decodes to a Python str holding one, and the Rust tokenizers then fail with
  a TypeError that names no text.

  Args:
    text: a str.

  Returns:
    The character index (not byte offset) of the first lone surrogate, or None.
  """
  try:
    text.encode("utf-8")
  except UnicodeEncodeError as e:
    return e.start
  return None


def describe_unencodable(text: str, where: str) -> str | None:
  """Error message naming ``where``, the position and code point of ``text``'s first lone
  surrogate (see :func:`find_unencodable_char`), or None if ``text`` is valid UTF-8 text."""
  pos = find_unencodable_char(text)
  if pos is None:
    return None
  return (f"{where} contains a lone surrogate U+{ord(text[pos]):04X} at character {pos}, which "
          "cannot be encoded as UTF-8 (a JSON '\\ud8xx' escape without its pair?): "
          f"{text[max(0, pos - 20):pos + 20]!r}. Fix or drop that text.")


def has_visible_text(text: str) -> bool:
  """Whether ``text`` holds at least one visible character.

  Rule: a character is visible iff its ``unicodedata`` general category is a letter, number,
  punctuation or symbol (``L*``, ``N*``, ``P*``, ``S*``) and it is not U+FFFD (the replacement
  character, which ``BertNormalizer`` deletes). Invisible are: controls ``Cc`` (C0/C1, NUL),
  format ``Cf`` (U+200B..U+200F, U+2060, U+FEFF, bidi marks/embeddings/isolates, tag
  characters), surrogates ``Cs``, private use ``Co``, unassigned ``Cn``, separators ``Zs`` /
  ``Zl`` / ``Zp`` (incl. U+00A0, U+3000, U+2028) and marks ``Mn`` / ``Mc`` / ``Me`` (combining
  marks with no base character). This is a superset of what the BERT normalizer strips
  (``clean_text`` drops ``C*`` and U+FFFD, maps whitespace to spaces, ``strip_accents`` drops
  ``Mn``), so a text the tokenizer would turn into bare ``[CLS] [SEP]`` is never "visible"
  (checked over every code point in the tests); it also rejects texts of only unassigned code
  points or combining marks, which would tokenize to ``[UNK]`` only. Categories follow the
  Python ``unicodedata`` version (``unicodedata.unidata_version``).

  Args:
    text: a str (typically the output of :func:`pre_caption`).

  Returns:
    True if some character is visible; False for "", whitespace, or only invisible characters.
  """
  for ch in text:
    if ch != "\ufffd" and unicodedata.category(ch)[0] in "LNPS":
      return True
  return False


def caption_problem(caption: str, max_words: int = 50,
                    where: str = "the caption") -> tuple[str, str] | None:
  """Why a raw caption cannot be trained on / evaluated, or None if it is usable.

  Args:
    caption: raw caption (before :func:`pre_caption`).
    max_words: ``pre_caption`` word limit.
    where: how the message names the caption (e.g. ``"caption_id=7 (image a.jpg)"``).

  Returns:
    None, or ``(reason, message)`` with reason ``"invalid_text"`` (a lone surrogate, see
    :func:`find_unencodable_char`; checked on the raw caption, the message gives the character
    position) or ``"empty_caption"`` (no visible character after ``pre_caption``, see
    :func:`has_visible_text`).

  Raises:
    ValueError: if ``caption`` is not a str.
  """
  if not isinstance(caption, str):
    raise ValueError(f"{where} must be a str, got {type(caption).__name__}: {caption!r}")
  msg = describe_unencodable(caption, where)
  if msg is not None:
    return "invalid_text", msg
  if not has_visible_text(pre_caption(caption, max_words)):
    return "empty_caption", (f"{where} is empty after pre_caption (no visible character: only "
                             "whitespace, control, format or combining characters, or the "
                             f"punctuation . ! \" ( ) * # : ; ~ it removes): {caption!r}")
  return None


def _read_vocab(vocab_file: str) -> dict[str, int]:
  """Reads a BERT ``vocab.txt`` (one token per line, id = line number) like HF ``load_vocab``."""
  vocab: dict[str, int] = {}
  with open(vocab_file, "r", encoding="utf-8") as f:
    for index, line in enumerate(f):
      vocab[line.rstrip("\n")] = index
  return vocab


class Blip2Tokenizer:
  """BERT-base-uncased WordPiece tokenizer with ``[DEC]`` appended as id 30522 (spec §2.8).

  Built with the ``tokenizers`` library: ``BertNormalizer`` (clean text, CJK spacing, strip
  accents, lowercase) -> ``BertPreTokenizer`` -> ``WordPiece`` (``[UNK]``, 100 chars/word) ->
  template ``[CLS] $A [SEP]``. Matches ``transformers.BertTokenizer(vocab_file)`` +
  ``add_special_tokens({"bos_token": "[DEC]"})`` token for token (tested on all COCO captions).

  Picklable (grain workers can carry it).

  Args:
    vocab_file: path to ``vocab.txt``; relative paths are resolved with
      :func:`vlm.data.paths.resolve_path` (cwd, then the repository root).

  Raises:
    FileNotFoundError: if the vocabulary file does not exist.
    ValueError: if a required special token is missing from the vocabulary.
  """

  def __init__(self, vocab_file: str = DEFAULT_VOCAB_FILE):
    path = resolve_path(vocab_file)
    if not os.path.isfile(path):
      raise FileNotFoundError(
          f"BERT vocab file not found: {vocab_file!r} (resolved to {path!r}). Pass the path of "
          "bert-base-uncased vocab.txt (default " + DEFAULT_VOCAB_FILE + ").")
    self.vocab_file = path
    vocab = _read_vocab(path)
    for tok in (PAD_TOKEN, UNK_TOKEN, CLS_TOKEN, SEP_TOKEN, MASK_TOKEN):
      if tok not in vocab:
        raise ValueError(f"vocab file {path!r} lacks the special token {tok}; is it a BERT vocab?")
    tokenizer = Tokenizer(models.WordPiece(vocab, unk_token=UNK_TOKEN,
                                           max_input_chars_per_word=100))
    tokenizer.normalizer = normalizers.BertNormalizer(
        clean_text=True, handle_chinese_chars=True, strip_accents=None, lowercase=True)
    tokenizer.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tokenizer.post_processor = processors.TemplateProcessing(
        single=f"{CLS_TOKEN} $A {SEP_TOKEN}",
        pair=f"{CLS_TOKEN} $A {SEP_TOKEN} $B:1 {SEP_TOKEN}:1",
        special_tokens=[(CLS_TOKEN, vocab[CLS_TOKEN]), (SEP_TOKEN, vocab[SEP_TOKEN])])
    tokenizer.add_special_tokens([PAD_TOKEN, UNK_TOKEN, CLS_TOKEN, SEP_TOKEN, MASK_TOKEN])
    if DEC_TOKEN not in vocab:
      tokenizer.add_special_tokens([DEC_TOKEN])
    self._tokenizer = tokenizer
    self.pad_token_id = vocab[PAD_TOKEN]
    self.unk_token_id = vocab[UNK_TOKEN]
    self.cls_token_id = vocab[CLS_TOKEN]
    self.sep_token_id = vocab[SEP_TOKEN]
    self.mask_token_id = vocab[MASK_TOKEN]
    self.dec_token_id = tokenizer.token_to_id(DEC_TOKEN)

  @property
  def vocab_size(self) -> int:
    """Number of ids including added tokens (30523 for bert-base-uncased + ``[DEC]``)."""
    return self._tokenizer.get_vocab_size(with_added_tokens=True)

  def __repr__(self) -> str:
    return f"Blip2Tokenizer(vocab_file={self.vocab_file!r})"

  def encode_ids(self, text: str) -> list[int]:
    """``[CLS] wordpieces [SEP]`` ids of one text, no truncation or padding.

    Raises:
      ValueError: if ``text`` is not a str or holds a lone surrogate (names the character
        position).
    """
    if not isinstance(text, str):
      raise ValueError(f"text is {type(text).__name__}, expected str: {text!r}")
    msg = describe_unencodable(text, "text")
    if msg is not None:
      raise ValueError(msg)
    return self._tokenizer.encode(text).ids

  def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str:
    """Inverse of tokenisation (WordPiece ``##`` joined), for debugging and captioning."""
    return self._tokenizer.decode([int(i) for i in ids], skip_special_tokens=skip_special_tokens)

  def tokenize(self, texts: Sequence[str] | str, max_length: int) -> tuple[np.ndarray, np.ndarray]:
    """Tokenises to fixed length like HF ``padding="max_length", truncation=True``.

    Long texts keep their first ``max_length - 2`` word pieces, then ``[SEP]``; short ones are
    right-padded with ``[PAD]=0``.

    Args:
      texts: N strings (a single str is treated as N=1).
      max_length: T, total length including ``[CLS]`` and ``[SEP]``; must be >= 2.

    Returns:
      ``(input_ids, attention_mask)``, both int32 [N, T]; mask is 1 on real tokens, 0 on padding.

    Raises:
      ValueError: if ``max_length`` < 2, or an element of ``texts`` is not a str or holds a
        lone surrogate (not UTF-8 encodable); the message names the index ``texts[i]`` and the
        character position.
    """
    if isinstance(texts, str):
      texts = [texts]
    texts = list(texts)
    if max_length < 2:
      raise ValueError(f"max_length must be >= 2 to hold [CLS] and [SEP], got {max_length}")
    for i, t in enumerate(texts):
      if not isinstance(t, str):
        raise ValueError(f"texts[{i}] is {type(t).__name__}, expected str: {t!r}")
      msg = describe_unencodable(t, f"texts[{i}]")
      if msg is not None:
        raise ValueError(msg)
    input_ids = np.zeros((len(texts), max_length), dtype=np.int32)
    attention_mask = np.zeros((len(texts), max_length), dtype=np.int32)
    if not texts:
      return input_ids, attention_mask
    encodings = self._tokenizer.encode_batch(texts)
    for row, enc in enumerate(encodings):
      ids = enc.ids
      if len(ids) > max_length:
        ids = ids[:max_length - 1] + [self.sep_token_id]
      input_ids[row, :len(ids)] = ids
      attention_mask[row, :len(ids)] = 1
    return input_ids, attention_mask

  __call__ = tokenize
