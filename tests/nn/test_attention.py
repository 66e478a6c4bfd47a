"""vlm.nn.attention.attention: chunked and splash equal the dense xla path (values and gradients),
chunked's backward memory grows linearly in the length, and the implementation choice and its
errors (cudnn off GPU, unknown names) are as documented."""
import functools

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from absl.testing import parameterized

from vlm.nn import attention as A


def _inputs(b, lq, lk, hq, hkv, d, seed=0):
  r = np.random.RandomState(seed)
  f = lambda *s: jnp.asarray(r.randn(*s), jnp.float32)
  return f(b, lq, hq, d), f(b, lk, hkv, d), f(b, lk, hkv, d), f(b, lq, hq, d)


def _segments(lengths_per_row, total):
  """int32 [B, total]: row r holds segments 1..S of the given lengths, then padding 0."""
  out = np.zeros((len(lengths_per_row), total), np.int32)
  for r, lengths in enumerate(lengths_per_row):
    pos = 0
    for s, n in enumerate(lengths, 1):
      out[r, pos:pos + n] = s
      pos += n
    assert pos <= total
  return jnp.asarray(out)


def _value_and_grads(fn, q, k, v, w):
  """Output and d(sum(out * w))/d(q, k, v)."""
  out, vjp = jax.vjp(fn, q, k, v)
  return out, vjp(w)


# (name, B, Lq, Lk, Hq, Hkv, D, causal, segment lengths per row or None, block_size)
VARIANT_CASES = (
    # Packed LLM rows: 3 segments + padding, and 2 segments filling the row; L=75 is not a
    # multiple of the block.
    ("causal_packed", 2, 75, 75, 2, 2, 16, True, [[20, 30, 17], [40, 35]], 16),
    # The ViT case: several images in one row, bidirectional inside each image.
    ("vit_images", 2, 64, 64, 2, 2, 16, False, [[16, 24, 8], [64]], 16),
)
JIT_CASES = (
    # Grouped-query attention (4 query heads per kv head), packed and causal.
    ("gqa", 1, 48, 48, 8, 2, 8, True, [[10, 30]], 16),
    # No segment ids, length not a multiple of the block.
    ("causal_plain", 1, 37, 37, 2, 1, 8, True, None, 8),
    # Fewer queries than keys, causal aligned at the end (new tokens after a prefix).
    ("causal_suffix", 1, 24, 40, 2, 2, 8, True, None, 16),
)


def _check_chunked_matches_xla(variant, b, lq, lk, hq, hkv, d, causal, seg_lengths, block):
  q, k, v, w = _inputs(b, lq, lk, hq, hkv, d)
  seg = None if seg_lengths is None else _segments(seg_lengths, lq)

  def make(impl):
    return functools.partial(
        lambda q, k, v, impl: A.attention(q, k, v, segment_ids=seg, causal=causal,
                                          implementation=impl, block_size=block), impl=impl)

  ref_out, ref_grads = _value_and_grads(make("xla"), q, k, v, w)
  out, grads = variant(functools.partial(_value_and_grads, make("chunked")))(q, k, v, w)
  chex.assert_shape(out, (b, lq, hq, d))
  chex.assert_tree_all_finite((out, grads))
  chex.assert_trees_all_close(out, ref_out, atol=1e-5, rtol=0)
  chex.assert_trees_all_close(grads, ref_grads, atol=1e-5, rtol=0)


class ChunkedMatchesXlaTest(chex.TestCase):

  @chex.variants(with_jit=True, without_jit=True)
  @parameterized.named_parameters(*[(c[0],) + c[1:] for c in VARIANT_CASES])
  def test_values_and_gradients(self, *case):
    _check_chunked_matches_xla(self.variant, *case)

  @parameterized.named_parameters(*[(c[0],) + c[1:] for c in JIT_CASES])
  def test_values_and_gradients_jit(self, *case):
    _check_chunked_matches_xla(jax.jit, *case)

  def test_rows_without_keys_are_zero(self):
    # Cross-segment attention where some query ids never occur among the keys, and causal with
    # more queries than keys (the first rows see nothing): 0 output, 0 gradient, as xla.
    q, k, v, w = _inputs(1, 32, 32, 2, 2, 8, seed=1)
    qs = _segments([[10, 12, 10]], 32)  # ids 1, 2, 3
    ks = _segments([[20, 12]], 32)  # ids 1, 2 and padding: query id 3 has no key
    for causal, (ql, kl) in ((False, (32, 32)), (True, (32, 20))):
      args = (q[:, :ql], k[:, :kl], v[:, :kl])
      kw = dict(segment_ids=qs[:, :ql], kv_segment_ids=ks[:, :kl], causal=causal, block_size=8)
      run = lambda impl: jax.jit(functools.partial(_value_and_grads, lambda q, k, v: A.attention(
          q, k, v, implementation=impl, **kw)))(*args, w[:, :ql])
      (ref_out, ref_grads), (out, grads) = run("xla"), run("chunked")
      np.testing.assert_array_equal(np.asarray(ref_out[0, 22:]), 0.0)
      chex.assert_trees_all_close((out, grads), (ref_out, ref_grads), atol=1e-5, rtol=0)

  def test_bfloat16_close_to_float32(self):
    q, k, v, w = _inputs(1, 64, 64, 2, 2, 16, seed=2)
    seg = _segments([[30, 30]], 64)
    f32 = A.attention(q, k, v, segment_ids=seg, causal=True, implementation="xla")
    bf = jax.jit(lambda q, k, v: A.attention(q, k, v, segment_ids=seg, causal=True,
                                             implementation="chunked", block_size=16))(
        q.astype(jnp.bfloat16), k.astype(jnp.bfloat16), v.astype(jnp.bfloat16))
    self.assertEqual(bf.dtype, jnp.bfloat16)
    chex.assert_trees_all_close(bf.astype(jnp.float32), f32, atol=5e-2, rtol=0)

  def test_xla_matches_legacy_masks(self):
    # attention(xla) with padding-as-segment-0 equals dot_product_attention with the old masks
    # on the real rows (the padding rows differ by design: they attend to padding).
    q, k, v, _ = _inputs(2, 20, 20, 2, 2, 8, seed=3)
    valid = jnp.asarray(np.arange(20)[None] < np.array([[20], [13]]))
    legacy = A.dot_product_attention(
        q, k, v, mask=A.causal_mask(20) & A.padding_mask(valid))
    new = A.attention(q, k, v, segment_ids=valid.astype(jnp.int32), causal=True)
    chex.assert_trees_all_close(jnp.where(valid[..., None, None], new, 0.0),
                                jnp.where(valid[..., None, None], legacy, 0.0), atol=1e-6)


class SplashInterpretTest(chex.TestCase):
  """The Pallas TPU splash kernel in interpret mode on CPU (slow: a few small shapes only)."""

  def test_causal_packed_gqa_ragged(self):
    # L=200 pads to the 128-blocks of the kernel (256); 2 query heads share 1 kv head.
    q, k, v, w = _inputs(1, 200, 200, 2, 1, 64, seed=4)
    seg = _segments([[70, 90, 25]], 200)
    run = lambda impl: (lambda q, k, v: A.attention(
        q, k, v, segment_ids=seg, causal=True, implementation=impl, block_size=128))
    ref_out, ref_grads = _value_and_grads(run("xla"), q, k, v, w)
    out, grads = _value_and_grads(run("splash"), q, k, v, w)
    chex.assert_tree_all_finite((out, grads))
    chex.assert_trees_all_close(out, ref_out, atol=1e-5, rtol=0)
    chex.assert_trees_all_close(grads, ref_grads, atol=1e-5, rtol=0)

  def test_vit_images_bidirectional(self):
    q, k, v, _ = _inputs(1, 128, 128, 2, 2, 64, seed=5)
    seg = _segments([[40, 64, 16]], 128)
    ref = A.attention(q, k, v, segment_ids=seg, implementation="xla")
    out = A.attention(q, k, v, segment_ids=seg, implementation="splash", interpret=True)
    chex.assert_trees_all_close(out, ref, atol=1e-5, rtol=0)


def _train_temp_bytes(impl, length, heads=2, head_dim=64):
  """Temporary bytes of the compiled forward + backward of causal packed attention."""
  spec = jax.ShapeDtypeStruct((1, length, heads, head_dim), jnp.float32)

  def loss(q, k, v, seg):
    return jnp.sum(A.attention(q, k, v, segment_ids=seg, causal=True, implementation=impl))

  step = jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2)))
  compiled = step.lower(spec, spec, spec, jax.ShapeDtypeStruct((1, length), jnp.int32)).compile()
  return compiled.memory_analysis().temp_size_in_bytes


def test_chunked_backward_memory_is_linear():
  # Doubling L: chunked's temporaries at most ~double (no [L, L] buffer in forward or backward);
  # xla's quadruple (the same measure sees the quadratic score matrix, so it can tell them apart).
  chunked = [_train_temp_bytes("chunked", n) for n in (4096, 8192)]
  xla = [_train_temp_bytes("xla", n) for n in (4096, 8192)]
  assert chunked[1] / chunked[0] < 2.2, chunked
  assert xla[1] / xla[0] > 3.5, xla
  assert chunked[1] < 4 * 8192 * 8192, chunked  # less than one float32 [L, L] matrix


class ImplementationChoiceTest(parameterized.TestCase):

  def test_unknown_implementation_lists_choices(self):
    q, k, v, _ = _inputs(1, 8, 8, 1, 1, 8)
    with self.assertRaisesRegex(ValueError, r"unknown attention implementation 'flash'.*xla, "
                                r"chunked, splash, cudnn, auto"):
      A.attention(q, k, v, implementation="flash")

  def test_cudnn_without_gpu_is_a_clear_error(self):
    q, k, v, _ = _inputs(1, 8, 8, 1, 1, 8)
    with self.assertRaisesRegex(ValueError, r"'cudnn' needs a CUDA GPU.*backend is 'cpu'"):
      A.attention(q.astype(jnp.bfloat16), k.astype(jnp.bfloat16), v.astype(jnp.bfloat16),
                  implementation="cudnn")

  def test_cudnn_float32_is_a_clear_error(self):
    with pytest.MonkeyPatch.context() as mp:
      mp.setattr(A, "_backend", lambda: "gpu")
      with self.assertRaisesRegex(ValueError, "float16/bfloat16 only, got float32"):
        A.resolve_implementation("cudnn", key_length=8, head_dim=8, dtype=jnp.float32,
                                 has_segments=False)

  def test_splash_on_gpu_needs_interpret(self):
    q, k, v, _ = _inputs(1, 8, 8, 1, 1, 8)
    with pytest.MonkeyPatch.context() as mp:
      mp.setattr(A, "_backend", lambda: "gpu")
      with self.assertRaisesRegex(ValueError, "'splash' is a TPU kernel.*'gpu'"):
        A.attention(q, k, v, implementation="splash")

  @parameterized.parameters(
      ("cpu", jnp.float32, 1024, False, "xla"),
      ("cpu", jnp.float32, 4096, True, "chunked"),
      ("tpu", jnp.bfloat16, 512, True, "splash"),
      ("gpu", jnp.bfloat16, 32768, False, "cudnn"),
      ("gpu", jnp.bfloat16, 8192, True, "cudnn"),
      ("gpu", jnp.bfloat16, 32768, True, "chunked"),
      ("gpu", jnp.float32, 32768, False, "chunked"),
  )
  def test_auto_rule(self, backend, dtype, length, segments, expected):
    with pytest.MonkeyPatch.context() as mp:
      mp.setattr(A, "_backend", lambda: backend)
      self.assertEqual(A.resolve_implementation("auto", key_length=length, head_dim=128,
                                                dtype=dtype, has_segments=segments), expected)

  def test_cudnn_arguments_compute_attention(self):
    # The arguments handed to jax.nn.dot_product_attention(implementation="cudnn"), run through
    # its xla implementation on CPU, equal vlm's xla path (segments, GQA, end-aligned causal).
    for lq, lk in ((40, 40), (24, 40)):
      q, k, v, _ = _inputs(2, lq, lk, 4, 2, 8, seed=6)
      qs, ks = _segments([[10, 10, 4], [24]], lq), _segments([[10, 10, 20], [30]], lk)
      if lq == lk:
        qs = ks
      kw = dict(segment_ids=qs, kv_segment_ids=ks, causal=True)

      @jax.jit
      def both(q, k, v):
        args = A._cudnn_arguments(q, k, v, qs, ks, True, 8 ** -0.5)
        out = jax.nn.dot_product_attention(**args, implementation="xla")
        has_key = jnp.any(A._allowed_mask(qs, ks, True, lq, lk), -1)[:, 0, :, None, None]
        return jnp.where(has_key, out, 0.0), A.attention(q, k, v, implementation="xla", **kw)

      out, ref = both(q, k, v)
      chex.assert_trees_all_close(out, ref, atol=1e-5, rtol=0)

  def test_dropout_only_in_xla(self):
    q, k, v, _ = _inputs(1, 8, 8, 1, 1, 8)
    with self.assertRaisesRegex(ValueError, "dropout is implemented only by implementation='xla'"):
      A.attention(q, k, v, implementation="chunked", dropout_rate=0.1, deterministic=False,
                  dropout_rng=jax.random.PRNGKey(0))

  def test_bad_shapes(self):
    q, k, v, _ = _inputs(1, 8, 8, 3, 2, 8)
    with self.assertRaisesRegex(ValueError, r"query heads \(3\) must be a multiple"):
      A.attention(q, k, v)
    q, k, v, _ = _inputs(1, 8, 8, 2, 2, 8)
    with self.assertRaisesRegex(ValueError, "segment_ids must be"):
      A.attention(q, k, v, segment_ids=jnp.ones((1, 7), jnp.int32))


def test_context_parallel_chunked_and_splash():
  """``sharded=True`` on a data=2 x context=4 mesh (8 simulated devices): queries stay on their
  shard, keys/values are all-gathered, the causal diagonal is offset by the shard's first query.
  chunked (traced offset, custom VJP) matches the one-device xla values and gradients; splash
  (one static-offset kernel per shard under ``lax.switch``; interpret mode) its values."""
  import flax.linen as nn
  from vlm.parallel import mesh as mesh_lib
  q, k, v, w = _inputs(2, 512, 512, 2, 1, 8, seed=3)
  seg = _segments([[100, 300, 112], [300, 150]], 512)  # segments cross the 128-token shards
  run = lambda impl, sharded: lambda q, k, v: A.attention(
      q, k, v, segment_ids=seg, causal=True, implementation=impl, block_size=128,
      interpret=True if impl == "splash" else None, sharded=sharded)
  want = _value_and_grads(run("xla", False), q, k, v, w)
  mesh = mesh_lib.make_mesh({"data": 2, "context": 4})
  with jax.set_mesh(mesh), nn.logical_axis_rules(mesh_lib.DEFAULT_RULES):
    got = jax.jit(lambda q, k, v: _value_and_grads(run("chunked", True), q, k, v, w))(q, k, v)
    splash = jax.jit(run("splash", True))(q, k, v)
  for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-5, rtol=0)
  np.testing.assert_allclose(np.asarray(splash), np.asarray(want[0]), atol=1e-5, rtol=0)
