"""Refresh the catalogue of a trained run from new listings, as a new model version; weights unchanged.

DATA is the whole catalogue now, in the raw format; only photos without a vector in RUN, or whose bytes changed,
are embedded into a new run in WORK with RUN's weights and text model, archived as STORE/<name>-v<version>.mar;
--release registers, canaries and makes it the default (STORE must be the server's model store)."""
import faiss  # noqa: F401  (before torch: both bring an OpenMP runtime, and this order is the safe one)

import argparse
import json
import shutil
import sys
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import pandas as pd

from scripts.archive import add_serving_arguments, archive_path, build_archive
from scripts import api
from scripts.api import DEFAULT_INFERENCE_URL, DEFAULT_MANAGEMENT_URL
from scripts.versions import HISTORY_FILE, ReleaseError, release
from training import photos, tables
from training.data import (PHOTOS_DIR, PHOTOS_REPORT, SPLIT_FILE, claim_work_folder, embed_rows, load_embeddings,
                           read_training_table)
from training.dataset import drop_missing_photos
from training.embed import hash_photos, load_photo_hashes, save_embeddings
from training.index import listing_metadata
from training.text import catalogue_listing_words, read_listings
from marketplace_search.files import sha256_file
from marketplace_search.models import load_checkpoint
from marketplace_search.presets import Preprocess
from marketplace_search.layout import (CHECKPOINT, EMBEDDINGS_DIR, EVALUATION, GUARD_REPORTS, INDEX_DIR,
                                       TEXT_MODEL_DIR, new_run_dir, read_run_info, update_run_info)
from marketplace_search.search import LISTING_FIELDS, Catalogue, make_catalogue
from marketplace_search.text import TextModel

DEFAULT_PHOTO_SIZE = 512  # training.photos' default


def photo_size(checkpoint: dict, work_dir: Path | None = None) -> int:
    """The side the model's photos were normalised to, which new photos must match or their vectors drift: its
    training config's, else WORK_DIR's photos report's, else training.photos' default."""
    if checkpoint.get("config", {}).get("size"):
        return int(checkpoint["config"]["size"])
    if work_dir is not None and (work_dir / PHOTOS_DIR / PHOTOS_REPORT).is_file():
        return int(json.loads((work_dir / PHOTOS_DIR / PHOTOS_REPORT).read_text())["size"])
    return DEFAULT_PHOTO_SIZE


def photo_embedder(model, checkpoint: dict, work_dir: Path, workers: int):
    """rows -> (vectors, probabilities) of their photos normalised in WORK_DIR, as training.embed embeds them."""
    preprocess = Preprocess.from_dict(checkpoint["preprocess"])
    return lambda rows: embed_rows(model, preprocess, rows, work_dir / PHOTOS_DIR, workers=workers)


def prepare_work(data_dir: Path, work_dir: Path, size: int, workers: int, old_hashes: dict[str, str] | None = None
                 ) -> tuple[pd.DataFrame, dict[str, str], set[str], dict[str, int]]:
    """Stages 1-2 on DATA into WORK: (the rows whose photo could be normalised, their source photos' sha256, the
    image_ids among them whose photo changed since OLD_HASHES, the rows and photos dropped)."""
    report = tables.clean_tables(data_dir, work_dir)
    table = read_training_table(work_dir)
    hashes = hash_photos(table["image_id"], data_dir / "images")
    changed = {image_id for image_id, sha256 in hashes.items() if (old_hashes or {}).get(image_id, sha256) != sha256}
    for image_id in changed:  # training.photos skips a photo already normalised: make it read the new bytes
        (work_dir / PHOTOS_DIR / f"{image_id}.jpg").unlink(missing_ok=True)
    photo_report = photos.normalise_photos(list(table["image_id"]), data_dir / "images", work_dir / PHOTOS_DIR,
                                           size, max(1, workers))  # 0 would mean every core there
    print(photos.format_report(photo_report), file=sys.stderr)
    usable, missing = drop_missing_photos(table, work_dir / PHOTOS_DIR)
    usable_hashes = {image_id: hashes[image_id] for image_id in usable["image_id"] if image_id in hashes}
    dropped = {"listing_rows": sum(report["products"]["dropped"].values()),
               "photo_rows": sum(report["images"]["dropped"].values()),
               "unreadable_photos": photo_report["failed"], "photos_without_file": len(missing)}
    return usable, usable_hashes, changed & usable_hashes.keys(), dropped


def listings_by_product(listings: dict[str, dict]) -> dict[str, dict]:
    """`{product_id: {title, price, location, category, ..., "photos": {image_id, ...}}}`."""
    products = {}
    for image_id, meta in listings.items():
        entry = products.setdefault(meta["product_id"], {**{name: meta[name] for name in LISTING_FIELDS},
                                                         "photos": set()})
        entry["photos"].add(image_id)
    return products


def compare_listings(old: dict[str, dict], new: dict[str, dict]) -> dict[str, list[str]]:
    """product_ids added, removed, and changed (metadata or photos) between two catalogues' listings."""
    old_products, new_products = listings_by_product(old), listings_by_product(new)
    common = old_products.keys() & new_products.keys()
    changed = {product for product in common if old_products[product] != new_products[product]}
    return {"added": sorted(new_products.keys() - old_products.keys()),
            "removed": sorted(old_products.keys() - new_products.keys()),
            "changed": sorted(changed), "unchanged": sorted(common - changed)}


def previous_vectors(run_dir: Path, checkpoint_sha256: str
                     ) -> tuple[dict[str, int], np.ndarray, np.ndarray, dict[str, str] | None]:
    """({image_id: row}, embeddings, probabilities, photo sha256s or None) of RUN, unless other weights made them."""
    image_ids, vectors, probabilities, meta = load_embeddings(run_dir)
    if meta.get("checkpoint_sha256") != checkpoint_sha256:
        raise ValueError(f"{run_dir / EMBEDDINGS_DIR} was made by checkpoint sha256 "
                         f"{str(meta.get('checkpoint_sha256'))[:12]}, not {run_dir / CHECKPOINT} "
                         f"({checkpoint_sha256[:12]}): its vectors cannot be reused; re-run training.embed")
    known = {image_id: row for row, image_id in enumerate(image_ids)}
    return known, vectors, probabilities, load_photo_hashes(run_dir)


def assemble_vectors(table: pd.DataFrame, known: dict[str, int], vectors: np.ndarray, probabilities: np.ndarray,
                     embed_new, changed: set[str] = frozenset()) -> tuple[np.ndarray, np.ndarray, int]:
    """(embeddings, probabilities, how many embedded) in TABLE order: KNOWN rows unless CHANGED, the rest embedded."""
    is_new = ~table["image_id"].isin(known.keys() - changed).to_numpy()
    reused, fresh = np.flatnonzero(~is_new), np.flatnonzero(is_new)
    out_vectors = np.zeros((len(table), vectors.shape[1]), dtype=np.float32)
    out_probabilities = np.zeros((len(table), probabilities.shape[1]), dtype=np.float32)
    rows = [known[image_id] for image_id in table["image_id"].iloc[reused]]
    out_vectors[reused], out_probabilities[reused] = vectors[rows], probabilities[rows]
    if len(fresh):
        out_vectors[fresh], out_probabilities[fresh] = embed_new(table.iloc[fresh].reset_index(drop=True))
    return out_vectors, out_probabilities, len(fresh)


def write_run(run_dir: Path, work_dir: Path, data_dir: Path, table: pd.DataFrame, vectors: np.ndarray,
              probabilities: np.ndarray, photo_sha256: dict[str, str], checkpoint: dict, refresh: dict) -> Path:
    """The new RUN folder: same weights, new embeddings and index, RUN's evaluation, run.json."""
    new_run = new_run_dir(work_dir)
    shutil.copy2(run_dir / CHECKPOINT, new_run / CHECKPOINT)
    checkpoint_sha256 = sha256_file(new_run / CHECKPOINT)
    model = {"checkpoint": str(new_run / CHECKPOINT), "checkpoint_sha256": checkpoint_sha256,
             "epoch": checkpoint["epoch"], "arch": checkpoint["arch"]}
    image_ids = list(table["image_id"])
    save_embeddings(new_run / EMBEDDINGS_DIR, image_ids, vectors, probabilities,
                    {**model, "count": len(image_ids), "dimension": int(vectors.shape[1]), "dtype": "float32",
                     "normalisation": "l2", "refresh_of": str(run_dir)}, photo_sha256)
    catalogue = make_catalogue(vectors, image_ids, listing_metadata(table),
                               {"model": model, "run": new_run.name, "refresh_of": run_dir.name})
    catalogue.save(new_run / INDEX_DIR)
    refresh["text_model"] = refresh_text_model(run_dir, new_run, catalogue, work_dir)
    shutil.copy2(run_dir / EVALUATION, new_run / EVALUATION)
    if (run_dir / GUARD_REPORTS).is_file():  # the same weights and guard split: its guards hold for the new run
        shutil.copy2(run_dir / GUARD_REPORTS, new_run / GUARD_REPORTS)
    info = read_run_info(run_dir)
    update_run_info(new_run, **{key: info[key] for key in ("classes", "config", "weights_source", "train")
                                if key in info},
                    refresh_of=str(run_dir), data=str(data_dir), work=str(work_dir),
                    evaluation=f"{EVALUATION} copied from {run_dir.name}: figures of its test split, not re-measured",
                    refresh=refresh)
    return new_run


def refresh_text_model(run_dir: Path, new_run: Path, catalogue: Catalogue, work_dir: Path) -> dict | None:
    """RUN's text model (if any) into NEW_RUN, its listings' words rebuilt over CATALOGUE, the rest unchanged."""
    if not (run_dir / TEXT_MODEL_DIR).is_dir():
        return None
    model = TextModel.load(run_dir / TEXT_MODEL_DIR)
    if model.listing_words is None:
        model.save(new_run / TEXT_MODEL_DIR)
        return {"listings_by_words": 0}
    started = time.perf_counter()
    model.listing_words = replace(catalogue_listing_words(model, catalogue, read_listings(work_dir)),
                                  **model.listing_words.settings)
    model.save(new_run / TEXT_MODEL_DIR)
    products = {listing["product_id"] for listing in catalogue.listings.values()}
    return {"listings_by_words": len(model.listing_words.product_ids),
            "unknown_category": len(products) - len(model.listing_words.product_ids),
            "seconds": round(time.perf_counter() - started, 1)}


def refresh_run(run_dir: Path, data_dir: Path, work_dir: Path, *, workers: int = 2) -> tuple[Path, dict]:
    """(the new RUN folder, the refresh counts)."""
    run_dir, data_dir, work_dir = Path(run_dir).resolve(), Path(data_dir).resolve(), Path(work_dir).resolve()
    model, checkpoint = load_checkpoint(run_dir / CHECKPOINT)
    known, vectors, probabilities, old_hashes = previous_vectors(run_dir, sha256_file(run_dir / CHECKPOINT))
    old_listings = Catalogue.load(run_dir / INDEX_DIR).listings
    timings = {}

    started = time.perf_counter()
    size = photo_size(checkpoint, Path(read_run_info(run_dir).get("work", run_dir.parents[1])))
    table, photo_sha256, changed, _ = prepare_work(data_dir, work_dir, size, workers, old_hashes)
    if table.empty:
        raise ValueError(f"{data_dir} has no listing with a usable photo: nothing to put in a catalogue")
    timings["tables_photos"] = round(time.perf_counter() - started, 1)

    started = time.perf_counter()
    vectors, probabilities, embedded = assemble_vectors(
        table, known, vectors, probabilities, photo_embedder(model, checkpoint, work_dir, workers),
        changed)
    timings["embed"] = round(time.perf_counter() - started, 1)

    reused = set(table["image_id"]) & (known.keys() - changed)
    unverified = sorted(reused - (old_hashes or {}).keys())
    if unverified:
        print(f"warning: {len(unverified)} reused vectors could not be checked against their photo's bytes "
              f"({run_dir / EMBEDDINGS_DIR} has no sha256 for them, e.g. {unverified[0]}); reused by image_id. "
              f"The new run records the hashes, so the next refresh checks them")
    changes = compare_listings(old_listings, listing_metadata(table))
    unknown_categories = sorted(set(table["category"]) - set(checkpoint["classes"]))
    refresh = {"listings": {name: len(ids) for name, ids in changes.items()},
               "listing_ids": {name: ids for name, ids in changes.items() if name != "unchanged"},
               "photos": {"catalogue": len(table), "reused": len(table) - embedded, "embedded": embedded,
                          "changed": len(changed), "unverified": len(unverified),
                          "dropped": len(set(old_listings) - set(table["image_id"]))},
               "photo_size": size, "categories_unknown_to_model": unknown_categories, "stage_seconds": timings}
    return write_run(run_dir, work_dir, data_dir, table, vectors, probabilities, photo_sha256, checkpoint,
                     refresh), refresh


def guard_work(run_dir: Path) -> Path | None:
    """The work folder with the test split RUN's weights were measured on (run.json's "work", else RUN's parent's
    parent), or that of the run it refreshed, and so on; None when none has a split."""
    seen = set()
    while run_dir is not None and run_dir not in seen:
        seen.add(run_dir)
        info = read_run_info(run_dir)
        for work in ([Path(info["work"])] if info.get("work") else []) + [run_dir.parents[1]]:
            if (work / SPLIT_FILE).is_file():
                return work
        run_dir = Path(info["refresh_of"]).resolve() if info.get("refresh_of") else None
    return None


def format_refresh(refresh: dict) -> str:
    listings, photo_counts = refresh["listings"], refresh["photos"]
    lines = [f"listings: {listings['added']} added, {listings['removed']} removed, {listings['changed']} changed, "
             f"{listings['unchanged']} unchanged",
             f"photos: {photo_counts['catalogue']} in the catalogue: {photo_counts['reused']} reused, "
             f"{photo_counts['embedded']} embedded ({photo_counts['changed']} of them changed photos); "
             f"{photo_counts['dropped']} dropped with their listings"]
    text = refresh.get("text_model")
    if text is not None:
        lines.append(f"text model: its words rebuilt over the catalogue, {text['listings_by_words']} listings"
                     + (f" ({text['unknown_category']} of an unknown category left out)"
                        if text.get("unknown_category") else ""))
    if refresh["categories_unknown_to_model"]:
        lines.append(f"note: categories the model was not trained on (searchable, never predicted): "
                     f"{', '.join(refresh['categories_unknown_to_model'])}")
    return "\n".join(lines)


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run", required=True, type=Path, help="the trained run to refresh (with embeddings/)")
    parser.add_argument("--data", required=True, type=Path, help="the new catalogue: Products.csv, Images.csv, images/")
    parser.add_argument("--work", required=True, type=Path, help="work folder for the new tables, photos and run")
    parser.add_argument("--version", required=True, help="version of the new archive, e.g. 2.0")
    parser.add_argument("--store", default=Path("model_store"), type=Path, help="model store folder")
    parser.add_argument("--name", default="marketplace", help="model name (URL path /predictions/NAME)")
    parser.add_argument("--workers", type=int, default=2, help="photo and embedding loader processes")
    add_serving_arguments(parser)
    parser.add_argument("--guard-work", type=Path,
                        help="work folder whose test split the accuracy guard reads (default: RUN's, from run.json)")
    parser.add_argument("--release", action="store_true", help="register, canary and make the new version default")
    parser.add_argument("--replace", action="store_true",
                        help="replace STORE/NAME-vVERSION.mar, and rewrite WORK although other inputs made it")
    parser.add_argument("--management-url", default=DEFAULT_MANAGEMENT_URL)
    parser.add_argument("--inference-url", default=DEFAULT_INFERENCE_URL)
    api.add_key_arguments(parser, "management")  # the key file's inference key for the canary
    args = parser.parse_args(argv)
    if not args.store.is_dir():
        raise SystemExit(f"model store {args.store} is not a folder")
    checked_on = args.guard_work or guard_work(Path(args.run).resolve())
    if checked_on is None and (args.runtime, args.precision) != ("torch", "fp32"):
        raise SystemExit(f"the {args.runtime} {args.precision} archive's accuracy guard needs the test split of "
                         f"{args.run}'s work folder and run.json names none with a {SPLIT_FILE}: pass --guard-work "
                         f"WORK, or --runtime torch --precision fp32")

    try:  # before any work: build_archive checks again at the end
        archive_path(args.store, args.name, args.version, replace=args.replace, other_names="--version")
    except FileExistsError as error:
        raise SystemExit(f"refused: {error}") from error
    claim_work_folder(args.work, {"data": str(args.data.resolve()), "refresh_of": str(args.run.resolve())},
                      args.replace)
    new_run, refresh = refresh_run(args.run, args.data, args.work, workers=args.workers)
    print(format_refresh(refresh))
    print(f"run: {new_run}")
    mar = build_archive(new_run, args.store, args.name, args.version,
                        batch_size=args.batch_size, max_batch_delay=args.max_batch_delay, runtime=args.runtime,
                        precision=args.precision, work_dir=checked_on, live_catalogue=args.live_catalogue,
                        reuse_guard=args.reuse_guard, replace=args.replace)
    print(f"archive: {mar} ({mar.stat().st_size / 1e6:.1f} MB)")
    summary = {"run": str(new_run), "archive": str(mar), **refresh}
    if args.release:
        try:
            answer = release(args.management_url, args.inference_url, mar.name, args.name, args.version,
                             token=api.resolve_token("management", args.token, args.key_file),
                             inference_token=api.resolve_token("inference", key_file=args.key_file,
                                                               env="TS_INFERENCE_TOKEN"),
                             history=args.store / HISTORY_FILE)
        except (ReleaseError, api.ApiError) as error:
            raise SystemExit(f"release failed, the default version is unchanged: {error}") from error
        print(f"released: {args.name} {args.version} is the default (canary: {answer['category']}, "
              f"{len(answer['neighbours'])} neighbours); the previous version stays registered")
        summary["released"] = True
    return summary


if __name__ == "__main__":
    main()
