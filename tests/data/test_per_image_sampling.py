"""Per-image caption sampling (``data.caption_sampling="per_image"``, the way training reads a CapFilt
file): every image is one record per epoch and one of its captions is drawn with the grain
per-record rng at each use. Real COCO photos; the caption drawn is read back through a
``text_processor`` that maps each caption to its index."""
import collections
import json
import os

import numpy as np
import pytest
from PIL import Image

from vlm.data.pipeline import build_blip2_train_loader

COCO = os.path.join(os.path.dirname(__file__), "..", "..", "data", "coco")
PER_IMAGE = (4, 1, 3)  # captions of the three images
EPOCHS = 120


@pytest.fixture(scope="module")
def caption_file(tmp_path_factory):
  root = tmp_path_factory.mktemp("per_image")
  (root / "images").mkdir()
  with open(os.path.join(COCO, "captions_train2017.json")) as f:
    images = json.load(f)["images"][:len(PER_IMAGE)]
  captions, anns = [], []
  for im, n in zip(images, PER_IMAGE):
    with Image.open(os.path.join(COCO, "images", im["file_name"])) as photo:  # small: fast decode
      photo.convert("RGB").resize((48, 36)).save(root / "images" / im["file_name"])
    for j in range(n):
      captions.append(f"image {im['id']} caption {j}")
      anns.append({"id": 100 + len(anns), "image_id": im["id"], "caption": captions[-1],
                   "source": "synthetic" if j % 2 else "human", "score": 0.5 - 0.1 * j})
  (root / "capfilt.json").write_text(json.dumps({"images": images, "annotations": anns}))
  return str(root), images, captions


def _loader(root, captions, seed, sampling="per_image"):
  index = {c: i for i, c in enumerate(captions)}

  def text_processor(caption, rng):
    del rng
    return {"caption_index": np.asarray(index[caption], np.int32)}

  cfg = {"root": root, "train_annotations": "capfilt.json", "image_dir": "images",
         "image_size": 16, "caption_sampling": sampling}
  return build_blip2_train_loader(cfg, global_batch_size=1, seed=seed, process_index=0,
                                  process_count=1, text_processor=text_processor)


def _draws(it, n):
  out = []
  for _ in range(n):
    b = next(it)
    out.append((int(b["image_id"][0]), int(b["caption_index"][0]), b["pixel_values"][0]))
  return out


def test_every_caption_drawn_uniformly_per_image(caption_file):
  root, images, captions = caption_file
  draws = _draws(iter(_loader(root, captions, seed=0)), EPOCHS * len(images))
  # one record per image: each epoch visits every image exactly once
  ids = sorted(im["id"] for im in images)
  for e in range(EPOCHS):
    assert sorted(d[0] for d in draws[e * 3:(e + 1) * 3]) == ids
  start = 0
  for im, n in zip(images, PER_IMAGE):
    own = list(range(start, start + n))
    start += n
    got = [c for i, c, _ in draws if i == im["id"]]
    assert len(got) == EPOCHS and set(got) == set(own)  # its own captions, all of them
    counts = collections.Counter(got)
    expected = EPOCHS / n
    # binomial sd <= sqrt(120 * 0.25) ~ 5.5: +-40% of 30 is > 2 sd; a biased draw (always the
    # first caption, or the same caption per image) fails
    assert all(abs(counts[c] - expected) <= 0.4 * expected for c in own), counts
  # the draws are not tied to the epoch order: the same image draws differently across epochs
  first = [c for i, c, _ in draws if i == images[0]["id"]]
  assert len(set(zip(first, first[1:]))) > 4


def test_per_caption_mode_reads_every_caption_once_per_epoch(caption_file):
  root, images, captions = caption_file
  draws = _draws(iter(_loader(root, captions, seed=0, sampling="per_caption")), len(captions))
  assert sorted(c for _, c, _ in draws) == list(range(len(captions)))
  with pytest.raises(ValueError, match="caption_sampling"):
    _loader(root, captions, seed=0, sampling="per_word")


def test_reproducible_and_resumes_exactly(caption_file):
  root, images, captions = caption_file
  n = 12
  a = _draws(iter(_loader(root, captions, seed=7)), 2 * n)
  b = _draws(iter(_loader(root, captions, seed=7)), 2 * n)
  other = _draws(iter(_loader(root, captions, seed=8)), 2 * n)
  assert [(i, c) for i, c, _ in a] == [(i, c) for i, c, _ in b]
  for x, y in zip(a, b):
    np.testing.assert_array_equal(x[2], y[2])
  assert [(i, c) for i, c, _ in a] != [(i, c) for i, c, _ in other]
  # save the iterator state after n records (mid-epoch), restore it into a fresh loader's iterator
  it = iter(_loader(root, captions, seed=7))
  _draws(it, n)
  state = it.get_state()
  fresh = iter(_loader(root, captions, seed=7))
  fresh.set_state(state)
  resumed = _draws(fresh, n)
  assert [(i, c) for i, c, _ in resumed] == [(i, c) for i, c, _ in a[n:]]
  for x, y in zip(resumed, a[n:]):
    np.testing.assert_array_equal(x[2], y[2])
