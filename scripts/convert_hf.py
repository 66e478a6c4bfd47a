r"""HF checkpoints in and out of vlm: round-trip an HF directory, or export a training workdir.

  python scripts/convert_hf.py --input /path/to/Qwen3-VL-2B-Instruct --output /tmp/qwen3vl_rt
  python scripts/convert_hf.py --from_workdir runs/qwen_sft --output /tmp/qwen_sft_hf [--step N]

``--input``: loads an HF Qwen3-VL / Qwen3-VL-MoE / Qwen2.5-VL / BLIP-2 directory with
:func:`vlm.load_pretrained` (so every key and shape is checked against the config), writes it back
with the matching saver (``save_hf_qwen3_vl`` / ``save_hf_blip2``) to ``--output``, then reloads
the output and checks that every parameter is bit-identical (a checkpoint check).

``--from_workdir``: exports a BLIP-2 stage-2 workdir as an HF ``Blip2ForConditionalGeneration``
directory (weights and ``config.json``), or a Qwen-VL training workdir (``scripts/train.py --config
configs/qwen3_vl/*.py``) with :func:`vlm.tasks.qwen_vl.export_hf`: the run config saved in the
checkpoint gives the model (the HF ``config.json`` the run started from, else its preset), the
parameters of the newest intact checkpoint (or ``--step``) are read on the host whatever device
count wrote them (scanned layers unstacked), and ``--output`` gets ``config.json`` + safetensors,
the tokenizer, ``preprocessor_config.json`` and ``generation_config.json``: a directory that
transformers' ``Qwen3VLForConditionalGeneration`` (``...MoeForConditionalGeneration``,
``Qwen2_5_VLForConditionalGeneration``) ``.from_pretrained`` and :func:`vlm.load_pretrained` open.
The output is then reloaded and checked bit-identical to the checkpoint's parameters.
"""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from absl import app, flags  # noqa: E402

FLAGS = flags.FLAGS


def define_flags():
  """Command-line flags (defined only when run as a script, so tests can import ``run``)."""
  flags.DEFINE_string("input", None, "HF checkpoint directory (config.json + safetensors).")
  flags.DEFINE_string("from_workdir", None, "Qwen-VL training workdir to export instead.")
  flags.DEFINE_integer("step", None, "--from_workdir: checkpoint step (default: newest intact).")
  flags.DEFINE_string("model_config", None, "--from_workdir: HF config.json (or its directory) "
                      "when the run's init.hf_checkpoint directory is gone.")
  flags.DEFINE_bool("overwrite", False, "--from_workdir: write into a non-empty --output.")
  flags.DEFINE_string("output", None, "Directory to write.")
  flags.DEFINE_string("max_shard_size", None, "Shard the output, e.g. 2GB (default: one file).")
  flags.mark_flags_as_required(["output"])
  flags.mark_flags_as_mutual_exclusive(["input", "from_workdir"], required=True)


def convert(src: str, dst: str, max_shard_size: str | None = None) -> int:
  """Loads ``src``, saves to ``dst``, reloads and compares. Returns the number of parameters.

  Raises:
    ValueError: unsupported model type, mismatched weights, or a round trip that changes a value.
  """
  import jax
  import numpy as np

  import vlm
  from vlm.models.qwen3_vl import Qwen3VL

  from vlm.models.blip2 import Blip2Stage2

  model, params, _ = vlm.load_pretrained(src)
  if isinstance(model, Qwen3VL):
    from vlm.convert.hf_qwen3_vl import save_hf_qwen3_vl as save
  elif isinstance(model, Blip2Stage2):
    from vlm.convert.hf_blip2 import save_hf_blip2_stage2
    save = lambda c, p, d, m: save_hf_blip2_stage2(c, p, d, max_shard_size=m)
  else:
    from vlm.convert.hf_blip2 import save_hf_blip2 as save
  save(model.config, params, dst, max_shard_size)
  _, params2, _ = vlm.load_pretrained(dst)
  _check_identical(params, params2, "round trip")
  return sum(int(np.size(v)) for v in jax.tree_util.tree_leaves(params))


def _check_identical(params, params2, what: str) -> None:
  import jax
  import numpy as np
  flat1 = dict(jax.tree_util.tree_flatten_with_path(params)[0])
  flat2 = dict(jax.tree_util.tree_flatten_with_path(params2)[0])
  if set(flat1) != set(flat2):
    raise ValueError(f"{what} changed the parameter set: {set(flat1) ^ set(flat2)}")
  for k, v in flat1.items():
    if not np.array_equal(np.asarray(v), np.asarray(flat2[k])):
      raise ValueError(f"{what} changed {jax.tree_util.keystr(k)}")


def convert_workdir(workdir: str, dst: str, step: int | None = None, *,
                    model_config: str | None = None, max_shard_size: str | None = None,
                    overwrite: bool = False) -> dict:
  """Exports a Qwen-VL training workdir to the HF directory ``dst`` and checks it.

  :func:`vlm.tasks.qwen_vl.export_hf`, then ``dst`` is read back with
  :func:`vlm.convert.hf_qwen3_vl.load_hf_qwen3_vl` (in the run's layer layout) and compared
  bit for bit with the checkpoint's parameters.

  Returns:
    ``export_hf``'s summary (``step``, ``output``, ``model_type``, ``num_params``, ``files``).
  Raises:
    FileNotFoundError: no (intact) checkpoint in ``workdir``, or the run's initial HF
      directory is gone (pass ``model_config``).
    ValueError: a non-Qwen workdir, a missing/damaged ``step``, parameters that do not fit the
      model config, or a written directory that does not read back identically.
    FileExistsError: ``dst`` not empty without ``overwrite``.
  """
  import jax
  import numpy as np

  from vlm.convert.hf_qwen3_vl import load_hf_qwen3_vl
  from vlm.tasks import qwen_vl
  from vlm.train import checkpoint

  task = checkpoint.saved_run_config(workdir)[1].get("task")
  if task == "blip2_stage2":
    return _convert_blip2_stage2_workdir(workdir, dst, step, max_shard_size=max_shard_size,
                                         overwrite=overwrite)
  if task != "qwen_vl":
    raise ValueError(f"{workdir} is a {task!r} run; --from_workdir exports BLIP-2 stage-2 and "
                     "Qwen-VL runs (a stage-1 model is written with "
                     "vlm.convert.hf_blip2.save_hf_blip2)")

  info = qwen_vl.export_hf(workdir, dst, step, model_config_path=model_config,
                           max_shard_size=max_shard_size, overwrite=overwrite)
  _, saved = checkpoint.restore_params(workdir, info["step"])
  scanned = "layers" in saved.get("language_model", {})
  _, back = load_hf_qwen3_vl(dst, np.float32, scan_layers=scanned,
                             scan_vision="blocks" in saved.get("visual", {}))
  _check_identical(jax.tree.map(lambda x: np.asarray(x, np.float32), saved), back,
                   f"exporting {workdir} step {info['step']}")
  return info


def _convert_blip2_stage2_workdir(workdir: str, dst: str, step: int | None, *,
                                  max_shard_size: str | None, overwrite: bool) -> dict:
  """A BLIP-2 stage-2 workdir as an HF ``Blip2ForConditionalGeneration`` directory (weights and
  ``config.json``; the LLM tokenizer is vlm's bundled one), read back and checked identical."""
  import jax
  import numpy as np

  from vlm.convert.hf_blip2 import load_hf_blip2_stage2, save_hf_blip2_stage2
  from vlm.tasks import get_task
  from vlm.train import checkpoint

  if os.path.isdir(dst) and os.listdir(dst) and not overwrite:
    raise FileExistsError(f"{dst} is not empty; pass --overwrite or another --output")
  got_step, config, params = checkpoint.restore_run(workdir, step)
  model = get_task(config.task).build_model(config)
  save_hf_blip2_stage2(model.config, params, dst, scan_layers=model.scan_layers,
                       max_shard_size=max_shard_size)
  _, back = load_hf_blip2_stage2(dst, scan_layers=model.scan_layers)
  _check_identical(jax.tree.map(np.asarray, params), back,
                   f"exporting {workdir} step {got_step}")
  return {"step": got_step, "output": os.path.abspath(dst), "model_type": "blip-2 stage 2 "
          f"({model.config.llm_kind})", "files": sorted(os.listdir(dst)),
          "num_params": sum(int(np.size(v)) for v in jax.tree_util.tree_leaves(params))}


def main(argv):
  del argv
  from absl import logging as absl_logging
  absl_logging.set_verbosity(absl_logging.WARNING)  # orbax's per-file INFO lines
  if FLAGS.from_workdir:
    try:
      info = convert_workdir(FLAGS.from_workdir, FLAGS.output, FLAGS.step,
                             model_config=FLAGS.model_config,
                             max_shard_size=FLAGS.max_shard_size, overwrite=FLAGS.overwrite)
    except (FileNotFoundError, FileExistsError, ValueError) as e:
      sys.exit(f"error: {e}")
    print(f"wrote {info['output']} ({info['model_type']}, step {info['step']}): "
          f"{info['num_params']:,} parameters, identical to the checkpoint; files "
          f"{', '.join(info['files'])}")
    return
  n = convert(FLAGS.input, FLAGS.output, FLAGS.max_shard_size)
  print(f"wrote {FLAGS.output}: {n:,} parameters, round trip identical")


if __name__ == "__main__":
  define_flags()
  app.run(main)
