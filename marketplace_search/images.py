"""Decode photos safely and normalise them to RGB squares, alike for training (files) and serving (uploads)."""
import io
import logging
import math
import warnings
from pathlib import Path

from PIL import ExifTags, Image

# What an upload may be, decided from its bytes, never its name or Content-Type (a multi-picture JPEG: "MPO").
ACCEPTED_FORMATS = ("JPEG", "PNG", "WEBP", "GIF", "BMP", "TIFF")
# Refused from the header before decoding: a decompression bomb declares huge dimensions in a tiny file.
MAX_PIXELS = 64_000_000
# The most decoding may hold, read from the header (decoded_bytes): a 50-megapixel PNG, any JPEG fitted to the model.
MAX_DECODED_BYTES = 192 * 2**20
# Pillow's storage: modes of 2, 3 or 4 bands take 4 bytes a pixel.
DECODED_BYTES_PER_PIXEL = {"1": 1, "L": 1, "P": 1, "I;16": 2, "I;16L": 2, "I;16B": 2, "I;16N": 2}
WIDE_BYTES_PER_PIXEL = 4
# Full-size copies a format's decoder holds, the image included (Pillow's WebP reader keeps libwebp's canvas).
DECODER_COPIES = {"WEBP": 4}
# A decoded image is box-reduced to no less than this many times its final size, as Pillow's `reducing_gap`.
REDUCING_GAP = 2
BAND_PIXELS = 2**20  # shrink() works on bands of about this many pixels
# EXIF orientation -> the transpose that makes the photo upright (as ImageOps.exif_transpose).
ORIENTATIONS = {2: Image.Transpose.FLIP_LEFT_RIGHT, 3: Image.Transpose.ROTATE_180, 4: Image.Transpose.FLIP_TOP_BOTTOM,
                5: Image.Transpose.TRANSPOSE, 6: Image.Transpose.ROTATE_270, 7: Image.Transpose.TRANSVERSE,
                8: Image.Transpose.ROTATE_90}
PAD_COLOUR = (0, 0, 0)
ALPHA_BACKGROUND = (255, 255, 255)

logger = logging.getLogger(__name__)


class ImageError(ValueError):
    """A photo that cannot be used: empty, truncated, corrupt or of an odd mode."""


class UnsupportedFormat(ImageError):
    """Bytes that are not an image of one of ACCEPTED_FORMATS (text, SVG, PDF, ICO, PSD...)."""


class ImageTooLarge(ImageError):
    """An image over MAX_PIXELS or MAX_DECODED_BYTES, or too large to decode in the memory there is."""


def decode_image(data: bytes | Path | str, max_pixels: int = MAX_PIXELS, fit_size: int | None = None,
                 max_decoded_bytes: int = MAX_DECODED_BYTES) -> Image.Image:
    """Open a photo from bytes or a path, fully decoded, upright, in RGB; raises UnsupportedFormat, ImageTooLarge
    or ImageError naming what is wrong. `fit_size`: the photo will next be fitted into a square of this size, so a
    JPEG may be decoded at 1/2, 1/4 or 1/8 scale while it stays at least that large, and any other image is
    box-reduced to REDUCING_GAP times that size before its mode is converted."""
    name = str(data) if isinstance(data, (str, Path)) else "upload"
    if isinstance(data, (str, Path)):
        data = Path(data).read_bytes()
    if not data:
        raise ImageError(f"{name}: empty file (0 bytes)")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            image = open_accepted(data, name)
            check_size(image, name, max_pixels, max_decoded_bytes, fit_size)
            image.load()
            orientation = image.getexif().get(ExifTags.Base.Orientation)  # read before shrink() drops it
            image = shrink(image, fit_size)
            if orientation in ORIENTATIONS:
                image = image.transpose(ORIENTATIONS[orientation])
    except ImageError:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as error:
        raise ImageTooLarge(f"{name}: image dimensions are too large ({error})") from error
    except MemoryError as error:
        raise ImageTooLarge(f"{name}: too large to decode in the memory available") from error
    except (OSError, SyntaxError, ValueError, EOFError) as error:
        raise ImageError(f"{name}: corrupt or truncated image ({error})") from error
    except Exception as error:
        # Pillow's decoders raise anything on a hostile file: still this file's fault (logged: maybe Pillow's bug).
        logger.warning("%s: unexpected %s while decoding", name, type(error).__name__, exc_info=True)
        raise ImageError(f"{name}: corrupt image ({type(error).__name__}: {error})") from error
    return to_rgb(image, name)


def open_accepted(data: bytes, name: str) -> Image.Image:
    """Open the header with the decoders of ACCEPTED_FORMATS only; UnsupportedFormat for anything else."""
    Image.init()  # registers every reader: `formats` names some that Pillow otherwise loads on demand
    try:
        return Image.open(io.BytesIO(data), formats=ACCEPTED_FORMATS)
    except Image.UnidentifiedImageError as error:
        claimed = [fmt for fmt in ACCEPTED_FORMATS if Image.OPEN[fmt][1](data[:16])]
        if claimed:  # the signature of a format we accept, then a header its reader cannot parse
            raise ImageError(f"{name}: corrupt {claimed[0]} header ({len(data)} bytes)") from error
        found = detected_format(data)
        what = f"a {found} image" if found else f"not a recognised image ({len(data)} bytes)"
        raise UnsupportedFormat(f"{name}: {what}; accepted formats: {', '.join(ACCEPTED_FORMATS)}") from error


def detected_format(data: bytes) -> str | None:
    """The format any of Pillow's readers finds in `data`, only to name it in a refusal."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            with Image.open(io.BytesIO(data)) as image:
                return image.format
    except Exception:  # a header no reader understands, or one that breaks a reader: unnamed either way
        return None


def check_size(image: Image.Image, name: str, max_pixels: int, max_decoded_bytes: int, fit_size: int | None) -> None:
    """Refuse from the header what would take too many pixels or bytes; set a JPEG's reduced-scale draft."""
    width, height = image.size
    if width < 1 or height < 1:
        raise ImageError(f"{name}: image has no pixels ({width}x{height})")
    if width * height > max_pixels:
        raise ImageTooLarge(f"{name}: {width}x{height} pixels is over the limit of {max_pixels:,} pixels")
    if fit_size and image.format in ("JPEG", "MPO"):
        image.draft(None, fitted_size(width, height, fit_size))
    decoded = decoded_bytes(image)
    if decoded > max_decoded_bytes:
        raise ImageTooLarge(f"{name}: decoding a {image.width}x{image.height} {image.format} image ({image.mode}) "
                            f"takes {decoded:,} bytes, over the limit of {max_decoded_bytes:,} bytes")


def decoded_bytes(image: Image.Image) -> int:
    """The memory decoding takes at full size (see DECODED_BYTES_PER_PIXEL and DECODER_COPIES)."""
    per_pixel = DECODED_BYTES_PER_PIXEL.get(image.mode, WIDE_BYTES_PER_PIXEL) * DECODER_COPIES.get(image.format, 1)
    return image.width * image.height * per_pixel


def shrink(image: Image.Image, fit_size: int | None) -> Image.Image:
    """Box-reduce a decoded image to at least REDUCING_GAP x its fitted size, band by band (no full-size copy)."""
    if not fit_size:
        return image
    width, height = fitted_size(image.width, image.height, fit_size)
    factor = min(image.width // (REDUCING_GAP * width), image.height // (REDUCING_GAP * height))
    if factor < 2:
        return image
    rows = factor * max(1, BAND_PIXELS // (image.width * factor))
    reduced = None
    for top in range(0, image.height, rows):
        band = reduce_band(image.crop((0, top, image.width, min(image.height, top + rows))), factor)
        if reduced is None:
            reduced = Image.new(band.mode, (band.width, math.ceil(image.height / factor)))
        reduced.paste(band, (0, top // factor))
    reduced.info = dict(image.info)
    return reduced


def reduce_band(band: Image.Image, factor: int) -> Image.Image:
    if band.mode in ("P", "PA", "1"):  # a box filter needs colours, not palette indices
        band = to_rgb(band, keep_alpha=True)
    if band.mode.startswith("I;16"):  # Image.reduce takes no 16-bit mode; resize does, natively
        return band.resize((math.ceil(band.width / factor), math.ceil(band.height / factor)), Image.Resampling.BOX)
    return band.reduce(factor)


def fitted_size(width: int, height: int, size: int) -> tuple[int, int]:
    """The size pad_to_square resizes a width x height image to, rounded up: the least a reduced decode may give."""
    scale = size / max(width, height)
    return max(1, math.ceil(width * scale)), max(1, math.ceil(height * scale))


def to_rgb(image: Image.Image, name: str = "image", keep_alpha: bool = False) -> Image.Image:
    """Convert any PIL mode we accept to 8-bit RGB, transparency flattened onto white (`keep_alpha`: RGBA)."""
    if image.mode == "RGB":
        return image
    if image.mode == "I;16":
        # 16-bit greyscale: the high byte, rather than clipping everything over 255 to white.
        image = image.point(lambda value: value * (1 / 256)).convert("L")
    elif image.mode.startswith("I"):  # point() takes no other 16-bit layout: through 32-bit "I"
        image = image if image.mode == "I" else image.convert("I")
        high = image.getextrema()[1]
        scale = 1 / 256 if high <= 65535 else 255 / high
        image = image.point(lambda value: value * scale).convert("L")
    if image.mode == "P" and "transparency" in image.info:
        image = image.convert("RGBA")
    if image.mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        rgba = image if image.mode == "RGBA" else image.convert("RGBA")
        if keep_alpha:
            return rgba
        background = Image.new("RGB", rgba.size, ALPHA_BACKGROUND)
        background.paste(rgba, mask=rgba)  # an RGBA mask means its alpha band, without copying it out
        return background
    if keep_alpha and image.mode == "1":
        return image.convert("L")
    if image.mode in ("L", "1", "P", "CMYK", "YCbCr", "LAB", "HSV", "F"):
        return image.convert("RGB")
    raise ImageError(f"{name}: unsupported image mode {image.mode!r}")


def pad_to_square(image: Image.Image, size: int) -> Image.Image:
    """Resize so the longer side is `size` (aspect kept) and pad to size x size with black bars."""
    if size <= 0:
        raise ValueError(f"size must be positive, got {size}")
    width, height = image.size
    scale = size / max(width, height)
    resized = image.resize((max(1, round(width * scale)), max(1, round(height * scale))), Image.Resampling.BICUBIC)
    square = Image.new("RGB", (size, size), PAD_COLOUR)
    square.paste(resized, ((size - resized.width) // 2, (size - resized.height) // 2))
    return square
