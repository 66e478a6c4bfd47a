"""HF BLIP-2 conversion, BERT initialisation and stage-1 -> stage-2 initialisation with the scanned
layer layout (``scan_layers=True``: ``vision_model/encoder/layers``, ``qformer/encoder/layers``).

HF equivalence: a tiny random ``Blip2ForImageTextRetrieval`` loaded straight into the scanned
layout gives HF's ITM and ITC logits (within 1e-5); saving scanned params writes HF's own state.
"""
import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from safetensors.numpy import load_file

from tests.convert.test_blip2_convert import _tiny_bert_dir
from tests.equivalence import blip2_hf_utils as U
from vlm.convert.hf_blip2 import init_qformer_from_bert, load_hf_blip2, save_hf_blip2
from vlm.models.blip2 import Blip2Stage1, convert_layer_layout

TOL = 1e-5


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
  model = U.tiny_hf_retrieval(seed=2)
  path = tmp_path_factory.mktemp("blip2_hf_scan")
  model.save_pretrained(path)
  return model, str(path)


def test_scanned_load_matches_hf_and_saves_hf_state(hf_dir, tmp_path):
  model, path = hf_dir
  config, params = load_hf_blip2(path, scan_layers=True)
  enc = params["qformer"]["encoder"]
  assert set(enc) == {"layers"} and set(enc["layers"]) == {"layer_0", "layer_1"}
  assert params["vision_model"]["encoder"]["layers"]["mlp"]["fc1"]["kernel"].shape == (2, 32, 40)
  pixels, ids, mask = U.inputs(seed=3)
  with torch.no_grad():
    ref = {itm: model(pixel_values=torch.from_numpy(pixels), input_ids=torch.from_numpy(ids),
                      attention_mask=torch.from_numpy(mask), use_image_text_matching_head=itm
                      ).logits_per_image.numpy() for itm in (True, False)}

  @jax.jit
  def ours(p, pixels, ids, mask):
    m = Blip2Stage1(config, scan_layers=True)
    v = {"params": p}
    emb = m.apply(v, pixels, method=Blip2Stage1.encode_image)
    itm = m.apply(v, emb, ids, mask, method=Blip2Stage1.itm_logits)
    img = m.apply(v, emb, method=Blip2Stage1.image_features)[1]
    txt = m.apply(v, ids, mask, method=Blip2Stage1.text_features)[1]
    # HF's ITC logits: max over queries of image-text cosine, not scaled by temp
    return itm, jnp.max(jnp.einsum("iqe,te->itq", img, txt), axis=-1)

  itm, itc = ours(params, U.nhwc(pixels), ids.astype(np.int32), mask.astype(np.int32))
  assert U.max_abs(itm, ref[True]) <= TOL
  assert U.max_abs(itc, ref[False]) <= TOL
  # saving the scanned tree writes the checkpoint's own tensors (HF key names, unstacked)
  save_hf_blip2(config, params, str(tmp_path))
  got, want = load_file(str(tmp_path / "model.safetensors")), load_file(
      f"{path}/model.safetensors")
  want.pop("qformer.embeddings.position_ids", None)
  assert set(got) == set(want)
  for k in want:
    np.testing.assert_array_equal(got[k], want[k], err_msg=k)


def test_bert_init_of_scanned_params_equals_stacked_unscanned(hf_dir, tmp_path):
  _, path = hf_dir
  config, params = load_hf_blip2(path)
  _tiny_bert_dir(tmp_path, lm_head=False)
  want = convert_layer_layout(init_qformer_from_bert(params, config, str(tmp_path)), config, True)
  got = init_qformer_from_bert(convert_layer_layout(params, config, True), config, str(tmp_path))
  fw, fg = flax.traverse_util.flatten_dict(want), flax.traverse_util.flatten_dict(got)
  assert fw.keys() == fg.keys()
  for k in fw:
    np.testing.assert_array_equal(np.asarray(fg[k]), np.asarray(fw[k]), err_msg="/".join(k))


def _write_stage1_checkpoint(workdir: str, params) -> None:
  """A minimal stage-1 checkpoint (params + the run config's task) in the trainer's layout."""
  import json
  import orbax.checkpoint as ocp
  with ocp.CheckpointManager(f"{workdir}/checkpoints", options=ocp.CheckpointManagerOptions(
      create=True, enable_async_checkpointing=False), item_handlers={
          "state": ocp.StandardCheckpointHandler(),
          "metadata": ocp.JsonCheckpointHandler()}) as manager:
    manager.save(1, args=ocp.args.Composite(
        state=ocp.args.StandardSave({"params": params}),
        metadata=ocp.args.JsonSave({"config": json.dumps({"task": "blip2_stage1"})})))


@pytest.mark.parametrize("stage1_scanned", [False, True])
def test_stage2_from_a_stage1_workdir_of_the_other_layout(tmp_path, stage1_scanned):
  """A stage-1 run saved in one layer layout initialises a stage-2 model in the other: every
  tower and Q-Former weight arrives, stacked or unstacked, in the stage-2 shardings."""
  from tests.tasks.test_blip2_stage2 import _stage2_config
  from vlm import models
  from vlm.parallel import mesh as mesh_lib
  from vlm.tasks import blip2_stage2
  from vlm.train.step import param_shardings_of

  s1_model = models.build("blip2_stage1", "blip2_micro", scan_layers=stage1_scanned)
  x = np.zeros((1, 32, 32, 3), np.float32), np.ones((1, 4), np.int32)
  saved = nn.unbox(s1_model.init(jax.random.PRNGKey(3), *x)["params"])
  stage1 = str(tmp_path / "stage1")
  _write_stage1_checkpoint(stage1, saved)
  c = _stage2_config("opt", stage1)
  c.model.scan_layers = not stage1_scanned
  model = blip2_stage2.build_model(c)
  batch = blip2_stage2.example_batch(c, 1)
  mesh = mesh_lib.make_mesh({"fsdp": -1})
  rules = mesh_lib.DEFAULT_RULES
  init_fn = lambda key: blip2_stage2.init_model(model, key, batch)
  with nn.logical_axis_rules(rules):
    _, shardings = param_shardings_of(init_fn, mesh, rules)
  params = jax.jit(lambda k: nn.unbox(init_fn(k)), out_shardings=shardings)(jax.random.PRNGKey(0))
  new = blip2_stage2._stage1_init(c, model, params, shardings)  # pylint: disable=protected-access
  assert jax.tree.structure(new) == jax.tree.structure(params)
  assert all(a.sharding == s for a, s in zip(jax.tree.leaves(new), jax.tree.leaves(shardings)))
  want = convert_layer_layout(jax.tree.map(np.asarray, saved), model.config, not stage1_scanned)
  fw = flax.traverse_util.flatten_dict(want)
  fn = flax.traverse_util.flatten_dict(new)
  part = [k for k in fn if k[0] in ("vision_model", "qformer", "query_tokens")]
  assert any(k[:3] == ("qformer", "encoder", "layers" if not stage1_scanned else "layer_1")
             for k in part)
  for k in part:  # every tower / Q-Former weight of the stage-2 model came from stage 1
    np.testing.assert_array_equal(np.asarray(fn[k]), fw[k], err_msg="/".join(k))
