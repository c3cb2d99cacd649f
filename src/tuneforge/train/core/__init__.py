"""The loop every method shares: step, checkpoints, engines, optimisers, schedules, loss kernels, FLOPs, launch."""
