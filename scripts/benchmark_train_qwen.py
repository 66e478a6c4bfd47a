"""Qwen3-VL train-step throughput: vlm against HF PyTorch ``Qwen3VLForConditionalGeneration``.

Usage::

  python scripts/benchmark_train_qwen.py                         # defaults; minutes on 2 cores
  python scripts/benchmark_train_qwen.py --skip data --iters 3   # only the same-work comparison
  python scripts/benchmark_train_qwen.py --layers 8 --hidden 512 --batch_size 16 --json /tmp/q.json
  python scripts/benchmark_train_qwen.py --real_vocab            # vocab 151936, no id remapping
  python scripts/benchmark_train_qwen.py --hf_batch_size 8       # HF user batches of 8 samples

One process, one random Qwen3-VL, the same weights on both sides: HF builds the model from its own
random init (``torch.manual_seed``), ``save_pretrained`` to a temp dir, and vlm loads that
directory with :func:`vlm.convert.hf_qwen3_vl.load_hf_qwen3_vl`. Both sides run float32. HF's
attention implementation is ``--hf_attn`` (default ``sdpa``, what ``from_pretrained`` picks on a
CPU; ``eager`` also works; the printed settings say which one the model actually holds). Default
size: text 4 layers x 256 (4 heads of 64, 2 KV heads, MLP 768, untied head), vocab 8192, ViT
2 blocks x 128 (2 heads, MLP 512, patch 16, DeepStack after blocks 0 and 1).

A train step is the full thing on both sides: forward, backward and an AdamW update of every
parameter (nothing frozen, stage B / SFT); HF in ``train()`` mode with ``use_cache=False`` (no KV
cache is written in training; dropout is 0 in Qwen3-VL). vlm: :func:`vlm.train.step.train_step`
(bound with ``functools.partial``, ``jax.jit`` with the state donated) with
:func:`vlm.tasks.qwen_vl.loss_fn` (chunked next-token loss from the hidden states) and
``optax.adamw``. HF: ``model(**inputs,
labels=labels).loss.backward()``, ``torch.optim.AdamW.step()``, ``zero_grad(set_to_none=True)``.
Same hyper-parameters (``--lr``, betas, eps, weight decay on every parameter, constant rate).

1. **Same work** (``same``): one right-padded batch of ``--batch_size`` rows of ``--seq_len``
   token slots; each row holds text, one image of ``--image_grid`` x ``--image_grid`` patches
   (one vision block of ``grid^2 / 4`` placeholders) and more text, row 0 full and the others
   shorter (padding); labels on every real text token (not the vision tokens, not padding). vlm
   gets the same rows in the training batch schema (``vlm/data/packing.py``: one segment per
   row, per-row patch buffer of exactly the image's patches, so the ViT does the same work as
   HF's per-image attention). Both sides compute every slot, padding included.
   Printed: tokens/s (B * L slots per step) for both, the ratio, the model FLOPs per step, and
   the achieved FLOP/s as a fraction of the float32 matmul peak measured in the same run
   (jitted ``jnp.dot`` of two 2048^2 matrices; torch's ``torch.mm`` peak is printed too).

   Model FLOPs per step (forward + backward = 3 x forward; the optimizer update is not counted)::

     text   6 * N_text * B * L  +  12 * layers * H * hd * B * L^2
     ViT    6 * N_patch * P  +  6 * N_merge * (P / 4)  +  12 * depth * H_v * hd_v * sum_i P_i^2

   ``N_text``: the decoder's matmul weights (q, k, v, o, gate, up, down of every layer) plus the
   LM head (V x D); the token embedding is a gather and is not counted. ``N_patch``: the patch
   embedding (F x D_v) plus the ViT blocks' qkv, proj, fc1, fc2; ``N_merge``: the merger and the
   DeepStack mergers (each runs on the P/4 merged tokens). ``P = sum_i P_i`` patches of the
   batch. Attention is counted as the full L x L (resp. P_i x P_i) square on both sides, which is
   what dense masked attention computes (a causal kernel that skips the upper triangle does
   half). XLA's own count of the compiled vlm step (``cost_analysis``) is printed beside it.

2. **Less work** (``data``): tokens of real data per second on the embedded data
   (:func:`vlm.data.config.default_qwen_data_config` sources: COCO captions as chat turns, OK-VQA,
   the demo conversations and ActivityNet video QA; the real Qwen3 tokenizer and processor):
   vlm packs samples into ``--data_rows`` rows of ``--data_max_length`` tokens
   (:func:`vlm.data.qwen_batch.build_qwen_train_loader`, segment ids, per-sample MRoPE); HF gets
   the *same samples* of each packed batch as an HF user batches them: each sample its own row,
   right-padded to the longest sample of its batch, images and videos as ``pixel_values`` /
   ``pixel_values_videos`` with their grids. ``--hf_batch_size 0`` (default) puts all the samples
   of a packed batch in one HF batch (the same samples per optimizer step on both sides); N > 0
   splits them into HF batches of N samples (more, smaller optimizer steps). The same number of
   real tokens is processed on both sides; the data pipeline runs before the timing (its own
   host throughput is printed apart). Token ids: with the default small vocab the real ids are
   mapped into it (text id ``i`` -> ``i mod (V - 64)``, the Qwen special tokens 151643.. ->
   ``V - 64 ..``, on both sides alike; a model cost question, not a language-model one);
   ``--real_vocab`` uses the real vocabulary (151936) and the ids as they are, in both parts.
   Cross-check: vlm's loss on the first packed batch equals the token-weighted mean of HF's
   losses on the same samples (fresh weights).

3. Threads: XLA's CPU client runs its intra-op pool over every core visible to the process;
   ``--torch_threads`` (default: that same count) sets ``torch.set_num_threads``. Timings
   alternate vlm and HF call by call after a pause (``bench_common.timeit_interleaved``), so a
   change of load on a shared machine hits both alike; they are still noisy there.

This is a benchmark, not a test: pytest never runs it, and nothing asserts a timing. torch and
transformers are imported only here (test dependencies of vlm).
"""
from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import os
import platform
import sys
import tempfile
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import numpy as np  # noqa: E402

from bench_common import (cpu_model, jax_matmul_peak, timeit_interleaved,  # noqa: E402
                          torch_matmul_peak, xla_flops)

SETTLE_S = 0.3  # pause before each timed call (bench_common.timeit_interleaved)
REAL_VOCAB = 151936
# Qwen3 special tokens (vlm/assets/tokenizers/qwen3/tokenizer.json): <|endoftext|> is the first
# and the pad token; the vision tokens sit a few ids above it.
SPECIAL_BASE = 151643
SPECIAL_SLOTS = 64
PAD, VS, VE, IMG, VID = 151643, 151652, 151653, 151655, 151656


def _csv_ints(s: str) -> list[int]:
  return [int(x) for x in s.split(",") if x.strip()]


def _kv(items: list[str]) -> dict:
  out = {}
  for it in items:
    if "=" not in it:
      raise SystemExit(f"override {it!r} is not key=value")
    k, v = it.split("=", 1)
    try:
      out[k] = json.loads(v)
    except json.JSONDecodeError:
      out[k] = v
  return out


def parse_args(argv=None):
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                              formatter_class=argparse.RawDescriptionHelpFormatter)
  g = p.add_argument_group("model (random Qwen3-VL, same weights on both sides)")
  g.add_argument("--layers", type=int, default=4)
  g.add_argument("--hidden", type=int, default=256)
  g.add_argument("--intermediate", type=int, default=768)
  g.add_argument("--heads", type=int, default=4)
  g.add_argument("--kv_heads", type=int, default=2)
  g.add_argument("--head_dim", type=int, default=64)
  g.add_argument("--vocab", type=int, default=8192, help="ignored with --real_vocab")
  g.add_argument("--real_vocab", action="store_true",
                 help=f"vocab {REAL_VOCAB} and the real token ids (no remapping)")
  g.add_argument("--tie_embeddings", action="store_true")
  g.add_argument("--vit_depth", type=int, default=2)
  g.add_argument("--vit_hidden", type=int, default=128)
  g.add_argument("--vit_heads", type=int, default=2)
  g.add_argument("--vit_intermediate", type=int, default=512)
  g.add_argument("--vit_positions", type=int, default=2304, help="learned position table (G^2)")
  g.add_argument("--deepstack", default="0,1", help="ViT block indexes feeding DeepStack")
  g.add_argument("--scan_layers", action="store_true", help="vlm: scanned decoder layers")
  g.add_argument("--remat", action="store_true", help="vlm: rematerialise decoder layers")
  g.add_argument("--text_override", action="append", default=[], metavar="KEY=VALUE",
                 help="vlm Qwen3TextConfig field to replace (repeatable; JSON values)")
  g.add_argument("--hf_attn", default="sdpa", choices=("sdpa", "eager"))
  g = p.add_argument_group("optimizer (both sides)")
  g.add_argument("--lr", type=float, default=1e-4)
  g.add_argument("--b1", type=float, default=0.9)
  g.add_argument("--b2", type=float, default=0.95)
  g.add_argument("--eps", type=float, default=1e-8)
  g.add_argument("--weight_decay", type=float, default=0.1)
  g.add_argument("--torch_adamw", default="default", choices=("default", "foreach", "fused"),
                 help="torch.optim.AdamW implementation (default: torch's choice)")
  g.add_argument("--chunk_size", type=int, default=512, help="vlm loss chunk (tokens)")
  g = p.add_argument_group("1. same work: padded batch")
  g.add_argument("--batch_size", type=int, default=8)
  g.add_argument("--seq_len", type=int, default=256)
  g.add_argument("--image_grid", type=int, default=16,
                 help="patches per side of each row's image (even; grid 1 x g x g)")
  g = p.add_argument_group("2. less work: real data, vlm packed vs HF padded")
  g.add_argument("--data_rows", type=int, default=4, help="vlm packed rows per batch")
  g.add_argument("--data_max_length", type=int, default=512)
  g.add_argument("--data_max_patches", type=int, default=768)
  g.add_argument("--data_batches", type=int, default=1,
                 help="packed batches per timed call (distinct data)")
  g.add_argument("--hf_batch_size", type=int, default=0,
                 help="HF samples per batch (0: all samples of a packed batch in one batch)")
  g.add_argument("--data_threads", type=int, default=2, help="loader encoding threads")
  g = p.add_argument_group("timing")
  g.add_argument("--iters", type=int, default=3, help="timed calls per side (median reported)")
  g.add_argument("--warmup", type=int, default=0,
                 help="untimed calls per side after the cross-check calls (which warm up already)")
  g.add_argument("--torch_threads", type=int, default=None,
                 help="torch.set_num_threads (default: the cores XLA uses)")
  g.add_argument("--skip", default="", help="comma list of parts to skip: same,data")
  g.add_argument("--seed", type=int, default=0)
  g.add_argument("--json", default=None, help="also write every number to this JSON file")
  args = p.parse_args(argv)
  if args.image_grid % 2 or args.image_grid < 2:
    p.error("--image_grid must be a positive even number (2x2 merge)")
  vision_tokens = args.image_grid ** 2 // 4 + 2
  if args.seq_len < vision_tokens + 8:
    p.error(f"--seq_len must hold the vision block ({vision_tokens} tokens) and some text")
  vit_hd = args.vit_hidden // args.vit_heads
  if args.head_dim % 4 or args.vit_hidden % args.vit_heads or vit_hd % 4:
    p.error("head dims must be multiples of 4 (MRoPE / 2-D vision RoPE)")
  if args.iters < 1:
    p.error("--iters must be >= 1")
  args.vocab = REAL_VOCAB if args.real_vocab else args.vocab
  if not args.real_vocab and args.vocab < 2 * SPECIAL_SLOTS:
    p.error(f"--vocab must be >= {2 * SPECIAL_SLOTS}")
  return args


class IdMap:
  """Real Qwen3 token ids -> the benchmark vocabulary (identity with the real vocabulary).

  Text ids ``i < 151643`` -> ``i mod (V - 64)``; special ids ``151643 + j`` -> ``V - 64 + j``.
  """

  def __init__(self, vocab: int, real: bool):
    self.vocab, self.real = vocab, real

  def __call__(self, ids):
    ids = np.asarray(ids)
    if self.real:
      return ids
    j = ids - SPECIAL_BASE
    if (j >= SPECIAL_SLOTS).any():
      raise ValueError(f"token id {int(ids.max())} beyond the {SPECIAL_SLOTS} special slots")
    base = self.vocab - SPECIAL_SLOTS
    return np.where(j >= 0, base + j, ids % base).astype(ids.dtype)


def hf_config(args, idmap):
  import transformers
  s = args.head_dim // 2
  hw = int(round(s * 20 / 64))
  text = dict(vocab_size=args.vocab, hidden_size=args.hidden, intermediate_size=args.intermediate,
              num_hidden_layers=args.layers, num_attention_heads=args.heads,
              num_key_value_heads=args.kv_heads, head_dim=args.head_dim, hidden_act="silu",
              rms_norm_eps=1e-6, rope_theta=5_000_000.0, max_position_embeddings=32768,
              attention_bias=False, tie_word_embeddings=args.tie_embeddings,
              rope_scaling={"rope_type": "default", "mrope_section": [s - 2 * hw, hw, hw],
                            "mrope_interleaved": True})
  vision = dict(depth=args.vit_depth, hidden_size=args.vit_hidden, num_heads=args.vit_heads,
                intermediate_size=args.vit_intermediate, out_hidden_size=args.hidden,
                patch_size=16, temporal_patch_size=2, spatial_merge_size=2, in_channels=3,
                num_position_embeddings=args.vit_positions, hidden_act="gelu_pytorch_tanh",
                deepstack_visual_indexes=_csv_ints(args.deepstack))
  ids = {k: int(idmap(np.array(v))) for k, v in (("image_token_id", IMG),
                                                 ("video_token_id", VID),
                                                 ("vision_start_token_id", VS),
                                                 ("vision_end_token_id", VE))}
  cfg = transformers.Qwen3VLConfig(text_config=text, vision_config=vision,
                                   tie_word_embeddings=args.tie_embeddings, **ids)
  cfg._attn_implementation = args.hf_attn  # pylint: disable=protected-access
  return cfg


# ----------------------------------------------------------------------------------------------
# FLOPs


def matmul_params(params) -> dict:
  """Matmul weight counts of a vlm Qwen3-VL param tree: ``text`` (decoder + LM head), ``patch``
  (patch embedding + ViT blocks, per patch), ``merge`` (merger + DeepStack mergers, per merged
  token). Embedding tables, norms and biases are not matmuls."""
  import flax
  out = {"text": 0, "patch": 0, "merge": 0}
  for path, v in flax.traverse_util.flatten_dict(params).items():
    name = "/".join(str(p) for p in path)
    if path[-1] != "kernel":
      continue
    n = int(np.prod(v.shape))
    if name.startswith("visual/merger/") or name.startswith("visual/deepstack_merger_list"):
      out["merge"] += n
    elif name.startswith("visual/"):
      out["patch"] += n
    else:
      out["text"] += n
  if not params.get("lm_head"):  # tied head: the embedding table is the head's matmul
    out["text"] += int(np.prod(params["language_model"]["embed_tokens"]["embedding"].shape))
  return out


def model_flops(config, counts, text_rows: list[int], image_patches: list[int]) -> dict:
  """Forward + backward FLOPs (formula in the module docstring) for rows of the given token
  lengths (``B`` rows of ``L`` slots: ``[L] * B``) and images of the given patch counts."""
  t, v = config.text, config.vision
  tokens = float(sum(text_rows))
  text_mm = 6.0 * counts["text"] * tokens
  text_att = 12.0 * t.num_hidden_layers * t.num_attention_heads * t.head_dim * float(
      sum(n * n for n in text_rows))
  p = float(sum(image_patches))
  vit_mm = 6.0 * counts["patch"] * p + 6.0 * counts["merge"] * p / 4
  vit_att = 12.0 * v.depth * v.num_heads * v.head_dim * float(sum(n * n for n in image_patches))
  return {"text_matmul": text_mm, "text_attention": text_att, "vit_matmul": vit_mm,
          "vit_attention": vit_att, "total": text_mm + text_att + vit_mm + vit_att}


# ----------------------------------------------------------------------------------------------
# Batches


def same_work_batch(args, config, idmap):
  """Right-padded rows with one image each: (HF inputs as torch tensors, vlm batch as numpy)."""
  import torch
  from vlm.models.qwen3_vl import visual_token_index
  from vlm.models.qwen_vit import vision_inputs
  from vlm.models.rope_index import qwen3_vl_get_rope_index
  rng = np.random.default_rng(args.seed)
  b, n, g = args.batch_size, args.seq_len, args.image_grid
  img, vs, ve, pad = (int(idmap(np.array(x))) for x in (IMG, VS, VE, PAD))
  text_hi = args.vocab - SPECIAL_SLOTS if not args.real_vocab else SPECIAL_BASE
  n_vis = g * g // 4
  ids = np.full((b, n), pad, np.int64)
  mask = np.zeros((b, n), np.int64)
  for i in range(b):
    length = n if i == 0 else int(rng.integers(max(n_vis + 8, 3 * n // 4), n + 1))
    pre = int(rng.integers(1, 8))
    row = list(rng.integers(1, text_hi, size=pre)) + [vs] + [img] * n_vis + [ve]
    row += list(rng.integers(1, text_hi, size=length - len(row)))
    ids[i, :length], mask[i, :length] = row, 1
  text_tok = mask.astype(bool) & ~np.isin(ids, [img, vs, ve])
  hf_labels = np.where(text_tok, ids, -100)
  grids = np.tile(np.array([[1, g, g]]), (b, 1))
  f = config.vision.patch_dim
  pixels = rng.standard_normal((b, g * g, f)).astype(np.float32)
  hf = dict(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask),
            pixel_values=torch.tensor(pixels.reshape(b * g * g, f)),
            image_grid_thw=torch.tensor(grids), labels=torch.tensor(hf_labels), use_cache=False)
  pos, _ = qwen3_vl_get_rope_index(ids, grids, None, mask, 2, img, int(idmap(np.array(VID))), vs)
  tables = [vision_inputs(config.vision, grids[i:i + 1], max_patches=g * g) for i in range(b)]
  labels = np.zeros((b, n), np.int32)
  labels[:, :-1] = ids[:, 1:]
  loss_mask = np.zeros((b, n), np.float32)
  loss_mask[:, :-1] = text_tok[:, 1:]
  batch = {"input_ids": ids.astype(np.int32), "segment_ids": mask.astype(np.int32),
           "position_ids": np.where(mask[None].astype(bool), pos, 0).astype(np.int32),
           "labels": (labels * (loss_mask > 0)).astype(np.int32), "loss_mask": loss_mask,
           "pixel_values": pixels,
           "vision": {k: np.stack([t[k] for t in tables]) for k in tables[0]},
           "visual_token_index": np.concatenate(
               [visual_token_index(ids[i:i + 1], img, -1) for i in range(b)]).astype(np.int32)}
  return hf, batch, [g * g] * b


def hf_padded_batch(items, idmap, pad_id: int):
  """HF inputs for ``items`` = [(Sample, TokenizedSample)]: one right-padded row per sample."""
  import torch
  n = max(ts.num_tokens for _, ts in items)
  b = len(items)
  ids = np.full((b, n), idmap(np.array(pad_id)), np.int64)
  mask = np.zeros((b, n), np.int64)
  labels = np.full((b, n), -100, np.int64)
  img_px, img_g, vid_px, vid_g = [], [], [], []
  for i, (sample, ts) in enumerate(items):
    k = ts.num_tokens
    mapped = idmap(ts.input_ids.astype(np.int64))
    ids[i, :k], mask[i, :k] = mapped, 1
    labels[i, :k] = np.where(ts.target_mask > 0, mapped, -100)
    n_img = len(sample.images)
    sizes = np.prod(ts.grid_thw, axis=1).astype(int) if len(ts.grid_thw) else np.zeros(0, int)
    cut = int(sizes[:n_img].sum())
    if n_img:
      img_px.append(ts.pixel_values[:cut])
      img_g.append(ts.grid_thw[:n_img])
    if len(ts.grid_thw) > n_img:
      vid_px.append(ts.pixel_values[cut:])
      vid_g.append(ts.grid_thw[n_img:])
  out = dict(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask),
             labels=torch.tensor(labels), use_cache=False)
  if img_px:
    out.update(pixel_values=torch.tensor(np.concatenate(img_px)),
               image_grid_thw=torch.tensor(np.concatenate(img_g)))
  if vid_px:
    out.update(pixel_values_videos=torch.tensor(np.concatenate(vid_px)),
               video_grid_thw=torch.tensor(np.concatenate(vid_g)))
  return out


def real_data(args, config, idmap):
  """Packed batches from the embedded data and, per batch, its samples re-encoded.

  Returns ``(packed batches (ids mapped), [[(Sample, TokenizedSample)] per batch], info)``.
  """
  from vlm.data import qwen_batch
  from vlm.data.config import default_qwen_data_config
  from vlm.data.image import BadSampleError
  d = default_qwen_data_config()
  d.max_length = args.data_max_length
  d.max_patches = args.data_max_patches
  d.num_threads = args.data_threads
  # the data pipeline needs the real token ids; only the model's vocabulary differs
  loader_cfg = dataclasses.replace(
      config, text=dataclasses.replace(config.text, vocab_size=REAL_VOCAB), image_token_id=IMG,
      video_token_id=VID, vision_start_token_id=VS, vision_end_token_id=VE)
  t0 = time.perf_counter()
  loader = qwen_batch.build_qwen_train_loader(d, loader_cfg, global_batch_size=args.data_rows,
                                              seed=args.seed)
  build_s = time.perf_counter() - t0
  it = iter(loader)
  batches, groups, pull_s = [], [], 0.0
  for _ in range(args.data_batches):
    s0 = it.get_state()
    t0 = time.perf_counter()
    batch = next(it)
    pull_s += time.perf_counter() - t0
    s1 = it.get_state()
    used = sorted((set(s0["pending"]) | set(range(s0["next"], s1["next"]))) - set(s1["pending"]))
    items = []
    for k in used:
      sample = loader.sample_at(k)
      try:
        items.append((sample, loader.encoder.encode(sample)))
      except BadSampleError:  # skipped while streaming: not in the batch either
        continue
    real = int((batch["segment_ids"] > 0).sum())
    got = sum(ts.num_tokens for _, ts in items)
    if got != real:
      raise RuntimeError(f"re-encoded samples hold {got} tokens but the packed batch {real}; the "
                         "loader's stream positions were not recovered")
    batch = dict(batch, input_ids=idmap(batch["input_ids"]), labels=idmap(batch["labels"]))
    batches.append(batch)
    groups.append(items)
  real = sum(int((b["segment_ids"] > 0).sum()) for b in batches)
  info = {"build_s": build_s, "loader_stats": {k: v for k, v in loader.loader_stats.items()
                                               if k != "examples"},
          "pipeline_tokens_per_s": real / pull_s if pull_s else None,
          "samples": sum(len(g) for g in groups), "real_tokens": real,
          "videos": sum(len(s.videos) for g in groups for s, _ in g),
          "images": sum(len(s.images) for g in groups for s, _ in g),
          "pad_token_id": loader.encoder.tokenizer.pad_token_id}
  return batches, groups, info


# ----------------------------------------------------------------------------------------------


def main(argv=None):
  args = parse_args(argv)
  skip = {s for s in args.skip.split(",") if s}
  import jax
  import flax
  import jax.numpy as jnp
  import optax
  import torch
  import transformers

  from vlm.convert.hf_qwen3_vl import load_hf_qwen3_vl
  from vlm.models.qwen3_vl import Qwen3VL
  from vlm.tasks import qwen_vl
  from vlm.train import optim
  from vlm.train.state import TrainState
  from vlm.train.step import train_step

  cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
  torch.set_num_threads(args.torch_threads or cores)
  idmap = IdMap(args.vocab, args.real_vocab)
  env = {
      "python": platform.python_version(), "jax": jax.__version__, "flax": flax.__version__,
      "optax": optax.__version__, "torch": torch.__version__,
      "transformers": transformers.__version__, "numpy": np.__version__,
      "jax_backend": jax.default_backend(), "jax_devices": [str(d) for d in jax.devices()],
      "cpu": cpu_model(), "os_cpu_count": os.cpu_count(), "cores_visible (XLA pool)": cores,
      "torch_num_threads": torch.get_num_threads(),
      "torch_num_interop_threads": torch.get_num_interop_threads(),
      "XLA_FLAGS": os.environ.get("XLA_FLAGS", ""),
      "jax_matmul_precision": str(jax.config.jax_default_matmul_precision),
      "load_average": os.getloadavg() if hasattr(os, "getloadavg") else None,
  }
  print("== settings")
  for k, v in env.items():
    print(f"  {k:26s} {v}")

  # ---- same weights on both sides ---------------------------------------------------------------
  torch.manual_seed(args.seed)
  hf = transformers.Qwen3VLForConditionalGeneration(hf_config(args, idmap)).train()
  with tempfile.TemporaryDirectory() as tmp:
    hf.save_pretrained(tmp, safe_serialization=True)
    config, params_np = load_hf_qwen3_vl(tmp, scan_layers=args.scan_layers)
  if args.text_override:
    config = dataclasses.replace(config, text=dataclasses.replace(config.text,
                                                                  **_kv(args.text_override)))
  init_sd = {k: v.detach().clone() for k, v in hf.state_dict().items()}
  params_host = jax.device_get(params_np)
  counts = matmul_params(params_host)  # stacked (scanned) kernels include the layer axis
  n_params = sum(int(np.prod(x.shape)) for x in jax.tree_util.tree_leaves(params_host))
  n_hf = sum(p.numel() for p in hf.parameters())
  # pylint: disable=protected-access
  attn = {"vision": hf.model.visual.config._attn_implementation,
          "text": hf.model.language_model.config._attn_implementation}
  # pylint: enable=protected-access
  t, v = config.text, config.vision
  print(f"\n== model: text {t.num_hidden_layers} x {t.hidden_size} ({t.num_attention_heads} heads "
        f"x {t.head_dim}, {t.num_key_value_heads} KV, MLP {t.intermediate_size}, vocab "
        f"{t.vocab_size}{', tied' if t.tie_word_embeddings else ''}), ViT {v.depth} x "
        f"{v.hidden_size} ({v.num_heads} heads, MLP {v.intermediate_size}, patch {v.patch_size}, "
        f"DeepStack {list(v.deepstack_visual_indexes)}); params vlm {n_params:,} / HF {n_hf:,}; "
        f"matmul weights text {counts['text']:,}, ViT per patch {counts['patch']:,}, mergers "
        f"{counts['merge']:,}")
  print(f"  float32 both sides; HF attention {attn}; vlm scan_layers={args.scan_layers} "
        f"remat={args.remat}; ids {'real' if args.real_vocab else 'mapped into the vocab'}; "
        f"AdamW lr {args.lr} b=({args.b1}, {args.b2}) eps {args.eps} wd {args.weight_decay} "
        f"(torch {args.torch_adamw})")

  model = Qwen3VL(config, scan_layers=args.scan_layers, remat=args.remat)
  tx = optax.adamw(args.lr, b1=args.b1, b2=args.b2, eps=args.eps, weight_decay=args.weight_decay)
  mask = optim.trainable_mask(params_host, [])
  step_fn = jax.jit(functools.partial(train_step, model=model, tx=tx, mask=mask,
                                      loss_fn=qwen_vl.loss_fn,
                                      loss_kwargs={"chunk_size": args.chunk_size}),
                    donate_argnums=(0,))
  rng = jax.random.PRNGKey(args.seed)

  def fresh_vlm_state():
    params = jax.tree_util.tree_map(jnp.asarray, params_host)
    trainable, _ = optim.partition(params, mask)
    return TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(trainable))

  def fresh_hf_optimizer():
    hf.load_state_dict(init_sd)
    hf.zero_grad(set_to_none=True)
    kw = {"foreach": True} if args.torch_adamw == "foreach" else (
        {"fused": True} if args.torch_adamw == "fused" else {})
    return torch.optim.AdamW(hf.parameters(), lr=args.lr, betas=(args.b1, args.b2), eps=args.eps,
                             weight_decay=args.weight_decay, **kw)

  def compile_step(state, batch):
    t0 = time.perf_counter()
    compiled = step_fn.lower(state, batch, rng).compile()
    return compiled, time.perf_counter() - t0, xla_flops(compiled)

  results = {"env": env, "args": vars(args), "hf_attention": attn, "matmul_params": counts,
             "params": {"vlm": n_params, "hf": n_hf}}

  # ---- matmul peak ------------------------------------------------------------------------------
  pk = jax_matmul_peak(2048, "float32", iters=max(3, args.iters), settle_s=SETTLE_S)
  pk_t = torch_matmul_peak(2048, iters=max(3, args.iters), settle_s=SETTLE_S)
  peak = pk["flops_per_s"]
  print(f"\n== matmul peak float32 (2048^3): jnp.dot {peak / 1e9:.1f} GFLOP/s, torch.mm "
        f"{pk_t['flops_per_s'] / 1e9:.1f} GFLOP/s ({torch.get_num_threads()} threads)")
  results["matmul_peak"] = {"jax": pk, "torch": pk_t}
  rows = []

  def record(name, t):
    print(f"  {name:22s} {t['median_s'] * 1e3:9.1f} ms  "
          f"[{', '.join(f'{x * 1e3:.0f}' for x in t['times_s'])}]", flush=True)

  # ---- 1. same work -----------------------------------------------------------------------------
  if "same" not in skip:
    hf_in, batch_np, patches = same_work_batch(args, config, idmap)
    b, n = args.batch_size, args.seq_len
    batch = jax.device_put(jax.tree_util.tree_map(jnp.asarray, batch_np))
    holder = {"state": fresh_vlm_state()}
    compiled, compile_s, xflops = compile_step(holder["state"], batch)
    opt = fresh_hf_optimizer()
    flops = model_flops(config, counts, [n] * b, patches)

    def vlm_call(_=None):
      holder["state"], m = compiled(holder["state"], batch, rng)
      jax.block_until_ready(holder["state"])
      return m

    def hf_call(_=None, check=False):
      out = hf(**hf_in)
      out.loss.backward()
      gnorm = (torch.sqrt(sum((p.grad.double() ** 2).sum() for p in hf.parameters()
                              if p.grad is not None)).item() if check else None)
      opt.step()
      opt.zero_grad(set_to_none=True)
      return float(out.loss.detach()), gnorm

    # cross-check: the first two steps (fresh weights, then after one AdamW update)
    mv = [jax.device_get(vlm_call()) for _ in range(2)]
    mh = [hf_call(check=True) for _ in range(2)]
    check = {"loss_step0": (float(mv[0]["loss"]), mh[0][0]),
             "loss_step1": (float(mv[1]["loss"]), mh[1][0]),
             "grad_norm_step0": (float(mv[0]["grad_norm"]), mh[0][1])}
    n_real = int(batch_np["segment_ids"].sum())
    print(f"\n== 1. same work: B={b} rows x L={n} slots (row 0 full, {n_real} real tokens), "
          f"one {args.image_grid}x{args.image_grid}-patch image per row ({sum(patches)} patches), "
          f"{int(batch_np['loss_mask'].sum())} loss tokens; vlm compile "
          f"{compile_s:.1f}s")
    for k, (a, c) in check.items():
      print(f"  {k:18s} vlm {a:.6f}  HF {c:.6f}  |diff| {abs(a - c):.2e}")
    if abs(check["loss_step0"][0] - check["loss_step0"][1]) > 1e-3:
      print("  WARNING: the losses differ; the timings may not compare the same computation")
    print(f"  timing ({args.warmup} warm-up, median of {args.iters}, calls alternate)")
    tm = timeit_interleaved({"vlm/train_step": (vlm_call, None), "hf/train_step": (hf_call, None)},
                            args.iters, args.warmup, SETTLE_S)
    for k, tt in tm.items():
      record(k, tt)
    tv, th = tm["vlm/train_step"]["median_s"], tm["hf/train_step"]["median_s"]
    row = {"part": "same work", "tokens_per_step": b * n, "vlm_s": tv, "hf_s": th,
           "vlm_tok_s": b * n / tv, "hf_tok_s": b * n / th, "ratio": th / tv,
           "model_flops": flops["total"], "xla_flops": xflops,
           "vlm_frac_peak": flops["total"] / tv / peak, "hf_frac_peak": flops["total"] / th / peak,
           "hf_frac_torch_peak": flops["total"] / th / pk_t["flops_per_s"]}
    rows.append(row)
    results["same_work"] = {"flops": flops, "check": check, "timings": tm, "compile_s": compile_s,
                            **row}
    print(f"  model FLOPs/step {flops['total'] / 1e9:.2f} G (text matmul "
          f"{flops['text_matmul'] / 1e9:.2f}, text attention {flops['text_attention'] / 1e9:.2f}, "
          f"ViT matmul {flops['vit_matmul'] / 1e9:.2f}, ViT attention "
          f"{flops['vit_attention'] / 1e9:.2f}); XLA cost_analysis of the vlm step "
          f"{(xflops or 0) / 1e9:.2f} G")
    del holder, compiled

  # ---- 2. less work: real data ------------------------------------------------------------------
  if "data" not in skip:
    batches_np, groups, info = real_data(args, config, idmap)
    hb = args.hf_batch_size
    hf_batches = [[hf_padded_batch(g[i:i + (hb or len(g))], idmap, info["pad_token_id"])
                   for i in range(0, len(g), hb or len(g))] for g in groups]
    flat_hf = [x for g in hf_batches for x in g]
    real = info["real_tokens"]
    hf_slots = sum(int(np.prod(x["input_ids"].shape)) for x in flat_hf)
    vlm_slots = sum(int(np.prod(x["input_ids"].shape)) for x in batches_np)
    hf_patches = sum(int(x["pixel_values"].shape[0]) if "pixel_values" in x else 0 for x in flat_hf)
    hf_patches += sum(int(x["pixel_values_videos"].shape[0]) if "pixel_values_videos" in x else 0
                      for x in flat_hf)
    vlm_patch_slots = sum(int(np.prod(x["pixel_values"].shape[:2])) for x in batches_np)
    batches = [jax.device_put(jax.tree_util.tree_map(jnp.asarray, x)) for x in batches_np]
    holder = {"state": fresh_vlm_state()}
    compiled, compile_s, _ = compile_step(holder["state"], batches[0])
    opt = fresh_hf_optimizer()

    # cross-check on fresh weights: HF forward losses of the first packed batch's samples
    with torch.no_grad():
      hl = [(float(hf(**x).loss), int((x["labels"][:, 1:] != -100).sum())) for x in hf_batches[0]]
    hf_loss0 = sum(l * w for l, w in hl) / sum(w for _, w in hl)

    def vlm_call(_=None):
      m = None
      for x in batches:
        holder["state"], m = compiled(holder["state"], x, rng)
      jax.block_until_ready(holder["state"])
      return m

    def hf_call(_=None):
      for x in flat_hf:
        out = hf(**x)
        out.loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    holder["state"], m0 = compiled(holder["state"], batches[0], rng)
    vlm_loss0 = float(m0["loss"])
    print(f"\n== 2. less work: real data ({info['samples']} samples: {info['images']} images, "
          f"{info['videos']} videos; {real} real tokens in {len(batches)} packed batches)")
    print(f"  loader: build {info['build_s']:.1f}s, stats {info['loader_stats']}; pipeline "
          f"(encode + pack, {args.data_threads} threads) {info['pipeline_tokens_per_s']:.0f} "
          f"real tokens/s")
    print(f"  vlm: {len(batches)} steps of {args.data_rows} packed rows x {args.data_max_length} "
          f"tokens ({vlm_slots} token slots, {100 * real / vlm_slots:.1f}% real; patch buffer "
          f"{vlm_patch_slots} slots, {100 * hf_patches / vlm_patch_slots:.1f}% real); compile "
          f"{compile_s:.1f}s")
    print(f"  HF:  {len(flat_hf)} steps of padded batches "
          f"({'all samples of a packed batch' if not hb else f'{hb} samples'} each; shapes "
          f"{[tuple(x['input_ids'].shape) for x in flat_hf]}; {hf_slots} token slots, "
          f"{100 * real / hf_slots:.1f}% real; {hf_patches} patches)")
    print(f"  loss on the first packed batch, fresh weights: vlm {vlm_loss0:.6f}  HF (token-"
          f"weighted over its batches) {hf_loss0:.6f}  |diff| {abs(vlm_loss0 - hf_loss0):.2e}")
    print(f"  timing ({args.warmup} warm-up, median of {args.iters}; one call = all "
          f"{len(batches)} packed batches / all {len(flat_hf)} HF batches)")
    tm = timeit_interleaved({"vlm/packed": (vlm_call, None), "hf/padded": (hf_call, None)},
                            args.iters, args.warmup, SETTLE_S)
    for k, tt in tm.items():
      record(k, tt)
    tv, th = tm["vlm/packed"]["median_s"], tm["hf/padded"]["median_s"]
    row = {"part": "real data", "tokens_per_step": real, "vlm_s": tv, "hf_s": th,
           "vlm_tok_s": real / tv, "hf_tok_s": real / th, "ratio": th / tv}
    rows.append(row)
    results["real_data"] = {"info": info, "timings": tm, "compile_s": compile_s,
                            "loss_check": {"vlm": vlm_loss0, "hf": hf_loss0},
                            "vlm_token_slots": vlm_slots, "hf_token_slots": hf_slots,
                            "hf_batch_shapes": [tuple(x["input_ids"].shape) for x in flat_hf],
                            **row}

  # ---- summary ----------------------------------------------------------------------------------
  pk2 = jax_matmul_peak(2048, "float32", iters=3, settle_s=SETTLE_S)
  results["matmul_peak_after"] = pk2
  results["summary"] = rows
  print(f"\n== summary (float32 CPU, torch {torch.get_num_threads()} threads, XLA {cores} cores; "
        f"peak = jnp.dot 2048^3 {peak / 1e9:.1f} GFLOP/s before, {pk2['flops_per_s'] / 1e9:.1f} "
        f"after; ratio = vlm tokens/s / HF tokens/s)")
  hdr = (f"{'part':10s} {'tokens':>7s} {'vlm tok/s':>10s} {'HF tok/s':>10s} {'vlm/HF':>7s} "
         f"{'GFLOP/step':>10s} {'vlm %peak':>9s} {'HF %peak':>9s}")
  print(hdr)
  print("-" * len(hdr))
  for r in rows:
    gf = f"{r['model_flops'] / 1e9:.2f}" if "model_flops" in r else "-"
    fv = f"{100 * r['vlm_frac_peak']:.1f}" if "vlm_frac_peak" in r else "-"
    fh = f"{100 * r['hf_frac_peak']:.1f}" if "hf_frac_peak" in r else "-"
    print(f"{r['part']:10s} {r['tokens_per_step']:7d} {r['vlm_tok_s']:10.0f} {r['hf_tok_s']:10.0f} "
          f"{r['ratio']:7.2f} {gf:>10s} {fv:>9s} {fh:>9s}")
  print("(same work: tokens = B x L slots per step, padding included, the same FLOPs both sides; "
        "real data: tokens = real tokens per call, the same samples both sides)")
  if args.json:
    with open(args.json, "w") as fh:
      json.dump(results, fh, indent=2, default=str)
    print(f"wrote {args.json}")
  return results


if __name__ == "__main__":
  main()
