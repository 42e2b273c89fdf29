"""Text-model sections. text: what a title costs a served request, per kind of request. words: the catalogue copied
up to each size, each query read exactly and pruned: p50/p95, and how many of the exact 10 nearest pruning finds."""
import base64
import json
import tempfile
import time
from collections import Counter
from dataclasses import replace
from pathlib import Path

import numpy as np

from marketplace_search.layout import TEXT_MODEL_DIR
from scripts import api
from scripts.benchmark.common import bench_run, percentiles_ms, served_archive, timed

TITLE = "Vintage wooden garden bench, seats three, collection only"
DESCRIPTION = ("Solid teak bench in good condition, a few marks on the left arm. Dismantles into three parts for "
               "transport. Collection from the north side of town, cash on collection.") * 2
KINDS = ("photo", "photo+title", "photo+title+description", "title")
WARM_UP_ROUNDS = 10
TEXT_COLUMNS = [("kind", "request carries"), ("requests", "requests"), ("p50_ms", "p50 ms"), ("p95_ms", "p95 ms"),
                ("extra_p50_ms", "p50 − photo alone ms")]
WORDS_COLUMNS = [("listings", "listings"), ("query", "query"), ("entries_m", "entries read exactly (M, median)"),
                 ("exact_p50_ms", "exact p50 ms"), ("exact_p95_ms", "exact p95 ms"), ("pruned_p50_ms", "pruned p50 ms"),
                 ("pruned_p95_ms", "pruned p95 ms"), ("speed_up", "exact ÷ pruned p50"),
                 ("agreement", "exact 10 nearest found")]


def copied(words, copies: int):
    """WORDS' listings COPIES times over, by column as ListingWords keeps them."""
    listings, lengths = len(words.product_ids), np.diff(words.indptr)
    column = np.repeat(np.arange(words.width), lengths)
    within = np.arange(len(words.rows)) - words.indptr[column]
    indptr = words.indptr * copies
    rows = np.empty(len(words.rows) * copies, np.int32)
    values = np.empty(len(words.values) * copies, np.float32)
    for copy in range(copies):
        at = indptr[column] + copy * lengths[column] + within
        rows[at], values[at] = words.rows + copy * listings, words.values
    return replace(words, product_ids=[f"{copy}:{p}" for copy in range(copies) for p in words.product_ids],
                   labels=np.tile(words.labels, copies), indptr=indptr, rows=rows, values=values)


def listing_rows(words) -> list[tuple[np.ndarray, np.ndarray]]:
    """Each catalogue listing's own (columns, values), as TextModel.features gives a text's."""
    from scipy.sparse import csc_matrix

    stored = csc_matrix((words.values, words.rows, words.indptr), shape=(len(words.product_ids), words.width)).tocsr()
    return [(stored.indices[start:end].astype(np.int64), stored.data[start:end])
            for start, end in zip(stored.indptr[:-1], stored.indptr[1:])]


def agreement(exact: np.ndarray, pruned: np.ndarray, own: int, listings: int) -> float:
    """Share of the exact 10 largest similarities (own listing's copies left out) the pruned reading has."""
    exact, pruned = exact.astype(np.float64), pruned.astype(np.float64)
    exact[own::listings] = pruned[own::listings] = -np.inf
    best = Counter(np.round(np.sort(exact)[-10:], 5))
    return sum((best & Counter(np.round(np.sort(pruned)[-10:], 5))).values()) / 10


def bench_words(settings: dict) -> dict:
    from marketplace_search.text import TextModel

    with tempfile.TemporaryDirectory(prefix="benchmark-words-") as scratch:
        run_dir = bench_run(settings, Path(scratch), text_model=True)
        model = TextModel.load(run_dir / TEXT_MODEL_DIR)
    words, listings = model.listing_words, len(model.listing_words.product_ids)
    picked = np.random.default_rng(0).choice(listings, min(settings["words_queries"], listings), replace=False)
    rows = listing_rows(words)
    queries = {"listing's row": [(int(i), *rows[i]) for i in picked]}
    if settings.get("work"):
        from training.text import read_listings

        titles = read_listings(settings["work"])["title"]
        queries["title"] = [(int(i), *model.features(titles.loc[words.product_ids[i]])) for i in picked]
    table = []
    for size in settings["sizes"]:
        catalogue = copied(words, max(1, round(size / listings)))
        readers = {"exact": replace(catalogue, exact_postings=np.iinfo(np.int64).max),
                   "pruned": replace(catalogue, exact_postings=0)}
        entries = np.diff(catalogue.indptr)
        for name, asked in queries.items():
            timings, found = {way: [] for way in readers}, []
            for own, columns, values in asked:
                read = {}
                for way, reader in readers.items():
                    started = time.perf_counter()
                    read[way] = reader.similarities(columns, values)
                    timings[way].append(time.perf_counter() - started)
                found.append(agreement(read["exact"], read["pruned"], own, listings))
            row = {"listings": len(catalogue.product_ids), "query": name, "agreement": float(np.mean(found)),
                   "entries_m": float(np.median([entries[c].sum() for _, c, _ in asked])) / 1e6,
                   **{f"{way}_{key}": value for way, seconds in timings.items()
                      for key, value in percentiles_ms(seconds, (50, 95)).items()}}
            table.append({**row, "speed_up": row["exact_p50_ms"] / row["pruned_p50_ms"]})
        del catalogue, readers
    return {"rows": table, "columns": WORDS_COLUMNS, "models": {"words": f"{run_dir} ({listings} listings)"},
            "legend": f"{len(picked)} queries per row, one at a time, each read exactly and pruned in turn. A served "
                      f"query reads pruned only above EXACT_POSTINGS entries (marketplace_search.text)."}


def request_for(kind: str, photo: bytes, token: str | None) -> tuple[bytes, dict]:
    """(body, headers) of one request of KIND: the raw photo with an X-Title header, or JSON with the words."""
    if kind in ("photo", "photo+title"):
        return photo, api.prediction_headers(photo, token, title=TITLE if kind == "photo+title" else None)
    document = {"title": TITLE, **({"description": DESCRIPTION} if "description" in kind else {}),
                **({"image": base64.b64encode(photo).decode()} if kind.startswith("photo") else {})}
    return json.dumps(document).encode(), {**api.prediction_headers(photo, token), "Content-Type": "application/json"}


def bench_text(photos: list[bytes], settings: dict) -> dict:
    seconds = {kind: [] for kind in KINDS}
    with tempfile.TemporaryDirectory(prefix="benchmark-text-") as scratch:
        run_dir = bench_run(settings, Path(scratch), text_model=True)
        with served_archive(run_dir, Path(scratch), "benchtext") as (server, _):
            url, token = api.prediction_url(server, "benchtext"), server.token("inference")
            for round_ in range(WARM_UP_ROUNDS + settings["text_requests"]):
                for kind in KINDS:
                    body, headers = request_for(kind, photos[round_ % len(photos)], token)
                    elapsed = timed(lambda: api.post_photo(url, body, headers))
                    if round_ >= WARM_UP_ROUNDS:
                        seconds[kind].append(elapsed)
    rows = [{"kind": kind, "requests": len(seconds[kind]), **percentiles_ms(seconds[kind], (50, 95))} for kind in KINDS]
    for row in rows:
        row["extra_p50_ms"] = row["p50_ms"] - rows[0]["p50_ms"]
    return {"rows": rows, "columns": TEXT_COLUMNS, "models": {"served": str(run_dir)}, "legend": (
        f"One client, one request at a time, the kinds in turns after {WARM_UP_ROUNDS} warm-up rounds; one worker, "
        f"torch fp32, batching 8 / 1 ms. A title goes as the X-Title header with the raw photo; a description (or "
        f"a request without a photo) as JSON, so those rows also pay for base64.")}
