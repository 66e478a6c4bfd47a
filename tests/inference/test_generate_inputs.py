"""Bad and unusual inputs to Qwen generation and its helpers (found by trying to break them):
each gets a clear ValueError before anything compiles, and the edge cases behave as documented."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from vlm import models
from vlm.data.qwen_processor import Qwen3VLProcessor, QwenProcessorConfig, load_video
from vlm.inference import generate as G
from vlm.models.qwen3 import init_cache
from vlm.models.qwen3_vl import Qwen3VL, init_params
from vlm.models.qwen_presets import qwen_config

EOS, PAD = 151645, 151643


@pytest.fixture(scope="module")
def tiny():
  model = Qwen3VL(qwen_config("qwen3_vl_tiny"))
  params = init_params(model, jax.random.key(0))
  # spread the logits so that different prompts / temperatures give different tokens
  params = jax.tree.map(lambda x: x * 4.0 if x.ndim == 2 else x, params)
  return model, params


def _text(n=5, rows=1):
  return {"input_ids": np.arange(1000, 1000 + rows * n).reshape(rows, n),
          "attention_mask": np.ones((rows, n), np.int64)}


def test_prefill_static_zero_skips_the_empty_cache(tiny):
  """cache_index=0 (a Python int) attends among the new tokens only; a traced 0 reads the empty
  cache: same logits and cache at the real positions (pad queries attend nothing in either and
  hold different finite garbage), without the [L, T] masked block."""
  model, params = tiny
  ids = jnp.arange(1000, 1012).reshape(2, 6)
  pos = jnp.broadcast_to(jnp.arange(6), (3, 2, 6))
  mask = jnp.ones((2, 6), bool).at[1, :2].set(False)
  outs = [model.apply({"params": params}, ids, pos, mask,
                      kv_cache=init_cache(model.config.text, 2, 40), cache_index=ci)
          for ci in (0, jnp.asarray(0))]
  real = np.asarray(mask)
  np.testing.assert_allclose(np.asarray(outs[0][0])[real], np.asarray(outs[1][0])[real], atol=1e-6)
  for key in ("k", "v"):  # [NL, B, kvH, T, hd]: slots 0..5 hold the prompt
    a, b = (np.moveaxis(np.asarray(o[1][key])[:, :, :, :6], 3, 2) for o in outs)
    np.testing.assert_allclose(a[:, real], b[:, real], atol=1e-6)
  np.testing.assert_array_equal(outs[0][1]["mask"], outs[1][1]["mask"])


def test_batch_checks(tiny):
  model, params = tiny
  kw = dict(max_new_tokens=2, eos_token_ids=EOS, pad_token_id=PAD)
  with pytest.raises(ValueError, match="rows \\[1\\] are empty"):
    G.generate(model, params, {"input_ids": np.ones((2, 3), int),
                               "attention_mask": np.array([[1, 1, 1], [0, 0, 0]])}, **kw)
  with pytest.raises(ValueError, match="empty"):
    G.generate(model, params, {"input_ids": np.zeros((1, 0), int)}, **kw)
  with pytest.raises(ValueError, match="outside the vocabulary"):
    G.generate(model, params, {"input_ids": np.array([[5, 151936 + 5]])}, **kw)
  with pytest.raises(ValueError, match="outside the vocabulary"):
    G.generate(model, params, {"input_ids": np.array([[5, -3]])}, **kw)
  proc = Qwen3VLProcessor(padding_side="left")
  image = (np.random.default_rng(0).random((64, 64, 3)) * 255).astype(np.uint8)
  batch = proc(text=[proc.apply_chat_template([{"role": "user", "content": [
      {"type": "image"}, {"type": "text", "text": "hi"}]}])], images=[image])
  for extra in (4, -4):  # pixel rows that do not match image_grid_thw
    bad = dict(batch)
    px = batch["pixel_values"]
    bad["pixel_values"] = (np.concatenate([px, np.zeros((extra, px.shape[1]), px.dtype)])
                           if extra > 0 else px[:extra])
    with pytest.raises(ValueError, match="pixel_values must be"):
      G.generate(model, params, bad, **kw)


def test_argument_checks(tiny):
  model, params = tiny
  b = _text()
  kw = dict(max_new_tokens=2, eos_token_ids=EOS, pad_token_id=PAD)
  for bad, match in [(dict(temperature=float("nan")), "temperature"),
                     (dict(temperature=float("inf")), "temperature"),
                     (dict(max_new_tokens=2.5), "max_new_tokens"),
                     (dict(eos_token_ids=None), "eos_token_ids"),
                     (dict(eos_token_ids=[]), "eos_token_ids"),
                     (dict(eos_token_ids=1.7), "eos_token_ids"),
                     (dict(eos_token_ids=2 ** 40), "vocabulary"),
                     (dict(pad_token_id=None), "pad_token_id"),
                     (dict(prompt_bucket=0), "prompt_bucket"),
                     (dict(top_k=-1), "top_k"),
                     (dict(repetition_penalty=0.0), "repetition_penalty"),
                     (dict(temperature=0.5, rng=0), "rng")]:
    with pytest.raises(ValueError, match=match):
      G.generate(model, params, b, **{**kw, **bad})


def test_tiny_temperature_is_greedy_and_stop_ids_do_not_recompile(tiny):
  model, params = tiny
  b = _text(rows=3)
  greedy = G.generate(model, params, b, max_new_tokens=4, eos_token_ids=EOS, pad_token_id=PAD)
  cold = G.generate(model, params, b, max_new_tokens=4, eos_token_ids=EOS, pad_token_id=PAD,
                    temperature=1e-30, rng=jax.random.key(3))
  np.testing.assert_array_equal(greedy, cold)
  fns = G.compiled(model, 0.0, 1.0, PAD)
  n = fns.decode._cache_size()
  again = G.generate(model, params, b, max_new_tokens=4, eos_token_ids=[EOS, PAD, 7],
                     pad_token_id=PAD)
  assert fns.decode._cache_size() == n  # stop ids are padded to 8: no new shape
  assert again.shape == (3, 4)


def test_config_registry_and_processor_checks():
  for kw in (dict(num_hidden_layers=0), dict(num_key_value_heads=0), dict(rms_norm_eps=-1.0),
             dict(intermediate_size=0), dict(rope_theta=0.0)):
    with pytest.raises(ValueError):
      qwen_config("qwen3_vl_tiny", **kw)
  with pytest.raises(ValueError, match="moe_intermediate_size"):
    qwen_config("qwen3_vl_moe_tiny", moe_intermediate_size=-1)
  with pytest.raises(ValueError, match="Qwen3VLConfig preset"):
    models.build("qwen3_vl", "blip2_tiny")
  with pytest.raises(ValueError, match="Qwen2_5_VLConfig preset"):
    models.build("qwen2_5_vl", "qwen3_vl_tiny")
  with pytest.raises(ValueError, match="as a video"):
    load_video(__file__)
  with pytest.raises(ValueError, match="fps"):
    QwenProcessorConfig(fps=float("inf"))
  with pytest.raises(ValueError, match="patch_size"):
    QwenProcessorConfig(patch_size=True)
  with pytest.raises(ValueError, match="list of strings"):
    Qwen3VLProcessor()(text=123)
