"""Category from a listing's words, and its fusion with the photo model (docs/text-model.md): numpy only, no
scikit-learn, nothing unpickled. Terms are cut here once (training hands `word_terms`/`char_terms` to
scikit-learn), so training and serving cannot drift."""
import hashlib
import json
import re
import struct
import unicodedata
import zipfile
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from marketplace_search.files import replaced_atomically

if TYPE_CHECKING:  # torch and tokenizers load with the first model that has an encoder
    from marketplace_search.sentences import SentenceEncoder

MODEL_FILE = "text_model.json"
WEIGHTS_FILE = "text_model.npz"
WORDS_FILE = "words.npz"  # a live catalogue generation's listings as ListingWords rows (save_listing_words)
# ListingWords' arrays as stored: in WORDS_FILE by these names, in WEIGHTS_FILE after LISTING_WORDS_PREFIX
ROW_ARRAYS = {"labels": np.int32, "indptr": np.int64, "rows": np.int32, "values": np.float32}
MAPPED_ARRAYS = ("rows", "values")  # the large ones (an entry per listing's term), memory-mapped by read_npz
LISTING_WORDS_PREFIX = "neighbours:"  # the name saved models use (MODEL_FILE's key too): kept so they load
FORMAT = "tfidf-linear/3"  # the only one read: older text models are rebuilt by training.text
ENCODER_DIR = "encoder"  # in a text model's folder: its sentence encoder's files
VOTE_FLOOR = 1e-3  # under the vote's probabilities before the log: a category no neighbour has
EXACT_POSTINGS = 3_000_000  # ListingWords.similarities' settings
SCAN_SHARE = 0.05
CANDIDATES = 1000
RERANK_POOL = 100  # photo neighbours re-ranked by words when a request sends both (the search's MAX_K)
WORD_NGRAMS = (1, 2)
CHAR_NGRAMS = (2, 5)
MAX_TITLE_CHARS = 300
MAX_DESCRIPTION_CHARS = 10_000
TITLE = "title"
DESCRIPTION = "description"
PHOTO = "photo"
# The combinations of inputs a calibration exists for, as the answer's `inputs` names them.
INPUT_KINDS = (("title",), ("title", "description"), ("photo", "title"), ("photo", "title", "description"))
TOKEN = re.compile(r"(?u)\b\w\w+\b")
WHITESPACE = re.compile(r"\s+")
# The scraped descriptions' line "Posted by <name> in <sub-category> ..." names the category, and no seller types it.
SITE_LINE = re.compile(r"Posted by .{0,400}?\b\d{1,2} (?:January|February|March|April|May|June|July|August|"
                       r"September|October|November|December) \d{4}", re.S)


def normalise_text(text: str) -> str:
    """Lower case, accents removed (NFKD), the site's "Posted by" line dropped, whitespace collapsed."""
    text = SITE_LINE.sub(" ", text).lower()
    text = "".join(char for char in unicodedata.normalize("NFKD", text) if not unicodedata.combining(char))
    return WHITESPACE.sub(" ", text).strip()


def listing_text(title: str, description: str | None = None) -> str:
    """What the text model reads for one listing: its title, then its description if there is one."""
    return f"{title}\n{description}" if description else title


def word_terms(text: str, ngrams: tuple[int, int] = WORD_NGRAMS) -> list[str]:
    """Word n-grams of the normalised text (words of 2+ letters or digits)."""
    tokens = TOKEN.findall(normalise_text(text))
    terms = []
    for n in range(ngrams[0], ngrams[1] + 1):
        terms += [" ".join(tokens[i:i + n]) for i in range(len(tokens) - n + 1)]
    return terms


def char_terms(text: str, ngrams: tuple[int, int] = CHAR_NGRAMS) -> list[str]:
    """Character n-grams inside each space-padded word; a word shorter than n counts once whole."""
    terms = []
    for word in normalise_text(text).split():
        word = f" {word} "
        for n in range(ngrams[0], ngrams[1] + 1):
            if len(word) <= n:
                terms.append(word)
                break
            terms += [word[i:i + n] for i in range(len(word) - n + 1)]
    return terms


def softmax(logits: np.ndarray) -> np.ndarray:
    shifted = np.exp(logits - logits.max(axis=1, keepdims=True))
    return shifted / shifted.sum(axis=1, keepdims=True)


def kind_name(inputs) -> str:
    return "+".join(inputs)


@dataclass
class ListingWords:
    """The catalogue's listings as TF-IDF rows stored by column (CSC), and the k-NN vote over them: a query's
    k most similar listings (cosine) vote with weights exp(similarity / temperature)."""

    product_ids: list[str]
    labels: np.ndarray  # (listings,) int class index
    indptr: np.ndarray  # (features + 1,) int64: column c's listings are rows[indptr[c]:indptr[c + 1]]
    rows: np.ndarray  # int32
    values: np.ndarray  # float32, each listing's row L2-normalised per block (word, char)
    k: int = 20
    temperature: float = 0.05
    rerank_weight: float = 0.0  # photo neighbours ranked by photo similarity + this x word similarity
    fill: bool = False  # photo + words: the listings nearest by words join the photo neighbours re-ranked
    # How `similarities` reads a large catalogue (not saved).
    exact_postings: int = EXACT_POSTINGS
    candidates: int = CANDIDATES

    def __post_init__(self):
        self.position = {product_id: row for row, product_id in enumerate(self.product_ids)}

    @classmethod
    def from_rows(cls, product_ids: list[str], labels, feature_rows, width: int, **settings) -> "ListingWords":
        """From each listing's (columns, values), as TextModel.features gives them; SETTINGS as `settings`."""
        columns = np.concatenate([columns for columns, _ in feature_rows]).astype(np.int64)
        values = np.concatenate([values for _, values in feature_rows]).astype(np.float32)
        rows = np.repeat(np.arange(len(feature_rows), dtype=np.int32), [len(c) for c, _ in feature_rows])
        return cls.from_entries(product_ids, labels, columns, rows, values, width, **settings)

    @classmethod
    def from_entries(cls, product_ids: list[str], labels, columns: np.ndarray, rows: np.ndarray, values: np.ndarray,
                     width: int, **settings) -> "ListingWords":
        """From the (column, listing row, value) entries of the listings' rows, in row order."""
        order = np.argsort(columns, kind="stable")
        indptr = np.zeros(width + 1, np.int64)
        np.cumsum(np.bincount(columns, minlength=width), out=indptr[1:])
        return cls(list(product_ids), np.asarray(labels, np.int32), indptr, np.asarray(rows, np.int32)[order],
                   np.asarray(values, np.float32)[order], **settings)

    @classmethod
    def from_arrays(cls, arrays, product_ids: list[str], prefix: str = "", **settings) -> "ListingWords":
        """From the arrays `arrays(prefix)` gave."""
        return cls(list(product_ids), *(arrays[prefix + name] for name in ROW_ARRAYS), **settings)

    def arrays(self, prefix: str = "") -> dict[str, np.ndarray]:
        """The listings' rows as named arrays for an .npz (their product ids and settings are stored apart)."""
        return {prefix + name: np.asarray(getattr(self, name), dtype) for name, dtype in ROW_ARRAYS.items()}

    @property
    def settings(self) -> dict:
        """The vote's and the re-ranking's settings: k, temperature, rerank_weight, fill."""
        return {"k": self.k, "temperature": self.temperature, "rerank_weight": self.rerank_weight, "fill": self.fill}

    def similarities(self, columns: np.ndarray, values: np.ndarray) -> np.ndarray:
        """(listings,) cosine similarity of one query row to every catalogue listing (two blocks: / 2). Beyond
        `exact_postings` entries, the rarest terms (SCAN_SHARE of them) score every listing and the `candidates`
        best are completed exactly; the others keep that lower bound, so the cost follows the rare terms."""
        starts, ends = self.indptr[columns], self.indptr[columns + 1]
        lengths = ends - starts
        entries = int(lengths.sum())
        if not entries:
            return np.zeros(len(self.product_ids), np.float32)
        if entries <= self.exact_postings:
            return (self._scores(ends, lengths, values) / 2.0).astype(np.float32)
        order = np.argsort(lengths, kind="stable")  # rarest first
        scanned = max(1, int(np.searchsorted(np.cumsum(lengths[order]), SCAN_SHARE * entries, side="right")))
        scan, rest = order[:scanned], order[scanned:]
        scores = self._scores(ends[scan], lengths[scan], values[scan])
        count = min(self.candidates, int(np.count_nonzero(scores)))
        chosen = np.sort(np.argpartition(-scores, count - 1)[:count]) if count else np.zeros(0, np.int64)
        completed = scores[chosen]
        for term in rest:
            listings = self.rows[starts[term]:ends[term]]
            at = np.minimum(np.searchsorted(listings, chosen), len(listings) - 1)
            found = listings[at] == chosen
            completed[found] += values[term] * self.values[starts[term] + at[found]]
        scores[chosen] = completed
        return (scores / 2.0).astype(np.float32)

    def _scores(self, ends: np.ndarray, lengths: np.ndarray, values: np.ndarray) -> np.ndarray:
        """(listings,) float64 dot products of every listing with these query terms (column ends, lengths)."""
        positions = np.repeat(ends - lengths.cumsum(), lengths) + np.arange(lengths.sum())
        weights = self.values[positions] * np.repeat(values, lengths)
        return np.bincount(self.rows[positions], weights, minlength=len(self.product_ids))

    def vote(self, similarities: np.ndarray, classes: int, exclude: str | None = None, k: int | None = None,
             temperature: float | None = None) -> np.ndarray:
        """(classes,) the k nearest listings' vote, summing to 1 (uniform when nothing is similar)."""
        similarities = np.array(similarities, np.float64)
        if exclude is not None and exclude in self.position:
            similarities[self.position[exclude]] = -np.inf
        k = min(k or self.k, int(np.isfinite(similarities).sum()))
        if k <= 0 or not np.nanmax(similarities[np.isfinite(similarities)], initial=0.0) > 0:
            return np.full(classes, 1.0 / classes)
        top = np.argpartition(-similarities, k - 1)[:k]
        weights = np.exp((similarities[top] - similarities[top].max()) / (temperature or self.temperature))
        votes = np.zeros(classes)
        np.add.at(votes, self.labels[top], weights)
        return votes / votes.sum()

    def nearest(self, similarities: np.ndarray, n: int, label: int | None = None,
                exclude=()) -> list[tuple[str, float]]:
        """The n listings most similar to the words (cosine > 0), best first, as (product id, similarity);
        LABEL: only listings of that class; EXCLUDE: product ids left out."""
        similarities = np.array(similarities, np.float64)
        if label is not None:
            similarities[self.labels != label] = 0.0
        for product_id in exclude:
            if product_id in self.position:
                similarities[self.position[product_id]] = 0.0
        n = min(n, int((similarities > 0).sum()))
        if n <= 0:
            return []
        top = np.argpartition(-similarities, n - 1)[:n]
        top = top[np.lexsort((top, -similarities[top]))]  # best first; ties in catalogue order
        return [(self.product_ids[row], float(similarities[row])) for row in top]

    @property
    def width(self) -> int:
        """Columns of the TF-IDF rows (the text model's word + char features)."""
        return len(self.indptr) - 1

    def changed(self, drop=(), product_ids=(), labels=(), feature_rows=()) -> "ListingWords":
        """These listings less DROP and those given anew, then the new ones (as from_rows takes them), same settings."""
        gone = set(drop) | set(product_ids)
        keep = np.array([product_id not in gone for product_id in self.product_ids], dtype=bool)
        renumbered = np.cumsum(keep) - 1  # a kept listing's row in the result
        entries = keep[self.rows]
        columns = np.repeat(np.arange(self.width, dtype=np.int64), np.diff(self.indptr))[entries]
        rows = renumbered[self.rows[entries]]
        values = self.values[entries]
        if len(feature_rows):
            columns = np.concatenate([columns, *(np.asarray(c, np.int64) for c, _ in feature_rows)])
            values = np.concatenate([values, *(np.asarray(v, np.float32) for _, v in feature_rows)])
            rows = np.concatenate([rows, int(keep.sum()) + np.repeat(np.arange(len(feature_rows)),
                                                                     [len(c) for c, _ in feature_rows])])
        return ListingWords.from_entries([p for p, kept in zip(self.product_ids, keep) if kept] + list(product_ids),
                                           np.concatenate([self.labels[keep], np.asarray(labels, np.int32)]),
                                           columns, rows, values, self.width, **self.settings,
                                           exact_postings=self.exact_postings, candidates=self.candidates)

    def rerank(self, candidates: list[dict], similarities: np.ndarray, k: int,
               weight: float | None = None) -> list[dict]:
        """The k best of `candidates` (neighbours) by photo similarity + weight x word similarity (weight 0:
        the order they came in), each with its "word_similarity"."""
        weight = self.rerank_weight if weight is None else weight
        scored = []
        for position, candidate in enumerate(candidates):
            row = self.position.get(candidate["product_id"])  # None: a listing not in the vote's catalogue
            words = 0.0 if row is None else float(similarities[row])
            scored.append((candidate["similarity"] + weight * words if weight else 0.0, position, candidate, words))
        scored.sort(key=lambda item: (-item[0], item[1]))
        return [{**candidate, "word_similarity": round(words, 6)} for _, _, candidate, words in scored[:k]]


@dataclass
class TextReading:
    """One text as the model reads it, each part computed once: its TF-IDF row, its sentence vector and, on
    first use, its similarity to every catalogue listing (for the vote and the re-ranking alike)."""

    columns: np.ndarray
    values: np.ndarray
    listing_words: ListingWords | None = field(default=None, repr=False)
    sentence: np.ndarray | None = field(default=None, repr=False)  # (d,) the encoder's vector, if the model has one

    @cached_property
    def similarities(self) -> np.ndarray:
        """(listings,) ListingWords.similarities of this row."""
        if self.listing_words is None:
            raise ValueError("the text model has no catalogue vote: a text has no similarities to its listings")
        return self.listing_words.similarities(self.columns, self.values)


@dataclass
class TextModel:
    """The trained text classifier and the calibrations that turn scores into category probabilities."""

    classes: list[str]
    word_vocabulary: dict[str, int]
    char_vocabulary: dict[str, int]
    word_idf: np.ndarray
    char_idf: np.ndarray
    coef: np.ndarray  # (classes, word + char features) float32
    intercept: np.ndarray  # (classes,)
    calibrations: dict[str, tuple[np.ndarray, np.ndarray]] = field(default_factory=dict)  # kind -> (A, b)
    info: dict = field(default_factory=dict)  # settings and figures, for the model card
    listing_words: ListingWords | None = None  # the catalogue vote; its calibrations read the votes when set
    sentence_coef: np.ndarray | None = None  # (classes, d) the classifier's weights of the sentence vector
    encoder: "SentenceEncoder | None" = field(default=None, repr=False)  # makes the sentence vectors

    def __post_init__(self):
        width = len(self.word_vocabulary) + len(self.char_vocabulary)
        if self.coef.shape != (len(self.classes), width):
            raise ValueError(f"text model weights are {self.coef.shape}, expected ({len(self.classes)}, {width})")
        if (self.encoder is None) != (self.sentence_coef is None):
            raise ValueError("a text model has both a sentence encoder and its weights, or neither")
        if self.encoder is not None and self.sentence_coef.shape != (len(self.classes), self.encoder.dimension):
            raise ValueError(f"sentence weights are {self.sentence_coef.shape}, the encoder makes "
                             f"{self.encoder.dimension}-d vectors for {len(self.classes)} classes")

    @cached_property
    def reader_sha256(self) -> str:
        """The sha256 of how this model turns a text into its TF-IDF row (n-grams, vocabularies, idf): listings'
        words made by one model serve any other with the same reader."""
        digest = hashlib.sha256(json.dumps([list(WORD_NGRAMS), list(CHAR_NGRAMS),
                                            sorted(self.word_vocabulary, key=self.word_vocabulary.get),
                                            sorted(self.char_vocabulary, key=self.char_vocabulary.get)]).encode())
        for idf in (self.word_idf, self.char_idf):
            digest.update(np.ascontiguousarray(idf, np.float32).tobytes())
        return digest.hexdigest()

    def block(self, terms: list[str], vocabulary: dict[str, int], idf: np.ndarray,
              offset: int) -> tuple[np.ndarray, np.ndarray]:
        """(columns, L2-normalised sublinear TF-IDF values) of the known terms."""
        known = [vocabulary[term] for term in terms if term in vocabulary]
        if not known:
            return np.zeros(0, np.int64), np.zeros(0, np.float32)
        columns, counts = np.unique(np.asarray(known, np.int64), return_counts=True)
        values = (1.0 + np.log(counts)) * idf[columns]
        return columns + offset, (values / np.linalg.norm(values)).astype(np.float32)

    def features(self, text: str) -> tuple[np.ndarray, np.ndarray]:
        """The sparse TF-IDF row of one text: (columns, values)."""
        words = self.block(word_terms(text), self.word_vocabulary, self.word_idf, 0)
        chars = self.block(char_terms(text), self.char_vocabulary, self.char_idf, len(self.word_vocabulary))
        return np.concatenate([words[0], chars[0]]), np.concatenate([words[1], chars[1]])

    def read(self, text: str) -> TextReading:
        """One read of `text` that scores, votes and re-ranks alike take (instead of reading it each time)."""
        return self.readings([text])[0]

    def readings(self, texts: list[str | TextReading]) -> list[TextReading]:
        """Each of `texts` read (a TextReading is taken as it is); the strings' sentence vectors in one batch."""
        strings = [text for text in texts if not isinstance(text, TextReading)]
        sentences = iter(self.encoder.encode(strings) if self.encoder is not None and strings else ())
        return [text if isinstance(text, TextReading) else
                TextReading(*self.features(text), self.listing_words, next(sentences, None)) for text in texts]

    def scores(self, texts: list[str | TextReading]) -> np.ndarray:
        """(n, classes) float32 decision scores of the linear classifier; `texts`: strings or their readings."""
        readings = self.readings(texts)
        out = np.empty((len(texts), len(self.classes)), np.float32)
        for row, reading in enumerate(readings):
            out[row] = self.coef[:, reading.columns] @ reading.values + self.intercept
        if self.encoder is not None and readings:
            if any(reading.sentence is None for reading in readings):
                raise ValueError("a text read without a sentence vector, by a model whose classifier reads one")
            out += np.stack([reading.sentence for reading in readings]) @ self.sentence_coef.T
        return out

    def votes(self, texts: list[str | TextReading], exclude: list[str | None] | None = None) -> np.ndarray | None:
        """(n, classes) the catalogue vote of each text or reading (None without a catalogue); `exclude`: each
        text's own product id, left out of its vote (evaluation)."""
        if self.listing_words is None:
            return None
        exclude = exclude or [None] * len(texts)
        return np.stack([self.listing_words.vote(reading.similarities, len(self.classes), own)
                         for reading, own in zip(self.readings(texts), exclude)]).astype(np.float32)

    def probabilities(self, inputs, scores: np.ndarray, photo: np.ndarray | None = None,
                      votes: np.ndarray | None = None) -> np.ndarray:
        """(n, classes) category probabilities for requests that sent `inputs` (e.g. ("photo", "title")); `photo`:
        the photo model's probabilities (with a photo), `votes`: `self.votes(texts)` (with a catalogue vote)."""
        name = kind_name(inputs)
        if name not in self.calibrations:
            raise KeyError(f"no calibration for inputs {name!r}; the text model has {sorted(self.calibrations)}")
        if (votes is None) != (self.listing_words is None):
            raise ValueError("votes are required by a text model with a catalogue vote, and only by it")
        # What a calibration reads: [log photo probabilities (with a photo), log votes (with a vote), text scores].
        parts = [np.log(np.clip(photo, 1e-6, 1.0))] if PHOTO in inputs and photo is not None else []
        parts += [] if votes is None else [np.log(np.clip(votes, VOTE_FLOOR, 1.0))]
        features = np.hstack(parts + [np.asarray(scores, np.float32)]).astype(np.float32)
        matrix, bias = self.calibrations[name]
        return softmax(features @ matrix.T + bias).astype(np.float32)

    @property
    def reranks(self) -> bool:
        """Whether a photo + words request's neighbours are re-ranked by its words (from a pool of RERANK_POOL)."""
        return self.listing_words is not None and bool(self.listing_words.rerank_weight)

    def predict(self, inputs, texts: list[str | TextReading], photo: np.ndarray | None = None) -> np.ndarray:
        """(n, classes) category probabilities of `texts` (listing_text of each request's words, or readings)."""
        readings = self.readings(texts)
        return self.probabilities(inputs, self.scores(readings), photo, self.votes(readings))

    def save(self, directory: Path | str) -> None:
        from marketplace_search.sentences import copy_export

        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        document = {"format": FORMAT, "classes": self.classes, "word_ngrams": list(WORD_NGRAMS),
                    "char_ngrams": list(CHAR_NGRAMS), "calibrations": sorted(self.calibrations), "info": self.info,
                    "word_vocabulary": sorted(self.word_vocabulary, key=self.word_vocabulary.get),
                    "char_vocabulary": sorted(self.char_vocabulary, key=self.char_vocabulary.get)}
        arrays = {"word_idf": self.word_idf, "char_idf": self.char_idf, "coef": self.coef, "intercept": self.intercept}
        for name, (matrix, bias) in self.calibrations.items():
            arrays[f"calibration:{name}:A"], arrays[f"calibration:{name}:b"] = matrix, bias
        if self.encoder is not None:
            arrays["sentence_coef"] = self.sentence_coef
            document["sentence_encoder"] = {"folder": ENCODER_DIR, "sha256": self.encoder.sha256,
                                            "dimension": self.encoder.dimension}
            copy_export(self.encoder.folder, directory / ENCODER_DIR)
        arrays = {key: np.asarray(value, np.float32) for key, value in arrays.items()}
        if self.listing_words is not None:
            document["neighbours"] = {"product_ids": self.listing_words.product_ids, **self.listing_words.settings}
            arrays.update(self.listing_words.arrays(LISTING_WORDS_PREFIX))
        (directory / MODEL_FILE).write_text(json.dumps(document, ensure_ascii=False))
        write_npz(directory / WEIGHTS_FILE, arrays)

    @classmethod
    def load(cls, directory: Path | str, encoder: "SentenceEncoder | None" = None) -> "TextModel":
        """Load a folder written by `save`. ENCODER: this model's sentence encoder, already loaded (checked)."""
        directory = Path(directory)
        document = json.loads((directory / MODEL_FILE).read_text())
        if document.get("format") != FORMAT:
            raise ValueError(f"{directory / MODEL_FILE} is format {document.get('format')!r}, retired (this code reads "
                             f"{FORMAT}): rebuild it with `python -m training.text --work WORK --run RUN`, then "
                             f"archive the run again (`python -m scripts.archive --run RUN`)")
        if tuple(document["word_ngrams"]) != WORD_NGRAMS or tuple(document["char_ngrams"]) != CHAR_NGRAMS:
            raise ValueError(f"{directory / MODEL_FILE} was trained on other n-grams than this code cuts")
        arrays = read_npz(directory / WEIGHTS_FILE, {LISTING_WORDS_PREFIX + name for name in MAPPED_ARRAYS})
        calibrations = {name: (arrays[f"calibration:{name}:A"], arrays[f"calibration:{name}:b"])
                        for name in document["calibrations"]}
        stored = document.get("neighbours")
        listing_words = None if stored is None else ListingWords.from_arrays(
            arrays, stored["product_ids"], LISTING_WORDS_PREFIX, k=int(stored["k"]),
            temperature=float(stored["temperature"]), rerank_weight=float(stored["rerank_weight"]),
            fill=bool(stored["fill"]))
        stored_encoder = document.get("sentence_encoder")
        encoder = None if stored_encoder is None else load_encoder(directory, stored_encoder, encoder)
        return cls(document["classes"], {term: i for i, term in enumerate(document["word_vocabulary"])},
                   {term: i for i, term in enumerate(document["char_vocabulary"])}, arrays["word_idf"],
                   arrays["char_idf"], arrays["coef"], arrays["intercept"], calibrations, document["info"],
                   listing_words, arrays.get("sentence_coef"), encoder)


def load_encoder(directory: Path, stored: dict, loaded: "SentenceEncoder | None" = None) -> "SentenceEncoder":
    """The text model's sentence encoder (LOADED when given), checked against the one it was trained with."""
    from marketplace_search.sentences import SentenceEncoder

    encoder = SentenceEncoder(Path(directory) / stored["folder"]) if loaded is None else loaded
    if encoder.sha256 != stored["sha256"] or encoder.dimension != stored["dimension"]:
        raise ValueError(f"{encoder.folder} is not the sentence encoder {Path(directory) / MODEL_FILE} was trained "
                         f"with (sha256 {stored['sha256'][:12]}..., {stored['dimension']}-d)")
    return encoder


def save_listing_words(path: Path | str, listing_words: ListingWords, reader_sha256: str) -> None:
    """A live generation's words: LISTING_WORDS' rows (not its settings, the model's) and READER_SHA256."""
    write_npz(path, {"product_ids": np.asarray(listing_words.product_ids, dtype=str), **listing_words.arrays(),
                     "reader_sha256": np.asarray(reader_sha256)})


def load_listing_words(path: Path | str) -> tuple[ListingWords, str]:
    """(the ListingWords save_listing_words wrote, default settings; its reader_sha256)."""
    arrays = read_npz(path, set(MAPPED_ARRAYS))
    return ListingWords.from_arrays(arrays, arrays["product_ids"].tolist()), str(arrays["reader_sha256"])


def write_npz(path: Path | str, arrays: dict[str, np.ndarray]) -> None:
    """An uncompressed .npz (read_npz maps it) replacing PATH atomically: a reader of the old file keeps it."""
    with replaced_atomically(path) as temporary, open(temporary, "wb") as out:
        np.savez(out, **arrays)


def read_npz(path: Path | str, mapped: set[str]) -> dict[str, np.ndarray]:
    """Every array of an .npz (nothing unpickled), those in MAPPED memory-mapped read-only when stored so, for the
    workers of a host to share; numpy maps no .npz member, so the offset is read from the zip and .npy headers."""
    arrays = {}
    with zipfile.ZipFile(path) as archive, open(path, "rb") as raw:
        for info in archive.infolist():
            name = info.filename.removesuffix(".npy")
            if name not in mapped or info.compress_type != zipfile.ZIP_STORED:  # np.savez_compressed: read whole
                with archive.open(info) as member:
                    arrays[name] = np.lib.format.read_array(member, allow_pickle=False)
                continue
            raw.seek(info.header_offset)
            name_length, extra_length = struct.unpack("<HH", raw.read(30)[26:30])
            raw.seek(info.header_offset + 30 + name_length + extra_length)
            version = np.lib.format.read_magic(raw)
            read_header = np.lib.format.read_array_header_1_0 if version == (1, 0) else \
                np.lib.format.read_array_header_2_0
            shape, fortran_order, dtype = read_header(raw)
            if dtype.hasobject:
                raise ValueError(f"{path}: {name} holds Python objects; nothing is unpickled here")
            arrays[name] = np.zeros(shape, dtype) if not np.prod(shape) else np.memmap(
                path, dtype, "r", raw.tell(), shape, "F" if fortran_order else "C")
    return arrays
