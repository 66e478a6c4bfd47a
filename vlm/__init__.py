"""vlm: vision-language models in JAX/Flax linen (BLIP-2, Qwen3-VL)."""

__version__ = "0.1.0"
