"""float16 never silently produces inf/NaN where float32 would not (issue "Nothing silently wrong,
no crash mid-run").

Every test builds its own inputs so that a float16 intermediate would exceed 65,504 (attention
scores, SwiGLU / GELU MLP intermediates, MLP outputs and residual channels) while the float32
computation stays finite, and checks that the float16 model is finite and equals the float32 model
(same float32 parameters) within a stated tolerance. Each test also asserts, in float32, that the
overflow it targets really happens (otherwise the test would prove nothing).

Tolerances: float16 has a 2**-11 relative rounding step; after a few matmuls of width <= 256 the
measured errors are ~1e-3 relative to the largest output, so ``_close`` allows 1e-2 of the
largest |float32 value|.
"""
import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from vlm.models import presets, qwen3, qwen_vit
from vlm.models.blip2 import Blip2Stage1
from vlm.models.qwen3_vl import Qwen2_5_VLConfig, Qwen3VL, init_params, visual_token_index
from vlm.models.qwen_presets import qwen_config
from vlm.nn import attention, layers, moe
from vlm.nn.attention import dot_product_attention

F16_MAX = float(jnp.finfo(jnp.float16).max)  # 65504
REL = 1e-2


def _np(x):
  return np.asarray(jnp.asarray(x, jnp.float32))


def _close(got, want, rel=REL):
  """float16 result ``got`` finite and within ``rel * max|want|`` of the float32 ``want``."""
  chex.assert_tree_all_finite(got)
  want = jax.tree_util.tree_map(_np, want)
  got = jax.tree_util.tree_map(_np, got)
  scale = max(float(np.abs(w).max()) for w in jax.tree_util.tree_leaves(want))
  chex.assert_trees_all_close(got, want, atol=rel * scale, rtol=0)


def _f16_round(x):
  """The float16 value of ``x`` as float32 (both precisions then see the same inputs)."""
  return np.asarray(np.asarray(x, np.float16), np.float32)


def _mutable(params):
  return jax.tree_util.tree_map(np.array, nn.unbox(params))


def _max_abs(tree):
  return max(float(np.abs(_np(x)).max()) for x in jax.tree_util.tree_leaves(tree))


# -- attention ------------------------------------------------------------------------------------


@pytest.mark.parametrize("masked", [False, True])
def test_attention_scores_beyond_float16_range(masked):
  """Raw scores up to ~3e5 (> 65,504) with a well-defined softmax: float16 output is finite and
  equals float32 attention on the same (float16-rounded) inputs. Before the fix: all-NaN rows."""
  rng = np.random.default_rng(0)
  q = _f16_round(rng.standard_normal((2, 5, 2, 16)) * 150)
  k = _f16_round(rng.standard_normal((2, 7, 2, 16)) * 150)
  v = _f16_round(rng.standard_normal((2, 7, 2, 16)))
  raw = np.einsum("bqhd,bkhd->bhqk", q.astype(np.float64), k.astype(np.float64))
  assert np.abs(raw).max() > 2 * F16_MAX
  mask = None
  if masked:
    mask = jnp.asarray(rng.random((2, 1, 5, 7)) > 0.3).at[..., 0].set(True)
  want = dot_product_attention(jnp.asarray(q), jnp.asarray(k), jnp.asarray(v), mask=mask)
  got = dot_product_attention(jnp.asarray(q, jnp.float16), jnp.asarray(k, jnp.float16),
                              jnp.asarray(v, jnp.float16), mask=mask)
  assert got.dtype == jnp.float16
  _close(got, want)


def test_cached_attention_scores_beyond_float16_range():
  """The Qwen3 decoder's cached path (separate cache / new-token scores, GQA) likewise."""
  rng = np.random.default_rng(1)
  b, l, h, kvh, t, hd = 1, 3, 4, 2, 5, 16
  q = _f16_round(rng.standard_normal((b, l, h, hd)) * 150)
  k_new = _f16_round(rng.standard_normal((b, l, kvh, hd)) * 150)
  v_new = _f16_round(rng.standard_normal((b, l, kvh, hd)))
  k_cache = _f16_round(rng.standard_normal((b, kvh, t, hd)) * 150)
  v_cache = _f16_round(rng.standard_normal((b, kvh, t, hd)))
  assert np.abs(np.einsum("blhd,bgtd->bhlt", q, k_cache)).max() > 2 * F16_MAX
  mask_cache, mask_new = attention.cache_masks(jnp.ones((b, l), bool), jnp.ones((b, t), bool),
                                                  jnp.asarray(t, jnp.int32))
  args = (q, k_new, v_new, k_cache, v_cache)
  want = attention.cached_attention(*map(jnp.asarray, args), mask_cache, mask_new, hd ** -0.5,
                                jnp.float32)
  got = attention.cached_attention(*(jnp.asarray(a, jnp.float16) for a in args), mask_cache,
                               mask_new, hd ** -0.5, jnp.float16)
  assert got.dtype == jnp.float16
  _close(got, want)


# -- layers ---------------------------------------------------------------------------------------


def test_split_rows_and_wide_dense():
  """``split_rows`` is exact scaling by powers of two; a wide float16 Dense takes float32 inputs
  beyond 65,504 and returns float32; a plain float16 Dense still returns float16."""
  x = np.array([[1e6, -3.0, 0.5], [0.25, 1.0, -2.0], [0.0, 0.0, 0.0]], np.float32)
  m, s = layers.split_rows(x)
  assert m.dtype == jnp.float16 and s.shape == (3, 1)
  assert np.abs(_np(m)).max() <= 2 ** 14
  np.testing.assert_array_equal(_np(s)[1:], 1.0)  # rows inside the range are not scaled
  np.testing.assert_allclose(_np(m) * _np(s), x, rtol=1e-3)

  dense = layers.Dense(4, wide_float16=True, dtype=jnp.float16)
  params = dense.init(jax.random.key(0), x)
  want = layers.Dense(4).apply(params, x)
  got = dense.apply(params, x)
  assert got.dtype == jnp.float32
  _close(got, want)
  assert layers.Dense(4, dtype=jnp.float16).apply(params, x[1:]).dtype == jnp.float16


def test_bfloat16_and_float32_dense_unchanged():
  """``wide_float16`` and the float16 path leave bfloat16/float32 Dense untouched (bitwise)."""
  x = jnp.asarray(np.random.default_rng(2).standard_normal((3, 8)), jnp.float32)
  for dtype in (jnp.bfloat16, jnp.float32):
    params = layers.Dense(5, dtype=dtype).init(jax.random.key(0), x)
    p = nn.unbox(params)["params"]
    want = (jnp.einsum("...i,io->...o", x.astype(dtype), p["kernel"].astype(dtype))
            + p["bias"].astype(dtype))
    for wide in (False, True):
      got = layers.Dense(5, dtype=dtype, wide_float16=wide).apply(params, x)
      assert got.dtype == dtype
      np.testing.assert_array_equal(_np(got), _np(want))


# -- MLPs -----------------------------------------------------------------------------------------


def _text_config(**kw):
  return qwen3.Qwen3TextConfig(vocab_size=64, hidden_size=32, intermediate_size=64,
                               num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1,
                               **kw)


def test_qwen3_swiglu_intermediate_beyond_float16_range():
  """Qwen3 decoder SwiGLU: ``act(gate) * up`` ~ 1e6 while the output fits float16."""
  cfg = _text_config()
  x = np.random.default_rng(3).standard_normal((1, 3, 32)).astype(np.float32)
  mlp = qwen3.Qwen3MLP(cfg, 64)
  p = _mutable(mlp.init(jax.random.key(1), x)["params"])
  p["gate_proj"]["kernel"] *= 2000
  p["up_proj"]["kernel"] *= 2000
  want, inter = mlp.apply({"params": p}, x, capture_intermediates=True)
  g = inter["intermediates"]["gate_proj"]["__call__"][0]
  u = inter["intermediates"]["up_proj"]["__call__"][0]
  assert _max_abs(jax.nn.silu(g) * u) > 2 * F16_MAX
  assert _max_abs(g) < F16_MAX and _max_abs(u) < F16_MAX
  got = qwen3.Qwen3MLP(cfg, 64, dtype=jnp.float16).apply({"params": p}, x)
  _close(got, want)


@pytest.mark.parametrize("impl", ["dense", "ragged", "gather"])
def test_moe_experts_beyond_float16_range(impl):
  """MoE experts (all three evaluations): intermediates and outputs above 65,504."""
  rng = np.random.default_rng(4)
  t, d, e, i, k = 6, 16, 4, 8, 2
  x = _f16_round(rng.standard_normal((t, d)))
  gate_up = _f16_round(rng.standard_normal((e, d, 2 * i)) * 40)
  down = _f16_round(rng.standard_normal((e, i, d)) * 4)
  ids = jnp.asarray(np.argsort(rng.random((t, e)), axis=1)[:, :k], jnp.int32)
  w = _f16_round(rng.dirichlet(np.ones(k), t))
  fn = moe.IMPLEMENTATIONS[impl]
  want = fn(jnp.asarray(x), jnp.asarray(gate_up), jnp.asarray(down), ids, jnp.asarray(w),
            jax.nn.silu)
  gu = np.einsum("td,edf->tef", x, gate_up)
  assert np.abs(jax.nn.silu(gu[..., :i]) * gu[..., i:]).max() > F16_MAX
  assert _max_abs(want) > F16_MAX
  f16 = lambda a: jnp.asarray(a, jnp.float16)
  got = fn(f16(x), f16(gate_up), f16(down), ids, f16(w), jax.nn.silu)
  assert got.dtype == jnp.float32  # the float32 residual dtype of float16 compute
  _close(got, want)


# -- vision towers --------------------------------------------------------------------------------


def _qwen2_5_vision_config(out=32):
  return qwen_vit.Qwen2_5_VLVisionConfig(depth=2, hidden_size=64, intermediate_size=128,
                                         num_heads=2, patch_size=4, window_size=16,
                                         fullatt_block_indexes=(1,), out_hidden_size=out)


def test_qwen2_5_vl_vision_swiglu_beyond_float16_range():
  """Tiny Qwen2.5-VL tower: block 0's SwiGLU intermediate (~4e6), its ``down_proj`` output and the
  residual after it exceed 65,504 (as measured on Qwen2.5-VL-3B's last block). Before the fix the
  float16 merged features were all NaN; now finite and equal to float32."""
  cfg = _qwen2_5_vision_config()
  tables = qwen_vit.vision_inputs(cfg, np.array([[1, 8, 8]]))
  px = np.random.default_rng(5).standard_normal((64, cfg.patch_dim)).astype(np.float32)
  model = qwen_vit.Qwen2_5_VLVisionModel(cfg)
  p = _mutable(model.init(jax.random.key(0), px, **tables)["params"])
  p["blocks_0"]["mlp"]["gate_proj"]["kernel"] *= 3000
  p["blocks_0"]["mlp"]["up_proj"]["kernel"] *= 3000
  want, inter = model.apply({"params": p}, px, **tables, capture_intermediates=True)
  mlp = inter["intermediates"]["blocks_0"]["mlp"]
  g, u = mlp["gate_proj"]["__call__"][0], mlp["up_proj"]["__call__"][0]
  assert _max_abs(jax.nn.silu(g) * u) > 10 * F16_MAX
  assert _max_abs(mlp["down_proj"]["__call__"][0]) > F16_MAX
  got = qwen_vit.Qwen2_5_VLVisionModel(cfg, dtype=jnp.float16).apply({"params": p}, px, **tables)
  _close(got, want)


def test_qwen3_vl_vision_gelu_mlp_beyond_float16_range():
  """Tiny Qwen3-VL tower: block 0's ``linear_fc1`` output above 65,504 (reported for Qwen3-VL-2B);
  merged and DeepStack features finite and equal to float32."""
  cfg = qwen_config("qwen3_vl_tiny").vision
  tables = qwen_vit.vision_inputs(cfg, np.array([[1, 4, 4]]))
  px = np.random.default_rng(6).standard_normal((16, cfg.patch_dim)).astype(np.float32)
  model = qwen_vit.Qwen3VLVisionModel(cfg)
  p = _mutable(model.init(jax.random.key(0), px, **tables)["params"])
  p["blocks_0"]["mlp"]["linear_fc1"]["kernel"] *= 120000
  want, inter = model.apply({"params": p}, px, **tables, capture_intermediates=True)
  assert _max_abs(inter["intermediates"]["blocks_0"]["mlp"]["linear_fc1"]["__call__"][0]) > F16_MAX
  got = qwen_vit.Qwen3VLVisionModel(cfg, dtype=jnp.float16).apply({"params": p}, px, **tables)
  _close(got, want)


def _blip2_micro(kind):
  cfg = presets.get_preset("blip2_micro")
  if kind == "clip":
    cfg = cfg.replace(vision=presets.dataclasses.replace(cfg.vision, kind="clip",
                                                         hidden_act="quick_gelu"))
  return cfg


@pytest.mark.parametrize("kind", ["eva", "clip"])
def test_blip2_float16_forward_with_mlp_overflow(kind):
  """BLIP-2 micro (EVA or CLIP tower + Q-Former + heads) in float16: the vision ``fc1`` output and
  the Q-Former query FFN intermediate are pushed beyond 65,504; every head is finite and equal to
  float32 (the tower's residual then holds values above 65,504 too)."""
  cfg = _blip2_micro(kind)
  rng = np.random.default_rng(7)
  pixels = rng.standard_normal((2, 32, 32, 3)).astype(np.float32)
  ids = jnp.asarray(rng.integers(1000, 2000, (2, 5)), jnp.int32).at[:, 0].set(cfg.cls_token_id)
  mask = jnp.asarray([[1, 1, 1, 1, 1], [1, 1, 1, 0, 0]])
  model = Blip2Stage1(cfg)
  p = _mutable(model.init(jax.random.key(0), pixels, ids, mask)["params"])
  p["vision_model"]["encoder"]["layers_0"]["mlp"]["fc1"]["kernel"] *= 1.5e5
  p["qformer"]["encoder"]["layer_0"]["intermediate_query"]["dense"]["kernel"] *= 3e5
  want, inter = model.apply({"params": p}, pixels, ids, mask, capture_intermediates=True)
  fc1 = inter["intermediates"]["vision_model"]["encoder"]["layers_0"]["mlp"]["fc1"]
  assert _max_abs(fc1["__call__"][0]) > F16_MAX
  qffn = inter["intermediates"]["qformer"]["encoder"]["layer_0"]["intermediate_query"]["dense"]
  assert max(_max_abs(c) for c in qffn["__call__"]) > F16_MAX
  got = Blip2Stage1(cfg, dtype=jnp.float16).apply({"params": p}, pixels, ids, mask)
  for name in want:  # each head against its own scale
    _close(got[name], want[name])


# -- composed VLMs --------------------------------------------------------------------------------


def _vlm_inputs(config, rng):
  m = config.vision.spatial_merge_size
  grid = np.array([[1, 2 * m, 2 * m]])
  n_img = 4  # (2m * 2m) / m^2 merged tokens
  ids = np.concatenate([[[11, 12]], np.full((1, n_img), config.image_token_id), [[13, 14, 15]]],
                       axis=1).astype(np.int32)
  tables = qwen_vit.vision_inputs(config.vision, grid)
  px = rng.standard_normal((int(np.prod(grid)), config.vision.patch_dim)).astype(np.float32)
  pos = np.broadcast_to(np.arange(ids.shape[1]), (3, 1, ids.shape[1])).astype(np.int32)
  vti = visual_token_index(ids, config.image_token_id, config.video_token_id,
                           image_grid_thw=grid, spatial_merge_size=m)
  return jnp.asarray(ids), jnp.asarray(pos), None, jnp.asarray(px), tables, jnp.asarray(vti)


def _qwen2_5_vl_tiny():
  base = qwen_config("qwen3_vl_tiny").text
  text = presets.dataclasses.replace(base, attention_bias=True, o_proj_bias=False,
                                     use_qk_norm=False, mrope_section=(2, 3, 3),
                                     mrope_interleaved=False)
  return Qwen2_5_VLConfig(vision=_qwen2_5_vision_config(out=64), text=text)


@pytest.mark.parametrize("name", ["qwen3_vl_tiny", "qwen3_vl_moe_tiny", "qwen2_5_vl"])
def test_vlm_float16_forward(name):
  """Tiny Qwen3-VL, Qwen3-VL-MoE and Qwen2.5-VL forwards (vision + decoder) in float16: the first
  decoder layer's SwiGLU intermediate (dense models) is pushed beyond 65,504; logits finite and
  close to float32."""
  config = _qwen2_5_vl_tiny() if name == "qwen2_5_vl" else qwen_config(name)
  inputs = _vlm_inputs(config, np.random.default_rng(8))
  p = _mutable(init_params(Qwen3VL(config), jax.random.key(0)))
  mlp = p["language_model"]["layers_0"]["mlp"]
  if "gate_proj" in mlp:
    mlp["gate_proj"]["kernel"] *= 300
    mlp["up_proj"]["kernel"] *= 300
  want, _ = Qwen3VL(config).apply({"params": p}, *inputs)
  got, _ = Qwen3VL(config, dtype=jnp.float16).apply({"params": p}, *inputs)
  assert got.dtype == jnp.float32
  _close(got, want, rel=2e-2)
