"""vlm.load_pretrained dispatch (BLIP-2 directory, bad directories), scripts/convert_hf.py on
BLIP-2, and the sampling filter of vlm.inference.generate."""
import importlib.util
import json
import os

import jax.numpy as jnp
import numpy as np
import pytest

import vlm
from vlm.inference.generate import filter_top_p, left_pad

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_blip2_dispatch_and_convert_script(tmp_path):
  from tests.equivalence.blip2_hf_utils import tiny_hf_retrieval
  from vlm.data.text import Blip2Tokenizer
  from vlm.models.blip2 import Blip2Stage1
  tiny_hf_retrieval().save_pretrained(tmp_path / "hf")
  model, params, tok = vlm.load_pretrained(tmp_path / "hf")
  assert isinstance(model, Blip2Stage1) and isinstance(tok, Blip2Tokenizer)
  assert "query_tokens" in params
  spec = importlib.util.spec_from_file_location("convert_hf",
                                                os.path.join(REPO, "scripts", "convert_hf.py"))
  mod = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(mod)
  assert mod.convert(str(tmp_path / "hf"), str(tmp_path / "rt")) > 0
  # bf16 parameters and compute on request; Qwen-only switches are refused for BLIP-2
  model16, params16, _ = vlm.load_pretrained(tmp_path / "hf", dtype=jnp.bfloat16,
                                             param_dtype=jnp.bfloat16)
  assert model16.dtype == jnp.bfloat16 and params16["query_tokens"].dtype == jnp.bfloat16
  with pytest.raises(ValueError, match="Qwen checkpoints only"):
    vlm.load_pretrained(tmp_path / "hf", scan_vision=True)
  # scan_layers: the tower's blocks and the Q-Former's layers come stacked, for a scanned model
  model_s, params_s, _ = vlm.load_pretrained(tmp_path / "hf", scan_layers=True)
  assert model_s.scan_layers and "layers" in params_s["vision_model"]["encoder"]
  assert "layers" in params_s["qformer"]["encoder"]


def test_bad_directories(tmp_path):
  with pytest.raises(FileNotFoundError, match="config.json"):
    vlm.load_pretrained(tmp_path)
  (tmp_path / "config.json").write_text(json.dumps({"model_type": "llama"}))
  with pytest.raises(ValueError, match="'llama'.*qwen3_vl"):
    vlm.load_pretrained(tmp_path)
  with pytest.raises(AttributeError):
    vlm.no_such_thing  # noqa: B018


def test_top_p_filter_and_left_pad():
  logits = jnp.log(jnp.array([[0.5, 0.3, 0.15, 0.05], [0.05, 0.15, 0.3, 0.5]]))
  kept = np.isfinite(np.asarray(filter_top_p(logits, 0.7)))
  np.testing.assert_array_equal(kept, [[1, 1, 0, 0], [0, 0, 1, 1]])
  kept = np.isfinite(np.asarray(filter_top_p(logits, 0.1)))  # the top token always survives
  np.testing.assert_array_equal(kept, [[1, 0, 0, 0], [0, 0, 0, 1]])
  ids, mask = left_pad(np.array([[5, 6, 7, 0], [8, 0, 0, 0]]), np.array([[1, 1, 1, 0], [1, 0, 0, 0]]),
                       6, 0)
  np.testing.assert_array_equal(ids, [[0, 0, 0, 5, 6, 7], [0, 0, 0, 0, 0, 8]])
  np.testing.assert_array_equal(mask, [[0, 0, 0, 1, 1, 1], [0, 0, 0, 0, 0, 1]])
  with pytest.raises(ValueError, match="more than the length"):
    left_pad(np.ones((1, 4)), np.ones((1, 4)), 3, 0)
