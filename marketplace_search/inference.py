"""Answering queries without TorchServe: request parsing, batched search, the words, the answer JSON. A request is
TorchServe's dict of one call's parts: {"body": photo bytes or JSON parsed by TorchServe} or multipart {"photo":
bytes, "k": "5", ...}; options and `title` also come as X-K, X-Category, X-Embedding and X-Title headers (TorchServe
drops a POST's query string), a JSON or form field winning over a header."""
import base64
import binascii
import json
from collections import defaultdict
from dataclasses import dataclass, field

import numpy as np
import torch
from PIL import Image

from marketplace_search.images import MAX_PIXELS, ImageError, ImageTooLarge, UnsupportedFormat, decode_image
from marketplace_search.schema import ErrorBody
from marketplace_search.search import MAX_K, Catalogue
from marketplace_search.text import (DESCRIPTION, MAX_DESCRIPTION_CHARS, MAX_TITLE_CHARS, PHOTO, RERANK_POOL, TITLE,
                                     ListingWords, TextModel, TextReading, listing_text)

DEFAULT_K = 10
TOP_CATEGORIES = 3
OPTIONS = ("k", "category", "embedding")
BODY_PARTS = ("body", "data")  # "data" is what gRPC and KServe-style clients send
TEXT_FIELDS = (TITLE, DESCRIPTION)
TEXT_LIMITS = {TITLE: MAX_TITLE_CHARS, DESCRIPTION: MAX_DESCRIPTION_CHARS}
FIELDS = OPTIONS + TEXT_FIELDS
HEADER_OPTIONS = {f"x-{name}": name for name in (*OPTIONS, TITLE)}
TRUE_WORDS = {"true", "1", "yes", "on"}
FALSE_WORDS = {"false", "0", "no", "off", ""}


class RequestError(ValueError):
    """A request refused: an HTTP status (4xx for its content, 500 for our failure), a short type and a message."""

    def __init__(self, message: str, status: int = 400, kind: str = "bad_request"):
        super().__init__(message)
        self.status = status
        self.kind = kind

    def body(self) -> ErrorBody:
        return {"code": self.status, "type": self.kind, "error": str(self)}


@dataclass(frozen=True)
class Query:
    """One valid request: the decoded photo (None when only words were sent), the words and the options."""

    image: Image.Image | None = field(repr=False)
    k: int = DEFAULT_K
    category: str | None = None
    embedding: bool = False
    title: str | None = None
    description: str | None = None

    @property
    def inputs(self) -> list[str]:
        """What the answer was made from, as the answer's `inputs` names it."""
        return [name for name, value in ((PHOTO, self.image), (TITLE, self.title), (DESCRIPTION, self.description))
                if value is not None]


@dataclass
class Batch:
    """A handler batch: one slot per request, a Query or the RequestError that refused it; `images` stacks the
    valid queries' photos, `probabilities`, `vectors` (zeros without a photo) and `neighbours` are per valid query."""

    slots: list
    images: torch.Tensor | None = None
    probabilities: np.ndarray | None = None
    vectors: np.ndarray | None = None
    neighbours: list[list[dict]] | None = None
    milliseconds: dict[str, float] = field(default_factory=dict)

    @property
    def queries(self) -> list[Query]:
        return [slot for slot in self.slots if isinstance(slot, Query)]

    @property
    def photo_rows(self) -> list[int]:
        """Rows of `queries` (and of `probabilities`, `vectors`) that sent a photo: `images` in that order."""
        return [row for row, query in enumerate(self.queries) if query.image is not None]


def parse_request(request: dict, categories: list[str], content_type: str | None = None,
                  headers: dict | None = None, fit_size: int | None = None) -> Query:
    """Turn one TorchServe request dict into a Query; raises RequestError naming what is wrong. `content_type`
    tells a JSON body TorchServe could not parse from a photo; `fit_size`: see decode_image."""
    if not isinstance(request, dict) or not request:
        raise RequestError("empty request: send a photo as the body, a multipart file or JSON {\"image\": base64}",
                           kind="empty_request")
    parts = {**header_options(headers or {}), **request}
    body_name = next((name for name in BODY_PARTS if name in parts), None)
    if body_name is None:
        return make_query(pop_photo_field(parts), parts, categories, fit_size)
    body = parts.pop(body_name)
    json_declared = (content_type or "").split(";")[0].strip().lower() == "application/json"
    if isinstance(body, (bytes, bytearray)) and not json_declared and bytes(body[:64]).lstrip()[:1] != b"{":
        # An empty body with an X-Title header is a request for the words alone.
        return make_query(body if len(body) or TITLE not in parts else None, parts, categories, fit_size)
    document = parse_json_body(body)
    unknown = sorted(set(document) - {"image", *FIELDS})
    if unknown:
        raise RequestError(f"unknown JSON field(s) {', '.join(unknown)}; expected image, {', '.join(FIELDS)}",
                           kind="unknown_field")
    if document.get("image") is None and document.get(TITLE) is None:
        raise RequestError("JSON body has no \"image\" field (the photo, base64-encoded) and no \"title\"",
                           kind="missing_image")
    options = {**parts, **{name: document[name] for name in FIELDS if name in document}}
    photo = None if document.get("image") is None else decode_base64(document["image"])
    return make_query(photo, options, categories, fit_size)


def header_options(headers: dict) -> dict:
    """Options sent as X-K / X-Category / X-Embedding / X-Title request headers, by option name."""
    return {HEADER_OPTIONS[key.lower()]: header_text(value) for key, value in headers.items()
            if isinstance(key, str) and key.lower() in HEADER_OPTIONS}


def header_text(value):
    """A header value as the client's UTF-8 text: HTTP servers hand non-ASCII header bytes on as Latin-1."""
    if isinstance(value, str) and not value.isascii():
        try:
            return value.encode("latin-1").decode("utf-8")
        except (UnicodeEncodeError, UnicodeDecodeError):
            return value
    return value


def parse_json_body(body) -> dict:
    if isinstance(body, str) and not body.lstrip().startswith("{"):
        raise RequestError("text body is not a photo: send the photo bytes with an image Content-Type "
                           "or JSON {\"image\": base64}", 415, "unsupported_format")
    if isinstance(body, (bytes, bytearray, str)):
        try:
            body = json.loads(body if isinstance(body, str) else bytes(body).decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as error:
            raise RequestError(f"body is not valid JSON ({error})", kind="bad_json") from error
    if not isinstance(body, dict):
        raise RequestError(f"JSON body must be an object, got {type(body).__name__}", kind="bad_json")
    return body


def pop_photo_field(parts: dict) -> bytes | None:
    """The one multipart field that is not an option or text (None if there is none but a title); removes it."""
    fields = [name for name in parts if name not in FIELDS]
    if not fields:
        if TITLE in parts:
            return None
        raise RequestError("no photo in the request: send it as the body or as a multipart file field, "
                           "or send a title", kind="missing_image")
    if len(fields) > 1:
        raise RequestError(f"one photo per request: got fields {', '.join(sorted(fields))} besides options "
                           f"({', '.join(FIELDS)})", kind="unknown_field")
    photo = parts.pop(fields[0])
    if not isinstance(photo, (bytes, bytearray)):
        raise RequestError(f"field {fields[0]!r} holds text, not a photo file", 415, "unsupported_format")
    return bytes(photo)


def decode_base64(value) -> bytes:
    if not isinstance(value, str) or not value:
        raise RequestError("\"image\" must be a non-empty base64 string", kind="bad_base64")
    if value.startswith("data:") and "," in value:  # a data URL: data:image/jpeg;base64,....
        value = value.split(",", 1)[1]
    try:
        return base64.b64decode(value, validate=True)
    except (binascii.Error, ValueError) as error:
        raise RequestError(f"\"image\" is not valid base64 ({error})", kind="bad_base64") from error


def make_query(photo: bytes | None, options: dict, categories: list[str], fit_size: int | None = None) -> Query:
    unknown = sorted(set(options) - set(FIELDS))
    if unknown:
        raise RequestError(f"unknown option(s) {', '.join(unknown)}; expected {', '.join(FIELDS)}",
                           kind="unknown_field")
    k = parse_k(options.get("k", DEFAULT_K))  # options first: they are cheap to check, the photo is not
    category = parse_category(options.get("category"), categories)
    embedding = parse_bool(options.get("embedding", False), "embedding")
    title, description = (parse_text(options.get(name), name) for name in TEXT_FIELDS)
    if description is not None and title is None:
        raise RequestError("a description needs a title: send the listing's title too", kind="missing_title")
    if photo is None and title is None:
        raise RequestError("send a photo, a title or both", kind="missing_image")
    if photo is None and embedding:
        raise RequestError("option embedding needs a photo (the embedding is the photo's); send one, or drop "
                           "the option", kind="missing_image")
    image = None if photo is None else read_photo(photo, fit_size=fit_size)
    return Query(image, k, category, embedding, title, description)


def parse_text(value, name: str) -> str | None:
    """A title or description: UTF-8 text, not empty, at most TEXT_LIMITS[name] characters (413 above)."""
    if value is None:
        return None
    if not isinstance(value, (bytes, bytearray, str)):
        raise RequestError(f"{name} must be text, got {type(value).__name__}", kind="bad_text")
    text = as_text(value, name, "bad_text")
    if not text:
        raise RequestError(f"{name} is empty", kind="bad_text")
    if len(text) > TEXT_LIMITS[name]:
        raise RequestError(f"{name} is {len(text)} characters long; at most {TEXT_LIMITS[name]} are read",
                           413, "text_too_long")
    return text


def as_text(value, name: str = "option", kind: str = "bad_request") -> str:
    if isinstance(value, (bytes, bytearray)):
        try:
            return bytes(value).decode("utf-8").strip()
        except UnicodeDecodeError as error:
            raise RequestError(f"{name} {bytes(value)[:20]!r} is not UTF-8 text ({error})", kind=kind) from error
    return str(value).strip()


def parse_k(value) -> int:
    if isinstance(value, bool) or isinstance(value, float):
        raise RequestError(f"k must be an integer, got {value!r}", kind="bad_option")
    if not isinstance(value, int):
        text = as_text(value)
        try:
            value = int(text)
        except ValueError as error:
            raise RequestError(f"k must be an integer, got {text!r}", kind="bad_option") from error
    if not 1 <= value <= MAX_K:
        raise RequestError(f"k must be between 1 and {MAX_K}, got {value}", kind="bad_option")
    return value


def parse_category(value, categories: list[str]) -> str | None:
    category = "" if value is None else as_text(value)
    if not category:
        return None
    if category not in categories:
        raise RequestError(f"unknown category {category!r}; known categories: {', '.join(categories)}",
                           kind="bad_option")
    return category


def parse_bool(value, name: str) -> bool:
    if isinstance(value, bool):
        return value
    text = as_text(value).lower()
    if text in TRUE_WORDS:
        return True
    if text in FALSE_WORDS:
        return False
    raise RequestError(f"{name} must be true or false, got {text!r}", kind="bad_option")


def read_photo(data: bytes, max_pixels: int = MAX_PIXELS, fit_size: int | None = None) -> Image.Image:
    """Decode an upload: 415 for a format we do not accept, 413 for one too large, 400 for anything else."""
    try:
        return decode_image(bytes(data), max_pixels=max_pixels, fit_size=fit_size)
    except UnsupportedFormat as error:
        raise RequestError(str(error), 415, "unsupported_format") from error
    except ImageTooLarge as error:
        raise RequestError(str(error), 413, "image_too_large") from error
    except ImageError as error:
        raise RequestError(str(error), kind="invalid_image") from error


def internal_error() -> RequestError:
    """The answer for a request that failed on our side: a 500 that says nothing of the cause (it is logged)."""
    return RequestError("internal error while preparing this request; it has been logged", 500, "internal_error")


def search_batch(catalogue: Catalogue, vectors: np.ndarray, queries: list[Query], vote_k: int = 0,
                 pool_k: int = 0) -> tuple[list[list[dict]], list[list[dict]]]:
    """`(neighbours, voters)` per query: one catalogue search per distinct category filter, at the group's
    largest depth, each answer cut to its k (with words: `pool_k`, the pool text_neighbours re-ranks).
    `voters`: the nearest `vote_k` listings of the whole catalogue, for CategoryBlend."""
    groups: dict[str | None, list[int]] = defaultdict(list)
    for row, query in enumerate(queries):
        groups[query.category].append(row)
    depths = [max(query.k, pool_k) if query.title is not None else query.k for query in queries]
    answers: list[list[dict]] = [[] for _ in queries]
    voters: list[list[dict]] = [[] for _ in queries]
    for category, rows in groups.items():
        k = max(depths[row] for row in rows)
        found = catalogue.search(vectors[rows], k=k if category else max(k, vote_k), category=category)
        for row, neighbours in zip(rows, found):
            answers[row] = neighbours[:depths[row]]
            if category is None:
                voters[row] = neighbours[:vote_k]
    filtered = [row for row, query in enumerate(queries) if query.category is not None]
    if vote_k and filtered:  # their own search was filtered: the vote needs the whole catalogue
        for row, neighbours in zip(filtered, catalogue.search(vectors[filtered], k=vote_k)):
            voters[row] = neighbours
    return answers, voters


@dataclass(frozen=True)
class CategoryBlend:
    """(1 - weight) x the head's probabilities + weight x the shares of a vote of the `k` nearest listings, each
    weighted exp(similarity / temperature); chosen by training.evaluate (weight 0: the head alone)."""

    k: int = 10
    temperature: float = 0.1
    weight: float = 0.0

    @classmethod
    def from_dict(cls, settings: dict | None) -> "CategoryBlend":
        settings = settings or {}
        return cls(int(settings.get("k", cls.k)), float(settings.get("temperature", cls.temperature)),
                   float(settings.get("weight", cls.weight)))

    def to_dict(self) -> dict:
        return {"k": self.k, "temperature": self.temperature, "weight": self.weight}

    @property
    def vote_k(self) -> int:
        return self.k if self.weight > 0 else 0


def category_votes(voters: list[list[dict]], classes: list[str], k: int, temperature: float) -> np.ndarray:
    """(n, classes) shares of each query's `k` nearest listings' similarity-weighted votes (no voter: zeros)."""
    index = {category: position for position, category in enumerate(classes)}
    votes = np.zeros((len(voters), len(classes)), np.float64)
    for row, neighbours in enumerate(voters):
        for neighbour in neighbours[:k]:
            if neighbour["category"] in index:
                votes[row, index[neighbour["category"]]] += np.exp(neighbour["similarity"] / temperature)
    totals = votes.sum(axis=1, keepdims=True)
    return np.divide(votes, totals, out=np.zeros_like(votes), where=totals > 0)


def blend_categories(probabilities: np.ndarray, voters: list[list[dict]], classes: list[str],
                     blend: CategoryBlend) -> np.ndarray:
    """The head's probabilities blended with the neighbours' votes (rows without votes: the head's)."""
    if blend.weight <= 0:
        return probabilities
    return mix_votes(probabilities, category_votes(voters, classes, blend.k, blend.temperature), blend.weight)


def mix_votes(probabilities: np.ndarray, votes: np.ndarray, weight: float) -> np.ndarray:
    voted = votes.sum(axis=1, keepdims=True) > 0
    return np.where(voted, (1 - weight) * probabilities + weight * votes, probabilities).astype(np.float32)


def top_categories(probabilities: np.ndarray, classes: list[str], n: int = TOP_CATEGORIES) -> list[dict]:
    order = np.argsort(-probabilities, kind="stable")[:n]
    return [{"category": classes[i], "probability": round(float(probabilities[i]), 6)} for i in order]


def read_words(text_model: TextModel | None, queries: list[Query]) -> list[TextReading | None]:
    """Each query's words read once, for its category and neighbours alike (the batch's sentence vectors in one
    call of the encoder); None without words."""
    if text_model is None and any(query.title is not None for query in queries):
        raise ValueError("queries with words reached a handler without a text model")
    worded = [query for query in queries if query.title is not None]
    readings = iter(text_model.readings([listing_text(query.title, query.description) for query in worded])
                    if worded else ())
    return [None if query.title is None else next(readings) for query in queries]


def text_categories(text_model: TextModel | None, queries: list[Query], probabilities: np.ndarray,
                    readings: list[TextReading | None]) -> np.ndarray:
    """Each query's category probabilities: the photo's alone, else the text model's calibration for its inputs."""
    out = np.array(probabilities, np.float32, copy=True)
    for row, query in enumerate(queries):
        if query.title is not None:
            photo = probabilities[row:row + 1] if query.image is not None else None
            out[row] = text_model.predict(query.inputs, [readings[row]], photo)[0]
    return out


def text_neighbours(text_model: TextModel | None, queries: list[Query], neighbours: list[list[dict]],
                    readings: list[TextReading | None], catalogue: Catalogue, vectors: np.ndarray) -> list[list[dict]]:
    """Each query's neighbours given its words: photo + words, its photo pool (joined by the listings nearest by
    words when the model fills) re-ranked by photo + word similarity; words alone, the listings nearest by words."""
    if text_model is None or text_model.listing_words is None:
        return neighbours
    listing_words, out = text_model.listing_words, list(neighbours)
    for row, query in enumerate(queries):
        if query.title is None:
            continue
        similarities = readings[row].similarities
        if query.image is None:
            out[row] = found_by_words(catalogue, listing_words, text_model.classes, similarities, query.k,
                                      query.category)
            continue
        pool = neighbours[row]
        if listing_words.fill and listing_words.rerank_weight:
            pool = words_pool(catalogue, listing_words, text_model.classes, similarities, vectors[row],
                              query.category, pool)
        out[row] = listing_words.rerank(pool, similarities, query.k)
    return out


def _label(classes: list[str], category: str | None) -> int | None:
    """The text model's class index of a category filter (-1: a category it does not know: no listing)."""
    return None if category is None else classes.index(category) if category in classes else -1


def words_pool(catalogue: Catalogue, listing_words: ListingWords, classes: list[str], similarities: np.ndarray,
               vector: np.ndarray, category: str | None, pool: list[dict], exclude: str | None = None) -> list[dict]:
    """POOL (a query's photo neighbours) and the RERANK_POOL listings nearest by words not in it, each with its
    photo nearest VECTOR (Catalogue.listings_of). EXCLUDE: a product id left out (evaluation)."""
    taken = {neighbour["product_id"] for neighbour in pool} | ({exclude} if exclude else set())
    found = [product_id for product_id, _ in listing_words.nearest(similarities, RERANK_POOL, _label(classes, category),
                                                                   taken)]
    entries = catalogue.listings_of(found, vector, category)
    return pool + [entries[product_id] for product_id in found if product_id in entries]


def found_by_words(catalogue: Catalogue, listing_words: ListingWords, classes: list[str], similarities: np.ndarray,
                   k: int, category: str | None = None, exclude: str | None = None) -> list[dict]:
    """The k listings nearest by words, each with its first photo and the words' cosine as both similarities."""
    found = listing_words.nearest(similarities, max(k, RERANK_POOL), _label(classes, category), {exclude} - {None})
    entries = catalogue.listings_of([product_id for product_id, _ in found], None, category)
    return [{**entries[product_id], "similarity": round(similarity, 6), "word_similarity": round(similarity, 6)}
            for product_id, similarity in found if product_id in entries][:k]


def batch_answers(batch: Batch, classes: list[str], model: dict, catalogue: dict | None = None) -> list[dict]:
    """One answer per slot: the result for a Query (schema.Answer), the error body for a RequestError."""
    answers, row = [], 0
    for slot in batch.slots:
        if isinstance(slot, RequestError):
            answers.append(slot.body())
            continue
        top = top_categories(batch.probabilities[row], classes)
        answers.append({"category": top[0]["category"], "probability": top[0]["probability"], "top_categories": top,
                        "neighbours": batch.neighbours[row], "model": model,
                        **({"catalogue": catalogue} if catalogue else {}), "inputs": slot.inputs})
        if slot.embedding:
            answers[-1]["embedding"] = [float(x) for x in batch.vectors[row]]
        row += 1
    return answers
