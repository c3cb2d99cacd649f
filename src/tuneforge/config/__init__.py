"""Typed config: schema, loading, overrides. Imports nothing heavy (no torch)."""

from tuneforge.config.load import load_config, parse_overrides
from tuneforge.config.schema import Config

__all__ = ["Config", "load_config", "parse_overrides"]
