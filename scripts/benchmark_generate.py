"""Generation throughput of vlm's Qwen3-VL (:mod:`vlm.inference.generate`) against HF PyTorch.

Usage::

  python scripts/benchmark_generate.py                          # hidden 256, 4 layers, N=32, B=2
  python scripts/benchmark_generate.py --hidden_size 512 --layers 8 --new_tokens 64 --iters 5
  python scripts/benchmark_generate.py --json /tmp/bench_generate.json
  python scripts/benchmark_generate.py --torch_threads 1 --iters 5   # on a shared/loaded CPU: HF's
                                                                      # multi-threaded timings swing

What it does, in one process with one config:

1. Builds a random ``Qwen3VLForConditionalGeneration`` (text: ``--hidden_size`` x ``--layers``,
   ``--heads`` heads, ``--kv_heads`` KV heads, head_dim ``--head_dim``, vocab ``--vocab``,
   interleaved MRoPE; vision: a tiny 2-layer ViT, patch 8, merge 2, deepstack on both layers),
   weights N(0, 1/fan_in) (norms 1 + 0.1 N; ``tests/equivalence/qwen_hf_utils.randomize_hf``) so
   greedy decoding is well conditioned, saves it with
   ``save_pretrained`` to a temp dir and reads it back with
   :func:`vlm.convert.hf_qwen3_vl.load_hf_qwen3_vl` (what :func:`vlm.load_pretrained` uses): both
   sides hold the same weights.
2. The same batch for both: B=2 left-padded prompts, each ``text + <vision_start> <image>*n
   <vision_end> + text`` with one random image (``--grid`` patches per side; row 1 has a smaller
   image), packed pixel rows ``[Np, 3*2*8*8]`` + ``image_grid_thw`` as the HF processor gives.
   vlm runs at exactly the HF shapes (``prompt_bucket=1``, ``max_patches = Np``).
3. Timings (after ``--warmup`` untimed calls; median of ``--iters``; vlm and HF alternate):

   * prefill: vlm = the jitted prefill of ``generate`` (vision tower + full prompt through the
     text model into the KV cache + first token; host-side ``prepare_inputs`` not included, it is
     reported separately); HF = ``model(**inputs, use_cache=True, logits_to_keep=1)`` (what
     ``generate`` runs for its first step). prefill tokens/s = B * prompt length / time.
   * decode: vlm = ``generate``'s jitted decode call, which runs the ``N - 1`` one-token steps
     as one on-device ``lax.while_loop`` (the first new token comes from the prefill; no stop
     token can end it early); HF = ``model.generate(do_sample=False,
     max_new_tokens=N, min_new_tokens=N)`` minus the median HF prefill time. decode tokens/s =
     B * (N - 1) / time (both sides decode N - 1 steps after the prefill).
   * vlm ``generate()`` end to end (host prep + prefill + loop), for reference.

   Prints tokens/s for both and the ratio vlm/HF, versions, thread counts, and whether the greedy
   tokens of ``vlm.inference.generate.generate`` equal HF's (both in float32).

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

from bench_common import cpu_model, timeit_interleaved  # noqa: E402

# Pause before each timed call so that idle worker threads of the other library stop spinning.
SETTLE_S = 0.2
PAD = 0


def parse_args(argv=None):
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                              formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--hidden_size", type=int, default=256, help="text hidden size")
  p.add_argument("--layers", type=int, default=4, help="text decoder layers")
  p.add_argument("--heads", type=int, default=4, help="query heads")
  p.add_argument("--kv_heads", type=int, default=2, help="key/value heads (GQA)")
  p.add_argument("--head_dim", type=int, default=64, help="head dim (multiple of 8)")
  p.add_argument("--intermediate_size", type=int, default=None, help="MLP size (default 3x hidden)")
  p.add_argument("--vocab", type=int, default=2048, help="vocabulary size (>= 300)")
  p.add_argument("--grid", type=int, default=8,
                 help="patches per image side for row 0 (even; row 1 gets half the height when g %% 4 == 0)")
  p.add_argument("--text_tokens", type=int, default=16, help="text tokens around each image")
  p.add_argument("--new_tokens", type=int, default=32, help="N new tokens per row (>= 2)")
  p.add_argument("--iters", type=int, default=3, help="timed iterations (median reported)")
  p.add_argument("--warmup", type=int, default=1, help="untimed calls before timing")
  p.add_argument("--hf_device", default="cpu",
                 help="torch device for HF (cpu, cuda); use cuda when jax runs on a GPU")
  p.add_argument("--torch_threads", type=int, default=None,
                 help="torch.set_num_threads (default: torch's default)")
  p.add_argument("--attn", default="sdpa", choices=("sdpa", "eager"),
                 help="HF attention implementation")
  p.add_argument("--seed", type=int, default=0)
  p.add_argument("--json", default=None, help="also write every number to this JSON file")
  args = p.parse_args(argv)
  if args.new_tokens < 2:
    p.error("--new_tokens must be >= 2 (decode time = N - 1 steps after the prefill)")
  if args.grid < 2 or args.grid % 2:
    p.error("--grid must be an even number >= 2 (spatial merge 2)")
  if args.head_dim % 8:
    p.error("--head_dim must be a multiple of 8 (MRoPE sections)")
  if args.vocab < 300:
    p.error("--vocab must be >= 300 (special ids live at vocab - 8 .. vocab - 1)")
  if args.iters < 1:
    p.error("--iters must be >= 1")
  return args


def main(argv=None):
  args = parse_args(argv)

  import flax
  import jax
  import jax.numpy as jnp
  import numpy as np
  import torch
  import transformers
  from transformers import Qwen3VLConfig as HFConfig, Qwen3VLForConditionalGeneration

  from tests.equivalence.qwen_hf_utils import randomize_hf
  from vlm.convert.hf_qwen3_vl import load_hf_qwen3_vl
  from vlm.inference.generate import compiled, generate, prepare_inputs
  from vlm.models.qwen3 import init_cache
  from vlm.models.qwen3_vl import Qwen3VL

  if args.torch_threads:
    torch.set_num_threads(args.torch_threads)
  V, N = args.vocab, args.new_tokens
  IMG, VID, VS, VE, EOS = V - 8, V - 7, V - 6, V - 5, V - 4

  env = {
      "python": platform.python_version(), "jax": jax.__version__,
      "jaxlib": __import__("jaxlib").__version__, "flax": flax.__version__,
      "torch": torch.__version__, "transformers": transformers.__version__,
      "numpy": np.__version__, "jax_devices": [str(d) for d in jax.devices()],
      "jax_backend": jax.default_backend(), "device_kind": jax.devices()[0].device_kind,
      "torch_device": args.hf_device, "os_cpu_count": os.cpu_count(),
      "cpu_affinity": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
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
  hd = args.head_dim
  half = hd // 2
  section = [half - 2 * (half * 5 // 16), half * 5 // 16, half * 5 // 16]  # 64 -> [12, 10, 10]
  vision = dict(depth=2, hidden_size=64, num_heads=2, intermediate_size=128,
                out_hidden_size=args.hidden_size, deepstack_visual_indexes=[0, 1],
                num_position_embeddings=64, patch_size=8, temporal_patch_size=2,
                spatial_merge_size=2)
  text = dict(vocab_size=V, hidden_size=args.hidden_size,
              intermediate_size=args.intermediate_size or 3 * args.hidden_size,
              num_hidden_layers=args.layers, num_attention_heads=args.heads,
              num_key_value_heads=args.kv_heads, head_dim=hd, rms_norm_eps=1e-6,
              rope_theta=10000.0, max_position_embeddings=4096,
              rope_scaling={"rope_type": "default", "mrope_section": section,
                            "mrope_interleaved": True})
  torch.manual_seed(args.seed)
  cfg = HFConfig(vision_config=vision, text_config=text, image_token_id=IMG, video_token_id=VID,
                 vision_start_token_id=VS, vision_end_token_id=VE)
  cfg._attn_implementation = args.attn
  hf = randomize_hf(Qwen3VLForConditionalGeneration(cfg), args.seed + 1)
  with tempfile.TemporaryDirectory() as tmp:
    hf.save_pretrained(tmp, safe_serialization=True)
    config, params_np = load_hf_qwen3_vl(tmp)
  model = Qwen3VL(config)
  params = jax.device_put(jax.tree_util.tree_map(jnp.asarray, params_np))
  n_params = sum(x.size for x in jax.tree_util.tree_leaves(params))

  # ---- 2. Same batch ---------------------------------------------------------------------------
  g = args.grid
  grids = np.array([[1, g, g], [1, g // 2 if g % 4 == 0 else g, g]])
  rng = np.random.RandomState(args.seed)
  txt = lambda n: list(rng.randint(1, IMG - 1, size=n))  # noqa: E731
  blk = lambda grid: [VS] + [IMG] * (int(np.prod(grid)) // 4) + [VE]  # noqa: E731
  t = args.text_tokens
  rows = [txt(t // 2) + blk(grids[0]) + txt(t - t // 2),
          txt(t // 4) + blk(grids[1]) + txt(t // 2)]
  L = max(map(len, rows))
  ids = np.full((2, L), PAD, np.int64)
  mask = np.zeros((2, L), np.int64)
  for i, r in enumerate(rows):
    ids[i, L - len(r):] = r
    mask[i, L - len(r):] = 1
  n_patch = int(np.prod(grids, axis=1).sum())
  pixels = rng.standard_normal((n_patch, 3 * 2 * 8 * 8)).astype(np.float32)
  B = ids.shape[0]
  batch = dict(input_ids=ids, attention_mask=mask, pixel_values=pixels, image_grid_thw=grids)
  dev = torch.device(args.hf_device)
  hf = hf.to(dev)
  hf_in = {k: torch.tensor(v).to(dev) for k, v in
           dict(input_ids=ids, attention_mask=mask, pixel_values=pixels, image_grid_thw=grids).items()}
  sync = torch.cuda.synchronize if dev.type == "cuda" else (lambda: None)
  print(f"\n== config: text {args.layers}x{args.hidden_size} (heads {args.heads}, kv "
        f"{args.kv_heads}, head_dim {hd}, mlp {text['intermediate_size']}, vocab {V}, mrope "
        f"{section}); vision 2x64 patch 8 merge 2; {n_params:,} params; float32 both sides; "
        f"HF attn {hf.config._attn_implementation}")
  print(f"   batch: B={B}, prompt length {L} (left padded; real {mask.sum(1).tolist()}), image "
        f"grids {grids.tolist()} = {n_patch} patches; N={N} new tokens")

  # ---- vlm pieces (generate's internals, same shapes as HF) -----------------------------------
  kw = dict(pad_token_id=PAD, prompt_bucket=1, max_patches=n_patch)
  t0 = time.perf_counter()
  inp = prepare_inputs(config, batch, **kw)
  prep_s = time.perf_counter() - t0
  lp = inp["input_ids"].shape[1]
  assert lp == L, (lp, L)
  fns = compiled(model, 0.0, 1.0, PAD)
  key = jax.random.PRNGKey(0)
  x_ids, x_pos = jnp.asarray(inp["input_ids"]), jnp.asarray(inp["position_ids"])
  x_mask, x_pix = jnp.asarray(inp["attention_mask"]), jnp.asarray(inp["pixel_values"])
  tables, vindex = inp["vision_tables"], inp["visual_token_index"]

  def new_cache(_=None):
    return jax.block_until_ready(init_cache(config.text, B, lp + N, model.dtype))

  def vlm_prefill(cache):
    return jax.block_until_ready(fns.prefill(params, x_ids, x_pos, x_mask, x_pix, tables,
                                             vindex, cache, key, None))

  def vlm_after_prefill():
    return vlm_prefill(new_cache())

  deltas = jnp.asarray(inp["rope_deltas"], jnp.int32)
  no_eos = jnp.asarray([-1], jnp.int32)  # never emitted: exactly N - 1 steps, like min_new_tokens
  not_done = jnp.zeros((B,), bool)

  def vlm_decode(state):
    tok, cache = state
    out, steps = fns.decode(params, tok, cache, deltas, lp, jnp.asarray(N, jnp.int32), no_eos,
                            key, not_done, None)
    out = np.asarray(out)
    assert int(steps) == N - 1, int(steps)
    return out

  def vlm_generate(_):
    return generate(model, params, batch, max_new_tokens=N, eos_token_ids=[EOS], **kw)

  # ---- HF pieces --------------------------------------------------------------------------------
  def hf_prefill(_):
    with torch.no_grad():
      out = hf(**hf_in, use_cache=True, logits_to_keep=1).logits
      sync()
      return out

  def hf_generate(_):
    with torch.no_grad():
      return hf.generate(**hf_in, do_sample=False, max_new_tokens=N, min_new_tokens=N,
                         eos_token_id=EOS, pad_token_id=PAD).cpu().numpy()[:, L:]

  # ---- compile + greedy check -------------------------------------------------------------------
  t0 = time.perf_counter()
  got = vlm_generate(None)
  compile_s = time.perf_counter() - t0
  want = hf_generate(None)
  same = got.shape == want.shape and bool((got == want).all())
  agree = (got == want).mean() if got.shape == want.shape else 0.0
  print(f"\n== vlm first generate() (prefill + decode compile): {compile_s:.1f}s; host "
        f"prepare_inputs {prep_s * 1e3:.1f} ms")
  print(f"== greedy tokens identical vlm vs HF: {same} ({agree * 100:.1f}% of {got.size} "
        f"positions agree)")
  print(f"   vlm {got.tolist()}")
  print(f"   hf  {want.tolist()}")
  if (want == EOS).any() or (got == EOS).any():
    print("   note: EOS was emitted; HF's min_new_tokens masks it, so the rows may differ there")

  # ---- timing -----------------------------------------------------------------------------------
  print(f"\n== timing ({args.warmup} warm-up, median of {args.iters}; vlm and HF alternate)")
  timings = {}

  def record(name, tm):
    timings[name] = tm
    print(f"  {name:22s} {tm['median_s'] * 1e3:9.1f} ms  "
          f"[{', '.join(f'{x * 1e3:.1f}' for x in tm['times_s'])}]", flush=True)

  for name, tm in timeit_interleaved({"vlm/prefill": (vlm_prefill, new_cache),
                                      "hf/prefill": (hf_prefill, None)},
                                     args.iters, args.warmup, SETTLE_S).items():
    record(name, tm)
  for name, tm in timeit_interleaved({"vlm/decode": (vlm_decode, vlm_after_prefill),
                                      "hf/generate": (hf_generate, None),
                                      "vlm/generate": (vlm_generate, None)},
                                     args.iters, args.warmup, SETTLE_S).items():
    record(name, tm)
  hf_decode = timings["hf/generate"]["median_s"] - timings["hf/prefill"]["median_s"]

  # ---- summary ----------------------------------------------------------------------------------
  pt = B * L
  dt = B * (N - 1)
  rows_out = [
      ("prefill", "tokens/s", pt / timings["vlm/prefill"]["median_s"],
       pt / timings["hf/prefill"]["median_s"]),
      ("decode", "tokens/s", dt / timings["vlm/decode"]["median_s"], dt / hf_decode),
      ("generate e2e", "new tok/s", B * N / timings["vlm/generate"]["median_s"],
       B * N / timings["hf/generate"]["median_s"]),
  ]
  print(f"\n== summary: text {args.layers}x{args.hidden_size}, B={B}, prompt {L} tokens "
        f"(prefill counts B*L = {pt}), N={N} (decode counts B*(N-1) = {dt}); vlm jax "
        f"{env['jax']} on {env['device_kind']} vs HF torch {env['torch']} on {args.hf_device} "
        f"({env['torch_num_threads']} threads); float32; greedy identical: {same}")
  hdr = f"{'phase':13s} {'unit':10s} {'vlm':>10s} {'HF':>10s} {'vlm/HF':>7s}"
  print(hdr)
  print("-" * len(hdr))
  summary = []
  for phase, unit, v, h in rows_out:
    print(f"{phase:13s} {unit:10s} {v:10.1f} {h:10.1f} {v / h:7.2f}")
    summary.append({"phase": phase, "unit": unit, "vlm": v, "hf": h, "ratio_vlm_over_hf": v / h})
  print(f"(HF decode = HF generate {timings['hf/generate']['median_s'] * 1e3:.1f} ms - HF prefill "
        f"{timings['hf/prefill']['median_s'] * 1e3:.1f} ms; vlm decode = {N - 1} steps "
        f"in one jitted while_loop; vlm prefill excludes host prepare_inputs "
        f"({prep_s * 1e3:.1f} ms), vlm/generate includes it)")
  results = {"env": env, "args": vars(args), "prompt_len": L, "n_patches": n_patch,
             "greedy_identical": same, "greedy_agreement": float(agree),
             "compile_s": compile_s, "prepare_inputs_s": prep_s, "timings": timings,
             "hf_decode_s": hf_decode, "summary": summary}
  if args.json:
    with open(args.json, "w") as fh:
      json.dump(results, fh, indent=2, default=str)
    print(f"wrote {args.json}")
  return results


if __name__ == "__main__":
  main()
