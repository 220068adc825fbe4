"""The methods, one module each: supervised (warm-up, oracle), ProDA stage 1 (proda), distillation; the offline
inference that fills the pseudo-label stores (pseudo_labels) and what the self-training stages share."""
