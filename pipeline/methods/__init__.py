"""One module per training method: supervised (source-only warm-up, oracle), ProDA stage 1, distillation."""
