"""ProDA domain-adaptive semantic segmentation as a cached, monitored pipeline."""

# OpenMP's wait policy is left to libgomp (spin briefly, then sleep) unless the user sets OMP_WAIT_POLICY. Forcing
# PASSIVE was measured both ways: on a 2-core Intel VM (AMX) it made one warm-up stage 1.28x slower (150 steps:
# 14.2 s libgomp default, 18.3 s passive) and a stage-1 step 2x slower (0.103 vs 0.205 s); on a 2-core AMD VM it
# was neutral alone but saved two jobs sharing the cores from 7x slower steps. For two jobs on the same cores,
# try OMP_WAIT_POLICY=PASSIVE; one job at a time runs best with the default.
