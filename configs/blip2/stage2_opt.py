r"""BLIP-2 stage 2 with a frozen OPT: generative pre-training of the Q-Former bridge.

Run (CPU, real COCO photos and captions of data/coco; after stage 1, README command 1):

  python scripts/train.py --config configs/blip2/stage2_opt.py:tiny --workdir runs/blip2_stage2 \
      --config.init.stage1_workdir=runs/blip2_tiny

Without ``--config.init.stage1_workdir`` the Q-Former starts from the all-MiniLM-L6-v2 BERT
weights instead. After training it prints zero-shot captioning (CIDEr, BLEU-4) on the 159 held-out
photos and zero-shot VQA accuracy on the embedded OK-VQA questions, each beside a trivial baseline.

Variants (``:name``):
  tiny     the stage-1 tiny tower + Q-Former (16 queries) and a 4-layer 256-wide OPT with the real
           50,272-token vocabulary. No pretrained OPT installs offline, so the OPT is first trained
           alone on the training captions (``init.llm_warmup_steps``), then frozen; global batch
           16, 200 steps; prompt "a photo of" in training and evaluation.
  opt2.7b  the paper (LAVIS ``pretrain_stage2``): EVA ViT-g/14 (frozen) + BERT-base Q-Former (from
  opt6.7b  stage 1) + facebook/opt-2.7b or opt-6.7b (frozen, bfloat16), batch 1920, 80k steps,
           AdamW(0.9, 0.98), wd 0.05, lr 1e-4 -> 5e-5 cosine, warmup 2k, no prompt. On a pod:
             python scripts/train.py --config configs/blip2/stage2_opt.py:opt2.7b \
               --workdir gs://bucket/blip2_opt27 --config.init.stage1_workdir=gs://bucket/blip2_stage1 \
               --config.init.llm_checkpoint=/path/to/facebook/opt-2.7b

The full variants scan (``model.scan_layers``) and rematerialise (``model.remat``) the EVA blocks,
the Q-Former layer groups and the OPT layers, so the compile does not grow with the depth.

Mesh and batch (full variants). The batch splits over ``data x fsdp``; the default mesh is
``data=-1, fsdp=8``: on the paper's 16 chips data=2 x fsdp=8, 1920 / 16 = 120 rows per chip (also
8 chips: 240). FSDP over 8 shards the frozen EVA tower and OPT (opt-6.7b: 13.4 GB of bfloat16
weights, 1.7 GB per chip) and the Q-Former's AdamW state. 1920 = 2^7 * 3 * 5 splits at most 128
ways by powers of two, so on a 256-chip pod (v5p-512, v5e-256) either
  (a) ``--config.global_batch_size=2048`` (8 rows per chip) with the default mesh (data=32 x
      fsdp=8), or
  (b) keep 1920: ``--config.mesh.shape.data=16 --config.mesh.shape.tensor=2`` (data=16 x fsdp=8 x
      tensor=2, 15 rows per data-parallel shard).
``MESH_RECIPES`` lists these; tests/configs/test_blip2_meshes.py checks that they divide.
"""
import ml_collections

from vlm.tasks.blip2_stage2 import base_config

# (variant, devices, mesh overrides, global batch): the docstring's meshes, checked by
# tests/configs/test_blip2_meshes.py.
MESH_RECIPES = (
    ("opt2.7b", 16, {}, 1920), ("opt6.7b", 16, {}, 1920), ("opt6.7b", 8, {}, 1920),
    ("opt6.7b", 256, {}, 2048), ("opt6.7b", 256, {"data": 16, "tensor": 2}, 1920),
)


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  return base_config("opt", arg or "tiny")
