"""The accuracy guard of a reduced precision: a candidate backend against fp32 on the test split's batches,
each one's top-1 and precision@5 and the cosine between their embeddings; a candidate more than MAX_TOP1_DROP
below fp32's top-1 fails. scripts.archive keeps its figures in RUN under everything they depend on
(`guard_key`); run alone, it prints the figures and writes nothing."""
import faiss  # noqa: F401  (before torch: both bring an OpenMP runtime, and this order is the safe one)

import argparse
import hashlib
import json
import logging
import time
from importlib import metadata
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from marketplace_search.images import decode_image
from marketplace_search.files import sha256_file, write_json_atomically
from marketplace_search.layout import CHECKPOINT, GUARD_REPORTS, INDEX_DIR
from marketplace_search.metrics import retrieval_precision, top_k_accuracy
from marketplace_search.models import load_checkpoint
from marketplace_search.presets import Preprocess, collate_images
from marketplace_search.runtime import (CPU_FEATURES, Backend, PRECISIONS, RUNTIMES, check_backend, convert_openvino,
                                        cpu_flags, openvino_backend, quantize_openvino, torch_backend)
from marketplace_search.search import Catalogue
from training.data import PHOTOS_DIR, load_split

MAX_TOP1_DROP = 0.01  # one point of top-1
GUARD_K = 5
CALIBRATION_PHOTOS = 300  # NNCF's default subset size
BATCH = 32
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp")
GUARD_LIBRARIES = ("torch", "openvino", "nncf")  # what computes the reference, the candidate and int8's ranges

log = logging.getLogger(__name__)


def photo_batches(paths: list[Path], preprocess: Preprocess, batch_size: int = BATCH):
    """Preprocessed `(n, 3, crop, crop)` batches of the photos at `paths`, in order."""
    for start in range(0, len(paths), batch_size):
        yield collate_images([decode_image(path.read_bytes()) for path in paths[start:start + batch_size]], preprocess)


def guard_rows(work_dir: Path, limit: int = 0) -> pd.DataFrame:
    """The test split's rows: all, or the first `limit` listings' photos."""
    split = load_split(work_dir)
    rows = split[split["split"] == "test"]
    if limit:
        rows = rows[rows["product_id"].isin(rows["product_id"].drop_duplicates().head(limit))]
    if rows.empty:
        raise ValueError(f"{Path(work_dir) / 'split.csv'} has no test rows to check a precision on")
    return rows


def calibration_paths(work_dir: Path | None = None, folder: Path | None = None,
                      count: int = CALIBRATION_PHOTOS, seed: int = 0) -> list[Path]:
    """Catalogue photos for int8 calibration: every photo of `folder`, or `count` train-split photos of WORK."""
    if folder is not None:
        paths = sorted(path for path in Path(folder).iterdir() if path.suffix.lower() in IMAGE_SUFFIXES)
        if not paths:
            raise ValueError(f"calibration folder {folder} holds no photos ({', '.join(IMAGE_SUFFIXES)})")
        return paths
    split = load_split(work_dir)
    train = split[split["split"] == "train"]
    if train.empty:
        raise ValueError(f"{Path(work_dir) / 'split.csv'} has no train photos to calibrate int8 with")
    chosen = train.sample(min(count, len(train)), random_state=seed)
    return [Path(work_dir) / PHOTOS_DIR / f"{image_id}.jpg" for image_id in chosen["image_id"]]


def calibration_batches(paths: list[Path], preprocess: Preprocess) -> list[torch.Tensor]:
    return list(photo_batches(paths, preprocess, batch_size=8))


def compare_many(reference: Backend, candidates: list[Backend], rows: pd.DataFrame, photos_dir: Path,
                 preprocess: Preprocess, catalogue: Catalogue) -> list[dict]:
    """Per candidate, its guard report against the reference on `rows` (each photo decoded, the reference run once)."""
    paths = [Path(photos_dir) / f"{image_id}.jpg" for image_id in rows["image_id"]]
    backends = [reference, *candidates]
    outputs, seconds = [[] for _ in backends], [0.0 for _ in backends]
    for images in photo_batches(paths, preprocess):
        for number, backend in enumerate(backends):
            started = time.perf_counter()
            outputs[number].append(backend.forward(images))  # (probabilities, vectors)
            seconds[number] += time.perf_counter() - started
    labels, product_ids = rows["label"].to_numpy(), list(rows["product_id"])
    categories = [catalogue.listings[image_id]["category"] if image_id in catalogue.listings else None
                  for image_id in rows["image_id"]]
    figures, vectors = [], []
    for number, backend in enumerate(backends):
        probabilities, embeddings = (np.concatenate(part) for part in zip(*outputs[number]))
        vectors.append(embeddings)
        figures.append({"backend": backend.name, "top1_accuracy": top_k_accuracy(probabilities, labels, 1),
                        f"precision@{GUARD_K}": retrieval_precision(catalogue, embeddings, product_ids, categories,
                                                                    ks=(GUARD_K,))[f"precision@{GUARD_K}"],
                        "forward_seconds": round(seconds[number], 2)})
    reports = []
    for number in range(1, len(backends)):
        cosine = (vectors[0] * vectors[number]).sum(axis=1)
        drop = figures[0]["top1_accuracy"] - figures[number]["top1_accuracy"]
        reports.append({"photos": len(rows), "fp32": figures[0], "candidate": figures[number], "top1_drop": drop,
                        "cosine_mean": float(cosine.mean()), "cosine_min": float(cosine.min()),
                        "max_top1_drop": MAX_TOP1_DROP, "passed": bool(drop <= MAX_TOP1_DROP + 1e-9)})
    return reports


def candidate_backend(checkpoint_path: Path, runtime: str, precision: str, preprocess: Preprocess,
                      calibration: list[torch.Tensor] | None = None, threads: int = 0):
    """`(backend, ov.Model or None)`: the candidate as the archive would ship it (its IR, for openvino)."""
    check_backend(runtime, precision)
    model, _ = load_checkpoint(checkpoint_path)
    if runtime == "torch":
        return torch_backend(model, precision), None
    converted = convert_openvino(model, preprocess.crop)
    if precision == "int8":
        if not calibration:
            raise ValueError("int8 needs calibration photos")
        converted = quantize_openvino(converted, calibration)
    return openvino_backend(converted, precision, threads), converted


def run_guard(run_dir: Path, work_dir: Path, candidate: Backend, rows: pd.DataFrame) -> dict:
    """The guard's figures for `candidate` on ROWS of WORK's test split against the run's fp32 checkpoint."""
    model, checkpoint = load_checkpoint(Path(run_dir) / CHECKPOINT)
    return compare_many(torch_backend(model, "fp32"), [candidate], rows, Path(work_dir) / PHOTOS_DIR,
                        Preprocess.from_dict(checkpoint["preprocess"]), Catalogue.load(Path(run_dir) / INDEX_DIR))[0]


def guard_key(checkpoint_path: Path, runtime: str, precision: str, rows: pd.DataFrame, photos_dir: Path,
              calibration: list[Path] | None = None) -> dict:
    """Everything a guard's pass depends on (checkpoint, backend, test and calibration photos, pass mark, libraries,
    the CPU's reduced-precision units); not the catalogue, which moves P@5, never top-1."""
    photos = hashlib.sha256()
    for image_id, label, product_id in rows[["image_id", "label", "product_id"]].itertuples(index=False):
        photos.update(f"{image_id}\t{label}\t{product_id}\t{sha256_file(Path(photos_dir) / f'{image_id}.jpg')}\n"
                      .encode())
    calibrated = None
    if calibration is not None:
        calibrated = hashlib.sha256("".join(sha256_file(path) + "\n" for path in calibration).encode()).hexdigest()
    return {"checkpoint_sha256": sha256_file(checkpoint_path), "runtime": runtime, "precision": precision,
            "test_photos": len(rows), "test_photos_sha256": photos.hexdigest(), "calibration_sha256": calibrated,
            "max_top1_drop": MAX_TOP1_DROP, "libraries": {name: package_version(name) for name in GUARD_LIBRARIES},
            "cpu_features": sorted(set(sum(CPU_FEATURES.values(), ())) & cpu_flags())}


def package_version(name: str) -> str | None:
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return None


def read_guard_reports(run_dir: Path) -> list[dict]:
    """RUN's kept guard reports; none when the file is missing or unreadable (then they are measured again)."""
    path = Path(run_dir) / GUARD_REPORTS
    try:
        reports = json.loads(path.read_text())
    except FileNotFoundError:
        return []
    except (OSError, ValueError) as error:
        log.warning("%s is unreadable (%s): guards are measured again", path, error)
        return []
    return reports if isinstance(reports, list) else []


def kept_guard(run_dir: Path, key: dict) -> dict | None:
    """The kept `{key, report, measured_on}` whose key is KEY, or None."""
    return next((kept for kept in read_guard_reports(run_dir) if kept.get("key") == key), None)


def keep_guard(run_dir: Path, key: dict, report: dict, measured_on: str) -> None:
    """Keep REPORT under KEY in RUN, replacing one kept under the same key; a read-only run only loses the reuse."""
    path = Path(run_dir) / GUARD_REPORTS
    kept = [other for other in read_guard_reports(run_dir) if other.get("key") != key]
    kept.append({"key": key, "report": report, "measured_on": measured_on})
    try:
        write_json_atomically(path, kept)
    except OSError as error:
        log.warning("could not keep the guard's report in %s (%s): the next archive measures it again", path, error)


def format_guard(report: dict) -> str:
    rows = [("", "top-1", f"P@{GUARD_K}", "forward s")]
    for role in ("fp32", "candidate"):
        figures = report[role]
        rows.append((figures["backend"], f"{figures['top1_accuracy']:.4f}", f"{figures[f'precision@{GUARD_K}']:.4f}",
                     f"{figures['forward_seconds']:.1f}" if "forward_seconds" in figures else "-"))
    lines = [f"| {a:<14} | {b:>7} | {c:>7} | {d:>9} |" for a, b, c, d in rows]
    lines.append(f"{report['photos']} test photos; top-1 drop {100 * report['top1_drop']:+.2f} points "
                 f"(limit {100 * report['max_top1_drop']:.0f}); embedding cosine mean {report['cosine_mean']:.4f}, "
                 f"min {report['cosine_min']:.4f}: {'PASS' if report['passed'] else 'FAIL'}")
    return "\n".join(lines)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run", required=True, type=Path, help="run folder (WORK/model_evaluation/<timestamp>)")
    parser.add_argument("--work", type=Path, help="work folder with split.csv and photos/ (default: RUN/../..)")
    parser.add_argument("--backends", default="openvino bf16,openvino int8",
                        help="comma separated 'RUNTIME PRECISION' pairs to check, the fp32 reference run once "
                             f"(runtimes {', '.join(RUNTIMES)}; precisions {', '.join(PRECISIONS)})")
    parser.add_argument("--calibration", type=Path, help="int8's calibration photos (default: 300 of WORK's train)")
    parser.add_argument("--limit", type=int, default=0, help="check on the first N test listings only (0: all)")
    parser.add_argument("--threads", type=int, default=0)
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    work = args.work or args.run.resolve().parents[1]
    model, checkpoint = load_checkpoint(args.run / CHECKPOINT)
    preprocess = Preprocess.from_dict(checkpoint["preprocess"])
    pairs = [tuple(item.split()) for item in args.backends.split(",") if item.strip()]
    calibration = (calibration_batches(calibration_paths(work, args.calibration), preprocess)
                   if any(precision == "int8" for _, precision in pairs) else None)
    candidates = [candidate_backend(args.run / CHECKPOINT, runtime, precision, preprocess, calibration,
                                    args.threads)[0] for runtime, precision in pairs]
    reports = compare_many(torch_backend(model, "fp32"), candidates, guard_rows(work, limit=args.limit),
                           Path(work) / PHOTOS_DIR, preprocess, Catalogue.load(Path(args.run) / INDEX_DIR))
    for report in reports:
        print(format_guard(report) + "\n")
    print(json.dumps(reports, indent=2))


if __name__ == "__main__":
    main()
