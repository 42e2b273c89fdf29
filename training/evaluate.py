"""Stage 7: evaluate on the test split, against the frozen pretrained backbone.

Category accuracy (top-1, top-3) and retrieval precision@1/5/10 over the whole catalogue (a
neighbour is relevant when its listing has the query's category; the query's own listing is
excluded). The frozen backbone has no head, so its categories come from a similarity-weighted
vote of its 10 nearest train/val photos. Writes RUN/evaluation.json and prints a table.
"""
import argparse
import json
from pathlib import Path

import numpy as np
import torch

from training.dataset import load_split
from training.embed import load_embeddings
from marketplace_search.models import MarketplaceNet, load_pretrained_backbone
from marketplace_search.presets import Preprocess
from marketplace_search.layout import EVALUATION, INDEX_DIR, latest_run, read_run_info, update_run_info
from marketplace_search.search import Catalogue, make_catalogue
from training.train import cached_features, features_cache_key

KS = (1, 5, 10)


def top_k_accuracy(scores: np.ndarray, labels: np.ndarray, k: int) -> float:
    top = np.argsort(-scores, axis=1)[:, :k]
    return float((top == labels[:, None]).any(axis=1).mean()) if len(labels) else float("nan")


def retrieval_precision(catalogue: Catalogue, queries: np.ndarray, product_ids: list[str],
                        categories: list[str], ks=KS) -> dict[str, float]:
    """Mean precision@k of same-category listings, each query's own listing excluded."""
    answers = catalogue.search(queries, k=max(ks), exclude_products=product_ids)
    precision = {}
    for k in ks:
        hits = [sum(n["category"] == category for n in neighbours[:k]) / k
                for neighbours, category in zip(answers, categories)]
        precision[f"precision@{k}"] = float(np.mean(hits)) if hits else float("nan")
    return precision


def knn_scores(reference: np.ndarray, reference_labels: np.ndarray, queries: np.ndarray,
               num_classes: int, k: int = 10) -> np.ndarray:
    """(n, classes) similarity-weighted votes of the k nearest reference vectors (cosine)."""
    similarities = queries @ reference.T
    nearest = np.argsort(-similarities, axis=1)[:, :k]
    scores = np.zeros((len(queries), num_classes), np.float32)
    for row, columns in enumerate(nearest):
        np.add.at(scores[row], reference_labels[columns], similarities[row, columns])
    return scores


def scores_for(scores: np.ndarray, labels: np.ndarray, catalogue: Catalogue, queries: np.ndarray,
               test_rows) -> dict[str, float]:
    figures = {"top1_accuracy": top_k_accuracy(scores, labels, 1), "top3_accuracy": top_k_accuracy(scores, labels, 3)}
    figures.update(retrieval_precision(catalogue, queries, list(test_rows["product_id"]),
                                       [catalogue.listings[i]["category"] for i in test_rows["image_id"]]))
    return figures


def normalise(vectors: np.ndarray) -> np.ndarray:
    return vectors / np.maximum(np.linalg.norm(vectors, axis=1, keepdims=True), 1e-12)


def evaluate_baseline(run_dir: Path, work_dir: Path, split, catalogue: Catalogue, classes: list[str]) -> dict:
    """The same figures for the pretrained backbone the run started from, before any training."""
    info = read_run_info(run_dir)
    train_config = info["config"]["train"]
    model = MarketplaceNet(train_config["arch"], len(classes))
    weights = load_pretrained_backbone(model, train_config["weights"])
    preprocess = Preprocess(resize=train_config["resize"], crop=train_config["crop"])
    features = normalise(cached_features(work_dir, model.backbone, split, Path(work_dir) / "photos", 0,
                                         features_cache_key(train_config["arch"], weights, preprocess),
                                         preprocess, train_config["batch_size"], train_config["workers"]))
    frozen = make_catalogue(features, list(split["image_id"]), catalogue.listings, {}, "flat")
    is_test = (split["split"] == "test").to_numpy()
    labels = split["label"].to_numpy()
    scores = knn_scores(features[~is_test], labels[~is_test], features[is_test], len(classes))
    return {"model": f"frozen {train_config['arch']} ({Path(train_config['weights']).name}), k-NN",
            "weights": weights, **scores_for(
        scores, labels[is_test], frozen, features[is_test], split[is_test])}


def print_table(rows: list[dict]) -> None:
    columns = ["top1_accuracy", "top3_accuracy"] + [f"precision@{k}" for k in KS]
    width = max(len(row["model"]) for row in rows)
    print(f"| {'model':<{width}} | " + " | ".join(f"{name:>13}" for name in columns) + " |")
    print(f"|{'-' * (width + 2)}|" + "|".join("-" * 15 for _ in columns) + "|")
    for row in rows:
        print(f"| {row['model']:<{width}} | " + " | ".join(f"{row[name]:>13.3f}" for name in columns) + " |")


def evaluate(run_dir: Path, work_dir: Path, baseline: bool = True) -> dict:
    split = load_split(work_dir)
    image_ids, vectors, probabilities, meta = load_embeddings(run_dir)
    if image_ids != list(split["image_id"]):
        raise ValueError(f"{run_dir}/embeddings do not match {work_dir}/split.csv; re-run training.embed")
    catalogue = Catalogue.load(Path(run_dir) / INDEX_DIR)
    classes = read_run_info(run_dir)["classes"]
    is_test = (split["split"] == "test").to_numpy()
    test_rows = split[is_test]
    fine_tuned = {"model": f"fine-tuned {meta['arch']} (epoch {meta['epoch']})", **scores_for(
        probabilities[is_test], test_rows["label"].to_numpy(), catalogue, vectors[is_test], test_rows)}
    report = {"test_photos": int(is_test.sum()), "test_listings": int(test_rows["product_id"].nunique()),
              "catalogue_photos": catalogue.index.ntotal, "fine_tuned": fine_tuned}
    if baseline:
        report["frozen_backbone"] = evaluate_baseline(run_dir, work_dir, split, catalogue, classes)
    (Path(run_dir) / EVALUATION).write_text(json.dumps(report, indent=2))
    update_run_info(run_dir, evaluation={key: report[key] for key in ("test_photos", "test_listings")})
    print(f"test split: {report['test_photos']} photos of {report['test_listings']} listings; "
          f"catalogue {report['catalogue_photos']} photos")
    print_table([report[key] for key in ("fine_tuned", "frozen_backbone") if key in report])
    return report


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--work", required=True, type=Path, help="work folder with split.csv, photos/")
    parser.add_argument("--run", type=Path, help="run folder (default: the latest under WORK/model_evaluation)")
    parser.add_argument("--no-baseline", action="store_true", help="skip the frozen-backbone figures")
    args = parser.parse_args(argv)
    torch.set_grad_enabled(False)
    evaluate(args.run or latest_run(args.work), args.work, baseline=not args.no_baseline)


if __name__ == "__main__":
    main()
