"""vfed.proxy."""
