"""The Qwen batch builder and packed training stream (vlm.data.qwen_batch): chat template and
loss masks, agreement with the vlm Qwen processor, determinism, resume, process sharding, and
the bad-input accounting (skip / strict / nothing usable)."""
import json
import os

import numpy as np
import orbax.checkpoint as ocp
import pytest
from PIL import Image

from vlm.data import conversations as conv
from vlm.data import pipeline
from vlm.data import qwen_processor as qp
from vlm.data.image import BadSampleError
from vlm.data.qwen_batch import (QwenSampleEncoder, build_qwen_train_loader,
                                 processor_config_for)
from vlm.models.qwen_presets import qwen_config

PROC = dict(min_pixels=32 * 32, max_pixels=64 * 64, video_min_pixels=32 * 32,
            video_max_pixels=4 * 64 * 64, max_frames=4)


@pytest.fixture(scope="module")
def model_config():
  return qwen_config("qwen3_vl_tiny")


@pytest.fixture(scope="module")
def encoder(model_config):
  return QwenSampleEncoder(model_config, processor_config_for(model_config, PROC),
                           max_length=256, max_patches=128)


_TOKENIZER = []


def _build(*args, **kw):
  """build_qwen_train_loader with one shared tokenizer (loading tokenizer.json takes seconds)."""
  if not _TOKENIZER:
    _TOKENIZER.append(qp.Qwen3Tokenizer())
  return build_qwen_train_loader(*args, tokenizer=_TOKENIZER[0], **kw)


def _img(path, size=(48, 64), seed=0):
  rng = np.random.default_rng(seed)
  Image.fromarray(rng.integers(0, 256, size + (3,), dtype=np.uint8)).save(path)
  return str(path)


def test_matches_the_vlm_processor_and_masks_assistant_tokens(encoder, tmp_path):
  img = _img(tmp_path / "a.png")
  sample = conv.Sample(messages=(
      {"role": "system", "content": "You are terse."},
      {"role": "user", "content": "<image>\nWhat colour?"},
      {"role": "assistant", "content": "Mostly grey."},
      {"role": "user", "content": "Sure?"},
      {"role": "assistant", "content": "Yes, sure."}), images=(img,), where="s")
  tok = encoder.encode(sample)
  # same ids as the processor's chat template + placeholder expansion on the same conversation
  proc = qp.Qwen3VLProcessor(encoder.config, encoder.tokenizer)
  msgs = [{"role": "system", "content": "You are terse."},
          {"role": "user",
           "content": [{"type": "image"}, {"type": "text", "text": "\nWhat colour?"}]},
          {"role": "assistant", "content": "Mostly grey."},
          {"role": "user", "content": "Sure?"},
          {"role": "assistant", "content": "Yes, sure."}]
  ref = proc(proc.apply_chat_template(msgs, add_generation_prompt=False), images=[img])
  np.testing.assert_array_equal(tok.input_ids, ref["input_ids"][0])
  np.testing.assert_array_equal(tok.pixel_values, ref["pixel_values"])
  np.testing.assert_array_equal(tok.grid_thw, ref["image_grid_thw"])
  # targets: exactly each assistant content + its <|im_end|>
  t = encoder.tokenizer
  want = (t.encode("Mostly grey.") + [t.eos_token_id] + t.encode("Yes, sure.") + [t.eos_token_id])
  np.testing.assert_array_equal(tok.input_ids[tok.target_mask > 0], want)
  assert tok.target_mask.sum() == len(want)
  # the positions are the rope index of the sample alone
  assert tok.position_ids.shape == (3, tok.num_tokens) and (tok.position_ids[:, 0] == 0).all()


def test_caption_rows_train_on_the_caption_only(encoder, tmp_path):
  img = _img(tmp_path / "c.png")
  s = conv.Sample(messages=({"role": "user", "content": "<image>"},
                            {"role": "assistant", "content": "a red bus"}), images=(img,),
                  kind="caption", where="c")
  tok = encoder.encode(s)
  t = encoder.tokenizer
  assert tok.input_ids[0] == t.vision_start_id
  np.testing.assert_array_equal(tok.input_ids[tok.target_mask > 0],
                                t.encode("a red bus") + [t.pad_token_id])
  assert (tok.visual_index >= 0).sum() == int(np.prod(tok.grid_thw)) // 4


def test_too_long_and_too_many_patches(model_config, encoder, tmp_path):
  img = _img(tmp_path / "big.png", size=(64, 64))
  s = conv.Sample(messages=({"role": "user", "content": "<image> " + "word " * 40},
                            {"role": "assistant", "content": "ok"}), images=(img,), where="x")
  cfg = processor_config_for(model_config, PROC)
  with pytest.raises(BadSampleError, match="max_length=20") as e:
    QwenSampleEncoder(model_config, cfg, max_length=20, tokenizer=encoder.tokenizer).encode(s)
  assert e.value.reason == "too_long"
  with pytest.raises(BadSampleError, match="max_patches=8") as e:
    QwenSampleEncoder(model_config, cfg, max_patches=8, tokenizer=encoder.tokenizer).encode(s)
  assert e.value.reason == "too_many_patches"


def _dataset(root, n=24, bad=False):
  """A JSONL conversation file of n good samples (tiny images, some text-only, varied lengths),
  plus, with ``bad``, one record of every bad-input class."""
  root.mkdir(parents=True, exist_ok=True)
  rows = []
  for i in range(n):
    if i % 3 == 2:
      rows.append({"conversations": [{"from": "human", "value": f"Count to {i}."},
                                     {"from": "gpt", "value": " ".join(["n"] * (i + 1))}]})
    else:
      _img(root / f"{i}.png", size=(32 + 8 * (i % 4), 48), seed=i)
      rows.append({"image": f"{i}.png", "conversations": [
          {"from": "human", "value": f"<image>\nPhoto {i}?"},
          {"from": "gpt", "value": f"It is photo number {i}."}]})
  lines = [json.dumps(r) for r in rows]
  if bad:
    (root / "empty.png").write_bytes(b"")
    (root / "corrupt.png").write_bytes(b"garbage")
    (root / "corrupt.mp4").write_bytes(b"\x00" * 64)
    qa = lambda q="<image>q": [{"from": "human", "value": q}, {"from": "gpt", "value": "a"}]
    bad_rows = [
        {"image": ["0.png", "0.png"], "conversations": qa()},             # placeholder_mismatch
        {"image": "missing.png", "conversations": qa()},                   # missing_image
        {"image": "empty.png", "conversations": qa()},                     # empty_image
        {"image": "corrupt.png", "conversations": qa()},                   # corrupt_image
        {"video": "missing.mp4", "conversations": qa("<video>q")},         # missing_video
        {"video": "corrupt.mp4", "conversations": qa("<video>q")},         # corrupt_video
        {"conversations": [{"from": "human", "value": "q"}]},              # no_assistant_turn
        {"conversations": [{"from": "bot", "value": "q"}, {"from": "gpt", "value": "a"}]},
        {"conversations": [{"from": "human", "value": "long " * 400},      # too_long
                           {"from": "gpt", "value": "a"}]},
    ]
    lines += [json.dumps(r) for r in bad_rows]
    lines.append('{"conversations": [{"from": "human", "value": "\\udc00"}, '
                 '{"from": "gpt", "value": "a"}]}')                          # invalid_text
  data = ("\n".join(lines) + "\n").encode()
  if bad:
    data += '{"conversations": [{"from": "human", "value": "\xe9"}]}\n'.encode("latin1")
  (root / "data.jsonl").write_bytes(data)
  return str(root / "data.jsonl")


def _cfg(path, **kw):
  cfg = {"sources": [{"type": "conversations", "path": path}], "max_length": 128,
         "max_patches": 64, "processor": PROC, "num_threads": 2}
  cfg.update(kw)
  return cfg


def _eq(a, b):
  assert a.keys() == b.keys()
  for k in a:
    if isinstance(a[k], dict):
      _eq(a[k], b[k])
    else:
      np.testing.assert_array_equal(a[k], b[k], err_msg=k)


def _ne(a, b):
  return any(not np.array_equal(a[k], b[k]) for k in ("input_ids", "segment_ids"))


def test_bad_inputs_are_counted_by_reason(model_config, tmp_path):
  path = _dataset(tmp_path / "d", n=6, bad=True)
  loader = _build(_cfg(path), model_config, global_batch_size=2, seed=0)
  assert loader.stats.reasons == {
      "placeholder_mismatch": 1, "missing_image": 1, "empty_image": 1, "corrupt_image": 1,
      "missing_video": 1, "corrupt_video": 1, "no_assistant_turn": 1, "unknown_role": 1,
      "too_long": 1, "invalid_text": 1, "invalid_utf8": 1}
  assert (loader.stats.n_kept, loader.stats.n_records) == (6, 17)
  utf8 = next(e for e in loader.stats.examples if e[1] == "invalid_utf8")
  assert "data.jsonl" in utf8[2] and "byte offset" in utf8[2]
  batch = next(iter(loader))  # the stream runs on the good samples
  assert batch["segment_ids"].max() >= 1
  with pytest.raises(BadSampleError):
    _build(_cfg(path, on_bad_sample="raise"), model_config,
                            global_batch_size=2, seed=0)


def test_nothing_usable_is_a_clear_error_before_training(model_config, tmp_path):
  path = _dataset(tmp_path / "d", n=3)
  with pytest.raises(ValueError, match=r"no usable training sample.*too_long"):
    _build(_cfg(path, max_length=8), model_config, global_batch_size=2, seed=0)
  # without the build-time prescan the stream skips and counts, then stops with an error
  loader = _build(_cfg(path, max_length=8, prescan=False), model_config,
                                   global_batch_size=2, seed=0)
  with pytest.raises(ValueError, match="no usable sample in a whole epoch"):
    next(iter(loader))


def test_runtime_skips_are_counted_without_prescan(model_config, tmp_path):
  path = _dataset(tmp_path / "d", n=9)
  loader = _build(_cfg(path, max_length=24, prescan=False), model_config,
                                   global_batch_size=2, seed=0)
  it = iter(loader)
  for _ in range(3):
    batch = next(it)
    assert (batch["segment_ids"] > 0).sum(axis=1).max() <= 24
  assert it.skipped.get("too_long", 0) > 0 and set(it.skipped) == {"too_long"}


def test_deterministic_given_the_seed(model_config, tmp_path):
  path = _dataset(tmp_path / "d")
  a = iter(_build(_cfg(path), model_config, global_batch_size=2, seed=3))
  b = iter(_build(_cfg(path), model_config, global_batch_size=2, seed=3))
  c = iter(_build(_cfg(path), model_config, global_batch_size=2, seed=4))
  first = [next(a) for _ in range(3)]
  for x in first:
    _eq(x, next(b))
  assert any(_ne(x, next(c)) for x in first)


def test_resume_gives_the_same_next_batches(model_config, tmp_path):
  path = _dataset(tmp_path / "d")
  cfg = _cfg(path)
  loader = _build(cfg, model_config, global_batch_size=2, seed=1)
  it = iter(loader)
  for _ in range(4):  # past the first epoch (24 samples), with carried-over samples pending
    next(it)
  state = json.loads(json.dumps(it.get_state()))
  want = [next(it) for _ in range(2)]
  fresh = iter(_build(cfg, model_config, global_batch_size=2, seed=1))
  fresh.set_state(state)
  for w in want:
    _eq(w, next(fresh))
  # through orbax + grain's checkpoint handler, as the trainer saves it
  it2 = iter(loader)
  next(it2)
  mngr = ocp.CheckpointManager(os.fspath(tmp_path / "ckpt"), item_names=("data_iter",))
  mngr.save(1, args=ocp.args.Composite(data_iter=pipeline.iterator_checkpoint_args(it2, True)))
  mngr.wait_until_finished()
  want = next(it2)
  restored = iter(_build(cfg, model_config, global_batch_size=2, seed=1))
  mngr.restore(1, args=ocp.args.Composite(
      data_iter=pipeline.iterator_checkpoint_args(restored, False)))
  _eq(want, next(restored))
  other = iter(_build(cfg, model_config, global_batch_size=2, seed=2))
  with pytest.raises(ValueError, match="different data stream"):
    other.set_state(state)


def test_two_processes_see_disjoint_data(model_config, tmp_path):
  path = _dataset(tmp_path / "d", n=25)
  cfg = _cfg(path)
  loaders = [_build(cfg, model_config, global_batch_size=4, seed=0,
                                     process_index=p, process_count=2) for p in range(2)]
  assert all(l.per_process_batch_size == 2 and l.shard_size == 12 for l in loaders)
  seen = []
  for l in loaders:
    it = iter(l)
    next(it)
    used = {l.sample_index_at(k) for k in range(it.get_state()["next"])}
    assert used <= set(l.shard.tolist())
    seen.append({l.sample_index_at(k) for k in range(2 * l.shard_size)})  # two epochs
  assert seen[0].isdisjoint(seen[1]) and len(seen[0] | seen[1]) == 24
  # each epoch is a permutation of the shard, reshuffled per epoch
  l = loaders[0]
  e0 = [l.sample_index_at(k) for k in range(12)]
  e1 = [l.sample_index_at(k) for k in range(12, 24)]
  assert sorted(e0) == sorted(e1) and e0 != e1


def test_qwen2_5_vl_system_prompt_video_positions_and_window_tables(encoder):
  import dataclasses  # pylint: disable=import-outside-toplevel
  from vlm.data import packing  # pylint: disable=import-outside-toplevel
  from vlm.models import rope_index  # pylint: disable=import-outside-toplevel
  from vlm.models.qwen3_vl import Qwen2_5_VLConfig  # pylint: disable=import-outside-toplevel
  from vlm.models.qwen_vit import Qwen2_5_VLVisionConfig  # pylint: disable=import-outside-toplevel
  base = qwen_config("qwen3_vl_tiny").text
  text = dataclasses.replace(base, attention_bias=True, use_qk_norm=False,
                             mrope_section=(2, 3, 3), mrope_interleaved=False)
  vision = Qwen2_5_VLVisionConfig(depth=1, hidden_size=32, intermediate_size=64, num_heads=2,
                                  fullatt_block_indexes=(0,), out_hidden_size=64,
                                  tokens_per_second=2)
  mc = Qwen2_5_VLConfig(vision=vision, text=text)
  enc = QwenSampleEncoder(mc, processor_config_for(mc, dict(
      min_pixels=28 * 28, max_pixels=56 * 56, video_min_pixels=28 * 28,
      video_max_pixels=56 * 56, num_frames=4, fps=None)), encoder.tokenizer)
  s = conv.Sample(messages=({"role": "user", "content": "<video>What is this?"},
                            {"role": "assistant", "content": "Bikes."}),
                  videos=("data/video/bikes.mp4",), where="v")
  tok = enc.encode(s)
  proc = qp.Qwen2_5_VLProcessor(enc.config, enc.tokenizer)
  ref = proc(proc.apply_chat_template(
      [{"role": "user", "content": [{"type": "video"}, {"type": "text", "text": "What is this?"}]},
       {"role": "assistant", "content": "Bikes."}], add_generation_prompt=False),
      videos=["data/video/bikes.mp4"])
  np.testing.assert_array_equal(tok.input_ids, ref["input_ids"][0])
  assert enc.tokenizer.decode(tok.input_ids).startswith(
      "<|im_start|>system\nYou are a helpful assistant.<|im_end|>")
  t = enc.tokenizer
  want, _ = rope_index.qwen2_5_vl_get_rope_index(
      ref["input_ids"], None, ref["video_grid_thw"], None, 2, t.image_token_id, t.video_token_id,
      t.vision_start_id, second_per_grid_ts=ref["second_per_grid_ts"], tokens_per_second=2)
  np.testing.assert_array_equal(tok.position_ids, want[:, 0])
  batch = packing.assemble_batch([[tok, tok]], max_length=2 * tok.num_tokens,
                                 max_patches=2 * tok.num_patches, vision_config=vision,
                                 pad_token_id=t.pad_token_id)
  assert {"window_index", "window_inverse", "window_segment_ids"} <= set(batch["vision"])
  assert (batch["position_ids"][:, 0, tok.num_tokens] == 0).all()
