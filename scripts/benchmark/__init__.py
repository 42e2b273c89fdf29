"""Benchmarks: one module per section, each returning a table (rows, columns, legend); `__main__` is the
command line (`python -m scripts.benchmark --help`), `scale` the 10M-vector index and Ray batch figures."""
import faiss  # noqa: F401  (before torch: both bring an OpenMP runtime)
