"""Weights in and out: a tiny HF Qwen3-VL -> 3 vlm training steps -> an HF directory again.

A random ``Qwen3VLForConditionalGeneration`` of the ``qwen3_vl_tiny`` preset's shape (real
vocabulary and special tokens, so the embedded data and the bundled tokenizer fit) is saved with
``save_pretrained``; ``vlm.train.loop.run`` trains the ``sft`` ``tiny`` config initialised from it
(``config.init.hf_checkpoint``) for 3 steps on the demo conversations, on 8 simulated devices
(batch split 2 ways, tensors 2 ways, scanned decoder layers); ``scripts/convert_hf.py``'s
``convert_workdir`` exports the workdir. Then: transformers loads the export and its logits on a
two-image batch equal vlm's logits of the checkpoint's parameters (1e-5, float32); the export
reads back bit-identical to the checkpoint; training changed the weights; ``vlm.load_pretrained``
opens it and HF's image processor, configured by the exported ``preprocessor_config.json``,
gives vlm's pixels. Errors: a workdir without checkpoints, a non-Qwen run, a damaged newest
checkpoint (the one before is exported), a gone initial HF directory, a non-empty output.
"""
import glob
import importlib.util
import json
import os
import shutil

import chex
import flax
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from transformers import Qwen3VLConfig as HFConfig, Qwen3VLForConditionalGeneration

import vlm
from tests.equivalence.qwen_hf_utils import randomize_hf
from vlm.convert.hf_qwen3_vl import config_to_hf, load_hf_qwen3_vl
from vlm.data.paths import resolve_path
from vlm.inference.generate import load_generation_config, prepare_inputs
from vlm.models.qwen_presets import qwen_config
from vlm.tasks import qwen_vl
from vlm.train import checkpoint as ckpt
from vlm.train.loop import run

TOL = 1e-5
REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
IMAGES = ["data/qwen_sft/demo/images/10095.png", "data/qwen_sft/demo/images/10149.png"]
# Damaging checkpoints leaves tensorstore futures that are never awaited (see test_resilience).
pytestmark = pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")


def _script():
  spec = importlib.util.spec_from_file_location("convert_hf",
                                                os.path.join(REPO, "scripts", "convert_hf.py"))
  mod = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(mod)
  return mod


def _config(hf_dir):
  c = qwen_vl.qwen_vl_config("sft", "tiny")
  c.init.hf_checkpoint = hf_dir
  c.data.sources = [{"type": "conversations", "path": "data/qwen_sft/single_images.json"}]
  c.data.max_length, c.data.max_patches, c.data.num_threads = 64, 128, 1
  c.model.scan_layers = True
  c.model.scan_vision = True  # the tower's blocks scanned too (visual/blocks, stacked)
  c.mesh.shape = {"data": 1, "fsdp": 2, "tensor": 2, "expert": 2}
  c.global_batch_size = 2
  c.total_steps = c.optim.total_steps = 3
  c.optim.warmup_steps = 1
  c.checkpoint.every_steps = 1000  # orbax's first save + the final one
  c.log_every_steps = 1
  c.loss.chunk_size = 64
  c.eval.at_end = False
  return c


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
  """(initial HF dir, workdir, export dir, convert summary, run result)."""
  root = tmp_path_factory.mktemp("export")
  hf_dir, wd, out = str(root / "hf_init"), str(root / "run"), str(root / "hf_out")
  hf_cfg = HFConfig(**config_to_hf(qwen_config("qwen3_vl_tiny")))
  hf_cfg._attn_implementation = "eager"
  torch.manual_seed(0)
  randomize_hf(Qwen3VLForConditionalGeneration(hf_cfg), 0).save_pretrained(
      hf_dir, safe_serialization=True)
  res = run(_config(hf_dir), wd)
  assert res["step"] == 3 and np.isfinite(res["train_metrics"]["loss"])
  assert sorted(os.listdir(os.path.join(wd, "checkpoints"))) == ["1", "3"]
  info = _script().convert_workdir(wd, out)
  return hf_dir, wd, out, info, res


def _hf_batch(processor):
  prompts = [processor.apply_chat_template([{"role": "user", "content": [
      {"type": "image"}, {"type": "text", "text": q}]}]) for q in
      ("Is the value of Favorable 38 in 2015?", "In which year the value was 51?")]
  return processor(text=prompts, images=[[resolve_path(p)] for p in IMAGES])


def test_hf_loads_the_export_and_its_logits_equal_vlm(trained):
  hf_dir, wd, out, info, _ = trained
  assert info["step"] == 3 and info["model_type"] == "qwen3_vl"
  for name in ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json",
               "preprocessor_config.json", "video_preprocessor_config.json",
               "generation_config.json"):
    assert name in info["files"], name
  step, params = ckpt.restore_params(wd)
  assert step == 3 and "layers" in params["language_model"]  # trained scanned, exported unstacked
  assert "blocks" in params["visual"] and "blocks_0" not in params["visual"]

  # training happened: the checkpoint differs from the initial HF weights
  _, init = load_hf_qwen3_vl(hf_dir, scan_layers=True, scan_vision=True)
  fi, fp = flax.traverse_util.flatten_dict(init), flax.traverse_util.flatten_dict(params)
  assert set(fi) == set(fp)
  same = {"/".join(k) for k in fi if np.array_equal(np.asarray(fi[k]), np.asarray(fp[k]))}
  print(f"{len(fi) - len(same)} of {len(fi)} parameter arrays changed in training")
  # All but the 1-D parameters of the last DeepStack merger: its features are added to the
  # output of the last decoder layer at the image positions only, whose logits the loss masks
  # (user turn), so they get no gradient (as in HF); its kernels move by weight decay alone.
  assert same == {f"visual/deepstack_merger_list_1/{p}" for p in
                  ("linear_fc1/bias", "linear_fc2/bias", "norm/bias", "norm/scale")}, same

  # the export reads back exactly the checkpoint's parameters (vlm.load_pretrained too)
  _, back = load_hf_qwen3_vl(out, scan_layers=True, scan_vision=True)
  chex.assert_trees_all_equal(jax.tree.map(np.asarray, back), params)
  model, loaded, processor = vlm.load_pretrained(out)
  chex.assert_trees_all_equal(
      jax.tree.map(np.asarray, loaded),
      jax.tree.map(np.asarray, load_hf_qwen3_vl(out)[1]))

  # HF's logits of the export equal vlm's of the checkpoint (the run's own scanned model)
  batch = _hf_batch(processor)
  hf = Qwen3VLForConditionalGeneration.from_pretrained(out, attn_implementation="eager").eval()
  with torch.no_grad():
    want = hf(input_ids=torch.tensor(batch["input_ids"]),
              attention_mask=torch.tensor(batch["attention_mask"]),
              pixel_values=torch.tensor(batch["pixel_values"]),
              image_grid_thw=torch.tensor(batch["image_grid_thw"])).logits.numpy()
  config = _config(hf_dir)
  run_model = qwen_vl.build_model(config)
  inp = prepare_inputs(run_model.config, batch, pad_token_id=processor.tokenizer.pad_token_id,
                       prompt_bucket=1)
  assert inp["input_ids"].shape == batch["input_ids"].shape
  got, _ = jax.jit(run_model.apply)(
      {"params": params}, jnp.asarray(inp["input_ids"]), jnp.asarray(inp["position_ids"]),
      jnp.asarray(inp["attention_mask"]), jnp.asarray(inp["pixel_values"]), inp["vision_tables"],
      jnp.asarray(inp["visual_token_index"]))
  real = np.asarray(batch["attention_mask"]).astype(bool)
  chex.assert_shape(want, (*real.shape, 151936))
  err = float(np.abs(np.asarray(got)[real] - want[real]).max())
  print(f"export logits HF vs vlm max abs err {err:.2e} over {int(real.sum())} tokens")
  assert err <= TOL
  # and they are not the initial model's logits
  init_model = Qwen3VLForConditionalGeneration.from_pretrained(hf_dir).eval()
  with torch.no_grad():
    before = init_model(input_ids=torch.tensor(batch["input_ids"]),
                        attention_mask=torch.tensor(batch["attention_mask"]),
                        pixel_values=torch.tensor(batch["pixel_values"]),
                        image_grid_thw=torch.tensor(batch["image_grid_thw"])).logits.numpy()
  assert float(np.abs(before[real] - want[real]).max()) > 1e-2


def test_exported_processor_and_generation_files(trained):
  """HF's image processor from the exported preprocessor_config.json makes vlm's pixels; the
  generation defaults stop at <|im_end|>."""
  from transformers import Qwen2VLImageProcessor
  _, _, out, _, _ = trained
  _, _, processor = vlm.load_pretrained(out)
  assert (processor.config.min_pixels, processor.config.max_pixels) == (64 * 64, 128 * 128)
  from PIL import Image
  images = [Image.open(resolve_path(p)).convert("RGB") for p in IMAGES]
  hf_px = Qwen2VLImageProcessor.from_pretrained(out)(images=images, return_tensors="np")
  ours = _hf_batch(processor)
  np.testing.assert_array_equal(hf_px["image_grid_thw"], ours["image_grid_thw"])
  np.testing.assert_allclose(hf_px["pixel_values"], ours["pixel_values"], atol=1e-6)
  gen = load_generation_config(out)
  assert gen["temperature"] == 0.0 and gen["eos_token_ids"][0] == 151645


def _set_saved_config(step_dir, **changes):
  """Rewrites the run config stored in a checkpoint's metadata (dotted keys)."""
  path = os.path.join(step_dir, "metadata", "metadata")
  meta = json.load(open(path))
  cfg = json.loads(meta["config"])
  for key, value in changes.items():
    node = cfg
    *parents, leaf = key.split(".")
    for p in parents:
      node = node[p]
    node[leaf] = value
  meta["config"] = json.dumps(cfg)
  json.dump(meta, open(path, "w"))


def test_export_errors_and_damaged_checkpoints(trained, tmp_path, caplog):
  hf_dir, wd, out, _, _ = trained
  convert_workdir = _script().convert_workdir
  with pytest.raises(FileNotFoundError, match="no checkpoints in"):
    convert_workdir(str(tmp_path), str(tmp_path / "o1"))
  with pytest.raises(FileExistsError, match="not empty"):
    convert_workdir(wd, out)
  with pytest.raises(ValueError, match="no checkpoint of step 7"):
    convert_workdir(wd, str(tmp_path / "o2"), step=7)

  # a damaged newest checkpoint: the one before is exported (read-only: nothing is moved)
  copy = str(tmp_path / "run")
  shutil.copytree(wd, copy)
  files = [f for f in glob.glob(os.path.join(copy, "checkpoints", "3", "state", "**", "d", "*"),
                                recursive=True) if os.path.isfile(f)]
  for name in files:  # every array file cut in half (the parameters' ones included)
    with open(name, "r+b") as f:
      f.truncate(os.path.getsize(name) // 2)
  info = convert_workdir(copy, str(tmp_path / "o3"))
  assert info["step"] == 1
  assert any("step 3" in r.getMessage() and "damaged" in r.getMessage() for r in caplog.records)
  assert sorted(os.listdir(os.path.join(copy, "checkpoints"))) == ["1", "3"]
  with pytest.raises(ValueError, match="step 3 .* is damaged"):
    convert_workdir(copy, str(tmp_path / "o4"), step=3)

  # the initial HF directory is gone: named, and --model_config supplies the model
  _set_saved_config(os.path.join(copy, "checkpoints", "1"),
                    **{"init.hf_checkpoint": str(tmp_path / "gone")})
  with pytest.raises(FileNotFoundError, match="--model_config"):
    convert_workdir(copy, str(tmp_path / "o5"))
  assert convert_workdir(copy, str(tmp_path / "o6"), model_config=hf_dir)["step"] == 1

  # a workdir of another task
  _set_saved_config(os.path.join(copy, "checkpoints", "1"), task="blip2_stage1")
  with pytest.raises(ValueError, match="task 'blip2_stage1', not 'qwen_vl'"):
    convert_workdir(copy, str(tmp_path / "o7"))
