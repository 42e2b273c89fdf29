"""Hostile and unusual uploads among good photos through TorchServe: each its own status, memory bounded."""
import base64
import re
import struct
import threading
import time
import zlib
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import numpy as np
import psutil
import pytest
import requests
from PIL import Image

from handlers.local import predict_local
from marketplace_search.images import MAX_DECODED_BYTES
from marketplace_search.text import MAX_TITLE_CHARS
from scripts import api
from scripts.benchmark.served import read_counters
from tests.conftest import encoded, make_image_variants, two_colour_image
from tests.serving_fixtures import NAME, photo_jpeg, png_raw, worker_pid

pytestmark = pytest.mark.server

# The worker's growth: two uploads decode at once, each within MAX_DECODED_BYTES, plus a batch's tensors and slack.
WORKER_GROWTH_LIMIT = 2 * MAX_DECODED_BYTES + 160 * 2**20


@dataclass
class Upload:
    """One request: a raw body with its Content-Type, a JSON document, or multipart fields."""

    status: int
    kind: str | None  # the error's "type"; None for a 200
    body: bytes | None = None
    content_type: str = "image/jpeg"
    document: dict | None = None
    fields: dict | None = None
    headers: dict = field(default_factory=dict)

    def post(self, url: str, auth: dict) -> requests.Response:
        headers = {**self.headers, **auth}
        if self.document is not None:
            return requests.post(url, json=self.document, headers=headers, timeout=120)
        if self.fields is not None:
            files = {name: (name, value, "image/jpeg") if isinstance(value, bytes) else (None, value)
                     for name, value in self.fields.items()}  # always multipart/form-data
            return requests.post(url, files=files, headers=headers, timeout=120)
        return requests.post(url, data=self.body, headers={"Content-Type": self.content_type, **headers}, timeout=120)


def grey16_png(width: int, height: int) -> bytes:
    """A real, complete 16-bit greyscale PNG: ~100 KB on disk, width x height x 2 bytes decoded."""
    first = b"\0" + np.linspace(0, 65535, width).astype(">u2").tobytes()
    same = b"\2" + bytes(2 * width)  # filter "Up": the same pixels as the row above
    compressor = zlib.compressobj(9)
    data = compressor.compress(first) + b"".join(compressor.compress(same) for _ in range(height - 1))
    return png_raw(width, height, 16, 0, data + compressor.flush())


def jpeg_claiming(width: int, height: int) -> bytes:
    """A small JPEG whose frame header (SOF0) claims width x height."""
    data = bytearray(encoded(two_colour_image(16, 16), "JPEG"))
    sof = data.index(b"\xff\xc0")
    data[sof + 5:sof + 9] = struct.pack(">HH", height, width)
    return bytes(data)


def bmp_claiming(width: int, height: int) -> bytes:
    data = bytearray(encoded(two_colour_image(4, 4), "BMP"))
    data[18:26] = struct.pack("<ii", width, height)
    return bytes(data)


def psd_header() -> bytes:
    """The header of a 3-channel 8-bit Photoshop file, 4x4, with empty sections and raw zero pixels."""
    return (b"8BPS" + struct.pack(">H6xHIIHH", 1, 3, 4, 4, 8, 3) + struct.pack(">III", 0, 0, 0)
            + struct.pack(">H", 0) + bytes(48))


def gif_frames(count: int) -> bytes:
    frames = [two_colour_image(40, 30).rotate(90 * n).convert("P", palette=Image.Palette.ADAPTIVE)
              for n in range(count)]
    return encoded(frames[0], "GIF", save_all=True, append_images=frames[1:], duration=100, loop=0)


def gif_with_bad_frame(frame: int) -> bytes:
    """A two-frame GIF whose `frame`-th image data (0 or 1) is cut short and followed by garbage."""
    data = gif_frames(2)
    starts = [match.start() for match in re.finditer(rb"\x2c\x00\x00\x00\x00", data)]  # image descriptors
    cut = starts[frame] + 10 + 1 + 3  # descriptor, LZW code size, a few bytes of the first sub-block
    return data[:cut] + b"\xff" * 8 + (data[starts[1]:] if frame == 0 else b"")


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def make_corpus() -> dict[str, Upload]:
    picture, variants = two_colour_image(96, 72), make_image_variants()
    jpeg, png = encoded(picture, "JPEG", quality=90), encoded(picture, "PNG")
    svg = b'<?xml version="1.0"?><svg xmlns="http://www.w3.org/2000/svg" width="10" height="10"><rect/></svg>'
    return {
        "plain text": Upload(415, "unsupported_format", b"name,price\nlamp,5\n"),
        "HTML": Upload(415, "unsupported_format", b"<!DOCTYPE html><html><body><img src=x></body></html>",
                       "text/html"),
        "SVG": Upload(415, "unsupported_format", svg, "image/svg+xml"),
        "PDF": Upload(415, "unsupported_format", b"%PDF-1.4\n1 0 obj <<>> endobj\ntrailer <<>>\n%%EOF\n",
                      "application/pdf"),
        "ICO": Upload(415, "unsupported_format", encoded(two_colour_image(32, 32), "ICO"), "image/x-icon"),
        "PSD": Upload(415, "unsupported_format", psd_header(), "image/vnd.adobe.photoshop"),
        "SVG as base64 JSON": Upload(415, "unsupported_format", document={"image": b64(svg)}),
        "JPEG header bomb": Upload(413, "image_too_large", jpeg_claiming(60_000, 60_000)),
        "PNG header bomb": Upload(413, "image_too_large", png_raw(30_000, 30_000), "image/png"),
        "BMP header bomb": Upload(413, "image_too_large", bmp_claiming(20_000, 20_000), "image/bmp"),
        "PNG over the pixel limit": Upload(413, "image_too_large", png_raw(9_000, 9_000), "image/png"),
        "16-bit RGBA PNG 8000x8000": Upload(413, "image_too_large", png_raw(8_000, 8_000, 16, 6), "image/png"),
        "empty": Upload(400, "invalid_image", b""),
        "truncated JPEG": Upload(400, "invalid_image", jpeg[: len(jpeg) // 2]),
        "truncated PNG": Upload(400, "invalid_image", png[: len(png) // 2], "image/png"),
        "JPEG signature then garbage": Upload(400, "invalid_image", b"\xff\xd8\xff" + bytes(64)),
        "zero-width PNG": Upload(400, "invalid_image", png_raw(0, 10), "image/png"),
        "GIF with a bad first frame": Upload(400, "invalid_image", gif_with_bad_frame(0), "image/gif"),
        "PNG with a corrupt IDAT": Upload(400, "invalid_image", png_raw(64, 64, data=zlib.compress(b"\x07" * 5000)),
                                          "image/png"),
        "bad base64": Upload(400, "bad_base64", document={"image": "not*base64!"}),
        "bad JSON": Upload(400, "bad_json", b'{"image": ', "application/json"),
        "unknown JSON field": Upload(400, "unknown_field", document={"image": b64(jpeg), "colour": "red"}),
        "k=0": Upload(400, "bad_option", jpeg, headers={"X-K": "0"}),
        "k=1000": Upload(400, "bad_option", jpeg, headers={"X-K": "1000"}),
        "k=abc": Upload(400, "bad_option", document={"image": b64(jpeg), "k": "abc"}),
        "unknown category": Upload(400, "bad_option", fields={"photo": jpeg, "category": "Spaceships"}),
        "two photos in one form": Upload(400, "unknown_field", fields={"photo": jpeg, "other": jpeg}),
        "text in the photo field": Upload(415, "unsupported_format", fields={"photo": "just words"}),
        "title too long": Upload(413, "text_too_long", document={"title": "x" * (MAX_TITLE_CHARS + 1)}),
        "WebP": Upload(200, None, variants["webp"], "image/webp"),
        "BMP": Upload(200, None, encoded(picture, "BMP"), "image/bmp"),
        "TIFF": Upload(200, None, encoded(picture, "TIFF", compression="tiff_lzw"), "image/tiff"),
        "16-bit TIFF": Upload(200, None, encoded(Image.frombytes("I;16B", (40, 30), (np.arange(1200) * 50).astype(
            ">u2").tobytes()), "TIFF"), "image/tiff"),
        "progressive JPEG": Upload(200, None, encoded(picture, "JPEG", progressive=True)),
        "EXIF-rotated JPEG": Upload(200, None, variants["exif_rotated_jpeg"]),
        "animated GIF": Upload(200, None, gif_frames(3), "image/gif"),
        "GIF with a bad second frame": Upload(200, None, gif_with_bad_frame(1), "image/gif"),
        "12-megapixel JPEG": Upload(200, None, encoded(two_colour_image(4032, 3024), "JPEG", quality=85)),
        "CMYK JPEG": Upload(200, None, variants["cmyk_jpeg"]),
        "palette PNG": Upload(200, None, variants["palette_transparent_png"], "image/png"),
        "PNG with alpha": Upload(200, None, variants["png_alpha"], "image/png"),
        "greyscale JPEG": Upload(200, None, encoded(picture.convert("L"), "JPEG")),
        "16-bit grey PNG 8000x8000": Upload(200, None, grey16_png(8_000, 8_000), "image/png"),
        "photo and title": Upload(200, None, jpeg, headers={"X-Title": "red rake"}),
        "title alone": Upload(200, None, document={"title": "old guitar", "k": 3}),
    }


CORPUS = make_corpus()


def test_an_unexpected_failure_is_that_request_s_500(recipe_handler, monkeypatch, caplog):
    """A bug while preparing one request (not the upload's fault) is its 500, logged; the others are answered."""
    handler = recipe_handler
    transform = handler.transform
    marker = CORPUS["BMP"].body  # 96 x 72; the good photos are 96 x 80

    def failing(image):
        if image.size == (96, 72):
            raise KeyError("a bug")
        return transform(image)

    monkeypatch.setattr(handler, "transform", failing)
    good = photo_jpeg(1)
    answers = predict_local(handler, [{"body": good}, {"body": marker}, {"body": good}],
                            [{"Content-Type": kind} for kind in ("image/jpeg", "image/bmp", "image/jpeg")])
    assert [status for status, _ in answers] == [200, 500, 200]
    assert answers[1][1] == {"code": 500, "type": "internal_error",
                             "error": "internal error while preparing this request; it has been logged"}
    assert "unexpected failure while preparing it" in caplog.text and "KeyError: 'a bug'" in caplog.text


def batches(server) -> dict[int, float]:
    """{batch size: batches so far} from the handler's MarketplaceBatches counter."""
    return read_counters(api.metrics_text(server))["batches"]


def test_mixed_into_dynamic_batches_with_good_photos_through_torchserve(served):
    good = {f"good photo {n}": Upload(200, None, photo_jpeg(n)) for n in range(8)}
    uploads = list({**CORPUS, **good}.items())
    url, auth = f"{served.inference_url}/predictions/{NAME}", api.auth_headers(served.token("inference"))
    first = Upload(200, None, photo_jpeg(0)).post(url, auth)
    assert first.status_code == 200, first.text
    worker = psutil.Process(worker_pid(served))
    idle, before = worker.memory_info().rss, batches(served)
    barrier, answered = threading.Barrier(len(uploads)), threading.Event()

    def send(item):
        name, upload = item
        barrier.wait()
        return name, upload.post(url, auth)

    def sample() -> list[int]:  # the worker's RSS every 20 ms until every upload is answered
        samples = []
        while not answered.is_set():
            samples.append(worker.memory_info().rss)
            time.sleep(0.02)
        return samples

    with ThreadPoolExecutor(len(uploads) + 1) as pool:
        sampled = pool.submit(sample)
        results = dict(pool.map(send, uploads))
        answered.set()
    samples = sampled.result()
    for name, upload in uploads:
        response = results[name]
        assert response.status_code == upload.status, (name, response.text)
        assert response.headers["content-type"] == "application/json", name
        body = response.json()
        if upload.status == 200:
            assert body["neighbours"], name
        else:
            assert body["code"] == upload.status and body["type"] == upload.kind, (name, body)
    for number in range(8):  # good photos are in the tiny catalogue: no answer went to another slot
        assert results[f"good photo {number}"].json()["neighbours"][0]["image_id"] == f"img-{number:03d}"

    shared = {size: count - before.get(size, 0) for size, count in batches(served).items() if size > 1}
    assert any(shared.values()), f"no request shared a batch: {batches(served)}"
    growth = max(samples) - idle
    print(f"worker RSS idle {idle / 2**20:.0f} MiB, peak {max(samples) / 2**20:.0f} MiB "
          f"(+{growth / 2**20:.0f} MiB, limit +{WORKER_GROWTH_LIMIT / 2**20:.0f} MiB); batches {shared}")
    assert growth < WORKER_GROWTH_LIMIT
    after = Upload(200, None, photo_jpeg(3)).post(url, auth)
    assert after.status_code == 200 and after.json()["neighbours"][0]["image_id"] == "img-003"
