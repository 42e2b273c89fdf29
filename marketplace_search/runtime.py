"""Inference backends (docs/serving.md): a batch of `presets.eval_transform` in, `(probabilities, L2-normalised
embeddings)` out, as `models.serve_forward` (torch fp32, the reference) answers; MARKETPLACE_CPU_FLAGS_OFF (e.g.
"bf16,vnni") makes this CPU look as if it lacked those units."""
import logging
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from torch import nn

from marketplace_search.extras import needs_extra
from marketplace_search.layout import ARCHIVE_OPENVINO
from marketplace_search.models import MarketplaceNet, check_serving_layout, embed, prepare_for_serving, serve_forward

logger = logging.getLogger(__name__)

RUNTIMES = ("torch", "openvino")
PRECISIONS = ("fp32", "bf16", "int8")
SUPPORTED = {("torch", "fp32"), ("torch", "bf16"), ("openvino", "fp32"), ("openvino", "bf16"), ("openvino", "int8")}
OPENVINO_MODEL = "model.xml"  # beside it model.bin: the IR in the archive (ARCHIVE_OPENVINO/)
# The CPU features each reduced precision needs, as /proc/cpuinfo flags (any one of them will do).
CPU_FEATURES = {"bf16": ("avx512_bf16", "amx_bf16"), "int8": ("avx512_vnni", "avx_vnni", "amx_int8")}
FEATURE_NAMES = {"bf16": "bf16", "int8": "vnni"}  # the names MARKETPLACE_CPU_FLAGS_OFF takes
FLAGS_OFF_ENV = "MARKETPLACE_CPU_FLAGS_OFF"
DEVICES = ("auto", "cpu", "cuda")
OPENVINO_EMBED_FROM = 256  # photos from which converting to OpenVINO (seconds) costs less than it saves
_warned: set = set()


def check_backend(runtime: str, precision: str) -> None:
    if runtime not in RUNTIMES:
        raise ValueError(f"runtime {runtime!r} is not one of {', '.join(RUNTIMES)}")
    if precision not in PRECISIONS:
        raise ValueError(f"precision {precision!r} is not one of {', '.join(PRECISIONS)}")
    if (runtime, precision) not in SUPPORTED:
        raise ValueError(f"{runtime} {precision} is not supported: int8 runs on openvino "
                         f"(supported: {', '.join(f'{r} {p}' for r, p in sorted(SUPPORTED))})")


def cpu_info() -> dict[str, str]:
    """The first CPU's fields in /proc/cpuinfo ("model name", "cpu MHz", "flags" ...); none where it is missing."""
    try:
        first = Path("/proc/cpuinfo").read_text().split("\n\n")[0]
    except OSError:
        return {}
    return {name.strip(): value.strip() for name, value in (line.split(":", 1) for line in first.splitlines()
                                                             if ":" in line)}


def cpu_flags() -> set[str]:
    """The CPU's feature flags (/proc/cpuinfo), less those MARKETPLACE_CPU_FLAGS_OFF switches off."""
    flags = set(cpu_info().get("flags", "").split())
    off = {name.strip().lower() for name in os.environ.get(FLAGS_OFF_ENV, "").split(",") if name.strip()}
    for precision, feature in FEATURE_NAMES.items():
        if feature in off:
            flags -= set(CPU_FEATURES[precision])
    return flags


def usable_cores(cgroup: Path = Path("/sys/fs/cgroup")) -> int:
    """The cores this process may use: its CPU affinity, capped by a container's CPU quota (`docker run --cpus`,
    a Kubernetes CPU limit), which os.cpu_count() does not see; threads past the quota only get throttled."""
    cores = len(os.sched_getaffinity(0))
    for path, read in ((cgroup / "cpu.max", lambda text: text.split()),  # cgroup v2: "QUOTA PERIOD" or "max PERIOD"
                       (cgroup / "cpu" / "cpu.cfs_quota_us",  # cgroup v1: -1 without a quota
                        lambda text: (text, (cgroup / "cpu" / "cpu.cfs_period_us").read_text()))):
        try:
            quota, period = read(path.read_text())
            if quota.strip() not in ("max", "-1"):
                cores = min(cores, max(1, round(int(quota) / int(period))))
            break
        except (OSError, ValueError):
            continue
    return cores


def precision_supported(precision: str, flags: set[str] | None = None) -> bool:
    """Whether this CPU runs `precision` natively (fp32 always)."""
    if precision == "fp32":
        return True
    flags = cpu_flags() if flags is None else flags
    return any(flag in flags for flag in CPU_FEATURES[precision])


def pick_device(choice: str = "auto", gpu_id: int | None = None) -> torch.device:
    """CHOICE's device (auto: CUDA when there is one), CUDA device GPU_ID when one is given."""
    if choice not in DEVICES:
        raise ValueError(f"device must be one of {', '.join(DEVICES)}, got {choice!r}")
    if choice == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("device cuda: no CUDA device is available (torch.cuda.is_available() is False)")
    if choice == "cpu" or not torch.cuda.is_available():
        return torch.device("cpu")
    return torch.device("cuda" if gpu_id is None else f"cuda:{gpu_id}")


@dataclass
class Backend:
    """A ready model: `forward(images)` -> `(probabilities (n, c), L2-normalised embeddings (n, d))`, float32
    numpy. `runtime`/`precision`: what actually runs (after any fallback)."""

    runtime: str
    precision: str
    forward: Callable[[torch.Tensor], tuple[np.ndarray, np.ndarray]] = field(repr=False)
    model: object = field(default=None, repr=False)
    requested: str = ""  # "runtime precision" as archived, when it differs from what runs
    chunk: int = 0  # `self(images)` runs a larger batch in chunks of this size (fastest_chunk); 0: whole

    @property
    def name(self) -> str:
        return f"{self.runtime} {self.precision}"

    def __call__(self, images: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
        if not self.chunk or len(images) <= self.chunk:
            return self.forward(images)
        parts = [self.forward(part) for part in images.split(self.chunk)]
        return tuple(np.concatenate(outputs) for outputs in zip(*parts))


def fastest_chunk(backend: Backend, batch_size: int, crop: int, repeats: int = 3) -> int:
    """The batch size, of 1, 2, 4 ... and BATCH_SIZE, at which BACKEND runs the most photos per second here (the
    best of REPEATS turns), after a pass at every size up to BATCH_SIZE (kernels are built per input shape): a
    batch whose activations outgrow the CPU's caches can run slower per photo than a smaller one."""
    sizes = sorted({2 ** power for power in range(batch_size.bit_length())} | {batch_size})
    seconds: dict[int, float] = {}
    for size in [*range(1, batch_size + 1), *sizes * repeats]:
        started = time.perf_counter()
        backend.forward(torch.zeros(size, 3, crop, crop))
        seconds[size] = min(seconds.get(size, float("inf")), time.perf_counter() - started)
    return max(sizes, key=lambda size: size / seconds[size])


def torch_backend(model: MarketplaceNet, precision: str = "fp32", device: str = "cpu") -> Backend:
    """The checkpoint's model in torch, fp32 or under bf16 autocast."""
    check_backend("torch", precision)
    prepared = prepare_for_serving(model.to(device))

    def forward(images: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
        with torch.autocast(images.device.type, dtype=torch.bfloat16, enabled=precision == "bf16"):
            probabilities, vectors = serve_forward(prepared, images.to(device))
        return probabilities.float().cpu().numpy(), vectors.float().cpu().numpy()

    return Backend("torch", precision, forward, prepared)


class ServingGraph(nn.Module):
    """What is exported: images -> `models.embed`'s (probabilities, L2-normalised embedding)."""

    def __init__(self, model: MarketplaceNet):
        super().__init__()
        self.model = model

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return embed(self.model, images)


def convert_openvino(model: MarketplaceNet, crop: int):
    """The model as an OpenVINO `ov.Model` with a dynamic batch dimension (fp32 weights)."""
    import openvino as ov

    model.eval()
    with torch.no_grad():
        converted = ov.convert_model(ServingGraph(model), example_input=torch.zeros(1, 3, crop, crop),
                                     input=[(-1, 3, crop, crop)])
    converted.outputs[0].get_tensor().set_names({"probabilities"})
    converted.outputs[1].get_tensor().set_names({"embedding"})
    return converted


def quantize_openvino(converted, calibration: list[torch.Tensor]):
    """int8 post-training quantization (NNCF) of a converted model, calibrated on `calibration` batches."""
    try:
        import nncf
    except ModuleNotFoundError as error:
        raise ModuleNotFoundError(needs_extra("int8 quantization", "NNCF", "train")) from error

    dataset = nncf.Dataset(calibration, lambda batch: batch.numpy())
    return nncf.quantize(converted, dataset, subset_size=len(calibration), preset=nncf.QuantizationPreset.MIXED)


def save_openvino(converted, folder: Path) -> Path:
    """Write the IR (model.xml + model.bin, weights kept as they are: no fp16 compression)."""
    import openvino as ov

    folder.mkdir(parents=True, exist_ok=True)
    ov.save_model(converted, folder / OPENVINO_MODEL, compress_to_fp16=False)
    return folder / OPENVINO_MODEL


def compile_openvino(model_or_path, precision: str = "fp32", threads: int = 0):
    """An IR path or `ov.Model` compiled for the CPU, for latency, at PRECISION (int8: its own IR)."""
    import openvino as ov

    core = ov.Core()
    source = core.read_model(str(model_or_path)) if isinstance(model_or_path, (str, Path)) else model_or_path
    config = {"PERFORMANCE_HINT": "LATENCY"}
    if precision != "int8":
        config["INFERENCE_PRECISION_HINT"] = "bf16" if precision == "bf16" else "f32"
    if threads:
        config["INFERENCE_NUM_THREADS"] = int(threads)
    return core.compile_model(source, "CPU", config)


def openvino_backend(model_or_path, precision: str = "fp32", threads: int = 0) -> Backend:
    """An OpenVINO CPU backend of an IR path or `ov.Model` (compile_openvino)."""
    check_backend("openvino", precision)
    compiled = compile_openvino(model_or_path, precision, threads)
    request = compiled.create_infer_request()

    def forward(images: torch.Tensor) -> tuple[np.ndarray, ...]:
        outputs = request.infer({0: images.detach().cpu().numpy()}, share_inputs=True)
        return tuple(np.asarray(outputs[number], np.float32).copy() for number in range(len(outputs)))

    return Backend("openvino", precision, forward, compiled)


def embedding_backend(model: MarketplaceNet, crop: int, photos: int, device: str = "cpu") -> Backend:
    """OpenVINO fp32 on the CPU for enough PHOTOS to pay for the conversion, else torch fp32."""
    if device == "cpu" and photos >= OPENVINO_EMBED_FROM:
        converted = converted_or_none(lambda: convert_openvino(model, crop))
        if converted is not None:
            return openvino_backend(converted, "fp32", torch.get_num_threads())
    model.eval()

    def forward(images: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
        with torch.inference_mode():
            return tuple(output.float().cpu().numpy() for output in embed(model, images.to(device)))

    return Backend("torch", "fp32", forward, model)


def converted_or_none(convert: Callable):
    """CONVERT's `ov.Model`, or None (logged) where OpenVINO cannot convert it: torch then runs it."""
    try:
        return convert()
    except Exception as error:  # noqa: BLE001
        logger.warning("running torch fp32: OpenVINO could not convert the model (%s: %s)", type(error).__name__, error)
        return None


def load_backend(model: MarketplaceNet, runtime: str = "torch", precision: str = "fp32", model_dir: Path | None = None,
                 layout: str = "auto", device: str = "cpu", threads: int = 0) -> Backend:
    """The fastest backend this machine runs of what the archive asks for, any fallback logged once: an openvino
    archive's IR (in MODEL_DIR) at bf16 where the CPU has bf16 units, else at fp32 (int8 as it is, faster with or
    without VNNI); torch fp32 from the checkpoint only on another device or where the IR fails to load."""
    check_backend(runtime, precision)
    check_serving_layout(layout)  # a retired layout is refused on every backend, not only where torch runs it
    requested = f"{runtime} {precision}"
    native = device != "cpu" or precision_supported(precision)
    if runtime == "torch":
        if native:
            return torch_backend(model, precision, device)
        return fallen_back(torch_backend(model, "fp32", device), requested, no_units(precision))
    if device != "cpu":
        return fallen_back(torch_backend(model, "fp32", device), requested, f"device {device}: OpenVINO runs on CPUs")
    if model_dir is None:
        raise ValueError("an openvino backend needs the archive folder holding its IR")
    ir = Path(model_dir) / ARCHIVE_OPENVINO / OPENVINO_MODEL
    runs = precision if native or precision == "int8" else "fp32"
    try:
        backend = openvino_backend(ir, runs, threads)
    except Exception as error:  # noqa: BLE001 (a missing or broken IR: the checkpoint still serves)
        return fallen_back(torch_backend(model, "fp32", device), requested,
                           f"OpenVINO could not load {ARCHIVE_OPENVINO}/{OPENVINO_MODEL} ({type(error).__name__}: "
                           f"{error}; rebuild the archive with scripts.archive)")
    return backend if runs == precision else fallen_back(backend, requested, no_units(precision))


def no_units(precision: str) -> str:
    flags_off = os.environ.get(FLAGS_OFF_ENV)
    return (f"this CPU has none of {', '.join(CPU_FEATURES[precision])}"
            + (f" ({FLAGS_OFF_ENV}={flags_off})" if flags_off else ""))


def fallen_back(backend: Backend, requested: str, reason: str) -> Backend:
    """BACKEND, serving in place of REQUESTED for REASON, said once per process and requested backend."""
    if requested not in _warned:
        _warned.add(requested)
        logger.warning("archive asks for %s but %s: serving %s instead", requested, reason, backend.name)
    backend.requested = requested
    return backend
