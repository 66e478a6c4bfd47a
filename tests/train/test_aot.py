"""AOT compile (vlm/train/aot.py, scripts/aot_compile.py): topology names, the trainer's parameter
shardings of the tiny recipes on a 4-chip TPU topology against a golden file, a real TPU compile,
the collective parser, the does-not-fit error and a ``cpu:8`` run of the script.

Golden file: ``tests/train/golden/aot_param_specs.json`` ({recipe: {param path: PartitionSpec}})
for mesh fsdp=2, tensor=2 on ``v5e:2x2``. Regenerate after an intended change of parameter
names or logical axes with ``VLM_UPDATE_GOLDEN=1 python -m pytest -q tests/train/test_aot.py``
and review the diff.

The TPU tests need libtpu (``pip install -e ".[tpu]"``, in CI) but no TPU; they skip without it.
Compiling the tiny recipes' full train steps for TPU takes minutes on a 2-core machine, so the
golden test traces the same state construction as the compile (``aot.plan_train_step``, whose
shardings are the step's in/out shardings); the full compile runs on the fake linear task.
"""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys

import jax
import pytest

from vlm.train import aot
from vlm.train.cli import load_config_file

from tests.train import fake_task

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
GOLDEN = os.path.join(os.path.dirname(os.path.abspath(__file__)), "golden",
                      "aot_param_specs.json")
MESH = {"data": 1, "fsdp": 2, "tensor": 2}
RECIPES = ("configs/blip2/stage1.py:tiny", "configs/blip2/stage2_opt.py:tiny",
           "configs/qwen3_vl/stage_b.py:tiny")


def _libtpu_devices():
  try:
    return aot.resolve_topology("v5e:2x2")
  except aot.TopologyError as e:
    pytest.skip(f"libtpu is not importable here (pip install -e '.[tpu]'): {e}")


@pytest.fixture(scope="module")
def v5e_2x2():
  return _libtpu_devices()


def test_accelerator_type_names_map_to_cloud_slice_shapes(v5e_2x2):
  assert len(v5e_2x2.devices) == 4 and v5e_2x2.hbm_bytes == 16 * aot.GiB
  # Cloud TPU docs: v5p-N counts TensorCores (2 per chip); v5p-512 is the 4x8x8 slice.
  t = aot.resolve_topology("v5p-512")
  assert (t.shape, len(t.devices), t.hbm_bytes) == ("v5p:4x8x8", 256, 95 * aot.GiB)
  t = aot.resolve_topology("v5e-256")
  assert (t.shape, len(t.devices)) == ("v5e:16x16", 256)
  assert aot.resolve_topology("v6e-8").shape == "v6e:2x4"
  assert aot.resolve_topology("v5p-128").shape == "v5p:4x4x4"
  assert len(aot.resolve_topology("v5p:2x2x2").devices) == 8


@pytest.mark.parametrize("name", ["v5e-3", "tpu-8", "v5p-7", "v9:2x2", "v5e_16x16x", "cpu:99999"])
def test_bad_topology_names_list_the_valid_forms(name):
  with pytest.raises(aot.TopologyError) as e:
    aot.resolve_topology(name)
  assert "cpu:" in str(e.value) and ("v5p-512" in str(e.value) or "XLA_FLAGS" in str(e.value))


def _tiny(spec):
  c = load_config_file(spec)
  with c.unlocked():
    c.mesh.shape = dict(MESH)
    c.global_batch_size = 2
  return c


def test_tiny_recipes_param_shardings_match_golden(v5e_2x2):
  got = {}
  for spec in RECIPES:
    plan = aot.plan_train_step(_tiny(spec), v5e_2x2)
    assert plan.mesh.devices.size == 4
    got[spec] = aot.param_specs(plan.shardings.params)
  if os.environ.get("VLM_UPDATE_GOLDEN"):
    os.makedirs(os.path.dirname(GOLDEN), exist_ok=True)
    with open(GOLDEN, "w") as f:
      json.dump(got, f, indent=1, sort_keys=True)
  with open(GOLDEN) as f:
    golden = json.load(f)
  for spec in RECIPES:
    want = golden[spec]
    missing = sorted(set(want) - set(got[spec]))
    extra = sorted(set(got[spec]) - set(want))
    assert not missing and not extra, (spec, missing[:5], extra[:5])
    diff = {k: (got[spec][k], want[k]) for k in want if got[spec][k] != want[k]}
    assert not diff, (spec, dict(list(diff.items())[:5]))
    # the mesh axes really are used: some parameter is split over fsdp and some over tensor
    specs = " ".join(want.values())
    assert "'fsdp'" in specs and "'tensor'" in specs, spec


def test_fake_task_compiles_for_tpu_and_reports(v5e_2x2, monkeypatch):
  from vlm import tasks
  monkeypatch.setitem(tasks.TASKS, "fake_linear", "tests.train.fake_task")
  c = fake_task.get_config(**{"model.hidden": 256, "microbatches": 2})
  with c.unlocked():
    c.mesh.shape = {"data": 2, "fsdp": 2, "tensor": 1}
  r = aot.compile_train_step(c, v5e_2x2, config_name="fake")
  assert r.chips == 4 and r.mesh["data"] == 2 and r.mesh["fsdp"] == 2 and r.microbatches == 2
  # parameters: encoder 8x256 + 256, head 256 + 1
  assert r.params == 8 * 256 + 256 + 256 + 1 == r.trainable_params
  assert r.argument_bytes > 0 and r.total_bytes >= r.argument_bytes and r.fits
  assert r.flops and r.flops > 0
  # the encoder's forward and weight-gradient matmuls, 8 rows per chip: 2 * 8 * 8 * 256 each
  assert r.matmul_flops == 2 * (2 * 8 * 8 * 256)
  # data parallelism over 4 chips must reduce the gradients
  assert "all-reduce" in r.collectives or "reduce-scatter" in r.collectives
  assert r.param_specs["encoder/kernel"] == "P('fsdp', 'tensor')"  # (EMBED, MLP) kernel
  row = aot.markdown_row(r.to_json())
  assert row.startswith("| `fake` | v5e:2x2 | data=2,fsdp=2 (2 microbatches) | 32 |")
  aot.check_fits(r)


def test_plan_that_does_not_fit_names_the_overshoot(monkeypatch):
  from vlm import tasks
  monkeypatch.setitem(tasks.TASKS, "fake_linear", "tests.train.fake_task")
  topo = _libtpu_devices()
  # a replicated 8 x 2**28 float32 kernel is 8 GiB per chip, 24 GiB with AdamW's two moments:
  # more than a v5e chip's 16 GiB
  c = fake_task.get_config(**{"model.hidden": 2 ** 28})
  with c.unlocked():
    c.mesh.shape = {"data": 4, "fsdp": 1, "tensor": 1}
  with pytest.raises(aot.DoesNotFitError) as e:
    # the TPU compiler may refuse by itself (RESOURCE_EXHAUSTED), else check_fits refuses
    aot.check_fits(aot.compile_train_step(c, topo))
  m = re.search(r"([0-9.]+) GiB over", str(e.value))
  assert m and float(m.group(1)) > 0 and "fsdp" in str(e.value), str(e.value)


def test_tpu_compiler_hbm_message_is_parsed():
  msg = ("RESOURCE_EXHAUSTED: Ran out of memory on HBM, the total memory required for HLO "
         "temporaries (289.52G) exceeds available HBM (95.74G).")
  parse = aot._hbm_overflow  # pylint: disable=protected-access
  assert parse(msg) == (289.52, 95.74)
  assert parse("INVALID_ARGUMENT: shapes differ") is None


def test_collective_stats_weights_ops_by_loop_trip_count():
  # a loop with known_trip_count 5, and one whose count is the condition's `i < 3`
  hlo = """HloModule m

%body (p: (s32[], f32[8,4])) -> (s32[], f32[8,4]) {
  %p = (s32[], f32[8,4]) parameter(0)
  %ag = bf16[16,4]{1,0} all-gather(bf16[4,4]{1,0} %x), dimensions={0}
  %ars = f32[8,4]{1,0} all-reduce-start(f32[8,4]{1,0} %y), to_apply=%add
  %ard = f32[8,4]{1,0} all-reduce-done(f32[8,4]{1,0} %ars)
  %lhs = f32[8,32]{1,0} broadcast(%zero), dimensions={}
  %rhs = f32[32,16]{1,0} broadcast(%zero), dimensions={}
  %d = f32[8,16]{1,0} dot(%lhs, %rhs), lhs_contracting_dims={1}, rhs_contracting_dims={0}
  ROOT %t = (s32[], f32[8,4]) tuple(%i, %ard)
}

%cond (p: (s32[], f32[8,4])) -> pred[] {
  ROOT %lt = pred[] compare(%a, %b), direction=LT
}

%body2 (p: (s32[], f32[8,4])) -> (s32[], f32[8,4]) {
  %cp2 = f32[4,4]{1,0:T(4,128)} collective-permute(f32[4,4]{1,0} %z), source_target_pairs={{0,1}}
}

%cond2 (p: (s32[], f32[8,4])) -> pred[] {
  %c = s32[]{:T(128)} constant(3)
  %i = s32[]{:T(128)} get-tuple-element(%p), index=0
  ROOT %lt = pred[] compare(%i, %c), direction=LT
}

ENTRY %main (a: f32[8,4]) -> f32[8,4] {
  %w = (s32[], f32[8,4]) while(%init), condition=%cond, body=%body, \
backend_config={"known_trip_count":{"n":"5"}}
  %w2 = (s32[]{:T(128)}, f32[8,4]{1,0:T(8,128)}) while(%init2), condition=%cond2, body=%body2
  %rs = f32[2,4]{1,0} reduce-scatter(f32[8,4]{1,0} %a), dimensions={0}, to_apply=%add
  %a2a = (f32[2,4]{1,0}, f32[2,4]{1,0}) all-to-all(f32[2,4] %q, f32[2,4] %r)
  %k = bf16[4,6]{1,0:T(4,128)} broadcast(%zero), dimensions={}
  %cv = f32[8,6]{1,0} convolution(%a, %k), dim_labels=bf_io->bf
  ROOT %cp = f32[8,4]{1,0} collective-permute(f32[8,4]{1,0} %z), source_target_pairs={{0,1}}
}
"""
  # matmuls: [8,32] x [32,16] five times in the loop, [8,4] x [4,6] once
  assert aot.hlo_stats(hlo)[1] == 5 * 2 * 8 * 16 * 32 + 2 * 8 * 6 * 4
  got = aot.collective_stats(hlo)
  assert got == {"all-gather": {"count": 5, "bytes": 5 * 16 * 4 * 2},
                 "all-reduce": {"count": 5, "bytes": 5 * 8 * 4 * 4},
                 "reduce-scatter": {"count": 1, "bytes": 2 * 4 * 4},
                 "all-to-all": {"count": 1, "bytes": 2 * 2 * 4 * 4},
                 "collective-permute": {"count": 1 + 3, "bytes": 8 * 4 * 4 + 3 * 4 * 4 * 4}}


def test_script_compiles_on_8_simulated_cpu_devices(tmp_path):
  cfg = tmp_path / "fake_config.py"
  cfg.write_text("from tests.train import fake_task\n\n\ndef get_config(arg=None):\n"
                 "  c = fake_task.get_config()\n  c.task = 'tests.train.fake_task'\n  return c\n")
  out = tmp_path / "r.json"
  env = dict(os.environ, PYTHONPATH=ROOT, JAX_PLATFORMS="cpu")
  env["XLA_FLAGS"] = "--xla_backend_optimization_level=0"  # the script adds the device count
  p = subprocess.run([sys.executable, "scripts/aot_compile.py", f"--config={cfg}",
                      "--topology=cpu:8", "--config.mesh.shape.data=4", f"--json={out}",
                      "--markdown"], cwd=ROOT, env=env, capture_output=True, text=True,
                     timeout=300)
  assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-3000:]
  r = json.loads(out.read_text())
  assert r["chips"] == 8 and r["mesh"]["data"] == 4 and r["mesh"]["fsdp"] == 2
  assert r["platform"] == "cpu" and r["hbm_bytes"] is None and r["argument_bytes"] > 0
  assert "memory per chip" in p.stdout and "| cpu:8 | data=4,fsdp=2 |" in p.stdout
  bad = subprocess.run([sys.executable, "scripts/aot_compile.py", f"--config={cfg}",
                        "--topology=v5e-3"], cwd=ROOT, env=env, capture_output=True, text=True,
                       timeout=300)
  assert bad.returncode == 1 and "v5p-512" in bad.stderr and "cpu:N" in bad.stderr


def test_matmul_flops_count_every_iteration_of_nested_tpu_loops(v5e_2x2):
  """A scan over 7 layers, each a fori_loop of 3 matmuls, differentiated: 21 forward and 42
  backward [256, 256] x [256, 256] matmuls per chip (1024 rows over 4 chips)."""
  import jax.numpy as jnp
  import numpy as np
  from jax.sharding import Mesh, NamedSharding, PartitionSpec

  mesh = Mesh(np.array(v5e_2x2.devices).reshape(4), ("d",))

  def f(x, w):
    def layer(h, wl):
      return jax.lax.fori_loop(0, 3, lambda i, h2: jnp.tanh(h2 @ wl), h), None
    return jax.lax.scan(layer, x, w)[0].sum()

  rows, repl = NamedSharding(mesh, PartitionSpec("d")), NamedSharding(mesh, PartitionSpec())
  x = jax.ShapeDtypeStruct((1024, 256), jnp.float32, sharding=rows)
  w = jax.ShapeDtypeStruct((7, 256, 256), jnp.float32, sharding=repl)
  hlo = jax.jit(jax.grad(f, argnums=1)).lower(x, w).compile().as_text()
  collectives, flops = aot.hlo_stats(hlo)
  assert flops == 63 * 2 * 256 * 256 * 256
  assert collectives["all-reduce"]["count"] == 7  # one weight-gradient reduction per layer


def test_matmul_flops_of_a_conditional_count_its_costliest_branch(v5e_2x2):
  """``lax.switch`` over branches of 0, 1 and 3 chained matmuls runs one of them: counted as the
  costliest (3), not their sum (4); inside a 5-step fori_loop: 15 matmuls."""
  import jax.numpy as jnp
  import numpy as np
  from jax.sharding import Mesh, NamedSharding, PartitionSpec

  mesh = Mesh(np.array(v5e_2x2.devices).reshape(4), ("d",))

  def f(x, w, k):
    branches = [lambda h: h, lambda h: jnp.tanh(h @ w),
                lambda h: jnp.tanh(jnp.tanh(jnp.tanh(h @ w) @ w) @ w)]
    return jax.lax.fori_loop(0, 5, lambda i, h: jax.lax.switch(k, branches, h), x)

  rows, repl = NamedSharding(mesh, PartitionSpec("d")), NamedSharding(mesh, PartitionSpec())
  x = jax.ShapeDtypeStruct((1024, 256), jnp.float32, sharding=rows)
  w = jax.ShapeDtypeStruct((256, 256), jnp.float32, sharding=repl)
  k = jax.ShapeDtypeStruct((), jnp.int32, sharding=repl)
  hlo = jax.jit(f).lower(x, w, k).compile().as_text()
  _, flops = aot.hlo_stats(hlo)
  assert flops == 15 * 2 * 256 * 256 * 256


def test_matmul_flops_of_batched_matmuls_written_as_dilated_convolutions(v5e_2x2):
  """The TPU compiler writes this attention-score einsum and its gradients as ``convolution``s
  whose window spans batch dims with ``lhs_dilate`` = window size (one real tap per dim): counted
  as the 3 matmuls they are, not times the window area."""
  import jax.numpy as jnp
  import numpy as np
  from jax.sharding import Mesh, NamedSharding, PartitionSpec

  mesh = Mesh(np.array(v5e_2x2.devices).reshape(4), ("d",))
  b, h, q, k, d = 12, 12, 16, 197, 32

  def f(x, y):
    return (jnp.einsum("bqhd,bkhd->bhqk", x, y) ** 2).sum()

  repl = NamedSharding(mesh, PartitionSpec())
  x = jax.ShapeDtypeStruct((b, q, h, d), jnp.bfloat16, sharding=repl)
  y = jax.ShapeDtypeStruct((b, k, h, d), jnp.bfloat16, sharding=repl)
  hlo = jax.jit(jax.grad(f, argnums=(0, 1))).lower(x, y).compile().as_text()
  _, flops = aot.hlo_stats(hlo)
  assert flops == 3 * 2 * b * h * q * k * d


def test_matmul_flops_of_a_padded_window_convolution_count_real_taps_only():
  """An outer-product matmul as the TPU compiler writes it (seen in the Qwen3-VL-235B step's
  ``o_proj`` gradient): a 4-wide window over a size-1 dim padded by 3 on each side meets the real
  input once per output position: 8*4*2 outputs x 16 input features, not x 4 taps."""
  hlo = """HloModule m, entry_computation_layout={()->f32[8,4,2]}

ENTRY %main.1 (p0: f32[8,16,1], p1: f32[4,2,16]) -> f32[8,4,2] {
  %p0 = f32[8,16,1]{2,1,0} parameter(0)
  %p1 = f32[4,2,16]{2,1,0} parameter(1)
  ROOT %convolution.1 = f32[8,4,2]{2,1,0} convolution(%p0, %p1), window={size=4 pad=3_3 rhs_reversal=1}, dim_labels=bf0_0oi->b0f
}
"""
  _, flops = aot.hlo_stats(hlo)
  assert flops == 2 * 8 * 4 * 2 * 16
