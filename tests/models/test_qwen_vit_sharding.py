"""Vision at scale (issue 10): the Qwen ViT runs data-parallel while the LLM is tensor-parallel.

On 8 simulated CPU devices with mesh data=2, tensor=4 and the default logical rules: the tower's
activations split their rows over data *and* tensor (``VISION_BATCH``: the compiled per-device
block activations hold B/8 rows, and the tower's outputs are sharded so), the vision weights are
not split over tensor while the LLM's are, and the loss and its gradients equal the 1-device
values within 1e-5. A batch that does not divide 8 falls back to the longest dividing prefix of
the rule's mesh axes (still correct). The tower builds no array over the global patch count:
with a segment-aware implementation no [Np, Np] array exists at all (checked in the jaxpr)."""
from __future__ import annotations

import functools
import re

import chex
import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tests.models import qwen_tiny as T
from vlm.models import qwen3_vl, qwen_vit
from vlm.nn import partitioning as P
from vlm.parallel import mesh as mesh_lib

jax.config.update("jax_default_matmul_precision", "highest")

B, L, NP = 8, 48, 64


@functools.lru_cache(maxsize=None)
def _setup():
  cfg = T.config("dense")
  rows = []
  for b in range(B):
    s1, s2, _ = T.make_samples(cfg, seed=b)
    rows.append(T.pack_row(cfg, [s1] if b % 2 else [s2], L, NP))
  batch = T.stack_rows(rows)
  model = qwen3_vl.Qwen3VL(cfg)
  args = (jnp.asarray(batch["input_ids"]), jnp.asarray(batch["position_ids"]), None,
          jnp.asarray(batch["pixel_values"]), batch["vision"],
          jnp.asarray(batch["visual_token_index"]))
  boxed = jax.eval_shape(model.init, jax.random.PRNGKey(0), *args)["params"]
  params = T.spread(nn.unbox(model.init(jax.random.PRNGKey(0), *args)["params"]), 5)
  return cfg, model, args, batch, boxed, params


def _loss_fn(model, args, segment_ids):
  c = jax.random.normal(jax.random.PRNGKey(3), (B, L, T.TEXT["vocab_size"]))

  def loss(params):
    logits, _ = model.apply({"params": params}, *args, segment_ids=segment_ids)
    return jnp.sum(jnp.sin(logits) * c) / (B * L)
  return loss


def _row_axes(x) -> set:
  """Mesh axes of size > 1 that split dimension 0 of ``x``."""
  spec = x.sharding.spec
  first = spec[0] if len(spec) else None
  names = () if first is None else (first if isinstance(first, tuple) else (first,))
  return {n for n in names if x.sharding.mesh.shape[n] > 1}


def _mesh():
  return mesh_lib.make_mesh({"data": 2, "tensor": 4}, jax.devices()[:8])


def test_vision_rows_split_over_tensor_weights_not_and_loss_grads_equal_one_device():
  cfg, model, args, batch, boxed, params = _setup()
  seg = jnp.asarray(batch["segment_ids"])
  loss = _loss_fn(model, args, seg)
  ref_loss, ref_grads = jax.jit(jax.value_and_grad(loss))(params)

  mesh, rules = _mesh(), mesh_lib.DEFAULT_RULES
  shardings = nn.logical_to_mesh_sharding(nn.get_partition_spec(boxed), mesh, rules)
  flat = {"/".join(k): v.spec for k, v in flax.traverse_util.flatten_dict(shardings).items()}
  vis = {k: v for k, v in flat.items() if k.startswith("visual/")}
  llm = {k: v for k, v in flat.items() if k.startswith("language_model/")}
  assert vis and not any("tensor" in str(s) for s in vis.values()), vis
  assert any("tensor" in str(s) for s in llm.values())  # the LLM is tensor-parallel
  sharded = jax.device_put(params, shardings)

  with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
    step = jax.jit(jax.value_and_grad(loss))
    got_loss, got_grads = step(sharded)
    # the tower alone: its outputs' rows over data, fsdp and tensor (all 8 devices)
    tower = jax.jit(lambda p: model.apply({"params": p}, args[3], **args[4],
                                          method=lambda m, *a, **k: m.visual(*a, **k)))
    merged, deepstack = tower(sharded)
    hlo = tower.lower(sharded).compile().as_text()
  for out in [merged, *deepstack]:
    assert _row_axes(out) == {"data", "tensor"}, out.sharding
    assert len({str(s.index) for s in out.addressable_shards}) == 8
  # per-device block activations hold B/8 = 1 row of Np patches (Dv=32)
  dv = cfg.vision.hidden_size
  assert re.search(rf"f32\[1,{NP},{dv}\]", hlo) and not re.search(rf"f32\[4,{NP},{dv}\]", hlo)
  print(f"loss 1 device {float(ref_loss):.6f}, data=2 x tensor=4 {float(got_loss):.6f}")
  assert abs(float(got_loss) - float(ref_loss)) <= 1e-5
  errs = jax.tree.map(lambda a, b: float(jnp.max(jnp.abs(a - b))), got_grads, ref_grads)
  print(f"max grad abs diff {max(jax.tree.leaves(errs)):.2e}")
  chex.assert_trees_all_close(got_grads, ref_grads, atol=1e-5, rtol=0)


def test_rows_that_do_not_divide_use_a_dividing_prefix():
  mesh = _mesh()
  x = jnp.arange(2 * 4 * 3, dtype=jnp.float32).reshape(2, 4, 3)
  with jax.set_mesh(mesh), nn.logical_axis_rules(mesh_lib.DEFAULT_RULES):
    y = jax.jit(qwen_vit.constrain_rows)(x)
    z = jax.jit(qwen_vit.constrain_rows)(jnp.zeros((8, 4, 3)))
  assert _row_axes(y) == {"data"}  # 2 rows: not over tensor=4
  assert _row_axes(z) == {"data", "tensor"}
  np.testing.assert_array_equal(np.asarray(y), np.asarray(x))
  # a rules table without the vision names: rows follow BATCH
  rules = tuple(r for r in mesh_lib.DEFAULT_RULES if not r[0].startswith("vision"))
  with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
    w = jax.jit(lambda a: qwen_vit.constrain_rows(a))(jnp.zeros((8, 4, 3)))  # a fresh trace
  assert _row_axes(w) == {"data"}
  # expert parallelism (BATCH over data, fsdp, expert; qwen_vl.expert_parallel's rules): the
  # tower's rows keep those axes and add tensor / context, never fewer than the LLM's
  emesh = mesh_lib.make_mesh({"data": 1, "expert": 4, "tensor": 2}, jax.devices()[:8])
  rules = tuple((n, ("data", "fsdp", "expert") if n == P.BATCH else a)
                for n, a in mesh_lib.DEFAULT_RULES)
  with jax.set_mesh(emesh), nn.logical_axis_rules(rules):
    e8 = jax.jit(lambda a: qwen_vit.constrain_rows(a))(jnp.zeros((8, 4, 3)))
    e4 = jax.jit(lambda a: qwen_vit.constrain_rows(a))(jnp.zeros((4, 4, 3)))
  assert _row_axes(e8) == {"expert", "tensor"} and _row_axes(e4) == {"expert"}


@pytest.mark.parametrize("impl", ["chunked", "xla"])
def test_no_array_over_the_global_patch_count(impl):
  """Rows of Np patches: the "xla" path builds per-row [B, 1, Np, Np] masks (never one over
  B*Np); "chunked" builds no [.., Np, Np] array at all."""
  cfg = T.config("dense").vision
  n = 80  # no parameter dimension is 80 or 160
  grids = [np.array([[1, 4, 4]]), np.array([[1, 2, 4], [1, 4, 4]])]
  tables = [qwen_vit.vision_inputs(cfg, g, n) for g in grids]
  stacked = {k: np.stack([t[k] for t in tables]) for k in tables[0]}
  pixels = jnp.zeros((2, n, cfg.patch_dim))
  model = qwen_vit.Qwen3VLVisionModel(cfg, attention_implementation=impl, attention_block_size=16)
  params = jax.eval_shape(model.init, jax.random.PRNGKey(0), pixels, **stacked)
  jaxpr = str(jax.make_jaxpr(lambda p: model.apply(p, pixels, **stacked))(params))
  assert not re.search(rf"\b{2 * n},{2 * n}\b", jaxpr)  # nothing over B*Np x B*Np
  square = re.search(rf"\[[\d,]*\b{n},{n}\]", jaxpr)
  assert bool(square) == (impl == "xla"), square


def test_splash_kernel_under_a_mesh_runs_per_row_shards():
  """A Pallas kernel is not partitioned by GSPMD (on a TPU topology the tower failed to lower):
  under a mesh the tower runs ``splash`` in a shard_map over its rows; values equal the 1-device
  dense path (CPU: Pallas interpret mode)."""
  cfg = T.config("dense").vision
  grids = [np.array([[1, 4, 4]]), np.array([[1, 2, 4], [1, 4, 4]])] * 4
  tables = [qwen_vit.vision_inputs(cfg, g, NP) for g in grids]
  stacked = {k: np.stack([t[k] for t in tables]) for k in tables[0]}
  pixels = np.random.default_rng(0).standard_normal((8, NP, cfg.patch_dim)).astype(np.float32)
  for b, g in enumerate(grids):
    pixels[b, int(np.prod(g, axis=1).sum()):] = 0
  params = T.spread(qwen_vit.Qwen3VLVisionModel(cfg).init(jax.random.PRNGKey(0), pixels,
                                                          **stacked), 2)
  ref = jax.jit(qwen_vit.Qwen3VLVisionModel(cfg).apply)(params, pixels, **stacked)
  model = qwen_vit.Qwen3VLVisionModel(cfg, attention_implementation="splash")
  with jax.set_mesh(_mesh()), nn.logical_axis_rules(mesh_lib.DEFAULT_RULES):
    fn = jax.jit(model.apply)
    assert "shard_map" in str(jax.make_jaxpr(model.apply)(params, pixels, **stacked))
    out = fn(params, pixels, **stacked)
  assert _row_axes(out[0]) == {"data", "tensor"}
  chex.assert_trees_all_close(out, ref, atol=1e-5, rtol=0)
