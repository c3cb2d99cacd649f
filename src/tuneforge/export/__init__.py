"""Export: merge adapters into full weights (parity-checked); quantize and GGUF come later."""
