"""vlm.parallel."""
