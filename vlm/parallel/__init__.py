"""Meshes, logical-axis rules and batch sharding (see vlm.parallel.mesh)."""
from vlm.parallel.mesh import (DEFAULT_RULES, MESH_AXES, batch_sharding, check_batch_size,
                               check_sequence_length, context_parallel_size, fit_shardings, global_batch_from_host, logical_sharding,
                               make_mesh, replicated, resolve_mesh_shape, rules_from_config)
