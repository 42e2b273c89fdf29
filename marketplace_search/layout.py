"""Where things live: the files of a training run (WORK/model_evaluation/<timestamp>/) and of a model archive
(.mar, which also holds the handler module and this package whole), and run.json (what each stage did)."""
import json
from datetime import datetime, timezone
from pathlib import Path

from marketplace_search.files import write_json_atomically

RUNS_DIR = "model_evaluation"
RUN_INFO = "run.json"
RUN_STAMP_FORMAT = "%Y-%m-%d_%H%M%S"
WEIGHTS_DIR = "weights"
BEST_CHECKPOINT = "best.pt"
CHECKPOINT = Path(WEIGHTS_DIR) / BEST_CHECKPOINT
TENSORBOARD_DIR = "logs"
EMBEDDINGS_DIR = "embeddings"
INDEX_DIR = "index"
EVALUATION = "evaluation.json"
GUARD_REPORTS = "guard_reports.json"  # the accuracy guards measured on a run's weights (training.guard)
KEPT_IR_DIR = "openvino_ir"  # the OpenVINO IRs converted from a run's weights, one folder a key (scripts.archive)

ARCHIVE_CHECKPOINT = BEST_CHECKPOINT
ARCHIVE_CATALOGUE = "catalogue"
ARCHIVE_DECODER = "decoder.json"
ARCHIVE_MODEL_CARD = "model_card.json"
ARCHIVE_OPENVINO = "openvino"  # the OpenVINO IR of an archive built with --runtime openvino
ARCHIVE_MANIFEST = Path("MAR-INF") / "MANIFEST.json"
TEXT_MODEL_DIR = "text_model"  # in a run folder and in an archive (marketplace_search.text; training.text)
ARCHIVE_TEXT_MODEL = TEXT_MODEL_DIR
CORE_PACKAGE = __name__.split(".")[0]


def archive_file(model_dir: Path, name: Path | str) -> Path:
    """MODEL_DIR/NAME, a file of an extracted archive; FileNotFoundError naming it when it is missing."""
    path = Path(model_dir) / name
    if not path.exists():
        raise FileNotFoundError(f"{name} is missing from the model folder {model_dir} "
                                f"(rebuild the archive with scripts.archive)")
    return path


def epoch_checkpoint(run_dir: Path, epoch: int) -> Path:
    return Path(run_dir) / WEIGHTS_DIR / f"epoch_{epoch}.pt"


def new_run_dir(work_dir: Path) -> Path:
    stamp = datetime.now().strftime(RUN_STAMP_FORMAT)
    run_dir = Path(work_dir) / RUNS_DIR / stamp
    suffix = 1
    while run_dir.exists():  # two runs started in the same second
        run_dir = Path(work_dir) / RUNS_DIR / f"{stamp}_{suffix}"
        suffix += 1
    (run_dir / WEIGHTS_DIR).mkdir(parents=True)
    update_run_info(run_dir, created=datetime.now(timezone.utc).isoformat(timespec="seconds"))
    return run_dir


def latest_run(work_dir: Path) -> Path:
    runs = sorted(path for path in (Path(work_dir) / RUNS_DIR).glob("*") if (path / WEIGHTS_DIR).is_dir())
    if not runs:
        raise FileNotFoundError(f"no training run under {Path(work_dir) / RUNS_DIR}; run training.train first")
    return runs[-1]


def read_run_info(run_dir: Path) -> dict:
    path = Path(run_dir) / RUN_INFO
    return json.loads(path.read_text()) if path.is_file() else {}


def update_run_info(run_dir: Path, **fields) -> dict:
    """Merge `fields` into RUN/run.json (nested dicts one level deep), written atomically."""
    info = read_run_info(run_dir)
    for key, value in fields.items():
        if isinstance(value, dict) and isinstance(info.get(key), dict):
            info[key] = {**info[key], **value}
        else:
            info[key] = value
    write_json_atomically(Path(run_dir) / RUN_INFO, info)
    return info
