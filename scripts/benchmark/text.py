"""Text section: what a title costs a served request. One TorchServe serves a run with a text model (the
--run's, or a tiny generated one); one client sends the kinds of request in turns (photo alone, photo +
title, photo + title + description, title alone): p50/p95 per kind and the difference to the photo alone.
"""
import base64
import json
import tempfile
import time
from pathlib import Path

from marketplace_search.layout import TEXT_MODEL_DIR
from scripts import api
from scripts.archive import build_archive
from scripts.benchmark.common import percentiles_ms, serving

TEXT_NAME = "benchtext"
TITLE = "Vintage wooden garden bench, seats three, collection only"
DESCRIPTION = ("Solid teak bench in good condition, a few marks on the left arm. Dismantles into three parts for "
               "transport. Collection from the north side of town, cash on collection.") * 2
KINDS = ("photo", "photo+title", "photo+title+description", "title")
WARM_UP_ROUNDS = 10
TEXT_COLUMNS = [("kind", "request carries"), ("requests", "requests"), ("p50_ms", "p50 ms"), ("p95_ms", "p95 ms"),
                ("extra_p50_ms", "p50 − photo alone ms")]


def request_for(kind: str, photo: bytes, token: str | None) -> tuple[bytes, dict]:
    """(body, headers) of one request of KIND: the raw photo with an X-Title header, or JSON with the words."""
    if kind in ("photo", "photo+title"):
        return photo, api.prediction_headers(photo, token, title=TITLE if kind == "photo+title" else None)
    document = {"title": TITLE, **({"description": DESCRIPTION} if "description" in kind else {}),
                **({"image": base64.b64encode(photo).decode()} if kind.startswith("photo") else {})}
    return json.dumps(document).encode(), {**api.prediction_headers(photo, token), "Content-Type": "application/json"}


def text_run(settings: dict, scratch: Path) -> Path:
    """The --run when it has a text model, else a tiny generated run with one."""
    if settings.get("run") and (Path(settings["run"]) / TEXT_MODEL_DIR).is_dir():
        return Path(settings["run"])
    from training.tiny_run import make_tiny_run, make_tiny_text_model

    tiny = make_tiny_run(scratch / "runs" / "2025-01-31_142233")
    make_tiny_text_model(tiny.run_dir)
    return tiny.run_dir


def bench_text(photos: list[bytes], settings: dict) -> dict:
    seconds = {kind: [] for kind in KINDS}
    with tempfile.TemporaryDirectory(prefix="benchmark-text-") as scratch:
        scratch = Path(scratch)
        run_dir = text_run(settings, scratch)
        (scratch / "store").mkdir()
        mar = build_archive(run_dir, scratch / "store", TEXT_NAME, "1.0", guard=False)
        with serving(scratch / "store", {TEXT_NAME: mar.name}, scratch / "ts") as (server, _):
            url, token = api.prediction_url(server, TEXT_NAME), server.token("inference")
            for round_ in range(WARM_UP_ROUNDS + settings["text_requests"]):
                for kind in KINDS:
                    body, headers = request_for(kind, photos[round_ % len(photos)], token)
                    started = time.perf_counter()
                    response = api.post_photo(url, body, headers)
                    elapsed = time.perf_counter() - started
                    if response.status_code != 200:
                        raise RuntimeError(f"{kind}: HTTP {response.status_code} {api.error_text(response)}")
                    if round_ >= WARM_UP_ROUNDS:
                        seconds[kind].append(elapsed)
    rows = [{"kind": kind, "requests": len(seconds[kind]), **percentiles_ms(seconds[kind], (50, 95))} for kind in KINDS]
    for row in rows:
        row["extra_p50_ms"] = row["p50_ms"] - rows[0]["p50_ms"]
    return {"rows": rows, "columns": TEXT_COLUMNS, "models": {"served": str(run_dir)}, "legend": (
        f"One client, one request at a time, the kinds in turns after {WARM_UP_ROUNDS} warm-up rounds; one worker, "
        f"torch fp32, batching 8 / 1 ms. A title goes as the X-Title header with the raw photo; a "
        f"description (or a request without a photo) as JSON, so those rows also pay for base64.")}
