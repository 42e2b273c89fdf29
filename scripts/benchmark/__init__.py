"""Benchmarks: a module per section (`words` holds both text-model sections), each returning a table (rows,
columns, legend); `__main__` is the command line, `scale` the IVF-PQ index at 10M vectors."""
import faiss  # noqa: F401  (before torch: both bring an OpenMP runtime)
