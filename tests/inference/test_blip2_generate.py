"""Bad input to BLIP-2 stage-2 generation: clear errors before anything compiles, counted skips
for unreadable photos (token-level equality with HF is in tests/equivalence/test_blip2_stage2.py)."""
import importlib.util
import os

import jax
import numpy as np
import pytest

from vlm import models
from vlm.inference.blip2_generate import Blip2Generator, check_prompt, load_images

COCO = os.path.join(os.path.dirname(__file__), "..", "..", "data", "coco", "images")


@pytest.fixture(scope="module")
def generator():
  model = models.build("blip2_stage2", "blip2_opt_micro")
  s = model.config.vision.image_size
  ids = np.zeros((1, 4), np.int32)
  params = jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), np.zeros((1, s, s, 3)),
                                             ids, np.ones_like(ids))["params"])
  return Blip2Generator(model, params), s  # shapes suffice: every error comes before compiling


def test_prompt_errors(generator):
  gen, s = generator
  px = np.zeros((2, s, s, 3), np.float32)
  with pytest.raises(ValueError, match="prompt 1 is empty"):
    gen.generate_ids(px, ["a photo of", "   "])
  with pytest.raises(ValueError, match="more than the 256 allowed"):
    gen.generate_ids(px, "word " * 400)
  with pytest.raises(ValueError, match="max_position_embeddings"):
    gen.generate_ids(px, "a photo of " * 20, max_new_tokens=64)
  with pytest.raises(ValueError, match="3 prompts for 2 images"):
    gen.generate_ids(px, ["a", "b", "c"])
  with pytest.raises(ValueError, match="num_beams=1 to sample"):
    gen.generate_ids(px, "a photo of", num_beams=3, temperature=1.0)
  with pytest.raises(ValueError, match="needs rng"):
    gen.generate_ids(px, "a photo of", num_beams=1, temperature=0.7)
  with pytest.raises(ValueError, match="min_new_tokens"):
    gen.generate_ids(px, "a photo of", max_new_tokens=4, min_new_tokens=5)
  with pytest.raises(ValueError, match="eos_token_ids"):
    gen.generate_ids(px, "a photo of", eos_token_ids=[10 ** 6])
  with pytest.raises(ValueError, match=r"\[B,S,S,3\]"):
    gen.generate_ids(np.zeros((s, s, 3)), "a photo of")
  with pytest.raises(ValueError, match="must be a string"):
    check_prompt(gen.tokenizer, None)
  assert check_prompt(gen.tokenizer, "", allow_empty=True) == [2]  # OPT: the BOS alone


def test_unreadable_photos_are_counted_skips(tmp_path):
  bad = tmp_path / "truncated.jpg"
  good = os.path.join(COCO, sorted(os.listdir(COCO))[0])
  bad.write_bytes(open(good, "rb").read()[:200])
  empty = tmp_path / "empty.jpg"
  empty.write_bytes(b"")
  pixels, ok, errors = load_images([good, str(bad), str(tmp_path / "missing.jpg"), str(empty)], 32)
  assert pixels.shape == (1, 32, 32, 3) and ok == [0]
  assert [e[0] for e in errors] == [str(bad), str(tmp_path / "missing.jpg"), str(empty)]


def test_caption_script_names_what_is_wrong(tmp_path):
  spec = importlib.util.spec_from_file_location(
      "caption_script", os.path.join(os.path.dirname(__file__), "..", "..", "scripts",
                                     "caption.py"))
  script = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(script)
  with pytest.raises(FileNotFoundError, match="neither a vlm workdir"):
    script.load_model(str(tmp_path))
