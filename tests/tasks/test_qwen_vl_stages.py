"""Which parameters each Qwen-VL stage trains: after one AdamW step of the task's loss, exactly
the parameters of the stage's trainable groups changed and every frozen one is bit-identical
(frozen parameters get no gradient and no optimizer state). "Vision" includes the patch
embedding, the learned position table and the DeepStack mergers."""
import flax
import jax
import numpy as np
import optax
import pytest

from tests.tasks import test_qwen_vl_loss as L
from tests.equivalence import test_qwen3_vl as ref
from vlm.convert.hf_qwen3_vl import load_hf_qwen3_vl
from vlm.models.qwen3_vl import Qwen3VL
from vlm.tasks import qwen_vl
from vlm.train import optim, step
from vlm.train.state import TrainState


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
  path = tmp_path_factory.mktemp("hf")
  ref._hf_model(False).save_pretrained(path, safe_serialization=True)
  config, params = load_hf_qwen3_vl(str(path))
  _, batch = L._batches(config)
  return Qwen3VL(config), params, batch


def _changed(before, after):
  fb = flax.traverse_util.flatten_dict(before)
  fa = flax.traverse_util.flatten_dict(after)
  return {"/".join(k) for k in fb if not np.array_equal(np.asarray(fb[k]), np.asarray(fa[k]))}


@pytest.mark.parametrize("stage", ["a", "a_merger_only", "b", "sft"])
def test_stage_trains_exactly_its_groups(setup, stage):
  model, params, batch = setup
  mask = optim.trainable_mask(params, qwen_vl.FROZEN[stage])
  tx = optax.adamw(1e-2)
  trainable, _ = optim.partition(params, mask)
  state = TrainState(step=np.int32(0), params=params, opt_state=tx.init(trainable))
  fn = jax.jit(lambda s, b: step.train_step(s, b, jax.random.key(0), model=model, tx=tx,
                                            mask=mask, loss_fn=qwen_vl.loss_fn,
                                            loss_kwargs={"chunk_size": 16}))
  new, metrics = fn(state, batch)
  assert np.isfinite(float(metrics["loss"]))
  changed = _changed(params, new.params)
  paths = {"/".join(k) for k in flax.traverse_util.flatten_dict(params)}
  vision = {p for p in paths if p.startswith("visual/")}
  mergers = {p for p in vision if p.startswith(("visual/merger/", "visual/deepstack_merger_list"))}
  llm = paths - vision
  assert any("pos_embed" in p for p in vision) and any("patch_embed" in p for p in vision)
  assert any("deepstack_merger_list" in p for p in mergers)
  want = {"a": vision, "a_merger_only": mergers, "b": paths, "sft": paths}[stage]
  assert changed == want, (sorted(changed - want)[:5], sorted(want - changed)[:5])
  # the optimizer holds state only for the trainable parameters
  mu = flax.traverse_util.flatten_dict(new.opt_state[0].mu)
  assert {"/".join(k) for k in mu} == want
  if stage.startswith("a"):
    assert not (changed & llm)
