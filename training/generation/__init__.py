"""Cached text generation from a model or an export (``full``, ``sentence-cache``, ``kv``)."""
