"""Packed training rows through the Qwen VL models (issue 8, scope items 4 and 5, model side).

A packed row holds three samples (text + image; text + second image + video; text only) with
``segment_ids`` 1..3 and MRoPE positions restarting per segment (``vlm.models.rope_index`` run per
sample). The logits at every segment's tokens must equal those of the sample run alone through
today's (HF-validated) generation layout within 1e-5, for Qwen3-VL dense (DeepStack, scanned and
unscanned), Qwen3-VL-MoE and Qwen2.5-VL tiny random models. The per-row patch buffers [B, Np, F]
must give the logits of the packed [Np, F] form; ``return_hidden`` with chunked
``Qwen3VL.logits`` / ``lm_head_kernel`` must give the logits.
"""
import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tests.models import qwen_tiny as T
from vlm.models import qwen3
from vlm.models.qwen3_vl import Qwen3VL, init_params, visual_token_index
from vlm.models.qwen_vit import vision_inputs
from vlm.nn import rope

TOL = 1e-5
LENGTH, PATCHES = 64, 96


def _model_and_params(kind, scan=False, **text):
  cfg = T.config(kind, **text)
  model = Qwen3VL(cfg, scan_layers=scan)
  params = T.spread(jax.jit(lambda r: init_params(Qwen3VL(cfg), r))(jax.random.PRNGKey(0)), seed=3)
  if scan:
    params = qwen3.stack_layers(params)
  return cfg, model, params


def _alone(cfg, model, params, samples):
  """Logits of each sample run by itself (batch 1, right padded to a common length/bucket so
  the vision samples share one compile; causal attention makes the padding irrelevant)."""
  apply = jax.jit(model.apply)
  n = max(len(s.ids) for s in samples)
  outs = []
  for s in samples:
    ids = np.full((1, n), T.PAD, np.int32)
    ids[0, :len(s.ids)] = s.ids
    mask = np.zeros((1, n), bool)
    mask[0, :len(s.ids)] = True
    pos = T.rope_index(cfg, ids, s.image_grids, s.video_grids, mask)
    args = dict(attention_mask=jnp.asarray(mask))
    if s.grids is not None:
      args.update(pixel_values=jnp.asarray(np.pad(s.pixels, ((0, PATCHES - len(s.pixels)), (0, 0)))),
                  vision_tables=vision_inputs(cfg.vision, s.grids, PATCHES),
                  visual_token_index=jnp.asarray(visual_token_index(
                      ids, T.IMG, T.VID, image_grid_thw=s.image_grids,
                      video_grid_thw=s.video_grids)))
    logits, _ = apply({"params": params}, jnp.asarray(ids), jnp.asarray(pos, jnp.int32), **args)
    outs.append(np.asarray(logits)[0, :len(s.ids)])
  return outs


def _batch(cfg):
  s = T.make_samples(cfg)
  rows = [T.pack_row(cfg, s, LENGTH, PATCHES), T.pack_row(cfg, [s[2], s[0]], LENGTH, PATCHES)]
  return s, rows, T.stack_rows(rows)


def _packed_call(model, params, batch, return_hidden=False, **kw):
  fn = jax.jit(lambda p, b, kw: model.apply({"params": p}, jnp.asarray(b["input_ids"]),
                                            jnp.asarray(b["position_ids"]),
                                            pixel_values=jnp.asarray(b["pixel_values"]),
                                            vision_tables=b["vision"],
                                            visual_token_index=jnp.asarray(b["visual_token_index"]),
                                            segment_ids=jnp.asarray(b["segment_ids"]),
                                            return_hidden=return_hidden, **kw)[0])
  return np.asarray(fn(params, batch, kw))


@pytest.mark.parametrize("kind", ["dense", "moe", "q25"])
def test_packed_rows_equal_samples_alone(kind):
  cfg, model, params = _model_and_params(kind)
  samples, rows, batch = _batch(cfg)
  alone = _alone(cfg, model, params, samples)
  got = _packed_call(model, params, batch)
  chex.assert_shape(got, (2, LENGTH, cfg.text.vocab_size))
  chex.assert_tree_all_finite(got)  # padding attends to padding only: no NaN anywhere
  errs = []
  for b, order in enumerate([(0, 1, 2), (2, 0)]):
    for seg, k in enumerate(order, start=1):
      sel = batch["segment_ids"][b] == seg
      errs.append(float(np.abs(got[b][sel] - alone[k]).max()))
      chex.assert_trees_all_close(got[b][sel], alone[k], atol=TOL, rtol=0)
  print(f"{kind}: packed vs alone max abs err {max(errs):.2e}")
  # the second segment's positions restart (at 0, not after the first segment)
  first2 = int(np.argmax(batch["segment_ids"][0] == 2))
  np.testing.assert_array_equal(batch["position_ids"][:, 0, first2], [0, 0, 0])

  # per-row buffers [B, Np, F] == today's packed [Np_total, F] vision call
  pixels, tables, index = T.packed_form(cfg, rows)
  fn = jax.jit(lambda p: model.apply(
      {"params": p}, jnp.asarray(batch["input_ids"]), jnp.asarray(batch["position_ids"]),
      pixel_values=jnp.asarray(pixels), vision_tables=tables, visual_token_index=jnp.asarray(index),
      segment_ids=jnp.asarray(batch["segment_ids"]))[0])
  chex.assert_trees_all_close(np.asarray(fn(params)), got, atol=TOL, rtol=0)
  if kind == "dense":  # DeepStack under nn.scan (layer picks its entry by index): same logits
    scanned = _packed_call(Qwen3VL(cfg, scan_layers=True), qwen3.stack_layers(params), batch)
    chex.assert_trees_all_close(scanned, got, atol=TOL, rtol=0)


@pytest.mark.parametrize("tied", [False, True], ids=["untied", "tied"])
def test_segment_ids_with_attention_mask_and_hidden_outputs(tied):
  """attention_mask combines with segment_ids; return_hidden + chunked logits (method call and
  lm_head_kernel, tied: the embedding transposed) reproduce the logits."""
  cfg, model, params = _model_and_params("dense", tie_word_embeddings=tied)
  assert ("lm_head" in params) == (not tied)
  _, _, batch = _batch(cfg)

  @jax.jit
  def run(p, b):
    call = lambda **kw: model.apply(
        {"params": p}, b["input_ids"], b["position_ids"], pixel_values=b["pixel_values"],
        vision_tables=b["vision"], visual_token_index=b["visual_token_index"],
        segment_ids=b["segment_ids"], **kw)[0]
    logits = call()
    masked = call(attention_mask=b["segment_ids"] > 0)
    hidden = call(return_hidden=True)
    chunks = jnp.concatenate([model.apply({"params": p}, hidden[:, i:i + 16],
                                          method=Qwen3VL.logits) for i in range(0, LENGTH, 16)], 1)
    kernel = qwen3.lm_head_kernel({"params": p}, cfg.text.tie_word_embeddings)
    return logits, masked, hidden, chunks, kernel

  logits, masked, hidden, chunks, kernel = jax.tree_util.tree_map(np.asarray, run(params, batch))
  real = batch["segment_ids"] > 0
  chex.assert_trees_all_close(masked[real], logits[real], atol=TOL, rtol=0)
  chex.assert_shape(hidden, (2, LENGTH, cfg.text.hidden_size))
  chex.assert_trees_all_close(chunks, logits, atol=TOL, rtol=0)
  chex.assert_shape(kernel, (cfg.text.hidden_size, cfg.text.vocab_size))
  chex.assert_trees_all_close(hidden @ kernel, logits, atol=TOL, rtol=0)
  if tied:
    np.testing.assert_array_equal(kernel, params["language_model"]["embed_tokens"]["embedding"].T)


class TextPackingTest(chex.TestCase):
  """The decoder alone (Qwen3 text, 1-D RoPE): packed == alone, with and without jit."""

  @chex.variants(with_jit=True, without_jit=True)
  def test_packed_text_rows(self):
    cfg = qwen3.Qwen3TextConfig(**T.TEXT)
    lm = qwen3.Qwen3LM(cfg)
    rng = np.random.default_rng(0)
    lens = [5, 9, 3]
    seqs = [rng.integers(1, 200, n) for n in lens]
    ids = np.zeros((1, 20), np.int32)
    seg = np.zeros((1, 20), np.int32)
    pos = np.zeros((1, 20), np.int32)
    t = 0
    for s_id, s in enumerate(seqs, start=1):
      ids[0, t:t + len(s)], seg[0, t:t + len(s)], pos[0, t:t + len(s)] = s, s_id, np.arange(len(s))
      t += len(s)
    params = T.spread(lm.init(jax.random.PRNGKey(0), jnp.asarray(ids),
                              rope.text_rope(jnp.asarray(pos), cfg.head_dim, cfg.rope_theta)), 5)

    @self.variant
    def run(ids, pos, seg):
      angles = rope.text_rope(pos, cfg.head_dim, cfg.rope_theta)
      return lm.apply(params, ids, angles, segment_ids=seg)[0]

    @self.variant
    def alone(ids, pos, mask):
      angles = rope.text_rope(pos, cfg.head_dim, cfg.rope_theta)
      return lm.apply(params, ids, angles, attention_mask=mask)[0]

    got = np.asarray(run(jnp.asarray(ids), jnp.asarray(pos), jnp.asarray(seg)))
    chex.assert_tree_all_finite(got)
    t = 0
    for s in seqs:  # alone: right padded to the row length (causal: padding is irrelevant)
      one = np.zeros_like(ids)
      one[0, :len(s)] = s
      want = alone(jnp.asarray(one), jnp.arange(ids.shape[1])[None], jnp.asarray(one > 0))
      chex.assert_trees_all_close(got[0, t:t + len(s)], np.asarray(want)[0, :len(s)], atol=TOL,
                                  rtol=0)
      t += len(s)
    with self.assertRaisesRegex(ValueError, "segment_ids must be int"):
      lm.apply(params, jnp.asarray(ids), rope.text_rope(jnp.asarray(pos), cfg.head_dim, 1e4),
               segment_ids=jnp.asarray(seg[:, :5]))
