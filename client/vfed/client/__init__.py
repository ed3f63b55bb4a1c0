"""vfed.client."""
