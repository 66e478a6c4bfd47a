"""vlm: vision-language models in JAX/Flax linen (BLIP-2, Qwen3-VL)."""

__version__ = "0.1.0"


def __getattr__(name):
  """Lazy attributes (``import vlm`` stays light): ``vlm.load_pretrained``."""
  if name == "load_pretrained":
    from vlm.pretrained import load_pretrained
    return load_pretrained
  raise AttributeError(f"module 'vlm' has no attribute {name!r}")
