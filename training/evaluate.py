"""Stage 7: evaluate on the test split, against the frozen pretrained backbone.

Category accuracy (top-1, top-3) and retrieval precision@1/5/10 over the whole catalogue (a
neighbour is relevant when its listing has the query's category; the query's own listing is
excluded). The frozen backbone has no head, so its categories come from a similarity-weighted
vote of its 10 nearest train/val photos.

The category the service answers can also blend the head with a vote of the query's nearest
catalogue listings (marketplace_search.inference.CategoryBlend): the blend is chosen on the
validation split (own listings excluded, as for test), reported on test, and recorded for the archive.
Per category: precision, recall and count of the served category on test, and a confusion matrix PNG.
Writes RUN/evaluation.json, RUN/confusion_matrix.png and prints the tables.
"""
import argparse
import json
from pathlib import Path

import numpy as np
import torch

from training.data import load_embeddings, load_split
from marketplace_search.inference import CategoryBlend, blend_categories, category_votes, mix_votes
from marketplace_search.memory import keep_freed_memory
from marketplace_search.metrics import (BLEND_KS, own_listing_excluded_voters, per_category, print_table,
                                        retrieval_precision, top_k_accuracy)
from marketplace_search.layout import EVALUATION, INDEX_DIR, TEXT_MODEL_DIR, latest_run, read_run_info, update_run_info
from marketplace_search.models import MarketplaceNet, default_preprocess, load_pretrained_backbone
from marketplace_search.search import Catalogue, make_catalogue
from marketplace_search.runtime import pick_device
from training.trunk import autocast_dtype, cache_key, cached_outputs

CONFUSION_FILE = "confusion_matrix.png"
# The blends tried on the validation split (voters: BLEND_KS): temperature of the similarity weights, weight
# of the vote.
BLEND_TEMPERATURES = (0.05, 0.1, 1.0)
BLEND_WEIGHTS = tuple(round(0.1 * step, 1) for step in range(11))


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


def choose_blend(probabilities: np.ndarray, voters: list[list[dict]], labels: np.ndarray,
                 classes: list[str]) -> tuple[CategoryBlend, dict]:
    """The blend with the best validation top-1 (ties: the smaller weight), and the grid it was chosen from."""
    grid = {}
    for k in BLEND_KS:
        for temperature in BLEND_TEMPERATURES:
            votes = category_votes(voters, classes, k, temperature)
            for weight in BLEND_WEIGHTS:
                grid[CategoryBlend(k, temperature, weight)] = top_k_accuracy(
                    mix_votes(probabilities, votes, weight), labels, 1)
    best = max(grid, key=lambda blend: (grid[blend], -blend.weight))
    return best, {"val_top1_head": grid[CategoryBlend(BLEND_KS[0], BLEND_TEMPERATURES[0], 0.0)],
                  "val_top1_blend": grid[best]}


def plot_confusion(confusion: np.ndarray, classes: list[str], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot as plt

    shares = confusion / np.maximum(confusion.sum(axis=1, keepdims=True), 1)
    figure, axis = plt.subplots(figsize=(10, 9))
    image = axis.imshow(shares, cmap="Blues", vmin=0, vmax=1)
    axis.set_xticks(range(len(classes)), classes, rotation=60, ha="right", fontsize=8)
    axis.set_yticks(range(len(classes)), classes, fontsize=8)
    for (row, column), count in np.ndenumerate(confusion):
        if count:
            axis.text(column, row, str(count), ha="center", va="center", fontsize=7,
                      color="white" if shares[row, column] > 0.5 else "black")
    axis.set_xlabel("predicted")
    axis.set_ylabel("true")
    axis.set_title(title)
    figure.colorbar(image, ax=axis, fraction=0.046, label="share of the true category")
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)


def normalise(vectors: np.ndarray) -> np.ndarray:
    return vectors / np.maximum(np.linalg.norm(vectors, axis=1, keepdims=True), 1e-12)


def evaluate_baseline(run_dir: Path, work_dir: Path, split, catalogue: Catalogue, classes: list[str]) -> dict:
    """The same figures for the pretrained backbone the run started from, before any training."""
    info = read_run_info(run_dir)
    train_config = info["config"]["train"]
    torch.manual_seed(train_config["seed"])  # as training did: with --weights none, the very same random backbone
    model = MarketplaceNet(train_config["arch"], len(classes))
    weights = load_pretrained_backbone(model, train_config["weights"])
    preprocess = default_preprocess(train_config["arch"], train_config.get("resize"), train_config.get("crop"))
    # The frozen trunk as training ran it, on the device at hand (a GPU run's fp16 means bf16 or fp32 here).
    device = pick_device("cpu" if train_config.get("device") == "cpu" else "auto")
    precision = train_config.get("precision", "fp32")
    dtype = autocast_dtype(device, "auto" if precision == "fp16" and device.type == "cpu" else precision)
    key = cache_key(model, 0, preprocess, train_config["seed"], dtype)
    features = normalise(cached_outputs(work_dir, model.backbone, split, Path(work_dir) / "photos", 0, key,
                                        preprocess, train_config["batch_size"], train_config["workers"],
                                        train_config["seed"], device, dtype).float().numpy())
    frozen = make_catalogue(features, list(split["image_id"]), catalogue.listings, {}, "flat")
    is_test = (split["split"] == "test").to_numpy()
    labels = split["label"].to_numpy()
    scores = knn_scores(features[~is_test], labels[~is_test], features[is_test], len(classes))
    return {"model": f"frozen {train_config['arch']} ({Path(train_config['weights']).name}), k-NN",
            "weights": weights, **scores_for(
        scores, labels[is_test], frozen, features[is_test], split[is_test])}


def evaluate(run_dir: Path, work_dir: Path, baseline: bool = True, blend_from: Path | None = None) -> dict:
    """`blend_from`: serve the blend that run chose on validation (a refit has trained on validation)."""
    split = load_split(work_dir)
    image_ids, vectors, probabilities, meta = load_embeddings(run_dir)
    if image_ids != list(split["image_id"]):
        raise ValueError(f"{run_dir}/embeddings do not match {work_dir}/split.csv; re-run training.embed")
    catalogue = Catalogue.load(Path(run_dir) / INDEX_DIR)
    info = read_run_info(run_dir)
    classes = info["classes"]
    is_test, is_val = (split["split"] == "test").to_numpy(), (split["split"] == "val").to_numpy()
    test_rows, labels = split[is_test], split["label"].to_numpy()
    fine_tuned = {"model": f"fine-tuned {meta['arch']} (epoch {meta['epoch']})", **scores_for(
        probabilities[is_test], labels[is_test], catalogue, vectors[is_test], test_rows)}
    report = {"test_photos": int(is_test.sum()), "test_listings": int(test_rows["product_id"].nunique()),
              "catalogue_photos": catalogue.index.ntotal, "fine_tuned": fine_tuned,
              **({"refit": info["refit"]} if "refit" in info else {})}  # trained on train + val (training.refit)
    served = probabilities[is_test]
    if blend_from is not None:
        chosen = json.loads((Path(blend_from) / EVALUATION).read_text()).get("category_blend")
        blend = CategoryBlend.from_dict(chosen)
        chosen_on = {**{key: value for key, value in (chosen or {}).items() if key.startswith("val_")},
                     "chosen_by_run": str(Path(blend_from).resolve())}
    elif is_val.any():
        blend, chosen_on = choose_blend(probabilities[is_val], own_listing_excluded_voters(
            catalogue, vectors[is_val], split[is_val]), labels[is_val], classes)
    if blend_from is not None or is_val.any():
        if blend.weight > 0:
            served = blend_categories(served, own_listing_excluded_voters(catalogue, vectors[is_test], test_rows),
                                      classes, blend)
            report["fine_tuned_blend"] = {
                **fine_tuned, "model": f"{fine_tuned['model']} + {blend.k}-NN vote (weight {blend.weight})",
                "top1_accuracy": top_k_accuracy(served, labels[is_test], 1),
                "top3_accuracy": top_k_accuracy(served, labels[is_test], 3)}
        report["category_blend"] = {**blend.to_dict(), **chosen_on}
    report["per_category"], confusion = per_category(served.argmax(axis=1), labels[is_test], classes)
    plot_confusion(confusion, classes, Path(run_dir) / CONFUSION_FILE,
                   f"test split, {'head + neighbours' if 'fine_tuned_blend' in report else 'head'}: "
                   f"top-1 {top_k_accuracy(served, labels[is_test], 1):.3f}")
    if baseline:
        report["frozen_backbone"] = evaluate_baseline(run_dir, work_dir, split, catalogue, classes)
    (Path(run_dir) / EVALUATION).write_text(json.dumps(report, indent=2))
    update_run_info(run_dir, evaluation={key: report[key] for key in ("test_photos", "test_listings")})
    print(f"test split: {report['test_photos']} photos of {report['test_listings']} listings; "
          f"catalogue {report['catalogue_photos']} photos")
    print_table([report[key] for key in ("fine_tuned", "fine_tuned_blend", "frozen_backbone") if key in report])
    if "category_blend" in report:
        print(f"category blend chosen on val: {report['category_blend']}")
    print_per_category(report["per_category"])
    if (Path(run_dir) / TEXT_MODEL_DIR).is_dir():  # its fusion was calibrated on the photo blend chosen before
        print(f"note: {Path(run_dir) / TEXT_MODEL_DIR} was calibrated on the previous evaluation's photo blend and "
              f"its rows are gone from {EVALUATION}: run training.text again (the pipeline does)")
    return report


def print_per_category(rows: list[dict]) -> None:
    width = max(len(row["category"]) for row in rows)
    print(f"\n| {'category':<{width}} | count | precision | recall |")
    print(f"|{'-' * (width + 2)}|-------|-----------|--------|")
    for row in rows:
        cells = [f"{row[name]:.3f}" if row[name] is not None else "–" for name in ("precision", "recall")]
        print(f"| {row['category']:<{width}} | {row['count']:>5} | {cells[0]:>9} | {cells[1]:>6} |")


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--work", required=True, type=Path, help="work folder with split.csv, photos/")
    parser.add_argument("--run", type=Path, help="run folder (default: the latest under WORK/model_evaluation)")
    parser.add_argument("--no-baseline", action="store_true", help="skip the frozen-backbone figures")
    parser.add_argument("--blend-from", type=Path, metavar="RUN",
                        help="serve the category blend RUN chose on validation instead of choosing one here")
    args = parser.parse_args(argv)
    keep_freed_memory()
    torch.set_grad_enabled(False)
    evaluate(args.run or latest_run(args.work), args.work, baseline=not args.no_baseline, blend_from=args.blend_from)


if __name__ == "__main__":
    main()
