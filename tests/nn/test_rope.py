"""Tests for vlm.nn.rope: relative-position invariance, MRoPE text reduction, HF equivalence.

HF references (transformers 4.57.1): modeling_rope_utils.ROPE_INIT_FUNCTIONS, Qwen3RotaryEmbedding +
apply_rotary_pos_emb, Qwen3VLTextRotaryEmbedding (interleaved MRoPE), Qwen2_5_VLRotaryEmbedding +
apply_multimodal_rotary_pos_emb (sectioned MRoPE), Qwen3VLVisionRotaryEmbedding + rot_pos_emb +
apply_rotary_pos_emb_vision (axial 2-D). Every comparison is float32 with max abs diff <= 1e-5.
"""
import types

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from absl.testing import parameterized

from vlm.nn import rope

TOL = 1e-5


@pytest.fixture(params=[False, True], ids=["eager", "jit"])
def maybe_jit(request):
  """Wraps a function of arrays in jax.jit (static arguments must be closed over) or not."""
  return jax.jit if request.param else (lambda f: f)


def _max_err(a, b):
  return float(np.max(np.abs(np.asarray(a, np.float64) - np.asarray(b, np.float64))))


# ---------------------------------------------------------------------------------------------
# Scaling rules vs HF ROPE_INIT_FUNCTIONS
# ---------------------------------------------------------------------------------------------

def _hf_config(head_dim, theta, rope_scaling=None, max_pos=256):
  return types.SimpleNamespace(rope_theta=theta, hidden_size=head_dim * 4, num_attention_heads=4,
                               head_dim=head_dim, max_position_embeddings=max_pos,
                               rope_scaling=rope_scaling, partial_rotary_factor=1.0)


def _hf_init(rope_type, cfg, seq_len=None):
  from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS
  inv, factor = ROPE_INIT_FUNCTIONS[rope_type](cfg, None, seq_len)
  return inv.numpy(), float(factor)


@pytest.mark.parametrize("dim,theta", [(16, 1e4), (36, 1e4), (64, 1e6), (128, 5e6)])
def test_inverse_frequencies_matches_hf_default(dim, theta):
  ref, _ = _hf_init("default", _hf_config(dim, theta))
  ours = np.asarray(rope.inverse_frequencies(dim, theta))
  assert ours.dtype == np.float32 and ours.shape == (dim // 2,)
  # Identical up to torch's float32 pow being 1 ulp off for a few indices (spec 11 item 21).
  np.testing.assert_array_max_ulp(ours, ref, maxulp=1)


SCALING_CASES = [
    ("linear", {"rope_type": "linear", "factor": 4.0}, None),
    ("dynamic", {"rope_type": "dynamic", "factor": 2.0}, None),
    ("dynamic", {"rope_type": "dynamic", "factor": 2.0}, 1000),
    ("yarn", {"rope_type": "yarn", "factor": 8.0, "original_max_position_embeddings": 64}, None),
    ("yarn", {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 128,
              "beta_fast": 16, "beta_slow": 2, "mscale": 0.8, "mscale_all_dim": 0.6,
              "truncate": False}, None),
    ("yarn", {"rope_type": "yarn", "factor": 4.0, "attention_factor": 1.3}, None),
    ("llama3", {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                "high_freq_factor": 4.0, "original_max_position_embeddings": 64}, None),
]


@pytest.mark.parametrize("rope_type,scaling,seq_len", SCALING_CASES)
def test_scaling_rules_match_hf(rope_type, scaling, seq_len, maybe_jit):
  dim, theta, max_pos = 32, 10000.0, 256
  ref, ref_factor = _hf_init(rope_type, _hf_config(dim, theta, dict(scaling), max_pos), seq_len)
  # Through the dispatcher ...
  inv, factor = rope.rope_init(dim, theta, scaling, max_pos, seq_len)
  assert _max_err(inv, ref) <= 1e-7 * np.max(ref)
  assert factor == pytest.approx(ref_factor, rel=1e-12)
  # ... and through the individual rule, optionally jitted.
  base = rope.inverse_frequencies(dim, theta)
  if rope_type == "linear":
    ours = maybe_jit(lambda i: rope.linear_scaling(i, scaling["factor"]))(base)
  elif rope_type == "dynamic":
    ours = rope.ntk_scaling(dim, theta, scaling["factor"], max_pos, seq_len)
  elif rope_type == "yarn":
    original = scaling.get("original_max_position_embeddings", max_pos)
    kw = {k: scaling[k] for k in ("attention_factor", "mscale", "mscale_all_dim", "truncate")
          if k in scaling}
    fn = lambda i: rope.yarn_scaling(i, dim, theta, scaling["factor"], original,  # noqa: E731
                                     scaling.get("beta_fast", 32), scaling.get("beta_slow", 1),
                                     **kw)[0]
    ours = maybe_jit(fn)(base)
  else:
    ours = maybe_jit(lambda i: rope.llama3_scaling(i, 8.0, 1.0, 4.0, 64))(base)
  err = _max_err(ours, ref)
  print(f"{rope_type} {scaling} seq_len={seq_len}: max abs err {err:.3g}")
  assert err <= 1e-7 * np.max(ref)


def test_scaling_rules_change_the_spectrum():
  base = np.asarray(rope.inverse_frequencies(32, 1e4))
  yarn, _ = rope.yarn_scaling(base, 32, 1e4, 8.0, 64)
  llama = rope.llama3_scaling(base, 8.0, 1.0, 4.0, 64)
  for scaled in (yarn, llama):
    scaled = np.asarray(scaled)
    assert scaled[0] == base[0]  # highest frequency kept
    np.testing.assert_allclose(scaled[-1], base[-1] / 8.0, rtol=1e-6)  # lowest divided


def test_bad_arguments_raise():
  with pytest.raises(ValueError, match="even"):
    rope.inverse_frequencies(15, 1e4)
  with pytest.raises(ValueError, match="theta"):
    rope.inverse_frequencies(16, 0.0)
  with pytest.raises(ValueError, match="sums to"):
    rope.sections(rope.inverse_frequencies(16, 1e4), [2, 3, 4])
  with pytest.raises(ValueError, match="plane counts"):
    rope.interleaved(rope.inverse_frequencies(16, 1e4), [0, 8, 0])
  with pytest.raises(ValueError, match="num_axes"):
    rope.angles(jnp.zeros((2, 5)), rope.one_axis(rope.inverse_frequencies(16, 1e4)))
  with pytest.raises(ValueError, match="pairing"):
    rope.rotate(jnp.zeros((5, 2, 16)), jnp.zeros((5, 8)), pairing="gptj")
  with pytest.raises(ValueError, match="rotary width"):
    rope.rotate(jnp.zeros((5, 2, 8)), jnp.zeros((5, 8)))
  with pytest.raises(ValueError, match="unsupported rope_type"):
    rope.rope_init(16, 1e4, {"rope_type": "longrope"})
  with pytest.raises(ValueError, match="divisible by 4"):
    rope.vision_rope(jnp.zeros((2, 4), jnp.int32), 18)


# ---------------------------------------------------------------------------------------------
# Assignments
# ---------------------------------------------------------------------------------------------

def test_assignment_layouts():
  inv = np.asarray(rope.inverse_frequencies(128, 5e6))
  om = np.asarray(rope.interleaved(inv, [24, 20, 20]))
  owner = np.argmax(om != 0, axis=0)
  assert "".join("THW"[a] for a in owner) == "THW" * 20 + "TTTT"
  np.testing.assert_array_equal(om.sum(0), inv)
  om = np.asarray(rope.sections(inv, [16, 24, 24]))
  owner = np.argmax(om != 0, axis=0)
  np.testing.assert_array_equal(owner, [0] * 16 + [1] * 24 + [2] * 24)
  np.testing.assert_array_equal(om.sum(0), inv)
  small = np.asarray(rope.inverse_frequencies(8, 1e4))
  om = np.asarray(rope.axial(small, 2))
  np.testing.assert_array_equal(om, [[*small, 0, 0, 0, 0], [0, 0, 0, 0, *small]])


# ---------------------------------------------------------------------------------------------
# Properties (chex variants, with and without jit): relative-position invariance for every
# variant; MRoPE on text equals 1-D RoPE
# ---------------------------------------------------------------------------------------------

def _yarn_spectrum(dim):
  return rope.yarn_scaling(rope.inverse_frequencies(dim, 1e4), dim, 1e4, 4.0, 32)


VARIANTS = {
    # name: (Omega builder, head dim D, pairing, attention_factor)
    "one_axis": (lambda: rope.one_axis(rope.inverse_frequencies(16, 1e4)), 16, "half", 1.0),
    "one_axis_pairs": (lambda: rope.one_axis(rope.inverse_frequencies(16, 1e4)), 16,
                       "interleaved", 1.0),
    "one_axis_partial": (lambda: rope.one_axis(rope.inverse_frequencies(8, 1e4)), 16, "half", 1.0),
    "one_axis_yarn": (lambda: rope.one_axis(_yarn_spectrum(16)[0]), 16, "half",
                      _yarn_spectrum(16)[1]),
    "one_axis_llama3": (lambda: rope.one_axis(rope.llama3_scaling(
        rope.inverse_frequencies(16, 1e4), 8.0, 1.0, 4.0, 32)), 16, "half", 1.0),
    "axial": (lambda: rope.axial(rope.inverse_frequencies(8, 1e4), 2), 16, "half", 1.0),
    "sections": (lambda: rope.sections(rope.inverse_frequencies(16, 1e4), [2, 3, 3]), 16, "half",
                 1.0),
    "interleaved": (lambda: rope.interleaved(rope.inverse_frequencies(16, 1e4), [4, 2, 2]), 16,
                    "half", 1.0),
    "interleaved_qwen3vl": (lambda: rope.interleaved(rope.inverse_frequencies(128, 5e6),
                                                     [24, 20, 20]), 128, "half", 1.0),
}


class RopePropertiesTest(chex.TestCase):
  """Property tests, each run through ``chex.variants`` with and without ``jax.jit``."""

  @chex.variants(with_jit=True, without_jit=True)
  @parameterized.named_parameters(*((name, name) for name in VARIANTS))
  def test_relative_position_invariance(self, name):
    """q.k after rotation depends only on the position difference: shifting every position of
    every axis by the same per-axis offset leaves all scores unchanged (1e-5 abs)."""
    build, head_dim, pairing, attn = VARIANTS[name]
    omega = build()
    num_axes = omega.shape[0]
    rng = np.random.default_rng(0)
    length, heads = 12, 2
    # Unit-norm rows so scores are O(1) and the 1e-5 bound is an absolute one on O(1) numbers.
    q = rng.standard_normal((length, heads, head_dim)).astype(np.float32) / np.sqrt(head_dim)
    k = rng.standard_normal((length, heads, head_dim)).astype(np.float32) / np.sqrt(head_dim)
    pos = rng.integers(0, 40, size=(num_axes, length))
    shift = rng.integers(-20, 60, size=(num_axes, 1))

    @self.variant
    def rotated(p):
      th = rope.angles(p, omega)
      return rope.rotate(q, th, pairing, attn), rope.rotate(k, th, pairing, attn)

    def qk(p):
      rq, rk = rotated(jnp.asarray(p, jnp.int32))
      chex.assert_shape([rq, rk], (length, heads, head_dim))
      rq, rk = (np.asarray(a, np.float64) for a in (rq, rk))
      return np.einsum("qhd,khd->hqk", rq, rk)

    s0, s1 = qk(pos), qk(pos + shift)
    print(f"{name} {self.variant.type}: shift invariance max abs err {_max_err(s0, s1):.3g} "
          f"(scores up to {np.abs(s0).max():.3g})")
    chex.assert_trees_all_close(s1, s0, atol=TOL, rtol=0)
    # Not trivially invariant: moving only one key changes its scores.
    moved = pos.copy()
    moved[:, 0] += 3
    assert _max_err(qk(moved)[:, :, 0], s0[:, :, 0]) > 1e-3

  @chex.variants(with_jit=True, without_jit=True)
  @parameterized.named_parameters(("interleaved", True, [24, 20, 20]),
                                  ("sectioned", False, [16, 24, 24]))
  def test_text_only_mrope_equals_1d(self, interleaved, section):
    """MRoPE with t = h = w (text tokens) gives exactly the 1-D RoPE angles and rotation."""
    rng = np.random.default_rng(1)
    pos = jnp.asarray(rng.integers(0, 5000, size=(2, 9)), jnp.int32)
    x = jnp.asarray(rng.standard_normal((2, 9, 3, 128)), jnp.float32)

    @self.variant
    def both(p, x):
      a3 = rope.mrope(jnp.broadcast_to(p, (3,) + p.shape), 128, 5e6, section, interleaved)
      a1 = rope.text_rope(p, 128, 5e6)
      return a3, a1, rope.rotate(x, a3), rope.rotate(x, a1)

    a3, a1, r3, r1 = both(pos, x)
    chex.assert_shape([a3, a1], (2, 9, 64))
    chex.assert_type([a3, a1, r3, r1], jnp.float32)
    chex.assert_trees_all_equal((a3, r3), (a1, r1))


# ---------------------------------------------------------------------------------------------
# Equivalence with the HF reference implementations
# ---------------------------------------------------------------------------------------------

def _qk(rng, batch, heads, length, head_dim):
  q = rng.standard_normal((batch, length, heads, head_dim)).astype(np.float32)
  k = rng.standard_normal((batch, length, heads, head_dim)).astype(np.float32)
  return q, k


def _to_hf(x):  # [B, L, H, D] -> torch [B, H, L, D]
  return torch.from_numpy(np.ascontiguousarray(np.swapaxes(x, 1, 2)))


def _from_hf(t):
  return np.swapaxes(t.numpy(), 1, 2)


@pytest.mark.parametrize("rope_scaling", [None, {"rope_type": "yarn", "factor": 4.0,
                                                 "original_max_position_embeddings": 64}],
                         ids=["default", "yarn"])
def test_text_rope_matches_hf_qwen3(rope_scaling, maybe_jit):
  from transformers import Qwen3Config
  from transformers.models.qwen3 import modeling_qwen3 as hf
  head_dim, theta = 32, 1e6
  cfg = Qwen3Config(hidden_size=64, num_attention_heads=2, num_key_value_heads=2,
                    head_dim=head_dim, rope_theta=theta, max_position_embeddings=256,
                    rope_scaling=rope_scaling)
  rng = np.random.default_rng(2)
  q, k = _qk(rng, 2, 2, 10, head_dim)
  pos = rng.integers(0, 300, size=(2, 10))
  emb = hf.Qwen3RotaryEmbedding(cfg)
  cos, sin = emb(torch.zeros(1), torch.from_numpy(pos))
  rq_hf, rk_hf = hf.apply_rotary_pos_emb(_to_hf(q), _to_hf(k), cos, sin)

  inv, attn = rope.rope_init(head_dim, theta, rope_scaling, 256)

  @maybe_jit
  def ours(p, q, k):
    th = rope.angles(p[None], rope.one_axis(inv))
    return rope.cos_sin(th, attn), rope.rotate(q, th, attention_factor=attn), rope.rotate(
        k, th, attention_factor=attn)

  (c, s), rq, rk = ours(jnp.asarray(pos), q, k)
  if rope_scaling is None:
    np.testing.assert_array_equal(np.asarray(rope.text_rope(pos, head_dim, theta)),
                                  np.asarray(rope.angles(pos[None], rope.one_axis(inv))))
  errs = [_max_err(c, cos), _max_err(s, sin), _max_err(rq, _from_hf(rq_hf)),
          _max_err(rk, _from_hf(rk_hf))]
  print(f"1-D {rope_scaling}: max abs err cos/sin/q/k {errs}")
  assert max(errs) <= TOL


@pytest.mark.parametrize("head_dim,section", [(128, [24, 20, 20]), (32, [6, 5, 5])])
def test_interleaved_mrope_matches_hf_qwen3vl(head_dim, section, maybe_jit):
  from transformers.models.qwen3_vl import modeling_qwen3_vl as hf
  from transformers.models.qwen3_vl.configuration_qwen3_vl import Qwen3VLTextConfig
  theta = 5e6
  cfg = Qwen3VLTextConfig(hidden_size=64, num_attention_heads=2, num_key_value_heads=2,
                          head_dim=head_dim, rope_theta=theta,
                          rope_scaling={"rope_type": "default", "mrope_section": section,
                                        "mrope_interleaved": True})
  rng = np.random.default_rng(3)
  q, k = _qk(rng, 2, 2, 11, head_dim)
  pos = rng.integers(0, 200, size=(3, 2, 11))
  cos, sin = hf.Qwen3VLTextRotaryEmbedding(cfg)(torch.zeros(1), torch.from_numpy(pos))
  rq_hf, rk_hf = hf.apply_rotary_pos_emb(_to_hf(q), _to_hf(k), cos, sin)

  @maybe_jit
  def ours(p, q, k):
    th = rope.mrope(p, head_dim, theta, section, interleaved=True)
    return rope.cos_sin(th), rope.rotate(q, th), rope.rotate(k, th)

  (c, s), rq, rk = ours(jnp.asarray(pos), q, k)
  errs = [_max_err(c, cos), _max_err(s, sin), _max_err(rq, _from_hf(rq_hf)),
          _max_err(rk, _from_hf(rk_hf))]
  print(f"interleaved {section}: max abs err cos/sin/q/k {errs}")
  assert max(errs) <= TOL


@pytest.mark.parametrize("head_dim,section", [(128, [16, 24, 24]), (32, [4, 6, 6])])
def test_sectioned_mrope_matches_hf_qwen25vl(head_dim, section, maybe_jit):
  from transformers.models.qwen2_5_vl import modeling_qwen2_5_vl as hf
  from transformers.models.qwen2_5_vl.configuration_qwen2_5_vl import Qwen2_5_VLTextConfig
  theta = 1e6
  cfg = Qwen2_5_VLTextConfig(hidden_size=2 * head_dim, num_attention_heads=2,
                             num_key_value_heads=2, rope_theta=theta,
                             rope_scaling={"type": "mrope", "mrope_section": section})
  rng = np.random.default_rng(4)
  q, k = _qk(rng, 2, 2, 11, head_dim)
  pos = rng.integers(0, 200, size=(3, 2, 11))
  cos, sin = hf.Qwen2_5_VLRotaryEmbedding(cfg)(torch.zeros(1), torch.from_numpy(pos))
  rq_hf, rk_hf = hf.apply_multimodal_rotary_pos_emb(_to_hf(q), _to_hf(k), cos, sin, section)

  @maybe_jit
  def ours(p, q, k):
    th = rope.mrope(p, head_dim, theta, section, interleaved=False)
    return rope.rotate(q, th), rope.rotate(k, th)

  rq, rk = ours(jnp.asarray(pos), q, k)
  errs = [_max_err(rq, _from_hf(rq_hf)), _max_err(rk, _from_hf(rk_hf))]
  print(f"sectioned {section}: max abs err q/k {errs}")
  assert max(errs) <= TOL


def _merge_window_positions(grid_thw, merge):
  """(row, col) per patch token in merge-window order, repeated per frame (spec 3.3)."""
  rows, cols = [], []
  for t, h, w in grid_thw:
    bi, bj, ii, ij = np.meshgrid(np.arange(h // merge), np.arange(w // merge), np.arange(merge),
                                 np.arange(merge), indexing="ij")
    rows += [np.tile((bi * merge + ii).reshape(-1), t)]
    cols += [np.tile((bj * merge + ij).reshape(-1), t)]
  return np.stack([np.concatenate(rows), np.concatenate(cols)])


@pytest.mark.parametrize("head_dim", [72, 16])
def test_vision_rope_matches_hf_qwen3vl(head_dim, maybe_jit):
  from transformers.models.qwen3_vl import modeling_qwen3_vl as hf
  grid = [(1, 4, 6), (2, 2, 4)]
  fake_model = types.SimpleNamespace(spatial_merge_size=2,
                                     rotary_pos_emb=hf.Qwen3VLVisionRotaryEmbedding(head_dim // 2))
  table = hf.Qwen3VLVisionModel.rot_pos_emb(fake_model, torch.tensor(grid))
  emb = torch.cat((table, table), dim=-1)
  cos, sin = emb.cos(), emb.sin()
  rng = np.random.default_rng(5)
  n = table.shape[0]
  q = rng.standard_normal((n, 3, head_dim)).astype(np.float32)
  k = rng.standard_normal((n, 3, head_dim)).astype(np.float32)
  rq_hf, rk_hf = hf.apply_rotary_pos_emb_vision(torch.from_numpy(q), torch.from_numpy(k), cos, sin)

  hw = _merge_window_positions(grid, 2)
  assert hw.shape == (2, n)
  np.testing.assert_array_equal(hw[:, :8].T, [(0, 0), (0, 1), (1, 0), (1, 1), (0, 2), (0, 3),
                                               (1, 2), (1, 3)])

  @maybe_jit
  def ours(p, q, k):
    th = rope.vision_rope(p, head_dim)
    return th, rope.rotate(q, th), rope.rotate(k, th)

  th, rq, rk = ours(jnp.asarray(hw), q, k)
  errs = [_max_err(th, table), _max_err(rq, rq_hf.numpy()), _max_err(rk, rk_hf.numpy())]
  print(f"vision head_dim={head_dim}: max abs err angles/q/k {errs}")
  assert errs[0] == 0.0
  assert max(errs) <= TOL


def test_low_precision_rotation_keeps_dtype():
  rng = np.random.default_rng(6)
  x = jnp.asarray(rng.standard_normal((1, 5, 2, 16)), jnp.bfloat16)

  @jax.jit
  def run(x):
    th = rope.text_rope(jnp.arange(5)[None], 16, 1e4)
    return ([rope.rotate(x, th, compute_dtype=c) for c in (jnp.float32, jnp.bfloat16)],
            rope.rotate(x.astype(jnp.float32), th))

  outs, ref = run(x)
  for out in outs:
    assert out.dtype == jnp.bfloat16 and out.shape == x.shape
    assert _max_err(out, ref) < 0.05


# ---------------------------------------------------------------------------------------------
# The models run this library (no private copies of the rotation or of the angles)
# ---------------------------------------------------------------------------------------------

def _tiny_models():
  from vlm.models import qwen3, qwen_vit
  text_cfg = qwen3.Qwen3TextConfig(vocab_size=32, hidden_size=32, intermediate_size=48,
                                   num_hidden_layers=1, num_attention_heads=2,
                                   num_key_value_heads=1, head_dim=16)
  vis_cfg = qwen_vit.Qwen3VLVisionConfig(depth=1, hidden_size=32, num_heads=2,
                                         intermediate_size=32, out_hidden_size=32, patch_size=4,
                                         num_position_embeddings=16, deepstack_visual_indexes=[])
  q25_cfg = qwen_vit.Qwen2_5_VLVisionConfig(depth=1, hidden_size=32, num_heads=2,
                                            intermediate_size=32, out_hidden_size=32,
                                            patch_size=4, window_size=16,
                                            fullatt_block_indexes=[0])
  return qwen3, qwen_vit, text_cfg, vis_cfg, q25_cfg


def _spread(variables, seed):
  """Well-conditioned random weights (init's 0.02 scale makes attention nearly uniform)."""
  leaves, tree = jax.tree_util.tree_flatten(variables)
  keys = jax.random.split(jax.random.PRNGKey(seed), len(leaves))
  new = [1.0 + 0.1 * jax.random.normal(k, x.shape) if x.ndim == 1 else
         jax.random.normal(k, x.shape) / np.sqrt(x.shape[-2]) for k, x in zip(keys, leaves)]
  return jax.tree_util.tree_unflatten(tree, new)


def test_models_define_no_private_rope():
  qwen3, qwen_vit, *_ = _tiny_models()
  from vlm.models import qwen3_vl
  for module in (qwen3, qwen_vit, qwen3_vl):
    for name in ("apply_rotary", "rotate_half", "_rotate_half", "_apply_rope",
                 "_vision_rope_cos_sin", "inverse_frequencies"):
      assert not hasattr(module, name), f"{module.__name__}.{name} duplicates vlm.nn.rope"


def test_models_run_the_library_rotation(monkeypatch):
  """Replacing rope.rotate / rope.vision_rope changes what the text decoder and both ViTs
  compute, so the rope tests above test the code the models run."""
  qwen3, qwen_vit, text_cfg, vis_cfg, q25_cfg = _tiny_models()
  rng = np.random.default_rng(7)
  ids = jnp.asarray(rng.integers(0, 32, (1, 6)), jnp.int32)
  angles = rope.text_rope(jnp.arange(6)[None], 16, 1e4)
  lm = qwen3.Qwen3LM(text_cfg)
  lm_params = _spread(lm.init(jax.random.PRNGKey(0), ids, angles), 0)
  grid = np.array([[1, 4, 4]])
  px = jnp.asarray(rng.standard_normal((16, vis_cfg.patch_dim)), jnp.float32)
  towers = []
  for cfg, cls in ((vis_cfg, qwen_vit.Qwen3VLVisionModel), (q25_cfg, qwen_vit.Qwen2_5_VLVisionModel)):
    tables = qwen_vit.vision_inputs(cfg, grid)
    model = cls(cfg)
    towers.append((model, _spread(model.init(jax.random.PRNGKey(1), px, **tables), 1), tables))

  def run_all():
    outs = [lm.apply(lm_params, ids, angles)[0]]
    for model, params, tables in towers:
      out = model.apply(params, px, **tables)
      outs.append(out[0] if isinstance(out, tuple) else out)
    return outs

  before = run_all()
  calls = {"rotate": 0, "vision_rope": 0}
  real_rotate, real_vision = rope.rotate, rope.vision_rope

  def counting_identity(x, theta, *args, **kwargs):
    calls["rotate"] += 1
    real_rotate(x, theta, *args, **kwargs)  # same argument contract as the real one
    return x

  def counting_vision(*args, **kwargs):
    calls["vision_rope"] += 1
    return real_vision(*args, **kwargs)

  monkeypatch.setattr(rope, "rotate", counting_identity)
  monkeypatch.setattr(rope, "vision_rope", counting_vision)
  after = run_all()
  assert calls["rotate"] == 2 * 3  # q and k in the decoder layer and in each ViT block
  assert calls["vision_rope"] == 2  # once per tower call
  for b, a in zip(before, after):
    assert _max_err(b, a) > 1e-2 * float(np.max(np.abs(b))), (
        "the model output does not depend on vlm.nn.rope.rotate")
