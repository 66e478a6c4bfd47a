"""CapFilt (vlm/inference/capfilt.py) end to end on real COCO photos with tiny random BLIP-2 models,
plus hand cases of the candidate filtering with a scripted captioner and scorer."""
import json
import os
import shutil
import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from vlm import models
from vlm.data.pipeline import PerImageSource
from vlm.data.sources import CocoCaptionsSource
from vlm.data.text import Blip2Tokenizer, pre_caption
from vlm.inference import capfilt as C
from vlm.inference.blip2_generate import Blip2Generator, load_images

COCO = os.path.join(os.path.dirname(__file__), "..", "..", "data", "coco")
S = 32  # blip2_micro / blip2_opt_micro image size
N, K = 2, 2


def _unbox(tree):
  import flax
  return flax.core.meta.unbox(tree)


@pytest.fixture(scope="module")
def models_():
  ids, mask = jnp.zeros((1, 8), jnp.int32), jnp.ones((1, 8), jnp.int32)
  px = jnp.zeros((1, S, S, 3))
  s1 = models.build("blip2_stage1", "blip2_micro")
  p1 = _unbox(jax.jit(s1.init)(jax.random.PRNGKey(0), px, ids, mask)["params"])
  s2 = models.build("blip2_stage2", "blip2_opt_micro")
  p2 = _unbox(jax.jit(s2.init)(jax.random.PRNGKey(1), px, ids, mask)["params"])
  return s1, p1, s2, p2


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
  """"3 real photos with their human captions + 1 corrupt file (with 2 captions), in a temp dir."""
  root = tmp_path_factory.mktemp("capfilt_data")
  images = root / "images"
  images.mkdir()
  with open(os.path.join(COCO, "captions_train2017.json")) as f:
    d = json.load(f)
  counts = {}
  for a in d["annotations"]:
    counts[a["image_id"]] = counts.get(a["image_id"], 0) + 1
  real = [im for im in d["images"] if counts.get(im["id"], 0) >= 5][:3]
  for im in real:
    shutil.copy(os.path.join(COCO, "images", im["file_name"]), images / im["file_name"])
  (images / "corrupt.jpg").write_bytes(b"\xff\xd8\xff\xe0 this is not a jpeg" * 10)
  keep = {im["id"] for im in real}
  bad = {"id": 999999999, "file_name": "corrupt.jpg", "width": 10, "height": 10}
  anns = [a for a in d["annotations"] if a["image_id"] in keep]
  anns += [{"id": 888888881, "image_id": bad["id"], "caption": "A broken picture."},
           {"id": 888888882, "image_id": bad["id"], "caption": "Nothing to see here"}]
  # the corrupt image comes second, so the batch holds readable images on both sides of it
  data = {"info": {"description": "test"}, "licenses": [],
          "images": [real[0], bad] + real[1:], "annotations": anns}
  ann = root / "captions_train2017.json"
  ann.write_text(json.dumps(data))
  return str(ann), str(images), data


class Recording:
  """Wraps a scorer and records every (captions, scores) it returned."""

  def __init__(self, scorer):
    self.scorer, self.calls = scorer, []
    self.image_size = scorer.image_size

  def __call__(self, pixels, captions):
    out = self.scorer(pixels, captions)
    self.calls.append((np.asarray(pixels), [list(c) for c in captions], [np.asarray(s) for s in out]))
    return out


def _itc_by_hand(s1, p1, pixels, captions):
  """max_q image_feats . text_feat, straight from the model methods (not ItcScorer)."""
  ids, mask = Blip2Tokenizer().tokenize([pre_caption(c, 50) for c in captions], 32)

  @jax.jit
  def feats(pixels, ids, mask):
    v = {"params": p1}
    _, img = s1.apply(v, s1.apply(v, pixels, method=s1.encode_image), method=s1.image_features)
    _, txt = s1.apply(v, ids, mask, method=s1.text_features)
    return img, txt

  img, txt = feats(jnp.asarray(pixels), jnp.asarray(ids), jnp.asarray(mask))
  img, txt = np.asarray(img, np.float64), np.asarray(txt, np.float64)
  return np.stack([[np.max(img[b] @ txt[t]) for t in range(len(captions))]
                   for b in range(img.shape[0])])


def test_capfilt_end_to_end(models_, dataset, tmp_path):
  s1, p1, s2, p2 = models_
  ann, image_dir, data = dataset
  gen = Blip2Generator(s2, p2)
  scorer = Recording(C.ItcScorer(s1, p1, image_size=S, batch_size=32))
  kw = dict(num_samples=N, top_k=K, max_new_tokens=5, min_new_tokens=2, batch_size=4)
  coco, stats = C.capfilt(gen, scorer, ann, image_dir, seed=0, **kw)
  good = [im["id"] for im in data["images"] if im["file_name"] != "corrupt.jpg"]

  # counts
  assert stats.images == 4 and stats.images_scored == 3 and stats.images_skipped == 1
  assert len(stats.skipped) == 1 and stats.skipped[0][0].endswith("corrupt.jpg")
  assert stats.synthetic_sampled == 3 * N
  assert stats.kept_synthetic + stats.kept_human == 3 * K
  assert stats.kept_human_unscored == 2
  assert coco["images"] == data["images"]

  # valid COCO captions: fresh unique ids, loads with CocoCaptionsSource
  path = C.write_captions(coco, str(tmp_path / "out" / "capfilt.json"))
  ids = [a["id"] for a in coco["annotations"]]
  assert len(set(ids)) == len(ids) and all(isinstance(i, int) for i in ids)
  src = CocoCaptionsSource(path, image_dir)
  assert len(src) == len(coco["annotations"]) == 3 * K + 2
  per_image = PerImageSource(src)
  assert len(per_image) == 4

  by_image = {}
  for a in coco["annotations"]:
    by_image.setdefault(a["image_id"], []).append(a)
  # the corrupt image keeps its human captions, unscored
  bad = by_image[999999999]
  assert [(a["caption"], a["source"], a["score"]) for a in bad] == [
      ("A broken picture.", "human", None), ("Nothing to see here", "human", None)]

  # exactly top_k per readable image, sorted by score, equal to a hand re-ranking
  assert len(scorer.calls) == 1
  pixels, cands, scores = scorer.calls[0]
  assert len(cands) == 3
  hand_pixels, ok, errors = load_images(
      [os.path.join(image_dir, im["file_name"]) for im in data["images"]], S)
  assert ok == [0, 2, 3] and len(errors) == 1
  np.testing.assert_array_equal(pixels, hand_pixels)
  humans = {}
  for a in data["annotations"]:
    humans.setdefault(a["image_id"], []).append(a["caption"])
  flat = [c for cs in cands for c in cs]
  sims = _itc_by_hand(s1, p1, hand_pixels, flat)  # [3 images, all candidates]
  start = 0
  for j, image_id in enumerate(good):
    kept = by_image[image_id]
    assert len(kept) == K
    s = [a["score"] for a in kept]
    assert s == sorted(s, reverse=True)
    # candidates: the image's human captions first, then distinct synthetic ones
    assert cands[j][:len(humans[image_id])] == humans[image_id]
    assert len({pre_caption(c) for c in cands[j]}) == len(cands[j])
    by_hand = sims[j, start:start + len(cands[j])]
    start += len(cands[j])
    np.testing.assert_allclose(scores[j], by_hand, atol=1e-5)
    order = sorted(range(len(cands[j])), key=lambda t: -by_hand[t])[:K]
    assert [a["caption"] for a in kept] == [cands[j][t] for t in order]
    assert [a["source"] for a in kept] == [
        "human" if t < len(humans[image_id]) else "synthetic" for t in order]
    np.testing.assert_allclose(s, by_hand[order], atol=1e-5)

  # deterministic for the seed; another seed samples other captions
  coco2, _ = C.capfilt(gen, scorer, ann, image_dir, seed=0, **kw)
  assert coco2 == coco
  synth = lambda call: [c for j, cs in enumerate(call[1]) for c in cs[len(humans[good[j]]):]]
  coco3, _ = C.capfilt(gen, scorer, ann, image_dir, seed=1, **kw)
  assert synth(scorer.calls[2]) != synth(scorer.calls[0])
  assert synth(scorer.calls[1]) == synth(scorer.calls[0])

  # the printed training flags point split_paths at this file
  from vlm.data.pipeline import split_paths
  flags = C.train_flags(path, ann, image_dir)
  cfg = {f.split("=", 1)[0].split(".")[-1]: f.split("=", 1)[1] for f in flags}
  assert cfg["caption_sampling"] == "per_image"
  assert split_paths(cfg, "train") == (path, os.path.abspath(image_dir))
  assert split_paths(cfg, "val")[0] == os.path.join(os.path.dirname(ann), "captions_val2017.json")


class ScriptedCaptioner:
  """Returns fixed captions, N per image, in order; records its calls."""

  def __init__(self, captions):
    self.captions, self.calls = list(captions), []
    self.model = types.SimpleNamespace(config=types.SimpleNamespace(
        vision=types.SimpleNamespace(image_size=S)))

  def generate(self, pixels, prompt, **kw):
    self.calls.append((pixels.shape, prompt, kw))
    out, self.captions = self.captions[:pixels.shape[0]], self.captions[pixels.shape[0]:]
    return out


def test_filtering_by_hand(dataset):
  ann, image_dir, data = dataset
  first = data["images"][0]["id"]
  humans = [a["caption"] for a in data["annotations"] if a["image_id"] == first]
  synthetic = ["", "  ...  ", humans[0].upper() + "!", "a dog on a sofa", "A dog on a sofa.",
               "a red bus"]
  cap = ScriptedCaptioner(synthetic)
  # scores by hand: "a red bus" 0.9, every human caption and the dog 0.5 (a tie)
  scorer = lambda px, cs: [np.array([0.9 if c == "a red bus" else 0.5 for c in row])
                           for row in cs]
  coco, stats = C.capfilt(cap, scorer, ann, image_dir, num_samples=6, top_k=3, max_images=1,
                          seed=3, prompt="a picture of")
  assert cap.calls[0][0] == (6, S, S, 3) and cap.calls[0][1] == "a picture of"
  assert cap.calls[0][2]["top_p"] == 0.9 and cap.calls[0][2]["num_beams"] == 1
  assert stats.synthetic_degenerate == 2   # "" and "  ...  "
  assert stats.synthetic_duplicates == 2   # the upper-cased human caption, the second dog
  assert stats.candidates == len(humans) + 2
  got = [(a["caption"], a["source"], a["score"]) for a in coco["annotations"]]
  # the tie at 0.5 keeps candidate order: human captions first
  assert got == [("a red bus", "synthetic", 0.9), (humans[0], "human", 0.5),
                 (humans[1], "human", 0.5)]
  assert coco["images"] == data["images"][:1]
  assert [a["id"] for a in coco["annotations"]] == [1, 2, 3]
  assert coco["annotations"][1]["original_id"] == [
      a["id"] for a in data["annotations"] if a["image_id"] == first][0]


def test_bad_settings_and_scorers(dataset):
  ann, image_dir, _ = dataset
  cap = ScriptedCaptioner(["x"] * 100)
  ok = lambda px, cs: [np.zeros(len(c)) for c in cs]
  for kw, word in [({"top_k": 0}, "top_k"), ({"num_samples": 0}, "num_samples"),
                   ({"top_p": 1.5}, "top_p"), ({"temperature": 0.0}, "temperature"),
                   ({"min_new_tokens": 40}, "min_new_tokens"), ({"seed": -1}, "seed"),
                   ({"batch_size": 0}, "batch_size"), ({"max_images": 0}, "max_images")]:
    with pytest.raises(ValueError, match=word):
      C.capfilt(cap, ok, ann, image_dir, **kw)
  nan = lambda px, cs: [np.full(len(c), np.nan) for c in cs]
  with pytest.raises(ValueError, match="finite score"):
    C.capfilt(cap, nan, ann, image_dir, num_samples=1, max_images=1)
  short = lambda px, cs: [np.zeros(len(c)) for c in cs[:-1]]
  with pytest.raises(ValueError, match="one per image"):
    C.capfilt(cap, short, ann, image_dir, num_samples=1, max_images=1)


def test_wrong_kind_of_directory(tmp_path, monkeypatch):
  empty = tmp_path / "empty"
  empty.mkdir()
  with pytest.raises(FileNotFoundError, match="neither a training workdir"):
    C.load_captioner(str(empty))
  with pytest.raises(FileNotFoundError, match="neither a training workdir"):
    C.load_scorer(str(empty))
  gen_dir, ret_dir = tmp_path / "gen", tmp_path / "ret"
  gen_dir.mkdir()
  ret_dir.mkdir()
  (gen_dir / "config.json").write_text(json.dumps(
      {"architectures": ["Blip2ForConditionalGeneration"]}))
  (ret_dir / "config.json").write_text(json.dumps({"architectures": ["Blip2ForImageTextRetrieval"]}))
  with pytest.raises(ValueError, match="goes to --captioner"):
    C.load_scorer(str(gen_dir))
  with pytest.raises(ValueError, match="goes to --scorer"):
    C.load_captioner(str(ret_dir))
  # workdirs: the run config's task decides
  work = tmp_path / "run"
  (work / "checkpoints").mkdir(parents=True)
  import ml_collections
  from vlm.train import checkpoint
  for task in ("blip2_stage1", "blip2_stage2"):
    cfg = ml_collections.ConfigDict({"task": task})
    monkeypatch.setattr(checkpoint, "restore_run", lambda path, c=cfg: (7, c, {}))
    if task == "blip2_stage1":
      with pytest.raises(ValueError, match="'blip2_stage1' run.*goes to --scorer"):
        C.load_captioner(str(work))
    else:
      with pytest.raises(ValueError, match="'blip2_stage2' run.*goes to --captioner"):
        C.load_scorer(str(work))
