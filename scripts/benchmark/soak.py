"""Soak section: the worker's memory (the archive's default backend) read every `soak_every` answers while
clients send every kind of request in turns, phone photos and a truncated upload that must be refused among them."""
import tempfile
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

from scripts import api
from scripts.archive import PRECISION, RUNTIME
from scripts.benchmark.common import bench_run, generate_photos, served_archive, worker_memory
from scripts.benchmark.words import request_for

KINDS = ("photo", "phone photo", "photo+title", "photo+title+description", "title", "truncated photo")
SOAK_COLUMNS = [("answered", "requests answered"), ("seconds", "s"), ("workers", "worker pids"),
                ("rss_mb", "worker RSS MB"), ("uss_mb", "worker USS MB"), ("unexpected", "unexpected answers")]


def soak_requests(photos: list[bytes], phone_photos: list[bytes], token: str | None) -> list[tuple[str, bytes, dict]]:
    """(kind, body, headers): every kind once per photo, the phone photos in turn."""
    rounds = []
    for number, photo in enumerate(photos):
        sent = {"phone photo": phone_photos[number % len(phone_photos)], "truncated photo": photo[:len(photo) // 2]}
        rounds += [(kind, *request_for("photo" if kind in sent else kind, sent.get(kind, photo), token))
                   for kind in KINDS]
    return rounds


def expected(kind: str, status) -> bool:
    return isinstance(status, int) and 400 <= status < 500 if kind == "truncated photo" else status == 200


def growth_per_1000(samples: list[dict], key: str, skip: float = 0.25) -> float | None:
    """The least-squares slope of `key` against requests answered, MB per 1,000, after the first `skip`."""
    kept = [sample for sample in samples if sample["answered"] > skip * samples[-1]["answered"]] if samples else []
    if len(kept) < 2:
        return None
    return float(np.polyfit([sample["answered"] for sample in kept], [sample[key] for sample in kept], 1)[0] * 1000)


def bench_soak(photos: list[bytes], settings: dict) -> dict:
    total, every = settings["soak_requests"], settings["soak_every"]
    answers: Counter = Counter()  # (kind, status or the error's code): count
    samples = []
    with tempfile.TemporaryDirectory(prefix="benchmark-soak-") as scratch:
        run_dir = bench_run(settings, Path(scratch), text_model=True)
        with served_archive(run_dir, Path(scratch), "soak", runtime=RUNTIME, precision=PRECISION) as (server, _):
            url, token, ready = api.prediction_url(server, "soak"), server.token("inference"), worker_memory(server)
            rounds = soak_requests(photos, generate_photos(2, settings["phone_size"], seed=1), token)

            def send(number: int) -> tuple[str, int | str]:
                kind, body, headers = rounds[number % len(rounds)]
                try:
                    return kind, api.post_photo(url, body, headers, timeout=120).status_code
                except api.TransientError as error:
                    return kind, error.code

            started = time.perf_counter()
            with ThreadPoolExecutor(max_workers=settings["soak_clients"]) as pool:
                for first in range(0, total, every):
                    answers.update(pool.map(send, range(first, min(total, first + every))))
                    unexpected = sum(count for (kind, status), count in answers.items() if not expected(kind, status))
                    samples.append({"answered": min(total, first + every), "seconds": time.perf_counter() - started,
                                    **worker_memory(server), "unexpected": unexpected})
    by_kind = {kind: dict(sorted((str(status), count) for (name, status), count in answers.items() if name == kind))
               for kind in KINDS}
    summary = {"ready_uss_mb": ready["uss_mb"], "uss_growth_mb_per_1000": growth_per_1000(samples, "uss_mb"),
               "worker_restarted": len({sample["workers"] for sample in samples}) > 1, "answers": by_kind}
    growth = summary["uss_growth_mb_per_1000"]
    return {"rows": samples, "columns": SOAK_COLUMNS, "summary": summary,
            "models": {"served": f"{run_dir} ({RUNTIME} {PRECISION}, the archive's default backend)"},
            "legend": f"{total:,} requests from {settings['soak_clients']} clients, the kinds in turns; one worker, "
                      f"batching 8 / 1 ms. USS at READY {ready['uss_mb']:.0f} MB; after the first quarter "
                      f"{'–' if growth is None else f'{growth:+.2f} MB'} per 1,000 requests (least squares). Answers "
                      f"by kind: {by_kind} (a truncated photo must get a 4xx, every other kind a 200)."}
