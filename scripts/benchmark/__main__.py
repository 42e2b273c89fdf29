"""Benchmarks of what sets a shipped default or backs a documented figure (docs/performance.md): a table per
section, all measured in one run on one machine so that ratios within a run compare like with like.

  python -m scripts.benchmark --run RUN --work WORK --photos WORK/photos --output bench.md --json bench.json"""
import argparse
import json
import os
import platform
import time
from importlib import metadata
from pathlib import Path

import faiss
import psutil
import torch

from marketplace_search.layout import CHECKPOINT
from marketplace_search.models import vector_dim
from marketplace_search.runtime import cpu_info
from scripts.archive import BATCH_SIZE, PRECISION, RUNTIME
from scripts.benchmark.bare import BACKENDS, REFERENCE, bench_bare, load_subject
from scripts.benchmark.common import generate_photos, interruptible, read_photos
from scripts.benchmark.index import bench_index
from scripts.benchmark.live import bench_live
from scripts.benchmark.page import bench_page
from scripts.benchmark.served import bench_served
from scripts.benchmark.soak import bench_soak
from scripts.benchmark.words import bench_text, bench_words

SECTIONS = ("bare", "served", "index", "live", "text", "words", "soak", "page")
DEFAULT_BACKEND = f"{RUNTIME} {PRECISION}"
FULL = {"num_photos": 16, "photo_size": (640, 480), "phone_photos": 4, "phone_size": (4032, 3024),
        "backends": list(BACKENDS), "batches": [1, 8, 32], "min_seconds": 2.0, "min_repeats": 3,
        "calibration_photos": 300, "concurrency": [1, 8, 32], "requests": 64, "max_load_seconds": 20.0,
        "served": [(DEFAULT_BACKEND, BATCH_SIZE), (DEFAULT_BACKEND, 1), ("openvino int8", BATCH_SIZE),
                   (REFERENCE, BATCH_SIZE)],
        "warm_up_requests": 200,
        "sizes": [10_000, 100_000, 1_000_000], "dim": 256, "queries": 1000, "single_queries": 200,
        "ef_search": [64, 128, 256], "live_add_photos": 1000, "live_removes": 5, "text_requests": 100,
        "words_queries": 100, "soak_requests": 20_000, "soak_every": 1_000, "soak_clients": 8,
        "page_requests": 200}
PROFILES = {"full": FULL, "quick": {
    **FULL, "num_photos": 8, "phone_photos": 2, "backends": [REFERENCE, DEFAULT_BACKEND], "min_seconds": 0.5,
    "min_repeats": 2, "served": [(DEFAULT_BACKEND, BATCH_SIZE)], "requests": 32, "max_load_seconds": 5.0,
    "warm_up_requests": 100, "sizes": [10_000, 50_000], "queries": 500, "single_queries": 100,
    "ef_search": [64, 128], "live_add_photos": 50, "live_removes": 2, "text_requests": 30, "words_queries": 30,
    "soak_requests": 600, "soak_every": 100, "page_requests": 30}}


def parse_sections(text: str) -> list[str]:
    chosen = [name.strip() for name in text.split(",") if name.strip()]
    if set(chosen) - set(SECTIONS):
        raise argparse.ArgumentTypeError(f"unknown section(s) {sorted(set(chosen) - set(SECTIONS))}; choose from "
                                         f"{', '.join(SECTIONS)}")
    return chosen


def parse_size(text: str) -> int:
    text = text.strip().lower()
    scale = {"k": 1_000, "m": 1_000_000}.get(text[-1:], 1)
    try:
        return int(float(text[:-1] if scale > 1 else text) * scale)
    except ValueError as error:
        raise argparse.ArgumentTypeError(f"size {text!r}: expected a number like 10000, 100k or 1M") from error


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m scripts.benchmark", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="small sizes (default: the full run)")
    parser.add_argument("--sections", type=parse_sections, help="comma separated, of: " + ", ".join(SECTIONS))
    parser.add_argument("--run", type=Path, help="RUN folder: measure and serve its model, index vectors of its "
                                                 "size (default: a fresh model, 256-d)")
    parser.add_argument("--work", type=Path, help="WORK folder of --run: int8 calibrated on its train photos, "
                                                  "the words queried with its titles too")
    parser.add_argument("--photos", type=Path, help="a folder of JPEGs to send (default: generated 640x480 ones)")
    parser.add_argument("--sizes", type=lambda text: [parse_size(size) for size in text.split(",")],
                        help="catalogue sizes of index and words (full: 10k,100k,1M; quick: 10k,50k)")
    parser.add_argument("--output", type=Path, help="also write the tables to this markdown file")
    parser.add_argument("--json", type=Path, help="also write the raw figures to this JSON file")
    return parser


def resolve_settings(args: argparse.Namespace) -> dict:
    settings = {**PROFILES["quick" if args.quick else "full"], "sections": list(SECTIONS),
                **{key: value for key, value in vars(args).items() if value is not None}}
    if settings.get("work") and not settings.get("run"):
        raise SystemExit("--work needs --run (the WORK folder that run was trained from)")
    if settings.get("run"):
        checkpoint = torch.load(Path(settings["run"]) / CHECKPOINT, map_location="cpu", weights_only=True)
        settings["dim"] = vector_dim(checkpoint)
    return settings


def describe_machine() -> str:
    cpu = cpu_info().get("model name", platform.machine())
    return (f"Machine: {cpu}, {os.cpu_count()} logical cores, {psutil.virtual_memory().total / 2**30:.1f} GiB RAM, "
            f"load average {os.getloadavg()[0]:.2f} at start. Software: Python {platform.python_version()}, torch "
            f"{torch.__version__} ({torch.get_num_threads()} threads), faiss {faiss.__version__}, OpenVINO "
            f"{metadata.version('openvino')}, TorchServe {metadata.version('torchserve')}")


def format_cell(value) -> str:
    if value is None or (isinstance(value, float) and value != value):  # missing or NaN
        return ""
    if isinstance(value, bool):
        return "yes" if value else ""
    if isinstance(value, float):
        return f"{value:,.0f}" if abs(value) >= 100 else f"{value:.1f}" if abs(value) >= 10 else \
            f"{value:.3g}" if abs(value) < 0.01 else f"{value:.2f}"
    return f"{value:,}" if isinstance(value, int) else str(value).replace("|", "\\|")


def markdown_table(rows: list[dict], columns: list[tuple[str, str]]) -> str:
    """A markdown table of `rows` with `columns` given as (key, heading); missing values are blank."""
    lines = ["| " + " | ".join(heading for _, heading in columns) + " |", "|" + "|".join("---" for _ in columns) + "|"]
    return "\n".join(lines + ["| " + " | ".join(format_cell(row.get(key)) for key, _ in columns) + " |"
                              for row in rows])


def render_section(name: str, section: dict) -> str:
    before, after = section["load_average"]
    models = [f"- {model}: {source}" for model, source in section.get("models", {}).items()]
    return "\n".join([f"## {name}", "", *models, *([""] if models else []),
                      markdown_table(section["rows"], section["columns"]), "", section["legend"],
                      f"Measured in {section['seconds']:.0f} s; 1-minute load average {before:.1f} → {after:.1f}."])


def run_sections(settings: dict, photos: list[bytes]) -> dict:
    """Each section chosen, printed as soon as it is done (a run that fails later keeps it)."""
    sections, chosen = {}, settings["sections"]
    subject = load_subject(settings.get("run"), photos) if {"bare", "served"} & set(chosen) else None
    calls = {"bare": lambda: bench_bare(subject, photos, settings),
             "served": lambda: bench_served(subject, photos, settings, sections.get("bare", {}).get("rows", [])),
             "index": lambda: bench_index(settings), "live": lambda: bench_live(settings),
             "text": lambda: bench_text(photos, settings), "words": lambda: bench_words(settings),
             "soak": lambda: bench_soak(photos, settings), "page": lambda: bench_page(photos, settings)}
    for name in (name for name in SECTIONS if name in chosen):
        load, started = os.getloadavg()[0], time.perf_counter()  # the load says how much a shared machine disturbed it
        sections[name] = calls[name]()
        sections[name].update(seconds=time.perf_counter() - started, load_average=(load, os.getloadavg()[0]))
        print("\n" + render_section(name, sections[name]) + "\n", flush=True)
    return sections


def main(argv=None) -> dict:
    settings = resolve_settings(build_parser().parse_args(argv))
    with interruptible():
        machine = describe_machine()
        print(machine, flush=True)
        photos = read_photos(settings["photos"], settings["num_photos"]) if settings.get("photos") else \
            generate_photos(settings["num_photos"], settings["photo_size"])
        sections = run_sections(settings, photos)
    report = "\n\n".join([f"# Benchmark ({'quick' if settings['quick'] else 'full'})", machine,
                          *(render_section(name, section) for name, section in sections.items())]) + "\n"
    print("\n" + report, flush=True)
    if settings.get("output"):
        settings["output"].write_text(report)
    if settings.get("json"):
        figures = {"machine": machine, "settings": settings,
                   "sections": {name: {key: value for key, value in section.items() if key != "columns"}
                                for name, section in sections.items()}}
        settings["json"].write_text(json.dumps(figures, indent=2, default=str))
    return sections


if __name__ == "__main__":
    try:
        main()
    except KeyboardInterrupt as error:
        raise SystemExit(f"benchmark interrupted ({error}): every server it started has been stopped")
