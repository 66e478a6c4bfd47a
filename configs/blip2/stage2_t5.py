r"""BLIP-2 stage 2 with a frozen FlanT5: generative pre-training of the Q-Former bridge.

Run (CPU, real COCO photos and captions of data/coco; after stage 1, README command 1):

  python scripts/train.py --config configs/blip2/stage2_t5.py:tiny --workdir runs/blip2_stage2_t5 \
      --config.init.stage1_workdir=runs/blip2_tiny

After training it prints zero-shot captioning (CIDEr, BLEU-4) on the 159 held-out photos and
zero-shot VQA accuracy on the embedded OK-VQA questions, each beside a trivial baseline.

Variants (``:name``):
  tiny       the stage-1 tiny tower + Q-Former (16 queries) and a 4+4-layer 256-wide T5 v1.1 with the
             real 32,128-token vocabulary, first trained alone on the training captions
             (``init.llm_warmup_steps``; no pretrained FlanT5 installs offline), then frozen;
             global batch 16, 200 steps; prompt "a photo of" (encoder) -> caption (decoder).
  flant5xl   the paper (LAVIS ``pretrain_stage2``): EVA ViT-g/14 (frozen) + BERT-base Q-Former (from
  flant5xxl  stage 1) + google/flan-t5-xl or -xxl (frozen, bfloat16, exact-GELU gated FFN as
             LAVIS), batch 1520, 80k steps, AdamW(0.9, 0.98), wd 0.05, lr 1e-4 -> 5e-5 cosine,
             warmup 2k, prefix language modelling (random word-boundary split). On a pod:
               python scripts/train.py --config configs/blip2/stage2_t5.py:flant5xl \
                 --workdir gs://bucket/blip2_flant5xl --config.init.stage1_workdir=gs://bucket/blip2_stage1 \
                 --config.init.llm_checkpoint=/path/to/google/flan-t5-xl

The full variants scan (``model.scan_layers``) and rematerialise (``model.remat``) the EVA blocks,
the Q-Former layer groups and the T5 layers, so the compile does not grow with the depth.

Mesh and batch (full variants). The batch splits over ``data x fsdp``; the default mesh is
``data=-1, fsdp=8``: on the paper's 16 chips data=2 x fsdp=8, 1520 / 16 = 95 rows per chip (also
8 chips: 190). FSDP over 8 shards the frozen EVA tower and FlanT5 (flan-t5-xxl: 22 GB of bfloat16
weights, 2.8 GB per chip) and the Q-Former's AdamW state. 1520 = 2^4 * 5 * 19 splits at most 16
ways by powers of two, so on a 256-chip pod (v5p-512, v5e-256) either
  (a) ``--config.global_batch_size=1536`` (6 rows per chip) with the default mesh (data=32 x
      fsdp=8), or
  (b) keep 1520: ``--config.mesh.shape.data=2 --config.mesh.shape.tensor=16`` (data=2 x fsdp=8 x
      tensor=16: 95 rows per data-parallel shard, every matmul split 16 ways; slower than (a)).
``MESH_RECIPES`` lists these; tests/configs/test_blip2_meshes.py checks that they divide.
"""
import ml_collections

from vlm.tasks.blip2_stage2 import base_config

# (variant, devices, mesh overrides, global batch): the docstring's meshes, checked by
# tests/configs/test_blip2_meshes.py.
MESH_RECIPES = (
    ("flant5xl", 16, {}, 1520), ("flant5xxl", 16, {}, 1520), ("flant5xxl", 8, {}, 1520),
    ("flant5xxl", 256, {}, 1536), ("flant5xxl", 256, {"data": 2, "tensor": 16}, 1520),
)


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  return base_config("t5", arg or "tiny")
