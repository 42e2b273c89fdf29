"""Stage 5: embed every catalogue photo with the trained model.

Writes RUN/embeddings/: `embeddings.npy` ((n, d) float32, L2-normalised), `image_ids.json` (row
order), `probabilities.npy` ((n, classes) float32, used by evaluation), `image_embeddings.json`
(`{image_id: [floats]}`, the original system's format) and `embeddings_meta.json`.
"""
import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader
from tqdm import tqdm

from training.dataset import ListingPhotos, load_split
from marketplace_search.models import MarketplaceNet, embed, load_checkpoint, sha256_file
from marketplace_search.presets import Preprocess, eval_transform
from marketplace_search.layout import BEST_CHECKPOINT, EMBEDDINGS_DIR, WEIGHTS_DIR, latest_run, update_run_info


def embed_rows(model: MarketplaceNet, preprocess: Preprocess, rows, photos_dir: Path,
               batch_size: int = 32, workers: int = 2) -> tuple[np.ndarray, np.ndarray]:
    """`(embeddings (n, d), probabilities (n, classes))`, float32, in `rows` order."""
    loader = DataLoader(ListingPhotos(rows, photos_dir, eval_transform(preprocess)),
                        batch_size=batch_size, num_workers=workers)
    model.eval()
    vectors, probabilities = [], []
    with torch.inference_mode():
        for images, _, _ in tqdm(loader, desc="embedding", unit="batch"):
            batch_probabilities, batch_vectors = embed(model, images)
            vectors.append(batch_vectors.numpy())
            probabilities.append(batch_probabilities.float().numpy())
    return np.concatenate(vectors), np.concatenate(probabilities)


def save_embeddings(out_dir: Path, image_ids: list[str], vectors: np.ndarray, probabilities: np.ndarray,
                    meta: dict) -> None:
    out_dir.mkdir(parents=True, exist_ok=True)
    np.save(out_dir / "embeddings.npy", vectors.astype(np.float32))
    np.save(out_dir / "probabilities.npy", probabilities.astype(np.float32))
    (out_dir / "image_ids.json").write_text(json.dumps(image_ids))
    as_json = {image_id: [round(float(x), 7) for x in vector] for image_id, vector in zip(image_ids, vectors)}
    (out_dir / "image_embeddings.json").write_text(json.dumps(as_json))
    (out_dir / "embeddings_meta.json").write_text(json.dumps(meta, indent=2, sort_keys=True))


def load_embeddings(run_dir: Path) -> tuple[list[str], np.ndarray, np.ndarray, dict]:
    """`(image_ids, embeddings, probabilities, meta)` written by this stage."""
    folder = Path(run_dir) / EMBEDDINGS_DIR
    if not (folder / "embeddings.npy").is_file():
        raise FileNotFoundError(f"{folder / 'embeddings.npy'} is missing; run training.embed first")
    return (json.loads((folder / "image_ids.json").read_text()), np.load(folder / "embeddings.npy"),
            np.load(folder / "probabilities.npy"), json.loads((folder / "embeddings_meta.json").read_text()))


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--work", required=True, type=Path, help="work folder with photos/ and split.csv")
    parser.add_argument("--run", type=Path, help="run folder (default: the latest under WORK/model_evaluation)")
    parser.add_argument("--checkpoint", default=BEST_CHECKPOINT, help="file name under RUN/weights")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--workers", type=int, default=2)
    args = parser.parse_args(argv)
    run_dir = args.run or latest_run(args.work)
    checkpoint_path = run_dir / WEIGHTS_DIR / args.checkpoint
    model, checkpoint = load_checkpoint(checkpoint_path)
    rows = load_split(args.work)
    started = time.perf_counter()
    vectors, probabilities = embed_rows(model, Preprocess.from_dict(checkpoint["preprocess"]), rows,
                                        Path(args.work) / "photos", args.batch_size, args.workers)
    seconds = time.perf_counter() - started
    meta = {"count": len(rows), "dimension": int(vectors.shape[1]), "dtype": "float32", "normalisation": "l2",
            "checkpoint": str(checkpoint_path), "checkpoint_sha256": sha256_file(checkpoint_path),
            "epoch": checkpoint["epoch"], "arch": checkpoint["arch"]}
    save_embeddings(run_dir / EMBEDDINGS_DIR, list(rows["image_id"]), vectors, probabilities, meta)
    update_run_info(run_dir, stage_seconds={"embed": round(seconds, 1)})
    print(f"embedded {len(rows)} photos ({vectors.shape[1]}-d, {len(rows) / seconds:.1f} photos/s) "
          f"-> {run_dir / EMBEDDINGS_DIR}")


if __name__ == "__main__":
    main()
