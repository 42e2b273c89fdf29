"""Benchmarks: the model in-process, the served REST API, the Faiss index and server start-up.

All tables come from one run on one machine (named in the header), so ratios within a run are
comparable. Performance is measured here, never asserted in tests.

Sections (`--sections`, comma separated):
  bare     forward throughput at batch 1/8/32, JPEG decode + preprocessing, and knobs (threads,
           serving layouts (oneDNN blocked, channels_last, plain), JPEG draft decoding of phone photos,
           torch.compile, int8 dynamic quantisation, smaller crops),
           each with its effect on the outputs against the baseline
  served   TorchServe with real JPEGs at concurrency 1/8/32, dynamic batching on and off, one
           worker with every core or a worker per core, against the bare model (same weights)
  index    Faiss top-10 latency, recall@10 against exact search, build time and memory, 10k-1M vectors:
           flat, HNSW (float32 and 8-bit scalar-quantised vectors), IVF
  startup  start to READY, resident memory per worker

Examples:
  python -m scripts.benchmark --quick
  python -m scripts.benchmark --run WORK/model_evaluation/RUN --work WORK --output bench.md --json bench.json
  python -m scripts.benchmark --sections index --sizes 10k,100k,1M
"""
import faiss  # before torch: both bring OpenMP runtimes (TORCHSERVE_NOTES.md, trap 14)

import argparse
import contextlib
import copy
import io
import itertools
import json
import os
import platform
import re
import tempfile
import threading
import time
import warnings
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import Callable

import numpy as np
import psutil
import requests
import torch
from PIL import Image, ImageDraw, ImageFilter
from torch import nn

from scripts.archive import MAX_BATCH_DELAY, build_archive
from scripts.serve import describe, free_port, start_server
from marketplace_search import search
from training.dataset import load_split
from training.embed import load_embeddings
from marketplace_search.images import decode_image
from marketplace_search.models import (SERVING_LAYOUTS, MarketplaceNet, embed, load_checkpoint, load_pretrained_backbone,
                             prepare_for_serving, serve_forward, serving_layout)
from training.photos import PHOTOS_DIR
from marketplace_search.presets import Preprocess, eval_transform

SECTIONS = ("bare", "served", "index", "startup")
NUM_CLASSES = 13  # root categories of the marketplace data
TOP_K = 10
# Targets from the brief, checked in the index section.
TARGET_VECTORS = 1_000_000
TARGET_MS = 5.0
TARGET_RECALL = 0.95
TARGET_SERVED_RATIO = 0.9
BATCHED = 8  # the batch size of the "batching on" configurations
TARGET_EXTRA_MS = 10.0

# Sizes and repeats per profile; any option given on the command line wins.
PROFILES = {
    "full": {
        "arch": ["resnet50", "mobilenet_v2"], "batches": [1, 8, 32], "knob_batch": 8, "compare_photos": 16,
        "test_photos": 128, "min_seconds": 2.0, "min_repeats": 3, "compile": True, "crops": [192, 160],
        "phone_photos": 4, "phone_size": (4032, 3024),
        "concurrency": [1, 8, 32], "requests": 64, "max_load_seconds": 20.0, "workers": ["1x0", "2x1"],
        "warm_up_requests": 200,
        "sizes": [10_000, 100_000, 1_000_000],
        "hnsw_m": [16, 32], "hnsw_m_max_size": 100_000, "ef_search": [16, 32, 64, 128, 256], "hnsw_sq8": True,
        "nprobe": [4, 16, 64], "ivf_max_size": 100_000, "queries": 1000, "single_queries": 200,
        "filtered_queries": 50, "dim": 256,
    },
    "quick": {
        "arch": ["resnet50"], "batches": [1, 8, 32], "knob_batch": 8, "compare_photos": 8,
        "test_photos": 64, "min_seconds": 1.0, "min_repeats": 2, "compile": False, "crops": [160],
        "phone_photos": 2, "phone_size": (4032, 3024),
        "concurrency": [1, 8, 32], "requests": 32, "max_load_seconds": 5.0, "workers": ["1x0"],
        "warm_up_requests": 100,
        "sizes": [10_000, 100_000], "hnsw_m": [32], "hnsw_m_max_size": 100_000, "ef_search": [32, 64, 128],
        "hnsw_sq8": True,
        "nprobe": [16], "ivf_max_size": 10_000, "queries": 500, "single_queries": 100,
        "filtered_queries": 20, "dim": 256,
    },
}


# ---------------------------------------------------------------- machine, timing, tables

def cpu_model() -> str:
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.is_file():
        for line in cpuinfo.read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


def package_version(name: str) -> str:
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return "not installed"


def describe_machine() -> dict:
    return {
        "cpu": cpu_model(),
        "logical_cores": os.cpu_count(),
        "physical_cores": psutil.cpu_count(logical=False),
        "ram_gib": round(psutil.virtual_memory().total / 2**30, 1),
        "ram_available_gib": round(psutil.virtual_memory().available / 2**30, 1),
        "load_average_1m": round(os.getloadavg()[0], 2),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torchvision": package_version("torchvision"),
        "faiss": faiss.__version__,
        "torchserve": package_version("torchserve"),
        "torch_threads": torch.get_num_threads(),
        "torch_interop_threads": torch.get_num_interop_threads(),
        "faiss_threads": faiss.omp_get_max_threads(),
    }


def format_machine(machine: dict) -> str:
    return (f"Machine: {machine['cpu']}, {machine['logical_cores']} logical / {machine['physical_cores']} physical "
            f"cores, {machine['ram_gib']} GiB RAM ({machine['ram_available_gib']} GiB available), load average "
            f"{machine['load_average_1m']} at start\n"
            f"Software: Python {machine['python']}, torch {machine['torch']}, torchvision {machine['torchvision']}, "
            f"faiss {machine['faiss']}, torchserve {machine['torchserve']}; threads: torch "
            f"{machine['torch_threads']} (interop {machine['torch_interop_threads']}), "
            f"faiss {machine['faiss_threads']}")


def time_calls(function: Callable[[], object], *, min_seconds: float, min_repeats: int = 3,
               max_repeats: int = 200, warmup: int = 1) -> list[float]:
    """Seconds per call after `warmup` untimed calls, repeated until both minimums are met."""
    for _ in range(warmup):
        function()
    times: list[float] = []
    started = time.perf_counter()
    while len(times) < min_repeats or (time.perf_counter() - started < min_seconds and len(times) < max_repeats):
        start = time.perf_counter()
        function()
        times.append(time.perf_counter() - start)
    return times


def percentiles_ms(seconds: list[float], points=(50, 95, 99)) -> dict[str, float]:
    values = np.percentile(np.asarray(seconds) * 1000, points)
    return {f"p{point}_ms": float(value) for point, value in zip(points, values)}


def format_cell(value) -> str:
    if value is None:
        return ""
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, float):
        if value != value:  # NaN
            return ""
        if abs(value) >= 100:
            return f"{value:,.0f}"
        if abs(value) >= 10:
            return f"{value:.1f}"
        return f"{value:.3g}" if abs(value) < 0.01 else f"{value:.2f}"
    if isinstance(value, int):
        return f"{value:,}"
    return str(value).replace("|", "\\|")


def markdown_table(rows: list[dict], columns: list[tuple[str, str]]) -> str:
    """A markdown table of `rows` with `columns` given as (key, heading); missing values are blank."""
    lines = ["| " + " | ".join(heading for _, heading in columns) + " |",
             "|" + "|".join("---" for _ in columns) + "|"]
    for row in rows:
        lines.append("| " + " | ".join(format_cell(row.get(key)) for key, _ in columns) + " |")
    return "\n".join(lines)


@contextlib.contextmanager
def torch_threads(threads: int):
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(before)


# ---------------------------------------------------------------- photos

def generate_photos(count: int, size: tuple[int, int] = (640, 480), seed: int = 0) -> list[bytes]:
    """JPEGs that cost what photos cost: a lit background, a few coloured objects, blur and sensor
    noise, so decoding and compression behave like camera photos rather than flat colour."""
    rng = np.random.default_rng(seed)
    width, height = size
    ramp = np.linspace(0, 1, height, dtype=np.float32)[:, None, None]
    photos = []
    for _ in range(count):
        top, bottom = rng.integers(0, 256, size=(2, 3))
        background = (top * (1 - ramp) + bottom * ramp) * np.ones((1, width, 1), np.float32)
        image = Image.fromarray(background.astype(np.uint8))
        draw = ImageDraw.Draw(image)
        for _ in range(int(rng.integers(2, 6))):
            x0, y0 = int(rng.integers(0, width)), int(rng.integers(0, height))
            box = (x0, y0, x0 + int(rng.integers(width // 8, width // 2)),
                   y0 + int(rng.integers(height // 8, height // 2)))
            colour = tuple(int(channel) for channel in rng.integers(0, 256, 3))
            (draw.ellipse if rng.random() < 0.5 else draw.rectangle)(box, fill=colour)
        pixels = np.asarray(image.filter(ImageFilter.GaussianBlur(1.5)), np.float32)
        pixels += rng.normal(0, 6, pixels.shape).astype(np.float32)
        buffer = io.BytesIO()
        Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8)).save(buffer, "JPEG", quality=85)
        photos.append(buffer.getvalue())
    return photos


def read_photos(directory: Path, count: int, seed: int = 0) -> list[bytes]:
    """`count` photos picked at random (seeded) from a folder of JPEG/PNG files."""
    if not Path(directory).is_dir():
        raise FileNotFoundError(f"--photos {directory}: not a folder")
    paths = sorted(path for path in Path(directory).iterdir() if path.suffix.lower() in {".jpg", ".jpeg", ".png"})
    if not paths:
        raise FileNotFoundError(f"--photos {directory}: no .jpg, .jpeg or .png files")
    chosen = np.random.default_rng(seed).choice(len(paths), size=min(count, len(paths)), replace=False)
    return [paths[i].read_bytes() for i in sorted(chosen)]


def read_test_set(work_dir: Path, count: int, seed: int = 0) -> tuple[list[bytes], np.ndarray]:
    """Up to `count` test-split photos of a pipeline work folder (seeded sample) and their labels."""
    split = load_split(work_dir)
    test = split[split["split"] == "test"]
    if test.empty:
        raise ValueError(f"{work_dir}/split.csv has no test rows")
    test = test.sample(n=min(count, len(test)), random_state=seed).sort_values("image_id")
    photos_dir = Path(work_dir) / PHOTOS_DIR
    return ([(photos_dir / f"{image_id}.jpg").read_bytes() for image_id in test["image_id"]],
            test["label"].to_numpy())


def preprocess_photos(photos: list[bytes], preprocess: Preprocess, draft: bool = True) -> torch.Tensor:
    """The handler's decode (JPEG draft down to the resize, unless `draft` is False) and eval transform."""
    transform = eval_transform(preprocess)
    fit_size = preprocess.resize if draft else None
    return torch.stack([transform(decode_image(photo, fit_size=fit_size)) for photo in photos])


def scaled_preprocess(preprocess: Preprocess, crop: int) -> Preprocess:
    """The same field of view at a lower resolution: resize scaled with the crop."""
    resize = round(preprocess.resize * crop / preprocess.crop)
    return Preprocess(resize=resize, crop=crop, mean=preprocess.mean, std=preprocess.std)


# ---------------------------------------------------------------- models

@dataclass
class Subject:
    """A model under test and the preprocessing it expects."""

    name: str
    model: MarketplaceNet
    preprocess: Preprocess
    source: str
    trained: bool


def calibrate_batchnorm(model: nn.Module, images: torch.Tensor) -> None:
    """Set every BatchNorm's running statistics from `images`.

    A freshly built net has running mean 0 and variance 1 everywhere, so its outputs either
    saturate or ignore the input; calibrated, an untrained net gives input-dependent probabilities
    and embeddings, which the output-drift columns need to mean anything.
    """
    for module in model.modules():
        if isinstance(module, nn.modules.batchnorm._BatchNorm):
            module.reset_running_stats()
            module.momentum = None  # cumulative average over the calibration batch
    model.train()
    with torch.no_grad():
        model(images)
    model.eval()


def parse_weights(specs: list[str]) -> dict[str, str]:
    weights = {}
    for spec in specs:
        arch, separator, source = spec.partition("=")
        if not separator or not source:
            raise ValueError(f"--weights {spec!r}: expected ARCH=SOURCE (SOURCE: imagenet, none or a path)")
        weights[arch] = source
    return weights


def run_model_name(run_dir: Path, arch: str) -> str:
    """How tables name a run's model (the bare and served rows of one model must match)."""
    return f"{arch} ({Path(run_dir).name})"


def load_subjects(run_dir: Path | None, archs: list[str], weights: dict[str, str],
                  calibration_photos: list[bytes]) -> list[Subject]:
    """The --run's model (if any), then a fresh model per arch in `archs`."""
    subjects = []
    if run_dir is not None:
        path = Path(run_dir) / "weights" / "best.pt"
        model, checkpoint = load_checkpoint(path)
        subjects.append(Subject(run_model_name(run_dir, checkpoint["arch"]), model,
                                Preprocess.from_dict(checkpoint["preprocess"]),
                                f"{path}, epoch {checkpoint['epoch']}", trained=True))
    for arch in archs:
        torch.manual_seed(0)
        model = MarketplaceNet(arch, NUM_CLASSES)
        backbone = load_pretrained_backbone(model, weights.get(arch, "none"))
        preprocess = Preprocess()
        calibrate_batchnorm(model, preprocess_photos(calibration_photos, preprocess))
        subjects.append(Subject(arch, model, preprocess,
                                f"fresh MarketplaceNet({arch}, {NUM_CLASSES}), backbone: {backbone}, "
                                f"BatchNorm calibrated on {len(calibration_photos)} photos", trained=False))
    return subjects


# ---------------------------------------------------------------- bare: model in-process

Forward = Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor]]


@dataclass
class Variant:
    """One way of running the model; `forward` is None when the knob could not be applied."""

    name: str
    forward: Forward | None
    preprocess: Preprocess
    threads: int
    note: str = ""
    compile_seconds: float | None = None


def make_forward(model: nn.Module, grad_mode=torch.no_grad,
                 memory_format: torch.memory_format = torch.contiguous_format) -> Forward:
    def forward(images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        with grad_mode():
            return embed(model, images.contiguous(memory_format=memory_format))
    return forward


def served_forward(model: MarketplaceNet, layout: str = "auto") -> Forward:
    """The handler's way: prepare_for_serving (a copy) and serve_forward (inference_mode)."""
    served = prepare_for_serving(copy.deepcopy(model), layout)
    return lambda images: serve_forward(served, images)


def quantise_linear(model: nn.Module) -> nn.Module:
    """A copy with its Linear layers (embedding and head) dynamically quantised to int8."""
    with warnings.catch_warnings():
        # torch.ao.quantization is deprecated in favour of torchao, which is not installed here.
        warnings.simplefilter("ignore", DeprecationWarning)
        warnings.simplefilter("ignore", UserWarning)
        return torch.ao.quantization.quantize_dynamic(copy.deepcopy(model), {nn.Linear}, dtype=torch.qint8)


def compiled_variant(model: nn.Module, preprocess: Preprocess, threads: int, sample: torch.Tensor) -> Variant:
    """torch.compile'd model; the first call (timed) compiles for the shape of `sample`.

    Inductor's on-disk caches are off for that call, so the time is what a fresh worker on a new
    machine pays, not a replay of an earlier benchmark's kernels.
    """
    import torch._inductor.config as inductor_config

    forward = make_forward(torch.compile(model), torch.inference_mode)
    started = time.perf_counter()
    try:
        with torch_threads(threads), inductor_config.patch(force_disable_caches=True):
            forward(sample)
    # Inductor needs a working C++ toolchain; dynamo errors are RuntimeErrors, a missing compiler an OSError.
    except (RuntimeError, OSError) as error:
        reason = str(error).strip().splitlines()[0][:160] if str(error).strip() else type(error).__name__
        return Variant("torch.compile", None, preprocess, threads, note=f"skipped: {reason}")
    return Variant("torch.compile", forward, preprocess, threads, compile_seconds=time.perf_counter() - started,
                   note="compile s: first call, caches off; on layout none")


def make_variants(subject: Subject, threads: int, crops: list[int], compile_model: bool,
                  sample: torch.Tensor) -> list[Variant]:
    """The baseline (as served: all threads, inference_mode, the `auto` serving layout, fp32) first,
    then one knob changed per variant."""
    model, preprocess = subject.model, subject.preprocess
    served = serving_layout(model.arch)
    variants = [Variant("baseline", served_forward(model), preprocess, threads, note=f"layout {served}")]
    if threads > 1:
        variants.append(Variant("1 thread", served_forward(model), preprocess, 1, note=f"layout {served}"))
    variants += [Variant(f"layout {layout}", served_forward(model, layout), preprocess, threads)
                 for layout in SERVING_LAYOUTS if layout not in ("auto", served)]
    variants += [
        Variant("NCHW + no_grad (the handler before tuning)", make_forward(model), preprocess, threads),
        Variant("int8 dynamic Linear", make_forward(quantise_linear(model), torch.inference_mode), preprocess,
                threads, note="torch.ao.quantization (deprecated); on layout none"),
    ]
    if compile_model:
        variants.append(compiled_variant(model, preprocess, threads, sample))
    else:
        variants.append(Variant("torch.compile", None, preprocess, threads, note="skipped: not asked (--compile)"))
    for crop in crops:
        smaller = scaled_preprocess(preprocess, crop)
        variants.append(Variant(f"crop {crop} (resize {smaller.resize})", served_forward(model), smaller, threads))
    return variants


def predict(forward: Forward, images: torch.Tensor, batch: int) -> tuple[np.ndarray, np.ndarray]:
    """`(probabilities, embeddings)` for all images, in fixed-size batches (the last one padded)
    so that a compiled model only ever sees one shape."""
    probabilities, embeddings = [], []
    for start in range(0, len(images), batch):
        chunk = images[start:start + batch]
        padded = torch.cat([chunk, chunk[:1].expand(batch - len(chunk), *chunk.shape[1:])]) \
            if len(chunk) < batch else chunk
        chunk_probabilities, chunk_embeddings = forward(padded)
        probabilities.append(chunk_probabilities[:len(chunk)].float().numpy())
        embeddings.append(chunk_embeddings[:len(chunk)].float().numpy())
    return np.concatenate(probabilities), np.concatenate(embeddings)


def output_drift(reference: tuple[np.ndarray, np.ndarray], outputs: tuple[np.ndarray, np.ndarray]) -> dict:
    """How far a variant's outputs are from the baseline's on the same photos.

    Embeddings are L2-normalised, so their row-wise dot product is the cosine similarity.
    """
    (reference_probabilities, reference_embeddings), (probabilities, embeddings) = reference, outputs
    cosine = (reference_embeddings * embeddings).sum(axis=1)
    return {"max_abs_dprob": float(np.abs(reference_probabilities - probabilities).max()),
            "top1_agreement": float((reference_probabilities.argmax(1) == probabilities.argmax(1)).mean()),
            "cosine_mean": float(cosine.mean()), "cosine_min": float(cosine.min())}


def batch_of(images: torch.Tensor, batch: int) -> torch.Tensor:
    repeats = -(-batch // len(images))
    return images.repeat(repeats, 1, 1, 1)[:batch].contiguous()


def time_round_robin(calls: dict[str, tuple[Callable[[], object], int]], *, min_seconds: float,
                     min_repeats: int, max_repeats: int = 200) -> dict[str, list[float]]:
    """Seconds per call of each named `(function, torch threads)`, timed in turns.

    Turns make the comparison fair on a shared machine: a burst of load from another process
    slows every variant of the same round, not just the one that happened to be running.
    `min_seconds` is per function; each one is called once untimed first.
    """
    for function, threads in calls.values():
        with torch_threads(threads):
            function()
    times: dict[str, list[float]] = {name: [] for name in calls}
    started, rounds = time.perf_counter(), 0
    while rounds < min_repeats or (time.perf_counter() - started < min_seconds * len(calls)
                                   and rounds < max_repeats):
        for name, (function, threads) in calls.items():
            with torch_threads(threads):
                start = time.perf_counter()
                function()
                times[name].append(time.perf_counter() - start)
        rounds += 1
    return times


def throughput(times: list[float], batch: int) -> dict:
    seconds = float(np.median(times))
    return {"batch": batch, "ms_per_batch": seconds * 1000, "photos_per_s": batch / seconds, "repeats": len(times)}


def measure_decode(photos: list[bytes], preprocess: Preprocess, min_seconds: float, min_repeats: int,
                   draft: bool = True) -> dict:
    """Photos per second through decode_image + eval_transform, one photo at a time, as the handler
    does it (JPEG draft decoding down to the resize) unless `draft` is False."""
    times = time_calls(lambda: preprocess_photos(photos, preprocess, draft),
                       min_seconds=min_seconds, min_repeats=min_repeats)
    seconds = float(np.median(times)) / len(photos)
    return {"ms_per_batch": seconds * 1000, "photos_per_s": 1 / seconds, "batch": 1, "repeats": len(times)}


def bench_subject(subject: Subject, photos: list[bytes], settings: dict,
                  test_set: tuple[list[bytes], np.ndarray] | None = None) -> list[dict]:
    """Rows of the bare table for one model: decode, the baseline at each batch size (in blocks),
    then each knob at the knob batch size (in turns with the baseline: `time_round_robin`)."""
    threads, knob_batch = settings["threads"], settings["knob_batch"]
    timing = {"min_seconds": settings["min_seconds"], "min_repeats": settings["min_repeats"]}
    tensors: dict[tuple[Preprocess, str], torch.Tensor] = {}

    def images_for(preprocess: Preprocess, which: str = "photos") -> torch.Tensor:
        if (preprocess, which) not in tensors:
            tensors[preprocess, which] = preprocess_photos(photos if which == "photos" else test_set[0], preprocess)
        return tensors[preprocess, which]

    decodes = {}
    for count in sorted({threads, 1}, reverse=True):  # ToTensor/Normalize run on torch's threads
        with torch_threads(count):
            decodes[count] = measure_decode(photos, subject.preprocess, **timing)
    phone_rows = bench_phone_decode(subject, settings, timing) if settings.get("phone_photos") else []
    variants = make_variants(subject, threads, settings["crops"], settings["compile"],
                             batch_of(images_for(subject.preprocess), knob_batch))
    baseline, knobs = variants[0], variants[1:]
    batches = sorted(set(settings["batches"]) | {knob_batch})
    # The baseline at each batch size in a block of back-to-back calls, as a busy worker runs it
    # (in turns, each call would follow other shapes, models or thread counts and pay for it).
    with torch_threads(threads):
        blocks = {batch: time_calls(partial_forward(baseline, images_for(baseline.preprocess), batch), **timing)
                  for batch in batches}
    calls = {"baseline": (partial_forward(baseline, images_for(baseline.preprocess), knob_batch), threads)}
    calls.update({variant.name: (partial_forward(variant, images_for(variant.preprocess), knob_batch),
                                 variant.threads) for variant in knobs if variant.forward is not None})
    times = time_round_robin(calls, **timing)
    reference_rate = throughput(times["baseline"], knob_batch)["photos_per_s"]
    block_rate = throughput(blocks[knob_batch], knob_batch)["photos_per_s"]

    def effects(variant: Variant) -> dict:
        with torch_threads(threads):
            figures = output_drift(reference, predict(variant.forward, images_for(variant.preprocess), knob_batch))
            if test_set is not None:
                outputs = predict(variant.forward, images_for(variant.preprocess, "test"), knob_batch)
                figures["test_top1_agreement"] = float((outputs[0].argmax(1) == test_reference[0].argmax(1)).mean())
                figures["test_accuracy"] = float((outputs[0].argmax(1) == test_set[1]).mean())
        return figures

    with torch_threads(threads):
        reference = predict(baseline.forward, images_for(baseline.preprocess), knob_batch)
        test_reference = predict(baseline.forward, images_for(baseline.preprocess, "test"), knob_batch) \
            if test_set is not None else None
    base = {"model": subject.name, "arch": subject.model.arch}
    rows = [{**base, "variant": f"decode + preprocess, {count} thread{'s' if count > 1 else ''}", **decode}
            for count, decode in decodes.items()]
    rows += [{**base, **row} for row in phone_rows]
    for batch in batches:
        measured = throughput(blocks[batch], batch)
        rows.append({**base, "variant": "baseline", "note": baseline.note, **measured,
                     "speedup": measured["photos_per_s"] / block_rate,
                     **(effects(baseline) if batch == knob_batch else {})})
    for variant in knobs:
        row = {**base, "variant": variant.name, "batch": knob_batch, "note": variant.note,
               "compile_s": variant.compile_seconds}
        if variant.forward is not None:
            measured = throughput(times[variant.name], knob_batch)
            row.update(measured, speedup=measured["photos_per_s"] / reference_rate, **effects(variant))
        rows.append(row)
    return rows


def bench_phone_decode(subject: Subject, settings: dict, timing: dict) -> list[dict]:
    """Decode + preprocess of phone-camera JPEGs with and without draft decoding, and what draft
    decoding changes in the model's outputs (full decoding is the reference)."""
    width, height = settings["phone_size"]
    photos = generate_photos(settings["phone_photos"], (width, height), seed=1)
    threads = settings["threads"]
    rows = []
    for draft in (True, False):
        with torch_threads(threads):
            measured = measure_decode(photos, subject.preprocess, **timing, draft=draft)
        rows.append({"variant": f"phone photo {width}x{height}: decode + preprocess, "
                                f"{'JPEG draft (as served)' if draft else 'full decode'}", **measured})
    forward = served_forward(subject.model)
    with torch_threads(threads):
        full = predict(forward, preprocess_photos(photos, subject.preprocess, draft=False), len(photos))
        drafted = predict(forward, preprocess_photos(photos, subject.preprocess, draft=True), len(photos))
    rows[0].update(output_drift(full, drafted), speedup=rows[0]["photos_per_s"] / rows[1]["photos_per_s"],
                   note=f"× baseline and outputs: against full decode, {len(photos)} photos")
    return rows


def partial_forward(variant: Variant, images: torch.Tensor, batch: int) -> Callable[[], object]:
    inputs = batch_of(images, batch)
    return lambda: variant.forward(inputs)


BARE_COLUMNS = [("model", "model"), ("variant", "variant"), ("batch", "batch"), ("ms_per_batch", "ms/batch"),
                ("photos_per_s", "photos/s"), ("speedup", "× baseline"), ("compile_s", "compile s"),
                ("max_abs_dprob", "max abs Δprob"), ("top1_agreement", "top-1 agree"),
                ("cosine_mean", "cos mean"), ("cosine_min", "cos min"), ("test_top1_agreement", "test top-1 agree"),
                ("test_accuracy", "test acc"), ("note", "note")]


def bench_bare(subjects: list[Subject], photos: list[bytes], settings: dict) -> dict:
    test_set = read_test_set(settings["work"], settings["test_photos"]) if settings.get("work") else None
    rows = []
    for subject in subjects:
        print(f"bare: {subject.name}", flush=True)
        rows += bench_subject(subject, photos, settings, test_set if subject.trained else None)
    legend = (f"× baseline: photos/s over the baseline's at batch {settings['knob_batch']}; the baseline rows are "
              f"timed each batch size in its own block of back-to-back calls (as a busy worker runs them), the knobs "
              f"in turns with the baseline (a burst of load from elsewhere slows them alike), each against the "
              f"baseline of its own timing. Median time per call. Baseline: the model as "
              f"the handler runs it ({settings['threads']} threads, torch.inference_mode, the serving layout `auto` "
              f"picks (marketplace_search.models.prepare_for_serving), fp32, the checkpoint's crop); layout rows: the other "
              f"layouts (mkldnn: oneDNN blocked + BatchNorm folded; nhwc: channels_last + BatchNorm folded; none: "
              f"NCHW as trained). Decode + preprocess: decode_image + eval_transform one photo at a time, as the "
              f"handler does (JPEG draft decoding down to the size the photo is resized to). Output columns "
              f"compare each variant with "
              f"the baseline on {len(photos)} photos (the phone-photo draft row: with full decoding): max abs "
              f"difference of probabilities, top-1 category agreement, cosine similarity of embeddings.")
    return {"rows": rows, "columns": BARE_COLUMNS, "legend": legend,
            "models": {subject.name: subject.source for subject in subjects}}


# ---------------------------------------------------------------- served: TorchServe REST API

SERVED_NAME = "bench"
LEVEL_ROUNDS = 8  # each level sends at least this many requests per client: ramp-up batches stay a small share
REQUEST_TIMEOUT = 120  # seconds; a resnet50 batch of 32 queued requests on 2 cores takes tens of seconds


def post_photo(session: requests.Session, url: str, photo: bytes) -> tuple[float, float, int, str]:
    """Start and end (perf_counter seconds), HTTP status and (for a failure) the start of the body of one prediction."""
    start = time.perf_counter()
    response = session.post(url, data=photo, headers={"Content-Type": "image/jpeg"}, timeout=REQUEST_TIMEOUT)
    return start, time.perf_counter(), response.status_code, "" if response.ok else response.text[:200]


def steady_rate(ends: list[float], concurrency: int) -> float | None:
    """Answers per second once every client has had its first answer: the answers after the first
    `concurrency` over the time from that one to the last (start-up and the first, partly filled
    batches left out). None when there are too few answers to tell."""
    ends = sorted(ends)
    if len(ends) <= concurrency:
        return None
    window = ends[-1] - ends[concurrency - 1]
    return (len(ends) - concurrency) / window if window > 0 else None


def load_test(url: str, photos: list[bytes], concurrency: int, total: int,
              max_seconds: float | None = None) -> dict:
    """Send up to `total` photos from `concurrency` client threads, each with a keep-alive session
    and one request in flight; no new request starts after `max_seconds` (those in flight finish).

    Photos/s is the steady rate (steady_rate) of answered (HTTP 200) photos; latency percentiles
    count every answer; client CPU is this process's CPU time (all its threads) per request.
    """
    numbers = itertools.count()  # next() on it is atomic under the GIL
    results: list[tuple[float, float, int, str]] = []
    # Every client sends its first request at once: the server's first batch is then as full as the
    # ones after it, instead of taking whichever one thread started first.
    together = threading.Barrier(concurrency)
    started, cpu_started = time.perf_counter(), time.process_time()
    deadline = started + max_seconds if max_seconds is not None else None

    def client() -> None:
        with requests.Session() as session:
            together.wait()
            while True:
                number = next(numbers)
                if number >= total or (deadline is not None and time.perf_counter() > deadline):
                    return
                results.append(post_photo(session, url, photos[number % len(photos)]))

    with ThreadPoolExecutor(max_workers=concurrency) as pool:
        for future in [pool.submit(client) for _ in range(concurrency)]:
            future.result()
    wall, cpu = time.perf_counter() - started, time.process_time() - cpu_started
    answered = [(start, end) for start, end, status, _ in results if status == 200]
    failures = [(status, body) for _, _, status, body in results if status != 200]
    if not answered:
        status, body = failures[0]
        raise RuntimeError(f"all {len(results)} requests to {url} failed; first: HTTP {status} {body!r}")
    rate = steady_rate([end for _, end in answered], concurrency)
    figures = {"concurrency": concurrency, "requests": len(results), "errors": len(failures),
               "photos_per_s": rate if rate is not None else len(answered) / wall, "wall_s": wall,
               "client_cpu_ms": cpu * 1000 / len(results), **percentiles_ms([end - start for start, end in answered])}
    if failures:
        figures["note"] = f"first error: HTTP {failures[0][0]} {failures[0][1][:80]}"
    return figures


def handler_counters(server) -> dict[str, dict[int, float]]:
    """The handler's counters so far, {metric: {batch size: value}}: batches served and forward-pass
    milliseconds per batch size, from the Prometheus endpoint."""
    from handlers.marketplace_handler import BATCH_METRIC, FORWARD_METRIC  # imports TorchServe's ts: only when serving

    response = requests.get(f"{server.metrics_url}/metrics", timeout=10)
    response.raise_for_status()
    counters: dict[str, dict[int, float]] = {BATCH_METRIC: {}, FORWARD_METRIC: {}}
    for line in response.text.splitlines():
        match = re.match(r'(?P<name>\w+){(?P<labels>[^}]*)}\s+(?P<value>\S+)', line)
        size = re.search(r'BatchSize="(\d+)"', match["labels"]) if match and match["name"] in counters else None
        if size:
            sizes = counters[match["name"]]
            sizes[int(size[1])] = sizes.get(int(size[1]), 0.0) + float(match["value"])
    return counters


def batch_figures(before: dict[str, dict[int, float]], after: dict[str, dict[int, float]]) -> dict:
    """Mean batch size and mean forward-pass ms per batch in the worker(s) between two readings."""
    from handlers.marketplace_handler import BATCH_METRIC, FORWARD_METRIC

    def delta(metric: str) -> dict[int, float]:
        return {size: value - before[metric].get(size, 0.0) for size, value in after[metric].items()}

    batches, forward = delta(BATCH_METRIC), delta(FORWARD_METRIC)
    count = sum(batches.values())
    if not count:
        return {"mean_batch": None}
    return {"mean_batch": sum(size * number for size, number in batches.items()) / count,
            "forward_ms": sum(forward.values()) / count}


FRONTEND_COUNTERS = ("ts_inference_requests_total", "ts_inference_latency_microseconds",
                     "ts_queue_latency_microseconds")


def frontend_counters(server, model: str = SERVED_NAME) -> dict[str, float]:
    """TorchServe's own cumulative request count and inference/queue time for `model` (all versions)."""
    response = requests.get(f"{server.metrics_url}/metrics", timeout=10)
    response.raise_for_status()
    totals = dict.fromkeys(FRONTEND_COUNTERS, 0.0)
    for line in response.text.splitlines():
        match = re.match(r'(?P<name>\w+){(?P<labels>[^}]*)}\s+(?P<value>\S+)', line)
        if match and match["name"] in totals and f'model_name="{model}"' in match["labels"]:
            totals[match["name"]] += float(match["value"])
    return totals


def backend_times(before: dict[str, float], after: dict[str, float]) -> dict:
    """Mean ms per request between the two readings: in the worker (TorchServe's inference latency:
    from the frontend handing the batch to the worker to its answer) and waiting in the queue."""
    served = after["ts_inference_requests_total"] - before["ts_inference_requests_total"]
    if served <= 0:
        return {}
    return {name: (after[counter] - before[counter]) / served / 1000
            for name, counter in (("backend_ms", "ts_inference_latency_microseconds"),
                                  ("queue_ms", "ts_queue_latency_microseconds"))}


def server_cpu_seconds(server) -> dict[str, float]:
    """CPU seconds (user + system) so far of the Java frontend and of all its Python workers."""
    frontend = psutil.Process(server.pid)

    def seconds(process: psutil.Process) -> float:
        times = process.cpu_times()
        return times.user + times.system

    return {"frontend": seconds(frontend),
            "workers": sum(seconds(worker) for worker in frontend.children(recursive=True))}


def cpu_figures(before: dict[str, float], after: dict[str, float], figures: dict) -> dict:
    """Server CPU ms per request between two readings, and the cores the server and client kept busy."""
    requests_sent = figures["requests"]
    frontend, workers = (after[name] - before[name] for name in ("frontend", "workers"))
    client = figures["client_cpu_ms"] * requests_sent / 1000
    return {"frontend_cpu_ms": frontend * 1000 / requests_sent, "worker_cpu_ms": workers * 1000 / requests_sent,
            "cores_busy": (frontend + workers + client) / figures["wall_s"]}


def distinct_ports(count: int) -> list[int]:
    ports: set[int] = set()
    while len(ports) < count:
        ports.add(free_port())
    return sorted(ports)


def process_memory(server) -> dict:
    """Memory of the Java frontend and of its Python worker(s), in MB.

    RSS counts shared library pages (torch alone maps hundreds of MB); USS is what the worker
    holds on its own, i.e. what each extra worker would add.
    """
    frontend = psutil.Process(server.pid)
    workers = [process.memory_full_info() for process in frontend.children(recursive=True)]
    return {"frontend_rss_mb": frontend.memory_info().rss / 2**20, "workers": len(workers),
            "worker_rss_mb": max((info.rss for info in workers), default=0) / 2**20 or None,
            "worker_uss_mb": max((info.uss for info in workers), default=0) / 2**20 or None}


@contextlib.contextmanager
def served_model(store: Path, mar: Path, name: str, workdir: Path, ready_timeout: float = 300, workers: int = 1):
    """TorchServe serving `mar` as `name` with `workers` READY; yields `(server, start-up figures)`
    and stops it after. READY s is when the last worker is ready."""
    inference, management, metrics, grpc_inference, grpc_management = distinct_ports(5)
    started = time.perf_counter()
    server = start_server(store, workdir=workdir, models={name: mar.name}, inference_port=inference,
                          management_port=management, metrics_port=metrics, grpc_inference_port=grpc_inference,
                          grpc_management_port=grpc_management)
    try:
        api_seconds = time.perf_counter() - started
        wait_workers_ready(server, name, workers, timeout=ready_timeout)
        startup = {"api_s": api_seconds, "ready_s": time.perf_counter() - started, **process_memory(server)}
        yield server, startup
    finally:
        server.stop()


def wait_workers_ready(server, name: str, workers: int, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    server.wait_ready(name, timeout=timeout)
    while time.monotonic() < deadline:
        description = describe(server, name)[0]
        if sum(worker["status"] == "READY" for worker in description.get("workers", [])) >= workers:
            return
        time.sleep(0.5)
    raise RuntimeError(f"{name}: fewer than {workers} workers READY after {timeout:.0f} s")


def serving_runs(subjects: list[Subject], settings: dict, scratch: Path) -> list[tuple[str, Path]]:
    """`(model name, RUN folder)` to serve: the --run, and a run folder holding each fresh model of
    the bare section (same weights, so served and bare figures compare the same network)."""
    runs = [(subject.name, Path(settings["run"])) for subject in subjects if subject.trained]
    fresh = [subject for subject in subjects if not subject.trained]
    if fresh:
        from tests.serving_fixtures import make_tiny_run  # test helper: importable from the repository root
    for subject in fresh:
        # The real preprocessing and embedding size, so a request costs what it would in production;
        # the catalogue is a dozen photos (index search at scale is the index section's job).
        classes = [f"category {number}" for number in range(NUM_CLASSES)]
        tiny = make_tiny_run(scratch / subject.name / "run", model=copy.deepcopy(subject.model), classes=classes,
                             preprocess=subject.preprocess)
        runs.append((subject.name, tiny.run_dir))
    return runs


@dataclass(frozen=True)
class ServeConfig:
    """One way of serving: dynamic batching on or off, workers, and each worker's torch threads."""

    batch_size: int
    max_batch_delay: int
    workers: int
    threads: int  # 0: the handler's default, cores / workers

    @property
    def labels(self) -> dict:
        batching = f"on ({self.batch_size}, {self.max_batch_delay} ms)" if self.batch_size > 1 else "off (1)"
        threads = self.threads or max(1, (os.cpu_count() or 1) // self.workers)
        default = "" if self.threads else " (default)"
        return {"batching": batching, "worker_threads": f"{self.workers} × {threads}{default}"}

    def archive_name(self, model: str) -> str:
        return (re.sub(r"[^A-Za-z0-9_.-]+", "-", model).strip("-")
                + f"-batch{self.batch_size}-workers{self.workers}-threads{self.threads}")


def parse_workers(text: str) -> tuple[int, int]:
    """"WORKERSxTHREADS" (e.g. 2x1; threads 0 = the handler's default) as a pair of ints."""
    workers, separator, threads = text.lower().partition("x")
    try:
        layout = int(workers), int(threads) if separator else 0
    except ValueError:
        layout = (0, 0)
    if layout[0] < 1 or layout[1] < 0:
        raise argparse.ArgumentTypeError(f"workers {text!r}: expected WORKERSxTHREADS like 1x0 or 2x1")
    return layout


def serve_configs(settings: dict) -> list[ServeConfig]:
    return [ServeConfig(batch, delay if batch > 1 else 0, workers, threads)
            for workers, threads in map(parse_workers, settings["workers"])
            for batch, delay in ((settings["batch_size"], settings["max_batch_delay"]), (1, 0))]


def build_archives(model: str, run_dir: Path, store: Path, configs: list[ServeConfig]) -> dict[ServeConfig, Path]:
    store.mkdir(parents=True, exist_ok=True)
    return {config: build_archive(run_dir, store, SERVED_NAME, "1.0", config.archive_name(model),
                                  batch_size=config.batch_size, max_batch_delay=config.max_batch_delay,
                                  min_workers=config.workers, max_workers=config.workers, threads=config.threads)
            for config in configs}


def bare_rates(bare_rows: list[dict]) -> dict[tuple[str, int | str], float]:
    """Baseline forward photos/s per (model, batch), and decode photos/s per model, from the bare section."""
    rates = {}
    for row in bare_rows:
        if row["variant"] == "baseline":
            rates[row["model"], row["batch"]] = row["photos_per_s"]
        elif row["variant"].startswith("decode"):  # the first decode row: at the baseline's threads
            rates.setdefault((row["model"], "decode"), row["photos_per_s"])
    return rates


BATCH_TOLERANCE = 0.1  # a served mean batch within 10% of a bare batch size counts as that size


def compare_with_bare(row: dict, model: str, rates: dict) -> None:
    """Served photos/s over the bare figures at the batch size the worker actually ran.

    Only when the mean batch served is within BATCH_TOLERANCE of a batch size the bare section
    measured (at concurrency 1 a worker batching up to 8 still runs batches of 1); `bare_batch`
    names it. A mean batch between the measured sizes (e.g. 4 at concurrency 8) gets no ratio.
    Single requests also get p50 minus the bare batch-1 forward, and minus the worker's own
    forward pass (what serving adds, whatever the speed of the worker's process).
    """
    mean = row.get("mean_batch")
    if row.get("concurrency") == 1 and row.get("forward_ms") is not None:
        row["p50_over_forward_ms"] = row["p50_ms"] - row["forward_ms"]
    matched = [batch for name, batch in rates if name == model and batch != "decode"
               and mean is not None and abs(mean - batch) <= BATCH_TOLERANCE * batch]
    if not matched:
        return
    batch = matched[0]
    forward, decode = rates[model, batch], rates.get((model, "decode"))
    row.update(bare_batch=batch, served_vs_bare=row["photos_per_s"] / forward)
    if decode:
        row["served_vs_pipeline"] = row["photos_per_s"] * (1 / forward + 1 / decode)
    if row.get("concurrency") == 1 and batch == 1:
        row["p50_over_bare_ms"] = row["p50_ms"] - 1000 / forward


def forward_share(row: dict, workers: int) -> dict:
    """The share of each worker's time spent in forward passes: 1.0 would mean serving costs the
    worker nothing beyond the model itself (decode, socket, answer and idle time all count against it)."""
    if not row.get("forward_ms") or not row.get("mean_batch"):
        return {}
    return {"forward_share": row["photos_per_s"] * row["forward_ms"] / row["mean_batch"] / 1000 / workers}


def load_level(server, url: str, photos: list[bytes], concurrency: int, settings: dict) -> dict:
    """One concurrency level: client figures, and the server's own counters and CPU over it."""
    handler_before, frontend_before, cpu_before = (handler_counters(server), frontend_counters(server),
                                                   server_cpu_seconds(server))
    figures = load_test(url, photos, concurrency, max(settings["requests"], LEVEL_ROUNDS * concurrency),
                        max_seconds=settings["max_load_seconds"])
    return {**figures, **batch_figures(handler_before, handler_counters(server)),
            **backend_times(frontend_before, frontend_counters(server)),
            **cpu_figures(cpu_before, server_cpu_seconds(server), figures)}


def bench_served_model(model: str, archives: dict[ServeConfig, Path], photos: list[bytes], settings: dict,
                       scratch: Path, rates: dict, with_load: bool) -> tuple[list[dict], list[dict]]:
    """(served rows, startup rows) for one model: one server start per serving configuration."""
    served_rows, startup_rows = [], []
    for config, mar in archives.items():
        label = {"model": model, **config.labels}
        # A short folder name: the worker's Unix socket lives under it (AF_UNIX paths stop at 107 bytes).
        workdir = Path(tempfile.mkdtemp(prefix="server-", dir=scratch))
        with served_model(mar.parent, mar, SERVED_NAME, workdir,
                          workers=config.workers) as (server, startup):
            print(f"served: {model} {config.labels} READY in {startup['ready_s']:.1f} s", flush=True)
            if with_load:
                url = f"{server.inference_url}/predictions/{SERVED_NAME}"
                # Warm-up: the first batch of a size allocates, in every worker, and the Java frontend
                # compiles its request path over the first few hundred requests (its CPU per request
                # halves; measured on mobilenet_v2: p50 − forward 12 ms over the first 50, 7 ms by 250).
                warm = config.batch_size * config.workers
                load_test(url, photos, concurrency=warm, total=max(2 * warm, settings.get("warm_up_requests", 0)))
                for concurrency in settings["concurrency"]:
                    row = {**label, **load_level(server, url, photos, concurrency, settings)}
                    row.update(forward_share(row, config.workers))
                    compare_with_bare(row, model, rates)
                    served_rows.append(row)
                after = process_memory(server)
                startup.update(worker_rss_after_mb=after["worker_rss_mb"], worker_uss_after_mb=after["worker_uss_mb"])
            startup_rows.append({**label, **startup})
    return served_rows, startup_rows


SERVED_COLUMNS = [("model", "model"), ("batching", "dynamic batching"), ("worker_threads", "worker threads"),
                  ("concurrency", "concurrency"),
                  ("requests", "requests"), ("errors", "errors"), ("photos_per_s", "photos/s"),
                  ("p50_ms", "p50 ms"), ("p95_ms", "p95 ms"), ("p99_ms", "p99 ms"),
                  ("backend_ms", "worker ms/request"), ("queue_ms", "queue ms/request"), ("mean_batch", "mean batch"),
                  ("forward_ms", "forward ms/batch"), ("forward_share", "forward share"), ("bare_batch", "bare batch"),
                  ("served_vs_bare", "÷ bare forward"),
                  ("served_vs_pipeline", "÷ bare decode+forward"), ("p50_over_bare_ms", "p50 − bare ms"),
                  ("p50_over_forward_ms", "p50 − worker forward ms"), ("client_cpu_ms", "client CPU ms/request"),
                  ("frontend_cpu_ms", "frontend CPU ms/request"), ("worker_cpu_ms", "worker CPU ms/request"),
                  ("cores_busy", "cores busy"), ("note", "note")]
STARTUP_COLUMNS = [("model", "model"), ("batching", "dynamic batching"), ("worker_threads", "worker threads"),
                   ("api_s", "APIs up s"),
                   ("ready_s", "READY s"), ("workers", "workers"), ("worker_rss_mb", "worker RSS MB"),
                   ("worker_uss_mb", "worker USS MB"), ("worker_rss_after_mb", "RSS after load MB"),
                   ("worker_uss_after_mb", "USS after load MB"), ("frontend_rss_mb", "frontend (Java) RSS MB")]


def bench_serving(subjects: list[Subject], photos: list[bytes], settings: dict, bare_rows: list[dict],
                  with_load: bool) -> tuple[dict, dict]:
    """The served and startup sections (start-up figures come from the same server starts)."""
    served_rows, startup_rows = [], []
    with tempfile.TemporaryDirectory(prefix="benchmark-serve-") as scratch:
        scratch = Path(scratch)
        rates = bare_rates(bare_rows)
        configs = serve_configs(settings) if with_load else serve_configs(settings)[:1]
        for model, run_dir in serving_runs(subjects, settings, scratch):
            archives = build_archives(model, run_dir, scratch / "store", configs)
            served, startup = bench_served_model(model, archives, photos, settings, scratch, rates, with_load)
            served_rows += served
            startup_rows += startup
    verdicts = served_verdicts(served_rows)
    served = {"rows": served_rows, "columns": SERVED_COLUMNS, "verdict": verdicts, "legend": "\n".join([
        f"TorchServe serving the bare section's models (same weights; fresh models in a run folder with a "
        f"12-photo flat catalogue: index search at scale is the index section's job); {len(photos)} JPEGs sent as "
        f"raw image/jpeg bodies by `requests` client threads on the same machine (they share its cores). Worker "
        f"threads: workers × torch threads each. Each server first answers {settings.get('warm_up_requests', 0)} "
        f"requests (at least two batches) unmeasured: the JVM compiles the frontend's request path over the "
        f"first few hundred. A level sends at least {LEVEL_ROUNDS} requests per client and "
        f"stops sending after {settings['max_load_seconds']:g} s; photos/s is the steady rate: answers after each "
        f"client's first one, over the time since (the ramp-up and its partly filled batches left out); latency "
        f"percentiles count every answer (p99 of few requests is close to the maximum). Worker and queue "
        f"ms/request: TorchServe's own cumulative inference and queue latency counters over its request count (a "
        f"batch's worker time counts for each of its requests; the client's latency minus both is HTTP and the "
        f"frontend). Mean batch and forward ms/batch: the handler's MarketplaceBatches and "
        f"MarketplaceForwardMilliseconds counters (the forward pass alone, timed inside the worker); forward share: "
        f"photos/s × forward ms per photo over the workers, the share of the workers' time in forward passes "
        f"(1.0: serving costs nothing beyond the model). ÷ bare "
        f"forward: over the bare section's baseline forward at the same batch size (a mean batch within "
        f"{BATCH_TOLERANCE:.0%} of a measured one; none otherwise); ÷ bare decode+forward: over decode + "
        f"preprocess + that forward in one process. p50 − bare: single-request (concurrency 1) p50 minus the bare "
        f"batch-1 forward; p50 − worker forward: minus the worker's own forward pass, i.e. what serving adds "
        f"(decode, TorchServe, HTTP, answer) whatever the speed of the worker's process. CPU ms/request: CPU "
        f"time of the benchmark's client threads, of the Java frontend and of the Python workers over the "
        f"requests sent; cores busy: all three over the level's wall time.",
        *verdicts])}
    startup = {"rows": startup_rows, "columns": STARTUP_COLUMNS, "legend": (
        "From start_server() to every worker READY (GET /models/NAME); memory of the Java frontend and of its "
        "Python workers (the largest) at READY and after the load test. RSS includes shared library pages; "
        "USS (unique set) is what one more worker would add.")}
    return served, startup


def served_verdicts(rows: list[dict]) -> list[str]:
    """PASS/FAIL lines for the serving targets, per model: the best configuration for each."""
    lines = []
    for model in dict.fromkeys(row["model"] for row in rows):
        own = [row for row in rows if row["model"] == model]
        compared = [row for row in own if "served_vs_bare" in row]
        if compared:
            best = max(compared, key=lambda row: row["served_vs_bare"])
            verdict = "PASS" if best["served_vs_bare"] >= TARGET_SERVED_RATIO else "FAIL"
            lines.append(f"Target {model}: served photos/s ≥ {TARGET_SERVED_RATIO} × bare forward at the same batch "
                         f"size: {verdict}, best {best['served_vs_bare']:.3f} (batching {best['batching']}, "
                         f"{best['worker_threads']}, concurrency {best['concurrency']}, mean batch "
                         f"{best['mean_batch']:.1f} vs bare {best['bare_batch']}).")
        loaded = [row for row in own if row["concurrency"] > 1 and "forward_share" in row]
        if loaded:
            best = max(loaded, key=lambda row: row["forward_share"])
            verdict = "PASS" if best["forward_share"] >= TARGET_SERVED_RATIO else "FAIL"
            lines.append(f"Target {model}, against the workers' own forward passes (forward share): "
                         f"{verdict}, best {best['forward_share']:.3f} (batching {best['batching']}, "
                         f"{best['worker_threads']}, concurrency {best['concurrency']}).")
        single = [row for row in own if "p50_over_bare_ms" in row]
        if single:
            best = min(single, key=lambda row: row["p50_over_bare_ms"])
            verdict = "PASS" if best["p50_over_bare_ms"] <= TARGET_EXTRA_MS else "FAIL"
            own_forward = (f", {best['p50_over_forward_ms']:+.1f} ms over the worker's own forward pass of "
                           f"{best['forward_ms']:.1f} ms (bare: {best['p50_ms'] - best['p50_over_bare_ms']:.1f} ms)"
                           if "p50_over_forward_ms" in best else "")
            lines.append(f"Target {model}: single-request p50 ≤ bare batch-1 forward + {TARGET_EXTRA_MS:g} ms: "
                         f"{verdict}, best {best['p50_over_bare_ms']:+.1f} ms (p50 {best['p50_ms']:.1f} ms"
                         f"{own_forward}; batching {best['batching']}, {best['worker_threads']}).")
        overheads = [row for row in own if "p50_over_forward_ms" in row]
        if overheads:
            best = min(overheads, key=lambda row: row["p50_over_forward_ms"])
            verdict = "PASS" if best["p50_over_forward_ms"] <= TARGET_EXTRA_MS else "FAIL"
            lines.append(f"Target {model}, against the worker's own forward pass (p50 − worker forward): "
                         f"{verdict}, best {best['p50_over_forward_ms']:+.1f} ms (batching {best['batching']}, "
                         f"{best['worker_threads']}).")
    return lines


# ---------------------------------------------------------------- index: Faiss

def clustered_vectors(n: int, dimension: int, seed: int = 0, clusters: int | None = None,
                      rank: int = 32, spread: float = 0.6, noise: float = 0.25,
                      chunk: int = 100_000) -> tuple[np.ndarray, np.ndarray]:
    """`(vectors, cluster)`: (n, dimension) float32 L2-normalised vectors from a mixture, and the
    cluster each was drawn from.

    Each vector is a cluster centre plus an offset in a shared low-rank subspace plus a little
    isotropic noise: like real embeddings, the data has a low intrinsic dimension, so approximate
    search behaves as it would on a catalogue (uniform random vectors make every index look bad).
    """
    rng = np.random.default_rng(seed)
    clusters = clusters or max(16, n // 1000)
    centres = rng.standard_normal((clusters, dimension)).astype(np.float32)
    centres /= np.linalg.norm(centres, axis=1, keepdims=True)
    basis = rng.standard_normal((rank, dimension)).astype(np.float32)
    basis /= np.linalg.norm(basis, axis=1, keepdims=True)
    vectors = np.empty((n, dimension), np.float32)
    labels = rng.integers(0, clusters, n)
    for start in range(0, n, chunk):
        size = min(chunk, n - start)
        block = centres[labels[start:start + size]]
        block += (rng.standard_normal((size, rank), dtype=np.float32) @ basis) * (spread / np.sqrt(rank))
        block += rng.standard_normal((size, dimension), dtype=np.float32) * (noise / np.sqrt(dimension))
        block /= np.linalg.norm(block, axis=1, keepdims=True)
        vectors[start:start + size] = block
    return vectors, labels


def recall_at_k(found: np.ndarray, exact: np.ndarray, k: int = TOP_K) -> float:
    """Mean fraction of each query's exact top-k ids that `found` returns in its top k."""
    hits = [len((set(row[:k].tolist()) - {-1}) & set(truth[:k].tolist())) for row, truth in zip(found, exact)]
    return float(np.mean(hits)) / k


@dataclass
class Workload:
    """A catalogue to index and its queries, with categories for filtered search.

    `exact` and `exact_filtered` are the flat index's answers (ids), filled in once it is built;
    filtered queries search only the photos of their own category, as `Catalogue.search_ids`
    does with `category=`.
    """

    data: str
    vectors: np.ndarray
    queries: np.ndarray
    categories: np.ndarray  # per vector
    query_categories: np.ndarray
    filtered_queries: int
    exact: np.ndarray | None = None
    exact_filtered: np.ndarray | None = None

    def __post_init__(self):
        self.filtered_queries = min(self.filtered_queries, len(self.queries))
        self.selectors = {category: faiss.IDSelectorBatch(np.flatnonzero(self.categories == category))
                          for category in np.unique(self.query_categories[:self.filtered_queries])}

    def search_filtered(self, index: faiss.Index, row: int) -> np.ndarray:
        # The search parameters Catalogue.search_ids builds for a category filter.
        params = search._search_parameters(index, self.selectors[self.query_categories[row]])
        return index.search(self.queries[row:row + 1], TOP_K, params=params)[1][0]


def synthetic_workload(n: int, settings: dict) -> Workload:
    """n clustered catalogue vectors and held-out queries from the same mixture; a cluster's
    vectors share one of 13 categories, as a listing's photos do."""
    started = time.perf_counter()
    data, clusters = clustered_vectors(n + settings["queries"], settings["dim"], seed=n)
    print(f"index: {n:,} x {settings['dim']} clustered vectors generated in {time.perf_counter() - started:.1f} s",
          flush=True)
    categories = clusters % NUM_CLASSES
    return Workload("synthetic", data[:n], data[n:], categories[:n], categories[n:], settings["filtered_queries"])


def run_workload(run_dir: Path, settings: dict, seed: int = 0) -> Workload:
    """A run's real photo embeddings and categories; a random tenth (at most --queries) held out as queries."""
    image_ids, vectors, _, _ = load_embeddings(run_dir)
    listings = json.loads((Path(run_dir) / "index" / search.LISTINGS_FILE).read_text())
    categories = np.array([listings[image_id]["category"] for image_id in image_ids])
    held_out = min(settings["queries"], len(vectors) // 10)
    order = np.random.default_rng(seed).permutation(len(vectors))
    catalogue, queries = order[held_out:], order[:held_out]
    return Workload("run", vectors[catalogue], vectors[queries], categories[catalogue], categories[queries],
                    settings["filtered_queries"])


def measure_queries(index: faiss.Index, workload: Workload, single_queries: int, threads: int,
                    max_seconds: float = 5.0) -> dict:
    """Single-query latency (p50/p95) with `threads` and with 1 Faiss thread, taken in turns; the
    per-query time of one batched call with `threads`; recall@10 of that call; and recall@10 and
    latency (1 thread) of category-filtered single queries.

    One query is too little work to share out: on a busy machine an OpenMP team waits for its
    slowest thread, so the 1-thread figures are measured alongside.
    """
    queries = workload.queries
    times: dict[int, list[float]] = {threads: [], 1: []}
    filtered_times, filtered_found = [], []
    started = time.perf_counter()
    try:
        for row in range(min(single_queries, len(queries))):
            for count, measured in times.items():
                faiss.omp_set_num_threads(count)
                start = time.perf_counter()
                index.search(queries[row:row + 1], TOP_K)
                measured.append(time.perf_counter() - start)
            if row >= 20 and time.perf_counter() - started > max_seconds:
                break
        faiss.omp_set_num_threads(1)
        for row in range(workload.filtered_queries):
            start = time.perf_counter()
            filtered_found.append(workload.search_filtered(index, row))
            filtered_times.append(time.perf_counter() - start)
    finally:
        faiss.omp_set_num_threads(threads)
    start = time.perf_counter()
    _, found = index.search(queries, TOP_K)
    batched = time.perf_counter() - start
    many, one = percentiles_ms(times[threads], (50, 95)), percentiles_ms(times[1], (50, 95))
    figures = {**many, "p50_ms_1t": one["p50_ms"], "p95_ms_1t": one["p95_ms"],
               "batched_ms_per_query": batched * 1000 / len(queries), "single_queries": len(times[1]),
               "recall_at_10": 1.0 if workload.exact is None else recall_at_k(found, workload.exact)}
    if filtered_found:
        figures["filtered_p50_ms_1t"] = percentiles_ms(filtered_times, (50,))["p50_ms"]
        figures["filtered_recall_at_10"] = 1.0 if workload.exact_filtered is None else \
            recall_at_k(np.array(filtered_found), workload.exact_filtered)
    return figures


def exact_answers(flat: faiss.Index, workload: Workload) -> None:
    """Fill in the workload's exact answers from the flat index: the recall reference."""
    workload.exact = flat.search(workload.queries, TOP_K)[1]
    if workload.filtered_queries:
        workload.exact_filtered = np.array([workload.search_filtered(flat, row)
                                            for row in range(workload.filtered_queries)])


def index_bytes(index: faiss.Index) -> int:
    return int(faiss.serialize_index(index).nbytes)


def timed_build(vectors: np.ndarray, index_type: str, **options) -> tuple[faiss.Index, dict, float]:
    """`build_index` (what the pipeline ships) with the resident-memory growth it caused, in MB."""
    rss_before = psutil.Process().memory_info().rss
    index, params = search.build_index(vectors, index_type, **options)
    return index, params, (psutil.Process().memory_info().rss - rss_before) / 2**20


def sweep_rows(index: faiss.Index, params: dict, base: dict, workload: Workload, single_queries: int,
               knob: str | None, values: list[int]) -> list[dict]:
    """One row per search-time setting (efSearch or nprobe) of an already built index."""
    rows = []
    if knob == "efSearch":
        values = sorted(set(values) | {search_default("ef_search")})  # always show what ships
    elif knob == "nprobe":
        values = sorted({min(value, index.nlist) for value in values})  # a small catalogue has few lists
    for value in values or [None]:
        described = dict(params)
        if knob == "efSearch":
            index.hnsw.efSearch = value
            described["efSearch"] = value
        elif knob == "nprobe":
            index.nprobe = described["nprobe"] = value
        settings = ", ".join(f"{key}={described[key]}" for key in ("M", "efConstruction", "efSearch", "nlist",
                                                                  "nprobe") if key in described)
        rows.append({**base, "settings": settings, **described_figures(described),
                     **measure_queries(index, workload, single_queries, faiss.omp_get_max_threads())})
    return rows


def described_figures(params: dict) -> dict:
    return {key: params[key] for key in ("M", "efSearch", "nlist", "nprobe") if key in params}


def bench_workload(workload: Workload, settings: dict) -> list[dict]:
    """Rows for one catalogue: flat (exact, the recall reference), HNSW and IVF sweeps."""
    n = len(workload.vectors)
    auto_index, auto_params, auto_rss = timed_build(workload.vectors, "auto")
    auto_type = auto_params["type"]
    rows = []

    def add(index: faiss.Index, params: dict, rss_mb: float, knob: str | None, values: list[int]) -> None:
        base = {"data": workload.data, "vectors": n, "type": params["type"], "build_s": params["build_seconds"],
                "threads": faiss.omp_get_max_threads(), "index_mb": index_bytes(index) / 2**20,
                "rss_delta_mb": rss_mb}
        for row in sweep_rows(index, params, base, workload, settings["single_queries"], knob, values):
            row["auto"] = "yes" if row["type"] == auto_type and ships_as_default(row) else ""
            rows.append(row)

    flat, flat_params, flat_rss = (auto_index, auto_params, auto_rss) if auto_type == "flat" else \
        timed_build(workload.vectors, "flat")
    exact_answers(flat, workload)
    add(flat, flat_params, flat_rss, None, [])
    del flat
    for m in settings["hnsw_m"]:
        if m != search_default("hnsw_m") and n > settings["hnsw_m_max_size"]:
            continue
        if auto_type == "hnsw" and m == search_default("hnsw_m"):
            index, params, rss = auto_index, auto_params, auto_rss
        else:
            index, params, rss = timed_build(workload.vectors, "hnsw", hnsw_m=m)
        print(f"index: {n:,} hnsw M={m} built in {params['build_seconds']:.1f} s", flush=True)
        add(index, params, rss, "efSearch", settings["ef_search"])
        del index
    if settings.get("hnsw_sq8"):
        index, params, rss = timed_build(workload.vectors, "hnsw_sq8")
        print(f"index: {n:,} hnsw_sq8 built in {params['build_seconds']:.1f} s", flush=True)
        add(index, params, rss, "efSearch", settings["ef_search"])
        del index
    if n <= settings["ivf_max_size"]:
        index, params, rss = timed_build(workload.vectors, "ivf")
        add(index, params, rss, "nprobe", settings["nprobe"])
    for row in rows:
        row["target"] = target_status(row)
    return rows


def search_default(name: str):
    """A keyword default of `marketplace_search.search.build_index`, so the table marks what ships."""
    return search.build_index.__kwdefaults__[name]


def ships_as_default(row: dict) -> bool:
    """True when a row's parameters are build_index's defaults (what "auto" would build)."""
    return (row.get("M", search_default("hnsw_m")) == search_default("hnsw_m")
            and row.get("efSearch", search_default("ef_search")) == search_default("ef_search"))


def target_status(row: dict) -> str:
    """Which Faiss thread counts meet the latency target (p95 of single queries) at the recall target."""
    if row["recall_at_10"] < TARGET_RECALL:
        return ""
    met = [label for label, key in ((f"{row['threads']} threads", "p95_ms"), ("1 thread", "p95_ms_1t"))
           if row[key] <= TARGET_MS]
    return ", ".join(met)


def index_verdict(rows: list[dict]) -> str:
    """PASS/FAIL line for "top-10 over 1M vectors in ≤ 5 ms at recall@10 ≥ 0.95"."""
    largest = max(row["vectors"] for row in rows)
    candidates = [row for row in rows if row["vectors"] == largest and row["target"]]
    target = (f"top-{TOP_K} over {TARGET_VECTORS:,} vectors in ≤ {TARGET_MS:g} ms (one query, p95) at recall@10 ≥ "
              f"{TARGET_RECALL}")
    if largest < TARGET_VECTORS:
        met = f"{len(candidates)} setting(s) meet it there" if candidates else "no setting meets it there"
        return f"{target}: NOT MEASURED (largest size run: {largest:,}; {met})"
    if not candidates:
        return f"{target}: FAIL (no setting meets both)"
    best = min(candidates, key=lambda row: min(row["p95_ms"], row["p95_ms_1t"]))
    return (f"{target}: PASS with {best['type']} {best['settings']}: p95 {best['p95_ms']:.2f} ms "
            f"({best['threads']} threads) / {best['p95_ms_1t']:.2f} ms (1 thread), recall@10 "
            f"{best['recall_at_10']:.3f}")


def auto_choices(rows: list[dict]) -> str:
    picks = sorted({(row["vectors"], row["type"], row["settings"]) for row in rows if row["auto"]})
    return "index_type=\"auto\" picks: " + "; ".join(f"{n:,} → {kind}" + (f" ({settings})" if settings else "")
                                                    for n, kind, settings in picks)


INDEX_COLUMNS = [("data", "data"), ("vectors", "vectors"), ("type", "index"), ("settings", "settings"),
                 ("auto", "auto"),
                 ("build_s", "build s"), ("index_mb", "index MB"), ("rss_delta_mb", "RSS Δ MB"),
                 ("p50_ms", "1 query p50 ms"), ("p95_ms", "p95 ms"), ("p50_ms_1t", "p50 ms, 1 thread"),
                 ("p95_ms_1t", "p95 ms, 1 thread"), ("batched_ms_per_query", "batched ms/query"),
                 ("recall_at_10", "recall@10"), ("target", "≤5 ms & ≥0.95 with"),
                 ("filtered_p50_ms_1t", "category-filtered p50 ms, 1 thread"),
                 ("filtered_recall_at_10", "filtered recall@10")]


def bench_index(settings: dict) -> dict:
    rows = []
    if settings.get("run") and (Path(settings["run"]) / "embeddings" / "embeddings.npy").is_file():
        rows += bench_workload(run_workload(settings["run"], settings), settings)
    for n in settings["sizes"]:
        rows += bench_workload(synthetic_workload(n, settings), settings)
    legend = "\n".join([
        f"Data 'synthetic': clustered L2-normalised vectors ({settings['dim']}-d), {settings['queries']} held-out "
        f"queries from the same mixture, one of {NUM_CLASSES} categories per cluster; 'run': the --run's photo "
        f"embeddings, a random tenth (at most {settings['queries']}) held out as queries. Recall@10 against exact "
        f"(flat) search; single-query latency over up to {settings['single_queries']} queries; Faiss threads "
        f"{faiss.omp_get_max_threads()} unless marked 1 thread. Category-filtered: {settings['filtered_queries']} "
        f"queries restricted to their own category (an IDSelectorBatch, as Catalogue.search_ids(category=) does). "
        f"Built with marketplace_search.search.build_index (hnsw_sq8: HNSW over 8-bit scalar-quantised vectors); 'auto' "
        f"marks what index_type=\"auto\" ships "
        f"(FLAT_MAX={search.FLAT_MAX:,}, efSearch default {search_default('ef_search')}).",
        auto_choices(rows),
        "Target " + index_verdict(rows),
    ])
    return {"rows": rows, "columns": INDEX_COLUMNS, "legend": legend, "verdict": index_verdict(rows)}


# ---------------------------------------------------------------- command line

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
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
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
    served = parser.add_argument_group("served and startup")
    served.add_argument("--concurrency", type=parse_list, help="client concurrency levels (default 1,8,32)")
    served.add_argument("--requests", type=int, help="requests per concurrency level (at least 2 x concurrency)")
    served.add_argument("--max-load-seconds", type=float, help="stop sending new requests of a level after this")
    served.add_argument("--warm-up-requests", type=int, help="requests sent to each server before measuring")
    served.add_argument("--workers", type=lambda text: parse_list(text, str),
                        help="worker layouts to compare, WORKERSxTHREADS; threads 0 = the handler's default, "
                             "cores / workers (full: 1x0,2x1; quick: 1x0)")
    served.add_argument("--batch-size", type=int, default=BATCHED, help="TorchServe batch_size with batching on")
    served.add_argument("--max-batch-delay", type=int, default=MAX_BATCH_DELAY,
                        help="TorchServe max_batch_delay ms with batching on (default: the archive's)")
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
        settings["dim"] = checkpoint["embedding_dim"]
    width, _, height = settings["photo_size"].partition("x")
    settings["photo_size"] = (int(width), int(height))
    return settings


def render_section(name: str, section: dict, cores: int) -> str:
    parts = [f"## {name}", ""]
    for model, source in section.get("models", {}).items():
        parts.append(f"- {model}: {source}")
    if section.get("models"):
        parts.append("")
    before, after = section["load_average"]
    parts += [markdown_table(section["rows"], section["columns"]), "", section["legend"],
              f"Measured in {section['seconds']:.0f} s; 1-minute load average {before:.1f} → {after:.1f} "
              f"({cores} cores)."]
    return "\n".join(parts)


def render_report(machine: dict, settings: dict, sections: dict) -> str:
    parts = ["# Benchmark", "", format_machine(machine), "",
             f"Profile: {'quick' if settings['quick'] else 'full'}; sections: {', '.join(sections)}"]
    for name, section in sections.items():
        parts += ["", render_section(name, section, machine["logical_cores"])]
    return "\n".join(parts) + "\n"


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
    return {name: sections[name] for name in SECTIONS if name in sections}


def raw_figures(machine: dict, settings: dict, sections: dict) -> dict:
    return {"machine": machine,
            "settings": {key: str(value) if isinstance(value, Path) else value for key, value in settings.items()},
            "sections": {name: {key: value for key, value in section.items() if key != "columns"}
                         for name, section in sections.items()}}


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
