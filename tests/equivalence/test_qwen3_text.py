"""vlm.models.qwen3 against HF transformers 4.57.1 on tiny random configs (float32).

Covers Qwen3 dense (``Qwen3ForCausalLM``), Qwen3-MoE (``Qwen3MoeForCausalLM``, norm_topk_prob on/off,
mixed dense/MoE layers), Qwen2.5-style attention (``Qwen2ForCausalLM``: q/k/v bias, no q/k norm),
DeepStack (``Qwen3VLTextModel``), KV-cache decoding, scan on/off and a bfloat16 smoke test.
The HF -> vlm parameter map here is test-local.
"""
import numpy as np
import pytest
import torch

import jax
import jax.numpy as jnp
import flax.linen as nn

from transformers import (Qwen2Config, Qwen2ForCausalLM, Qwen3Config, Qwen3ForCausalLM,
                          Qwen3MoeConfig, Qwen3MoeForCausalLM)
from transformers.models.qwen3_vl.configuration_qwen3_vl import Qwen3VLTextConfig
from transformers.models.qwen3_vl.modeling_qwen3_vl import Qwen3VLTextModel

from tests.equivalence.qwen_hf_utils import randomize_hf
from vlm.models import qwen3 as Q

TOL = 1e-5
B, L, PAD = 2, 10, 3      # row 1 is left-padded with PAD tokens
DECODE = 5                # decode steps in the KV-cache test
COMMON = dict(vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
              num_attention_heads=4, num_key_value_heads=2, head_dim=16, rms_norm_eps=1e-6,
              rope_theta=10000.0, max_position_embeddings=64, attn_implementation="eager")


# ------------------------------------------------------------------------------------------------
# Helpers.


def hf_to_vlm(state_dict, num_experts=0, tied=False):
  """HF state dict -> vlm param tree ({"model": ..., "lm_head": ...}); keys without a ``model.``
  prefix (HF ``*Model`` classes) go under ``model``. qwen3_moe's per-expert MLPs are fused into
  ``experts/gate_up_proj`` [E, D, 2I] and ``experts/down_proj`` [E, I, D]."""
  tree = {}
  experts = {}

  def put(path, value):
    node = tree
    for p in path[:-1]:
      node = node.setdefault(p, {})
    node[path[-1]] = value

  for key, t in state_dict.items():
    if key.endswith("rotary_emb.inv_freq") or (tied and key == "lm_head.weight"):
      continue
    v = t.detach().cpu().numpy().astype(np.float32)
    parts = key.split(".")
    if parts[0] == "model":
      parts = parts[1:]
    if parts[0] != "lm_head":
      parts = ["model"] + parts
    path = []
    for p in parts:
      if p.isdigit() and path and path[-1] == "layers":
        path[-1] = f"layers_{p}"
      else:
        path.append(p)
    if "experts" in path and path[path.index("experts") + 1].isdigit():
      i = path.index("experts")
      e, proj = int(path[i + 1]), path[i + 2]
      experts.setdefault(tuple(path[:i + 1]), {}).setdefault(proj, {})[e] = v.T
      continue
    name, leaf = path[:-1], path[-1]
    if leaf == "bias":
      put(name + ["bias"], v)
    elif name[-1] == "embed_tokens":
      put(name + ["embedding"], v)
    elif name[-1].endswith("norm"):
      put(name + ["scale"], v)
    elif leaf == "weight":
      put(name + ["kernel"], v.T)
    else:  # fused expert tensors keep their names and layout
      put(path, v)
  for path, projs in experts.items():
    idx = range(num_experts)
    gate = np.stack([projs["gate_proj"][e] for e in idx])
    up = np.stack([projs["up_proj"][e] for e in idx])
    put(list(path) + ["gate_up_proj"], np.concatenate([gate, up], axis=-1))
    put(list(path) + ["down_proj"], np.stack([projs["down_proj"][e] for e in idx]))
  return jax.tree_util.tree_map(jnp.asarray, tree)


def _inputs(seed=0):
  rng = np.random.RandomState(seed)
  ids = rng.randint(0, 128, size=(B, L)).astype(np.int32)
  mask = np.ones((B, L), bool)
  mask[1, :PAD] = False
  ids[1, :PAD] = 0
  pos = np.clip(np.cumsum(mask, axis=1) - 1, 0, None).astype(np.int32)
  return ids, mask, pos


def _angles(positions, inv_freq):
  """1-D RoPE angles [B, L, hd/2] = positions * inv_freq (float32)."""
  return jnp.asarray(positions, jnp.float32)[..., None] * jnp.asarray(inv_freq, jnp.float32)


def _check_params_match(module, params, *args):
  """The converted tree has exactly the shapes ``init`` creates."""
  want = jax.eval_shape(lambda: nn.unbox(module.init(jax.random.key(0), *args))["params"])
  got = jax.tree_util.tree_map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), params)
  assert jax.tree_util.tree_structure(want) == jax.tree_util.tree_structure(got)
  for w, g in zip(jax.tree_util.tree_leaves(want), jax.tree_util.tree_leaves(got)):
    assert w.shape == g.shape


def _hf_logits(model, ids, mask, pos):
  with torch.no_grad():
    out = model(input_ids=torch.tensor(ids, dtype=torch.long),
                attention_mask=torch.tensor(mask, dtype=torch.long),
                position_ids=torch.tensor(pos, dtype=torch.long), use_cache=False)
  return out.logits.numpy()


def _max_err(a, b, mask):
  return float(np.max(np.abs(np.asarray(a) - np.asarray(b))[mask]))


# ------------------------------------------------------------------------------------------------
# Qwen3 dense: logits, KV cache, scan, bf16 (one HF model, shared).


@pytest.fixture(scope="module")
def dense():
  torch.manual_seed(0)
  hf = randomize_hf(Qwen3ForCausalLM(Qwen3Config(**COMMON, tie_word_embeddings=False)), 0)
  cfg = Q.Qwen3TextConfig.from_hf_dict(hf.config.to_dict())
  params = hf_to_vlm(hf.state_dict())
  inv_freq = hf.model.rotary_emb.inv_freq.numpy()
  return hf, cfg, params, inv_freq


def test_config_from_hf(dense):
  _, cfg, _, _ = dense
  assert cfg.use_qk_norm and not cfg.attention_bias and not cfg.use_o_proj_bias
  assert (cfg.head_dim, cfg.num_key_value_heads, cfg.num_experts) == (16, 2, 0)
  q2 = Q.Qwen3TextConfig.from_hf_dict(Qwen2Config(**COMMON).to_dict())
  assert q2.attention_bias and not q2.use_o_proj_bias and not q2.use_qk_norm
  with pytest.raises(ValueError, match="num_key_value_heads"):
    Q.Qwen3TextConfig(num_attention_heads=4, num_key_value_heads=3, head_dim=16)


def test_dense_logits(dense):
  hf, cfg, params, inv_freq = dense
  ids, mask, pos = _inputs()
  model = Q.Qwen3LM(cfg)
  _check_params_match(model, params, jnp.asarray(ids), _angles(pos, inv_freq))
  ours, _ = jax.jit(model.apply)({"params": params}, ids, _angles(pos, inv_freq), mask)
  err = _max_err(ours, _hf_logits(hf, ids, mask, pos), mask)
  print(f"qwen3 dense logits max abs err {err:.2e}")
  assert err <= TOL


def test_stack_unstack_roundtrip(dense):
  _, _, params, _ = dense
  stacked = Q.stack_layers(params)
  assert "layers" in stacked["model"] and "layers_0" not in stacked["model"]
  assert stacked["model"]["layers"]["self_attn"]["q_proj"]["kernel"].shape == (2, 64, 64)
  jax.tree_util.tree_map(np.testing.assert_array_equal, Q.unstack_layers(stacked), params)


@pytest.mark.parametrize("scan", [False, True])
def test_kv_cache_decode(dense, scan):
  """Prefill L tokens (left-padded) into a cache of L + DECODE slots, then DECODE one-token steps;
  the logits equal the full forward over L + DECODE tokens at those positions. With ``scan`` the
  model also runs rematerialised and its full forward is checked against the unscanned one."""
  _, cfg, params, inv_freq = dense
  rng = np.random.RandomState(2)
  ids, mask, pos = _inputs(2)
  ids = np.concatenate([ids, rng.randint(0, 128, size=(B, DECODE)).astype(np.int32)], axis=1)
  mask = np.concatenate([mask, np.ones((B, DECODE), bool)], axis=1)
  pos = np.clip(np.cumsum(mask, axis=1) - 1, 0, None).astype(np.int32)
  total = L + DECODE
  model = Q.Qwen3LM(cfg, scan_layers=scan, remat=scan)

  def run(params, ids, mask, pos):
    p = {"params": Q.stack_layers(params) if scan else params}
    ang = _angles(pos, inv_freq)
    full, _ = model.apply(p, ids, ang, mask)
    ref = Q.Qwen3LM(cfg).apply({"params": params}, ids, ang, mask)[0] if scan else full
    cache = Q.init_cache(cfg, B, total)
    pre, cache = model.apply(p, ids[:, :L], ang[:, :L], mask[:, :L], kv_cache=cache,
                             cache_index=0)

    def step(cache, t):
      tok = jax.lax.dynamic_slice_in_dim(ids, t, 1, axis=1)
      a = jax.lax.dynamic_slice_in_dim(ang, t, 1, axis=1)
      m = jax.lax.dynamic_slice_in_dim(mask, t, 1, axis=1)
      logits, cache = model.apply(p, tok, a, m, kv_cache=cache, cache_index=t)
      return cache, logits[:, 0]

    _, dec = jax.lax.scan(step, cache, jnp.arange(L, total))
    return ref, full, pre, jnp.swapaxes(dec, 0, 1)

  ref, full, pre, dec = jax.jit(run)(params, ids, mask, pos)
  err_scan = _max_err(full, ref, mask)
  err_pre = _max_err(pre, full[:, :L], mask[:, :L])
  err_dec = float(np.max(np.abs(np.asarray(dec) - np.asarray(full[:, L:]))))
  print(f"scan={scan} scan-vs-unscanned {err_scan:.2e} prefill err {err_pre:.2e}, "
        f"decode err {err_dec:.2e}")
  assert err_scan <= TOL and err_pre <= TOL and err_dec <= TOL


def test_bf16_smoke(dense):
  _, cfg, params, inv_freq = dense
  ids, mask, pos = _inputs()
  ang = _angles(pos, inv_freq)

  def run(params):
    ref, _ = Q.Qwen3LM(cfg).apply({"params": params}, ids, ang, mask)
    p16 = jax.tree_util.tree_map(lambda x: x.astype(jnp.bfloat16), params)
    out, _ = Q.Qwen3LM(cfg, dtype=jnp.bfloat16, param_dtype=jnp.bfloat16,
                       scan_layers=True).apply({"params": Q.stack_layers(p16)}, ids, ang, mask)
    return ref, out

  ref, out = jax.jit(run)(params)
  assert out.dtype == jnp.float32
  assert np.all(np.isfinite(np.asarray(out)))
  rel = _max_err(out, ref, mask) / float(np.max(np.abs(np.asarray(ref))))
  print(f"bf16 vs f32 max err relative to max |logit|: {rel:.2e}")
  assert rel < 0.1


# ------------------------------------------------------------------------------------------------
# Qwen3-MoE, Qwen2.5, DeepStack.


@pytest.mark.parametrize("norm_topk_prob,mlp_only_layers", [(True, []), (False, [1])])
def test_moe_logits(norm_topk_prob, mlp_only_layers):
  torch.manual_seed(0)
  hf_cfg = Qwen3MoeConfig(**COMMON, num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32,
                          norm_topk_prob=norm_topk_prob, decoder_sparse_step=1,
                          mlp_only_layers=mlp_only_layers, tie_word_embeddings=True)
  hf = randomize_hf(Qwen3MoeForCausalLM(hf_cfg), 1)
  cfg = Q.Qwen3TextConfig.from_hf_dict(hf.config.to_dict())
  assert cfg.norm_topk_prob == norm_topk_prob and cfg.tie_word_embeddings
  assert Q.layer_kinds(cfg) == ["moe", "dense" if mlp_only_layers else "moe"]
  params = hf_to_vlm(hf.state_dict(), num_experts=4, tied=True)
  assert "lm_head" not in params  # tied
  assert params["model"]["layers_0"]["mlp"]["experts"]["gate_up_proj"].shape == (4, 64, 64)
  ids, mask, pos = _inputs(3)
  ang = _angles(pos, hf.model.rotary_emb.inv_freq.numpy())
  model = Q.Qwen3LM(cfg)
  _check_params_match(model, params, jnp.asarray(ids), ang)
  ours, _ = jax.jit(model.apply)({"params": params}, ids, ang, mask)
  err = _max_err(ours, _hf_logits(hf, ids, mask, pos), mask)
  print(f"qwen3-moe norm_topk_prob={norm_topk_prob} logits max abs err {err:.2e}")
  assert err <= TOL
  if mlp_only_layers:
    with pytest.raises(ValueError, match="scan_layers"):
      Q.Qwen3LM(cfg, scan_layers=True).init(jax.random.key(0), jnp.asarray(ids), ang)


def test_qwen2_logits():
  torch.manual_seed(0)
  hf = randomize_hf(Qwen2ForCausalLM(Qwen2Config(**COMMON, tie_word_embeddings=False)), 2)
  cfg = Q.Qwen3TextConfig.from_hf_dict(hf.config.to_dict())
  params = hf_to_vlm(hf.state_dict())
  attn = params["model"]["layers_0"]["self_attn"]
  assert "bias" in attn["q_proj"] and "bias" not in attn["o_proj"] and "q_norm" not in attn
  ids, mask, pos = _inputs(4)
  ang = _angles(pos, hf.model.rotary_emb.inv_freq.numpy())
  model = Q.Qwen3LM(cfg)
  _check_params_match(model, params, jnp.asarray(ids), ang)
  ours, _ = jax.jit(model.apply)({"params": params}, ids, ang, mask)
  err = _max_err(ours, _hf_logits(hf, ids, mask, pos), mask)
  print(f"qwen2 logits max abs err {err:.2e}")
  assert err <= TOL


def test_deepstack_matches_qwen3vl_text_model():
  """Qwen3VLTextModel with visual_pos_masks + 2 deepstack tensors; vlm gets them scattered to
  [B, L, D]. Unscanned and scanned must both match."""
  torch.manual_seed(0)
  hf_cfg = Qwen3VLTextConfig(**{k: v for k, v in COMMON.items() if k != "attn_implementation"},
                             rope_scaling={"rope_type": "default", "mrope_section": [4, 2, 2]})
  hf_cfg._attn_implementation = "eager"
  hf = randomize_hf(Qwen3VLTextModel(hf_cfg), 3)
  cfg = Q.Qwen3TextConfig.from_hf_dict(hf.config.to_dict())
  params = hf_to_vlm(hf.state_dict())
  assert set(params) == {"model"}
  rng = np.random.RandomState(5)
  ids, mask, pos = _inputs(5)
  visual = np.zeros((B, L), bool)
  visual[0, 2:6] = True
  visual[1, 5:8] = True
  n_vis = int(visual.sum())
  ds = [rng.randn(n_vis, 64).astype(np.float32) for _ in range(2)]
  embeds = hf.embed_tokens(torch.tensor(ids, dtype=torch.long)).detach()
  with torch.no_grad():
    ref = hf(inputs_embeds=embeds, attention_mask=torch.tensor(mask, dtype=torch.long),
             position_ids=torch.tensor(pos, dtype=torch.long), use_cache=False,
             visual_pos_masks=torch.tensor(visual),
             deepstack_visual_embeds=[torch.tensor(d) for d in ds]).last_hidden_state.numpy()
  dense_ds = []
  for d in ds:
    full = np.zeros((B, L, 64), np.float32)
    full[visual] = d
    dense_ds.append(jnp.asarray(full))
  ang = _angles(pos, hf.rotary_emb.inv_freq.numpy())
  x = jnp.asarray(embeds.numpy())

  def run(params, stacked):
    a, _ = Q.Qwen3Model(cfg).apply({"params": params["model"]}, x, ang, mask, dense_ds, visual)
    b, _ = Q.Qwen3Model(cfg, scan_layers=True).apply({"params": stacked["model"]}, x, ang, mask,
                                                     dense_ds, visual)
    return a, b

  a, b = jax.jit(run)(params, Q.stack_layers(params))
  err_a, err_b = _max_err(a, ref, mask), _max_err(b, ref, mask)
  print(f"deepstack hidden max abs err unscanned {err_a:.2e} scanned {err_b:.2e}")
  assert err_a <= TOL and err_b <= TOL


def test_rmsnorm_bf16_rounding_matches_hf():
  """bfloat16 RMSNorm is bit-identical to HF ``Qwen3RMSNorm`` (normalise in float32, cast, then
  multiply by the weight: spec 11 item 6); multiplying in float32 first changed ~25% of values."""
  from transformers.models.qwen3.modeling_qwen3 import Qwen3RMSNorm
  from vlm.nn import layers
  x = np.random.default_rng(0).standard_normal((4, 64, 256)).astype(np.float32) * 3
  w = (1 + 0.1 * np.random.default_rng(1).standard_normal(256)).astype(np.float32)
  hf = Qwen3RMSNorm(256, eps=1e-6).to(torch.bfloat16)
  with torch.no_grad():
    hf.weight.copy_(torch.tensor(w))
    want = hf(torch.tensor(x).to(torch.bfloat16)).float().numpy()
  norm = layers.RMSNorm(1e-6, dtype=jnp.bfloat16, param_dtype=jnp.bfloat16)
  got = norm.apply({"params": {"scale": jnp.asarray(w, jnp.bfloat16)}}, jnp.asarray(x, jnp.bfloat16))
  np.testing.assert_array_equal(np.asarray(got.astype(jnp.float32)), want)
