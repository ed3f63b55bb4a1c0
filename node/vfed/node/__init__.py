"""vfed.node."""
