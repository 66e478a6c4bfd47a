"""Tests for vlm.convert (HF checkpoint conversion)."""
