"""A refit on train + validation (`training.pipeline ... --refit-train-val`).

The train-only run chooses everything on the validation split: the epoch count (its best epoch), the
input size served (`--eval-sizes`) and the category blend (training.evaluate). The refit trains the
same recipe again, from the same initialisation, on the train and validation photos, with the same
learning-rate schedule (the cosine over --epochs) stopped after that many epochs; its last epoch is
its best.pt. It is then embedded, indexed and evaluated on test with the blend the train-only run
chose. No choice looks at the test split: the refit only adds data. Its validation figures are not
held out (it trained on those photos).
"""
import argparse
import json
from pathlib import Path

from marketplace_search.layout import EVALUATION, read_run_info, update_run_info
from training.train import train

TRAIN_SPLITS = ["train", "val"]


def refit_arguments(args: argparse.Namespace, first_run: Path) -> argparse.Namespace:
    """The train-only run's arguments, on train + val, stopping at its best epoch, served at its input size."""
    info = read_run_info(first_run)
    best_epoch = info["train"]["best_epoch"]
    eval_size = info["train"].get("eval_size", {}).get("chosen")
    return argparse.Namespace(**{**vars(args), "run": None, "resume": None, "train_splits": TRAIN_SPLITS,
                                 "stop_epoch": best_epoch, "eval_sizes": [eval_size] if eval_size else None})


def refit_train_val(args: argparse.Namespace, first_run: Path) -> Path:
    """Train the refit (stage 4 again) and link both runs' run.json; returns the refit's run folder."""
    refit_args = refit_arguments(args, first_run)
    run_dir = train(refit_args)
    blend = json.loads((Path(first_run) / EVALUATION).read_text()).get("category_blend")
    update_run_info(run_dir, refit={"from_run": str(Path(first_run).resolve()), "train_splits": TRAIN_SPLITS,
                                    "epochs": refit_args.stop_epoch, "schedule_epochs": args.epochs,
                                    "category_blend": blend})
    update_run_info(first_run, refit={"run": str(Path(run_dir).resolve())})
    return run_dir
