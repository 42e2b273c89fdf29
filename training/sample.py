"""Generate a small synthetic catalogue in the raw marketplace format, for the demo and the tests.

Writes OUT/Products.csv, OUT/Images.csv and OUT/images/<image_id>.jpg exactly as the real data is laid
out (see ../shared/data/marketplace/README.md). Each category draws its photos from its own colour
and shape (red discs, green squares, ...) with random background noise, position and size, so a small
model learns it in a few epochs. `Mess` injects the faults the real pipeline must survive.

Example:
  python -m training.sample --out work/sample --listings 120 --mess 2
"""
import argparse
import io
import json
import random
import uuid
from dataclasses import dataclass, fields
from pathlib import Path

import numpy as np
import pandas as pd
from PIL import Image, ImageDraw

# (colour, shape) per category: different in both, so colour jitter alone never confuses two.
FAMILIES = [
    ((220, 40, 40), "disc"),
    ((40, 180, 60), "square"),
    ((50, 80, 230), "triangle"),
    ((235, 200, 40), "stripes"),
    ((200, 60, 200), "cross"),
    ((40, 200, 210), "ring"),
    ((240, 130, 30), "diamond"),
    ((235, 235, 235), "bars"),
]
CATEGORIES = [
    ("Home & Garden", ["Garden & Patio / Outdoor Settings & Furniture", "Dining, Living Room Furniture / Mirrors"]),
    ("Computers & Software", ["Laptops", "Computer Monitors"]),
    ("Sports, Leisure & Travel", ["Bicycles", "Camping & Hiking"]),
    ("Baby & Kids Stuff", ["Toys", "Prams & Strollers"]),
    ("Appliances", ["Kitchen Appliances / Microwaves", "Vacuum Cleaners"]),
    ("Health & Beauty", ["Hair Care", "Fragrances"]),
    ("Music, Films, Books & Games", ["Books", "Musical Instruments / Guitars"]),
    ("Office Furniture & Equipment", ["Desks", "Chairs"]),
]
TOWNS = ["Wokingham, Berkshire", "Inverness, Highland", "Skegness, Lincolnshire", "Radstock, Somerset",
         "Ealing Broadway, London", "Chertsey, Surrey", "Ashton, Bristol", "Nelson, Lancashire"]
ADJECTIVES = ["Vintage", "Nearly new", "Large", "Small", "Boxed", "Used", "Spare", "Retro"]
NOUNS = ["lamp", "chair", "table", "mirror", "speaker", "bike", "kettle", "desk", "toy", "monitor"]
BAD_PRICES = ["Free", "", "POA", "£1.2.3"]
BUCKET = "https://example-bucket.s3.eu-west-1.amazonaws.com/sample/images"


@dataclass(frozen=True)
class Mess:
    """How many of each fault to inject. Each fault is put on its own listing or photo, so the
    pipeline's counts can be checked one for one."""

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


def draw_photo(family: int, rng: np.random.Generator, size: int) -> Image.Image:
    """One photo of category `family`: its shape in its colour (jittered) on a noisy background."""
    colour, shape = FAMILIES[family]
    short = int(size * rng.uniform(0.7, 1.0))
    width, height = (size, short) if rng.random() < 0.5 else (short, size)
    background = rng.integers(0, 90, 3) + rng.normal(0, 18, (height, width, 3))
    image = Image.fromarray(np.clip(background, 0, 255).astype(np.uint8))
    fill = tuple(int(c) for c in np.clip(np.array(colour) + rng.integers(-30, 31, 3), 0, 255))
    side = rng.uniform(0.35, 0.75) * min(width, height)
    x, y = rng.uniform(0, width - side), rng.uniform(0, height - side)
    box = [x, y, x + side, y + side]
    draw = ImageDraw.Draw(image)
    if shape == "disc":
        draw.ellipse(box, fill=fill)
    elif shape == "square":
        draw.rectangle(box, fill=fill)
    elif shape == "triangle":
        draw.polygon([(x + side / 2, y), (x, y + side), (x + side, y + side)], fill=fill)
    elif shape == "stripes":
        for row in range(4):
            draw.rectangle([x, y + row * side / 4, x + side, y + row * side / 4 + side / 8], fill=fill)
    elif shape == "cross":
        draw.rectangle([x + side / 3, y, x + 2 * side / 3, y + side], fill=fill)
        draw.rectangle([x, y + side / 3, x + side, y + 2 * side / 3], fill=fill)
    elif shape == "ring":
        draw.ellipse(box, outline=fill, width=max(2, int(side / 6)))
    elif shape == "diamond":
        draw.polygon([(x + side / 2, y), (x + side, y + side / 2), (x + side / 2, y + side), (x, y + side / 2)],
                     fill=fill)
    else:
        for column in range(3):
            draw.rectangle([x + column * side / 3, y, x + column * side / 3 + side / 6, y + side], fill=fill)
    return image


def encode(image: Image.Image, kind: str = "jpeg") -> bytes:
    """Image bytes as stored on disk: a plain JPEG or one of the awkward-but-valid variants."""
    buffer = io.BytesIO()
    if kind == "jpeg":
        image.save(buffer, format="JPEG", quality=90)
    elif kind == "cmyk":
        image.convert("CMYK").save(buffer, format="JPEG", quality=90)
    elif kind == "png_alpha":
        rgba = image.convert("RGBA")
        rgba.putalpha(Image.linear_gradient("L").resize(image.size))
        rgba.save(buffer, format="PNG")
    else:
        raise ValueError(f"unknown image kind {kind!r}")
    return buffer.getvalue()


def spoil(data: bytes, fault: str) -> bytes:
    """The bytes of a bad file: text instead of an image, a JPEG cut in half, or nothing."""
    if fault == "corrupt_files":
        return b"<html>404 Not Found: this is not a photo</html>\n" * 4
    if fault == "truncated_files":
        return data[: len(data) // 2]
    if fault == "empty_files":
        return b""
    raise ValueError(f"unknown fault {fault!r}")


def listing_row(rng: random.Random, product_id: str | None, category: int | None, price: str,
                title: bool = True) -> dict:
    root, subs = CATEGORIES[category] if category is not None else ("", [""])
    town = rng.choice(TOWNS)
    name = f"{rng.choice(ADJECTIVES)} {rng.choice(NOUNS)}"
    return {
        "id": product_id or "",
        "product_name": f"{name} | in {town} | Gumtree" if title else "",
        "category": f"{root} / {rng.choice(subs)}" if root else "",
        # Real descriptions contain bare carriage returns inside the field.
        "product_description": f"{name} for sale.\rCollection only from {town.split(',')[0]}.\rNo offers.",
        "price": price,
        "location": town,
    }


def photo_row(rng: random.Random, image_id: str, product_id: str) -> dict:
    return {"id": image_id, "product_id": product_id, "bucket_link": f"{BUCKET}/{image_id}.jpg",
            "image_ref": "".join(rng.choices("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789", k=16)),
            "create_time": "26/02/2022"}


def random_price(rng: random.Random) -> str:
    return f"£{rng.choice([rng.randint(1, 99), rng.randint(100, 999), rng.randint(1000, 4000)]):,}.00"


def make_sample_catalogue(out_dir: Path, listings: int = 120, categories: int = 4, photos_per_listing: int = 2,
                          seed: int = 0, size: int = 96, mess: Mess = Mess()) -> dict:
    """Write a raw-format catalogue into OUT_DIR; returns a manifest of what was written and injected.

    The manifest has `categories` ({product_id: root category} of the good listings), `good_photos`
    (image ids of the good listings' photos) and, per `Mess` field, the ids it affected.
    """
    if not 1 <= categories <= len(FAMILIES):
        raise ValueError(f"categories must be between 1 and {len(FAMILIES)}, got {categories}")
    if listings < categories or photos_per_listing < 1:
        raise ValueError(f"need at least one listing per category and one photo per listing, got "
                         f"listings={listings}, categories={categories}, photos_per_listing={photos_per_listing}")
    spoiled = mess.corrupt_files + mess.truncated_files + mess.empty_files + mess.cmyk_files + mess.png_alpha_files
    if max(spoiled, mess.bad_prices, mess.duplicate_listings, mess.duplicate_image_rows) > listings:
        raise ValueError(f"{mess} needs more than {listings} good listings")
    out_dir = Path(out_dir)
    (out_dir / "images").mkdir(parents=True, exist_ok=True)
    rng, pixels = random.Random(seed), np.random.default_rng(seed)
    products, photos, files = [], [], {}
    manifest = {"categories": {}, "good_photos": [], **{field.name: [] for field in fields(Mess)}}

    def add_listing(category, with_title=True, with_id=True, photo_count=photos_per_listing, price=None):
        product_id = new_id(rng) if with_id else None
        price = random_price(rng) if price is None else price
        products.append(listing_row(rng, product_id, category, price, with_title))
        image_ids = [new_id(rng) for _ in range(photo_count)]
        family = category if category is not None else rng.randrange(categories)
        for image_id in image_ids:
            photos.append(photo_row(rng, image_id, product_id))
            files[image_id] = draw_photo(family, pixels, size)
        return product_id, image_ids

    for index in range(listings):
        category = index % categories
        price = BAD_PRICES[index % len(BAD_PRICES)] if index < mess.bad_prices else None
        product_id, image_ids = add_listing(category, price=price)
        manifest["categories"][product_id] = CATEGORIES[category][0]
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
    for _ in range(mess.orphan_photo_rows):
        image_id = new_id(rng)
        photos.append(photo_row(rng, image_id, new_id(rng)))
        files[image_id] = draw_photo(rng.randrange(categories), pixels, size)
        manifest["orphan_photo_rows"].append(image_id)
    for index in range(mess.duplicate_image_rows):
        photos.append(dict(photos[index * photos_per_listing]))
        manifest["duplicate_image_rows"].append(photos[index * photos_per_listing]["id"])
    for index in range(mess.missing_files):
        image_id = new_id(rng)
        photos.append(photo_row(rng, image_id, good[index % len(good)]))
        manifest["missing_files"].append(image_id)
    for _ in range(mess.orphan_files):
        image_id = new_id(rng)
        files[image_id] = draw_photo(rng.randrange(categories), pixels, size)
        manifest["orphan_files"].append(image_id)

    # Spoil the first photo of distinct good listings, one fault per listing.
    faults = (["corrupt_files"] * mess.corrupt_files + ["truncated_files"] * mess.truncated_files
              + ["empty_files"] * mess.empty_files + ["cmyk_files"] * mess.cmyk_files
              + ["png_alpha_files"] * mess.png_alpha_files)
    encoded = {image_id: encode(image) for image_id, image in files.items()}
    for index, fault in enumerate(faults):
        image_id = manifest["good_photos"][index * photos_per_listing]
        if fault in ("cmyk_files", "png_alpha_files"):
            encoded[image_id] = encode(files[image_id], fault.removesuffix("_files"))
        else:
            encoded[image_id] = spoil(encoded[image_id], fault)
        manifest[fault].append(image_id)

    for image_id, data in encoded.items():
        (out_dir / "images" / f"{image_id}.jpg").write_bytes(data)
    pd.DataFrame(products).to_csv(out_dir / "Products.csv", lineterminator="\n")
    pd.DataFrame(photos).to_csv(out_dir / "Images.csv", lineterminator="\n")
    return manifest


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", required=True, type=Path, help="folder to write Products.csv, Images.csv, images/")
    parser.add_argument("--listings", type=int, default=120, help="good listings")
    parser.add_argument("--categories", type=int, default=4, help=f"root categories (1-{len(FAMILIES)})")
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
