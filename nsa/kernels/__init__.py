"""CUDA kernel entry points of nsa (loaded lazily; importing never builds)."""
