"""vlm.objectives."""
