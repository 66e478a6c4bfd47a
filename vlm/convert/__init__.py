"""vlm.convert."""
