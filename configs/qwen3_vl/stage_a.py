r"""Qwen3-VL stage A: vision-language alignment. The ViT (patch embedding, position table, blocks),
the merger and the DeepStack mergers train; the LLM is frozen (no gradient, no optimizer state).
Rows: image then caption, loss on the caption, 8,192-token packed rows.

  python scripts/train.py --config configs/qwen3_vl/stage_a.py:tiny --workdir runs/qwen_a

Variants: tiny (CPU), 2b, 8b, 30b_a3b, 235b_a22b. ``:merger_only`` suffixes are separate stages:
``configs/qwen3_vl/stage_a.py:2b,merger_only`` trains only the merger and the DeepStack mergers
(the Qwen3-VL report's first stage, arXiv:2511.21631 section 3).

On a TPU pod (every host; start from the released LLM+ViT weights):

  python scripts/train.py --multihost --config configs/qwen3_vl/stage_a.py:8b --workdir gs://bucket/a \
    --config.init.hf_checkpoint=/path/to/Qwen3-VL-8B --config.mesh.shape.fsdp=-1
"""
from vlm.tasks.qwen_vl import qwen_vl_config


def get_config(arg: str | None = None):
  variant, _, option = (arg or "tiny").partition(",")
  if option not in ("", "merger_only"):
    raise ValueError(f"unknown stage A option {option!r}; use 'merger_only' or nothing")
  return qwen_vl_config("a_merger_only" if option else "a", variant)
