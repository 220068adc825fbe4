"""The engine every stage shares: the stage entry, context, the training loop, checkpoints, training glue, and
the small monitor interface the orchestration layer implements."""
