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
    caption_sampling: ``"per_caption"`` (every caption a record, as LAVIS' COCO datasets) or
      ``"per_image"`` (every image a record, one of its captions drawn at each use: a CapFilt
      file written by scripts/capfilt.py, BLIP-2 section 3.4).
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
  cfg.caption_sampling = "per_caption"
  return cfg


def default_qwen_data_config() -> ml_collections.ConfigDict:
  """Returns the Qwen3-VL instruction-tuning data config over the embedded real data.

  Sources (``sources``, a list; each read by :func:`vlm.data.conversations.load_source`):
  COCO train captions as chat turns (user "<image>\\nDescribe this image in one sentence.",
  assistant = a human caption), the OK-VQA questions of the ``train`` split on those photos,
  the three demo image conversations and the ActivityNet video question/answer turns
  (``data/qwen_sft``; the first record's clip is not shipped, so it is a counted
  ``missing_video`` skip). For stage A/B pre-training rows use ``{"type": "coco_captions",
  "mode": "caption", ...}`` (image then caption, loss on the caption).

  Fields:
    sources: list of source dicts (``type`` conversations | coco_captions | okvqa, paths,
      optional ``repeat``).
    max_length: L, tokens per packed row.
    max_patches: Np, patch buffer per row (multiple of spatial_merge_size**2).
    pack_window: samples carried over before a batch is closed (0: 2 * rows per process).
    processor: :class:`vlm.data.qwen_processor.QwenProcessorConfig` overrides (pixel budgets,
      video fps / frame counts); patch sizes come from the model config.
    tokenizer_file: Qwen3 ``tokenizer.json``.
    on_bad_sample: ``"skip"`` (drop and count) or ``"raise"`` (strict).
    validate_images: ``"decode"`` (full decode at build time) or ``"header"``.
    prescan: encode every sample once at build time (exact too-long counts and lengths, and
      "nothing usable" fails before compiling); False defers those checks to the stream.
    num_threads: threads for build-time checks and for encoding samples ahead of the packer
      (1: encode in the calling thread). Results do not depend on it.
    prefetch: stream positions encoded ahead (0: 4 * num_threads).
  """
  cfg = ml_collections.ConfigDict()
  cfg.sources = [
      {"type": "coco_captions", "annotations": "data/coco/captions_train2017.json",
       "image_dir": "data/coco/images", "mode": "chat"},
      {"type": "okvqa", "path": "data/vqa/okvqa_on_coco_real_captions.json",
       "image_dir": "data/coco/images", "split": "train"},
      {"type": "conversations", "path": "data/qwen_sft/single_images.json"},
      {"type": "conversations", "path": "data/qwen_sft/activitynet_qa/video.json"},
  ]
  cfg.max_length = 1024
  cfg.max_patches = 1536
  cfg.pack_window = 0
  cfg.processor = ml_collections.ConfigDict({
      "min_pixels": 64 * 64, "max_pixels": 128 * 128,
      "video_min_pixels": 64 * 64, "video_max_pixels": 8 * 64 * 64,
      "fps": 2.0, "min_frames": 4, "max_frames": 8,
  })
  cfg.tokenizer_file = "vlm/assets/tokenizers/qwen3/tokenizer.json"
  cfg.on_bad_sample = "skip"
  cfg.validate_images = "decode"
  cfg.prescan = True
  cfg.num_threads = 4
  cfg.prefetch = 0
  return cfg
