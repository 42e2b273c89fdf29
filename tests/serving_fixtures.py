"""Serving fixtures (a pytest plugin of conftest.py): the session's recipe run, its archives and TorchServe."""
import json
import struct
import threading
import time
import zlib
from dataclasses import dataclass, replace
from pathlib import Path

import pytest
import requests

from marketplace_search.runtime import precision_supported
from scripts import api, batch
from scripts.records import extract_archive  # noqa: F401
from scripts.serve import serving as running_server  # noqa: F401
from training.sample import write_listings
from training.tiny_run import CLASSES, TINY_PREPROCESS, TinyRun, make_tiny_run, photo_jpeg  # noqa: F401

REPO = Path(__file__).resolve().parents[1]
NAME = "marketplace"
# What the recipe's archives (openvino bf16, the default) run here: fp32 on a CPU without bf16 units.
RECIPE_BACKEND = f"openvino {'bf16' if precision_supported('bf16') else 'fp32'}"


def png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def png_raw(width: int, height: int, bit_depth: int = 8, colour_type: int = 2,
            data: bytes = zlib.compress(b"\0")) -> bytes:
    """A PNG written by hand: any header (a decompression bomb's, claiming width x height), DATA as its image data."""
    header = png_chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, bit_depth, colour_type, 0, 0, 0))
    return b"\x89PNG\r\n\x1a\n" + header + png_chunk(b"IDAT", data) + png_chunk(b"IEND", b"")


def archive_tiny_run(run: TinyRun, store: Path, name: str = NAME, version: str = "1.0", **options) -> Path:
    """scripts.archive.build_archive on a tiny run (torch fp32 unless `options` say otherwise); the .mar path."""
    from scripts.archive import build_archive

    store.mkdir(parents=True, exist_ok=True)
    return build_archive(run.run_dir, store, name, version, **options)


def assert_same_answers(found: dict, expected: dict) -> None:
    """Batch records keyed by (image_id, path): the same inputs, each with the same answer or error code."""
    assert found.keys() == expected.keys()
    for key, record in found.items():
        reference = expected[key]
        assert record["status"] == reference["status"], key
        if record["status"] == "ok":
            assert record["category"] == reference["category"], key
            assert record["probability"] == pytest.approx(reference["probability"], abs=1e-4)
            assert [n["image_id"] for n in record["neighbours"]] == [n["image_id"] for n in reference["neighbours"]]
        else:
            assert record["code"] == reference["code"], key


def worker_pid(server, name: str = NAME) -> int:
    [worker] = api.describe(server, name)[0]["workers"]
    return int(worker["pid"])


def wait_until(condition, timeout: float, interval: float = 0.2):
    """CONDITION's first truthy value within TIMEOUT seconds, else its last value."""
    deadline = time.monotonic() + timeout
    while not (value := condition()) and time.monotonic() < deadline:
        time.sleep(interval)
    return value


class ClientLoop:
    """CLIENTS threads POST PHOTO to URL until the block ends; `outcomes`: (sent, answered, status, answer or error)."""

    def __init__(self, url: str, photo: bytes, headers: dict, clients: int = 1):
        self.url, self.photo, self.headers = url, photo, {"Content-Type": "image/jpeg", **headers}
        self.outcomes: list[tuple[float, float, int, dict | str]] = []
        self.stopping = threading.Event()
        self.threads = [threading.Thread(target=self.loop, daemon=True) for _ in range(clients)]

    def loop(self) -> None:
        session = requests.Session()
        while not self.stopping.is_set():
            sent = time.monotonic()
            try:
                response = session.post(self.url, data=self.photo, headers=self.headers, timeout=60)
                self.outcomes.append((sent, time.monotonic(), response.status_code,
                                      response.json() if response.ok else response.text))
            except requests.RequestException as error:
                self.outcomes.append((sent, time.monotonic(), 0, f"{type(error).__name__}: {error}"))

    def __enter__(self) -> "ClientLoop":
        for thread in self.threads:
            thread.start()
        return self

    def __exit__(self, *exc_info) -> None:
        self.stopping.set()
        for thread in self.threads:
            thread.join(60)

    def failures(self) -> list:
        return [outcome for outcome in self.outcomes if outcome[2] != 200]


BAD_FILES = {"corrupt.jpg": photo_jpeg(99)[:300], "empty.jpg": b"", "notes.txt": b"not a photo\n"}


@dataclass
class BatchInputs:
    """A folder of batch inputs, p000..p015.jpg (p000..p011 byte-identical to the recipe's img-000..img-011) and
    BAD_FILES, beside a sub-folder and a dot-file that are not inputs; and the archive that answers them."""

    folder: Path
    mar: Path

    def files(self) -> list[Path]:
        return sorted(path for path in self.folder.iterdir() if path.is_file() and not path.name.startswith("."))

    def keys(self) -> set[tuple[str, str]]:
        return {(path.stem, str(path)) for path in self.files()}


def by_key(records: list[dict]) -> dict[tuple[str, str], dict]:
    """Batch records by (image_id, path); each input has one."""
    keyed = {(record["image_id"], record["path"]): record for record in records}
    assert len(keyed) == len(records), "an input has more than one result"
    return keyed


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in Path(path).read_text().splitlines()]


def write_new_listings(data: Path, count: int, titles: list[str] | None = None) -> dict[str, str]:
    """COUNT new Home listings "new-NNNN" with a photo each, titled TITLES; returns {image_id: product_id}."""
    listings = {f"new-photo-{n:04d}": {"product_id": f"new-{n:04d}", "title": titles[n] if titles else f"New lamp {n}",
                                       "price": 12.5, "location": "Leeds, Yorkshire", "category": "Home"}
                for n in range(count)}
    write_listings(data, listings, {image_id: photo_jpeg(50_000 + n, size=(96, 96))
                                    for n, image_id in enumerate(listings)})
    return {image_id: listing["product_id"] for image_id, listing in listings.items()}


@dataclass
class Recipe:
    """The README pipeline's folders at a tiny scale: raw DATA, WORK with RUN (embedding+features, a text model)
    in WORK/model_evaluation; once archived (`recipe`), RUN with the default backend as STORE's V1 and V2."""

    root: Path
    data: Path
    work: Path
    run: TinyRun
    store: Path | None = None
    v1: Path | None = None
    v2: Path | None = None


def make_recipe_run(root: Path) -> Recipe:
    from marketplace_search.models import MarketplaceNet
    from training import dataset, embed, photos, tables
    from training.data import PHOTOS_DIR
    from training.tiny_run import make_tiny_encoder, make_tiny_text_model

    data, work = root / "data", root / "work"
    model = MarketplaceNet("resnet18", len(CLASSES), embedding_dim=32, vector="embedding+features")
    run = make_tiny_run(work / "model_evaluation" / "2025-01-31_142233", photos_dir=root / "photos", model=model)
    write_listings(data, run.listings, {image_id: run.photo_bytes(image_id) for image_id in run.photos})
    tables.clean_tables(data, work)
    photos.normalise_photos(sorted(run.photos), data / "images", work / PHOTOS_DIR, size=64, workers=1)
    dataset.make_split(work, val_fraction=0.17, test_fraction=0.34, seed=0)  # of 6 listings: 3 train, 3 test
    embed.main(["--work", str(work), "--run", str(run.run_dir), "--workers", "0"])
    make_tiny_text_model(run.run_dir, encoder=make_tiny_encoder(root / "encoder"))
    return Recipe(root, data, work, run)


@pytest.fixture(scope="session")
def recipe_run(tmp_path_factory) -> Recipe:
    """The session's recipe-shaped run, not archived (seconds). Read only."""
    return make_recipe_run(tmp_path_factory.mktemp("recipe"))


@pytest.fixture(scope="session")
def recipe(recipe_run) -> Recipe:
    """The recipe archived as 1.0 and 2.0: what every test that needs "an archive" reads. Read only."""
    from scripts.archive import PRECISION, RUNTIME

    store = recipe_run.root / "model_store"
    v1, v2 = (archive_tiny_run(recipe_run.run, store, version=version, runtime=RUNTIME, precision=PRECISION)
              for version in ("1.0", "2.0"))
    return replace(recipe_run, store=store, v1=v1, v2=v2)


@pytest.fixture(scope="session")
def served(recipe):
    """The session's TorchServe: the recipe's 1.0 as `marketplace`, model-control API on, run from RECIPE/logs
    (where the commands find its key). A test that registers or releases leaves the server as it found it."""
    with running_server(recipe.store, recipe.root / "logs", {NAME: recipe.v1.name}, enable_model_api=True) as server:
        yield server


@pytest.fixture(scope="session")
def batch_inputs(recipe, tmp_path_factory) -> BatchInputs:
    folder = tmp_path_factory.mktemp("batch_inputs")
    (folder / "sub-folder").mkdir()
    for number in range(16):
        (folder / f"p{number:03d}.jpg").write_bytes(photo_jpeg(number))
    for name, data in BAD_FILES.items():
        (folder / name).write_bytes(data)
    (folder / ".DS_Store").write_bytes(b"\0\0")
    return BatchInputs(folder, recipe.v1)


@pytest.fixture(scope="session")
def local_lines(batch_inputs, tmp_path_factory) -> dict:
    """`scripts.batch --local` on the batch inputs, by key: what every other engine must answer."""
    output = tmp_path_factory.mktemp("local_batch") / "results.jsonl"
    batch.main([str(batch_inputs.folder), "--output", str(output), "--local", str(batch_inputs.mar),
                "--batch-size", "4"])
    return by_key(read_jsonl(output))


@pytest.fixture(scope="session")
def recipe_handler(recipe, tmp_path_factory):
    """The recipe's 1.0 in-process (handlers.local), as its workers run it."""
    from handlers.local import load_local_handler

    return load_local_handler(extract_archive(recipe.v1, tmp_path_factory.mktemp("recipe-model")))
