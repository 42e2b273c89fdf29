"""The accuracy gate of a release: a pinned evaluation set (photos with known categories, kept in the model store)
answered through the real server by the candidate and by the current default, both at their pinned versions. The
candidate is refused when its top-1 or P@5 falls more than MARGIN below the default's on the same photos.

  python -m scripts.gate --work WORK --store model_store --limit 200   # the set: WORK's test split"""
import argparse
import csv
import shutil
from pathlib import Path

import numpy as np

from scripts import api

EVALUATION_DIR = "evaluation"  # in the model store: what every replica's release is judged on
LABELS = "labels.csv"
K = 5  # P@5, as training.guard's figures
FIGURES = ("top1", f"precision@{K}")
MARGIN = 0.01  # one point, as the archive's accuracy guard (training.guard.MAX_TOP1_DROP)


class GateError(RuntimeError):
    """A candidate that answers the evaluation set worse than the default; carries the figures."""

    def __init__(self, message: str, figures: dict):
        super().__init__(message)
        self.figures = figures


def make_set(work: Path, store: Path, limit: int = 0) -> Path:
    """Copy WORK's test-split photos (the first LIMIT listings' when given) and their categories into the store."""
    from training.data import PHOTOS_DIR, read_training_table  # the training stages: torch, not for a release
    from training.guard import guard_rows

    rows = guard_rows(work, limit)
    table = read_training_table(work).set_index("image_id")
    folder = Path(store) / EVALUATION_DIR
    (folder / "images").mkdir(parents=True, exist_ok=True)
    with open(folder / LABELS, "w", newline="") as labels:
        writer = csv.writer(labels)
        writer.writerow(["image_id", "product_id", "category"])
        for image_id, product_id in zip(rows["image_id"], rows["product_id"]):
            shutil.copyfile(Path(work) / PHOTOS_DIR / f"{image_id}.jpg", folder / "images" / f"{image_id}.jpg")
            writer.writerow([image_id, product_id, table.loc[image_id, "category"]])
    return folder


def read_set(folder: Path) -> list[dict]:
    """The set's rows: image_id, product_id, category and the photo's bytes."""
    path = Path(folder) / LABELS
    if not path.is_file():
        raise FileNotFoundError(f"no evaluation set at {folder} ({LABELS} missing): make one with "
                                f"python -m scripts.gate --work WORK --store STORE")
    with open(path, newline="") as labels:
        rows = list(csv.DictReader(labels))
    if not rows:
        raise ValueError(f"{path} lists no photos")
    return [{**row, "photo": (Path(folder) / "images" / f"{row['image_id']}.jpg").read_bytes()} for row in rows]


def evaluate(inference_url, name: str, version: str, rows: list[dict], token: str | None = None) -> dict:
    """Top-1 and P@k of NAME VERSION's answers to ROWS, each photo's own listing left out of its neighbours."""
    from marketplace_search.metrics import answer_precision  # Faiss's import: only when a release is gated

    answers = [api.predict(inference_url, row["photo"], model=name, version=version, k=K + 2, token=token)
               for row in rows]
    neighbours = [[n for n in answer["neighbours"] if n["product_id"] != row["product_id"]][:K]
                  for answer, row in zip(answers, rows)]
    categories = [row["category"] for row in rows]
    return {"top1": float(np.mean([answer["category"] == category for answer, category in zip(answers, categories)])),
            **answer_precision(neighbours, categories, ks=(K,))}


def gate(inference_url, name: str, candidate: str, default: str | None, folder: Path, token: str | None = None,
         margin: float = MARGIN) -> dict:
    """Both versions' figures on the set; GateError when the candidate loses more than MARGIN on any of FIGURES."""
    rows = read_set(folder)
    figures = {"set": str(folder), "photos": len(rows), "margin": margin,
               "candidate": {"version": candidate, **evaluate(inference_url, name, candidate, rows, token)}}
    if default is not None:
        figures["default"] = {"version": default, **evaluate(inference_url, name, default, rows, token)}
    lost = [figure for figure in FIGURES if default is not None
            and figures["candidate"][figure] < figures["default"][figure] - margin]
    figures["passed"] = not lost
    if lost:
        raise GateError(f"{name} {candidate} answers the evaluation set worse than {default}: " + ", ".join(
            f"{figure} {figures['candidate'][figure]:.3f} < {figures['default'][figure]:.3f} - {margin:g}"
            for figure in lost), figures)
    return figures


def describe(figures: dict) -> str:
    parts = [f"{side} {figures[side]['version']}: " + ", ".join(f"{figure} {figures[side][figure]:.3f}"
                                                              for figure in FIGURES)
             for side in ("candidate", "default") if side in figures]
    return f"accuracy gate on {figures['photos']} photos: " + "; ".join(parts)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--work", type=Path, required=True, help="the training work folder (its test split)")
    parser.add_argument("--store", type=Path, default=Path("model_store"))
    parser.add_argument("--limit", type=int, default=0, help="the first LIMIT test listings' photos (default: all)")
    args = parser.parse_args(argv)
    folder = make_set(args.work, args.store, args.limit)
    print(f"evaluation set: {len(read_set(folder))} photos in {folder}")


if __name__ == "__main__":
    main()
