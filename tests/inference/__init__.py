"""Tests for vlm.inference."""
