"""The stage-1 train step on 8 simulated devices equals the single-device step.

Meshes: pure data parallel, FSDP, and FSDP x tensor. Dropout is active (the random bits do not
depend on the sharding because jax's threefry is partitionable), so the test covers the real step.
"""
import dataclasses

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from vlm.models import presets
from vlm.models.blip2 import Blip2Stage1
from vlm.objectives.stage1 import blip2_stage1_loss
from vlm.parallel import mesh as mesh_lib
from vlm.train import optim
from vlm.train import step as step_lib

VISION = presets.Blip2VisionConfig(image_size=28, patch_size=14, hidden_size=32,
                                   intermediate_size=64, num_hidden_layers=2,
                                   num_attention_heads=4)
QFORMER = presets.QFormerConfig(vocab_size=30523, hidden_size=32, num_hidden_layers=2,
                                num_attention_heads=4, intermediate_size=64,
                                encoder_hidden_size=32)
CONFIG = presets.Blip2Config(vision=VISION, qformer=QFORMER, num_query_tokens=8,
                             image_text_hidden_size=16)
B, T = 8, 12
FROZEN = [r"^vision_model/(?!post_layernorm)"]


def _optim_cfg():
  return ml_collections.ConfigDict(dict(lr=1e-3, min_lr=1e-4, warmup_lr=1e-4, warmup_steps=1,
                                        total_steps=10, b1=0.9, b2=0.98, eps=1e-8,
                                        weight_decay=0.05, grad_clip_norm=1.0))


def _batch():
  rng = np.random.default_rng(0)
  ids = rng.integers(1000, 2000, size=(B, T)).astype(np.int32)
  ids[:, 0] = 101
  lengths = rng.integers(4, T + 1, size=B)
  mask = (np.arange(T)[None] < lengths[:, None]).astype(np.int32)
  ids = np.where(mask == 1, ids, 0)
  ids[np.arange(B), lengths - 1] = 102
  return {"pixel_values": rng.normal(size=(B, 28, 28, 3)).astype(np.float32),
          "input_ids": ids, "attention_mask": mask,
          "image_id": np.array([0, 1, 2, 2, 3, 4, 5, 6], np.int32)}


def _run(mesh, n_steps=2):
  # Two steps: the second one checks that the donated, sharded state feeds back without recompiling.
  rules = mesh_lib.DEFAULT_RULES
  model = Blip2Stage1(config=CONFIG)
  tx = optim.make_optimizer(_optim_cfg())
  init_args = (jnp.zeros((1, 28, 28, 3)), jnp.zeros((1, T), jnp.int32), jnp.ones((1, T), jnp.int32))
  with nn.logical_axis_rules(rules):
    state, shardings, mask = step_lib.create_train_state(
        model, init_args, jax.random.PRNGKey(0), tx, FROZEN, mesh, rules)
  init_params = jax.device_get(state.params)
  batch_np = _batch()
  fn = step_lib.jit_train_step(model, tx, mask, blip2_stage1_loss, {}, shardings, mesh, rules,
                               batch_np)
  metrics = []
  with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
    for _ in range(n_steps):
      batch = mesh_lib.global_batch_from_host(batch_np, mesh, rules)
      state, m = fn(state, batch, jax.random.PRNGKey(1))
      metrics.append(jax.device_get(m))
  return jax.device_get(state.params), metrics, state, init_params


@pytest.fixture(scope="module")
def reference():
  mesh = mesh_lib.make_mesh({"data": 1}, devices=jax.devices()[:1])
  return _run(mesh)


@pytest.mark.parametrize("shape", [{"data": 8}, {"fsdp": 8}, {"fsdp": 4, "tensor": 2}])
def test_sharded_step_equals_single_device(reference, shape):
  ref_params, ref_metrics, _, _ = reference
  params, metrics, state, _ = _run(mesh_lib.make_mesh(shape))
  for m, rm in zip(metrics, ref_metrics):
    for k in rm:
      if k.endswith("_norm"):  # norms of whole trees (~10): summation order differs by shard
        np.testing.assert_allclose(m[k], rm[k], rtol=1e-5, err_msg=k)
      else:
        np.testing.assert_allclose(m[k], rm[k], atol=1e-5, rtol=0, err_msg=k)
  chex.assert_trees_all_equal_structs(params, ref_params)
  chex.assert_trees_all_close(params, ref_params, atol=1e-5, rtol=0)
  if "fsdp" in shape:
    kernel = state.params["qformer"]["encoder"]["layer_0"]["attention"]["attention"]["query"][
        "kernel"]
    assert len(kernel.sharding.device_set) == 8
    assert not kernel.sharding.is_fully_replicated


def test_frozen_tower_has_no_optimizer_state_and_does_not_move(reference):
  ref_params, _, state, init_params = reference
  leaves = jax.tree_util.tree_flatten_with_path(state.opt_state)[0]
  paths = [jax.tree_util.keystr(p) for p, _ in leaves]
  assert not any("'encoder'" in p and "vision_model" in p for p in paths)
  assert any("post_layernorm" in p for p in paths)
  fresh = init_params
  np.testing.assert_array_equal(
      ref_params["vision_model"]["encoder"]["layers_0"]["mlp"]["fc1"]["kernel"],
      fresh["vision_model"]["encoder"]["layers_0"]["mlp"]["fc1"]["kernel"])
  assert not np.array_equal(ref_params["query_tokens"], fresh["query_tokens"])


def test_batch_not_divisible_is_clear_error_before_compile():
  mesh = mesh_lib.make_mesh({"data": 8})
  with pytest.raises(ValueError, match="not divisible"):
    mesh_lib.check_batch_size(12, mesh, mesh_lib.DEFAULT_RULES)
