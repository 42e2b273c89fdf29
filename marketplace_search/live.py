"""The live catalogue (docs/live-catalogue.md): numbered generations of the catalogue outside the archive, each
complete before the CURRENT pointer names it, and a list of removed listings, followed by every worker while it
serves. Writers publish CURRENT before pruning removed.json and readers read removed.json before CURRENT, so a
reader never pairs an old generation with a pruned removal list."""
import fcntl
import json
import logging
import shutil
import threading
import time
import zipfile
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from datetime import datetime, timezone
from pathlib import Path

import numpy as np

from marketplace_search.files import folder_replaced_atomically, fsync_path, path_identity, write_json_atomically
from marketplace_search.search import Catalogue, make_catalogue
from marketplace_search.text import WORDS_FILE, ListingWords, load_listing_words, save_listing_words

CURRENT_FILE = "CURRENT"
REMOVED_FILE = "removed.json"
LOCK_FILE = ".lock"
CATALOGUE_DIR = "catalogue"
VECTORS_FILE = "vectors.npy"
GENERATION_FILE = "generation.json"
GENERATION_PREFIX = "gen-"
CHECK_SECONDS = 0.5  # a worker looks at the folder at most this often: a stat of two files
BUNDLED = 0  # the generation number of the archive's own catalogue snapshot

logger = logging.getLogger(__name__)


class GenerationRefused(ValueError):
    """A generation this model must not serve (other weights, other dimension, unreadable)."""


def generation_name(number: int) -> str:
    return f"{GENERATION_PREFIX}{number:06d}"


def now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="milliseconds")


def read_current(live: Path) -> dict | None:
    """CURRENT's content, or None for a folder no generation was published in."""
    try:
        return json.loads((Path(live) / CURRENT_FILE).read_text())
    except FileNotFoundError:
        return None


def read_removed(live: Path) -> dict[str, str]:
    """`{product_id: when removed}`; empty when nothing was removed."""
    try:
        return json.loads((Path(live) / REMOVED_FILE).read_text())["product_ids"]
    except FileNotFoundError:
        return {}


def write_removed(live: Path, removed: dict[str, str]) -> None:
    write_json_atomically(Path(live) / REMOVED_FILE, {"product_ids": removed, "updated": now()})


def list_generations(live: Path) -> list[str]:
    return sorted(path.name for path in Path(live).glob(f"{GENERATION_PREFIX}*") if path.is_dir())


def prune_generations(live: Path, keep: int) -> list[str]:
    """Delete all but the KEEP newest generations (the current one always kept); returns the names deleted.
    The caller holds the writer lock. KEEP >= 2: a worker may still be loading the one before the newest."""
    if keep < 2:
        raise ValueError(f"keep {keep}: at least 2 generations stay (the current one and the one before it)")
    current = (read_current(live) or {}).get("name")
    doomed = [name for name in list_generations(live)[:-keep] if name != current]
    for name in doomed:
        shutil.rmtree(Path(live) / name)
    if doomed:
        fsync_path(Path(live))
    return doomed


@contextmanager
def writer_lock(live: Path):
    """One writer at a time on LIVE (remove, add, compact, init); readers never wait for it."""
    Path(live).mkdir(parents=True, exist_ok=True)
    with open(Path(live) / LOCK_FILE, "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


@dataclass
class Generation:
    """A loaded generation (no removals applied); its words and the reader_sha256 that made them, or None."""

    number: int
    catalogue: Catalogue
    vectors: np.ndarray
    info: dict
    listing_words: ListingWords | None = None
    listing_words_sha256: str | None = None


def load_generation(live: Path) -> Generation:
    """The current generation with its vectors, for writers."""
    live = Path(live)
    current = read_current(live)
    if current is None:
        raise FileNotFoundError(f"{live} has no current generation: seed it with `python -m scripts.catalogue init` "
                                f"first")
    name = current["name"]
    info = json.loads((live / name / GENERATION_FILE).read_text())
    catalogue = Catalogue.load(live / name / CATALOGUE_DIR)
    vectors = np.load(live / name / VECTORS_FILE)
    if vectors.shape[0] != catalogue.index.ntotal:
        raise ValueError(f"{live / name / VECTORS_FILE} holds {vectors.shape[0]} vectors, its catalogue "
                         f"{catalogue.index.ntotal}: the generation is damaged")
    return Generation(info["number"], catalogue, vectors, info, *generation_listing_words(live, name))


def generation_listing_words(live: Path, name: str) -> tuple[ListingWords | None, str | None]:
    """(NAME's words, the reader_sha256 that made them), or (None, None) when missing or unreadable (logged)."""
    path = Path(live) / name / WORDS_FILE
    if not path.is_file():
        return None, None
    try:
        return load_listing_words(path)
    except (OSError, ValueError, KeyError, zipfile.BadZipFile) as error:
        logger.error("live catalogue %s: generation %s's words are unreadable (%s): left out", live, name, error)
        return None, None


def write_generation(live: Path, vectors: np.ndarray, image_ids: list[str], listings: dict[str, dict],
                     weights_sha256: str, change: dict, index_type: str, meta: dict,
                     listing_words: ListingWords | None, listing_words_sha256: str | None) -> int:
    """Build and publish LIVE's next generation, with its words if the model reads titles, under writer_lock."""
    live = Path(live)
    live.mkdir(parents=True, exist_ok=True)
    current = read_current(live)
    existing = [int(name[len(GENERATION_PREFIX):]) for name in list_generations(live)]
    number = max(existing + [current["generation"] if current else 0]) + 1
    info = {"number": number, "name": generation_name(number), "parent": current and current["generation"],
            "created": now(), "model": {"checkpoint_sha256": weights_sha256}, "change": change}
    catalogue = make_catalogue(vectors, image_ids, listings, {**meta, "generation": number, "model": {
        **meta.get("model", {}), "checkpoint_sha256": weights_sha256}}, index_type)
    info.update(photos=len(image_ids), listings=len({listing["product_id"] for listing in catalogue.listings.values()}),
                index=catalogue.meta["index"]["type"])
    if listing_words is not None:
        info["words"] = {"listings": len(listing_words.product_ids), "reader_sha256": listing_words_sha256}
    with folder_replaced_atomically(live / generation_name(number)) as staging:  # a new name, under the lock
        catalogue.save(staging / CATALOGUE_DIR)
        np.save(staging / VECTORS_FILE, np.ascontiguousarray(vectors, dtype=np.float32))
        (staging / GENERATION_FILE).write_text(json.dumps(info, indent=2, sort_keys=True))
        if listing_words is not None:
            save_listing_words(staging / WORDS_FILE, listing_words, listing_words_sha256)
    write_json_atomically(live / CURRENT_FILE, {"generation": number, "name": generation_name(number),
                                                "published": now()})
    return number


@dataclass(frozen=True)
class Served:
    """What a batch is answered from: a catalogue view without the removed listings, and where it came from;
    `listing_words`: the generation's (None: the archive's text model's own)."""

    catalogue: Catalogue
    generation: int
    removed: frozenset = field(default_factory=frozenset)
    listing_words: ListingWords | None = None

    @property
    def info(self) -> dict:
        """The answer's `catalogue` field."""
        return {"generation": self.generation, "photos": self.catalogue.visible}


class LiveFollower:
    """A worker's view of LIVE: `current()` returns what to answer from, looking at the folder at most every
    CHECK_SECONDS. A generation embedded by other weights than WEIGHTS_SHA256 is refused (logged) and the worker
    keeps what it has; a new one is loaded whole (with BACKGROUND, by a thread beside the batches) and swapped in
    with one reference. Its words serve only if made by a text model reading as TEXT_SHA256."""

    def __init__(self, live: Path | str, bundled: Catalogue, weights_sha256: str,
                 check_seconds: float = CHECK_SECONDS, clock=time.monotonic, background: bool = False,
                 text_listing_words: ListingWords | None = None, text_sha256: str | None = None):
        self.live = Path(live)
        self.bundled = bundled
        self.weights_sha256 = weights_sha256
        # settings and width only, not the listings: the handler lets those go while a generation's serve
        self.text_settings = (None if text_listing_words is None
                              else (text_listing_words.settings, text_listing_words.width))
        self.text_sha256 = text_sha256
        self.listing_words: ListingWords | None = None
        self.check_seconds = check_seconds
        self.clock = clock
        self.background = False  # the first generation loads before the worker answers anything
        self.base, self.generation = bundled, BUNDLED
        self.refused: set[str] = set()
        self.served = Served(bundled, BUNDLED)
        self.removed: frozenset = frozenset()
        self.loading: str | None = None  # the generation a thread is loading
        self.loaded: tuple | None = None  # (generation, catalogue, words, load ms), to swap in
        self.seen = None
        self.next_check = 0.0
        if not self.live.is_dir():
            logger.warning("live catalogue %s does not exist (yet): serving the archive's catalogue snapshot "
                           "(%d photos) and checking for it every %.1f s", self.live, bundled.index.ntotal,
                           check_seconds)
        self.current()
        self.background = background

    def current(self) -> Served:
        """The Served to answer this batch from; looks at LIVE when CHECK_SECONDS have passed."""
        if self.loaded is not None:
            self.install()
        moment = self.clock()
        if moment < self.next_check:
            return self.served
        self.next_check = moment + self.check_seconds
        seen = (path_identity(self.live / REMOVED_FILE), path_identity(self.live / CURRENT_FILE))
        if seen != self.seen:
            self.seen = seen  # the identities before reading: a change while reading is seen next time
            self.follow()
        return self.served

    def follow(self) -> None:
        try:
            removed = frozenset(read_removed(self.live))  # before CURRENT (see the module docstring)
            current = read_current(self.live)
        except (OSError, ValueError, KeyError) as error:
            logger.error("live catalogue %s: cannot read its pointer or removal list (%s); still serving "
                         "generation %d", self.live, error, self.generation)
            return
        self.removed = removed
        if current is not None and current["generation"] != self.generation and current["name"] not in self.refused:
            if self.loading is not None:
                self.seen = None  # one load at a time: look again once this one is in
            elif self.background:
                self.loading = current["name"]
                threading.Thread(target=self.load_beside, args=(current["generation"], current["name"]),
                                 name=f"live-{current['name']}", daemon=True).start()
            else:
                self.load_beside(current["generation"], current["name"])
                if self.loaded is not None:
                    self.install()
                    return
        if removed != self.served.removed:
            self.swap(self.served.generation, 0.0)

    def load_beside(self, generation: int, name: str) -> None:
        """Load generation NAME while the current one serves; `current()` swaps it in."""
        started = time.perf_counter()
        try:
            catalogue, listing_words = self.load(name)
        except (OSError, RuntimeError, ValueError) as error:  # Faiss reports a bad file as RuntimeError
            self.refused.add(name)
            logger.error("live catalogue %s: REFUSED generation %s: %s; still serving generation %d",
                         self.live, name, error, self.generation)
        else:
            self.loaded = (generation, catalogue, listing_words, (time.perf_counter() - started) * 1000)
        finally:
            self.loading = None

    def install(self) -> None:
        generation, catalogue, listing_words, milliseconds = self.loaded
        self.loaded = None
        self.base, self.generation, self.listing_words = catalogue, generation, listing_words
        self.swap(generation, milliseconds)

    def swap(self, generation: int, load_milliseconds: float) -> None:
        started, previous = time.perf_counter(), self.served
        view = self.base.without_products(self.removed) if self.removed else self.base
        self.served = Served(view, generation, self.removed, self.listing_words)  # the swap: one reference
        logger.info("live catalogue %s: serving generation %d (%d photos, %d listings removed); was generation "
                    "%d (%d photos); loaded in %.0f ms, switched in %.0f ms", self.live, generation, view.visible,
                    len(self.removed), previous.generation, previous.catalogue.visible, load_milliseconds,
                    (time.perf_counter() - started) * 1000)

    def load(self, name: str) -> tuple[Catalogue, ListingWords | None]:
        """Generation NAME loaded whole if these weights embedded it, with its words if this text model made them."""
        folder = self.live / name
        info = json.loads((folder / GENERATION_FILE).read_text())
        embedded_with = (info.get("model") or {}).get("checkpoint_sha256")
        if embedded_with != self.weights_sha256:
            raise GenerationRefused(
                f"its vectors were embedded by checkpoint sha256 {str(embedded_with)[:12]}, this worker serves "
                f"{self.weights_sha256[:12]}: vectors of other weights would answer with unrelated listings. "
                f"Seed a live folder of its own for this model (python -m scripts.catalogue init)")
        catalogue = Catalogue.load(folder / CATALOGUE_DIR)
        if catalogue.dimension != self.bundled.dimension:
            raise GenerationRefused(f"{catalogue.dimension}-d vectors, this model makes {self.bundled.dimension}-d")
        return catalogue, self.load_listing_words(name)

    def load_listing_words(self, name: str) -> ListingWords | None:
        if self.text_settings is None:
            return None
        settings, width = self.text_settings
        listing_words, made_by = generation_listing_words(self.live, name)
        if listing_words is None:
            return None
        if made_by != self.text_sha256 or listing_words.width != width:
            logger.warning("live catalogue %s: generation %s's words were made by a text model reading with sha256 "
                           "%s, this worker reads with %s: its listings are found by their photos, words from the "
                           "archive's text model", self.live, name, made_by[:12], str(self.text_sha256)[:12])
            return None
        return replace(listing_words, **settings)
