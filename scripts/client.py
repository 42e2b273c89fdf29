"""Send a photo to the served model and print its category and the most similar listings.

  python -m scripts.client photo.jpg
  python -m scripts.client photo.jpg --k 5 --category "Home & Garden" --url http://127.0.0.1:8080
  python -m scripts.client photo.jpg --json            # the raw answer JSON

The same call with curl (options as headers, since TorchServe drops a POST's query string):
  curl -H 'Content-Type: image/jpeg' -H 'X-K: 5' --data-binary @photo.jpg http://127.0.0.1:8080/predictions/marketplace
  curl -F photo=@photo.jpg -F k=5 -F category='Home & Garden' http://127.0.0.1:8080/predictions/marketplace
With tokens on, add -H "Authorization: Bearer $TS_TOKEN" (the "inference" key of key_file.json).
"""
import argparse
import json
import os
import sys
from pathlib import Path

import requests

from scripts.serve import auth_headers, read_key_file

DEFAULT_URL = "http://127.0.0.1:8080"
CONTENT_TYPES = {b"\xff\xd8\xff": "image/jpeg", b"\x89PNG": "image/png", b"GIF8": "image/gif", b"RIFF": "image/webp",
                 b"BM": "image/bmp", b"II*\x00": "image/tiff", b"MM\x00*": "image/tiff"}


class PredictionError(RuntimeError):
    """The server refused the query (4xx/5xx); carries the status and its JSON message."""

    def __init__(self, status: int, message: str):
        super().__init__(f"{status}: {message}")
        self.status = status


def content_type(photo: bytes) -> str:
    """The image Content-Type from the file's magic bytes (TorchServe needs one for raw bodies)."""
    for magic, kind in CONTENT_TYPES.items():
        if photo.startswith(magic):
            return kind
    return "application/octet-stream"


def resolve_token(token: str | None = None, key_file: Path | str | None = None, api: str = "inference") -> str | None:
    """--token, else $TS_TOKEN, else the `api` key of --key-file; None when tokens are off."""
    if token:
        return token
    if os.environ.get("TS_TOKEN"):
        return os.environ["TS_TOKEN"]
    return read_key_file(Path(key_file), api) if key_file else None


def predict(url: str, photo: bytes, *, model: str = "marketplace", version: str | None = None,
            k: int | None = None, category: str | None = None, embedding: bool = False,
            token: str | None = None, timeout: float = 60) -> dict:
    """POST the photo bytes to /predictions/MODEL[/VERSION]; returns the answer JSON.

    Raises PredictionError with the server's message for a refused query.
    """
    headers = {"Content-Type": content_type(photo), **auth_headers(token)}
    if k is not None:
        headers["X-K"] = str(k)
    if category is not None:
        headers["X-Category"] = category
    if embedding:
        headers["X-Embedding"] = "true"
    path = f"/predictions/{model}" + (f"/{version}" if version else "")
    response = requests.post(url.rstrip("/") + path, data=photo, headers=headers, timeout=timeout)
    if not response.ok:
        raise PredictionError(response.status_code, error_text(response))
    return response.json()


def error_text(response: requests.Response) -> str:
    try:
        body = response.json()
    except ValueError:
        return response.text or response.reason
    return body.get("error") or body.get("message") or json.dumps(body)


def format_price(price) -> str:
    return "" if price is None else f"£{price:,.2f}"


def format_answer(answer: dict) -> str:
    """Category, probability and a neighbours table, as printed by the CLI."""
    lines = [f"category: {answer['category']} ({answer['probability']:.1%})",
             "also: " + ", ".join(f"{c['category']} {c['probability']:.1%}" for c in answer["top_categories"][1:]),
             f"model: {answer['model']['name']} {answer['model']['version']}", ""]
    rows = [("#", "title", "price", "location", "category", "similarity")]
    rows += [(str(rank), n["title"][:40], format_price(n["price"]), n["location"][:20], n["category"],
              f"{n['similarity']:.3f}") for rank, n in enumerate(answer["neighbours"], 1)]
    widths = [max(len(row[column]) for row in rows) for column in range(len(rows[0]))]
    for row in rows:
        lines.append("  ".join(cell.rjust(width) if column in (0, 2, 5) else cell.ljust(width)
                               for column, (cell, width) in enumerate(zip(row, widths))).rstrip())
    return "\n".join(lines)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("photo", type=Path)
    parser.add_argument("--url", default=DEFAULT_URL, help="inference API address")
    parser.add_argument("--model", default="marketplace")
    parser.add_argument("--version", help="a registered version (default: the model's default version)")
    parser.add_argument("--k", type=int, help="number of similar listings (1-100, server default 10)")
    parser.add_argument("--category", help="only listings of this category")
    parser.add_argument("--embedding", action="store_true", help="also return the photo's embedding")
    parser.add_argument("--json", action="store_true", help="print the answer JSON")
    parser.add_argument("--token", help="inference token when tokens are on (default: $TS_TOKEN)")
    parser.add_argument("--key-file", type=Path, help="TorchServe's key_file.json to read the token from")
    args = parser.parse_args(argv)
    if not args.photo.is_file():
        raise SystemExit(f"{args.photo}: no such file")
    try:
        answer = predict(args.url, args.photo.read_bytes(), model=args.model, version=args.version, k=args.k,
                         category=args.category, embedding=args.embedding,
                         token=resolve_token(args.token, args.key_file, "inference"))
    except PredictionError as error:
        print(f"refused: {error}", file=sys.stderr)
        sys.exit(1)
    print(json.dumps(answer, indent=2, ensure_ascii=False) if args.json else format_answer(answer))


if __name__ == "__main__":
    main()
