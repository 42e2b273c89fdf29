"""Index section: what `index_type="auto"` picks at each catalogue size against flat (exact), HNSW over a sweep
of efSearch and IVF-PQ, each built as the pipeline builds it and searched one query at a time on one thread."""
import time

import faiss
import numpy as np

from marketplace_search import search
from scripts.benchmark.common import percentiles_ms

TOP_K = 10
TARGET_VECTORS, TARGET_MS, TARGET_RECALL = 1_000_000, 5.0, 0.95
INDEX_COLUMNS = [("vectors", "vectors"), ("type", "index"), ("settings", "settings"), ("auto", "auto"),
                 ("build_s", "build s"), ("index_mb", "index MB"), ("p50_ms", "1 query p50 ms"), ("p95_ms", "p95 ms"),
                 ("recall_at_10", "recall@10")]


def clustered_chunks(n: int, dimension: int, seed: int = 0, rank: int = 32, spread: float = 0.6,
                     noise: float = 0.25, chunk: int = 100_000):
    """Yield (start, block) of N L2-normalised vectors of a low intrinsic dimension, as embeddings are (uniform
    random vectors make every approximate index look bad): a cluster centre, a low-rank offset and noise each."""
    rng = np.random.default_rng(seed)
    clusters = max(16, n // 1000)
    centres = rng.standard_normal((clusters, dimension)).astype(np.float32)
    centres /= np.linalg.norm(centres, axis=1, keepdims=True)
    basis = rng.standard_normal((rank, dimension)).astype(np.float32)
    basis /= np.linalg.norm(basis, axis=1, keepdims=True)
    for start in range(0, n, chunk):
        size = min(chunk, n - start)
        block = centres[rng.integers(0, clusters, size)]
        block += (rng.standard_normal((size, rank), dtype=np.float32) @ basis) * (spread / np.sqrt(rank))
        block += rng.standard_normal((size, dimension), dtype=np.float32) * (noise / np.sqrt(dimension))
        block /= np.linalg.norm(block, axis=1, keepdims=True)
        yield start, block


def recall_at_k(found: np.ndarray, exact: np.ndarray, k: int = TOP_K) -> float:
    """Mean share of each query's exact top-k ids that `found` has in its top k (-1: nothing found)."""
    return float(np.mean([len((set(row[:k].tolist()) - {-1}) & set(truth[:k].tolist())) / k
                          for row, truth in zip(found, exact)]))


def measure(index, queries: np.ndarray, exact: np.ndarray, single_queries: int) -> dict:
    times = []
    for row in range(min(single_queries, len(queries))):
        start = time.perf_counter()
        index.search(queries[row:row + 1], TOP_K)
        times.append(time.perf_counter() - start)
    return {**percentiles_ms(times, (50, 95)), "recall_at_10": recall_at_k(index.search(queries, TOP_K)[1], exact)}


def bench_size(n: int, settings: dict) -> list[dict]:
    data = np.concatenate([block for _, block in clustered_chunks(n + settings["queries"], settings["dim"], seed=n)])
    vectors, queries = data[:n], data[n:]
    auto_index, auto_params = search.build_index(vectors, "auto")
    built, auto = {auto_params["type"]: (auto_index, auto_params)}, auto_params["type"]
    default_ef, rows, exact = search.build_index.__kwdefaults__["ef_search"], [], None
    del auto_index  # each index is freed once measured
    for kind in ("flat", "hnsw", "ivfpq"):
        index, params = built.pop(kind, None) or search.build_index(vectors, kind)
        print(f"index: {n:,} {kind} built in {params['build_seconds']:.1f} s", flush=True)
        exact = index.search(queries, TOP_K)[1] if kind == "flat" else exact
        for ef in sorted(set(settings["ef_search"]) | {default_ef}) if kind == "hnsw" else [None]:
            if ef is not None:
                index.hnsw.efSearch = params["efSearch"] = ef
            rows.append({"vectors": n, "type": kind, "build_s": params["build_seconds"],
                         "settings": ", ".join(f"{key}={params[key]}" for key in ("M", "efSearch", "nlist", "nprobe",
                                                                                  "k_factor") if key in params),
                         "auto": kind == auto and ef in (None, default_ef),
                         "index_mb": faiss.serialize_index(index).nbytes / 2**20,
                         **measure(index, queries, exact, settings["single_queries"])})
        del index
    return rows


def index_verdict(rows: list[dict]) -> str:
    target = (f"Target: top-{TOP_K} over {TARGET_VECTORS:,} vectors in ≤ {TARGET_MS:g} ms (p95 of one query) at "
              f"recall@10 ≥ {TARGET_RECALL}")
    largest = max(row["vectors"] for row in rows)
    best = min((row for row in rows if row["vectors"] == largest and row["recall_at_10"] >= TARGET_RECALL
                and row["p95_ms"] <= TARGET_MS), key=lambda row: row["p95_ms"], default=None)
    if largest < TARGET_VECTORS or best is None:
        return f"{target}: " + (f"NOT MEASURED (largest size {largest:,})" if largest < TARGET_VECTORS else "FAIL")
    return (f"{target}: PASS with {best['type']} {best['settings']}: p95 {best['p95_ms']:.2f} ms, recall@10 "
            f"{best['recall_at_10']:.3f}")


def bench_index(settings: dict) -> dict:
    threads = faiss.omp_get_max_threads()
    faiss.omp_set_num_threads(1)
    try:
        rows = [row for n in settings["sizes"] for row in bench_size(n, settings)]
    finally:
        faiss.omp_set_num_threads(threads)
    verdict = index_verdict(rows)
    legend = (f"Clustered {settings['dim']}-d vectors (the --run's size), {settings['queries']} held-out queries; "
              f"recall@10 against flat search, p50/p95 over {settings['single_queries']} single queries on 1 thread. "
              f"auto: what index_type=\"auto\" builds (flat up to {search.FLAT_MAX:,} vectors of "
              f"{search.FLAT_DIMENSION} floats, HNSW up to {search.HNSW_MAX:,}, IVF-PQ above).\n{verdict}")
    return {"rows": rows, "columns": INDEX_COLUMNS, "legend": legend, "verdict": verdict}
