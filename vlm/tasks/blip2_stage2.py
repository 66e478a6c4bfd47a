"""BLIP-2 stage 2 as a task of the trainer: the Q-Former bridged into a frozen OPT or FlanT5.

The recipe (LAVIS ``pretrain_stage2.yaml``; BLIP-2 paper section 3.3, arXiv:2301.12597; spec
section 4): the frozen image encoder and the frozen LLM stay fixed; the Q-Former, its query
tokens, ``ln_vision`` (``vision_model/post_layernorm``) and the ``language_projection`` learn to
turn an image into a soft prompt the LLM continues with the caption. Model
:class:`vlm.models.blip2.Blip2Stage2`, loss :func:`vlm.objectives.stage2.blip2_stage2_loss`, data
the BLIP-2 COCO-captions loader with the LLM text targets of
:class:`vlm.data.stage2_text.Stage2TextProcessor` (``data.caption_sampling="per_image"`` reads a
CapFilt caption file and draws one caption per use).

Batch (per process, ``b`` rows): ``pixel_values`` float32 [b,S,S,3], ``image_id`` int32 [b],
``input_ids``/``attention_mask``/``loss_mask`` int32 [b,T]; FlanT5 adds
``decoder_input_ids``/``decoder_attention_mask``/``labels`` int32 [b,T].

Initial weights (``config.init``, a fresh run only):

* the vision tower, ``query_tokens`` and Q-Former from ``stage1_workdir`` (a vlm stage-1 run: its
  parameters whose path and shape match; the same random frozen tower the Q-Former was trained
  with), or from ``hf_checkpoint`` (an HF BLIP-2 directory, stage 1 or stage 2), or the Q-Former's
  BERT part from ``bert_dir`` ("minilm");
* the LLM from ``llm_checkpoint`` (a plain HF ``OPTForCausalLM`` / ``T5ForConditionalGeneration``
  directory, as BLIP-2 starts from facebook/opt-2.7b or google/flan-t5-xl), else from
  ``hf_checkpoint`` when that is a stage-2 directory (it holds its LLM), or, when none is given
  and ``llm_warmup_steps > 0``, trained here first as a plain language model on the training
  captions (no pretrained LLM installs offline; a random frozen LLM cannot be bridged to) and then
  frozen for stage 2.

Evaluation after training: zero-shot captioning of the held-out photos (beam search, the paper's
prompt, pycocoevalcap CIDEr / BLEU-4 beside the most-frequent-training-caption baseline) and
zero-shot VQA on the embedded OK-VQA questions (VQA soft accuracy beside the most-frequent-answer
baseline), both through :mod:`vlm.inference.blip2_generate`.
"""
from __future__ import annotations

import logging
import time
from typing import Callable

import flax
import jax
import ml_collections
import numpy as np

from vlm import models
from vlm.nn import partitioning as P
from vlm.tasks.blip2_stage1 import dtype_of, preset_overrides, resolve_bert_dir, _place_host_leaves

log = logging.getLogger("vlm.train")

LOG_KEYS = ("loss", "accuracy")
THROUGHPUT_UNIT = "images"

# Trainable in stage 2 (spec 4.1): everything but the tower's blocks/embeddings and the LLM.
FROZEN = (r"^vision_model/(?!post_layernorm)", r"^language_model/")


def llm_kind(config) -> str:
  """``"opt"`` or ``"t5"`` of the config's preset."""
  return models.presets.get_preset(config.model.preset).llm_kind


def build_model(config: ml_collections.ConfigDict):
  """:class:`vlm.models.blip2.Blip2Stage2` of ``config.model`` (preset, dtypes, LLM storage
  dtype, ``scan_layers``, ``remat``)."""
  m = config.model
  llm_dtype = m.get("llm_param_dtype", "")
  return models.build("blip2_stage2", m.preset, preset_overrides=preset_overrides(config),
                      dtype=dtype_of(m.dtype), param_dtype=dtype_of(m.param_dtype),
                      llm_param_dtype=dtype_of(llm_dtype) if llm_dtype else None,
                      scan_layers=bool(m.get("scan_layers", False)),
                      remat=bool(m.get("remat", False)))


def text_processor(config):
  """The :class:`vlm.data.stage2_text.Stage2TextProcessor` of ``config.data``."""
  from vlm.data.stage2_text import build_text_processor
  return build_text_processor(llm_kind(config), config.data)


def example_batch(config, batch_size: int = 1) -> dict[str, np.ndarray]:
  """Zeros of the batch schema with ``batch_size`` rows."""
  s = config.data.image_size
  text = text_processor(config).example()
  out = {k: np.repeat(v[None], batch_size, 0) for k, v in text.items()}
  out["pixel_values"] = np.zeros((batch_size, s, s, 3), np.float32)
  out["image_id"] = np.zeros((batch_size,), np.int32)
  return out


def init_model(model, rng, batch):
  """``Blip2Stage2.init`` on an example batch -> boxed params."""
  return model.init(rng, batch["pixel_values"], batch["input_ids"], batch["attention_mask"],
                    batch.get("decoder_input_ids"), batch.get("decoder_attention_mask"))["params"]


def batch_axes(config) -> dict[str, tuple]:
  """Every array split on its leading (batch) axis."""
  axes = {k: (P.BATCH, None) for k in text_processor(config).example()}
  axes["pixel_values"] = (P.BATCH, None, None, None)
  axes["image_id"] = (P.BATCH,)
  return axes


def count_units(batch) -> int:
  """Images in a host batch."""
  return int(np.shape(batch["pixel_values"])[0])


def train_data(config, *, seed: int, process_index: int, process_count: int):
  """The BLIP-2 COCO-captions loader with the LLM text targets (checkpointable grain iterator)."""
  from vlm.data import pipeline as data_pipeline
  loader = data_pipeline.build_blip2_train_loader(
      config.data, global_batch_size=config.global_batch_size, seed=seed,
      process_index=process_index, process_count=process_count,
      text_processor=text_processor(config))
  return iter(loader), loader.loader_stats


def loss_fn(model, params, batch, rng, **loss_kwargs):
  """:func:`vlm.objectives.stage2.blip2_stage2_loss`."""
  from vlm.objectives import stage2
  return stage2.blip2_stage2_loss(model, params, batch, rng, **loss_kwargs)


def validate(config) -> None:
  """Checks before anything compiles: prompts, the held-out photos and the VQA file.

  Raises:
    ValueError / BadSampleError naming the setting, file or record.
  """
  from vlm.inference import blip2_generate
  size = models.presets.get_preset(config.model.preset).vision.image_size
  if int(config.data.image_size) != size:
    raise ValueError(f"data.image_size={config.data.image_size} but the preset "
                     f"{config.model.preset} takes {size}-px images: set "
                     f"--config.data.image_size={size}")
  ev = config.eval
  if not config.eval.at_end:
    return
  tok = blip2_generate.tokenizer_of(llm_kind(config))
  blip2_generate.check_prompt(tok, ev.caption_prompt, "eval.caption_prompt", allow_empty=True)
  blip2_generate.check_prompt(tok, ev.vqa_prompt.format("what is this?"), "eval.vqa_prompt")
  if "{}" not in ev.vqa_prompt:
    raise ValueError(f"eval.vqa_prompt {ev.vqa_prompt!r} needs a '{{}}' where the question goes, "
                     "e.g. 'Question: {} Answer:'")
  from vlm.data import pipeline as data_pipeline
  log.info("evaluation split val: %s", data_pipeline.validate_retrieval_split(config.data, "val"))
  if ev.get("vqa_file", ""):
    from vlm.inference import vqa
    vqa.load_vqa(ev.vqa_file, ev.vqa_image_dir)


# -------------------------------------------------------------------------------------------------
# Initial weights
# -------------------------------------------------------------------------------------------------

def _init_from_workdir_any_layout(params, shardings, workdir: str, *, model_config):
  """:func:`vlm.train.checkpoint.init_params_from_workdir` across layer layouts: when the saved
  run's vision tower / Q-Former are scanned and this model's are not (or the reverse), ``params``
  are converted to the saved layout (:func:`vlm.models.blip2.convert_layer_layout`, on the
  devices, under jit), read from the checkpoint there, and converted back into ``shardings``."""
  from vlm.models.blip2 import convert_layer_layout, layers_scanned
  from vlm.train import checkpoint as ckpt
  _, saved = ckpt.saved_param_shapes(workdir)
  saved_scanned = any(name.startswith(("vision_model/encoder/layers/",
                                       "qformer/encoder/layers/")) for name in saved)
  here = layers_scanned(params)
  if here is None or here == saved_scanned:
    return ckpt.init_params_from_workdir(params, shardings, workdir)
  log.info("converting the vision tower / Q-Former layer layout (%s -> %s) to read %s",
           "scanned" if here else "unscanned", "scanned" if saved_scanned else "unscanned",
           workdir)
  to_saved = jax.jit(lambda p: convert_layer_layout(p, model_config, saved_scanned))
  alt = to_saved(params)
  alt = ckpt.init_params_from_workdir(alt, jax.tree.map(lambda x: x.sharding, alt), workdir)
  back = jax.jit(lambda p: convert_layer_layout(p, model_config, here), out_shardings=shardings)
  return back(alt)


def _stage1_init(config, model, params, shardings):
  from vlm.train import checkpoint as ckpt
  workdir = config.init.stage1_workdir
  try:
    _, run = ckpt.saved_run_config(workdir)
  except FileNotFoundError as e:
    raise FileNotFoundError(f"config.init.stage1_workdir: {e}") from None
  if run.get("task") != "blip2_stage1":
    raise ValueError(f"config.init.stage1_workdir={workdir!r} is a {run.get('task')!r} run; it "
                     "needs a BLIP-2 stage-1 run (configs/blip2/stage1.py). To continue from an "
                     "earlier stage-2 run use --config.init.workdir instead.")
  try:
    return _init_from_workdir_any_layout(params, shardings, workdir, model_config=model.config)
  except ValueError as e:
    why = str(e).split(". Use a workdir")[0]
    raise ValueError(f"config.init.stage1_workdir={workdir!r} does not fit this stage-2 model "
                     f"({config.model.preset}): {why[:600]}. Train stage 1 with the same Q-Former "
                     "and vision sizes (configs/blip2/stage1.py:tiny for the tiny variants).") \
        from None


def _hf_blip2_init(config, model, params, shardings):
  from vlm.convert import hf_blip2
  host = hf_blip2.load_hf_blip2_qformer(config.init.hf_checkpoint, model.config,
                                        scan_layers=model.scan_layers)
  log.info("initialised the vision tower, query tokens and Q-Former from %s (%d arrays)",
           config.init.hf_checkpoint, len(host))
  return _place_host_leaves(params, shardings, host)


def _bert_init(config, model, params, shardings):
  from vlm.convert import hf_blip2
  abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), params)
  stage1_like = models.presets.Blip2Config(vision=model.config.vision, qformer=model.config.qformer,
                                           num_query_tokens=model.config.num_query_tokens)
  out = hf_blip2.init_qformer_from_bert(abstract, stage1_like,
                                        resolve_bert_dir(config.init.bert_dir))
  host = {k: v for k, v in flax.traverse_util.flatten_dict(out).items()
          if not isinstance(v, jax.ShapeDtypeStruct)}
  log.info("initialised the Q-Former's BERT part from %s (%d arrays)", config.init.bert_dir,
           len(host))
  return _place_host_leaves(params, shardings, host)


def _llm_checkpoint_init(llm_dir, model, params, shardings):
  from vlm.convert import hf_blip2
  host = hf_blip2.load_hf_language_model(llm_dir, model.config, scan_layers=model.scan_layers)
  log.info("initialised the frozen LLM from %s (%d arrays)", llm_dir, len(host))
  return _place_host_leaves(params, shardings, host)


def init_params(config, model, params, shardings):
  """Initial weights for a fresh run (see the module docstring), placed in their shardings.

  Raises:
    ValueError: a stage-1 workdir or HF directory whose sizes differ from the preset (the
      message names the setting and the fix); FileNotFoundError: a missing directory.
  """
  init = config.init
  if init.get("stage1_workdir", ""):
    params = _stage1_init(config, model, params, shardings)
  elif init.get("hf_checkpoint", ""):
    params = _hf_blip2_init(config, model, params, shardings)
  elif init.get("bert_dir", ""):
    params = _bert_init(config, model, params, shardings)
  else:
    log.warning("the Q-Former starts from random weights (no init.stage1_workdir, "
                "init.hf_checkpoint or init.bert_dir)")
  # the LLM: a plain HF OPT/T5 directory, else the one inside an HF stage-2 BLIP-2 directory
  llm_dir = init.get("llm_checkpoint", "")
  if not llm_dir and init.get("hf_checkpoint", ""):
    from vlm.convert import hf_blip2
    if hf_blip2.is_conditional_generation(init.hf_checkpoint):
      llm_dir = init.hf_checkpoint
  if llm_dir:
    params = _llm_checkpoint_init(llm_dir, model, params, shardings)
  elif int(init.get("llm_warmup_steps", 0)) > 0:
    params = warmup_language_model(config, model, params, shardings)
  else:
    log.warning("the frozen LLM keeps its random initial weights: set init.llm_checkpoint to an "
                "HF OPT/T5 directory (or init.llm_warmup_steps for the CPU variants)")
  return params


def _warmup_texts(config, processor, n: int, seed: int) -> list[dict[str, np.ndarray]]:
  """``n`` text rows (the stage-2 text targets of training captions, images left out)."""
  from vlm.data import pipeline as data_pipeline
  from vlm.data.sources import CocoCaptionsSource
  from vlm.data.text import caption_problem
  ann, image_dir = data_pipeline.split_paths(config.data, "train")
  source = CocoCaptionsSource(ann, image_dir)
  captions = [source[i]["caption"] for i in range(len(source))]
  captions = [c for c in captions if caption_problem(c, config.data.max_words) is None]
  rng = np.random.default_rng(seed)
  return [processor(captions[int(rng.integers(len(captions)))], rng) for _ in range(n)]


def warmup_language_model(config, model, params, shardings):
  """Trains the LLM alone as a language model on the training captions, before it is frozen.

  A stand-in for a pretrained LLM where none can be installed (the CPU variants): the LLM
  learns the captions' language with the same text targets as stage 2 (OPT: prompt + caption +
  newline, next-token loss on the caption; T5: prompt or caption prefix into the encoder, the rest
  as the decoder target) but without the visual prompt (a T5's untied head is first scaled to
  unit-variance logits, see the code). ``init.llm_warmup_steps`` AdamW steps at
  ``init.llm_warmup_lr`` (constant after 10% linear warmup), batch ``init.llm_warmup_batch``, seed
  ``config.seed``; deterministic. Only ``language_model/*`` changes.

  Returns:
    ``params`` with the trained ``language_model`` subtree (same shardings).
  """
  import optax
  from vlm.train import checkpoint as ckpt
  init = config.init
  steps, batch_size = int(init.llm_warmup_steps), int(init.get("llm_warmup_batch", 32))
  processor = text_processor(config)
  rows = _warmup_texts(config, processor, steps * batch_size, config.seed)
  kind = model.config.llm_kind
  lm = params["language_model"]
  lm_sh = shardings["language_model"]
  if kind == "t5" and "lm_head" in lm:
    # HF's T5 init draws the untied head with std 1.0 (made for Adafactor): logits of std
    # ~sqrt(d_model) and a first loss near 70. For this from-scratch AdamW warm-up the head is
    # scaled to unit-variance logits first (an initialisation choice; pretrained heads are loaded).
    scale = model.config.llm.d_model ** -0.5
    lm = dict(lm, lm_head={"kernel": lm["lm_head"]["kernel"] * scale})
  lr = optax.linear_schedule(0.0, float(init.get("llm_warmup_lr", 1e-3)), max(1, steps // 10))
  tx = optax.adamw(lr, b1=0.9, b2=0.98, weight_decay=0.01)
  opt_state = jax.jit(tx.init)(lm)

  rest = {k: v for k, v in params.items() if k != "language_model"}

  def loss(lm_params, rest, batch, key):
    from vlm.objectives.lm import next_token_loss_mean
    v = {"params": dict(rest, language_model=lm_params)}

    def forward(m, b):
      ids, mask = b["input_ids"], b["attention_mask"]
      if kind == "opt":
        h, _ = m.language_model(m.embed_text(ids), mask, deterministic=False, return_hidden=True)
        return h[:, :-1], ids[:, 1:], b["loss_mask"][:, 1:]
      enc = m.language_model.encode(m.embed_text(ids), mask, deterministic=False)
      h, _ = m.language_model.decode(b["decoder_input_ids"], enc, mask,
                                     b["decoder_attention_mask"], deterministic=False,
                                     return_hidden=True)
      return h, b["labels"], b["loss_mask"]

    h, y, w = model.apply(v, batch, method=forward, rngs={"dropout": key})
    head = lambda x: model.apply(v, x, method=model.lm_logits)
    return next_token_loss_mean(h, head, y, w)[0]

  @jax.jit
  def step(lm_params, rest, opt_state, batch, key):
    value, grads = jax.value_and_grad(loss)(lm_params, rest, batch, key)
    updates, opt_state = tx.update(grads, opt_state, lm_params)
    return optax.apply_updates(lm_params, updates), opt_state, value

  key = jax.random.PRNGKey(config.seed)
  t0, losses = time.perf_counter(), []
  for i in range(steps):
    chunk = rows[i * batch_size:(i + 1) * batch_size]
    batch = {k: np.stack([r[k] for r in chunk]) for k in chunk[0]}
    ckpt.check_preemption()  # a SIGTERM / Ctrl-C during the warm-up stops the run at once
    lm, opt_state, value = step(lm, rest, opt_state, batch, jax.random.fold_in(key, i))
    if i == 0 or (i + 1) % max(1, steps // 5) == 0:
      losses.append(float(value))
      log.info("LLM warm-up step %d/%d: loss %.3f", i + 1, steps, losses[-1])
  lm = jax.tree.map(lambda x, s: jax.device_put(x, s), lm, lm_sh)
  print(f"LLM warm-up on the training captions: {steps} steps, loss {losses[0]:.3f} -> "
        f"{losses[-1]:.3f} ({time.perf_counter() - t0:.0f} s); the LLM is frozen from here on",
        flush=True)
  return dict(params, language_model=lm)


# -------------------------------------------------------------------------------------------------
# Evaluation
# -------------------------------------------------------------------------------------------------

def evaluators(config) -> dict[str, Callable]:
  """``captioning`` (held-out photos) and ``vqa`` (OK-VQA questions), when configured."""
  from vlm.inference import blip2_generate
  out = {}
  if config.eval.get("captioning", True):
    out["captioning"] = lambda model, params, step, *, writer=None: (
        blip2_generate.evaluate_captioning(model, params, config, writer=writer, step=step))
  if config.eval.get("vqa_file", ""):
    out["vqa"] = lambda model, params, step, *, writer=None: (
        blip2_generate.evaluate_vqa(model, params, config, writer=writer, step=step))
  return out


# -------------------------------------------------------------------------------------------------
# Configs (configs/blip2/stage2_opt.py and stage2_t5.py are thin wrappers around this)
# -------------------------------------------------------------------------------------------------

VARIANTS = {"opt": ("tiny", "opt2.7b", "opt6.7b"), "t5": ("tiny", "flant5xl", "flant5xxl")}


def base_config(kind: str, variant: str) -> ml_collections.ConfigDict:
  """The stage-2 run config of one LLM family and variant (see the two config files).

  Paper values (BLIP-2 section 3.4 and LAVIS ``pretrain_stage2.yaml``, spec 6.1 and 4.4): batch
  1920 (OPT) / 1520 (FlanT5), 80k steps, AdamW(0.9, 0.98), wd 0.05, peak lr 1e-4 with 2k warmup
  steps and cosine decay to 5e-5, images 224 px; evaluation by beam search (5 beams) with the
  prompts "a photo of" (captions: at most 30 new tokens, at least 8) and
  "Question: {} Answer:" (OPT) / "Question: {} Short answer:" (FlanT5) (answers: at most 10 new
  tokens, length penalty -1).

  Raises:
    ValueError: an unknown kind or variant (lists the valid ones).
  """
  from vlm.data.config import default_blip2_data_config
  if kind not in VARIANTS:
    raise ValueError(f"unknown LLM kind {kind!r}; use 'opt' or 't5'")
  if variant not in VARIANTS[kind]:
    raise ValueError(f"unknown variant {variant!r}; use one of {', '.join(VARIANTS[kind])}")
  tiny = variant == "tiny"
  c = ml_collections.ConfigDict()
  c.variant = variant
  c.task = "blip2_stage2"  # vlm/tasks/blip2_stage2.py
  c.seed = 0
  c.prng_impl = "rbg" if tiny else "threefry2x32"
  preset = {"tiny": f"blip2_{kind}_tiny", "opt2.7b": "blip2_opt2.7b", "opt6.7b": "blip2_opt6.7b",
            "flant5xl": "blip2_flant5xl", "flant5xxl": "blip2_flant5xxl"}[variant]
  c.model = ml_collections.ConfigDict(dict(
      name="blip2_stage2", preset=preset, dtype="float32" if tiny else "bfloat16",
      param_dtype="float32", llm_param_dtype="" if tiny else "bfloat16",
      scan_layers=not tiny, remat=not tiny, overrides={}))
  c.init = ml_collections.ConfigDict(dict(
      stage1_workdir="", hf_checkpoint="", bert_dir="minilm" if tiny else "", llm_checkpoint="",
      llm_warmup_steps=200 if tiny else 0, llm_warmup_batch=32, llm_warmup_lr=2e-3, workdir=""))

  c.data = default_blip2_data_config()
  c.data.prompt = "a photo of" if tiny else ""
  c.data.prefix_split = True  # FlanT5 without a prompt: the paper's prefix language modelling
  c.loss = ml_collections.ConfigDict(dict(llm_dropout=True, chunk_size=512, z_loss=0.0))

  c.total_steps = 200 if tiny else 80_000
  c.global_batch_size = 16 if tiny else {"opt": 1920, "t5": 1520}[kind]
  c.microbatches = 1
  c.optim = ml_collections.ConfigDict(dict(
      lr=3e-4 if tiny else 1e-4, min_lr=5e-5 if not tiny else 3e-5, warmup_lr=1e-6,
      warmup_steps=20 if tiny else 2000, total_steps=c.get_ref("total_steps"),
      b1=0.9, b2=0.98, eps=1e-8, weight_decay=0.05, grad_clip_norm=0.0,
      frozen=list(FROZEN), lr_multipliers=[]))
  # Full variants: data=-1 x fsdp=8 (16 chips: 2 x 8, the paper's batches divide; the config files'
  # docstrings give the 256-chip settings); tiny: FSDP over all devices.
  mesh = ({"data": 1, "fsdp": -1, "tensor": 1, "expert": 1} if tiny else
          {"data": -1, "fsdp": 8, "tensor": 1, "expert": 1})
  c.mesh = ml_collections.ConfigDict(dict(shape=mesh, rules=None))
  c.checkpoint = ml_collections.ConfigDict(dict(
      every_steps=100 if tiny else 2000, max_to_keep=3, async_save=True))
  c.log_every_steps = 20 if tiny else 100
  vqa_prompt = "Question: {} Answer:" if kind == "opt" else "Question: {} Short answer:"
  c.eval = ml_collections.ConfigDict(dict(
      at_end=True, captioning=True, caption_split="val", caption_prompt="a photo of",
      num_beams=5, caption_max_new_tokens=30, caption_min_new_tokens=8, caption_length_penalty=1.0,
      vqa_file="data/vqa/okvqa_on_coco_real_captions.json", vqa_image_dir="data/coco/images",
      vqa_prompt=vqa_prompt, vqa_max_new_tokens=10, vqa_min_new_tokens=1,
      vqa_length_penalty=-1.0, batch_size=16 if tiny else 64, max_images=0))
  return c
