"""Stage 3 (training/dataset.py): the split by listing and the torch Dataset."""
import itertools
import json
import shutil

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image

from training import data, dataset
from marketplace_search.presets import Preprocess, eval_transform, train_transform


def photo_table(listings: int = 300, categories: int = 3, seed: int = 0) -> pd.DataFrame:
    """A training table of `listings` listings with 1-3 photos each."""
    rng = np.random.default_rng(seed)
    rows = [{"image_id": f"p{product}-{photo}", "product_id": f"p{product}", "category": f"c{product % categories}",
             "label": product % categories}
            for product in range(listings) for photo in range(rng.integers(1, 4))]
    return pd.DataFrame(rows)


def listing_splits(split: pd.DataFrame) -> pd.Series:
    return split.groupby("product_id")["split"].first()


def test_no_listing_straddles_splits_and_the_split_depends_on_the_seed_not_the_row_order():
    table = photo_table()
    split = dataset.split_by_product(table, seed=7)
    assert (split.groupby("product_id")["split"].nunique() == 1).all()
    assert set(split["split"]) == {"train", "val", "test"}
    shuffled = dataset.split_by_product(table.sample(frac=1.0, random_state=1), seed=7)
    assert listing_splits(split).equals(listing_splits(shuffled))
    assert not listing_splits(split).equals(listing_splits(dataset.split_by_product(table, seed=8)))


def test_split_fractions_per_category_and_a_tiny_category_stays_in_train():
    table = pd.concat([photo_table(listings=300), pd.DataFrame(
        [{"image_id": "rare-0", "product_id": "rare", "category": "rare", "label": 3}])])
    split = dataset.split_by_product(table, val_fraction=0.2, test_fraction=0.1, seed=0)
    per_listing = split[split["category"] != "rare"].groupby("product_id")[["category", "split"]].first()
    counts = per_listing.groupby(["category", "split"]).size().unstack()
    assert (counts["val"] == 20).all() and (counts["test"] == 10).all() and (counts["train"] == 70).all()
    assert split.loc[split["product_id"] == "rare", "split"].item() == "train"


@pytest.mark.parametrize("val, test", [(0.5, 0.5), (-0.1, 0.1), (0.1, 1.0)])
def test_bad_fractions_are_refused(val, test):
    with pytest.raises(ValueError, match="fraction"):
        dataset.split_by_product(photo_table(listings=10), val, test)


def test_listing_in_two_categories_is_refused():
    table = photo_table(listings=10)
    table.loc[0, "category"] = "c2" if table.loc[0, "category"] != "c2" else "c1"
    with pytest.raises(ValueError, match="several categories"):
        dataset.split_by_product(table)


def test_split_files(sample_work):
    split = data.load_split(sample_work)
    assert list(split.columns) == dataset.SPLIT_COLUMNS
    assert split["label"].dtype == np.int64 and split["image_id"].map(type).eq(str).all()
    assert len(split) == 48
    report = json.loads((sample_work / data.SPLIT_REPORT).read_text())
    assert report["excluded_missing_photo"] == 0
    assert sum(counts["photos"] for counts in report["splits"].values()) == 48
    assert {name: counts["listings"] for name, counts in report["splits"].items()} == {
        "train": 18, "val": 3, "test": 3}  # 8 listings per category: 6 / 1 / 1
    assert all(sum(counts.values()) == 16 for counts in report["categories"].values())


def test_main_splits_again_leaving_out_photos_missing_after_stage_2(sample_work, tmp_path, capsys):
    work = tmp_path / "work"
    shutil.copytree(sample_work, work)
    gone = sorted((work / "photos").glob("*.jpg"))[:2]
    for path in gone:
        path.unlink()
    dataset.main(["--out", str(work), "--seed", "3", "--val-fraction", "0.25", "--test-fraction", "0.25"])
    assert "2 left out (no normalised photo)" in capsys.readouterr().out
    report = json.loads((work / data.SPLIT_REPORT).read_text())
    assert report["excluded_missing_photo"] == 2
    assert sorted(report["excluded_examples"]) == sorted(path.stem for path in gone)
    assert not data.load_split(work)["image_id"].isin([path.stem for path in gone]).any()
    assert report["seed"] == 3 and report["splits"]["test"]["listings"] == 6  # 2 of each category's 8 (or 7)


def test_load_split_without_split_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="run training.dataset first"):
        data.load_split(tmp_path)


@pytest.mark.parametrize("make", [eval_transform, train_transform, None])
def test_listing_photos_items(sample_work, make):
    rows = data.load_split(sample_work)
    photos = data.ListingPhotos(rows, sample_work / "photos", make and make(Preprocess(resize=64, crop=56)))
    assert len(photos) == 48
    features, label, image_id = photos[3]
    if make is None:  # the normalised photo itself
        assert isinstance(features, Image.Image) and features.mode == "RGB" and features.size == (64, 64)
    else:
        assert features.shape == (3, 56, 56) and features.dtype == torch.float32
    assert isinstance(label, int) and label == rows["label"][3]
    assert image_id == rows["image_id"][3]


def test_sample_categories_are_learnable(sample_work):
    # Nearest class centroid on 8x8 thumbnails: a model far weaker than a CNN must beat chance (1/3) clearly.
    rows = data.load_split(sample_work)
    photos = data.ListingPhotos(rows, sample_work / "photos")
    features = np.stack([np.asarray(photos[i][0].resize((8, 8)), np.float32).ravel() / 255 for i in range(len(rows))])
    labels = rows["label"].to_numpy()
    is_train = (rows["split"] == "train").to_numpy()
    centroids = np.stack([features[is_train & (labels == label)].mean(axis=0) for label in range(3)])
    predicted = np.argmin(((features[~is_train, None] - centroids) ** 2).sum(axis=2), axis=1)
    assert (predicted == labels[~is_train]).mean() >= 0.6


def test_listings_sharing_a_photo_stay_in_one_split(tmp_path):
    photos = tmp_path / "photos"
    photos.mkdir()
    table = pd.DataFrame([{"image_id": f"img-{product}-{photo}", "product_id": f"prod-{product}", "category": "Home",
                           "label": 0} for product in range(40) for photo in range(2)])
    for product, photo in itertools.product(range(40), range(2)):
        Image.new("RGB", (8, 8), (product * 5, photo * 100, 7)).save(photos / f"img-{product}-{photo}.jpg")
    # listing 1's second photo is byte-identical to listing 0's first; listing 2 reposts listing 1's first
    shutil.copyfile(photos / "img-0-0.jpg", photos / "img-1-1.jpg")
    shutil.copyfile(photos / "img-1-0.jpg", photos / "img-2-0.jpg")
    groups = dataset.duplicate_groups(table, photos)
    assert groups["prod-0"] == groups["prod-1"] == groups["prod-2"] != groups["prod-3"]
    for seed in range(5):
        split = dataset.split_by_product(table, 0.3, 0.3, seed, groups).groupby("product_id")["split"].first()
        assert split["prod-0"] == split["prod-1"] == split["prod-2"]
