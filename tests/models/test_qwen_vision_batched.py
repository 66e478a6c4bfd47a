"""The Qwen ViTs' optional leading batch axis: ``pixel_values`` [B, Np, F] with every vision table
stacked over rows (Qwen3-VL: segment ids, rotary coordinates, bilinear position tables; Qwen2.5-VL:
also the per-row window permutation) gives, row by row, what the unbatched [Np, F] call gives."""
import chex
import jax
import numpy as np
import pytest

from tests.models import qwen_tiny as T
from vlm.models import qwen_vit

ROWS = [np.array([[1, 4, 6], [2, 2, 4]]), np.array([[1, 2, 2], [1, 4, 4], [1, 2, 4]])]
NP = 64


@pytest.mark.parametrize("kind", ["dense", "q25"])
def test_batched_tower_equals_rows(kind):
  cfg = T.config(kind).vision
  cls = qwen_vit.Qwen2_5_VLVisionModel if kind == "q25" else qwen_vit.Qwen3VLVisionModel
  model = cls(cfg)
  rng = np.random.default_rng(0)
  pixels = rng.standard_normal((len(ROWS), NP, cfg.patch_dim)).astype(np.float32)
  tables = [qwen_vit.vision_inputs(cfg, g, NP) for g in ROWS]
  for b, g in enumerate(ROWS):  # padding rows of the buffer are zero, as the data pipeline pads
    pixels[b, int(np.prod(g, axis=1).sum()):] = 0
  params = T.spread(jax.jit(model.init)(jax.random.PRNGKey(0), pixels[0], **tables[0]), 4)
  stacked = {k: np.stack([t[k] for t in tables]) for k in tables[0]}
  apply = jax.jit(model.apply)
  batched = apply(params, pixels, **stacked)
  rows = [apply(params, pixels[b], **tables[b]) for b in range(len(ROWS))]
  merged_b = batched[0] if kind == "dense" else batched
  chex.assert_shape(merged_b, (len(ROWS), NP // 4, cfg.out_hidden_size))
  for b, row in enumerate(rows):
    chex.assert_trees_all_close(jax.tree_util.tree_map(lambda x: x[b], batched), row, atol=1e-5,
                                rtol=0)
  with pytest.raises(ValueError, match="batch sizes differ|does not match"):
    apply(params, pixels, **{**stacked, "segment_ids": stacked["segment_ids"][:1]})
