"""Benchmarks of the model in-process, the served REST API, the Faiss index and server start-up.

One module per section (bare, served, index, startup), each returning a table as a dict of rows,
columns and legend; `report` renders them; `__main__` is the command line
(`python -m scripts.benchmark --help`).
"""
import faiss  # noqa: F401  (before torch: both bring OpenMP runtimes; TORCHSERVE_NOTES.md, trap 14)
