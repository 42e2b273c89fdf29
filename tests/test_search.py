"""The catalogue index against brute-force search on generated vectors."""
import faiss  # noqa: F401  (before torch, see README: OpenMP)
import numpy as np
import pytest

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


@pytest.mark.parametrize("index_type", ["hnsw", "hnsw_sq8", "ivf"])
def test_approximate_indexes_recall_against_brute_force(index_type):
    vectors, queries = unit_vectors(2000, 16), unit_vectors(50, 16, seed=1)
    index, params = build_index(vectors, index_type, ef_search=128, nprobe=32)
    _, rows = index.search(queries, 10)
    truth = brute_force(vectors, queries, 10)
    recall = np.mean([len(set(r) & set(t)) / 10 for r, t in zip(rows, truth)])
    assert params["type"] == index_type
    assert recall >= 0.9


def test_auto_index_type_follows_catalogue_size(monkeypatch):
    import marketplace_search.search as search

    monkeypatch.setattr(search, "FLAT_MAX", 100)
    assert build_index(unit_vectors(100, 8), "auto")[1]["type"] == "flat"
    assert build_index(unit_vectors(101, 8), "auto")[1]["type"] == "hnsw"


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


@pytest.mark.parametrize("index_type", ["flat", "hnsw", "hnsw_sq8", "ivf"])
def test_search_excludes_own_listing_and_filters_category(index_type):
    vectors = unit_vectors(300, 16)
    image_ids, listings = listings_for(300)
    catalogue = make_catalogue(vectors, image_ids, listings, {}, index_type, nprobe=64)
    own = listings["img-7"]["product_id"]
    excluded = catalogue.search(vectors[7:8], k=5, exclude_products=[own])[0]
    assert own not in {n["product_id"] for n in excluded} and len(excluded) == 5
    music = catalogue.search(vectors[7:8], k=5, category="Music")[0]
    assert len(music) == 5 and {n["category"] for n in music} == {"Music"}
    music_rows = [i for i, image_id in enumerate(image_ids) if listings[image_id]["category"] == "Music"]
    best_music = music_rows[int(np.argmax(vectors[music_rows] @ vectors[7]))]
    assert music[0]["image_id"] == image_ids[best_music]


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


@pytest.mark.parametrize("index_type", ["flat", "hnsw", "hnsw_sq8"])
def test_saved_catalogue_loads_and_answers_the_same(tmp_path, index_type):
    vectors = unit_vectors(200, 16)
    image_ids, listings = listings_for(200)
    catalogue = make_catalogue(vectors, image_ids, listings, {"run": "test"}, index_type)
    catalogue.save(tmp_path)
    for mmap in (False, True):
        loaded = Catalogue.load(tmp_path, mmap=mmap)
        assert loaded.meta["run"] == "test" and loaded.meta["dimension"] == 16
        assert loaded.meta["metric"] == "inner_product" and loaded.meta["normalisation"] == "l2"
        assert loaded.search(vectors[:3], k=4) == catalogue.search(vectors[:3], k=4)


def test_scalar_quantised_hnsw_stores_a_quarter_of_the_vector_bytes():
    vectors = unit_vectors(2000, 64)
    sizes = {}
    for index_type in ("hnsw", "hnsw_sq8"):
        index, _ = build_index(vectors, index_type, hnsw_m=16)
        sizes[index_type] = faiss.serialize_index(index).size
    graph = sizes["hnsw"] - vectors.nbytes  # the links, the same in both
    assert sizes["hnsw_sq8"] - graph == pytest.approx(vectors.nbytes / 4, rel=0.05)


def test_missing_catalogue_file_is_named(tmp_path):
    with pytest.raises(FileNotFoundError, match="catalogue.faiss"):
        Catalogue.load(tmp_path)
