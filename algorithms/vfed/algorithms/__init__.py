"""vfed.algorithms."""
