"""The answer's contract: what every client of /predictions can rely on, written down once. The handler builds
answers with these names (marketplace_search.inference.batch_answers); the batch job, the release canary, the
client and the tests read them from here."""
from typing import NotRequired, TypedDict, get_type_hints


class ModelInfo(TypedDict):
    name: str
    version: str
    backend: str  # what runs on the worker's machine, e.g. "openvino bf16" (marketplace_search.runtime)


class CatalogueInfo(TypedDict):
    """The catalogue generation that answered (0: the archive's own snapshot) and its searchable photos."""

    generation: int
    photos: int


class TopCategory(TypedDict):
    category: str
    probability: float


class Neighbour(TypedDict):
    """One listing near the query: its closest photo, its fields and the cosine (the words' without a photo)."""

    image_id: str
    product_id: str
    title: str
    price: float | None
    location: str
    category: str
    similarity: float
    word_similarity: NotRequired[float]  # a query with words: their cosine to the listing's (text model)


class Answer(TypedDict):
    category: str
    probability: float
    top_categories: list[TopCategory]
    neighbours: list[Neighbour]
    model: ModelInfo
    catalogue: CatalogueInfo
    inputs: list[str]  # what the category was made from: "photo", "title", "description"
    embedding: NotRequired[list[float]]  # only when asked for (option `embedding`)


class ErrorBody(TypedDict):
    """A refused request's JSON body, with the HTTP status repeated as `code`."""

    code: int
    type: str
    error: str


ANSWER_FIELDS = tuple(name for name in Answer.__annotations__ if name in Answer.__required_keys__)
NEIGHBOUR_FIELDS = tuple(name for name in Neighbour.__annotations__ if name in Neighbour.__required_keys__)
LISTING_FIELDS = tuple(name for name in NEIGHBOUR_FIELDS if name not in ("image_id", "similarity"))


class AnswerError(ValueError):
    """A 200 answer that breaks the contract."""


def check_answer(answer: dict) -> Answer:
    """`answer` itself if it keeps the contract (names and types); raises AnswerError naming what breaks it."""
    check_fields(answer, Answer, "answer")
    for top in answer["top_categories"]:
        check_fields(top, TopCategory, "top_categories[]")
    for neighbour in answer["neighbours"]:
        check_fields(neighbour, Neighbour, "neighbours[]")
    check_fields(answer["model"], ModelInfo, "model")
    check_fields(answer["catalogue"], CatalogueInfo, "catalogue")
    if not 0.0 <= answer["probability"] <= 1.0 or not answer["top_categories"]:
        raise AnswerError(f"bad category scores: {answer['probability']}, {answer['top_categories']}")
    if answer["top_categories"][0]["category"] != answer["category"]:
        raise AnswerError(f"category {answer['category']!r} is not the first of top_categories")
    return answer


def check_fields(value, schema: type, where: str) -> None:
    if not isinstance(value, dict):
        raise AnswerError(f"{where} is a {type(value).__name__}, not an object")
    required = schema.__required_keys__
    allowed = set(schema.__annotations__)
    missing, unknown = sorted(required - set(value)), sorted(set(value) - allowed)
    if missing or unknown:
        raise AnswerError(f"{where}: " + "; ".join(part for part in (
            missing and f"missing {', '.join(missing)}", unknown and f"unexpected {', '.join(unknown)}") if part)
            + f" ({str(value)[:200]})")
    for name, kind in get_type_hints(schema).items():
        if name in value and not is_instance(value[name], kind):
            raise AnswerError(f"{where}.{name} = {value[name]!r} is not {kind}")


def is_instance(value, kind) -> bool:
    """isinstance for the few annotation forms used above (plain types, X | None, list[X], TypedDicts)."""
    origin = getattr(kind, "__origin__", None)
    if origin is list:
        return isinstance(value, list)
    if hasattr(kind, "__args__") and origin is None:  # a union such as float | None
        return any(is_instance(value, arg) for arg in kind.__args__)
    if isinstance(kind, type) and issubclass(kind, dict):  # TypedDict: checked field by field
        return isinstance(value, dict)
    if kind is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    return isinstance(value, kind)
