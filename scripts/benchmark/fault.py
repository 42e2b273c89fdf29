"""Fault section: many clients, one worker SIGKILLed half-way; what every request got, and latency
before the kill and after the server recovered.

TorchServe answers the requests of the batch the dead worker held with a 5xx and starts a new worker;
nothing else may fail, no connection may hang or drop, and every failure must be a JSON answer.
"""
import itertools
import json
import signal
import threading
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import requests

from scripts import api
from scripts.archive import PRECISION, RUNTIME, build_archive
from scripts.benchmark.common import percentiles_ms
from scripts.benchmark.photos import generate_photos
from scripts.benchmark.startup import served_model, worker_processes
from training.tiny_run import make_tiny_run

FAULT_COLUMNS = [("clients", "clients"), ("requests", "requests"), ("ok", "200"), ("failed", "failed"),
                 ("failed_by_status", "failed by status"), ("not_json", "failures not JSON"),
                 ("no_answer", "no answer (dropped, hung)"), ("recovery_s", "kill → next 200 s"),
                 ("before_p50_ms", "before p50 ms"), ("before_p95_ms", "before p95 ms"),
                 ("before_p99_ms", "before p99 ms"), ("after_p50_ms", "after p50 ms"),
                 ("after_p95_ms", "after p95 ms"), ("after_p99_ms", "after p99 ms")]


def kill_one_worker(server) -> int:
    """SIGKILL one Python worker of `server`; returns its pid."""
    workers = worker_processes(server)
    if not workers:
        raise RuntimeError(f"TorchServe pid {server.pid} has no Python worker to kill")
    workers[0].send_signal(signal.SIGKILL)
    return workers[0].pid


def one_request(url: str, photo: bytes, headers: dict, timeout: float) -> dict:
    """What one request got: its status and whether a failure came as JSON, or that nothing came."""
    started = time.perf_counter()
    try:
        response = api.session().post(url, data=photo, headers=headers, timeout=timeout)
    except requests.RequestException as error:
        return {"start": started, "end": time.perf_counter(), "status": None, "error": f"{type(error).__name__}"}
    outcome = {"start": started, "end": time.perf_counter(), "status": response.status_code}
    if response.status_code != 200:
        try:
            outcome["json"] = isinstance(response.json(), dict)
        except ValueError:
            outcome["json"] = False
        outcome["error"] = api.error_text(response)[:200]
    return outcome


def load_and_kill(server, model: str, photos: list[bytes], clients: int = 32, total: int = 2000,
                  kill_after: float = 0.5, timeout: float = 120) -> dict:
    """Send `total` requests from `clients` threads; SIGKILL a worker once `kill_after` of them are answered."""
    url = api.prediction_url(server, model)
    headers = [api.prediction_headers(photo, server.token("inference")) for photo in photos]
    numbers = itertools.count()
    outcomes: list[dict] = []
    killed: dict = {}
    kill_now = threading.Event()

    def client() -> None:
        try:
            while (number := next(numbers)) < total:
                outcome = one_request(url, photos[number % len(photos)], headers[number % len(photos)], timeout)
                outcomes.append(outcome)
                if len(outcomes) >= total * kill_after:
                    kill_now.set()
        finally:
            api.session().close()

    def killer() -> None:
        kill_now.wait()
        killed["at"] = time.perf_counter()
        killed["pid"] = kill_one_worker(server)

    with ThreadPoolExecutor(max_workers=clients + 1) as pool:
        kill_thread = pool.submit(killer)
        for future in [pool.submit(client) for _ in range(clients)]:
            future.result()
        kill_now.set()
        kill_thread.result()
    return fault_figures(outcomes, killed["at"], clients, total)


def fault_figures(outcomes: list[dict], killed_at: float, clients: int, total: int) -> dict:
    failed = [outcome for outcome in outcomes if outcome["status"] not in (200, None)]
    ok_after = sorted(outcome["end"] for outcome in outcomes if outcome["status"] == 200 and outcome["start"] > killed_at)
    recovered_at = ok_after[0] if ok_after else None
    before = [o["end"] - o["start"] for o in outcomes if o["status"] == 200 and o["end"] < killed_at]
    after = [o["end"] - o["start"] for o in outcomes
             if o["status"] == 200 and recovered_at is not None and o["start"] >= recovered_at]
    figures = {"clients": clients, "requests": total, "answers": len(outcomes),
               "ok": sum(outcome["status"] == 200 for outcome in outcomes), "failed": len(failed),
               "failed_by_status": dict(sorted(Counter(outcome["status"] for outcome in failed).items())),
               "not_json": sum(not outcome["json"] for outcome in failed),
               "no_answer": sum(outcome["status"] is None for outcome in outcomes) + total - len(outcomes),
               "recovery_s": recovered_at - killed_at if recovered_at is not None else None,
               "first_failure": failed[0]["error"] if failed else None}
    for phase, latencies in (("before", before), ("after", after)):
        if latencies:
            figures.update({f"{phase}_{key}": value for key, value in percentiles_ms(latencies).items()})
    return figures


def bench_fault(settings: dict, scratch: Path) -> dict:
    """The fault section on a tiny generated model (what is measured is serving, not the model)."""
    run = make_tiny_run(scratch / "fault" / "run")
    store = scratch / "fault" / "store"
    store.mkdir(parents=True)
    mar = build_archive(run.run_dir, store, "fault", "1.0", runtime=RUNTIME, precision=PRECISION,
                        guard=False)  # the default backend; a tiny run has no test split to guard on
    photos = generate_photos(16, (320, 240))
    with served_model(store, mar, "fault", scratch / "fault" / "ts") as (server, _):
        figures = load_and_kill(server, "fault", photos, settings["fault_clients"], settings["fault_requests"])
    figures["failed_by_status"] = json.dumps(figures["failed_by_status"])
    return {"rows": [figures], "columns": FAULT_COLUMNS,
            "legend": "One worker (batch 8), a generated model; the worker is SIGKILLed when half the "
                      "requests are answered. 'after' counts requests started after the first 200 that "
                      "followed the kill."}
