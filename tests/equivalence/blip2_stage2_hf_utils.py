"""Tiny random HF ``Blip2ForConditionalGeneration`` models (OPT or FlanT5-style T5) for the
stage-2 equivalence and conversion tests (torch, CPU, float32, eval mode).

Sizes: vision 32 wide, 2 layers, image 28 / patch 14 (5 tokens); Q-Former 32 wide, 2 layers
(cross-attention every layer), dropout 0 (so vlm's training-mode Q-Former is deterministic);
``NUM_QUERIES`` queries; LLM 32 wide, 2 layers, 4 heads, ``VOCAB`` tokens of which the last one
(``IMAGE_TOKEN``) is HF's ``<image>`` placeholder.
"""
from __future__ import annotations

import numpy as np
import torch
import transformers

from tests.equivalence.blip2_hf_utils import randomize_

VOCAB = 101
IMAGE_TOKEN = VOCAB - 1
NUM_QUERIES = 4
IMAGE_SIZE = 28
# OPT special ids (HF OPTConfig defaults): pad 1, bos = eos = 2. T5: pad 0 = start, eos 1.
OPT_PAD, OPT_BOS = 1, 2
T5_PAD, T5_EOS = 0, 1


def _vision_qformer():
  vision = dict(hidden_size=32, intermediate_size=40, num_hidden_layers=2, num_attention_heads=4,
                image_size=IMAGE_SIZE, patch_size=14, layer_norm_eps=1e-6)
  qformer = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=37,
                 cross_attention_frequency=1, use_qformer_text_input=False, vocab_size=30,
                 max_position_embeddings=24, hidden_dropout_prob=0.0,
                 attention_probs_dropout_prob=0.0, encoder_hidden_size=32)
  return vision, qformer


def text_config(kind: str) -> dict:
  if kind == "opt":
    return dict(model_type="opt", vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2,
                ffn_dim=37, num_attention_heads=4, max_position_embeddings=48,
                word_embed_proj_dim=32, dropout=0.0, attention_dropout=0.0,
                do_layer_norm_before=True, pad_token_id=OPT_PAD, bos_token_id=OPT_BOS,
                eos_token_id=OPT_BOS)
  # BLIP-2's FlanT5: gated FFN with exact GELU, untied head.
  return dict(model_type="t5", vocab_size=VOCAB, d_model=32, d_kv=8, d_ff=37, num_layers=2,
              num_decoder_layers=2, num_heads=4, relative_attention_num_buckets=8,
              relative_attention_max_distance=16, feed_forward_proj="gated-gelu",
              dense_act_fn="gelu", tie_word_embeddings=False, dropout_rate=0.0,
              pad_token_id=T5_PAD, eos_token_id=T5_EOS, decoder_start_token_id=T5_PAD)


def tiny_hf_config(kind: str) -> transformers.Blip2Config:
  vision, qformer = _vision_qformer()
  return transformers.Blip2Config(vision_config=vision, qformer_config=qformer,
                                  text_config=text_config(kind), num_query_tokens=NUM_QUERIES,
                                  image_token_index=IMAGE_TOKEN)


# LLM weight scales (layers, embeddings / head). "exact": small enough that float32 logits stay
# within 1e-5 of HF; "varied": larger, so the tiny random LLMs' greedy and beam outputs vary
# instead of repeating one token (checked on seed 0), for the token-level generation tests.
LLM_SCALES = {("opt", False): (0.2, 0.5), ("t5", False): (0.15, 0.3),
              ("opt", True): (1.0, 1.0), ("t5", True): (0.5, 3.0)}


def tiny_hf_stage2(kind: str, seed: int = 0, scale: float = 0.2, varied: bool = False):
  """A randomised ``Blip2ForConditionalGeneration`` (``kind`` "opt" or "t5") in eval mode.

  Vision tower and Q-Former: :func:`randomize_` with ``scale``; the LLM's matrices are redrawn
  with :data:`LLM_SCALES` ``[kind, varied]`` (norms stay around 1).
  """
  torch.manual_seed(seed)
  model = transformers.Blip2ForConditionalGeneration(tiny_hf_config(kind)).eval()
  randomize_(model, seed, scale=scale)
  layer_scale, embed_scale = LLM_SCALES[kind, varied]
  gen = torch.Generator().manual_seed(seed + 5)
  with torch.no_grad():
    for name, p in model.language_model.named_parameters():
      if "norm" in name:
        continue
      s = embed_scale if ("embed" in name or "shared" in name or "lm_head" in name) else layer_scale
      p.copy_(s * torch.randn(p.shape, generator=gen))
  return model.eval()


def images(seed: int = 0, batch: int = 3) -> np.ndarray:
  """pixel_values NCHW float32 [B,3,28,28]."""
  return np.random.default_rng(seed).standard_normal(
      (batch, 3, IMAGE_SIZE, IMAGE_SIZE)).astype(np.float32)


def hf_grads(model, names) -> dict[str, np.ndarray]:
  return {n: p.grad.detach().numpy().copy() for n, p in model.named_parameters() if n in names}
