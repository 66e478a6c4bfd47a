r"""Qwen3-VL stage B: joint multimodal pre-training, every parameter trains, 8,192-token rows
(caption rows mixed with the interleaved conversation data).

  python scripts/train.py --config configs/qwen3_vl/stage_b.py:tiny --workdir runs/qwen_b \
    --config.init.workdir=runs/qwen_a

Variants: tiny (CPU), 2b, 8b, 30b_a3b, 235b_a22b. On a TPU pod (every host):

  python scripts/train.py --multihost --config configs/qwen3_vl/stage_b.py:235b_a22b \
    --workdir gs://bucket/b --config.init.workdir=gs://bucket/a \
    --config.mesh.shape.fsdp=-1 --config.mesh.shape.expert=8

Memory (``scripts/aot_compile.py``, README "AOT compile" table): 1,024 rows of 8,192 tokens need
gradient accumulation. 8B on v5p-128 (fsdp=64): 290 GiB of temporaries per chip in one pass,
34.6 of 95 GiB with 16 microbatches (one row per chip per microbatch). 235B-A22B on v5p-512
(fsdp=32 x expert=8, the batch split over all 256 chips): 117 GiB of temporaries in one pass,
68.7 GiB with 4 microbatches (the most that 1,024 rows over 256 batch shards allow). On more
chips the same per-chip rows need fewer microbatches: keep ``global_batch_size / microbatches``
a multiple of the data-parallel shards (checked before compiling).
"""
from vlm.tasks.qwen_vl import expert_parallel, qwen_vl_config

# Gradient accumulation per variant (one 8,192-token row per chip per microbatch on the meshes
# above); the others keep one pass.
MICROBATCHES = {"8b": 16, "235b_a22b": 4}


def get_config(arg: str | None = None):
  c = expert_parallel(qwen_vl_config("b", arg))  # MoE variants: routed, expert=8
  c.microbatches = MICROBATCHES.get(c.variant, 1)
  return c
