"""``--config`` file of the fake linear task (tests/train/fake_task.py) for runs of the real
``scripts/train.py`` in subprocesses (the multi-process test): ``config.task`` is the task's
module path, so nothing needs registering; override fields with ``--config.a.b=value``."""
from tests.train import fake_task


def get_config(arg=None):
  del arg
  c = fake_task.get_config(**{"init.head_bias": 0.25, "total_steps": 6,
                              "checkpoint.every_steps": 3, "eval.at_end": False})
  c.task = "tests.train.fake_task"
  return c
