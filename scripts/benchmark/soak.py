"""Soak section: the worker's memory over a long run of mixed requests. One TorchServe and one worker
serve the archive of a run with a text model (the --run's, or a tiny generated one); clients send every
kind of request in turns (photos, 12-megapixel phone photos, photo + title, photo + title + description,
a title alone, and a truncated upload that must be refused), and the worker's RSS and USS are read after
every `soak_every` answers. A worker that keeps growing once warm leaks: the legend gives the growth per
1,000 requests after the first quarter, and the rows what every kind of request got.
"""
import tempfile
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

from scripts import api
from scripts.archive import PRECISION, RUNTIME, build_archive
from scripts.benchmark.photos import generate_photos
from scripts.benchmark.startup import process_memory, served_model, worker_processes
from scripts.benchmark.text import request_for, text_run

SOAK_NAME = "soak"
KINDS = ("photo", "phone photo", "photo+title", "photo+title+description", "title", "truncated photo")
SOAK_COLUMNS = [("answered", "requests answered"), ("seconds", "s"), ("workers", "worker pids"),
                ("rss_mb", "worker RSS MB"), ("uss_mb", "worker USS MB"), ("unexpected", "unexpected answers")]


def soak_requests(photos: list[bytes], phone_photos: list[bytes], token: str | None) -> list[tuple[str, bytes, dict]]:
    """One round of (kind, body, headers) per photo: every kind once, the phone photos in turn."""
    rounds = []
    for number, photo in enumerate(photos):
        for kind in KINDS:
            if kind == "phone photo":
                body, headers = request_for("photo", phone_photos[number % len(phone_photos)], token)
            elif kind == "truncated photo":
                body, headers = request_for("photo", photo[:len(photo) // 2], token)
            else:
                body, headers = request_for(kind, photo, token)
            rounds.append((kind, body, headers))
    return rounds


def expected(kind: str, status) -> bool:
    """A truncated upload is refused with a 4xx; everything else is answered."""
    if kind == "truncated photo":
        return isinstance(status, int) and 400 <= status < 500
    return status == 200


def worker_memory(server) -> dict:
    """The workers' pids and their largest RSS and USS, in MB (startup.process_memory)."""
    memory = process_memory(server)
    return {"workers": " ".join(str(process.pid) for process in worker_processes(server)),
            "rss_mb": memory["worker_rss_mb"], "uss_mb": memory["worker_uss_mb"]}


def growth_per_1000(samples: list[dict], key: str, skip: float = 0.25) -> float | None:
    """The least-squares slope of `key` against requests answered, MB per 1,000, after the first `skip`."""
    last = samples[-1]["answered"] if samples else 0
    kept = [sample for sample in samples if sample["answered"] > skip * last]
    if len(kept) < 2:
        return None
    answered = np.array([sample["answered"] for sample in kept], np.float64)
    return float(np.polyfit(answered, [sample[key] for sample in kept], 1)[0] * 1000)


def soak(server, model: str, rounds: list[tuple[str, bytes, dict]], total: int, clients: int, every: int,
         timeout: float = 120) -> tuple[list[dict], Counter]:
    """Send `total` requests (the rounds over and over) from `clients` threads; after every `every` answers,
    read the workers' memory. Returns the samples and what each kind got (status, or the error's name)."""
    url = api.prediction_url(server, model)

    def send(number: int) -> tuple[str, int | str]:
        kind, body, headers = rounds[number % len(rounds)]
        try:
            return kind, api.post_photo(url, body, headers, timeout=timeout).status_code
        except api.TransientError as error:
            return kind, error.code

    answers: Counter = Counter()
    samples = []
    started = time.perf_counter()
    with ThreadPoolExecutor(max_workers=clients) as pool:
        for first in range(0, total, every):
            answers.update(pool.map(send, range(first, min(total, first + every))))
            samples.append({"answered": min(total, first + every), "seconds": time.perf_counter() - started,
                            **worker_memory(server),
                            "unexpected": sum(count for (kind, status), count in answers.items()
                                              if not expected(kind, status))})
    return samples, answers


def bench_soak(photos: list[bytes], settings: dict) -> dict:
    total, every = settings["soak_requests"], settings["soak_every"]
    with tempfile.TemporaryDirectory(prefix="benchmark-soak-") as scratch:
        scratch = Path(scratch)
        run_dir = text_run(settings, scratch)
        store = scratch / "store"
        store.mkdir()
        generated = run_dir != Path(settings.get("run") or "")
        mar = build_archive(run_dir, store, SOAK_NAME, "1.0", batch_size=8, max_batch_delay=1, runtime=RUNTIME,
                            precision=PRECISION, guard=not generated)  # a generated run has no test split to guard on
        with served_model(store, mar, SOAK_NAME, scratch / "ts") as (server, startup):
            rounds = soak_requests(photos, generate_photos(2, settings["phone_size"], seed=1),
                                   server.token("inference"))
            samples, answers = soak(server, SOAK_NAME, rounds, total, settings["soak_clients"], every)
    by_kind = {kind: dict(sorted((str(status), count) for (name, status), count in answers.items() if name == kind))
               for kind in KINDS}
    summary = {"ready_uss_mb": startup["worker_uss_mb"], "ready_rss_mb": startup["worker_rss_mb"],
               "uss_growth_mb_per_1000": growth_per_1000(samples, "uss_mb"),
               "rss_growth_mb_per_1000": growth_per_1000(samples, "rss_mb"),
               "worker_restarted": len({sample["workers"] for sample in samples}) > 1, "answers": by_kind}
    return {"rows": samples, "columns": SOAK_COLUMNS, "summary": summary,
            "models": {"served": f"{run_dir} ({RUNTIME} {PRECISION}, the archive's default backend)"},
            "legend": (
                f"{total:,} requests from {settings['soak_clients']} clients, the kinds in turns ({', '.join(KINDS)}); "
                f"one worker, batching 8 / 1 ms; memory read after every {every:,} answers. At READY the worker "
                f"held {startup['worker_uss_mb']:.0f} MB USS. After the first quarter it grew "
                f"{format_growth(summary['uss_growth_mb_per_1000'])} USS and "
                f"{format_growth(summary['rss_growth_mb_per_1000'])} RSS per 1,000 requests (least squares). "
                f"Answers by kind: {by_kind}. A truncated photo is expected to get a 4xx, every other kind a 200.")}


def format_growth(value: float | None) -> str:
    return "–" if value is None else f"{value:+.2f} MB"
