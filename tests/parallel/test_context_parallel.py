"""Context parallelism (issue 10): the decoder's token axis split over the ``context`` mesh axis.

8 simulated CPU devices (conftest). Attention alone, then the tiny Qwen3-VL of the stage-C recipe
with images, DeepStack and packed rows (three samples over two rows, segments and images crossing
the shard boundaries): logits, loss and gradients on a ``context=4 x data=2`` mesh, and the
recipe's full jitted train step on ``context=4 x fsdp=2``, equal the single-device (no mesh)
evaluation within 1e-5.
"""
import types

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs.qwen3_vl import stage_c
from tests.models import qwen_tiny
from vlm.data import packing
from vlm.models.qwen3_vl import Qwen3VL, visual_token_index
from vlm.models.rope_index import qwen3_vl_get_rope_index
from vlm.nn import attention as A
from vlm.parallel import mesh as mesh_lib
from vlm.tasks import qwen_vl
from vlm.train import optim
from vlm.train import step as step_lib
from vlm.train.state import TrainState

TOL = 1e-5
LENGTH, PATCHES = 64, 96  # 16 tokens per context shard
RULES = mesh_lib.DEFAULT_RULES
TEXT_IDS = 200  # text tokens are drawn from 1..199 (below every special token of both configs)


def _max_err(a, b):
  return max((float(np.abs(np.asarray(x, np.float64) - np.asarray(y, np.float64)).max())
              for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b))), default=0.0)


# "xla" here; the blockwise "chunked" implementation under context parallelism (traced causal
# offset, custom VJP) is the stage-C recipe's, checked through its train step below.
@pytest.mark.parametrize("implementation", ["xla"])
def test_attention_context_parallel_equals_one_device(implementation):
  rng = np.random.default_rng(0)
  b, l, hq, hkv, d = 2, 32, 4, 2, 8
  q, k, v = (jnp.asarray(rng.normal(size=(b, l, h, d)), jnp.float32) for h in (hq, hkv, hkv))
  seg = np.zeros((b, l), np.int32)
  seg[0, :10], seg[0, 10:27] = 1, 2  # segments straddle the 8-token shards; tail is padding
  seg[1, :5], seg[1, 5:] = 1, 2
  seg = jnp.asarray(seg)

  def f(q, k, v, sharded):
    o = A.attention(q, k, v, segment_ids=seg, causal=True, implementation=implementation,
                    block_size=4, sharded=sharded)
    return jnp.sum(o * jnp.cos(o)), o

  grad = lambda sharded: jax.jit(jax.value_and_grad(lambda *a: f(*a, sharded), argnums=(0, 1, 2),
                                                    has_aux=True))
  want = grad(False)(q, k, v)
  mesh = mesh_lib.make_mesh({"data": 2, "context": 4})
  with jax.set_mesh(mesh), nn.logical_axis_rules(RULES):
    assert A.context_parallel_size() == 4
    got = grad(True)(q, k, v)
  assert got[0][1].sharding.spec[:2] == ("data", "context")
  assert _max_err(got, want) <= TOL


def test_attention_context_parallel_rejects_undividable_length():
  x = jnp.zeros((2, 30, 2, 8))
  mesh = mesh_lib.make_mesh({"data": 2, "context": 4})
  with jax.set_mesh(mesh), nn.logical_axis_rules(RULES):
    with pytest.raises(ValueError, match="divisible by 4"):
      jax.jit(lambda x: A.attention(x, x, x, causal=True, sharded=True))(x)


# ------------------------------------------------------------------------------------------------
# The tiny stage-C Qwen3-VL.


def _config(**text_overrides):
  c = stage_c.get_config("tiny")
  c.data.max_length, c.data.max_patches = LENGTH, PATCHES
  c.model.text_overrides = dict(c.model.text_overrides, attention_block_size=8, **text_overrides)
  return c


def _sample(cfg, rng, parts):
  """A tokenised sample of the packing schema: ``parts`` is a list of ints (text tokens) and
  (t, h, w) image grids; the loss covers text tokens only."""
  m = cfg.vision.spatial_merge_size
  ids, grids = [], []
  for part in parts:
    if isinstance(part, int):
      ids += list(rng.integers(1, TEXT_IDS, size=part))
    else:
      grids.append(part)
      ids += ([cfg.vision_start_token_id] + [cfg.image_token_id] * (int(np.prod(part)) // m**2)
              + [cfg.vision_end_token_id])
  ids = np.asarray(ids, np.int64)
  grid = np.asarray(grids, np.int64).reshape(-1, 3)
  pos, _ = qwen3_vl_get_rope_index(ids[None], grid if len(grid) else None, None, None, m,
                                   cfg.image_token_id, cfg.video_token_id,
                                   cfg.vision_start_token_id)
  patches = int(np.prod(grid, axis=1).sum()) if len(grid) else 0
  return types.SimpleNamespace(
      input_ids=ids, target_mask=(ids < TEXT_IDS).astype(np.float32), position_ids=pos[:, 0],
      pixel_values=rng.normal(size=(patches, cfg.vision.patch_dim)).astype(np.float32),
      grid_thw=grid, visual_index=visual_token_index(ids[None], cfg.image_token_id,
                                                     cfg.video_token_id)[0],
      num_tokens=len(ids), num_patches=patches, where="test")


def _batch(cfg):
  rng = np.random.default_rng(1)
  a = _sample(cfg, rng, [3, (1, 4, 6), 4])            # 15 tokens, image on tokens 4..9
  b = _sample(cfg, rng, [5, (1, 2, 4), 6, (1, 4, 4), 9])  # 28 tokens, two images
  c = _sample(cfg, rng, [13])
  # row 0: a | b | c (56 tokens, b's images straddle the 16-token shards); row 1: c | a | b
  return packing.assemble_batch([[a, b, c], [c, a, b]], max_length=LENGTH, max_patches=PATCHES,
                                vision_config=cfg.vision, pad_token_id=0)


def _setup(config, model=None):
  """(model, host numpy params, host batch). The parameters are drawn on the host from the init's
  shapes (no init compile): matrices N(0, 1/fan_in), vectors 1 + 0.1 N (well-conditioned, so a
  masking error shows in the logits)."""
  model = model or qwen_vl.build_model(config)
  batch = _batch(model.config)
  shapes = nn.unbox(jax.eval_shape(lambda r: qwen_vl.init_model(model, r, batch),
                                   jax.random.PRNGKey(0)))
  rng = np.random.default_rng(3)
  draw = lambda x: (1.0 + 0.1 * rng.normal(size=x.shape) if x.ndim == 1 else
                    rng.normal(size=x.shape) / np.sqrt(x.shape[-2])).astype(x.dtype)
  return model, jax.tree.map(draw, shapes), batch


def _sharded(mesh, model, params, batch, config):
  with nn.logical_axis_rules(RULES):
    _, p_shard = step_lib.param_shardings_of(
        lambda r: qwen_vl.init_model(model, r, batch), mesh, RULES)
  b_shard = mesh_lib.batch_shardings(mesh, RULES, batch, qwen_vl.batch_axes(config))
  return jax.device_put(params, p_shard), jax.device_put(batch, b_shard)


def test_qwen3_vl_context_parallel_logits_loss_grads():
  # the tests' tiny Qwen3-VL (256-token vocabulary, two DeepStack taps), dense attention path
  config = _config()
  model = Qwen3VL(qwen_tiny.config("dense", attention_implementation="xla"))
  model, params, batch = _setup(config, model)
  assert int(batch["visual_token_index"].max()) >= 0 and int(batch["segment_ids"].max()) == 3

  def fn(p, b):
    logits, _ = model.apply({"params": p}, *qwen_vl._model_args(b), segment_ids=b["segment_ids"])
    (loss, metrics), grads = jax.value_and_grad(
        lambda p: qwen_vl.loss_fn(model, p, b, None, chunk_size=16), has_aux=True)(p)
    return logits, loss, metrics, grads

  want = jax.jit(fn)(params, batch)
  mesh = mesh_lib.make_mesh({"data": 2, "context": 4})
  sp, sb = _sharded(mesh, model, params, batch, config)
  assert sb["input_ids"].sharding.spec[1] == "context"
  assert sb["position_ids"].sharding.spec[2] == "context"
  with jax.set_mesh(mesh), nn.logical_axis_rules(RULES):
    got = jax.jit(fn)(sp, sb)
  real = batch["segment_ids"] > 0
  logit_err = float(np.abs(np.asarray(got[0])[real] - np.asarray(want[0])[real]).max())
  assert logit_err <= TOL, logit_err
  assert abs(float(got[1]) - float(want[1])) <= TOL
  assert _max_err(got[2], want[2]) <= TOL
  grad_err = _max_err(got[3], want[3])
  assert grad_err <= TOL, grad_err
  # the DeepStack mergers and the vision tower received gradients through the sharded tokens
  flat = flax.traverse_util.flatten_dict(got[3])
  assert any("deepstack_merger_list" in "/".join(k) and np.abs(np.asarray(v)).max() > 0
             for k, v in flat.items())


def test_stage_c_train_step_context_parallel_equals_one_device():
  config = _config()  # the recipe's chunked attention
  assert config.model.text_overrides["attention_implementation"] == "chunked"
  model, params, batch = _setup(config)
  tx = optim.make_optimizer(config.optim)
  mask = optim.trainable_mask(params, list(config.optim.frozen))
  loss_kwargs = dict(config.loss, chunk_size=16)
  axes = qwen_vl.batch_axes(config)

  def run(mesh):
    # the trainer's state layout (step.state_sharding_tree) and jitted step (step.jit_train_step)
    with nn.logical_axis_rules(RULES):
      _, p_shard = step_lib.param_shardings_of(
          lambda r: qwen_vl.init_model(model, r, batch), mesh, RULES)
    p = jax.device_put(params, p_shard)
    shardings = step_lib.state_sharding_tree(p, p_shard, tx, mask, mesh)
    opt = jax.jit(lambda p: tx.init(optim.partition(p, mask)[0]),
                  out_shardings=shardings.opt_state)(p)
    state = TrainState(step=jax.device_put(np.int32(0), mesh_lib.replicated(mesh)), params=p,
                       opt_state=opt)
    fn = step_lib.jit_train_step(model, tx, mask, qwen_vl.loss_fn, loss_kwargs, shardings, mesh,
                                 RULES, batch, batch_axes=axes)
    metrics = []
    with jax.set_mesh(mesh), nn.logical_axis_rules(RULES):
      b = mesh_lib.global_batch_from_host(batch, mesh, RULES, axes)
      assert b["labels"].sharding.spec[1] == "context"
      for _ in range(2):  # the first step's learning rate is the warm-up's 0
        state, m = fn(state, b, jax.random.PRNGKey(1))
        metrics.append(jax.device_get(m))
    return jax.device_get(state.params), metrics

  want = run(mesh_lib.make_mesh({"data": 1}, devices=jax.devices()[:1]))
  got = run(mesh_lib.make_mesh({"fsdp": 2, "context": 4}))
  assert float(want[1][0]["loss_weight"]) > 0 and float(want[1][0]["grad_norm"]) > 0
  assert _max_err(got[1], want[1]) <= TOL, (got[1], want[1])
  assert _max_err(want[0], params) > 1e-4  # the parameters moved
  assert _max_err(got[0], want[0]) <= TOL


@pytest.mark.parametrize("variant", ["8b", "235b_a22b"])
def test_stage_c_full_variants_use_the_context_axis(variant):
  c = stage_c.get_config(variant)
  assert c.mesh.shape["context"] == 4
  assert stage_c.get_config("tiny").mesh.shape.get("context", 1) == 1
  # 256 chips: data x fsdp (x expert) = 64 ways divide the 256 rows; 32,768 tokens split by 4
  sizes = mesh_lib.resolve_mesh_shape(dict(c.mesh.shape), 256)
  assert sizes["context"] == 4
  rules = mesh_lib.rules_from_config(c.mesh.rules)
  mesh = jax.sharding.AbstractMesh(tuple(sizes.values()), tuple(sizes))
  assert mesh_lib.data_parallel_size(mesh, rules) == 64
  mesh_lib.check_batch_size(c.global_batch_size, mesh, rules)
  mesh_lib.check_sequence_length(c.data.max_length, mesh, rules)
