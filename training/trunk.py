"""The frozen trunk's outputs, cached per view of each photo in WORK/cache (training.train trains on them,
training.evaluate's frozen baseline reads them), and the autocast dtype training runs at."""
import hashlib
import json
from contextlib import nullcontext
from pathlib import Path

import torch
from torch import nn
from torch.utils.data import DataLoader
from torchvision import transforms as T
from tqdm import tqdm

from marketplace_search.files import replaced_atomically
from marketplace_search.models import MarketplaceNet
from marketplace_search.presets import Preprocess, eval_transform, train_transform
from marketplace_search.runtime import OPENVINO_EMBED_FROM, converted_or_none, openvino_backend, precision_supported
from training.data import PHOTOS_DIR, ListingPhotos

CACHE_DIR = "cache"
PRECISIONS = ("auto", "fp32", "bf16", "fp16")
AUTOCAST_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


def autocast_dtype(device: torch.device, precision: str = "auto") -> torch.dtype | None:
    """The autocast dtype for `precision` on `device`; None means plain fp32."""
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {', '.join(PRECISIONS)}, got {precision!r}")
    if precision == "auto":
        if device.type == "cuda":
            precision = "bf16" if torch.cuda.is_bf16_supported() else "fp16"
        else:
            precision = "bf16" if precision_supported("bf16") else "fp32"  # emulated bf16 is slower
    if precision == "fp16" and device.type == "cpu":
        raise ValueError("--precision fp16 is for CUDA; on a CPU use bf16 or fp32")
    return AUTOCAST_DTYPES.get(precision)


def autocast(device: torch.device, dtype: torch.dtype | None):
    return torch.autocast(device.type, dtype=dtype) if dtype is not None else nullcontext()


def view_transform(view: int, preprocess: Preprocess):
    """View 0 is the eval transform, 1 its mirror, 2+ random train-transform crops."""
    if view == 0:
        return eval_transform(preprocess)
    if view == 1:
        return T.Compose([T.RandomHorizontalFlip(p=1.0), *eval_transform(preprocess).transforms])
    return train_transform(preprocess)


def weights_fingerprint(module: nn.Module) -> str:
    """A hash of a module's weights and buffers: two backbones share a cache only if they are equal."""
    digest = hashlib.sha1()
    for name, tensor in sorted(module.state_dict().items()):
        digest.update(name.encode())
        digest.update(tensor.detach().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()[:16]


def cache_key(model: MarketplaceNet, trainable_stages: int, preprocess: Preprocess, seed: int,
              dtype: torch.dtype | None = None) -> str:
    """What the cached trunk outputs depend on: backbone weights and cut, preprocessing, views' seed, dtype."""
    text = json.dumps([model.arch, weights_fingerprint(model.backbone), trainable_stages, preprocess.to_dict(),
                       seed, str(dtype)], sort_keys=True)
    return f"{model.arch}-cut{trainable_stages}-{hashlib.sha1(text.encode()).hexdigest()[:12]}"


def trunk_outputs(trunk: nn.Module, rows, photos_dir: Path, transform, batch_size: int, workers: int,
                  device: torch.device, dtype: torch.dtype | None, description: str) -> torch.Tensor:
    """The trunk's outputs for `rows`, in row order, float16 on the CPU."""
    loader = DataLoader(ListingPhotos(rows, photos_dir, transform), batch_size=batch_size,
                        num_workers=workers, shuffle=False, pin_memory=device.type == "cuda")
    trunk.eval()
    chunks, forward = [], None
    with torch.inference_mode():
        for images, _, _ in tqdm(loader, desc=description, unit="batch"):
            forward = forward or fastest_trunk(trunk, images.shape[1:], device, dtype, len(rows))
            chunks.append(forward(images).to("cpu", torch.float16))
    return torch.cat(chunks) if chunks else torch.zeros(0, dtype=torch.float16)


def fastest_trunk(trunk: nn.Module, shape: torch.Size, device: torch.device, dtype: torch.dtype | None, photos: int):
    """images -> TRUNK's outputs: compiled by OpenVINO at DTYPE's precision on the CPU for enough PHOTOS to pay
    for the conversion (outputs kept in float16 either way), else torch under autocast."""
    if device.type == "cpu" and photos >= OPENVINO_EMBED_FROM:
        import openvino as ov

        def convert():
            with torch.inference_mode(False), torch.no_grad():  # traced outside the caller's inference mode
                return ov.convert_model(trunk, example_input=torch.zeros(1, *shape), input=[(-1, *shape)])

        converted = converted_or_none(convert)
        if converted is not None:
            compiled = openvino_backend(converted, "bf16" if dtype == torch.bfloat16 else "fp32",
                                        torch.get_num_threads())
            return lambda images: torch.from_numpy(compiled.forward(images)[0])

    def forward(images: torch.Tensor) -> torch.Tensor:
        with autocast(device, dtype):
            return trunk(images.to(device, non_blocking=True).contiguous(memory_format=torch.channels_last))

    return forward


def cached_outputs(work_dir: Path, trunk: nn.Module, rows, view: int, key: str, preprocess: Preprocess, batch_size: int,
                   workers: int, seed: int, device: torch.device, dtype: torch.dtype | None) -> torch.Tensor:
    """Trunk outputs of view `view` for `rows`, each photo's computed once and kept in WORK/cache/<key>-view<N>.pt."""
    path = Path(work_dir) / CACHE_DIR / f"{key}-view{view}.pt"
    cached = torch.load(path, weights_only=True) if path.is_file() else {"image_ids": [], "outputs": None}
    position = {image_id: i for i, image_id in enumerate(cached["image_ids"])}
    missing = rows[~rows["image_id"].isin(position)]
    if len(missing):
        # The same crops on every re-run, training's random stream untouched: a cached run trains as one filling it.
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed * 1000 + view)
            computed = trunk_outputs(trunk, missing, Path(work_dir) / PHOTOS_DIR, view_transform(view, preprocess),
                                     batch_size, workers, device, dtype, f"frozen trunk, view {view}")
        known = [cached["outputs"]] if cached["outputs"] is not None else []
        cached = {"image_ids": cached["image_ids"] + list(missing["image_id"]),
                  "outputs": torch.cat(known + [computed])}
        position = {image_id: i for i, image_id in enumerate(cached["image_ids"])}
        path.parent.mkdir(parents=True, exist_ok=True)
        with replaced_atomically(path) as temporary:
            torch.save(cached, temporary)
    return cached["outputs"][[position[i] for i in rows["image_id"]]]
