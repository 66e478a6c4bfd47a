r"""Qwen3-VL stage B: joint multimodal pre-training, every parameter trains, 8,192-token rows
(caption rows mixed with the interleaved conversation data).

  python scripts/train.py --config configs/qwen3_vl/stage_b.py:tiny --workdir runs/qwen_b \
    --config.init.workdir=runs/qwen_a

Variants: tiny (CPU), 2b, 8b, 30b_a3b, 235b_a22b. On a TPU pod (every host):

  python scripts/train.py --multihost --config configs/qwen3_vl/stage_b.py:235b_a22b \
    --workdir gs://bucket/b --config.init.workdir=gs://bucket/a \
    --config.mesh.shape.fsdp=-1 --config.mesh.shape.expert=8
"""
from vlm.tasks.qwen_vl import expert_parallel, qwen_vl_config


def get_config(arg: str | None = None):
  return expert_parallel(qwen_vl_config("b", arg))  # MoE variants: routed, expert=8
