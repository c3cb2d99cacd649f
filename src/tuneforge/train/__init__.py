"""Training: one recipe per method (sft.py), the loss, checkpoints, tracking."""
