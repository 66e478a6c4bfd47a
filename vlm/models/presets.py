"""Frozen configuration dataclasses for every model size vlm knows, plus tiny test sizes.

Field names follow the HF ``transformers`` config classes (``Blip2VisionConfig``,
``Blip2QFormerConfig``, ``Blip2Config``) so that :mod:`vlm.convert` can map them one to one.
Presets are looked up by name with :func:`get_preset`.
"""
from __future__ import annotations

import dataclasses
from typing import Any


@dataclasses.dataclass(frozen=True)
class Blip2VisionConfig:
  """BLIP-2 image encoder.

  ``kind="eva"``: EVA ViT-g/14 with HF ``Blip2VisionModel`` semantics (conv bias, class token,
  q/v-only bias stored as one ``qkv`` bias, exact GELU, eps 1e-6). ``kind="clip"``: OpenAI CLIP
  ViT-L/14 as LAVIS builds it (no conv bias, ``pre_layrnorm``, q/k/v all with bias, QuickGELU,
  eps 1e-5, no final CLIP norm). Both end with ``post_layernorm`` (LAVIS ``ln_vision``), which is
  trainable even when the tower is frozen.
  """
  kind: str = "eva"
  image_size: int = 224
  patch_size: int = 14
  num_channels: int = 3
  hidden_size: int = 1408
  intermediate_size: int = 6144
  num_hidden_layers: int = 39
  num_attention_heads: int = 16
  hidden_act: str = "gelu"
  layer_norm_eps: float = 1e-6
  post_layernorm_eps: float = 1e-6
  qkv_bias: bool = True

  @property
  def num_patches(self) -> int:
    return (self.image_size // self.patch_size) ** 2

  @property
  def num_positions(self) -> int:
    return self.num_patches + 1

  def __post_init__(self):
    if self.kind not in ("eva", "clip"):
      raise ValueError(f"vision kind must be 'eva' or 'clip', got {self.kind!r}")
    if self.image_size % self.patch_size:
      raise ValueError(f"image_size {self.image_size} is not a multiple of patch_size "
                       f"{self.patch_size}")
    if self.hidden_size % self.num_attention_heads:
      raise ValueError(f"hidden_size {self.hidden_size} is not divisible by "
                       f"num_attention_heads {self.num_attention_heads}")


@dataclasses.dataclass(frozen=True)
class QFormerConfig:
  """BERT-style Q-Former (HF ``Blip2QFormerConfig`` field names)."""
  vocab_size: int = 30523
  hidden_size: int = 768
  num_hidden_layers: int = 12
  num_attention_heads: int = 12
  intermediate_size: int = 3072
  hidden_act: str = "gelu"
  hidden_dropout_prob: float = 0.1
  attention_probs_dropout_prob: float = 0.1
  max_position_embeddings: int = 512
  initializer_range: float = 0.02
  layer_norm_eps: float = 1e-12
  pad_token_id: int = 0
  cross_attention_frequency: int = 2
  encoder_hidden_size: int = 1408
  use_qformer_text_input: bool = True

  def __post_init__(self):
    if self.hidden_size % self.num_attention_heads:
      raise ValueError(f"Q-Former hidden_size {self.hidden_size} is not divisible by "
                       f"num_attention_heads {self.num_attention_heads}")
    if self.cross_attention_frequency < 1:
      raise ValueError("cross_attention_frequency must be >= 1")

  def has_cross_attention(self, layer_idx: int) -> bool:
    return layer_idx % self.cross_attention_frequency == 0


@dataclasses.dataclass(frozen=True)
class Blip2Config:
  """A BLIP-2 stage-1 model (image encoder + Q-Former + ITC/ITM/ITG heads).

  Token ids of the Q-Former tokenizer (bert-base-uncased + ``[DEC]``) are fields so the objectives
  need not hard-code them.
  """
  vision: Blip2VisionConfig = Blip2VisionConfig()
  qformer: QFormerConfig = QFormerConfig()
  num_query_tokens: int = 32
  image_text_hidden_size: int = 256
  temp_init: float = 0.07
  dec_token_id: int = 30522
  cls_token_id: int = 101
  sep_token_id: int = 102
  pad_token_id: int = 0

  def __post_init__(self):
    if self.qformer.encoder_hidden_size != self.vision.hidden_size:
      raise ValueError(
          f"qformer.encoder_hidden_size ({self.qformer.encoder_hidden_size}) must equal the vision "
          f"hidden_size ({self.vision.hidden_size}); build the config with blip2_config(...) or "
          "dataclasses.replace both")

  def replace(self, **kw) -> "Blip2Config":
    return dataclasses.replace(self, **kw)


def _blip2(vision: Blip2VisionConfig, qformer: QFormerConfig, **kw) -> Blip2Config:
  qformer = dataclasses.replace(qformer, encoder_hidden_size=vision.hidden_size)
  return Blip2Config(vision=vision, qformer=qformer, **kw)


EVA_VIT_G = Blip2VisionConfig()
CLIP_VIT_L = Blip2VisionConfig(kind="clip", hidden_size=1024, intermediate_size=4096,
                               num_hidden_layers=23, num_attention_heads=16,
                               hidden_act="quick_gelu", layer_norm_eps=1e-5,
                               post_layernorm_eps=1e-5)
QFORMER_BASE = QFormerConfig()

# Tiny sizes: for CPU runs and tests. The 384-wide, 6-layer Q-Former matches all-MiniLM-L6-v2 so
# that the real MiniLM weights initialise its BERT part.
TINY_VISION = Blip2VisionConfig(image_size=224, patch_size=16, hidden_size=192,
                                intermediate_size=768, num_hidden_layers=4, num_attention_heads=3)
QFORMER_MINILM = QFormerConfig(hidden_size=384, num_hidden_layers=6, num_attention_heads=12,
                               intermediate_size=1536)
SMALL_VISION = Blip2VisionConfig(image_size=224, patch_size=14, hidden_size=768,
                                 intermediate_size=3072, num_hidden_layers=12,
                                 num_attention_heads=12)

PRESETS: dict[str, Any] = {
    # The paper's stage-1 model (HF Salesforce/blip2-itm-vit-g).
    "blip2_vitg": _blip2(EVA_VIT_G, QFORMER_BASE),
    # The same at 364 px (HF Salesforce/blip2-itm-vit-g-coco).
    "blip2_vitg_364": _blip2(dataclasses.replace(EVA_VIT_G, image_size=364), QFORMER_BASE),
    # LAVIS pretrain_vitL (CLIP ViT-L/14, 23 blocks as in LAVIS HEAD).
    "blip2_vitl": _blip2(CLIP_VIT_L, QFORMER_BASE),
    # ViT-B-sized EVA tower + BERT-base Q-Former: the benchmark's `small` config.
    "blip2_small": _blip2(SMALL_VISION, QFORMER_BASE),
    # 4-block 192-wide ViT-S/16-like tower + MiniLM-sized Q-Former with 16 query tokens (half the
    # paper's 32, which halves the Q-Former's query compute): the CPU default.
    "blip2_tiny": _blip2(TINY_VISION, QFORMER_MINILM, num_query_tokens=16),
    # Smallest working model: end-to-end tests of the loop (32 px images, 8 query tokens).
    "blip2_micro": Blip2Config(
        vision=Blip2VisionConfig(image_size=32, patch_size=16, hidden_size=32,
                                 intermediate_size=64, num_hidden_layers=1,
                                 num_attention_heads=2),
        qformer=QFormerConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                              intermediate_size=64, encoder_hidden_size=32),
        num_query_tokens=8, image_text_hidden_size=16),
    # Tiny tower with a CLIP layout (for tests of the CLIP path).
    "blip2_tiny_clip": _blip2(dataclasses.replace(TINY_VISION, kind="clip", hidden_act="quick_gelu",
                                                  layer_norm_eps=1e-5, post_layernorm_eps=1e-5),
                              QFORMER_MINILM),
}


@dataclasses.dataclass(frozen=True)
class Blip2Stage2Config:
  """A BLIP-2 stage-2 model: image encoder, Q-Former (no text FFN, no text embeddings), the
  ``language_projection`` and a frozen LLM (HF ``Blip2ForConditionalGeneration``; spec section 4).

  ``llm`` is a :class:`vlm.models.opt.OPTConfig` (decoder-only) or a
  :class:`vlm.models.t5.T5Config` (encoder-decoder). ``image_token_index`` is the LLM-vocabulary
  id of HF's ``<image>`` placeholder (OPT 50265, T5 32100); vlm itself concatenates the projected
  queries in front of the text embeddings and uses it only to read and write HF checkpoints.
  """
  vision: Blip2VisionConfig = Blip2VisionConfig()
  qformer: QFormerConfig = dataclasses.replace(QFormerConfig(), use_qformer_text_input=False)
  llm: Any = None
  num_query_tokens: int = 32
  image_token_index: int | None = None

  @property
  def llm_kind(self) -> str:
    """``"opt"`` or ``"t5"``."""
    return "t5" if type(self.llm).__name__ == "T5Config" else "opt"

  @property
  def llm_hidden_size(self) -> int:
    """Width ``Dl`` of the LLM's input embeddings (the projection's output width)."""
    if self.llm_kind == "t5":
      return self.llm.d_model
    return self.llm.word_embed_proj_dim or self.llm.hidden_size

  def __post_init__(self):
    if type(self.llm).__name__ not in ("OPTConfig", "T5Config"):
      raise ValueError(f"Blip2Stage2Config.llm must be an OPTConfig or a T5Config, got "
                       f"{type(self.llm).__name__}")
    if self.qformer.encoder_hidden_size != self.vision.hidden_size:
      raise ValueError(
          f"qformer.encoder_hidden_size ({self.qformer.encoder_hidden_size}) must equal the vision "
          f"hidden_size ({self.vision.hidden_size})")
    if self.qformer.use_qformer_text_input:
      raise ValueError("the stage-2 Q-Former has no text FFN: build it with "
                       "use_qformer_text_input=False")

  def replace(self, **kw) -> "Blip2Stage2Config":
    return dataclasses.replace(self, **kw)


def _stage2(vision: Blip2VisionConfig, qformer: QFormerConfig, llm: Any, **kw) -> Blip2Stage2Config:
  qformer = dataclasses.replace(qformer, encoder_hidden_size=vision.hidden_size,
                                use_qformer_text_input=False)
  return Blip2Stage2Config(vision=vision, qformer=qformer, llm=llm, **kw)


def stage2_presets() -> dict[str, Blip2Stage2Config]:
  """The stage-2 presets (built on first use: the LLM config classes import flax).

  Paper settings (BLIP-2 table 1; LAVIS ``pretrain_stage2``): ``blip2_opt2.7b``,
  ``blip2_opt6.7b``, ``blip2_flant5xl``, ``blip2_flant5xxl`` (EVA ViT-g/14 + BERT-base Q-Former +
  facebook/opt-2.7b / opt-6.7b / google/flan-t5-xl / flan-t5-xxl). ``blip2_opt_tiny`` and
  ``blip2_t5_tiny`` pair the stage-1 ``blip2_tiny`` tower and Q-Former (so a stage-1 tiny workdir
  initialises them) with 4-layer LLMs that keep the real vocabularies; ``*_micro`` are test sizes.
  """
  from vlm.models.opt import opt_preset
  from vlm.models.t5 import t5_preset
  # LAVIS/HF BLIP-2 FlanT5 runs the gated FFN with exact GELU (spec 4.3).
  flan = lambda name: t5_preset(name, dense_act_fn="gelu")
  micro = PRESETS["blip2_micro"]
  return {
      "blip2_opt2.7b": _stage2(EVA_VIT_G, QFORMER_BASE, opt_preset("opt_2.7b"),
                               image_token_index=50265),
      "blip2_opt6.7b": _stage2(EVA_VIT_G, QFORMER_BASE, opt_preset("opt_6.7b"),
                               image_token_index=50265),
      "blip2_flant5xl": _stage2(EVA_VIT_G, QFORMER_BASE, flan("flan_t5_xl"),
                                image_token_index=32100),
      "blip2_flant5xxl": _stage2(EVA_VIT_G, QFORMER_BASE, flan("flan_t5_xxl"),
                                 image_token_index=32100),
      "blip2_opt_tiny": _stage2(TINY_VISION, QFORMER_MINILM, opt_preset("opt_tiny"),
                                num_query_tokens=16, image_token_index=50265),
      "blip2_t5_tiny": _stage2(TINY_VISION, QFORMER_MINILM, flan("t5_tiny"),
                               num_query_tokens=16, image_token_index=32100),
      "blip2_opt_micro": _stage2(micro.vision, micro.qformer, opt_preset(
          "opt_tiny", hidden_size=32, ffn_dim=64, num_hidden_layers=2, num_attention_heads=2),
                                 num_query_tokens=8, image_token_index=50265),
      "blip2_t5_micro": _stage2(micro.vision, micro.qformer, t5_preset(
          "t5_tiny", d_model=32, d_kv=16, d_ff=64, num_layers=2, num_decoder_layers=2,
          num_heads=2, dense_act_fn="gelu"), num_query_tokens=8, image_token_index=32100),
  }


STAGE2_PRESET_NAMES = ("blip2_opt2.7b", "blip2_opt6.7b", "blip2_flant5xl", "blip2_flant5xxl",
                       "blip2_opt_tiny", "blip2_t5_tiny", "blip2_opt_micro", "blip2_t5_micro")


class UnknownPresetError(KeyError, ValueError):
  """An unknown preset name (a KeyError, and a ValueError so that scripts/train.py reports it in
  one line like other config mistakes)."""

  def __str__(self):
    return str(self.args[0]) if self.args else ""


def get_preset(name: str, **overrides) -> Any:
  """Returns the preset called ``name``, with top-level fields replaced by ``overrides``.

  BLIP-2 presets live here (stage 1 in :data:`PRESETS`, stage 2 in :func:`stage2_presets`); Qwen
  ones (``qwen3_vl_8b``, ``qwen2_5_vl_7b``, ...) in :mod:`vlm.models.qwen_presets` and are found
  by the same call.
  Raises:
    UnknownPresetError: (a KeyError and a ValueError) for an unknown name, listing the known ones.
  """
  from vlm.models import qwen_presets
  if name in qwen_presets.HF_CONFIGS:
    preset = qwen_presets.qwen_config(name)
  elif name in PRESETS:
    preset = PRESETS[name]
  elif name in STAGE2_PRESET_NAMES:
    preset = stage2_presets()[name]
  else:
    raise UnknownPresetError(
        f"unknown preset {name!r}; known presets: "
        f"{sorted(PRESETS) + list(STAGE2_PRESET_NAMES) + sorted(qwen_presets.HF_CONFIGS)}")
  return dataclasses.replace(preset, **overrides) if overrides else preset
