"""A batch of photo and words requests: one search per category filter, each request's words read once."""
import base64
import dataclasses

import numpy as np
import pytest

from handlers.local import load_local_handler, predict_local
from marketplace_search.layout import TEXT_MODEL_DIR
from marketplace_search.search import MAX_K
from marketplace_search.text import RERANK_POOL, ListingWords
from tests.serving_fixtures import archive_tiny_run, extract_archive, make_tiny_run
from training.tiny_run import CLASSES, TINY_ADJECTIVES, TINY_WORDS, make_tiny_text_model

LISTINGS = 150  # more than RERANK_POOL: the pool's depth decides which listings the words can bring up
pytestmark = pytest.mark.slow  # a 150-listing archive


@pytest.fixture(scope="module")
def handler(module_tmp):
    """(handler, run): the in-process handler of a tiny archive whose text model re-ranks by words (a vote
    catalogue over the archive's own listings) and whose photo answer blends a 20-NN vote."""
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
    # the tiny run's evaluation chose no blend: a filtered request's vote then needs a search of its own
    loaded.category_blend = dataclasses.replace(loaded.category_blend, k=20, temperature=0.1, weight=0.3)
    return loaded, run


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
        "photo + title": ({"body": a}, {"X-Title": "red spade", "X-K": "5", "X-Embedding": "1"}),
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


def test_one_search_per_filter_and_one_read_of_the_words_answer_every_kind_of_request(handler, monkeypatch):
    handler, run = handler
    catalogue, model = handler.catalogue, handler.text_model
    searches, reads = [], []
    search, features = catalogue.search, model.features

    def counted_search(queries, k=10, category=None, **options):
        searches.append((len(queries), k, category))
        return search(queries, k=k, category=category, **options)

    monkeypatch.setattr(catalogue, "search", counted_search)
    monkeypatch.setattr(model, "features", lambda text: reads.append(text) or features(text))
    cases = requests_of_every_kind(run)
    answers = dict(zip(cases, predict_local(handler, [case[0] for case in cases.values()],
                                            [case[1] for case in cases.values()])))
    assert [status for status, _ in answers.values()] == [200] * (len(cases) - 1) + [400]
    # one search per filter, deep enough for the words' pool (RERANK_POOL), and one for the filtered ones' vote
    assert sorted(searches, key=str) == sorted([(5, RERANK_POOL, None), (1, 3, "Garden"), (1, RERANK_POOL, "Home"),
                                                (1, RERANK_POOL, "Music"), (3, 20, None)], key=str)
    assert len(reads) == 7  # each request's words read once, for its category and its neighbours alike
    # the words re-rank the photo's pool of RERANK_POOL, bringing listings up from deep in it
    by_photo = [n["product_id"] for n in answers["photo k=MAX_K"][1]["neighbours"]]
    worded = answers["photo + title"][1]
    vector = np.array([worded["embedding"]], np.float32)
    expected = model.listing_words.rerank(search(vector, k=RERANK_POOL)[0], model.read("red spade").similarities, 5)
    assert worded["neighbours"] == expected and len(by_photo) == MAX_K
    assert max(by_photo.index(n["product_id"]) for n in worded["neighbours"]) >= 20
    assert worded["top_categories"] != answers["photo"][1]["top_categories"]  # the words count in the category
    assert {n["category"] for n in answers["photo + title, category"][1]["neighbours"]} == {"Home"}
    assert [n["category"] for n in answers["title"][1]["neighbours"]] == ["Home"] * 5
    assert [n["category"] for n in answers["title, category"][1]["neighbours"]] == ["Music"] * 5


def test_listings_nearest_by_words_join_the_photo_pool_when_the_model_fills(handler, monkeypatch):
    handler, run = handler
    listing_words, catalogue = handler.text_model.listing_words, handler.catalogue
    jpeg = run.photo_bytes("img-004")
    title = {"X-Title": "red spade", "X-K": "20"}
    (_, photo), (_, pooled) = predict_local(handler, [{"body": jpeg}] * 2,
                                            [{"X-K": str(MAX_K), "X-Embedding": "1"}, title])
    monkeypatch.setattr(listing_words, "fill", True)
    [(_, filled)] = predict_local(handler, [{"body": jpeg}], [title])
    # the photo's pool is its 100 nearest of 150 listings: the words bring up listings from outside it
    in_pool = {n["product_id"] for n in photo["neighbours"]}
    assert len(in_pool) == RERANK_POOL and any(n["product_id"] not in in_pool for n in filled["neighbours"])
    # each answered with its photo nearest the query and that cosine (listings_of's, checked in test_search.py)
    expected = catalogue.listings_of([n["product_id"] for n in filled["neighbours"]], np.array(photo["embedding"]))
    for neighbour in filled["neighbours"]:
        assert neighbour["image_id"] == expected[neighbour["product_id"]]["image_id"]
        assert neighbour["similarity"] == pytest.approx(expected[neighbour["product_id"]]["similarity"], abs=1e-5)
    # ranked by photo + weight x words over more candidates: each rank's score at least the pool's
    def scores(answer):
        return [n["similarity"] + listing_words.rerank_weight * n["word_similarity"] for n in answer["neighbours"]]
    assert scores(filled) == sorted(scores(filled), reverse=True) and len(scores(filled)) == 20
    assert all(f >= p - 1e-6 for f, p in zip(scores(filled), scores(pooled))) and scores(filled) != scores(pooled)
