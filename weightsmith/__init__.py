"""weightsmith: make language models smaller and combine them."""

__version__ = "0.1.0"
