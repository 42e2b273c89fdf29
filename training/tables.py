"""Stage 1: clean the raw listings and photo tables and join them into one row per usable photo.

Reads DATA/Products.csv, DATA/Images.csv and the file names under DATA/images/; writes OUT/tables/:
training_table.csv, listings.csv, encoder.json, decoder.json, tables_report.json (each dropped row's reason)."""
import argparse
import json
import re
from pathlib import Path

import numpy as np
import pandas as pd

from training.data import TABLES_DIR

PRODUCT_COLUMNS = ["id", "product_name", "category", "product_description", "price", "location"]
IMAGE_COLUMNS = ["id", "product_id"]
TABLE_COLUMNS = ["image_id", "product_id", "category", "label", "title", "price", "location"]
LISTING_COLUMNS = ["product_id", "title", "category", "label", "price", "location", "description"]
# The site appends " | in <Town>, <County> | Gumtree" to every product name.
SITE_SUFFIX = re.compile(r"\s*(\|\s*in\s[^|]*)?\|\s*Gumtree\s*$")
PRICE = re.compile(r"^\d+(\.\d+)?$")
EXAMPLES = 10


def read_raw_csv(path: Path, columns: list[str]) -> pd.DataFrame:
    """A raw table as text, checked to have `columns`; only "\\n" ends a row (a bare "\\r" is data) and only
    an empty field is missing (a product called "None" stays text)."""
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing")
    try:
        frame = pd.read_csv(path, lineterminator="\n", dtype=str, keep_default_na=False, na_values=[""])
    except pd.errors.ParserError as error:
        raise ValueError(f"{path} is not a readable CSV table: {error}") from error
    frame.columns = [column.strip() for column in frame.columns]
    missing = [column for column in columns if column not in frame.columns]
    if missing:
        raise ValueError(f"{path} has no column(s) {missing}; found {list(frame.columns)}")
    return frame[columns]


def strip_carriage_returns(values: pd.Series, keep_lines: bool = False) -> pd.Series:
    """Remove stray "\\r" (and surrounding spaces); empty strings become missing."""
    replacement = "\n" if keep_lines else " "
    cleaned = values.str.replace(r"\r\n?", replacement, regex=True).str.strip()
    return cleaned.mask(cleaned == "")


def parse_price(text) -> float:
    """"£1,250.00" -> 1250.0; anything that is not an amount ("Free", "", None) -> NaN."""
    if not isinstance(text, str):
        return np.nan
    amount = text.strip().removeprefix("£").replace(",", "").strip()
    return float(amount) if PRICE.match(amount) else np.nan


def root_category(category: str) -> str:
    """"Home & Garden / Garden & Patio / Other" -> "Home & Garden"."""
    return category.split(" / ", 1)[0].strip()


def listing_title(product_name: str) -> str:
    """"Mirror wall art | in Wokingham, Berkshire | Gumtree" -> "Mirror wall art"."""
    return SITE_SUFFIX.sub("", product_name).strip()


def drop_counted(frame: pd.DataFrame, reasons: dict) -> tuple[pd.DataFrame, dict[str, int]]:
    """Drop the rows each `reasons[name](frame)` flags, in turn; a row is counted under its first reason."""
    counts = {}
    for reason, flag in reasons.items():
        flagged = flag(frame)
        counts[reason] = int(flagged.sum())
        frame = frame[~flagged]
    return frame, counts


def clean_listings(products: pd.DataFrame) -> tuple[pd.DataFrame, dict]:
    """Raw products -> listings (product_id, title, category, price, location, description, category_path)."""
    text = pd.DataFrame({
        "product_id": strip_carriage_returns(products["id"]),
        "title": strip_carriage_returns(products["product_name"]).map(listing_title, na_action="ignore"),
        "category_path": strip_carriage_returns(products["category"]),
        "price_text": strip_carriage_returns(products["price"]),
        "location": strip_carriage_returns(products["location"]),
        "description": strip_carriage_returns(products["product_description"], keep_lines=True),
    })
    text["category"] = text["category_path"].map(root_category, na_action="ignore").replace("", np.nan)
    text["title"] = text["title"].replace("", np.nan)
    listings, dropped = drop_counted(text, {
        "missing_id": lambda frame: frame["product_id"].isna(),
        "missing_category": lambda frame: frame["category"].isna(),
        "missing_product_name": lambda frame: frame["title"].isna(),
        "duplicate_id": lambda frame: frame["product_id"].duplicated(keep="first"),
    })
    listings = listings.assign(price=listings["price_text"].map(parse_price))
    unparsed = listings["price"].isna()
    report = {"rows_in": len(products), "rows_out": len(listings), "dropped": dropped,
              "prices": {"missing": int((unparsed & listings["price_text"].isna()).sum()),
                         "unparseable": int((unparsed & listings["price_text"].notna()).sum()),
                         "unparseable_examples": sorted(set(listings.loc[unparsed, "price_text"].dropna()))[:EXAMPLES]}}
    return listings.drop(columns="price_text").reset_index(drop=True), report


def clean_photo_rows(images: pd.DataFrame) -> tuple[pd.DataFrame, dict[str, int]]:
    """Raw photo rows -> (image_id, product_id) rows with both ids, each image id once."""
    rows = pd.DataFrame({"image_id": strip_carriage_returns(images["id"]),
                         "product_id": strip_carriage_returns(images["product_id"])})
    return drop_counted(rows, {
        "missing_id": lambda frame: frame["image_id"].isna(),
        "missing_product_id": lambda frame: frame["product_id"].isna(),
        "duplicate_id": lambda frame: frame["image_id"].duplicated(keep="first"),
    })


def list_image_files(images_dir: Path) -> set[str]:
    """Image ids (file stems) of the .jpg files in `images_dir`."""
    if not images_dir.is_dir():
        raise FileNotFoundError(f"{images_dir} is missing (expected the photos as images/<image_id>.jpg)")
    return {path.stem for path in images_dir.glob("*.jpg") if path.is_file()}


def join_photos(photo_rows: pd.DataFrame, listings: pd.DataFrame, raw_product_ids: set[str],
                image_files: set[str]) -> tuple[pd.DataFrame, dict[str, int]]:
    """Keep photo rows whose listing survived cleaning and whose file exists; count the others."""
    kept_ids = set(listings["product_id"])
    joined, dropped = drop_counted(photo_rows, {
        "listing_missing": lambda frame: ~frame["product_id"].isin(raw_product_ids),
        "listing_dropped": lambda frame: ~frame["product_id"].isin(kept_ids),
        "file_missing": lambda frame: ~frame["image_id"].isin(image_files),
    })
    joined = joined.merge(listings, on="product_id", how="left", validate="many_to_one")
    return joined.reset_index(drop=True), dropped


def sample_listings(listings: pd.DataFrame, max_listings: int, seed: int) -> pd.DataFrame:
    """A seeded sample of `max_listings` listings, each category's round(share x n), give or take one: shuffled
    listings taken in order of rank within their category / the category's size."""
    if max_listings <= 0 or max_listings >= len(listings):
        return listings
    shuffled = listings.sample(frac=1.0, random_state=seed)
    position = shuffled.groupby("category").cumcount()
    size = shuffled.groupby("category")["product_id"].transform("size")
    order = ((position + 0.5) / size).to_numpy().argsort(kind="stable")
    return shuffled.iloc[order[:max_listings]].sort_index()


def make_encoder(categories) -> dict[str, int]:
    """{category: label} with labels in sorted order of the category names."""
    return {category: label for label, category in enumerate(sorted(set(categories)))}


def make_decoder(encoder: dict[str, int]) -> dict[str, str]:
    """{"0": category, ...}: the JSON-friendly inverse of the encoder."""
    return {str(label): category for category, label in sorted(encoder.items(), key=lambda item: item[1])}


def category_counts(listings: pd.DataFrame, table: pd.DataFrame, encoder: dict[str, int]) -> dict[str, dict]:
    listing_counts, photo_counts = listings["category"].value_counts(), table["category"].value_counts()
    return {category: {"label": label, "listings": int(listing_counts.get(category, 0)),
                       "photos": int(photo_counts.get(category, 0))}
            for category, label in encoder.items()}


def clean_tables(data_dir: Path, out_dir: Path, max_listings: int = 0, seed: int = 0) -> dict:
    """Run stage 1 on DATA_DIR; writes OUT_DIR/tables/ and returns the report."""
    data_dir, tables_dir = Path(data_dir), Path(out_dir) / TABLES_DIR
    products = read_raw_csv(data_dir / "Products.csv", PRODUCT_COLUMNS)
    images = read_raw_csv(data_dir / "Images.csv", IMAGE_COLUMNS)
    image_files = list_image_files(data_dir / "images")

    listings, products_report = clean_listings(products)
    photo_rows, photo_dropped = clean_photo_rows(images)
    raw_product_ids = set(strip_carriage_returns(products["id"]).dropna())
    table, join_dropped = join_photos(photo_rows, listings, raw_product_ids, image_files)
    without_photo = int((~listings["product_id"].isin(table["product_id"])).sum())
    images_report = {"rows_in": len(images), "rows_out": len(table), "dropped": {**photo_dropped, **join_dropped}}
    orphan_files = sorted(image_files - set(strip_carriage_returns(images["id"]).dropna()))

    sample = None
    if max_listings > 0:
        with_photo = listings[listings["product_id"].isin(table["product_id"])]
        listings = sample_listings(with_photo, max_listings, seed)
        table = table[table["product_id"].isin(listings["product_id"])]
        sample = {"max_listings": max_listings, "seed": seed, "listings": len(listings), "photos": len(table),
                  "from_listings_with_photos": len(with_photo)}

    encoder = make_encoder(listings["category"])
    listings = listings.assign(label=listings["category"].map(encoder))
    table = table.assign(label=table["category"].map(encoder))
    report = {"data": str(data_dir.resolve()), "products": products_report, "images": images_report,
              "image_files": {"jpg_files": len(image_files), "orphan_files": len(orphan_files),
                              "orphan_examples": orphan_files[:EXAMPLES]},
              "listings_without_photo": without_photo, "sample": sample,
              "training_table": {"photos": len(table), "listings": int(table["product_id"].nunique()),
                                 "categories": len(encoder)},
              "categories": category_counts(listings, table, encoder)}
    save_tables(tables_dir, table, listings, encoder, report)
    return report


def save_tables(tables_dir: Path, table: pd.DataFrame, listings: pd.DataFrame, encoder: dict[str, int],
                report: dict) -> None:
    tables_dir.mkdir(parents=True, exist_ok=True)
    table[TABLE_COLUMNS].to_csv(tables_dir / "training_table.csv", index=False)
    listings[LISTING_COLUMNS].to_csv(tables_dir / "listings.csv", index=False)
    (tables_dir / "encoder.json").write_text(json.dumps(encoder, indent=2, ensure_ascii=False))
    (tables_dir / "decoder.json").write_text(json.dumps(make_decoder(encoder), indent=2, ensure_ascii=False))
    (tables_dir / "tables_report.json").write_text(json.dumps(report, indent=2, ensure_ascii=False))


def format_report(report: dict) -> str:
    products, images, files = report["products"], report["images"], report["image_files"]
    prices = products["prices"]
    lines = [
        f"listings: {products['rows_in']:,} rows in, {products['rows_out']:,} kept",
        *[f"  dropped, {reason.replace('_', ' ')}: {count:,}" for reason, count in products["dropped"].items()],
        f"  prices missing: {prices['missing']:,}, unparseable: {prices['unparseable']:,}"
        + (f" (e.g. {', '.join(map(repr, prices['unparseable_examples']))})" if prices["unparseable"] else ""),
        f"  listings without a usable photo: {report['listings_without_photo']:,}",
        f"photo rows: {images['rows_in']:,} in, {images['rows_out']:,} usable",
        *[f"  dropped, {reason.replace('_', ' ')}: {count:,}" for reason, count in images["dropped"].items()],
        f"image files: {files['jpg_files']:,}, with no photo row: {files['orphan_files']:,}",
    ]
    if report["sample"]:
        sample = report["sample"]
        lines.append(f"sample: {sample['listings']:,} of {sample['from_listings_with_photos']:,} listings with "
                     f"photos (seed {sample['seed']}), {sample['photos']:,} photos")
    table = report["training_table"]
    lines.append(f"training table: {table['photos']:,} photos of {table['listings']:,} listings, "
                 f"{table['categories']} categories")
    width = max((len(name) for name in report["categories"]), default=0)
    lines += [f"  {counts['label']:>3}  {name:<{width}}  {counts['listings']:>6,} listings  "
              f"{counts['photos']:>6,} photos" for name, counts in report["categories"].items()]
    return "\n".join(lines)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", required=True, type=Path, help="folder with Products.csv, Images.csv, images/")
    parser.add_argument("--out", required=True, type=Path, help="work folder; writes OUT/tables/")
    parser.add_argument("--max-listings", type=int, default=0,
                        help="keep a seeded, category-stratified sample of N listings with photos (0 = all)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the --max-listings sample")
    args = parser.parse_args(argv)
    report = clean_tables(args.data, args.out, args.max_listings, args.seed)
    print(format_report(report))
    print(f"-> {args.out / TABLES_DIR}")


if __name__ == "__main__":
    main()
