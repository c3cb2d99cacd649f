"""Inference: generate once, interactive chat (streaming), batch prediction."""
