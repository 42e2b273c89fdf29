"""Generate a small synthetic catalogue in the raw marketplace format (Products.csv, Images.csv, images/), for
the demo and the tests. Each category's photos are its own shape in its own colour on random noise, so a small
model learns them in a few epochs; `Mess` injects the faults the pipeline survives."""
import argparse
import io
import json
import random
import string
import uuid
from dataclasses import dataclass, fields
from pathlib import Path

import numpy as np
import pandas as pd
from PIL import Image, ImageDraw

# Root, subcategories, and the colour and shape of the photos (different in both: jitter never confuses two).
CATEGORIES = [
    ("Home & Garden", ("Garden & Patio / Outdoor Settings & Furniture", "Mirrors"), (220, 40, 40), "disc"),
    ("Computers & Software", ("Laptops", "Computer Monitors"), (40, 180, 60), "square"),
    ("Sports, Leisure & Travel", ("Bicycles", "Camping & Hiking"), (50, 80, 230), "triangle"),
    ("Baby & Kids Stuff", ("Toys", "Prams & Strollers"), (235, 200, 40), "stripes"),
    ("Appliances", ("Kitchen Appliances / Microwaves", "Vacuum Cleaners"), (200, 60, 200), "cross"),
    ("Health & Beauty", ("Hair Care", "Fragrances"), (40, 200, 210), "ring"),
    ("Music, Films, Books & Games", ("Books", "Musical Instruments / Guitars"), (240, 130, 30), "diamond"),
    ("Office Furniture & Equipment", ("Desks", "Chairs"), (235, 235, 235), "bars"),
]
TOWNS = ["Wokingham, Berkshire", "Inverness, Highland", "Skegness, Lincolnshire", "Radstock, Somerset",
         "Ealing Broadway, London", "Chertsey, Surrey", "Ashton, Bristol", "Nelson, Lancashire"]
ADJECTIVES = ["Vintage", "Nearly new", "Large", "Small", "Boxed", "Used", "Spare", "Retro"]
NOUNS = ["lamp", "chair", "table", "mirror", "speaker", "bike", "kettle", "desk", "toy", "monitor"]
BAD_PRICES = ["Free", "", "POA", "£1.2.3"]
BUCKET = "https://example-bucket.s3.eu-west-1.amazonaws.com/sample/images"
FILE_FAULTS = ("corrupt_files", "truncated_files", "empty_files", "cmyk_files", "png_alpha_files")


# Shapes in a unit square, as rectangles (left, top, right, bottom) or a polygon; "disc" and "ring" are ellipses.
RECTANGLES = {"square": [(0, 0, 1, 1)], "stripes": [(0, row / 4, 1, row / 4 + 1 / 8) for row in range(4)],
              "cross": [(1 / 3, 0, 2 / 3, 1), (0, 1 / 3, 1, 2 / 3)],
              "bars": [(column / 3, 0, column / 3 + 1 / 6, 1) for column in range(3)]}
POLYGONS = {"triangle": [(0.5, 0), (0, 1), (1, 1)], "diamond": [(0.5, 0), (1, 0.5), (0.5, 1), (0, 0.5)]}


@dataclass(frozen=True)
class Mess:
    """How many of each fault to inject, each on its own listing or photo so that the counts can be checked."""

    bad_prices: int = 0            # good listings whose price is "Free", "", "POA", ...
    missing_ids: int = 0           # extra listings with no id (and no photos)
    missing_categories: int = 0    # extra listings with no category, each with photos
    missing_titles: int = 0        # extra listings with no product_name, each with photos
    duplicate_listings: int = 0    # extra rows repeating a good listing's id
    photo_less_listings: int = 0   # extra good listings with no photo row
    orphan_photo_rows: int = 0     # photo rows (with files) whose listing does not exist
    duplicate_image_rows: int = 0  # photo rows repeating a good photo row
    missing_files: int = 0         # photo rows of good listings with no file
    orphan_files: int = 0          # image files with no photo row
    corrupt_files: int = 0         # good photo rows whose file is text, not an image
    truncated_files: int = 0       # ... whose JPEG is cut in half
    empty_files: int = 0           # ... whose file is 0 bytes
    cmyk_files: int = 0            # ... whose JPEG is CMYK (usable)
    png_alpha_files: int = 0       # ... whose file is an RGBA PNG named .jpg (usable)

    @classmethod
    def each(cls, count: int) -> "Mess":
        return cls(**{field.name: count for field in fields(cls)})


def new_id(rng: random.Random) -> str:
    return str(uuid.UUID(int=rng.getrandbits(128), version=4))


def draw_photo(category: int, rng: np.random.Generator, size: int) -> Image.Image:
    """One photo of CATEGORY: its shape in its colour (jittered) on a noisy background."""
    _, _, colour, shape = CATEGORIES[category]
    short = int(size * rng.uniform(0.7, 1.0))
    width, height = (size, short) if rng.random() < 0.5 else (short, size)
    background = rng.integers(0, 90, 3) + rng.normal(0, 18, (height, width, 3))
    image = Image.fromarray(np.clip(background, 0, 255).astype(np.uint8))
    fill = tuple(int(c) for c in np.clip(np.array(colour) + rng.integers(-30, 31, 3), 0, 255))
    side = rng.uniform(0.35, 0.75) * min(width, height)
    x, y = rng.uniform(0, width - side), rng.uniform(0, height - side)
    draw = ImageDraw.Draw(image)
    if shape == "disc":
        draw.ellipse([x, y, x + side, y + side], fill=fill)
    elif shape == "ring":
        draw.ellipse([x, y, x + side, y + side], outline=fill, width=max(2, int(side / 6)))
    for left, top, right, bottom in RECTANGLES.get(shape, []):
        draw.rectangle([x + left * side, y + top * side, x + right * side, y + bottom * side], fill=fill)
    if shape in POLYGONS:
        draw.polygon([(x + u * side, y + v * side) for u, v in POLYGONS[shape]], fill=fill)
    return image


def photo_file(image: Image.Image, fault: str | None = None) -> bytes:
    """A photo's bytes on disk: a JPEG, or the file of one of FILE_FAULTS."""
    if fault == "corrupt_files":
        return b"<html>404 Not Found: this is not a photo</html>\n" * 4
    if fault == "empty_files":
        return b""
    buffer = io.BytesIO()
    if fault == "png_alpha_files":
        image = image.convert("RGBA")
        image.putalpha(Image.linear_gradient("L").resize(image.size))
        image.save(buffer, format="PNG")
    else:
        (image.convert("CMYK") if fault == "cmyk_files" else image).save(buffer, format="JPEG", quality=90)
    data = buffer.getvalue()
    return data[: len(data) // 2] if fault == "truncated_files" else data


def make_sample_catalogue(out_dir: Path, listings: int = 120, categories: int = 4, photos_per_listing: int = 2,
                          seed: int = 0, size: int = 96, mess: Mess = Mess()) -> dict:
    """Write a raw-format catalogue into OUT_DIR; returns its manifest: `categories` ({product_id: root category}
    of the good listings), `good_photos` (their image ids) and, per `Mess` field, the ids it affected."""
    if not 1 <= categories <= len(CATEGORIES):
        raise ValueError(f"categories must be between 1 and {len(CATEGORIES)}, got {categories}")
    if listings < categories or photos_per_listing < 1:
        raise ValueError(f"need at least one listing per category and one photo per listing, got "
                         f"listings={listings}, categories={categories}, photos_per_listing={photos_per_listing}")
    spoiled = sum(getattr(mess, fault) for fault in FILE_FAULTS)
    if max(spoiled, mess.bad_prices, mess.duplicate_listings, mess.duplicate_image_rows) > listings:
        raise ValueError(f"{mess} needs more than {listings} good listings")
    out_dir = Path(out_dir)
    (out_dir / "images").mkdir(parents=True, exist_ok=True)
    rng, pixels = random.Random(seed), np.random.default_rng(seed)
    products, photos, files = [], [], {}
    manifest = {"categories": {}, "good_photos": [], **{field.name: [] for field in fields(Mess)}}

    def add_photo(image_id, product_id, category, row=True, file=True):
        if row:
            photos.append({"id": image_id, "product_id": product_id, "bucket_link": f"{BUCKET}/{image_id}.jpg",
                           "image_ref": "".join(rng.choices(string.ascii_letters + string.digits, k=16)),
                           "create_time": "26/02/2022"})
        if file:
            files[image_id] = draw_photo(category, pixels, size)
        return image_id

    def add_listing(category, with_title=True, with_id=True, photo_count=photos_per_listing, price=None):
        product_id = new_id(rng) if with_id else ""
        if price is None:
            price = f"£{rng.choice([rng.randint(1, 99), rng.randint(100, 999), rng.randint(1000, 4000)]):,}.00"
        town, name = rng.choice(TOWNS), f"{rng.choice(ADJECTIVES)} {rng.choice(NOUNS)}"
        path = "" if category is None else f"{CATEGORIES[category][0]} / {rng.choice(CATEGORIES[category][1])}"
        products.append({
            "id": product_id,
            "product_name": f"{name} | in {town} | Gumtree" if with_title else "",
            "category": path,
            # Real descriptions contain bare carriage returns inside the field.
            "product_description": f"{name} for sale.\rCollection only from {town.split(',')[0]}.\rNo offers.",
            "price": price,
            "location": town,
        })
        image_ids = [new_id(rng) for _ in range(photo_count)]
        drawn = category if category is not None else rng.randrange(categories)
        return product_id, [add_photo(image_id, product_id, drawn) for image_id in image_ids]

    for index in range(listings):
        price = BAD_PRICES[index % len(BAD_PRICES)] if index < mess.bad_prices else None
        product_id, image_ids = add_listing(index % categories, price=price)
        manifest["categories"][product_id] = CATEGORIES[index % categories][0]
        manifest["good_photos"] += image_ids
        if index < mess.bad_prices:
            manifest["bad_prices"].append(product_id)
    good = list(manifest["categories"])

    for _ in range(mess.missing_ids):
        add_listing(rng.randrange(categories), with_id=False, photo_count=0)
        manifest["missing_ids"].append(len(products) - 1)
    for _ in range(mess.missing_categories):
        manifest["missing_categories"].append(add_listing(None)[0])
    for _ in range(mess.missing_titles):
        manifest["missing_titles"].append(add_listing(rng.randrange(categories), with_title=False)[0])
    for index in range(mess.duplicate_listings):
        products.append({**products[index], "product_name": f"Repost {index} | in {TOWNS[0]} | Gumtree"})
        manifest["duplicate_listings"].append(good[index])
    for _ in range(mess.photo_less_listings):
        category = rng.randrange(categories)
        product_id, _ = add_listing(category, photo_count=0)
        manifest["categories"][product_id] = CATEGORIES[category][0]
        manifest["photo_less_listings"].append(product_id)
    for index in range(mess.duplicate_image_rows):
        photos.append(dict(photos[index * photos_per_listing]))
        manifest["duplicate_image_rows"].append(photos[index * photos_per_listing]["id"])
    manifest["orphan_photo_rows"] += [add_photo(new_id(rng), new_id(rng), rng.randrange(categories))
                                      for _ in range(mess.orphan_photo_rows)]
    manifest["missing_files"] += [add_photo(new_id(rng), good[index % len(good)], 0, file=False)
                                  for index in range(mess.missing_files)]
    manifest["orphan_files"] += [add_photo(new_id(rng), None, rng.randrange(categories), row=False)
                                 for _ in range(mess.orphan_files)]

    # Each bad or awkward file is the first photo of its own good listing.
    faults = [fault for fault in FILE_FAULTS for _ in range(getattr(mess, fault))]
    file_fault = {manifest["good_photos"][index * photos_per_listing]: fault for index, fault in enumerate(faults)}
    for image_id, fault in file_fault.items():
        manifest[fault].append(image_id)
    for image_id, image in files.items():
        (out_dir / "images" / f"{image_id}.jpg").write_bytes(photo_file(image, file_fault.get(image_id)))
    pd.DataFrame(products).to_csv(out_dir / "Products.csv", lineterminator="\n")
    pd.DataFrame(photos).to_csv(out_dir / "Images.csv", lineterminator="\n")
    return manifest


def write_listings(data: Path, listings: dict[str, dict], photos: dict[str, bytes]) -> None:
    """LISTINGS ({image_id: {product_id, title, price, location, category}}) and PHOTOS in the raw format in DATA."""
    (data / "images").mkdir(parents=True)
    products = {}
    for image_id, listing in listings.items():
        products[listing["product_id"]] = {
            "id": listing["product_id"], "product_name": f"{listing['title']} | in {listing['location']} | Gumtree",
            "category": f"{listing['category']} / Other", "product_description": "as new",
            "price": f"£{listing['price']:.2f}", "location": listing["location"]}
        (data / "images" / f"{image_id}.jpg").write_bytes(photos[image_id])
    pd.DataFrame(list(products.values())).to_csv(data / "Products.csv", lineterminator="\n")
    pd.DataFrame([{"id": image_id, "product_id": listing["product_id"]} for image_id, listing in listings.items()]
                 ).to_csv(data / "Images.csv", lineterminator="\n")


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", required=True, type=Path, help="folder to write Products.csv, Images.csv, images/")
    parser.add_argument("--listings", type=int, default=120, help="good listings")
    parser.add_argument("--categories", type=int, default=4, help=f"root categories (1-{len(CATEGORIES)})")
    parser.add_argument("--photos-per-listing", type=int, default=2)
    parser.add_argument("--size", type=int, default=96, help="longer side of each photo")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--mess", type=int, default=0, help="inject N of every kind of fault (see Mess)")
    args = parser.parse_args(argv)
    manifest = make_sample_catalogue(args.out, args.listings, args.categories, args.photos_per_listing,
                                     args.seed, args.size, Mess.each(args.mess))
    injected = {name: len(ids) for name, ids in manifest.items() if name not in ("categories", "good_photos")}
    print(f"{len(manifest['categories'])} listings, {len(manifest['good_photos'])} photos -> {args.out}")
    if any(injected.values()):
        print("injected: " + json.dumps(injected))


if __name__ == "__main__":
    main()
