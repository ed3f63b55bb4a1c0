"""vfed.common."""
