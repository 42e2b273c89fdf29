"""Benchmarks: a module per section, each returning a table; `__main__` is the command line, `scale` IVF-PQ's."""
import faiss  # noqa: F401  (before torch: both bring an OpenMP runtime)
