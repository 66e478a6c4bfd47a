"""Tiny random HF BLIP-2 retrieval models for the Q-Former / conversion tests (torch, CPU, fp32)."""
from __future__ import annotations

import numpy as np
import torch
import transformers

VOCAB = 103
NUM_QUERIES = 4


def tiny_hf_config(**qformer_overrides) -> transformers.Blip2Config:
  """Vision 32 wide, 2 layers, image 28 / patch 14; Q-Former 32 wide, 4 layers, 4 heads."""
  vision = dict(hidden_size=32, intermediate_size=40, num_hidden_layers=2, num_attention_heads=4,
                image_size=28, patch_size=14, layer_norm_eps=1e-6)
  qformer = dict(hidden_size=32, num_hidden_layers=4, num_attention_heads=4, intermediate_size=37,
                 cross_attention_frequency=2, use_qformer_text_input=True, vocab_size=VOCAB,
                 max_position_embeddings=24)
  qformer.update(qformer_overrides)
  return transformers.Blip2Config(vision_config=vision, qformer_config=qformer,
                                  num_query_tokens=NUM_QUERIES, image_text_hidden_size=16)


def randomize_(model: torch.nn.Module, seed: int = 0, scale: float = 0.2) -> torch.nn.Module:
  """Fills every parameter with random values (LayerNorm scales around 1), in place.

  ``scale`` 0.2 keeps the softmaxes away from saturation, where float32 rounding differences
  between torch and XLA get amplified (at 0.3 the Q-Former differs by ~2e-5).
  """
  gen = torch.Generator().manual_seed(seed)
  with torch.no_grad():
    for name, p in model.named_parameters():
      noise = torch.randn(p.shape, generator=gen)
      if "layernorm" in name.lower() or "layer_norm" in name.lower():
        p.copy_(1.0 + 0.2 * noise if name.endswith("weight") else 0.2 * noise)
      else:
        p.copy_(scale * noise)
  return model.eval()


def tiny_hf_retrieval(seed: int = 0, **qformer_overrides):
  torch.manual_seed(seed)
  model = transformers.Blip2ForImageTextRetrieval(tiny_hf_config(**qformer_overrides))
  return randomize_(model, seed)


def inputs(seed: int = 0, batch: int = 2, length: int = 7):
  """pixel_values NCHW float32, input_ids [B,T] starting with 101 % VOCAB, padded attention mask."""
  rng = np.random.default_rng(seed)
  pixels = rng.standard_normal((batch, 3, 28, 28)).astype(np.float32)
  ids = rng.integers(1, VOCAB, size=(batch, length)).astype(np.int64)
  mask = np.ones((batch, length), np.int64)
  if batch > 1:
    mask[1, length - 3:] = 0
    ids[1, length - 3:] = 0
  return pixels, ids, mask


def nhwc(pixels_nchw: np.ndarray) -> np.ndarray:
  return np.ascontiguousarray(pixels_nchw.transpose(0, 2, 3, 1))


def max_abs(a, b) -> float:
  return float(np.max(np.abs(np.asarray(a, np.float64) - np.asarray(b, np.float64))))
