"""Saved catalogues: the id map and listings as one memory-mapped Arrow file (marketplace_search.columns)
answer exactly as the catalogue in memory does, and loading copies no column."""
import faiss  # noqa: F401  (before torch: both bring an OpenMP runtime, and this order is the safe one)

import shutil

import numpy as np
import pyarrow as pa
import pytest

from marketplace_search import search
from marketplace_search.columns import ImageIds, Listings, write_listing_table
from marketplace_search.search import Catalogue, make_catalogue
from tests.test_ivfpq import clustered
from tests.test_search import listings_for

N, D = 3000, 32


@pytest.fixture(scope="module")
def data():
    vectors = clustered(N + 20, D, seed=3)
    return vectors[:N], vectors[N:]


@pytest.fixture(scope="module")
def ivfpq(data) -> Catalogue:
    image_ids, listings = listings_for(N)
    listings["img-7"]["price"] = None  # a listing without a price survives the table
    return make_catalogue(data[0], image_ids, listings, {"run": "test"}, "ivfpq", nlist=16, nprobe=8, pq_m=8)


@pytest.fixture(scope="module")
def folder(ivfpq, module_tmp):
    """The ivfpq catalogue, saved."""
    folder = module_tmp("columns") / "catalogue"
    ivfpq.save(folder)
    return folder


def test_every_index_type_saves_a_listings_table(folder, data, tmp_path):
    assert sorted(path.name for path in folder.iterdir()) == sorted(search.CATALOGUE_FILES)
    image_ids, listings = listings_for(40)
    make_catalogue(data[0][:40], image_ids, listings, {}, "flat").save(tmp_path / "flat")
    assert sorted(path.name for path in (tmp_path / "flat").iterdir()) == sorted(search.CATALOGUE_FILES)


def test_a_saved_catalogue_answers_as_in_memory(folder, ivfpq, data):
    _, queries = data
    columnar = Catalogue.load(folder)
    assert isinstance(columnar.listings, Listings) and isinstance(columnar.image_ids, ImageIds)
    assert columnar.search(queries, k=7) == ivfpq.search(queries, k=7)
    assert columnar.search(queries[:5], k=4, category="Garden") == ivfpq.search(queries[:5], k=4, category="Garden")
    assert columnar.search(queries[:5], k=3, exclude_products=["prod-1"] * 5) == \
        ivfpq.search(queries[:5], k=3, exclude_products=["prod-1"] * 5)
    assert {name: rows.tolist() for name, rows in columnar.rows_by_category.items()} == \
        {name: rows.tolist() for name, rows in ivfpq.rows_by_category.items()}
    seven = [n for answer in columnar.search(np.stack([data[0][7]]), k=3) for n in answer if n["image_id"] == "img-7"]
    assert seven and seven[0]["price"] is None


def test_columnar_lists_and_dicts_read_as_the_in_memory_ones(folder, ivfpq):
    columnar = Catalogue.load(folder)
    assert len(columnar.image_ids) == N and columnar.image_ids[5] == "img-5" and columnar.image_ids[-1] == f"img-{N - 1}"
    assert columnar.image_ids[2:4] == ["img-2", "img-3"] and columnar.image_ids == ivfpq.image_ids
    assert columnar.listings["img-9"] == ivfpq.listings["img-9"]
    assert "img-9" in columnar.listings and "img-x" not in columnar.listings
    with pytest.raises(KeyError):
        columnar.listings["img-x"]
    assert dict(columnar.listings.items()) == ivfpq.listings and list(columnar.listings.values())[3] == ivfpq.listings["img-3"]
    assert search.read_listings(folder) == ivfpq.listings


def test_removed_products_leave_columnar_answers(folder, ivfpq, data):
    _, queries = data
    removed = {"prod-0", "prod-10", "prod-11", "prod-missing"}
    views = [catalogue.without_products(removed) for catalogue in (Catalogue.load(folder), ivfpq)]
    assert views[0].visible == views[1].visible == N - 6
    answers = views[0].search(queries, k=10)
    assert answers == views[1].search(queries, k=10)
    assert not {n["product_id"] for answer in answers for n in answer} & removed


def test_a_loaded_catalogue_saves_again(folder, data, tmp_path):
    _, queries = data
    loaded = Catalogue.load(folder)
    loaded.save(tmp_path / "again")
    assert Catalogue.load(tmp_path / "again").search(queries, k=5) == loaded.search(queries, k=5)


def test_loading_a_catalogue_maps_its_listings(folder):
    """The table's columns are the file's pages: Arrow allocates nothing for them in the process."""
    table_bytes = (folder / search.LISTING_TABLE_FILE).stat().st_size
    before = pa.total_allocated_bytes()
    catalogue = Catalogue.load(folder)
    assert pa.total_allocated_bytes() - before < table_bytes / 20
    as_read = pa.ipc.open_file(pa.OSFile(str(folder / search.LISTING_TABLE_FILE))).read_all()
    assert pa.total_allocated_bytes() - before > table_bytes / 2  # read (not mapped), the same file is copied
    assert catalogue.search(np.ones((1, D), np.float32) / np.sqrt(D), k=2)
    del as_read


def test_listings_table_of_another_build_refuses_to_load(folder, tmp_path):
    image_ids, listings = listings_for(N)
    listings["img-0"]["title"] = "another build's title"
    copy = tmp_path / "a"
    shutil.copytree(folder, copy)
    write_listing_table(copy / search.LISTING_TABLE_FILE, image_ids, listings)
    with pytest.raises(search.CatalogueMismatchError, match=r"listings.arrow does not belong with .*catalogue.faiss"):
        Catalogue.load(copy)
    (copy / search.LISTING_TABLE_FILE).write_bytes((folder / search.LISTING_TABLE_FILE).read_bytes())
    (copy / search.INDEX_FILE).write_bytes(b"x" + (folder / search.INDEX_FILE).read_bytes()[1:])
    with pytest.raises(search.CatalogueMismatchError, match=r"catalogue.faiss does not belong with .*listings.arrow"):
        Catalogue.load(copy)


def test_a_listing_with_other_fields_is_refused_by_the_table(ivfpq, tmp_path):
    image_ids, listings = listings_for(20)
    listings["img-3"]["colour"] = "red"
    with pytest.raises(ValueError, match=r"listing of img-3 has the fields .*colour"):
        make_catalogue(clustered(20, D), image_ids, listings, {}, "flat").save(tmp_path / "c")
    assert not (tmp_path / "c").exists()


def test_an_archive_ships_a_columnar_catalogue_and_its_handler_answers_from_it(tmp_path):
    from handlers.local import load_local_handler, predict_local
    from tests.serving_fixtures import archive_tiny_run, extract_archive, make_tiny_run

    run = make_tiny_run(tmp_path / "runs" / "2025-01-31_142233")
    expected = Catalogue.load(run.run_dir / "index")
    model = extract_archive(archive_tiny_run(run, tmp_path / "store"), tmp_path / "model")
    assert sorted(path.name for path in (model / "catalogue").iterdir()) == sorted(search.CATALOGUE_FILES)
    handler = load_local_handler(model)
    assert type(handler.catalogue.listings).__name__ == "Listings"  # the archive's own copy of the class
    [(status, answer)] = predict_local(handler, [{"body": run.photo_bytes("img-004")}])
    assert status == 200
    assert answer["neighbours"][0]["image_id"] == "img-004"  # its own photo, found in the mapped table
    assert answer["neighbours"][0]["title"] == expected.listings["img-004"]["title"]
