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


def figures(scores: np.ndarray, labels: np.ndarray, precision: dict[str, float] | None = None) -> dict[str, float]:
    """An evaluation row: top-1 and top-3 accuracy of SCORES, and PRECISION (NaN without one)."""
    return {"top1_accuracy": top_k_accuracy(scores, labels, 1), "top3_accuracy": top_k_accuracy(scores, labels, 3),
            **(precision or {f"precision@{k}": float("nan") for k in KS})}


def answer_precision(answers: list[list[dict]], categories: list[str], ks=KS) -> dict[str, float]:
    """Mean precision@k of same-category listings among each query's answered neighbours."""
    precision = {}
    for k in ks:
        hits = [sum(n["category"] == category for n in neighbours[:k]) / k
                for neighbours, category in zip(answers, categories)]
        precision[f"precision@{k}"] = float(np.mean(hits)) if hits else float("nan")
    return precision


def retrieval_precision(catalogue: Catalogue, queries: np.ndarray, product_ids: list[str],
                        categories: list[str], ks=KS) -> dict[str, float]:
    """answer_precision of the catalogue's neighbours, each query's own listing excluded."""
    return answer_precision(catalogue.search(queries, k=max(ks), exclude_products=product_ids), categories, ks)


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


def markdown_table(header: list[str], rows: list[list]) -> str:
    """A markdown table of HEADER and ROWS, each column padded to its widest cell."""
    cells = [[str(cell) for cell in row] for row in [header, *rows]]
    widths = [max(len(row[column]) for row in cells) for column in range(len(header))]
    lines = ["| " + " | ".join(cell.ljust(width) for cell, width in zip(row, widths)) + " |" for row in cells]
    return "\n".join([lines[0], "|" + "|".join("-" * (width + 2) for width in widths) + "|", *lines[1:]])


def figure_cell(value: float | None) -> str:
    return "–" if value is None else f"{value:.3f}"


def print_table(rows: list[dict]) -> None:
    """Evaluation rows ({"model", *FIGURES}) as a markdown table."""
    print(markdown_table(["model", *FIGURES], [[row["model"], *(figure_cell(row[key]) for key in FIGURES)]
                                               for row in rows]))
