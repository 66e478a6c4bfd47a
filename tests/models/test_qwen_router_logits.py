"""MoE router logits for the load-balancing loss (issue 8, scope item 5, model side).

Every MoE layer sows its gate logits (pre-softmax, float32 [B*L, E]) into the "intermediates"
collection; ``vlm.models.qwen3.router_logits`` collects them in layer order, scanned or not. They
must equal HF ``Qwen3VLMoeForConditionalGeneration(..., output_router_logits=True).router_logits``
on a tiny random model in float32 (images + a video, left padding; compared at real tokens, where
HF and vlm compute the same hidden states).
"""
import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from tests.equivalence import test_qwen3_vl as E
from vlm.convert.hf_qwen3_vl import load_hf_qwen3_vl
from vlm.models import qwen3
from vlm.models.qwen3_vl import Qwen3VL, visual_token_index
from vlm.models.qwen_vit import vision_inputs
from vlm.models.rope_index import qwen3_vl_get_rope_index

TOL = 1e-5


@pytest.fixture(scope="module")
def hf_and_vlm(tmp_path_factory):
  hf = E._hf_model(moe=True)
  path = tmp_path_factory.mktemp("moe") / "hf"
  hf.save_pretrained(path, safe_serialization=True)
  config, params = load_hf_qwen3_vl(str(path))
  return hf, config, params


def test_router_logits_match_hf(hf_and_vlm):
  hf, config, params = hf_and_vlm
  ids, mask, img_px, vid_px = E._inputs()
  with torch.no_grad():
    out = hf(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask),
             pixel_values=torch.tensor(img_px), image_grid_thw=torch.tensor(E.GRIDS),
             pixel_values_videos=torch.tensor(vid_px), video_grid_thw=torch.tensor(E.VGRIDS),
             output_router_logits=True)
  want = [t.numpy() for t in out.router_logits]
  assert len(want) == config.text.num_hidden_layers

  pos, _ = qwen3_vl_get_rope_index(ids, E.GRIDS, E.VGRIDS, mask, 2, E.IMG, E.VID, E.VS)
  tables = vision_inputs(config.vision, np.concatenate([E.GRIDS, E.VGRIDS]))
  index = visual_token_index(ids, E.IMG, E.VID, image_grid_thw=E.GRIDS, video_grid_thw=E.VGRIDS)
  args = (jnp.asarray(ids, jnp.int32), jnp.asarray(pos, jnp.int32), jnp.asarray(mask, bool),
          jnp.asarray(np.concatenate([img_px, vid_px])), tables, jnp.asarray(index))
  real = mask.reshape(-1).astype(bool)
  b, l = ids.shape
  for scan in (False, True):
    model = Qwen3VL(config, scan_layers=scan)
    p = qwen3.stack_layers(params) if scan else params
    (logits, _), state = jax.jit(lambda p: model.apply({"params": p}, *args,
                                                       mutable=["intermediates"]))(p)
    got = qwen3.router_logits(state["intermediates"])
    assert len(got) == len(want)
    for layer, (g, w) in enumerate(zip(got, want)):
      chex.assert_shape(g, (b * l, config.text.num_experts))
      assert g.dtype == jnp.float32
      err = float(np.abs(np.asarray(g)[real] - w[real]).max())
      print(f"scan={scan} layer {layer}: router logits max abs err {err:.2e}")
      chex.assert_trees_all_close(np.asarray(g)[real], w[real], atol=TOL, rtol=0)
    # without a mutable "intermediates" nothing is sown and the logits are unchanged
    plain, _ = jax.jit(lambda p: model.apply({"params": p}, *args))(p)
    chex.assert_trees_all_close(plain, logits, atol=0, rtol=0)


def test_dense_model_sows_no_router_logits():
  from tests.models import qwen_tiny as T
  lm = qwen3.Qwen3LM(qwen3.Qwen3TextConfig(**{**T.TEXT, "num_hidden_layers": 1}))
  ids = jnp.ones((1, 4), jnp.int32)
  angles = jnp.zeros((1, 4, T.TEXT["head_dim"] // 2), jnp.float32)
  variables = lm.init(jax.random.PRNGKey(0), ids, angles)
  _, state = lm.apply(variables, ids, angles, mutable=["intermediates"])
  assert qwen3.router_logits(state.get("intermediates", {})) == ()
