"""The IVF-PQ catalogue index (re-ranked on 8-bit vectors) against brute force on small clustered data:
recall, category filter, save/load memory-mapped, built from a memmap in chunks, chosen by auto."""
import faiss  # noqa: F401  (before torch: both bring an OpenMP runtime, and this order is the safe one)

import numpy as np
import pytest

from marketplace_search import search
from marketplace_search.search import Catalogue, build_index, make_catalogue
from tests.test_search import brute_force, listings_for

N, D = 4000, 32


def clustered(n: int, d: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(40, d))
    vectors = (centres[rng.integers(0, 40, n)] + 0.5 * rng.normal(size=(n, d))).astype(np.float32)
    return vectors / np.linalg.norm(vectors, axis=1, keepdims=True)


def recall(rows: np.ndarray, truth: np.ndarray) -> float:
    return float(np.mean([len(set(r) & set(t)) / len(t) for r, t in zip(rows, truth)]))


@pytest.fixture(scope="module")
def data():
    vectors = clustered(N + 50, D)
    return vectors[:N], vectors[N:]


@pytest.fixture(scope="module")
def catalogue(data) -> Catalogue:
    image_ids, listings = listings_for(N, photos_per_listing=1)
    return make_catalogue(data[0], image_ids, listings, {"run": "test"}, "ivfpq", nlist=32, nprobe=8, pq_m=8)


def test_ivfpq_recall_against_brute_force(catalogue, data):
    vectors, queries = data
    _, rows = catalogue.search_ids(queries, 10)
    assert catalogue.meta["index"]["type"] == "ivfpq"
    assert catalogue.meta["index"]["pq_m"] == 8 and catalogue.meta["index"]["refine"] == "sq8"
    assert recall(rows, brute_force(vectors, queries, 10)) >= 0.9
    # without re-ranking, 8-byte PQ codes alone rank worse: the refinement is doing the work
    base = faiss.downcast_index(faiss.downcast_index(catalogue.index).base_index)
    _, coarse = base.search(queries, 10)
    assert recall(rows, brute_force(vectors, queries, 10)) > recall(coarse, brute_force(vectors, queries, 10))


def test_ivfpq_category_filter_returns_only_that_category(catalogue, data):
    vectors, queries = data
    home = catalogue.rows_by_category["Home"]
    _, rows = catalogue.search_ids(queries, 10, category="Home")
    assert set(rows.ravel()) <= set(home.tolist())
    truth = home[brute_force(vectors[home], queries, 10)]
    assert recall(rows, truth) >= 0.85
    answers = catalogue.search(queries[:5], k=5, category="Garden")
    assert all(len(answer) == 5 and {n["category"] for n in answer} == {"Garden"} for answer in answers)
    _, exact_rows = catalogue.search_ids(queries, 10, category="Home", exact=True)  # every Home vector (8-bit)
    assert recall(exact_rows, truth) >= 0.95


def test_ivfpq_saved_loads_memory_mapped_and_answers_the_same(catalogue, data, tmp_path):
    _, queries = data
    catalogue.save(tmp_path / "cat")
    expected = catalogue.search(queries[:8], k=6)
    loaded = Catalogue.load(tmp_path / "cat")
    assert loaded.meta["index"]["nprobe"] == 8
    assert faiss.extract_index_ivf(loaded.index).nprobe == 8
    assert faiss.downcast_index(loaded.index).k_factor == catalogue.meta["index"]["k_factor"]
    assert loaded.search(queries[:8], k=6) == expected
    assert loaded.search(queries[:3], k=4, category="Music") == catalogue.search(queries[:3], k=4, category="Music")


def test_ivfpq_builds_from_a_memmap_in_chunks(data, tmp_path, monkeypatch):
    vectors, queries = data
    stored = np.lib.format.open_memmap(tmp_path / "v.npy", mode="w+", dtype=np.float32, shape=vectors.shape)
    stored[:] = vectors
    stored.flush()
    monkeypatch.setattr(search, "ADD_CHUNK", 700)
    from_disk, _ = build_index(np.load(tmp_path / "v.npy", mmap_mode="r"), "ivfpq", nlist=32, pq_m=8)
    in_memory, _ = build_index(vectors, "ivfpq", nlist=32, pq_m=8)
    assert from_disk.ntotal == N
    np.testing.assert_array_equal(from_disk.search(queries, 10)[1], in_memory.search(queries, 10)[1])


def test_auto_chooses_ivfpq_above_the_hnsw_range(monkeypatch):
    monkeypatch.setattr(search, "FLAT_MAX", 100)
    monkeypatch.setattr(search, "HNSW_MAX", 500)
    vectors = clustered(501, 16)
    assert build_index(vectors[:500], "auto")[1]["type"] == "hnsw"
    assert build_index(vectors, "auto", nlist=4, pq_m=4)[1]["type"] == "ivfpq"
    with pytest.raises(ValueError, match="does not divide"):
        build_index(vectors, "ivfpq", nlist=4, pq_m=5)


@pytest.mark.parametrize("n", [1_000_000, 2_000_000, 10_000_000, 100_000_000])
def test_ivfpq_nlist_follows_faiss_guideline_of_4_sqrt_n(n):
    nlist = search.ivfpq_nlist(n)
    assert nlist & (nlist - 1) == 0  # a power of two
    assert 4 * np.sqrt(n) / np.sqrt(2) <= nlist <= 4 * np.sqrt(n) * np.sqrt(2)
    assert search.ivfpq_nlist(10_000_000) == 16_384


def test_ivfpq_nlist_leaves_k_means_enough_training_vectors():
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
