"""Shared by the Qwen equivalence tests and scripts/benchmark_generate.py: well-conditioned random
weights for tiny HF PyTorch models (torch is a test dependency; vlm never imports this)."""
import numpy as np
import torch


def randomize_hf(model, seed):
  """In place: N(0, 1/fan_in) matrices, norm weights 1 + 0.1 N, other 1-D weights (biases)
  0.1 N; returns ``model.eval()``. ``fan_in`` is the product of all but the first dim, except for
  the fused MoE expert tensors ``gate_up_proj`` [E, D, 2I] / ``experts.down_proj`` [E, I, D]
  ([in, out] per expert), where it is the second-to-last dim. Deterministic in ``seed``."""
  g = torch.Generator().manual_seed(seed)
  with torch.no_grad():
    for name, p in model.named_parameters():
      if p.ndim == 1 and "norm" in name:
        p.copy_(1.0 + 0.1 * torch.randn(p.shape, generator=g))
      elif p.ndim == 1:
        p.copy_(0.1 * torch.randn(p.shape, generator=g))
      else:
        fan_in = (p.shape[-2] if name.endswith(("gate_up_proj", "experts.down_proj"))
                  else int(np.prod(p.shape[1:])))
        p.copy_(torch.randn(p.shape, generator=g) / np.sqrt(fan_in))
  return model.eval()
