"""Tests for vlm.objectives."""
