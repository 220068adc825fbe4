"""Pseudo-label stores (zarr), their quality against ground truth, and the offline inference that fills them."""
