"""Run every stage: tables -> photos -> split -> train -> embed -> index -> evaluate -> text. Each stage can
also be run alone: python -m training.<stage> --help."""
import argparse
import time
from pathlib import Path

from marketplace_search.layout import update_run_info
from marketplace_search.memory import keep_freed_memory
from marketplace_search.sentences import DEFAULT_ENCODER
from training import dataset, embed, evaluate, index, photos, tables, text
from training.data import claim_work_folder
from training.train import add_arguments, train


def run_pipeline(args: argparse.Namespace) -> Path:
    """Run stages 1-8 into `args.out`; returns the run folder."""
    out = Path(args.out)
    claim_work_folder(out, {"data": str(Path(args.data).resolve()), "max_listings": args.max_listings,
                            "seed": args.seed, "size": args.size}, args.replace)
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
    run_dir = timed("train", train, argparse.Namespace(**{**vars(args), "work": out, "run": None}))
    common = ["--work", str(out), "--run", str(run_dir)]
    timed("embed", embed.main, [*common, "--workers", str(args.workers), "--engine", args.embed_engine,
                                "--actors", str(args.actors)])
    timed("index", index.main, [*common, "--index-type", args.index_type])
    timed("evaluate", evaluate.main, common + ([] if args.baseline else ["--no-baseline"]))
    # after evaluate: the text stage calibrates on the photo blend evaluate chose
    timed("text", text.main, [*common, "--sentence-encoder", str(args.sentence_encoder)])
    update_run_info(run_dir, data=str(Path(args.data).resolve()), pipeline_seconds=timings)
    print("\nstage seconds: " + ", ".join(f"{name} {seconds}" for name, seconds in timings.items()))
    print(f"run folder: {run_dir}")
    return run_dir


def add_pipeline_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--data", required=True, type=Path, help="folder with Products.csv, Images.csv, images/")
    parser.add_argument("--out", required=True, type=Path, help="work folder for every stage's outputs")
    parser.add_argument("--replace", action="store_true",
                        help="rewrite OUT's tables, photos and split although other inputs made them (runs stay)")
    parser.add_argument("--max-listings", type=int, default=0, help="use a seeded sample of N listings (0 = all)")
    parser.add_argument("--size", type=int, default=512, help="normalised photo size (square, padded)")
    parser.add_argument("--index-type", default="auto", choices=index.INDEX_TYPES)
    parser.add_argument("--embed-engine", default="local", choices=("local", "ray"),
                        help="ray: the embed stage in Ray actors, into Parquet shards (training/ray_embed.py)")
    parser.add_argument("--actors", type=int, default=1, help="--embed-engine ray: actors")
    parser.add_argument("--no-baseline", dest="baseline", action="store_false",
                        help="skip evaluating the frozen pretrained backbone")
    parser.add_argument("--sentence-encoder", default=DEFAULT_ENCODER,
                        help="training.text's --sentence-encoder ('none': TF-IDF alone)")
    add_arguments(parser)


def main(argv=None) -> Path:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_pipeline_arguments(parser)
    return run_pipeline(parser.parse_args(argv))


if __name__ == "__main__":
    main()
