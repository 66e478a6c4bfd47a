"""Default data configuration for BLIP-2 stage-1 training and retrieval evaluation."""
from __future__ import annotations

import ml_collections


def default_blip2_data_config() -> ml_collections.ConfigDict:
  """Returns the BLIP-2 COCO data config (spec §2.8, §6.4, §6.5, §7.1).

  Fields:
    root: dataset directory; relative paths resolve against cwd then the repo root.
    train_annotations / val_annotations: COCO captions json names (relative to ``root``).
    image_dir: image directory (relative to ``root``).
    image_size: S, square side of ``pixel_values`` [B, S, S, 3].
    max_text_len: T for training (LAVIS ``max_txt_len`` 32).
    eval_max_text_len: T for retrieval evaluation (35).
    max_words: words kept by ``pre_caption`` (50).
    crop_scale: RandomResizedCrop area range (0.5, 1.0).
    hflip: random horizontal flip with p=0.5.
    vocab_file: BERT ``vocab.txt`` (``[DEC]`` is appended as id 30522).
    on_bad_sample: ``"skip"`` (drop and count bad records) or ``"raise"``.
    validate_images: ``"decode"`` (fully decode every image once at build time: exact bad-sample
      counts) or ``"header"`` (Pillow open + ``verify()`` only: faster on full COCO; images that
      still fail at load time are replaced by the next good record and counted in the worker).
    worker_count: grain worker processes (0: load in the training process). Any fixed value is
      deterministic, but batch composition depends on it (each worker batches its own
      interleaved records) and a saved iterator state only restores with the same value.
    worker_buffer_size: batches prefetched per grain worker.
  """
  cfg = ml_collections.ConfigDict()
  cfg.root = "data/coco"
  cfg.train_annotations = "captions_train2017.json"
  cfg.val_annotations = "captions_val2017.json"
  cfg.image_dir = "images"
  cfg.image_size = 224
  cfg.max_text_len = 32
  cfg.eval_max_text_len = 35
  cfg.max_words = 50
  cfg.crop_scale = (0.5, 1.0)
  cfg.hflip = True
  cfg.vocab_file = "vlm/assets/tokenizers/bert-base-uncased/vocab.txt"
  cfg.on_bad_sample = "skip"
  cfg.validate_images = "decode"
  cfg.worker_count = 0
  cfg.worker_buffer_size = 1
  return cfg
