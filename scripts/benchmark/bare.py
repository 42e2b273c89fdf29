"""Bare section: the model in-process, run the way the handler runs it (the baseline) at several
batch sizes, decode + preprocessing apart, and one knob changed at a time (threads, serving layouts,
the handler before tuning, int8 dynamic quantisation, torch.compile, smaller crops), each with its
effect on the outputs against the baseline. Figures and their reading: README, "Benchmarks".
"""
import copy
import time
import warnings
from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch
from torch import nn

from marketplace_search.models import (SERVING_LAYOUTS, MarketplaceNet, embed, prepare_for_serving, serve_forward,
                                       serving_layout)
from marketplace_search.presets import Preprocess
from scripts.benchmark.common import time_calls, torch_threads
from scripts.benchmark.photos import generate_photos, preprocess_photos, read_test_set, scaled_preprocess
from scripts.benchmark.subjects import Subject

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
    from scripts.benchmark.backends import bench_backends, calibration_photos

    test_set = read_test_set(settings["work"], settings["test_photos"]) if settings.get("work") else None
    rows = []
    for subject in subjects:
        print(f"bare: {subject.name}", flush=True)
        if not settings.get("backends_only"):
            rows += bench_subject(subject, photos, settings, test_set if subject.trained else None)
        if settings.get("backends", True):
            rows += bench_backends(subject, photos, settings, test_set if subject.trained else None,
                                   calibration_photos(settings) if subject.trained else None)
    legend = (f"× baseline: photos/s over the baseline's at batch {settings['knob_batch']}; the baseline rows are "
              f"timed each batch size in its own block of back-to-back calls (as a busy worker runs them), the knobs"
              f" in turns with the baseline (a burst of load from elsewhere slows them alike), each against the "
              f"baseline of its own timing. Median time per call. Baseline: the model as the handler runs it "
              f"({settings['threads']} threads, torch.inference_mode, the serving layout `auto` picks "
              f"(marketplace_search.models.prepare_for_serving), fp32, the checkpoint's crop); layout rows: the "
              f"other layouts (mkldnn: oneDNN blocked + BatchNorm folded; nhwc: channels_last + BatchNorm folded; "
              f"none: NCHW as trained). Decode + preprocess: decode_image + eval_transform one photo at a time, as "
              f"the handler does (JPEG draft decoding down to the size the photo is resized to). Output columns "
              f"compare each variant with the baseline on {len(photos)} photos (the phone-photo draft row: with full"
              f" decoding): max abs difference of probabilities, top-1 category agreement, cosine similarity of "
              f"embeddings. Backend rows (marketplace_search.runtime, scripts.archive --runtime/--precision): each "
              f"runtime × precision at each batch size, timed in turns with `backend torch fp32` (today's path), "
              f"× baseline meaning × torch fp32 at the same batch; output columns at the knob batch size against torch fp32; "
              f"int8 calibrated on train-split photos of --work (else the benchmark's photos); OpenVINO compiled "
              f"with PERFORMANCE_HINT=LATENCY and the baseline's threads.")
    return {"rows": rows, "columns": BARE_COLUMNS, "legend": legend,
            "models": {subject.name: subject.source for subject in subjects}}
