"""A checkpoint whose data-iterator state belongs to another data stream (e.g. a packed Qwen
stream resumed with another batch size) is intact: resuming refuses it with the changed config
keys and moves nothing (it is not treated as damaged, which would silently start over)."""
import os

import grain
import jax
import jax.numpy as jnp
import pytest

from vlm.data.pipeline import IteratorStateMismatchError
from vlm.train import checkpoint as ckpt


class _Stream(grain.DatasetIterator):
  def __init__(self, fingerprint):
    super().__init__()
    self.fingerprint, self.position = fingerprint, 0

  def __next__(self):
    self.position += 1
    return self.position

  def get_state(self):
    return {"position": self.position, "fingerprint": self.fingerprint}

  def set_state(self, state):
    if state["fingerprint"] != self.fingerprint:
      raise IteratorStateMismatchError(f"iterator state was saved by a different data stream "
                                       f"({state['fingerprint']} != {self.fingerprint})")
    self.position = state["position"]


def test_other_data_stream_is_refused_not_quarantined(tmp_path):
  workdir = str(tmp_path)
  state = {"w": jnp.arange(4.0)}
  manager = ckpt.make_manager(workdir, save_interval_steps=1, async_save=False)
  ckpt.save(manager, 3, state, _Stream("a"), {"config": {"global_batch_size": 4}}, force=True)
  manager.wait_until_finished()
  manager.close()

  manager = ckpt.make_manager(workdir, save_interval_steps=1, async_save=False)
  abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding),
                          state)
  with pytest.raises(ckpt.CheckpointMismatchError,
                     match=r"different data stream.*global_batch_size: 4 -> 2"):
    ckpt.restore_latest(manager, abstract, _Stream("b"), workdir=workdir,
                        config={"global_batch_size": 2})
  assert not os.path.exists(os.path.join(workdir, "checkpoints_damaged"))
  # the same stream resumes
  it = _Stream("a")
  step, restored, _ = ckpt.restore_latest(manager, abstract, it, workdir=workdir,
                                          config={"global_batch_size": 4})
  assert step == 3 and it.position == 0
  manager.close()
