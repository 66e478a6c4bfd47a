"""The micro BLIP-2 stage-1 config shared by the end-to-end training tests (and their subprocess
runs): the tiny recipe with the 1-block ``blip2_micro`` preset, 32-px images, batch 8, a checkpoint
every 2 steps. Every run with the same shape reuses one compiled train step (persistent cache)."""
import importlib.util
import os

_spec = importlib.util.spec_from_file_location(
    "stage1_config", os.path.join(os.path.dirname(__file__), "..", "..", "configs", "blip2",
                                  "stage1.py"))
stage1_config = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(stage1_config)


def micro_config(total_steps=4, **over):
  """``configs/blip2/stage1.py:tiny`` shrunk to the micro preset; ``over`` maps dotted keys to
  values (``{"eval.at_end": True}``)."""
  c = stage1_config.get_config("tiny")
  c.model.preset = "blip2_micro"
  c.init.bert_dir = ""
  c.data.image_size = 32
  c.total_steps = total_steps
  c.global_batch_size = 8
  c.optim.warmup_steps = 1
  c.checkpoint.every_steps = 2
  c.checkpoint.async_save = True
  c.log_every_steps = 1
  c.eval.at_end = False
  c.mesh.shape = {"data": 1, "fsdp": -1, "tensor": 1}
  return set_dotted(c, over)


def set_dotted(c, over):
  """``c`` with ``over``'s dotted keys (``{"eval.at_end": True}``) set, as ``--config.a.b=v``."""
  for k, v in over.items():
    node = c
    *parts, last = k.split(".")
    for p in parts:
      node = node[p]
    node[last] = v
  return c
