"""What the sections share: the photos they send, timing, and TorchServe started and always stopped."""
import contextlib
import io
import signal
import time
from pathlib import Path
from typing import Callable

import numpy as np
import psutil
import torch
from PIL import Image, ImageDraw, ImageFilter

from marketplace_search.images import decode_image
from marketplace_search.presets import Preprocess, eval_transform
from scripts import api
from scripts.serve import attach, free_ports, start_server

NUM_CLASSES = 13  # root categories of the marketplace data
PORTS = ("inference_port", "management_port", "metrics_port", "grpc_inference_port", "grpc_management_port")


def generate_photos(count: int, size: tuple[int, int] = (640, 480), seed: int = 0) -> list[bytes]:
    """JPEGs that cost what camera photos cost to decode (flat colour would decode unrealistically fast): a lit
    background, a few coloured shapes, blur and sensor noise."""
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
    """Seconds per call of each named function, called in turns after one untimed call each, until each has had
    `min_repeats` calls and `min_seconds`. Turns are fair on a shared machine: a burst of load from elsewhere
    slows every function of the round alike."""
    for function in calls.values():
        function()
    times: dict[str, list[float]] = {name: [] for name in calls}
    started, rounds = time.perf_counter(), 0
    while rounds < min_repeats or (time.perf_counter() - started < min_seconds * len(calls) and rounds < max_repeats):
        for name, function in calls.items():
            start = time.perf_counter()
            function()
            times[name].append(time.perf_counter() - start)
        rounds += 1
    return times


def percentiles_ms(seconds: list[float], points=(50, 95, 99)) -> dict[str, float]:
    values = np.percentile(np.asarray(seconds) * 1000, points)
    return {f"p{point}_ms": float(value) for point, value in zip(points, values)}


@contextlib.contextmanager
def interruptible():
    """SIGTERM (a timeout, a job runner) and SIGINT raise KeyboardInterrupt in the main thread, so every `finally`
    runs and stops what it started; further signals are ignored while those clean-ups run."""
    previous = {number: signal.getsignal(number) for number in (signal.SIGINT, signal.SIGTERM)}

    def interrupt(number, frame):
        for each in previous:
            signal.signal(each, signal.SIG_IGN)
        raise KeyboardInterrupt(signal.Signals(number).name)

    for number in previous:
        signal.signal(number, interrupt)
    try:
        yield
    finally:
        for number, handler in previous.items():
            signal.signal(number, handler)


@contextlib.contextmanager
def serving(store: Path, models: dict[str, str], workdir: Path, workers: int = 1, ready_timeout: float = 300):
    """TorchServe serving `models` (name: .mar in `store`), every worker READY; yields (server, seconds to READY).
    Stopped on the way out whatever ends the block; one whose start was cut short is found by its folder."""
    started = time.perf_counter()
    try:
        server = start_server(store, workdir=workdir, models=models, **dict(zip(PORTS, free_ports(len(PORTS)))))
        for name in models:
            server.wait_ready(name, timeout=ready_timeout)
            while sum(worker["status"] == "READY" for worker in api.describe(server, name)[0]["workers"]) < workers:
                if time.perf_counter() - started > ready_timeout:
                    raise RuntimeError(f"{name}: fewer than {workers} workers READY after {ready_timeout:.0f} s")
                time.sleep(0.5)
        yield server, time.perf_counter() - started
    finally:
        interrupted = None
        while (running := attach(workdir)) is not None:
            try:
                running.stop()
            except KeyboardInterrupt as error:  # a signal during the stop itself: finish stopping first
                interrupted = error
        if interrupted is not None:
            raise interrupted


def worker_memory(server) -> dict:
    """TorchServe's Python workers' pids, and the largest one's RSS and USS in MB (USS: what one more worker adds)."""
    workers = [process for process in psutil.Process(server.pid).children(recursive=True)
               if "model_service_worker" in " ".join(process.cmdline())]
    memory = [process.memory_full_info() for process in workers]
    return {"workers": " ".join(str(process.pid) for process in workers),
            "rss_mb": max((info.rss for info in memory), default=0) / 2**20,
            "uss_mb": max((info.uss for info in memory), default=0) / 2**20}
