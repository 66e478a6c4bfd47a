"""Q-Former and BLIP-2 stage-1 heads vs HF transformers (tiny random models, float32, eval mode).

References: HF ``Blip2QFormerModel``, ``Blip2ForImageTextRetrieval`` (ITM and ITC),
``Blip2TextModelWithProjection``, ``Blip2VisionModelWithProjection``. Weights go HF ->
``save_pretrained`` -> :func:`vlm.convert.hf_blip2.load_hf_blip2`, so the converter is tested too.

Every vlm output is computed by one jitted function (one XLA compile for the whole file); the
tests then compare its pieces with HF. Reported errors are max abs differences.
"""
import dataclasses
import functools

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
from vlm.models.qformer import QFormerModel

TOL = 1e-5
Q = U.NUM_QUERIES


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


@pytest.fixture(scope="module")
def data(hf_dir):
  model, _ = hf_dir
  pixels, ids, mask = U.inputs()
  with torch.no_grad():
    img = model.vision_model(pixel_values=torch.from_numpy(pixels)).last_hidden_state.numpy()
  changed = ids.copy()
  changed[:, 4:] = (changed[:, 4:] + 1) % U.VOCAB
  return dict(pixels=pixels, ids=ids, mask=mask, img=img, changed=changed)


def _all_outputs(module: Blip2Stage1, pixels, ids, mask, img, changed):
  """Every vlm quantity the tests compare, from one traced function (run via ``apply``)."""
  b = ids.shape[0]
  queries = jnp.broadcast_to(module.query_tokens, (b,) + module.query_tokens.shape[1:])
  full_mask = jnp.concatenate([jnp.ones((b, Q), mask.dtype), mask], axis=1)
  itg_mask = itg_attention_mask(mask, Q)
  emb_qt = module.embeddings(ids, queries)
  emb_t = module.embeddings(ids)
  image_embeds = module.encode_image(pixels)
  text_out, text_feat = module.text_features(ids, mask)
  _, image_feats = module.image_features(image_embeds)
  return dict(
      encode_image=image_embeds,
      emb_qt=emb_qt,
      emb_t=emb_t,
      qformer_query_only=module.qformer(queries, Q, None, img),
      qformer_query_text=module.qformer(emb_qt, Q, full_mask, img),
      qformer_text_only=module.qformer(emb_t, 0, mask),
      qformer_itg=module.qformer(emb_qt, Q, itg_mask, img),
      itg_mask=itg_mask,
      itm=module.itm_logits(image_embeds, ids, mask),
      image_feats=image_feats,
      text_out=text_out,
      text_feat=text_feat,
      itg_logits=module.itg_logits(img, ids, jnp.ones_like(mask)),
      itg_logits_changed=module.itg_logits(img, changed, jnp.ones_like(mask)),
  )


@pytest.fixture(scope="module")
def out(ours, data):
  m, _, params = ours
  fn = jax.jit(functools.partial(m.apply, method=_all_outputs))
  res = fn({"params": params}, U.nhwc(data["pixels"]), jnp.asarray(data["ids"]),
           jnp.asarray(data["mask"]), jnp.asarray(data["img"]), jnp.asarray(data["changed"]))
  return jax.tree_util.tree_map(np.asarray, res)


def _t(x):
  return torch.from_numpy(np.asarray(x))


def test_vision_tower_matches(data, out):
  assert U.max_abs(out["encode_image"], data["img"]) <= TOL


def test_qformer_query_only(hf_dir, data, out):
  model, _ = hf_dir
  q = model.query_tokens.expand(2, -1, -1)
  with torch.no_grad():
    ref = model.qformer(query_embeds=q, encoder_hidden_states=_t(data["img"])).last_hidden_state
  assert U.max_abs(out["qformer_query_only"], ref) <= TOL


def test_qformer_queries_and_padded_text(hf_dir, data, out):
  model, _ = hf_dir
  q = model.query_tokens.expand(2, -1, -1)
  full_mask = np.concatenate([np.ones((2, Q), np.int64), data["mask"]], axis=1)
  with torch.no_grad():
    emb = model.embeddings(input_ids=_t(data["ids"]), query_embeds=q)
    ref = model.qformer(query_embeds=emb, query_length=Q, attention_mask=_t(full_mask),
                        encoder_hidden_states=_t(data["img"])).last_hidden_state
  assert U.max_abs(out["emb_qt"], emb) <= TOL
  assert U.max_abs(out["qformer_query_text"], ref) <= TOL


def test_qformer_text_only_padded(hf_dir, data, out):
  model, _ = hf_dir
  with torch.no_grad():
    emb = model.embeddings(input_ids=_t(data["ids"]))
    ref = model.qformer(query_embeds=emb, query_length=0,
                        attention_mask=_t(data["mask"])).last_hidden_state
  assert U.max_abs(out["emb_t"], emb) <= TOL
  assert U.max_abs(out["qformer_text_only"], ref) <= TOL


def test_qformer_full_itg_mask(hf_dir, data, out):
  """The [B,L,L] UniLM mask path against HF's 3-D attention_mask."""
  model, _ = hf_dir
  q = model.query_tokens.expand(2, -1, -1)
  mask3 = out["itg_mask"].astype(np.float32)
  # Spec section 2.4: queries see only queries; text t sees all queries and text <= t (non-pad).
  assert mask3[0, :Q, Q:].sum() == 0 and mask3[0, Q:, :Q].min() == 1
  assert mask3[0, Q + 1, Q + 2] == 0 and mask3[0, Q + 2, Q + 1] == 1
  assert mask3[1, -1, -1] == 0  # padded key of row 1
  with torch.no_grad():
    emb = model.embeddings(input_ids=_t(data["ids"]), query_embeds=q)
    ref = model.qformer(query_embeds=emb, query_length=Q, attention_mask=_t(mask3),
                        encoder_hidden_states=_t(data["img"])).last_hidden_state
  assert U.max_abs(out["qformer_itg"], ref) <= TOL


def test_itm_logits(hf_dir, data, out):
  model, _ = hf_dir
  with torch.no_grad():
    ref = model(pixel_values=_t(data["pixels"]), input_ids=_t(data["ids"]),
                attention_mask=_t(data["mask"]), use_image_text_matching_head=True)
  assert out["itm"].shape == (2, 2)
  assert U.max_abs(out["itm"], ref.logits_per_image) <= TOL


def test_itc_features_and_similarity(hf_dir, data, out):
  model, _ = hf_dir
  with torch.no_grad():
    ref = model(pixel_values=_t(data["pixels"]), input_ids=_t(data["ids"]),
                attention_mask=_t(data["mask"]), use_image_text_matching_head=False)
  assert U.max_abs(out["image_feats"], ref.image_embeds) <= TOL
  assert U.max_abs(out["text_feat"], ref.text_embeds) <= TOL
  sim = np.max(np.einsum("bqe,te->bqt", out["image_feats"], out["text_feat"]), axis=1)
  assert U.max_abs(sim, ref.logits_per_image) <= TOL
  np.testing.assert_allclose(np.linalg.norm(out["image_feats"], axis=-1), 1.0, atol=1e-6)


def test_text_and_vision_models_with_projection(hf_dir, ours, data, out):
  _, path = hf_dir
  _, _, params = ours
  text_model = transformers.Blip2TextModelWithProjection.from_pretrained(path).eval()
  vision_model = transformers.Blip2VisionModelWithProjection.from_pretrained(path).eval()
  with torch.no_grad():
    t_ref = text_model(input_ids=_t(data["ids"]), attention_mask=_t(data["mask"])).text_embeds
    i_ref = vision_model(pixel_values=_t(data["pixels"])).image_embeds
  proj = params["text_projection"]
  all_pos = out["text_out"] @ proj["kernel"] + proj["bias"]
  all_pos /= np.maximum(np.linalg.norm(all_pos, axis=-1, keepdims=True), 1e-12)
  assert U.max_abs(all_pos, t_ref) <= TOL
  assert U.max_abs(out["text_feat"], t_ref[:, 0]) <= TOL
  assert U.max_abs(out["image_feats"], i_ref) <= TOL


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


def test_itg_queries_never_see_text(out):
  """One-pass ITG = query-only pass on the query positions (spec section 3.4)."""
  assert U.max_abs(out["qformer_itg"][:, :Q], out["qformer_query_only"]) <= TOL


def test_itg_logits_are_causal(ours, data, out):
  _, config, _ = ours
  logits, changed = out["itg_logits"], out["itg_logits_changed"]
  assert logits.shape == data["ids"].shape + (config.qformer.vocab_size,)
  assert U.max_abs(logits[:, :4], changed[:, :4]) == 0.0
  assert U.max_abs(logits[:, 4:], changed[:, 4:]) > 1e-3


def test_dropout_active_only_when_not_deterministic(ours, data):
  """Dropout on a 1-layer text-only Q-Former (a prefix of the loaded params)."""
  _, config, params = ours
  cfg = dataclasses.replace(config.qformer, num_hidden_layers=1)
  qparams = {"layernorm": params["qformer"]["layernorm"],
             "encoder": {"layer_0": params["qformer"]["encoder"]["layer_0"]}}
  x = jnp.asarray(np.random.default_rng(0).standard_normal((2, 7, cfg.hidden_size)), jnp.float32)

  @jax.jit
  def run(key):
    apply = QFormerModel(cfg).apply
    v = {"params": qparams}
    return (apply(v, x, 0, None, None, True),
            apply(v, x, 0, None, None, False, rngs={"dropout": key}),
            apply(v, x, 0, None, None, False, rngs={"dropout": key}))

  det, drop1, drop2 = run(jax.random.PRNGKey(0))
  assert U.max_abs(drop1, det) > 1e-3
  assert U.max_abs(drop1, drop2) == 0.0


def test_stage2_qformer_has_no_text_ffn(ours):
  _, config, _ = ours
  qcfg = dataclasses.replace(config.qformer, use_qformer_text_input=False)
  model = QFormerModel(qcfg)
  img = jnp.zeros((1, 5, qcfg.encoder_hidden_size))
  shapes = jax.eval_shape(functools.partial(model.init, query_length=3), jax.random.PRNGKey(0),
                          jnp.zeros((1, 3, qcfg.hidden_size)), attention_mask=None,
                          encoder_hidden_states=img)
  assert set(shapes["params"]["encoder"]["layer_0"]) == {"attention", "crossattention",
                                                        "intermediate_query", "output_query"}
  assert set(shapes["params"]["encoder"]["layer_1"]) == {"attention", "intermediate_query",
                                                        "output_query"}
  with pytest.raises(ValueError, match="use_qformer_text_input"):
    jax.eval_shape(functools.partial(model.apply, query_length=3), shapes,
                   jnp.zeros((1, 5, qcfg.hidden_size)), attention_mask=None,
                   encoder_hidden_states=img)
