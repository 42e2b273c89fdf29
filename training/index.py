"""Stage 6: the Faiss catalogue RUN/index/ over RUN/embeddings, with WORK/tables/training_table.csv's listings."""
import argparse
import time
from pathlib import Path

import pandas as pd

from training.data import load_embeddings, read_training_table
from marketplace_search.layout import INDEX_DIR, latest_run, update_run_info
from marketplace_search.search import INDEX_TYPES, Catalogue, make_catalogue


def listing_metadata(table: pd.DataFrame) -> dict[str, dict]:
    """`{image_id: {product_id, title, price, location, category}}` from the training table."""
    return {row.image_id: {"product_id": row.product_id, "title": str(row.title),
                           "price": None if pd.isna(row.price) else float(row.price),
                           "location": "" if pd.isna(row.location) else str(row.location), "category": row.category}
            for row in table.itertuples(index=False)}


def build_catalogue(run_dir: Path, work_dir: Path, index_type: str = "auto", **index_options) -> Catalogue:
    image_ids, vectors, _, embeddings_meta = load_embeddings(run_dir, mmap=True)  # read in chunks, not copied
    table = read_training_table(work_dir)
    meta = {"model": {key: embeddings_meta[key] for key in ("checkpoint", "checkpoint_sha256", "epoch", "arch")},
            "run": Path(run_dir).name}
    return make_catalogue(vectors, image_ids, listing_metadata(table), meta, index_type, **index_options)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--work", required=True, type=Path, help="work folder with tables/")
    parser.add_argument("--run", type=Path, help="run folder (default: the latest under WORK/model_evaluation)")
    parser.add_argument("--index-type", default="auto", choices=INDEX_TYPES,
                        help="auto: exact (flat) up to 20,000 photos, HNSW up to 2M, IVF-PQ above")
    args = parser.parse_args(argv)
    run_dir = args.run or latest_run(args.work)
    started = time.perf_counter()
    catalogue = build_catalogue(run_dir, args.work, args.index_type)
    catalogue.save(run_dir / INDEX_DIR)
    update_run_info(run_dir, stage_seconds={"index": round(time.perf_counter() - started, 1)})
    print(f"indexed {catalogue.index.ntotal} photos of {len({v['product_id'] for v in catalogue.listings.values()})} "
          f"listings ({catalogue.meta['index']['type']}, {catalogue.dimension}-d) -> {run_dir / INDEX_DIR}")


if __name__ == "__main__":
    main()
