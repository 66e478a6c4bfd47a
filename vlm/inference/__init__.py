"""vlm.inference."""
