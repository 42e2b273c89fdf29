"""Benchmarks: the model in-process, the served REST API, the Faiss index and server start-up.

All tables come from one run on one machine (named in the header), so ratios within a run are
comparable. Performance is measured here, never asserted in tests.

Sections (`--sections`, comma separated):
  bare     forward throughput at batch 1/8/32, JPEG decode + preprocessing, and knobs (threads,
           serving layouts (oneDNN blocked, channels_last, plain), JPEG draft decoding of phone photos,
           torch.compile, int8 dynamic quantisation, smaller crops),
           each with its effect on the outputs against the baseline
  served   TorchServe with real JPEGs at concurrency 1/8/32, dynamic batching on and off, one
           worker with every core or a worker per core, against the bare model (same weights), and
           where a worker's time goes per batch (decode, forward, search, answer)
  index    Faiss top-10 latency, recall@10 against exact search, build time and memory, 10k-1M vectors:
           flat, HNSW (float32 and 8-bit scalar-quantised vectors), IVF
  startup  start to READY, resident memory per worker
  fault    32 clients, 2,000 requests, one worker SIGKILLed half-way: what every request got,
           how soon the server answers again, latency before and after
  text     what a title costs a served request: p50 of photo alone, photo + title (+ description),
           title alone, one at a time, and the text model's scoring time
  training items/s of each training stage (frozen trunk, cached tail step, full step, embedding),
           fp32 against bf16 autocast, and peak memory
  live     the live catalogue while serving: remove → effect, seconds per added photo, the check's
           cost on a lone request, memory of two generations during a swap
  words    the catalogue's words at 10k-1M listings (the run's copied): one query's similarities read
           exactly and pruned, p50/p95, and how many of the exact 10 nearest the pruned reading finds
  soak     the worker's memory over 20,000 mixed requests (photos, phone photos, titles, descriptions,
           truncated uploads): RSS and USS every 1,000 answers, growth per 1,000 once warm

Examples:
  python -m scripts.benchmark --quick
  python -m scripts.benchmark --run WORK/model_evaluation/RUN --work WORK --output bench.md --json bench.json
  python -m scripts.benchmark --sections index --sizes 10k,100k,1M
"""
import argparse
import json
import os
import tempfile
import time
from pathlib import Path
from typing import Callable

import torch

from marketplace_search.models import vector_dim
from scripts.archive import MAX_BATCH_DELAY
from scripts.benchmark.bare import bench_bare
from scripts.benchmark.fault import bench_fault
from scripts.benchmark.index import bench_index
from scripts.benchmark.live import bench_live
from scripts.benchmark.photos import generate_photos, read_photos
from scripts.benchmark.report import describe_machine, format_machine, raw_figures, render_report, render_section
from scripts.benchmark.served import BATCHED, bench_serving
from scripts.benchmark.soak import bench_soak
from scripts.benchmark.text import bench_text
from scripts.benchmark.training import bench_training
from scripts.benchmark.words import bench_words
from scripts.benchmark.subjects import load_subjects, parse_weights

SECTIONS = ("bare", "served", "index", "startup", "fault", "training", "live", "text", "words", "soak")

# Sizes and repeats per profile; any option given on the command line wins.
PROFILES = {
    "full": {
        "arch": ["resnet50", "mobilenet_v2"], "batches": [1, 8, 32], "knob_batch": 8, "compare_photos": 16,
        "test_photos": 128, "min_seconds": 2.0, "min_repeats": 3, "compile": True, "crops": [192, 160],
        "phone_photos": 4, "phone_size": (4032, 3024), "calibration_photos": 300,
        "served_backends": ["torch fp32", "openvino bf16"],
        "concurrency": [1, 8, 32], "requests": 64, "max_load_seconds": 20.0, "workers": ["1x0", "2x1"],
        "warm_up_requests": 200,
        "sizes": [10_000, 100_000, 1_000_000],
        "hnsw_m": [16, 32], "hnsw_m_max_size": 100_000, "ef_search": [16, 32, 64, 128, 256], "hnsw_sq8": True,
        "nprobe": [4, 16, 64], "ivf_max_size": 100_000, "queries": 1000, "single_queries": 200,
        "filtered_queries": 50, "dim": 256, "fault_clients": 32, "fault_requests": 2000,
        "train_arch": ["efficientnet_lite2", "mobilenet_v2", "resnet50"], "train_batch": 32, "train_stages": 2,
        "live_add_photos": 1000, "live_removes": 5, "live_lone_requests": 200,
        "live_memory_sizes": [100_000, 1_000_000],
        "text_requests": 100, "words_sizes": [10_000, 100_000, 1_000_000], "words_queries": 100,
        "soak_requests": 20_000, "soak_every": 1_000, "soak_clients": 8,
    },
    "quick": {
        "arch": ["resnet50"], "batches": [1, 8, 32], "knob_batch": 8, "compare_photos": 8,
        "test_photos": 64, "min_seconds": 1.0, "min_repeats": 2, "compile": False, "crops": [160],
        "phone_photos": 2, "phone_size": (4032, 3024), "calibration_photos": 32,
        "served_backends": ["torch fp32", "openvino bf16"],
        "concurrency": [1, 8, 32], "requests": 32, "max_load_seconds": 5.0, "workers": ["1x0"],
        "warm_up_requests": 100,
        "sizes": [10_000, 100_000], "hnsw_m": [32], "hnsw_m_max_size": 100_000, "ef_search": [32, 64, 128],
        "hnsw_sq8": True,
        "nprobe": [16], "ivf_max_size": 10_000, "queries": 500, "single_queries": 100,
        "filtered_queries": 20, "dim": 256, "fault_clients": 16, "fault_requests": 400,
        "train_arch": ["efficientnet_lite2"], "train_batch": 16, "train_stages": 2,
        "live_add_photos": 200, "live_removes": 3, "live_lone_requests": 100, "live_memory_sizes": [10_000, 100_000],
        "text_requests": 30, "words_sizes": [10_000, 100_000], "words_queries": 30,
        "soak_requests": 600, "soak_every": 100, "soak_clients": 8,
    },
}



def parse_list(text: str, convert=int) -> list:
    return [convert(item) for item in text.split(",") if item.strip()]


def parse_size(text: str) -> int:
    text = text.strip().lower()
    scale = {"k": 1_000, "m": 1_000_000}.get(text[-1:], 1)
    number = text[:-1] if scale > 1 else text
    try:
        return int(float(number) * scale)
    except ValueError as error:
        raise argparse.ArgumentTypeError(f"size {text!r}: expected a number like 10000, 100k or 1M") from error


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m scripts.benchmark", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sections", default=",".join(SECTIONS),
                        type=lambda text: parse_list(text, str), help="comma separated: " + ", ".join(SECTIONS))
    parser.add_argument("--quick", action="store_true", help="small sizes (~2 minutes); the default is the full run")
    parser.add_argument("--output", type=Path, help="also write the tables to this markdown file")
    parser.add_argument("--json", type=Path, help="also write the raw figures to this JSON file")
    model = parser.add_argument_group("models and photos")
    model.add_argument("--run", type=Path,
                       help="RUN folder: benchmark RUN/weights/best.pt, serve that run, index its embeddings")
    model.add_argument("--work", type=Path, help="WORK folder of --run: adds top-1 agreement on its test photos")
    model.add_argument("--arch", type=lambda text: parse_list(text, str),
                       help="fresh (untrained) models of these archs; default without --run: resnet50,mobilenet_v2 "
                            "(quick: resnet50), with --run: none")
    model.add_argument("--weights", action="append", default=[], metavar="ARCH=SOURCE",
                       help="backbone weights for a fresh model: imagenet, none or a path (repeatable)")
    model.add_argument("--photos", type=Path, help="folder of JPEGs to use instead of generated ones")
    model.add_argument("--num-photos", type=int, dest="compare_photos", help="photos for timing and output drift")
    model.add_argument("--phone-photos", type=int,
                       help="generated 4032x3024 JPEGs to time draft vs full decoding (0: skip; full 4, quick 2)")
    model.add_argument("--photo-size", default="640x480", help="WIDTHxHEIGHT of generated photos")
    model.add_argument("--test-photos", type=int, help="at most this many WORK test photos")
    bare = parser.add_argument_group("bare")
    bare.add_argument("--threads", type=int, default=torch.get_num_threads(), help="torch threads of the baseline")
    bare.add_argument("--batches", type=parse_list, help="baseline batch sizes (default 1,8,32)")
    bare.add_argument("--knob-batch", type=int, help="batch size the knobs are measured at (default 8)")
    bare.add_argument("--crops", type=parse_list, help="smaller crops to try (full: 192,160)")
    bare.add_argument("--compile", action=argparse.BooleanOptionalAction, help="try torch.compile (full run: yes)")
    bare.add_argument("--min-seconds", type=float, help="time each measurement for at least this long")
    bare.add_argument("--backends", action=argparse.BooleanOptionalAction,
                      help="rows per inference backend (runtime × precision) at each batch size (default: yes)")
    bare.add_argument("--backends-only", action="store_true", help="the backend rows without the knobs")
    bare.add_argument("--calibration-photos", type=int, help="train-split photos int8 is calibrated on (full: 300)")
    served = parser.add_argument_group("served and startup")
    served.add_argument("--concurrency", type=parse_list, help="client concurrency levels (default 1,8,32)")
    served.add_argument("--requests", type=int, help="requests per concurrency level (at least 2 x concurrency)")
    served.add_argument("--max-load-seconds", type=float, help="stop sending new requests of a level after this")
    served.add_argument("--warm-up-requests", type=int, help="requests sent to each server before measuring")
    served.add_argument("--workers", type=lambda text: parse_list(text, str),
                        help="worker layouts to compare, WORKERSxTHREADS; threads 0 = the handler's default, "
                             "cores / workers (full: 1x0,2x1; quick: 1x0)")
    served.add_argument("--served-backends", type=lambda text: parse_list(text, str),
                        help="backends to serve, 'RUNTIME PRECISION' comma separated (default: torch fp32, today's "
                             "path, and openvino bf16, the archive's default)")
    served.add_argument("--batch-size", type=int, default=BATCHED, help="TorchServe batch_size with batching on")
    served.add_argument("--max-batch-delay", type=int, default=MAX_BATCH_DELAY,
                        help="TorchServe max_batch_delay ms with batching on (default: the archive's)")
    training = parser.add_argument_group("training")
    training.add_argument("--train-arch", type=lambda text: parse_list(text, str),
                          help="backbones to time training stages for (full: efficientnet_lite2,mobilenet_v2,resnet50)")
    training.add_argument("--train-batch", type=int, help="items per step (full: 32)")
    training.add_argument("--train-stages", type=int, help="trainable backbone blocks (full: 2)")
    fault = parser.add_argument_group("fault")
    fault.add_argument("--fault-clients", type=int, help="concurrent clients (full: 32)")
    fault.add_argument("--fault-requests", type=int, help="requests in all; a worker is killed half-way (full: 2000)")
    live = parser.add_argument_group("live")
    live.add_argument("--live-add-photos", type=int, help="new photos to add in one go (full: 1000)")
    live.add_argument("--live-removes", type=int, help="listings removed one after the other (full: 5)")
    live.add_argument("--live-lone-requests", type=int, help="lone requests per model, in turns (full: 200)")
    live.add_argument("--live-memory-sizes", type=lambda text: [parse_size(item) for item in text.split(",")],
                      help="vectors per generation for the swap's memory (full: 100k,1M)")
    words = parser.add_argument_group("words")
    words.add_argument("--words-sizes", type=lambda text: [parse_size(item) for item in text.split(",")],
                       help="listings in the catalogue of words (full: 10k,100k,1M)")
    words.add_argument("--words-queries", type=int, help="queries per size (full: 100)")
    soak = parser.add_argument_group("soak")
    soak.add_argument("--soak-requests", type=int, help="requests in all (full: 20000)")
    soak.add_argument("--soak-every", type=int, help="read the worker's memory after every this many answers (full: 1000)")
    soak.add_argument("--soak-clients", type=int, help="concurrent clients (full: 8)")
    index = parser.add_argument_group("index")
    index.add_argument("--sizes", type=lambda text: [parse_size(item) for item in text.split(",")],
                       help="catalogue sizes (full: 10k,100k,1M; quick: 10k,100k)")
    index.add_argument("--dim", type=int, help="vector dimension (default: the --run's embedding size, else 256)")
    index.add_argument("--queries", type=int, help="held-out queries for recall and batched latency")
    index.add_argument("--filtered-queries", type=int, help="category-filtered single queries per setting")
    index.add_argument("--ef-search", type=parse_list,
                       help="HNSW efSearch values to sweep (build_index's default is always added)")
    index.add_argument("--hnsw-m", type=parse_list, help="HNSW M values (non-default M only up to 100k)")
    index.add_argument("--nprobe", type=parse_list, help="IVF nprobe values to sweep")
    index.add_argument("--hnsw-sq8", action=argparse.BooleanOptionalAction,
                       help="also HNSW over 8-bit scalar-quantised vectors (default: yes)")
    index.add_argument("--ivf-max-size", type=parse_size, help="build IVF only up to this size")
    return parser


def resolve_settings(args: argparse.Namespace) -> dict:
    """The profile's values, overridden by every option given on the command line."""
    settings = dict(PROFILES["quick" if args.quick else "full"])
    for key, value in vars(args).items():
        if value is not None:
            settings[key] = value
    unknown = set(settings["sections"]) - set(SECTIONS)
    if unknown:
        raise SystemExit(f"--sections: unknown section(s) {sorted(unknown)}; choose from {', '.join(SECTIONS)}")
    if settings.get("work") and not settings.get("run"):
        raise SystemExit("--work needs --run (the test photos are scored with that run's model)")
    if settings.get("run") and args.arch is None:
        settings["arch"] = []  # with a run, fresh models only when --arch asks for them
    if settings.get("run") and args.dim is None:
        checkpoint = torch.load(Path(settings["run"]) / "weights" / "best.pt", map_location="cpu", weights_only=True)
        settings["dim"] = vector_dim(checkpoint)
    width, _, height = settings["photo_size"].partition("x")
    settings["photo_size"] = (int(width), int(height))
    return settings


def timed(function: Callable[..., dict | tuple], *args, **kwargs) -> dict | tuple:
    """Run a section; each section dict it returns gets its duration and the load average around it.

    The machine may be shared: the load average says how much the figures were disturbed.
    """
    load_before, started = os.getloadavg()[0], time.perf_counter()
    result = function(*args, **kwargs)
    for section in result if isinstance(result, tuple) else (result,):
        section.update(seconds=time.perf_counter() - started, load_average=(load_before, os.getloadavg()[0]))
    return result


def run_sections(settings: dict, photos: list[bytes]) -> dict:
    """Every chosen section, each printed as soon as it is done (a long run that fails later keeps it)."""
    sections = {}
    chosen = settings["sections"]

    def done(**finished: dict) -> None:
        for name, section in finished.items():
            if name in chosen:
                sections[name] = section
                print("\n" + render_section(name, section, os.cpu_count()) + "\n", flush=True)

    if {"bare", "served", "startup"} & set(chosen):
        subjects = load_subjects(settings.get("run"), settings["arch"], parse_weights(settings["weights"]), photos)
    if "bare" in chosen:
        done(bare=timed(bench_bare, subjects, photos, settings))
    if "served" in chosen or "startup" in chosen:
        bare_rows = sections["bare"]["rows"] if "bare" in sections else []
        served, startup = timed(bench_serving, subjects, photos, settings, bare_rows, with_load="served" in chosen)
        done(served=served, startup=startup)
    if "index" in chosen:
        done(index=timed(bench_index, settings))
    if "training" in chosen:
        done(training=timed(bench_training, settings))
    if "live" in chosen:
        with tempfile.TemporaryDirectory(prefix="benchmark-live-") as scratch:
            done(live=timed(bench_live, settings, Path(scratch)))
    if "text" in chosen:
        done(text=timed(bench_text, photos, settings))
    if "words" in chosen:
        done(words=timed(bench_words, settings))
    if "fault" in chosen:
        with tempfile.TemporaryDirectory(prefix="benchmark-fault-") as scratch:
            done(fault=timed(bench_fault, settings, Path(scratch)))
    if "soak" in chosen:
        done(soak=timed(bench_soak, photos, settings))
    return {name: sections[name] for name in SECTIONS if name in sections}


def main(argv=None) -> None:
    settings = resolve_settings(build_parser().parse_args(argv))
    torch.set_num_threads(settings["threads"])
    machine = describe_machine()
    print(format_machine(machine), flush=True)
    photos = read_photos(settings["photos"], settings["compare_photos"]) if settings.get("photos") else \
        generate_photos(settings["compare_photos"], settings["photo_size"])
    sections = run_sections(settings, photos)
    report = render_report(machine, settings, sections)
    print("\n" + report, flush=True)
    if settings.get("output"):
        settings["output"].write_text(report)
    if settings.get("json"):
        settings["json"].write_text(json.dumps(raw_figures(machine, settings, sections), indent=2, default=str))


if __name__ == "__main__":
    main()
