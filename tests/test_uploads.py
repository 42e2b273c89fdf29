"""Hostile and unusual uploads: each alone in-process, then all mixed with good photos through a real TorchServe.

Every case is generated here (no binary fixtures). A bad upload gets its own 4xx and error type, a valid
one 200, whatever else shares its dynamic batch; the worker's memory stays bounded while they are served.
"""
import faiss  # noqa: F401  (before torch: both bring an OpenMP runtime, and this order is the safe one)

import base64
import io
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

from handlers.local import load_local_handler, predict_local
from marketplace_search.images import MAX_DECODED_BYTES
from scripts.serve import java_process
from tests.serving_fixtures import (archive_tiny_run, extract_archive, make_tiny_run, photo_jpeg,
                                    png_with_declared_size, running_server)

NAME = "marketplace"
BATCH_SIZE = 8
MAX_BATCH_DELAY_MS = 400  # long enough that requests sent together share batches on a busy 2-core machine
# While the corpus is served, the worker may grow by at most this over its idle size: two uploads decode
# at once (the handler's decode threads, one per core here), each within MAX_DECODED_BYTES, plus what a
# batch of tensors and Python's allocator keep.
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

    def local_request(self) -> tuple[dict, dict]:
        """(TorchServe request dict, HTTP headers) as the worker receives them."""
        if self.document is not None:
            return {"body": self.document}, {"Content-Type": "application/json", **self.headers}
        if self.fields is not None:
            return dict(self.fields), dict(self.headers)
        body = self.body
        if self.content_type.startswith("text"):  # TorchServe hands the handler a text body as str
            body = body.decode("utf-8")
        return {"body": body}, {"Content-Type": self.content_type, **self.headers}

    def post(self, url: str, auth: dict) -> requests.Response:
        headers = {**self.headers, **auth}
        if self.document is not None:
            return requests.post(url, json=self.document, headers=headers, timeout=120)
        if self.fields is not None:
            files = {name: (name, value, "image/jpeg") if isinstance(value, bytes) else (None, value)
                     for name, value in self.fields.items()}  # always multipart/form-data
            return requests.post(url, files=files, headers=headers, timeout=120)
        return requests.post(url, data=self.body, headers={"Content-Type": self.content_type, **headers}, timeout=120)


def encoded(image: Image.Image, fmt: str, **options) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, fmt, **options)
    return buffer.getvalue()


def scene(width: int = 96, height: int = 72) -> Image.Image:
    """A smooth colour picture (gradients compress fast at any size)."""
    x = np.linspace(0, 255, width, dtype=np.float32)[None, :]
    y = np.linspace(0, 255, height, dtype=np.float32)[:, None]
    pixels = np.stack([np.broadcast_to(x, (height, width)), np.broadcast_to(y, (height, width)),
                       np.broadcast_to((x + y) / 2, (height, width))], axis=2)
    return Image.fromarray(pixels.astype(np.uint8), "RGB")


def png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def png_raw(width: int, height: int, bit_depth: int, colour_type: int, rows: bytes | None = None) -> bytes:
    """A PNG written by hand: any header, and `rows` (filtered scanlines) compressed as its data."""
    header = png_chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, bit_depth, colour_type, 0, 0, 0))
    return (b"\x89PNG\r\n\x1a\n" + header + png_chunk(b"IDAT", zlib.compress(rows or b"\0", 1))
            + png_chunk(b"IEND", b""))


def grey16_png(width: int, height: int) -> bytes:
    """A real, complete 16-bit greyscale PNG: ~100 KB on disk, width x height x 2 bytes decoded."""
    first = b"\0" + np.linspace(0, 65535, width).astype(">u2").tobytes()
    same = b"\2" + bytes(2 * width)  # filter "Up": the same pixels as the row above
    compressor = zlib.compressobj(9)
    data = compressor.compress(first) + b"".join(compressor.compress(same) for _ in range(height - 1))
    data += compressor.flush()
    header = png_chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 16, 0, 0, 0, 0))
    return b"\x89PNG\r\n\x1a\n" + header + png_chunk(b"IDAT", data) + png_chunk(b"IEND", b"")


def jpeg_claiming(width: int, height: int) -> bytes:
    """A small JPEG whose frame header (SOF0) claims width x height."""
    data = bytearray(encoded(scene(16, 16), "JPEG"))
    sof = data.index(b"\xff\xc0")
    data[sof + 5:sof + 9] = struct.pack(">HH", height, width)
    return bytes(data)


def bmp_claiming(width: int, height: int) -> bytes:
    data = bytearray(encoded(scene(4, 4), "BMP"))
    data[18:26] = struct.pack("<ii", width, height)
    return bytes(data)


def psd_header() -> bytes:
    """The header of a 3-channel 8-bit Photoshop file, 4x4, with empty sections and raw zero pixels."""
    return (b"8BPS" + struct.pack(">H6xHIIHH", 1, 3, 4, 4, 8, 3) + struct.pack(">III", 0, 0, 0)
            + struct.pack(">H", 0) + bytes(48))


def gif_frames(count: int) -> bytes:
    frames = [scene(40, 30).rotate(90 * n).convert("P", palette=Image.Palette.ADAPTIVE) for n in range(count)]
    return encoded(frames[0], "GIF", save_all=True, append_images=frames[1:], duration=100, loop=0)


def gif_with_bad_frame(frame: int) -> bytes:
    """A two-frame GIF whose `frame`-th image data (0 or 1) is cut short and followed by garbage."""
    data = gif_frames(2)
    starts = [match.start() for match in re.finditer(rb"\x2c\x00\x00\x00\x00", data)]  # image descriptors
    cut = starts[frame] + 10 + 1 + 3  # descriptor, LZW code size, a few bytes of the first sub-block
    return data[:cut] + b"\xff" * 8 + (data[starts[1]:] if frame == 0 else b"")


def exif_rotated_jpeg() -> bytes:
    exif = Image.Exif()
    exif[0x0112] = 6
    return encoded(scene(), "JPEG", exif=exif)


def with_alpha() -> Image.Image:
    image = scene().convert("RGBA")
    image.putalpha(Image.linear_gradient("L").resize(image.size))
    return image


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def make_corpus() -> dict[str, Upload]:
    jpeg = encoded(scene(), "JPEG", quality=90)
    png = encoded(scene(), "PNG")
    svg = b'<?xml version="1.0"?><svg xmlns="http://www.w3.org/2000/svg" width="10" height="10"><rect/></svg>'
    return {
        # refused: not an image of an accepted format (415)
        "plain text": Upload(415, "unsupported_format", b"name,price\nlamp,5\n"),
        "HTML": Upload(415, "unsupported_format", b"<!DOCTYPE html><html><body><img src=x></body></html>",
                       "text/html"),
        "SVG": Upload(415, "unsupported_format", svg, "image/svg+xml"),
        "PDF": Upload(415, "unsupported_format", b"%PDF-1.4\n1 0 obj <<>> endobj\ntrailer <<>>\n%%EOF\n",
                      "application/pdf"),
        "ICO": Upload(415, "unsupported_format", encoded(scene(32, 32), "ICO"), "image/x-icon"),
        "PSD": Upload(415, "unsupported_format", psd_header(), "image/vnd.adobe.photoshop"),
        "SVG as base64 JSON": Upload(415, "unsupported_format", document={"image": b64(svg)}),
        # refused: too large to decode (413)
        "JPEG header bomb": Upload(413, "image_too_large", jpeg_claiming(60_000, 60_000)),
        "PNG header bomb": Upload(413, "image_too_large", png_with_declared_size(30_000, 30_000), "image/png"),
        "BMP header bomb": Upload(413, "image_too_large", bmp_claiming(20_000, 20_000), "image/bmp"),
        "PNG over the pixel limit": Upload(413, "image_too_large", png_with_declared_size(9_000, 9_000), "image/png"),
        "16-bit RGBA PNG 8000x8000": Upload(413, "image_too_large", png_raw(8_000, 8_000, 16, 6), "image/png"),
        # refused: unusable bytes or options (400)
        "empty": Upload(400, "invalid_image", b""),
        "truncated JPEG": Upload(400, "invalid_image", jpeg[: len(jpeg) // 2]),
        "truncated PNG": Upload(400, "invalid_image", png[: len(png) // 2], "image/png"),
        "JPEG signature then garbage": Upload(400, "invalid_image", b"\xff\xd8\xff" + bytes(64)),
        "zero-width PNG": Upload(400, "invalid_image", png_raw(0, 10, 8, 2), "image/png"),
        "GIF with a bad first frame": Upload(400, "invalid_image", gif_with_bad_frame(0), "image/gif"),
        "PNG with a corrupt IDAT": Upload(400, "invalid_image", png_raw(64, 64, 8, 2, b"\x07" * 5000), "image/png"),
        "bad base64": Upload(400, "bad_base64", document={"image": "not*base64!"}),
        "bad JSON": Upload(400, "bad_json", b'{"image": ', "application/json"),
        "unknown JSON field": Upload(400, "unknown_field", document={"image": b64(jpeg), "colour": "red"}),
        "k=0": Upload(400, "bad_option", jpeg, headers={"X-K": "0"}),
        "k=abc": Upload(400, "bad_option", document={"image": b64(jpeg), "k": "abc"}),
        "unknown category": Upload(400, "bad_option", fields={"photo": jpeg, "category": "Spaceships"}),
        "two photos in one form": Upload(400, "unknown_field", fields={"photo": jpeg, "other": jpeg}),
        "text in the photo field": Upload(415, "unsupported_format", fields={"photo": "just words"}),
        # valid (200)
        "WebP": Upload(200, None, encoded(scene(), "WEBP"), "image/webp"),
        "BMP": Upload(200, None, encoded(scene(), "BMP"), "image/bmp"),
        "TIFF": Upload(200, None, encoded(scene(), "TIFF", compression="tiff_lzw"), "image/tiff"),
        "progressive JPEG": Upload(200, None, encoded(scene(), "JPEG", progressive=True)),
        "EXIF-rotated JPEG": Upload(200, None, exif_rotated_jpeg()),
        "animated GIF": Upload(200, None, gif_frames(3), "image/gif"),
        "GIF with a bad second frame": Upload(200, None, gif_with_bad_frame(1), "image/gif"),
        "12-megapixel JPEG": Upload(200, None, encoded(scene(4032, 3024), "JPEG", quality=85)),
        "CMYK JPEG": Upload(200, None, encoded(scene().convert("CMYK"), "JPEG")),
        "palette PNG": Upload(200, None, encoded(scene().convert("P", palette=Image.Palette.ADAPTIVE), "PNG"),
                              "image/png"),
        "PNG with alpha": Upload(200, None, encoded(with_alpha(), "PNG"), "image/png"),
        "greyscale JPEG": Upload(200, None, encoded(scene().convert("L"), "JPEG")),
        "16-bit grey PNG 8000x8000": Upload(200, None, grey16_png(8_000, 8_000), "image/png"),
    }


CORPUS = make_corpus()


@pytest.fixture(scope="module")
def archive(module_tmp):
    root = module_tmp("uploads")
    run = make_tiny_run(root / "runs" / "2025-01-31_142233")
    mar = archive_tiny_run(run, root / "store", version="1.0", batch_size=BATCH_SIZE,
                           max_batch_delay=MAX_BATCH_DELAY_MS)
    return root, mar


@pytest.fixture(scope="module")
def handler(archive):
    root, mar = archive
    return load_local_handler(extract_archive(mar, root / "model"), batch_size=BATCH_SIZE)


def test_the_corpus_is_as_described():
    assert len(CORPUS) >= 25
    assert len(CORPUS["16-bit grey PNG 8000x8000"].body) < 200_000  # a small file...
    assert 8_000 * 8_000 * 2 <= MAX_DECODED_BYTES  # ...whose decoded size is within the limit
    assert len(CORPUS["16-bit RGBA PNG 8000x8000"].body) < 1_000  # 256 MB decoded: refused from its header


@pytest.mark.parametrize("name", list(CORPUS))
def test_each_upload_alone_in_process(handler, name):
    upload = CORPUS[name]
    request, headers = upload.local_request()
    [(status, answer)] = predict_local(handler, [request], [headers])
    assert status == upload.status, answer
    if upload.status == 200:
        assert answer["neighbours"] and answer["category"]
    else:
        assert answer["code"] == status and answer["type"] == upload.kind and answer["error"]


def test_an_unexpected_failure_is_that_request_s_500(handler, monkeypatch, caplog):
    """A bug while preparing one request (not the upload's fault) is its 500, logged; the others are answered."""
    transform = handler.transform
    marker = CORPUS["BMP"].body  # 96 x 72; the good photos are 96 x 80

    def failing(image):
        if image.size == (96, 72):
            raise KeyError("a bug")
        return transform(image)

    monkeypatch.setattr(handler, "transform", failing)
    good = photo_jpeg(1)
    answers = predict_local(handler, [{"body": good}, {"body": marker}, {"body": good}],
                            [{"Content-Type": "image/jpeg"}, {"Content-Type": "image/bmp"}, {"Content-Type": "image/jpeg"}])
    assert [status for status, _ in answers] == [200, 500, 200]
    assert answers[1][1] == {"code": 500, "type": "internal_error",
                             "error": "internal error while preparing this request; it has been logged"}
    assert "unexpected failure while preparing it" in caplog.text and "KeyError: 'a bug'" in caplog.text


def batch_sizes(metrics_text: str) -> dict[int, float]:
    found = re.findall(r'^MarketplaceBatches\{BatchSize="(\d+)"[^}]*\}\s+([0-9.]+)', metrics_text, re.MULTILINE)
    return {int(size): float(count) for size, count in found}


def worker_rss(server) -> int:
    """The largest resident size among the Java frontend's child processes (the Python worker)."""
    java = java_process(server.pid)
    sizes = []
    for child in java.children(recursive=True) if java else []:
        try:
            sizes.append(child.memory_info().rss)
        except psutil.NoSuchProcess:
            pass
    return max(sizes, default=0)


class PeakSampler:
    """Samples the worker's RSS every few milliseconds in a thread; `peak` is the largest seen."""

    def __init__(self, server, interval: float = 0.02):
        self.server, self.interval, self.peak = server, interval, 0
        self.stopped = threading.Event()
        self.thread = threading.Thread(target=self.run, daemon=True)

    def run(self) -> None:
        while not self.stopped.is_set():
            self.peak = max(self.peak, worker_rss(self.server))
            time.sleep(self.interval)

    def __enter__(self) -> "PeakSampler":
        self.thread.start()
        return self

    def __exit__(self, *exc_info) -> None:
        self.stopped.set()
        self.thread.join(10)


@pytest.mark.server
def test_mixed_into_dynamic_batches_with_good_photos_through_torchserve(archive):
    root, mar = archive
    good = {f"good photo {n}": Upload(200, None, photo_jpeg(n)) for n in range(8)}
    uploads = list({**CORPUS, **good}.items())
    with running_server(mar.parent, root / "torchserve", {NAME: mar.name}) as server:
        url = f"{server.inference_url}/predictions/{NAME}"
        token = server.token("inference")
        auth = {"Authorization": f"Bearer {token}"} if token else {}
        first = Upload(200, None, photo_jpeg(0)).post(url, auth)
        assert first.status_code == 200, first.text
        idle = worker_rss(server)
        assert idle > 0
        barrier = threading.Barrier(len(uploads))

        def send(item):
            name, upload = item
            barrier.wait()
            return name, upload.post(url, auth)

        with PeakSampler(server) as sampler, ThreadPoolExecutor(len(uploads)) as pool:
            results = dict(pool.map(send, uploads))
        for name, upload in uploads:
            response = results[name]
            assert response.status_code == upload.status, (name, response.text)
            body = response.json()
            if upload.status == 200:
                assert body["neighbours"], name
            else:
                assert body["code"] == upload.status and body["type"] == upload.kind, (name, body)
        for number in range(8):  # good photos are in the tiny catalogue: no answer went to another slot
            assert results[f"good photo {number}"].json()["neighbours"][0]["image_id"] == f"img-{number:03d}"

        sizes = batch_sizes(requests.get(f"{server.metrics_url}/metrics", timeout=10).text)
        assert any(size > 1 for size in sizes), f"no request shared a batch: {sizes}"
        growth = sampler.peak - idle
        print(f"worker RSS idle {idle / 2**20:.0f} MiB, peak {sampler.peak / 2**20:.0f} MiB "
              f"(+{growth / 2**20:.0f} MiB, limit +{WORKER_GROWTH_LIMIT / 2**20:.0f} MiB); batches {sizes}")
        assert growth < WORKER_GROWTH_LIMIT
        after = Upload(200, None, photo_jpeg(3)).post(url, auth)
        assert after.status_code == 200 and after.json()["neighbours"][0]["image_id"] == "img-003"
