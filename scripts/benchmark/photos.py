"""The photos the benchmark sends: generated camera-like JPEGs, a folder's photos or a work folder's
test split, and the handler's decode + eval transform of them."""
import io
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFilter

from marketplace_search.images import decode_image
from marketplace_search.presets import Preprocess, eval_transform
from training.dataset import load_split
from training.photos import PHOTOS_DIR


def generate_photos(count: int, size: tuple[int, int] = (640, 480), seed: int = 0) -> list[bytes]:
    """JPEGs that cost what photos cost: a lit background, a few coloured objects, blur and sensor
    noise, so decoding and compression behave like camera photos rather than flat colour."""
    rng = np.random.default_rng(seed)
    width, height = size
    ramp = np.linspace(0, 1, height, dtype=np.float32)[:, None, None]
    photos = []
    for _ in range(count):
        top, bottom = rng.integers(0, 256, size=(2, 3))
        background = (top * (1 - ramp) + bottom * ramp) * np.ones((1, width, 1), np.float32)
        image = Image.fromarray(background.astype(np.uint8))
        draw = ImageDraw.Draw(image)
        for _ in range(int(rng.integers(2, 6))):
            x0, y0 = int(rng.integers(0, width)), int(rng.integers(0, height))
            box = (x0, y0, x0 + int(rng.integers(width // 8, width // 2)),
                   y0 + int(rng.integers(height // 8, height // 2)))
            colour = tuple(int(channel) for channel in rng.integers(0, 256, 3))
            (draw.ellipse if rng.random() < 0.5 else draw.rectangle)(box, fill=colour)
        pixels = np.asarray(image.filter(ImageFilter.GaussianBlur(1.5)), np.float32)
        pixels += rng.normal(0, 6, pixels.shape).astype(np.float32)
        buffer = io.BytesIO()
        Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8)).save(buffer, "JPEG", quality=85)
        photos.append(buffer.getvalue())
    return photos


def read_photos(directory: Path, count: int, seed: int = 0) -> list[bytes]:
    """`count` photos picked at random (seeded) from a folder of JPEG/PNG files."""
    if not Path(directory).is_dir():
        raise FileNotFoundError(f"--photos {directory}: not a folder")
    paths = sorted(path for path in Path(directory).iterdir() if path.suffix.lower() in {".jpg", ".jpeg", ".png"})
    if not paths:
        raise FileNotFoundError(f"--photos {directory}: no .jpg, .jpeg or .png files")
    chosen = np.random.default_rng(seed).choice(len(paths), size=min(count, len(paths)), replace=False)
    return [paths[i].read_bytes() for i in sorted(chosen)]


def read_test_set(work_dir: Path, count: int, seed: int = 0) -> tuple[list[bytes], np.ndarray]:
    """Up to `count` test-split photos of a pipeline work folder (seeded sample) and their labels."""
    split = load_split(work_dir)
    test = split[split["split"] == "test"]
    if test.empty:
        raise ValueError(f"{work_dir}/split.csv has no test rows")
    test = test.sample(n=min(count, len(test)), random_state=seed).sort_values("image_id")
    photos_dir = Path(work_dir) / PHOTOS_DIR
    return ([(photos_dir / f"{image_id}.jpg").read_bytes() for image_id in test["image_id"]],
            test["label"].to_numpy())


def preprocess_photos(photos: list[bytes], preprocess: Preprocess, draft: bool = True) -> torch.Tensor:
    """The handler's decode (JPEG draft down to the resize, unless `draft` is False) and eval transform."""
    transform = eval_transform(preprocess)
    fit_size = preprocess.resize if draft else None
    return torch.stack([transform(decode_image(photo, fit_size=fit_size)) for photo in photos])


def scaled_preprocess(preprocess: Preprocess, crop: int) -> Preprocess:
    """The same field of view at a lower resolution: resize scaled with the crop."""
    resize = round(preprocess.resize * crop / preprocess.crop)
    return Preprocess(resize=resize, crop=crop, mean=preprocess.mean, std=preprocess.std)
