"""The searchable catalogue: a Faiss index over photo embeddings, its id map and listing metadata.

On disk (one folder):
  catalogue.faiss   the Faiss index; int64 id i is row i of listings.arrow
  listings.arrow    the image ids and listing fields as columns of one Arrow file, memory-mapped by
                    `load` (marketplace_search.columns)
  index_meta.json   dimension, metric, normalisation, index type and parameters, count, the
                    model checkpoint (path, sha256, version) that made the vectors, and "files": the
                    sha256 and size of the other files, so files of different builds refuse to load

Vectors are (n, d) float32, L2-normalised, so inner product is cosine similarity.
A folder is written whole into a temporary folder beside it and renamed into place.
"""
import copy
import json
import os
import shutil
import tempfile
import time
from pathlib import Path

import faiss
import numpy as np

from marketplace_search.columns import ImageIds, Listings, ListingTable, write_listing_table
from marketplace_search.files import fsync_path, sha256_file
from marketplace_search.schema import LISTING_FIELDS

INDEX_FILE = "catalogue.faiss"
LISTING_TABLE_FILE = "listings.arrow"
META_FILE = "index_meta.json"
INDEX_TYPES = ("auto", "flat", "hnsw", "ivfpq")
# "auto" searches up to this many vectors of FLAT_DIMENSION floats exactly (longer ones proportionally
# fewer, flat_max): below it exact search is well under a millisecond, above it HNSW is faster at full recall.
FLAT_MAX = 20_000
FLAT_DIMENSION = 256
# Above this many vectors "auto" builds "ivfpq": HNSW's float32 vectors and graph would be copied into every
# worker, IVF-PQ's codes are memory-mapped and shared by the workers of a host.
HNSW_MAX = 2_000_000
# "ivfpq" search defaults: K_FACTOR reaches the recall target at 10M vectors, and NPROBE leaves a margin for
# real embeddings, less clustered than the synthetic ones measured.
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


def build_index(vectors: np.ndarray, index_type: str = "auto", *, hnsw_m: int = 32,
                ef_construction: int = 80, ef_search: int = 128, nlist: int | None = None,
                nprobe: int | None = None, pq_m: int | None = None, k_factor: int = IVFPQ_K_FACTOR,
                seed: int = 0) -> tuple[faiss.Index, dict]:
    """Index (n, d) L2-normalised float32 vectors by inner product; ids are row numbers.

    Returns the index and the parameters it was built with (stored in index_meta.json).
    efSearch 128 keeps HNSW's recall@10 on target with margin at 1M vectors.
    "ivfpq" is IVF (HNSW coarse quantizer) over PQ codes of PQ_M bytes, whose K_FACTOR * k best
    candidates are re-ranked on 8-bit scalar-quantised vectors: for 10M+ photos.
    VECTORS may be a memory-mapped array: it is added in chunks, and trained on a sample.
    """
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
    """The most vectors of DIMENSION floats "auto" still searches exactly: FLAT_MAX up to FLAT_DIMENSION,
    as many floats in all above it (3,333 vectors of 1,536-d)."""
    return FLAT_MAX * FLAT_DIMENSION // max(dimension, FLAT_DIMENSION)


def ivfpq_nlist(n: int) -> int:
    """Inverted lists for N vectors: the power of two nearest 4 * sqrt(N), each list trained on 39+ vectors.

    The low end of Faiss's guideline (4 to 16 * sqrt(N)): fewer, longer lists code their vectors against
    centroids too far away to reach the recall target.
    """
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
    # k-means and the PQ codebooks converge on a sample: TRAIN_PER_LIST vectors per list, at least 256
    # per PQ code. The HNSW quantizer is k-means' assignment index too (IndexIVF trains through it),
    # so an iteration costs a graph over the centroids and one graph search per sampled vector.
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
    """A loaded index with its id map and listings; `search` answers in listings, not bare ids."""

    def __init__(self, index: faiss.Index, image_ids: list[str], listings: dict[str, dict], meta: dict):
        """IMAGE_IDS and LISTINGS: a list and a dict, or the `ImageIds` and `Listings` of one listings table."""
        if index.ntotal != len(image_ids):
            raise ValueError(f"index holds {index.ntotal} vectors but the id map has {len(image_ids)}")
        self.index = index
        self.image_ids = image_ids
        self.listings = listings
        self.meta = meta
        self.dimension = index.d
        self._table = listings.table if isinstance(listings, Listings) else None
        if self._table is not None:  # a row per photo by construction
            if not isinstance(image_ids, ImageIds) or image_ids.table is not self._table:
                raise ValueError("a listings table's Listings go with the ImageIds of the same table")
            self.rows_by_category = self._table.rows_by_category()
        else:
            missing = [image_id for image_id in image_ids if image_id not in listings]
            if missing:
                raise ValueError(f"{len(missing)} indexed photos have no listing metadata, e.g. {missing[0]}")
            by_category: dict[str, list[int]] = {}
            for row, image_id in enumerate(image_ids):
                by_category.setdefault(listings[image_id]["category"], []).append(row)
            self.rows_by_category = {name: np.array(rows, dtype=np.int64) for name, rows in by_category.items()}
        self._selectors: dict[str, faiss.IDSelector] = {}
        self.visible = index.ntotal  # photos a search can return (fewer in a view made by `without_products`)
        self._visible_rows = None  # (bitmap, selector) of those photos in such a view
        self._product_rows: dict[str, list[int]] | None = None  # product id -> rows, built on first use

    def without_products(self, product_ids) -> "Catalogue":
        """A view sharing this catalogue's index whose searches leave out PRODUCT_IDS' photos.

        For the live catalogue's removal list (marketplace_search.live): the listings leave every
        answer at once, the index is rebuilt later (compaction). Faiss filters the hidden rows inside
        the search, so k answers remain whenever k listings are left.
        """
        if self._table is not None:
            hidden = self._table.rows_of_products(product_ids)
        else:
            hidden = np.array([row for row, image_id in enumerate(self.image_ids)
                               if self.listings[image_id]["product_id"] in product_ids], dtype=np.int64)
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

        The listings table, and an "ivfpq" index (the type made for catalogues too big to copy per
        worker), are memory-mapped read-only, so every process that loads the same folder (TorchServe's
        workers) shares one copy in the page cache.
        """
        directory = Path(directory)
        for attempt in range(1, LOAD_ATTEMPTS + 1):
            identity = _folder_identity(directory)
            try:
                catalogue = cls._load_files(directory)
            except (OSError, RuntimeError, ValueError):  # Faiss reports a vanished file as a RuntimeError
                # The folder absent, or replaced while we read (a save between or after its renames):
                # read the new one, whole; otherwise the error is the folder's own.
                if attempt == LOAD_ATTEMPTS or (identity is not None and _folder_identity(directory) == identity):
                    raise
            else:
                if identity is not None and _folder_identity(directory) == identity:
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
        for name in (LISTING_TABLE_FILE, INDEX_FILE):
            _check_file(directory, name, sha256_file(directory / name), meta.get("files", {}))
        mmap = meta.get("index", {}).get("type") == "ivfpq"
        # IO_FLAG_MMAP_IFC maps flat codes (flat, SQ8, PQ) and IVF lists alike; IO_FLAG_MMAP only the lists.
        index = faiss.read_index(str(directory / INDEX_FILE),
                                 faiss.IO_FLAG_MMAP_IFC | faiss.IO_FLAG_READ_ONLY if mmap else 0)
        table = ListingTable.open(directory / LISTING_TABLE_FILE)
        image_ids = ImageIds(table)
        if index.ntotal != len(image_ids):
            raise CatalogueMismatchError(
                f"{directory / INDEX_FILE} holds {index.ntotal} vectors but {directory / LISTING_TABLE_FILE} lists "
                f"{len(image_ids)} image ids: they come from different builds; rebuild the catalogue")
        if "efSearch" in meta.get("index", {}):
            faiss.downcast_index(index).hnsw.efSearch = meta["index"]["efSearch"]
        if meta.get("index", {}).get("type") == "ivfpq":
            set_ivfpq_search(index, meta["index"]["nprobe"], meta["index"]["k_factor"])
        return cls(index, image_ids, Listings(table), meta)

    def save(self, directory: Path | str) -> None:
        """Write the folder atomically: readers see the previous catalogue or this one, never a mix.

        The files go to a temporary folder beside DIRECTORY, which is then renamed into place; an
        existing catalogue folder is replaced (a folder holding anything else is refused).
        """
        directory = Path(directory)
        directory.parent.mkdir(parents=True, exist_ok=True)
        _check_replaceable(directory)
        staging = Path(tempfile.mkdtemp(prefix=f".{directory.name}.", suffix=".tmp", dir=directory.parent))
        try:
            faiss.write_index(self.index, str(staging / INDEX_FILE))
            write_listing_table(staging / LISTING_TABLE_FILE, self.image_ids, self.listings)
            files = {name: {"sha256": sha256_file(staging / name), "bytes": (staging / name).stat().st_size}
                     for name in CATALOGUE_FILES if name != META_FILE}
            self.meta = {**self.meta, "files": files}
            (staging / META_FILE).write_text(json.dumps(self.meta, indent=2, sort_keys=True))
            for name in CATALOGUE_FILES:
                fsync_path(staging / name)
            os.chmod(staging, directory.stat().st_mode & 0o7777 if directory.is_dir() else 0o755)
            fsync_path(staging)
            _replace_folder(staging, directory)
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)
            raise

    @property
    def categories(self) -> list[str]:
        return sorted(self.rows_by_category)

    def search_ids(self, queries: np.ndarray, k: int, category: str | None = None,
                   exact: bool = False) -> tuple[np.ndarray, np.ndarray]:
        """Raw Faiss search over photos: `(D, I)`, each (n, k); I = -1 where fewer than k were found.

        `exact` scans every vector (of CATEGORY) instead of the HNSW graph or IVF's nprobe lists:
        complete, at the cost of a brute-force pass over the whole index.
        """
        queries = _as_queries(queries)
        if queries.shape[1] != self.dimension:
            raise ValueError(f"queries have dimension {queries.shape[1]}, the index {self.dimension}")
        selector = self._selector(category)
        if exact:
            index, params = _exhaustive_search(self.index, selector)
            return index.search(queries, k, params=params)
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
        """The k nearest listings per query, one entry per listing (its most similar photo).

        Each neighbour is `{image_id, product_id, title, price, location, category, similarity}`.
        Fewer than k only when the catalogue (or CATEGORY) has fewer listings: an approximate search
        that runs out of candidates (a rare category, out of the graph's or the lists' reach) is
        repeated exactly over that category's photos.
        `exclude_products[i]` drops that listing from query i's answer (used by evaluation).
        """
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
        """The answer entry of each of PRODUCT_IDS that a search of this catalogue (or view, in CATEGORY)
        could return, as `search` gives it: with QUERY (one search vector), the listing's photo most
        similar to it and that cosine as `similarity`, computed exactly from the indexed vectors (decoded
        where the index keeps codes); without, its first photo and no similarity. For listings found
        another way than by photo (by words: marketplace_search.text); those not shown are left out."""
        rows = self._rows_of_products(product_ids)
        if self._visible_rows is not None and len(rows):
            bitmap = self._visible_rows[0]
            rows = rows[((bitmap[rows >> 3] >> (rows & 7)) & 1).astype(bool)]
        similarities = None
        if query is not None and len(rows):
            similarities = self._vectors_at(rows) @ np.asarray(query, np.float32).reshape(-1)
        entries: dict[str, dict] = {}
        for position, row in enumerate(rows.tolist()):
            image_id, listing = self._listing_at(row)
            if category is not None and listing["category"] != category:
                continue
            similarity = None if similarities is None else round(float(similarities[position]), 6)
            product_id = listing["product_id"]
            if product_id not in entries or (similarity is not None and similarity > entries[product_id]["similarity"]):
                entries[product_id] = _answer_entry(image_id, listing, similarity)
        return entries

    def _rows_of_products(self, product_ids: list[str]) -> np.ndarray:
        """Index rows (ascending) of PRODUCT_IDS' photos, hidden or not."""
        if self._table is not None:
            return self._table.rows_of_products(product_ids)
        if self._product_rows is None:
            self._product_rows = {}
            for row, image_id in enumerate(self.image_ids):
                self._product_rows.setdefault(self.listings[image_id]["product_id"], []).append(row)
        return np.array(sorted(row for product_id in set(product_ids)
                               for row in self._product_rows.get(product_id, ())), dtype=np.int64)

    def _vectors_at(self, rows: np.ndarray) -> np.ndarray:
        """(len(rows), d) float32 vectors of index rows ROWS, as the index holds them (8-bit codes decoded)."""
        return _row_vectors(self.index).reconstruct_batch(np.ascontiguousarray(rows, dtype=np.int64))

    def _listing_at(self, row: int) -> tuple[str, dict]:
        """(image_id, listing) of index row ROW; a listings table reads just that row."""
        if self._table is not None:
            return self._table.image_id(row), self._table.listing(row)
        image_id = self.image_ids[row]
        return image_id, self.listings[image_id]

    def _unique_listings(self, distances, rows, k, exclude_product) -> list[dict]:
        neighbours, seen = [], {exclude_product}
        for similarity, row in zip(distances, rows):
            if row < 0:
                break
            image_id, listing = self._listing_at(int(row))
            if listing["product_id"] in seen:
                continue
            seen.add(listing["product_id"])
            neighbours.append(_answer_entry(image_id, listing, round(float(similarity), 6)))
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
    """The part of INDEX holding one vector per row, ids = rows: an IVF-PQ's re-ranking vectors (8-bit), an
    HNSW's storage, else the index itself."""
    inner = faiss.downcast_index(index)
    if isinstance(inner, faiss.IndexRefine):
        return faiss.downcast_index(inner.refine_index)
    if isinstance(inner, faiss.IndexHNSW):
        return faiss.downcast_index(inner.storage)
    return inner


def _exhaustive_search(index: faiss.Index, selector) -> tuple[faiss.Index, faiss.SearchParameters | None]:
    """The part of INDEX and parameters that compare the query with every (selected) vector."""
    return _row_vectors(index), None if selector is None else faiss.SearchParameters(sel=selector)


def check_layout(directory: Path | str) -> None:
    """Refuse a folder saved in the retired JSON layout, saying how to rebuild it."""
    directory = Path(directory)
    if not (directory / LISTING_TABLE_FILE).exists() and (directory / RETIRED_FILES[0]).is_file():
        raise ValueError(
            f"{directory} holds a catalogue in the JSON layout ({' + '.join(RETIRED_FILES)}), which is retired: "
            f"rebuild the run's index with `python -m training.index --work WORK --run RUN`, then archive it again "
            f"(`python -m scripts.archive --run RUN`) or reseed the live catalogue "
            f"(`python -m scripts.catalogue --live LIVE init --run RUN --force`)")


def read_listings(directory: Path | str) -> dict[str, dict]:
    """{image_id: listing} of a saved catalogue folder, without loading its index."""
    check_layout(directory)
    return dict(Listings(ListingTable.open(Path(directory) / LISTING_TABLE_FILE)).items())


def _check_file(directory: Path, name: str, sha256: str, recorded: dict) -> None:
    expected = recorded.get(name, {}).get("sha256")
    if expected != sha256:
        other = INDEX_FILE if name != INDEX_FILE else LISTING_TABLE_FILE
        raise CatalogueMismatchError(
            f"{directory / name} does not belong with {directory / other}: its sha256 is {sha256[:12]}, but "
            f"{directory / META_FILE} records {str(expected)[:12]} for the {name} built with them. The files come "
            f"from different builds (copy or replace a catalogue folder whole, never single files); rebuild it")


def _folder_identity(directory: Path) -> tuple[int, ...] | None:
    """Changes when a save renames another folder into place (ctime too: an inode number can be reused)."""
    try:
        status = directory.stat()
    except FileNotFoundError:
        return None
    return status.st_dev, status.st_ino, status.st_ctime_ns


def _check_replaceable(directory: Path) -> None:
    if directory.exists() and not directory.is_dir():
        raise NotADirectoryError(f"{directory} is a file, not a catalogue folder")
    if directory.is_dir():
        others = sorted(path.name for path in directory.iterdir()
                        if path.name not in CATALOGUE_FILES + RETIRED_FILES)
        if others:
            raise FileExistsError(f"{directory} holds files that are not a catalogue's ({', '.join(others[:5])}): "
                                  f"refusing to replace it; save into a folder of its own")


def _replace_folder(staging: Path, directory: Path) -> None:
    """Rename STAGING to DIRECTORY; an existing DIRECTORY is first renamed aside, then deleted.

    rename(2) cannot replace a non-empty folder, so for a moment DIRECTORY does not exist: a reader
    then finds it missing, or changed under it, and `Catalogue.load` reads it again.
    """
    previous = None
    if directory.exists():
        previous = Path(tempfile.mkdtemp(prefix=f".{directory.name}.", suffix=".old", dir=directory.parent))
        os.replace(directory, previous)  # onto the empty folder just made: atomic, and the name is ours
    try:
        os.replace(staging, directory)
    except BaseException:
        if previous is not None:
            os.replace(previous, directory)
        raise
    fsync_path(directory.parent)
    if previous is not None:
        shutil.rmtree(previous)


def make_catalogue(vectors: np.ndarray, image_ids: list[str], listings: dict[str, dict], meta: dict,
                   index_type: str = "auto", **index_options) -> Catalogue:
    """Build the index for `vectors` (row i is `image_ids[i]`) and wrap it with its metadata."""
    vectors = _as_queries(vectors)
    if len(vectors) != len(image_ids):
        raise ValueError(f"{len(vectors)} vectors but {len(image_ids)} image ids")
    norms = np.concatenate([np.linalg.norm(vectors[start:start + ADD_CHUNK], axis=1)
                            for start in range(0, len(vectors), ADD_CHUNK)] or [np.ones(0)])
    if len(norms) and not np.allclose(norms, 1.0, atol=1e-3):
        raise ValueError("vectors must be L2-normalised for a cosine (inner product) index")
    index, params = build_index(vectors, index_type, **index_options)
    meta = {**meta, "dimension": int(vectors.shape[1]), "count": len(image_ids), "metric": "inner_product",
            "normalisation": "l2", "similarity": "cosine", "index": params}
    return Catalogue(index, list(image_ids), {i: listings[i] for i in image_ids if i in listings}, meta)
