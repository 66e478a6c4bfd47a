"""The Qwen ViTs on the segment-aware attention path (issue 8, scope 7): with several images per
row plus padding, ``attention_implementation="chunked"`` (and ``"splash"`` in Pallas interpret
mode) gives the outputs (merged features and DeepStack features) and the parameter gradients of
the dense-mask ``"xla"`` path; Qwen2.5-VL's windowed blocks use the window segment ids and its
full-attention block the image segment ids (a swapped assignment would change the outputs, which
the test checks too). ``Qwen3VL`` hands its text config's attention choice to the tower."""
import functools

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tests.models import qwen_tiny as T
from vlm.models import qwen3_vl, qwen_vit

jax.config.update("jax_default_matmul_precision", "highest")

# Row 0: three images (the 4x8 one has several Qwen2.5-VL windows) + padding; row 1: a 2-frame
# video grid (two segments) and an image + padding.
ROWS = [np.array([[1, 4, 8], [1, 2, 4], [1, 4, 4]]), np.array([[2, 4, 4], [1, 2, 2]])]
NP = 80
BLOCK = 16


@functools.lru_cache(maxsize=None)
def _setup(kind):
  cfg = T.config(kind).vision
  cls = qwen_vit.Qwen2_5_VLVisionModel if kind == "q25" else qwen_vit.Qwen3VLVisionModel
  rng = np.random.default_rng(1)
  pixels = rng.standard_normal((len(ROWS), NP, cfg.patch_dim)).astype(np.float32)
  tables = [qwen_vit.vision_inputs(cfg, g, NP) for g in ROWS]
  for b, g in enumerate(ROWS):
    assert int(np.prod(g, axis=1).sum()) < NP  # every row has padding patches
    pixels[b, int(np.prod(g, axis=1).sum()):] = 0
  stacked = {k: np.stack([t[k] for t in tables]) for k in tables[0]}
  params = T.spread(jax.jit(cls(cfg).init)(jax.random.PRNGKey(0), pixels, **stacked), 3)
  return cfg, cls, params, pixels, stacked


def _loss(model, pixels, tables):
  """A scalar touching every output (merged and, for Qwen3-VL, every DeepStack feature), with the
  outputs as aux. Divided by the merge-unit count so that parameter gradients are O(1) (as a
  token-mean loss): a plain sum gives gradients up to ~60, where float32 rounding alone differs by
  more than 1e-5 between any two summation orders."""
  weights = jax.random.normal(jax.random.PRNGKey(7), (4, NP // 4, 64))

  def f(params):
    out = model.apply(params, pixels, **tables)
    feats = [out[0], *out[1]] if isinstance(out, tuple) else [out]
    loss = sum(jnp.sum(jnp.sin(x) * weights[i]) for i, x in enumerate(feats)) / (NP // 4)
    return loss, out
  return jax.jit(jax.value_and_grad(f, has_aux=True))


@pytest.mark.parametrize("kind", ["dense", "q25"])
def test_chunked_equals_xla_values_and_gradients(kind):
  cfg, cls, params, pixels, tables = _setup(kind)
  ref_model = cls(cfg)
  chunked = cls(cfg, attention_implementation="chunked", attention_block_size=BLOCK)
  (ref_loss, ref_out), ref_grad = _loss(ref_model, pixels, tables)(params)
  (loss, out), grad = _loss(chunked, pixels, tables)(params)
  chex.assert_trees_all_equal_shapes(out, ref_out)
  chex.assert_tree_all_finite(out)
  chex.assert_trees_all_close(out, ref_out, atol=1e-5, rtol=0)
  merged = out[0] if kind == "dense" else out
  for b, g in enumerate(ROWS):  # padded merge units stay zero
    units = int(np.prod(g, axis=1).sum()) // 4
    assert float(jnp.abs(merged[b, units:]).max()) == 0.0
  np.testing.assert_allclose(loss, ref_loss, atol=1e-5, rtol=0)
  chex.assert_tree_all_finite(grad)
  chex.assert_trees_all_close(grad, ref_grad, atol=1e-5, rtol=0)
  assert max(float(jnp.abs(g).max()) for g in jax.tree_util.tree_leaves(grad)) > 0.1


def test_qwen25_window_and_full_segments_are_distinct():
  """The windowed blocks see windows, the full block whole images: feeding the image segment ids
  as window ids changes the output, so the equality above checks the assignment."""
  cfg, cls, params, pixels, tables = _setup("q25")
  model = cls(cfg, attention_implementation="chunked", attention_block_size=BLOCK)
  out = jax.jit(model.apply)(params, pixels, **tables)
  wrong = dict(tables)
  wrong["window_segment_ids"] = np.stack([
      np.asarray(s).reshape(-1, 4)[np.asarray(w)].reshape(-1)
      for s, w in zip(tables["segment_ids"], tables["window_index"])])
  assert (wrong["window_segment_ids"] != tables["window_segment_ids"]).any()
  out_wrong = jax.jit(model.apply)(params, pixels, **wrong)
  assert float(jnp.abs(out - out_wrong).max()) > 1e-3


def test_splash_interpret_equals_xla():
  cfg, cls, params, pixels, tables = _setup("dense")
  ref = jax.jit(cls(cfg).apply)(params, pixels, **tables)
  out = jax.jit(cls(cfg, attention_implementation="splash").apply)(params, pixels, **tables)
  chex.assert_trees_all_close(out, ref, atol=1e-5, rtol=0)


def test_unknown_implementation_is_refused():
  cfg, cls, params, pixels, tables = _setup("dense")
  with pytest.raises(ValueError, match="attention_implementation must be one of"):
    cls(cfg, attention_implementation="flash").apply(params, pixels, **tables)


def test_qwen3vl_passes_text_attention_choice_to_the_tower():
  for kind in ("dense", "q25"):
    cfg = T.config(kind, attention_implementation="chunked", attention_block_size=32)
    visual = qwen3_vl.Qwen3VL(cfg).bind({}).visual  # setup builds the submodules, no params
    assert isinstance(visual, qwen_vit.Qwen2_5_VLVisionModel if kind == "q25"
                      else qwen_vit.Qwen3VLVisionModel)
    assert (visual.attention_implementation, visual.attention_block_size) == ("chunked", 32)
  assert qwen3_vl.Qwen3VL(T.config("dense")).bind({}).visual.attention_implementation == "xla"
