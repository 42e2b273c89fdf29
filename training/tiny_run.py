"""A tiny RUN folder (model, a dozen generated JPEGs, their catalogue) made in seconds without the pipeline:
what scripts.archive and the handler read, for the tests and the benchmark."""
import faiss  # noqa: F401  (before torch: both bring an OpenMP runtime, and this order is the safe one)

import io
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from marketplace_search.files import sha256_file
from marketplace_search.images import decode_image
from marketplace_search.layout import CHECKPOINT, EVALUATION, INDEX_DIR, update_run_info
from marketplace_search.models import MarketplaceNet, embed, save_checkpoint
from marketplace_search.presets import Preprocess, collate_images
from marketplace_search.search import make_catalogue

CLASSES = ("Garden", "Home", "Music")
TINY_PREPROCESS = Preprocess(resize=72, crop=64)  # small crops keep CPU forwards fast
CREATED = "2025-01-31T14:22:33+00:00"


@dataclass
class TinyRun:
    run_dir: Path
    photos: dict[str, Path]  # image_id -> JPEG path, every photo is in the catalogue
    listings: dict[str, dict]  # image_id -> {product_id, title, price, location, category}
    classes: list[str]
    arch: str

    def photo_bytes(self, image_id: str) -> bytes:
        return self.photos[image_id].read_bytes()


def photo_jpeg(seed: int, size: tuple[int, int] = (96, 80), quality: int = 90) -> bytes:
    """A distinctive generated photo (colour blocks and noise), JPEG bytes."""
    rng = np.random.default_rng(seed)
    width, height = size
    blocks = rng.integers(0, 256, size=(4, 4, 3), dtype=np.uint8)
    pixels = np.kron(blocks, np.ones((height // 4 + 1, width // 4 + 1, 1), dtype=np.uint8))[:height, :width]
    noise = rng.integers(-20, 21, size=pixels.shape)
    pixels = np.clip(pixels.astype(int) + noise, 0, 255).astype(np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels, "RGB").save(buffer, "JPEG", quality=quality)
    return buffer.getvalue()


def make_tiny_run(run_dir: Path | str, *, arch: str = "resnet18", seed: int = 0, listings: int = 6,
                  photos_per_listing: int = 2, classes=CLASSES, embedding_dim: int = 32,
                  preprocess: Preprocess = TINY_PREPROCESS, photos_dir: Path | None = None,
                  created: str = CREATED, model: MarketplaceNet | None = None) -> TinyRun:
    """Write a RUN folder (weights/best.pt, index/, evaluation.json, run.json) of MODEL or a random one (SEED);
    the photos depend only on their number, so runs can share `photos_dir` (default RUN/../photos)."""
    run_dir = Path(run_dir)
    photos_dir = Path(photos_dir) if photos_dir else run_dir.parent / "photos"
    photos_dir.mkdir(parents=True, exist_ok=True)
    classes = list(classes)
    photos, listing_meta = {}, {}
    for number in range(listings * photos_per_listing):
        product = number // photos_per_listing
        image_id = f"img-{number:03d}"
        photos[image_id] = photos_dir / f"{image_id}.jpg"
        photos[image_id].write_bytes(photo_jpeg(number))
        listing_meta[image_id] = {"product_id": f"prod-{product:03d}", "title": f"Listing {product}",
                                  "price": 10.0 + product, "location": "Leeds",
                                  "category": classes[product % len(classes)]}

    if model is None:
        torch.manual_seed(seed)
        model = MarketplaceNet(arch, len(classes), embedding_dim=embedding_dim)
    model.eval()
    arch, embedding_dim = model.arch, model.embedding[0].out_features
    if model.classifier[-1].out_features != len(classes):
        raise ValueError(f"the model has {model.classifier[-1].out_features} classes, `classes` {len(classes)}")
    checkpoint = run_dir / CHECKPOINT
    config = {"arch": arch, "seed": seed, "embedding_dim": embedding_dim, "weights": "none", "tiny": True}
    save_checkpoint(checkpoint, model, classes=classes, preprocess=preprocess, epoch=1,
                    metrics={"val_accuracy": 0.5}, config=config)

    image_ids = sorted(photos)
    with torch.inference_mode():
        _, vectors = embed(model, collate_images([decode_image(photos[i]) for i in image_ids], preprocess))
    meta = {"model": {"checkpoint": str(checkpoint), "checkpoint_sha256": sha256_file(checkpoint), "epoch": 1,
                      "arch": arch}, "run": run_dir.name}
    make_catalogue(vectors.numpy(), image_ids, listing_meta, meta, "flat").save(run_dir / INDEX_DIR)

    figures = {"top1_accuracy": 0.5, "top3_accuracy": 1.0, "precision@1": 0.5, "precision@5": 0.4, "precision@10": 0.4}
    evaluation = {"test_photos": 4, "test_listings": 2, "catalogue_photos": len(image_ids),
                  "fine_tuned": {"model": f"fine-tuned {arch} (epoch 1)", **figures}}
    (run_dir / EVALUATION).write_text(json.dumps(evaluation, indent=2))
    update_run_info(run_dir, created=created, classes=classes, config={"train": config},
                    weights_source="random initialisation", data="generated by training/tiny_run.py")
    return TinyRun(run_dir, photos, listing_meta, classes, arch)


# Words that name each tiny category, for a text model that can be checked against a known answer.
TINY_WORDS = {"Garden": ("hose", "spade", "lawnmower", "rake", "shed", "planter"),
              "Home": ("sofa", "lamp", "table", "chair", "mirror", "rug"),
              "Music": ("guitar", "piano", "vinyl", "drum", "violin", "amplifier")}
TINY_ADJECTIVES = ("red", "old", "large", "vintage", "new", "small", "blue", "wooden")


def tiny_listing_words(rng: np.random.Generator, category: str, vague: float = 0.3) -> tuple[str, str]:
    """(title, description) of a generated listing of CATEGORY; a share `vague` of titles name no object."""
    noun = rng.choice(TINY_ADJECTIVES) if rng.random() < vague else rng.choice(TINY_WORDS[category])
    title = f"{rng.choice(TINY_ADJECTIVES)} {noun}"
    return title, f"{title} for sale, collection only. Posted by Sam in {category} in Leeds. 3 May 2022"


def make_tiny_text_model(run_dir: Path | str, classes=CLASSES, listings: int = 300, seed: int = 0, encoder=None):
    """RUN/text_model trained on titles whose nouns name the category, calibrated on listings whose photo
    probabilities are right 80% of the time; with ENCODER, it reads sentence vectors too."""
    from marketplace_search.layout import INDEX_DIR, TEXT_MODEL_DIR
    from marketplace_search.search import Catalogue
    from marketplace_search.text import ListingWords, listing_text
    from training.text import INPUT_KINDS, fit_calibration, kind_name, train_classifier

    classes = list(classes)
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, len(classes), listings)
    words = [tiny_listing_words(rng, classes[label]) for label in labels]
    model = train_classifier([w[0] for w in words], [w[1] for w in words], labels, classes, encoder=encoder)
    # The vote reads the generated listings and the run's own (each named by a noun of its category) alike.
    shown = {entry["product_id"]: entry for entry in Catalogue.load(Path(run_dir) / INDEX_DIR).listings.values()}
    product_ids = [f"tiny-{i:04d}" for i in range(listings)] + sorted(shown)
    nouns = [TINY_WORDS[shown[p]["category"]][i % len(TINY_WORDS[shown[p]["category"]])]
             for i, p in enumerate(sorted(shown))]
    texts = [listing_text(*w) for w in words] + [
        f"{shown[p]['title']}: {TINY_ADJECTIVES[i % len(TINY_ADJECTIVES)]} {noun}"
        for i, (p, noun) in enumerate(zip(sorted(shown), nouns))]
    model.listing_words = ListingWords.from_rows(
        product_ids, [*labels, *(classes.index(shown[p]["category"]) for p in sorted(shown))],
        [model.features(text) for text in texts], len(model.word_vocabulary) + len(model.char_vocabulary), k=10,
        temperature=0.05)
    val_labels = rng.integers(0, len(classes), listings)
    val_words = [tiny_listing_words(rng, classes[label]) for label in val_labels]
    photo = rng.dirichlet(np.ones(len(classes)), listings)
    right = rng.random(listings) < 0.8
    photo[right, val_labels[right]] += 1.0
    photo /= photo.sum(axis=1, keepdims=True)
    for inputs in INPUT_KINDS:
        texts = [f"{t}\n{d}" if "description" in inputs else t for t, d in val_words]
        matrix, bias, _ = fit_calibration(model.scores(texts), val_labels, classes,
                                          photo if "photo" in inputs else None, model.votes(texts))
        model.calibrations[kind_name(inputs)] = (matrix, bias)
    model.info["evaluation"] = {"note": "generated by training/tiny_run.py"}
    model.save(Path(run_dir) / TEXT_MODEL_DIR)
    return model


class TinyTokens(torch.nn.Module):
    """Random token vectors in place of a transformer's: what MeanPooled pools into a sentence vector."""

    def __init__(self, vocabulary: int, dimension: int):
        super().__init__()
        self.tokens = torch.nn.Embedding(vocabulary, dimension)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, return_dict: bool = False):
        return (self.tokens(input_ids),)


def make_tiny_encoder(folder: Path | str, dimension: int = 16, seed: int = 0):
    """A SentenceEncoder exported as the real one is, over random token vectors: an encoder in a second."""
    from tokenizers import Tokenizer

    from marketplace_search.sentences import TOKENIZER_FILE, MeanPooled, SentenceEncoder, default_source, save_export

    tokenizer = default_source() / TOKENIZER_FILE
    torch.manual_seed(seed)
    network = MeanPooled(TinyTokens(Tokenizer.from_file(str(tokenizer)).get_vocab_size(), dimension))
    return SentenceEncoder(save_export(network, tokenizer, Path(folder), {
        "source": "tiny", "source_weights_sha256": None, "max_length": 64, "dimension": dimension}))
