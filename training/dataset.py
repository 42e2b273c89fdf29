"""Stage 3: split the photos into train/val/test by listing; writes WORK/split.csv and split_report.json. A
listing's photos, and listings sharing a byte-identical photo, land in one split, so no test photo has a twin in
training; photos stage 2 could not normalise are left out and counted."""
import argparse
import hashlib
import json
from pathlib import Path

import numpy as np
import pandas as pd

from training.data import PHOTOS_DIR, SPLIT_FILE, SPLIT_REPORT, SPLITS, read_training_table

SPLIT_COLUMNS = ["image_id", "product_id", "label", "split"]


def drop_missing_photos(table: pd.DataFrame, photos_dir: Path) -> tuple[pd.DataFrame, list[str]]:
    """Rows whose normalised photo exists, and the image ids of those that do not."""
    present = {path.stem for path in Path(photos_dir).glob("*.jpg")}
    has_photo = table["image_id"].isin(present)
    return table[has_photo].reset_index(drop=True), list(table.loc[~has_photo, "image_id"])


def duplicate_groups(table: pd.DataFrame, photos_dir: Path) -> dict[str, str]:
    """`{product_id: group}`, one group for the listings that share a byte-identical photo."""
    parent = {product_id: product_id for product_id in table["product_id"]}

    def find(product_id):
        while parent[product_id] != product_id:
            parent[product_id] = parent[parent[product_id]]
            product_id = parent[product_id]
        return product_id

    first_with_digest = {}
    for image_id, product_id in zip(table["image_id"], table["product_id"]):
        digest = hashlib.sha1((Path(photos_dir) / f"{image_id}.jpg").read_bytes()).hexdigest()
        other = first_with_digest.setdefault(digest, product_id)
        parent[find(product_id)] = find(other)
    return {product_id: find(product_id) for product_id in parent}


def split_by_product(table: pd.DataFrame, val_fraction: float = 0.15, test_fraction: float = 0.15,
                     seed: int = 0, groups: dict[str, str] | None = None) -> pd.DataFrame:
    """`table` with a `split` column, one per listing (and `groups` group): each category's listings, sorted
    then shuffled with `seed`, cut into test, val and train; a group goes with its first listing's category."""
    if not (0 <= val_fraction < 1 and 0 <= test_fraction < 1 and val_fraction + test_fraction < 1):
        raise ValueError(f"val_fraction {val_fraction} and test_fraction {test_fraction} must be in [0, 1) "
                         f"and leave some listings for training")
    categories = table.groupby("product_id")["category"].agg(["first", "nunique"])
    if (categories["nunique"] > 1).any():
        raise ValueError(f"product_id(s) with photos in several categories: "
                         f"{list(categories.index[categories['nunique'] > 1][:5])}")
    groups = groups or {product_id: product_id for product_id in categories.index}
    group_category = categories["first"].groupby(categories.index.map(groups)).min()
    rng = np.random.default_rng(seed)
    split_of_group = {}
    for _, members in sorted(group_category.groupby(group_category).groups.items()):
        members = rng.permutation(sorted(members))
        n_val, n_test = round(len(members) * val_fraction), round(len(members) * test_fraction)
        for position, group in enumerate(members):
            split_of_group[group] = "test" if position < n_test else "val" if position < n_test + n_val else "train"
    return table.assign(split=table["product_id"].map(lambda product_id: split_of_group[groups[product_id]]))


def summarise_split(split: pd.DataFrame, missing_photos: list[str], seed: int, val_fraction: float,
                    test_fraction: float) -> dict:
    by_category = split.groupby(["category", "split"]).size().unstack(fill_value=0)
    return {"seed": seed, "fractions": {"val": val_fraction, "test": test_fraction}, "photos": len(split),
            "excluded_missing_photo": len(missing_photos), "excluded_examples": missing_photos[:10],
            "splits": {name: {"photos": int((split["split"] == name).sum()),
                              "listings": int(split.loc[split["split"] == name, "product_id"].nunique())}
                       for name in SPLITS},
            "categories": {category: {name: int(row.get(name, 0)) for name in SPLITS}
                           for category, row in by_category.iterrows()}}


def make_split(work_dir: Path, val_fraction: float = 0.15, test_fraction: float = 0.15, seed: int = 0) -> dict:
    """Run stage 3 on WORK_DIR; writes split.csv and split_report.json and returns the report."""
    work_dir = Path(work_dir)
    photos_dir = work_dir / PHOTOS_DIR
    if not photos_dir.is_dir():
        raise FileNotFoundError(f"{photos_dir} is missing; run training.photos first")
    table, missing = drop_missing_photos(read_training_table(work_dir), photos_dir)
    if table.empty:
        raise ValueError(f"no normalised photos of the training table under {photos_dir}")
    groups = duplicate_groups(table, photos_dir)
    split = split_by_product(table, val_fraction, test_fraction, seed, groups)
    split[SPLIT_COLUMNS].to_csv(work_dir / SPLIT_FILE, index=False)
    report = summarise_split(split, missing, seed, val_fraction, test_fraction)
    group_sizes = pd.Series(groups).value_counts()
    report["listings_linked_by_duplicate_photos"] = int(group_sizes[group_sizes > 1].sum())
    (work_dir / SPLIT_REPORT).write_text(json.dumps(report, indent=2, ensure_ascii=False))
    return report


def format_report(report: dict) -> str:
    lines = [f"split (seed {report['seed']}): {report['photos']:,} photos; "
             f"{report['excluded_missing_photo']:,} left out (no normalised photo)"]
    lines += [f"  {name:<5} {counts['photos']:>6,} photos  {counts['listings']:>6,} listings"
              for name, counts in report["splits"].items()]
    return "\n".join(lines)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", "--work", dest="work", required=True, type=Path,
                        help="work folder with tables/ and photos/; writes split.csv there")
    parser.add_argument("--val-fraction", type=float, default=0.15)
    parser.add_argument("--test-fraction", type=float, default=0.15)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    report = make_split(args.work, args.val_fraction, args.test_fraction, args.seed)
    print(format_report(report))
    print(f"-> {args.work / SPLIT_FILE}")


if __name__ == "__main__":
    main()
