"""ProDA domain-adaptive semantic segmentation as a cached, monitored pipeline."""

import os

# Before torch loads OpenMP: spinning OpenMP barriers made CPU training ~7x slower whenever another process (a
# DataLoader worker, a second job) shared the cores: two 60-step stage-1 runs side by side took 338 s each with
# libgomp's default spinning and 48 s passive (2 cores, 2026-12-02); alone, 26.0 vs 25.4-29.4 s (run-to-run
# noise). A value set by the user wins.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
