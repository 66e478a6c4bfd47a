"""Tests of the recipe configs under configs/ (no compile)."""
