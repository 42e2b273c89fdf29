"""scripts.refresh: a run refreshed with added, removed and changed listings, released into a real TorchServe."""
import faiss  # noqa: F401  (before torch: both bring an OpenMP runtime, and this order is the safe one)

import hashlib
import io
import json
import shutil
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import requests
import torch
from PIL import Image, ImageOps

from scripts import api, refresh
from scripts.archive import build_archive
from tests.serving_fixtures import TINY_PREPROCESS, running_server
from training import dataset, embed, index, photos, tables
from training.data import PHOTOS_DIR, load_embeddings, read_training_table
from marketplace_search.models import MarketplaceNet, save_checkpoint
from marketplace_search.layout import GUARD_REPORTS, new_run_dir, update_run_info
from marketplace_search.search import Catalogue, make_catalogue
from training.sample import make_sample_catalogue

NAME = "marketplace"
PHOTO_SIZE = 64
NEW_PRICE = "£999.00"
NEW_TITLE = "Freshly renamed lamp"


@dataclass
class Old:
    data: Path
    work: Path
    run: Path
    store: Path
    mar: Path


def read_raw(path: Path) -> pd.DataFrame:
    return pd.read_csv(path, lineterminator="\n", dtype=str, keep_default_na=False, index_col=0)


def write_raw(frame: pd.DataFrame, path: Path) -> None:
    frame.reset_index(drop=True).to_csv(path, lineterminator="\n")


@pytest.fixture(scope="module")
def old(module_tmp) -> Old:
    """A run made by the pipeline's own stages (random weights instead of training), archived as 1.0."""
    root = module_tmp("refresh")
    data, work = root / "data_v1", root / "work_v1"
    make_sample_catalogue(data, listings=12, categories=3, size=48, seed=1)
    tables.clean_tables(data, work)
    table = read_training_table(work)
    photos.normalise_photos(list(table["image_id"]), data / "images", work / PHOTOS_DIR, size=PHOTO_SIZE,
                            workers=1)
    dataset.make_split(work, seed=0)
    run = new_run_dir(work)
    classes = sorted(table["category"].unique())
    torch.manual_seed(0)
    config = {"arch": "resnet18", "size": PHOTO_SIZE, "weights": "none"}
    save_checkpoint(run / "weights" / "best.pt", MarketplaceNet("resnet18", len(classes), embedding_dim=32),
                    classes=classes, preprocess=TINY_PREPROCESS, epoch=1, metrics={}, config=config)
    update_run_info(run, classes=classes, config={"train": config}, weights_source="random initialisation")
    embed.main(["--work", str(work), "--run", str(run), "--workers", "0"])
    index.main(["--work", str(work), "--run", str(run), "--index-type", "flat"])
    (run / "evaluation.json").write_text(json.dumps({"fine_tuned": {"top1_accuracy": 0.5}}))
    store = root / "model_store"
    store.mkdir()
    mar = build_archive(run, store, NAME, "1.0", "{name}-v{version}")
    return Old(data, work, run, store, mar)


@dataclass
class Changes:
    data: Path
    added: list[str]  # product ids
    removed: list[str]
    repriced: str
    renamed: str


def change_catalogue(old: Old, destination: Path) -> Changes:
    """The old raw data with 3 listings added, 2 removed, one repriced and one renamed."""
    shutil.copytree(old.data, destination)
    products, images = read_raw(destination / "Products.csv"), read_raw(destination / "Images.csv")
    extra = destination.parent / "extra"
    added = list(make_sample_catalogue(extra, listings=3, categories=3, size=48, seed=7)["categories"])
    for path in (extra / "images").iterdir():
        shutil.copy(path, destination / "images" / path.name)
    removed, repriced, renamed = list(products["id"].iloc[:2]), products["id"].iloc[2], products["id"].iloc[3]
    products.loc[products["id"] == repriced, "price"] = NEW_PRICE
    products.loc[products["id"] == renamed, "product_name"] = f"{NEW_TITLE} | in Leeds, Yorkshire | Gumtree"
    products = pd.concat([products[~products["id"].isin(removed)], read_raw(extra / "Products.csv")])
    images = pd.concat([images[~images["product_id"].isin(removed)], read_raw(extra / "Images.csv")])
    write_raw(products, destination / "Products.csv")
    write_raw(images, destination / "Images.csv")
    return Changes(destination, added, removed, repriced, renamed)


def photos_of(work: Path, product_ids: list[str]) -> list[str]:
    table = read_training_table(work)
    return list(table.loc[table["product_id"].isin(product_ids), "image_id"])


class Prober:
    """Queries /predictions/NAME in a loop on a background thread; records every outcome."""

    def __init__(self, url: str, photo: bytes, headers: dict):
        self.url, self.photo, self.headers = url, photo, {"Content-Type": "image/jpeg", **headers}
        self.outcomes: list[str] = []  # the answering version, or the failure
        self.stopping = threading.Event()
        self.thread = threading.Thread(target=self.loop, daemon=True)

    def loop(self) -> None:
        session = requests.Session()
        while not self.stopping.is_set():
            try:
                response = session.post(self.url, data=self.photo, headers=self.headers, timeout=30)
                self.outcomes.append(response.json()["model"]["version"] if response.ok
                                     else f"HTTP {response.status_code}: {response.text[:200]}")
            except requests.RequestException as error:
                self.outcomes.append(f"{type(error).__name__}: {error}")
            time.sleep(0.02)

    def wait_for(self, version: str, timeout: float = 60) -> None:
        """Until an answer from `version` arrives (a query sent before the switch still gets the old one)."""
        deadline = time.monotonic() + timeout
        while version not in self.outcomes[-3:] and time.monotonic() < deadline:
            time.sleep(0.1)

    def __enter__(self) -> "Prober":
        self.thread.start()
        return self

    def __exit__(self, *exc_info) -> None:
        self.stopping.set()
        self.thread.join(60)


def post(server, photo_path: Path, version: str | None = None, k: int = 20) -> dict:
    path = f"/predictions/{NAME}" + (f"/{version}" if version else "")
    response = requests.post(server.inference_url + path, data=photo_path.read_bytes(), timeout=60,
                             headers={"Content-Type": "image/jpeg", "X-K": str(k),
                                      **api.auth_headers(server.token("inference"))})
    assert response.status_code == 200, response.text
    return response.json()


def test_listings_are_compared_by_metadata_and_photos():
    listing = {"product_id": "p1", "title": "Lamp", "price": 5.0, "location": "Leeds", "category": "Home"}
    old = {"a": listing, "b": listing, "c": {**listing, "product_id": "p2"}}
    new = {"a": listing, "b": listing, "d": {**listing, "product_id": "p3"}}
    assert refresh.compare_listings(old, new) == {"added": ["p3"], "removed": ["p2"], "changed": [], "unchanged": ["p1"]}
    assert refresh.compare_listings(old, {**new, "a": {**listing, "price": 6.0}})["changed"] == ["p1"]
    assert refresh.compare_listings(old, {"a": listing})["changed"] == ["p1"]  # a photo fewer


def test_vectors_of_another_checkpoint_are_not_reused(old):
    with pytest.raises(ValueError, match="cannot be reused"):
        refresh.previous_vectors(old.run, "0" * 64)


@pytest.mark.server
def test_refresh_released_without_downtime(old, tmp_path, monkeypatch):
    changes = change_catalogue(old, tmp_path / "data_v2")
    work = tmp_path / "work_v2"
    kept_photo = old.work / "photos" / f"{photos_of(old.work, [changes.repriced])[0]}.jpg"
    kept_guards = [{"key": {"runtime": "openvino", "precision": "bf16"}, "report": {"passed": True},
                    "measured_on": str(old.run.resolve())}]  # as scripts.archive keeps them (test_runtime)
    (old.run / GUARD_REPORTS).write_text(json.dumps(kept_guards))
    monkeypatch.chdir(tmp_path)  # where the server runs from (logs/): its keys are found without --key-file
    for name in ("TS_TOKEN", "TS_INFERENCE_TOKEN"):
        monkeypatch.delenv(name, raising=False)
    with running_server(old.store, tmp_path / "logs", {NAME: old.mar.name}, enable_model_api=True) as server:
        with Prober(f"{server.inference_url}/predictions/{NAME}", kept_photo.read_bytes(),
                    api.auth_headers(server.token("inference"))) as prober:
            time.sleep(0.5)
            summary = refresh.main(["--run", str(old.run), "--data", str(changes.data), "--work", str(work),
                                    "--version", "2.0", "--store", str(old.store), "--workers", "0", "--release",
                                    "--runtime", "torch", "--precision", "fp32",
                                    "--management-url", server.management_url,
                                    "--inference-url", server.inference_url])
            prober.wait_for("2.0")
        failures = [outcome for outcome in prober.outcomes if outcome not in ("1.0", "2.0")]
        assert failures == [] and "1.0" in prober.outcomes and prober.outcomes[-1] == "2.0"
        assert prober.outcomes == sorted(prober.outcomes)  # 1.0 until the switch, 2.0 after

        # a non-fp32 backend's guard would read the old run's test split: the refresh's work folder has none
        assert refresh.guard_work(Path(summary["run"])) == refresh.guard_work(old.run) == old.work.resolve()
        registered = {d["modelVersion"] for d in api.describe(server, NAME, "all")}
        assert registered == {"1.0", "2.0"} and api.describe(server, NAME)[0]["modelVersion"] == "2.0"

        new_photos = work / "photos"
        for image_id in photos_of(work, changes.added):  # each new photo finds itself
            answer = post(server, new_photos / f"{image_id}.jpg")
            assert answer["model"]["version"] == "2.0"
            assert answer["neighbours"][0]["image_id"] == image_id
            assert answer["neighbours"][0]["similarity"] == pytest.approx(1.0, abs=1e-4)
        removed_photo = old.work / "photos" / f"{photos_of(old.work, changes.removed)[0]}.jpg"
        everything = post(server, removed_photo, k=100)["neighbours"]
        assert not {n["product_id"] for n in everything} & set(changes.removed)
        before = post(server, removed_photo, version="1.0")["neighbours"]
        assert before[0]["product_id"] in changes.removed  # the old version is untouched
        listings = {n["product_id"]: n for n in everything}
        assert listings[changes.repriced]["price"] == 999.0
        assert listings[changes.renamed]["title"] == NEW_TITLE

    assert summary["listings"] == {"added": 3, "removed": 2, "changed": 2, "unchanged": 8}
    assert summary["photos"] == {"catalogue": 26, "reused": 20, "embedded": 6, "changed": 0, "unverified": 0,
                                 "dropped": 4}
    assert Path(summary["archive"]).name == "marketplace-v2.0.mar"
    new_run = Path(summary["run"])
    info = json.loads((new_run / "run.json").read_text())
    assert info["refresh_of"] == str(old.run.resolve()) and info["refresh"]["photos"]["embedded"] == 6
    assert (new_run / "weights" / "best.pt").read_bytes() == (old.run / "weights" / "best.pt").read_bytes()
    assert (new_run / "evaluation.json").read_text() == (old.run / "evaluation.json").read_text()
    assert json.loads((new_run / GUARD_REPORTS).read_text()) == kept_guards  # same weights: its archives reuse them
    old_ids, old_vectors, _, _ = load_embeddings(old.run)
    new_ids, new_vectors, _, _ = load_embeddings(new_run)
    for image_id in set(old_ids) & set(new_ids):  # reused as they were
        np.testing.assert_array_equal(new_vectors[new_ids.index(image_id)], old_vectors[old_ids.index(image_id)])


def other_photo_of_the_same_size(path: Path) -> bytes:
    """Another picture (PATH's, inverted) as a JPEG exactly as long as PATH, padded after its end marker."""
    original = path.read_bytes()
    with Image.open(path) as image:
        inverted = ImageOps.invert(image.convert("RGB"))
    for quality in (90, 75, 50, 25, 10):
        buffer = io.BytesIO()
        inverted.save(buffer, "JPEG", quality=quality)
        if buffer.tell() <= len(original):
            return buffer.getvalue() + b"\0" * (len(original) - buffer.tell())
    raise AssertionError(f"cannot make a JPEG as small as {path}")


def vectors_by_id(run: Path) -> dict[str, np.ndarray]:
    image_ids, vectors, _, _ = load_embeddings(run)
    return dict(zip(image_ids, vectors))


def test_a_photo_changed_under_the_same_id_is_embedded_again(old, tmp_path):
    data, work = tmp_path / "data", tmp_path / "work"
    shutil.copytree(old.data, data)  # every photo the same bytes (new files, new times)
    same_run, same = refresh.refresh_run(old.run, data, work, workers=0)
    assert same["photos"] | {"catalogue": 0} == {"catalogue": 0, "reused": 24, "embedded": 0, "changed": 0,
                                                 "unverified": 0, "dropped": 0}

    image_id = next(path.stem for path in sorted((data / "images").glob("*.jpg"))
                    if path.read_bytes()[:2] == b"\xff\xd8" and path.stem in vectors_by_id(old.run))
    photo = data / "images" / f"{image_id}.jpg"
    replacement = other_photo_of_the_same_size(photo)
    assert len(replacement) == photo.stat().st_size and replacement != photo.read_bytes()
    photo.write_bytes(replacement)
    # The same WORK: its normalised copy of the old photo is there, and must not be what gets embedded.
    changed_run, changed = refresh.refresh_run(old.run, data, work, workers=0)
    assert changed["photos"]["embedded"] == 1 and changed["photos"]["changed"] == 1
    assert changed["photos"]["reused"] == 23
    before, after = vectors_by_id(old.run), vectors_by_id(changed_run)
    assert not np.allclose(after[image_id], before[image_id])
    for other in before.keys() - {image_id}:
        np.testing.assert_array_equal(after[other], before[other])
    recorded = json.loads((changed_run / "embeddings" / "photo_sha256.json").read_text())
    assert recorded[image_id] == hashlib.sha256(replacement).hexdigest() and len(recorded) == 24

    _, again = refresh.refresh_run(changed_run, data, tmp_path / "work_again", workers=0)
    assert again["photos"]["embedded"] == 0 and again["photos"]["reused"] == 24  # the new hash is the one compared


def test_vectors_without_photo_hashes_are_reused_with_a_warning(old, tmp_path, capsys):
    run = tmp_path / "legacy_run"
    shutil.copytree(old.run, run)
    (run / "embeddings" / "photo_sha256.json").unlink()
    new_run, summary = refresh.refresh_run(run, old.data, tmp_path / "work", workers=0)
    assert summary["photos"]["reused"] == 24 and summary["photos"]["unverified"] == 24
    assert "24 reused vectors could not be checked" in capsys.readouterr().out
    assert len(json.loads((new_run / "embeddings" / "photo_sha256.json").read_text())) == 24


def test_a_refreshed_text_model_finds_the_new_catalogue_by_its_words(tmp_path):
    from marketplace_search.text import TextModel
    from tests.serving_fixtures import make_tiny_run
    from training.tiny_run import make_tiny_text_model

    run = make_tiny_run(tmp_path / "runs" / "2025-01-31_142233", seed=0)
    model = make_tiny_text_model(run.run_dir)
    old = Catalogue.load(run.run_dir / "index")
    # the new catalogue: prod-000 gone, prod-001 renamed, one new listing (with the photo vector of another)
    kept = [image_id for image_id in old.image_ids if old.listings[image_id]["product_id"] != "prod-000"]
    listings = {image_id: dict(old.listings[image_id]) for image_id in kept}
    for listing in listings.values():
        if listing["product_id"] == "prod-001":
            listing.update(title="Drum violin", category="Music")
    listings["new-photo"] = {**listings[kept[0]], "product_id": "new-001", "title": "Spade", "category": "Garden"}
    vectors = old.index.reconstruct_n(0, old.index.ntotal)
    rows = [old.image_ids.index(image_id) for image_id in kept]
    catalogue = make_catalogue(np.concatenate([vectors[rows], vectors[rows[:1]]]), kept + ["new-photo"], listings,
                               {}, "flat")
    work = tmp_path / "work"
    (work / "tables").mkdir(parents=True)
    products = {listing["product_id"]: listing for listing in listings.values()}
    pd.DataFrame([{"product_id": p, "title": listing["title"], "category": listing["category"],
                   "description": "wooden lawnmower" if p == "new-001" else ""} for p, listing in products.items()]
                 ).to_csv(work / "tables" / "listings.csv", index=False)
    new_run = tmp_path / "new_run"
    info = refresh.refresh_text_model(run.run_dir, new_run, catalogue, work)
    refreshed = TextModel.load(new_run / "text_model")
    assert info["listings_by_words"] == len(products)
    assert sorted(refreshed.listing_words.product_ids) == sorted(products)
    assert refreshed.reader_sha256 == model.reader_sha256  # a live catalogue's words serve both versions
    np.testing.assert_array_equal(refreshed.coef, model.coef)
    assert refreshed.listing_words.settings == model.listing_words.settings

    def nearest(text):
        return refreshed.listing_words.nearest(refreshed.read(text).similarities, 1)[0][0]

    assert nearest("drum violin") == "prod-001" and nearest("spade lawnmower") == "new-001"  # title + description
    assert refreshed.listing_words.labels[refreshed.listing_words.position["prod-001"]] == model.classes.index("Music")


def test_the_archive_guard_reads_the_test_split_of_the_run_the_weights_come_from(tmp_path):
    original_work, refresh_work = tmp_path / "work", tmp_path / "refresh"
    original = new_run_dir(original_work)
    (original_work / "split.csv").write_text("image_id,product_id,label,split\n")
    update_run_info(original, work=str(original_work))
    first = new_run_dir(refresh_work)  # a refresh: its work folder has tables and photos, no split
    update_run_info(first, work=str(refresh_work), refresh_of=str(original))
    second = new_run_dir(tmp_path / "again")  # a refresh of the refresh
    update_run_info(second, work=str(tmp_path / "again"), refresh_of=str(first))
    assert refresh.guard_work(original) == refresh.guard_work(first) == refresh.guard_work(second) == original_work
    (original_work / "split.csv").unlink()
    assert refresh.guard_work(second) is None
    store = tmp_path / "store"
    store.mkdir()
    with pytest.raises(SystemExit, match="--guard-work"):  # said before any work is done
        refresh.main(["--run", str(second), "--data", str(tmp_path / "data"), "--work", str(tmp_path / "w"),
                      "--store", str(store), "--version", "2.0", "--runtime", "openvino", "--precision", "bf16"])
