"""The one definition of preprocessing: train and eval transforms, whose settings every checkpoint carries so
that serving cannot drift from what the model was trained and indexed with."""
from dataclasses import asdict, dataclass, field
from functools import partial

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
        return cls(int(settings["resize"]), int(settings["crop"]), tuple(settings["mean"]), tuple(settings["std"]))


def eval_transform(preprocess: Preprocess) -> T.Compose:
    return T.Compose([T.Lambda(partial(pad_to_square, size=preprocess.resize)), T.CenterCrop(preprocess.crop),
                      T.ToTensor(), T.Normalize(preprocess.mean, preprocess.std)])


def train_transform(preprocess: Preprocess) -> T.Compose:
    return T.Compose([T.Lambda(partial(pad_to_square, size=preprocess.resize)),
                      T.RandomResizedCrop(preprocess.crop, scale=(0.5, 1.0)),
                      T.RandomHorizontalFlip(), T.ColorJitter(brightness=0.2, contrast=0.2, saturation=0.2),
                      T.ToTensor(), T.Normalize(preprocess.mean, preprocess.std)])


def collate_images(images, preprocess: Preprocess) -> torch.Tensor:
    """Stack PIL images into one (n, 3, crop, crop) float32 batch with the eval transform."""
    transform = eval_transform(preprocess)
    return torch.stack([transform(image) for image in images])
