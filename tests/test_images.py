"""marketplace_search.images (safe decoding, RGB, square padding) and marketplace_search.presets (the transforms)."""
import numpy as np
import pytest
import torch
from PIL import Image

from marketplace_search.images import (MAX_DECODED_BYTES, ImageError, ImageTooLarge, UnsupportedFormat, decode_image,
                                       decoded_bytes, pad_to_square, to_rgb)
from marketplace_search.presets import Preprocess, collate_images, eval_transform, train_transform
from tests.conftest import encoded, two_colour_image
from tests.serving_fixtures import png_raw
from training.tiny_run import photo_jpeg

USABLE = ["rgb_jpeg", "cmyk_jpeg", "png_alpha", "palette_png", "palette_transparent_png", "grey_png",
          "grey16_png", "exif_rotated_jpeg", "webp"]


@pytest.mark.parametrize("name", USABLE)
def test_decode_gives_full_rgb(image_variants, name):
    image = decode_image(image_variants[name])
    assert image.mode == "RGB"
    assert image.size in ((60, 30), (30, 60))


def test_decode_accepts_a_path_and_names_it_in_errors(tmp_path, image_variants):
    path = tmp_path / "photo.jpg"
    path.write_bytes(image_variants["png_alpha"])  # PNG bytes under a .jpg name, as on the marketplace
    assert decode_image(path).size == (60, 30) and decode_image(str(path)).mode == "RGB"
    path.write_bytes(b"")
    with pytest.raises(ImageError, match="photo.jpg: empty file"):
        decode_image(path)


def test_decoding_keeps_orientation_transparency_and_colours(image_variants):
    rotated = np.asarray(decode_image(image_variants["exif_rotated_jpeg"]))
    assert rotated.shape == (60, 30, 3)
    assert rotated[5, 15, 0] > 200 and rotated[5, 15, 2] < 60, "the red (left) half must end up on top"
    assert rotated[55, 15, 2] > 200 and rotated[55, 15, 0] < 60
    transparent = np.asarray(decode_image(image_variants["png_alpha"]))
    assert (transparent[:, :30] == 255).all() and tuple(transparent[15, 45]) == (0, 0, 255)  # flattened onto white
    cmyk = np.asarray(decode_image(image_variants["cmyk_jpeg"])).astype(int)
    assert cmyk[15, 10, 0] > 200 and cmyk[15, 10, 2] < 60 and cmyk[15, 50, 2] > 200 and cmyk[15, 50, 0] < 60
    grey16 = np.asarray(decode_image(image_variants["grey16_png"]))  # rescaled, not clipped
    assert grey16[0, 0, 0] < 10 and grey16[0, -1, 0] > 245 and 100 < grey16.mean() < 155


@pytest.mark.parametrize("data, error, message", [
    ("empty", ImageError, "empty file"),
    ("text", UnsupportedFormat, "not a recognised image"),
    ("truncated_jpeg", ImageError, "truncated"),
    (b"<svg xmlns='http://www.w3.org/2000/svg'/>", UnsupportedFormat, "not a recognised image"),
    (b"%PDF-1.4\n%%EOF\n", UnsupportedFormat, "accepted formats: JPEG, PNG, WEBP, GIF, BMP, TIFF"),
    (encoded(Image.new("RGB", (16, 16)), "ICO"), UnsupportedFormat, "a ICO image"),
    (b"GIF89a broken", ImageError, "corrupt GIF header"),
])
def test_unusable_bytes_are_refused_naming_why(image_variants, data, error, message):
    with pytest.raises(error, match=message) as raised:
        decode_image(image_variants.get(data, data))
    assert (raised.type is UnsupportedFormat) == (error is UnsupportedFormat)
    assert isinstance(raised.value, ValueError)  # a caller that catches ValueError catches an unreadable photo


def test_fit_size_decodes_a_large_jpeg_at_a_reduced_scale_never_below_the_fitted_size():
    photo = photo_jpeg(0, (400, 320))  # fitted into a square of S: S x 0.8 S
    assert decode_image(photo, fit_size=50).size == (50, 40)  # 1/8 scale is exactly 50 x 40
    assert decode_image(photo, fit_size=51).size == (100, 80)  # 1/8 would be < 51: 1/4
    assert decode_image(photo, fit_size=160).size == (200, 160)  # 1/4 would give 100 < 160: 1/2
    assert decode_image(photo, fit_size=300).size == decode_image(photo).size == (400, 320)
    assert decode_image(photo_jpeg(0, (320, 640)), fit_size=256).size == (160, 320)  # the longer side counts


def test_fit_size_box_reduces_other_formats_to_at_least_twice_the_fitted_size(image_variants):
    assert decode_image(image_variants["png_alpha"], fit_size=30).size == (60, 30)  # 2 x (30, 15): whole
    assert decode_image(image_variants["png_alpha"], fit_size=4).size == (9, 5)  # fitted (4, 2): 7x, rounded up


@pytest.mark.parametrize("name", ["png_alpha", "palette_png", "palette_transparent_png", "grey16_png", "webp"])
def test_reduced_decode_keeps_the_colours_and_flattens_transparency(image_variants, name):
    full = np.asarray(decode_image(image_variants[name])).astype(int)
    reduced = np.asarray(decode_image(image_variants[name], fit_size=10)).astype(int)  # 3x smaller
    assert reduced.shape == (10, 20, 3)
    assert np.abs(reduced - full[1::3, 1::3]).max() <= 2


@pytest.mark.parametrize("fmt", ["PNG", "TIFF", "WEBP"])
def test_exif_orientation_survives_a_reduced_decode(fmt):
    exif = Image.Exif()
    exif[0x0112] = 6  # displayed rotated 90 degrees clockwise: the red (left) half on top
    decoded = np.asarray(decode_image(encoded(two_colour_image(600, 300), fmt, exif=exif), fit_size=50))
    assert decoded.shape[0] > decoded.shape[1], "upright: taller than wide"
    assert decoded[2, decoded.shape[1] // 2, 0] > 200 and decoded[-3, decoded.shape[1] // 2, 2] > 200


@pytest.mark.parametrize("width, height", [(100_000, 100_000), (10_000, 10_000), (9_000, 9_000)])
def test_decompression_bomb_is_refused_before_decoding(image_variants, width, height):
    # 1e10 pixels trips Pillow's own error, 1e8 its warning, 8.1e7 only our 64-megapixel limit.
    with pytest.raises(ImageTooLarge, match="too large|over the limit"):
        decode_image(png_raw(width, height))
    with pytest.raises(ImageTooLarge, match="60x30 pixels is over the limit of 1,000"):  # a lower limit
        decode_image(image_variants["rgb_jpeg"], max_pixels=1_000)
    assert decode_image(image_variants["rgb_jpeg"], max_pixels=1_800).size == (60, 30)


def test_decoded_bytes_are_refused_from_the_header_a_large_jpeg_at_its_draft_size():
    # 4000 x 4000 RGB takes 64 MB in memory (4 bytes a pixel): within MAX_PIXELS, over a 32 MB budget
    with pytest.raises(ImageTooLarge, match="takes 64,000,000 bytes, over the limit of 32,000,000"):
        decode_image(png_raw(4_000, 4_000), max_decoded_bytes=32_000_000)
    assert decoded_bytes(Image.new("I;16", (10, 10))) == 200 and decoded_bytes(Image.new("P", (10, 10))) == 100
    assert MAX_DECODED_BYTES >= 8_000 * 8_000 * 2  # a 64-megapixel 16-bit greyscale image is served
    photo = photo_jpeg(0, (2_000, 1_500))  # 12 MB decoded whole; at 1/4 scale (1/8 is under 256): 0.75 MB
    with pytest.raises(ImageTooLarge):
        decode_image(photo, max_decoded_bytes=10_000_000)
    assert decode_image(photo, fit_size=256, max_decoded_bytes=10_000_000).size == (500, 375)


def test_to_rgb_rejects_an_unknown_mode():
    with pytest.raises(ImageError, match="unsupported image mode 'RGBX'"):
        to_rgb(Image.new("RGBX", (2, 2)))


@pytest.mark.parametrize("size", [(60, 30), (30, 60), (64, 64), (7, 200)])
def test_pad_to_square_keeps_aspect_with_black_bars(size):
    image = pad_to_square(Image.new("RGB", size, (255, 255, 255)), 64)
    assert image.size == (64, 64) and image.mode == "RGB"
    pixels = np.asarray(image)
    white = (pixels == 255).all(axis=2)
    rows, columns = white.any(axis=1).sum(), white.any(axis=0).sum()
    expected = (round(size[1] * 64 / max(size)), round(size[0] * 64 / max(size)))
    assert abs(rows - expected[0]) <= 1 and abs(columns - expected[1]) <= 1
    if size[0] != size[1]:
        assert (pixels[0, 0] == 0).all() or (pixels[-1, -1] == 0).all()
    with pytest.raises(ValueError, match="size must be positive"):
        pad_to_square(image, 0)


def test_preprocess_round_trips_through_a_dict():
    preprocess = Preprocess(resize=160, crop=128)
    assert Preprocess.from_dict(preprocess.to_dict()) == preprocess
    assert preprocess.to_dict()["mean"] == [0.485, 0.456, 0.406]


@pytest.mark.parametrize("make", [eval_transform, train_transform])
def test_transforms_give_normalised_crops_the_eval_one_always_the_same(make, image_variants):
    transform = make(Preprocess(resize=72, crop=64))
    tensor = transform(Image.new("RGB", (90, 50), (124, 116, 104)))
    assert tensor.shape == (3, 64, 64) and tensor.dtype == torch.float32
    assert tensor.min() < -1  # the black bars, normalised
    image = decode_image(image_variants["rgb_jpeg"])
    torch.manual_seed(0)
    assert torch.equal(transform(image), transform(image)) == (make is eval_transform)


def test_collate_images_stacks_a_batch(image_variants):
    images = [decode_image(image_variants[name]) for name in ("rgb_jpeg", "exif_rotated_jpeg", "grey_png")]
    batch = collate_images(images, Preprocess(resize=40, crop=32))
    assert batch.shape == (3, 3, 32, 32) and batch.dtype == torch.float32
