r"""Qwen3-VL instruction tuning: chat turns, loss on the assistant tokens only.

Run (CPU, random-weight tiny Qwen3-VL on the embedded real data: COCO photos with their human
captions as chat turns, OK-VQA questions on those photos, the demo image conversations and the
ActivityNet video question/answer turns, packed into 512-token rows; about 10 minutes on 2 cores):

  python scripts/train.py --config configs/qwen3_vl/sft.py:tiny --workdir runs/qwen_sft

From released weights (any Qwen3-VL, Qwen3-VL-MoE or Qwen2.5-VL HF directory; its config.json
replaces the preset):

  python scripts/train.py --config configs/qwen3_vl/sft.py:2b --workdir runs/qwen_sft_2b \
    --config.init.hf_checkpoint=/path/to/Qwen3-VL-2B-Instruct

On a TPU pod (same command on every host; FSDP over all chips):

  python scripts/train.py --multihost --config configs/qwen3_vl/sft.py:8b --workdir gs://bucket/sft \
    --config.init.hf_checkpoint=/path/to/Qwen3-VL-8B-Instruct --config.mesh.shape.fsdp=-1

Variants: tiny, 2b, 8b, 30b_a3b, 235b_a22b (8,192-token rows, global batch 1024, peak lr 1e-5).
Export the result: python scripts/convert_hf.py --from_workdir runs/qwen_sft --output DIR.
At the end: the held-out loss on the COCO val captions and greedy captions of the 159 held-out
photos scored with CIDEr / BLEU-4 beside the most-frequent-training-caption baseline.
"""
from vlm.tasks.qwen_vl import qwen_vl_config


def get_config(arg: str | None = None):
  return qwen_vl_config("sft", arg)
