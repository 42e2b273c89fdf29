"""The searchable catalogue: a Faiss index over photo embeddings, its id map and listing metadata.

On disk (one folder):
  catalogue.faiss   the Faiss index; int64 id i is row i of the id map
  id_map.json       [image_id, ...]
  listings.json     {image_id: {product_id, title, price, location, category}}
  index_meta.json   dimension, metric, normalisation, index type and parameters, count, and the
                    model checkpoint (path, sha256, version) that made the vectors

Vectors are (n, d) float32, L2-normalised, so inner product is cosine similarity.
"""
import json
import time
from pathlib import Path

import faiss
import numpy as np

from marketplace_search.schema import LISTING_FIELDS

INDEX_FILE = "catalogue.faiss"
ID_MAP_FILE = "id_map.json"
LISTINGS_FILE = "listings.json"
META_FILE = "index_meta.json"
INDEX_TYPES = ("auto", "flat", "hnsw", "hnsw_sq8", "ivf")
# "auto" switches to HNSW above this many vectors: below it an exact search is still well under a
# millisecond, above it exact search grows linearly while HNSW stays flat at full recall
# (README, "Benchmarks", index section).
FLAT_MAX = 20_000
MAX_K = 100


def build_index(vectors: np.ndarray, index_type: str = "auto", *, hnsw_m: int = 32,
                ef_construction: int = 80, ef_search: int = 128, nlist: int | None = None,
                nprobe: int = 16) -> tuple[faiss.Index, dict]:
    """Index (n, d) L2-normalised float32 vectors by inner product; ids are row numbers.

    Returns the index and the parameters it was built with (stored in index_meta.json).
    "hnsw_sq8" is HNSW over 8-bit scalar-quantised vectors: for catalogues whose float32 vectors
    would not fit in memory, at a small cost in recall (scripts.benchmark, index section).
    efSearch 128: the recall@10 target holds with margin at 1M vectors for a fraction of a
    millisecond more than 64 (README, "Benchmarks", index section).
    """
    vectors = _as_queries(vectors)
    n, dimension = vectors.shape
    if index_type not in INDEX_TYPES:
        raise ValueError(f"index_type {index_type!r} is not one of {INDEX_TYPES}")
    if index_type == "auto":
        index_type = "flat" if n <= FLAT_MAX else "hnsw"
    started = time.perf_counter()
    if index_type == "flat":
        index = faiss.IndexFlatIP(dimension)
        params = {}
    elif index_type in ("hnsw", "hnsw_sq8"):
        if index_type == "hnsw":
            index = faiss.IndexHNSWFlat(dimension, hnsw_m, faiss.METRIC_INNER_PRODUCT)
        else:
            # Vectors stored as 8-bit codes (a quarter of the memory), the graph as in "hnsw".
            index = faiss.IndexHNSWSQ(dimension, faiss.ScalarQuantizer.QT_8bit, hnsw_m, faiss.METRIC_INNER_PRODUCT)
            index.train(vectors)
        index.hnsw.efConstruction = ef_construction
        index.hnsw.efSearch = ef_search
        params = {"M": hnsw_m, "efConstruction": ef_construction, "efSearch": ef_search}
    else:
        nlist = nlist or max(1, min(int(4 * np.sqrt(n)), n // 39))
        quantizer = faiss.IndexFlatIP(dimension)
        index = faiss.IndexIVFFlat(quantizer, dimension, nlist, faiss.METRIC_INNER_PRODUCT)
        index.train(vectors)
        index.nprobe = min(nprobe, nlist)
        params = {"nlist": nlist, "nprobe": index.nprobe}
    index.add(vectors)
    params.update(type=index_type, build_seconds=round(time.perf_counter() - started, 3))
    return index, params


def _as_queries(vectors: np.ndarray) -> np.ndarray:
    vectors = np.ascontiguousarray(vectors, dtype=np.float32)
    if vectors.ndim != 2:
        raise ValueError(f"expected an (n, d) array of vectors, got shape {vectors.shape}")
    return vectors


class Catalogue:
    """A loaded index with its id map and listings; `search` answers in listings, not bare ids."""

    def __init__(self, index: faiss.Index, image_ids: list[str], listings: dict[str, dict], meta: dict):
        if index.ntotal != len(image_ids):
            raise ValueError(f"index holds {index.ntotal} vectors but the id map has {len(image_ids)}")
        missing = [image_id for image_id in image_ids if image_id not in listings]
        if missing:
            raise ValueError(f"{len(missing)} indexed photos have no listing metadata, e.g. {missing[0]}")
        self.index = index
        self.image_ids = image_ids
        self.listings = listings
        self.meta = meta
        self.dimension = index.d
        by_category: dict[str, list[int]] = {}
        for row, image_id in enumerate(image_ids):
            by_category.setdefault(listings[image_id]["category"], []).append(row)
        self.rows_by_category = {name: np.array(rows, dtype=np.int64) for name, rows in by_category.items()}

    @classmethod
    def load(cls, directory: Path | str, mmap: bool = False) -> "Catalogue":
        directory = Path(directory)
        for name in (INDEX_FILE, ID_MAP_FILE, LISTINGS_FILE, META_FILE):
            if not (directory / name).is_file():
                raise FileNotFoundError(f"catalogue file {directory / name} is missing")
        flags = faiss.IO_FLAG_MMAP if mmap else 0
        index = faiss.read_index(str(directory / INDEX_FILE), flags)
        meta = json.loads((directory / META_FILE).read_text())
        if "efSearch" in meta.get("index", {}):
            faiss.downcast_index(index).hnsw.efSearch = meta["index"]["efSearch"]
        if "nprobe" in meta.get("index", {}):
            faiss.extract_index_ivf(index).nprobe = meta["index"]["nprobe"]
        return cls(
            index,
            json.loads((directory / ID_MAP_FILE).read_text()),
            json.loads((directory / LISTINGS_FILE).read_text()),
            meta,
        )

    def save(self, directory: Path | str) -> None:
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        faiss.write_index(self.index, str(directory / INDEX_FILE))
        (directory / ID_MAP_FILE).write_text(json.dumps(self.image_ids))
        (directory / LISTINGS_FILE).write_text(json.dumps(self.listings, sort_keys=True, ensure_ascii=False))
        (directory / META_FILE).write_text(json.dumps(self.meta, indent=2, sort_keys=True))

    @property
    def categories(self) -> list[str]:
        return sorted(self.rows_by_category)

    def search_ids(self, queries: np.ndarray, k: int, category: str | None = None) -> tuple[np.ndarray, np.ndarray]:
        """Raw Faiss search over photos: `(D, I)`, each (n, k); I = -1 where fewer than k exist."""
        queries = _as_queries(queries)
        if queries.shape[1] != self.dimension:
            raise ValueError(f"queries have dimension {queries.shape[1]}, the index {self.dimension}")
        params = None
        if category is not None:
            if category not in self.rows_by_category:
                raise KeyError(f"unknown category {category!r}; known: {', '.join(self.categories)}")
            selector = faiss.IDSelectorBatch(self.rows_by_category[category])
            params = _search_parameters(self.index, selector)
        return self.index.search(queries, k, params=params)

    def search(self, queries: np.ndarray, k: int = 10, category: str | None = None,
               exclude_products: list[str | None] | None = None) -> list[list[dict]]:
        """The k nearest listings per query, one entry per listing (its most similar photo).

        Each neighbour is `{image_id, product_id, title, price, location, category, similarity}`.
        `exclude_products[i]` drops that listing from query i's answer (used by evaluation).
        """
        queries = _as_queries(queries)
        if not 1 <= k <= MAX_K:
            raise ValueError(f"k must be between 1 and {MAX_K}, got {k}")
        exclude_products = exclude_products or [None] * len(queries)
        answers: list[list[dict] | None] = [None] * len(queries)
        pending = list(range(len(queries)))
        fetch = min(self.index.ntotal, 3 * k + 8)
        while pending:
            distances, rows = self.search_ids(queries[pending], fetch, category)
            still = []
            for position, query in enumerate(pending):
                neighbours = self._unique_listings(distances[position], rows[position], k, exclude_products[query])
                exhausted = fetch >= self.index.ntotal or rows[position][-1] < 0
                if len(neighbours) < k and not exhausted:
                    still.append(query)
                else:
                    answers[query] = neighbours
            pending = still
            fetch = min(self.index.ntotal, fetch * 4)
        return answers

    def _unique_listings(self, distances, rows, k, exclude_product) -> list[dict]:
        neighbours, seen = [], {exclude_product}
        for similarity, row in zip(distances, rows):
            if row < 0:
                break
            image_id = self.image_ids[row]
            listing = self.listings[image_id]
            if listing["product_id"] in seen:
                continue
            seen.add(listing["product_id"])
            neighbours.append({"image_id": image_id, **{key: listing[key] for key in LISTING_FIELDS},
                               "similarity": round(float(similarity), 6)})
            if len(neighbours) == k:
                break
        return neighbours


def _search_parameters(index: faiss.Index, selector) -> faiss.SearchParameters:
    inner = faiss.downcast_index(index)
    if isinstance(inner, faiss.IndexHNSW):
        return faiss.SearchParametersHNSW(sel=selector, efSearch=inner.hnsw.efSearch)
    if isinstance(inner, faiss.IndexIVF):
        return faiss.SearchParametersIVF(sel=selector, nprobe=inner.nprobe)
    return faiss.SearchParameters(sel=selector)


def make_catalogue(vectors: np.ndarray, image_ids: list[str], listings: dict[str, dict], meta: dict,
                   index_type: str = "auto", **index_options) -> Catalogue:
    """Build the index for `vectors` (row i is `image_ids[i]`) and wrap it with its metadata."""
    vectors = _as_queries(vectors)
    if len(vectors) != len(image_ids):
        raise ValueError(f"{len(vectors)} vectors but {len(image_ids)} image ids")
    norms = np.linalg.norm(vectors, axis=1)
    if len(norms) and not np.allclose(norms, 1.0, atol=1e-3):
        raise ValueError("vectors must be L2-normalised for a cosine (inner product) index")
    index, params = build_index(vectors, index_type, **index_options)
    meta = {**meta, "dimension": int(vectors.shape[1]), "count": len(image_ids), "metric": "inner_product",
            "normalisation": "l2", "similarity": "cosine", "index": params}
    return Catalogue(index, list(image_ids), {i: listings[i] for i in image_ids if i in listings}, meta)
