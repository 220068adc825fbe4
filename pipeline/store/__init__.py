"""Pseudo-label stores (the zarr reader and writer) and their quality against ground truth."""
