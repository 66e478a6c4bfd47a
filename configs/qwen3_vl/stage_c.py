r"""Qwen3-VL stage C: long-context pre-training, every parameter trains, 32,768-token rows
(the tiny CPU variant uses 2,048-token rows).

  python scripts/train.py --config configs/qwen3_vl/stage_c.py:tiny --workdir runs/qwen_c \
    --config.init.workdir=runs/qwen_b

Variants: tiny (CPU), 2b, 8b, 30b_a3b, 235b_a22b. On a TPU pod (every host):

  python scripts/train.py --multihost --config configs/qwen3_vl/stage_c.py:8b --workdir gs://bucket/c \
    --config.init.workdir=gs://bucket/b --config.mesh.shape.fsdp=-1

Context parallelism (the full-size variants): ``mesh.shape.context = 4``. Each 32,768-token row is
split into 4 shards of 8,192 tokens (the decoder's token axis, logical ``SEQUENCE``, over the
``context`` mesh axis); attention keeps each shard's queries and all-gathers keys and values
(``vlm.nn.attention.attention(sharded=True)``), causal and packed-segment masks by global
position. Why 4: stage B trains 1,024 rows of 8,192 tokens, stage C 256 rows of 32,768; with
context=4 stage C has 1,024 row shards of 8,192 tokens, so every chip holds the same number of
tokens per step in shards of stage B's length, and the activations that fit stage B's mesh fit
here, plus the all-gathered keys and values of the layer being computed: 32,768 x kv_heads x
head_dim x 2 per row shard, 64 MiB in bfloat16 for 235B-A22B (4 x 128) and 128 MiB for 8B
(8 x 128). The batch is then split over the other axes: data x fsdp (x expert for the MoE variants, see ``expert_parallel``) = chips / 4 must divide the
256 rows (64 on 256 chips, e.g. v5p-512, with 235B-A22B's expert=8: fsdp=8). Beyond 1,024 chips
raise context to 8 (``--config.mesh.shape.context=8``): rows of 4,096-token shards. The vision
tower's patches stay whole per row (replicated over ``context``); each shard picks its tokens'
merged and DeepStack features.

Memory (``scripts/aot_compile.py``, v5p-512, 235B-A22B): with the default rules the parameters
and optimizer state are split over fsdp x expert only (64 ways: context takes 4 of the 256 chips'
factors) and the step needs 178 GiB per chip (123 GiB with 4 microbatches) of the 95 GiB HBM.
So the full-size variants also shard the parameters' ``embed`` dimension over ``context``
(ZeRO-3 over fsdp x context, gathered per layer like FSDP) and 235B-A22B accumulates 4
microbatches (one 8,192-token row shard per chip per microbatch): 76.5 GiB per chip.
tiny keeps one context shard (the CPU test runs it on
context=4 x fsdp=2: ``tests/parallel/test_context_parallel.py``).
"""
from vlm.nn import partitioning as P
from vlm.parallel.mesh import DEFAULT_RULES
from vlm.tasks.qwen_vl import expert_parallel, qwen_vl_config

CONTEXT = 4  # context-parallel shards of the full-size variants (8,192 tokens each)
# Gradient accumulation of the variants whose activations need it (one 8,192-token row shard per
# chip per microbatch, as stage B). Measured by scripts/aot_compile.py on v5p-512 (README table).
MICROBATCHES = {"235b_a22b": 4}


def get_config(arg: str | None = None):
  c = expert_parallel(qwen_vl_config("c", arg))  # MoE variants: routed, expert=8
  if c.variant != "tiny":
    c.mesh.shape.context = CONTEXT
    rules = c.mesh.rules if c.mesh.get("rules") is not None else DEFAULT_RULES
    # ZeRO over the context axis too: parameters and optimizer state split over fsdp x context.
    c.mesh.rules = [(name, ("fsdp", "context") if name == P.EMBED else axes)
                    for name, axes in rules]
    c.microbatches = MICROBATCHES.get(c.variant, 1)
  return c
