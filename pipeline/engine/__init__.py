"""The training engine every stage shares: stage context, the loop, checkpoints, DDP, training glue."""
