"""HF ``Blip2ForImageTextRetrieval`` checkpoints <-> vlm ``Blip2Stage1`` params, and BERT init.

Pure numpy + safetensors (``framework="np"``): no torch, no transformers, no pickle.

* :func:`load_hf_blip2` / :func:`save_hf_blip2`: a local HF directory (``config.json`` +
  ``model.safetensors`` or a sharded ``model.safetensors.index.json``) <-> ``(Blip2Config,
  params)``. Key mapping: spec section 2.9 and /work/coord/CONTRACT.md (``"."`` -> ``"/"``,
  ``layer.{i}`` -> ``layer_{i}``, Linear ``weight`` -> ``kernel`` transposed, LayerNorm ``weight``
  -> ``scale``, Embedding ``weight`` -> ``embedding``). Vision keys go through
  :mod:`vlm.convert.hf_blip2_vision`.
* :func:`blip2_config_from_hf` / :func:`blip2_config_to_hf`: HF ``Blip2Config`` dict layout
  (``vision_config``, ``qformer_config``, ``text_config``) <-> :class:`Blip2Config`.
* :func:`init_qformer_from_bert`: LAVIS ``init_Qformer`` (spec section 2.7) from an HF BERT
  directory.

HF retrieval checkpoints carry neither the ITG LM head (``cls/predictions/...``) nor ``temp``
(spec section 2.5): the loader fills them from ``init_params`` or initialises them, the saver
drops them.
"""
from __future__ import annotations

import dataclasses
import json
import os
from typing import Any, Mapping

import flax
import jax
import numpy as np

from vlm.convert import keymap
from vlm.convert.hf_blip2_vision import vision_from_hf, vision_to_hf
from vlm.convert.safetensors_io import read_safetensors_dir, write_safetensors_dir
from vlm.models.presets import Blip2Config, Blip2VisionConfig, QFormerConfig

CONFIG_NAME = "config.json"

# Parameters of Blip2Stage1 that HF checkpoints do not have (spec section 2.9, last row).
STAGE1_ONLY_PATHS = (
    ("cls", "predictions", "bias"),
    ("cls", "predictions", "transform", "dense", "kernel"),
    ("cls", "predictions", "transform", "dense", "bias"),
    ("cls", "predictions", "transform", "LayerNorm", "scale"),
    ("cls", "predictions", "transform", "LayerNorm", "bias"),
    ("temp",),
)
# HF buffers that may appear in checkpoints written by older versions; not parameters.
_IGNORED_HF_KEYS = ("embeddings.position_ids",)

_VISION_FIELDS = ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                  "image_size", "patch_size", "hidden_act", "layer_norm_eps", "qkv_bias")
_QFORMER_FIELDS = ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads",
                   "intermediate_size", "hidden_act", "hidden_dropout_prob",
                   "attention_probs_dropout_prob", "max_position_embeddings", "initializer_range",
                   "layer_norm_eps", "pad_token_id", "cross_attention_frequency",
                   "use_qformer_text_input")
# HF class defaults (transformers 4.57 ``Blip2VisionConfig`` / ``Blip2QFormerConfig``), used when
# a config.json omits a field.
_HF_VISION_DEFAULTS = dict(hidden_size=1408, intermediate_size=6144, num_hidden_layers=39,
                           num_attention_heads=16, image_size=224, patch_size=14,
                           hidden_act="gelu", layer_norm_eps=1e-6, qkv_bias=True)
_HF_QFORMER_DEFAULTS = dict(vocab_size=30522, hidden_size=768, num_hidden_layers=12,
                            num_attention_heads=12, intermediate_size=3072, hidden_act="gelu",
                            hidden_dropout_prob=0.1, attention_probs_dropout_prob=0.1,
                            max_position_embeddings=512, initializer_range=0.02,
                            layer_norm_eps=1e-12, pad_token_id=0, cross_attention_frequency=2,
                            use_qformer_text_input=False)


# ---------------------------------------------------------------------------------------------
# Config mapping
# ---------------------------------------------------------------------------------------------

def blip2_config_from_hf(hf: Mapping[str, Any], **overrides) -> Blip2Config:
  """Builds a :class:`Blip2Config` from an HF ``Blip2Config`` dict (the ``config.json`` layout).

  Missing fields take the HF class defaults. The vision tower is EVA (HF has no other kind) and
  ``post_layernorm`` uses the vision ``layer_norm_eps`` as in HF ``Blip2VisionModel``.
  ``image_token_index`` is ignored (vlm never puts image placeholders in Q-Former input ids).
  ``overrides`` replace top-level :class:`Blip2Config` fields (e.g. ``temp_init``).

  Raises:
    ValueError: ``model_type`` other than "blip-2", a Q-Former ``position_embedding_type`` other
      than "absolute", or a vision ``num_channels`` other than 3.
  """
  model_type = hf.get("model_type", "blip-2")
  if model_type != "blip-2":
    raise ValueError(f"config.json has model_type {model_type!r}; expected 'blip-2' (an HF "
                     "Blip2ForImageTextRetrieval directory)")
  hv = {**_HF_VISION_DEFAULTS, **{k: v for k, v in (hf.get("vision_config") or {}).items()
                                   if k in _VISION_FIELDS}}
  hq_raw = hf.get("qformer_config") or {}
  hq = {**_HF_QFORMER_DEFAULTS, **{k: v for k, v in hq_raw.items() if k in _QFORMER_FIELDS}}
  pos_type = hq_raw.get("position_embedding_type", "absolute")
  if pos_type != "absolute":
    raise ValueError(f"qformer_config.position_embedding_type is {pos_type!r}; vlm supports only "
                     "'absolute' position embeddings")
  channels = (hf.get("vision_config") or {}).get("num_channels", 3)
  if channels != 3:
    raise ValueError(f"vision_config.num_channels is {channels}; HF Blip2 uses 3 channels")
  vision = Blip2VisionConfig(kind="eva", post_layernorm_eps=hv["layer_norm_eps"], **hv)
  qformer = QFormerConfig(encoder_hidden_size=vision.hidden_size, **hq)
  kw = dict(num_query_tokens=hf.get("num_query_tokens", 32),
            image_text_hidden_size=hf.get("image_text_hidden_size", 256),
            pad_token_id=hq["pad_token_id"])
  kw.update(overrides)
  return Blip2Config(vision=vision, qformer=qformer, **kw)


def blip2_config_to_hf(config: Blip2Config) -> dict:
  """The HF ``config.json`` dict of a ``Blip2ForImageTextRetrieval`` with ``config``'s sizes.

  ``text_config`` is a default OPT stub (the retrieval model has no language model), as in the
  Salesforce ``blip2-itm-vit-g`` checkpoints.

  Raises:
    ValueError: when ``config`` cannot be expressed in HF ``Blip2Config``: a CLIP vision tower,
      ``post_layernorm_eps != layer_norm_eps``, or ``num_channels != 3``.
  """
  v, q = config.vision, config.qformer
  if v.kind != "eva":
    raise ValueError(f"HF Blip2 has only the EVA vision tower; cannot write kind={v.kind!r}")
  if v.post_layernorm_eps != v.layer_norm_eps:
    raise ValueError(f"HF Blip2VisionModel uses layer_norm_eps ({v.layer_norm_eps}) for "
                     f"post_layernorm too, but post_layernorm_eps is {v.post_layernorm_eps}; "
                     "make them equal before saving")
  if v.num_channels != 3:
    raise ValueError(f"HF Blip2 uses 3 image channels, config has {v.num_channels}")
  vision = {k: getattr(v, k) for k in _VISION_FIELDS}
  vision.update(model_type="blip_2_vision_model", attention_dropout=0.0)
  qformer = {k: getattr(q, k) for k in _QFORMER_FIELDS}
  qformer.update(model_type="blip_2_qformer", encoder_hidden_size=v.hidden_size,
                 position_embedding_type="absolute")
  return {
      "architectures": ["Blip2ForImageTextRetrieval"],
      "model_type": "blip-2",
      "vision_config": vision,
      "qformer_config": qformer,
      "text_config": {"model_type": "opt"},
      "num_query_tokens": config.num_query_tokens,
      "image_text_hidden_size": config.image_text_hidden_size,
      "initializer_factor": 1.0,
      "initializer_range": 0.02,
  }


# ---------------------------------------------------------------------------------------------
# Key tables
# ---------------------------------------------------------------------------------------------

# (hf key, flax path, op, hf shape); op "linear" transposes, "copy" keeps.
_Entry = tuple[str, tuple[str, ...], str, tuple[int, ...]]


def _linear(hf: str, path: tuple[str, ...], d_in: int, d_out: int) -> list[_Entry]:
  return [(f"{hf}.weight", path + ("kernel",), "linear", (d_out, d_in)),
          (f"{hf}.bias", path + ("bias",), "copy", (d_out,))]


def _norm(hf: str, path: tuple[str, ...], d: int) -> list[_Entry]:
  return [(f"{hf}.weight", path + ("scale",), "copy", (d,)),
          (f"{hf}.bias", path + ("bias",), "copy", (d,))]


def _attention_entries(hf: str, path: tuple[str, ...], d: int, d_kv: int) -> list[_Entry]:
  out: list[_Entry] = []
  out += _linear(f"{hf}.attention.query", path + ("attention", "query"), d, d)
  out += _linear(f"{hf}.attention.key", path + ("attention", "key"), d_kv, d)
  out += _linear(f"{hf}.attention.value", path + ("attention", "value"), d_kv, d)
  out += _linear(f"{hf}.output.dense", path + ("output", "dense"), d, d)
  out += _norm(f"{hf}.output.LayerNorm", path + ("output", "LayerNorm"), d)
  return out


def _ffn_entries(hf: str, path: tuple[str, ...], suffix: str, d: int, f: int) -> list[_Entry]:
  out: list[_Entry] = []
  out += _linear(f"{hf}.intermediate{suffix}.dense", path + (f"intermediate{suffix}", "dense"),
                 d, f)
  out += _linear(f"{hf}.output{suffix}.dense", path + (f"output{suffix}", "dense"), f, d)
  out += _norm(f"{hf}.output{suffix}.LayerNorm", path + (f"output{suffix}", "LayerNorm"), d)
  return out


def qformer_entries(config: Blip2Config) -> list[_Entry]:
  """Every non-vision (hf key, flax path, op, hf shape) of ``Blip2ForImageTextRetrieval``."""
  q = config.qformer
  d, f, e = q.hidden_size, q.intermediate_size, config.image_text_hidden_size
  out: list[_Entry] = [
      ("query_tokens", ("query_tokens",), "copy", (1, config.num_query_tokens, d)),
      ("embeddings.word_embeddings.weight", ("embeddings", "word_embeddings", "embedding"),
       "copy", (q.vocab_size, d)),
      ("embeddings.position_embeddings.weight",
       ("embeddings", "position_embeddings", "embedding"), "copy", (q.max_position_embeddings, d)),
  ]
  out += _norm("qformer.layernorm", ("qformer", "layernorm"), d)
  for i in range(q.num_hidden_layers):
    hf, path = f"qformer.encoder.layer.{i}", ("qformer", "encoder", f"layer_{i}")
    out += _attention_entries(f"{hf}.attention", path + ("attention",), d, d)
    if q.has_cross_attention(i):
      out += _attention_entries(f"{hf}.crossattention", path + ("crossattention",), d,
                                q.encoder_hidden_size)
    out += _ffn_entries(hf, path, "_query", d, f)
    if q.use_qformer_text_input:
      out += _ffn_entries(hf, path, "", d, f)
  out += _linear("vision_projection", ("vision_projection",), d, e)
  out += _linear("text_projection", ("text_projection",), d, e)
  out += _linear("itm_head", ("itm_head",), d, 2)
  return out


def _flat(params: Mapping[str, Any]) -> dict[tuple[str, ...], Any]:
  params = flax.core.meta.unbox(flax.core.unfreeze(params))
  return {tuple(k): v for k, v in flax.traverse_util.flatten_dict(params).items()}


# ---------------------------------------------------------------------------------------------
# Load / save
# ---------------------------------------------------------------------------------------------

def init_stage1_only_params(config: Blip2Config, seed: int = 0) -> dict:
  """Fresh ``cls/predictions/...`` and ``temp`` with the ``Blip2Stage1`` init scheme.

  Dense kernel N(0, qformer.initializer_range), biases 0, LayerNorm 1/0, ``temp = temp_init``.
  Returns a nested dict of float32 numpy arrays.
  """
  q = config.qformer
  kernel = np.asarray(jax.random.normal(jax.random.PRNGKey(seed), (q.hidden_size, q.hidden_size),
                                        np.float32)) * np.float32(q.initializer_range)
  return {
      "cls": {"predictions": {
          "bias": np.zeros((q.vocab_size,), np.float32),
          "transform": {
              "dense": {"kernel": kernel, "bias": np.zeros((q.hidden_size,), np.float32)},
              "LayerNorm": {"scale": np.ones((q.hidden_size,), np.float32),
                            "bias": np.zeros((q.hidden_size,), np.float32)},
          }}},
      "temp": np.asarray(config.temp_init, np.float32),
  }


def load_hf_blip2(path: str, init_params: Mapping[str, Any] | None = None, seed: int = 0, *,
                  scan_layers: bool = False, **config_overrides) -> tuple[Blip2Config, dict]:
  """Loads a local HF ``Blip2ForImageTextRetrieval`` directory as ``Blip2Stage1`` params.

  Args:
    path: directory with ``config.json`` and ``model.safetensors`` (or a sharded
      ``model.safetensors.index.json`` + shards), as written by HF ``save_pretrained``.
    init_params: optional ``Blip2Stage1`` params (plain or boxed). HF checkpoints lack the
      stage-1-only parameters ``cls/predictions/...`` (ITG LM head) and ``temp``; they are taken
      from ``init_params`` when given, otherwise initialised with :func:`init_stage1_only_params`
      (``seed``).
    seed: PRNG seed for that initialisation.
    scan_layers: return the scanned layer layout of ``Blip2Stage1(scan_layers=True)``
      (:func:`vlm.models.blip2.convert_layer_layout`).
    **config_overrides: top-level :class:`Blip2Config` fields to replace (e.g. ``temp_init``).
  Returns:
    ``(config, params)``: params is a nested dict of numpy arrays with the ``Blip2Stage1`` tree
    (no partitioning boxes), dtypes as stored in the checkpoint.
  Raises:
    FileNotFoundError: no config.json / weights in ``path``.
    ValueError: a checkpoint without the Q-Former text FFN (``use_qformer_text_input=False``);
      unknown, missing or wrongly shaped keys (all listed); ``init_params`` lacking a stage-1-only
      parameter.
  """
  config_file = os.path.join(path, CONFIG_NAME)
  if not os.path.exists(config_file):
    raise FileNotFoundError(f"no {CONFIG_NAME} in {path}")
  with open(config_file) as fh:
    config = blip2_config_from_hf(json.load(fh), **config_overrides)
  if not config.qformer.use_qformer_text_input:
    raise ValueError(f"{path} has qformer_config.use_qformer_text_input=False (no text FFN), so it "
                     "is not an image-text retrieval checkpoint; Blip2Stage1 needs the text FFN")
  state = read_safetensors_dir(path)
  params = _params_from_state(state, config)
  if init_params is not None:
    flat_init = _flat(init_params)
    lacking = ["/".join(p) for p in STAGE1_ONLY_PATHS if p not in flat_init]
    if lacking:
      raise ValueError(f"init_params lacks the stage-1-only params {lacking}; pass the params of "
                       "Blip2Stage1.init or None")
    extra = {p: np.asarray(flat_init[p]) for p in STAGE1_ONLY_PATHS}
    q = config.qformer
    expected = {("cls", "predictions", "bias"): (q.vocab_size,), ("temp",): ()}
    for p, shape in expected.items():
      if extra[p].shape != shape:
        raise ValueError(f"init_params {'/'.join(p)} has shape {extra[p].shape}, expected {shape} "
                         "for the checkpoint's config")
    extra = flax.traverse_util.unflatten_dict(extra)
  else:
    extra = init_stage1_only_params(config, seed)
  params.update(extra)
  if scan_layers:
    from vlm.models.blip2 import convert_layer_layout
    params = convert_layer_layout(params, config, scan_layers=True)
  return config, params


def _params_from_state(state: Mapping[str, np.ndarray], config: Blip2Config) -> dict:
  ours = {k: v for k, v in state.items()
          if not k.startswith("vision_model.") and k not in _IGNORED_HF_KEYS}
  problems = []
  flat = keymap.hf_to_flat(ours, qformer_entries(config), problems)
  try:
    vision = vision_from_hf(state, config.vision, prefix="vision_model.")
  except ValueError as err:
    problems.append(str(err))
    vision = {}
  if problems:
    raise ValueError("cannot convert the HF BLIP-2 checkpoint: " + "; ".join(problems))
  params = flax.traverse_util.unflatten_dict(flat)
  params["vision_model"] = vision
  return params


def hf_state_from_params(config: Blip2Config, params: Mapping[str, Any]) -> dict[str, np.ndarray]:
  """``Blip2Stage1`` params -> HF ``Blip2ForImageTextRetrieval`` state dict (numpy).

  The stage-1-only params (``cls/...``, ``temp``) are dropped. ``params`` may be in either layer
  layout (scanned trees are unstacked first).

  Raises:
    ValueError: missing, unknown or wrongly shaped params (all listed).
  """
  flat = _flat(_unscanned(params, config))
  vision_flat = {p[1:]: v for p, v in flat.items() if p[0] == "vision_model"}
  rest = {p: v for p, v in flat.items()
          if p[0] != "vision_model" and p not in STAGE1_ONLY_PATHS}
  problems = []
  state = keymap.flat_to_hf(rest, qformer_entries(config), problems)
  try:
    state.update(vision_to_hf(flax.traverse_util.unflatten_dict(vision_flat), config.vision,
                              prefix="vision_model."))
  except ValueError as err:
    problems.append(str(err))
  if problems:
    raise ValueError("cannot convert Blip2Stage1 params to HF: " + "; ".join(problems))
  return state


def _unscanned(params, config):
  """``params`` (plain, boxed, frozen) unboxed, with the towers in the unscanned layout."""
  from vlm.models.blip2 import convert_layer_layout
  params = flax.core.meta.unbox(flax.core.unfreeze(params))
  return convert_layer_layout(params, config, scan_layers=False)


def save_hf_blip2(config: Blip2Config, params: Mapping[str, Any], path: str,
                  max_shard_size: int | str | None = None) -> None:
  """Writes an HF ``Blip2ForImageTextRetrieval`` directory loadable with ``from_pretrained``.

  Writes ``config.json`` (:func:`blip2_config_to_hf`) and ``model.safetensors``, or shards of at
  most ``max_shard_size`` (bytes, or a string like "200MB") plus ``model.safetensors.index.json``.
  The stage-1-only params (``cls/predictions/...``, ``temp``) are not written (HF has no place
  for them). Dtypes are kept as stored in ``params``.

  Raises:
    ValueError: config not expressible in HF (see :func:`blip2_config_to_hf`), or missing /
      unknown / wrongly shaped params.
  """
  hf_config = blip2_config_to_hf(config)
  state = hf_state_from_params(config, params)
  os.makedirs(path, exist_ok=True)
  write_safetensors_dir(state, path, max_shard_size)
  with open(os.path.join(path, CONFIG_NAME), "w") as fh:
    json.dump(hf_config, fh, indent=2, sort_keys=True)


# ---------------------------------------------------------------------------------------------
# BERT init (LAVIS init_Qformer)
# ---------------------------------------------------------------------------------------------

def _bert_get(state: Mapping[str, np.ndarray], key: str):
  """Looks ``key`` up with or without the "bert." prefix, and LayerNorm gamma/beta spellings."""
  candidates = [key, "bert." + key]
  if key.endswith("LayerNorm.weight"):
    candidates += [c[:-len("weight")] + "gamma" for c in candidates[:2]]
  if key.endswith("LayerNorm.bias"):
    candidates += [c[:-len("bias")] + "beta" for c in candidates[:2]]
  for c in candidates:
    if c in state:
      return np.asarray(state[c])
  return None


def init_qformer_from_bert(params: Mapping[str, Any], config: Blip2Config, bert_dir: str) -> dict:
  """Initialises the Q-Former of ``Blip2Stage1`` params from an HF BERT (LAVIS ``init_Qformer``).

  With ``config.qformer.use_qformer_text_input=False`` (the stage-2 Q-Former) only the embedding
  LayerNorm and the layers are written (that tree has no text embeddings, text FFN or ITG head).

  Spec section 2.7. From the BERT checkpoint (keys with or without the ``bert.`` prefix; LayerNorm
  ``weight/bias`` or ``gamma/beta``):
    * ``embeddings/word_embeddings``: BERT rows copied; extra rows of our larger vocabulary (the
      ``[DEC]`` token) set to the mean of BERT's rows ("mean resizing");
    * ``embeddings/position_embeddings``: first ``max_position_embeddings`` rows;
    * ``qformer/layernorm`` <- ``embeddings.LayerNorm``;
    * per layer: self-attention (``attention.self`` -> ``attention/attention``), attention output,
      the text FFN (``intermediate``, ``output``) AND the query FFN (``intermediate_query``,
      ``output_query``) <- the same text FFN weights;
    * ``cls/predictions/transform`` and ``bias`` (extra rows = mean) from ``cls.predictions.*``
      when the checkpoint has them; otherwise they keep their values in ``params``.
  Cross-attention, ``query_tokens``, projections, ``itm_head``, ``temp`` and the vision tower keep
  their values. BERT's ``token_type_embeddings`` and pooler are not used (LAVIS drops them).

  Args:
    params: ``Blip2Stage1`` params (plain or with partitioning boxes; the boxes are kept), in
      either layer layout (``scan_layers``: the BERT layers are stacked into
      ``qformer/encoder/layers``).
    config: the model config.
    bert_dir: directory with ``config.json`` and ``model.safetensors`` (or sharded index).
  Returns:
    A new params tree of the same structure, leaf types and dtypes.
  Raises:
    ValueError: BERT sizes (hidden size, layers, heads, intermediate size, activation) differ from
      ``config.qformer``, BERT vocabulary / positions larger than ours, missing BERT keys, or
      params without the expected Q-Former entries.
  """
  q = config.qformer
  with open(os.path.join(bert_dir, CONFIG_NAME)) as fh:
    bert_cfg = json.load(fh)
  mismatches = []
  for field in ("hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size",
                "hidden_act"):
    theirs, ours = bert_cfg.get(field), getattr(q, field)
    if theirs != ours:
      mismatches.append(f"{field}: BERT {theirs!r} vs Q-Former {ours!r}")
  if mismatches:
    raise ValueError(f"BERT checkpoint {bert_dir} does not fit this Q-Former ("
                     + "; ".join(mismatches) + "); pick a preset with the BERT's sizes (e.g. "
                     "blip2_tiny for all-MiniLM-L6-v2, blip2_vitg/blip2_small for bert-base)")
  state = read_safetensors_dir(bert_dir)
  d = q.hidden_size
  new: dict[tuple[str, ...], np.ndarray] = {}
  absent: list[str] = []

  def need(key):
    x = _bert_get(state, key)
    if x is None:
      absent.append(key)
    return x

  def resized_rows(x, rows, what):
    if x.shape[0] > rows:
      raise ValueError(f"BERT {what} has {x.shape[0]} rows but the Q-Former has {rows}; use a "
                       "config with at least as many")
    if x.shape[0] == rows:
      return x
    extra = np.broadcast_to(x.mean(axis=0, keepdims=True), (rows - x.shape[0],) + x.shape[1:])
    return np.concatenate([x, extra.astype(x.dtype)], axis=0)

  # A stage-2 Q-Former (no text input) has no text embeddings and no ITG head.
  text_input = q.use_qformer_text_input
  word = need("embeddings.word_embeddings.weight") if text_input else None
  if word is not None:
    new[("embeddings", "word_embeddings", "embedding")] = resized_rows(word, q.vocab_size,
                                                                       "vocabulary")
  pos = need("embeddings.position_embeddings.weight") if text_input else None
  if pos is not None:
    if pos.shape[0] < q.max_position_embeddings:
      raise ValueError(f"BERT has {pos.shape[0]} positions but the Q-Former needs "
                       f"{q.max_position_embeddings}")
    new[("embeddings", "position_embeddings", "embedding")] = pos[:q.max_position_embeddings]

  def linear(hf, path):
    w, b = need(f"{hf}.weight"), need(f"{hf}.bias")
    if w is not None and b is not None:
      new[path + ("kernel",)] = np.ascontiguousarray(w.T)
      new[path + ("bias",)] = b

  def norm(hf, path):
    w, b = need(f"{hf}.weight"), need(f"{hf}.bias")
    if w is not None and b is not None:
      new[path + ("scale",)] = w
      new[path + ("bias",)] = b

  norm("embeddings.LayerNorm", ("qformer", "layernorm"))
  for i in range(q.num_hidden_layers):
    hf, path = f"encoder.layer.{i}", ("qformer", "encoder", f"layer_{i}")
    for name in ("query", "key", "value"):
      linear(f"{hf}.attention.self.{name}", path + ("attention", "attention", name))
    linear(f"{hf}.attention.output.dense", path + ("attention", "output", "dense"))
    norm(f"{hf}.attention.output.LayerNorm", path + ("attention", "output", "LayerNorm"))
    suffixes = ("_query", "") if q.use_qformer_text_input else ("_query",)
    for suffix in suffixes:
      linear(f"{hf}.intermediate.dense", path + (f"intermediate{suffix}", "dense"))
      linear(f"{hf}.output.dense", path + (f"output{suffix}", "dense"))
      norm(f"{hf}.output.LayerNorm", path + (f"output{suffix}", "LayerNorm"))
  if absent:
    raise ValueError(f"BERT checkpoint {bert_dir} lacks keys (with or without 'bert.'): "
                     f"{keymap.format_keys(absent)}")
  if text_input and _bert_get(state, "cls.predictions.transform.dense.weight") is not None:
    head = ("cls", "predictions")
    linear("cls.predictions.transform.dense", head + ("transform", "dense"))
    norm("cls.predictions.transform.LayerNorm", head + ("transform", "LayerNorm"))
    bias = need("cls.predictions.bias")
    if absent:
      raise ValueError(f"BERT checkpoint {bert_dir} lacks keys: {keymap.format_keys(absent)}")
    new[head + ("bias",)] = resized_rows(bias, q.vocab_size, "cls.predictions.bias")
  if _qformer_scanned(params):  # Blip2Stage1(scan_layers=True): stack the per-layer weights
    from vlm.models.blip2 import convert_layer_layout
    new = {tuple(k): v for k, v in flax.traverse_util.flatten_dict(convert_layer_layout(
        flax.traverse_util.unflatten_dict(new), config, scan_layers=True)).items()}
  return _replace_leaves(params, new)


def _qformer_scanned(params) -> bool:
  """True when ``params`` (plain, boxed or frozen) hold a scanned ``qformer/encoder/layers``."""
  enc = flax.core.unfreeze(params).get("qformer", {}).get("encoder", {})
  return "layers" in enc


def _replace_leaves(params: Mapping[str, Any], new: Mapping[tuple[str, ...], np.ndarray]) -> dict:
  """Returns ``params`` with the leaves at ``new``'s paths replaced (boxes, dtypes kept)."""
  was_frozen = isinstance(params, flax.core.FrozenDict)
  flat = flax.traverse_util.flatten_dict(flax.core.unfreeze(params))
  problems = []
  for path, value in new.items():
    if path not in flat:
      problems.append(f"{'/'.join(path)} not in params")
      continue
    leaf = flat[path]
    boxed = isinstance(leaf, flax.core.meta.AxisMetadata)
    old = leaf.unbox() if boxed else leaf
    if tuple(old.shape) != tuple(value.shape):
      problems.append(f"{'/'.join(path)}: params shape {tuple(old.shape)} vs BERT "
                      f"{tuple(value.shape)}")
      continue
    value = np.asarray(value).astype(old.dtype)
    if isinstance(old, jax.Array):
      value = jax.numpy.asarray(value)
    flat[path] = leaf.replace_boxed(value) if boxed else value
  if problems:
    raise ValueError("cannot apply the BERT weights: " + "; ".join(problems))
  out = flax.traverse_util.unflatten_dict(flat)
  return flax.core.freeze(out) if was_frozen else out


# ---------------------------------------------------------------------------------------------
# Stage 2: HF Blip2ForConditionalGeneration (OPT or FlanT5) <-> vlm Blip2Stage2
# ---------------------------------------------------------------------------------------------

_STAGE1_HEAD_PREFIXES = ("embeddings.", "vision_projection.", "text_projection.", "itm_head.")


def _stage1_like(config) -> Blip2Config:
  """A :class:`Blip2Config` with the stage-2 model's tower, Q-Former and query count."""
  return Blip2Config(vision=config.vision, qformer=config.qformer,
                     num_query_tokens=config.num_query_tokens)


def stage2_qformer_entries(config) -> list[_Entry]:
  """(hf key, flax path, op, hf shape) of the query tokens, Q-Former (no text FFN, no text
  embeddings) and ``language_projection`` of ``Blip2ForConditionalGeneration``."""
  out = [e for e in qformer_entries(_stage1_like(config))
         if not e[0].startswith(_STAGE1_HEAD_PREFIXES)]
  return out + _linear("language_projection", ("language_projection",),
                       config.qformer.hidden_size, config.llm_hidden_size)


def _llm_config_from_hf(text: Mapping[str, Any]):
  from vlm.models.opt import OPTConfig
  from vlm.models.t5 import T5Config
  model_type = text.get("model_type", "opt")
  if model_type == "opt":
    return OPTConfig.from_hf_config(text)
  if model_type == "t5":
    return T5Config.from_hf_config(text)
  raise ValueError(f"text_config.model_type is {model_type!r}; vlm's BLIP-2 stage 2 supports 'opt' "
                   "and 't5' (FlanT5) language models")


def stage2_config_from_hf(hf: Mapping[str, Any]):
  """HF ``Blip2Config`` dict of a ``Blip2ForConditionalGeneration`` -> ``Blip2Stage2Config``.

  Raises:
    ValueError: what :func:`blip2_config_from_hf` raises, or an LLM other than OPT / T5.
  """
  from vlm.models.presets import Blip2Stage2Config
  hq = dict(hf.get("qformer_config") or {})
  hq.setdefault("use_qformer_text_input", False)
  stage1 = blip2_config_from_hf({**hf, "qformer_config": {**hq, "use_qformer_text_input": False}})
  return Blip2Stage2Config(vision=stage1.vision, qformer=stage1.qformer,
                           llm=_llm_config_from_hf(hf.get("text_config") or {}),
                           num_query_tokens=stage1.num_query_tokens,
                           image_token_index=hf.get("image_token_index",
                                                    hf.get("image_token_id")))


def stage2_config_to_hf(config) -> dict:
  """The HF ``config.json`` dict of a ``Blip2ForConditionalGeneration`` with ``config``'s sizes.

  Raises:
    ValueError: a tower HF cannot express (see :func:`blip2_config_to_hf`).
  """
  out = blip2_config_to_hf(_stage1_like(config))
  out["architectures"] = ["Blip2ForConditionalGeneration"]
  out["qformer_config"]["use_qformer_text_input"] = False
  out["text_config"] = config.llm.to_hf_config()
  out.pop("image_text_hidden_size", None)
  if config.image_token_index is not None:
    out["image_token_index"] = int(config.image_token_index)
  return out


def is_conditional_generation(path: str) -> bool:
  """True when ``path/config.json`` describes ``Blip2ForConditionalGeneration`` (a stage-2 model
  with its LLM), False for a retrieval (stage-1) checkpoint.

  Raises:
    FileNotFoundError: no config.json.
  """
  with open(_config_file(path)) as fh:
    hf = json.load(fh)
  return "Blip2ForConditionalGeneration" in (hf.get("architectures") or [])


def _config_file(path: str) -> str:
  f = os.path.join(path, CONFIG_NAME)
  if not os.path.exists(f):
    raise FileNotFoundError(f"no {CONFIG_NAME} in {path}: not an HF model directory")
  return f


def _llm_from_state(state, config, scan_layers: bool, dtype=None) -> dict:
  from vlm.convert import hf_opt, hf_t5
  if config.llm_kind == "opt":
    return hf_opt.opt_params_from_hf_state(
        state, config.llm, "language_model.model.decoder.", scan_layers=scan_layers,
        lm_head_key="language_model.lm_head.weight", ignore_other_keys=True, dtype=dtype)
  return hf_t5.t5_params_from_hf_state(state, config.llm, "language_model.",
                                       scan_layers=scan_layers, dtype=dtype)


def _qformer_from_state(state, config, problems: list) -> dict:
  ours = {k: v for k, v in state.items() if not k.startswith(("vision_model.", "language_model."))
          and k not in _IGNORED_HF_KEYS}
  flat = keymap.hf_to_flat(ours, stage2_qformer_entries(config), problems)
  try:
    flat.update({("vision_model",) + k: v for k, v in _flat(
        vision_from_hf(state, config.vision, prefix="vision_model.")).items()})
  except ValueError as err:
    problems.append(str(err))
  return flat


def load_hf_blip2_stage2(path: str, *, scan_layers: bool = False, dtype=None):
  """Loads a local HF ``Blip2ForConditionalGeneration`` directory (OPT or FlanT5).

  Args:
    path: ``config.json`` + ``model.safetensors`` (or an index and shards).
    scan_layers: the layout of ``Blip2Stage2(scan_layers=True)``: the vision blocks, the Q-Former
      layers (:func:`vlm.models.blip2.convert_layer_layout`) and the LLM's layers stacked.
    dtype: cast every array (None keeps the stored dtypes).
  Returns:
    ``(Blip2Stage2Config, params)``: params a nested dict of numpy arrays.
  Raises:
    FileNotFoundError: no config.json / weights. ValueError: not a stage-2 config, an LLM other
      than OPT/T5, or missing / unknown / wrongly shaped keys (all listed).
  """
  with open(_config_file(path)) as fh:
    config = stage2_config_from_hf(json.load(fh))
  state = read_safetensors_dir(path)
  problems: list[str] = []
  flat = _qformer_from_state(state, config, problems)
  try:
    llm = _llm_from_state(state, config, scan_layers)
  except ValueError as err:
    problems.append(str(err))
    llm = {}
  if problems:
    raise ValueError(f"cannot convert the HF BLIP-2 checkpoint {path}: " + "; ".join(problems))
  params = flax.traverse_util.unflatten_dict(flat)
  if scan_layers:
    from vlm.models.blip2 import convert_layer_layout
    params = convert_layer_layout(params, config, scan_layers=True)
  params["language_model"] = llm
  if dtype is not None:
    params = jax.tree.map(lambda x: np.asarray(x, dtype), params)
  return config, params


def hf_state_from_stage2_params(config, params: Mapping[str, Any], *,
                                scan_layers: bool = False) -> dict[str, np.ndarray]:
  """``Blip2Stage2`` params -> HF ``Blip2ForConditionalGeneration`` state dict (numpy).

  ``scan_layers`` says the LLM's layout; the vision tower and Q-Former may be in either layout
  (scanned ones are unstacked).

  Raises:
    ValueError: missing, unknown or wrongly shaped params (all listed).
  """
  from vlm.convert import hf_opt, hf_t5
  if "params" in params and len(params) == 1:
    params = params["params"]
  params = flax.linen.unbox(dict(params))
  flat = _flat(_unscanned({k: v for k, v in params.items() if k != "language_model"}, config))
  rest = {p: v for p, v in flat.items() if p[0] != "vision_model"}
  problems = []
  state = keymap.flat_to_hf(rest, stage2_qformer_entries(config), problems)
  vision = flax.traverse_util.unflatten_dict({p[1:]: v for p, v in flat.items()
                                              if p[0] == "vision_model"})
  try:
    state.update(vision_to_hf(vision, config.vision, prefix="vision_model."))
    llm = params.get("language_model", {})
    if config.llm_kind == "opt":
      state.update(hf_opt.hf_state_from_opt_params(
          llm, config.llm, "language_model.model.decoder.",
          lm_head_key="language_model.lm_head.weight"))
      if config.llm.tie_word_embeddings:  # HF BLIP-2 checkpoints store the tied head too
        state["language_model.lm_head.weight"] = state[
            "language_model.model.decoder.embed_tokens.weight"]
    else:
      state.update(hf_t5.hf_state_from_t5_params(llm, config.llm, "language_model.",
                                                 scan_layers=scan_layers))
  except ValueError as err:
    problems.append(str(err))
  if problems:
    raise ValueError("cannot convert Blip2Stage2 params to HF: " + "; ".join(problems))
  return state


def save_hf_blip2_stage2(config, params: Mapping[str, Any], path: str, *,
                         scan_layers: bool = False, max_shard_size: int | str | None = None):
  """Writes an HF ``Blip2ForConditionalGeneration`` directory (``from_pretrained`` loads it).

  Raises:
    ValueError: as :func:`stage2_config_to_hf` and :func:`hf_state_from_stage2_params`.
  """
  hf_config = stage2_config_to_hf(config)
  state = hf_state_from_stage2_params(config, params, scan_layers=scan_layers)
  os.makedirs(path, exist_ok=True)
  write_safetensors_dir(state, path, max_shard_size)
  with open(os.path.join(path, CONFIG_NAME), "w") as fh:
    json.dump(hf_config, fh, indent=2, sort_keys=True)


def load_hf_blip2_qformer(path: str, config, *, scan_layers: bool = False
                          ) -> dict[tuple[str, ...], np.ndarray]:
  """The vision tower, query tokens and Q-Former of an HF BLIP-2 directory (retrieval or
  conditional generation) as flat ``{path: array}`` of a ``Blip2Stage2``, for initialising stage
  2 (plus ``language_projection`` from a stage-2 checkpoint; never the LLM: see
  :func:`load_hf_language_model` and ``config.init.llm_checkpoint``). ``scan_layers``: paths
  and shapes of ``Blip2Stage2(scan_layers=True)`` (tower and Q-Former layers stacked).

  Raises:
    ValueError: a checkpoint whose tower, Q-Former or query count differ from ``config`` (listed),
      or unreadable keys.
  """
  with open(_config_file(path)) as fh:
    hf = json.load(fh)
  stage2 = "Blip2ForConditionalGeneration" in (hf.get("architectures") or [])
  other = stage2_config_from_hf(hf) if stage2 else blip2_config_from_hf(hf)
  q_other = dataclasses.replace(other.qformer, use_qformer_text_input=False)
  diffs = [f"{name}: {a} (checkpoint) vs {b} (model)" for name, a, b in (
      ("vision", other.vision, config.vision), ("qformer", q_other, config.qformer),
      ("num_query_tokens", other.num_query_tokens, config.num_query_tokens)) if a != b]
  if diffs:
    raise ValueError(f"the HF BLIP-2 checkpoint {path} does not fit the stage-2 model: "
                     + "; ".join(diffs))
  from vlm.models.blip2 import convert_layer_layout
  if stage2:
    _, params = load_hf_blip2_stage2(path)
    params.pop("language_model")
    return _flat(convert_layer_layout(params, config, scan_layers))
  _, params = load_hf_blip2(path)
  text_ffn = lambda p: p[0] == "qformer" and len(p) > 3 and p[3] in ("intermediate", "output")
  kept = {p: v for p, v in _flat(params).items()
          if p[0] in ("vision_model", "query_tokens", "qformer") and not text_ffn(p)}
  return _flat(convert_layer_layout(flax.traverse_util.unflatten_dict(kept), config,
                                    scan_layers))


def load_hf_language_model(path: str, config, *, scan_layers: bool = False):
  """A plain HF ``OPTForCausalLM`` / ``T5ForConditionalGeneration`` directory (facebook/opt-2.7b,
  google/flan-t5-xl), or the language model of an HF ``Blip2ForConditionalGeneration`` directory,
  as flat ``{("language_model", ...): array}`` of a ``Blip2Stage2``.

  Raises:
    ValueError: an LLM of another kind or size than ``config.llm`` (the differing fields listed;
      the vocabulary may differ only by HF BLIP-2's resize for ``<image>``).
  """
  from vlm.convert import hf_opt, hf_t5
  with open(_config_file(path)) as fh:
    hf = json.load(fh)
  stage2 = "Blip2ForConditionalGeneration" in (hf.get("architectures") or [])
  other = _llm_config_from_hf(hf.get("text_config") or {} if stage2 else hf)
  if type(other) is not type(config.llm):
    raise ValueError(f"{path} holds a {type(other).__name__} language model but the preset needs "
                     f"a {type(config.llm).__name__}")
  import dataclasses as dc
  skip = {"dropout", "attention_dropout", "dropout_rate", "dense_act_fn", "layerdrop",
          "pad_token_id", "bos_token_id", "eos_token_id", "decoder_start_token_id"}
  diffs = [f"{f.name}: {getattr(other, f.name)!r} (checkpoint) vs {getattr(config.llm, f.name)!r}"
           for f in dc.fields(other) if f.name not in skip
           and getattr(other, f.name) != getattr(config.llm, f.name)]
  if diffs:
    raise ValueError(f"the language model in {path} does not fit the preset: {'; '.join(diffs)}; "
                     "pick the preset of that LLM (or set model.overrides)")
  state = read_safetensors_dir(path)
  if stage2:
    llm = _llm_from_state(state, config, scan_layers)
  elif config.llm_kind == "opt":
    llm = hf_opt.opt_params_from_hf_state(state, config.llm, scan_layers=scan_layers)
  else:
    llm = hf_t5.t5_params_from_hf_state(state, config.llm, scan_layers=scan_layers)
  return {("language_model",) + k: v for k, v in _flat(llm).items()}
