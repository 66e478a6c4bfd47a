"""Tests for vlm.parallel (meshes, sharded steps on the 8 simulated CPU devices of tests/conftest.py)."""
