"""Send a photo to the served model and print its category and the most similar listings.

  python -m scripts.client photo.jpg
  python -m scripts.client photo.jpg --k 5 --category "Home & Garden" --url http://127.0.0.1:8080
  python -m scripts.client photo.jpg --json            # the raw answer JSON
  python -m scripts.client photo.jpg --title "Ikea Kallax shelf, white"   # category from photo + title
  python -m scripts.client --title "Ikea Kallax shelf, white"             # the words alone

The same call with curl (options as headers, since TorchServe drops a POST's query string):
  curl -H 'Content-Type: image/jpeg' -H 'X-K: 5' --data-binary @photo.jpg http://127.0.0.1:8080/predictions/marketplace
  curl -F photo=@photo.jpg -F k=5 -F category='Home & Garden' http://127.0.0.1:8080/predictions/marketplace
With tokens on, add -H "Authorization: Bearer KEY" with the "inference" key of the server's key_file.json
(this command reads it from logs/key_file.json, the folder scripts.serve runs from, or --key-file, --token,
$TS_TOKEN).
"""
import argparse
import json
import sys
from pathlib import Path

from scripts import api


def format_price(price) -> str:
    return "" if price is None else f"£{price:,.2f}"


def format_answer(answer: dict) -> str:
    """Category, probability and a neighbours table, as printed by the CLI."""
    lines = [f"category: {answer['category']} ({answer['probability']:.1%})",
             "also: " + ", ".join(f"{c['category']} {c['probability']:.1%}" for c in answer["top_categories"][1:]),
             f"model: {answer['model']['name']} {answer['model']['version']}"
             + (f" (from {' + '.join(answer['inputs'])})" if answer.get("inputs") else ""), ""]
    photo = "photo" in answer.get("inputs", ["photo"])
    words = any("word_similarity" in n for n in answer["neighbours"])
    header = ("#", "title", "price", "location", "category") + (("similarity",) if photo else ()) + (
        ("words",) if words else ())
    rows = [header]
    rows += [(str(rank), n["title"][:40], format_price(n["price"]), n["location"][:20], n["category"])
             + ((f"{n['similarity']:.3f}",) if photo else ())
             + ((f"{n['word_similarity']:.3f}" if "word_similarity" in n else "",) if words else ())
             for rank, n in enumerate(answer["neighbours"], 1)]
    widths = [max(len(row[column]) for row in rows) for column in range(len(rows[0]))]
    for row in rows:
        lines.append("  ".join(cell.rjust(width) if column in (0, 2) or column >= 5 else cell.ljust(width)
                               for column, (cell, width) in enumerate(zip(row, widths))).rstrip())
    return "\n".join(lines)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("photo", type=Path, nargs="?", help="the photo (leave out to send --title alone)")
    parser.add_argument("--url", default=api.DEFAULT_INFERENCE_URL, help="inference API address")
    parser.add_argument("--model", default="marketplace")
    parser.add_argument("--version", help="a registered version (default: the model's default version)")
    parser.add_argument("--k", type=int, help="number of similar listings (1-100, server default 10)")
    parser.add_argument("--category", help="only listings of this category")
    parser.add_argument("--embedding", action="store_true", help="also return the photo's embedding")
    parser.add_argument("--title", help="the listing's title: the category comes from photo + title")
    parser.add_argument("--json", action="store_true", help="print the answer JSON")
    parser.add_argument("--token", help="inference key when tokens are on (default: --key-file's, else $TS_TOKEN)")
    parser.add_argument("--key-file", type=Path, help="the server's key_file.json: its inference key is used "
                                                      "(default: logs/key_file.json, scripts.serve's)")
    args = parser.parse_args(argv)
    if args.photo is None and args.title is None:
        parser.error("send a photo, a --title or both")
    if args.photo is not None and not args.photo.is_file():
        raise SystemExit(f"{args.photo}: no such file")
    try:
        answer = api.predict(args.url, args.photo.read_bytes() if args.photo else None, model=args.model,
                             version=args.version, k=args.k, category=args.category, embedding=args.embedding,
                             title=args.title, token=api.resolve_token("inference", args.token, args.key_file))
    except api.ApiError as error:
        print(f"refused: {error}", file=sys.stderr)
        sys.exit(1)
    print(json.dumps(answer, indent=2, ensure_ascii=False) if args.json else format_answer(answer))


if __name__ == "__main__":
    main()
