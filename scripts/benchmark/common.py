"""What the sections share: the photos they send, the run and server they measure, timing, stopping on a signal."""
import contextlib
import io
import signal
import tempfile
import time
from pathlib import Path
from typing import Callable

import numpy as np
import psutil
import torch
from PIL import Image, ImageDraw, ImageFilter

from marketplace_search.images import decode_image
from marketplace_search.layout import TEXT_MODEL_DIR
from marketplace_search.presets import Preprocess, eval_transform
from scripts import api
from scripts.archive import build_archive
from scripts.serve import serving

NUM_CLASSES = 13  # root categories of the marketplace data


def generate_photos(count: int, size: tuple[int, int] = (640, 480), seed: int = 0) -> list[bytes]:
    """JPEGs that cost what camera photos cost to decode (flat colour would decode unrealistically fast)."""
    rng = np.random.default_rng(seed)
    width, height = size
    ramp = np.linspace(0, 1, height, dtype=np.float32)[:, None, None] * np.ones((1, width, 1), np.float32)
    photos = []
    for _ in range(count):
        top, bottom = rng.integers(0, 256, size=(2, 3))
        image = Image.fromarray((top * (1 - ramp) + bottom * ramp).astype(np.uint8))
        draw = ImageDraw.Draw(image)
        for _ in range(int(rng.integers(2, 6))):
            x, y = int(rng.integers(0, width)), int(rng.integers(0, height))
            box = (x, y, x + int(rng.integers(width // 8, width // 2)), y + int(rng.integers(height // 8, height // 2)))
            (draw.ellipse if rng.random() < 0.5 else draw.rectangle)(box, fill=tuple(map(int, rng.integers(0, 256, 3))))
        pixels = np.asarray(image.filter(ImageFilter.GaussianBlur(1.5)), np.float32) + rng.normal(0, 6, ramp.shape)
        buffer = io.BytesIO()
        Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8)).save(buffer, "JPEG", quality=85)
        photos.append(buffer.getvalue())
    return photos


def read_photos(directory: Path, count: int, seed: int = 0) -> list[bytes]:
    """`count` photos picked at random (seeded) from a folder of JPEG/PNG files."""
    paths = sorted(path for path in Path(directory).glob("*") if path.suffix.lower() in {".jpg", ".jpeg", ".png"})
    if not paths:
        raise FileNotFoundError(f"--photos {directory}: no .jpg, .jpeg or .png files there")
    chosen = np.random.default_rng(seed).choice(len(paths), size=min(count, len(paths)), replace=False)
    return [paths[i].read_bytes() for i in sorted(chosen)]


def preprocess_photos(photos: list[bytes], preprocess: Preprocess, draft: bool = True) -> torch.Tensor:
    """The handler's decode (JPEG draft decoding down to the resize, unless `draft` is False) and eval transform."""
    transform = eval_transform(preprocess)
    return torch.stack([transform(decode_image(photo, fit_size=preprocess.resize if draft else None))
                        for photo in photos])


def time_in_turns(calls: dict[str, Callable[[], object]], *, min_seconds: float, min_repeats: int,
                  max_repeats: int = 200) -> dict[str, list[float]]:
    """Seconds per call of each function, called in turns (a burst of load from elsewhere slows them alike), each
    timed call after an untimed one (the call before was another function's, on the same caches), until each has
    had `min_repeats` timed calls and `min_seconds`."""
    times: dict[str, list[float]] = {name: [] for name in calls}
    started, rounds = time.perf_counter(), 0
    while rounds < min_repeats or (time.perf_counter() - started < min_seconds * len(calls) and rounds < max_repeats):
        for name, function in calls.items():
            function()
            start = time.perf_counter()
            function()
            times[name].append(time.perf_counter() - start)
        rounds += 1
    return times


def timed(call) -> float:
    """Seconds `call()` took; the response it returns must be a 200."""
    started = time.perf_counter()
    response = call()
    elapsed = time.perf_counter() - started
    if response.status_code != 200:
        raise RuntimeError(f"HTTP {response.status_code}: {api.error_text(response)}")
    return elapsed


def percentiles_ms(seconds: list[float], points=(50, 95, 99)) -> dict[str, float]:
    values = np.percentile(np.asarray(seconds) * 1000, points)
    return {f"p{point}_ms": float(value) for point, value in zip(points, values)}


def bench_run(settings: dict, scratch: Path, text_model: bool = False, **tiny) -> Path:
    """The --run (one with a text model if TEXT_MODEL), else a tiny generated run (TINY: make_tiny_run's options)."""
    run = settings.get("run")
    if run and (not text_model or (Path(run) / TEXT_MODEL_DIR).is_dir()):
        return Path(run)
    from training.tiny_run import make_tiny_run, make_tiny_text_model

    run_dir = make_tiny_run(scratch / "runs" / "2025-01-31_142233", **tiny).run_dir
    if text_model:
        make_tiny_text_model(run_dir)
    return run_dir


@contextlib.contextmanager
def served_archive(run_dir: Path, scratch: Path, name: str, workers: int = 1, **archive_options):
    """(TorchServe serving RUN_DIR's unguarded archive on WORKERS workers, its seconds to READY)."""
    store = Path(tempfile.mkdtemp(prefix="store-", dir=scratch))
    mar = build_archive(run_dir, store, name, "1.0", min_workers=workers, max_workers=workers, guard=False,
                        **archive_options)
    workdir = Path(tempfile.mkdtemp(prefix="ts-", dir=scratch))  # short: worker sockets live under it
    started = time.perf_counter()
    with serving(store, workdir, {name: mar.name}, ready_timeout=300, workers=workers) as server:
        yield server, time.perf_counter() - started


@contextlib.contextmanager
def interruptible():
    """SIGTERM and SIGINT raise KeyboardInterrupt in the main thread, so every `finally` stops what it started;
    further signals are ignored while those clean-ups run."""
    def interrupt(number, frame):
        for each in previous:
            signal.signal(each, signal.SIG_IGN)
        raise KeyboardInterrupt(signal.Signals(number).name)

    previous = {number: signal.signal(number, interrupt) for number in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for number, handler in previous.items():
            signal.signal(number, handler)


def worker_memory(server) -> dict:
    """TorchServe's Python workers' pids, and the largest one's RSS and USS (what one more worker adds) in MB."""
    workers = [process for process in psutil.Process(server.pid).children(recursive=True)
               if "model_service_worker" in " ".join(process.cmdline())]
    memory = [process.memory_full_info() for process in workers]
    return {"workers": " ".join(str(process.pid) for process in workers),
            "rss_mb": max((info.rss for info in memory), default=0) / 2**20,
            "uss_mb": max((info.uss for info in memory), default=0) / 2**20}
