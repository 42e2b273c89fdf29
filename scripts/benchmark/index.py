"""Index section: what `index_type="auto"` (marketplace_search.search.build_index) picks at each catalogue
size against the alternatives, each built as the pipeline builds it: flat (exact, the recall reference),
HNSW over a sweep of efSearch, and IVF-PQ. One query at a time on one Faiss thread, as the handler searches.
"""
import time
from pathlib import Path

import faiss
import numpy as np

from marketplace_search import search
from marketplace_search.layout import EMBEDDINGS_DIR
from scripts.benchmark.common import percentiles_ms

TOP_K = 10
TARGET_VECTORS, TARGET_MS, TARGET_RECALL = 1_000_000, 5.0, 0.95
INDEX_COLUMNS = [("data", "data"), ("vectors", "vectors"), ("type", "index"), ("settings", "settings"),
                 ("auto", "auto"), ("build_s", "build s"), ("index_mb", "index MB"), ("p50_ms", "1 query p50 ms"),
                 ("p95_ms", "p95 ms"), ("recall_at_10", "recall@10")]


def clustered_chunks(n: int, dimension: int, seed: int = 0, rank: int = 32, spread: float = 0.6,
                     noise: float = 0.25, chunk: int = 100_000):
    """Yield (start, block) of `n` L2-normalised float32 vectors: a cluster centre plus an offset in a shared
    low-rank subspace plus a little noise each. Like real embeddings the data has a low intrinsic dimension,
    so approximate search behaves as on a catalogue (uniform random vectors make every index look bad)."""
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


def clustered_vectors(n: int, dimension: int, seed: int = 0) -> np.ndarray:
    vectors = np.empty((n, dimension), np.float32)
    for start, block in clustered_chunks(n, dimension, seed):
        vectors[start:start + len(block)] = block
    return vectors


def recall_at_k(found: np.ndarray, exact: np.ndarray, k: int = TOP_K) -> float:
    """Mean share of each query's exact top-k ids that `found` has in its top k (-1: nothing found)."""
    return float(np.mean([len((set(row[:k].tolist()) - {-1}) & set(truth[:k].tolist())) / k
                          for row, truth in zip(found, exact)]))


def workloads(settings: dict):
    """Yield (data, catalogue vectors, queries): the --run's embeddings with a random tenth (at most
    `queries`) held out, then synthetic catalogues of each size with queries from the same mixture."""
    if settings.get("run") and (Path(settings["run"]) / EMBEDDINGS_DIR).is_dir():
        from training.data import load_embeddings

        vectors = load_embeddings(settings["run"])[1]
        order = np.random.default_rng(0).permutation(len(vectors))
        held_out = min(settings["queries"], len(vectors) // 10)
        yield "run", vectors[order[held_out:]], vectors[order[:held_out]]
    for n in settings["sizes"]:
        data = clustered_vectors(n + settings["queries"], settings["dim"], seed=n)
        yield "synthetic", data[:n], data[n:]


def measure(index, queries: np.ndarray, exact: np.ndarray, single_queries: int) -> dict:
    """p50/p95 of single queries and recall@10 over every query."""
    times = []
    for row in range(min(single_queries, len(queries))):
        start = time.perf_counter()
        index.search(queries[row:row + 1], TOP_K)
        times.append(time.perf_counter() - start)
    return {**percentiles_ms(times, (50, 95)), "recall_at_10": recall_at_k(index.search(queries, TOP_K)[1], exact)}


def bench_workload(data: str, vectors: np.ndarray, queries: np.ndarray, settings: dict) -> list[dict]:
    """Rows for one catalogue: flat, HNSW at each efSearch (build_index's default always among them), IVF-PQ."""
    auto_index, auto_params = search.build_index(vectors, "auto")
    built, auto = {auto_params["type"]: (auto_index, auto_params)}, auto_params["type"]
    default_ef, rows, exact = search.build_index.__kwdefaults__["ef_search"], [], None
    del auto_index  # each index is freed once measured
    for kind in ("flat", "hnsw", "ivfpq"):
        index, params = built.pop(kind, None) or search.build_index(vectors, kind)
        print(f"index: {len(vectors):,} {kind} built in {params['build_seconds']:.1f} s", flush=True)
        exact = index.search(queries, TOP_K)[1] if kind == "flat" else exact
        for ef in sorted(set(settings["ef_search"]) | {default_ef}) if kind == "hnsw" else [None]:
            if ef is not None:
                index.hnsw.efSearch = params["efSearch"] = ef
            rows.append({"data": data, "vectors": len(vectors), "type": kind, "build_s": params["build_seconds"],
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
    met = [row for row in rows if row["vectors"] == largest and row["recall_at_10"] >= TARGET_RECALL
           and row["p95_ms"] <= TARGET_MS]
    if largest < TARGET_VECTORS:
        return f"{target}: NOT MEASURED (largest size {largest:,})"
    if not met:
        return f"{target}: FAIL"
    best = min(met, key=lambda row: row["p95_ms"])
    return (f"{target}: PASS with {best['type']} {best['settings']}: p95 {best['p95_ms']:.2f} ms, recall@10 "
            f"{best['recall_at_10']:.3f}")


def bench_index(settings: dict) -> dict:
    threads = faiss.omp_get_max_threads()
    faiss.omp_set_num_threads(1)
    try:
        rows = [row for workload in workloads(settings) for row in bench_workload(*workload, settings)]
    finally:
        faiss.omp_set_num_threads(threads)
    verdict = index_verdict(rows)
    legend = (f"Synthetic: clustered L2-normalised {settings['dim']}-d vectors, {settings['queries']} held-out queries "
              f"from the same mixture; run: the --run's embeddings, a tenth held out. Recall@10 against flat (exact) "
              f"search; p50/p95 over {settings['single_queries']} single queries, 1 Faiss thread. auto: what "
              f"index_type=\"auto\" builds (flat up to {search.FLAT_MAX:,} vectors of {search.FLAT_DIMENSION} floats, "
              f"HNSW up to {search.HNSW_MAX:,}, IVF-PQ above).\n{verdict}")
    return {"rows": rows, "columns": INDEX_COLUMNS, "legend": legend, "verdict": verdict}
