"""Decode photos safely and normalise them to RGB squares.

Used by the photos stage (files on disk) and by the handler (uploaded bytes), so a photo is
cleaned the same way at training and at serving time.
"""
import io
import math
import warnings
from pathlib import Path

from PIL import Image, ImageOps

# Refuse anything bigger than a 64-megapixel phone photo before decoding it: a decompression
# bomb declares huge dimensions in a tiny file.
MAX_PIXELS = 64_000_000
PAD_COLOUR = (0, 0, 0)
ALPHA_BACKGROUND = (255, 255, 255)


class ImageError(ValueError):
    """A photo that cannot be used: empty, not an image, truncated, too large or of an odd mode."""


def decode_image(data: bytes | Path | str, max_pixels: int = MAX_PIXELS, fit_size: int | None = None) -> Image.Image:
    """Open a photo from bytes or a path, fully decoded, upright, in RGB.

    `fit_size`: the photo will next be shrunk to fit a square of this size (pad_to_square: longer
    side = fit_size), so a JPEG may be decoded at 1/2, 1/4 or 1/8 scale (libjpeg's DCT scaling,
    Pillow's draft mode) as long as it stays at least that large. A 12-megapixel phone photo then
    decodes several times faster, a 640x480 one about twice as fast (scripts.benchmark, bare section).
    Raises ImageError naming what is wrong; never returns a partial image.
    """
    name = str(data) if isinstance(data, (str, Path)) else "upload"
    if isinstance(data, (str, Path)):
        data = Path(data).read_bytes()
    if not data:
        raise ImageError(f"{name}: empty file (0 bytes)")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            image = Image.open(io.BytesIO(data))
            width, height = image.size
            if width * height > max_pixels:
                raise ImageError(
                    f"{name}: {width}x{height} pixels is over the limit of {max_pixels:,} pixels"
                )
            if fit_size and image.format in ("JPEG", "MPO"):
                image.draft(None, fitted_size(width, height, fit_size))
            image.load()
    except ImageError:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as error:
        raise ImageError(f"{name}: image dimensions are too large ({error})") from error
    except Image.UnidentifiedImageError as error:
        raise ImageError(f"{name}: not a recognised image format ({len(data)} bytes)") from error
    except (OSError, SyntaxError, ValueError) as error:
        raise ImageError(f"{name}: corrupt or truncated image ({error})") from error
    return to_rgb(ImageOps.exif_transpose(image), name)


def fitted_size(width: int, height: int, size: int) -> tuple[int, int]:
    """The size pad_to_square resizes a width x height image to, rounded up: the least a reduced decode may give."""
    scale = size / max(width, height)
    return max(1, math.ceil(width * scale)), max(1, math.ceil(height * scale))


def to_rgb(image: Image.Image, name: str = "image") -> Image.Image:
    """Convert any PIL mode we accept to 8-bit RGB; transparency is flattened onto white."""
    if image.mode == "RGB":
        return image
    if image.mode.startswith("I"):
        # 16/32-bit greyscale: rescale to 8 bits rather than clipping everything to white.
        image = image if image.mode == "I" else image.convert("I")  # point() needs "I"
        high = image.getextrema()[1]
        scale = 1 / 256 if high <= 65535 else 255 / high
        image = image.point(lambda value: value * scale).convert("L")
    if image.mode == "P" and "transparency" in image.info:
        image = image.convert("RGBA")
    if image.mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        rgba = image.convert("RGBA")
        background = Image.new("RGB", rgba.size, ALPHA_BACKGROUND)
        background.paste(rgba, mask=rgba.getchannel("A"))
        return background
    if image.mode in ("L", "1", "P", "CMYK", "YCbCr", "LAB", "HSV", "F"):
        return image.convert("RGB")
    raise ImageError(f"{name}: unsupported image mode {image.mode!r}")


def pad_to_square(image: Image.Image, size: int) -> Image.Image:
    """Resize so the longer side is `size` (aspect kept) and pad to size x size with black bars."""
    if size <= 0:
        raise ValueError(f"size must be positive, got {size}")
    width, height = image.size
    scale = size / max(width, height)
    resized = image.resize(
        (max(1, round(width * scale)), max(1, round(height * scale))), Image.Resampling.BICUBIC
    )
    square = Image.new("RGB", (size, size), PAD_COLOUR)
    square.paste(resized, ((size - resized.width) // 2, (size - resized.height) // 2))
    return square
