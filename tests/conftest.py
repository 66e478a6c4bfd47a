"""Test-wide settings: 8 simulated CPU devices and exact float32 matmuls.

The device count (``chex.set_n_cpu_devices``, an XLA flag) must be set before jax initialises its
backends, so it is set at import time here, before any test module runs a jax operation. An
``--xla_force_host_platform_device_count`` already in ``XLA_FLAGS`` is kept.
"""
import os
import tempfile

os.environ.setdefault("JAX_PLATFORMS", "cpu")  # read when jax is imported (by chex, below)
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("XLA_FLAGS", "")
# XLA's CPU backend spends most of a test's time compiling; LLVM -O0 halves that and changes no
# float semantics that the tests check.
if "xla_backend_optimization_level" not in os.environ["XLA_FLAGS"]:
  os.environ["XLA_FLAGS"] += " --xla_backend_optimization_level=0"

import chex  # noqa: E402  (imports jax, initialises no backend)

if "xla_force_host_platform_device_count" not in os.environ["XLA_FLAGS"]:
  # Fake CPU devices for the sharding tests (rewrites XLA_FLAGS, keeping the other flags);
  # raises if a jax backend was already initialised.
  chex.set_n_cpu_devices(8)

import jax  # noqa: E402

jax.config.update("jax_default_matmul_precision", "highest")
# Identical programs (the micro train step of several end-to-end runs) compile once per machine.
jax.config.update("jax_compilation_cache_dir",
                  os.path.join(tempfile.gettempdir(), "vlm-tests-jax-cache"))
jax.config.update("jax_persistent_cache_min_compile_time_secs", 1.0)


def pytest_configure(config):
  try:
    import torch
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.set_num_threads(1)
  except ImportError:
    pass
