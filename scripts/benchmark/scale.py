"""Scale-out figures (README, "Scale out"): the IVF-PQ index at millions of vectors, the memory of
workers sharing one memory-mapped catalogue, and Ray batch throughput against --engine local.

  python -m scripts.benchmark.scale index --vectors 10000000 --work /tmp/scale    # vectors in a disk memmap
  python -m scripts.benchmark.scale memory --vectors 1000000 --work /tmp/scale --workers 1 2 4
  python -m scripts.benchmark.scale memory --served --run RUN --photos DIR --vectors 1000000 --work /tmp/scale
  python -m scripts.benchmark.scale batch --archive model_store/marketplace.mar --photos DIR --limit 200

index: N clustered vectors (the product model's dimension, 256) are generated chunk by chunk into
a disk-backed memmap, indexed with `build_index(..., "ivfpq")` (added in chunks, never copied whole),
and searched: single-query p50/p95 (1 Faiss thread, as the handler runs), recall@10 against an exact
chunked scan, per nprobe / k_factor; build seconds, index bytes, and the process's peak memory.
memory: a catalogue of N vectors is saved, then W separate processes each load it with
`Catalogue.load(folder)`, as the handler's initialize does, and search it; their PSS/USS/RSS are
read from /proc/PID/smaps_rollup while all W are alive. With --served: the catalogue replaces RUN's
index in an archive of RUN's model (scripts.archive), one TorchServe serves it and is scaled to W
workers (management API), each worker answers photos, and the workers' PSS/USS are read the same way;
--formats columnar json compares the memory-mapped listings table with the JSON id map and listings.
batch: photos/s of scripts.batch with --engine local, and --engine ray with 1 and 2 actors, on the
same photos and archive; Ray's overhead per photo = 1/ray - 1/local.
"""
import faiss  # noqa: F401  (before torch: OpenMP, see README)

import argparse
import json
import multiprocessing
import os
import resource
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np

from marketplace_search import search
from marketplace_search.layout import INDEX_DIR
from scripts.benchmark.index import TOP_K, recall_at_k
from scripts.benchmark.common import NUM_CLASSES, percentiles_ms

DIMENSION = 256  # the synthetic vectors' dimension (the trained embedding's); memory --served takes the run's
CHUNK = 100_000


def clustered_chunks(n: int, dimension: int, seed: int = 0, rank: int = 32, spread: float = 0.6,
                     noise: float = 0.25, chunk: int = CHUNK):
    """Yield (start, block): the mixture of scripts.benchmark.index.clustered_vectors, a chunk at a time."""
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


def vectors_on_disk(work: Path, n: int, queries: int, dimension: int = DIMENSION) -> tuple[np.ndarray, np.ndarray]:
    """(catalogue memmap (n, d), queries (q, d)), generated once into WORK and reused."""
    work.mkdir(parents=True, exist_ok=True)
    path = work / f"vectors-{n}x{dimension}.npy"
    total = n + queries
    if not path.exists():
        started = time.perf_counter()
        tmp = path.with_suffix(".tmp.npy")
        out = np.lib.format.open_memmap(tmp, mode="w+", dtype=np.float32, shape=(total, dimension))
        for start, block in clustered_chunks(total, dimension, seed=n):
            out[start:start + len(block)] = block
        out.flush()
        del out
        os.replace(tmp, path)
        print(f"generated {total:,} x {dimension} vectors in {time.perf_counter() - started:.0f} s -> {path}",
              flush=True)
    data = np.load(path, mmap_mode="r")
    return data[:n], np.ascontiguousarray(data[n:])


def exact_top_k(vectors: np.ndarray, queries: np.ndarray, k: int = TOP_K) -> np.ndarray:
    """Exact inner-product top-k ids by a chunked scan (the memmap is read once, never held)."""
    best_d = np.full((len(queries), k), -np.inf, np.float32)
    best_i = np.full((len(queries), k), -1, np.int64)
    for start in range(0, len(vectors), 4 * CHUNK):
        block = np.asarray(vectors[start:start + 4 * CHUNK])
        scores = queries @ block.T
        top = np.argpartition(-scores, k, axis=1)[:, :k]
        d = np.concatenate([best_d, np.take_along_axis(scores, top, axis=1)], axis=1)
        i = np.concatenate([best_i, top + start], axis=1)
        order = np.argsort(-d, axis=1)[:, :k]
        best_d, best_i = np.take_along_axis(d, order, axis=1), np.take_along_axis(i, order, axis=1)
    return best_i


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def bench_index(args) -> list[dict]:
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    vectors, queries = vectors_on_disk(work, args.vectors, args.queries)
    exact_path = work / f"exact-{args.vectors}x{len(queries)}.npy"
    if exact_path.exists():
        exact = np.load(exact_path)
    else:
        started = time.perf_counter()
        exact = exact_top_k(vectors, queries)
        np.save(exact_path, exact)
        print(f"exact top-{TOP_K} of {len(queries)} queries in {time.perf_counter() - started:.0f} s", flush=True)
    path = work / f"ivfpq-{args.vectors}.faiss"
    if args.reuse and path.exists():  # another sweep of the index built before: search-time knobs only
        # memory-mapped, as Catalogue.load maps an ivfpq index in the handler
        index = faiss.read_index(str(path), faiss.IO_FLAG_MMAP_IFC | faiss.IO_FLAG_READ_ONLY)
        params = {"nlist": faiss.extract_index_ivf(index).nlist, "build_seconds": None}
    else:
        rss_before = peak_rss_mb()
        index, params = search.build_index(vectors, "ivfpq", nlist=args.nlist)
        faiss.write_index(index, str(path))
        print(f"built {params} ; peak RSS {peak_rss_mb():.0f} MB (before the build {rss_before:.0f} MB)", flush=True)
    faiss.omp_set_num_threads(1)
    search.set_ivfpq_search(index, max(args.nprobe), max(args.k_factor))
    index.search(queries, TOP_K)  # untimed: the pages the sweep reads are in the page cache, as in a warm server
    rows = []
    for nprobe in args.nprobe:
        for k_factor in args.k_factor:
            search.set_ivfpq_search(index, nprobe, k_factor)
            times, found = [], []
            for row in range(len(queries)):
                start = time.perf_counter()
                found.append(index.search(queries[row:row + 1], TOP_K)[1][0])
                times.append(time.perf_counter() - start)
            rows.append({"vectors": args.vectors, "nlist": params["nlist"], "nprobe": nprobe, "k_factor": k_factor,
                         **{key: round(value, 3) for key, value in percentiles_ms(times, (50, 95)).items()},
                         "recall_at_10": round(recall_at_k(np.array(found), exact), 4),
                         "index_mb": round(path.stat().st_size / 2**20), "build_s": params["build_seconds"],
                         "peak_rss_mb": round(peak_rss_mb()), "load": os.getloadavg()[0]})
            print(json.dumps(rows[-1]), flush=True)
    return rows


# --- memory of workers sharing a catalogue --------------------------------------------------------

MAPPED_FILES = {"index": search.INDEX_FILE, "listings": search.LISTING_TABLE_FILE}


def smaps_mb(pid: int) -> dict[str, float]:
    """Rss, Pss, USS (private clean + dirty) and anonymous memory of a process, in MB, and the Rss/Pss
    of its mappings of the catalogue's index and listings table."""
    fields = {}
    for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines()[1:]:
        name, value = line.split(":")[0], line.split()[1]
        fields[name] = int(value) / 1024
    mapped = {(which, key): 0 for which in MAPPED_FILES for key in ("Rss", "Pss")}
    which = None
    for line in Path(f"/proc/{pid}/smaps").read_text().splitlines():
        if "-" in line.split(" ")[0] and len(line.split()) >= 5:  # a mapping's header line
            which = next((name for name, file in MAPPED_FILES.items() if line.endswith("/" + file)), None)
        elif which and (which, line.split(":")[0]) in mapped:
            mapped[which, line.split(":")[0]] += int(line.split()[1])
    return {"rss_mb": fields["Rss"], "pss_mb": fields["Pss"],
            "uss_mb": fields["Private_Clean"] + fields["Private_Dirty"], "anonymous_mb": fields["Anonymous"],
            **{f"{which}_map_{key.lower()}_mb": value / 1024 for (which, key), value in mapped.items()}}


def synthetic_listings(n: int, categories: list[str]) -> tuple[list[str], dict[str, dict]]:
    """N photo ids and a listing each, with titles, prices and places of a plausible length."""
    image_ids = [f"img-{row:08d}" for row in range(n)]
    listings = {image_id: {"product_id": f"p-{row:08d}", "title": f"Second-hand item number {row}",
                           "price": float(row % 997), "location": "Berlin",
                           "category": categories[row % len(categories)]} for row, image_id in enumerate(image_ids)}
    return image_ids, listings


def load_and_wait(folder: str, queries: np.ndarray, ready, stop) -> None:
    """A worker: load the catalogue as the handler does, search it (touching its pages), then wait."""
    catalogue = search.Catalogue.load(folder)
    faiss.omp_set_num_threads(1)
    for row in range(len(queries)):
        catalogue.search(queries[row:row + 1], k=10)
    ready.release()
    stop.wait()


def bench_memory(args) -> list[dict]:
    work = Path(args.work)
    vectors, queries = vectors_on_disk(work, args.vectors, args.queries)
    rows = []
    for index_type in args.types:
        folder = work / f"catalogue-{index_type}-{args.vectors}"
        if not (folder / search.META_FILE).exists():
            image_ids, listings = synthetic_listings(args.vectors, [f"c{row}" for row in range(NUM_CLASSES)])
            save_catalogue(folder, work, vectors, image_ids, listings, index_type, {})
        index_mb = (folder / search.INDEX_FILE).stat().st_size / 2**20
        context = multiprocessing.get_context("spawn")
        for workers in args.workers:
            ready, stop = context.Semaphore(0), context.Event()
            processes = [context.Process(target=load_and_wait, args=(str(folder), queries[:50], ready, stop))
                         for _ in range(workers)]
            for process in processes:
                process.start()
            for _ in processes:
                ready.acquire()
            figures = [smaps_mb(process.pid) for process in processes]
            stop.set()
            for process in processes:
                process.join()
            row = {"type": index_type, "vectors": args.vectors, "index_file_mb": round(index_mb),
                   "workers": workers, **{key: round(float(np.mean([f[key] for f in figures]))) for key in figures[0]},
                   "pss_total_mb": round(sum(f["pss_mb"] for f in figures)), "load": os.getloadavg()[0]}
            rows.append(row)
            print(json.dumps(row), flush=True)
    return rows


def save_catalogue(folder: Path, work: Path, vectors, image_ids, listings, index_type: str, meta: dict,
                   columnar: bool | None = None) -> None:
    dimension = vectors.shape[1]
    # the index section's, if it ran (256-d); other dimensions get their own file
    built = work / (f"{index_type}-{len(image_ids)}.faiss" if dimension == DIMENSION
                    else f"{index_type}-{len(image_ids)}x{dimension}.faiss")
    if built.exists():
        index = faiss.read_index(str(built))
        params = {"type": index_type, **({"nlist": faiss.extract_index_ivf(index).nlist,
                                           "nprobe": faiss.extract_index_ivf(index).nprobe,
                                           "k_factor": faiss.downcast_index(index).k_factor}
                                          if index_type == "ivfpq" else {})}
        catalogue = search.Catalogue(index, image_ids, listings, {**meta, "index": params, "dimension": dimension})
    else:
        catalogue = search.make_catalogue(vectors, image_ids, listings, meta, index_type)
        faiss.write_index(catalogue.index, str(built))  # the next format's catalogue reuses it
    catalogue.save(folder, columnar=columnar)


def served_run(work: Path, run: Path, run_meta: dict, vectors, catalogue_format: str, index_type: str) -> Path:
    """A copy of RUN (links to its files; RUN_META its index_meta.json) whose index is a synthetic catalogue of
    len(VECTORS) photos."""
    copy = work / f"served-run-{index_type}-{len(vectors)}x{vectors.shape[1]}-{catalogue_format}"
    if (copy / INDEX_DIR / search.META_FILE).exists():
        return copy
    shutil.rmtree(copy, ignore_errors=True)
    copy.mkdir(parents=True)
    for path in run.iterdir():
        if path.name != INDEX_DIR:
            (copy / path.name).symlink_to(path.resolve())
    categories = sorted({listing["category"] for listing in search.read_listings(run / INDEX_DIR).values()})
    image_ids, listings = synthetic_listings(len(vectors), categories)
    save_catalogue(copy / INDEX_DIR, work, vectors, image_ids, listings, index_type,
                   {"model": run_meta["model"], "run": run_meta.get("run")}, columnar=catalogue_format == "columnar")
    return copy


def bench_memory_served(args) -> list[dict]:
    """W workers of one TorchServe serving an archive whose catalogue has N photos; per-worker memory."""
    from scripts import api
    from scripts.archive import build_archive
    from scripts.benchmark.startup import served_model, worker_processes

    work = Path(args.work)
    # synthetic vectors of the run's search vector's dimension (256 for the embedding, 1,536 with features)
    run_meta = json.loads((Path(args.run) / INDEX_DIR / search.META_FILE).read_text())
    vectors, _ = vectors_on_disk(work, args.vectors, args.queries, int(run_meta["dimension"]))
    photos = [path.read_bytes() for path in sorted(Path(args.photos).glob("*.jpg"))[:20]]
    rows = []
    for catalogue_format in args.formats:
        for index_type in args.types:
            run = served_run(work, Path(args.run), run_meta, vectors, catalogue_format, index_type)
            store = work / f"store-{catalogue_format}"
            store.mkdir(exist_ok=True)
            mar = store / "scale.mar"
            if not mar.exists():
                started = time.perf_counter()
                build_archive(run, store, "scale", "1.0", warm_up=False)
                print(f"archived {mar} ({mar.stat().st_size / 2**20:.0f} MB) in {time.perf_counter() - started:.0f} s",
                      flush=True)
            with tempfile.TemporaryDirectory(prefix="ts-", dir="/tmp") as server_dir, \
                    served_model(store, mar, "scale", Path(server_dir), ready_timeout=600) as (server, _):
                for workers in args.workers:
                    started = time.perf_counter()
                    api.management_call(server, "PUT", "/models/scale", server.token(), min_worker=workers,
                                        max_worker=workers, synchronous=True, timeout=900)
                    pids = sorted(process.pid for process in worker_processes(server))
                    if len(pids) != workers:
                        raise RuntimeError(f"asked for {workers} workers, found {len(pids)}: {pids}")
                    scaled_s = time.perf_counter() - started
                    for round_ in range(8 * workers):  # each worker answers a few (TorchServe spreads them)
                        answer = api.predict(server, photos[round_ % len(photos)], model="scale",
                                             token=server.token("inference"))
                        assert answer["neighbours"], answer
                    figures = [smaps_mb(pid) for pid in pids]
                    row = {"format": catalogue_format, "type": index_type, "vectors": args.vectors,
                           "index_file_mb": round((run / INDEX_DIR / search.INDEX_FILE).stat().st_size / 2**20),
                           "workers": workers, "scale_s": round(scaled_s, 1),
                           **{key: round(float(np.mean([f[key] for f in figures]))) for key in figures[0]},
                           "pss_total_mb": round(sum(f["pss_mb"] for f in figures)),
                           "uss_total_mb": round(sum(f["uss_mb"] for f in figures)),
                           "load": os.getloadavg()[0]}
                    rows.append(row)
                    print(json.dumps(row), flush=True)
    return rows


# --- Ray batch throughput ---------------------------------------------------------------------------

def bench_batch(args) -> list[dict]:
    from scripts import batch

    photos = sorted(Path(args.photos).glob("*.jpg"))[:args.limit]
    with tempfile.TemporaryDirectory(prefix="scale-batch-") as tmp:
        inputs = Path(tmp) / "photos"
        inputs.mkdir()
        for path in photos:
            shutil.copyfile(path, inputs / path.name)
        runs = [("local", ["--engine", "local"])] + [
            (f"ray, {actors} actor(s)", ["--engine", "ray", "--actors", str(actors), "--ray-temp-dir", f"{tmp}/ray"])
            for actors in args.actors]
        rows, local_rate = [], None
        for name, options in runs:
            output = Path(tmp) / f"{name.replace(' ', '_')}.jsonl"
            started = time.perf_counter()
            summary = batch.main([str(inputs), "--output", str(output), "--archive", str(args.archive),
                                  "--batch-size", str(args.batch_size), *options])
            rate = summary["photos_per_s"]
            local_rate = local_rate or rate
            rows.append({"engine": name, "photos": len(photos), "photos_per_s": rate,
                         "vs_local": round(rate / local_rate, 2),
                         "overhead_ms_per_photo": round(1000 / rate - 1000 / local_rate, 1),
                         "wall_s_with_startup": round(time.perf_counter() - started, 1), "load": os.getloadavg()[0],
                         "ray_worker_niceness": os.environ.get("RAY_worker_niceness", "default")})
            print(json.dumps(rows[-1]), flush=True)
    return rows


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("section", choices=("index", "memory", "batch"))
    parser.add_argument("--vectors", type=int, default=1_000_000)
    parser.add_argument("--queries", type=int, default=200)
    parser.add_argument("--work", type=Path, default=Path(tempfile.gettempdir()) / "scale-bench")
    parser.add_argument("--nlist", type=int)
    parser.add_argument("--reuse", action="store_true", help="index: sweep the index built by an earlier run")
    parser.add_argument("--nprobe", type=int, nargs="+", default=[16, 32, 64])
    parser.add_argument("--k-factor", type=int, nargs="+", default=[4, 8, 16])
    parser.add_argument("--types", nargs="+", default=["ivfpq"])
    parser.add_argument("--served", action="store_true", help="memory: of TorchServe's workers (needs --run, --photos)")
    parser.add_argument("--run", type=Path, help="memory --served: the run whose model is archived")
    parser.add_argument("--formats", nargs="+", default=["columnar", "json"], choices=("columnar", "json"),
                        help="memory --served: how the catalogue's id map and listings are saved")
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2, 4])
    parser.add_argument("--archive", type=Path)
    parser.add_argument("--photos", type=Path)
    parser.add_argument("--limit", type=int, default=200)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--actors", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--output", type=Path, help="write the rows as JSON here")
    args = parser.parse_args(argv)
    print(f"load average {os.getloadavg()}", flush=True)
    if args.section == "memory" and args.served:
        rows = bench_memory_served(args)
    else:
        rows = {"index": bench_index, "memory": bench_memory, "batch": bench_batch}[args.section](args)
    if args.output:
        args.output.write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
