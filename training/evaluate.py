"""Stage 7: evaluate on the test split, against the frozen pretrained backbone (a vote of its 10 nearest
train/val photos): category top-1/top-3 and precision@1/5/10 of same-category listings, own listing excluded.
The head may blend with its nearest listings' vote, chosen on val. Writes RUN/evaluation.json and a confusion
matrix PNG."""
import argparse
import json
from pathlib import Path

import numpy as np
import torch

from training.data import load_embeddings, load_split
from marketplace_search.inference import CategoryBlend, blend_categories, category_votes, mix_votes
from marketplace_search.memory import keep_freed_memory
from marketplace_search.metrics import (BLEND_KS, figure_cell, figures, markdown_table, own_listing_excluded_voters,
                                        per_category, print_table, retrieval_precision, top_k_accuracy)
from marketplace_search.layout import EVALUATION, INDEX_DIR, TEXT_MODEL_DIR, latest_run, read_run_info, update_run_info
from marketplace_search.models import MarketplaceNet, default_preprocess, load_pretrained_backbone
from marketplace_search.search import Catalogue, make_catalogue
from marketplace_search.runtime import pick_device
from training.trunk import autocast_dtype, cache_key, cached_outputs

CONFUSION_FILE = "confusion_matrix.png"
# The blends tried on the validation split beside BLEND_KS voters: similarity temperature, weight of the vote.
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
    from matplotlib.figure import Figure

    shares = confusion / np.maximum(confusion.sum(axis=1, keepdims=True), 1)
    figure = Figure(figsize=(10, 9))
    axis = figure.subplots()
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


def evaluate_baseline(run_dir: Path, work_dir: Path, split, catalogue: Catalogue, classes: list[str]) -> dict:
    """The same figures for the pretrained backbone the run started from, before any training."""
    train_config = read_run_info(run_dir)["config"]["train"]
    torch.manual_seed(train_config["seed"])  # as training did: with --weights none, the very same random backbone
    model = MarketplaceNet(train_config["arch"], len(classes))
    weights = load_pretrained_backbone(model, train_config["weights"])
    preprocess = default_preprocess(train_config["arch"], train_config.get("resize"), train_config.get("crop"))
    # The frozen trunk as training ran it, on the device at hand (a GPU run's fp16 means bf16 or fp32 here).
    device = pick_device("cpu" if train_config.get("device") == "cpu" else "auto")
    precision = train_config.get("precision", "fp32")
    dtype = autocast_dtype(device, "auto" if precision == "fp16" and device.type == "cpu" else precision)
    key = cache_key(model, 0, preprocess, train_config["seed"], dtype)
    features = torch.nn.functional.normalize(cached_outputs(
        work_dir, model.backbone, split, 0, key, preprocess, train_config["batch_size"], train_config["workers"],
        train_config["seed"], device, dtype).float(), dim=1).numpy()
    frozen = make_catalogue(features, list(split["image_id"]), catalogue.listings, {}, "flat")
    is_test = (split["split"] == "test").to_numpy()
    labels = split["label"].to_numpy()
    scores = knn_scores(features[~is_test], labels[~is_test], features[is_test], len(classes))
    precision = retrieval_precision(frozen, features[is_test], list(split.loc[is_test, "product_id"]),
                                    [classes[label] for label in labels[is_test]])
    return {"model": f"frozen {train_config['arch']} ({Path(train_config['weights']).name}), k-NN",
            "weights": weights, **figures(scores, labels[is_test], precision)}


def evaluate(run_dir: Path, work_dir: Path, baseline: bool = True) -> dict:
    split = load_split(work_dir)
    _, vectors, probabilities, meta = load_embeddings(run_dir, split=split)
    catalogue = Catalogue.load(Path(run_dir) / INDEX_DIR)
    info = read_run_info(run_dir)
    if "from_run" in info.get("refit", {}):  # trained on validation: no blend can be chosen on it
        raise ValueError(f"{run_dir} was made by the retired --refit-train-val; evaluate its train-only run, "
                         f"{info['refit']['from_run']}")
    classes = info["classes"]
    is_test, is_val = (split["split"] == "test").to_numpy(), (split["split"] == "val").to_numpy()
    test_rows, labels = split[is_test], split["label"].to_numpy()
    precision = retrieval_precision(catalogue, vectors[is_test], list(test_rows["product_id"]),
                                    [classes[label] for label in labels[is_test]])
    fine_tuned = {"model": f"fine-tuned {meta['arch']} (epoch {meta['epoch']})",
                  **figures(probabilities[is_test], labels[is_test], precision)}
    report = {"test_photos": int(is_test.sum()), "test_listings": int(test_rows["product_id"].nunique()),
              "catalogue_photos": catalogue.index.ntotal, "fine_tuned": fine_tuned}
    served = probabilities[is_test]
    if is_val.any():
        blend, chosen_on = choose_blend(probabilities[is_val], own_listing_excluded_voters(
            catalogue, vectors[is_val], split[is_val]), labels[is_val], classes)
        if blend.weight > 0:
            served = blend_categories(served, own_listing_excluded_voters(catalogue, vectors[is_test], test_rows),
                                      classes, blend)
            report["fine_tuned_blend"] = {"model": f"{fine_tuned['model']} + {blend.k}-NN vote (weight {blend.weight})",
                                          **figures(served, labels[is_test], precision)}
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
    cells = [[row["category"], row["count"], figure_cell(row["precision"]), figure_cell(row["recall"])]
             for row in report["per_category"]]
    print("\n" + markdown_table(["category", "count", "precision", "recall"], cells))
    if (Path(run_dir) / TEXT_MODEL_DIR).is_dir():  # its fusion was calibrated on the photo blend chosen before
        print(f"note: {Path(run_dir) / TEXT_MODEL_DIR} was calibrated on the previous evaluation's photo blend and "
              f"its rows are gone from {EVALUATION}: run training.text again (the pipeline does)")
    return report


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--work", required=True, type=Path, help="work folder with split.csv, photos/")
    parser.add_argument("--run", type=Path, help="run folder (default: the latest under WORK/model_evaluation)")
    parser.add_argument("--no-baseline", action="store_true", help="skip the frozen-backbone figures")
    args = parser.parse_args(argv)
    keep_freed_memory()
    with torch.no_grad():  # not set_grad_enabled: the pipeline runs this stage in-process, before others
        evaluate(args.run or latest_run(args.work), args.work, baseline=not args.no_baseline)


if __name__ == "__main__":
    main()
