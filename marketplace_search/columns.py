"""A catalogue's id map and listings as one Arrow table (row i: the photo with index id i), saved uncompressed and
memory-mapped when loaded, so the workers of a host share one copy and a search turns into Python only the rows
it answers with."""
from collections.abc import Iterator, Mapping, Sequence

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from marketplace_search.schema import LISTING_FIELDS

COLUMNS = ("image_id",) + LISTING_FIELDS
BATCH_ROWS = 1 << 20  # rows per record batch, so string offsets stay 32-bit at any catalogue size


class ListingTable:
    """Row access to a listings table: `image_id(row)`, `listing(row)`, and the row groups a catalogue needs."""

    def __init__(self, table: pa.Table):
        missing = [name for name in COLUMNS if name not in table.column_names]
        if missing:
            raise ValueError(f"listings table lacks the columns {missing}; it has {table.column_names}")
        self.table = table
        self._image_ids = table.column("image_id")
        self._fields = [(name, table.column(name)) for name in LISTING_FIELDS]
        self._row_of: dict[str, int] | None = None

    @classmethod
    def build(cls, image_ids: Sequence[str], listings: Mapping[str, dict]) -> "ListingTable":
        """IMAGE_IDS (in index order) and their listings, in memory."""
        rows = [listings[image_id] for image_id in image_ids]
        for image_id, listing in zip(image_ids, rows):
            if set(listing) != set(LISTING_FIELDS):
                raise ValueError(f"listing of {image_id} has the fields {sorted(listing)}; a listings table holds "
                                 f"exactly {list(LISTING_FIELDS)}")
        columns = {"image_id": pa.array(list(image_ids), pa.string())}
        columns.update({name: pa.array([listing[name] for listing in rows]) for name in LISTING_FIELDS})
        return cls(pa.table(columns))

    @classmethod
    def open(cls, path) -> "ListingTable":
        """Map PATH: no column is copied into the process."""
        return cls(pa.ipc.open_file(pa.memory_map(str(path), "r")).read_all())

    def write(self, path) -> None:
        with pa.OSFile(str(path), "wb") as sink, pa.ipc.new_file(sink, self.table.schema) as writer:
            writer.write_table(self.table, max_chunksize=BATCH_ROWS)

    def __len__(self) -> int:
        return self.table.num_rows

    def image_id(self, row: int) -> str:
        return self._image_ids[row].as_py()

    def listing(self, row: int) -> dict:
        return {name: column[row].as_py() for name, column in self._fields}

    def row_of(self, image_id: str) -> int:
        """The row of IMAGE_ID (KeyError if absent); the lookup dict is built on first use."""
        if self._row_of is None:
            self._row_of = {name: row for row, name in enumerate(self.iter_image_ids())}
        return self._row_of[image_id]

    def iter_image_ids(self) -> Iterator[str]:
        for chunk in self._image_ids.chunks:
            yield from chunk.to_pylist()

    def iter_listings(self) -> Iterator[dict]:
        for batch in self.table.select(list(LISTING_FIELDS)).to_batches():
            yield from batch.to_pylist()

    def rows_by_category(self) -> dict[str, np.ndarray]:
        """{category: its rows, ascending}, computed in Arrow (no Python object per row)."""
        column = self.table.column("category")
        if column.null_count:
            raise ValueError(f"{column.null_count} listings have no category")
        names = pc.unique(column)
        codes = pc.index_in(column, value_set=names).to_numpy()
        order = np.argsort(codes, kind="stable").astype(np.int64)
        bounds = np.cumsum(np.bincount(codes, minlength=len(names)))[:-1]
        return {name: rows for name, rows in zip(names.to_pylist(), np.split(order, bounds))}

    def rows_of_products(self, product_ids) -> np.ndarray:
        """The rows (ascending) of the photos of PRODUCT_IDS' listings."""
        column = self.table.column("product_id")
        wanted = pa.array(sorted(product_ids), column.type)
        return np.flatnonzero(pc.is_in(column, value_set=wanted).to_numpy(zero_copy_only=False)).astype(np.int64)


class ImageIds(Sequence):
    """The id map (row -> image_id) of a listings table, as a read-only list."""

    def __init__(self, table: ListingTable):
        self.table = table

    def __len__(self) -> int:
        return len(self.table)

    def __getitem__(self, row):
        if isinstance(row, slice):
            return [self.table.image_id(i) for i in range(len(self))[row]]
        return self.table.image_id(range(len(self))[row])

    def __iter__(self) -> Iterator[str]:
        return self.table.iter_image_ids()


class Listings(Mapping):
    """image_id -> listing of a listings table, as a read-only dict."""

    def __init__(self, table: ListingTable):
        self.table = table

    def __getitem__(self, image_id: str) -> dict:
        return self.table.listing(self.table.row_of(image_id))

    def __contains__(self, image_id) -> bool:
        try:
            self.table.row_of(image_id)
        except (KeyError, TypeError):
            return False
        return True

    def __iter__(self) -> Iterator[str]:
        return self.table.iter_image_ids()

    def __len__(self) -> int:
        return len(self.table)

    def values(self):
        return list(self.table.iter_listings())

    def items(self):
        return list(zip(self.table.iter_image_ids(), self.table.iter_listings()))
