"""Stage 5: embed every catalogue photo with the trained model into RUN/embeddings/: (n, d) float32
L2-normalised vectors in split order, the category probabilities, the vectors as JSON too, and each source
photo's sha256 (scripts.refresh reuses a vector only for the same bytes)."""
import argparse
import json
import time
from pathlib import Path

import numpy as np

from training.data import PHOTOS_DIR, PHOTOS_REPORT, embed_rows, load_split
from marketplace_search.memory import keep_freed_memory
from marketplace_search.files import sha256_file
from marketplace_search.models import load_checkpoint
from marketplace_search.presets import Preprocess
from marketplace_search.layout import BEST_CHECKPOINT, EMBEDDINGS_DIR, WEIGHTS_DIR, latest_run, update_run_info
from marketplace_search.extras import installed, needs_extra

PHOTO_HASHES_FILE = "photo_sha256.json"


def hash_photos(image_ids, images_dir: Path) -> dict[str, str]:
    """`{image_id: sha256}` of IMAGES_DIR/<image_id>.jpg, for the photos that are there."""
    paths = {image_id: Path(images_dir) / f"{image_id}.jpg" for image_id in image_ids}
    return {image_id: sha256_file(path) for image_id, path in paths.items() if path.is_file()}


def source_photos(work_dir: Path) -> Path | None:
    """The folder training.photos normalised WORK/photos from (its report names it), if still there."""
    report = Path(work_dir) / PHOTOS_DIR / PHOTOS_REPORT
    if not report.is_file():
        return None
    source = Path(json.loads(report.read_text())["source"])
    return source if source.is_dir() else None


def save_embeddings(out_dir: Path, image_ids: list[str], vectors: np.ndarray, probabilities: np.ndarray,
                    meta: dict, photo_sha256: dict[str, str] | None = None) -> None:
    """`photo_sha256`: the source photos' hashes, for the next refresh to compare (omitted when unknown)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    np.save(out_dir / "embeddings.npy", vectors.astype(np.float32))
    np.save(out_dir / "probabilities.npy", probabilities.astype(np.float32))
    (out_dir / "image_ids.json").write_text(json.dumps(image_ids))
    as_json = {image_id: [round(float(x), 7) for x in vector] for image_id, vector in zip(image_ids, vectors)}
    (out_dir / "image_embeddings.json").write_text(json.dumps(as_json))
    save_meta(out_dir, meta, photo_sha256)


def save_meta(out_dir: Path, meta: dict, photo_sha256: dict[str, str] | None) -> None:
    (out_dir / "embeddings_meta.json").write_text(json.dumps(meta, indent=2, sort_keys=True))
    if photo_sha256 is not None:
        (out_dir / PHOTO_HASHES_FILE).write_text(json.dumps(photo_sha256, sort_keys=True))


def load_photo_hashes(run_dir: Path) -> dict[str, str] | None:
    """`{image_id: sha256}` of the photos RUN's vectors were made from; None for embeddings saved without."""
    path = Path(run_dir) / EMBEDDINGS_DIR / PHOTO_HASHES_FILE
    return json.loads(path.read_text()) if path.is_file() else None


def embed_on_ray(args, checkpoint_path: Path, image_ids: list[str], out_dir: Path) -> tuple[int, dict]:
    """--engine ray, into RUN/embeddings/shards and the usual files: (dimension, what the meta adds)."""
    if not installed("ray"):
        raise SystemExit(needs_extra("--engine ray", "Ray", "scale"))
    from training.ray_embed import SHARDS_DIR, assemble, embed_shards

    shards = embed_shards(checkpoint_path, image_ids, Path(args.work) / PHOTOS_DIR, out_dir / SHARDS_DIR,
                          shard_size=args.shard_size, actors=args.actors, batch_size=args.batch_size,
                          address=args.address)
    return assemble(shards, out_dir)[1], {"engine": "ray", "shards": len(shards)}


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--work", required=True, type=Path, help="work folder with photos/ and split.csv")
    parser.add_argument("--run", type=Path, help="run folder (default: the latest under WORK/model_evaluation)")
    parser.add_argument("--checkpoint", default=BEST_CHECKPOINT, help="file name under RUN/weights")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--engine", choices=("local", "ray"), default="local",
                        help="ray: embed in Ray actors into Parquet shards (training/ray_embed.py), resumable")
    parser.add_argument("--address", help="--engine ray: join this Ray cluster (default: a local Ray)")
    parser.add_argument("--actors", type=int, default=1, help="--engine ray: actors, each loading the model once")
    parser.add_argument("--shard-size", type=int, default=10_000, help="--engine ray: photos per Parquet shard")
    args = parser.parse_args(argv)
    run_dir = args.run or latest_run(args.work)
    checkpoint_path = run_dir / WEIGHTS_DIR / args.checkpoint
    model, checkpoint = load_checkpoint(checkpoint_path)
    rows = load_split(args.work)
    image_ids, out_dir = list(rows["image_id"]), run_dir / EMBEDDINGS_DIR
    started = time.perf_counter()
    if args.engine == "ray":
        dimension, extra = embed_on_ray(args, checkpoint_path, image_ids, out_dir)
    else:
        keep_freed_memory()
        vectors, probabilities = embed_rows(model, Preprocess.from_dict(checkpoint["preprocess"]), rows,
                                            Path(args.work) / PHOTOS_DIR, args.batch_size, args.workers)
        dimension, extra = int(vectors.shape[1]), {}
    seconds = time.perf_counter() - started
    meta = {"count": len(image_ids), "dimension": dimension, "dtype": "float32", "normalisation": "l2",
            "checkpoint": str(checkpoint_path), "checkpoint_sha256": sha256_file(checkpoint_path),
            "epoch": checkpoint["epoch"], "arch": checkpoint["arch"], **extra}
    source = source_photos(args.work)
    if source is None:
        print(f"note: {Path(args.work) / PHOTOS_DIR / PHOTOS_REPORT} names no source folder that is still there: "
              f"no photo hashes saved, so scripts.refresh will reuse these vectors by image_id alone")
    photo_sha256 = hash_photos(image_ids, source) if source else None
    if args.engine == "ray":
        save_meta(out_dir, meta, photo_sha256)
    else:
        save_embeddings(out_dir, image_ids, vectors, probabilities, meta, photo_sha256)
    update_run_info(run_dir, stage_seconds={"embed": round(seconds, 1)})
    print(f"embedded {len(image_ids)} photos ({dimension}-d, {len(image_ids) / seconds:.1f} photos/s"
          f"{', on Ray' if extra else ''}) -> {out_dir}")


if __name__ == "__main__":
    main()
