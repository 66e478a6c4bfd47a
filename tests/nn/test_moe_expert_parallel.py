"""Expert parallelism with routed dispatch (``vlm.nn.moe.routed_expert_mlp``, "routed") equals the
dense evaluation.

On the 8 simulated CPU devices (tests/conftest.py): the routed layer under meshes expert=4 x
data=2 and expert=8 against ``dense_expert_mlp`` on one device, values and gradients w.r.t. the
tokens, the router kernel (through softmax, top-k and ``norm_topk_prob`` as HF
``Qwen3MoeSparseMoeBlock``) and both expert tensors, float32 within 1e-5; with uneven routing
(most tokens to one expert, some experts unused) and a token count that does not divide over the
devices (padded inside). A tiny Qwen3-VL-MoE forward + gradient (packed rows with padding tokens,
load-balancing loss included) with "routed" on an expert=4 x fsdp=2 mesh (parameters placed by
the default logical rules: expert weights' embed dim over fsdp) against "dense" on one device.
The TPU path (ragged all-to-all + megablox GMM) compiles for a v5p 2x2x1 topology through libtpu
(skipped without libtpu).
"""
import os

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec

from tests.models import qwen_tiny as T
from vlm.models import qwen3
from vlm.models.qwen3_vl import Qwen3VL, init_params
from vlm.nn import moe
from vlm.objectives import moe as moe_loss
from vlm.parallel import mesh as mesh_lib
from vlm.train import step as step_lib

TOL = 1e-5


def _problem(seed, t, d, e, i, hot=None, cold=()):
  """Tokens, router kernel, expert weights (N(0, 1/fan_in)); the router kernel's bias toward
  expert ``hot`` sends most tokens there, experts in ``cold`` receive none."""
  rng = np.random.RandomState(seed)
  x = jnp.asarray(rng.randn(t, d), jnp.float32)
  router = rng.randn(d, e) / np.sqrt(d)
  gate_up = jnp.asarray(rng.randn(e, d, 2 * i) / np.sqrt(d), jnp.float32)
  down = jnp.asarray(rng.randn(e, i, d) / np.sqrt(i), jnp.float32)
  return x, jnp.asarray(router, jnp.float32), gate_up, down, hot, tuple(cold)


def _route(x, router, k, hot, cold):
  """HF Qwen3-MoE router: softmax over E in float32, top-k, renormalised (norm_topk_prob)."""
  logits = x @ router
  if hot is not None:
    logits = logits + 4.0 * jax.nn.one_hot(hot, router.shape[1])
  if cold:
    logits = logits - 1e4 * jnp.sum(jax.nn.one_hot(jnp.asarray(cold), router.shape[1]), 0)
  w, ids = jax.lax.top_k(jax.nn.softmax(logits, axis=-1), k)
  return w / jnp.sum(w, -1, keepdims=True), ids


def _value_and_grads(fn, x, router, gate_up, down, k, hot, cold):
  c = jnp.cos(jnp.arange(x.size, dtype=jnp.float32)).reshape(x.shape)

  def loss(x, router, gate_up, down):
    w, ids = _route(x, router, k, hot, cold)
    y = fn(x, gate_up, down, ids, w, jax.nn.silu)
    return jnp.sum(y * c), (y, ids)

  (_, (y, ids)), g = jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2, 3), has_aux=True))(
      x, router, gate_up, down)
  return y, g, ids


@pytest.mark.parametrize("shape,t,hot,cold,checked", [
    ({"expert": 4, "data": 2}, 64, 3, (5,), True),
    ({"expert": 8}, 61, 6, (0, 1), True),
    ({"expert": 4, "data": 2}, 40, 2, (), False),
], ids=["expert4-data2-uneven", "expert8-padded-uneven", "expert4-data2-unchecked"])
def test_routed_layer_equals_dense(shape, t, hot, cold, checked, monkeypatch):
  """Values and gradients (tokens, router, gate_up, down) of the routed layer on the mesh equal
  the dense evaluation on one device. "unchecked": ``shard_map(check_vma=False)``, the transpose
  the TPU megablox path runs with."""
  d, e, i, k = 16, 8, 8, 2
  x, router, gate_up, down, hot, cold = _problem(0, t, d, e, i, hot, cold)
  want_y, want_g, ids = _value_and_grads(moe.dense_expert_mlp, x, router, gate_up, down, k, hot,
                                         cold)
  counts = np.bincount(np.asarray(ids).reshape(-1), minlength=e)
  assert counts[hot] >= 0.75 * t and all(counts[c] == 0 for c in cold), counts  # uneven routing
  monkeypatch.setattr(moe, "_CHECK_VMA", checked)
  mesh = mesh_lib.make_mesh(shape)
  ex = NamedSharding(mesh, PartitionSpec("expert"))
  with jax.set_mesh(mesh):
    got_y, got_g, _ = _value_and_grads(moe.routed_expert_mlp, x, router,
                                       jax.device_put(gate_up, ex), jax.device_put(down, ex), k,
                                       hot, cold)
  errs = [float(jnp.max(jnp.abs(a - b))) for a, b in zip((got_y,) + got_g, (want_y,) + want_g)]
  print(f"{shape} T={t}: max abs err y {errs[0]:.1e}, dx {errs[1]:.1e}, drouter {errs[2]:.1e}, "
        f"dgate_up {errs[3]:.1e}, ddown {errs[4]:.1e}")
  assert max(errs) <= TOL, errs
  assert float(jnp.max(jnp.abs(want_g[2]))) > 0.1   # the gradients compared are not all ~0


def test_routed_without_mesh_and_errors():
  x, router, gate_up, down, _, _ = _problem(1, 12, 16, 4, 8)
  w, ids = _route(x, router, 2, None, ())
  want = moe.dense_expert_mlp(x, gate_up, down, ids, w, jax.nn.silu)
  got = moe.routed_expert_mlp(x, gate_up, down, ids, w, jax.nn.silu)   # no mesh: local path
  chex.assert_trees_all_close(got, want, atol=TOL, rtol=0)
  mesh = mesh_lib.make_mesh({"expert": 8})
  with pytest.raises(ValueError, match="do not split over mesh axis 'expert'"):
    moe.routed_expert_mlp(x, gate_up, down, ids, w, jax.nn.silu, mesh=mesh)
  with pytest.raises(ValueError, match="dispatch must be one of"):
    moe.routed_expert_mlp(x, gate_up, down, ids, w, jax.nn.silu, dispatch="bogus")
  with pytest.raises(ValueError, match="needs TPU devices"):
    moe.routed_expert_mlp(x, gate_up, down, ids, w, jax.nn.silu, matmul="megablox")
  with pytest.raises(ValueError, match="must include the expert axis"):
    moe.routed_expert_mlp(x, gate_up, down, ids, w, jax.nn.silu,
                          mesh=mesh_lib.make_mesh({"expert": 2, "data": 4}), token_axes=("data",))
  with pytest.raises(ValueError, match="'routed'"):
    qwen3.Qwen3TextConfig(**T.TEXT, **T.MOE, moe_implementation="routd")


def test_qwen3_vl_moe_routed_equals_dense():
  """Tiny Qwen3-VL-MoE, two packed rows (images, a video, padding tokens at the row ends):
  logits and the gradients of (weighted logits + load-balancing loss) w.r.t. every parameter,
  "routed" (decoder scanned and rematerialised) on an expert=4 x fsdp=2 mesh vs "dense"
  (unscanned) on one device."""
  cfg_d = T.config("moe", moe_implementation="dense")
  cfg_r = T.config("moe", moe_implementation="routed")
  params = T.spread(jax.jit(lambda r: init_params(Qwen3VL(cfg_d), r))(jax.random.PRNGKey(0)), 3)
  samples = T.make_samples(cfg_d)
  rows = [T.pack_row(cfg_d, samples, 64, 96), T.pack_row(cfg_d, [samples[2], samples[0]], 64, 96)]
  batch = jax.tree.map(jnp.asarray, T.stack_rows(rows))
  real = np.asarray(batch["segment_ids"]) > 0
  assert not real.all()                                          # padding tokens present
  c = jnp.cos(jnp.arange(cfg_d.text.vocab_size, dtype=jnp.float32))

  def make_loss(model):
    def loss(p, b):
      (logits, _), state = model.apply(
          {"params": p}, b["input_ids"], b["position_ids"], pixel_values=b["pixel_values"],
          vision_tables=b["vision"], visual_token_index=b["visual_token_index"],
          segment_ids=b["segment_ids"], mutable=["intermediates"])
      aux = moe_loss.load_balancing_loss(qwen3.router_logits(state["intermediates"]),
                                         cfg_d.text.num_experts, cfg_d.text.num_experts_per_tok,
                                         b["segment_ids"] > 0)
      keep = (b["segment_ids"] > 0)[..., None]
      return jnp.sum(jnp.where(keep, logits * c, 0.0)) / 64 + aux, logits
    return jax.jit(jax.value_and_grad(loss, has_aux=True))

  (_, want), want_g = make_loss(Qwen3VL(cfg_d))(params, batch)
  rules, mesh = mesh_lib.DEFAULT_RULES, mesh_lib.make_mesh({"expert": 4, "fsdp": 2})
  model = Qwen3VL(cfg_r, scan_layers=True, remat=True)   # as the big configs run it
  params, want_g = qwen3.stack_layers(params), qwen3.stack_layers(want_g)
  with nn.logical_axis_rules(rules):
    _, shardings = step_lib.param_shardings(
        model, (batch["input_ids"], batch["position_ids"], None, batch["pixel_values"],
                batch["vision"], batch["visual_token_index"]), mesh, rules)
  sharded = jax.device_put(params, shardings)
  specs = [tuple(x.sharding.spec) for path, x in jax.tree_util.tree_flatten_with_path(sharded)[0]
           if "gate_up_proj" in jax.tree_util.keystr(path)]
  assert specs and all(s[-3:-1] == ("expert", "fsdp") for s in specs), specs
  with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
    (_, got), got_g = make_loss(model)(sharded, batch)
  err = float(np.abs(np.asarray(got) - np.asarray(want))[real].max())
  gerr = max(jax.tree.leaves(jax.tree.map(lambda a, b: float(jnp.max(jnp.abs(a - b))),
                                          got_g, want_g)))
  print(f"Qwen3-VL-MoE routed (expert 4 x fsdp 2) vs dense: logits {err:.1e}, grads {gerr:.1e}")
  assert err <= TOL and gerr <= TOL, (err, gerr)


def test_tpu_routed_path_compiles_for_v5p_topology():
  """Ragged all-to-all + megablox GMM, forward and backward, AOT-compiled for 4 v5p chips
  (expert=4): the lowered program holds the ragged all-to-all and the Mosaic GMM kernel."""
  pytest.importorskip("libtpu", reason="libtpu not installed (pip install -e '.[tpu]')")
  os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")   # other processes may hold libtpu
  from jax.experimental import topologies
  topo = topologies.get_topology_desc(platform="tpu", topology_name="v5p:2x2x1")
  mesh = mesh_lib.make_mesh({"expert": 4}, devices=topo.devices)
  t, d, e, i, k = 512, 256, 8, 128, 2
  spec = lambda shape, dt: jax.ShapeDtypeStruct(shape, dt, sharding=NamedSharding(
      mesh, PartitionSpec("expert")))
  args = (spec((t, d), jnp.bfloat16), spec((e, d, 2 * i), jnp.bfloat16),
          spec((e, i, d), jnp.bfloat16), spec((t, k), jnp.int32), spec((t, k), jnp.bfloat16))

  def loss(x, gate_up, down, ids, w):
    y = moe.routed_expert_mlp(x, gate_up, down, ids, w, jax.nn.silu)
    return jnp.sum(y.astype(jnp.float32))

  # conftest's "highest" precision would ask Mosaic for an fp32-precision bfloat16 matmul
  with jax.set_mesh(mesh), jax.default_matmul_precision("default"):
    lowered = jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2, 4))).lower(*args)
  text = lowered.as_text()
  assert "ragged_all_to_all" in text and "tpu_custom_call" in text
  compiled = lowered.compile()
  mem = compiled.memory_analysis()
  assert mem.argument_size_in_bytes > 0


def test_moe_recipes_use_routed_expert_parallelism():
  """configs/qwen3_vl stage B and C: the MoE variants run "routed" on an expert=8 axis that also
  splits the batch; the dense variants keep their settings."""
  import importlib.util
  from vlm.tasks.qwen_vl import MOE_VARIANTS
  for stage in ("b", "c"):
    path = os.path.join(os.path.dirname(__file__), "..", "..", "configs", "qwen3_vl",
                        f"stage_{stage}.py")
    spec = importlib.util.spec_from_file_location(f"stage_{stage}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    for variant in MOE_VARIANTS + ("8b",):
      c = module.get_config(variant)
      routed = c.model.text_overrides.get("moe_implementation") == "routed"
      assert routed == (variant in MOE_VARIANTS), (stage, variant)
      if routed:
        assert c.mesh.shape.expert == 8
        rules = dict(mesh_lib.rules_from_config(c.mesh.rules))
        assert rules["batch"] == ("data", "fsdp", "expert")
        sizes = mesh_lib.resolve_mesh_shape(dict(c.mesh.shape), 256)   # a v5p-512 slice
        assert sizes["expert"] == 8 and sizes["fsdp"] >= 8
        assert c.global_batch_size % (sizes["data"] * sizes["fsdp"] * sizes["expert"]) == 0
