"""tuneforge: fine-tune LLMs on your own data, driven by one typed config."""

__version__ = "0.1.0"
