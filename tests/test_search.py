"""The catalogue index against brute-force search on generated vectors."""
import faiss  # noqa: F401  (before torch: both bring an OpenMP runtime, and this order is the safe one)
import json

import numpy as np
import pytest

from marketplace_search import search
from marketplace_search.search import Catalogue, build_index, make_catalogue


def unit_vectors(n: int, d: int, seed: int = 0) -> np.ndarray:
    vectors = np.random.default_rng(seed).normal(size=(n, d)).astype(np.float32)
    return vectors / np.linalg.norm(vectors, axis=1, keepdims=True)


def listings_for(n: int, photos_per_listing: int = 2) -> tuple[list[str], dict]:
    image_ids = [f"img-{i}" for i in range(n)]
    listings = {
        image_id: {"product_id": f"prod-{i // photos_per_listing}", "title": f"title {i}", "price": float(i),
                   "location": "Leeds", "category": ["Home", "Garden", "Music"][(i // photos_per_listing) % 3]}
        for i, image_id in enumerate(image_ids)
    }
    return image_ids, listings


def brute_force(vectors: np.ndarray, queries: np.ndarray, k: int) -> np.ndarray:
    return np.argsort(-(queries @ vectors.T), axis=1, kind="stable")[:, :k]


def test_flat_search_equals_brute_force():
    vectors, queries = unit_vectors(500, 16), unit_vectors(20, 16, seed=1)
    image_ids, listings = listings_for(500)
    catalogue = make_catalogue(vectors, image_ids, listings, {}, "flat")
    distances, rows = catalogue.search_ids(queries, 10)
    np.testing.assert_array_equal(rows, brute_force(vectors, queries, 10))
    np.testing.assert_allclose(distances, np.take_along_axis(queries @ vectors.T, rows, axis=1), rtol=1e-5)


def test_hnsw_recall_against_brute_force():
    vectors, queries = unit_vectors(2000, 16), unit_vectors(50, 16, seed=1)
    index, params = build_index(vectors, "hnsw", ef_search=128)
    _, rows = index.search(queries, 10)
    truth = brute_force(vectors, queries, 10)
    recall = np.mean([len(set(r) & set(t)) / 10 for r, t in zip(rows, truth)])
    assert params["type"] == "hnsw"
    assert recall >= 0.9


def test_auto_index_type_follows_catalogue_size(monkeypatch):
    import marketplace_search.search as search

    monkeypatch.setattr(search, "FLAT_MAX", 100)
    monkeypatch.setattr(search, "FLAT_DIMENSION", 8)
    assert build_index(unit_vectors(100, 8), "auto")[1]["type"] == "flat"
    assert build_index(unit_vectors(101, 8), "auto")[1]["type"] == "hnsw"
    assert build_index(unit_vectors(100, 4), "auto")[1]["type"] == "flat"  # shorter vectors: no more than FLAT_MAX
    assert build_index(unit_vectors(101, 4), "auto")[1]["type"] == "hnsw"
    # longer vectors: an exact search reads every float, so as many floats in all (100 x 8 = 50 x 16)
    assert build_index(unit_vectors(50, 16), "auto")[1]["type"] == "flat"
    assert build_index(unit_vectors(51, 16), "auto")[1]["type"] == "hnsw"


def test_auto_keeps_exact_search_to_as_many_floats_for_longer_vectors():
    import marketplace_search.search as search

    assert search.flat_max(64) == search.flat_max(256) == 20_000
    assert search.flat_max(1536) == 3_333  # the search vector (embedding + features): 10k photos get HNSW


def test_search_answers_one_entry_per_listing_best_photo_first():
    vectors = unit_vectors(300, 16)
    image_ids, listings = listings_for(300)
    catalogue = make_catalogue(vectors, image_ids, listings, {}, "flat")
    query = vectors[7:8]
    neighbours = catalogue.search(query, k=10)[0]
    products = [n["product_id"] for n in neighbours]
    assert len(products) == len(set(products)) == 10
    assert neighbours[0]["image_id"] == "img-7" and neighbours[0]["similarity"] == pytest.approx(1.0, abs=1e-5)
    # each listing is represented by its most similar photo, in brute-force order of listings
    order = brute_force(vectors, query, 300)[0]
    expected, seen = [], set()
    for row in order:
        product = listings[image_ids[row]]["product_id"]
        if product not in seen:
            seen.add(product)
            expected.append(image_ids[row])
    assert [n["image_id"] for n in neighbours] == expected[:10]
    assert set(neighbours[0]) == {"image_id", "product_id", "title", "price", "location", "category", "similarity"}


@pytest.mark.parametrize("index_type", ["flat", "hnsw"])
def test_search_excludes_own_listing_and_filters_category(index_type):
    vectors = unit_vectors(300, 16)
    image_ids, listings = listings_for(300)
    catalogue = make_catalogue(vectors, image_ids, listings, {}, index_type)
    own = listings["img-7"]["product_id"]
    excluded = catalogue.search(vectors[7:8], k=5, exclude_products=[own])[0]
    assert own not in {n["product_id"] for n in excluded} and len(excluded) == 5
    music = catalogue.search(vectors[7:8], k=5, category="Music")[0]
    assert len(music) == 5 and {n["category"] for n in music} == {"Music"}
    music_rows = [i for i, image_id in enumerate(image_ids) if listings[image_id]["category"] == "Music"]
    best_music = music_rows[int(np.argmax(vectors[music_rows] @ vectors[7]))]
    assert music[0]["image_id"] == image_ids[best_music]


@pytest.mark.parametrize("index_type,saved", [("flat", False), ("hnsw", False), ("ivfpq", True)])
def test_listings_of_gives_each_listing_its_photo_nearest_the_query(tmp_path, index_type, saved):
    """Listings found another way (by words) answered as a search would: best photo, its exact cosine."""
    vectors, query = unit_vectors(1200, 16), unit_vectors(1, 16, seed=1)[0]
    image_ids, listings = listings_for(1200, photos_per_listing=3)
    catalogue = make_catalogue(vectors, image_ids, listings, {}, index_type, nlist=8, pq_m=4)
    if saved:  # the listings table (Arrow) of a saved catalogue instead of the dicts
        catalogue.save(tmp_path / "catalogue")
        catalogue = Catalogue.load(tmp_path / "catalogue")
    wanted = ["prod-5", "prod-17", "prod-300", "no-such-listing"]
    found = catalogue.listings_of(wanted, query)
    assert list(found) == ["prod-5", "prod-17", "prod-300"]  # in row order; an unknown listing left out
    tolerance = 0.02 if index_type == "ivfpq" else 1e-5  # decoded from 8-bit codes there
    for product_id, entry in found.items():
        rows = [3 * int(product_id.split("-")[1]) + i for i in range(3)]
        best = max(rows, key=lambda row: float(vectors[row] @ query))
        assert entry["image_id"] == image_ids[best] or abs(
            entry["similarity"] - float(vectors[best] @ query)) < tolerance  # (a near tie decoded the other way)
        assert entry["similarity"] == pytest.approx(float(vectors[best] @ query), abs=tolerance)
        assert {key: entry[key] for key in ("title", "price", "category")} == {
            key: listings[entry["image_id"]][key] for key in ("title", "price", "category")}
    assert set(catalogue.listings_of(wanted, query, category="Home")) == {"prod-300"}  # listing n: n % 3
    assert set(catalogue.without_products({"prod-17"}).listings_of(wanted, query)) == {"prod-5", "prod-300"}
    first = catalogue.listings_of(["prod-300"])["prod-300"]  # no query: the first photo, no similarity
    assert first["image_id"] == "img-900" and "similarity" not in first


def test_search_returns_fewer_when_catalogue_is_small():
    vectors = unit_vectors(6, 8)
    image_ids, listings = listings_for(6)
    catalogue = make_catalogue(vectors, image_ids, listings, {}, "flat")
    assert len(catalogue.search(vectors[:1], k=10)[0]) == 3


def test_bad_arguments_fail_with_a_message():
    vectors = unit_vectors(10, 8)
    image_ids, listings = listings_for(10)
    catalogue = make_catalogue(vectors, image_ids, listings, {}, "flat")
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


@pytest.mark.parametrize("index_type", ["flat", "hnsw"])
def test_saved_catalogue_loads_and_answers_the_same(tmp_path, index_type):
    vectors = unit_vectors(200, 16)
    image_ids, listings = listings_for(200)
    catalogue = make_catalogue(vectors, image_ids, listings, {"run": "test"}, index_type)
    catalogue.save(tmp_path)
    loaded = Catalogue.load(tmp_path)
    assert loaded.meta["run"] == "test" and loaded.meta["dimension"] == 16
    assert loaded.meta["metric"] == "inner_product" and loaded.meta["normalisation"] == "l2"
    assert loaded.search(vectors[:3], k=4) == catalogue.search(vectors[:3], k=4)


def test_missing_catalogue_file_is_named(tmp_path):
    with pytest.raises(FileNotFoundError, match="catalogue.faiss"):
        Catalogue.load(tmp_path)


def rare_category_catalogue(index_type: str, others: int = 20_000, rare: int = 12, scarce: int = 300):
    """OTHERS photos of three common categories, SCARCE of "Scarce" and RARE of "Rare"; one photo a listing."""
    vectors = unit_vectors(others + scarce + rare, 32, seed=3)
    image_ids = [f"img-{i}" for i in range(len(vectors))]
    categories = ["Home", "Garden", "Music"] * (others // 3 + 1)
    categories = categories[:others] + ["Scarce"] * scarce + ["Rare"] * rare
    listings = {image_id: {"product_id": f"prod-{i}", "title": f"title {i}", "price": 1.0, "location": "Leeds",
                           "category": category} for i, (image_id, category) in enumerate(zip(image_ids, categories))}
    return vectors, make_catalogue(vectors, image_ids, listings, {}, index_type), np.array(categories)


@pytest.mark.parametrize("index_type", ["hnsw", "ivfpq"])
def test_filtered_search_of_a_rare_category_finds_k_of_it(index_type):
    vectors, catalogue, categories = rare_category_catalogue(index_type)
    queries = unit_vectors(5, 32, seed=4)
    rare_rows = np.flatnonzero(categories == "Rare")
    for answer, query in zip(catalogue.search(queries, k=10, category="Rare"), queries):
        assert len(answer) == 10 and {n["category"] for n in answer} == {"Rare"}
        if index_type != "ivfpq":  # exact over the category's photos (8-bit codes rank a little differently)
            best = rare_rows[np.argsort(-(vectors[rare_rows] @ query), kind="stable")[:10]]
            assert [n["image_id"] for n in answer] == [f"img-{row}" for row in best]
    everything = catalogue.search(queries, k=20, category="Rare")
    assert all(len(answer) == 12 for answer in everything)  # all there are, and no more
    for answer in catalogue.search(queries, k=50, category="Scarce"):  # approximate, widened when it runs out
        assert len(answer) == 50 and {n["category"] for n in answer} == {"Scarce"}
    unfiltered = catalogue.search(queries, k=10)
    assert all(len(answer) == 10 for answer in unfiltered)


def test_filtered_search_counts_listings_not_photos():
    vectors = unit_vectors(3000, 16)
    image_ids, listings = listings_for(3000, photos_per_listing=10)  # 100 listings a category
    catalogue = make_catalogue(vectors, image_ids, listings, {}, "hnsw")
    for answer in catalogue.search(vectors[:5], k=100, category="Garden"):
        assert len(answer) == 100 and len({n["product_id"] for n in answer}) == 100


def saved(tmp_path, name: str, n: int, seed: int):
    vectors = unit_vectors(n, 16, seed=seed)
    image_ids, listings = listings_for(n)
    image_ids = image_ids[::-1] if seed % 2 else image_ids  # another build: another row order
    catalogue = make_catalogue(vectors, image_ids, listings, {"run": name}, "flat")
    catalogue.save(tmp_path / name)
    return tmp_path / name, vectors


def test_save_replaces_an_existing_catalogue_whole(tmp_path):
    folder, _ = saved(tmp_path, "index", 50, seed=0)
    folder.chmod(0o750)
    make_catalogue(unit_vectors(80, 16, seed=1), *listings_for(80), {"run": "second"}, "flat").save(folder)
    loaded = Catalogue.load(folder)
    assert loaded.meta["run"] == "second" and loaded.index.ntotal == 80
    assert sorted(path.name for path in tmp_path.iterdir()) == ["index"]  # no temporary folder left
    assert folder.stat().st_mode & 0o777 == 0o750  # the replaced folder's permissions, not mkdtemp's 0o700


def test_failed_save_leaves_the_previous_catalogue(tmp_path):
    folder, vectors = saved(tmp_path, "index", 50, seed=0)
    before = Catalogue.load(folder).search(vectors[:2], k=5)
    image_ids, listings = listings_for(80)
    listings["img-3"]["price"] = {1.0}  # not a price: fails after the index is written
    broken = make_catalogue(unit_vectors(80, 16, seed=1), image_ids, listings, {"run": "broken"}, "flat")
    with pytest.raises(ValueError, match="Could not convert"):
        broken.save(folder)
    assert Catalogue.load(folder).search(vectors[:2], k=5) == before
    assert sorted(path.name for path in tmp_path.iterdir()) == ["index"]


def test_save_refuses_to_replace_a_folder_that_is_not_a_catalogue(tmp_path):
    (tmp_path / "run.json").write_text("{}")
    catalogue = make_catalogue(unit_vectors(10, 8), *listings_for(10), {}, "flat")
    with pytest.raises(FileExistsError, match="run.json"):
        catalogue.save(tmp_path)
    assert (tmp_path / "run.json").read_text() == "{}"


def test_readers_never_see_a_half_written_catalogue(tmp_path):
    import threading
    import time

    builds = [make_catalogue(unit_vectors(n, 16, seed=n), *listings_for(n), {"run": str(n)}, "hnsw")
              for n in (400, 600)]
    builds[0].save(tmp_path / "index")
    done = threading.Event()

    def keep_saving():
        for turn in range(20):
            builds[turn % 2].save(tmp_path / "index")
            time.sleep(0.05)
        done.set()

    writer = threading.Thread(target=keep_saving)
    writer.start()
    loads = 0
    try:
        while not done.is_set() or loads == 0:
            loaded = Catalogue.load(tmp_path / "index")
            assert loaded.index.ntotal == int(loaded.meta["run"]) == len(loaded.image_ids)
            loads += 1
    finally:
        writer.join()
    assert loads > 1


def test_a_catalogue_in_the_retired_json_layout_is_refused_and_a_save_replaces_it(tmp_path):
    folder = tmp_path / "index"
    folder.mkdir()
    for name in ("catalogue.faiss", "id_map.json", "listings.json", "index_meta.json"):
        (folder / name).write_text("[]")
    rebuild = r"JSON layout \(id_map.json \+ listings.json\), which is retired: rebuild .*python -m training.index"
    with pytest.raises(ValueError, match=rebuild):
        Catalogue.load(folder)
    with pytest.raises(ValueError, match=rebuild):
        search.read_listings(folder)
    from scripts.archive import check_run

    with pytest.raises(ValueError, match=rebuild):  # archiving a run whose index is in that layout
        check_run(tmp_path)
    make_catalogue(unit_vectors(10, 8), *listings_for(10), {}, "flat").save(folder)  # what the rebuild does
    assert sorted(path.name for path in folder.iterdir()) == sorted(search.CATALOGUE_FILES)


def test_index_meta_without_hashes_refuses_and_counts_are_checked(tmp_path):
    folder, _ = saved(tmp_path, "a", 60, seed=0)
    other, _ = saved(tmp_path, "b", 61, seed=2)
    meta = json.loads((folder / "index_meta.json").read_text())
    (folder / "index_meta.json").write_text(json.dumps({**meta, "files": {}}))
    with pytest.raises(search.CatalogueMismatchError, match=r"listings.arrow does not belong with .*catalogue.faiss"):
        Catalogue.load(folder)
    # another build's index, its hash copied too: the counts still differ
    index_entry = json.loads((other / "index_meta.json").read_text())["files"]["catalogue.faiss"]
    (folder / "index_meta.json").write_text(json.dumps({**meta, "files": {**meta["files"], "catalogue.faiss": index_entry}}))
    (folder / "catalogue.faiss").write_bytes((other / "catalogue.faiss").read_bytes())
    with pytest.raises(search.CatalogueMismatchError,
                       match=r"a/catalogue.faiss holds 61 vectors but .*a/listings.arrow lists 60 image ids"):
        Catalogue.load(folder)
