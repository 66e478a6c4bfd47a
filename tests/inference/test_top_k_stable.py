"""``decoding.top_k_stable`` equals ``jax.lax.top_k`` (values, and indices in index order among
equal values), including ties, ``-inf`` entries and rows with fewer finite entries than k."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from vlm.inference.decoding import top_k_stable


def test_top_k_stable_matches_lax_top_k():
  rng = np.random.default_rng(0)
  x = rng.integers(-3, 4, size=(6, 40)).astype(np.float32)  # many ties
  x[1, :] = -np.inf
  x[2, 5:] = -np.inf  # 5 finite entries, k = 7
  x[3] = rng.standard_normal(40)
  x[4, ::3] = -1e9
  f = jax.jit(lambda a: (top_k_stable(a, 7), jax.lax.top_k(a, 7)))
  (v, i), (rv, ri) = f(jnp.asarray(x))
  np.testing.assert_array_equal(np.asarray(v), np.asarray(rv))
  np.testing.assert_array_equal(np.asarray(i), np.asarray(ri))
  assert i.dtype == jnp.int32 and v.shape == (6, 7)
