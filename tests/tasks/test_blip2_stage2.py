"""BLIP-2 stage 2 as a task: configs, text targets, initialisation from stage 1, frozen parts,
evaluation, and the errors of bad initialisation.

The end-to-end runs use the micro presets (32-px images, 2-layer LLMs with the real vocabularies)
so that one file trains stage 1, then stage 2 from its workdir, in about a minute.
"""
import json
import os

import jax
import numpy as np
import pytest

from vlm import models
from vlm.data.llm_tokenizers import llm_tokenizer
from vlm.data.stage2_text import Stage2TextProcessor
from vlm.tasks import blip2_stage2
from vlm.train import checkpoint as ckpt
from vlm.train import loop, optim

from tests.train.micro import micro_config, set_dotted


def _stage2_config(kind, stage1_workdir="", total_steps=4, **over):
  c = blip2_stage2.base_config(kind, "tiny")
  c.model.preset = f"blip2_{kind}_micro"
  c.data.image_size = 32
  c.init.stage1_workdir = stage1_workdir
  c.init.bert_dir = ""
  c.init.llm_warmup_steps = 3
  c.init.llm_warmup_batch = 4
  c.total_steps = total_steps
  c.global_batch_size = 8
  c.optim.warmup_steps = 1
  c.checkpoint.every_steps = 2
  c.log_every_steps = 1
  c.eval.at_end = False
  c.eval.batch_size = 4
  c.eval.max_images = 4
  c.eval.num_beams = 2
  c.eval.caption_max_new_tokens = 6
  c.eval.caption_min_new_tokens = 2
  c.eval.vqa_max_new_tokens = 4
  c.eval.caption_tokenizer = "basic"
  c.mesh.shape = {"data": 1, "fsdp": -1, "tensor": 1, "expert": 1}
  return set_dotted(c, over)


@pytest.fixture(scope="module")
def stage1_workdir(tmp_path_factory):
  workdir = str(tmp_path_factory.mktemp("stage1"))
  loop.run(micro_config(total_steps=2), workdir)
  return workdir


def _flat(tree):
  import flax
  return {"/".join(k): np.asarray(v) for k, v in flax.traverse_util.flatten_dict(tree).items()}


def test_opt_stage2_trains_from_stage1_and_evaluates(tmp_path, stage1_workdir):
  c = _stage2_config("opt", stage1_workdir, **{"eval.at_end": True})
  res = loop.run(c, str(tmp_path))
  assert res["step"] == 4
  assert np.isfinite(res["train_metrics"]["loss"]) and res["train_metrics"]["loss"] > 0
  _, s1 = ckpt.restore_params(stage1_workdir)
  _, first = ckpt.restore_params(str(tmp_path), 2)
  _, last = ckpt.restore_params(str(tmp_path), 4)
  s1, first, last = _flat(s1), _flat(first), _flat(last)
  # the frozen tower is stage 1's, bit for bit; the frozen LLM does not move during stage 2
  for k, v in last.items():
    if k.startswith("vision_model/") and "post_layernorm" not in k:
      np.testing.assert_array_equal(v, s1[k], err_msg=k)
    if k.startswith("language_model/"):
      np.testing.assert_array_equal(v, first[k], err_msg=k)
  # the trainable parts move
  for k in ("query_tokens", "language_projection/kernel"):
    assert not np.array_equal(last[k], first[k]), k
  assert not any(k.startswith(("embeddings/", "cls/", "itm_head")) for k in last)
  results = json.load(open(tmp_path / "eval_results.json"))
  cap, vqa = results["captioning"], results["vqa"]
  assert cap["num_images"] == 4 and set(cap["scores"]) >= {"CIDEr", "BLEU-4"}
  assert set(cap["baseline"]) >= {"CIDEr", "BLEU-4"}
  assert vqa["num_questions"] == 4 and 0.0 <= vqa["scores"]["accuracy"] <= 1.0
  assert "accuracy" in vqa["baseline"]
  _export_equals_hf(str(tmp_path), c)


def _export_equals_hf(workdir, config):
  """scripts/convert_hf.py --from_workdir: HF Blip2ForConditionalGeneration loads the trained
  run and computes vlm's logits."""
  import importlib.util
  import torch
  import transformers
  spec = importlib.util.spec_from_file_location(
      "convert_hf", os.path.join(os.path.dirname(__file__), "..", "..", "scripts", "convert_hf.py"))
  script = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(script)
  out = os.path.join(workdir, "hf_export")
  info = script.convert_workdir(workdir, out)
  assert info["step"] == 4
  hf = transformers.Blip2ForConditionalGeneration.from_pretrained(out).eval()
  model = blip2_stage2.build_model(config)
  _, params = ckpt.restore_params(workdir)
  rng = np.random.default_rng(0)
  s, q = model.config.vision.image_size, model.config.num_query_tokens
  pixels = rng.standard_normal((2, s, s, 3)).astype(np.float32)
  text = np.asarray([[2, 250, 1000, 9, 50118], [2, 31, 7, 88, 4]])
  ours = np.asarray(model.apply({"params": params}, pixels, text, np.ones_like(text)))
  ids = np.concatenate([np.full((2, q), model.config.image_token_index), text], 1)
  with torch.no_grad():
    theirs = hf(pixel_values=torch.tensor(pixels.transpose(0, 3, 1, 2)),
                input_ids=torch.tensor(ids)).logits.numpy()
  np.testing.assert_allclose(ours[:, q:], theirs[:, q:], atol=1e-5)


def test_t5_stage2_trains(tmp_path):
  """The FlanT5 path of the task (prefix-LM targets, LLM warm-up, frozen LLM); its generation is
  covered against HF in tests/equivalence/test_blip2_stage2.py."""
  c = _stage2_config("t5", total_steps=2, **{"data.prompt": "", "init.llm_warmup_steps": 2})
  res = loop.run(c, str(tmp_path))
  assert res["step"] == 2 and np.isfinite(res["train_metrics"]["loss"])
  assert res["train_metrics"]["num_tokens"] > 0


def test_stage1_workdir_of_another_size_is_a_clear_error(tmp_path, stage1_workdir):
  c = _stage2_config("opt", stage1_workdir, **{"model.overrides": {"num_query_tokens": 4},
                                               "init.llm_warmup_steps": 0})
  with pytest.raises(ValueError, match="stage1_workdir.*does not fit"):
    loop.run(c, str(tmp_path))


def test_sigterm_during_the_llm_warmup_stops_at_once(tmp_path, monkeypatch):
  """A preemption notice during the task's start-up work (the LLM warm-up) ends the run before
  the first step instead of after the whole warm-up (nothing to save yet)."""
  import signal
  texts = blip2_stage2._warmup_texts

  def texts_then_sigterm(*args, **kwargs):  # the notice arrives as the warm-up starts
    out = texts(*args, **kwargs)
    os.kill(os.getpid(), signal.SIGTERM)
    return out

  monkeypatch.setattr(blip2_stage2, "_warmup_texts", texts_then_sigterm)
  c = _stage2_config("opt", **{"init.llm_warmup_steps": 500})
  res = loop.run(c, str(tmp_path))
  assert res["stopped_by"] == "SIGTERM" and res["state"] is None
  assert not os.listdir(tmp_path / "checkpoints")


def test_frozen_and_trainable_parameter_counts_match_the_paper():
  """Spec 4.1: ViT-g + OPT-2.7B trains 107.1M parameters, + FlanT5-XL 106.7M (Q-Former,
  queries, ln_vision, projection); counted from shapes only."""
  for kind, variant, want in (("opt", "opt2.7b", 107.1e6), ("t5", "flant5xl", 106.7e6)):
    c = blip2_stage2.base_config(kind, variant)
    model = blip2_stage2.build_model(c)
    batch = blip2_stage2.example_batch(c, 1)
    shapes = jax.eval_shape(lambda: blip2_stage2.init_model(model, jax.random.PRNGKey(0), batch))
    import flax
    shapes = flax.linen.unbox(shapes)
    mask = optim.trainable_mask(shapes, c.optim.frozen)
    n_train = sum(int(np.prod(x.shape)) for x, t in zip(jax.tree.leaves(shapes),
                                                          jax.tree.leaves(mask)) if t)
    assert abs(n_train - want) / want < 0.01, (variant, n_train)


def test_opt_text_targets_mask_the_prompt_and_keep_the_caption():
  tok = llm_tokenizer("opt")
  p = Stage2TextProcessor("opt", tok, max_text_len=16, prompt="a photo of")
  out = p("A dog on the beach.", np.random.default_rng(0))
  n_prompt = len(tok.encode_ids("a photo of"))
  ids = out["input_ids"][out["attention_mask"] == 1].tolist()
  assert ids == tok.encode_ids("a photo of a dog on the beach\n")
  assert out["loss_mask"][:n_prompt].sum() == 0 and out["loss_mask"][n_prompt:len(ids)].all()
  assert out["loss_mask"][len(ids):].sum() == 0
  # no prompt (pre-training): every real token is a target, the BOS included (LAVIS)
  bare = Stage2TextProcessor("opt", tok, max_text_len=16)("A dog.", np.random.default_rng(0))
  assert bare["loss_mask"].sum() == bare["attention_mask"].sum()
  with pytest.raises(ValueError, match="max_text_len"):
    Stage2TextProcessor("opt", tok, max_text_len=3, prompt="a photo of a big")


def test_t5_prefix_split_is_a_word_boundary_and_reproducible():
  tok = llm_tokenizer("t5")
  p = Stage2TextProcessor("t5", tok, max_text_len=24)
  caption = "a man riding a wave on top of a surfboard"
  seen = set()
  for seed in range(40):
    a = p(caption, np.random.default_rng(seed))
    b = p(caption, np.random.default_rng(seed))
    assert all(np.array_equal(a[k], b[k]) for k in a)
    src = tok.decode(a["input_ids"][a["attention_mask"] == 1].tolist())
    tgt = tok.decode(a["labels"][a["decoder_attention_mask"] == 1].tolist())
    assert (src + " " + tgt).strip() == caption and tgt
    assert a["decoder_input_ids"][0] == 0 and np.array_equal(a["decoder_input_ids"][1:],
                                                              a["labels"][:-1])
    seen.add(src)
  assert len(seen) > 5  # the cut moves


def test_configs_of_every_variant_build():
  for kind in ("opt", "t5"):
    for variant in blip2_stage2.VARIANTS[kind]:
      c = blip2_stage2.base_config(kind, variant)
      assert models.presets.get_preset(c.model.preset).llm_kind == kind
  with pytest.raises(ValueError, match="unknown variant"):
    blip2_stage2.base_config("opt", "flant5xl")
