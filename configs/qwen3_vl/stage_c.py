r"""Qwen3-VL stage C: long-context pre-training, every parameter trains, 32,768-token rows
(the tiny CPU variant uses 2,048-token rows).

  python scripts/train.py --config configs/qwen3_vl/stage_c.py:tiny --workdir runs/qwen_c \
    --config.init.workdir=runs/qwen_b

Variants: tiny (CPU), 2b, 8b, 30b_a3b, 235b_a22b. On a TPU pod (every host):

  python scripts/train.py --multihost --config configs/qwen3_vl/stage_c.py:8b --workdir gs://bucket/c \
    --config.init.workdir=gs://bucket/b --config.mesh.shape.fsdp=-1
"""
from vlm.tasks.qwen_vl import expert_parallel, qwen_vl_config


def get_config(arg: str | None = None):
  return expert_parallel(qwen_vl_config("c", arg))  # MoE variants: routed, expert=8
