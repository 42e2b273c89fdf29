"""Bare section: the model in-process per inference backend at batch 1/8/32, timed in turns, with what each
changes in the outputs; decoding apart, with and without JPEG draft."""
import copy
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from marketplace_search.layout import CHECKPOINT
from marketplace_search.models import MarketplaceNet, default_preprocess, load_checkpoint
from marketplace_search.presets import Preprocess
from marketplace_search.runtime import (Backend, convert_openvino, cpu_flags, cpu_info, openvino_backend,
                                        precision_supported, quantize_openvino, torch_backend, usable_cores)
from scripts.benchmark.common import NUM_CLASSES, generate_photos, preprocess_photos, time_in_turns

ARCH = "efficientnet_lite2"  # the product model's backbone: what is measured without --run
REFERENCE = "torch fp32"
BACKENDS = ("torch fp32", "torch bf16", "openvino fp32", "openvino bf16", "openvino int8")
DRIFT_BATCH = 8
BARE_COLUMNS = [("variant", "variant"), ("batch", "batch"), ("ms_per_batch", "ms/batch"), ("photos_per_s", "photos/s"),
                ("speedup", "× reference"), ("gflops", "GFLOP/s"), ("peak_share", "of fp32 peak"),
                ("max_abs_dprob", "max abs Δprob"), ("top1_agreement", "top-1 agree"),
                ("cosine_mean", "cos mean"), ("cosine_min", "cos min"), ("note", "note")]


@dataclass
class Subject:
    name: str
    model: MarketplaceNet
    preprocess: Preprocess
    source: str


def calibrate_batchnorm(model: nn.Module, images: torch.Tensor) -> None:
    """Every BatchNorm's statistics from IMAGES: a fresh net's would make output drift meaningless."""
    for module in model.modules():
        if isinstance(module, nn.modules.batchnorm._BatchNorm):
            module.reset_running_stats()
            module.momentum = None  # cumulative average over the calibration batch
    model.train()
    with torch.no_grad():
        model(images)
    model.eval()


def load_subject(run_dir: Path | None, photos: list[bytes]) -> Subject:
    """The --run's model, else a fresh ARCH with random weights (a forward pass costs the same)."""
    if run_dir is not None:
        path = Path(run_dir) / CHECKPOINT
        model, checkpoint = load_checkpoint(path)
        return Subject(f"{checkpoint['arch']} ({Path(run_dir).name})", model,
                       Preprocess.from_dict(checkpoint["preprocess"]), f"{path}, epoch {checkpoint['epoch']}")
    torch.manual_seed(0)
    model, preprocess = MarketplaceNet(ARCH, NUM_CLASSES), default_preprocess(ARCH)
    calibrate_batchnorm(model, preprocess_photos(photos, preprocess))
    return Subject(ARCH, model, preprocess, f"fresh MarketplaceNet({ARCH}, {NUM_CLASSES}), random weights, "
                                            f"BatchNorm calibrated on {len(photos)} photos")


def make_backends(subject: Subject, backends_asked: list[str],
                  calibration: torch.Tensor) -> tuple[dict[str, Backend], dict[str, float]]:
    """Each backend asked that a worker would serve on this CPU, and the seconds each took to prepare."""
    backends, seconds, converted = {}, {}, None
    for name in backends_asked:
        runtime, precision = name.split()
        if not precision_supported(precision) and name != "openvino int8":  # OpenVINO runs int8 without VNNI
            continue
        started = time.perf_counter()
        model = copy.deepcopy(subject.model)
        if runtime == "torch":
            backends[name] = torch_backend(model, precision)
        else:
            converted = converted or convert_openvino(model, subject.preprocess.crop)
            source = quantize_openvino(convert_openvino(model, subject.preprocess.crop), list(calibration.split(8))) \
                if precision == "int8" else converted
            backends[name] = openvino_backend(source, precision, torch.get_num_threads())
        seconds[name] = time.perf_counter() - started
    return backends, seconds


def photo_flops(subject: Subject) -> float:
    """FLOPs of one photo's forward pass, as torch counts them (2 per multiply-add of convolutions and matmuls)."""
    from torch.utils.flop_counter import FlopCounterMode

    crop = subject.preprocess.crop
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        copy.deepcopy(subject.model).eval()(torch.zeros(1, 3, crop, crop))
    return counter.get_total_flops()


def nominal_peak() -> tuple[float, str]:
    """This CPU's nominal fp32 GFLOP/s, cores x clock x FMA width, and how it was reckoned: 2 FMA units of 16 fp32
    lanes on an Intel CPU with AVX-512, else of 8 (AVX2, and AMD's Zen 4, which splits AVX-512 over 256-bit units)."""
    fields = cpu_info()
    lanes = 16 if "avx512f" in cpu_flags() and fields.get("vendor_id") == "GenuineIntel" else 8
    mhz, cores = float(fields.get("cpu MHz") or 0), usable_cores()
    reckoned = f"{cores} cores × {mhz / 1000:.2f} GHz × 2 FMA units × {lanes} lanes × 2"
    return cores * mhz / 1000 * 2 * 2 * lanes, reckoned


def predict(forward, images: torch.Tensor, batch: int = DRIFT_BATCH) -> tuple[np.ndarray, np.ndarray]:
    outputs = [forward(images[start:start + batch]) for start in range(0, len(images), batch)]
    return (np.concatenate([np.asarray(part[0], np.float32) for part in outputs]),
            np.concatenate([np.asarray(part[1], np.float32) for part in outputs]))


def output_drift(reference: tuple[np.ndarray, np.ndarray], outputs: tuple[np.ndarray, np.ndarray]) -> dict:
    """How far outputs are from the reference's on the same photos (embeddings are L2-normalised)."""
    (reference_probabilities, reference_embeddings), (probabilities, embeddings) = reference, outputs
    cosine = (reference_embeddings * embeddings).sum(axis=1)
    return {"max_abs_dprob": float(np.abs(reference_probabilities - probabilities).max()),
            "top1_agreement": float((reference_probabilities.argmax(1) == probabilities.argmax(1)).mean()),
            "cosine_mean": float(cosine.mean()), "cosine_min": float(cosine.min())}


def decode_rows(subject: Subject, photos: list[bytes], settings: dict, timing: dict) -> list[dict]:
    """Decoding + preprocessing one photo at a time as the handler does; phone photos with and without draft."""
    def decode(chosen: list[bytes], draft: bool = True) -> dict:
        times = time_in_turns({"": lambda: preprocess_photos(chosen, subject.preprocess, draft)}, **timing)[""]
        seconds = float(np.median(times))
        return {"batch": 1, "ms_per_batch": seconds * 1000 / len(chosen), "photos_per_s": len(chosen) / seconds}

    rows = [{"variant": "decode + preprocess", **decode(photos)}]
    if settings["phone_photos"]:
        width, height = settings["phone_size"]
        phone = generate_photos(settings["phone_photos"], (width, height), seed=1)
        draft, full = decode(phone), decode(phone, draft=False)
        forward = torch_backend(copy.deepcopy(subject.model)).forward
        drift = output_drift(predict(forward, preprocess_photos(phone, subject.preprocess, draft=False)),
                             predict(forward, preprocess_photos(phone, subject.preprocess)))
        rows += [{"variant": f"phone photo {width}x{height}, JPEG draft (as served)", **draft, **drift,
                  "speedup": draft["photos_per_s"] / full["photos_per_s"], "note": "reference: full decode"},
                 {"variant": f"phone photo {width}x{height}, full decode", **full}]
    return rows


def bench_bare(subject: Subject, photos: list[bytes], settings: dict) -> dict:
    timing = {"min_seconds": settings["min_seconds"], "min_repeats": settings["min_repeats"]}
    images = calibration = preprocess_photos(photos, subject.preprocess)
    if settings.get("work"):  # int8 calibrated on train-split photos, as scripts.archive calibrates it
        from training.guard import calibration_paths

        paths = calibration_paths(settings["work"], count=settings["calibration_photos"])
        calibration = preprocess_photos([path.read_bytes() for path in paths], subject.preprocess)
    backends, prepared = make_backends(subject, settings["backends"], calibration)
    print(f"bare: {subject.name}, backends {', '.join(backends)}", flush=True)
    rows = decode_rows(subject, photos, settings, timing)
    reference = predict(backends[REFERENCE].forward, images)
    flops, (peak, reckoned) = photo_flops(subject), nominal_peak()
    for batch in settings["batches"]:
        inputs = images.repeat(-(-batch // len(images)), 1, 1, 1)[:batch].contiguous()
        times = time_in_turns({name: (lambda backend=backend: backend.forward(inputs))
                               for name, backend in backends.items()}, **timing)
        for name, backend in backends.items():
            seconds = float(np.median(times[name]))
            row = {"variant": name, "backend": name, "batch": batch, "ms_per_batch": seconds * 1000,
                   "photos_per_s": batch / seconds, "speedup": float(np.median(times[REFERENCE])) / seconds,
                   "gflops": flops * batch / seconds / 1e9,
                   "note": f"prepared in {prepared[name]:.1f} s"}
            row["peak_share"] = row["gflops"] / peak if peak else None
            if batch == DRIFT_BATCH:
                row.update(output_drift(reference, predict(backend.forward, images)))
            rows.append(row)
    missing = [name for name in settings["backends"] if name not in backends]
    legend = (f"{torch.get_num_threads()} threads, median per call, the backends in turns; output columns at batch "
              f"{DRIFT_BATCH} against {REFERENCE} on {len(photos)} photos (the draft row's: against full decoding). "
              f"{flops / 1e9:.2f} GFLOP a photo; nominal fp32 peak {peak:,.0f} GFLOP/s ({reckoned}). "
              + (f"Not run, no native support on this CPU: {', '.join(missing)}." if missing else ""))
    return {"rows": rows, "columns": BARE_COLUMNS, "legend": legend, "models": {subject.name: subject.source}}
