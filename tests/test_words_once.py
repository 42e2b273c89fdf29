"""A photo + words request searches the catalogue once and reads its words once, and every answer is
the one the handler gave when it searched three times and read the words anew for each use."""
import faiss  # noqa: F401  (before torch: both bring an OpenMP runtime, and this order is the safe one)

import base64
import dataclasses
import json

import numpy as np
import pytest

from handlers.local import load_local_handler, predict_local
from marketplace_search.inference import blend_categories, found_by_words
from marketplace_search.layout import TEXT_MODEL_DIR
from marketplace_search.search import MAX_K
from marketplace_search.text import RERANK_POOL, ListingWords, listing_text
from tests.serving_fixtures import archive_tiny_run, extract_archive, make_tiny_run
from training.tiny_run import CLASSES, TINY_ADJECTIVES, TINY_WORDS, make_tiny_text_model

LISTINGS = 150  # more than RERANK_POOL: the pool's depth decides which listings the words can bring up


@pytest.fixture(scope="module")
def handler(module_tmp):
    """(handler, run, model folder): the in-process handler of a tiny archive whose text model re-ranks by words
    (a vote catalogue over the archive's own listings) and whose photo answer blends a 20-NN vote."""
    root = module_tmp("words_once")
    run = make_tiny_run(root / "runs" / "2025-01-31_142233", listings=LISTINGS)
    model = make_tiny_text_model(run.run_dir)
    rng = np.random.default_rng(3)
    listings = {entry["product_id"]: entry for entry in run.listings.values()}
    product_ids = sorted(listings)
    words = [f"{rng.choice(TINY_ADJECTIVES)} {rng.choice(TINY_WORDS[listings[p]['category']])}" for p in product_ids]
    model.listing_words = ListingWords.from_rows(
        product_ids, [CLASSES.index(listings[p]["category"]) for p in product_ids],
        [model.features(text) for text in words], len(model.word_vocabulary) + len(model.char_vocabulary),
        k=10, temperature=0.05, rerank_weight=2.0)
    model.save(run.run_dir / TEXT_MODEL_DIR)
    mar = archive_tiny_run(run, root / "store", version="1.0")
    loaded = load_local_handler(extract_archive(mar, root / "model"))
    # the tiny run's evaluation chose no blend; the vote's voters are part of what must stay the same
    loaded.category_blend = dataclasses.replace(loaded.category_blend, k=20, temperature=0.1, weight=0.3)
    return loaded, run, root / "model"


def inference_before(handler, batch):
    """MarketplaceHandler.inference as it was: each query searched for its own k, the vote's voters by a
    search of their own, a photo + words query's re-ranking pool by a third (RERANK_POOL, its filter),
    and the words read anew for the scores, for the vote and for the re-ranking."""
    queries, rows = batch.queries, batch.photo_rows
    model, blend, catalogue = handler.text_model, handler.category_blend, handler.catalogue
    batch.probabilities = np.zeros((len(queries), len(handler.classes)), np.float32)
    batch.vectors = np.zeros((len(queries), catalogue.dimension), np.float32)
    batch.neighbours = [[] for _ in queries]
    if rows:
        probabilities, batch.vectors[rows] = handler.backend.forward(batch.images)
        voters = [catalogue.search(batch.vectors[row:row + 1], k=blend.k)[0] for row in rows]
        batch.probabilities[rows] = blend_categories(probabilities, voters, handler.classes, blend)
        for row in rows:
            batch.neighbours[row] = catalogue.search(batch.vectors[row:row + 1], k=queries[row].k,
                                                     category=queries[row].category)[0]
    for row, query in enumerate(queries):
        if query.title is None:
            continue
        text = listing_text(query.title, query.description)
        columns, values = model.features(text)
        scores = (model.coef[:, columns] @ values + model.intercept).astype(np.float32)[None]
        votes = model.listing_words.vote(model.listing_words.similarities(*model.features(text)),
                                      len(model.classes)).astype(np.float32)[None]
        photo = batch.probabilities[row:row + 1] if query.image is not None else None
        batch.probabilities[row] = model.probabilities(query.inputs, scores, photo, votes)[0]
        if query.image is not None:
            pool = catalogue.search(batch.vectors[row:row + 1], k=RERANK_POOL, category=query.category)[0]
            batch.neighbours[row] = model.listing_words.rerank(
                pool, model.listing_words.similarities(*model.features(text)), query.k)
        else:  # words alone: the listings nearest by words
            batch.neighbours[row] = found_by_words(catalogue, model.listing_words, model.classes,
                                                   model.listing_words.similarities(*model.features(text)), query.k,
                                                   query.category)
    return batch


def requests_of_every_kind(run) -> dict[str, tuple[dict, dict]]:
    """name -> (request, headers): photo, photo + title, photo + title + description, title alone, each
    with and without a category filter, k below the pool and at MAX_K (= RERANK_POOL, k's largest)."""
    a, b, c = (run.photo_bytes(f"img-{number:03d}") for number in (4, 57, 210))
    as_json = {"Content-Type": "application/json"}

    def json_body(photo, **fields):
        return {"body": {**({"image": base64.b64encode(photo).decode()} if photo else {}), **fields}}

    return {
        "photo": ({"body": a}, {"X-K": "5"}),
        "photo k=MAX_K": ({"body": a}, {"X-K": str(MAX_K)}),
        "photo + title": ({"body": a}, {"X-Title": "red spade", "X-K": "5"}),
        "photo + title + description": (json_body(b, title="old violin", description="A drum too.", k=5), as_json),
        "title": (json_body(None, title="blue sofa", k=5), as_json),
        "title, category": (json_body(None, title="blue sofa", category="Music", k=5), as_json),
        "photo, category": ({"body": c}, {"X-Category": "Garden", "X-K": "3"}),
        "photo + title, category": ({"body": c}, {"X-Title": "vintage lawnmower", "X-Category": "Home", "X-K": "4"}),
        "photo + title + description, category, k=MAX_K": (
            json_body(c, title="new guitar", description="With a lamp.", category="Music", k=MAX_K), as_json),
        "photo + title, k=MAX_K": ({"body": b}, {"X-Title": "small rake", "X-K": str(MAX_K)}),
        "empty title": (json_body(None, title=""), as_json),
    }


def answer_both_ways(handler, monkeypatch, cases: dict[str, tuple[dict, dict]]):
    """(new, before) answers of one batch of CASES, each `{name: (status, answer)}`."""
    requests_, headers = [case[0] for case in cases.values()], [case[1] for case in cases.values()]
    new = dict(zip(cases, predict_local(handler, requests_, headers)))
    with monkeypatch.context() as patch:
        patch.setattr(handler, "inference", lambda batch, *args, **kwargs: inference_before(handler, batch))
        before = dict(zip(cases, predict_local(handler, requests_, headers)))
    return new, before


def test_one_search_and_one_read_answer_every_request_as_before(handler, monkeypatch):
    handler, run, _ = handler
    assert MAX_K <= RERANK_POOL and len(handler.catalogue.listings) == 2 * LISTINGS
    cases = requests_of_every_kind(run)
    new, before = answer_both_ways(handler, monkeypatch, cases)  # all in one batch
    for name in cases:
        assert json.dumps(new[name]) == json.dumps(before[name]), name
        # each in a batch of its own (its forward pass may differ in the last bits from the batch's)
        alone = answer_both_ways(handler, monkeypatch, {name: cases[name]})
        assert json.dumps(alone[0][name]) == json.dumps(alone[1][name]), name
    # what makes the comparison able to fail: the words move listings from deep in the pool into the
    # answer, the filter holds, the words change the category's probabilities, the photo vote counts
    assert [status for status, _ in new.values()] == [200] * (len(cases) - 1) + [400]
    by_photo = [n["product_id"] for n in new["photo k=MAX_K"][1]["neighbours"]]
    reranked = [n["product_id"] for n in new["photo + title"][1]["neighbours"]]
    assert len(by_photo) == MAX_K and reranked != by_photo[:5]
    assert max(by_photo.index(p) for p in reranked) >= 20, [by_photo.index(p) for p in reranked]
    assert {n["category"] for n in new["photo + title, category"][1]["neighbours"]} == {"Home"}
    # words alone find listings by their words, the filter holds there too
    assert [n["category"] for n in new["title"][1]["neighbours"]] == ["Home"] * 5
    assert [n["category"] for n in new["title, category"][1]["neighbours"]] == ["Music"] * 5
    assert new["photo + title"][1]["top_categories"] != new["photo"][1]["top_categories"]
    assert handler.category_blend.vote_k == 20 and handler.text_model.reranks


def test_listings_nearest_by_words_join_the_photo_pool_when_the_model_fills(handler):
    handler, run, _ = handler
    listing_words, catalogue = handler.text_model.listing_words, handler.catalogue
    jpeg = run.photo_bytes("img-004")
    title = {"X-Title": "red spade", "X-K": "20"}
    (_, photo), (_, pooled) = predict_local(handler, [{"body": jpeg}] * 2, [{"X-K": str(MAX_K), "X-Embedding": "1"}, title])
    listing_words.fill = True
    try:
        (_, filled), = predict_local(handler, [{"body": jpeg}], [title])
    finally:
        listing_words.fill = False
    # the photo's pool is its 100 nearest of 150 listings: the words bring up listings from outside it
    in_pool = {n["product_id"] for n in photo["neighbours"]}
    assert len(in_pool) == RERANK_POOL and any(n["product_id"] not in in_pool for n in filled["neighbours"])
    # each answered with its photo nearest the query's and that photo's cosine, computed here from the index
    query, vectors = np.array(photo["embedding"], np.float32), catalogue.index.reconstruct_n(0, catalogue.index.ntotal)
    rows = {}
    for row, image_id in enumerate(catalogue.image_ids):
        rows.setdefault(catalogue.listings[image_id]["product_id"], []).append(row)
    for neighbour in filled["neighbours"]:
        best = max(rows[neighbour["product_id"]], key=lambda row: float(vectors[row] @ query))
        assert neighbour["image_id"] == catalogue.image_ids[best]
        assert neighbour["similarity"] == pytest.approx(float(vectors[best] @ query), abs=1e-5)
    # ranked by photo + weight x words over more candidates: each rank's score at least the pool's
    def scores(answer):
        return [n["similarity"] + listing_words.rerank_weight * n["word_similarity"] for n in answer["neighbours"]]
    assert scores(filled) == sorted(scores(filled), reverse=True) and len(scores(filled)) == 20
    assert all(f >= p - 1e-6 for f, p in zip(scores(filled), scores(pooled))) and scores(filled) != scores(pooled)
