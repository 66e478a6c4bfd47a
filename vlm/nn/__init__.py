"""Building blocks shared by both model families."""
