"""Run every stage: tables -> photos -> split -> train -> embed -> index -> evaluate -> text.

Example (the real listings with the offline MobileNetV2 backbone):
  python -m training.pipeline --data ../shared/data/marketplace --out work/marketplace \\
      --arch mobilenet_v2 --weights ../shared/weights/mobilenet_v2_imagenet_features.pth
Each stage can also be run alone: python -m training.<stage> --help.
"""
import argparse
import json
import shutil
import time
from pathlib import Path

from training import dataset, embed, evaluate, index, photos, refit, tables, text
from marketplace_search.memory import keep_freed_memory
from marketplace_search.sentences import DEFAULT_ENCODER
from marketplace_search.layout import EVALUATION, TEXT_MODEL_DIR, update_run_info
from training.train import add_arguments, train


def run_pipeline(args: argparse.Namespace) -> Path:
    """Run stages 1-8 into `args.out`; returns the run folder."""
    out = Path(args.out)
    timings = {}
    keep_freed_memory()

    def timed(name, function, *arguments):
        started = time.perf_counter()
        print(f"\n== {name} ==", flush=True)
        result = function(*arguments)
        timings[name] = round(time.perf_counter() - started, 1)
        return result

    sample = ["--max-listings", str(args.max_listings), "--seed", str(args.seed)] if args.max_listings else []
    timed("tables", tables.main, ["--data", str(args.data), "--out", str(out), *sample])
    timed("photos", photos.main, ["--data", str(args.data), "--out", str(out), "--size", str(args.size),
                                  "--workers", str(args.workers)])
    timed("split", dataset.main, ["--out", str(out), "--seed", str(args.seed)])
    train_args = argparse.Namespace(**{**vars(args), "work": out, "run": None})
    run_dir = timed("train", train, train_args)
    common = ["--work", str(out), "--run", str(run_dir)]
    timed("embed", embed.main, [*common, "--workers", str(args.workers), "--engine", args.embed_engine,
                                "--actors", str(args.actors)])
    timed("index", index.main, [*common, "--index-type", args.index_type])
    timed("evaluate", evaluate.main, common + ([] if args.baseline else ["--no-baseline"]))
    # after evaluate: the text stage calibrates on the photo blend evaluate chose
    timed("text", text.main, [*common, "--sentence-encoder", str(args.sentence_encoder)])
    if getattr(args, "refit_train_val", False):  # training.refit: stages 4-7 again on train + val
        first_run = run_dir
        update_run_info(first_run, data=str(Path(args.data).resolve()), pipeline_seconds=dict(timings))
        run_dir = timed("refit train", refit.refit_train_val, train_args, first_run)
        common = ["--work", str(out), "--run", str(run_dir)]
        timed("refit embed", embed.main, [*common, "--workers", str(args.workers)])
        timed("refit index", index.main, [*common, "--index-type", args.index_type])
        timed("refit evaluate", evaluate.main, [*common, "--no-baseline", "--blend-from", str(first_run)])
        carry_text_model(first_run, run_dir)
    update_run_info(run_dir, data=str(Path(args.data).resolve()), pipeline_seconds=timings)
    print("\nstage seconds: " + ", ".join(f"{name} {seconds}" for name, seconds in timings.items()))
    print(f"run folder: {run_dir}")
    return run_dir


def carry_text_model(first_run: Path, refit_run: Path) -> None:
    """The refit run serves the text model of the train-only run, whose fusion was calibrated on validation
    photos that photo model never saw (the refit model trained on them: calibrated on it, the fusion would
    trust the photo too much); its figures travel too, saying which photo model they were measured with."""
    shutil.copytree(Path(first_run) / TEXT_MODEL_DIR, Path(refit_run) / TEXT_MODEL_DIR, dirs_exist_ok=True)
    first = json.loads((Path(first_run) / EVALUATION).read_text())
    if "text" in first:
        evaluation = json.loads((Path(refit_run) / EVALUATION).read_text())
        evaluation["text"] = {**first["text"], "photo_model_run": Path(first_run).name,
                              "note": "fusion calibrated and measured with the train-only run's photo model"}
        (Path(refit_run) / EVALUATION).write_text(json.dumps(evaluation, indent=2))


def add_pipeline_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--data", required=True, type=Path, help="folder with Products.csv, Images.csv, images/")
    parser.add_argument("--out", required=True, type=Path, help="work folder for every stage's outputs")
    parser.add_argument("--max-listings", type=int, default=0, help="use a seeded sample of N listings (0 = all)")
    parser.add_argument("--size", type=int, default=512, help="normalised photo size (square, padded)")
    parser.add_argument("--index-type", default="auto", choices=index.INDEX_TYPES)
    parser.add_argument("--embed-engine", default="local", choices=("local", "ray"),
                        help="ray: the embed stage in Ray actors, into Parquet shards (training/ray_embed.py)")
    parser.add_argument("--actors", type=int, default=1, help="--embed-engine ray: actors")
    parser.add_argument("--no-baseline", dest="baseline", action="store_false",
                        help="skip evaluating the frozen pretrained backbone")
    parser.add_argument("--refit-train-val", action="store_true",
                        help="then train again on train + val for the epochs chosen on val, and serve that "
                             "run with the blend chosen on val (training.refit)")
    parser.add_argument("--sentence-encoder", default=DEFAULT_ENCODER,
                        help="the text model's sentence encoder (training.text --sentence-encoder; "
                             "'none': TF-IDF alone)")
    add_arguments(parser)


def main(argv=None) -> Path:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_pipeline_arguments(parser)
    return run_pipeline(parser.parse_args(argv))


if __name__ == "__main__":
    main()
