"""The models under test: the --run's trained model and fresh models per architecture."""
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from marketplace_search.models import MarketplaceNet, load_checkpoint, load_pretrained_backbone
from marketplace_search.presets import Preprocess
from scripts.benchmark.common import NUM_CLASSES
from scripts.benchmark.photos import preprocess_photos


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
