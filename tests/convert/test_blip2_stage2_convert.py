"""HF ``Blip2ForConditionalGeneration`` (OPT / FlanT5-style T5) <-> vlm ``Blip2Stage2`` conversion:
round trips (single file and shards, plain and scanned LLM layers), HF ``from_pretrained`` of our
directories, key errors, and the stage-2 initialisers ``load_hf_blip2_qformer`` (stage-1 retrieval
and stage-2 directories) and ``load_hf_language_model`` (plain OPT / T5 directories).

Torch only computes here; the vlm side is compared parameter by parameter (the forward
equivalence is tests/equivalence/test_blip2_stage2.py).
"""
from __future__ import annotations

import dataclasses
import json
import os

import flax
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers
from safetensors.numpy import load_file, save_file

from tests.equivalence import blip2_stage2_hf_utils as U
from tests.equivalence.blip2_hf_utils import randomize_
from vlm.convert.hf_blip2 import (hf_state_from_stage2_params, load_hf_blip2_qformer,
                                  load_hf_blip2_stage2, load_hf_language_model,
                                  save_hf_blip2_stage2, stage2_config_from_hf,
                                  stage2_config_to_hf)
from vlm.models.blip2 import Blip2Stage2


def _flat(params):
  return flax.traverse_util.flatten_dict(flax.core.meta.unbox(params))


def _assert_same(a, b):
  fa, fb = _flat(a), _flat(b)
  assert fa.keys() == fb.keys(), sorted(set(fa) ^ set(fb))
  for k in fa:
    x, y = np.asarray(fa[k]), np.asarray(fb[k])
    assert x.dtype == y.dtype, k
    np.testing.assert_array_equal(x, y, err_msg="/".join(k))


@pytest.fixture(scope="module", params=["opt", "t5"])
def hf_dir(request, tmp_path_factory):
  kind = request.param
  model = U.tiny_hf_stage2(kind, seed=3)
  path = tmp_path_factory.mktemp(f"stage2_{kind}")
  model.save_pretrained(path)
  return kind, model, str(path)


def _hf_logits(model, kind):
  pixels = torch.from_numpy(U.images(7, 2))
  ids = torch.tensor([[U.IMAGE_TOKEN] * U.NUM_QUERIES + [2, 5, 9, 14]] * 2)
  kw = {}
  if kind == "t5":
    kw["decoder_input_ids"] = torch.tensor([[0, 7, 3], [0, 4, 4]])
  with torch.no_grad():
    return model(pixel_values=pixels, input_ids=ids, **kw).logits.numpy()


def _from_pretrained(path):
  model, info = transformers.Blip2ForConditionalGeneration.from_pretrained(
      path, output_loading_info=True)
  assert not info["missing_keys"] and not info["unexpected_keys"], info
  return model.eval()


def test_config_round_trip(hf_dir):
  kind, model, path = hf_dir
  config, _ = load_hf_blip2_stage2(path)
  assert config.llm_kind == kind and config.image_token_index == U.IMAGE_TOKEN
  assert config.num_query_tokens == U.NUM_QUERIES
  back = transformers.Blip2Config.from_dict(stage2_config_to_hf(config))
  assert stage2_config_from_hf(back.to_dict()) == config
  assert back.image_token_index == U.IMAGE_TOKEN
  assert back.use_decoder_only_language_model == (kind == "opt")


@pytest.mark.parametrize("max_shard_size", [None, "40KB"])
def test_round_trip_and_from_pretrained(hf_dir, tmp_path, max_shard_size):
  kind, model, path = hf_dir
  config, params = load_hf_blip2_stage2(path)
  save_hf_blip2_stage2(config, params, str(tmp_path), max_shard_size=max_shard_size)
  if max_shard_size:
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 1
  config2, params2 = load_hf_blip2_stage2(str(tmp_path))
  assert config2 == config
  _assert_same(params, params2)
  # HF reads our directory with no missing / unexpected key and computes the same logits.
  ours = _from_pretrained(str(tmp_path))
  np.testing.assert_array_equal(_hf_logits(ours, kind), _hf_logits(model, kind))
  ref_state = model.state_dict()
  for k, v in ours.state_dict().items():
    np.testing.assert_array_equal(v.numpy(), ref_state[k].numpy(), err_msg=k)


def test_scanned_round_trip(hf_dir, tmp_path):
  kind, model, path = hf_dir
  config, plain = load_hf_blip2_stage2(path)
  _, scanned = load_hf_blip2_stage2(path, scan_layers=True)
  assert _flat(scanned).keys() != _flat(plain).keys()
  save_hf_blip2_stage2(config, scanned, str(tmp_path), scan_layers=True)
  _, back = load_hf_blip2_stage2(str(tmp_path))
  _assert_same(back, plain)


def test_vlm_init_round_trip(hf_dir, tmp_path):
  """vlm-initialised params (boxed, jax arrays) -> HF directory -> vlm: bit-identical."""
  kind, _, path = hf_dir
  config, _ = load_hf_blip2_stage2(path)
  model = Blip2Stage2(config)
  s = U.IMAGE_SIZE
  args = (jnp.zeros((1, s, s, 3)), jnp.ones((1, 3), jnp.int32), jnp.ones((1, 3), jnp.int32))
  if kind == "t5":
    args += (jnp.zeros((1, 2), jnp.int32),)
  variables = jax.jit(model.init)(jax.random.PRNGKey(1), *args)
  save_hf_blip2_stage2(config, variables, str(tmp_path))
  _from_pretrained(str(tmp_path))
  _, back = load_hf_blip2_stage2(str(tmp_path))
  _assert_same(jax.tree.map(np.asarray, flax.core.meta.unbox(variables["params"])), back)


def _rewrite(src, dst, edit):
  os.makedirs(dst, exist_ok=True)
  state = load_file(os.path.join(src, "model.safetensors"))
  edit(state)
  save_file(state, os.path.join(dst, "model.safetensors"))
  with open(os.path.join(src, "config.json")) as fh:
    cfg = fh.read()
  with open(os.path.join(dst, "config.json"), "w") as fh:
    fh.write(cfg)


def test_unknown_and_missing_keys(hf_dir, tmp_path):
  kind, _, path = hf_dir
  llm_key = ("language_model.model.decoder.layers.1.fc1.bias" if kind == "opt"
             else "language_model.decoder.block.1.layer.2.DenseReluDense.wo.weight")

  def edit(state):
    state["qformer.encoder.layer.0.mystery.weight"] = np.zeros(3, np.float32)
    del state["language_projection.bias"]
    del state["query_tokens"]
    del state[llm_key]

  _rewrite(path, str(tmp_path / "bad"), edit)
  with pytest.raises(ValueError) as err:
    load_hf_blip2_stage2(str(tmp_path / "bad"))
  msg = str(err.value)
  for key in ("qformer.encoder.layer.0.mystery.weight", "language_projection.bias",
              "query_tokens", llm_key):
    assert key in msg, (key, msg)

  def reshape(state):
    state["language_projection.weight"] = state["language_projection.weight"][:, :-1].copy()

  _rewrite(path, str(tmp_path / "shape"), reshape)
  with pytest.raises(ValueError, match="language_projection.weight"):
    load_hf_blip2_stage2(str(tmp_path / "shape"))

  config, params = load_hf_blip2_stage2(path)
  params = dict(params, extra={"kernel": np.zeros((2, 2), np.float32)})
  del params["language_projection"]
  with pytest.raises(ValueError) as err:
    hf_state_from_stage2_params(config, params)
  assert "extra/kernel" in str(err.value) and "language_projection/kernel" in str(err.value)
  with pytest.raises(FileNotFoundError):
    load_hf_blip2_stage2(str(tmp_path / "nowhere"))


def _stage1_dir(tmp_path, **overrides):
  """A stage-1 ``Blip2ForImageTextRetrieval`` with the stage-2 tower / Q-Former sizes."""
  vision, qformer = U._vision_qformer()
  qformer = dict(qformer, use_qformer_text_input=True)
  kw = dict(num_query_tokens=U.NUM_QUERIES, image_text_hidden_size=16)
  kw.update(overrides)
  torch.manual_seed(0)
  model = transformers.Blip2ForImageTextRetrieval(
      transformers.Blip2Config(vision_config=vision, qformer_config=qformer, **kw))
  randomize_(model, seed=11)
  path = str(tmp_path / f"stage1_{len(os.listdir(tmp_path))}")
  model.save_pretrained(path)
  return model, path


def test_load_qformer_from_stage1_and_stage2(hf_dir, tmp_path):
  kind, model, path = hf_dir
  config, params = load_hf_blip2_stage2(path)
  stage2_paths = set(_flat(params))

  # stage 2 -> everything but the LLM, equal to the full load
  got = load_hf_blip2_qformer(path, config)
  want = {p: v for p, v in _flat(params).items() if p[0] != "language_model"}
  assert got.keys() == want.keys()
  for p in want:
    np.testing.assert_array_equal(got[p], want[p], err_msg="/".join(p))

  # stage 1 -> tower, queries and Q-Former (query FFN), no text FFN / heads / projection
  s1, s1_path = _stage1_dir(tmp_path)
  got = load_hf_blip2_qformer(s1_path, config)
  assert got.keys() <= stage2_paths
  assert {p[0] for p in got} == {"vision_model", "query_tokens", "qformer"}
  assert got.keys() == {p for p in stage2_paths if p[0] in {"vision_model", "query_tokens",
                                                            "qformer"}}
  sd = s1.state_dict()
  np.testing.assert_array_equal(got[("query_tokens",)], sd["query_tokens"].numpy())
  hf_q = "qformer.encoder.layer.1.crossattention.attention.key.weight"
  ours_q = [v for p, v in got.items() if p[:4] == ("qformer", "encoder", "layer_1",
                                                   "crossattention") and p[-2:] == ("key", "kernel")]
  assert len(ours_q) == 1
  np.testing.assert_array_equal(ours_q[0], sd[hf_q].numpy().T)
  np.testing.assert_array_equal(got[("vision_model", "post_layernorm", "scale")],
                                sd["vision_model.post_layernorm.weight"].numpy())

  _, other = _stage1_dir(tmp_path, num_query_tokens=U.NUM_QUERIES + 1)
  with pytest.raises(ValueError, match="num_query_tokens"):
    load_hf_blip2_qformer(other, config)


def test_load_language_model(hf_dir, tmp_path):
  kind, model, path = hf_dir
  config, params = load_hf_blip2_stage2(path)
  llm_dir = str(tmp_path / "llm")
  model.language_model.save_pretrained(llm_dir)
  got = load_hf_language_model(llm_dir, config)
  want = {p: v for p, v in _flat(params).items() if p[0] == "language_model"}
  assert got.keys() == want.keys()
  for p in want:
    np.testing.assert_array_equal(got[p], want[p], err_msg="/".join(p))
  # the LLM inside a stage-2 BLIP-2 directory (init.hf_checkpoint) reads the same
  inside = load_hf_language_model(path, config)
  assert inside.keys() == want.keys()
  for p in want:
    np.testing.assert_array_equal(inside[p], want[p], err_msg="/".join(p))
  # scanned layout = the scanned full load
  _, scanned = load_hf_blip2_stage2(path, scan_layers=True)
  got = load_hf_language_model(llm_dir, config, scan_layers=True)
  want = {p: v for p, v in _flat(scanned).items() if p[0] == "language_model"}
  assert got.keys() == want.keys()
  for p in want:
    np.testing.assert_array_equal(got[p], want[p], err_msg="/".join(p))

  # a language model of another size
  text = U.text_config(kind)
  text.pop("model_type")
  layers = "num_hidden_layers" if kind == "opt" else "num_layers"
  text[layers] = 3
  cls = transformers.OPTForCausalLM if kind == "opt" else transformers.T5ForConditionalGeneration
  cfg_cls = transformers.OPTConfig if kind == "opt" else transformers.T5Config
  big_dir = str(tmp_path / "big")
  cls(cfg_cls(**text)).save_pretrained(big_dir)
  with pytest.raises(ValueError, match=layers):
    load_hf_language_model(big_dir, config)
  # a language model of another kind
  other = "t5" if kind == "opt" else "opt"
  text = U.text_config(other)
  text.pop("model_type")
  cls = transformers.OPTForCausalLM if other == "opt" else transformers.T5ForConditionalGeneration
  cfg_cls = transformers.OPTConfig if other == "opt" else transformers.T5Config
  other_dir = str(tmp_path / "other")
  cls(cfg_cls(**text)).save_pretrained(other_dir)
  with pytest.raises(ValueError, match="OPTConfig|T5Config"):
    load_hf_language_model(other_dir, config)
