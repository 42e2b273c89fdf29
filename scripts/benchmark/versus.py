"""In-process A/B of the handler's code: one run's archive answered by this checkout's handler and core
package and by another checkout's (--against), both loaded in this process (handlers.local), one request
at a time, the two codes in turns, so that both see the same machine at the same moments.

    git archive BASE marketplace_search handlers | tar -x -C /tmp/base    # the code to compare against
    python -m scripts.benchmark.versus --run RUN --against /tmp/base --photos ../shared/data/marketplace/images

Per request kind (photo alone, photo + title, photo + title + description, title alone; the text
section's words): p50 and p95 of the handler's handle() on one request with each code, this ÷ against,
and how many answers were byte-for-byte the same. The archive is built once from this checkout; the
other code's copy of it differs only in marketplace_handler.py and the core package.
"""
import argparse
import json
import os
import shutil
import tempfile
import time
from pathlib import Path

from handlers.local import CORE_PACKAGE, HANDLER_MODULE, load_local_handler, predict_local
from scripts.archive import build_archive
from scripts.batch import extract_archive
from scripts.benchmark.common import percentiles_ms
from scripts.benchmark.photos import generate_photos, read_photos
from scripts.benchmark.report import markdown_table
from scripts.benchmark.text import KINDS, request_for

NAME = "versus"
COLUMNS = [("kind", "request carries"), ("requests", "requests"), ("against_p50_ms", "against p50 ms"),
           ("this_p50_ms", "this p50 ms"), ("p50_ratio", "this ÷ against p50"), ("against_p95_ms", "against p95 ms"),
           ("this_p95_ms", "this p95 ms"), ("same_answers", "same answers")]


def with_code_of(model_dir: Path, checkout: Path, destination: Path) -> Path:
    """A copy of the extracted archive MODEL_DIR (data hard-linked) running CHECKOUT's handler and core package."""
    shutil.copytree(model_dir, destination, copy_function=os.link)
    shutil.rmtree(destination / CORE_PACKAGE)
    shutil.copytree(checkout / CORE_PACKAGE, destination / CORE_PACKAGE,
                    ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    (destination / f"{HANDLER_MODULE}.py").unlink()
    shutil.copyfile(checkout / "handlers" / f"{HANDLER_MODULE}.py", destination / f"{HANDLER_MODULE}.py")
    return destination


def compare(handlers: dict, photos: list[bytes], kinds: tuple[str, ...], requests: int, warm_up: int) -> list[dict]:
    """Rows of COLUMNS: each kind's requests sent to each handler in turns (the order flips every round)."""
    seconds = {kind: {name: [] for name in handlers} for kind in kinds}
    same = {kind: 0 for kind in kinds}
    for round_ in range(warm_up + requests):
        for kind in kinds:
            body, headers = request_for(kind, photos[round_ % len(photos)], None)
            answers = {}
            for name in (list(handlers) if round_ % 2 else list(handlers)[::-1]):
                started = time.perf_counter()
                [(status, answer)] = predict_local(handlers[name], [{"body": body}], [headers])
                elapsed = time.perf_counter() - started
                if status != 200:
                    raise RuntimeError(f"{name}, {kind}: HTTP {status} {answer}")
                answers[name] = json.dumps(answer)
                if round_ >= warm_up:
                    seconds[kind][name].append(elapsed)
            same[kind] += round_ >= warm_up and len(set(answers.values())) == 1
    rows = []
    for kind in kinds:
        row = {"kind": kind, "requests": requests, "same_answers": f"{same[kind]}/{requests}"}
        for name in handlers:
            row.update({f"{name}_{key}": value for key, value in percentiles_ms(seconds[kind][name], (50, 95)).items()})
        row["p50_ratio"] = row["this_p50_ms"] / row["against_p50_ms"]
        rows.append(row)
    return rows


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(prog="python -m scripts.benchmark.versus", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run", required=True, type=Path, help="RUN folder (with text_model/ for the word kinds)")
    parser.add_argument("--against", required=True, type=Path,
                        help="a checkout (or `git archive` of one) whose handlers/ and core package to compare with")
    parser.add_argument("--photos", type=Path, help="folder of JPEGs (default: generated 640x480 photos)")
    parser.add_argument("--requests", type=int, default=100, help="timed requests per kind and code")
    parser.add_argument("--warm-up", type=int, default=10, help="untimed rounds first")
    parser.add_argument("--kinds", default=",".join(KINDS), help=f"comma separated, of {', '.join(KINDS)}")
    args = parser.parse_args(argv)
    kinds = tuple(kind for kind in args.kinds.split(",") if kind)
    if set(kinds) - set(KINDS):
        parser.error(f"unknown kinds {sorted(set(kinds) - set(KINDS))}; expected some of {', '.join(KINDS)}")
    photos = read_photos(args.photos, 20) if args.photos else generate_photos(20)
    with tempfile.TemporaryDirectory(prefix="benchmark-versus-") as scratch:
        scratch = Path(scratch)
        (scratch / "store").mkdir()
        mar = build_archive(args.run, scratch / "store", NAME, "1.0", batch_size=1)
        this = scratch / "this"
        extract_archive(mar, this)
        against = with_code_of(this, args.against.resolve(), scratch / "against")
        handlers = {"against": load_local_handler(against), "this": load_local_handler(this)}
        load = os.getloadavg()
        rows = compare(handlers, photos, kinds, args.requests, args.warm_up)
    print(f"run {args.run}, against {args.against}; load average (1, 5, 15 min) before "
          f"{', '.join(f'{x:.2f}' for x in load)}, after {', '.join(f'{x:.2f}' for x in os.getloadavg())}; "
          f"{os.cpu_count()} cores")
    print(markdown_table(rows, COLUMNS))


if __name__ == "__main__":
    main()
