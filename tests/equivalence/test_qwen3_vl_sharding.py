"""Qwen3-VL (dense and MoE) forward and greedy generation on 8 simulated devices equal the
single-device ones.

Parameters are placed by their logical axis names through the default rules (embed -> fsdp,
heads/mlp/vocab -> tensor, expert -> expert); the batch splits over (data, fsdp).
"""
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tests.equivalence.test_qwen3_vl import GRIDS, IMG, VGRIDS, VID, VS, _hf_model, _inputs
from vlm.convert.hf_qwen3_vl import load_hf_qwen3_vl
from vlm.inference.generate import generate
from vlm.models.qwen3_vl import Qwen3VL, visual_token_index
from vlm.models.qwen_vit import vision_inputs
from vlm.models.rope_index import qwen3_vl_get_rope_index
from vlm.parallel import mesh as mesh_lib
from vlm.train import step as step_lib


def _args(config):
  ids, mask, img_px, vid_px = _inputs()
  ids, mask = np.concatenate([ids, ids]), np.concatenate([mask, mask])  # batch 4
  pos, _ = qwen3_vl_get_rope_index(ids, np.concatenate([GRIDS, GRIDS]),
                                   np.concatenate([VGRIDS, VGRIDS]), mask, 2, IMG, VID, VS)
  grids = np.concatenate([GRIDS, GRIDS, VGRIDS, VGRIDS])
  pixels = np.concatenate([img_px, img_px, vid_px, vid_px])
  tables = vision_inputs(config.vision, grids)
  index = visual_token_index(ids, IMG, VID, image_grid_thw=np.concatenate([GRIDS, GRIDS]),
                             video_grid_thw=np.concatenate([VGRIDS, VGRIDS]))
  return (jnp.asarray(ids, jnp.int32), jnp.asarray(pos, jnp.int32), jnp.asarray(mask, bool),
          jnp.asarray(pixels), tables, jnp.asarray(index)), mask.astype(bool)


@pytest.mark.parametrize("moe,shape", [(False, {"data": 2, "fsdp": 2, "tensor": 2}),
                                       (True, {"data": 2, "tensor": 2, "expert": 2})],
                         ids=["dense-data-fsdp-tensor", "moe-data-tensor-expert"])
def test_sharded_forward_equals_single_device(tmp_path, moe, shape):
  _hf_model(moe).save_pretrained(tmp_path / "hf", safe_serialization=True)
  config, params = load_hf_qwen3_vl(str(tmp_path / "hf"))
  model = Qwen3VL(config)
  args, real = _args(config)
  want, _ = jax.jit(model.apply)({"params": params}, *args)
  rules = mesh_lib.DEFAULT_RULES
  mesh = mesh_lib.make_mesh(shape)
  with nn.logical_axis_rules(rules):
    _, shardings = step_lib.param_shardings(model, args, mesh, rules)
  sharded = jax.device_put(params, shardings)
  with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
    got, _ = jax.jit(model.apply)({"params": sharded}, *args)
  err = float(np.abs(np.asarray(got)[real] - np.asarray(want)[real]).max())
  assert err <= 1e-5, err
  spread = [s for s in jax.tree.leaves(jax.tree.map(lambda x: x.sharding, sharded))
            if not s.is_fully_replicated]
  assert spread, "no parameter was sharded"
  # generation (prefill + on-device decode loop) with the sharded parameters: same greedy tokens
  ids, mask, img_px, vid_px = _inputs()
  batch = dict(input_ids=ids, attention_mask=mask, pixel_values=img_px, image_grid_thw=GRIDS,
               pixel_values_videos=vid_px, video_grid_thw=VGRIDS)
  kw = dict(max_new_tokens=6, eos_token_ids=[1], pad_token_id=0)
  want_tokens = generate(model, params, batch, **kw)
  with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
    got_tokens = generate(model, sharded, batch, **kw)
  np.testing.assert_array_equal(got_tokens, want_tokens)
  if moe:
    specs = [str(s.spec) for p, s in jax.tree_util.tree_flatten_with_path(
        jax.tree.map(lambda x: x.sharding, sharded))[0] if "experts" in jax.tree_util.keystr(p)]
    assert specs and all("expert" in s for s in specs), specs
