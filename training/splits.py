"""Test figures over several splits: runs whose listings were split with different seeds, side by side.

One split's test set (~850 listings of the real data) has a standard error of about one point of top-1,
and which listings land in it moves a figure by more than that (docs/accuracy.md). Before choosing between
two recipes this close, or
reading a figure against a target, run each over a few seeds (`--seed` seeds both the split and the
training) and compare their means:

    for seed in 0 1 2 3; do
        python -m training.pipeline --data DATA --out work/seed$seed --seed $seed --no-baseline ...
    done
    python -m training.splits work/seed*/model_evaluation/*/

Each run folder gives its test figures (evaluation.json: the photo model's head, the photo category as
served when the vote blend was chosen, and the text stage's rows) and its split seed (the work folder's
split_report.json). Runs that share a seed share their test set; they are refused unless
--allow-same-split (repeats of one split measure the training's noise, not the split's). Different
seeds' test sets are drawn independently, so they overlap (~15 % of listings on the real data).
"""
import argparse
import json
import statistics
from pathlib import Path

from marketplace_search.layout import EVALUATION, read_run_info
from marketplace_search.metrics import FIGURES
from training.data import SPLIT_REPORT

PHOTO_ROWS = {"fine_tuned": "photo (head)", "fine_tuned_blend": "photo (served: head + vote)"}


def load_run(run_dir: Path) -> dict:
    """A run's split seed, test set size and test figures by input row: {"seed", "test_photos",
    "test_listings", "rows": {name: {figure: value}}}."""
    run_dir = Path(run_dir)
    evaluation = json.loads((run_dir / EVALUATION).read_text())
    work = Path(read_run_info(run_dir).get("work") or run_dir.resolve().parents[1])
    if not (work / SPLIT_REPORT).exists():  # a run folder moved away from its work folder
        work = run_dir.resolve().parents[1]
    seed = json.loads((work / SPLIT_REPORT).read_text())["seed"]
    rows = {label: {key: evaluation[name][key] for key in FIGURES if key in evaluation[name]}
            for name, label in PHOTO_ROWS.items() if name in evaluation}
    for row in evaluation.get("text", {}).get("rows", []):
        rows[row["inputs"]] = {key: row[key] for key in FIGURES if row.get(key) == row.get(key)}  # not NaN
    if "photo" in rows:  # the text stage's photo row is the photo category as served
        rows.pop(PHOTO_ROWS["fine_tuned_blend"], None)
    return {"run": str(run_dir), "seed": seed, "test_photos": evaluation["test_photos"],
            "test_listings": evaluation.get("test_listings"), "rows": rows}


def summarise(runs: list[dict]) -> list[dict]:
    """Per input row and figure: the runs' values (in the runs' order), their mean, sample standard
    deviation (0 for one run), min and max. Rows or figures that some run lacks are left out."""
    names = [name for name in runs[0]["rows"] if all(name in run["rows"] for run in runs)]
    summary = []
    for name in names:
        for key in FIGURES:
            values = [run["rows"][name].get(key) for run in runs]
            if any(value is None for value in values):
                continue
            summary.append({"inputs": name, "figure": key, "values": values, "mean": statistics.fmean(values),
                            "sd": statistics.stdev(values) if len(values) > 1 else 0.0,
                            "min": min(values), "max": max(values)})
    return summary


def format_summary(runs: list[dict], summary: list[dict]) -> str:
    """Two markdown tables: top-1 per split with mean and standard deviation, then every figure's mean."""
    seeds = " / ".join(str(run["seed"]) for run in runs)
    lines = [f"test figures over {len(runs)} splits (seeds {seeds}; test photos "
             + " / ".join(str(run["test_photos"]) for run in runs) + ")", "",
             f"| inputs | top-1, seeds {seeds} | mean | sd |", "|---|---|---|---|"]
    for row in summary:
        if row["figure"] == "top1_accuracy":
            values = " / ".join(f"{value:.3f}" for value in row["values"])
            lines.append(f"| {row['inputs']} | {values} | {row['mean']:.3f} | {row['sd']:.3f} |")
    means = {}
    for row in summary:
        means.setdefault(row["inputs"], {})[row["figure"]] = f"{row['mean']:.3f} ± {row['sd']:.3f}"
    lines += ["", "| inputs (mean ± sd) | " + " | ".join(FIGURES) + " |", "|---|" + "---|" * len(FIGURES)]
    for name, cells in means.items():
        lines.append(f"| {name} | " + " | ".join(cells.get(key, "-") for key in FIGURES) + " |")
    return "\n".join(lines)


def main(argv=None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("runs", nargs="+", type=Path, help="run folders (WORK/model_evaluation/<timestamp>)")
    parser.add_argument("--allow-same-split", action="store_true",
                        help="accept runs that share a split seed (repeats of one split)")
    parser.add_argument("--json", type=Path, help="also write the runs and the summary here")
    args = parser.parse_args(argv)
    runs = [load_run(run_dir) for run_dir in args.runs]
    by_seed = {}
    for run in runs:
        by_seed.setdefault(run["seed"], []).append(run["run"])
    shared = {seed: paths for seed, paths in by_seed.items() if len(paths) > 1}
    if shared and not args.allow_same_split:
        parser.error("runs share a split seed, so they share their test set: "
                     + "; ".join(f"seed {seed}: {', '.join(paths)}" for seed, paths in shared.items())
                     + " (--allow-same-split to compare them anyway)")
    summary = summarise(runs)
    print(format_summary(runs, summary))
    if args.json:
        args.json.write_text(json.dumps({"runs": runs, "summary": summary}, indent=2))
    return summary


if __name__ == "__main__":
    main()
