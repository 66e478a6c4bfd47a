"""Throughput of vlm's BLIP-2 stage 1 against HF PyTorch ``Blip2ForImageTextRetrieval``.

Usage::

  python scripts/benchmark.py                                   # blip2_small, B=8, 5 iters, fp32
  python scripts/benchmark.py --preset blip2_micro --iters 3    # seconds; checks the script works
  python scripts/benchmark.py --preset blip2_tiny --batch_size 16 --json /tmp/bench.json
  python scripts/benchmark.py --dtype bfloat16                  # vlm compute dtype (TPU/GPU)

What it does, in one process with one config (``--preset``: blip2_small | blip2_tiny | blip2_micro):

1. Builds HF ``Blip2ForImageTextRetrieval`` with the preset's sizes (``torch.manual_seed``, HF's
   own random init), ``save_pretrained`` to a temp dir, loads it into vlm with
   :func:`vlm.convert.hf_blip2.load_hf_blip2`: both sides hold the same weights. Same random pixel
   batch ``[B, 3, S, S]`` (NHWC for vlm) and token ids / padded masks ``[B, T=32]``.
2. Workloads, each timed after a warm-up call, median of ``--iters``:

   * ``forward``: ITC (l2-normed query and text features, max-over-queries similarity [B, B]) and
     ITM logits [B, 2] on the paired batch. vlm: one ``jax.jit`` function over ``Blip2Stage1``
     (``encode_image`` once, ``image_features``, ``text_features``, ``itm_logits``). HF, two ways:
     ``hf_api`` = ``model(..., use_image_text_matching_head=True)`` + ``model(...,
     use_image_text_matching_head=False)`` (the public API; runs the vision tower TWICE), and
     ``hf_shared`` = the same HF submodules composed like HF's forward but with the vision tower
     run once (the same computation as vlm). Both under ``torch.no_grad()`` in eval mode.
   * ``train_step``: loss = ITC (CE both ways, no label smoothing, LAVIS detached keys, learnable
     ``temp``) + ITM CE on the positive pairs (labels 1) -> gradients of every parameter except the
     frozen vision encoder (``vision_model`` minus ``post_layernorm``). vlm: ``jax.jit(
     jax.value_and_grad)`` w.r.t. the trainable subtree only (``vlm.train.optim.trainable_mask`` /
     ``partition``; the ITG head ``cls/`` is frozen too because HF has no LM head and the loss
     does not use it). HF: ``requires_grad=False`` on the frozen parameters, the same loss in torch,
     ``loss.backward()``; grads set to None between iterations (outside the timer).

   Dropout is off on both sides (eval mode / ``deterministic=True``); the default dtype is
   float32 on both sides (``--dtype bfloat16`` changes only vlm's compute dtype).
3. Prints images/s for vlm and HF and the ratio vlm/HF; vlm's achieved FLOP/s (XLA
   ``cost_analysis()['flops']`` of the compiled function / median time) and its fraction of the
   matmul peak measured in the same run (jitted ``jnp.dot`` of two 2048x2048 matrices, 2 n^3
   FLOPs); the same FLOP count divided by HF's time (``hf_shared`` does the same work); versions,
   threads, device. Cross-checks that both sides compute the same thing: max |vlm - HF| of the ITM
   logits and ITC similarities (~1e-5 in float32), the loss and some gradients.

This is a benchmark, not a test: it is never run by pytest. torch / transformers are imported only
here (they are test dependencies of vlm).
"""
from __future__ import annotations

import argparse
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

from bench_common import cpu_model, xla_flops  # noqa: E402
from bench_common import timeit as _timeit, timeit_interleaved as _interleaved  # noqa: E402

# Pause before each timed call (see bench_common.timeit_interleaved).
SETTLE_S = 0.3
PRESETS = ("blip2_small", "blip2_tiny", "blip2_micro")
DEFAULT_BATCH = {"blip2_small": 8, "blip2_tiny": 16, "blip2_micro": 8}
FROZEN = (r"^vision_model/(?!post_layernorm)", r"^cls/")


def parse_args(argv=None):
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                              formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--preset", default="blip2_small", choices=PRESETS)
  p.add_argument("--batch_size", type=int, default=None,
                 help="images per batch (default: 8 for small/micro, 16 for tiny)")
  p.add_argument("--seq_len", type=int, default=32, help="text tokens T")
  p.add_argument("--iters", type=int, default=5, help="timed iterations (median reported)")
  p.add_argument("--warmup", type=int, default=1, help="untimed calls before timing")
  p.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"),
                 help="vlm compute dtype (params stay float32); HF always runs float32")
  p.add_argument("--matmul_precision", default=None,
                 help="jax_default_matmul_precision (e.g. 'highest' to forbid TF32/bf16 passes on "
                      "GPU/TPU); default: jax's default")
  p.add_argument("--torch_threads", type=int, default=None,
                 help="torch.set_num_threads (default: torch's default)")
  p.add_argument("--skip", default="", help="comma list of workloads to skip: hf_api,train_step")
  p.add_argument("--seed", type=int, default=0)
  p.add_argument("--json", default=None, help="also write every number to this JSON file")
  args = p.parse_args(argv)
  if args.batch_size is None:
    args.batch_size = DEFAULT_BATCH[args.preset]
  if args.batch_size < 2:
    p.error("--batch_size must be >= 2 (ITC needs negatives)")
  if args.iters < 1:
    p.error("--iters must be >= 1")
  return args


def main(argv=None):
  args = parse_args(argv)

  import jax
  if args.matmul_precision:
    jax.config.update("jax_default_matmul_precision", args.matmul_precision)
  import flax
  import jax.numpy as jnp
  import numpy as np
  import torch
  import torch.nn.functional as F
  import transformers

  from vlm.convert.hf_blip2 import blip2_config_to_hf, load_hf_blip2
  from vlm.models.blip2 import Blip2Stage1
  from vlm.models.presets import get_preset
  from vlm.objectives.itc import itc_loss
  from vlm.objectives.itm import itm_loss
  from vlm.train.optim import merge, partition, trainable_mask

  if args.torch_threads:
    torch.set_num_threads(args.torch_threads)
  skip = {s for s in args.skip.split(",") if s}
  compute_dtype = jnp.bfloat16 if args.dtype == "bfloat16" else jnp.float32
  B, T = args.batch_size, args.seq_len

  env = {
      "python": platform.python_version(), "jax": jax.__version__, "jaxlib":
      getattr(jax.lib, "__version__", None) or __import__("jaxlib").__version__,
      "flax": flax.__version__, "torch": torch.__version__,
      "transformers": transformers.__version__, "numpy": np.__version__,
      "jax_devices": [str(d) for d in jax.devices()], "jax_backend": jax.default_backend(),
      "device_kind": jax.devices()[0].device_kind, "torch_device": "cpu",
      "os_cpu_count": os.cpu_count(), "cpu_affinity": len(os.sched_getaffinity(0))
      if hasattr(os, "sched_getaffinity") else None,
      "torch_num_threads": torch.get_num_threads(),
      "torch_num_interop_threads": torch.get_num_interop_threads(),
      "XLA_FLAGS": os.environ.get("XLA_FLAGS", ""),
      "jax_matmul_precision": str(jax.config.jax_default_matmul_precision),
      "cpu": cpu_model(),
  }
  print("== environment")
  for k, v in env.items():
    print(f"  {k:26s} {v}")
  print("  XLA CPU runs its intra-op (Eigen) pool over all visible cores; torch uses "
        "torch_num_threads intra-op threads.")

  # ---- 1. Same weights on both sides ---------------------------------------------------------
  preset = get_preset(args.preset)
  hf_cfg = transformers.Blip2Config.from_dict(blip2_config_to_hf(preset))
  torch.manual_seed(args.seed)
  hf = transformers.Blip2ForImageTextRetrieval(hf_cfg).eval()
  with tempfile.TemporaryDirectory() as tmp:
    hf.save_pretrained(tmp)
    config, params_np = load_hf_blip2(tmp)
  if config != preset:
    print(f"  note: config read back from HF differs from the preset; using the HF one")
  v, q = config.vision, config.qformer
  S, Q = v.image_size, config.num_query_tokens
  print(f"\n== config {args.preset}: vision {v.num_hidden_layers}x{v.hidden_size} (mlp "
        f"{v.intermediate_size}, {S}px/{v.patch_size}, {v.num_positions} tokens), Q-Former "
        f"{q.num_hidden_layers}x{q.hidden_size} (cross-attn every {q.cross_attention_frequency}), "
        f"Q={Q}, E={config.image_text_hidden_size}; B={B}, T={T}; vlm dtype {args.dtype}, HF float32; "
        f"HF attn vision={hf.vision_model.config._attn_implementation} "
        f"qformer={hf.qformer.config._attn_implementation}; dropout off on both sides")

  rng = np.random.default_rng(args.seed)
  pixels_nchw = rng.standard_normal((B, 3, S, S)).astype(np.float32)
  ids = rng.integers(1000, q.vocab_size - 1, size=(B, T)).astype(np.int64)
  ids[:, 0] = config.cls_token_id
  lengths = rng.integers(T // 2, T + 1, size=B)
  lengths[0] = T
  mask = (np.arange(T)[None, :] < lengths[:, None]).astype(np.int64)
  ids[mask == 0] = config.pad_token_id

  # ---- vlm functions ---------------------------------------------------------------------------
  model = Blip2Stage1(config, dtype=compute_dtype)
  params = jax.device_put(jax.tree_util.tree_map(jnp.asarray, params_np))
  x_pix = jax.device_put(jnp.asarray(pixels_nchw.transpose(0, 2, 3, 1)))
  x_ids = jax.device_put(jnp.asarray(ids, jnp.int32))
  x_mask = jax.device_put(jnp.asarray(mask, jnp.int32))

  def vlm_forward(params, pixels, input_ids, attention_mask):
    def run(m):
      image_embeds = m.encode_image(pixels)
      _, image_feats = m.image_features(image_embeds)
      _, text_feat = m.text_features(input_ids, attention_mask)
      sim = jnp.max(jnp.einsum("iqe,je->ijq", image_feats.astype(jnp.float32),
                               text_feat.astype(jnp.float32)), axis=-1)
      itm = m.itm_logits(image_embeds, input_ids, attention_mask)
      return {"sim": sim, "itm": itm.astype(jnp.float32)}
    return model.apply({"params": params}, method=run)

  tmask = trainable_mask(params, FROZEN)
  p_train, p_frozen = partition(params, tmask)
  n_train = sum(x.size for x in jax.tree_util.tree_leaves(p_train))

  def vlm_loss(p_train, p_frozen, pixels, input_ids, attention_mask):
    def run(m):
      image_embeds = m.encode_image(pixels)
      _, image_feats = m.image_features(image_embeds)
      _, text_feat = m.text_features(input_ids, attention_mask)
      itc, _ = itc_loss(image_feats, text_feat, m.temperature(), label_smoothing=0.0)
      logits = m.itm_logits(image_embeds, input_ids, attention_mask)
      itm, _ = itm_loss(logits, jnp.ones((input_ids.shape[0],), jnp.int32))
      return itc + itm
    return model.apply({"params": merge(p_train, p_frozen)}, method=run)

  # ---- HF functions ----------------------------------------------------------------------------
  t_pix = torch.from_numpy(pixels_nchw)
  t_ids = torch.from_numpy(ids)
  t_mask = torch.from_numpy(mask)
  temp = torch.nn.Parameter(torch.tensor(float(np.asarray(params_np["temp"]))))

  def hf_api(_=None):
    itm = hf(pixel_values=t_pix, input_ids=t_ids, attention_mask=t_mask,
             use_image_text_matching_head=True).logits_per_image
    sim = hf(pixel_values=t_pix, input_ids=t_ids, attention_mask=t_mask,
             use_image_text_matching_head=False).logits_per_image
    return sim, itm

  def hf_parts(pixels, input_ids, attention_mask):
    """HF's Blip2ForImageTextRetrieval.forward, both heads, vision tower run once."""
    image_embeds = hf.vision_model(pixel_values=pixels).last_hidden_state
    b = image_embeds.shape[0]
    image_mask = torch.ones(image_embeds.shape[:-1], dtype=torch.long)
    queries = hf.query_tokens.expand(b, -1, -1)
    q_out = hf.qformer(query_embeds=queries, encoder_hidden_states=image_embeds,
                       encoder_attention_mask=image_mask).last_hidden_state
    image_feats = F.normalize(hf.vision_projection(q_out), dim=-1)
    t_out = hf.qformer(query_embeds=hf.embeddings(input_ids=input_ids), query_length=0,
                       attention_mask=attention_mask).last_hidden_state
    text_feat = F.normalize(hf.text_projection(t_out[:, 0, :]), dim=-1)
    full_mask = torch.cat([torch.ones(queries.shape[:-1], dtype=torch.long), attention_mask], 1)
    h = hf.qformer(query_embeds=hf.embeddings(input_ids=input_ids, query_embeds=queries),
                   query_length=Q, attention_mask=full_mask, encoder_hidden_states=image_embeds,
                   encoder_attention_mask=image_mask).last_hidden_state
    itm = hf.itm_head(h[:, :Q, :]).mean(dim=1)
    return image_feats, text_feat, itm

  def hf_shared(_=None):
    image_feats, text_feat, itm = hf_parts(t_pix, t_ids, t_mask)
    sim = torch.matmul(image_feats, text_feat.t()).max(dim=1).values
    return sim, itm

  for name, p in hf.named_parameters():
    p.requires_grad_(not (name.startswith("vision_model.")
                          and not name.startswith("vision_model.post_layernorm.")))
  hf_trainable = [p for p in hf.parameters() if p.requires_grad] + [temp]
  n_train_hf = sum(p.numel() for p in hf_trainable)

  def hf_loss():
    image_feats, text_feat, itm = hf_parts(t_pix, t_ids, t_mask)
    # LAVIS: the gathered keys are detached (vlm itc_loss stop_gradient_keys=True).
    sim_i2t = torch.einsum("iqe,je->ijq", image_feats, text_feat.detach()).amax(-1) / temp
    sim_t2i = torch.einsum("ie,jqe->ijq", text_feat, image_feats.detach()).amax(-1) / temp
    labels = torch.arange(t_ids.shape[0])
    itc = (F.cross_entropy(sim_i2t, labels) + F.cross_entropy(sim_t2i, labels)) / 2
    return itc + F.cross_entropy(itm, torch.ones(t_ids.shape[0], dtype=torch.long))

  def hf_zero():
    hf.zero_grad(set_to_none=True)
    temp.grad = None

  def hf_step(_=None):
    loss = hf_loss()
    loss.backward()
    return loss

  # ---- compile vlm ------------------------------------------------------------------------------
  results = {"env": env, "args": vars(args), "n_trainable": {"vlm": int(n_train),
                                                             "hf": int(n_train_hf)}}
  t0 = time.perf_counter()
  fwd = jax.jit(vlm_forward).lower(params, x_pix, x_ids, x_mask).compile()
  fwd_compile = time.perf_counter() - t0
  t0 = time.perf_counter()
  step = jax.jit(jax.value_and_grad(vlm_loss)).lower(
      p_train, p_frozen, x_pix, x_ids, x_mask).compile()
  step_compile = time.perf_counter() - t0
  flops = {"forward": xla_flops(fwd), "train_step": xla_flops(step)}
  print(f"\n== vlm compile: forward {fwd_compile:.1f}s, train_step {step_compile:.1f}s; XLA flops "
        f"forward {flops['forward']}, train_step {flops['train_step']}; trainable params vlm "
        f"{n_train:,} / HF {n_train_hf:,}")

  # ---- matmul peak ------------------------------------------------------------------------------
  n = 2048
  peak = {}
  for dname, dt in [("float32", jnp.float32)] + (
      [("bfloat16", jnp.bfloat16)] if compute_dtype == jnp.bfloat16 else []):
    a = jax.random.normal(jax.random.PRNGKey(1), (n, n), dt)
    b = jax.random.normal(jax.random.PRNGKey(2), (n, n), dt)
    mm = jax.jit(jnp.dot).lower(a, b).compile()
    tm = _timeit(lambda _: jax.block_until_ready(mm(a, b)), max(3, args.iters), 1, SETTLE_S)
    peak[dname] = 2 * n ** 3 / tm["median_s"]
    if dname == "float32":
      mm32, a32, b32 = mm, a, b
    print(f"== matmul peak {dname} ({n}^3 jnp.dot): {peak[dname] / 1e9:.1f} GFLOP/s "
          f"({tm['median_s'] * 1e3:.1f} ms)")
  peak_ref = peak[args.dtype]
  results["matmul_peak_flops"] = peak

  # ---- cross-check ------------------------------------------------------------------------------
  out = jax.block_until_ready(fwd(params, x_pix, x_ids, x_mask))
  with torch.no_grad():
    sim_hf, itm_hf = hf_api()
    sim_sh, itm_sh = hf_shared()
  (loss_v, grads_v) = jax.block_until_ready(step(p_train, p_frozen, x_pix, x_ids, x_mask))
  hf_zero()
  loss_hf = hf_step()
  itm_v, sim_v = np.asarray(out["itm"]), np.asarray(out["sim"])
  check = {
      "itm_logits_maxabs_vs_hf_api": float(np.max(np.abs(itm_v - itm_hf.numpy()))),
      "itc_sim_maxabs_vs_hf_api": float(np.max(np.abs(sim_v - sim_hf.numpy()))),
      "hf_shared_vs_hf_api_maxabs": float(max(np.max(np.abs(itm_sh.numpy() - itm_hf.numpy())),
                                              np.max(np.abs(sim_sh.numpy() - sim_hf.numpy())))),
      "loss_vlm": float(loss_v), "loss_hf": float(loss_hf.detach()),
      "loss_absdiff": float(abs(float(loss_v) - float(loss_hf.detach()))),
  }
  g_pairs = {
      "query_tokens": (grads_v["query_tokens"], hf.query_tokens.grad.numpy()),
      "itm_head/kernel": (grads_v["itm_head"]["kernel"], hf.itm_head.weight.grad.numpy().T),
      "vision_model/post_layernorm/scale": (grads_v["vision_model"]["post_layernorm"]["scale"],
                                            hf.vision_model.post_layernorm.weight.grad.numpy()),
      "temp": (grads_v["temp"], temp.grad.numpy()),
  }
  for k, (gv, gh) in g_pairs.items():
    gv = np.asarray(gv, np.float64)
    check[f"grad_relerr[{k}]"] = float(np.max(np.abs(gv - gh)) / (np.max(np.abs(gh)) + 1e-30))
  results["cross_check"] = check
  print("\n== cross-check vlm vs HF (same weights, same inputs)")
  for k, val in check.items():
    print(f"  {k:45s} {val:.3g}")
  if args.dtype == "float32" and check["itm_logits_maxabs_vs_hf_api"] > 1e-3:
    print("  WARNING: vlm and HF disagree; the timings below may not compare the same computation")

  # ---- timing -----------------------------------------------------------------------------------
  timings = {}
  print(f"\n== timing ({args.warmup} warm-up, median of {args.iters}; vlm and HF calls "
        "alternate within each workload)")

  def record(name, t):
    timings[name] = t
    print(f"  {name:22s} {t['median_s'] * 1e3:9.1f} ms  "
          f"[{', '.join(f'{x * 1e3:.0f}' for x in t['times_s'])}]", flush=True)

  vlm_fwd = lambda _: jax.block_until_ready(fwd(params, x_pix, x_ids, x_mask))  # noqa: E731
  vlm_step = lambda _: jax.block_until_ready(  # noqa: E731
      step(p_train, p_frozen, x_pix, x_ids, x_mask))
  with torch.no_grad():
    for name, t in _interleaved({"vlm/forward": (vlm_fwd, None),
                                 "hf_shared/forward": (hf_shared, None)},
                                args.iters, args.warmup, SETTLE_S).items():
      record(name, t)
    if "hf_api" not in skip:
      record("hf_api/forward", _timeit(hf_api, args.iters, args.warmup, SETTLE_S))
  if "train_step" not in skip:
    for name, t in _interleaved({"vlm/train_step": (vlm_step, None),
                                 "hf/train_step": (hf_step, hf_zero)},
                                args.iters, args.warmup, SETTLE_S).items():
      record(name, t)
  tm = _timeit(lambda _: jax.block_until_ready(mm32(a32, b32)), 3, 0, SETTLE_S)
  peak_after = 2 * n ** 3 / tm["median_s"]
  print(f"== matmul peak float32 again after timing: {peak_after / 1e9:.1f} GFLOP/s")
  results["matmul_peak_flops_after"] = peak_after
  results["timings"] = timings

  # ---- summary ----------------------------------------------------------------------------------
  rows = []
  pairs = [("forward", "vlm/forward", "hf_shared/forward", "HF, vision once"),
           ("forward", "vlm/forward", "hf_api/forward", "HF API, 2 calls"),
           ("train_step", "vlm/train_step", "hf/train_step", "HF")]
  for work, kv, kh, label in pairs:
    if kv not in timings or kh not in timings:
      continue
    tv, th = timings[kv]["median_s"], timings[kh]["median_s"]
    f = flops[work]
    row = {"workload": work, "hf_variant": label, "vlm_ms": tv * 1e3, "hf_ms": th * 1e3,
           "vlm_img_s": B / tv, "hf_img_s": B / th, "ratio_vlm_over_hf": th / tv,
           "vlm_gflop_s": f / tv / 1e9 if f else None,
           "vlm_frac_peak": f / tv / peak_ref if f else None,
           "hf_gflop_s_same_work": f / th / 1e9 if f and label != "HF API, 2 calls" else None}
    rows.append(row)
  results["summary"] = rows
  print(f"\n== summary: {args.preset}, B={B}, T={T}, vlm {args.dtype} on {env['device_kind']} "
        f"vs HF torch fp32 CPU ({env['torch_num_threads']} threads); ratio = vlm img/s / HF img/s; "
        f"peak = {peak_ref / 1e9:.1f} GFLOP/s ({args.dtype} {n}^3 dot)")
  hdr = (f"{'workload':11s} {'HF variant':16s} {'vlm img/s':>10s} {'HF img/s':>10s} "
         f"{'vlm/HF':>7s} {'vlm GFLOP/s':>12s} {'% peak':>7s} {'HF GFLOP/s':>11s}")
  print(hdr)
  print("-" * len(hdr))
  for r in rows:
    gf = f"{r['vlm_gflop_s']:.1f}" if r["vlm_gflop_s"] else "n/a"
    fp = f"{100 * r['vlm_frac_peak']:.1f}" if r["vlm_frac_peak"] else "n/a"
    hg = f"{r['hf_gflop_s_same_work']:.1f}" if r["hf_gflop_s_same_work"] else "-"
    print(f"{r['workload']:11s} {r['hf_variant']:16s} {r['vlm_img_s']:10.2f} {r['hf_img_s']:10.2f} "
          f"{r['ratio_vlm_over_hf']:7.2f} {gf:>12s} {fp:>7s} {hg:>11s}")
  print("(HF GFLOP/s = vlm's XLA FLOP count / HF time: the same work, except for the API variant "
        "which runs the vision tower twice)")
  if args.json:
    with open(args.json, "w") as fh:
      json.dump(results, fh, indent=2, default=str)
    print(f"wrote {args.json}")
  return results


if __name__ == "__main__":
  main()
