"""The full-size BLIP-2 recipes' meshes and batch sizes divide (no compile, no devices needed).

Every (variant, device count, mesh overrides, global batch) documented in a config file's
``MESH_RECIPES`` is resolved with :func:`vlm.parallel.mesh.resolve_mesh_shape` and checked with
:func:`vlm.parallel.mesh.check_batch_size` (through the batch rule of the config's rules), as
``scripts/train.py`` does before anything compiles.
"""
import importlib.util
import os
import types

import pytest

from vlm.parallel import mesh as mesh_lib

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
FILES = ("stage1.py", "stage2_opt.py", "stage2_t5.py")


def _module(name):
  spec = importlib.util.spec_from_file_location(name[:-3], os.path.join(REPO, "configs", "blip2",
                                                                        name))
  mod = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(mod)
  return mod


def _recipes():
  for name in FILES:
    for recipe in _module(name).MESH_RECIPES:
      yield pytest.param(name, *recipe, id=f"{name}:{recipe[0]}@{recipe[1]}:{recipe[3]}")


def _shards(config, devices, overrides):
  """(resolved mesh sizes, number of batch shards) of ``config`` on ``devices`` chips."""
  shape = dict(config.mesh.shape)
  shape.update(overrides)
  sizes = mesh_lib.resolve_mesh_shape(shape, devices)
  rules = mesh_lib.rules_from_config(config.mesh.rules)
  fake_mesh = types.SimpleNamespace(shape=sizes)  # only the axis sizes are read
  return sizes, fake_mesh, rules


@pytest.mark.parametrize("name,variant,devices,overrides,batch", list(_recipes()))
def test_documented_meshes_divide(name, variant, devices, overrides, batch):
  config = _module(name).get_config(variant)
  sizes, mesh, rules = _shards(config, devices, overrides)
  mesh_lib.check_batch_size(batch, mesh, rules)
  n = mesh_lib.data_parallel_size(mesh, rules)
  assert batch % n == 0 and n > 1
  # the default (no overrides) recipes keep the config's own batch where they say so
  if not overrides and devices <= 16:
    assert batch == config.global_batch_size
  assert config.model.scan_layers and config.model.remat


@pytest.mark.parametrize("name,variant,per_chip", [
    ("stage1.py", "vitg", 105), ("stage2_opt.py", "opt6.7b", 120),
    ("stage2_t5.py", "flant5xxl", 95)])
def test_paper_batches_on_the_papers_16_chips(name, variant, per_chip):
  config = _module(name).get_config(variant)
  sizes, mesh, rules = _shards(config, 16, {})
  assert (sizes["data"], sizes["fsdp"]) == (2, 8)
  assert config.global_batch_size // mesh_lib.data_parallel_size(mesh, rules) == per_chip


@pytest.mark.parametrize("name,variant", [("stage1.py", "vitg"), ("stage2_opt.py", "opt6.7b"),
                                          ("stage2_t5.py", "flant5xxl")])
def test_paper_batch_on_256_chips_needs_the_documented_change(name, variant):
  """The default mesh with the paper's batch does not divide on 256 chips (why the docstrings
  give a 256-chip batch or a tensor axis); the error says so before anything compiles."""
  config = _module(name).get_config(variant)
  _, mesh, rules = _shards(config, 256, {})
  with pytest.raises(ValueError, match="not divisible by the 256 data-parallel shards"):
    mesh_lib.check_batch_size(config.global_batch_size, mesh, rules)
