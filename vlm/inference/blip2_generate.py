"""BLIP-2 stage-2 generation: zero-shot captioning and VQA with a frozen OPT or FlanT5.

Host side: prompts are tokenised with the LLM's tokenizer (OPT: BOS first, **left** padding as
LAVIS ``predict_answers``; FlanT5: ``</s>`` last, right padding) and padded to a length bucket;
batch size and output width are bucketed as in :mod:`vlm.inference.generate`, so new requests
within the buckets do not recompile. Device side, one jitted program per bucket: the image
tower, the Q-Former and the projection give the soft prompt ``P`` [B,Q,Dl]; OPT prefills
``concat(P, embed(prompt))`` into its KV cache (positions from the mask, so left padding between
the queries and the BOS shifts nothing, spec 4.2) and FlanT5 encodes it once (the encoder output
lives in the cache so beams reorder it too) and starts its decoder from ``decoder_start_token_id``;
then the shared decoding loops of :mod:`vlm.inference.decoding` run (beam search with HF
``generate`` semantics, greedy, or temperature/top-k/top-p sampling).

LAVIS defaults (spec 4.4): captions by beam search with 5 beams, at most 30 new tokens, at least
8 for COCO evaluation, prompt "a photo of"; VQA answers by beam search, 5 beams, at most 10 new
tokens, length penalty -1 (the paper), prompt "Question: {} Answer:" (OPT) or
"Question: {} Short answer:" (FlanT5). OPT stops at the newline token (``"\\n"`` = 50118, the
end of every training caption), FlanT5 at ``</s>``.
"""
from __future__ import annotations

import logging
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from vlm.inference import decoding
from vlm.inference.generate import NEW_TOKEN_BUCKET, batch_bucket

log = logging.getLogger("vlm.inference")

PROMPT_BUCKET = 16
MAX_PROMPT_TOKENS = 256


def tokenizer_of(kind: str):
  """The bundled :class:`vlm.data.llm_tokenizers.LLMTokenizer` of ``"opt"`` or ``"t5"``."""
  from vlm.data.llm_tokenizers import llm_tokenizer
  return llm_tokenizer(kind)


def default_eos(kind: str, tokenizer) -> list[int]:
  """Stop ids: OPT the newline token (LAVIS ``eos_token_id`` = 50118), FlanT5 ``</s>``."""
  if kind == "opt":
    return [tokenizer.encode_ids("\n", add_special_tokens=False)[0]]
  return [tokenizer.eos_token_id]


def check_prompt(tokenizer, prompt: str, name: str = "prompt", *, allow_empty: bool = False,
                 max_tokens: int = MAX_PROMPT_TOKENS) -> list[int]:
  """The token ids of ``prompt`` (with the tokenizer's special tokens), after checking it.

  Raises:
    ValueError: a non-string, an empty or whitespace-only prompt (unless ``allow_empty``; the
      message names ``name``), text the tokenizer cannot encode, or more than ``max_tokens``
      tokens (the message gives the count and the limit).
  """
  if not isinstance(prompt, str):
    raise ValueError(f"{name} must be a string, got {type(prompt).__name__}: {prompt!r}")
  if not prompt.strip() and (prompt or not allow_empty):  # "" may mean "no prompt"; "  " never
    raise ValueError(f"{name} is empty: give the text the model should continue (e.g. 'a photo "
                     "of' for captions, 'Question: what is this? Answer:' for VQA)")
  ids = tokenizer.encode_ids(prompt)
  if len(ids) > max_tokens:
    raise ValueError(f"{name} has {len(ids)} tokens, more than the {max_tokens} allowed; shorten "
                     f"it: {prompt[:80]!r}...")
  return ids


def load_images(paths: Sequence[str], image_size: int):
  """Eval-preprocessed photos (``blip_image_eval``: bicubic S x S, CLIP normalisation).

  A photo that cannot be read is a counted skip, never a crash in the middle of a batch.

  Returns:
    ``(pixels float32 [n_ok, S, S, 3], ok: list of indices into paths, errors: list of
    (path, message))``.
  """
  from vlm.data import image as image_lib
  pixels, ok, errors = [], [], []
  for i, p in enumerate(paths):
    try:
      pixels.append(image_lib.preprocess_eval(image_lib.load_rgb(p), image_size))
      ok.append(i)
    except (image_lib.BadSampleError, OSError, ValueError) as e:
      errors.append((str(p), str(e).splitlines()[0]))
  s = int(image_size)
  arr = np.stack(pixels) if pixels else np.zeros((0, s, s, 3), np.float32)
  return arr, ok, errors


class Blip2Generator:
  """Jitted generation of a :class:`vlm.models.blip2.Blip2Stage2` (OPT or FlanT5).

  Args:
    model: the stage-2 model; params: its ``"params"`` (or ``{"params": ...}``).
    tokenizer: its LLM tokenizer (default: the bundled one of the model's LLM kind).
  """

  def __init__(self, model, params, tokenizer=None):
    if isinstance(params, dict) and set(params) == {"params"}:
      params = params["params"]
    self.model, self.params = model, params
    self.kind = model.config.llm_kind
    self.tokenizer = tokenizer or tokenizer_of(self.kind)
    self._fns: dict = {}

  # -- host side --------------------------------------------------------------------------------

  def encode_prompts(self, prompts: Sequence[str], *, prompt_bucket: int = PROMPT_BUCKET,
                     allow_empty: bool = True):
    """Token ids and masks of the prompts, padded to a multiple of ``prompt_bucket``.

    OPT: ``</s>`` + prompt, left padding; an empty prompt is the BOS alone (LAVIS' captioning
    without prompt). FlanT5: prompt + ``</s>``, right padding.
    Returns ``(ids int32 [B, Lp], mask int32 [B, Lp])``. Raises ValueError for bad prompts.
    """
    rows = [check_prompt(self.tokenizer, p, f"prompt {i}", allow_empty=allow_empty)
            for i, p in enumerate(prompts)]
    lp = max(prompt_bucket, -(-max(len(r) for r in rows) // prompt_bucket) * prompt_bucket)
    pad = self.tokenizer.pad_token_id
    ids = np.full((len(rows), lp), pad, np.int32)
    mask = np.zeros((len(rows), lp), np.int32)
    for i, r in enumerate(rows):
      if self.kind == "opt":
        ids[i, lp - len(r):], mask[i, lp - len(r):] = r, 1
      else:
        ids[i, :len(r)], mask[i, :len(r)] = r, 1
    return ids, mask

  # -- device side ------------------------------------------------------------------------------

  def _compiled(self, num_beams: int, temperature: float, top_p: float, top_k: int,
                length_penalty: float, early_stopping):
    key = (num_beams, temperature, top_p, top_k, length_penalty, early_stopping)
    if key in self._fns:
      return self._fns[key]
    model, kind = self.model, self.kind
    llm = model.config.llm
    pad = int(self.tokenizer.pad_token_id)

    def prefix(m, pixels, ids, mask):
      prompt = m.query_embeds(m.encode_image(pixels))
      return m.prefix_inputs(prompt, ids, mask)

    def opt_prefill(m, x, mask, cache):
      h, cache = m.language_model(x, mask, kv_cache=cache, cache_index=0, return_hidden=True)
      return m.lm_logits(h[:, -1]), cache

    def opt_step(m, tok, cache, index):
      e = m.embed_text(tok[:, None])
      h, cache = m.language_model(e, jnp.ones((tok.shape[0], 1), bool), kv_cache=cache,
                                  cache_index=index, return_hidden=True)
      return m.lm_logits(h[:, -1]), cache

    def t5_start(m, x, mask, dec_cache):
      enc = m.language_model.encode(x, mask)
      start = jnp.full((x.shape[0], 1), llm.decoder_start_token_id, jnp.int32)
      h, dec_cache = m.language_model.decode(start, enc, mask, kv_cache=dec_cache, cache_index=0,
                                             return_hidden=True)
      return m.lm_logits(h[:, -1]), {"dec": dec_cache, "enc": enc, "enc_mask": mask}

    def t5_step(m, tok, cache, index):
      h, dec = m.language_model.decode(tok[:, None], cache["enc"], cache["enc_mask"],
                                       kv_cache=cache["dec"], cache_index=index,
                                       return_hidden=True)
      return m.lm_logits(h[:, -1]), dict(cache, dec=dec)

    def run(params, pixels, ids, mask, width, max_new, min_new, eos, rng, done):
      v = {"params": params}
      x, full_mask = model.apply(v, pixels, ids, mask, method=prefix)
      b = x.shape[0]
      if kind == "opt":
        from vlm.models.opt import init_cache
        cache = init_cache(llm, b, x.shape[1] + width, model.dtype)
        first, cache = model.apply(v, x, full_mask, cache, method=opt_prefill)
        step_fn, start = opt_step, x.shape[1]
        axes = {"k": 1, "v": 1, "mask": 0}
      else:
        from vlm.models.t5 import init_cache
        cache = init_cache(llm, b, width + 1, model.dtype)
        first, cache = model.apply(v, x, full_mask, cache, method=t5_start)
        step_fn, start = t5_step, 1
        axes = {"dec": {"k": 1, "v": 1, "mask": 0}, "enc": 0, "enc_mask": 0}
      step = lambda p, tok, c, i: model.apply({"params": p}, tok, c, i, method=step_fn)
      start = jnp.asarray(start, jnp.int32)
      if num_beams > 1:
        tokens, _ = decoding.beam_search(
            step, params, first, cache, axes, start_index=start, width=width,
            num_beams=num_beams, max_new_tokens=max_new, eos=eos, pad_token_id=pad,
            length_penalty=length_penalty, early_stopping=early_stopping,
            min_new_tokens=min_new, done=done)
      else:
        tokens, _ = decoding.sample_loop(
            step, params, first, cache, start_index=start, width=width, max_new_tokens=max_new,
            eos=eos, pad_token_id=pad, temperature=temperature, top_p=top_p, top_k=top_k,
            min_new_tokens=min_new, rng=rng, done=done)
      return tokens

    fn = jax.jit(run, static_argnums=(4,))
    self._fns[key] = fn
    return fn

  def generate_ids(self, pixel_values, prompts: Sequence[str] | str | None = None, *,
                   num_beams: int = 5, max_new_tokens: int = 30, min_new_tokens: int = 0,
                   length_penalty: float = 1.0, early_stopping: bool | str = False,
                   temperature: float = 0.0, top_p: float = 1.0, top_k: int = 0,
                   eos_token_ids: Sequence[int] | None = None, rng=None,
                   prompt_bucket: int = PROMPT_BUCKET) -> np.ndarray:
    """New token ids after each image's prompt.

    Args:
      pixel_values: float [B,S,S,3] (eval-preprocessed, :func:`load_images`).
      prompts: one string per image, one string for all, or None (empty: captioning without a
        prompt).
      num_beams: > 1 beam search (deterministic, HF semantics); 1 greedy or sampling.
      max_new_tokens / min_new_tokens: bounds on the generated length (EOS masked before the min).
      length_penalty, early_stopping: beam search, as HF ``generate``.
      temperature / top_p / top_k: sampling when ``temperature > 0`` (``num_beams == 1``; needs
        ``rng``), e.g. CapFilt's nucleus sampling (top_p 0.9).
      eos_token_ids: stop ids (default :func:`default_eos`).
    Returns:
      int64 [B, max_new_tokens]; after a row's stop token: the pad id. (HF 4.57.1 beam search
      fills there with ``pad_token_id or eos_token_id``, so with T5's pad id 0 it repeats the
      EOS instead; the tokens up to each row's first stop token are the same, as checked in
      tests/equivalence/test_blip2_stage2.py.)
    Raises:
      ValueError: bad settings or prompts (empty, too long, not text), shapes.
    """
    pixels = np.asarray(pixel_values, np.float32)
    if pixels.ndim != 4 or pixels.shape[0] == 0:
      raise ValueError(f"pixel_values must be [B,S,S,3] with B >= 1, got {pixels.shape}")
    b = pixels.shape[0]
    if prompts is None or isinstance(prompts, str):
      prompts = [prompts or ""] * b
    prompts = list(prompts)
    if len(prompts) != b:
      raise ValueError(f"{len(prompts)} prompts for {b} images; give one per image (or one string)")
    if not isinstance(max_new_tokens, (int, np.integer)) or max_new_tokens < 1:
      raise ValueError(f"max_new_tokens must be an int >= 1, got {max_new_tokens!r}")
    if not 0 <= min_new_tokens <= max_new_tokens:
      raise ValueError(f"min_new_tokens must be in [0, max_new_tokens={max_new_tokens}], got "
                       f"{min_new_tokens}")
    if not isinstance(num_beams, (int, np.integer)) or num_beams < 1:
      raise ValueError(f"num_beams must be an int >= 1, got {num_beams!r}")
    if num_beams > 1 and temperature > 0:
      raise ValueError("beam search is deterministic: use num_beams=1 to sample (temperature > 0)")
    if not (np.isfinite(temperature) and temperature >= 0):
      raise ValueError(f"temperature must be finite and >= 0, got {temperature}")
    if not 0.0 < top_p <= 1.0:
      raise ValueError(f"top_p must be in (0, 1], got {top_p}")
    if temperature > 0 and rng is None:
      raise ValueError("sampling (temperature > 0) needs rng=jax.random.PRNGKey(seed)")
    eos = list(eos_token_ids) if eos_token_ids is not None else default_eos(self.kind,
                                                                            self.tokenizer)
    vocab = self.model.config.llm.vocab_size
    if not eos or any((not isinstance(e, (int, np.integer))) or not 0 <= e < vocab for e in eos):
      raise ValueError(f"eos_token_ids must be token ids in [0, {vocab}), got {eos!r}")
    eos = np.asarray(eos + [-1] * (-len(eos) % 8), np.int32)
    ids, mask = self.encode_prompts(prompts, prompt_bucket=prompt_bucket)
    if self.kind == "opt":  # learned positions: the whole sequence must fit the table
      need = self.model.config.num_query_tokens + int(mask.sum(1).max()) + int(max_new_tokens)
      limit = self.model.config.llm.max_position_embeddings
      if need > limit:
        raise ValueError(f"{self.model.config.num_query_tokens} queries + the longest prompt "
                         f"({int(mask.sum(1).max())} tokens) + max_new_tokens={max_new_tokens} = "
                         f"{need} positions, more than the OPT's max_position_embeddings={limit}; "
                         "shorten the prompt or lower max_new_tokens")
    bb = batch_bucket(b)
    rows = np.concatenate([np.arange(b), np.zeros(bb - b, np.int64)])
    width = max(NEW_TOKEN_BUCKET, -(-max_new_tokens // NEW_TOKEN_BUCKET) * NEW_TOKEN_BUCKET)
    fn = self._compiled(int(num_beams), float(temperature), float(top_p), int(top_k),
                        float(length_penalty), early_stopping)
    rng = jax.random.PRNGKey(0) if rng is None else rng
    out = fn(self.params, jnp.asarray(pixels[rows]), jnp.asarray(ids[rows]),
             jnp.asarray(mask[rows]), width, jnp.asarray(max_new_tokens, jnp.int32),
             jnp.asarray(min_new_tokens, jnp.int32), jnp.asarray(eos), rng,
             jnp.asarray(np.arange(bb) >= b))
    return np.asarray(out)[:b, :max_new_tokens].astype(np.int64)

  def decode(self, tokens, eos_token_ids: Sequence[int] | None = None) -> list[str]:
    """Text of generated rows: cut at the first stop token, special tokens dropped, stripped."""
    eos = set(eos_token_ids if eos_token_ids is not None else default_eos(self.kind,
                                                                          self.tokenizer))
    out = []
    for row in np.asarray(tokens):
      kept = []
      for t in row.tolist():
        if t in eos:
          break
        if t < self.tokenizer.vocab_size:  # the embedding's padding rows have no text
          kept.append(t)
      out.append(self.tokenizer.decode(kept, skip_special_tokens=True).strip())
    return out

  def generate(self, pixel_values, prompts=None, **kwargs) -> list[str]:
    """:meth:`generate_ids` then :meth:`decode`."""
    return self.decode(self.generate_ids(pixel_values, prompts, **kwargs),
                       kwargs.get("eos_token_ids"))


# -------------------------------------------------------------------------------------------------
# Evaluators (vlm.tasks.blip2_stage2 and scripts/evaluate.py)
# -------------------------------------------------------------------------------------------------

def evaluate_captioning(model, params, config, *, writer=None, step: int = 0) -> dict[str, Any]:
  """Zero-shot captions of the held-out photos, scored with CIDEr / BLEU-4 beside the baseline
  (:func:`vlm.inference.captioning.evaluate_held_out_captions`)."""
  from vlm.inference import captioning
  ev = config.eval
  gen = Blip2Generator(model, params)
  size = int(config.data.image_size)

  def caption_batch(paths):
    pixels, ok, errors = load_images(paths, size)
    if errors:  # validated before training; a file changed since then
      raise ValueError(f"held-out photos cannot be read: {errors}")
    return gen.generate(pixels, ev.caption_prompt, num_beams=int(ev.num_beams),
                        max_new_tokens=int(ev.caption_max_new_tokens),
                        min_new_tokens=int(ev.caption_min_new_tokens),
                        length_penalty=float(ev.caption_length_penalty))

  r = captioning.evaluate_held_out_captions(
      caption_batch, config.data, split=ev.caption_split, max_images=int(ev.get("max_images", 0)),
      batch_size=int(ev.batch_size), tokenizer=ev.get("caption_tokenizer", "ptb"),
      label=f"beam {int(ev.num_beams)}, prompt {ev.caption_prompt!r}")
  if writer is not None:
    writer.write(step, {"CIDEr": r["scores"]["CIDEr"], "BLEU-4": r["scores"]["BLEU-4"]},
                 prefix="eval")
  return r


def evaluate_vqa(model, params, config, *, writer=None, step: int = 0) -> dict[str, Any]:
  """Zero-shot VQA on ``config.eval.vqa_file``: beam-search answers to ``vqa_prompt`` scored by
  VQA soft accuracy beside the most-frequent-answer baseline (:mod:`vlm.inference.vqa`)."""
  import time
  from vlm.inference import vqa
  ev = config.eval
  data = vqa.load_vqa(ev.vqa_file, ev.vqa_image_dir)
  max_q = int(ev.get("max_images", 0)) or None
  data = data[:max_q]
  gen = Blip2Generator(model, params)
  size, bs = int(config.data.image_size), int(ev.batch_size)
  predictions, skipped = {}, []
  t0 = time.perf_counter()
  for start in range(0, len(data), bs):
    chunk = data[start:start + bs]
    pixels, ok, errors = load_images([q["image"] for q in chunk], size)
    skipped += errors
    if not ok:
      continue
    prompts = [ev.vqa_prompt.format(chunk[i]["question"]) for i in ok]
    answers = gen.generate(pixels, prompts, num_beams=int(ev.num_beams),
                           max_new_tokens=int(ev.vqa_max_new_tokens),
                           min_new_tokens=int(ev.vqa_min_new_tokens),
                           length_penalty=float(ev.vqa_length_penalty))
    for i, a in zip(ok, answers):
      predictions[chunk[i]["question_id"]] = vqa.postprocess_answer(a)
  scored = [q for q in data if q["question_id"] in predictions]
  model_scores = vqa.vqa_soft_accuracy(predictions, scored)
  baseline = vqa.most_frequent_answer_baseline(scored)
  seconds = time.perf_counter() - t0
  print(f"zero-shot VQA on {len(scored)} OK-VQA questions (prompt {ev.vqa_prompt!r}, beam "
        f"{int(ev.num_beams)}, {seconds:.0f}s; {len(skipped)} skipped: unreadable photos):")
  print(vqa.format_vqa_scores(model_scores, baseline))
  examples = [{"question": q["question"], "prediction": predictions[q["question_id"]],
               "answer": q.get("answer")} for q in scored[:3]]
  for e in examples:
    print(f"  {e['question']!r} -> {e['prediction']!r} (top human answer: {e['answer']!r})")
  if writer is not None:
    writer.write(step, {"vqa_accuracy": model_scores["accuracy"]}, prefix="eval")
  return {"scores": model_scores, "baseline": baseline, "num_questions": len(scored),
          "skipped": [list(e) for e in skipped], "seconds": seconds, "examples": examples}
