"""Live section: the live catalogue (marketplace_search/live.py, scripts/catalogue.py) while serving.

- remove → effect: clients query a listing's own photo in a loop on two workers, the listing is
  removed; seconds from the `remove` command to the first answer without it, and to the last with it;
- add N photos: `scripts.catalogue add` of N new listings (generated photos, one each), seconds per
  photo for cleaning + normalising, embedding, indexing + publishing, and until the server answers
  from the new generation;
- the check on a lone request: p50 of lone requests, in turns, to a model that follows the live
  folder and to the same archive without it (same server, same worker layout); and the check alone
  in-process (a stat of two files, at most every 0.5 s);
- memory of two generations during a swap: resident memory of a process holding one generation,
  at the peak while the next one loads beside it, and after the old one is released.
"""
import faiss  # noqa: F401  (before torch: OpenMP, see README)

import io
import multiprocessing
import threading
import time
from contextlib import redirect_stdout
from pathlib import Path

import numpy as np
import pandas as pd
import psutil
import requests

from marketplace_search import live
from marketplace_search.layout import CHECKPOINT, sha256_file
from marketplace_search.search import make_catalogue
from scripts import api
from scripts import catalogue as cli
from scripts.archive import build_archive
from scripts.benchmark.common import percentiles_ms
from scripts.benchmark.photos import generate_photos
from scripts.benchmark.startup import wait_workers_ready
from scripts.serve import free_ports, start_server
from training.tiny_run import make_tiny_run

LIVE_COLUMNS = [("measure", "measure"), ("figure", "figure"), ("unit", "unit"), ("detail", "detail")]


def write_listings(data: Path, photos: list[bytes]) -> dict[str, str]:
    """One raw-format listing per photo; returns {product_id: image_id}."""
    (data / "images").mkdir(parents=True)
    products, images = [], []
    for number, photo in enumerate(photos):
        product_id, image_id = f"bench-{number:05d}", f"bench-photo-{number:05d}"
        products.append({"id": product_id, "product_name": f"Bench item {number} | in Leeds, Yorkshire | Gumtree",
                         "category": "Home / Lamps", "product_description": "", "price": "£5.00",
                         "location": "Leeds, Yorkshire"})
        images.append({"id": image_id, "product_id": product_id})
        (data / "images" / f"{image_id}.jpg").write_bytes(photo)
    pd.DataFrame(products).to_csv(data / "Products.csv", lineterminator="\n")
    pd.DataFrame(images).to_csv(data / "Images.csv", lineterminator="\n")
    return {image["product_id"]: image["id"] for image in images}


def quiet(function, *args):
    with redirect_stdout(io.StringIO()):
        return function(*args)


class Loop:
    """Clients querying one photo in a loop; keeps (sent, answered, product ids or None for a failure)."""

    def __init__(self, url: str, headers: dict, photo: bytes, clients: int = 4):
        self.url, self.headers, self.photo = url, {**headers, "X-K": "100"}, photo
        self.outcomes: list[tuple[float, float, set | None]] = []
        self.stopping = threading.Event()
        self.threads = [threading.Thread(target=self.run, daemon=True) for _ in range(clients)]

    def run(self) -> None:
        session = requests.Session()
        while not self.stopping.is_set():
            sent = time.monotonic()
            response = session.post(self.url, data=self.photo, headers=self.headers, timeout=60)
            products = {n["product_id"] for n in response.json()["neighbours"]} if response.ok else None
            self.outcomes.append((sent, time.monotonic(), products))

    def __enter__(self):
        for thread in self.threads:
            thread.start()
        return self

    def __exit__(self, *exc_info):
        self.stopping.set()
        for thread in self.threads:
            thread.join(60)


def remove_effect(server, model: str, live_dir: Path, photos: dict[str, bytes], wait: float = 3.0) -> list[dict]:
    """Per removed product: seconds from `remove` to the first answer sent after it without the product,
    and to the last answer (by answer time) that still held it; failures counted."""
    headers = {"Content-Type": "image/jpeg", **api.auth_headers(server.token("inference"))}
    figures = []
    for product, photo in photos.items():
        with Loop(f"{server.inference_url}/predictions/{model}", headers, photo) as loop:
            time.sleep(1.0)
            removed_at = time.monotonic()
            quiet(cli.main, ["--live", str(live_dir), "remove", product])
            time.sleep(wait)
        fresh = [answered for sent, answered, found in loop.outcomes
                 if found is not None and sent >= removed_at and product not in found]
        stale = [answered for _, answered, found in loop.outcomes if found is not None and product in found]
        figures.append({"first_without_s": min(fresh) - removed_at if fresh else None,
                        "last_with_s": max(max(stale) - removed_at, 0.0) if stale else None,
                        "failed": sum(found is None for *_, found in loop.outcomes), "requests": len(loop.outcomes)})
    return figures


def lone_requests(server, models: list[str], photo: bytes, count: int) -> dict[str, list[float]]:
    """Seconds of lone requests, the models taken in turns so both see the same machine."""
    headers = {"Content-Type": "image/jpeg", **api.auth_headers(server.token("inference"))}
    session = requests.Session()
    seconds = {model: [] for model in models}
    for _ in range(count):
        for model in models:
            started = time.perf_counter()
            response = session.post(f"{server.inference_url}/predictions/{model}", data=photo, headers=headers,
                                    timeout=60)
            seconds[model].append(time.perf_counter() - started)
            response.raise_for_status()
    return seconds


def check_cost(live_dir: Path, bundled, weights: str, calls: int = 20_000) -> dict:
    """Microseconds per follower.current(): every call a stat of both files (interval 0), and as served."""
    figures = {}
    for name, interval in (("stat_every_call_us", 0.0), ("as_served_us", live.CHECK_SECONDS)):
        follower = live.LiveFollower(live_dir, bundled, weights, check_seconds=interval)
        started = time.perf_counter()
        for _ in range(calls):
            follower.current()
        figures[name] = (time.perf_counter() - started) / calls * 1e6
    return figures


def swap_memory(scratch: Path, size: int, dim: int) -> dict:
    """MB resident in a fresh process: holding generation 1 (SIZE vectors), at the peak while generation 2
    loads beside it, and after the swap released generation 1 (each above the process before it loaded)."""
    folder = scratch / f"memory-{size}"
    rng = np.random.default_rng(0)
    vectors = rng.standard_normal((size, dim), dtype=np.float32)
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    image_ids = [f"m{row}" for row in range(size)]
    listings = {image_id: {"product_id": image_id, "title": "t", "price": 1.0, "location": "x", "category": "c"}
                for image_id in image_ids}
    with live.writer_lock(folder):
        for _ in range(2):
            live.write_generation(folder, vectors, image_ids, listings, "w", {}, "flat")
        live.write_json_atomically(folder / live.CURRENT_FILE, {"generation": 1, "name": live.generation_name(1),
                                                                "published": live.now()})
    del vectors, listings
    context = multiprocessing.get_context("spawn")  # a process that never held a catalogue before
    with context.Pool(1) as pool:
        return {"size": size, **pool.apply(measure_swap, (str(folder), dim))}


def measure_swap(folder: str, dim: int) -> dict:
    folder = Path(folder)
    process = psutil.Process()
    vector = np.ones((1, dim), np.float32) / np.sqrt(dim)
    bundled = make_catalogue(vector, ["b"], {"b": {"product_id": "b", "title": "t", "price": 1.0, "location": "x",
                                                   "category": "c"}}, {}, "flat")
    clock = [0.0]
    before = process.memory_info().rss
    follower = live.LiveFollower(folder, bundled, "w", clock=lambda: clock[0])
    holding = process.memory_info().rss
    live.write_json_atomically(folder / live.CURRENT_FILE, {"generation": 2, "name": live.generation_name(2),
                                                            "published": live.now()})
    peak, sampling = [holding], threading.Event()

    def sample():
        while not sampling.is_set():
            peak.append(process.memory_info().rss)
            time.sleep(0.001)

    sampler = threading.Thread(target=sample)
    sampler.start()
    clock[0] = 1.0
    started = time.perf_counter()
    served = follower.current()
    seconds = time.perf_counter() - started
    sampling.set()
    sampler.join()
    if served.generation != 2:
        raise RuntimeError(f"the swap did not happen: still generation {served.generation}")
    mb = 2 ** 20
    return {"one_mb": (holding - before) / mb, "peak_mb": (max(peak) - before) / mb,
            "after_mb": (process.memory_info().rss - before) / mb, "swap_s": seconds}


def bench_live(settings: dict, scratch: Path) -> dict:
    scratch = scratch / "live"
    run_dir = Path(settings["run"]) if settings.get("run") else make_tiny_run(scratch / "run").run_dir
    source = f"run {run_dir}" if settings.get("run") else "a tiny generated model (resnet18, 64 px crop)"
    store, live_dir = scratch / "store", scratch / "catalogue"
    store.mkdir(parents=True)
    common = {"min_workers": 2, "max_workers": 2, "threads": 1}
    following = build_archive(run_dir, store, "live", "1.0", "live", live_catalogue=live_dir, **common)
    build_archive(run_dir, store, "plain", "1.0", "plain", **common)
    quiet(cli.main, ["--live", str(live_dir), "init", "--run", str(run_dir)])
    rows = []
    count = settings["live_add_photos"]
    photos = generate_photos(count, settings["photo_size"], seed=7)
    products = write_listings(scratch / "new", photos)
    ports = dict(zip(("inference_port", "management_port", "metrics_port", "grpc_inference_port",
                      "grpc_management_port"), free_ports(5)))
    server = start_server(store, workdir=scratch / "ts", models={"live": following.name, "plain": "plain.mar"}, **ports)
    try:
        for model in ("live", "plain"):
            wait_workers_ready(server, model, 2, timeout=300)
        probe = photos[0]
        started = time.perf_counter()
        added = quiet(cli.main, ["--live", str(live_dir), "add", "--data", str(scratch / "new"), "--run",
                                 str(run_dir), "--workers", "2"])
        add_seconds = time.perf_counter() - started
        headers = {"Content-Type": "image/jpeg", **api.auth_headers(server.token("inference"))}
        while requests.post(f"{server.inference_url}/predictions/live", data=probe, headers=headers,
                            timeout=60).json()["catalogue"]["generation"] < added["generation"]:
            time.sleep(0.05)
        searchable = time.perf_counter() - started
        parts = added["seconds"]
        rows.append({"measure": f"add {count:,} photos (one listing each, {settings['photo_size'][0]}x"
                                f"{settings['photo_size'][1]} JPEGs)", "figure": add_seconds / count * 1000,
                     "unit": "ms per photo",
                     "detail": f"{add_seconds:.1f} s in all: clean + normalise {parts['clean_s']:.1f} s, embed "
                               f"{parts['embed_s']:.1f} s, index + publish {parts['index_s']:.1f} s; served "
                               f"from the new generation {searchable:.1f} s after the command started"})
        chosen = list(products)[:settings["live_removes"]]
        effects = remove_effect(server, "live", live_dir, {product: photos[int(product.split("-")[1])]
                                                         for product in chosen})
        first = [effect["first_without_s"] for effect in effects if effect["first_without_s"] is not None]
        last = [effect["last_with_s"] for effect in effects if effect["last_with_s"] is not None]
        rows.append({"measure": "remove → first answer without it", "figure": float(np.median(first)), "unit": "s (median)",
                     "detail": f"max {max(first):.2f} s over {len(effects)} removals; 4 clients, 2 workers"})
        rows.append({"measure": "remove → last answer still with it", "figure": float(np.median(last)),
                     "unit": "s (median)", "detail": f"max {max(last):.2f} s; failed requests: "
                                                     f"{sum(e['failed'] for e in effects)} of "
                                                     f"{sum(e['requests'] for e in effects)}"})
        lone = lone_requests(server, ["plain", "live"], probe, settings["live_lone_requests"])
        plain_p50, live_p50 = percentiles_ms(lone["plain"])["p50_ms"], percentiles_ms(lone["live"])["p50_ms"]
        rows.append({"measure": "lone request p50, following the live folder ÷ not", "figure": live_p50 / plain_p50,
                     "unit": "×", "detail": f"{live_p50:.2f} ms vs {plain_p50:.2f} ms, {len(lone['live'])} "
                                            f"requests each, in turns"})
    finally:
        server.stop()
    catalogue = live.load_generation(live_dir).catalogue
    cost = check_cost(live_dir, catalogue, sha256_file(run_dir / CHECKPOINT))
    rows.append({"measure": "the check alone, in-process", "figure": cost["as_served_us"], "unit": "µs per batch",
                 "detail": f"{cost['stat_every_call_us']:.1f} µs when it stats both files (at most every "
                           f"{live.CHECK_SECONDS} s)"})
    for size in settings["live_memory_sizes"]:
        memory = swap_memory(scratch, size, settings["dim"])
        rows.append({"measure": f"memory of a swap, {size:,} × {settings['dim']}-d vectors (flat)",
                     "figure": memory["peak_mb"], "unit": "MB at the peak",
                     "detail": f"one generation {memory['one_mb']:.0f} MB, after the swap {memory['after_mb']:.0f} "
                               f"MB; the swap (load + verify) took {memory['swap_s']:.2f} s"})
    return {"rows": rows, "columns": LIVE_COLUMNS, "models": {"live": source},
            "legend": "Two workers × 1 thread per model on one TorchServe. The removal list applies on a worker's "
                      "next batch (checked at most every 0.5 s); a new generation is loaded whole by a thread of each "
                      "worker beside its batches, then swapped in (the swap's seconds are that load, measured "
                      "in-process). Memory: resident memory above the process's before "
                      "the first generation was loaded."}
