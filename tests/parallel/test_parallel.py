"""Mesh construction and validation (8 simulated CPU devices from conftest)."""
import jax
import pytest

from vlm.nn import partitioning as P
from vlm.parallel import mesh as mesh_lib


def test_eight_simulated_devices():
  assert jax.device_count() == 8


@pytest.mark.parametrize("shape,expected", [
    ({"data": -1}, {"data": 8, "fsdp": 1, "tensor": 1, "expert": 1, "context": 1}),
    ({"fsdp": 4, "tensor": 2}, {"data": 1, "fsdp": 4, "tensor": 2, "expert": 1, "context": 1}),
    ({"data": 2, "fsdp": -1, "tensor": 2},
     {"data": 2, "fsdp": 2, "tensor": 2, "expert": 1, "context": 1}),
    ({"data": 2, "context": -1}, {"data": 2, "fsdp": 1, "tensor": 1, "expert": 1, "context": 4}),
])
def test_resolve_mesh_shape(shape, expected):
  assert mesh_lib.resolve_mesh_shape(shape, 8) == expected


@pytest.mark.parametrize("shape,msg", [
    ({"data": 3}, "needs 3 devices but 8"),
    ({"data": 16}, "needs 16 devices"),
    ({"data": -1, "fsdp": -1}, "at most one"),
    ({"data": 3, "fsdp": -1}, "cannot fit 8 devices"),
    ({"pipeline": 8}, "unknown mesh axes"),
    ({"data": 0}, "positive"),
])
def test_bad_mesh_is_a_clear_error(shape, msg):
  with pytest.raises(ValueError, match=msg):
    mesh_lib.make_mesh(shape)


def test_batch_divisibility():
  mesh = mesh_lib.make_mesh({"data": 2, "fsdp": 2, "tensor": 2})
  rules = mesh_lib.DEFAULT_RULES
  mesh_lib.check_batch_size(8, mesh, rules)
  with pytest.raises(ValueError, match="not divisible by the 4 data-parallel shards"):
    mesh_lib.check_batch_size(6, mesh, rules)


def test_rules_priority_param_vs_activation():
  import flax.linen as nn
  rules = mesh_lib.DEFAULT_RULES
  assert tuple(nn.logical_to_mesh_axes((P.BATCH, P.LENGTH, P.EMBED), rules)) == (
      ("data", "fsdp"), None, None)
  assert tuple(nn.logical_to_mesh_axes((P.EMBED, P.MLP), rules)) == ("fsdp", "tensor")
  # the decoder's token axis goes to "context"; the generic LENGTH (ViT patches, ...) stays whole
  assert tuple(nn.logical_to_mesh_axes((P.BATCH, P.SEQUENCE, P.EMBED), rules)) == (
      ("data", "fsdp"), "context", None)


def test_sequence_length_divisibility():
  mesh = mesh_lib.make_mesh({"data": 2, "context": 4})
  rules = mesh_lib.DEFAULT_RULES
  assert mesh_lib.context_parallel_size(mesh, rules) == 4
  mesh_lib.check_sequence_length(64, mesh, rules)
  with pytest.raises(ValueError, match="not divisible by the 4 context-parallel shards"):
    mesh_lib.check_sequence_length(62, mesh, rules)


def test_rules_reject_unknown_mesh_axis():
  with pytest.raises(ValueError, match="names mesh axis"):
    mesh_lib.rules_from_config([["embed", "model"]])
