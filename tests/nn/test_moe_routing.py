"""Routed ("ragged", dropless) MoE experts equal the dense evaluation.

``vlm.nn.moe.ragged_expert_mlp`` against ``dense_expert_mlp`` (float32, forward and gradients,
eager and jitted, experts that receive no token), the Qwen3-MoE block in bfloat16, a whole tiny
Qwen3-MoE ``Qwen3LM`` with ``moe_implementation`` "dense" vs "ragged" (unscanned and scanned), the
same on an 8-device (data, tensor, expert) mesh, and config validation.
"""
import dataclasses

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from vlm.models import qwen3 as Q
from vlm.nn import moe
from vlm.parallel import mesh as mesh_lib
from vlm.train import step as step_lib

TOL = 1e-5


def _max(a, b):
  return float(jnp.max(jnp.abs(jnp.asarray(a, jnp.float32) - jnp.asarray(b, jnp.float32))))


def _problem(seed, t, d, e, i, k, unused=()):
  """Random tokens, expert weights ~ N(0, 1/fan_in), top-k routing; ``unused`` experts get none."""
  rng = np.random.RandomState(seed)
  x = jnp.asarray(rng.randn(t, d), jnp.float32)
  gate_up = jnp.asarray(rng.randn(e, d, 2 * i) / np.sqrt(d), jnp.float32)
  down = jnp.asarray(rng.randn(e, i, d) / np.sqrt(i), jnp.float32)
  logits = rng.randn(t, e)
  logits[:, list(unused)] = -1e9
  w, ids = jax.lax.top_k(jax.nn.softmax(jnp.asarray(logits, jnp.float32)), k)
  return x, gate_up, down, ids, w / jnp.sum(w, -1, keepdims=True)


def test_sort_by_expert_layout():
  ids = jnp.asarray([[2, 0], [0, 3], [2, 3]], jnp.int32)    # T=3, k=2, E=5; expert 1, 4 unused
  s = moe.sort_by_expert(ids, 5)
  np.testing.assert_array_equal(s.group_sizes, [2, 0, 2, 2, 0])
  np.testing.assert_array_equal(s.expert_index, [0, 0, 2, 2, 3, 3])
  np.testing.assert_array_equal(s.token_index, [0, 1, 0, 2, 1, 2])   # stable: token order
  np.testing.assert_array_equal(s.expert_index[s.inverse], ids.reshape(-1))
  with pytest.raises(ValueError, match="integer"):
    moe.sort_by_expert(ids.astype(jnp.float32), 5)


def _both(x, gate_up, down, ids, w):
  """(dense, ragged, gather) outputs and the gradients of sum(out * c) w.r.t. x, gate_up, down,
  w."""
  c = jnp.cos(jnp.arange(x.size, dtype=jnp.float32)).reshape(x.shape)
  out = []
  for fn in (moe.dense_expert_mlp, moe.ragged_expert_mlp, moe.gather_expert_mlp):
    loss = lambda x, gu, dn, w, fn=fn: jnp.sum(fn(x, gu, dn, ids, w, jax.nn.silu) * c)
    out.append((fn(x, gate_up, down, ids, w, jax.nn.silu),
                jax.grad(loss, argnums=(0, 1, 2, 3))(x, gate_up, down, w)))
  return out


def _errs(result):
  """Worst (output, gradient) difference of the ragged and gather paths to the dense one."""
  (y_d, g_d), *others = result
  return (max(_max(y_d, y) for y, _ in others),
          max(_max(p, q) for _, g in others for p, q in zip(g_d, g)))


# (B, L, E, k, experts that receive no token)
CASES = [(1, 1, 4, 1, (3,)), (2, 5, 4, 2, (0,)), (3, 7, 8, 2, (1, 6)), (2, 9, 6, 4, ())]


def test_ragged_equals_dense():
  """Values and gradients, all shape cases in one jitted program; values eagerly for one case
  (eager autodiff dispatches hundreds of single-op programs: too slow for the 2-core CI)."""
  problems = []
  for b, l, e, k, unused in CASES:
    problems.append(_problem(b * l + e, b * l, 16, e, 8, k, unused))
    s = moe.sort_by_expert(problems[-1][3], e)
    assert int(s.group_sizes.sum()) == b * l * k
    assert all(int(s.group_sizes[u]) == 0 for u in unused)
  jitted = jax.jit(lambda ps: [_both(*p) for p in ps])(problems)
  worst = 0.0
  for case, p, r in zip(CASES, problems, jitted):
    errs = {"jit": _errs(r)}
    if case == CASES[1]:
      x, gate_up, down, ids, w = p
      dense = moe.dense_expert_mlp(x, gate_up, down, ids, w, jax.nn.silu)
      errs["eager"] = (max(_max(dense, fn(x, gate_up, down, ids, w, jax.nn.silu))
                           for fn in (moe.ragged_expert_mlp, moe.gather_expert_mlp)), 0.0)
    print(f"B,L,E,k,unused={case}: max abs err (out, grad) {errs}")
    worst = max(worst, *(max(v) for v in errs.values()))
  assert worst <= TOL, worst


def test_shape_errors():
  x, gate_up, down, ids, w = _problem(0, 4, 16, 4, 8, 2)
  with pytest.raises(ValueError, match=r"\[T, D\]"):
    moe.ragged_expert_mlp(x[None], gate_up, down, ids, w, jax.nn.silu)
  with pytest.raises(ValueError, match="down must be"):
    moe.ragged_expert_mlp(x, gate_up, down[:, :4], ids, w, jax.nn.silu)
  with pytest.raises(ValueError, match="weights must"):
    moe.dense_expert_mlp(x, gate_up, down, ids, w[:, :1], jax.nn.silu)


# ------------------------------------------------------------------------------------------------
# Config, block (bf16) and the whole text model.

TEXT = dict(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2, head_dim=8, num_experts=8,
            num_experts_per_tok=2, moe_intermediate_size=16)


def test_config_validation():
  assert Q.Qwen3TextConfig(**TEXT).moe_implementation == "auto"
  # auto: gather while tokens x k < experts (decode), dense otherwise; explicit choices kept
  assert moe.choose_implementation("auto", 2, 128, 8) == "gather"
  assert moe.choose_implementation("auto", 16, 128, 8) == "dense"
  assert moe.choose_implementation("ragged", 1, 128, 8) == "ragged"
  with pytest.raises(ValueError, match="moe_implementation"):
    Q.Qwen3TextConfig(**TEXT, moe_implementation="sparse")
  # never taken from an HF config dict: the default stays
  cfg = Q.Qwen3TextConfig.from_hf_dict({**TEXT, "model_type": "qwen3_moe",
                                        "moe_implementation": "ragged"})
  assert cfg.moe_implementation == "auto" and cfg.num_experts == 8
  assert dataclasses.replace(cfg, moe_implementation="ragged").moe_implementation == "ragged"


def _randomize(params, seed):
  """Norm scales 1 + 0.1 N, matrices N(0, 1/fan_in) (fan_in = second-to-last dim)."""
  leaves, tree = jax.tree_util.tree_flatten_with_path(params)
  keys = jax.random.split(jax.random.key(seed), len(leaves))
  out = []
  for (path, p), key in zip(leaves, keys):
    n = jax.random.normal(key, p.shape, p.dtype)
    out.append(1.0 + 0.1 * n if "scale" in jax.tree_util.keystr(path)
               else n / np.sqrt(p.shape[-2] if p.ndim > 1 else 1))
  return jax.tree_util.tree_unflatten(tree, out)


def test_block_bf16_and_grads():
  """Sparse MoE block: ragged == dense in float32 (value and gradients w.r.t. params and x) and
  close in bfloat16 (same parameters, compute dtype bf16)."""
  cfg = Q.Qwen3TextConfig(**TEXT)
  rag = dataclasses.replace(cfg, moe_implementation="ragged")
  x = jax.random.normal(jax.random.key(1), (2, 6, 32), jnp.float32)
  params = _randomize(nn.unbox(Q.Qwen3SparseMoeBlock(cfg).init(jax.random.key(0), x))["params"], 2)

  def run(params, x):
    out = {}
    for name, c in (("dense", cfg), ("ragged", rag)):
      f = lambda p, x, c=c: jnp.sum(jnp.sin(Q.Qwen3SparseMoeBlock(c).apply({"params": p}, x)))
      out[name] = (Q.Qwen3SparseMoeBlock(c).apply({"params": params}, x),
                   jax.grad(f, argnums=(0, 1))(params, x),
                   Q.Qwen3SparseMoeBlock(c, dtype=jnp.bfloat16).apply({"params": params}, x))
    return out

  out = jax.jit(run)(params, x)
  (yd, gd, bd), (yr, gr, br) = out["dense"], out["ragged"]
  err_y = _max(yd, yr)
  chex.assert_trees_all_equal_shapes_and_dtypes(gr, gd)
  err_g = max(_max(p, q) for p, q in zip(jax.tree.leaves(gd), jax.tree.leaves(gr)))
  assert br.dtype == bd.dtype == jnp.bfloat16
  err_bf16 = _max(bd, br) / float(jnp.max(jnp.abs(yd)))
  err_bf16_ref = _max(bd, yd) / float(jnp.max(jnp.abs(yd)))
  print(f"block f32 max abs err {err_y:.2e}, grads {err_g:.2e}; bf16 ragged-vs-dense "
        f"{err_bf16:.2e} (bf16 dense vs f32: {err_bf16_ref:.2e}) relative to max |y|")
  chex.assert_trees_all_close((yr, gr), (yd, gd), atol=TOL, rtol=0)
  chex.assert_tree_all_finite(br)
  assert err_bf16 < 0.05


def _model_inputs(cfg, b=2, l=8):
  rng = np.random.RandomState(0)
  ids = jnp.asarray(rng.randint(0, cfg.vocab_size, size=(b, l)), jnp.int32)
  mask = np.ones((b, l), bool)
  mask[1, :3] = False
  pos = np.clip(np.cumsum(mask, axis=1) - 1, 0, None)
  inv = 1.0 / (cfg.rope_theta ** (np.arange(0, cfg.head_dim, 2) / cfg.head_dim))
  ang = jnp.asarray(pos[..., None] * inv, jnp.float32)
  return ids, ang, jnp.asarray(mask)


def test_text_model_logits_dense_vs_ragged_and_on_8_device_mesh():
  """Whole tiny Qwen3-MoE ``Qwen3LM``: "ragged" logits (unscanned and scanned) equal "dense" ones;
  and the ragged model with parameters placed by the default logical rules on a (data 2,
  tensor 2, expert 2) mesh gives the same logits (correctness; see vlm.nn.moe for the cost)."""
  cfg = Q.Qwen3TextConfig(**TEXT, moe_implementation="dense")
  rag = dataclasses.replace(cfg, moe_implementation="ragged")
  gat = dataclasses.replace(cfg, moe_implementation="gather")
  ids, ang, mask = _model_inputs(cfg, b=4)
  params = _randomize(nn.unbox(Q.Qwen3LM(cfg).init(jax.random.key(0), ids, ang))["params"], 3)

  def run(params):
    return [Q.Qwen3LM(c, scan_layers=s).apply(
        {"params": Q.stack_layers(params) if s else params}, ids, ang, mask)[0]
            for c, s in ((cfg, False), (rag, False), (rag, True), (gat, True))]

  dense, ragged, ragged_scan, gather_scan = jax.jit(run)(params)
  real = np.asarray(mask)
  err = lambda o: float(np.abs(np.asarray(o) - np.asarray(dense))[real].max())

  rules, mesh = mesh_lib.DEFAULT_RULES, mesh_lib.make_mesh({"data": 2, "tensor": 2, "expert": 2})
  model = Q.Qwen3LM(rag)
  with nn.logical_axis_rules(rules):
    _, shardings = step_lib.param_shardings(model, (ids, ang), mesh, rules)
  sharded = jax.device_put(params, shardings)
  spec = sharded["model"]["layers_0"]["mlp"]["experts"]["gate_up_proj"].sharding.spec
  assert spec[0] == "expert", spec
  with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
    on_mesh = jax.jit(model.apply)({"params": sharded}, ids, ang, mask)[0]
  errs = [err(ragged), err(ragged_scan), err(on_mesh), err(gather_scan)]
  print(f"Qwen3LM logits max abs err vs dense: gather+scan {errs[3]:.2e}, ragged {errs[0]:.2e}, "
        f"ragged+scan {errs[1]:.2e}, "
        f"ragged on 8-device mesh {errs[2]:.2e} (max |logit| {float(jnp.max(jnp.abs(dense))):.2f})")
  assert max(errs) <= TOL
