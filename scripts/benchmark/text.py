"""Text section: what a title costs a served request. One TorchServe, one archive with a text model
(the --run's, or a tiny generated run with a text model trained on generated titles), requests sent
one at a time in turns: photo alone, photo + title, photo + title + description, title alone.
p50/p95 per kind, the difference to the photo alone, and the text model's own scoring time in-process.
"""
import tempfile
import time
from pathlib import Path

import numpy as np

from scripts import api
from scripts.archive import build_archive
from scripts.benchmark.common import percentiles_ms, time_calls
from scripts.benchmark.startup import served_model

TEXT_NAME = "benchtext"
TITLE = "Vintage wooden garden bench, seats three, collection only"
DESCRIPTION = ("Solid teak bench in good condition, a few marks on the left arm. Dismantles into three parts for "
               "transport. Collection from the north side of town, cash on collection.") * 2
KINDS = ("photo", "photo+title", "photo+title+description", "title")
TEXT_COLUMNS = [("kind", "request carries"), ("requests", "requests"), ("p50_ms", "p50 ms"), ("p95_ms", "p95 ms"),
                ("extra_p50_ms", "p50 − photo alone ms"), ("score_ms", "text scoring in-process ms")]


def request_for(kind: str, photo: bytes, token: str | None) -> tuple[bytes, dict]:
    """(body, headers) of one request of KIND: a raw photo with an X-Title header, or JSON with the words."""
    import base64
    import json

    headers = api.prediction_headers(photo, token)
    if kind in ("photo", "photo+title"):
        return photo, {**headers, **({"X-Title": TITLE} if kind == "photo+title" else {})}
    document = {"title": TITLE, **({"description": DESCRIPTION} if "description" in kind else {}),
                **({"image": base64.b64encode(photo).decode()} if kind.startswith("photo") else {})}
    return json.dumps(document).encode(), {**headers, "Content-Type": "application/json"}


def text_run(settings: dict, scratch: Path) -> Path:
    """The --run when it has a text model, else a tiny generated run with one."""
    from marketplace_search.layout import TEXT_MODEL_DIR

    run = settings.get("run")
    if run and (Path(run) / TEXT_MODEL_DIR).is_dir():
        return Path(run)
    from training.tiny_run import make_tiny_run, make_tiny_text_model

    tiny = make_tiny_run(scratch / "runs" / "2025-01-31_142233")
    make_tiny_text_model(tiny.run_dir)
    return tiny.run_dir


def bench_text(photos: list[bytes], settings: dict) -> dict:
    from marketplace_search.layout import TEXT_MODEL_DIR
    from marketplace_search.text import TextModel, listing_text

    requests_per_kind = max(20, settings.get("text_requests", 60))
    with tempfile.TemporaryDirectory(prefix="benchmark-text-") as scratch:
        scratch = Path(scratch)
        run_dir = text_run(settings, scratch)
        model = TextModel.load(run_dir / TEXT_MODEL_DIR)
        score_ms = {"photo": None, "photo+title": TITLE, "photo+title+description": listing_text(TITLE, DESCRIPTION),
                    "title": TITLE}
        photo = np.full((1, len(model.classes)), 1.0 / len(model.classes), np.float32)
        for kind, text in score_ms.items():
            inputs = tuple(kind.split("+"))
            score_ms[kind] = None if text is None else float(np.median(time_calls(
                lambda: model.predict(inputs, [text], photo if "photo" in inputs else None),
                min_seconds=0.5, min_repeats=20))) * 1000
        store = scratch / "store"
        store.mkdir()
        mar = build_archive(run_dir, store, TEXT_NAME, "1.0", batch_size=8, max_batch_delay=1)
        with served_model(store, mar, TEXT_NAME, scratch / "ts") as (server, _):
            url = api.prediction_url(server, TEXT_NAME)
            token = server.token("inference")
            seconds = {kind: [] for kind in KINDS}
            for round_ in range(10 + requests_per_kind):  # the first 10 rounds warm up the frontend and worker
                for kind in KINDS:
                    body, headers = request_for(kind, photos[round_ % len(photos)], token)
                    started = time.perf_counter()
                    response = api.post_photo(url, body, headers)
                    elapsed = time.perf_counter() - started
                    if response.status_code != 200:
                        raise RuntimeError(f"{kind}: HTTP {response.status_code} {api.error_text(response)}")
                    if round_ >= 10:
                        seconds[kind].append(elapsed)
    rows = [{"kind": kind, "requests": len(seconds[kind]), **percentiles_ms(seconds[kind], (50, 95)),
             "score_ms": score_ms[kind]} for kind in KINDS]
    for row in rows:
        row["extra_p50_ms"] = row["p50_ms"] - rows[0]["p50_ms"]
    return {"rows": rows, "columns": TEXT_COLUMNS, "models": {"served": str(run_dir)}, "legend": (
        "One client, requests one at a time, the four kinds in turns (so drift hits each alike), after 10 warm-up "
        "rounds. A title goes as the X-Title header with the raw photo; a description (or a request without a "
        "photo) as JSON, so those rows also pay for base64. Text scoring: TextModel.predict (scores, catalogue "
        "vote, fusion) on one text, median.")}
