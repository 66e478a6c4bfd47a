"""Q-Former and BLIP-2 stage-1 heads vs HF transformers (tiny random models, float32, eval mode).

References: HF ``Blip2QFormerModel``, ``Blip2ForImageTextRetrieval`` (ITM and ITC),
``Blip2TextModelWithProjection``, ``Blip2VisionModelWithProjection``. Weights go HF ->
``save_pretrained`` -> :func:`vlm.convert.hf_blip2.load_hf_blip2`, so the converter is tested too.
"""
import dataclasses

import flax
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers

from tests.equivalence import blip2_hf_utils as U
from vlm.convert.hf_blip2 import load_hf_blip2
from vlm.models.blip2 import Blip2Stage1, itg_attention_mask
from vlm.models.qformer import Blip2TextEmbeddings, QFormerModel

TOL = 1e-5


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
  model = U.tiny_hf_retrieval(seed=0)
  path = tmp_path_factory.mktemp("blip2_hf")
  model.save_pretrained(path)
  return model, str(path)


@pytest.fixture(scope="module")
def ours(hf_dir):
  _, path = hf_dir
  config, params = load_hf_blip2(path)
  return Blip2Stage1(config), config, params


def _image_embeds(model, pixels):
  with torch.no_grad():
    return model.vision_model(pixel_values=torch.from_numpy(pixels)).last_hidden_state


def _qformer_apply(config, params, *args):
  return QFormerModel(config.qformer).apply({"params": params["qformer"]}, *args)


def test_vision_tower_matches(hf_dir, ours):
  model, _ = hf_dir
  m, _, params = ours
  pixels, _, _ = U.inputs()
  ref = _image_embeds(model, pixels).numpy()
  got = m.apply({"params": params}, U.nhwc(pixels), method=Blip2Stage1.encode_image)
  assert U.max_abs(got, ref) <= TOL


def test_qformer_query_only(hf_dir, ours):
  model, _ = hf_dir
  _, config, params = ours
  pixels, _, _ = U.inputs()
  img = _image_embeds(model, pixels)
  q = model.query_tokens.expand(img.shape[0], -1, -1)
  with torch.no_grad():
    ref = model.qformer(query_embeds=q, encoder_hidden_states=img).last_hidden_state.numpy()
  queries = np.broadcast_to(params["query_tokens"], ref.shape)
  got = _qformer_apply(config, params, jnp.asarray(queries), U.NUM_QUERIES, None,
                       jnp.asarray(img.numpy()))
  assert U.max_abs(got, ref) <= TOL


def _embeddings(config, params, ids, queries=None):
  return Blip2TextEmbeddings(config.qformer).apply({"params": params["embeddings"]},
                                                   jnp.asarray(ids), queries)


def test_qformer_queries_and_padded_text(hf_dir, ours):
  model, _ = hf_dir
  _, config, params = ours
  pixels, ids, mask = U.inputs()
  img = _image_embeds(model, pixels)
  q = model.query_tokens.expand(img.shape[0], -1, -1)
  full_mask = np.concatenate([np.ones((2, U.NUM_QUERIES), np.int64), mask], axis=1)
  with torch.no_grad():
    emb_ref = model.embeddings(input_ids=torch.from_numpy(ids), query_embeds=q)
    ref = model.qformer(query_embeds=emb_ref, query_length=U.NUM_QUERIES,
                        attention_mask=torch.from_numpy(full_mask),
                        encoder_hidden_states=img).last_hidden_state.numpy()
  emb = _embeddings(config, params, ids, jnp.broadcast_to(params["query_tokens"], q.shape))
  assert U.max_abs(emb, emb_ref.numpy()) <= TOL
  got = _qformer_apply(config, params, emb, U.NUM_QUERIES, jnp.asarray(full_mask),
                       jnp.asarray(img.numpy()))
  assert U.max_abs(got, ref) <= TOL


def test_qformer_text_only_padded(hf_dir, ours):
  model, _ = hf_dir
  _, config, params = ours
  _, ids, mask = U.inputs()
  with torch.no_grad():
    emb_ref = model.embeddings(input_ids=torch.from_numpy(ids))
    ref = model.qformer(query_embeds=emb_ref, query_length=0,
                        attention_mask=torch.from_numpy(mask)).last_hidden_state.numpy()
  got = _qformer_apply(config, params, _embeddings(config, params, ids), 0, jnp.asarray(mask))
  assert U.max_abs(got, ref) <= TOL


def test_qformer_full_itg_mask(hf_dir, ours):
  """The [B,L,L] UniLM mask path against HF's 3-D attention_mask."""
  model, _ = hf_dir
  _, config, params = ours
  pixels, ids, mask = U.inputs()
  img = _image_embeds(model, pixels)
  q = model.query_tokens.expand(img.shape[0], -1, -1)
  mask3 = np.asarray(itg_attention_mask(jnp.asarray(mask), U.NUM_QUERIES))
  with torch.no_grad():
    emb_ref = model.embeddings(input_ids=torch.from_numpy(ids), query_embeds=q)
    ref = model.qformer(query_embeds=emb_ref, query_length=U.NUM_QUERIES,
                        attention_mask=torch.from_numpy(mask3.astype(np.float32)),
                        encoder_hidden_states=img).last_hidden_state.numpy()
  emb = _embeddings(config, params, ids, jnp.broadcast_to(params["query_tokens"], q.shape))
  got = _qformer_apply(config, params, emb, U.NUM_QUERIES, jnp.asarray(mask3),
                       jnp.asarray(img.numpy()))
  assert U.max_abs(got, ref) <= TOL


def test_itm_logits(hf_dir, ours):
  model, _ = hf_dir
  m, _, params = ours
  pixels, ids, mask = U.inputs()
  with torch.no_grad():
    ref = model(pixel_values=torch.from_numpy(pixels), input_ids=torch.from_numpy(ids),
                attention_mask=torch.from_numpy(mask),
                use_image_text_matching_head=True).logits_per_image.numpy()
  v = {"params": params}
  img = m.apply(v, U.nhwc(pixels), method=Blip2Stage1.encode_image)
  got = m.apply(v, img, jnp.asarray(ids), jnp.asarray(mask), method=Blip2Stage1.itm_logits)
  assert got.shape == (2, 2)
  assert U.max_abs(got, ref) <= TOL


def test_itc_features_and_similarity(hf_dir, ours):
  model, _ = hf_dir
  m, _, params = ours
  pixels, ids, mask = U.inputs(batch=2)
  with torch.no_grad():
    out = model(pixel_values=torch.from_numpy(pixels), input_ids=torch.from_numpy(ids),
                attention_mask=torch.from_numpy(mask), use_image_text_matching_head=False)
  v = {"params": params}
  img = m.apply(v, U.nhwc(pixels), method=Blip2Stage1.encode_image)
  _, image_feats = m.apply(v, img, method=Blip2Stage1.image_features)
  _, text_feat = m.apply(v, jnp.asarray(ids), jnp.asarray(mask), method=Blip2Stage1.text_features)
  assert U.max_abs(image_feats, out.image_embeds.numpy()) <= TOL
  assert U.max_abs(text_feat, out.text_embeds.numpy()) <= TOL
  sim = jnp.max(jnp.einsum("bqe,te->bqt", image_feats, text_feat), axis=1)
  assert U.max_abs(sim, out.logits_per_image.numpy()) <= TOL
  np.testing.assert_allclose(np.linalg.norm(np.asarray(image_feats), axis=-1), 1.0, atol=1e-6)


def test_text_and_vision_models_with_projection(hf_dir, ours):
  model, path = hf_dir
  m, _, params = ours
  pixels, ids, mask = U.inputs()
  text_model = transformers.Blip2TextModelWithProjection.from_pretrained(path).eval()
  vision_model = transformers.Blip2VisionModelWithProjection.from_pretrained(path).eval()
  with torch.no_grad():
    t_ref = text_model(input_ids=torch.from_numpy(ids),
                       attention_mask=torch.from_numpy(mask)).text_embeds.numpy()
    i_ref = vision_model(pixel_values=torch.from_numpy(pixels)).image_embeds.numpy()
  v = {"params": params}
  text_out, text_feat = m.apply(v, jnp.asarray(ids), jnp.asarray(mask),
                                method=Blip2Stage1.text_features)
  proj = params["text_projection"]
  all_pos = np.asarray(text_out) @ proj["kernel"] + proj["bias"]
  all_pos /= np.maximum(np.linalg.norm(all_pos, axis=-1, keepdims=True), 1e-12)
  assert U.max_abs(all_pos, t_ref) <= TOL
  assert U.max_abs(text_feat, t_ref[:, 0]) <= TOL
  img = m.apply(v, U.nhwc(pixels), method=Blip2Stage1.encode_image)
  _, image_feats = m.apply(v, img, method=Blip2Stage1.image_features)
  assert U.max_abs(image_feats, i_ref) <= TOL


def test_sharded_checkpoint_loads_identically(hf_dir, ours, tmp_path):
  model, _ = hf_dir
  _, config, params = ours
  model.save_pretrained(tmp_path, max_shard_size="20KB")
  assert (tmp_path / "model.safetensors.index.json").exists()
  config2, params2 = load_hf_blip2(str(tmp_path))
  assert config2 == config
  flat1 = flax.traverse_util.flatten_dict(params)
  flat2 = flax.traverse_util.flatten_dict(params2)
  assert flat1.keys() == flat2.keys()
  for k in flat1:
    np.testing.assert_array_equal(flat1[k], flat2[k], err_msg="/".join(k))


def test_itg_queries_never_see_text(ours):
  """One-pass ITG = query-only pass on the query positions (spec section 3.4)."""
  _, config, params = ours
  rng = np.random.default_rng(1)
  img = jnp.asarray(rng.standard_normal((2, 5, config.vision.hidden_size)), jnp.float32)
  _, ids, mask = U.inputs(seed=1)
  queries = jnp.broadcast_to(params["query_tokens"], (2,) + params["query_tokens"].shape[1:])
  q = U.NUM_QUERIES
  itg = _qformer_apply(config, params, _embeddings(config, params, ids, queries), q,
                       itg_attention_mask(jnp.asarray(mask), q), img)
  query_only = _qformer_apply(config, params, queries, q, None, img)
  assert U.max_abs(itg[:, :q], query_only) <= TOL


def test_itg_logits_are_causal(ours):
  m, config, params = ours
  rng = np.random.default_rng(2)
  img = jnp.asarray(rng.standard_normal((2, 5, config.vision.hidden_size)), jnp.float32)
  _, ids, mask = U.inputs(seed=2)
  mask = np.ones_like(mask)
  v = {"params": params}
  logits = m.apply(v, img, jnp.asarray(ids), jnp.asarray(mask), method=Blip2Stage1.itg_logits)
  assert logits.shape == ids.shape + (config.qformer.vocab_size,)
  changed = ids.copy()
  changed[:, 4:] = (changed[:, 4:] + 1) % U.VOCAB
  logits2 = m.apply(v, img, jnp.asarray(changed), jnp.asarray(mask),
                    method=Blip2Stage1.itg_logits)
  assert U.max_abs(logits[:, :4], logits2[:, :4]) == 0.0
  assert U.max_abs(logits[:, 4:], logits2[:, 4:]) > 1e-3


def test_dropout_active_only_when_not_deterministic(ours):
  m, _, params = ours
  _, ids, mask = U.inputs()
  v = {"params": params}
  det = m.apply(v, jnp.asarray(ids), jnp.asarray(mask), method=Blip2Stage1.text_features)[0]
  run = lambda seed: m.apply(v, jnp.asarray(ids), jnp.asarray(mask), False,
                             method=Blip2Stage1.text_features,
                             rngs={"dropout": jax.random.PRNGKey(seed)})[0]
  assert U.max_abs(run(0), det) > 1e-3
  assert U.max_abs(run(0), run(0)) == 0.0


def test_stage2_qformer_has_no_text_ffn(ours):
  _, config, _ = ours
  qcfg = dataclasses.replace(config.qformer, use_qformer_text_input=False)
  model = QFormerModel(qcfg)
  x = jnp.zeros((1, 3, qcfg.hidden_size))
  img = jnp.zeros((1, 5, qcfg.encoder_hidden_size))
  variables = model.init(jax.random.PRNGKey(0), x, 3, None, img)
  assert set(variables["params"]["encoder"]["layer_0"]) == {"attention", "crossattention",
                                                           "intermediate_query", "output_query"}
  with pytest.raises(ValueError, match="use_qformer_text_input"):
    model.apply(variables, jnp.zeros((1, 5, qcfg.hidden_size)), 3, None, img)
