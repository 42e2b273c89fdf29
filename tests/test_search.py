"""The catalogue against brute-force search (flat, HNSW, IVF-PQ), and its folders: whole, mapped, consistent."""
import json
import shutil
import time
from concurrent.futures import ThreadPoolExecutor
from unittest.mock import Mock

import faiss
import numpy as np
import pyarrow as pa
import pytest

from marketplace_search import search
from marketplace_search.columns import ListingTable
from marketplace_search.search import Catalogue, build_index, make_catalogue
from scripts.benchmark.index import recall_at_k

N, D = 4000, 32  # the IVF-PQ catalogue's size


def unit_vectors(n: int, d: int, seed: int = 0) -> np.ndarray:
    vectors = np.random.default_rng(seed).normal(size=(n, d)).astype(np.float32)
    return vectors / np.linalg.norm(vectors, axis=1, keepdims=True)


def listings_for(n: int, photos_per_listing: int = 2) -> tuple[list[str], dict]:
    image_ids = [f"img-{i}" for i in range(n)]
    return image_ids, {image_id: {"product_id": f"prod-{i // photos_per_listing}", "title": f"title {i}",
                                  "price": float(i), "location": "Leeds",
                                  "category": ["Home", "Garden", "Music"][(i // photos_per_listing) % 3]}
                       for i, image_id in enumerate(image_ids)}


def brute_force(vectors: np.ndarray, queries: np.ndarray, k: int) -> np.ndarray:
    return np.argsort(-(queries @ vectors.T), axis=1, kind="stable")[:, :k]


def catalogue_of(n: int, index_type: str = "flat", d: int = 16, seed: int = 0, photos_per_listing: int = 2,
                 meta: dict | None = None, **options) -> tuple[np.ndarray, Catalogue]:
    vectors = unit_vectors(n, d, seed)
    return vectors, make_catalogue(vectors, *listings_for(n, photos_per_listing), meta or {}, index_type, **options)


def test_flat_search_equals_brute_force():
    vectors, catalogue = catalogue_of(500)
    queries = unit_vectors(20, 16, seed=1)
    distances, rows = catalogue.search_ids(queries, 10)
    np.testing.assert_array_equal(rows, brute_force(vectors, queries, 10))
    np.testing.assert_allclose(distances, np.take_along_axis(queries @ vectors.T, rows, axis=1), rtol=1e-5)


def test_hnsw_recall_against_brute_force():
    vectors, queries = unit_vectors(2000, 16), unit_vectors(50, 16, seed=1)
    index, params = build_index(vectors, "hnsw", ef_search=128)
    _, rows = index.search(queries, 10)
    truth = brute_force(vectors, queries, 10)
    assert params["type"] == "hnsw"
    assert recall_at_k(rows, truth) >= 0.9


def test_auto_picks_flat_then_hnsw_then_ivfpq_by_size(monkeypatch):
    assert search.flat_max(64) == search.flat_max(256) == 20_000
    assert search.flat_max(1536) == 3_333  # an exact search reads every float: as many floats in all
    monkeypatch.setattr(search, "FLAT_MAX", 100)
    monkeypatch.setattr(search, "FLAT_DIMENSION", 8)
    monkeypatch.setattr(search, "HNSW_MAX", 500)
    for n, d, expected in [(100, 8, "flat"), (101, 8, "hnsw"), (100, 4, "flat"), (101, 4, "hnsw"), (50, 16, "flat"),
                           (51, 16, "hnsw"), (500, 8, "hnsw"), (501, 8, "ivfpq")]:
        assert build_index(unit_vectors(n, d), "auto", nlist=4, pq_m=4)[1]["type"] == expected, (n, d)
    with pytest.raises(ValueError, match="does not divide"):
        build_index(unit_vectors(501, 8), "ivfpq", nlist=4, pq_m=5)


def test_search_answers_each_listing_once_by_its_best_photo_excluded_or_filtered():
    vectors, catalogue = catalogue_of(300)
    image_ids, listings = listings_for(300)
    neighbours = catalogue.search(vectors[7:8], k=10)[0]
    assert neighbours[0]["image_id"] == "img-7" and neighbours[0]["similarity"] == pytest.approx(1.0, abs=1e-5)
    assert set(neighbours[0]) == {"image_id", "product_id", "title", "price", "location", "category", "similarity"}
    expected, seen = [], set()  # each listing's most similar photo, in brute-force order
    for row in brute_force(vectors, vectors[7:8], 300)[0]:
        if listings[image_ids[row]]["product_id"] not in seen:
            seen.add(listings[image_ids[row]]["product_id"])
            expected.append(image_ids[row])
    assert [n["image_id"] for n in neighbours] == expected[:10]
    excluded = catalogue.search(vectors[7:8], k=5, exclude_products=["prod-3"])[0]  # img-7's own listing
    assert [n["image_id"] for n in excluded] == [i for i in expected if listings[i]["product_id"] != "prod-3"][:5]
    music = catalogue.search(vectors[7:8], k=5, category="Music")[0]
    assert [n["image_id"] for n in music] == [i for i in expected if listings[i]["category"] == "Music"][:5]
    small_vectors, small = catalogue_of(6, d=8)
    assert len(small.search(small_vectors[:1], k=10)[0]) == 3  # all the listings there are


@pytest.mark.parametrize("index_type", ["flat", "hnsw", "ivfpq"])
def test_listings_of_gives_each_listing_its_photo_nearest_the_query(index_type):
    """Listings found another way (by words) answered as a search would: best photo, its exact cosine."""
    vectors, catalogue = catalogue_of(1200, index_type, photos_per_listing=3, nlist=8, pq_m=4)
    query = unit_vectors(1, 16, seed=1)[0]
    wanted = ["prod-5", "prod-17", "prod-300", "no-such-listing"]
    found = catalogue.listings_of(wanted, query)
    assert list(found) == ["prod-5", "prod-17", "prod-300"]  # in row order; an unknown listing left out
    tolerance = 0.02 if index_type == "ivfpq" else 1e-5  # decoded from 8-bit codes there
    for product_id, entry in found.items():
        rows = [3 * int(product_id.split("-")[1]) + i for i in range(3)]
        best = max(rows, key=lambda row: float(vectors[row] @ query))
        assert entry["image_id"] == f"img-{best}" or abs(
            entry["similarity"] - float(vectors[best] @ query)) < tolerance  # (a near tie decoded the other way)
        assert entry["similarity"] == pytest.approx(float(vectors[best] @ query), abs=tolerance)
        assert entry["title"] == f"title {entry['image_id'].split('-')[1]}"
    assert set(catalogue.listings_of(wanted, query, category="Home")) == {"prod-300"}  # listing n: n % 3
    assert set(catalogue.without_products({"prod-17"}).listings_of(wanted, query)) == {"prod-5", "prod-300"}
    first = catalogue.listings_of(["prod-300"])["prod-300"]  # no query: the first photo, no similarity
    assert first["image_id"] == "img-900" and "similarity" not in first


def test_bad_arguments_fail_with_a_message():
    vectors, catalogue = catalogue_of(10, d=8)
    image_ids, listings = listings_for(10)
    with pytest.raises(ValueError, match="k must be between"):
        catalogue.search(vectors[:1], k=0)
    with pytest.raises(KeyError, match="unknown category 'Cars'"):
        catalogue.search(vectors[:1], k=1, category="Cars")
    with pytest.raises(ValueError, match="dimension 4"):
        catalogue.search(unit_vectors(1, 4), k=1)
    with pytest.raises(ValueError, match="L2-normalised"):
        make_catalogue(vectors * 2, image_ids, listings, {}, "flat")
    with pytest.raises(ValueError, match="no listing metadata"):
        make_catalogue(vectors, image_ids, {}, {}, "flat")
    listings["img-3"]["colour"] = "red"
    with pytest.raises(ValueError, match=r"listing of img-3 has the fields .*colour"):
        make_catalogue(vectors, image_ids, listings, {}, "flat")


@pytest.mark.parametrize("index_type", ["flat", "hnsw"])
def test_a_saved_catalogue_loads_mapped_and_answers_the_same(tmp_path, index_type):
    vectors, (image_ids, listings) = unit_vectors(3000, 16), listings_for(3000)
    listings["img-7"]["price"] = None  # a listing without a price survives the table
    catalogue = make_catalogue(vectors, image_ids, listings, {"run": "test"}, index_type)
    catalogue.save(tmp_path / "index")
    assert sorted(path.name for path in (tmp_path / "index").iterdir()) == sorted(search.CATALOGUE_FILES)
    table_bytes, before = (tmp_path / "index" / search.LISTING_TABLE_FILE).stat().st_size, pa.total_allocated_bytes()
    loaded = Catalogue.load(tmp_path / "index")
    assert pa.total_allocated_bytes() - before < table_bytes / 20  # the table is the file's pages, not a copy
    copied = pa.ipc.open_file(pa.OSFile(str(tmp_path / "index" / search.LISTING_TABLE_FILE))).read_all()
    assert pa.total_allocated_bytes() - before > table_bytes / 2 and copied  # as a read (not mapped) copies it
    assert loaded.meta["run"] == "test" and loaded.meta["dimension"] == 16 and loaded.meta["metric"] == "inner_product"
    queries = vectors[:5]
    for options in ({}, {"category": "Garden"}, {"exclude_products": ["prod-1"] * 5}):
        assert loaded.search(queries, k=7, **options) == catalogue.search(queries, k=7, **options)
    removed = {"prod-0", "prod-10", "prod-missing"}
    view = loaded.without_products(removed)
    assert view.visible == 3000 - 4
    assert view.search(queries, k=10) == catalogue.without_products(removed).search(queries, k=10)
    assert not {n["product_id"] for answer in view.search(queries, k=10) for n in answer} & removed
    assert loaded.listings["img-7"]["price"] is None and "img-x" not in loaded.listings
    assert loaded.image_ids[2:4] == ["img-2", "img-3"] and loaded.image_ids[-1] == "img-2999"
    assert list(loaded.image_ids) == image_ids
    assert dict(loaded.listings.items()) == listings
    loaded.save(tmp_path / "again")
    assert Catalogue.load(tmp_path / "again").search(queries, k=5) == loaded.search(queries, k=5)


@pytest.mark.parametrize("index_type", ["hnsw", "ivfpq"])
def test_filtered_search_of_a_rare_category_finds_k_of_it(index_type):
    """20,000 photos of three common categories, 300 of "Scarce" and 12 of "Rare"; one photo a listing."""
    categories = np.array((["Home", "Garden", "Music"] * 6667)[:20_000] + ["Scarce"] * 300 + ["Rare"] * 12)
    vectors, (image_ids, listings) = unit_vectors(len(categories), 32, seed=3), listings_for(len(categories), 1)
    for image_id, category in zip(image_ids, categories):
        listings[image_id]["category"] = str(category)
    catalogue = make_catalogue(vectors, image_ids, listings, {}, index_type)
    queries = unit_vectors(5, 32, seed=4)
    rare_rows = np.flatnonzero(categories == "Rare")
    for answer, query in zip(catalogue.search(queries, k=10, category="Rare"), queries):
        assert len(answer) == 10 and {n["category"] for n in answer} == {"Rare"}
        if index_type != "ivfpq":  # exact over the category's photos (8-bit codes rank a little differently)
            best = rare_rows[np.argsort(-(vectors[rare_rows] @ query), kind="stable")[:10]]
            assert [n["image_id"] for n in answer] == [f"img-{row}" for row in best]
    assert all(len(answer) == 12 for answer in catalogue.search(queries, k=20, category="Rare"))  # all there are
    for answer in catalogue.search(queries, k=50, category="Scarce"):  # approximate, widened when it runs out
        assert len(answer) == 50 and {n["category"] for n in answer} == {"Scarce"}
    assert all(len(answer) == 10 for answer in catalogue.search(queries, k=10))


def test_filtered_search_counts_listings_not_photos():
    vectors, catalogue = catalogue_of(3000, "hnsw", photos_per_listing=10)  # 100 listings a category
    for answer in catalogue.search(vectors[:5], k=100, category="Garden"):
        assert len(answer) == 100 and len({n["product_id"] for n in answer}) == 100


def test_save_replaces_a_catalogue_whole_and_a_failed_save_leaves_the_previous_one(tmp_path, monkeypatch):
    folder = tmp_path / "index"
    vectors, first = catalogue_of(50, meta={"run": "first"})
    first.save(folder)
    folder.chmod(0o750)
    catalogue_of(80, seed=1, meta={"run": "second"})[1].save(folder)
    loaded = Catalogue.load(folder)
    assert loaded.meta["run"] == "second" and loaded.index.ntotal == 80
    assert folder.stat().st_mode & 0o777 == 0o750  # the replaced folder's permissions, not mkdtemp's 0o700
    before = loaded.search(vectors[:2], k=5)
    monkeypatch.setattr(ListingTable, "write", Mock(side_effect=OSError("disk full")))  # after the index is written
    with pytest.raises(OSError, match="disk full"):
        first.save(folder)
    assert Catalogue.load(folder).search(vectors[:2], k=5) == before
    assert sorted(path.name for path in tmp_path.iterdir()) == ["index"]  # no temporary folder left
    (tmp_path / "run.json").write_text("{}")
    with pytest.raises(FileExistsError, match="run.json"):
        first.save(tmp_path)
    assert (tmp_path / "run.json").read_text() == "{}"


def test_readers_never_see_a_half_written_catalogue(tmp_path):
    builds = [catalogue_of(n, "hnsw", seed=n, meta={"run": str(n)})[1] for n in (400, 600)]
    builds[0].save(tmp_path / "index")

    def keep_saving():
        for turn in range(10):  # pauses longer than a load takes on a busy machine: LOAD_ATTEMPTS gives up after 4
            builds[turn % 2].save(tmp_path / "index")
            time.sleep(0.15)

    loads = 0
    with ThreadPoolExecutor(1) as pool:
        writer = pool.submit(keep_saving)
        while not writer.done() or loads == 0:
            loaded = Catalogue.load(tmp_path / "index")
            assert loaded.index.ntotal == int(loaded.meta["run"]) == len(loaded.image_ids)
            loads += 1
    writer.result()
    assert loads > 1


def test_a_catalogue_in_the_retired_json_layout_is_refused_and_a_save_replaces_it(tmp_path):
    folder = tmp_path / "index"
    folder.mkdir()
    for name in ("catalogue.faiss", "id_map.json", "listings.json", "index_meta.json"):
        (folder / name).write_text("[]")
    rebuild = r"JSON layout \(id_map.json \+ listings.json\), which is retired: rebuild .*python -m training.index"
    with pytest.raises(ValueError, match=rebuild):
        Catalogue.load(folder)
    from scripts.archive import check_run

    with pytest.raises(ValueError, match=rebuild):  # archiving a run whose index is in that layout
        check_run(tmp_path)
    catalogue_of(10, d=8)[1].save(folder)  # what the rebuild does
    assert sorted(path.name for path in folder.iterdir()) == sorted(search.CATALOGUE_FILES)


def test_files_missing_or_of_another_build_refuse_to_load(tmp_path):
    with pytest.raises(FileNotFoundError, match="catalogue.faiss"):
        Catalogue.load(tmp_path)
    for name, n, seed in (("a", 60, 0), ("b", 61, 2)):
        catalogue_of(n, seed=seed)[1].save(tmp_path / name)
    folder, other = tmp_path / "a", tmp_path / "b"
    shutil.copytree(folder, tmp_path / "kept")
    meta = json.loads((folder / search.META_FILE).read_text())
    (folder / search.META_FILE).write_text(json.dumps({**meta, "files": {}}))
    with pytest.raises(search.CatalogueMismatchError, match=r"listings.arrow does not belong with .*catalogue.faiss"):
        Catalogue.load(folder)
    # another build's index, its hash copied too: the counts still differ
    index_entry = json.loads((other / search.META_FILE).read_text())["files"][search.INDEX_FILE]
    meta["files"][search.INDEX_FILE] = index_entry
    (folder / search.META_FILE).write_text(json.dumps(meta))
    shutil.copy(other / search.INDEX_FILE, folder / search.INDEX_FILE)
    with pytest.raises(search.CatalogueMismatchError,
                       match=r"a/catalogue.faiss holds 61 vectors but .*a/listings.arrow lists 60 image ids"):
        Catalogue.load(folder)
    kept = tmp_path / "kept"
    kept.joinpath(search.INDEX_FILE).write_bytes(b"x" + kept.joinpath(search.INDEX_FILE).read_bytes()[1:])
    with pytest.raises(search.CatalogueMismatchError, match=r"catalogue.faiss does not belong with .*listings.arrow"):
        Catalogue.load(kept)


@pytest.fixture(scope="module")
def ivfpq() -> tuple[Catalogue, np.ndarray, np.ndarray]:
    """(catalogue, vectors, queries): IVF-PQ (re-ranked on 8-bit vectors) over N clustered vectors, one a listing."""
    rng = np.random.default_rng(0)
    centres = rng.normal(size=(40, D))
    vectors = (centres[rng.integers(0, 40, N + 50)] + 0.5 * rng.normal(size=(N + 50, D))).astype(np.float32)
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    catalogue = make_catalogue(vectors[:N], *listings_for(N, photos_per_listing=1), {"run": "test"}, "ivfpq",
                               nlist=32, nprobe=8, pq_m=8)
    return catalogue, vectors[:N], vectors[N:]


def test_ivfpq_recall_against_brute_force(ivfpq):
    catalogue, vectors, queries = ivfpq
    _, rows = catalogue.search_ids(queries, 10)
    assert catalogue.meta["index"]["type"] == "ivfpq"
    assert catalogue.meta["index"]["pq_m"] == 8 and catalogue.meta["index"]["refine"] == "sq8"
    truth = brute_force(vectors, queries, 10)
    assert recall_at_k(rows, truth) >= 0.9
    # without re-ranking, 8-byte PQ codes alone rank worse: the refinement is doing the work
    _, coarse = faiss.downcast_index(faiss.downcast_index(catalogue.index).base_index).search(queries, 10)
    assert recall_at_k(rows, truth) > recall_at_k(coarse, truth)


def test_ivfpq_category_filter_returns_only_that_category(ivfpq):
    catalogue, vectors, queries = ivfpq
    home = catalogue.rows_by_category["Home"]
    _, rows = catalogue.search_ids(queries, 10, category="Home")
    assert set(rows.ravel()) <= set(home.tolist())
    truth = home[brute_force(vectors[home], queries, 10)]
    assert recall_at_k(rows, truth) >= 0.85
    _, exact_rows = catalogue.search_ids(queries, 10, category="Home", exact=True)  # every Home vector (8-bit)
    assert recall_at_k(exact_rows, truth) >= 0.95


def test_ivfpq_saved_loads_memory_mapped_and_answers_the_same(ivfpq, tmp_path):
    catalogue, _, queries = ivfpq
    catalogue.save(tmp_path / "cat")
    loaded = Catalogue.load(tmp_path / "cat")
    assert faiss.extract_index_ivf(loaded.index).nprobe == loaded.meta["index"]["nprobe"] == 8
    assert faiss.downcast_index(loaded.index).k_factor == catalogue.meta["index"]["k_factor"]
    assert loaded.search(queries[:8], k=6) == catalogue.search(queries[:8], k=6)
    assert loaded.search(queries[:3], k=4, category="Music") == catalogue.search(queries[:3], k=4, category="Music")


@pytest.mark.slow
def test_ivfpq_builds_from_a_memmap_in_chunks(ivfpq, tmp_path, monkeypatch):
    catalogue, vectors, queries = ivfpq
    stored = np.lib.format.open_memmap(tmp_path / "v.npy", mode="w+", dtype=np.float32, shape=vectors.shape)
    stored[:] = vectors
    stored.flush()
    monkeypatch.setattr(search, "ADD_CHUNK", 700)
    from_disk, _ = build_index(np.load(tmp_path / "v.npy", mmap_mode="r"), "ivfpq", nlist=32, nprobe=8, pq_m=8)
    assert from_disk.ntotal == N
    np.testing.assert_array_equal(from_disk.search(queries, 10)[1], catalogue.index.search(queries, 10)[1])


def test_ivfpq_nlist_follows_faiss_guideline_of_4_sqrt_n_with_enough_training_vectors():
    for n in (1_000_000, 2_000_000, 10_000_000, 100_000_000):
        nlist = search.ivfpq_nlist(n)
        assert nlist & (nlist - 1) == 0  # a power of two
        assert 4 * np.sqrt(n) / np.sqrt(2) <= nlist <= 4 * np.sqrt(n) * np.sqrt(2)
    assert search.ivfpq_nlist(10_000_000) == 16_384
    assert search.ivfpq_nlist(4000) == 4000 // search.TRAIN_PER_LIST  # 4*sqrt: 256 lists, but 102 have 39 each
    assert search.ivfpq_nlist(20) == 1


def test_hnsw_quantizer_explores_twice_the_probed_lists():
    base = faiss.index_factory(16, "IVF2048_HNSW32,PQ4x8", faiss.METRIC_INNER_PRODUCT)
    index = faiss.IndexRefine(base, faiss.IndexScalarQuantizer(16, faiss.ScalarQuantizer.QT_8bit,
                                                               faiss.METRIC_INNER_PRODUCT))
    quantizer = faiss.downcast_index(faiss.extract_index_ivf(index).quantizer)
    search.set_ivfpq_search(index, 128, 32)
    assert (faiss.extract_index_ivf(index).nprobe, quantizer.hnsw.efSearch, index.k_factor) == (128, 256, 32)
    search.set_ivfpq_search(index, 8, 16)
    assert (faiss.extract_index_ivf(index).nprobe, quantizer.hnsw.efSearch) == (8, 64)
    search.set_ivfpq_search(index, 5000, 16)
    assert faiss.extract_index_ivf(index).nprobe == 2048
