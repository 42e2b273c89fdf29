"""Stage 1 (training/tables.py) on generated raw data with known faults."""
import json
import math

import numpy as np
import pandas as pd
import pytest

from training import tables
from training.data import read_training_table
from training.sample import make_sample_catalogue


@pytest.fixture(scope="module")
def messy_report(messy_catalogue, module_tmp):
    work = module_tmp("messy_tables")
    return work, tables.clean_tables(messy_catalogue.data_dir, work)


@pytest.mark.parametrize("function, argument, expected", [
    *((tables.parse_price, text, price) for text, price in [
        ("£1,250.00", 1250.0), ("£0.00", 0.0), ("£5.00", 5.0), ("£5", 5.0), (" £12.50 ", 12.5), ("2,000", 2000.0),
        *((text, math.nan) for text in ["Free", "", "POA", "£1.2.3", "-£5.00", None, math.nan])]),  # not amounts
    (tables.root_category, "Home & Garden / Dining, Living Room Furniture / Mirrors, Clocks & Ornaments",
     "Home & Garden"),
    (tables.root_category, "Appliances", "Appliances"),
    (tables.root_category, " Other Goods  / Other", "Other Goods"),
    (tables.listing_title, "Mirror wall art | in Wokingham, Berkshire | Gumtree", "Mirror wall art"),
    (tables.listing_title, "Watch Dogs Legion | PS4 Game | in Bournemouth, Dorset | Gumtree",
     "Watch Dogs Legion | PS4 Game"),
    (tables.listing_title, "Sofa | Gumtree", "Sofa"),
    (tables.listing_title, "Plain title", "Plain title"),
    (tables.make_encoder, ["Toys", "Appliances", "Toys", "Home & Garden"],  # sorted
     {"Appliances": 0, "Home & Garden": 1, "Toys": 2}),
    (tables.make_decoder, {"Appliances": 0, "Home & Garden": 1, "Toys": 2},
     {"0": "Appliances", "1": "Home & Garden", "2": "Toys"}),
])
def test_known_answers(function, argument, expected):
    np.testing.assert_equal(function(argument), expected)


def test_bad_prices_are_kept_missing_and_reported(messy_report, messy_catalogue):
    work, report = messy_report
    assert report["products"]["prices"] == {"missing": 1, "unparseable": 3,
                                            "unparseable_examples": ["Free", "POA", "£1.2.3"]}
    listings = pd.read_csv(work / "tables" / "listings.csv", dtype={"product_id": str})
    bad = listings[listings["product_id"].isin(messy_catalogue.manifest["bad_prices"])]
    assert len(bad) == 4 and bad["price"].isna().all()
    assert listings["price"].notna().sum() == len(listings) - 4


def test_every_dropped_listing_photo_row_and_file_is_counted(messy_report, messy_catalogue):
    _, report = messy_report
    products = report["products"]
    assert products["dropped"] == {"missing_id": 1, "missing_category": 1, "missing_product_name": 1, "duplicate_id": 1}
    assert products["rows_in"] == 20 + 4 + 1  # good, the four faulty rows, one photo-less listing
    assert products["rows_out"] == len(messy_catalogue.manifest["categories"]) == 21
    assert report["images"]["dropped"] == {
        "missing_id": 0, "missing_product_id": 0, "duplicate_id": 1,
        "listing_missing": 1,  # the orphan photo row
        "listing_dropped": 4,  # two photos each of the listings without category / product name
        "file_missing": 1,
    }
    assert report["images"]["rows_in"] == 40 + 4 + 1 + 1 + 1
    assert report["image_files"]["orphan_files"] == 1
    assert report["image_files"]["orphan_examples"] == messy_catalogue.manifest["orphan_files"]
    assert report["listings_without_photo"] == 1


def test_training_table_has_one_row_per_usable_photo_and_the_report_files_are_written(messy_report, messy_catalogue):
    work, report = messy_report
    folder = work / "tables"
    table = read_training_table(work)
    manifest = messy_catalogue.manifest
    assert list(table.columns) == tables.TABLE_COLUMNS
    # Corrupt files are still rows here: only stage 2 opens them.
    assert sorted(table["image_id"]) == sorted(manifest["good_photos"])
    assert report["images"]["rows_out"] == report["training_table"]["photos"] == 40
    encoder = json.loads((folder / "encoder.json").read_text())
    assert (table["label"] == table["category"].map(encoder)).all()
    assert (table["category"] == table["product_id"].map(manifest["categories"])).all()
    assert not table["title"].str.contains("Gumtree").any()
    assert json.loads((folder / "tables_report.json").read_text()) == report
    assert json.loads((folder / "decoder.json").read_text()) == tables.make_decoder(encoder)
    assert report["categories"]["Home & Garden"]["label"] == encoder["Home & Garden"]
    assert list(pd.read_csv(folder / "listings.csv").columns) == tables.LISTING_COLUMNS


def test_carriage_returns_inside_fields(tmp_path):
    header = ",id,product_name,category,product_description,price,location\n"
    rows = [
        '0,p1,"Lamp | in Ely, Cambs | Gumtree",Home & Garden / Lamps,first line\rsecond line,£5.00,"Ely, Cambs\r"\n',
        "1,p2,Kettle | in Ely | Gumtree,Appliances / Kettles,\"quoted\r\ron two lines\",\"£1,250.00\",Ely\r\n",
    ]
    (tmp_path / "Products.csv").write_text(header + "".join(rows), newline="")
    (tmp_path / "Images.csv").write_text(",id,product_id,bucket_link,image_ref,create_time\n"
                                         "0,i1,p1,link,ref,26/02/2022\n")
    (tmp_path / "images").mkdir()
    (tmp_path / "images" / "i1.jpg").write_bytes(b"not read in stage 1")
    report = tables.clean_tables(tmp_path, tmp_path / "work")
    listings = pd.read_csv(tmp_path / "work" / "tables" / "listings.csv")
    assert report["products"]["rows_in"] == 2
    assert list(listings["title"]) == ["Lamp", "Kettle"]
    assert list(listings["location"]) == ["Ely, Cambs", "Ely"]
    assert list(listings["description"]) == ["first line\nsecond line", "quoted\n\non two lines"]
    assert not listings.map(lambda value: "\r" in str(value)).any().any()


def test_missing_column_is_named(tmp_path):
    (tmp_path / "Products.csv").write_text(",id,product_name,price\n0,p1,Lamp,£1.00\n")
    with pytest.raises(ValueError, match=r"no column\(s\) \['category', 'product_description', 'location'\]"):
        tables.read_raw_csv(tmp_path / "Products.csv", tables.PRODUCT_COLUMNS)


def test_sample_is_seeded_and_stratified(tmp_path):
    data = tmp_path / "data"
    make_sample_catalogue(data, listings=60, categories=3, photos_per_listing=1, size=16, seed=3)
    picks = {}
    for name, seed in (("a", 0), ("b", 0), ("c", 1)):
        report = tables.clean_tables(data, tmp_path / name, max_listings=15, seed=seed)
        assert report["sample"]["listings"] == 15 and report["training_table"]["listings"] == 15
        assert [counts["listings"] for counts in report["categories"].values()] == [5, 5, 5]
        picks[name] = set(read_training_table(tmp_path / name)["product_id"])
        listings = pd.read_csv(tmp_path / name / "tables" / "listings.csv", dtype={"product_id": str})
        assert set(listings["product_id"]) == picks[name]
    assert picks["a"] == picks["b"] != picks["c"]


def test_main_prints_the_report(sample_catalogue, tmp_path, capsys):
    tables.main(["--data", str(sample_catalogue.data_dir), "--out", str(tmp_path)])
    printed = capsys.readouterr().out
    assert "listings: 24 rows in, 24 kept" in printed
    assert "training table: 48 photos of 24 listings, 3 categories" in printed
    assert (tmp_path / "tables" / "training_table.csv").is_file()


def test_real_listings(shared_data, tmp_path):
    report = tables.clean_tables(shared_data, tmp_path)
    assert report["products"]["rows_in"] == 5_761
    assert report["images"]["rows_in"] == 10_130
    assert report["image_files"]["jpg_files"] == 10_194
    assert report["training_table"]["categories"] == 13
    assert report["training_table"]["photos"] <= 10_130
    assert report["training_table"]["listings"] + report["listings_without_photo"] == report["products"]["rows_out"]
