"""Data: rows -> conversations -> one render with the chat template -> tokens + loss masks -> cache."""
