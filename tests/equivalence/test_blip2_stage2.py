"""BLIP-2 stage 2 (``Blip2Stage2``, ``blip2_stage2_loss``, ``Blip2Generator``) against HF
transformers 4.57.1 ``Blip2ForConditionalGeneration`` with an OPT and a FlanT5-style T5 LLM.

Tiny random float32 models (torch CPU, eval mode, dropout 0); weights go HF ->
``save_pretrained`` (safetensors) -> :func:`vlm.convert.hf_blip2.load_hf_blip2_stage2`. HF writes
the soft prompt into ``NUM_QUERIES`` ``<image>`` placeholders placed first; vlm concatenates it in
front of the text embeddings. Checked: logits at every real position, the ``labels=`` loss and
the gradients of every parameter, greedy and 5-beam generation (different prompt per image, OPT
left padding, an EOS that some rows hit) token for token. Errors are max abs differences.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from tests.equivalence import blip2_stage2_hf_utils as U
from tests.equivalence.blip2_hf_utils import max_abs, nhwc
from vlm.convert.hf_blip2 import hf_state_from_stage2_params, load_hf_blip2_stage2
from vlm.inference.blip2_generate import Blip2Generator
from vlm.models.blip2 import Blip2Stage2
from vlm.models.t5 import shift_right
from vlm.objectives.stage2 import blip2_stage2_loss

TOL = 1e-5
Q = U.NUM_QUERIES
IMG = U.IMAGE_TOKEN
B = 3


@pytest.fixture(scope="module", params=["opt", "t5"])
def setup(request, tmp_path_factory):
  kind = request.param
  hf = U.tiny_hf_stage2(kind, seed=0)
  path = tmp_path_factory.mktemp(f"blip2_stage2_{kind}")
  hf.save_pretrained(path)
  config, params = load_hf_blip2_stage2(str(path))
  params = jax.tree.map(jnp.asarray, params)
  model = Blip2Stage2(config)
  return kind, hf, config, params, model


@pytest.fixture(scope="module")
def varied(setup, tmp_path_factory):
  """The same architecture with larger LLM weights (varied generations), HF and vlm params."""
  kind, _, config, _, _ = setup
  hf = U.tiny_hf_stage2(kind, seed=0, varied=True)
  path = tmp_path_factory.mktemp(f"blip2_stage2_{kind}_varied")
  hf.save_pretrained(path)
  config2, params = load_hf_blip2_stage2(str(path))
  assert config2 == config
  return hf, jax.tree.map(jnp.asarray, params)


def _text(kind, seed=1):
  """Right-padded LLM text [B,T] (OPT: BOS first; T5: EOS last) and its 0/1 mask."""
  rng = np.random.default_rng(seed)
  t, lengths = 8, [8, 5, 3]
  ids = np.full((B, t), U.OPT_PAD if kind == "opt" else U.T5_PAD, np.int64)
  mask = np.zeros((B, t), np.int64)
  for i, n in enumerate(lengths):
    row = rng.integers(3, IMG, n)
    if kind == "opt":
      row[0] = U.OPT_BOS
    else:
      row[-1] = U.T5_EOS
    ids[i, :n], mask[i, :n] = row, 1
  return ids, mask


def _t5_labels(seed=2):
  rng = np.random.default_rng(seed)
  labels = rng.integers(2, IMG, (B, 6)).astype(np.int64)
  labels[0, 5] = U.T5_EOS
  labels[1, 3] = U.T5_EOS
  labels[1, 4:] = -100
  labels[2, 2:] = -100
  return labels


def _hf_inputs(ids, mask):
  b = ids.shape[0]
  return (np.concatenate([np.full((b, Q), IMG, np.int64), ids], 1),
          np.concatenate([np.ones((b, Q), np.int64), mask], 1))


def _batch(kind):
  """The vlm stage-2 batch and the HF forward kwargs of the same loss."""
  pixels = U.images(0, B)
  ids, mask = _text(kind)
  hf_ids, hf_mask = _hf_inputs(ids, mask)
  batch = dict(pixel_values=nhwc(pixels), input_ids=ids, attention_mask=mask)
  hf = dict(pixel_values=torch.from_numpy(pixels), input_ids=torch.from_numpy(hf_ids),
            attention_mask=torch.from_numpy(hf_mask))
  if kind == "opt":
    loss_mask = mask.copy()
    loss_mask[0, :2] = 0  # a prompt (BOS + first word) that is not a target in row 0
    labels = np.where(loss_mask == 1, ids, -100)
    hf["labels"] = torch.from_numpy(np.concatenate([np.full((B, Q), -100), labels], 1))
    batch["loss_mask"] = loss_mask
  else:
    labels = _t5_labels()
    dec_mask = (labels != -100).astype(np.int64)
    dec_in = np.array(shift_right(np.where(labels == -100, U.T5_PAD, labels), U.T5_PAD,
                                    U.T5_PAD))
    batch.update(decoder_input_ids=dec_in, decoder_attention_mask=dec_mask,
                 labels=np.where(labels == -100, U.T5_PAD, labels), loss_mask=dec_mask)
    hf.update(labels=torch.from_numpy(labels), decoder_attention_mask=torch.from_numpy(dec_mask))
  return batch, hf


def test_logits_match_hf(setup):
  kind, hf, config, params, model = setup
  batch, hf_kw = _batch(kind)
  hf_kw = {k: v for k, v in hf_kw.items() if k != "labels"}
  if kind == "t5":
    hf_kw["decoder_input_ids"] = torch.from_numpy(np.array(batch["decoder_input_ids"]))
  with torch.no_grad():
    ref = hf(**hf_kw).logits.numpy()
  ours = np.asarray(jax.jit(model.apply)(
      {"params": params}, batch["pixel_values"], batch["input_ids"], batch["attention_mask"],
      batch.get("decoder_input_ids"), batch.get("decoder_attention_mask")))
  assert ours.shape == ref.shape
  real = hf_kw["attention_mask"].numpy() if kind == "opt" else batch["decoder_attention_mask"]
  err = max_abs(ours[real == 1], ref[real == 1])
  print(f"{kind} logits max err {err:.2e} (|logits| max {np.abs(ref).max():.1f})")
  assert err < TOL


def test_loss_and_gradients_match_hf(setup):
  kind, hf, config, params, model = setup
  batch, hf_kw = _batch(kind)
  hf.zero_grad()
  out = hf(**hf_kw)
  out.loss.backward()
  ref_grads = {n: p.grad.numpy().copy() for n, p in hf.named_parameters() if p.grad is not None}
  hf.zero_grad()

  loss_fn = lambda p, b: blip2_stage2_loss(model, p, b, jax.random.PRNGKey(0),
                                           llm_dropout=False)
  (loss, metrics), grads = jax.jit(jax.value_and_grad(loss_fn, has_aux=True))(params, batch)
  err = abs(float(loss) - out.loss.item())
  print(f"{kind} loss {float(loss):.6f} HF {out.loss.item():.6f} err {err:.2e}")
  assert err < TOL
  assert int(metrics["num_tokens"]) == int((hf_kw["labels"].numpy() != -100).sum())

  ours = hf_state_from_stage2_params(config, grads)
  trainable = ("query_tokens", "qformer.", "language_projection.", "vision_model.post_layernorm.")
  assert any(k.startswith("qformer.") for k in ref_grads)
  errs = {}
  for name, g in ref_grads.items():
    errs[name] = max_abs(ours[name], g)
  worst = max(errs, key=errs.get)
  worst_trainable = max((k for k in errs if k.startswith(trainable)), key=errs.get)
  print(f"{kind} grads: {len(errs)} tensors, max err {errs[worst]:.2e} ({worst}); trainable "
        f"max err {errs[worst_trainable]:.2e} ({worst_trainable})")
  assert all(k in errs for k in ("query_tokens", "language_projection.weight",
                                 "vision_model.post_layernorm.weight"))
  bad = {k: v for k, v in errs.items() if v >= TOL}
  assert not bad, bad


class _IdTokenizer:
  """Prompts written as space-separated ids (the tiny vocabulary has no text): OPT BOS first,
  T5 EOS last."""

  def __init__(self, kind):
    self.kind = kind
    self.pad_token_id = U.OPT_PAD if kind == "opt" else U.T5_PAD
    self.eos_token_id = U.OPT_BOS if kind == "opt" else U.T5_EOS
    self.vocab_size = U.VOCAB

  def encode_ids(self, text, add_special_tokens=True):
    ids = [int(t) for t in text.split()]
    if not add_special_tokens:
      return ids
    return [U.OPT_BOS] + ids if self.kind == "opt" else ids + [U.T5_EOS]


PROMPTS = ["17 5 60 33", "8", ""]


def _hf_prompt_inputs(kind, tok):
  rows = [[IMG] * Q + tok.encode_ids(p) for p in PROMPTS]
  n = max(len(r) for r in rows)
  ids = np.full((B, n), tok.pad_token_id, np.int64)
  mask = np.zeros((B, n), np.int64)
  for i, r in enumerate(rows):
    if kind == "opt":  # left padding: [pad.., img*Q, BOS, prompt]
      ids[i, n - len(r):], mask[i, n - len(r):] = r, 1
    else:
      ids[i, :len(r)], mask[i, :len(r)] = r, 1
  return torch.from_numpy(ids), torch.from_numpy(mask)


def _hf_generate(hf, kind, tok, pixels, **kw):
  ids, mask = _hf_prompt_inputs(kind, tok)
  with torch.no_grad():
    out = hf.generate(pixel_values=torch.from_numpy(pixels), input_ids=ids, attention_mask=mask,
                      do_sample=False, pad_token_id=tok.pad_token_id, **kw).numpy()
  return out[:, ids.shape[1]:] if kind == "opt" else out[:, 1:]


def _compare(ours, ref, eos, pad, hf_fill, label):
  """vlm's rows equal HF's up to and including each row's first EOS; after it vlm has ``pad``
  and HF ``hf_fill``, and vlm's extra columns (HF stops when every row is done) are ``pad``."""
  n = ref.shape[1]
  assert ours.shape[1] >= n, (label, ours.shape, ref.shape)
  for i, (o, r) in enumerate(zip(ours, ref)):
    stop = np.flatnonzero(r == eos)
    end = int(stop[0]) + 1 if stop.size else n
    np.testing.assert_array_equal(o[:end], r[:end], err_msg=f"{label} row {i}")
    assert (r[end:] == hf_fill).all() and (o[end:] == pad).all(), (label, i, o, r)
  return sum(int((r == eos).any()) for r in ref)


def test_generate_matches_hf(setup, varied):
  kind, _, config, _, model = setup
  hf, params = varied
  tok = _IdTokenizer(kind)
  gen = Blip2Generator(model, params, tokenizer=tok)
  pixels = U.images(3, B)
  new = 24
  # An EOS that some rows reach: a token HF's unconstrained greedy run emits mid-way in row 0.
  free = _hf_generate(hf, kind, tok, pixels, max_new_tokens=new, min_new_tokens=new,
                      eos_token_id=IMG)
  assert len({tuple(r) for r in free}) == B and len(set(free[0].tolist())) > 5, free
  eos = int(free[0, 10])
  stopped = 0
  for num_beams, extra in ((1, {}), (5, dict(length_penalty=1.0)),
                           (5, dict(length_penalty=-1.0, early_stopping=True))):
    for min_new in (0, 12):
      kw = dict(num_beams=num_beams, max_new_tokens=new, min_new_tokens=min_new, **extra)
      ref = _hf_generate(hf, kind, tok, pixels, eos_token_id=eos, **kw)
      ours = gen.generate_ids(nhwc(pixels), PROMPTS, eos_token_ids=[eos], **kw)
      label = f"{kind} beams={num_beams} {extra} min_new={min_new}"
      print(label, "\nHF  ", ref.tolist(), "\nvlm ", ours.tolist())
      # HF 4.57.1 beam search fills finished rows with ``pad_token_id or eos_token_id[0]``
      # (utils.py ``_beam_search``): T5's pad id 0 is falsy, so HF repeats the EOS there.
      fill = eos if (num_beams > 1 and tok.pad_token_id == 0) else tok.pad_token_id
      stopped += _compare(ours, ref, eos, tok.pad_token_id, fill, label)
  assert stopped > 0  # the EOS is reached by some rows
