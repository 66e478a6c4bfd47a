"""The routed MoE paths ("ragged", "gather") against HF transformers 4.57.1 (float32, tiny random
configs).

Same models, weights and inputs as ``test_qwen3_text.test_moe_logits`` (``Qwen3MoeForCausalLM``,
norm_topk_prob on/off, a dense layer among MoE ones) and ``test_qwen3_vl`` (``Qwen3VLMoe
ForConditionalGeneration``), with ``Qwen3TextConfig.moe_implementation`` "ragged" or "gather"
(the default, "auto", is "dense" for these prefill shapes).
"""
import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from transformers import Qwen3MoeConfig, Qwen3MoeForCausalLM

from tests.equivalence import test_qwen3_text as T
from tests.equivalence import test_qwen3_vl as V
from tests.equivalence.qwen_hf_utils import randomize_hf
from vlm.convert.hf_qwen3_vl import load_hf_qwen3_vl
from vlm.models import qwen3 as Q
from vlm.models.qwen3_vl import Qwen3VL, visual_token_index
from vlm.models.qwen_vit import vision_inputs
from vlm.models.rope_index import qwen3_vl_get_rope_index


@pytest.mark.parametrize("norm_topk_prob,mlp_only_layers,impl",
                         [(True, [], "ragged"), (False, [1], "ragged"), (True, [], "gather")])
def test_qwen3_moe_routed_logits(norm_topk_prob, mlp_only_layers, impl):
  torch.manual_seed(0)
  hf_cfg = Qwen3MoeConfig(**T.COMMON, num_experts=4, num_experts_per_tok=2,
                          moe_intermediate_size=32, norm_topk_prob=norm_topk_prob,
                          decoder_sparse_step=1, mlp_only_layers=mlp_only_layers,
                          tie_word_embeddings=True)
  hf = randomize_hf(Qwen3MoeForCausalLM(hf_cfg), 1)
  cfg = Q.Qwen3TextConfig.from_hf_dict(hf.config.to_dict())
  assert cfg.moe_implementation == "auto"
  cfg = dataclasses.replace(cfg, moe_implementation=impl)
  params = T.hf_to_vlm(hf.state_dict(), num_experts=4, tied=True)
  ids, mask, pos = T._inputs(3)
  ang = T._angles(pos, hf.model.rotary_emb.inv_freq.numpy())
  ours, _ = jax.jit(Q.Qwen3LM(cfg).apply)({"params": params}, ids, ang, mask)
  err = T._max_err(ours, T._hf_logits(hf, ids, mask, pos), mask)
  print(f"qwen3-moe {impl} norm_topk_prob={norm_topk_prob} logits max abs err {err:.2e}")
  assert err <= T.TOL


def test_qwen3_vl_moe_ragged_logits(tmp_path):
  hf = V._hf_model(True)
  hf.save_pretrained(tmp_path / "hf", safe_serialization=True)
  ids, mask, img_px, vid_px = V._inputs()
  with torch.no_grad():
    want = hf(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask),
              pixel_values=torch.tensor(img_px), image_grid_thw=torch.tensor(V.GRIDS),
              pixel_values_videos=torch.tensor(vid_px),
              video_grid_thw=torch.tensor(V.VGRIDS)).logits.numpy()
  config, params = load_hf_qwen3_vl(str(tmp_path / "hf"))
  assert config.text.num_experts > 0 and config.text.moe_implementation == "auto"
  config = dataclasses.replace(
      config, text=dataclasses.replace(config.text, moe_implementation="ragged"))
  pos, _ = qwen3_vl_get_rope_index(ids, V.GRIDS, V.VGRIDS, mask, 2, V.IMG, V.VID, V.VS)
  tables = vision_inputs(config.vision, np.concatenate([V.GRIDS, V.VGRIDS]))
  index = visual_token_index(ids, V.IMG, V.VID, image_grid_thw=V.GRIDS, video_grid_thw=V.VGRIDS)
  got, _ = jax.jit(Qwen3VL(config).apply)(
      {"params": params}, jnp.asarray(ids, jnp.int32), jnp.asarray(pos, jnp.int32),
      jnp.asarray(mask, bool), jnp.asarray(np.concatenate([img_px, vid_px])), tables,
      jnp.asarray(index))
  real = mask.astype(bool)
  err = float(np.abs(np.asarray(got)[real] - want[real]).max())
  print(f"qwen3_vl_moe ragged logits max abs err {err:.2e}")
  assert err <= T.TOL
