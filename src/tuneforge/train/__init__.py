"""Training. core/: the loop every method shares (step, checkpoints, engines, optimisers, schedules, loss
kernels, FLOPs, launch); safety/: what keeps a run safe (guard, lock, signals, watchdog, preflight, resume
checks, fault injection); observe/: what shows a run (tracking, report); recipes/: one file per method.
Entry points: train/run.py (`run`, `trainer`)."""
