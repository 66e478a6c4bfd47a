"""Equivalence of the BLIP-2 image encoders with HF transformers, and the HF weight maps.

EVA tower vs HF ``Blip2VisionModel``; CLIP tower vs HF ``CLIPVisionModel`` (quick_gelu), whose
``last_hidden_state`` is the blocks' output before any final norm, then its ``post_layernorm``
module applied by hand (it holds our ``post_layernorm`` = LAVIS ``ln_vision`` weights).
"""
import dataclasses
import functools

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from transformers import Blip2VisionConfig as HFBlip2VisionConfig
from transformers import Blip2VisionModel, CLIPVisionConfig, CLIPVisionModel

from vlm.convert.hf_blip2_vision import (interpolate_position_embedding, vision_from_hf,
                                         vision_to_hf)
from vlm.models.clip_vit import ClipVisionModel
from vlm.models.eva_vit import EvaVisionModel
from vlm.models.presets import Blip2VisionConfig

TOL = 1e-5
DIMS = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
            image_size=28, patch_size=7)
EVA = Blip2VisionConfig(kind="eva", layer_norm_eps=1e-6, post_layernorm_eps=1e-6, **DIMS)
CLIP = Blip2VisionConfig(kind="clip", hidden_act="quick_gelu", layer_norm_eps=1e-5,
                         post_layernorm_eps=1e-5, **DIMS)


def _randomize(model: torch.nn.Module, seed: int = 0) -> None:
  """Fills every parameter with non-trivial values (LN scales around 1, everything else ~N(0, s))."""
  torch.manual_seed(seed)
  with torch.no_grad():
    for name, p in model.named_parameters():
      if "norm" in name and name.endswith("weight"):
        p.copy_(1.0 + 0.1 * torch.randn_like(p))
      elif "embedding" in name and "patch" not in name:
        p.copy_(0.5 * torch.randn_like(p))
      else:
        p.copy_(0.1 * torch.randn_like(p))


def _state_dict(model: torch.nn.Module) -> dict:
  return {k: v.detach().numpy().copy() for k, v in model.state_dict().items()}


def _pixels(config, batch=2, seed=1):
  torch.manual_seed(seed)
  nchw = torch.randn(batch, 3, config.image_size, config.image_size)
  return nchw, jnp.asarray(nchw.numpy().transpose(0, 2, 3, 1))


def _hf_eva(config: Blip2VisionConfig):
  hf_config = HFBlip2VisionConfig(
      hidden_size=config.hidden_size, intermediate_size=config.intermediate_size,
      num_hidden_layers=config.num_hidden_layers, num_attention_heads=config.num_attention_heads,
      image_size=config.image_size, patch_size=config.patch_size, hidden_act="gelu",
      layer_norm_eps=config.layer_norm_eps, qkv_bias=config.qkv_bias)
  hf_config._attn_implementation = "eager"
  model = Blip2VisionModel(hf_config).eval()
  _randomize(model)
  return model


def _hf_clip(config: Blip2VisionConfig):
  hf_config = CLIPVisionConfig(
      hidden_size=config.hidden_size, intermediate_size=config.intermediate_size,
      num_hidden_layers=config.num_hidden_layers, num_attention_heads=config.num_attention_heads,
      image_size=config.image_size, patch_size=config.patch_size, hidden_act="quick_gelu",
      layer_norm_eps=config.layer_norm_eps)
  hf_config._attn_implementation = "eager"
  model = CLIPVisionModel(hf_config).eval()
  _randomize(model)
  return model


@functools.lru_cache(maxsize=None)
def _hf_model(kind: str):
  """One randomised HF model per kind for the whole file (building them is the slow part)."""
  return _hf_eva(EVA) if kind == "eva" else _hf_clip(CLIP)


@functools.lru_cache(maxsize=None)
def _jitted_apply(model: nn.Module, **kwargs):
  """``jax.jit(model.apply)`` cached per (module, kwargs): one XLA compile per configuration."""
  return jax.jit(functools.partial(model.apply, **kwargs))


def _max_abs(a, b) -> float:
  return float(np.max(np.abs(np.asarray(a, np.float64) - np.asarray(b, np.float64))))


def test_eva_matches_hf_blip2_vision_model():
  hf = _hf_model("eva")
  sd = _state_dict(hf)
  qkv_bias = sd["encoder.layers.0.self_attn.qkv.bias"]
  assert qkv_bias.shape == (3 * EVA.hidden_size,) and np.abs(qkv_bias).min() > 0
  params = vision_from_hf(sd, EVA, prefix="")
  nchw, nhwc = _pixels(EVA)
  with torch.no_grad():
    ref = hf(pixel_values=nchw).last_hidden_state.numpy()
  out = _jitted_apply(EvaVisionModel(EVA))({"params": params}, nhwc)
  assert out.shape == (2, EVA.num_positions, EVA.hidden_size) == ref.shape
  err = _max_abs(out, ref)
  print(f"eva max abs err {err:.3e}")
  assert err <= TOL, err


def test_clip_matches_hf_clip_vision_model():
  hf = _hf_model("clip")
  sd = _state_dict(hf)
  assert "vision_model.embeddings.patch_embedding.bias" not in sd
  params = vision_from_hf(sd, CLIP)
  nchw, nhwc = _pixels(CLIP)
  with torch.no_grad():
    pre = hf(pixel_values=nchw).last_hidden_state
    ref_pre = pre.numpy()
    ref = hf.vision_model.post_layernorm(pre).numpy()
  model = ClipVisionModel(CLIP)
  out_pre = _jitted_apply(model, return_pre_post_layernorm=True)({"params": params}, nhwc)
  out = _jitted_apply(model)({"params": params}, nhwc)
  err_pre, err = _max_abs(out_pre, ref_pre), _max_abs(out, ref)
  print(f"clip max abs err before post_layernorm {err_pre:.3e}, after {err:.3e}")
  assert out.shape == ref.shape == (2, CLIP.num_positions, CLIP.hidden_size)
  assert err_pre <= TOL, err_pre
  assert err <= TOL, err


def test_eva_position_interpolation_matches_hf_interpolate_pos_encoding():
  hf = _hf_model("eva")
  big = dataclasses.replace(EVA, image_size=42)  # 4x4 grid -> 6x6 grid
  params = vision_from_hf(_state_dict(hf), EVA, prefix="")
  emb = params["embeddings"]
  emb["position_embedding"] = interpolate_position_embedding(emb["position_embedding"], 6)
  nchw, nhwc = _pixels(big)
  with torch.no_grad():
    ref = hf(pixel_values=nchw, interpolate_pos_encoding=True).last_hidden_state.numpy()
  out = _jitted_apply(EvaVisionModel(big))({"params": params}, nhwc)
  err = _max_abs(out, ref)
  print(f"eva interpolated-positions max abs err {err:.3e}")
  assert err <= TOL, err


@pytest.mark.parametrize("n,new", [(4, 6), (16, 26), (6, 3), (4, (5, 7)), (5, 5)])
def test_interpolate_position_embedding_matches_torch_bicubic(n, new):
  rng = np.random.default_rng(0)
  d = 8
  pos = rng.standard_normal((1, 1 + n * n, d)).astype(np.float32)
  gh, gw = (new, new) if isinstance(new, int) else new
  grid = torch.from_numpy(pos[:, 1:].reshape(1, n, n, d)).permute(0, 3, 1, 2)
  ref = F.interpolate(grid, size=(gh, gw), mode="bicubic", align_corners=False)
  ref = np.concatenate([pos[:, :1], ref.permute(0, 2, 3, 1).reshape(1, gh * gw, d).numpy()], 1)
  out = interpolate_position_embedding(pos, new)
  assert out.shape == (1, 1 + gh * gw, d) and out.dtype == np.float32
  assert _max_abs(out, ref) <= 1e-5
  if new == n:
    np.testing.assert_array_equal(out, pos)
  with pytest.raises(ValueError, match="square"):
    interpolate_position_embedding(pos[:, :-1], 3)


@pytest.mark.parametrize("config,prefix", [(EVA, ""), (CLIP, "vision_model.")])
def test_round_trip_is_identity(config, prefix):
  sd = _state_dict(_hf_model(config.kind))
  back = vision_to_hf(vision_from_hf(sd, config, prefix=prefix), config, prefix=prefix)
  assert set(back) == set(sd)
  for k in sd:
    assert back[k].dtype == sd[k].dtype and back[k].shape == sd[k].shape, k
    np.testing.assert_array_equal(back[k], sd[k], err_msg=k)
  # Foreign keys outside the prefix are ignored (a full BLIP-2 state dict).
  extra = {"qformer.layernorm.weight": np.ones(3), **{"vision_model." + k: v for k, v in sd.items()}}
  if prefix == "":
    vision_from_hf(extra, config)


def test_converter_errors_name_the_keys():
  sd = _state_dict(_hf_model("eva"))
  bad = dict(sd)
  del bad["encoder.layers.1.mlp.fc2.bias"]
  bad["encoder.layers.1.mlp.fc3.weight"] = np.zeros((2, 2), np.float32)
  with pytest.raises(ValueError, match=r"missing keys: encoder\.layers\.1\.mlp\.fc2\.bias.*"
                                       r"unknown keys: encoder\.layers\.1\.mlp\.fc3\.weight"):
    vision_from_hf(bad, EVA, prefix="")
  bad = dict(sd)
  bad["embeddings.position_embedding"] = np.zeros((1, 10, EVA.hidden_size), np.float32)
  with pytest.raises(ValueError, match="interpolate_position_embedding"):
    vision_from_hf(bad, EVA, prefix="")
  with pytest.raises(ValueError, match="prefix=''"):
    vision_from_hf(sd, EVA)  # bare Blip2VisionModel keys with the default prefix
  params = vision_from_hf(sd, EVA, prefix="")
  del params["post_layernorm"]
  with pytest.raises(ValueError, match="missing params: post_layernorm/bias"):
    vision_to_hf(params, EVA)


@pytest.mark.parametrize("model_cls,config", [(EvaVisionModel, EVA), (ClipVisionModel, CLIP)])
def test_params_have_logical_axes_and_match_converter_tree(model_cls, config):
  x = jnp.zeros((1, config.image_size, config.image_size, 3), jnp.float32)
  variables = jax.eval_shape(model_cls(config).init, jax.random.PRNGKey(0), x)
  boxed = variables["params"]
  leaves = jax.tree_util.tree_leaves(boxed, is_leaf=lambda v: isinstance(v, nn.Partitioned))
  for leaf in leaves:
    assert isinstance(leaf, nn.Partitioned), leaf
    assert len(leaf.names) == leaf.value.ndim
  flat = flax.traverse_util.flatten_dict(flax.core.meta.unbox(boxed), sep="/")
  names = {k: v.names for k, v in flax.traverse_util.flatten_dict(
      boxed, sep="/", is_leaf=lambda k, v: isinstance(v, nn.Partitioned)).items()}
  assert names["encoder/layers_0/mlp/fc1/kernel"] == ("embed", "mlp")
  assert names["embeddings/position_embedding"] == (None, None, "embed")
  # The converter produces exactly the tree init creates.
  prefix = "" if config.kind == "eva" else "vision_model."
  converted = flax.traverse_util.flatten_dict(
      vision_from_hf(_state_dict(_hf_model(config.kind)), config, prefix=prefix), sep="/")
  assert {k: v.shape for k, v in converted.items()} == {k: v.shape for k, v in flat.items()}
  if config.kind == "eva":
    assert names["encoder/layers_0/self_attn/qkv/kernel"] == ("embed", "heads")
    assert "pre_layrnorm/scale" not in flat
  else:
    assert "pre_layrnorm/scale" in flat and "embeddings/patch_embedding/bias" not in flat


@pytest.mark.parametrize("model_cls,config", [(EvaVisionModel, EVA), (ClipVisionModel, CLIP)])
def test_bad_inputs_raise(model_cls, config):
  s = config.image_size
  model = model_cls(config)
  params = jax.eval_shape(model.init, jax.random.PRNGKey(0), jnp.zeros((1, s, s, 3)))
  for shape, match in [((s, s, 3), "rank 4"), ((1, 3, s, s), "NCHW"),
                       ((1, s + 7, s + 7, 3), "spatial size"), ((1, s, s, 4), "channels")]:
    with pytest.raises(ValueError, match=match):
      model.apply(params, jnp.zeros(shape))
  with pytest.raises(ValueError, match="floating"):
    model.apply(params, jnp.zeros((1, s, s, 3), jnp.int32))
  other = EvaVisionModel(CLIP) if model_cls is ClipVisionModel else ClipVisionModel(EVA)
  with pytest.raises(ValueError, match="kind"):
    other.init(jax.random.PRNGKey(0), jnp.zeros((1, s, s, 3)))


@pytest.mark.parametrize("model_cls,config", [(EvaVisionModel, EVA), (ClipVisionModel, CLIP)])
def test_bf16_smoke(model_cls, config):
  _, x = _pixels(config)
  model = model_cls(config, dtype=jnp.bfloat16)
  shapes = jax.eval_shape(model.init, jax.random.PRNGKey(0), x)
  assert all(p.dtype == jnp.float32 for p in jax.tree_util.tree_leaves(shapes))
  prefix = "" if config.kind == "eva" else "vision_model."
  params = {"params": vision_from_hf(_state_dict(_hf_model(config.kind)), config, prefix=prefix)}
  out = _jitted_apply(model)(params, x)
  assert out.dtype == jnp.bfloat16 and out.shape == (2, config.num_positions, config.hidden_size)
  ref = _jitted_apply(model_cls(config))(params, x)
  assert bool(jnp.all(jnp.isfinite(out.astype(jnp.float32))))
  assert _max_abs(out.astype(jnp.float32), ref) < 0.1


def test_sharded_remat_under_logical_rules_matches_unsharded():
  """Params sharded by their logical axes on a 2x4 mesh, blocks rematerialised: same output, which
  keeps its batch sharding."""
  if jax.device_count() < 8:
    pytest.skip("needs the 8 simulated CPU devices of tests/conftest.py")
  from jax.sharding import Mesh, PartitionSpec
  rules = (("batch", "data"), ("heads", "model"), ("mlp", "model"), ("embed", None),
           ("length", None))
  mesh = Mesh(np.array(jax.devices()[:8]).reshape(2, 4), ("data", "model"))
  model = EvaVisionModel(EVA, remat=True)
  _, x = _pixels(EVA, batch=4)
  params = {"params": vision_from_hf(_state_dict(_hf_model("eva")), EVA, prefix="")}
  specs = nn.get_partition_spec(jax.eval_shape(model.init, jax.random.PRNGKey(0), x))
  with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
    shardings = nn.logical_to_mesh_sharding(specs, mesh, rules)
    sharded = jax.device_put(params, shardings)
    out = jax.jit(model.apply)(sharded, x)
  kernel = sharded["params"]["encoder"]["layers_0"]["self_attn"]["qkv"]["kernel"]
  assert kernel.sharding.spec == PartitionSpec(None, "model")
  assert out.sharding.spec[0] == "data"
  ref = _jitted_apply(EvaVisionModel(EVA))(params, x)
  assert _max_abs(out, ref) <= TOL
