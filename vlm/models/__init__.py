"""Model registry: preset family name -> linen module class."""
