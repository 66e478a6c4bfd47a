"""Stage-C long-context train step: compiled memory at 4k-32k tokens, xla vs chunked attention.

Usage::

  python scripts/benchmark_long_context.py                    # L = 4k, 8k, 16k, 32k chunked;
                                                              # xla up to 16k; run 32k once
  python scripts/benchmark_long_context.py --lengths 4096,8192 --xla_max_length 8192 --no_run
  python scripts/benchmark_long_context.py --json /tmp/long_context.json

What it does: the train step of the stage-C tiny recipe (``vlm.tasks.qwen_vl.qwen_vl_config("c",
"tiny")``: the random-weight tiny Qwen3-VL with the real 151,936-token vocabulary, the task's
chunked next-token loss, :func:`vlm.train.step.train_step` with the recipe's AdamW) on one
synthetic packed row (B = 1) of L tokens: 4 samples of L/4 tokens each, every sample an image of
L/16 patches (L/64 visual tokens behind ``<|vision_start|>``) followed by text; the patch buffer
holds Np = L/4 patches (so the ViT's sequence grows with L too), built with
:func:`vlm.data.packing.assemble_batch` and per-sample MRoPE positions from
:func:`vlm.models.rope_index.qwen3_vl_get_rope_index`. For each L and attention implementation
(the recipe's ``text_overrides.attention_implementation``, which routes the decoder and the ViT)
the step is jitted, lowered and compiled for the default backend, and the compiled
``memory_analysis()`` is printed: ``temp`` (buffers besides arguments and outputs: activations
kept for the backward, attention scores, logits chunks), ``args`` and ``out`` (state + batch,
new state + metrics), ``x prev`` = temp growth against the previous (half) length, and
``dx prev`` = growth of the *increment* ``temp(L) - temp(L/2)`` against the previous increment:
~2 is linear, ~4 quadratic. The increment is the clean measure: about 0.85 GiB of temp is
independent of L (the loss's [1, chunk, V] float32 logits chunks with their softmax and
cotangent, ~150 MiB each at V = 151,936, and the embedding-table gradient), so the plain ratio
of a linear program stays well below 2 at these sizes. ``xla`` materialises [B, H, L, L] float32 scores in the decoder and
[B, H, Np, Np] in the ViT; ``chunked`` only O(L x block). The loss never materialises
[B, L, V] logits in either (chunk ``config.loss.chunk_size`` tokens).

Then (unless ``--no_run``) one train step at the largest length is *run* with chunked attention
on this backend: wall time of the compiled step (compile excluded) and finiteness of loss and
grad norm are printed.

This is a benchmark, not a test: pytest never runs it. (A test compiling the step at two lengths
would take about a minute on the 2-core CI machine, each compile ~25 s; tests/nn/test_attention.py
checks the attention's own linear growth.)
"""
from __future__ import annotations

import argparse
import functools
import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import flax.linen as nn  # noqa: E402
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from vlm.data import packing  # noqa: E402
from vlm.data.qwen_batch import TokenizedSample  # noqa: E402
from vlm.models.rope_index import qwen3_vl_get_rope_index  # noqa: E402
from vlm.tasks import qwen_vl  # noqa: E402
from vlm.train import optim  # noqa: E402
from vlm.train.state import TrainState  # noqa: E402
from vlm.train.step import train_step  # noqa: E402

SAMPLES_PER_ROW = 4


def stage_c_config(length: int, implementation: str, block_size: int = 512):
  """The stage-C tiny recipe at ``length`` tokens per row (Np = length / 4) and ``implementation``.

  Raises: ValueError when ``length`` is not a multiple of 256 (the synthetic row's image grid).
  """
  if length % 256:
    raise ValueError(f"length {length} must be a multiple of 256")
  c = qwen_vl.qwen_vl_config("c", "tiny")
  c.data.max_length = length
  c.data.max_patches = length // 4
  c.model.text_overrides = dict(c.model.text_overrides, attention_implementation=implementation,
                                attention_block_size=block_size)
  return c


def _image_grid(patches: int, merge: int) -> tuple[int, int, int]:
  h = merge
  while (h * 2) ** 2 <= patches and patches % (h * 2) == 0:
    h *= 2
  return 1, h, patches // h


def synthetic_batch(config, model_cfg, seed: int = 0) -> dict:
  """One packed row (B = 1) of ``config.data.max_length`` tokens: ``SAMPLES_PER_ROW`` samples,
  each ``<|vision_start|>`` + image placeholders + ``<|vision_end|>`` + random text (loss on the
  text), the image filling 1 / SAMPLES_PER_ROW of the patch buffer; a few padding tokens end the
  row. Host numpy in the schema of :mod:`vlm.data.packing`."""
  rng = np.random.default_rng(seed)
  length, np_ = int(config.data.max_length), int(config.data.max_patches)
  vis = model_cfg.vision
  m = vis.spatial_merge_size
  grid = np.array([_image_grid(np_ // SAMPLES_PER_ROW, m)])
  units = int(np.prod(grid)) // (m * m)
  per_sample = length // SAMPLES_PER_ROW - (8 if length >= 1024 else 1)  # leave some padding
  samples = []
  for s in range(SAMPLES_PER_ROW):
    text = rng.integers(10, 150_000, size=per_sample - units - 2)
    ids = np.concatenate([[model_cfg.vision_start_token_id], np.full(units, model_cfg.image_token_id),
                          [model_cfg.vision_end_token_id], text]).astype(np.int32)
    target = np.zeros(len(ids), np.float32)
    target[units + 2:] = 1.0
    pos, _ = qwen3_vl_get_rope_index(ids[None].astype(np.int64), grid, None, None, m,
                                     model_cfg.image_token_id, model_cfg.video_token_id,
                                     model_cfg.vision_start_token_id)
    vi = np.full(len(ids), -1, np.int32)
    vi[1:units + 1] = np.arange(units)
    pixels = rng.standard_normal((int(np.prod(grid)), vis.patch_dim)).astype(np.float32)
    samples.append(TokenizedSample(input_ids=ids, target_mask=target,
                                   position_ids=np.asarray(pos)[:, 0].astype(np.int32),
                                   pixel_values=pixels, grid_thw=grid.astype(np.int64),
                                   visual_index=vi, where=f"synthetic:{s}"))
  return packing.assemble_batch([samples], max_length=length, max_patches=np_, vision_config=vis,
                                pad_token_id=0)


def _init_fn(model, batch):
  return lambda key: nn.unbox(qwen_vl.init_model(model, key, batch))


def make_state(config, model, tx, batch, *, abstract: bool):
  """TrainState for ``model`` (real arrays, or ShapeDtypeStructs when ``abstract``) and the mask."""
  init = _init_fn(model, batch)
  shapes = jax.eval_shape(init, jax.random.PRNGKey(0))
  mask = optim.trainable_mask(shapes, list(config.optim.frozen))
  if abstract:
    params = shapes
    opt_state = jax.eval_shape(lambda p: tx.init(optim.partition(p, mask)[0]), params)
    step = jax.ShapeDtypeStruct((), jnp.int32)
  else:
    params = jax.jit(init)(jax.random.PRNGKey(0))
    opt_state = jax.jit(lambda p: tx.init(optim.partition(p, mask)[0]))(params)
    step = jnp.zeros((), jnp.int32)
  return TrainState(step=step, params=params, opt_state=opt_state), mask


def jitted_step(config, model, tx, mask):
  return jax.jit(functools.partial(train_step, model=model, tx=tx, mask=mask,
                                   loss_fn=qwen_vl.loss_fn, loss_kwargs=dict(config.loss)),
                 donate_argnums=(0,))


def _abstract(tree):
  return jax.tree.map(lambda x: jax.ShapeDtypeStruct(np.shape(x), np.asarray(x).dtype)
                      if not isinstance(x, jax.ShapeDtypeStruct) else x, tree)


def compile_step(length: int, implementation: str, block_size: int = 512):
  """Compiles the stage-C train step at ``length``; returns (compiled, config, batch, seconds)."""
  config = stage_c_config(length, implementation, block_size)
  model = qwen_vl.build_model(config)
  tx = optim.make_optimizer(config.optim)
  batch = synthetic_batch(config, model.config)
  state, mask = make_state(config, model, tx, batch, abstract=True)
  t0 = time.perf_counter()
  compiled = jitted_step(config, model, tx, mask).lower(
      state, _abstract(batch), jax.ShapeDtypeStruct((2,), jnp.uint32)).compile()
  return compiled, config, batch, time.perf_counter() - t0


def memory_row(compiled) -> dict:
  m = compiled.memory_analysis()
  return {"temp": int(m.temp_size_in_bytes), "args": int(m.argument_size_in_bytes),
          "out": int(m.output_size_in_bytes), "alias": int(m.alias_size_in_bytes)}


def _mib(x: int) -> str:
  return f"{x / 2 ** 20:10.1f}"


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--lengths", default="4096,8192,16384,32768")
  p.add_argument("--implementations", default="chunked,xla")
  p.add_argument("--xla_max_length", type=int, default=16384,
                 help="compile xla only up to this length (its temp memory is quadratic)")
  p.add_argument("--block_size", type=int, default=512)
  p.add_argument("--no_run", action="store_true", help="skip running the chunked step")
  p.add_argument("--json", default="")
  args = p.parse_args(argv)
  lengths = [int(x) for x in args.lengths.split(",")]
  impls = args.implementations.split(",")
  print(f"backend {jax.default_backend()}, jax {jax.__version__}; stage-C tiny recipe, B=1, "
        f"Np=L/4, {SAMPLES_PER_ROW} samples with one image each; block {args.block_size}")
  print(f"{'impl':8s} {'L':>6s} {'Np':>6s} {'temp MiB':>10s} {'args MiB':>10s} {'out MiB':>10s} "
        f"{'x prev':>7s} {'dx prev':>7s} {'compile s':>9s}")
  results = []
  for impl in impls:
    prev = prev_inc = None
    for length in lengths:
      if impl == "xla" and length > args.xla_max_length:
        print(f"{impl:8s} {length:6d}   (skipped: above --xla_max_length={args.xla_max_length}; "
              "quadratic)")
        continue
      compiled, config, _, secs = compile_step(length, impl, args.block_size)
      row = memory_row(compiled)
      ratio = row["temp"] / prev if prev else float("nan")
      inc = row["temp"] - prev if prev else None
      inc_ratio = inc / prev_inc if inc and prev_inc else float("nan")
      prev, prev_inc = row["temp"], inc
      print(f"{impl:8s} {length:6d} {length // 4:6d} {_mib(row['temp'])} {_mib(row['args'])} "
            f"{_mib(row['out'])} {ratio:7.2f} {inc_ratio:7.2f} {secs:9.1f}", flush=True)
      results.append(dict(row, implementation=impl, length=length, growth=ratio,
                          increment_growth=inc_ratio, compile_seconds=secs))
      del compiled
  by = {(r["implementation"], r["length"]): r["temp"] for r in results}
  for length in lengths:
    if ("xla", length) in by and ("chunked", length) in by:
      print(f"L={length}: xla/chunked temp = {by[('xla', length)] / by[('chunked', length)]:.1f}x")

  run = None
  if not args.no_run:
    length = max(lengths)
    config = stage_c_config(length, "chunked", args.block_size)
    model = qwen_vl.build_model(config)
    tx = optim.make_optimizer(config.optim)
    batch = synthetic_batch(config, model.config)
    state, mask = make_state(config, model, tx, batch, abstract=False)
    step = jitted_step(config, model, tx, mask)
    t0 = time.perf_counter()
    compiled = step.lower(state, batch, jax.random.PRNGKey(0)).compile()
    compile_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    state, metrics = compiled(state, batch, jax.random.PRNGKey(0))
    metrics = jax.device_get(metrics)
    wall = time.perf_counter() - t0
    finite = bool(np.isfinite(metrics["loss"]) and np.isfinite(metrics["grad_norm"]))
    run = {"length": length, "compile_seconds": compile_s, "step_seconds": wall,
           "loss": float(metrics["loss"]), "grad_norm": float(metrics["grad_norm"]),
           "loss_tokens": float(metrics["loss_weight"]), "finite": finite,
           "real_tokens": int((batch["segment_ids"] > 0).sum())}
    print(f"ran one chunked train step at L={length} ({run['real_tokens']} real tokens, "
          f"{int(run['loss_tokens'])} loss tokens): {wall:.1f} s (compile {compile_s:.1f} s), "
          f"loss {run['loss']:.4f}, grad norm {run['grad_norm']:.4f}, finite: {finite}")
    if not finite:
      raise SystemExit("loss or grad norm is not finite")
  if args.json:
    with open(args.json, "w") as fh:
      json.dump({"compiled": results, "run": run, "backend": jax.default_backend()}, fh, indent=1)


if __name__ == "__main__":
  main()
