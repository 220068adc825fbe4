"""ProDA domain-adaptive semantic segmentation as a cached, monitored pipeline."""
