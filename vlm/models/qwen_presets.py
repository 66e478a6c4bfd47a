"""Named Qwen3-VL / Qwen3-VL-MoE / Qwen2.5-VL architectures (no weights).

Each preset is written as the HF ``config.json`` dict the released checkpoint would carry and goes
through the same parser as a downloaded directory (:func:`vlm.convert.hf_qwen3_vl.config_from_hf`),
so a preset and ``load_pretrained`` of the real checkpoint give equal configs. Sizes: spec sections
1.1-1.3 (``shared/design/qwen3vl_spec.md``), from the released ``config.json`` files; rows the spec
marks "(verify)" (Qwen3-VL-2B's MLP width, 235B's DeepStack indexes, Qwen2.5-VL-32B) follow the
spec and should be checked against the real file before a long run.

Use them to build a model from scratch (training, sharding plans, benchmarks at real shapes), e.g.
``Qwen3VL(qwen_config("qwen3_vl_8b"), scan_layers=True)``; for pretrained weights use
:func:`vlm.load_pretrained` on the downloaded directory instead. The ``*_tiny`` presets keep every
structural feature (GQA, q/k norm, DeepStack, MoE routing, window attention) at CPU-test sizes.
"""
from __future__ import annotations

import dataclasses
from typing import Any

_QWEN3_TEXT = dict(head_dim=128, rms_norm_eps=1e-6, rope_theta=5_000_000.0, vocab_size=151936,
                   attention_bias=False, hidden_act="silu", max_position_embeddings=262144,
                   rope_scaling={"rope_type": "default", "mrope_section": [24, 20, 20],
                                 "mrope_interleaved": True})
_QWEN3_TOKENS = dict(image_token_id=151655, video_token_id=151656, vision_start_token_id=151652,
                     vision_end_token_id=151653)
_SMALL_VISION = dict(depth=24, hidden_size=1024, intermediate_size=4096,
                     deepstack_visual_indexes=[5, 11, 17])
_LARGE_VISION = dict(depth=27, hidden_size=1152, intermediate_size=4304,
                     deepstack_visual_indexes=[8, 16, 24])
_VISION_COMMON = dict(num_heads=16, patch_size=16, temporal_patch_size=2, spatial_merge_size=2,
                      in_channels=3, num_position_embeddings=2304, hidden_act="gelu_pytorch_tanh")


def _qwen3_vl(vision: dict, layers: int, hidden: int, inter: int, heads: int, kv: int, tie: bool,
              moe: dict | None = None) -> dict:
  text = dict(_QWEN3_TEXT, num_hidden_layers=layers, hidden_size=hidden, intermediate_size=inter,
              num_attention_heads=heads, num_key_value_heads=kv, tie_word_embeddings=tie)
  if moe:
    text.update(moe, decoder_sparse_step=1, mlp_only_layers=[], norm_topk_prob=True)
  return dict(model_type="qwen3_vl_moe" if moe else "qwen3_vl", text_config=text,
              vision_config=dict(_VISION_COMMON, **vision, out_hidden_size=hidden),
              tie_word_embeddings=tie, **_QWEN3_TOKENS)


def _qwen2_5_vl(layers: int, hidden: int, inter: int, heads: int, kv: int, vocab: int,
                tie: bool) -> dict:
  return dict(model_type="qwen2_5_vl", num_hidden_layers=layers, hidden_size=hidden,
              intermediate_size=inter, num_attention_heads=heads, num_key_value_heads=kv,
              vocab_size=vocab, tie_word_embeddings=tie, rope_theta=1_000_000.0,
              rms_norm_eps=1e-6, hidden_act="silu",
              rope_scaling={"type": "mrope", "mrope_section": [16, 24, 24]},
              vision_config=dict(depth=32, hidden_size=1280, intermediate_size=3420, num_heads=16,
                                 patch_size=14, temporal_patch_size=2, spatial_merge_size=2,
                                 window_size=112, fullatt_block_indexes=[7, 15, 23, 31],
                                 hidden_act="silu", tokens_per_second=2, out_hidden_size=hidden),
              **_QWEN3_TOKENS)


def _tiny_vision(**kw) -> dict:
  return dict(_VISION_COMMON, depth=2, hidden_size=64, intermediate_size=128, num_heads=2,
              num_position_embeddings=64, deepstack_visual_indexes=[0, 1], **kw)


def _tiny_text(**kw) -> dict:
  return dict(_QWEN3_TEXT, num_hidden_layers=2, hidden_size=64, intermediate_size=128,
              num_attention_heads=4, num_key_value_heads=2, head_dim=16,
              rope_scaling={"rope_type": "default", "mrope_section": [4, 2, 2],
                            "mrope_interleaved": True}, tie_word_embeddings=True, **kw)


HF_CONFIGS: dict[str, dict[str, Any]] = {
    "qwen3_vl_2b": _qwen3_vl(_SMALL_VISION, 28, 2048, 6144, 16, 8, True),
    "qwen3_vl_4b": _qwen3_vl(_SMALL_VISION, 36, 2560, 9728, 32, 8, True),
    "qwen3_vl_8b": _qwen3_vl(_LARGE_VISION, 36, 4096, 12288, 32, 8, False),
    "qwen3_vl_32b": _qwen3_vl(_LARGE_VISION, 64, 5120, 25600, 64, 8, False),
    "qwen3_vl_30b_a3b": _qwen3_vl(_LARGE_VISION, 48, 2048, 6144, 32, 4, False,
                                  moe=dict(num_experts=128, num_experts_per_tok=8,
                                           moe_intermediate_size=768)),
    "qwen3_vl_235b_a22b": _qwen3_vl(_LARGE_VISION, 94, 4096, 12288, 64, 4, False,
                                    moe=dict(num_experts=128, num_experts_per_tok=8,
                                             moe_intermediate_size=1536)),
    "qwen2_5_vl_3b": _qwen2_5_vl(36, 2048, 11008, 16, 2, 151936, True),
    "qwen2_5_vl_7b": _qwen2_5_vl(28, 3584, 18944, 28, 4, 152064, False),
    "qwen2_5_vl_32b": _qwen2_5_vl(64, 5120, 27648, 40, 8, 152064, False),
    "qwen2_5_vl_72b": _qwen2_5_vl(80, 8192, 29568, 64, 8, 152064, False),
    # CPU-test sizes with the real vocabulary and special tokens (the bundled tokenizer works).
    "qwen3_vl_tiny": dict(model_type="qwen3_vl", text_config=_tiny_text(),
                          vision_config=_tiny_vision(out_hidden_size=64), tie_word_embeddings=True,
                          **_QWEN3_TOKENS),
    "qwen3_vl_moe_tiny": dict(
        model_type="qwen3_vl_moe",
        text_config=_tiny_text(num_experts=8, num_experts_per_tok=2, moe_intermediate_size=32,
                               decoder_sparse_step=1, mlp_only_layers=[], norm_topk_prob=True),
        vision_config=_tiny_vision(out_hidden_size=64), tie_word_embeddings=True,
        **_QWEN3_TOKENS),
}


def qwen_config(name: str, **text_overrides):
  """The :class:`vlm.models.qwen3_vl.Qwen3VLConfig` (or ``Qwen2_5_VLConfig``) called ``name``.

  Args:
    name: a key of :data:`HF_CONFIGS` (e.g. ``"qwen3_vl_8b"``, ``"qwen3_vl_30b_a3b"``,
      ``"qwen2_5_vl_7b"``, ``"qwen3_vl_tiny"``).
    **text_overrides: fields of :class:`vlm.models.qwen3.Qwen3TextConfig` to replace (e.g.
      ``num_hidden_layers=2`` for a shallow copy, ``moe_implementation="ragged"``).
  Raises:
    KeyError: unknown name (the known ones are listed).
    ValueError: overrides that make the config inconsistent (from the config classes).
  """
  from vlm.convert.hf_qwen3_vl import config_from_hf
  if name not in HF_CONFIGS:
    raise KeyError(f"unknown Qwen preset {name!r}; known: {sorted(HF_CONFIGS)}")
  config = config_from_hf(HF_CONFIGS[name])
  if text_overrides:
    config = dataclasses.replace(config, text=dataclasses.replace(config.text, **text_overrides))
  return config
