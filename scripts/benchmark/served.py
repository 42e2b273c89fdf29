"""Served section: TorchServe serving the bare section's weights at concurrency 1/8/32, against the bare forward and
the worker's own (its stage counters, which no other process's speed skews); queue, READY seconds, memory."""
import copy
import itertools
import re
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from scripts import api
from scripts.archive import MAX_BATCH_DELAY
from scripts.benchmark.bare import Subject
from scripts.benchmark.common import NUM_CLASSES, bench_run, percentiles_ms, served_archive, worker_memory

NAME = "bench"
LEVEL_ROUNDS = 8  # requests per client at least, so the ramp-up's partly filled batches stay a small share
BATCH_TOLERANCE = 0.1  # a served mean batch within 10% of a bare batch size counts as that size
RATIO, EXTRA_MS = 0.9, 10.0
TARGETS = [(f"served photos/s ≥ {RATIO} × bare forward at the same batch size", "served_vs_bare", RATIO),
           (f"forward share under load ≥ {RATIO}", "forward_share", RATIO),
           (f"single-request p50 ≤ bare batch-1 forward + {EXTRA_MS:g} ms", "p50_over_bare_ms", -EXTRA_MS),
           (f"single-request p50 ≤ the worker's forward + {EXTRA_MS:g} ms", "p50_over_forward_ms", -EXTRA_MS)]
SAMPLE = re.compile(r'(?P<name>\w+)\{(?P<labels>[^}]*)\}\s+(?P<value>\S+)')
LABEL = re.compile(r'(\w+)="([^"]*)"')
FRONTEND = {"ts_inference_requests_total": "requests", "ts_inference_latency_microseconds": "backend_ms",
            "ts_queue_latency_microseconds": "queue_ms"}
SERVED_COLUMNS = [
    ("backend", "backend"), ("batching", "dynamic batching"), ("concurrency", "concurrency"), ("requests", "requests"),
    ("errors", "errors"), ("photos_per_s", "photos/s"), ("p50_ms", "p50 ms"), ("p95_ms", "p95 ms"), ("p99_ms", "p99"),
    ("backend_ms", "worker ms/request"), ("queue_ms", "queue ms/request"), ("mean_batch", "mean batch"),
    *((f"{stage}_ms", f"{stage} ms/batch") for stage in ("decode", "forward", "search", "answer")),
    ("forward_share", "forward share"), ("bare_batch", "bare batch"), ("served_vs_bare", "÷ bare forward"),
    ("p50_over_bare_ms", "p50 − bare ms"), ("p50_over_forward_ms", "p50 − worker forward ms"), ("ready_s", "READY s"),
    ("uss_ready_mb", "worker USS MB at READY"), ("uss_after_mb", "after load"), ("note", "note")]


def steady_rate(ends: list[float], concurrency: int) -> float | None:
    """Answers per second once every client has had its first answer (the ramp-up left out); None when too few."""
    ends = sorted(ends)
    window = ends[-1] - ends[concurrency - 1] if len(ends) > concurrency else 0
    return (len(ends) - concurrency) / window if window > 0 else None


def load_test(url: str, photos: list[bytes], concurrency: int, total: int, max_seconds: float = float("inf"),
              token: str | None = None) -> dict:
    """Up to TOTAL photos from CONCURRENCY clients, one request in flight each; an overload is counted, not retried."""
    uploads = [(photo, api.prediction_headers(photo, token)) for photo in photos]
    numbers, results, stop = itertools.count(), [], threading.Event()
    together = threading.Barrier(concurrency)  # the first batch is then as full as the ones after it
    started = time.perf_counter()

    def client() -> None:
        together.wait()
        while (not stop.is_set() and (number := next(numbers)) < total
               and time.perf_counter() < started + max_seconds):
            start, (photo, headers) = time.perf_counter(), uploads[number % len(uploads)]
            try:
                response = api.post_photo(url, photo, headers, timeout=120)
                failure = None if response.ok else f"HTTP {response.status_code} {api.error_text(response)}"
            except api.TransientError as error:
                failure = str(error)
            results.append((start, time.perf_counter(), failure))
        api.session().close()

    with ThreadPoolExecutor(max_workers=concurrency) as pool:
        futures = [pool.submit(client) for _ in range(concurrency)]
        try:
            for future in futures:
                future.result()
        finally:
            stop.set()
            together.abort()
    answered = [(start, end) for start, end, failure in results if failure is None]
    failures = [failure for _, _, failure in results if failure is not None]
    if not answered:
        raise RuntimeError(f"all {len(results)} requests to {url} failed; first: {failures[0][:200]}")
    return {"concurrency": concurrency, "requests": len(results), "errors": len(failures),
            "photos_per_s": steady_rate([end for _, end in answered], concurrency)
            or len(answered) / (time.perf_counter() - started),
            **percentiles_ms([end - start for start, end in answered]),
            **({"note": f"first error: {failures[0][:80]}"} if failures else {})}


def read_counters(text: str) -> dict:
    """The handler's batches and stage ms by batch size, and TorchServe's counters of NAME, from a Prometheus page."""
    from handlers.marketplace_handler import BATCH_METRIC, STAGE_METRIC  # it imports TorchServe: only here

    counters: dict = {"batches": {}, "frontend": dict.fromkeys(FRONTEND.values(), 0.0)}
    for match in SAMPLE.finditer(text):
        name, labels, value = match["name"], dict(LABEL.findall(match["labels"])), float(match["value"])
        if name in (BATCH_METRIC, STAGE_METRIC):
            sizes = counters.setdefault("batches" if name == BATCH_METRIC else labels["Stage"], {})
            sizes[int(labels["BatchSize"])] = sizes.get(int(labels["BatchSize"]), 0.0) + value
        elif name in FRONTEND and labels.get("model_name") == NAME:
            counters["frontend"][FRONTEND[name]] += value
    return counters


def server_figures(before: dict, after: dict) -> dict:
    """Between two readings: mean batch, ms per batch of each handler stage, worker and queue ms per request."""
    batches = {size: count - before["batches"].get(size, 0.0) for size, count in after["batches"].items()}
    count, served = sum(batches.values()), after["frontend"]["requests"] - before["frontend"]["requests"]
    figures = {"mean_batch": sum(size * number for size, number in batches.items()) / count if count else None}
    for stage in set(after) - {"batches", "frontend"} if count else ():
        figures[f"{stage}_ms"] = sum(ms - before.get(stage, {}).get(size, 0.0)
                                     for size, ms in after[stage].items()) / count
    for key in ("backend_ms", "queue_ms") if served > 0 else ():
        figures[key] = (after["frontend"][key] - before["frontend"][key]) / served / 1000
    return figures


def compare_with_bare(row: dict, rates: dict[int, float]) -> None:
    """Add the forward share, photos/s over the bare forward's at the batch size matching the mean batch (RATES:
    photos/s by batch size), and a lone request's p50 over the bare batch-1 forward and over the worker's own."""
    mean = row.get("mean_batch")
    if mean and row.get("forward_ms"):
        row["forward_share"] = row["photos_per_s"] * row["forward_ms"] / mean / 1000
        if row["concurrency"] == 1:
            row["p50_over_forward_ms"] = row["p50_ms"] - row["forward_ms"]
    matched = [batch for batch in rates if mean is not None and abs(mean - batch) <= BATCH_TOLERANCE * batch]
    if matched:
        row.update(bare_batch=matched[0], served_vs_bare=row["photos_per_s"] / rates[matched[0]])
        if row["concurrency"] == 1 and matched[0] == 1:
            row["p50_over_bare_ms"] = row["p50_ms"] - 1000 / rates[1]


def verdicts(rows: list[dict]) -> list[str]:
    """A PASS/FAIL line per target (a negative threshold: at most its size), naming the best row."""
    lines = []
    for says, key, threshold in TARGETS:
        # a lone request's forward share does not count: the worker waits for each request
        candidates = [row for row in rows
                      if row.get(key) is not None and (key != "forward_share" or row["concurrency"] > 1)]
        if candidates:
            sign = 1 if threshold > 0 else -1
            best = max(candidates, key=lambda row: sign * row[key])
            figure = f"{best[key]:.3f}" if threshold > 0 else f"{best[key]:+.1f} ms"
            lines.append(f"Target: {says}: {'PASS' if sign * best[key] >= threshold else 'FAIL'}, best {figure} "
                         f"({best['backend']}, batching {best['batching']}, concurrency {best['concurrency']}).")
    return lines


def bench_served(subject: Subject, photos: list[bytes], settings: dict, bare_rows: list[dict]) -> dict:
    rates: dict[str, dict[int, float]] = {}
    for row in bare_rows:
        if "backend" in row:
            rates.setdefault(row["backend"], {})[row["batch"]] = row["photos_per_s"]
    rows = []
    with tempfile.TemporaryDirectory(prefix="benchmark-served-") as scratch:
        scratch = Path(scratch)
        run_dir = bench_run(settings, scratch, model=copy.deepcopy(subject.model), preprocess=subject.preprocess,
                            classes=[f"category {number}" for number in range(NUM_CLASSES)])
        for backend, batch_size in settings["served"]:
            runtime, precision = backend.split()
            with served_archive(run_dir, scratch, NAME, batch_size=batch_size, runtime=runtime,
                                precision=precision) as (server, ready):
                runs = api.worker_serves(server, NAME)["backend"]  # on a CPU without bf16 units, fp32
                config = {"backend": backend if runs == backend else f"{backend} (runs {runs} here)",
                          "batching": f"{batch_size} / {MAX_BATCH_DELAY} ms" if batch_size > 1 else "off"}
                print(f"served: {config} READY in {ready:.1f} s", flush=True)
                config.update(ready_s=ready, uss_ready_mb=worker_memory(server)["uss_mb"])
                url, token = api.prediction_url(server, NAME), server.token("inference")
                # The Java frontend compiles its request path over the first few hundred requests: not measured.
                load_test(url, photos, batch_size, max(2 * batch_size, settings["warm_up_requests"]),
                          settings["max_load_seconds"], token)
                for concurrency in settings["concurrency"]:
                    before = read_counters(api.metrics_text(server))
                    total = max(settings["requests"], LEVEL_ROUNDS * concurrency)
                    figures = load_test(url, photos, concurrency, total, settings["max_load_seconds"], token)
                    rows.append({**config, **figures,
                                 **server_figures(before, read_counters(api.metrics_text(server)))})
                memory = worker_memory(server)["uss_mb"]
            for row in rows[-len(settings["concurrency"]):]:
                row["uss_after_mb"] = memory
                compare_with_bare(row, rates.get(runs, {}))
    lines = verdicts(rows)
    legend = (f"One worker with every core, {len(photos)} JPEGs from client threads after up to "
              f"{settings['warm_up_requests']} unmeasured requests, at least {LEVEL_ROUNDS} per client and level for "
              f"at most {settings['max_load_seconds']:g} s; photos/s after each client's first answer. Forward share "
              f"and p50 − worker forward compare the worker with itself: read those first.")
    return {"rows": rows, "columns": SERVED_COLUMNS, "verdict": lines, "legend": "\n".join([legend, *lines]),
            "models": {subject.name: subject.source}}
