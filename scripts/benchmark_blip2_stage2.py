"""BLIP-2 stage-2 throughput: vlm (JAX) against HF PyTorch ``Blip2ForConditionalGeneration``.

Usage::

  python scripts/benchmark_blip2_stage2.py --llm opt            # a few minutes on 2 cores
  python scripts/benchmark_blip2_stage2.py --llm t5 --steps 5 --json /tmp/s2_t5.json
  python scripts/benchmark_blip2_stage2.py --llm opt --skip beam --batch_size 16
  python scripts/benchmark_blip2_stage2.py --smoke              # 1 step of each, tiny sizes

One process, one random model, the same weights and inputs on both sides, float32 on both:
HF builds ``Blip2ForConditionalGeneration`` from the ``transformers.Blip2Config`` that
:func:`vlm.convert.hf_blip2.stage2_config_to_hf` writes for the chosen size (``torch.manual_seed``,
HF's own init, then :func:`randomize_`: LAVIS-like query tokens, wider OPT matrices),
``save_pretrained`` to a temp dir, and vlm loads that directory with
:func:`vlm.convert.hf_blip2.load_hf_blip2_stage2`.

Sizes (``--size``): ``small`` = a ViT-B-sized EVA tower (``presets.SMALL_VISION``: 12 x 768,
224 px / patch 14, 257 tokens) + the BERT-base Q-Former (``presets.QFORMER_BASE``, 12 x 768,
cross-attention every 2nd layer, 32 queries) + a 6-layer 512-wide OPT (8 heads, FFN 2048) or a
6+6-layer 512-wide FlanT5-style T5 (8 heads of 64, gated-GELU FFN 1024, untied head); the real
vocabularies (50272 / 32128) so the bundled tokenizers work. ``tiny`` (``--smoke``): 32-wide
everything, 32 px images. Every dropout is 0 (Q-Former, vision, LLM), so HF's ``train()`` mode and
vlm's training-mode Q-Former do the same deterministic work.

1. **Train step**: forward + backward + AdamW update of the TRAINABLE parameters only
   (``query_tokens``, Q-Former, ``language_projection``, the vision ``post_layernorm``; the tower
   and the LLM frozen). vlm: :func:`vlm.train.step.train_step` with the task's
   :func:`vlm.tasks.blip2_stage2.loss_fn` (``llm_dropout=False``; chunked next-token loss, the
   [B,T,V] float32 logits are never held at once), the mask of
   :data:`vlm.tasks.blip2_stage2.FROZEN`, ``optax.adamw``, ``jax.jit`` with the state donated.
   HF: ``requires_grad_(False)`` on ``vision_model`` (but ``post_layernorm``) and
   ``language_model``, ``model(..., labels=).loss.backward()``, ``torch.optim.AdamW.step()``,
   ``zero_grad(set_to_none=True)``. Same hyper-parameters. Batch: ``--batch_size`` random images
   and captions of ``--seq_len`` token slots, row 0 full and the others right-padded (HF: the
   ``Q`` ``<image>`` placeholders first, labels -100 there). OPT: ``</s>`` + caption, every real
   token a target (LAVIS); T5: an 8-token encoder prompt (``</s>`` last) and the caption as
   decoder labels. Model FLOPs per step = XLA's ``cost_analysis`` count of the compiled vlm step
   (forward, the backward that the trainable parts need, the AdamW update; it counts the LM head
   on the caption positions only, where HF also computes it on the Q query positions). Fractions
   of the matmul peak: vlm's FLOP/s over the jitted ``jnp.dot`` 2048^3 peak, HF's (same FLOPs /
   HF time) over the ``torch.mm`` 2048^3 peak, both measured in the same run. Cross-check: the
   losses of the first two steps (fresh weights, then after one update) and the first step's
   gradient norm.
2. **Beam-search captioning**: ``Blip2Generator(model, params).generate_ids(pixels, "a photo
   of", num_beams=5, max_new_tokens=30, min_new_tokens=8)`` (prompt padded to its own length)
   against HF ``model.generate(pixel_values=, input_ids=<image>*Q + prompt ids, attention_mask=,
   num_beams=5, max_new_tokens=30, min_new_tokens=8, eos_token_id=<vlm's default stop id>)`` in
   ``eval()`` mode under ``torch.no_grad()``, on ``--beam_batch`` images and the initial
   weights. vlm is timed warm; its first call (compile + run) is printed apart. Cross-check: how
   many rows are token-for-token equal up to their first stop token (a random model's beams can
   part late on float differences: reported, not hidden).

Timing: ``--warmup`` untimed calls per side, then ``--steps`` timed calls alternating vlm and HF
(``bench_common.timeit_interleaved``, a pause before each call) and medians; XLA runs its intra-op
pool over every visible core, ``--torch_threads`` (default: that same count) sets torch's. On a
shared machine the numbers are noisy; the printed ``load_average`` says how busy it was.

Targets stated for this CPU (printed with PASS/MISS beside the results): train step >= 1x HF and
>= 85% of the matmul peak; beam-search captioning >= 2x HF.

This is a benchmark, not a test: nothing asserts a timing (``--smoke`` only checks the script
runs). torch / transformers are imported only here (test dependencies of vlm).
"""
from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import os
import sys
import tempfile
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import numpy as np  # noqa: E402

from bench_common import (environment, jax_matmul_peak, matmul_peak_contenders,  # noqa: E402
                          peak_flops_per_s, timeit_interleaved, torch_matmul_peak, xla_flops)

SETTLE_S = 0.3  # pause before each timed call (bench_common.timeit_interleaved)
TARGETS = {"train_ratio": 1.0, "train_frac_peak": 0.85, "beam_ratio": 2.0}
T5_PROMPT_TOKENS = 8


def parse_args(argv=None):
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                              formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--llm", default="opt", choices=("opt", "t5"))
  p.add_argument("--size", default="small", choices=("small", "tiny"))
  p.add_argument("--image_size", type=int, default=None,
                 help="override the tower's image size (a multiple of its patch size)")
  p.add_argument("--batch_size", type=int, default=4, help="train step: images per batch")
  p.add_argument("--seq_len", type=int, default=32, help="train step: caption token slots T")
  p.add_argument("--beam_batch", type=int, default=4, help="captioning: images per call")
  p.add_argument("--num_beams", type=int, default=5)
  p.add_argument("--max_new_tokens", type=int, default=30)
  p.add_argument("--min_new_tokens", type=int, default=8)
  p.add_argument("--prompt", default="a photo of")
  p.add_argument("--lr", type=float, default=1e-4)
  p.add_argument("--weight_decay", type=float, default=0.05)
  p.add_argument("--chunk_size", type=int, default=512, help="vlm loss chunk (tokens)")
  p.add_argument("--steps", type=int, default=3, help="timed calls per side (median reported)")
  p.add_argument("--warmup", type=int, default=0,
                 help="untimed calls per side before timing, after the cross-check calls (which "
                      "warm both sides up already)")
  p.add_argument("--torch_threads", type=int, default=None,
                 help="torch.set_num_threads (default: the cores XLA uses)")
  p.add_argument("--matmul_precision", default=None,
                 help="jax_default_matmul_precision (default: jax's default)")
  p.add_argument("--skip", default="", help="comma list of parts to skip: train,beam")
  p.add_argument("--seed", type=int, default=0)
  p.add_argument("--json", default=None, help="also write every number to this JSON file")
  p.add_argument("--smoke", action="store_true",
                 help="check the script: tiny sizes, B=2, T=8, 1 step of each, no warm-up")
  args = p.parse_args(argv)
  if args.smoke:
    args.size, args.batch_size, args.beam_batch, args.seq_len = "tiny", 2, 2, 8
    args.steps, args.warmup, args.max_new_tokens, args.min_new_tokens = 1, 0, 6, 2
  if args.steps < 1 or args.warmup < 0:
    p.error("--steps must be >= 1 and --warmup >= 0")
  if args.batch_size < 1 or args.beam_batch < 1 or args.seq_len < 4:
    p.error("--batch_size and --beam_batch must be >= 1, --seq_len >= 4")
  if not 0 <= args.min_new_tokens <= args.max_new_tokens:
    p.error("need 0 <= --min_new_tokens <= --max_new_tokens")
  return args


# ----------------------------------------------------------------------------------------------
# Model


def stage2_config(args):
  """The vlm ``Blip2Stage2Config`` of ``--size`` / ``--llm`` with every dropout 0."""
  from vlm.models import presets
  from vlm.models.opt import opt_preset
  from vlm.models.t5 import t5_preset
  if args.size == "small":
    vision, qformer, queries = presets.SMALL_VISION, presets.QFORMER_BASE, 32
    d, layers, heads, ffn = 512, 6, 8, 2048
  else:
    micro = presets.PRESETS["blip2_micro"]
    vision, qformer, queries = micro.vision, micro.qformer, 8
    d, layers, heads, ffn = 32, 2, 2, 64
  if args.image_size:
    vision = dataclasses.replace(vision, image_size=args.image_size)
  qformer = dataclasses.replace(qformer, encoder_hidden_size=vision.hidden_size,
                                use_qformer_text_input=False, hidden_dropout_prob=0.0,
                                attention_probs_dropout_prob=0.0)
  if args.llm == "opt":
    llm = opt_preset("opt_tiny", hidden_size=d, num_hidden_layers=layers, num_attention_heads=heads,
                     ffn_dim=ffn, max_position_embeddings=128, dropout=0.0, attention_dropout=0.0)
    image_token = 50265
  else:
    llm = t5_preset("t5_tiny", d_model=d, d_kv=d // heads, num_heads=heads, d_ff=ffn // 2,
                    num_layers=layers, num_decoder_layers=layers, dense_act_fn="gelu",
                    dropout_rate=0.0)
    image_token = 32100
  return presets.Blip2Stage2Config(vision=vision, qformer=qformer, llm=llm,
                                   num_query_tokens=queries, image_token_index=image_token)


def randomize_(hf, config, seed: int) -> None:
  """Makes HF's random init a usable random model (in place, before the weights are shared).

  * ``query_tokens`` ~ N(0, initializer_range^2) as LAVIS initialises them (HF's init writes
    zeros, which the Q-Former's LayerNorm (eps 1e-12) turns into ~1e6-scaled gradients);
  * OPT only: the decoder's linear weights ~ N(0, 1/fan_in), token and position embeddings
    ~ N(0, 0.15^2). HF's std 0.02 everywhere leaves a random OPT with nearly flat logits, where
    beam search is decided by float noise; with these scales the logits spread over a few units
    (T5's own init already does so) and the token-level cross-check means something.

  Norms keep their 1 / 0.
  """
  import torch
  gen = torch.Generator().manual_seed(seed + 7)
  with torch.no_grad():
    hf.query_tokens.copy_(config.qformer.initializer_range
                          * torch.randn(hf.query_tokens.shape, generator=gen))
    if config.llm_kind != "opt":
      return
    for name, p in hf.language_model.named_parameters():
      if p.ndim != 2:
        continue
      std = 0.15 if "embed" in name else p.shape[1] ** -0.5
      p.copy_(std * torch.randn(p.shape, generator=gen))


# ----------------------------------------------------------------------------------------------
# Inputs


def train_batch(args, config, rng):
  """``(vlm batch of numpy arrays, HF forward kwargs of numpy arrays, loss tokens)``."""
  b, t, q, llm = args.batch_size, args.seq_len, config.num_query_tokens, config.llm
  s = config.vision.image_size
  pixels = rng.standard_normal((b, 3, s, s)).astype(np.float32)
  lengths = rng.integers(t // 2, t + 1, size=b)
  lengths[0] = t
  mask = (np.arange(t)[None, :] < lengths[:, None]).astype(np.int64)
  words = rng.integers(3, 30000, size=(b, t))
  batch = {"pixel_values": pixels.transpose(0, 2, 3, 1)}
  img = np.full((b, q), config.image_token_index, np.int64)
  if config.llm_kind == "opt":
    ids = np.where(mask == 1, words, llm.pad_token_id)
    ids[:, 0] = llm.bos_token_id
    batch.update(input_ids=ids, attention_mask=mask, loss_mask=mask)
    labels = np.where(mask == 1, ids, -100)
    hf = dict(input_ids=np.concatenate([img, ids], 1),
              attention_mask=np.concatenate([np.ones((b, q), np.int64), mask], 1),
              labels=np.concatenate([np.full((b, q), -100), labels], 1))
  else:
    from vlm.models.t5 import shift_right
    prompt = rng.integers(3, 30000, size=(b, T5_PROMPT_TOKENS))
    prompt[:, -1] = llm.eos_token_id
    pmask = np.ones_like(prompt)
    labels = np.where(mask == 1, words, llm.pad_token_id)
    labels[np.arange(b), lengths - 1] = llm.eos_token_id
    dec_in = np.asarray(shift_right(labels, llm.decoder_start_token_id, llm.pad_token_id))
    batch.update(input_ids=prompt, attention_mask=pmask, decoder_input_ids=dec_in,
                 decoder_attention_mask=mask, labels=labels, loss_mask=mask)
    hf = dict(input_ids=np.concatenate([img, prompt], 1),
              attention_mask=np.concatenate([np.ones((b, q), np.int64), pmask], 1),
              labels=np.where(mask == 1, labels, -100), decoder_attention_mask=mask)
  batch = {k: (v if k == "pixel_values" else v.astype(np.int32)) for k, v in batch.items()}
  hf["pixel_values"] = pixels
  return batch, hf, int(mask.sum())


def _fmt_times(t):
  return f"{t['median_s'] * 1e3:9.1f} ms  [{', '.join(f'{x * 1e3:.0f}' for x in t['times_s'])}]"


def _verdict(value, target):
  return "PASS" if value >= target else "MISS"


# ----------------------------------------------------------------------------------------------


def main(argv=None):
  args = parse_args(argv)
  skip = {s for s in args.skip.split(",") if s}
  import jax
  if args.matmul_precision:
    jax.config.update("jax_default_matmul_precision", args.matmul_precision)
  import jax.numpy as jnp
  import optax
  import torch
  import transformers

  from vlm.convert.hf_blip2 import load_hf_blip2_stage2, stage2_config_to_hf
  from vlm.inference.blip2_generate import Blip2Generator
  from vlm.models.blip2 import Blip2Stage2
  from vlm.tasks import blip2_stage2
  from vlm.train import optim
  from vlm.train.state import TrainState
  from vlm.train.step import train_step

  cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
  torch.set_num_threads(args.torch_threads or cores)
  env = environment(torch)
  print("== settings")
  for k, v in env.items():
    print(f"  {k:26s} {v}")

  # ---- same weights on both sides ---------------------------------------------------------------
  want = stage2_config(args)
  torch.manual_seed(args.seed)
  hf = transformers.Blip2ForConditionalGeneration(
      transformers.Blip2Config.from_dict(stage2_config_to_hf(want)))
  randomize_(hf, want, args.seed)
  with tempfile.TemporaryDirectory() as tmp:
    hf.save_pretrained(tmp, safe_serialization=True)
    config, params_np = load_hf_blip2_stage2(tmp)
  if config != want:
    print("  note: the config read back from HF differs from the one written; using HF's")
  init_sd = {k: v.detach().clone() for k, v in hf.state_dict().items()}
  mask = optim.trainable_mask(params_np, blip2_stage2.FROZEN)
  n_params = sum(int(np.prod(x.shape)) for x in jax.tree_util.tree_leaves(params_np))
  n_train = sum(int(np.prod(x.shape)) for x, m in zip(jax.tree_util.tree_leaves(params_np),
                                                       jax.tree_util.tree_leaves(mask)) if m)
  for name, p in hf.named_parameters():
    p.requires_grad_(not (name.startswith("language_model.") or (
        name.startswith("vision_model.") and not name.startswith("vision_model.post_layernorm."))))
  hf_trainable = [p for p in hf.parameters() if p.requires_grad]
  n_train_hf = sum(p.numel() for p in hf_trainable)
  v, q, llm = config.vision, config.qformer, config.llm
  llm_desc = (f"OPT {llm.num_hidden_layers} x {llm.hidden_size} ({llm.num_attention_heads} heads, "
              f"FFN {llm.ffn_dim})" if args.llm == "opt" else
              f"T5 {llm.num_layers}+{llm.num_decoder_layers} x {llm.d_model} ({llm.num_heads} "
              f"heads of {llm.d_kv}, gated FFN {llm.d_ff}, {llm.dense_act_fn})")
  # pylint: disable=protected-access
  attn = {"vision": hf.vision_model.config._attn_implementation,
          "qformer": hf.qformer.config._attn_implementation,
          "llm": hf.language_model.config._attn_implementation}
  # pylint: enable=protected-access
  print(f"\n== model ({args.size}): EVA tower {v.num_hidden_layers} x {v.hidden_size} (MLP "
        f"{v.intermediate_size}, {v.image_size}px / {v.patch_size}, {v.num_positions} tokens), "
        f"Q-Former {q.num_hidden_layers} x {q.hidden_size} (cross-attention every "
        f"{q.cross_attention_frequency}), Q={config.num_query_tokens}, {llm_desc}, vocab "
        f"{llm.vocab_size}; params {n_params:,}, trainable vlm {n_train:,} / HF {n_train_hf:,}")
  print(f"  float32 both sides, dropout 0 everywhere; HF attention {attn}")
  results = {"env": env, "args": vars(args), "params": n_params,
             "trainable": {"vlm": n_train, "hf": n_train_hf}, "hf_attention": attn}

  model = Blip2Stage2(config)

  # ---- matmul peaks -----------------------------------------------------------------------------
  pk = jax_matmul_peak(2048, "float32", iters=3, settle_s=SETTLE_S)
  pk_t = torch_matmul_peak(2048, iters=3, settle_s=SETTLE_S)
  peak, peak_t = pk["flops_per_s"], pk_t["flops_per_s"]
  print(f"\n== matmul peak float32 (2048^3): jnp.dot {peak / 1e9:.1f} GFLOP/s, torch.mm "
        f"{peak_t / 1e9:.1f} GFLOP/s ({torch.get_num_threads()} threads)")
  peak_fns = matmul_peak_contenders(2048)
  results["matmul_peak"] = {"jax": pk, "torch": pk_t}
  summary = {}

  # ---- 1. train step ----------------------------------------------------------------------------
  if "train" not in skip:
    rng_np = np.random.default_rng(args.seed)
    batch_np, hf_np, n_tok = train_batch(args, config, rng_np)
    batch = jax.device_put(jax.tree_util.tree_map(jnp.asarray, batch_np))
    hf_in = {k: torch.from_numpy(x) for k, x in hf_np.items()}
    tx = optax.adamw(args.lr, b1=0.9, b2=0.999, eps=1e-8, weight_decay=args.weight_decay)
    step_fn = jax.jit(functools.partial(
        train_step, model=model, tx=tx, mask=mask, loss_fn=blip2_stage2.loss_fn,
        loss_kwargs={"llm_dropout": False, "chunk_size": args.chunk_size}), donate_argnums=(0,))
    rng = jax.random.PRNGKey(args.seed)
    params = jax.tree_util.tree_map(jnp.asarray, params_np)
    trainable, _ = optim.partition(params, mask)
    holder = {"state": TrainState(step=jnp.zeros((), jnp.int32), params=params,
                                  opt_state=tx.init(trainable))}
    t0 = time.perf_counter()
    compiled = step_fn.lower(holder["state"], batch, rng).compile()
    compile_s = time.perf_counter() - t0
    flops = xla_flops(compiled)
    hf.train()
    opt = torch.optim.AdamW(hf_trainable, lr=args.lr, betas=(0.9, 0.999), eps=1e-8,
                            weight_decay=args.weight_decay)

    def vlm_call(_=None):
      holder["state"], m = compiled(holder["state"], batch, rng)
      jax.block_until_ready(holder["state"])
      return m

    def hf_call(_=None, check=False):
      out = hf(**hf_in)
      out.loss.backward()
      gnorm = (torch.sqrt(sum((p.grad.double() ** 2).sum() for p in hf_trainable
                              if p.grad is not None)).item() if check else None)
      opt.step()
      opt.zero_grad(set_to_none=True)
      return float(out.loss.detach()), gnorm

    mv = [jax.device_get(vlm_call()) for _ in range(2)]
    mh = [hf_call(check=True) for _ in range(2)]
    check = {"loss_step0": (float(mv[0]["loss"]), mh[0][0]),
             "loss_step1": (float(mv[1]["loss"]), mh[1][0]),
             "grad_norm_step0": (float(mv[0]["grad_norm"]), mh[0][1])}
    print(f"\n== 1. train step: B={args.batch_size} images x T={args.seq_len} caption slots "
          f"({n_tok} loss tokens; {'OPT: </s> + caption' if args.llm == 'opt' else f'T5: {T5_PROMPT_TOKENS}-token prompt, caption as decoder labels'}); "
          f"vlm compile {compile_s:.1f}s; XLA FLOPs/step {(flops or 0) / 1e9:.2f} G")
    for k, (a, c) in check.items():
      print(f"  {k:16s} vlm {a:.6f}  HF {c:.6f}  |diff| {abs(a - c):.2e}  rel "
            f"{abs(a - c) / max(abs(c), 1e-30):.1e}")
    loss_ok = abs(check["loss_step0"][0] - check["loss_step0"][1]) <= 1e-4
    print(f"  first-step losses equal within 1e-4: {'yes' if loss_ok else 'NO'}")
    print(f"  timing ({args.warmup} warm-up, median of {args.steps}, calls alternate)")
    tm = timeit_interleaved({"vlm/train_step": (vlm_call, None), "hf/train_step": (hf_call, None),
                             **peak_fns}, args.steps, args.warmup, SETTLE_S)
    for k, tt in tm.items():
      print(f"  {k:16s} {_fmt_times(tt)}", flush=True)
    tv, th = tm["vlm/train_step"]["median_s"], tm["hf/train_step"]["median_s"]
    pk_in = peak_flops_per_s(tm)
    print(f"  matmul peaks measured between these calls: jnp.dot {pk_in['jax'] / 1e9:.1f}, "
          f"torch.mm {pk_in['torch'] / 1e9:.1f} GFLOP/s")
    b = args.batch_size
    row = {"vlm_img_s": b / tv, "hf_img_s": b / th, "ratio": th / tv, "xla_flops": flops,
           "vlm_gflop_s": flops / tv / 1e9 if flops else None,
           "hf_gflop_s": flops / th / 1e9 if flops else None, "peaks": pk_in,
           "vlm_frac_peak": flops / tv / pk_in["jax"] if flops else None,
           "hf_frac_peak": flops / th / pk_in["torch"] if flops else None,
           "hf_frac_jax_peak": flops / th / pk_in["jax"] if flops else None,
           "compile_s": compile_s, "check": check, "loss_ok": loss_ok, "timings": tm}
    summary["train"] = row
    del holder, compiled
    hf.load_state_dict(init_sd)

  # ---- 2. beam-search captioning ----------------------------------------------------------------
  if "beam" not in skip:
    gen = Blip2Generator(model, jax.tree_util.tree_map(jnp.asarray, params_np))
    b, s = args.beam_batch, config.vision.image_size
    pixels = np.random.default_rng(args.seed + 1).standard_normal((b, 3, s, s)).astype(np.float32)
    pixels_nhwc = np.ascontiguousarray(pixels.transpose(0, 2, 3, 1))
    prompt_ids, _ = gen.encode_prompts([args.prompt], prompt_bucket=1)
    from vlm.inference.blip2_generate import default_eos
    eos = default_eos(args.llm, gen.tokenizer)[0]
    pad = int(gen.tokenizer.pad_token_id)
    hf_ids = torch.from_numpy(np.concatenate(
        [np.full((b, config.num_query_tokens), config.image_token_index, np.int64),
         np.repeat(prompt_ids.astype(np.int64), b, 0)], 1))
    hf_mask = torch.ones_like(hf_ids)
    kw = dict(num_beams=args.num_beams, max_new_tokens=args.max_new_tokens,
              min_new_tokens=args.min_new_tokens)
    hf.eval()
    t_pix = torch.from_numpy(pixels)

    def vlm_gen(_=None):
      return gen.generate_ids(pixels_nhwc, args.prompt, prompt_bucket=1, **kw)

    def hf_gen(_=None):
      with torch.no_grad():
        out = hf.generate(pixel_values=t_pix, input_ids=hf_ids, attention_mask=hf_mask,
                          do_sample=False, eos_token_id=eos, pad_token_id=pad, **kw).numpy()
      return out[:, hf_ids.shape[1]:] if args.llm == "opt" else out[:, 1:]

    t0 = time.perf_counter()
    ours = vlm_gen()
    first_s = time.perf_counter() - t0
    ref = hf_gen()
    same, lengths = 0, []
    for o, r in zip(ours, ref):
      stop = np.flatnonzero(r == eos)
      end = int(stop[0]) + 1 if stop.size else len(r)
      lengths.append(end)
      same += int(len(o) >= end and np.array_equal(o[:end], r[:end]))
    print(f"\n== 2. beam-search captioning: {b} images, prompt {args.prompt!r} "
          f"({prompt_ids.shape[1]} tokens), num_beams={args.num_beams}, max_new_tokens="
          f"{args.max_new_tokens}, min_new_tokens={args.min_new_tokens}, stop id {eos}; vlm first "
          f"call (compile + run) {first_s:.1f}s")
    print(f"  rows token-for-token equal to HF up to the first stop token: {same}/{b} (HF row "
          f"lengths {lengths})")
    if same < b:
      print("  (a random model's beams can part on float32 differences between XLA and torch "
            "kernels; the first differing rows: ")
      for i, (o, r) in enumerate(zip(ours, ref)):
        if not np.array_equal(o[:lengths[i]], r[:lengths[i]]):
          diff = int(np.flatnonzero(o[:lengths[i]] != r[:lengths[i]])[0])
          print(f"   row {i}: first differs at new token {diff}")
    print(f"  example row 0: vlm {ours[0].tolist()}\n                 HF  {ref[0].tolist()}")
    print(f"  timing ({args.warmup} warm-up, median of {args.steps}, calls alternate)")
    tm = timeit_interleaved({"vlm/beam": (vlm_gen, None), "hf/beam": (hf_gen, None), **peak_fns},
                            args.steps, args.warmup, SETTLE_S)
    for k, tt in tm.items():
      print(f"  {k:16s} {_fmt_times(tt)}", flush=True)
    tv, th = tm["vlm/beam"]["median_s"], tm["hf/beam"]["median_s"]
    summary["beam"] = {"vlm_img_s": b / tv, "hf_img_s": b / th, "ratio": th / tv,
                       "peaks": peak_flops_per_s(tm),
                       "vlm_first_call_s": first_s, "vlm_compile_s_est": first_s - tv,
                       "rows_equal": same, "rows": b, "timings": tm}

  # ---- summary ----------------------------------------------------------------------------------
  pk2 = jax_matmul_peak(2048, "float32", iters=3, settle_s=SETTLE_S)
  results["matmul_peak_after"] = pk2
  results["summary"] = summary
  print(f"\n== summary: BLIP-2 stage 2 ({args.size}, {args.llm}) float32 CPU, XLA {cores} cores, "
        f"torch {torch.get_num_threads()} threads; load average now {env_load()}; peaks "
        f"jnp.dot {peak / 1e9:.1f} (after: {pk2['flops_per_s'] / 1e9:.1f}), torch.mm "
        f"{peak_t / 1e9:.1f} GFLOP/s")
  hdr = (f"{'part':11s} {'vlm img/s':>10s} {'HF img/s':>10s} {'vlm/HF':>7s} {'target':>7s} "
         f"{'':4s} {'vlm %peak':>9s} {'target':>7s} {'':4s} {'HF %peak':>9s}")
  print(hdr)
  print("-" * len(hdr))
  if "train" in summary:
    r = summary["train"]
    fv = r["vlm_frac_peak"]
    print(f"{'train step':11s} {r['vlm_img_s']:10.2f} {r['hf_img_s']:10.2f} {r['ratio']:7.2f} "
          f"{'>=' + str(TARGETS['train_ratio']):>7s} {_verdict(r['ratio'], TARGETS['train_ratio']):4s} "
          f"{100 * fv if fv else float('nan'):9.1f} {'>=85':>7s} "
          f"{_verdict(fv or 0, TARGETS['train_frac_peak']):4s} "
          f"{100 * (r['hf_frac_peak'] or float('nan')):9.1f}")
  if "beam" in summary:
    r = summary["beam"]
    print(f"{'beam search':11s} {r['vlm_img_s']:10.2f} {r['hf_img_s']:10.2f} {r['ratio']:7.2f} "
          f"{'>=' + str(TARGETS['beam_ratio']):>7s} {_verdict(r['ratio'], TARGETS['beam_ratio']):4s}"
          f" {'-':>9s} {'':7s} {'':4s} {'-':>9s}")
  print("(%peak: model FLOPs/step = XLA cost_analysis of the compiled vlm train step, over "
        "jnp.dot's peak for vlm and torch.mm's for HF; beam search: vlm warm, compile excluded, "
        f"first call {summary['beam']['vlm_first_call_s']:.1f}s)" if "beam" in summary else
        "(%peak: model FLOPs/step = XLA cost_analysis of the compiled vlm train step)")
  if args.json:
    with open(args.json, "w") as fh:
      json.dump(results, fh, indent=2, default=str)
    print(f"wrote {args.json}")
  return results


def env_load():
  return tuple(round(x, 1) for x in os.getloadavg()) if hasattr(os, "getloadavg") else None


if __name__ == "__main__":
  main()
