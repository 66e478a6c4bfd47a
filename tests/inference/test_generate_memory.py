"""Memory estimate of a generation request and scripts/generate.py's guard against huge photos.

A 6000x6000 photo at the processor's own (HF) budget becomes 65,536 vision patches; the dense
vision attention alone would need 256 GiB per matrix. The script now resizes to a ~1k-token budget
by default, and any request estimated not to fit fails before compiling, naming ``--max_pixels``.
"""
import importlib.util
import os
import re
import time

import jax
import numpy as np
import pytest
from PIL import Image

import vlm
from vlm.data.qwen_processor import Qwen3VLProcessor
from vlm.inference import generate as G
from vlm.models.qwen3_vl import Qwen2_5_VL, Qwen3VL, init_params
from vlm.models.qwen_presets import qwen_config

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _script():
  spec = importlib.util.spec_from_file_location(
      "generate_script", os.path.join(REPO, "scripts", "generate.py"))
  mod = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(mod)
  return mod


def _shapes(prompt_len, grid=None):
  b = {"input_ids": np.zeros((1, prompt_len), np.int64)}
  if grid is not None:
    b["image_grid_thw"] = np.array([grid])
  return b


def test_estimate_scaling():
  model = Qwen3VL(qwen_config("qwen3_vl_2b"))
  est = lambda *a, **k: G.estimate_generate_memory(model, {}, _shapes(*a, **k), 20)
  # vision attention: quadratic in the (bucketed) patch count
  a, b = est(100, [1, 32, 32]), est(100, [1, 32, 64])  # 1024 and 2048 patches
  assert b["vision_attention"] == 4 * a["vision_attention"]
  assert b["vision_activations"] == 2 * a["vision_activations"]
  # decoder: KV cache and prefill activations linear in the prompt bucket
  e1, e2, e3 = est(64), est(128), est(192)
  assert e2["kv_cache"] - e1["kv_cache"] == e3["kv_cache"] - e2["kv_cache"] > 0
  assert e2["prefill_activations"] == 2 * e1["prefill_activations"]
  assert e2["prefill_attention"] == 4 * e1["prefill_attention"]
  assert e1["vision_attention"] == 0
  # the HF budget for a 6000x6000 photo: 65,536 patches, 16 heads -> > 500 GiB, far past any host
  huge = est(16400, [1, 256, 256])
  assert huge["vision_attention"] > 500 * 2 ** 30 and huge["total"] > huge["vision_attention"]
  # parameters counted from the tree (arrays or ShapeDtypeStructs)
  tiny = Qwen3VL(qwen_config("qwen3_vl_tiny"))
  shapes = jax.eval_shape(lambda: init_params(tiny, jax.random.key(0)))
  n = sum(int(np.prod(x.shape)) * 4 for x in jax.tree.leaves(shapes))
  assert G.estimate_generate_memory(tiny, shapes, _shapes(10), 4)["params"] == n
  # Qwen2.5-VL and MoE configs go through too
  for m in (Qwen2_5_VL(qwen_config("qwen2_5_vl_3b")), Qwen3VL(qwen_config("qwen3_vl_30b_a3b"))):
    e = G.estimate_generate_memory(m, {}, _shapes(100, [1, 28, 28]), 8)
    assert e["total"] > 0 and set(e) >= {"vision_attention", "kv_cache", "prefill_activations"}


def test_generate_check_memory_before_compile(monkeypatch):
  model = Qwen3VL(qwen_config("qwen3_vl_tiny"))
  monkeypatch.setattr(G, "device_memory_limit", lambda device=None: 2 ** 20)
  monkeypatch.setattr(G, "compiled", lambda *a, **k: pytest.fail("compiled before the check"))
  batch = {"input_ids": np.arange(1000, 1010)[None], "attention_mask": np.ones((1, 10))}
  with pytest.raises(G.GenerateMemoryError, match="but the device has 0.00 GiB.*max_pixels"):
    G.generate(model, {}, batch, max_new_tokens=4, eos_token_ids=[1], pad_token_id=0)


def test_device_memory_limit_reads_something():
  limit = G.device_memory_limit()
  assert limit is None or limit > 2 ** 20


@pytest.fixture(scope="module")
def big_photo(tmp_path_factory):
  """A 6000x6000 RGB JPEG (a gradient: cheap to make and decode)."""
  path = tmp_path_factory.mktemp("photo") / "big.jpg"
  grey = Image.linear_gradient("L").resize((6000, 6000))
  Image.merge("RGB", (grey, grey.transpose(Image.Transpose.ROTATE_90), grey)).save(path)
  return str(path)


@pytest.fixture()
def tiny_checkpoint(monkeypatch, tmp_path, big_photo):
  """``vlm.load_pretrained`` replaced by the tiny preset (no HF checkpoint on disk needed) and
  ``generate`` replaced by a recorder (returns eos at once)."""
  model = Qwen3VL(qwen_config("qwen3_vl_tiny"))
  shapes = jax.eval_shape(lambda: init_params(model, jax.random.key(0)))
  tok = Qwen3VLProcessor().tokenizer
  monkeypatch.setattr(vlm, "load_pretrained", raising=False, value=lambda path: (
      model, shapes, Qwen3VLProcessor(tokenizer=tok, padding_side="left")))
  calls = []

  def fake_generate(model, params, batch, **kw):
    calls.append(batch)
    return np.full((1, kw["max_new_tokens"]), tok.eos_token_id)

  monkeypatch.setattr(G, "generate", fake_generate)
  return str(tmp_path), big_photo, calls


def test_script_default_budget_resizes_a_6000px_photo(tiny_checkpoint, capsys):
  ckpt, photo, calls = tiny_checkpoint
  mod = _script()
  assert mod.run(ckpt, photo, "Hi", max_new_tokens=2) == ""
  batch = calls[-1]
  np.testing.assert_array_equal(batch["image_grid_thw"], [[1, 64, 64]])  # 1024x1024 px
  assert int((batch["input_ids"] == 151655).sum()) == 1024  # visual tokens
  assert mod.DEFAULT_MAX_PIXELS == 1024 * 32 * 32
  assert "6000x6000 px -> 1024x1024 px, 1024 visual tokens" in capsys.readouterr().err


def test_script_memory_error_before_compile(tiny_checkpoint, monkeypatch):
  ckpt, photo, calls = tiny_checkpoint
  mod = _script()
  monkeypatch.setattr(G, "generate", lambda *a, **k: pytest.fail("generate called"))
  monkeypatch.setattr(G, "device_memory_limit", lambda device=None: 2 ** 20)  # 1 MiB
  start = time.perf_counter()
  with pytest.raises(G.GenerateMemoryError) as info:
    mod.run(ckpt, photo, "Hi", max_new_tokens=2)
  msg = str(info.value)
  assert "6000x6000 image becomes 1024x1024 px = 4096 patches, 1024 visual tokens" in msg
  assert "GiB" in msg and "parameters alone" in msg  # 1 MiB cannot hold even the tiny params
  assert time.perf_counter() - start < 60
  # a limit that holds the model and a smaller image: the suggested --max_pixels fits
  est = G.estimate_generate_memory(*vlm.load_pretrained(ckpt)[:2], calls_batch(mod, ckpt, photo),
                                   2)
  limit = est["total"] - est["vision_attention"] // 2
  monkeypatch.setattr(G, "device_memory_limit", lambda device=None: limit)
  with pytest.raises(G.GenerateMemoryError, match=r"rerun with --max_pixels \d+") as info:
    mod.run(ckpt, photo, "Hi", max_new_tokens=2)
  suggested = int(re.search(r"--max_pixels (\d+)", str(info.value)).group(1))
  assert suggested < mod.DEFAULT_MAX_PIXELS
  recorded = []
  monkeypatch.setattr(G, "generate", lambda m, p, batch, **kw: recorded.append(batch) or
                      np.zeros((1, kw["max_new_tokens"]), np.int64))
  mod.run(ckpt, photo, "Hi", max_new_tokens=2, max_pixels=suggested)
  assert int(np.prod(recorded[0]["image_grid_thw"])) < 4096
  # --max_pixels 0: the checkpoint's (HF) budget, 4096x4096 px for this photo -> refused at once
  monkeypatch.setattr(G, "device_memory_limit", lambda device=None: 8 * 2 ** 30)
  with pytest.raises(G.GenerateMemoryError, match="4096x4096 px = 65536 patches, 16384 visual"):
    mod.run(ckpt, photo, "Hi", max_new_tokens=2, max_pixels=0)


def calls_batch(mod, ckpt, photo):
  """The processor batch the script builds for ``photo`` at its default budget."""
  model, _, proc = vlm.load_pretrained(ckpt)
  img = Image.open(photo)
  text = proc.apply_chat_template([{"role": "user", "content": [
      {"type": "image"}, {"type": "text", "text": "Hi"}]}])
  proc.config = mod._with_budgets(proc.config, mod.DEFAULT_MAX_PIXELS, None)
  return proc(text=[text], images=[img])
