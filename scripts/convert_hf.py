r"""Round-trips an HF Qwen3-VL / Qwen3-VL-MoE / Qwen2.5-VL / BLIP-2 directory through vlm params.

  python scripts/convert_hf.py --input /path/to/Qwen3-VL-2B-Instruct --output /tmp/qwen3vl_rt

Loads ``--input`` with :func:`vlm.load_pretrained` (so every key and shape is checked against the
config), writes it back with the matching saver (``save_hf_qwen3_vl`` / ``save_hf_blip2``) to
``--output``, then reloads the output and checks that every parameter is bit-identical. Useful as a
checkpoint check and to write vlm-trained params in the HF layout.
"""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from absl import app, flags  # noqa: E402

FLAGS = flags.FLAGS


def define_flags():
  """Command-line flags (defined only when run as a script, so tests can import ``run``)."""
  flags.DEFINE_string("input", None, "HF checkpoint directory (config.json + safetensors).")
  flags.DEFINE_string("output", None, "Directory to write.")
  flags.DEFINE_string("max_shard_size", None, "Shard the output, e.g. 2GB (default: one file).")
  flags.mark_flags_as_required(["input", "output"])


def convert(src: str, dst: str, max_shard_size: str | None = None) -> int:
  """Loads ``src``, saves to ``dst``, reloads and compares. Returns the number of parameters.

  Raises:
    ValueError: unsupported model type, mismatched weights, or a round trip that changes a value.
  """
  import jax
  import numpy as np

  import vlm
  from vlm.models.qwen3_vl import Qwen3VL

  model, params, _ = vlm.load_pretrained(src)
  if isinstance(model, Qwen3VL):
    from vlm.convert.hf_qwen3_vl import save_hf_qwen3_vl as save
  else:
    from vlm.convert.hf_blip2 import save_hf_blip2 as save
  save(model.config, params, dst, max_shard_size)
  _, params2, _ = vlm.load_pretrained(dst)
  flat1 = dict(jax.tree_util.tree_flatten_with_path(params)[0])
  flat2 = dict(jax.tree_util.tree_flatten_with_path(params2)[0])
  if set(flat1) != set(flat2):
    raise ValueError(f"round trip changed the parameter set: {set(flat1) ^ set(flat2)}")
  for k, v in flat1.items():
    if not np.array_equal(np.asarray(v), np.asarray(flat2[k])):
      raise ValueError(f"round trip changed {jax.tree_util.keystr(k)}")
  return sum(int(np.size(v)) for v in flat1.values())


def main(argv):
  del argv
  n = convert(FLAGS.input, FLAGS.output, FLAGS.max_shard_size)
  print(f"wrote {FLAGS.output}: {n:,} parameters, round trip identical")


if __name__ == "__main__":
  define_flags()
  app.run(main)
