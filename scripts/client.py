"""Send a photo, a title or both to the served model and print its category and the most similar listings."""
import argparse
import json
import sys
from pathlib import Path

from scripts import api


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
    rows = [header] + [
        (str(rank), n["title"][:40], "" if n["price"] is None else f"£{n['price']:,.2f}", n["location"][:20],
         n["category"]) + ((f"{n['similarity']:.3f}",) if photo else ())
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
    parser.add_argument("--title", help="the listing's title: the category comes from photo + title")
    parser.add_argument("--json", action="store_true", help="print the answer JSON")
    api.add_key_arguments(parser, "inference")
    args = parser.parse_args(argv)
    if args.photo is None and args.title is None:
        parser.error("send a photo, a --title or both")
    if args.photo is not None and not args.photo.is_file():
        raise SystemExit(f"{args.photo}: no such file")
    try:
        answer = api.predict(args.url, args.photo.read_bytes() if args.photo else None, model=args.model,
                             version=args.version, k=args.k, category=args.category, title=args.title,
                             token=api.resolve_token("inference", args.token, args.key_file))
    except api.ApiError as error:
        print(f"refused: {error}", file=sys.stderr)
        sys.exit(1)
    print(json.dumps(answer, indent=2, ensure_ascii=False) if args.json else format_answer(answer))


if __name__ == "__main__":
    main()
