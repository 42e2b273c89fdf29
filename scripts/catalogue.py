"""The live catalogue: remove sold listings at once, add new ones in minutes, without a new model version; the
workers of an archive built with `scripts.archive --live-catalogue LIVE` follow it (docs/live-catalogue.md)."""
import faiss  # noqa: F401  (before torch: both bring an OpenMP runtime, and this order is the safe one)

import argparse
import json
import sys
import tempfile
import time
from contextlib import ExitStack, contextmanager
from pathlib import Path

import numpy as np

from marketplace_search.files import sha256_file
from marketplace_search.layout import (ARCHIVE_CATALOGUE, ARCHIVE_MANIFEST, ARCHIVE_TEXT_MODEL, CHECKPOINT,
                                       EMBEDDINGS_DIR, INDEX_DIR, TEXT_MODEL_DIR)
from marketplace_search.live import (CURRENT_FILE, list_generations, load_generation, now, prune_generations,
                                     read_current, read_removed, write_generation, write_removed, writer_lock)
from marketplace_search.search import Catalogue
from marketplace_search.text import WEIGHTS_FILE, ListingWords, TextModel
# torch, the training stages and the archive reader are imported where used, so that `remove` returns at once.


class CatalogueError(ValueError):
    """A change the live folder refuses (other weights, nothing to add, no generation yet)."""


@contextmanager
def served_model(args):
    """(checkpoint, catalogue folder, text model folder) of the served model: the run's or the archive's."""
    if bool(args.archive) == bool(args.run):
        raise CatalogueError("give the served model as --archive MAR (or its extracted folder) or --run RUN")
    if args.run:
        yield args.run / CHECKPOINT, args.run / INDEX_DIR, args.run / TEXT_MODEL_DIR
        return
    from scripts.records import FatalError, model_folder

    with ExitStack() as stack:
        try:
            folder = stack.enter_context(model_folder(args.archive))
        except FatalError as error:
            raise CatalogueError(str(error)) from error
        manifest = json.loads((folder / ARCHIVE_MANIFEST).read_text())
        yield folder / manifest["model"]["serializedFile"], folder / ARCHIVE_CATALOGUE, folder / ARCHIVE_TEXT_MODEL


def all_vectors(catalogue: Catalogue) -> np.ndarray:
    """Every vector of a catalogue's index, in row order (exact for flat, HNSW and IVF-flat indexes)."""
    index = faiss.downcast_index(catalogue.index)
    if isinstance(index, faiss.IndexIVF):
        index.make_direct_map()
    elif isinstance(index, faiss.IndexHNSWSQ) or not isinstance(index, (faiss.IndexFlat, faiss.IndexHNSWFlat)):
        print(f"warning: {type(index).__name__} stores approximate vectors: the seed reconstructs them; "
              f"seed from --run (its exact embeddings) for exact ones", file=sys.stderr)
    return catalogue.index.reconstruct_n(0, catalogue.index.ntotal)


def seed_from(args, checkpoint: Path, index_dir: Path) -> tuple[Catalogue, np.ndarray, str, str]:
    """(catalogue, its exact vectors, the sha256 of the weights that made them, where they came from)."""
    weights = sha256_file(checkpoint)
    catalogue = Catalogue.load(index_dir)
    if args.archive:
        vectors, source = all_vectors(catalogue), f"archive {args.archive}"
    else:
        vectors, source = run_vectors(args.run, catalogue), f"run {args.run}"
    indexed_with = catalogue.meta.get("model", {}).get("checkpoint_sha256")
    if indexed_with and indexed_with != weights:
        raise CatalogueError(f"the catalogue of {source} was embedded by checkpoint sha256 {indexed_with[:12]}, "
                             f"not by its checkpoint {weights[:12]}")
    return catalogue, vectors, weights, source


def run_vectors(run: Path, catalogue: Catalogue) -> np.ndarray:
    """The run's exact embeddings in the index's row order (a run without embeddings/: from the index)."""
    from training.data import load_embeddings

    if not (run / EMBEDDINGS_DIR).is_dir():
        return all_vectors(catalogue)
    image_ids, embeddings, _, _ = load_embeddings(run)
    row = {image_id: position for position, image_id in enumerate(image_ids)}
    missing = [image_id for image_id in catalogue.image_ids if image_id not in row]
    if missing:
        raise CatalogueError(f"{run / EMBEDDINGS_DIR} lacks {len(missing)} indexed photos, e.g. {missing[0]}")
    return embeddings[[row[image_id] for image_id in catalogue.image_ids]]


def served_text_model(folder: Path) -> tuple[TextModel | None, str | None]:
    """(the text model in FOLDER, its reader_sha256), or (None, None) when there is none with listings' words."""
    if not (folder / WEIGHTS_FILE).is_file():
        return None, None
    model = TextModel.load(folder)
    return (model, model.reader_sha256) if model.listing_words is not None else (None, None)


def init(args) -> dict:
    with writer_lock(args.live):
        if read_current(args.live) is not None and not args.force:
            raise CatalogueError(f"{args.live} already has generations ({read_current(args.live)['name']} is "
                                 f"current); --force publishes the seed as the next one")
        with served_model(args) as (checkpoint, index_dir, text_dir):
            catalogue, vectors, weights, source = seed_from(args, checkpoint, index_dir)
            text_model, text_sha256 = served_text_model(text_dir)
            listing_words = text_model and text_model.listing_words
            number = publish(args.live, catalogue, vectors, catalogue.image_ids, catalogue.listings, weights,
                             {"seeded_from": source}, listing_words, text_sha256)
    return {"generation": number, "photos": len(catalogue.image_ids), "seeded_from": source,
            "listings_by_words": len(listing_words.product_ids) if listing_words else 0}


def remove(args) -> dict:
    """Returns once the removal list is durable; it reads no generation, which takes longer than the removal."""
    with writer_lock(args.live):
        removed = read_removed(args.live)
        added = [product for product in args.product_ids if product not in removed]
        removed.update(dict.fromkeys(added, now()))
        write_removed(args.live, removed)
    return {"removed": added, "already_removed": sorted(set(args.product_ids) - set(added)),
            "removal_list": len(removed)}


def publish(live: Path, generation_of: Catalogue, vectors: np.ndarray, image_ids: list[str], listings: dict,
            weights: str, change: dict, words: ListingWords | None, words_sha256: str | None) -> int:
    """The next generation, indexed as GENERATION_OF is."""
    return write_generation(live, vectors, image_ids, listings, weights, change, generation_of.meta["index"]["type"],
                            {"model": generation_of.meta.get("model", {})}, words, words_sha256)


def add(args) -> dict:
    from marketplace_search.models import load_checkpoint
    from training.index import listing_metadata
    from scripts.refresh import photo_embedder, photo_size, prepare_work

    with (tempfile.TemporaryDirectory(prefix="catalogue-add-") as scratch, writer_lock(args.live),
          served_model(args) as (checkpoint_path, _, text_dir)):
        generation = load_generation(args.live)
        weights = sha256_file(checkpoint_path)
        embedded_with = generation.info["model"]["checkpoint_sha256"]
        if weights != embedded_with:
            raise CatalogueError(f"generation {generation.number} of {args.live} was embedded by checkpoint sha256 "
                                 f"{embedded_with[:12]}, the model given is {weights[:12]}: one generation holds "
                                 f"vectors of one model; seed a live folder of its own for this model")
        model, checkpoint = load_checkpoint(checkpoint_path)
        size = photo_size(checkpoint)
        laps = [time.perf_counter()]  # clean, embed, index
        work = Path(scratch) / "work"
        table, _, _, dropped = prepare_work(args.data, work, size, args.workers)
        if table.empty:
            raise CatalogueError(f"{args.data} has no listing with a usable photo ({dropped}): nothing to add")
        laps.append(time.perf_counter())
        new_vectors, _ = photo_embedder(model, checkpoint, work, 0)(table)
        laps.append(time.perf_counter())
        old = generation.catalogue
        new_listings = listing_metadata(table)
        new_products = {listing["product_id"] for listing in new_listings.values()}
        keep = [row for row, image_id in enumerate(old.image_ids)
                if image_id not in new_listings and old.listings[image_id]["product_id"] not in new_products]
        image_ids = [old.image_ids[row] for row in keep] + list(table["image_id"])
        vectors = np.concatenate([generation.vectors[keep], new_vectors])
        listings = {**{image_id: old.listings[image_id] for image_id in image_ids[:len(keep)]}, **new_listings}
        replaced = len({listing["product_id"] for listing in old.listings.values()} & new_products)
        change = {"added_photos": len(table), "added_listings": len(new_products) - replaced,
                  "replaced_listings": replaced, "dropped": dropped, "data": str(args.data.resolve())}
        listing_words, text_sha256 = added_listing_words(text_dir, generation, new_listings, new_products, work, change)
        number = publish(args.live, old, vectors, image_ids, listings, weights, change, listing_words, text_sha256)
        laps.append(time.perf_counter())
        removed = read_removed(args.live)  # after CURRENT names the new generation (marketplace_search.live)
        back = sorted(new_products & removed.keys())
        if back:
            write_removed(args.live, {product: when for product, when in removed.items() if product not in back})
    seconds = [round(end - start, 2) for start, end in zip(laps, laps[1:])]
    return {"generation": number, "photos": len(image_ids), **change, "back_from_removal_list": back,
            "seconds": dict(zip(("clean_s", "embed_s", "index_s"), seconds)), "photo_size": size}


def added_listing_words(text_dir: Path, generation, new_listings: dict[str, dict], new_products: set[str], work: Path,
                change: dict) -> tuple[ListingWords | None, str | None]:
    """The generation's words (the text model's own if another text model made them) with the new listings' in,
    when the served model reads titles; CHANGE gets the counts."""
    from training.text import listing_word_rows, read_listings

    text_model, text_sha256 = served_text_model(text_dir)
    if text_model is None:
        return None, None
    base = generation.listing_words if generation.listing_words_sha256 == text_sha256 else text_model.listing_words
    product_ids, labels, rows = listing_word_rows(text_model, new_listings.values(), read_listings(work))
    change["words"] = {"added_listings": len(product_ids), "unknown_category": len(new_products) - len(product_ids),
                       "from": "generation" if base is generation.listing_words else "text model"}
    return base.changed(drop=new_products, product_ids=product_ids, labels=labels, feature_rows=rows), text_sha256


def compact(args) -> dict:
    with writer_lock(args.live):
        generation = load_generation(args.live)
        removed = read_removed(args.live)
        old = generation.catalogue
        keep = [row for row, image_id in enumerate(old.image_ids) if old.listings[image_id]["product_id"] not in removed]
        image_ids = [old.image_ids[row] for row in keep]
        folded = {listing["product_id"] for listing in old.listings.values()} & removed.keys()
        change = {"compacted": {"removed_listings": len(folded), "removed_photos": len(old.image_ids) - len(keep)}}
        listing_words = generation.listing_words and generation.listing_words.changed(drop=removed.keys())
        number = publish(args.live, old, generation.vectors[keep], image_ids,
                         {image_id: old.listings[image_id] for image_id in image_ids},
                         generation.info["model"]["checkpoint_sha256"], change, listing_words,
                         generation.listing_words_sha256)
        # Every id read above is absent from the new generation, which CURRENT already names.
        write_removed(args.live, {product: when for product, when in read_removed(args.live).items()
                                  if product not in removed})
    return {"generation": number, "photos": len(image_ids), **change["compacted"]}


def prune(args) -> dict:
    with writer_lock(args.live):
        try:
            deleted = prune_generations(args.live, args.keep)
        except ValueError as error:
            raise CatalogueError(str(error)) from error
        return {"deleted": deleted, "kept": list_generations(args.live)}


def status(args) -> dict:
    removed = read_removed(args.live)  # before CURRENT, as the workers read them
    current = read_current(args.live)
    if current is None:
        return {"live": str(args.live), "generation": None, "removed": len(removed),
                "note": f"no {CURRENT_FILE}: workers serve their archive's catalogue snapshot"}
    generation = load_generation(args.live)
    listings = {listing["product_id"] for listing in generation.catalogue.listings.values()}
    return {"live": str(args.live), "generation": generation.number, "published": current["published"],
            "photos": len(generation.catalogue.image_ids), "listings": len(listings),
            "removed": len(removed), "removed_in_generation": len(listings & removed.keys()),
            "model": {**generation.catalogue.meta.get("model", {}), **generation.info["model"]},
            "index": generation.info.get("index"), "words": generation.info.get("words"),
            "created": generation.info["created"], "change": generation.info.get("change"),
            "generations": list_generations(args.live)}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m scripts.catalogue", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--live", required=True, type=Path, help="the live catalogue folder")
    commands = parser.add_subparsers(dest="command", required=True)

    def model_options(command):
        command.add_argument("--archive", type=Path, help="the served archive (.mar or its extracted folder)")
        command.add_argument("--run", type=Path, help="or the training run whose checkpoint it serves")

    seed = commands.add_parser("init", help="seed generation 1 from an archive or a run")
    model_options(seed)
    seed.add_argument("--force", action="store_true", help="publish the seed even if LIVE has generations")
    gone = commands.add_parser("remove", help="sold or withdrawn listings: out of every answer at once")
    gone.add_argument("product_ids", nargs="+", metavar="PRODUCT_ID")
    new = commands.add_parser("add", help="new listings (raw format) into a new generation")
    new.add_argument("--data", required=True, type=Path, help="Products.csv, Images.csv, images/")
    model_options(new)
    new.add_argument("--workers", type=int, default=2, help="photo normalisation processes")
    commands.add_parser("status", help="the current generation and the removal list")
    commands.add_parser("compact", help="fold the removal list into a new generation")
    trim = commands.add_parser("prune", help="delete old generations (each holds a full index and vectors)")
    trim.add_argument("--keep", type=int, default=3, help="newest generations kept, the current one among them "
                      "(at least 2: a worker may still be loading the one before the current)")
    return parser


def main(argv=None) -> dict:
    args = build_parser().parse_args(argv)
    try:
        result = {"init": init, "remove": remove, "add": add, "status": status, "compact": compact,
                  "prune": prune}[args.command](args)
    except (CatalogueError, FileNotFoundError) as error:
        raise SystemExit(f"{args.command} refused: {error}") from error
    print(json.dumps(result, indent=2, default=str))
    return result


if __name__ == "__main__":
    main()
