"""BLIP-2 towers and Q-Former under ``nn.scan`` equal the unrolled layers (values and gradients).

Tiny random models, float32. The scanned model gets the unscanned model's weights converted with
:func:`vlm.models.blip2.convert_layer_layout`, so any difference is the scan itself. Each model is
jitted once per layout (values and gradients from one function).
"""
import dataclasses

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from vlm.models import presets
from vlm.models.blip2 import Blip2Stage1, Blip2Stage2, convert_layer_layout, layers_scanned
from vlm.models.qformer import QFormerModel, stack_qformer_layers, unstack_qformer_layers
from vlm.models.qwen3 import unstack_layers

TOL = 1e-6


def _config(kind: str) -> presets.Blip2Config:
  vision = presets.Blip2VisionConfig(kind=kind, image_size=32, patch_size=16, hidden_size=32,
                                     intermediate_size=64, num_hidden_layers=3,
                                     num_attention_heads=2,
                                     hidden_act="gelu" if kind == "eva" else "quick_gelu")
  qformer = presets.QFormerConfig(hidden_size=32, num_hidden_layers=4, num_attention_heads=2,
                                  intermediate_size=64, encoder_hidden_size=32, vocab_size=64,
                                  max_position_embeddings=16)
  return presets.Blip2Config(vision=vision, qformer=qformer, num_query_tokens=4,
                             image_text_hidden_size=16)


def _inputs():
  rng = np.random.default_rng(0)
  pixels = rng.normal(size=(2, 32, 32, 3)).astype(np.float32)
  ids = rng.integers(1, 64, size=(2, 6)).astype(np.int32)
  mask = np.ones((2, 6), np.int32)
  mask[1, 4:] = 0
  return pixels, ids, mask


def _values_and_grads(model, params, pixels, ids, mask):
  def loss(p):
    out = model.apply({"params": p}, pixels, ids, mask)
    total = sum(jnp.sum(jnp.sin(v)) for k, v in out.items() if k != "temp")
    return total, out
  (_, out), grads = jax.jit(jax.value_and_grad(loss, has_aux=True))(params)
  return out, grads


def _max_err(a, b):
  """Max over leaves of max|a - b| / max(1, max|b|) (absolute for values up to 1)."""
  return max(float(np.max(np.abs(np.asarray(x) - np.asarray(y))))
             / max(1.0, float(np.max(np.abs(np.asarray(y)))))
             for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)))


def test_stage1_scanned_equals_unrolled():
  config = _config("eva")
  pixels, ids, mask = _inputs()
  plain = Blip2Stage1(config)
  params = nn.unbox(plain.init(jax.random.PRNGKey(0), pixels, ids, mask)["params"])
  scanned_model = Blip2Stage1(config, scan_layers=True, remat=True)
  stacked = convert_layer_layout(params, config, scan_layers=True)
  # the converted tree is exactly the scanned model's tree (paths, shapes, LAYERS axis first)
  boxed = jax.eval_shape(scanned_model.init, jax.random.PRNGKey(0), pixels, ids, mask)["params"]
  assert jax.tree.map(lambda x: x.shape, nn.unbox(boxed)) == jax.tree.map(jnp.shape, stacked)
  specs = nn.get_partition_spec(boxed)
  assert specs["vision_model"]["encoder"]["layers"]["mlp"]["fc1"]["kernel"][0] == "layers"
  assert specs["qformer"]["encoder"]["layers"]["layer_0"]["crossattention"]["attention"][
      "query"]["kernel"][0] == "layers"
  assert "crossattention" not in stacked["qformer"]["encoder"]["layers"]["layer_1"]
  assert stacked["vision_model"]["encoder"]["layers"]["layer_norm1"]["scale"].shape == (3, 32)
  assert stacked["qformer"]["encoder"]["layers"]["layer_1"]["output"]["dense"]["kernel"].shape \
      == (2, 64, 32)
  assert layers_scanned(stacked) and not layers_scanned(params)

  out_ref, g_ref = _values_and_grads(plain, params, pixels, ids, mask)
  out, g = _values_and_grads(scanned_model, stacked, pixels, ids, mask)
  assert _max_err(out, out_ref) < TOL
  g = convert_layer_layout(g, config, scan_layers=False)
  assert jax.tree.structure(g) == jax.tree.structure(g_ref)
  assert _max_err(g, g_ref) < TOL
  # the gradients are not trivially zero: every layer's cross-attention and text FFN gets some
  assert float(np.abs(g_ref["qformer"]["encoder"]["layer_2"]["crossattention"]["attention"][
      "key"]["kernel"]).max()) > 0
  assert float(np.abs(g_ref["vision_model"]["encoder"]["layers_0"]["mlp"]["fc1"]["kernel"])
               .max()) > 0
  # and the round trip is exact
  back = convert_layer_layout(stacked, config, scan_layers=False)
  assert _max_err(back, params) == 0.0
  assert jax.tree.structure(back) == jax.tree.structure(params)


def test_clip_tower_scanned_equals_unrolled():
  from vlm.models.clip_vit import ClipVisionModel
  from vlm.models.qwen3 import stack_layers
  config = _config("clip").vision
  pixels = _inputs()[0]
  plain = ClipVisionModel(config)
  params = nn.unbox(plain.init(jax.random.PRNGKey(0), pixels)["params"])
  stacked = dict(params, encoder=stack_layers(params["encoder"]))

  def run(m, p):
    f = lambda p: (lambda y: (jnp.sum(jnp.sin(y)), y))(m.apply({"params": p}, pixels))
    return jax.jit(jax.value_and_grad(f, has_aux=True))(p)

  (_, y_ref), g_ref = run(plain, params)
  (_, y), g = run(ClipVisionModel(config, scan_layers=True), stacked)
  assert _max_err(y, y_ref) < TOL
  g = dict(g, encoder=unstack_layers(g["encoder"]))
  assert _max_err(g, g_ref) < TOL


def test_layout_conversion_is_idempotent_and_host_side():
  config = _config("eva")
  pixels, ids, mask = _inputs()
  params = nn.unbox(Blip2Stage1(config).init(jax.random.PRNGKey(1), pixels, ids, mask)["params"])
  host = jax.tree.map(np.asarray, params)
  stacked = convert_layer_layout({"params": host}, config, scan_layers=True)["params"]
  assert all(isinstance(x, np.ndarray) for x in jax.tree.leaves(stacked))
  again = convert_layer_layout(stacked, config, scan_layers=True)
  assert _max_err(again, stacked) == 0.0
  q = stacked["qformer"]["encoder"]["layers"]["layer_0"]["attention"]["attention"]["query"]
  np.testing.assert_array_equal(
      q["kernel"][1], host["qformer"]["encoder"]["layer_2"]["attention"]["attention"]["query"][
          "kernel"])
  # Q-Former helpers alone
  enc = host["qformer"]["encoder"]
  assert set(unstack_qformer_layers(stack_qformer_layers(enc, config.qformer),
                                    config.qformer)) == set(enc)


def test_qformer_scan_needs_whole_groups():
  qcfg = dataclasses.replace(_config("eva").qformer, num_hidden_layers=3)
  x = jnp.zeros((1, 4, 32))
  with pytest.raises(ValueError, match="multiple of cross_attention_frequency"):
    QFormerModel(qcfg, scan_layers=True).init(jax.random.PRNGKey(0), x, 4,
                                              encoder_hidden_states=jnp.zeros((1, 5, 32)))
  with pytest.raises(ValueError, match="layer_0 .. layer_2 in groups"):
    stack_qformer_layers({f"layer_{i}": {"w": np.zeros(1)} for i in range(3)}, qcfg)


def test_stage2_scanned_equals_unrolled():
  """Stage 2 (micro OPT): ``scan_layers`` scans the tower, the Q-Former and the LLM (the LLM's
  scan is tested in tests/equivalence/test_opt.py; here the visual prompt is compared)."""
  from vlm.models.qwen3 import stack_layers
  config = presets.get_preset("blip2_opt_micro")
  config = config.replace(qformer=dataclasses.replace(config.qformer, num_hidden_layers=4))
  pixels = np.random.default_rng(0).normal(size=(2, 32, 32, 3)).astype(np.float32)
  ids = np.array([[2, 5, 9, 11], [2, 7, 3, 1]], np.int32)
  mask = np.array([[1, 1, 1, 1], [1, 1, 1, 0]], np.int32)
  plain = Blip2Stage2(config)
  params = nn.unbox(plain.init(jax.random.PRNGKey(0), pixels, ids, mask)["params"])
  stacked = convert_layer_layout(params, config, scan_layers=True)
  stacked["language_model"] = stack_layers(params["language_model"])
  model = Blip2Stage2(config, scan_layers=True)
  shapes = nn.unbox(jax.eval_shape(model.init, jax.random.PRNGKey(0), pixels, ids, mask)["params"])
  assert jax.tree.map(lambda x: x.shape, shapes) == jax.tree.map(jnp.shape, stacked)

  def run(m, p):
    def f(p):
      prompt = m.apply({"params": p}, pixels, method=lambda mod, x: mod.query_embeds(
          mod.encode_image(x), deterministic=True))
      return jnp.sum(jnp.sin(prompt)), prompt
    return jax.jit(jax.value_and_grad(f, has_aux=True))(p)

  (_, v_ref), g_ref = run(plain, params)
  (_, v), g = run(model, stacked)
  assert _max_err(v, v_ref) < TOL
  g = convert_layer_layout(g, config, scan_layers=False)
  g.pop("language_model")
  g_ref.pop("language_model")
  assert _max_err(g, g_ref) < TOL
