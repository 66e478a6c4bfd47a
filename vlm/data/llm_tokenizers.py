"""Tokenizers of the BLIP-2 stage-2 language models: OPT (byte-level BPE) and T5 / FlanT5.

Host-only (numpy + the Rust ``tokenizers`` library); no torch, no transformers. Spec §4 (BLIP-2
stage 2): LAVIS ``blip2_opt.py`` tokenizes with ``AutoTokenizer.from_pretrained("facebook/opt-*")``
(``GPT2Tokenizer``, ``add_bos_token=True``), LAVIS ``blip2_t5.py`` with ``T5TokenizerFast`` of
``google/flan-t5-*``.

* **OPT** (``transformers/models/gpt2/tokenization_gpt2.py`` with the ``facebook/opt-*`` config):
  GPT-2 byte-level BPE (the GPT-2 regex pre-tokenizer, byte-to-unicode map, ``vocab.bpe`` merges)
  with ids renumbered through fairseq's ``dict.txt``: ``<s>=0, <pad>=1, </s>=2, <unk>=3``, the k-th
  row of ``dict.txt`` (a GPT-2 id) becomes id ``4 + k``; then ``madeupword0000..0002`` (50261..50263)
  and ``<mask>`` (50264), the RoBERTa/BART ``vocab.json`` layout: 50,265 ids. ``encode_ids`` prepends
  ``</s>`` (id 2) as BOS, like HF's OPT tokenizer; HF's OPT ``special_tokens_map`` makes ``</s>``
  the bos, eos and unk token and ``<pad>`` the pad token, so only ``</s>`` and ``<pad>`` are special
  (matched inside text, dropped by ``skip_special_tokens``); ``<s>`` and ``<unk>`` are ordinary
  entries. Decoding does not clean up spaces (HF ``clean_up_tokenization_spaces=False``).
* **T5 / FlanT5** (``transformers/models/t5/tokenization_t5_fast.py``): the HF ``tokenizer.json``
  (SentencePiece unigram, precompiled NFKC-style normalizer, Metaspace) with the 100
  ``<extra_id_N>`` sentinels = 32,100 ids; ``<pad>=0``, ``</s>=1`` appended as EOS, ``<unk>=2``, no
  BOS. Decoding cleans up spaces before punctuation like the checkpoint's
  ``clean_up_tokenization_spaces=True``.

Model embedding tables are larger than these vocabularies (OPT 50,272 rows, FlanT5 32,128): ids
``>= vocab_size`` are padding rows and cannot be decoded (mask them out of the logits when
generating).
"""
from __future__ import annotations

import json
import os
from typing import Iterable, Sequence

import numpy as np
from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers

from vlm.data.paths import resolve_path
from vlm.data.text import describe_unencodable

DEFAULT_OPT_DIR = "vlm/assets/tokenizers/gpt2-opt"
DEFAULT_T5_DIR = "vlm/assets/tokenizers/t5"

OPT_SPECIAL = ("<s>", "<pad>", "</s>", "<unk>")
OPT_NUM_MADEUP = 3  # madeupword0000..0002, as in the RoBERTa/BART/OPT vocab.json
OPT_MASK = "<mask>"


def _clean_up_tokenization(text: str) -> str:
  """Removes the spaces English tokenizers leave before punctuation and contractions (the rule of
  HF ``PreTrainedTokenizerBase.clean_up_tokenization``, ``tokenization_utils_base.py``)."""
  for src, dst in ((" .", "."), (" ?", "?"), (" !", "!"), (" ,", ","), (" ' ", "'"),
                   (" n't", "n't"), (" 'm", "'m"), (" 's", "'s"), (" 've", "'ve"),
                   (" 're", "'re")):
    text = text.replace(src, dst)
  return text


class LLMTokenizer:
  """A language-model tokenizer with HF-identical ids, fixed-length batching and decoding.

  Build it with :func:`opt_tokenizer`, :func:`t5_tokenizer` or :func:`llm_tokenizer`. Picklable
  (grain workers can carry it).

  Attributes:
    name: ``"opt"`` or ``"t5"``.
    vocab_size: number of ids (50265 for OPT, 32100 for T5), HF ``len(tokenizer)``.
    pad_token_id: OPT 1, T5 0.
    eos_token_id: OPT 2, T5 1.
    bos_token_id: OPT 2 (``</s>`` doubles as BOS), T5 None.
    path: the file or directory the vocabulary was read from.
  """

  def __init__(self, name: str, tokenizer: Tokenizer, *, pad_token_id: int, eos_token_id: int,
               bos_token_id: int | None, clean_up_tokenization_spaces: bool, path: str):
    self.name = name
    self._tokenizer = tokenizer
    self.pad_token_id = pad_token_id
    self.eos_token_id = eos_token_id
    self.bos_token_id = bos_token_id
    self.clean_up_tokenization_spaces = clean_up_tokenization_spaces
    self.path = path
    self.vocab_size = tokenizer.get_vocab_size(with_added_tokens=True)

  def __repr__(self) -> str:
    return f"LLMTokenizer(name={self.name!r}, vocab_size={self.vocab_size}, path={self.path!r})"

  # -- encoding --------------------------------------------------------------------------------

  def _specials(self) -> tuple[list[int], list[int]]:
    """(prefix, suffix) special ids that ``add_special_tokens=True`` puts around the text."""
    if self.name == "opt":
      return [self.bos_token_id], []
    return [], [self.eos_token_id]

  def _check_texts(self, texts: Sequence[str]) -> None:
    for i, t in enumerate(texts):
      if not isinstance(t, str):
        raise ValueError(f"texts[{i}] is {type(t).__name__}, expected str: {t!r}")
      msg = describe_unencodable(t, f"texts[{i}]")
      if msg is not None:
        raise ValueError(msg)

  def _text_ids(self, texts: Sequence[str]) -> list[list[int]]:
    """Ids of the texts without special tokens (one batched call into the Rust tokenizer)."""
    if not texts:
      return []
    return [enc.ids for enc in self._tokenizer.encode_batch(list(texts),
                                                           add_special_tokens=False)]

  def encode_ids(self, text: str, add_special_tokens: bool = True) -> list[int]:
    """Ids of one text, no truncation or padding: OPT ``[2] + ids``, T5 ``ids + [1]``.

    Args:
      text: a str.
      add_special_tokens: add the BOS (OPT) / EOS (T5) as HF does; False gives the bare ids.

    Returns:
      A list of ints in ``[0, vocab_size)``.

    Raises:
      ValueError: if ``text`` is not a str or holds a lone surrogate (names the character).
    """
    if not isinstance(text, str):
      raise ValueError(f"text is {type(text).__name__}, expected str: {text!r}")
    msg = describe_unencodable(text, "text")
    if msg is not None:
      raise ValueError(msg)
    ids = self._text_ids([text])[0]
    if not add_special_tokens:
      return ids
    prefix, suffix = self._specials()
    return prefix + ids + suffix

  def batch_encode(self, texts: Sequence[str] | str, *, max_length: int,
                   padding_side: str = "right", add_special_tokens: bool = True,
                   truncation: bool = True) -> tuple[np.ndarray, np.ndarray]:
    """Tokenizes to a fixed length like HF ``padding="max_length", truncation=True``.

    Truncation keeps the special tokens and cuts the text, as HF does: OPT keeps the BOS and the
    first ``max_length - 1`` text ids; T5 keeps the first ``max_length - 1`` text ids and the EOS.

    Args:
      texts: B strings (a single str is treated as B=1).
      max_length: T, the total length including special tokens (>= 1).
      padding_side: ``"right"`` (pad after the tokens; the decoder-input convention) or
        ``"left"`` (pad before them; HF decoder-only generation).
      add_special_tokens: add BOS (OPT) / EOS (T5).
      truncation: cut texts longer than ``max_length``; False raises instead.

    Returns:
      ``(ids, attention_mask)``, both int32 [B, T]; padding positions hold ``pad_token_id`` and
      mask 0, token positions mask 1.

    Raises:
      ValueError: bad ``max_length`` / ``padding_side``; an element that is not a str or holds a
        lone surrogate (names ``texts[i]`` and the character); with ``truncation=False``, a text
        longer than ``max_length`` (names ``texts[i]`` and its length).
    """
    if isinstance(texts, str):
      texts = [texts]
    texts = list(texts)
    if not isinstance(max_length, (int, np.integer)) or max_length < 1:
      raise ValueError(f"max_length must be an int >= 1, got {max_length!r}")
    if padding_side not in ("right", "left"):
      raise ValueError(f"padding_side must be 'right' or 'left', got {padding_side!r}")
    self._check_texts(texts)
    prefix, suffix = self._specials() if add_special_tokens else ([], [])
    room = max_length - len(prefix) - len(suffix)
    ids = np.full((len(texts), max_length), self.pad_token_id, dtype=np.int32)
    mask = np.zeros((len(texts), max_length), dtype=np.int32)
    for row, body in enumerate(self._text_ids(texts)):
      if len(body) > room:
        if not truncation:
          raise ValueError(
              f"texts[{row}] is {len(body) + len(prefix) + len(suffix)} tokens long, more than "
              f"max_length={max_length}; raise max_length or pass truncation=True: "
              f"{texts[row][:60]!r}")
        body = body[:room]
      seq = prefix + body + suffix
      n = len(seq)
      if padding_side == "right":
        ids[row, :n] = seq
        mask[row, :n] = 1
      else:
        ids[row, max_length - n:] = seq
        mask[row, max_length - n:] = 1
    return ids, mask

  __call__ = batch_encode

  # -- decoding --------------------------------------------------------------------------------

  def _check_ids(self, ids: Iterable[int], where: str) -> list[int]:
    if not isinstance(ids, (list, tuple)):
      arr = np.asarray(ids)
      if arr.ndim != 1:
        raise ValueError(f"{where} must be one 1-D id sequence, got shape {arr.shape}; use "
                         "batch_decode for a batch")
      ids = arr.tolist()
    out = []
    for j, i in enumerate(ids):
      if isinstance(i, bool) or not isinstance(i, (int, np.integer)):
        raise ValueError(f"{where}[{j}] = {i!r} is not an integer token id")
      if not 0 <= int(i) < self.vocab_size:
        raise ValueError(
            f"{where}[{j}] = {int(i)} is outside the {self.name} vocabulary [0, {self.vocab_size})"
            "; ids past the vocabulary are padding rows of the embedding table: mask them out "
            "of the logits before sampling")
      out.append(int(i))
    return out

  def decode(self, ids: Sequence[int] | np.ndarray, skip_special_tokens: bool = True,
             *, clean_up_tokenization_spaces: bool | None = None) -> str:
    """Text of one id sequence, like HF ``tokenizer.decode``.

    Args:
      ids: a 1-D sequence / array of ids (padding allowed).
      skip_special_tokens: drop the special tokens (OPT ``</s>``, ``<pad>``; T5 ``<pad>``,
        ``</s>``, ``<unk>``, ``<extra_id_*>``).
      clean_up_tokenization_spaces: override the tokenizer's default (OPT False, T5 True).

    Raises:
      ValueError: an id that is not an integer or lies outside ``[0, vocab_size)``.
    """
    ids = self._check_ids(ids, "ids")
    text = self._tokenizer.decode(ids, skip_special_tokens=skip_special_tokens)
    clean = (self.clean_up_tokenization_spaces if clean_up_tokenization_spaces is None
             else clean_up_tokenization_spaces)
    return _clean_up_tokenization(text) if clean else text

  def batch_decode(self, rows: Sequence[Sequence[int]] | np.ndarray,
                   skip_special_tokens: bool = True) -> list[str]:
    """:meth:`decode` of each row of ``rows`` (a list of id lists or an int array [B, T])."""
    return [self.decode(r, skip_special_tokens=skip_special_tokens) for r in rows]


# -- OPT -----------------------------------------------------------------------------------------


def opt_vocab_from_fairseq(encoder_json: str, dict_txt: str) -> dict[str, int]:
  """The OPT ``vocab.json`` (token -> OPT id) from GPT-2's ``encoder.json`` and fairseq's
  ``dict.txt``.

  ``<s>=0, <pad>=1, </s>=2, <unk>=3``; row k of ``dict.txt`` (``"<gpt2 id> <count>"``) maps the
  GPT-2 token of that id to ``4 + k``; the first ``OPT_NUM_MADEUP`` ``madeupword`` rows follow and
  ``<mask>`` ends the table (50,265 entries for the GPT-2 vocabulary), as in HF ``facebook/opt-*``.

  Raises:
    ValueError: a ``dict.txt`` row that is neither a GPT-2 id of ``encoder.json`` nor a
      ``madeupword``, or a GPT-2 id missing from / repeated in ``dict.txt``.
  """
  with open(encoder_json, encoding="utf-8") as f:
    encoder = json.load(f)
  token_of = {int(i): tok for tok, i in encoder.items()}
  vocab = {tok: i for i, tok in enumerate(OPT_SPECIAL)}
  madeup = 0
  with open(dict_txt, encoding="utf-8") as f:
    for k, line in enumerate(f):
      sym = line.split(" ", 1)[0].strip()
      if sym.isdigit() and int(sym) in token_of:
        tok = token_of[int(sym)]
      elif sym.startswith("madeupword"):
        if madeup == OPT_NUM_MADEUP:
          break
        madeup += 1
        tok = sym
      else:
        raise ValueError(f"{dict_txt}:{k + 1}: {sym!r} is not a GPT-2 id of {encoder_json}")
      if tok in vocab:
        raise ValueError(f"{dict_txt}:{k + 1}: token {tok!r} appears twice")
      vocab[tok] = len(OPT_SPECIAL) + k
  missing = len(token_of) - (len(vocab) - len(OPT_SPECIAL) - madeup)
  if missing:
    raise ValueError(f"{dict_txt} lacks {missing} GPT-2 ids of {encoder_json}")
  vocab[OPT_MASK] = len(vocab)
  return vocab


def _read_merges(path: str) -> list[tuple[str, str]]:
  merges = []
  with open(path, encoding="utf-8") as f:
    for n, line in enumerate(f):
      line = line.rstrip("\n")
      if (n == 0 and line.startswith("#version")) or not line:
        continue
      parts = line.split(" ")
      if len(parts) != 2:
        raise ValueError(f"{path}:{n + 1}: a merge is two space-separated tokens, got {line!r}")
      merges.append((parts[0], parts[1]))
  return merges


def opt_tokenizer(path: str | None = None) -> LLMTokenizer:
  """The OPT tokenizer (HF ``GPT2Tokenizer`` of ``facebook/opt-*``: byte-level BPE, BOS ``</s>``).

  Args:
    path: a directory holding either ``vocab.json`` + ``merges.txt`` in OPT ids (the HF
      ``facebook/opt-*`` layout; default: the bundled ``vlm/assets/tokenizers/gpt2-opt``), or
      GPT-2's ``encoder.json`` + ``vocab.bpe`` with fairseq's ``dict.txt`` (renumbered with
      :func:`opt_vocab_from_fairseq`). Relative paths resolve with
      :func:`vlm.data.paths.resolve_path`.

  Returns:
    An :class:`LLMTokenizer` with ``name="opt"``, ``vocab_size=50265``, pad 1, eos 2, bos 2.

  Raises:
    FileNotFoundError: neither layout is found in ``path``.
    ValueError: the vocabulary lacks ``</s>`` or ``<pad>``, or a file is malformed.
  """
  d = resolve_path(path or DEFAULT_OPT_DIR)
  has = lambda name: os.path.isfile(os.path.join(d, name))  # noqa: E731
  if has("vocab.json") and has("merges.txt"):
    with open(os.path.join(d, "vocab.json"), encoding="utf-8") as f:
      vocab = json.load(f)
    merges = _read_merges(os.path.join(d, "merges.txt"))
  elif has("encoder.json") and has("vocab.bpe") and has("dict.txt"):
    vocab = opt_vocab_from_fairseq(os.path.join(d, "encoder.json"), os.path.join(d, "dict.txt"))
    merges = _read_merges(os.path.join(d, "vocab.bpe"))
  else:
    raise FileNotFoundError(
        f"no OPT tokenizer in {path or DEFAULT_OPT_DIR!r} (resolved to {d!r}): expected "
        "vocab.json + merges.txt (HF facebook/opt-* layout) or encoder.json + vocab.bpe + "
        f"dict.txt (GPT-2 + fairseq); the bundled one is {DEFAULT_OPT_DIR}")
  for tok in ("</s>", "<pad>"):
    if tok not in vocab:
      raise ValueError(f"OPT vocabulary in {d!r} lacks {tok}; is it an OPT/RoBERTa vocab.json?")
  tokenizer = Tokenizer(models.BPE(vocab, merges, fuse_unk=False))
  tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
  tokenizer.decoder = decoders.ByteLevel()
  tokenizer.add_special_tokens([AddedToken("</s>", special=True, normalized=False),
                                AddedToken("<pad>", special=True, normalized=False)])
  return LLMTokenizer("opt", tokenizer, pad_token_id=vocab["<pad>"],
                      eos_token_id=vocab["</s>"], bos_token_id=vocab["</s>"],
                      clean_up_tokenization_spaces=False, path=d)


# -- T5 ------------------------------------------------------------------------------------------


def t5_tokenizer(path: str | None = None) -> LLMTokenizer:
  """The T5 / FlanT5 tokenizer (HF ``T5TokenizerFast``: 32,100 ids, EOS ``</s>`` appended).

  Args:
    path: a ``tokenizer.json`` file or a directory holding one (an HF ``google/flan-t5-*``
      directory works); default: the bundled ``vlm/assets/tokenizers/t5``. Relative paths
      resolve with :func:`vlm.data.paths.resolve_path`.

  Returns:
    An :class:`LLMTokenizer` with ``name="t5"``, pad 0, eos 1, bos None.

  Raises:
    FileNotFoundError: no ``tokenizer.json`` at ``path``.
    ValueError: the file is not a T5 tokenizer (``<pad>``/``</s>`` missing).
  """
  p = resolve_path(path or DEFAULT_T5_DIR)
  if os.path.isdir(p):
    p = os.path.join(p, "tokenizer.json")
  if not os.path.isfile(p):
    raise FileNotFoundError(
        f"no T5 tokenizer.json at {path or DEFAULT_T5_DIR!r} (resolved to {p!r}); pass the HF "
        f"tokenizer.json of t5/flan-t5 or its directory (bundled: {DEFAULT_T5_DIR})")
  try:
    tokenizer = Tokenizer.from_file(p)
  except Exception as e:  # the Rust error names no file
    raise ValueError(f"{p} is not a readable HF tokenizer.json: {e}") from e
  pad, eos = tokenizer.token_to_id("<pad>"), tokenizer.token_to_id("</s>")
  if pad is None or eos is None:
    raise ValueError(f"{p} lacks <pad> or </s>; is it a T5 tokenizer.json?")
  return LLMTokenizer("t5", tokenizer, pad_token_id=pad, eos_token_id=eos, bos_token_id=None,
                      clean_up_tokenization_spaces=True, path=p)


def llm_tokenizer(kind: str) -> LLMTokenizer:
  """The bundled tokenizer of ``kind``: ``"opt"`` (:func:`opt_tokenizer`) or ``"t5"``
  (:func:`t5_tokenizer`, also FlanT5).

  Raises:
    ValueError: any other ``kind``.
  """
  if kind == "opt":
    return opt_tokenizer()
  if kind == "t5":
    return t5_tokenizer()
  raise ValueError(f"unknown LLM tokenizer kind {kind!r}; use 'opt' or 't5' (FlanT5 uses 't5')")
