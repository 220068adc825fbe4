"""Running stages: the stage entry point and Prefect flows (the whole-DAG orchestrator is pipeline.orchestrate)."""
