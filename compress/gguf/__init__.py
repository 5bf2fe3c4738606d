"""GGUF export for llama.cpp: tensor types and byte layouts (``quants``, ``kquants``), tensor names,
metadata, vocabulary, type mixes and the export pass. Import the submodules directly; this package
imports nothing itself."""
