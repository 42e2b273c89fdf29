"""Run folders: `WORK/model_evaluation/<timestamp>/`, and the `run.json` each stage adds to."""
import json
import os
from datetime import datetime, timezone
from pathlib import Path

RUNS_DIR = "model_evaluation"
RUN_INFO = "run.json"


def new_run_dir(work_dir: Path) -> Path:
    stamp = datetime.now().strftime("%Y-%m-%d_%H%M%S")
    run_dir = Path(work_dir) / RUNS_DIR / stamp
    suffix = 1
    while run_dir.exists():  # two runs started in the same second
        run_dir = Path(work_dir) / RUNS_DIR / f"{stamp}_{suffix}"
        suffix += 1
    (run_dir / "weights").mkdir(parents=True)
    update_run_info(run_dir, created=datetime.now(timezone.utc).isoformat(timespec="seconds"))
    return run_dir


def latest_run(work_dir: Path) -> Path:
    runs = sorted(path for path in (Path(work_dir) / RUNS_DIR).glob("*") if (path / "weights").is_dir())
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
    path = Path(run_dir) / RUN_INFO
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(info, indent=2, sort_keys=True, default=str))
    os.replace(tmp, path)
    return info
