"""Words section: the catalogue's words at scale. The text model's catalogue rows (the --run's, or a tiny
generated run's) copied until the catalogue holds each size; queries are listings' own rows and, with
--work, their titles. Each query is read exactly (every listing) and pruned (its rarest terms, then the best
candidates completed: ListingWords.similarities): p50/p95 of one query, and how many of the exact 10
nearest the pruned reading finds, every copy of the query's own listing left out.
"""
import tempfile
import time
from collections import Counter
from dataclasses import replace
from pathlib import Path

import numpy as np

from marketplace_search.layout import TEXT_MODEL_DIR
from scripts.benchmark.common import percentiles_ms
from scripts.benchmark.text import text_run

WORDS_COLUMNS = [("listings", "listings"), ("query", "query"), ("entries_m", "entries read exactly (M, median)"),
                 ("exact_p50_ms", "exact p50 ms"), ("exact_p95_ms", "exact p95 ms"), ("pruned_p50_ms", "pruned p50 ms"),
                 ("pruned_p95_ms", "pruned p95 ms"), ("speed_up", "exact ÷ pruned p50"),
                 ("agreement", "exact 10 nearest found")]


def copied(words, copies: int):
    """WORDS' listings COPIES times over, stored by column as ListingWords keeps them: within a column the
    copies follow each other, each in listing order."""
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
        run_dir = text_run(settings, Path(scratch))
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
