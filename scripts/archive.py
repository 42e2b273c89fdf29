"""Package a training run as a TorchServe model archive (.mar; docs/serving.md). Anything but torch fp32 must first
pass training.guard on WORK's test split (or be --force'd); the guard's report and the IR are kept in RUN for the
next archive of the same weights, backend, test photos and libraries. An existing archive is never replaced
without --replace."""
import faiss  # noqa: F401  (before torch: both bring an OpenMP runtime, and this order is the safe one)

import argparse
import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

import yaml

from marketplace_search.files import sha256_file
from marketplace_search.models import load_checkpoint, vector_dim
from marketplace_search.layout import (ARCHIVE_CATALOGUE, ARCHIVE_DECODER, ARCHIVE_MODEL_CARD, ARCHIVE_OPENVINO,
                                       CHECKPOINT, CORE_PACKAGE, EVALUATION, INDEX_DIR, KEPT_IR_DIR, RUN_INFO,
                                       RUN_STAMP_FORMAT, TEXT_MODEL_DIR, read_run_info)
from marketplace_search.presets import Preprocess
from marketplace_search.runtime import (OPENVINO_MODEL, PRECISIONS, RUNTIMES, check_backend, openvino_backend,
                                        save_openvino)
from marketplace_search.search import CATALOGUE_FILES, META_FILE, check_layout
from marketplace_search.text import (ENCODER_DIR as TEXT_ENCODER_DIR, MODEL_FILE as TEXT_MODEL_FILE,
                                     WEIGHTS_FILE as TEXT_WEIGHTS_FILE, TextModel)

REPO = Path(__file__).resolve().parents[1]
HANDLER = REPO / "handlers" / "marketplace_handler.py"
CORE = REPO / CORE_PACKAGE
# Dynamic batching: under load batches stay full (more photos/s), and a lone request waits only 1 ms more.
BATCH_SIZE = 8
MAX_BATCH_DELAY = 1
# The backend new archives get: the fastest on these machines within the accuracy guard.
RUNTIME = "openvino"
PRECISION = "bf16"
OUTPUT_NAME = "{name}-v{version}"  # the version in the file name: a new build never replaces another version's


class GuardRefused(ValueError):
    """A precision whose accuracy guard failed, archived only with --force."""


def check_run(run_dir: Path) -> None:
    check_layout(run_dir / INDEX_DIR)
    required = [run_dir / CHECKPOINT, run_dir / EVALUATION] + [run_dir / INDEX_DIR / name for name in CATALOGUE_FILES]
    missing = [str(path) for path in required if not path.is_file()]
    if missing:
        raise FileNotFoundError(f"run folder {run_dir} is incomplete; missing: {', '.join(missing)}")


def run_created(run_dir: Path, info: dict) -> datetime:
    """When the run was made: run.json's `created`, else the run folder's timestamp name."""
    if "created" in info:
        return datetime.fromisoformat(info["created"]).astimezone(timezone.utc)
    try:
        return datetime.strptime(run_dir.name[:17], RUN_STAMP_FORMAT).replace(tzinfo=timezone.utc)
    except ValueError as error:
        raise ValueError(f"{run_dir}: no `created` in {RUN_INFO} and the folder name is not a "
                         f"{RUN_STAMP_FORMAT} timestamp; pass --version") from error


def check_index_matches(run_dir: Path, checkpoint_sha256: str) -> dict:
    """The index meta; refuses an index whose vectors were made by another checkpoint."""
    meta = json.loads((run_dir / INDEX_DIR / META_FILE).read_text())
    indexed_with = meta.get("model", {}).get("checkpoint_sha256")
    if indexed_with and indexed_with != checkpoint_sha256:
        raise ValueError(f"{run_dir / INDEX_DIR} was built from checkpoint sha256 {indexed_with[:12]}, but "
                         f"{run_dir / CHECKPOINT} is {checkpoint_sha256[:12]}: re-run training.embed and training.index")
    return meta


def model_card(run_dir: Path, info: dict, checkpoint: dict, checkpoint_sha256: str, index_meta: dict,
               name: str, version: str, created: datetime) -> dict:
    return {
        "name": name,
        "version": version,
        "created": created.isoformat(timespec="seconds"),
        "run": run_dir.name,
        "work": str(run_dir.resolve().parents[1]),  # its tables and photos: what the search page shows
        "data": info.get("data", "unknown (no data source in run.json)"),
        "weights_source": info.get("weights_source"),
        "training": {"config": checkpoint["config"], "epoch": checkpoint["epoch"], "metrics": checkpoint["metrics"],
                     "best_epoch": info.get("train", {}).get("best_epoch")},
        "checkpoint": {"file": CHECKPOINT.name, "sha256": checkpoint_sha256, "arch": checkpoint["arch"],
                       "embedding_dim": checkpoint["embedding_dim"], "vector": checkpoint.get("vector", "embedding"),
                       "vector_dim": vector_dim(checkpoint), "preprocess": checkpoint["preprocess"]},
        "classes": checkpoint["classes"],
        "catalogue": {key: index_meta.get(key) for key in ("count", "dimension", "metric", "normalisation", "index")},
        "evaluation": json.loads((run_dir / EVALUATION).read_text()),
        "text_model": text_model_card(run_dir),
    }


def text_model_card(run_dir: Path) -> dict | None:
    """The text model's settings and test figures per input (None: the run has no text model)."""
    if not (run_dir / TEXT_MODEL_DIR).is_dir():
        return None
    info = TextModel.load(run_dir / TEXT_MODEL_DIR).info
    return {"files": {name: sha256_file(run_dir / TEXT_MODEL_DIR / name) for name in (TEXT_MODEL_FILE, TEXT_WEIGHTS_FILE)},
            **info}


def model_config(batch_size: int, max_batch_delay: int, min_workers: int, max_workers: int, response_timeout: int,
                 threads: int, warm_up: bool = True, category_blend: dict | None = None, runtime: str = "torch",
                 precision: str = "fp32", live_catalogue: Path | None = None) -> dict:
    """TorchServe's model_config.yaml; the `handler` section is read by MarketplaceHandler.initialize."""
    handler = {"warm_up": warm_up, "runtime": runtime, "precision": precision,
               **({"threads": threads} if threads else {}),
               **({"category_blend": category_blend} if category_blend else {}),
               **({"live_catalogue": str(Path(live_catalogue).resolve())} if live_catalogue else {})}
    return {"minWorkers": min_workers, "maxWorkers": max_workers, "batchSize": batch_size,
            "maxBatchDelay": max_batch_delay, "responseTimeout": response_timeout, "handler": handler}


def stage_extra_files(stage: Path, run_dir: Path, classes: list[str], card: dict) -> Path:
    """The --extra-files folder: model-archiver copies its items (and sub-folders) beside the handler."""
    extra = stage / "extra"
    extra.mkdir(exist_ok=True)  # prepare_backend may have put the OpenVINO IR there
    # The core package whole, so workers and --local run the code this archive was built with.
    shutil.copytree(CORE, extra / CORE_PACKAGE, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    (extra / ARCHIVE_CATALOGUE).mkdir()
    for name in CATALOGUE_FILES:
        shutil.copyfile(run_dir / INDEX_DIR / name, extra / ARCHIVE_CATALOGUE / name)
    if (run_dir / TEXT_MODEL_DIR).is_dir():
        (extra / TEXT_MODEL_DIR).mkdir()
        for name in (TEXT_MODEL_FILE, TEXT_WEIGHTS_FILE):
            shutil.copyfile(run_dir / TEXT_MODEL_DIR / name, extra / TEXT_MODEL_DIR / name)
        if (run_dir / TEXT_MODEL_DIR / TEXT_ENCODER_DIR).is_dir():  # its sentence encoder, when it has one
            shutil.copytree(run_dir / TEXT_MODEL_DIR / TEXT_ENCODER_DIR, extra / TEXT_MODEL_DIR / TEXT_ENCODER_DIR)
    (extra / ARCHIVE_DECODER).write_text(json.dumps({str(i): name for i, name in enumerate(classes)}, indent=2))
    (extra / ARCHIVE_MODEL_CARD).write_text(json.dumps(card, indent=2, sort_keys=True, default=str))
    return extra


def run_archiver(stage: Path, name: str, version: str, checkpoint: Path, extra: Path, config_file: Path) -> Path:
    """torch-model-archiver in a child process whose TMPDIR is ours: it stages in TMPDIR/<name>."""
    out = stage / "out"
    tmp = stage / "tmp"
    out.mkdir()
    tmp.mkdir()
    command = [sys.executable, "-m", "model_archiver.model_packaging", "--model-name", name, "--version", version,
               "--serialized-file", str(checkpoint), "--handler", str(HANDLER), "--extra-files", str(extra),
               "--config-file", str(config_file), "--export-path", str(out), "--force",
               "--archive-format", "zip-store"]  # weights barely compress (8 %); deflating them took seconds
    result = subprocess.run(command, env={**os.environ, "TMPDIR": str(tmp), "TEMP": str(tmp)},
                            capture_output=True, text=True)
    if result.returncode != 0:
        raise RuntimeError(f"torch-model-archiver failed ({result.returncode}):\n{result.stderr[-3000:]}")
    return out / f"{name}.mar"


def prepare_backend(run_dir: Path, extra: Path, runtime: str, precision: str, preprocess: Preprocess,
                    work_dir: Path | None, calibration: Path | None, force: bool, guard_limit: int,
                    threads: int, check: bool = True, reuse_guard: bool = True) -> dict:
    """Convert (openvino: the IR into extra/openvino/), run or reuse the accuracy guard and return the model card's
    `inference` section; raises GuardRefused for a failed guard without `force`."""
    from training import guard  # the guard's data and OpenVINO/NNCF are needed only here

    section = {"runtime": runtime, "precision": precision}
    if (runtime, precision) == ("torch", "fp32"):
        return {**section, "guard": "not needed: the fp32 reference itself"}
    work_dir = Path(work_dir) if work_dir else run_dir.resolve().parents[1]
    paths = None
    if precision == "int8":
        paths = guard.calibration_paths(work_dir, calibration)
        section["calibration"] = {"photos": len(paths), "source": str(calibration) if calibration else
                                  f"{len(paths)} train-split photos of {work_dir} (seed 0)"}
    started = time.perf_counter()
    ir_dir = kept_ir(run_dir, precision, paths) if runtime == "openvino" else None
    if ir_dir is not None and ir_dir.is_dir():
        candidate = openvino_backend(ir_dir / OPENVINO_MODEL, precision, threads)
        print(f"{runtime} {precision}: the IR kept in {ir_dir} (same weights, calibration and libraries)")
    else:
        candidate, converted = guard.candidate_backend(run_dir / CHECKPOINT, runtime, precision, preprocess,
                                                       paths and guard.calibration_batches(paths, preprocess), threads)
        print(f"{runtime} {precision}: prepared in {time.perf_counter() - started:.1f} s", flush=True)
        if ir_dir is not None:
            ir_dir.parent.mkdir(exist_ok=True)
            with tempfile.TemporaryDirectory(dir=ir_dir.parent) as staged:
                save_openvino(converted, Path(staged) / "ir")
                try:
                    os.replace(Path(staged) / "ir", ir_dir)  # whole or not at all
                except OSError:
                    if not ir_dir.is_dir():  # else a concurrent build kept the same IR first
                        raise
    if ir_dir is not None:
        shutil.copytree(ir_dir, extra / ARCHIVE_OPENVINO)
    if not check:
        return {**section, "guard": "not run (--no-guard): accuracy against fp32 unchecked"}
    rows = guard.guard_rows(work_dir, limit=guard_limit)
    key = guard.guard_key(run_dir / CHECKPOINT, runtime, precision, rows, work_dir / guard.PHOTOS_DIR, paths)
    kept = guard.kept_guard(run_dir, key) if reuse_guard else None
    if kept is None:
        report, measured_on = guard.run_guard(run_dir, work_dir, candidate, rows), str(run_dir.resolve())
        guard.keep_guard(run_dir, key, report, measured_on)
    else:
        report, measured_on = kept["report"], kept["measured_on"]
        print(f"accuracy guard: kept from {measured_on} (same weights, backend, test photos and libraries)")
    print(guard.format_guard(report))
    # timings would make two builds from one run differ
    report = {**report, **{role: {name: value for name, value in report[role].items() if name != "forward_seconds"}
                           for role in ("fp32", "candidate")}}
    section.update(guard={**report, "split": "test", "work": str(work_dir), "limit_listings": guard_limit or None,
                          "measured_on": measured_on},
                   forced=bool(force and not report["passed"]))
    if not report["passed"] and not force:
        raise GuardRefused(f"{runtime} {precision} loses {100 * report['top1_drop']:.2f} points of top-1 against "
                           f"fp32 on {report['photos']} test photos (limit {100 * guard.MAX_TOP1_DROP:.0f}): "
                           f"not archived (--force to archive it anyway)")
    return section


def kept_ir(run_dir: Path, precision: str, calibration: list[Path] | None) -> Path:
    """RUN/openvino_ir/<key>: the IR of RUN's weights kept for the next build, keyed by all the conversion read."""
    from training.guard import GUARD_LIBRARIES, package_version

    key = {"checkpoint_sha256": sha256_file(run_dir / CHECKPOINT), "int8": precision == "int8",
           "calibration": [sha256_file(path) for path in calibration or ()],
           "libraries": {name: package_version(name) for name in GUARD_LIBRARIES}}
    return run_dir / KEPT_IR_DIR / hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]


def archive_path(store: Path, name: str, version: str, output_name: str = OUTPUT_NAME, replace: bool = False,
                 other_names: str = "--version or --output-name") -> Path:
    """STORE/<output_name>.mar; FileExistsError when it exists and not `replace` (OTHER_NAMES: what to change)."""
    target = Path(store) / f"{output_name.format(name=name, version=version)}.mar"
    if target.exists() and not replace:
        raise FileExistsError(f"{target} exists (version {version} is taken): choose a new {other_names}, or pass "
                              f"--replace to replace it")
    return target


def build_archive(run_dir: Path | str, store: Path | str, name: str = "marketplace", version: str | None = None,
                  output_name: str = OUTPUT_NAME, batch_size: int = BATCH_SIZE, max_batch_delay: int = MAX_BATCH_DELAY,
                  min_workers: int = 1, max_workers: int = 1, response_timeout: int = 120, threads: int = 0,
                  warm_up: bool = True, category_blend: bool = True, runtime: str = "torch", precision: str = "fp32",
                  force: bool = False, work_dir: Path | str | None = None, calibration: Path | str | None = None,
                  guard_limit: int = 0, guard: bool = True, live_catalogue: Path | None = None,
                  reuse_guard: bool = True, replace: bool = False) -> Path:
    """Build STORE/<output_name>.mar from a run folder (backend: the fp32 reference unless asked, unlike the CLI)."""
    run_dir, store = Path(run_dir), Path(store)
    check_run(run_dir)
    if not store.is_dir():
        raise FileNotFoundError(f"model store {store} is not a folder")
    info = read_run_info(run_dir)
    _, checkpoint = load_checkpoint(run_dir / CHECKPOINT)
    check_backend(runtime, precision)
    checkpoint_sha256 = sha256_file(run_dir / CHECKPOINT)
    index_meta = check_index_matches(run_dir, checkpoint_sha256)
    created = run_created(run_dir, info)
    version = version or created.strftime("%Y%m%d.%H%M%S")  # sorts with time, a number TorchServe accepts
    card = model_card(run_dir, info, checkpoint, checkpoint_sha256, index_meta, name, version, created)
    target = archive_path(store, name, version, output_name, replace)
    if target.exists():
        print(f"replacing {target} (--replace)", flush=True)
    with tempfile.TemporaryDirectory(prefix="archive-") as stage:
        stage = Path(stage)
        card["inference"] = prepare_backend(run_dir, stage / "extra", runtime, precision,
                                            Preprocess.from_dict(checkpoint["preprocess"]), work_dir,
                                            calibration and Path(calibration), force, guard_limit, threads, guard,
                                            reuse_guard)
        extra = stage_extra_files(stage, run_dir, checkpoint["classes"], card)
        config_file = stage / "model_config.yaml"
        # The category blend training.evaluate chose on the validation split, if it beat the head alone.
        blend = card["evaluation"].get("category_blend") if category_blend else None
        config = model_config(batch_size, max_batch_delay, min_workers, max_workers, response_timeout, threads,
                              warm_up, blend and {key: blend[key] for key in ("k", "temperature", "weight")},
                              runtime, precision, live_catalogue)
        config_file.write_text(yaml.safe_dump(config, sort_keys=True))
        built = run_archiver(stage, name, version, run_dir / CHECKPOINT, extra, config_file)
        shutil.move(str(built), target)
    return target


def add_serving_arguments(parser: argparse.ArgumentParser) -> None:
    """The archive's options that scripts.refresh passes on as well."""
    parser.add_argument("--batch-size", type=int, default=BATCH_SIZE,
                        help="largest dynamic batch (default 8; 1: no batching)")
    parser.add_argument("--max-batch-delay", type=int, default=MAX_BATCH_DELAY,
                        help="ms a worker waits for more requests once one is queued")
    parser.add_argument("--live-catalogue", type=Path,
                        help="a live catalogue folder (python -m scripts.catalogue) the workers follow instead of "
                             "the bundled snapshot, once it holds a generation embedded by these weights")
    parser.add_argument("--runtime", choices=RUNTIMES, default=RUNTIME,
                        help=f"inference backend (default {RUNTIME}; marketplace_search.runtime)")
    parser.add_argument("--precision", choices=PRECISIONS, default=PRECISION,
                        help=f"inference precision (default {PRECISION}; int8 with --runtime openvino); anything "
                             "but torch fp32 must pass the accuracy guard on the run's test split")
    parser.add_argument("--reuse-guard", action=argparse.BooleanOptionalAction, default=True,
                        help="reuse the guard's report RUN keeps (RUN/guard_reports.json) when the weights, backend, "
                             "test photos, calibration and libraries are the same (--no-reuse-guard: measure again)")


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run", dest="run_dir", metavar="RUN", required=True, type=Path,
                        help="run folder (WORK/model_evaluation/<timestamp>)")
    parser.add_argument("--name", default="marketplace", help="model name (URL path /predictions/NAME)")
    parser.add_argument("--version", help="model version, e.g. 1.0 (default: the run's timestamp, 20250131.142233)")
    parser.add_argument("--store", default=Path("model_store"), type=Path, help="model store folder")
    parser.add_argument("--output-name", default=OUTPUT_NAME,
                        help="archive file name without .mar; {name} and {version} are filled in")
    parser.add_argument("--replace", action="store_true", help="replace an archive of the same file name")
    add_serving_arguments(parser)
    parser.add_argument("--min-workers", type=int, default=1)
    parser.add_argument("--max-workers", type=int, default=1)
    parser.add_argument("--response-timeout", type=int, default=120, help="seconds")
    parser.add_argument("--threads", type=int, default=0, help="torch threads per worker (0: cores / max workers)")
    parser.add_argument("--warm-up", action=argparse.BooleanOptionalAction, default=True,
                        help="workers run one forward pass per batch size before READY (oneDNN builds kernels "
                             "per input shape)")
    parser.add_argument("--category-blend", action=argparse.BooleanOptionalAction, default=True,
                        help="serve the category blend of head and catalogue neighbours that training.evaluate "
                             "chose on the validation split (RUN/evaluation.json), if any")
    parser.add_argument("--work", dest="work_dir", metavar="WORK", type=Path,
                        help="work folder with split.csv and photos/ for the guard and int8 calibration "
                             "(default: RUN/../..)")
    parser.add_argument("--calibration", type=Path, help="folder of photos to calibrate int8 on "
                                                         "(default: 300 train-split photos of WORK)")
    parser.add_argument("--guard-limit", type=int, default=0,
                        help="run the guard on the first N test listings only (0: the whole test split)")
    parser.add_argument("--force", action="store_true", help="archive a precision that failed the accuracy guard")
    parser.add_argument("--guard", action=argparse.BooleanOptionalAction, default=True,
                        help="check the precision against fp32 on the test split (--no-guard: unchecked, and the "
                             "model card says so)")
    try:
        target = build_archive(**vars(parser.parse_args(argv)))  # each option is one of its arguments
    except (FileExistsError, GuardRefused) as error:
        raise SystemExit(f"refused: {error}") from error
    print(f"{target} ({target.stat().st_size / 1e6:.1f} MB)")


if __name__ == "__main__":
    main()
