"""vfed.server."""
