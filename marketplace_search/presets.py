"""The one definition of preprocessing: train and eval transforms, written into every checkpoint.

Serving rebuilds `eval_transform` from the settings stored in the checkpoint, so it cannot drift
from what the model was trained and indexed with.
"""
from dataclasses import asdict, dataclass, field

import torch
from torchvision import transforms as T

from marketplace_search.images import pad_to_square

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclass(frozen=True)
class Preprocess:
    """Eval-time geometry and normalisation: square-pad to `resize`, centre-crop `crop`."""

    resize: int = 256
    crop: int = 224
    mean: tuple[float, float, float] = field(default=IMAGENET_MEAN)
    std: tuple[float, float, float] = field(default=IMAGENET_STD)

    def to_dict(self) -> dict:
        return {key: list(value) if isinstance(value, tuple) else value for key, value in asdict(self).items()}

    @classmethod
    def from_dict(cls, settings: dict) -> "Preprocess":
        return cls(
            resize=int(settings["resize"]),
            crop=int(settings["crop"]),
            mean=tuple(settings["mean"]),
            std=tuple(settings["std"]),
        )


class SquarePad:
    """Letterbox a PIL image to a square of `size` (aspect kept, black bars)."""

    def __init__(self, size: int):
        self.size = size

    def __call__(self, image):
        return pad_to_square(image, self.size)

    def __repr__(self) -> str:
        return f"SquarePad(size={self.size})"


def eval_transform(preprocess: Preprocess) -> T.Compose:
    return T.Compose(
        [
            SquarePad(preprocess.resize),
            T.CenterCrop(preprocess.crop),
            T.ToTensor(),
            T.Normalize(preprocess.mean, preprocess.std),
        ]
    )


def train_transform(preprocess: Preprocess) -> T.Compose:
    return T.Compose(
        [
            SquarePad(preprocess.resize),
            T.RandomResizedCrop(preprocess.crop, scale=(0.5, 1.0)),
            T.RandomHorizontalFlip(),
            T.ColorJitter(brightness=0.2, contrast=0.2, saturation=0.2),
            T.ToTensor(),
            T.Normalize(preprocess.mean, preprocess.std),
        ]
    )


def collate_images(images, preprocess: Preprocess) -> torch.Tensor:
    """Stack PIL images into one (n, 3, crop, crop) float32 batch with the eval transform."""
    transform = eval_transform(preprocess)
    return torch.stack([transform(image) for image in images])
