"""The IVF-PQ index that `auto` builds above 2M vectors, on N clustered 256-d vectors kept in a memmap: p50/p95
of one query on one thread and recall@10 per nprobe / k_factor, build seconds, index size, peak memory."""
import argparse
import json
import os
import resource
import tempfile
from pathlib import Path

import faiss
import numpy as np
from faiss.contrib.exhaustive_search import knn_ground_truth

from marketplace_search import search
from scripts.benchmark.common import interruptible
from scripts.benchmark.index import TOP_K, clustered_chunks, measure

DIMENSION = 256
SCAN_CHUNK = 400_000


def vectors_on_disk(work: Path, n: int, queries: int) -> tuple[np.ndarray, np.ndarray]:
    """(catalogue memmap (n, d), queries (q, d)), generated once into WORK."""
    path = work / f"vectors-{n}x{DIMENSION}.npy"
    if not path.exists():
        partial = path.with_suffix(".partial.npy")
        out = np.lib.format.open_memmap(partial, mode="w+", dtype=np.float32, shape=(n + queries, DIMENSION))
        for start, block in clustered_chunks(n + queries, DIMENSION, seed=n):
            out[start:start + len(block)] = block
        out.flush()
        del out
        os.replace(partial, path)
    data = np.load(path, mmap_mode="r")
    return data[:n], np.ascontiguousarray(data[n:])


def bench_index(args) -> list[dict]:
    """The sweep's rows, each printed as a JSON line once measured."""
    vectors, queries = vectors_on_disk(args.work, args.vectors, args.queries)
    exact_path = args.work / f"exact-{args.vectors}x{len(queries)}.npy"
    if not exact_path.exists():  # a chunked scan: the memmap is read once, never held whole
        chunks = (np.asarray(vectors[start:start + SCAN_CHUNK]) for start in range(0, len(vectors), SCAN_CHUNK))
        np.save(exact_path, knn_ground_truth(queries, chunks, TOP_K, metric_type=faiss.METRIC_INNER_PRODUCT)[1])
    exact = np.load(exact_path)
    path = args.work / f"ivfpq-{args.vectors}.faiss"
    if args.reuse and path.exists():  # memory-mapped, as Catalogue.load maps an ivfpq index in the handler
        index = faiss.read_index(str(path), faiss.IO_FLAG_MMAP_IFC | faiss.IO_FLAG_READ_ONLY)
        params = {"nlist": faiss.extract_index_ivf(index).nlist, "build_seconds": None}
    else:
        index, params = search.build_index(vectors, "ivfpq")
        faiss.write_index(index, str(path))
    faiss.omp_set_num_threads(1)
    search.set_ivfpq_search(index, max(args.nprobe), max(args.k_factor))
    index.search(queries, TOP_K)  # untimed: the pages a sweep reads are in the page cache, as in a warm server
    rows = []
    for nprobe in args.nprobe:
        for k_factor in args.k_factor:
            search.set_ivfpq_search(index, nprobe, k_factor)
            rows.append({"vectors": args.vectors, "nlist": params["nlist"], "nprobe": nprobe, "k_factor": k_factor,
                         **measure(index, queries, exact, len(queries)), "index_mb": path.stat().st_size / 2**20,
                         "build_s": params["build_seconds"], "load": os.getloadavg()[0],
                         "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024})
            print(json.dumps(rows[-1]), flush=True)
    return rows


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(prog="python -m scripts.benchmark.scale", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--vectors", type=int, default=1_000_000, help="catalogue size")
    parser.add_argument("--queries", type=int, default=200, help="held-out queries")
    parser.add_argument("--work", type=Path, default=Path(tempfile.gettempdir()) / "scale-bench",
                        help="where the vectors, exact answers and index are kept between runs")
    parser.add_argument("--reuse", action="store_true", help="sweep the index an earlier run built")
    parser.add_argument("--nprobe", type=int, nargs="+", default=[8, 16, 32, 64])
    parser.add_argument("--k-factor", type=int, nargs="+", default=[8, 16, 32])
    args = parser.parse_args(argv)
    args.work.mkdir(parents=True, exist_ok=True)
    with interruptible():
        bench_index(args)


if __name__ == "__main__":
    main()
