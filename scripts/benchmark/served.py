"""Served section: TorchServe with real JPEGs at several client concurrencies, dynamic batching on and
off, one worker with every core or a worker per core, against the bare model (same weights).

Besides the client's view (photos/s, latency), each level reads the server's own counters before and
after: the handler's batches and per-stage milliseconds (decode, forward, search, answer), TorchServe's
worker and queue time, and the CPU time of the frontend and the workers, so a reader sees where a
served request's time goes. Figures and their reading: README, "Benchmarks".
"""
import argparse
import copy
import itertools
import os
import re
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator, NamedTuple

import psutil

from scripts import api
from scripts.archive import build_archive
from scripts.benchmark.common import NUM_CLASSES, percentiles_ms
from scripts.benchmark.startup import memory_after_load, served_model, startup_section
from scripts.benchmark.subjects import Subject

SERVED_NAME = "bench"
BATCHED = 8  # the batch size of the "batching on" configurations
LEVEL_ROUNDS = 8  # each level sends at least this many requests per client: ramp-up batches stay a small share
# Generous: a large model working through a full queue of batches on a few cores answers its last
# request late, and a request that timed out would measure the timeout, not the server.
REQUEST_TIMEOUT = 120
BATCH_TOLERANCE = 0.1  # a served mean batch within 10% of a bare batch size counts as that size
# Targets from the brief.
TARGET_SERVED_RATIO = 0.9
TARGET_EXTRA_MS = 10.0
TARGET_BACKEND_RATIO = 2.0  # issue 15: the archive's default backend against today's torch fp32
FRONTEND_COUNTERS = ("ts_inference_requests_total", "ts_inference_latency_microseconds",
                     "ts_queue_latency_microseconds")
SAMPLE = re.compile(r'(?P<name>\w+)\{(?P<labels>[^}]*)\}\s+(?P<value>\S+)')
LABEL = re.compile(r'(\w+)="([^"]*)"')


# ---------------------------------------------------------------- the client's view

def timed_post(url: str, photo: bytes, headers: dict) -> tuple[float, float, str | None]:
    """Start and end (perf_counter seconds) of one prediction, and what went wrong (None: HTTP 200)."""
    start = time.perf_counter()
    try:
        response = api.post_photo(url, photo, headers, timeout=REQUEST_TIMEOUT)
    except api.TransientError as error:  # overload, timeout, dropped connection: a failed request to count
        return start, time.perf_counter(), str(error)
    failure = None if response.status_code == 200 else f"HTTP {response.status_code} {api.error_text(response)}"
    return start, time.perf_counter(), failure


def steady_rate(ends: list[float], concurrency: int) -> float | None:
    """Answers per second once every client has had its first answer: the answers after the first
    `concurrency` over the time from that one to the last (start-up and the first, partly filled
    batches left out). None when there are too few answers to tell."""
    ends = sorted(ends)
    if len(ends) <= concurrency:
        return None
    window = ends[-1] - ends[concurrency - 1]
    return (len(ends) - concurrency) / window if window > 0 else None


def load_test(url: str, photos: list[bytes], concurrency: int, total: int,
              max_seconds: float | None = None, token: str | None = None) -> dict:
    """Send up to `total` photos from `concurrency` client threads, each with a keep-alive session
    and one request in flight; no new request starts after `max_seconds` (those in flight finish).

    Photos/s is the steady rate (steady_rate) of answered (HTTP 200) photos; latency percentiles
    count every answer; client CPU is this process's CPU time (all its threads) per request.
    """
    uploads = [(photo, api.prediction_headers(photo, token)) for photo in photos]
    numbers = itertools.count()  # next() on it is atomic under the GIL
    results: list[tuple[float, float, str | None]] = []
    # Every client sends its first request at once: the server's first batch is then as full as the
    # ones after it, instead of taking whichever one thread started first.
    together = threading.Barrier(concurrency)
    started, cpu_started = time.perf_counter(), time.process_time()
    deadline = started + max_seconds if max_seconds is not None else None

    def client() -> None:
        together.wait()
        try:
            while True:
                number = next(numbers)
                if number >= total or (deadline is not None and time.perf_counter() > deadline):
                    return
                results.append(timed_post(url, *uploads[number % len(uploads)]))
        finally:
            api.session().close()  # this thread's keep-alive connections: the thread ends with the level

    with ThreadPoolExecutor(max_workers=concurrency) as pool:
        for future in [pool.submit(client) for _ in range(concurrency)]:
            future.result()
    wall, cpu = time.perf_counter() - started, time.process_time() - cpu_started
    answered = [(start, end) for start, end, failure in results if failure is None]
    failures = [failure for _, _, failure in results if failure is not None]
    if not answered:
        raise RuntimeError(f"all {len(results)} requests to {url} failed; first: {failures[0][:200]}")
    rate = steady_rate([end for _, end in answered], concurrency)
    figures = {"concurrency": concurrency, "requests": len(results), "errors": len(failures),
               "photos_per_s": rate if rate is not None else len(answered) / wall, "wall_s": wall,
               "client_cpu_ms": cpu * 1000 / len(results), **percentiles_ms([end - start for start, end in answered])}
    if failures:
        figures["note"] = f"first error: {failures[0][:80]}"
    return figures


# ---------------------------------------------------------------- the server's view

def metric_samples(text: str) -> Iterator[tuple[str, dict[str, str], float]]:
    """`(name, labels, value)` of each labelled sample of a Prometheus text page."""
    for line in text.splitlines():
        match = SAMPLE.match(line)
        if match:
            yield match["name"], dict(LABEL.findall(match["labels"])), float(match["value"])


def handler_counters(text: str) -> dict[str, dict[int, float]]:
    """The handler's counters so far by batch size: {"batches": {size: count}, STAGE: {size: ms}} for
    each stage it reports (decode, forward, search, answer), summed over the batches."""
    # The handler module imports TorchServe's `ts`: only when serving.
    from handlers.marketplace_handler import BATCH_METRIC, STAGE_METRIC

    counters: dict[str, dict[int, float]] = {"batches": {}}
    for name, labels, value in metric_samples(text):
        if name not in (BATCH_METRIC, STAGE_METRIC):
            continue
        sizes = counters.setdefault("batches" if name == BATCH_METRIC else labels["Stage"], {})
        size = int(labels["BatchSize"])
        sizes[size] = sizes.get(size, 0.0) + value
    return counters


def frontend_counters(text: str, model: str = SERVED_NAME) -> dict[str, float]:
    """TorchServe's own cumulative request count and inference/queue time for `model` (all versions)."""
    totals = dict.fromkeys(FRONTEND_COUNTERS, 0.0)
    for name, labels, value in metric_samples(text):
        if name in totals and labels.get("model_name") == model:
            totals[name] += value
    return totals


def server_cpu_seconds(server) -> dict[str, float]:
    """CPU seconds (user + system) so far of the Java frontend and of all its Python workers."""
    frontend = psutil.Process(server.pid)

    def seconds(process: psutil.Process) -> float:
        times = process.cpu_times()
        return times.user + times.system

    return {"frontend": seconds(frontend),
            "workers": sum(seconds(worker) for worker in frontend.children(recursive=True))}


def read_server(server) -> dict:
    """One reading of the server's counters (one metrics page) and CPU times."""
    text = api.metrics_text(server)
    return {"handler": handler_counters(text), "frontend": frontend_counters(text), "cpu": server_cpu_seconds(server)}


def batch_figures(before: dict[str, dict[int, float]], after: dict[str, dict[int, float]]) -> dict:
    """Mean batch size and mean ms per batch of each handler stage (`forward_ms`, ...) between two readings."""
    def delta(key: str) -> float:
        return sum(value - before.get(key, {}).get(size, 0.0) for size, value in after.get(key, {}).items())

    batches = {size: count - before["batches"].get(size, 0.0) for size, count in after["batches"].items()}
    count = sum(batches.values())
    if not count:
        return {"mean_batch": None}
    return {"mean_batch": sum(size * number for size, number in batches.items()) / count,
            **{f"{stage}_ms": delta(stage) / count for stage in after if stage != "batches"}}


def backend_times(before: dict[str, float], after: dict[str, float]) -> dict:
    """Mean ms per request between the two readings: in the worker (TorchServe's inference latency:
    from the frontend handing the batch to the worker to its answer) and waiting in the queue."""
    served = after["ts_inference_requests_total"] - before["ts_inference_requests_total"]
    if served <= 0:
        return {}
    return {name: (after[counter] - before[counter]) / served / 1000
            for name, counter in (("backend_ms", "ts_inference_latency_microseconds"),
                                  ("queue_ms", "ts_queue_latency_microseconds"))}


def cpu_figures(before: dict[str, float], after: dict[str, float], figures: dict) -> dict:
    """Server CPU ms per request between two readings, and the cores the server and client kept busy."""
    requests_sent = figures["requests"]
    frontend, workers = (after[name] - before[name] for name in ("frontend", "workers"))
    client = figures["client_cpu_ms"] * requests_sent / 1000
    return {"frontend_cpu_ms": frontend * 1000 / requests_sent, "worker_cpu_ms": workers * 1000 / requests_sent,
            "cores_busy": (frontend + workers + client) / figures["wall_s"]}


def server_figures(before: dict, after: dict, figures: dict) -> dict:
    """What the server did between two `read_server` readings around a level with client `figures`."""
    return {**batch_figures(before["handler"], after["handler"]),
            **backend_times(before["frontend"], after["frontend"]),
            **cpu_figures(before["cpu"], after["cpu"], figures)}


# ---------------------------------------------------------------- serving configurations

@dataclass(frozen=True)
class ServeConfig:
    """One way of serving: dynamic batching on or off, workers, each worker's torch threads, and the
    inference backend ("RUNTIME PRECISION", scripts.archive --runtime/--precision)."""

    batch_size: int
    max_batch_delay: int
    workers: int
    threads: int  # 0: the handler's default, cores / workers
    backend: str = "torch fp32"

    @property
    def labels(self) -> dict:
        batching = f"on ({self.batch_size}, {self.max_batch_delay} ms)" if self.batch_size > 1 else "off (1)"
        threads = self.threads or max(1, (os.cpu_count() or 1) // self.workers)
        default = "" if self.threads else " (default)"
        return {"backend": self.backend, "batching": batching, "worker_threads": f"{self.workers} × {threads}{default}"}

    def archive_name(self, model: str) -> str:
        return (re.sub(r"[^A-Za-z0-9_.-]+", "-", model).strip("-") + f"-{self.backend.replace(' ', '-')}"
                + f"-batch{self.batch_size}-workers{self.workers}-threads{self.threads}")


def parse_workers(text: str) -> tuple[int, int]:
    """"WORKERSxTHREADS" (e.g. 2x1; threads 0 = the handler's default) as a pair of ints."""
    workers, separator, threads = text.lower().partition("x")
    try:
        layout = int(workers), int(threads) if separator else 0
    except ValueError:
        layout = (0, 0)
    if layout[0] < 1 or layout[1] < 0:
        raise argparse.ArgumentTypeError(f"workers {text!r}: expected WORKERSxTHREADS like 1x0 or 2x1")
    return layout


def serve_configs(settings: dict) -> list[ServeConfig]:
    return [ServeConfig(batch, delay if batch > 1 else 0, workers, threads, backend)
            for backend in settings.get("served_backends", ["torch fp32"])
            for workers, threads in map(parse_workers, settings["workers"])
            for batch, delay in ((settings["batch_size"], settings["max_batch_delay"]), (1, 0))]


def serving_runs(subjects: list[Subject], settings: dict, scratch: Path) -> list[tuple[str, Path]]:
    """`(model name, RUN folder)` to serve: the --run, and a run folder holding each fresh model of
    the bare section (same weights, so served and bare figures compare the same network)."""
    runs = [(subject.name, Path(settings["run"])) for subject in subjects if subject.trained]
    fresh = [subject for subject in subjects if not subject.trained]
    if fresh:
        from training.tiny_run import make_tiny_run
    for subject in fresh:
        # The real preprocessing and embedding size, so a request costs what it would in production;
        # the catalogue is a dozen photos (index search at scale is the index section's job).
        classes = [f"category {number}" for number in range(NUM_CLASSES)]
        tiny = make_tiny_run(scratch / subject.name / "run", model=copy.deepcopy(subject.model), classes=classes,
                             preprocess=subject.preprocess)
        runs.append((subject.name, tiny.run_dir))
    return runs


def build_archives(model: str, run_dir: Path, store: Path, configs: list[ServeConfig]) -> dict[ServeConfig, Path]:
    """An archive per configuration; the accuracy of a backend is the bare section's business (no guard here)."""
    store.mkdir(parents=True, exist_ok=True)
    return {config: build_archive(run_dir, store, SERVED_NAME, "1.0", config.archive_name(model),
                                  batch_size=config.batch_size, max_batch_delay=config.max_batch_delay,
                                  min_workers=config.workers, max_workers=config.workers, threads=config.threads,
                                  runtime=config.backend.split()[0], precision=config.backend.split()[1], guard=False)
            for config in configs}


# ---------------------------------------------------------------- against the bare section

def bare_rates(bare_rows: list[dict]) -> dict[tuple[str, int | str], float]:
    """Baseline forward photos/s per (model, batch), and decode photos/s per model, from the bare section."""
    rates = {}
    for row in bare_rows:
        if row["variant"] == "baseline":
            rates[row["model"], row["batch"]] = row["photos_per_s"]
        elif row["variant"].startswith("backend "):  # scripts.benchmark.backends: per backend, as `MODEL|BACKEND`
            rates[f"{row['model']}|{row['variant'][len('backend '):]}", row["batch"]] = row["photos_per_s"]
        elif row["variant"].startswith("decode"):  # the first decode row: at the baseline's threads
            rates.setdefault((row["model"], "decode"), row["photos_per_s"])
    for name, _ in list(rates):
        if "|" in name and (name.split("|")[0], "decode") in rates:
            rates[name, "decode"] = rates[name.split("|")[0], "decode"]
    return rates


def bare_key(model: str, backend: str, rates: dict) -> str:
    """The bare rows a served backend compares with: its own backend row, else (torch fp32) the baseline."""
    own = f"{model}|{backend}"
    return own if any(name == own for name, _ in rates) else model


def compare_with_bare(row: dict, model: str, rates: dict) -> None:
    """Served photos/s over the bare figures at the batch size the worker actually ran.

    Only when the mean batch served is within BATCH_TOLERANCE of a batch size the bare section
    measured (at concurrency 1 a worker batching up to 8 still runs batches of 1); `bare_batch`
    names it. A mean batch between the measured sizes (e.g. 4 at concurrency 8) gets no ratio.
    Single requests also get p50 minus the bare batch-1 forward, and minus the worker's own
    forward pass (what serving adds, whatever the speed of the worker's process).
    """
    mean = row.get("mean_batch")
    if row.get("concurrency") == 1 and row.get("forward_ms") is not None:
        row["p50_over_forward_ms"] = row["p50_ms"] - row["forward_ms"]
    matched = [batch for name, batch in rates if name == model and batch != "decode"
               and mean is not None and abs(mean - batch) <= BATCH_TOLERANCE * batch]
    if not matched:
        return
    batch = matched[0]
    forward, decode = rates[model, batch], rates.get((model, "decode"))
    row.update(bare_batch=batch, served_vs_bare=row["photos_per_s"] / forward)
    if decode:
        row["served_vs_pipeline"] = row["photos_per_s"] * (1 / forward + 1 / decode)
    if row.get("concurrency") == 1 and batch == 1:
        row["p50_over_bare_ms"] = row["p50_ms"] - 1000 / forward


def forward_share(row: dict, workers: int) -> dict:
    """The share of each worker's time spent in forward passes: 1.0 would mean serving costs the
    worker nothing beyond the model itself (decode, socket, answer and idle time all count against it)."""
    if not row.get("forward_ms") or not row.get("mean_batch"):
        return {}
    return {"forward_share": row["photos_per_s"] * row["forward_ms"] / row["mean_batch"] / 1000 / workers}


def configuration(row: dict, with_concurrency: bool = True) -> str:
    """How a row was served, for a verdict line."""
    text = f"{row.get('backend', 'torch fp32')}, batching {row['batching']}, {row['worker_threads']}"
    return text + (f", concurrency {row['concurrency']}" if with_concurrency else "")


def single_request_details(row: dict) -> str:
    own_forward = (f", {row['p50_over_forward_ms']:+.1f} ms over the worker's own forward pass of "
                   f"{row['forward_ms']:.1f} ms (bare: {row['p50_ms'] - row['p50_over_bare_ms']:.1f} ms)"
                   if "p50_over_forward_ms" in row else "")
    return f"p50 {row['p50_ms']:.1f} ms{own_forward}; {configuration(row, with_concurrency=False)}"


class ServedTarget(NamedTuple):
    """A serving target: the best row's `key` (highest or lowest) against `threshold`."""

    says: str  # what the verdict line says after "Target MODEL"
    key: str
    threshold: float
    higher_is_better: bool
    details: Callable[[dict], str]  # how the best row was served
    counts: Callable[[dict], bool] = lambda row: True  # which rows compete


SERVED_TARGETS = [
    ServedTarget(f": served photos/s ≥ {TARGET_SERVED_RATIO} × bare forward at the same batch size",
                 "served_vs_bare", TARGET_SERVED_RATIO, True,
                 lambda row: f"{configuration(row)}, mean batch {row['mean_batch']:.1f} vs bare {row['bare_batch']}"),
    # At concurrency 1 a worker waits for each request by nature: only loaded levels count.
    ServedTarget(", against the workers' own forward passes (forward share)", "forward_share", TARGET_SERVED_RATIO,
                 True, configuration, counts=lambda row: row["concurrency"] > 1),
    ServedTarget(f": single-request p50 ≤ bare batch-1 forward + {TARGET_EXTRA_MS:g} ms", "p50_over_bare_ms",
                 TARGET_EXTRA_MS, False, single_request_details),
    ServedTarget(", against the worker's own forward pass (p50 − worker forward)", "p50_over_forward_ms",
                 TARGET_EXTRA_MS, False, lambda row: configuration(row, with_concurrency=False)),
]


def target_verdict(target: ServedTarget, model: str, rows: list[dict]) -> str | None:
    """PASS/FAIL line for one target over one model's rows, naming the best configuration; None when no row has it."""
    candidates = [row for row in rows if target.key in row and target.counts(row)]
    if not candidates:
        return None
    best = (max if target.higher_is_better else min)(candidates, key=lambda row: row[target.key])
    value = best[target.key]
    met = value >= target.threshold if target.higher_is_better else value <= target.threshold
    figure = f"{value:.3f}" if target.higher_is_better else f"{value:+.1f} ms"
    return f"Target {model}{target.says}: {'PASS' if met else 'FAIL'}, best {figure} ({target.details(best)})."


def served_verdicts(rows: list[dict]) -> list[str]:
    """PASS/FAIL lines for the serving targets, per model: the best configuration for each."""
    lines = []
    for model in dict.fromkeys(row["model"] for row in rows):
        own = [row for row in rows if row["model"] == model]
        lines += [line for target in SERVED_TARGETS if (line := target_verdict(target, model, own))]
        lines += backend_verdicts(model, own)
    return lines


def backend_verdicts(model: str, rows: list[dict], reference: str = "torch fp32") -> list[str]:
    """Each other backend against `reference` (today's default) with the same batching and workers:
    photos/s at the highest concurrency (target ≥ TARGET_BACKEND_RATIO ×) and single-request p50 (lower)."""
    lines = []
    top = max((row["concurrency"] for row in rows), default=None)
    for row in rows:
        if row.get("backend", reference) == reference or row["concurrency"] not in (1, top):
            continue
        same = [other for other in rows if other.get("backend", reference) == reference
                and (other["batching"], other["worker_threads"], other["concurrency"]) ==
                (row["batching"], row["worker_threads"], row["concurrency"])]
        if not same:
            continue
        if row["concurrency"] == top:
            ratio = row["photos_per_s"] / same[0]["photos_per_s"]
            lines.append(f"Target {model}: {row['backend']} photos/s ≥ {TARGET_BACKEND_RATIO:g} × {reference} at "
                         f"concurrency {top}: {'PASS' if ratio >= TARGET_BACKEND_RATIO else 'FAIL'}, {ratio:.2f} × "
                         f"({row['photos_per_s']:.1f} vs {same[0]['photos_per_s']:.1f}; {configuration(row)}).")
        if row["concurrency"] == 1:
            lower = row["p50_ms"] < same[0]["p50_ms"]
            lines.append(f"Target {model}: {row['backend']} single-request p50 below {reference}'s: "
                         f"{'PASS' if lower else 'FAIL'}, {row['p50_ms']:.1f} vs {same[0]['p50_ms']:.1f} ms "
                         f"({configuration(row, with_concurrency=False)}).")
    return lines


# ---------------------------------------------------------------- the section

def load_level(server, url: str, photos: list[bytes], concurrency: int, settings: dict) -> dict:
    """One concurrency level: client figures, and the server's own counters and CPU over it."""
    before = read_server(server)
    figures = load_test(url, photos, concurrency, max(settings["requests"], LEVEL_ROUNDS * concurrency),
                        max_seconds=settings["max_load_seconds"], token=server.token("inference"))
    return {**figures, **server_figures(before, read_server(server), figures)}


def bench_served_model(model: str, archives: dict[ServeConfig, Path], photos: list[bytes], settings: dict,
                       scratch: Path, rates: dict, with_load: bool) -> tuple[list[dict], list[dict]]:
    """(served rows, startup rows) for one model: one server start per serving configuration."""
    served_rows, startup_rows = [], []
    for config, mar in archives.items():
        label = {"model": model, **config.labels}
        # A short folder name: the worker's Unix socket lives under it (AF_UNIX paths stop at 107 bytes).
        workdir = Path(tempfile.mkdtemp(prefix="server-", dir=scratch))
        with served_model(mar.parent, mar, SERVED_NAME, workdir, workers=config.workers) as (server, startup):
            print(f"served: {model} {config.labels} READY in {startup['ready_s']:.1f} s", flush=True)
            if with_load:
                url = api.prediction_url(server, SERVED_NAME)
                # Warm-up: the first batch of a size allocates, in every worker, and the Java frontend
                # compiles its request path over the first few hundred requests, which answer
                # slower than the rest (README, "Benchmarks").
                warm = config.batch_size * config.workers
                load_test(url, photos, concurrency=warm, total=max(2 * warm, settings.get("warm_up_requests", 0)),
                          token=server.token("inference"))
                for concurrency in settings["concurrency"]:
                    row = {**label, **load_level(server, url, photos, concurrency, settings)}
                    row.update(forward_share(row, config.workers))
                    compare_with_bare(row, bare_key(model, config.backend, rates), rates)
                    served_rows.append(row)
                startup.update(memory_after_load(server))
            startup_rows.append({**label, **startup})
    return served_rows, startup_rows


SERVED_COLUMNS = [("model", "model"), ("backend", "backend"), ("batching", "dynamic batching"), ("worker_threads", "worker threads"),
                  ("concurrency", "concurrency"),
                  ("requests", "requests"), ("errors", "errors"), ("photos_per_s", "photos/s"),
                  ("p50_ms", "p50 ms"), ("p95_ms", "p95 ms"), ("p99_ms", "p99 ms"),
                  ("backend_ms", "worker ms/request"), ("queue_ms", "queue ms/request"), ("mean_batch", "mean batch"),
                  ("decode_ms", "decode ms/batch"), ("forward_ms", "forward ms/batch"),
                  ("search_ms", "search ms/batch"), ("answer_ms", "answer ms/batch"),
                  ("forward_share", "forward share"), ("bare_batch", "bare batch"),
                  ("served_vs_bare", "÷ bare forward"),
                  ("served_vs_pipeline", "÷ bare decode+forward"), ("p50_over_bare_ms", "p50 − bare ms"),
                  ("p50_over_forward_ms", "p50 − worker forward ms"), ("client_cpu_ms", "client CPU ms/request"),
                  ("frontend_cpu_ms", "frontend CPU ms/request"), ("worker_cpu_ms", "worker CPU ms/request"),
                  ("cores_busy", "cores busy"), ("note", "note")]


def served_legend(photos: list[bytes], settings: dict) -> str:
    return (
        f"TorchServe serving the bare section's models (same weights; fresh models in a run folder with a "
        f"12-photo flat catalogue: index search at scale is the index section's job); {len(photos)} JPEGs sent as "
        f"raw image bodies by `requests` client threads (scripts.api) on the same machine (they share its cores). "
        f"Worker threads: workers × torch threads each. Each server first answers "
        f"{settings.get('warm_up_requests', 0)} requests (at least two batches) unmeasured: the JVM compiles the "
        f"frontend's request path over the first few hundred. A level sends at least {LEVEL_ROUNDS} requests per "
        f"client and stops sending after {settings['max_load_seconds']:g} s; photos/s is the steady rate: answers "
        f"after each client's first one, over the time since (the ramp-up and its partly filled batches left out); "
        f"latency percentiles count every answer (p99 of few requests is close to the maximum). Worker and queue "
        f"ms/request: TorchServe's own cumulative inference and queue latency counters over its request count (a "
        f"batch's worker time counts for each of its requests; the client's latency minus both is HTTP and the "
        f"frontend). Mean batch and decode/forward/search/answer ms/batch: the handler's MarketplaceBatches and "
        f"MarketplaceStageMilliseconds counters, each stage timed inside the worker per batch (decode: decode + "
        f"transform of its photos; forward: the model; search: the catalogue; answer: the JSON answers); what a "
        f"request's latency holds beyond them is the queue, TorchServe and HTTP. Forward share: photos/s × forward "
        f"ms per photo over the workers, the share of the workers' time in forward passes (1.0: serving costs "
        f"nothing beyond the model). ÷ bare forward: over the bare section's baseline forward at the same batch "
        f"size (a mean batch within {BATCH_TOLERANCE:.0%} of a measured one; none otherwise); ÷ bare "
        f"decode+forward: over decode + preprocess + that forward in one process. p50 − bare: single-request "
        f"(concurrency 1) p50 minus the bare batch-1 forward; p50 − worker forward: minus the worker's own forward "
        f"pass, i.e. what serving adds (decode, search, answer, TorchServe, HTTP) whatever the speed of the "
        f"worker's process. CPU ms/request: CPU time of the benchmark's client threads, of the Java frontend and "
        f"of the Python workers over the requests sent; cores busy: all three over the level's wall time.")


def bench_serving(subjects: list[Subject], photos: list[bytes], settings: dict, bare_rows: list[dict],
                  with_load: bool) -> tuple[dict, dict]:
    """The served and startup sections (start-up figures come from the same server starts)."""
    served_rows, startup_rows = [], []
    with tempfile.TemporaryDirectory(prefix="benchmark-serve-") as scratch:
        scratch = Path(scratch)
        rates = bare_rates(bare_rows)
        configs = serve_configs(settings) if with_load else serve_configs(settings)[:1]
        for model, run_dir in serving_runs(subjects, settings, scratch):
            archives = build_archives(model, run_dir, scratch / "store", configs)
            served, startup = bench_served_model(model, archives, photos, settings, scratch, rates, with_load)
            served_rows += served
            startup_rows += startup
    verdicts = served_verdicts(served_rows)
    served = {"rows": served_rows, "columns": SERVED_COLUMNS, "verdict": verdicts,
              "legend": "\n".join([served_legend(photos, settings), *verdicts])}
    return served, startup_section(startup_rows)
