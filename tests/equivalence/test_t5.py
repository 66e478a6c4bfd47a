"""vlm T5 / FlanT5 (``vlm.models.t5``, ``vlm.convert.hf_t5``) vs HF ``T5ForConditionalGeneration``.

Tiny random float32 models on CPU. Weights are drawn at scale 0.1: T5 does not scale its attention
scores, so at 0.2 the softmaxes saturate and torch/XLA float32 rounding grows to ~1e-5.
"""
from __future__ import annotations

import json
import os

import flax
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers
from transformers.models.t5.modeling_t5 import T5Attention as HFT5Attention

from tests.equivalence.blip2_hf_utils import max_abs, randomize_
from vlm.convert.hf_t5 import (hf_state_from_t5_params, load_hf_t5, save_hf_t5,
                               t5_params_from_hf_state)
from vlm.models.t5 import (T5_PRESETS, T5Config, T5ForConditionalGeneration, init_cache,
                           relative_position_bucket, shift_right, t5_preset)

TOL = 1e-5
VOCAB, D = 64, 32
B, S, L = 2, 20, 9


def hf_config(**kw) -> transformers.T5Config:
  """2 encoder + 3 decoder layers, 4 heads x 8, 8 buckets up to distance 12 (S=20 reaches the
  logarithmic buckets)."""
  base = dict(vocab_size=VOCAB, d_model=D, d_kv=8, d_ff=48, num_layers=2, num_decoder_layers=3,
              num_heads=4, relative_attention_num_buckets=8, relative_attention_max_distance=12,
              feed_forward_proj="gated-gelu", dense_act_fn="gelu", tie_word_embeddings=False,
              decoder_start_token_id=0, dropout_rate=0.1)
  base.update(kw)
  return transformers.T5Config(**{k: v for k, v in base.items() if v is not None})


def hf_model(seed=0, **kw):
  torch.manual_seed(seed)
  return randomize_(transformers.T5ForConditionalGeneration(hf_config(**kw)), seed, scale=0.1)


def hf_state(model) -> dict[str, np.ndarray]:
  return {k: v.detach().numpy().copy() for k, v in model.state_dict().items()}


def batch(seed=0):
  rng = np.random.default_rng(seed)
  embeds = rng.standard_normal((B, S, D)).astype(np.float32)
  mask = np.ones((B, S), np.int64)
  mask[1, 13:] = 0  # encoder padding
  labels = rng.integers(2, VOCAB, (B, L)).astype(np.int64)
  labels[1, 6:] = -100  # ignored label positions (decoder padding)
  dec_mask = (labels != -100).astype(np.int64)
  return embeds, mask, labels, dec_mask


@pytest.fixture(scope="module")
def setup():
  model = hf_model()
  config = T5Config.from_hf_config(model.config.to_dict())
  params = t5_params_from_hf_state(hf_state(model), config)
  flax_model = T5ForConditionalGeneration(config)
  fwd = jax.jit(lambda p, e, m, d, dm: flax_model.apply({"params": p}, e, m, d, dm))
  return model, config, params, flax_model, fwd


def test_relative_position_bucket_matches_hf():
  rp = torch.arange(-400, 401)[None, :]
  for nb, md in ((32, 128), (8, 12), (16, 50)):
    for bidirectional in (True, False):
      ref = HFT5Attention._relative_position_bucket(rp, bidirectional, nb, md).numpy()
      ours = np.asarray(relative_position_bucket(rp.numpy(), bidirectional, nb, md))
      np.testing.assert_array_equal(ours, ref, err_msg=f"{nb=} {md=} {bidirectional=}")


def test_config_activation_as_hf_resolves_it():
  cases = [dict(feed_forward_proj="gated-gelu"),  # HF: gelu_new (backwards-compatibility rule)
           dict(feed_forward_proj="gated-gelu", dense_act_fn="gelu"),  # BLIP-2 configs
           dict(feed_forward_proj="relu"), dict(feed_forward_proj="gated-silu")]
  for kw in cases:
    hf = transformers.T5Config.from_dict(kw)  # the config.json route, where HF lets the key win
    ours = T5Config.from_hf_config(hf.to_dict())
    assert (ours.dense_act_fn, ours.is_gated_act) == (hf.dense_act_fn, hf.is_gated_act), kw
    back = transformers.T5Config.from_dict(ours.to_hf_config())
    assert (back.dense_act_fn, back.is_gated_act) == (hf.dense_act_fn, hf.is_gated_act), kw
  blip2 = transformers.Blip2Config(text_config=dict(model_type="t5", feed_forward_proj="gated-gelu",
                                                    dense_act_fn="gelu"))
  assert T5Config.from_hf_config(blip2.text_config.to_dict()).dense_act_fn == "gelu"
  assert T5Config().dense_act_fn == "gelu_new" and T5Config().is_gated_act
  with pytest.raises(ValueError, match="feed_forward_proj"):
    T5Config(feed_forward_proj="gated-gelu-x")
  with pytest.raises(ValueError, match="unknown activation"):
    T5Config(dense_act_fn="swishy")
  with pytest.raises(KeyError, match="flan_t5_xl"):
    t5_preset("flan_t5_small")


def test_shift_right_matches_hf(setup):
  model = setup[0]
  labels = batch()[2]
  ref = model._shift_right(torch.tensor(labels)).numpy()
  np.testing.assert_array_equal(np.asarray(shift_right(jnp.asarray(labels), 0, 0)), ref)


def test_logits_match_hf(setup):
  model, config, params, _, fwd = setup
  embeds, mask, labels, dec_mask = batch()
  with torch.no_grad():
    ref = model(inputs_embeds=torch.tensor(embeds), attention_mask=torch.tensor(mask),
                labels=torch.tensor(labels), decoder_attention_mask=torch.tensor(dec_mask)).logits
  dec_ids = shift_right(jnp.asarray(labels), config.decoder_start_token_id, config.pad_token_id)
  logits = fwd(params, jnp.asarray(embeds), jnp.asarray(mask), dec_ids, jnp.asarray(dec_mask))
  assert logits.dtype == jnp.float32 and logits.shape == (B, L, VOCAB)
  err = max_abs(logits, ref.numpy())
  print(f"T5 logits max abs error vs HF: {err:.2e}")
  assert err < TOL


def test_loss_and_gradients_match_hf(setup):
  model, config, params, flax_model, _ = setup
  embeds, mask, labels, dec_mask = batch(1)
  model.zero_grad()
  emb_t = torch.tensor(embeds, requires_grad=True)
  out = model(inputs_embeds=emb_t, attention_mask=torch.tensor(mask), labels=torch.tensor(labels),
              decoder_attention_mask=torch.tensor(dec_mask))
  out.loss.backward()
  ref_grads = {k: p.grad.numpy() for k, p in model.named_parameters()}
  ref_grads["shared.weight"] = model.shared.weight.grad.numpy()

  def loss_fn(p, e):
    dec_ids = shift_right(jnp.asarray(labels), config.decoder_start_token_id, config.pad_token_id)
    logits = flax_model.apply({"params": p}, e, jnp.asarray(mask), dec_ids, jnp.asarray(dec_mask))
    valid = jnp.asarray(labels != -100)
    logp = jax.nn.log_softmax(logits, -1)
    tgt = jnp.take_along_axis(logp, jnp.asarray(np.maximum(labels, 0))[..., None], -1)[..., 0]
    return -jnp.sum(jnp.where(valid, tgt, 0.0)) / jnp.sum(valid)

  loss, (grads, g_emb) = jax.jit(jax.value_and_grad(loss_fn, argnums=(0, 1)))(
      params, jnp.asarray(embeds))
  loss_err = abs(float(loss) - out.loss.item())
  ref_tree = t5_params_from_hf_state(ref_grads, config)
  errs = jax.tree_util.tree_map(max_abs, grads, ref_tree)
  worst = max(jax.tree_util.tree_leaves(errs))
  emb_err = max_abs(g_emb, emb_t.grad.numpy())
  print(f"T5 loss error {loss_err:.2e}, max param-gradient error {worst:.2e}, inputs_embeds "
        f"gradient error {emb_err:.2e} ({len(jax.tree_util.tree_leaves(grads))} params)")
  assert loss_err < TOL and worst < TOL and emb_err < TOL
  # every parameter receives a gradient (a test that could not fail if one were disconnected)
  assert all(float(jnp.max(jnp.abs(g))) > 0 for g in jax.tree_util.tree_leaves(grads))


def _decode_step_fns(flax_model):
  prefill = jax.jit(lambda p, ids, enc, em, cache: flax_model.apply(
      {"params": p}, ids, enc, em, None, cache, 0, method=flax_model.decode))
  step = jax.jit(lambda p, ids, enc, em, cache, i: flax_model.apply(
      {"params": p}, ids, enc, em, None, cache, i, method=flax_model.decode))
  return prefill, step


def _check_cached(params, config, flax_model, label):
  embeds, mask, labels, _ = batch(2)
  dec_ids = shift_right(jnp.asarray(np.maximum(labels, 2)), 0, 0)
  enc = flax_model.apply({"params": params}, jnp.asarray(embeds), jnp.asarray(mask),
                         method=flax_model.encode)
  full, none = flax_model.apply({"params": params}, dec_ids, enc, jnp.asarray(mask),
                                method=flax_model.decode)
  assert none is None
  prefill, step = _decode_step_fns(flax_model)
  cache = init_cache(config, B, L + 3)
  k = 3
  out, cache = prefill(params, dec_ids[:, :k], enc, jnp.asarray(mask), cache)
  errs = [max_abs(out, full[:, :k])]
  for i in range(k, L):
    out, cache = step(params, dec_ids[:, i:i + 1], enc, jnp.asarray(mask), cache,
                      jnp.asarray(i, jnp.int32))
    errs.append(max_abs(out[:, 0], full[:, i]))
  assert bool(jnp.all(cache["mask"][:, :L])) and not bool(jnp.any(cache["mask"][:, L:]))
  print(f"T5 cached decoding ({label}) vs full decode: {max(errs):.2e}")
  assert max(errs) < TOL
  return full


def test_cached_decoding_equals_full_decode(setup):
  _, config, params, flax_model, _ = setup
  _check_cached(params, config, flax_model, "unscanned")


def test_scan_remat_tied_matches_hf_and_unscanned():
  """Second model: tied embeddings (d_model**-0.5 rescale), HF's default gelu_new; scanned + remat
  params from the converter; logits vs HF and vs the unscanned model, and cached decoding."""
  model = hf_model(seed=3, tie_word_embeddings=True, dense_act_fn=None)
  assert model.config.dense_act_fn == "gelu_new"
  config = T5Config.from_hf_config(model.config.to_dict())
  assert config.tie_word_embeddings and config.dense_act_fn == "gelu_new"
  state = hf_state(model)
  assert "lm_head.weight" in state and "encoder.embed_tokens.weight" in state  # tied copies
  params = t5_params_from_hf_state(state, config)
  scan_params = t5_params_from_hf_state(state, config, scan_layers=True)
  assert scan_params["encoder"]["layers"]["layer_0"]["SelfAttention"]["q"]["kernel"].shape[0] == 2
  embeds, mask, labels, dec_mask = batch(4)
  dec_ids = shift_right(jnp.asarray(labels), 0, 0)
  with torch.no_grad():
    ref = model(inputs_embeds=torch.tensor(embeds), attention_mask=torch.tensor(mask),
                labels=torch.tensor(labels), decoder_attention_mask=torch.tensor(dec_mask)).logits
  scanned = T5ForConditionalGeneration(config, scan_layers=True, remat=True)
  out_scan = jax.jit(lambda p: scanned.apply({"params": p}, jnp.asarray(embeds), jnp.asarray(mask),
                                             dec_ids, jnp.asarray(dec_mask)))(scan_params)
  plain = T5ForConditionalGeneration(config)
  out_plain = jax.jit(lambda p: plain.apply({"params": p}, jnp.asarray(embeds), jnp.asarray(mask),
                                            dec_ids, jnp.asarray(dec_mask)))(params)
  err_hf, err_plain = max_abs(out_scan, ref.numpy()), max_abs(out_scan, out_plain)
  print(f"T5 tied+scan+remat logits vs HF {err_hf:.2e}, vs unscanned {err_plain:.2e}")
  assert err_hf < TOL and err_plain < TOL
  _check_cached(scan_params, config, scanned, "scanned")
  # the scanned init has the converter's tree, with LAYERS as the leading logical axis
  shapes = jax.eval_shape(lambda: scanned.init(jax.random.PRNGKey(0), jnp.asarray(embeds),
                                               jnp.asarray(mask), dec_ids))["params"]
  plain_shapes = jax.tree_util.tree_map(lambda x: x.shape, flax.core.meta.unbox(shapes))
  assert plain_shapes == jax.tree_util.tree_map(lambda x: x.shape, scan_params)
  q = shapes["decoder"]["layers"]["layer_0"]["SelfAttention"]["q"]["kernel"]
  assert q.names == ("layers", "embed", "heads")
  back = hf_state_from_t5_params(scan_params, config, scan_layers=True)
  assert set(back) == set(state) - {"lm_head.weight", "encoder.embed_tokens.weight",
                                    "decoder.embed_tokens.weight"}
  for k, v in back.items():
    np.testing.assert_array_equal(v, state[k])


def test_dropout_and_bfloat16(setup):
  _, config, params, flax_model, fwd = setup
  embeds, mask, labels, dec_mask = batch()
  dec_ids = shift_right(jnp.asarray(labels), 0, 0)
  args = (jnp.asarray(embeds), jnp.asarray(mask), dec_ids, jnp.asarray(dec_mask))
  train = jax.jit(lambda p, r: flax_model.apply({"params": p}, *args, deterministic=False,
                                                rngs={"dropout": r}))
  a, b = train(params, jax.random.PRNGKey(0)), train(params, jax.random.PRNGKey(1))
  ref = fwd(params, *args)
  assert bool(jnp.all(jnp.isfinite(a))) and max_abs(a, b) > 1e-3 and max_abs(a, ref) > 1e-3
  bf = T5ForConditionalGeneration(config, dtype=jnp.bfloat16)
  out = jax.jit(lambda p: bf.apply({"params": p}, *args))(params)
  assert out.dtype == jnp.float32
  assert max_abs(out, ref) < 0.1 * float(jnp.max(jnp.abs(ref)))
  # wo runs in float32 under bfloat16 compute (HF _keep_in_fp32_modules = ["wo"]), the other
  # projections in bfloat16
  _, state = bf.apply({"params": params}, *args, capture_intermediates=lambda m, _: m.name in (
      "wo", "wi_0", "q"), mutable=["intermediates"])
  outs = jax.tree_util.tree_flatten_with_path(state["intermediates"])[0]
  dtypes = {jax.tree_util.keystr(path).split("'")[-4]: leaf.dtype for path, leaf in outs}
  assert dtypes == {"wo": jnp.float32, "wi_0": jnp.bfloat16, "q": jnp.bfloat16}, dtypes


def test_hf_round_trip(setup, tmp_path):
  model, config, params, _, fwd = setup
  embeds, mask, labels, dec_mask = batch()
  dec_ids = shift_right(jnp.asarray(labels), 0, 0)
  # vlm -> HF directory -> from_pretrained: same weights, same logits as the source HF model
  save_hf_t5(config, params, str(tmp_path / "ours"))
  reloaded = transformers.T5ForConditionalGeneration.from_pretrained(str(tmp_path / "ours")).eval()
  assert reloaded.config.dense_act_fn == "gelu" and reloaded.config.is_gated_act
  ref_state, new_state = hf_state(model), hf_state(reloaded)
  assert set(ref_state) == set(new_state)
  for k in ref_state:
    np.testing.assert_array_equal(new_state[k], ref_state[k], err_msg=k)
  with torch.no_grad():
    out = reloaded(inputs_embeds=torch.tensor(embeds), attention_mask=torch.tensor(mask),
                   labels=torch.tensor(labels), decoder_attention_mask=torch.tensor(dec_mask))
  ours = fwd(params, jnp.asarray(embeds), jnp.asarray(mask), dec_ids, jnp.asarray(dec_mask))
  assert max_abs(ours, out.logits.numpy()) < TOL
  # HF save_pretrained directories, single file and sharded -> load_hf_t5 = the same params
  for name, shard in (("single", None), ("sharded", 20_000)):
    d = str(tmp_path / name)
    model.save_pretrained(d, max_shard_size=shard) if shard else model.save_pretrained(d)
    assert os.path.exists(os.path.join(d, "model.safetensors.index.json")) == bool(shard)
    cfg2, loaded = load_hf_t5(d)
    assert cfg2 == config
    jax.tree_util.tree_map(np.testing.assert_array_equal, loaded, params)
  # our own sharded save loads back identically
  save_hf_t5(config, params, str(tmp_path / "ours_sharded"), max_shard_size="20KB")
  with open(tmp_path / "ours_sharded" / "model.safetensors.index.json") as fh:
    assert len(set(json.load(fh)["weight_map"].values())) > 1
  _, loaded = load_hf_t5(str(tmp_path / "ours_sharded"), scan_layers=True)
  back = hf_state_from_t5_params(loaded, config, scan_layers=True)
  assert set(back) == set(hf_state_from_t5_params(params, config))


def test_converter_errors_and_prefix(setup):
  model, config, params, _, _ = setup
  state = hf_state(model)
  prefixed = {"language_model." + k: v for k, v in state.items()}
  prefixed["vision_model.embeddings.patch_embedding.weight"] = np.zeros(3, np.float32)
  got = t5_params_from_hf_state(prefixed, config, prefix="language_model.")
  jax.tree_util.tree_map(np.testing.assert_array_equal, got, params)
  out = hf_state_from_t5_params({"params": params}, config, prefix="language_model.")
  assert "language_model.shared.weight" in out and "language_model.lm_head.weight" in out

  broken = dict(state)
  del broken["decoder.block.1.layer.1.EncDecAttention.k.weight"]
  broken["decoder.block.1.layer.9.extra.weight"] = np.zeros(2, np.float32)
  with pytest.raises(ValueError) as err:
    t5_params_from_hf_state(broken, config)
  msg = str(err.value)
  assert "missing keys: decoder.block.1.layer.1.EncDecAttention.k.weight" in msg
  assert "unknown keys: decoder.block.1.layer.9.extra.weight" in msg
  bad_tie = dict(state)
  bad_tie["encoder.embed_tokens.weight"] = state["shared.weight"] + 1.0
  with pytest.raises(ValueError, match="encoder.embed_tokens.weight differs"):
    t5_params_from_hf_state(bad_tie, config)
  bad_shape = dict(state)
  bad_shape["encoder.final_layer_norm.weight"] = np.ones(D + 1, np.float32)
  with pytest.raises(ValueError, match=r"encoder.final_layer_norm.weight has shape \(33,\)"):
    t5_params_from_hf_state(bad_shape, config)
  missing_param = {k: v for k, v in params.items() if k != "lm_head"}
  with pytest.raises(ValueError, match="missing params: lm_head/kernel"):
    hf_state_from_t5_params(missing_param, config)
  with pytest.raises(ValueError, match="scan_layers=True; pass scan_layers=False"):
    hf_state_from_t5_params(params, config, scan_layers=True)  # unscanned tree, wrong flag
  extra = {**params, "encoder": {**params["encoder"], "bogus": {"kernel": np.zeros(2)}}}
  with pytest.raises(ValueError, match="unknown params: encoder/bogus/kernel"):
    hf_state_from_t5_params(extra, config)


def test_presets_parameter_counts():
  # published sizes: FlanT5-XL 2.85B, FlanT5-XXL 11.1B (the HF model tree of google/flan-t5-xxl's
  # config has 11,135,332,352 parameters; the "11.3B" sometimes quoted is 1.5% off that)
  expected = {"flan_t5_xl": 2.85e9, "flan_t5_xxl": 11.1e9}
  for name, approx in expected.items():
    config = t5_preset(name)
    hf_cfg = transformers.T5Config.from_dict(config.to_hf_config())
    with torch.device("meta"):  # the real HF module tree, without allocating its weights
      hf = transformers.T5ForConditionalGeneration(hf_cfg)
    hf_count = sum(p.numel() for p in hf.parameters())
    assert config.num_parameters() == hf_count, name
    assert abs(hf_count - approx) / approx < 0.01, (name, hf_count)
    print(f"{name}: {hf_count:,} parameters (HF meta model) = T5Config.num_parameters()")
  tiny = t5_preset("t5_tiny")
  assert tiny.vocab_size == 32128 and tiny.num_layers == tiny.num_decoder_layers == 4
  shapes = jax.eval_shape(lambda: T5ForConditionalGeneration(tiny).init(
      jax.random.PRNGKey(0), jnp.zeros((1, 3, tiny.d_model)), jnp.ones((1, 3)),
      jnp.zeros((1, 2), jnp.int32)))
  count = sum(int(np.prod(x.shape)) for x in jax.tree_util.tree_leaves(shapes))
  assert count == tiny.num_parameters()
  assert set(T5_PRESETS) == {"flan_t5_xl", "flan_t5_xxl", "t5_tiny"}
