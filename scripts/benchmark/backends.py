"""Bare section, inference backends: each runtime x precision of marketplace_search.runtime at batch
1/8/32, timed in turns with torch fp32 (today's path: the handler's backend before OpenVINO), with
their outputs against it and, for a trained run, test-split accuracy.

int8 is calibrated as scripts.archive does it: train-split photos of WORK when given, else the
benchmark's own photos.
"""
import copy
import time

import numpy as np
import torch

from marketplace_search.runtime import (Backend, SUPPORTED, convert_openvino, openvino_backend, precision_supported,
                                        quantize_openvino, torch_backend)
from scripts.benchmark.bare import batch_of, output_drift, throughput, time_round_robin
from scripts.benchmark.common import torch_threads
from scripts.benchmark.photos import preprocess_photos
from scripts.benchmark.subjects import Subject

REFERENCE = "torch fp32"
ORDER = ["torch fp32", "torch bf16", "openvino fp32", "openvino bf16", "openvino int8"]


def make_backends(subject: Subject, threads: int, calibration: torch.Tensor) -> tuple[dict[str, Backend], dict]:
    """Every supported backend this CPU runs natively, and the seconds each took to prepare."""
    backends, seconds = {}, {}
    converted = None
    for name in ORDER:
        runtime, precision = name.split()
        if (runtime, precision) not in SUPPORTED or not precision_supported(precision):
            continue
        started = time.perf_counter()
        model = copy.deepcopy(subject.model)
        if runtime == "torch":
            backends[name] = torch_backend(model, precision)
        else:
            converted = converted or convert_openvino(model, subject.preprocess.crop)
            source = quantize_openvino(convert_openvino(model, subject.preprocess.crop),
                                       list(calibration.split(8))) if precision == "int8" else converted
            backends[name] = openvino_backend(source, precision, threads)
        seconds[name] = time.perf_counter() - started
    return backends, seconds


def calibration_photos(settings: dict) -> list[bytes] | None:
    """Train-split photos of --work for int8 (as scripts.archive picks them), or None without --work."""
    if not settings.get("work"):
        return None
    from training.guard import calibration_paths

    return [path.read_bytes() for path in calibration_paths(settings["work"], count=settings["calibration_photos"])]


def predict(backend: Backend, images: torch.Tensor, batch: int) -> tuple[np.ndarray, np.ndarray]:
    outputs = [backend.forward(images[start:start + batch]) for start in range(0, len(images), batch)]
    return np.concatenate([part[0] for part in outputs]), np.concatenate([part[1] for part in outputs])


def bench_backends(subject: Subject, photos: list[bytes], settings: dict, test_set=None,
                   calibration_photos: list[bytes] | None = None) -> list[dict]:
    """Rows `backend RUNTIME PRECISION` per batch size; × torch fp32 is at the same batch, in the same turns;
    output drift (and test accuracy) at the knob batch size."""
    threads = settings["threads"]
    timing = {"min_seconds": settings["min_seconds"], "min_repeats": settings["min_repeats"]}
    images = preprocess_photos(photos, subject.preprocess)
    calibration = preprocess_photos(calibration_photos or photos, subject.preprocess)
    with torch_threads(threads):
        backends, prepare_seconds = make_backends(subject, threads, calibration)
        reference = predict(backends[REFERENCE], images, 8)
        test_images = preprocess_photos(test_set[0], subject.preprocess) if test_set is not None else None
        test_reference = predict(backends[REFERENCE], test_images, 8) if test_set is not None else None
    base = {"model": subject.name, "arch": subject.model.arch}
    rows = []
    knob_batch = settings.get("knob_batch", 8)
    for batch in sorted(set(settings["batches"]) | {knob_batch}):
        inputs = batch_of(images, batch)
        calls = {name: ((lambda backend=backend: backend.forward(inputs)), threads) for name, backend in backends.items()}
        times = time_round_robin(calls, **timing)
        reference_rate = throughput(times[REFERENCE], batch)["photos_per_s"]
        for name, backend in backends.items():
            measured = throughput(times[name], batch)
            row = {**base, "variant": f"backend {name}", **measured,
                   "speedup": measured["photos_per_s"] / reference_rate,
                   "note": f"prepare {prepare_seconds[name]:.1f} s" + (", int8 calibrated on "
                                                                         f"{len(calibration)} photos"
                                                                         if name.endswith("int8") else "")}
            if batch == knob_batch:
                with torch_threads(threads):
                    row.update(output_drift(reference, predict(backend, images, 8)))
                    if test_set is not None:
                        outputs = predict(backend, test_images, 8)
                        row["test_top1_agreement"] = float((outputs[0].argmax(1) == test_reference[0].argmax(1)).mean())
                        row["test_accuracy"] = float((outputs[0].argmax(1) == test_set[1]).mean())
            rows.append(row)
    return rows
