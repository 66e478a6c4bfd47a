"""LLM text targets of BLIP-2 stage 2: one caption -> fixed-shape OPT or FlanT5 token arrays.

The rules are LAVIS's ``Blip2OPT.forward`` / ``Blip2T5.forward`` (``lavis/models/blip2_models/``)
and the BLIP-2 paper section 3.3 (arXiv:2301.12597), spec section 4:

* OPT (decoder-only, right padding): ``text = prompt + pre_caption(caption) + "\\n"``, tokenised
  with the BOS ``</s>`` first and cut to ``max_text_len`` tokens. The loss covers every real
  token except the prompt's (its tokens incl. the BOS are masked when a prompt is set; without a
  prompt the BOS is a target too: the last query predicts it, as LAVIS).
* FlanT5 (encoder-decoder): with a ``prompt`` the encoder reads the prompt and the decoder
  target is the caption (LAVIS caption fine-tuning). Without one, pre-training uses the paper's
  prefix language modelling: the caption is cut at a word boundary drawn uniformly at random
  (an empty prefix allowed, a non-empty suffix required; the released LAVIS code does not
  contain the split, this reconstruction is documented in the spec) and the prefix goes to the
  encoder, the suffix is the target. Both end with ``</s>``.

Arrays are padded to fixed lengths so the train step compiles once.
"""
from __future__ import annotations

from typing import Any

import numpy as np

from vlm.data.text import pre_caption

KINDS = ("opt", "t5")


class Stage2TextProcessor:
  """Caption (+ rng) -> token arrays of one training row.

  Args:
    kind: ``"opt"`` or ``"t5"``.
    tokenizer: a :class:`vlm.data.llm_tokenizers.LLMTokenizer` of that LLM.
    max_text_len: T, tokens per text array (LAVIS ``max_txt_len`` 32; OPT: incl. the BOS).
    prompt: text before the caption (OPT) or the encoder text (T5); ``""`` for pre-training.
    max_words: ``pre_caption`` word limit.
    prefix_split: T5 without prompt: the random prefix/suffix split (else the whole caption is the
      target and the encoder reads only the queries and ``</s>``).
  Returns (``__call__(caption, rng)``):
    OPT: ``input_ids``, ``attention_mask``, ``loss_mask`` int32 [T]; T5: ``input_ids``,
    ``attention_mask`` [T] (encoder text), ``decoder_input_ids``, ``decoder_attention_mask``,
    ``labels``, ``loss_mask`` int32 [T].
  Raises:
    ValueError: unknown kind, a whitespace-only prompt, a prompt that fills the whole OPT row
      (nothing left to learn: raise ``max_text_len``).
  """

  def __init__(self, kind: str, tokenizer, *, max_text_len: int = 32, prompt: str = "",
               max_words: int = 50, prefix_split: bool = True):
    if kind not in KINDS:
      raise ValueError(f"LLM kind must be one of {KINDS}, got {kind!r}")
    self.kind, self.tokenizer = kind, tokenizer
    self.max_text_len, self.prompt = int(max_text_len), str(prompt)
    self.max_words, self.prefix_split = int(max_words), bool(prefix_split)
    if self.prompt and not self.prompt.strip():
      raise ValueError(f"data.prompt {self.prompt!r} holds only whitespace: give the prompt text "
                       "(e.g. 'a photo of') or '' for none")
    if kind == "opt":
      self.prompt_length = len(tokenizer.encode_ids(self.prompt)) if self.prompt else 0
      if self.prompt_length >= self.max_text_len:
        raise ValueError(f"the prompt {self.prompt!r} takes {self.prompt_length} tokens, not less "
                         f"than max_text_len={self.max_text_len}: raise data.max_text_len or "
                         "shorten data.prompt")

  def example(self) -> dict[str, np.ndarray]:
    """Zeros of the output schema (masks ones)."""
    t = self.max_text_len
    keys = (("input_ids", "attention_mask", "loss_mask") if self.kind == "opt" else
            ("input_ids", "attention_mask", "decoder_input_ids", "decoder_attention_mask",
             "labels", "loss_mask"))
    return {k: (np.ones if "mask" in k else np.zeros)((t,), np.int32) for k in keys}

  def _encode(self, text: str, padding_side: str = "right"):
    ids, mask = self.tokenizer.batch_encode([text], max_length=self.max_text_len,
                                            padding_side=padding_side)
    return np.asarray(ids[0], np.int32), np.asarray(mask[0], np.int32)

  def __call__(self, caption: str, rng: np.random.Generator) -> dict[str, np.ndarray]:
    caption = pre_caption(caption, self.max_words)
    if self.kind == "opt":
      text = (self.prompt + " " + caption if self.prompt else caption) + "\n"
      ids, mask = self._encode(text)
      loss = mask.copy()
      loss[:self.prompt_length] = 0
      return {"input_ids": ids, "attention_mask": mask, "loss_mask": loss}
    if self.prompt:
      source, target = self.prompt, caption
    elif self.prefix_split:
      words = caption.split(" ")
      cut = int(rng.integers(len(words)))  # 0 .. n-1: empty prefix allowed, suffix non-empty
      source, target = " ".join(words[:cut]), " ".join(words[cut:])
    else:
      source, target = "", caption
    ids, mask = self._encode(source)
    labels, dec_mask = self._encode(target)
    start = self.tokenizer.pad_token_id  # T5's decoder_start_token_id is its pad id (0)
    dec_in = np.concatenate([[start], labels[:-1]]).astype(np.int32)
    dec_in = np.where(np.concatenate([[1], dec_mask[:-1]]) > 0, dec_in, self.tokenizer.pad_token_id)
    return {"input_ids": ids, "attention_mask": mask, "decoder_input_ids": dec_in.astype(np.int32),
            "decoder_attention_mask": dec_mask, "labels": labels, "loss_mask": dec_mask.copy()}


def build_text_processor(kind: str, data_cfg: Any) -> Stage2TextProcessor:
  """:class:`Stage2TextProcessor` from a data config (``max_text_len``, ``prompt``,
  ``max_words``, ``prefix_split``) with the bundled tokenizer of ``kind``."""
  from vlm.data.llm_tokenizers import llm_tokenizer
  get = lambda k, d: data_cfg.get(k, d) if hasattr(data_cfg, "get") else getattr(data_cfg, k, d)
  return Stage2TextProcessor(kind, llm_tokenizer(kind), max_text_len=get("max_text_len", 32),
                             prompt=get("prompt", ""), max_words=get("max_words", 50),
                             prefix_split=get("prefix_split", True))
