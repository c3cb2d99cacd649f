"""What keeps a run safe: guard, lock, signals, watchdog, preflight, resume checks, fault injection."""
