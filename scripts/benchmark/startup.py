"""Startup section: from starting TorchServe to every worker READY, and the memory of the Java
frontend and of its Python workers. The served section starts the servers and fills these rows.
"""
import contextlib
import time
from pathlib import Path

import psutil

from scripts import api
from scripts.serve import free_ports, start_server

STARTUP_COLUMNS = [("model", "model"), ("backend", "backend"), ("batching", "dynamic batching"), ("worker_threads", "worker threads"),
                   ("api_s", "APIs up s"),
                   ("ready_s", "READY s"), ("workers", "workers"), ("worker_rss_mb", "worker RSS MB"),
                   ("worker_uss_mb", "worker USS MB"), ("worker_rss_after_mb", "RSS after load MB"),
                   ("worker_uss_after_mb", "USS after load MB"), ("frontend_rss_mb", "frontend (Java) RSS MB")]


WORKER_MARK = "model_service_worker"  # in the command line of TorchServe's Python workers


def worker_processes(server) -> list[psutil.Process]:
    """TorchServe's Python workers (children of its Java frontend)."""
    return [process for process in psutil.Process(server.pid).children(recursive=True)
            if WORKER_MARK in " ".join(process.cmdline())]


def process_memory(server) -> dict:
    """Memory of the Java frontend and of its Python worker(s), in MB.

    RSS counts shared library pages (torch alone maps hundreds of MB); USS is what the worker
    holds on its own, i.e. what each extra worker would add.
    """
    frontend = psutil.Process(server.pid)
    workers = [process.memory_full_info() for process in frontend.children(recursive=True)]
    return {"frontend_rss_mb": frontend.memory_info().rss / 2**20, "workers": len(workers),
            "worker_rss_mb": max((info.rss for info in workers), default=0) / 2**20 or None,
            "worker_uss_mb": max((info.uss for info in workers), default=0) / 2**20 or None}


def wait_workers_ready(server, name: str, workers: int, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    server.wait_ready(name, timeout=timeout)
    while time.monotonic() < deadline:
        description = api.describe(server, name)[0]
        if sum(worker["status"] == "READY" for worker in description.get("workers", [])) >= workers:
            return
        time.sleep(0.5)
    raise RuntimeError(f"{name}: fewer than {workers} workers READY after {timeout:.0f} s")


@contextlib.contextmanager
def served_model(store: Path, mar: Path, name: str, workdir: Path, ready_timeout: float = 300, workers: int = 1):
    """TorchServe serving `mar` as `name` with `workers` READY; yields `(server, start-up figures)`
    and stops it after. READY s is when the last worker is ready."""
    inference, management, metrics, grpc_inference, grpc_management = free_ports(5)
    started = time.perf_counter()
    server = start_server(store, workdir=workdir, models={name: mar.name}, inference_port=inference,
                          management_port=management, metrics_port=metrics, grpc_inference_port=grpc_inference,
                          grpc_management_port=grpc_management)
    try:
        api_seconds = time.perf_counter() - started
        wait_workers_ready(server, name, workers, timeout=ready_timeout)
        startup = {"api_s": api_seconds, "ready_s": time.perf_counter() - started, **process_memory(server)}
        yield server, startup
    finally:
        server.stop()


def memory_after_load(server) -> dict:
    """The workers' memory once the load test is over (the startup rows' "after load" columns)."""
    after = process_memory(server)
    return {"worker_rss_after_mb": after["worker_rss_mb"], "worker_uss_after_mb": after["worker_uss_mb"]}


def startup_section(rows: list[dict]) -> dict:
    return {"rows": rows, "columns": STARTUP_COLUMNS, "legend": (
        "From start_server() to every worker READY (GET /models/NAME); memory of the Java frontend and of its "
        "Python workers (the largest) at READY and after the load test. RSS includes shared library pages; "
        "USS (unique set) is what one more worker would add.")}
