"""Named Qwen presets (vlm.models.qwen_presets): parameter counts of the real architectures against
the published totals, the model registry, and a tiny preset end to end (init, forward, generate)."""
import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from vlm import models
from vlm.models import presets
from vlm.models.qwen3_vl import Qwen2_5_VL, Qwen3VL, dummy_inputs, init_params
from vlm.models.qwen_presets import HF_CONFIGS, qwen_config

# Total parameters (billions) that the Hub model cards report for the released safetensors.
PUBLISHED_B = {
    "qwen3_vl_2b": 2.13, "qwen3_vl_4b": 4.44, "qwen3_vl_8b": 8.77, "qwen3_vl_32b": 33.4,
    "qwen3_vl_30b_a3b": 31.1, "qwen3_vl_235b_a22b": 236.0,
    "qwen2_5_vl_3b": 3.75, "qwen2_5_vl_7b": 8.29, "qwen2_5_vl_72b": 73.4,
}


def _count(name):
  config = qwen_config(name)
  cls = Qwen2_5_VL if name.startswith("qwen2_5") else Qwen3VL
  shapes = jax.eval_shape(lambda: init_params(cls(config), jax.random.key(0)))
  return sum(int(np.prod(x.shape)) for x in jax.tree_util.tree_leaves(shapes))


@pytest.mark.parametrize("name", sorted(PUBLISHED_B))
def test_parameter_count_matches_release(name):
  got = _count(name) / 1e9
  print(f"{name}: {got:.3f}B (published {PUBLISHED_B[name]}B)")
  assert abs(got - PUBLISHED_B[name]) / PUBLISHED_B[name] < 0.01


def test_registry_and_overrides():
  model = models.build("qwen3_vl", "qwen3_vl_tiny")
  assert isinstance(model, Qwen3VL) and model.config.text.hidden_size == 64
  assert isinstance(models.get_class("qwen2_5_vl")(qwen_config("qwen2_5_vl_7b")), Qwen2_5_VL)
  shallow = qwen_config("qwen3_vl_8b", num_hidden_layers=2)
  assert shallow.text.num_hidden_layers == 2 and shallow.vision.depth == 27
  assert presets.get_preset("qwen3_vl_30b_a3b").text.num_experts == 128
  with pytest.raises(KeyError, match="qwen3_vl_8b"):
    qwen_config("qwen3_vl_9b")
  with pytest.raises(KeyError, match="blip2_tiny"):
    presets.get_preset("nope")
  with pytest.raises(ValueError):
    qwen_config("qwen3_vl_tiny", num_key_value_heads=3)
  with pytest.raises(ValueError, match="interleaved MRoPE"):  # at config time, before tracing
    qwen_config("qwen3_vl_tiny", mrope_section=(2, 3, 3))


@pytest.mark.parametrize("name", ["qwen3_vl_tiny", "qwen3_vl_moe_tiny"])
def test_tiny_preset_forward_and_generate(name):
  from vlm.data.qwen_processor import Qwen3VLProcessor
  from vlm.inference.generate import generate
  config = qwen_config(name)
  model = Qwen3VL(config)
  params = init_params(model, jax.random.key(0))
  logits, _ = model.apply({"params": params}, *dummy_inputs(config))
  chex.assert_shape(logits, (1, 1, config.text.vocab_size))
  chex.assert_tree_all_finite(logits)
  if config.text.num_experts:
    return  # generation with MoE layers is covered by the HF-equivalence tests
  proc = Qwen3VLProcessor(padding_side="left")
  image = (np.random.default_rng(0).random((40, 56, 3)) * 255).astype(np.uint8)
  batch = proc(text=[proc.apply_chat_template([{"role": "user", "content": [
      {"type": "image"}, {"type": "text", "text": "What is this?"}]}])], images=[image])
  out = generate(model, params, batch, max_new_tokens=3, eos_token_ids=[151645],
                 pad_token_id=151643)
  assert out.shape == (1, 3) and ((out >= 0) & (out < config.text.vocab_size)).all()


@pytest.mark.parametrize("name", ["qwen3_vl_tiny", "qwen3_vl_moe_tiny"])
def test_gradients_scan_remat_equal_plain(name):
  """Training readiness: d(loss)/d(params) through the scanned + rematerialised decoder (and
  remat vision blocks) equals the plain model's, parameters mapped by stack_layers."""
  from vlm.models.qwen3 import stack_layers
  config = qwen_config(name)
  plain, scanned = Qwen3VL(config), Qwen3VL(config, scan_layers=True, remat=True)
  params = init_params(plain, jax.random.key(1))
  m = config.vision.spatial_merge_size
  grid = np.array([[1, 2 * m, 2 * m]])
  from vlm.models.qwen_vit import vision_inputs
  tables = vision_inputs(config.vision, grid)
  pixels = jax.random.normal(jax.random.key(2), (int(grid.prod()), config.vision.patch_dim))
  ids = jnp.array([[5, config.vision_start_token_id] + [config.image_token_id] * 4 + [9, 11]])
  pos = jnp.broadcast_to(jnp.arange(ids.shape[1]), (3, 1, ids.shape[1]))
  index = jnp.array([[-1, -1, 0, 1, 2, 3, -1, -1]])
  c = jax.random.normal(jax.random.key(3), (1, ids.shape[1], config.text.vocab_size))

  def loss(model, p):
    logits, _ = model.apply({"params": p}, ids, pos, None, pixels, tables, index)
    return jnp.sum(logits * c)

  g_plain = jax.jit(jax.grad(lambda p: loss(plain, p)))(params)
  stacked = dict(params, language_model=stack_layers(params["language_model"]))
  g_scan = jax.jit(jax.grad(lambda p: loss(scanned, p)))(stacked)
  g_plain = dict(g_plain, language_model=stack_layers(g_plain["language_model"]))
  errs = jax.tree.map(lambda a, b: float(jnp.max(jnp.abs(a - b))), g_plain, g_scan)
  worst = max(jax.tree.leaves(errs))
  scale = max(float(jnp.max(jnp.abs(x))) for x in jax.tree.leaves(g_plain))
  print(f"{name}: grad max abs diff {worst:.2e} (max |grad| {scale:.2e})")
  chex.assert_tree_all_finite(g_scan)
  chex.assert_trees_all_close(g_scan, g_plain, atol=1e-5 * max(1.0, scale), rtol=0)


@pytest.mark.parametrize("name", ["qwen3_vl_8b", "qwen3_vl_30b_a3b", "qwen2_5_vl_7b"])
def test_transformers5_rope_parameters_spelling(name):
  """transformers 5 writes ``rope_parameters`` (theta inside) instead of ``rope_scaling`` +
  ``rope_theta`` (spec section 12): both spellings give the same config; scaled types raise."""
  import copy
  from vlm.convert.hf_qwen3_vl import config_from_hf
  d = copy.deepcopy(HF_CONFIGS[name])
  text = d.get("text_config", d)
  text["rope_parameters"] = dict(text.pop("rope_scaling"), rope_theta=text.pop("rope_theta"))
  assert config_from_hf(d) == qwen_config(name)
  text["rope_parameters"] = dict(text["rope_parameters"], rope_type="yarn", factor=4.0)
  with pytest.raises(ValueError, match="'yarn'"):
    config_from_hf(d)
