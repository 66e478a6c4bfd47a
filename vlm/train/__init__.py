"""vlm.train."""
