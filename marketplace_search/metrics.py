"""The figures a model is judged by (category top-k accuracy, retrieval precision@k, per-category precision
and recall), as training.evaluate, training.text and training.guard compute and print them."""
import numpy as np

from marketplace_search.search import Catalogue

KS = (1, 5, 10)  # retrieval precision@k
FIGURES = ("top1_accuracy", "top3_accuracy", *(f"precision@{k}" for k in KS))  # an evaluation row's, the model card's
BLEND_KS = (5, 10, 20)  # the voters a category blend may read (training.evaluate tries each)


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


def own_listing_excluded_voters(catalogue: Catalogue, queries: np.ndarray, rows) -> list[list[dict]]:
    """Each query's nearest listings but its own: a photo of a listing already on sale would find itself."""
    return catalogue.search(queries, k=max(BLEND_KS), exclude_products=list(rows["product_id"]))


def per_category(predicted: np.ndarray, labels: np.ndarray, classes: list[str]) -> tuple[list[dict], np.ndarray]:
    """Precision, recall and count per category, and the confusion matrix (rows: true, columns: predicted)."""
    confusion = np.zeros((len(classes), len(classes)), np.int64)
    np.add.at(confusion, (labels, predicted), 1)
    rows = []
    for index, category in enumerate(classes):
        predicted_as, count = confusion[:, index].sum(), confusion[index].sum()
        rows.append({"category": category, "count": int(count),
                     "precision": float(confusion[index, index] / predicted_as) if predicted_as else None,
                     "recall": float(confusion[index, index] / count) if count else None})
    return rows, confusion


def print_table(rows: list[dict]) -> None:
    width = max(len(row["model"]) for row in rows)
    print(f"| {'model':<{width}} | " + " | ".join(f"{name:>13}" for name in FIGURES) + " |")
    print(f"|{'-' * (width + 2)}|" + "|".join("-" * 15 for _ in FIGURES) + "|")
    for row in rows:
        print(f"| {row['model']:<{width}} | " + " | ".join(f"{row[name]:>13.3f}" for name in FIGURES) + " |")
