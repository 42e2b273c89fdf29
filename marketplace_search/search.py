"""The searchable catalogue: a Faiss index over (n, d) float32 L2-normalised photo vectors (inner product =
cosine) with its listings table, saved as one folder written whole beside its place and renamed into it:
catalogue.faiss (id i is row i of listings.arrow), listings.arrow and index_meta.json (dimension, metric, index
parameters, the checkpoint that made the vectors, and the sha256 of the other two files, so that files of
different builds refuse to load)."""
import copy
import json
import time
from pathlib import Path

import faiss
import numpy as np

from marketplace_search.columns import ImageIds, Listings, ListingTable
from marketplace_search.files import folder_replaced_atomically, path_identity, sha256_file
from marketplace_search.schema import LISTING_FIELDS

INDEX_FILE = "catalogue.faiss"
LISTING_TABLE_FILE = "listings.arrow"
META_FILE = "index_meta.json"
INDEX_TYPES = ("auto", "flat", "hnsw", "ivfpq")
# "auto" searches up to this many FLAT_DIMENSION-d vectors exactly (flat_max); above, HNSW is faster at full recall.
FLAT_MAX = 20_000
FLAT_DIMENSION = 256
# Above it "auto" builds "ivfpq": HNSW would be copied into every worker, IVF-PQ's codes are mapped and shared.
HNSW_MAX = 2_000_000
# "ivfpq" search defaults that reach the recall target at 10M vectors, with a margin for real embeddings.
IVFPQ_NPROBE = 32
IVFPQ_K_FACTOR = 16
TRAIN_PER_LIST = 39  # Faiss warns below 39 training vectors per k-means centroid
ADD_CHUNK = 200_000  # vectors added per call: a memory-mapped (n, d) array is never copied whole
MAX_K = 100
CATALOGUE_FILES = (INDEX_FILE, LISTING_TABLE_FILE, META_FILE)
RETIRED_FILES = ("id_map.json", "listings.json")  # the retired JSON layout's: a save replaces such a folder
LOAD_ATTEMPTS = 4  # a save that replaces the folder while it is being read: read the new one whole


class CatalogueMismatchError(ValueError):
    """The files of a catalogue folder come from different builds."""


def build_index(vectors: np.ndarray, index_type: str = "auto", *, hnsw_m: int = 32, ef_construction: int = 80,
                ef_search: int = 128, nlist: int | None = None, nprobe: int | None = None, pq_m: int | None = None,
                k_factor: int = IVFPQ_K_FACTOR, seed: int = 0) -> tuple[faiss.Index, dict]:
    """Index (n, d) L2-normalised float32 vectors by inner product, ids = rows; returns the index and the
    parameters it was built with. VECTORS may be memory-mapped: it is added in chunks, trained on a sample.
    "ivfpq": IVF over PQ codes of PQ_M bytes whose K_FACTOR * k best candidates are re-ranked on 8-bit vectors."""
    vectors = _as_queries(vectors)
    n, dimension = vectors.shape
    if index_type not in INDEX_TYPES:
        raise ValueError(f"index_type {index_type!r} is not one of {INDEX_TYPES}")
    if index_type == "auto":
        index_type = "flat" if n <= flat_max(dimension) else "hnsw" if n <= HNSW_MAX else "ivfpq"
    started = time.perf_counter()
    if index_type == "flat":
        index = faiss.IndexFlatIP(dimension)
        params = {}
    elif index_type == "hnsw":
        index = faiss.IndexHNSWFlat(dimension, hnsw_m, faiss.METRIC_INNER_PRODUCT)
        index.hnsw.efConstruction = ef_construction
        index.hnsw.efSearch = ef_search
        params = {"M": hnsw_m, "efConstruction": ef_construction, "efSearch": ef_search}
    else:
        index, params = _ivfpq_index(vectors, nlist, nprobe, pq_m, k_factor, seed)
    for start in range(0, n, ADD_CHUNK):
        index.add(np.ascontiguousarray(vectors[start:start + ADD_CHUNK], dtype=np.float32))
    params.update(type=index_type, build_seconds=round(time.perf_counter() - started, 3))
    return index, params


def flat_max(dimension: int) -> int:
    """The most vectors of DIMENSION floats "auto" still searches exactly (as many floats as FLAT_MAX's)."""
    return FLAT_MAX * FLAT_DIMENSION // max(dimension, FLAT_DIMENSION)


def ivfpq_nlist(n: int) -> int:
    """Inverted lists for N vectors: the power of two nearest 4 * sqrt(N) (the low end of Faiss's guideline:
    fewer, longer lists miss the recall target), each list trained on TRAIN_PER_LIST+ vectors."""
    return int(max(1, min(2 ** round(np.log2(max(4 * np.sqrt(n), 1))), n // TRAIN_PER_LIST)))


def _ivfpq_index(vectors: np.ndarray, nlist: int | None, nprobe: int | None, pq_m: int | None,
                 k_factor: int, seed: int) -> tuple[faiss.Index, dict]:
    n, dimension = vectors.shape
    nlist = nlist or ivfpq_nlist(n)
    pq_m = pq_m or max(1, dimension // 8)
    if dimension % pq_m:
        raise ValueError(f"pq_m {pq_m} does not divide the dimension {dimension}")
    # An HNSW graph over the centroids assigns each vector to its list in microseconds at any nlist.
    quantizer = "_HNSW32" if nlist >= 1024 else ""
    base = faiss.index_factory(dimension, f"IVF{nlist}{quantizer},PQ{pq_m}x8", faiss.METRIC_INNER_PRODUCT)
    refine = faiss.IndexScalarQuantizer(dimension, faiss.ScalarQuantizer.QT_8bit, faiss.METRIC_INNER_PRODUCT)
    base.do_polysemous_training = False  # slow, and only for polysemous search
    index = faiss.IndexRefine(base, refine)
    # k-means and the PQ codebooks converge on a sample: TRAIN_PER_LIST vectors per list, 256+ per PQ code.
    size = min(n, max(TRAIN_PER_LIST * nlist, 256 * 64))
    rows = np.sort(np.random.default_rng(seed).choice(n, size, replace=False)) if size < n else slice(None)
    index.train(np.ascontiguousarray(vectors[rows], dtype=np.float32))
    set_ivfpq_search(index, nprobe or IVFPQ_NPROBE, k_factor)
    return index, {"nlist": nlist, "nprobe": faiss.extract_index_ivf(index).nprobe, "pq_m": pq_m,
                   "k_factor": k_factor, "refine": "sq8", "quantizer": "hnsw" if quantizer else "flat"}


def set_ivfpq_search(index: faiss.Index, nprobe: int, k_factor: int) -> None:
    """Probe NPROBE lists and re-rank K_FACTOR * k candidates; an HNSW coarse quantizer explores
    2 * NPROBE centroids (64 at least) so that it finds the NPROBE nearest lists."""
    ivf = faiss.extract_index_ivf(index)
    ivf.nprobe = min(nprobe, ivf.nlist)
    faiss.downcast_index(index).k_factor = k_factor
    quantizer = faiss.downcast_index(ivf.quantizer)
    if isinstance(quantizer, faiss.IndexHNSW):
        quantizer.hnsw.efSearch = max(64, 2 * ivf.nprobe)


def _as_queries(vectors: np.ndarray) -> np.ndarray:
    vectors = np.ascontiguousarray(vectors, dtype=np.float32)
    if vectors.ndim != 2:
        raise ValueError(f"expected an (n, d) array of vectors, got shape {vectors.shape}")
    return vectors


class Catalogue:
    """An index with its listings table (row i: index id i); `search` answers in listings, not bare ids."""

    def __init__(self, index: faiss.Index, table: ListingTable, meta: dict):
        if index.ntotal != len(table):
            raise ValueError(f"index holds {index.ntotal} vectors but the listings table has {len(table)} rows")
        self.index = index
        self.table = table
        self.image_ids = ImageIds(table)
        self.listings = Listings(table)
        self.meta = meta
        self.dimension = index.d
        self.rows_by_category = table.rows_by_category()
        self._selectors: dict[str, faiss.IDSelector] = {}
        self.visible = index.ntotal  # photos a search can return (fewer in a view made by `without_products`)
        self._visible_rows = None  # (bitmap, selector) of those photos in such a view

    def without_products(self, product_ids) -> "Catalogue":
        """A view sharing this catalogue's index whose searches leave out PRODUCT_IDS' photos, filtered inside the
        Faiss search so that k answers remain whenever k listings are left."""
        hidden = self.table.rows_of_products(product_ids)
        view = copy.copy(self)
        view._selectors = {}
        if not len(hidden):
            return view
        shown = np.ones(self.index.ntotal, dtype=bool)
        shown[hidden] = False
        view.rows_by_category = {name: rows[shown[rows]] for name, rows in self.rows_by_category.items()}
        bitmap = np.packbits(shown, bitorder="little")
        view._visible_rows = (bitmap, faiss.IDSelectorBitmap(len(shown), faiss.swig_ptr(bitmap)))
        view.visible = int(shown.sum())
        return view

    @classmethod
    def load(cls, directory: Path | str) -> "Catalogue":
        """Load a folder written by `save`; refuses files of different builds (CatalogueMismatchError).
        The listings table and an "ivfpq" index are memory-mapped read-only: the workers of a host share them."""
        directory = Path(directory)
        for attempt in range(1, LOAD_ATTEMPTS + 1):
            identity = path_identity(directory)
            try:
                catalogue = cls._load_files(directory)
            except (OSError, RuntimeError, ValueError):  # Faiss reports a vanished file as a RuntimeError
                # Unless a save replaced the folder while we read it, the error is the folder's own.
                if attempt == LOAD_ATTEMPTS or (identity is not None and path_identity(directory) == identity):
                    raise
            else:
                if identity is not None and path_identity(directory) == identity:
                    return catalogue
            time.sleep(0.05)
        raise RuntimeError(f"{directory} was replaced {LOAD_ATTEMPTS} times while being read")

    @classmethod
    def _load_files(cls, directory: Path) -> "Catalogue":
        check_layout(directory)
        for name in CATALOGUE_FILES:
            if not (directory / name).is_file():
                raise FileNotFoundError(f"catalogue file {directory / name} is missing")
        meta = json.loads((directory / META_FILE).read_text())
        for name, other in ((LISTING_TABLE_FILE, INDEX_FILE), (INDEX_FILE, LISTING_TABLE_FILE)):
            sha256, expected = sha256_file(directory / name), meta.get("files", {}).get(name, {}).get("sha256")
            if expected != sha256:
                raise CatalogueMismatchError(
                    f"{directory / name} does not belong with {directory / other}: its sha256 is {sha256[:12]}, but "
                    f"{directory / META_FILE} records {str(expected)[:12]} for the {name} built with them. The files "
                    f"come from different builds (copy or replace a catalogue folder whole, never single files); "
                    f"rebuild it")
        params = meta.get("index", {})
        mmap = faiss.IO_FLAG_MMAP_IFC | faiss.IO_FLAG_READ_ONLY  # IO_FLAG_MMAP would map the IVF lists only
        index = faiss.read_index(str(directory / INDEX_FILE), mmap if params.get("type") == "ivfpq" else 0)
        table = ListingTable.open(directory / LISTING_TABLE_FILE)
        if index.ntotal != len(table):
            raise CatalogueMismatchError(
                f"{directory / INDEX_FILE} holds {index.ntotal} vectors but {directory / LISTING_TABLE_FILE} lists "
                f"{len(table)} image ids: they come from different builds; rebuild the catalogue")
        if "efSearch" in params:
            faiss.downcast_index(index).hnsw.efSearch = params["efSearch"]
        if params.get("type") == "ivfpq":
            set_ivfpq_search(index, params["nprobe"], params["k_factor"])
        return cls(index, table, meta)

    def save(self, directory: Path | str) -> None:
        """Write the folder atomically: readers see the previous catalogue or this one, never a mix. An existing
        catalogue folder is replaced; a folder holding anything else is refused."""
        directory = Path(directory)
        if directory.exists() and not directory.is_dir():
            raise NotADirectoryError(f"{directory} is a file, not a catalogue folder")
        if directory.is_dir():
            others = sorted({path.name for path in directory.iterdir()} - {*CATALOGUE_FILES, *RETIRED_FILES})
            if others:
                raise FileExistsError(f"{directory} holds files that are not a catalogue's ({', '.join(others[:5])}): "
                                      f"refusing to replace it; save into a folder of its own")
        with folder_replaced_atomically(directory) as staging:
            faiss.write_index(self.index, str(staging / INDEX_FILE))
            self.table.write(staging / LISTING_TABLE_FILE)
            files = {name: {"sha256": sha256_file(staging / name), "bytes": (staging / name).stat().st_size}
                     for name in CATALOGUE_FILES if name != META_FILE}
            self.meta = {**self.meta, "files": files}
            (staging / META_FILE).write_text(json.dumps(self.meta, indent=2, sort_keys=True))

    @property
    def categories(self) -> list[str]:
        return sorted(self.rows_by_category)

    def search_ids(self, queries: np.ndarray, k: int, category: str | None = None,
                   exact: bool = False) -> tuple[np.ndarray, np.ndarray]:
        """Raw Faiss search over photos: `(D, I)`, each (n, k); I = -1 where fewer than k were found.
        `exact` compares with every vector (of CATEGORY) instead of the HNSW graph's or IVF's candidates."""
        queries = _as_queries(queries)
        if queries.shape[1] != self.dimension:
            raise ValueError(f"queries have dimension {queries.shape[1]}, the index {self.dimension}")
        selector = self._selector(category)
        if exact:
            return _row_vectors(self.index).search(queries, k, params=None if selector is None else
                                                   faiss.SearchParameters(sel=selector))
        params = None if selector is None else _search_parameters(self.index, selector)
        return self.index.search(queries, k, params=params)

    def _category_rows(self, category: str) -> np.ndarray:
        if category not in self.rows_by_category:
            raise KeyError(f"unknown category {category!r}; known: {', '.join(self.categories)}")
        return self.rows_by_category[category]

    def _selector(self, category: str | None) -> faiss.IDSelector | None:
        if category is None:  # every photo, or every visible one in a view
            return None if self._visible_rows is None else self._visible_rows[1]
        if category not in self._selectors:  # built once: a hash set of the category's rows
            self._selectors[category] = faiss.IDSelectorBatch(self._category_rows(category))
        return self._selectors[category]

    def search(self, queries: np.ndarray, k: int = 10, category: str | None = None,
               exclude_products: list[str | None] | None = None) -> list[list[dict]]:
        """The k nearest listings per query (schema.Neighbour), one per listing (its most similar photo); fewer
        only when the catalogue (or CATEGORY) has fewer: an approximate search that runs out of candidates is
        repeated exactly. `exclude_products[i]` drops that listing from query i's answer (evaluation)."""
        queries = _as_queries(queries)
        if not 1 <= k <= MAX_K:
            raise ValueError(f"k must be between 1 and {MAX_K}, got {k}")
        available = self.visible if category is None else len(self._category_rows(category))
        exclude_products = exclude_products or [None] * len(queries)
        if not available:  # every listing (of CATEGORY) removed
            return [[] for _ in queries]
        answers: list[list[dict] | None] = [None] * len(queries)
        pending = list(range(len(queries)))
        fetch = min(available, 3 * k + 8)
        exact = fetch >= available  # every photo is wanted: an exact pass is complete and no slower
        while pending:
            distances, rows = self.search_ids(queries[pending], fetch, category, exact)
            still, ran_out = [], False
            for position, query in enumerate(pending):
                neighbours = self._unique_listings(distances[position], rows[position], k, exclude_products[query])
                short = rows[position][-1] < 0
                if len(neighbours) == k or (fetch >= available and (exact or not short)):
                    answers[query] = neighbours
                else:
                    still.append(query)
                    ran_out |= bool(short)
            pending = still
            if ran_out:
                exact = True  # the graph or the probed lists held too few: widen to all the category's photos
            else:
                fetch = min(available, fetch * 4)  # more photos per listing than expected
        return answers

    def listings_of(self, product_ids: list[str], query: np.ndarray | None = None,
                    category: str | None = None) -> dict[str, dict]:
        """The answer entry, as `search` gives it, of each of PRODUCT_IDS this catalogue (or view, in CATEGORY)
        shows: with QUERY, its photo most similar to it and that cosine; without, its first photo."""
        rows = self.table.rows_of_products(product_ids)
        if self._visible_rows is not None and len(rows):
            bitmap = self._visible_rows[0]
            rows = rows[((bitmap[rows >> 3] >> (rows & 7)) & 1).astype(bool)]
        similarities = None
        if query is not None and len(rows):
            # 8-bit codes decoded where the index keeps codes
            similarities = _row_vectors(self.index).reconstruct_batch(rows) @ np.asarray(query, np.float32).reshape(-1)
        entries: dict[str, dict] = {}
        for position, row in enumerate(rows.tolist()):
            image_id, listing = self.table.image_id(row), self.table.listing(row)
            if category is not None and listing["category"] != category:
                continue
            similarity = None if similarities is None else round(float(similarities[position]), 6)
            product_id = listing["product_id"]
            if product_id not in entries or (similarity is not None and similarity > entries[product_id]["similarity"]):
                entries[product_id] = _answer_entry(image_id, listing, similarity)
        return entries

    def _unique_listings(self, distances, rows, k, exclude_product) -> list[dict]:
        neighbours, seen = [], {exclude_product}
        for similarity, row in zip(distances, rows):
            if row < 0:
                break
            listing = self.table.listing(int(row))
            if listing["product_id"] in seen:
                continue
            seen.add(listing["product_id"])
            neighbours.append(_answer_entry(self.table.image_id(int(row)), listing, round(float(similarity), 6)))
            if len(neighbours) == k:
                break
        return neighbours


def _search_parameters(index: faiss.Index, selector) -> faiss.SearchParameters:
    inner = faiss.downcast_index(index)
    if isinstance(inner, faiss.IndexRefine):  # the selector filters the candidates; re-ranking keeps them
        parameters = faiss.IndexRefineSearchParameters(k_factor=inner.k_factor)
        parameters.base_index_params = _search_parameters(inner.base_index, selector)
        parameters.keep_alive = parameters.base_index_params  # faiss holds a bare pointer to it
        return parameters
    if isinstance(inner, faiss.IndexHNSW):
        return faiss.SearchParametersHNSW(sel=selector, efSearch=inner.hnsw.efSearch)
    if isinstance(inner, faiss.IndexIVF):
        return faiss.SearchParametersIVF(sel=selector, nprobe=inner.nprobe)
    return faiss.SearchParameters(sel=selector)


def _answer_entry(image_id: str, listing: dict, similarity: float | None) -> dict:
    """One neighbour of an answer (schema.Neighbour): the photo, its listing's fields, the similarity if any."""
    return {"image_id": image_id, **{key: listing[key] for key in LISTING_FIELDS},
            **({} if similarity is None else {"similarity": similarity})}


def _row_vectors(index: faiss.Index) -> faiss.Index:
    """The part of INDEX holding one vector per row: IVF-PQ's re-ranking vectors, HNSW's storage, or itself."""
    inner = faiss.downcast_index(index)
    if isinstance(inner, faiss.IndexRefine):
        return faiss.downcast_index(inner.refine_index)
    if isinstance(inner, faiss.IndexHNSW):
        return faiss.downcast_index(inner.storage)
    return inner


def check_layout(directory: Path | str) -> None:
    """Refuse a folder saved in the retired JSON layout, saying how to rebuild it."""
    directory = Path(directory)
    if not (directory / LISTING_TABLE_FILE).exists() and (directory / RETIRED_FILES[0]).is_file():
        raise ValueError(
            f"{directory} holds a catalogue in the JSON layout ({' + '.join(RETIRED_FILES)}), which is retired: "
            f"rebuild the run's index with `python -m training.index --work WORK --run RUN`, then archive it again "
            f"(`python -m scripts.archive --run RUN`) or reseed the live catalogue "
            f"(`python -m scripts.catalogue --live LIVE init --run RUN --force`)")


def make_catalogue(vectors: np.ndarray, image_ids: list[str], listings: dict[str, dict], meta: dict,
                   index_type: str = "auto", **index_options) -> Catalogue:
    """Build the index for `vectors` (row i is `image_ids[i]`, described by `listings[image_ids[i]]`)."""
    vectors = _as_queries(vectors)
    if len(vectors) != len(image_ids):
        raise ValueError(f"{len(vectors)} vectors but {len(image_ids)} image ids")
    norms = np.concatenate([np.linalg.norm(vectors[start:start + ADD_CHUNK], axis=1)
                            for start in range(0, len(vectors), ADD_CHUNK)] or [np.ones(0)])
    if len(norms) and not np.allclose(norms, 1.0, atol=1e-3):
        raise ValueError("vectors must be L2-normalised for a cosine (inner product) index")
    missing = [image_id for image_id in image_ids if image_id not in listings]
    if missing:
        raise ValueError(f"{len(missing)} indexed photos have no listing metadata, e.g. {missing[0]}")
    table = ListingTable.build(image_ids, listings)
    index, params = build_index(vectors, index_type, **index_options)
    meta = {**meta, "dimension": int(vectors.shape[1]), "count": len(image_ids), "metric": "inner_product",
            "normalisation": "l2", "similarity": "cosine", "index": params}
    return Catalogue(index, table, meta)
