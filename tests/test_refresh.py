"""scripts.refresh on the recipe's run: listings added, removed and changed, released into the session's TorchServe."""
import hashlib
import io
import json
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageOps

from marketplace_search.layout import GUARD_REPORTS, TEXT_MODEL_DIR, new_run_dir, update_run_info
from marketplace_search.search import Catalogue
from marketplace_search.text import TextModel
from scripts import api, refresh
from tests.serving_fixtures import ClientLoop, photo_jpeg, wait_until, write_listings
from training.data import load_embeddings, read_training_table
from training.tiny_run import CLASSES, TinyRun

NAME = "refreshed"  # the recipe's 1.0 under a name of its own on the session's TorchServe
NEW_PRICE = 999.0
NEW_TITLE = "Drum violin"


@dataclass
class Old:
    data: Path
    work: Path
    run: Path


@pytest.fixture(scope="module")
def old(recipe_run) -> Old:
    """The recipe's run, made by the pipeline's own stages (random weights instead of training)."""
    return Old(recipe_run.data, recipe_run.work, recipe_run.run.run_dir)


@dataclass
class Changes:
    data: Path
    added: list[str]  # product ids
    removed: list[str]
    repriced: str
    renamed: str


def change_catalogue(run: TinyRun, destination: Path) -> Changes:
    """RUN's raw data with 3 listings (2 photos each) added, 2 removed, one repriced and one renamed."""
    products = sorted({listing["product_id"] for listing in run.listings.values()})
    removed, repriced, renamed = products[:2], products[2], products[3]
    changed = {repriced: {"price": NEW_PRICE}, renamed: {"title": NEW_TITLE}}
    listings = {image_id: {**listing, **changed.get(listing["product_id"], {})}
                for image_id, listing in run.listings.items() if listing["product_id"] not in removed}
    photos = {image_id: run.photo_bytes(image_id) for image_id in listings}
    added = [f"added-{category.lower()}" for category in CLASSES]
    for number in range(6):
        photos[f"added-photo-{number}"] = photo_jpeg(900 + number)
        listings[f"added-photo-{number}"] = {"product_id": added[number // 2], "title": "Added item", "price": 5.0,
                                             "location": "Leeds, Yorkshire", "category": CLASSES[number // 2]}
    write_listings(destination, listings, photos)
    return Changes(destination, added, removed, repriced, renamed)


def photos_of(work: Path, product_ids: list[str]) -> list[str]:
    table = read_training_table(work)
    return list(table.loc[table["product_id"].isin(product_ids), "image_id"])


def answered_by(loop: ClientLoop) -> list[str]:
    """The version that answered each request so far."""
    return [answer["model"]["version"] for _, _, status, answer in loop.outcomes if status == 200]


def post(server, photo_path: Path, version: str | None = None, k: int = 20) -> dict:
    return api.predict(server, photo_path.read_bytes(), model=NAME, version=version, k=k, retries=0)


def test_listings_are_compared_by_metadata_and_photos():
    listing = {"product_id": "p1", "title": "Lamp", "price": 5.0, "location": "Leeds", "category": "Home"}
    old = {"a": listing, "b": listing, "c": {**listing, "product_id": "p2"}}
    new = {"a": listing, "b": listing, "d": {**listing, "product_id": "p3"}}
    assert refresh.compare_listings(old, new) == {"added": ["p3"], "removed": ["p2"], "changed": [],
                                                  "unchanged": ["p1"]}
    assert refresh.compare_listings(old, {**new, "a": {**listing, "price": 6.0}})["changed"] == ["p1"]
    assert refresh.compare_listings(old, {"a": listing})["changed"] == ["p1"]  # a photo fewer


def test_vectors_of_another_checkpoint_are_not_reused(old):
    with pytest.raises(ValueError, match="cannot be reused"):
        refresh.previous_vectors(old.run, "0" * 64)


@pytest.mark.server
def test_refresh_released_without_downtime(old, recipe, served, tmp_path, monkeypatch):
    changes = change_catalogue(recipe.run, tmp_path / "data_v2")
    work = tmp_path / "work_v2"
    kept_photo = old.work / "photos" / f"{photos_of(old.work, [changes.repriced])[0]}.jpg"
    monkeypatch.chdir(recipe.root)  # where the server runs from (logs/): its keys are found without --key-file
    for name in ("TS_TOKEN", "TS_INFERENCE_TOKEN"):
        monkeypatch.delenv(name, raising=False)
    api.register(served, recipe.v1.name, NAME, initial_workers=1, synchronous=True)
    try:
        with ClientLoop(f"{served.inference_url}/predictions/{NAME}", kept_photo.read_bytes(),
                        api.auth_headers(served.token("inference"))) as loop:
            time.sleep(0.5)
            summary = refresh.main(["--run", str(old.run), "--data", str(changes.data), "--work", str(work),
                                    "--version", "2.0", "--store", str(recipe.store), "--name", NAME, "--workers",
                                    "0", "--release", "--runtime", "torch", "--precision", "fp32",
                                    "--management-url", served.management_url,
                                    "--inference-url", served.inference_url])
            assert wait_until(lambda: "2.0" in answered_by(loop)[-3:], 60)  # queries sent before the switch get 1.0
        versions = answered_by(loop)
        assert not loop.failures() and "1.0" in versions and versions[-1] == "2.0"
        assert versions == sorted(versions)  # 1.0 until the switch, 2.0 after

        # a non-fp32 backend's guard would read the old run's test split: the refresh's work folder has none
        assert refresh.guard_work(Path(summary["run"])) == refresh.guard_work(old.run) == old.work.resolve()
        registered = {d["modelVersion"] for d in api.describe(served, NAME, "all")}
        assert registered == {"1.0", "2.0"} and api.describe(served, NAME)[0]["modelVersion"] == "2.0"

        for image_id in photos_of(work, changes.added):  # each new photo finds itself
            answer = post(served, work / "photos" / f"{image_id}.jpg")
            assert answer["model"]["version"] == "2.0"
            assert answer["neighbours"][0]["image_id"] == image_id
            assert answer["neighbours"][0]["similarity"] == pytest.approx(1.0, abs=1e-4)
        removed_photo = old.work / "photos" / f"{photos_of(old.work, changes.removed)[0]}.jpg"
        everything = post(served, removed_photo, k=100)["neighbours"]
        assert not {n["product_id"] for n in everything} & set(changes.removed)
        before = post(served, removed_photo, version="1.0")["neighbours"]
        assert before[0]["product_id"] in changes.removed  # the old version is untouched
        listings = {n["product_id"]: n for n in everything}
        assert listings[changes.repriced]["price"] == NEW_PRICE
        assert listings[changes.renamed]["title"] == NEW_TITLE
    finally:
        for version in ("1.0", "2.0"):
            api.unregister(served, NAME, version)

    assert summary["listings"] == {"added": 3, "removed": 2, "changed": 2, "unchanged": 2}
    assert summary["photos"] == {"catalogue": 14, "reused": 8, "embedded": 6, "changed": 0, "unverified": 0,
                                 "dropped": 4}
    assert Path(summary["archive"]).name == f"{NAME}-v2.0.mar"
    new_run = Path(summary["run"])
    info = json.loads((new_run / "run.json").read_text())
    assert info["refresh_of"] == str(old.run.resolve()) and info["refresh"]["photos"]["embedded"] == 6
    assert (new_run / "weights" / "best.pt").read_bytes() == (old.run / "weights" / "best.pt").read_bytes()
    assert (new_run / "evaluation.json").read_text() == (old.run / "evaluation.json").read_text()
    # same weights: the new run's archives reuse the accuracy guard the recipe's archives ran
    assert json.loads((new_run / GUARD_REPORTS).read_text()) == json.loads((old.run / GUARD_REPORTS).read_text())
    # the text model reads as before; its words are the new catalogue's, a renamed listing found by its new title
    refreshed, model = (TextModel.load(run / TEXT_MODEL_DIR) for run in (new_run, old.run))
    assert refreshed.reader_sha256 == model.reader_sha256
    assert refreshed.listing_words.settings == model.listing_words.settings
    np.testing.assert_array_equal(refreshed.coef, model.coef)
    known = {listing["product_id"] for listing in Catalogue.load(new_run / "index").listings.values()
             if listing["category"] in model.classes}
    assert sorted(refreshed.listing_words.product_ids) == sorted(known) and not known & set(changes.removed)
    assert refreshed.listing_words.nearest(refreshed.read(NEW_TITLE.lower()).similarities, 1)[0][0] == changes.renamed


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
    assert same["photos"] | {"catalogue": 0} == {"catalogue": 0, "reused": 12, "embedded": 0, "changed": 0,
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
    assert changed["photos"]["reused"] == 11
    before, after = vectors_by_id(old.run), vectors_by_id(changed_run)
    assert not np.allclose(after[image_id], before[image_id])
    for other in before.keys() - {image_id}:
        np.testing.assert_array_equal(after[other], before[other])
    recorded = json.loads((changed_run / "embeddings" / "photo_sha256.json").read_text())
    assert recorded[image_id] == hashlib.sha256(replacement).hexdigest() and len(recorded) == 12

    _, again = refresh.refresh_run(changed_run, data, tmp_path / "work_again", workers=0)
    assert again["photos"]["embedded"] == 0 and again["photos"]["reused"] == 12  # the new hash is the one compared


def test_vectors_without_photo_hashes_are_reused_with_a_warning(old, tmp_path, capsys):
    run = tmp_path / "legacy_run"
    shutil.copytree(old.run, run)
    (run / "embeddings" / "photo_sha256.json").unlink()
    new_run, summary = refresh.refresh_run(run, old.data, tmp_path / "work", workers=0)
    assert summary["photos"]["reused"] == 12 and summary["photos"]["unverified"] == 12
    assert "12 reused vectors could not be checked" in capsys.readouterr().out
    assert len(json.loads((new_run / "embeddings" / "photo_sha256.json").read_text())) == 12


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
