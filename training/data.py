"""What the stages hand each other, by file name and reader (WORK/tables/, WORK/photos/, WORK/split.csv,
RUN/embeddings/): a later stage reads them through here, not through the stage that wrote them."""
import json
from pathlib import Path

import numpy as np
import pandas as pd
from PIL import Image
from torch.utils.data import DataLoader, Dataset
from tqdm import tqdm

from marketplace_search.layout import EMBEDDINGS_DIR
from marketplace_search.models import MarketplaceNet
from marketplace_search.runtime import embedding_backend
from marketplace_search.presets import Preprocess, eval_transform

TABLES_DIR = "tables"
PHOTOS_DIR = "photos"
PHOTOS_REPORT = "photos_report.json"  # in PHOTOS_DIR
SPLITS = ("train", "val", "test")
SPLIT_FILE = "split.csv"
SPLIT_REPORT = "split_report.json"
WORK_INPUTS = "work.json"  # what a work folder's tables, photos and split were made from


def claim_work_folder(work_dir: Path, inputs: dict, replace: bool = False) -> None:
    """Refuse to rewrite WORK's tables, photos and split when WORK holds files made from other INPUTS (or by hand)
    unless REPLACE; then record INPUTS in WORK/work.json. Runs in WORK stay either way."""
    work_dir = Path(work_dir)
    path = work_dir / WORK_INPUTS
    made_from = json.loads(path.read_text()) if path.is_file() else None
    if work_dir.is_dir() and any(work_dir.iterdir()) and made_from != inputs and not replace:
        what = f"was made from {made_from}" if made_from else "holds files this command did not make"
        raise SystemExit(f"refused: {work_dir} {what}, not {inputs}: choose another folder, or pass --replace to "
                         f"rewrite its tables, photos and split (its runs stay)")
    work_dir.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(inputs, indent=2) + "\n")


def read_training_table(work_dir: Path) -> pd.DataFrame:
    """WORK/tables/training_table.csv with ids as text and missing prices as NaN."""
    path = Path(work_dir) / TABLES_DIR / "training_table.csv"
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing; run training.tables first")
    return pd.read_csv(path, dtype={"image_id": str, "product_id": str, "category": str, "title": str,
                                   "location": str, "label": int, "price": float})


def load_split(work_dir: Path) -> pd.DataFrame:
    """WORK/split.csv: image_id, product_id (text), label (int), split ("train"/"val"/"test")."""
    path = Path(work_dir) / SPLIT_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing; run training.dataset first")
    split = pd.read_csv(path, dtype={"image_id": str, "product_id": str, "label": int, "split": str})
    unknown = set(split["split"]) - set(SPLITS)
    if unknown:
        raise ValueError(f"{path}: unknown split name(s) {sorted(unknown)}")
    return split


class ListingPhotos(Dataset):
    """Normalised photos of `rows` (image_id, label): items are `(transform(photo), label, image_id)`."""

    def __init__(self, rows: pd.DataFrame, photos_dir: Path, transform=None):
        self.image_ids = [str(image_id) for image_id in rows["image_id"]]
        self.labels = [int(label) for label in rows["label"]]
        self.photos_dir = Path(photos_dir)
        self.transform = transform

    def __len__(self) -> int:
        return len(self.image_ids)

    def __getitem__(self, index: int):
        image_id = self.image_ids[index]
        image = read_photo(self.photos_dir, image_id)
        return (self.transform(image) if self.transform else image), self.labels[index], image_id


def read_photo(photos_dir: Path, image_id: str) -> Image.Image:
    """WORK/photos/<image_id>.jpg as RGB."""
    with Image.open(Path(photos_dir) / f"{image_id}.jpg") as photo:
        return photo.convert("RGB")


def embed_rows(model: MarketplaceNet, preprocess: Preprocess, rows, photos_dir: Path, batch_size: int = 32,
               workers: int = 2) -> tuple[np.ndarray, np.ndarray]:
    """`(embeddings (n, d), probabilities (n, classes))`, float32 in `rows` order, from embedding_backend."""
    loader = DataLoader(ListingPhotos(rows, photos_dir, eval_transform(preprocess)),
                        batch_size=batch_size, num_workers=workers)
    backend = embedding_backend(model, preprocess.crop, len(rows))
    vectors, probabilities = [], []
    for images, _, _ in tqdm(loader, desc=f"embedding ({backend.name})", unit="batch"):
        batch_probabilities, batch_vectors = backend.forward(images)
        vectors.append(batch_vectors)
        probabilities.append(batch_probabilities)
    return np.concatenate(vectors), np.concatenate(probabilities)


def load_embeddings(run_dir: Path, mmap: bool = False, split: pd.DataFrame | None = None
                    ) -> tuple[list[str], np.ndarray, np.ndarray, dict]:
    """`(image_ids, embeddings, probabilities, meta)` of RUN; MMAP: mapped read-only; SPLIT: the order to check."""
    folder = Path(run_dir) / EMBEDDINGS_DIR
    if not (folder / "embeddings.npy").is_file():
        raise FileNotFoundError(f"{folder / 'embeddings.npy'} is missing; run training.embed first")
    image_ids, mode = json.loads((folder / "image_ids.json").read_text()), "r" if mmap else None
    if split is not None and image_ids != list(split["image_id"]):
        raise ValueError(f"{folder} does not match the split; re-run training.embed")
    return (image_ids, np.load(folder / "embeddings.npy", mmap_mode=mode),
            np.load(folder / "probabilities.npy", mmap_mode=mode),
            json.loads((folder / "embeddings_meta.json").read_text()))
