"""Tests for vlm.data sources, config and the grain BLIP-2 pipeline (tiny images, small batches)."""
import json
import os

import numpy as np
import pytest
from PIL import Image

from vlm.data import pipeline
from vlm.data.config import default_blip2_data_config
from vlm.data.image import BadSampleError, preprocess_eval, load_rgb
from vlm.data.paths import REPO_ROOT, resolve_path
from vlm.data.sources import CocoCaptionsSource, load_coco_retrieval

S, T = 16, 12


def _write_dataset(root, n_images=8, caps_per_image=3, bad=()):
  """Synthetic COCO-format dataset: caption k reads 'photo number k' (unique token ids)."""
  img_dir = root / "images"
  img_dir.mkdir(parents=True, exist_ok=True)
  images, anns = [], []
  rng = np.random.default_rng(0)
  for i in range(n_images):
    name = f"{i:04d}.jpg"
    Image.fromarray(rng.integers(0, 256, (24, 32, 3), dtype=np.uint8)).save(img_dir / name)
    images.append({"id": 1000 + i, "file_name": name})
    for c in range(caps_per_image):
      k = i * caps_per_image + c
      anns.append({"id": k, "image_id": 1000 + i, "caption": f"A photo number {k}."})
  with open(root / "captions_train2017.json", "w") as f:
    json.dump({"images": images, "annotations": anns}, f)
  with open(root / "captions_val2017.json", "w") as f:
    json.dump({"images": images, "annotations": anns}, f)
  return img_dir


def _cfg(root, **kw):
  cfg = default_blip2_data_config()
  cfg.root = str(root)
  cfg.image_size = S
  cfg.max_text_len = T
  cfg.update(kw)
  return cfg


def _take(it, n):
  return [next(it) for _ in range(n)]


def _assert_batches_equal(a, b):
  assert len(a) == len(b)
  for x, y in zip(a, b):
    assert x.keys() == y.keys()
    for k in x:
      np.testing.assert_array_equal(x[k], y[k])


def _caption_ids(batches):
  """Recovers caption number k from 'photo number k' token ids: [CLS] a photo number k [SEP]."""
  out = []
  for b in batches:
    out += [tuple(row[4:row.tolist().index(102)]) for row in b["input_ids"]]
  return out


@pytest.fixture
def synth(tmp_path):
  _write_dataset(tmp_path)
  return tmp_path


def test_default_config_and_resolve_path(tmp_path, monkeypatch):
  cfg = default_blip2_data_config()
  assert cfg.image_size == 224 and cfg.max_text_len == 32 and cfg.eval_max_text_len == 35
  assert tuple(cfg.crop_scale) == (0.5, 1.0) and cfg.on_bad_sample == "skip"
  assert cfg.worker_count == 0 and cfg.hflip
  monkeypatch.chdir(tmp_path)
  assert resolve_path(cfg.vocab_file) == os.path.join(REPO_ROOT, cfg.vocab_file)
  assert os.path.isdir(resolve_path(cfg.root))
  assert resolve_path("/abs/x") == "/abs/x"


def test_coco_source_records_and_errors(tmp_path):
  root = REPO_ROOT + "/data/coco"
  src = CocoCaptionsSource(root + "/captions_train2017.json", root + "/images")
  assert len(src) == 527
  rec = src[0]
  assert set(rec) == {"image_path", "caption", "image_id", "caption_id"}
  assert os.path.isfile(rec["image_path"]) and isinstance(rec["image_id"], int)
  assert repr(src) == repr(CocoCaptionsSource(root + "/captions_train2017.json", root + "/images"))
  with pytest.raises(FileNotFoundError, match="not found"):
    CocoCaptionsSource(str(tmp_path / "missing.json"), str(tmp_path))
  bad = tmp_path / "bad.json"
  bad.write_text(json.dumps({"images": []}))
  with pytest.raises(ValueError, match="'annotations'"):
    CocoCaptionsSource(str(bad), str(tmp_path))
  bad.write_text(json.dumps({"images": [{"id": 1, "file_name": "a.jpg"}],
                             "annotations": [{"id": 1, "image_id": 1}]}))
  with pytest.raises(ValueError, match="'caption'"):
    CocoCaptionsSource(str(bad), str(tmp_path))
  bad.write_text(json.dumps({"images": [{"id": 1, "file_name": "a.jpg"}],
                             "annotations": [{"id": 1, "image_id": 2, "caption": "x"}]}))
  with pytest.raises(ValueError, match="image_id=2"):
    CocoCaptionsSource(str(bad), str(tmp_path))
  bad.write_text("[1, 2]")
  with pytest.raises(ValueError, match="COCO captions format"):
    CocoCaptionsSource(str(bad), str(tmp_path))


def test_load_coco_retrieval_real_val():
  root = REPO_ROOT + "/data/coco"
  d = load_coco_retrieval(root + "/captions_val2017.json", root + "/images")
  assert len(d["image_paths"]) == 159 and len(d["texts"]) == 795
  assert d["txt2img"].shape == (795,) and d["image_ids"].shape == (159,)
  for i, txts in enumerate(d["img2txt"]):
    assert txts and all(d["txt2img"][t] == i for t in txts)
  assert sorted(t for ts in d["img2txt"] for t in ts) == list(range(795))


def test_train_loader_real_coco_batch():
  cfg = default_blip2_data_config()
  cfg.image_size = S
  loader = pipeline.build_blip2_train_loader(cfg, global_batch_size=4, seed=0, process_index=0,
                                             process_count=1)
  assert loader.loader_stats["n_records"] == 527 and loader.loader_stats["n_skipped"] == 0
  b = next(iter(loader))
  assert b["pixel_values"].shape == (4, S, S, 3) and b["pixel_values"].dtype == np.float32
  assert b["input_ids"].shape == (4, 32) and b["input_ids"].dtype == np.int32
  assert b["attention_mask"].shape == (4, 32) and b["attention_mask"].dtype == np.int32
  assert b["image_id"].shape == (4,) and b["image_id"].dtype == np.int32
  assert (b["input_ids"][:, 0] == 101).all()
  assert (b["attention_mask"].sum(1) == (b["input_ids"] != 0).sum(1)).all()
  assert np.isfinite(b["pixel_values"]).all() and abs(b["pixel_values"].mean()) < 3


def test_same_seed_same_batches_and_epochs_repeat(synth):
  cfg = _cfg(synth)
  mk = lambda seed: iter(pipeline.build_blip2_train_loader(
      cfg, global_batch_size=4, seed=seed, process_index=0, process_count=1))
  a, b, c = _take(mk(3), 12), _take(mk(3), 12), _take(mk(4), 12)
  _assert_batches_equal(a, b)
  assert _caption_ids(a) != _caption_ids(c)
  ids = _caption_ids(a)  # 24 records, 48 samples = 2 epochs, each a permutation
  assert len(set(ids[:24])) == 24 and set(ids[:24]) == set(ids[24:])
  assert ids[:24] != ids[24:]  # reshuffled per epoch
  # augmentations differ between epochs for the same record
  assert not np.array_equal(np.concatenate([x["pixel_values"] for x in a[:6]]),
                            np.concatenate([x["pixel_values"] for x in a[6:]]))


def test_process_shards_are_disjoint(synth):
  cfg = _cfg(synth)
  shards = []
  for p in range(3):
    loader = pipeline.build_blip2_train_loader(cfg, global_batch_size=6, seed=1, process_index=p,
                                               process_count=3)
    assert loader.per_process_batch_size == 2
    shards.append(set(_caption_ids(_take(iter(loader), 4))))  # one epoch: 24 / 3 = 8 records
  assert all(len(s) == 8 for s in shards)
  assert not (shards[0] & shards[1]) and not (shards[0] & shards[2]) and not (shards[1] & shards[2])
  with pytest.raises(ValueError, match="multiple of the process count"):
    pipeline.build_blip2_train_loader(cfg, global_batch_size=7, seed=0, process_index=0,
                                      process_count=2)
  with pytest.raises(ValueError, match="process_index"):
    pipeline.build_blip2_train_loader(cfg, global_batch_size=4, seed=0, process_index=2,
                                      process_count=2)


def test_iterator_get_set_state_resumes_exactly(synth):
  cfg = _cfg(synth)
  mk = lambda: pipeline.build_blip2_train_loader(cfg, global_batch_size=4, seed=7,
                                                 process_index=0, process_count=1)
  it = iter(mk())
  _take(it, 3)
  state = it.get_state()
  expected = _take(it, 2)
  it2 = iter(mk())
  it2.set_state(state)
  _assert_batches_equal(_take(it2, 2), expected)


def test_orbax_checkpoint_manager_roundtrip(synth, tmp_path):
  ocp = pytest.importorskip("orbax.checkpoint")
  cfg = _cfg(synth)
  mk = lambda: pipeline.build_blip2_train_loader(cfg, global_batch_size=4, seed=11,
                                                 process_index=0, process_count=1)
  it = iter(mk())
  _take(it, 3)
  ckpt_dir = str(tmp_path / "ckpt")
  with ocp.CheckpointManager(ckpt_dir) as mngr:
    mngr.save(3, args=ocp.args.Composite(
        state=ocp.args.StandardSave({"w": np.arange(4, dtype=np.float32)}),
        data_iter=pipeline.iterator_checkpoint_args(it, save=True)))
    mngr.wait_until_finished()
  expected = _take(it, 2)
  it2 = iter(mk())
  with ocp.CheckpointManager(ckpt_dir) as mngr:
    restored = mngr.restore(mngr.latest_step(), args=ocp.args.Composite(
        state=ocp.args.StandardRestore({"w": np.zeros(4, np.float32)}),
        data_iter=pipeline.iterator_checkpoint_args(it2, save=False)))
  np.testing.assert_array_equal(restored["state"]["w"], np.arange(4, dtype=np.float32))
  assert restored["data_iter"] is it2
  _assert_batches_equal(_take(it2, 2), expected)
  with pytest.raises(ValueError, match="get_state"):
    pipeline.iterator_checkpoint_args([1, 2], save=True)


def _corrupt(root):
  """Makes one missing, one 0-byte and one corrupt image, and one empty caption."""
  img = root / "images"
  os.remove(img / "0001.jpg")
  (img / "0002.jpg").write_bytes(b"")
  data = (img / "0003.jpg").read_bytes()
  (img / "0003.jpg").write_bytes(data[: len(data) // 3])  # truncated JPEG
  path = root / "captions_train2017.json"
  d = json.loads(path.read_text())
  d["annotations"][0]["caption"] = " ...!! "
  path.write_text(json.dumps(d))


def test_bad_samples_skipped_and_counted(synth):
  _corrupt(synth)
  loader = pipeline.build_blip2_train_loader(_cfg(synth), global_batch_size=4, seed=0,
                                             process_index=0, process_count=1)
  st = loader.loader_stats
  assert st["n_records"] == 24 and st["n_skipped"] == 10 and st["n_kept"] == 14
  assert st["reasons"] == {"missing_image": 3, "empty_image": 3, "corrupt_image": 3,
                           "empty_caption": 1}
  batches = _take(iter(loader), 7)  # two epochs of the 14 good records, all batches full
  assert all(b["image_id"].shape == (4,) for b in batches)
  ids = np.concatenate([b["image_id"] for b in batches])
  assert not set(ids.tolist()) & {1001, 1002, 1003}
  assert (0,) not in _caption_ids(batches)
  assert len(set(_caption_ids(batches))) == 14


def test_bad_sample_raise_mode_names_file(synth):
  _corrupt(synth)
  raise_cfg = _cfg(synth, on_bad_sample="raise")
  with pytest.raises(BadSampleError, match=r"caption_id=0 .*0000\.jpg.*empty after pre_caption"):
    pipeline.build_blip2_train_loader(raise_cfg, global_batch_size=4, seed=0, process_index=0,
                                      process_count=1)
  path = synth / "captions_train2017.json"
  d = json.loads(path.read_text())
  d["annotations"][0]["caption"] = "fixed"
  path.write_text(json.dumps(d))
  with pytest.raises(BadSampleError, match=r"image file missing: .*0001\.jpg"):
    pipeline.build_blip2_train_loader(raise_cfg, global_batch_size=4, seed=0, process_index=0,
                                      process_count=1)
  with pytest.raises(ValueError, match="on_bad_sample"):
    pipeline.build_blip2_train_loader(_cfg(synth, on_bad_sample="ignore"), global_batch_size=4,
                                      seed=0, process_index=0, process_count=1)


def test_header_validation_substitutes_at_load_time(synth):
  """With validate_images='header' a truncated JPEG passes the scan and is replaced on load."""
  img = synth / "images" / "0003.jpg"
  data = img.read_bytes()
  img.write_bytes(data[: int(len(data) * 0.8)])  # header intact, entropy data cut
  cfg = _cfg(synth, validate_images="header")
  loader = pipeline.build_blip2_train_loader(cfg, global_batch_size=4, seed=0, process_index=0,
                                             process_count=1)
  assert loader.loader_stats["n_skipped"] == 0
  batches = _take(iter(loader), 6)
  assert 1003 not in np.concatenate([b["image_id"] for b in batches]).tolist()
  with pytest.raises(BadSampleError, match=r"0003\.jpg"):
    _take(iter(pipeline.build_blip2_train_loader(
        _cfg(synth, validate_images="header", on_bad_sample="raise"), global_batch_size=4,
        seed=0, process_index=0, process_count=1)), 6)


def test_all_bad_raises(synth):
  for p in (synth / "images").iterdir():
    p.write_bytes(b"")
  with pytest.raises(ValueError, match="all 24 records"):
    pipeline.build_blip2_train_loader(_cfg(synth), global_batch_size=4, seed=0, process_index=0,
                                      process_count=1)


def test_retrieval_eval_data(synth):
  cfg = _cfg(synth, eval_max_text_len=35)
  d = pipeline.build_retrieval_eval_data(cfg, split="val")
  assert d["pixel_values"].shape == (8, S, S, 3) and d["pixel_values"].dtype == np.float32
  assert d["input_ids"].shape == (24, 35) and d["input_ids"].dtype == np.int32
  assert d["attention_mask"].shape == (24, 35)
  assert d["img2txt"][2] == [6, 7, 8] and d["txt2img"][7] == 2
  assert d["texts"][5] == "a photo number 5"
  np.testing.assert_array_equal(d["image_ids"], np.arange(1000, 1008))
  np.testing.assert_array_equal(d["pixel_values"][3],
                                preprocess_eval(load_rgb(str(synth / "images/0003.jpg")), S))
  (synth / "images" / "0004.jpg").write_bytes(b"")
  with pytest.raises(BadSampleError, match=r"0004\.jpg"):
    pipeline.build_retrieval_eval_data(cfg, split="val")
  with pytest.raises(ValueError, match="split"):
    pipeline.build_retrieval_eval_data(cfg, split="test")


def test_retrieval_eval_data_real_val_shapes():
  cfg = default_blip2_data_config()
  cfg.image_size = S
  d = pipeline.build_retrieval_eval_data(cfg)
  assert d["pixel_values"].shape == (159, S, S, 3)
  assert d["input_ids"].shape == (795, 35) and (d["input_ids"][:, 0] == 101).all()
