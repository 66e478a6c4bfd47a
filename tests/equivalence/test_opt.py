"""vlm.models.opt and vlm.convert.hf_opt against HF transformers 4.57.1 ``OPTForCausalLM``.

Tiny random float32 models (torch CPU, eager attention): logits (pre-LN and post-LN with
project_in/out and an untied head; left, right and mixed padding; token ids and raw
inputs_embeds), the ``labels=`` loss and every parameter gradient, KV-cache decoding against the
full forward and against HF greedy ``generate`` with left padding, scan/remat against the plain
layout, the safetensors round trip both ways (single and sharded files), key errors, configs and
the analytic parameter counts. The HF -> vlm parameters go through ``opt_params_from_hf_state``.
"""
from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch
import transformers

import flax.linen as nn
import jax
import jax.numpy as jnp

from tests.equivalence.blip2_hf_utils import max_abs, randomize_
from vlm.convert import hf_opt
from vlm.models import opt as O
from vlm.models import qwen3
from vlm.objectives.lm import next_token_loss

TOL = 1e-5
VOCAB = 101
BASE = dict(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, ffn_dim=37,
            num_attention_heads=4, max_position_embeddings=24, dropout=0.0)
CONFIGS = {
    # OPT-2.7b/6.7b layout: pre-LN, tied head, no projections
    "pre": dict(BASE, do_layer_norm_before=True),
    # OPT-350m layout: post-LN, word_embed_proj_dim != hidden (project_in/out); untied head
    "post": dict(BASE, do_layer_norm_before=False, word_embed_proj_dim=16,
                 tie_word_embeddings=False),
}
B, L = 3, 9


def _hf_model(name: str, seed: int = 0):
  torch.manual_seed(seed)
  cfg = transformers.OPTConfig(**CONFIGS[name], attn_implementation="eager")
  return randomize_(transformers.OPTForCausalLM(cfg), seed)


def _state(model) -> dict[str, np.ndarray]:
  return {k: v.detach().cpu().numpy() for k, v in model.state_dict().items()}


_CACHE: dict = {}


def _pair(name: str):
  """(HF model, vlm config, vlm params) for one tiny config (built once per module)."""
  if name not in _CACHE:
    hf = _hf_model(name)
    config = O.OPTConfig.from_hf_config(hf.config.to_dict())
    params = hf_opt.opt_params_from_hf_state(_state(hf), config)
    _CACHE[name] = (hf, config, jax.tree_util.tree_map(jnp.asarray, params))
  return _CACHE[name]


def _batch(seed: int = 0):
  """ids [B, L]; mask: row 0 full, row 1 left-padded by 3, row 2 right-padded by 2."""
  rng = np.random.default_rng(seed)
  ids = rng.integers(3, VOCAB, size=(B, L)).astype(np.int64)
  mask = np.ones((B, L), np.int64)
  mask[1, :3] = 0
  mask[2, L - 2:] = 0
  ids[mask == 0] = 1  # pad id
  return ids, mask


_JIT: dict = {}


def _forward(config, **kw):
  """Jitted ``(params, ids or None, mask or None, embeds or None) -> logits`` (one per model)."""
  key = (config, tuple(sorted(kw.items())))
  if key not in _JIT:
    model = O.OPTForCausalLM(config, **kw)

    def fn(params, ids, mask, embeds):
      if embeds is None:
        embeds = model.apply({"params": params}, ids, method=model.embed)
      return model.apply({"params": params}, embeds, mask)[0]

    _JIT[key] = jax.jit(fn)
  return _JIT[key]


def _vlm_logits(config, params, ids=None, mask=None, embeds=None, **kw):
  out = _forward(config, **kw)(params, None if ids is None else jnp.asarray(ids),
                               None if mask is None else jnp.asarray(mask), embeds)
  return np.asarray(out)


@pytest.mark.parametrize("name", list(CONFIGS))
def test_logits_match_hf(name):
  hf, config, params = _pair(name)
  ids, mask = _batch()
  with torch.no_grad():
    ref = hf(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask)).logits.numpy()
  got = _vlm_logits(config, params, ids, mask)
  real = mask.astype(bool)
  err_real = max_abs(got[real], ref[real])
  err_all = max_abs(got, ref)  # pad rows too: both average uniformly over fully masked rows
  print(f"{name}: logits max err (real tokens) {err_real:.2e}, (all positions) {err_all:.2e}")
  assert err_real < TOL and err_all < TOL

  # raw inputs_embeds (the BLIP-2 path) with pure left padding
  emb = np.random.default_rng(1).standard_normal((2, 7, config.embed_dim)).astype(np.float32)
  lmask = np.ones((2, 7), np.int64)
  lmask[0, :2] = 0
  with torch.no_grad():
    ref = hf(inputs_embeds=torch.tensor(emb), attention_mask=torch.tensor(lmask)).logits.numpy()
  got = _vlm_logits(config, params, mask=lmask, embeds=jnp.asarray(emb))
  err = max_abs(got[lmask.astype(bool)], ref[lmask.astype(bool)])
  print(f"{name}: inputs_embeds logits max err {err:.2e}")
  assert err < TOL
  # no mask at all = all real
  with torch.no_grad():
    ref = hf(inputs_embeds=torch.tensor(emb)).logits.numpy()
  assert max_abs(_vlm_logits(config, params, embeds=jnp.asarray(emb)), ref) < TOL


@pytest.mark.parametrize("name", list(CONFIGS))
def test_loss_and_gradients_match_hf(name):
  hf, config, params = _pair(name)
  ids, mask = _batch(2)
  labels = np.where(mask == 1, ids, -100)
  labels[0, :2] = -100  # a masked "prompt"
  # the first real token of the left-padded row would be predicted from a pad position, a query
  # with no valid key: both sides then average uniformly over all keys (equal forward), but HF's
  # additive mask (score + finfo.min) passes gradient into those scores and vlm's where() does
  # not. Real data never has a label there (BOS is the first real token), so it is ignored here.
  labels[1, 3] = -100
  hf.zero_grad()
  out = hf(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask),
           labels=torch.tensor(labels))
  out.loss.backward()
  ref_loss = float(out.loss.detach())
  ref_grads = {k: p.grad.numpy().copy() for k, p in hf.named_parameters()}
  hf.zero_grad()
  ref_grads = hf_opt.opt_params_from_hf_state(ref_grads, config)

  model = O.OPTForCausalLM(config)
  targets = jnp.asarray(labels[:, 1:])

  def loss_fn(p):
    emb = model.apply({"params": p}, jnp.asarray(ids), method=model.embed)
    logits, _ = model.apply({"params": p}, emb, jnp.asarray(mask))
    # HF: logits[:, :-1] predict labels[:, 1:], -100 ignored, mean over the rest
    return next_token_loss(logits[:, :-1], jnp.where(targets == -100, 0, targets),
                           targets != -100)

  loss, grads = jax.jit(jax.value_and_grad(loss_fn))(params)
  loss_err = abs(float(loss) - ref_loss)
  errs = jax.tree_util.tree_map(lambda g, r: max_abs(g, r), grads, ref_grads)
  worst = max(jax.tree_util.tree_leaves(errs))
  print(f"{name}: loss {float(loss):.6f} err {loss_err:.2e}; max gradient err {worst:.2e} over "
        f"{len(jax.tree_util.tree_leaves(errs))} tensors")
  assert loss_err < TOL
  assert worst < TOL, errs


@pytest.mark.parametrize("name", list(CONFIGS))
def test_kv_cache_decoding_matches_full_forward_and_hf_generate(name):
  hf, config, params = _pair(name)
  model = O.OPTForCausalLM(config)
  prompt, pmask = _batch(3)
  prompt, pmask = prompt[:2, :6].copy(), np.ones((2, 6), np.int64)
  pmask[1, :2] = 0  # left padding
  prompt[1, :2] = 1
  steps = 4
  cache = O.init_cache(config, 2, 6 + steps)

  @jax.jit
  def prefill(p, ids, mask, cache):  # static cache_index 0: empty cache
    emb = model.apply({"params": p}, ids, method=model.embed)
    return model.apply({"params": p}, emb, mask, kv_cache=cache, cache_index=0)

  @jax.jit
  def step(p, ids, cache, index):
    emb = model.apply({"params": p}, ids, method=model.embed)
    return model.apply({"params": p}, emb, jnp.ones(ids.shape, bool), kv_cache=cache,
                       cache_index=index)

  logits, cache = prefill(params, jnp.asarray(prompt), jnp.asarray(pmask), cache)
  step_logits = [np.asarray(logits)]
  tokens = []
  for t in range(steps):
    nxt = jnp.argmax(logits[:, -1], axis=-1)[:, None]
    tokens.append(np.asarray(nxt))
    logits, cache = step(params, nxt, cache, jnp.asarray(6 + t))
    step_logits.append(np.asarray(logits))
  cached = np.concatenate(step_logits, axis=1)  # [2, 6 + steps, V]
  new = np.concatenate(tokens, axis=1)
  full_ids = np.concatenate([prompt, new], axis=1)
  full_mask = np.concatenate([pmask, np.ones((2, steps), np.int64)], axis=1)
  full = _vlm_logits(config, params, full_ids, full_mask)
  real = full_mask.astype(bool)
  err = max_abs(cached[real], full[real])
  print(f"{name}: cached decoding vs full forward max err {err:.2e}")
  assert err < TOL
  with torch.no_grad():
    ref_ids = hf.generate(input_ids=torch.tensor(prompt), attention_mask=torch.tensor(pmask),
                          max_new_tokens=steps, do_sample=False, num_beams=1, pad_token_id=1,
                          eos_token_id=None)
  np.testing.assert_array_equal(ref_ids[:, 6:].numpy(), new)


def test_scan_and_remat_equal_unscanned():
  hf, config, params = _pair("post")
  ids, mask = _batch(4)
  stacked = hf_opt.opt_params_from_hf_state(_state(hf), config, scan_layers=True)
  stacked = jax.tree_util.tree_map(jnp.asarray, stacked)
  base = _vlm_logits(config, params, ids, mask)
  err = max_abs(_vlm_logits(config, stacked, ids, mask, scan_layers=True, remat=True), base)
  # the stacked layout is vlm.models.qwen3.stack_layers of the plain one
  jax.tree_util.tree_map(np.testing.assert_array_equal, qwen3.stack_layers(params), stacked)

  def grads(p, **kw):
    model = O.OPTForCausalLM(config, **kw)
    emb = jnp.asarray(np.random.default_rng(0).standard_normal((B, L, 16)), jnp.float32)
    loss = lambda q: jnp.mean(jnp.sin(model.apply({"params": q}, emb, mask)[0]))
    return jax.jit(jax.grad(loss))(p)

  g_plain = qwen3.stack_layers(grads(params))
  g_scan = grads(stacked, scan_layers=True, remat=True)
  gerr = max(jax.tree_util.tree_leaves(jax.tree_util.tree_map(max_abs, g_plain, g_scan)))
  print(f"scan+remat vs unscanned: logits max err {err:.2e}, gradient max err {gerr:.2e}")
  assert err < TOL and gerr < TOL
  # the scanned cache path (dynamic cache_index into a longer cache) gives the same logits
  model = O.OPTForCausalLM(config, scan_layers=True)
  emb = model.apply({"params": stacked}, jnp.asarray(ids), method=model.embed)
  cached, cache = jax.jit(lambda p, c: model.apply({"params": p}, emb, jnp.asarray(mask),
                                                   kv_cache=c, cache_index=jnp.asarray(0)))(
      stacked, O.init_cache(config, B, L + 3))
  real = mask.astype(bool)
  assert max_abs(np.asarray(cached)[real], base[real]) < TOL
  np.testing.assert_array_equal(np.asarray(cache["mask"][:, :L]), real)
  # init creates the same tree in both layouts (untied head and token table included)
  emb = jnp.zeros((1, 3, 16))
  shapes = lambda **kw: jax.tree_util.tree_map(lambda a: a.shape, nn.unbox(jax.eval_shape(
      O.OPTForCausalLM(config, **kw).init, jax.random.key(0), emb)["params"]))
  assert shapes() == jax.tree_util.tree_map(lambda a: a.shape, params)
  assert shapes(scan_layers=True) == jax.tree_util.tree_map(lambda a: a.shape, stacked)


def test_dropout_is_active_only_when_not_deterministic():
  _, config, params = _pair("pre")
  config = dataclasses.replace(config, dropout=0.3, attention_dropout=0.2)
  model = O.OPTForCausalLM(config)
  emb = jnp.asarray(np.random.default_rng(0).standard_normal((2, 5, 32)), jnp.float32)
  det, _ = jax.jit(model.apply)({"params": params}, emb)
  drop = jax.jit(lambda p, r: model.apply(p, emb, deterministic=False, rngs={"dropout": r})[0])
  a = drop({"params": params}, jax.random.key(1))
  b = drop({"params": params}, jax.random.key(2))
  assert max_abs(a, det) > 1e-3 and max_abs(a, b) > 1e-3


def test_safetensors_round_trip_both_ways(tmp_path):
  for name in CONFIGS:
    hf, config, params = _pair(name)
    ids, mask = _batch(5)
    # vlm -> HF directory -> transformers
    out = tmp_path / f"vlm_{name}"
    hf_opt.save_hf_opt(config, params, str(out))
    loaded = transformers.OPTForCausalLM.from_pretrained(str(out), attn_implementation="eager")
    with torch.no_grad():
      ref = loaded(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask)).logits.numpy()
    err = max_abs(_vlm_logits(config, params, ids, mask), ref)
    print(f"{name}: save_hf_opt -> OPTForCausalLM.from_pretrained logits max err {err:.2e}")
    assert err < TOL
    # vlm -> HF -> vlm is the identity (and scanned params save identically)
    config2, params2 = hf_opt.load_hf_opt(str(out))
    assert config2 == config
    jax.tree_util.tree_map(np.testing.assert_array_equal, params2, params)
    hf_opt.save_hf_opt(config, qwen3.stack_layers(params), str(tmp_path / f"scan_{name}"),
                       max_shard_size="8KB")
    _, params3 = hf_opt.load_hf_opt(str(tmp_path / f"scan_{name}"))
    jax.tree_util.tree_map(np.testing.assert_array_equal, params3, params)
    # transformers save_pretrained (sharded) -> vlm
    hf_dir = tmp_path / f"hf_{name}"
    hf.save_pretrained(str(hf_dir), max_shard_size="20KB")
    assert (hf_dir / "model.safetensors.index.json").exists()
    config4, params4 = hf_opt.load_hf_opt(str(hf_dir), scan_layers=True)
    assert config4 == config
    jax.tree_util.tree_map(np.testing.assert_array_equal, params4, qwen3.stack_layers(params))


def test_key_errors():
  hf, config, _ = _pair("pre")
  state = _state(hf)
  missing = dict(state)
  del missing["model.decoder.layers.1.fc2.bias"]
  with pytest.raises(ValueError, match=r"missing.*model\.decoder\.layers\.1\.fc2\.bias"):
    hf_opt.opt_params_from_hf_state(missing, config)
  extra = dict(state, **{"model.decoder.layers.2.fc1.weight": np.zeros((37, 32), np.float32)})
  with pytest.raises(ValueError, match=r"unknown.*model\.decoder\.layers\.2\.fc1\.weight"):
    hf_opt.opt_params_from_hf_state(extra, config)
  wrong = dict(state, **{"model.decoder.embed_positions.weight": np.zeros((24, 32), np.float32)})
  with pytest.raises(ValueError, match=r"embed_positions.*\(24, 32\).*expected \(26, 32\)"):
    hf_opt.opt_params_from_hf_state(wrong, config)
  untied = dict(state, **{"lm_head.weight": state["lm_head.weight"] + 1.0})
  with pytest.raises(ValueError, match="tie_word_embeddings=False"):
    hf_opt.opt_params_from_hf_state(untied, config)
  # a tied checkpoint without lm_head.weight (as save_pretrained writes it) is fine
  no_head = {k: v for k, v in state.items() if k != "lm_head.weight"}
  hf_opt.opt_params_from_hf_state(no_head, config)
  # BLIP-2 layout: language_model.* keys, the rest of the model skipped only when asked
  blip = {"language_model." + k: v for k, v in state.items()}
  blip["vision_model.embeddings.patch_embedding.weight"] = np.zeros((2, 2), np.float32)
  prefix = "language_model.model.decoder."
  with pytest.raises(ValueError, match="vision_model"):
    hf_opt.opt_params_from_hf_state(blip, config, prefix)
  got = hf_opt.opt_params_from_hf_state(blip, config, prefix, ignore_other_keys=True)
  back = hf_opt.hf_state_from_opt_params(got, config, prefix)
  assert sorted(back) == sorted(k for k in blip if k.startswith(prefix))
  with pytest.raises(ValueError, match="missing"):
    hf_opt.hf_state_from_opt_params({k: v for k, v in got.items() if k != "layers_0"}, config)


def test_config_and_presets():
  for name in CONFIGS:
    hf, config, _ = _pair(name)
    assert O.OPTConfig.from_hf_config(config.to_hf_config()) == config
    assert transformers.OPTConfig(**config.to_hf_config()).word_embed_proj_dim == config.embed_dim
    # analytic count == torch's count of the same model
    assert config.num_parameters() == hf.num_parameters()
  with pytest.raises(KeyError, match="opt_2.7b"):
    O.opt_preset("opt_13b")
  assert O.opt_preset("opt_tiny", num_hidden_layers=2).num_hidden_layers == 2
  with pytest.raises(ValueError, match="divisible"):
    O.OPTConfig(hidden_size=30, num_attention_heads=4)
  with pytest.raises(ValueError, match="model_type"):
    O.OPTConfig.from_hf_config({"model_type": "t5"})
  # published sizes: "2.7B" / "6.7B" are rounded names; HF counts 2.65B / 6.66B (spec 4)
  for name, nominal, exact in (("opt_2.7b", 2.7e9, 2.65e9), ("opt_6.7b", 6.7e9, 6.66e9)):
    n = O.opt_preset(name).num_parameters()
    print(f"{name}: {n:,} parameters")
    assert abs(n - exact) / exact < 0.01 and abs(n - nominal) / nominal < 0.02
  # the analytic count equals the shapes the module creates (traced only, nothing allocated)
  cfg = O.opt_preset("opt_2.7b")
  shapes = jax.eval_shape(O.OPTForCausalLM(cfg, scan_layers=True).init, jax.random.key(0),
                          jax.ShapeDtypeStruct((1, 2, cfg.hidden_size), jnp.float32))
  assert sum(int(np.prod(a.shape)) for a in jax.tree_util.tree_leaves(
      nn.unbox(shapes["params"]))) == cfg.num_parameters()
  tiny = O.opt_preset("opt_tiny")
  assert tiny.vocab_size == 50272 and tiny.num_parameters() > 0


def test_low_precision_forward_is_finite_and_close():
  _, config, params = _pair("pre")
  ids, mask = _batch(6)
  ref = _vlm_logits(config, params, ids, mask)
  for dtype, tol in ((jnp.bfloat16, 0.15), (jnp.float16, 0.02)):
    got = _vlm_logits(config, params, ids, mask, dtype=dtype)
    assert got.dtype == np.float32 and np.all(np.isfinite(got))
    assert max_abs(got, ref) < tol * max(1.0, float(np.max(np.abs(ref)))), dtype
  # float16: residual channels beyond 65,504 stay finite (float32 residual stream, wide fc2)
  big = jax.tree_util.tree_map(lambda a: a, params)
  big["layers_0"]["fc2"]["bias"] = params["layers_0"]["fc2"]["bias"].at[0].set(1e5)
  got = _vlm_logits(config, big, ids, mask, dtype=jnp.float16)
  assert np.all(np.isfinite(got))
  ref = _vlm_logits(config, big, ids, mask)
  assert max_abs(got, ref) < 0.05 * max(1.0, float(np.max(np.abs(ref))))


def test_bad_inputs():
  _, config, params = _pair("pre")
  model = O.OPTForCausalLM(config)
  with pytest.raises(ValueError, match="inputs_embeds"):
    model.apply({"params": params}, jnp.zeros((1, 3, 16)))
  with pytest.raises(ValueError, match="attention_mask"):
    model.apply({"params": params}, jnp.zeros((1, 3, 32)), jnp.ones((1, 4)))
  with pytest.raises(ValueError, match="cache_index"):
    model.apply({"params": params}, jnp.zeros((1, 3, 32)), kv_cache=O.init_cache(config, 1, 8))
  np.testing.assert_array_equal(O.opt_position_ids(np.array([[0, 0, 1, 1, 1], [1, 1, 1, 0, 0]])),
                                [[-1, -1, 0, 1, 2], [0, 1, 2, -1, -1]])
