"""vlm.data."""
