"""Monitoring and orchestration: the Prefect flow wrapper of a stage (flows), the whole DAG as one flow (dag), the
local server (server). Nothing here writes an artifact: no module here is a code dependency of a stage."""
