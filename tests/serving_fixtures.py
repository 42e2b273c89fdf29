"""Serving fixtures: tiny runs (training.tiny_run), their archives, and a real TorchServe around them.

    from tests.serving_fixtures import make_tiny_run, archive_tiny_run, extract_archive, running_server
"""
import faiss  # noqa: F401  (before torch: both bring an OpenMP runtime, and this order is the safe one)

import io
import struct
import zlib
from contextlib import contextmanager
from pathlib import Path

import pytest
from PIL import Image

from scripts.records import extract_archive  # noqa: F401
from training.tiny_run import CLASSES, CREATED, TINY_PREPROCESS, TinyRun, make_tiny_run, photo_jpeg  # noqa: F401


def png_with_declared_size(width: int, height: int) -> bytes:
    """A tiny PNG whose header claims width x height: a decompression bomb as seen by the decoder."""
    buffer = io.BytesIO()
    Image.new("RGB", (4, 4)).save(buffer, "PNG")
    data = bytearray(buffer.getvalue())
    header = b"IHDR" + struct.pack(">II", width, height) + bytes(data[24:29])
    data[12:29] = header
    data[29:33] = struct.pack(">I", zlib.crc32(header))
    return bytes(data)


def archive_tiny_run(run: TinyRun, store: Path, name: str = "marketplace", version: str = "1.0",
                     output_name: str = "{name}-v{version}", **options) -> Path:
    """scripts.archive.build_archive on a tiny run; returns the .mar path."""
    from scripts.archive import build_archive

    store.mkdir(parents=True, exist_ok=True)
    return build_archive(run.run_dir, store, name, version, output_name, **options)


@contextmanager
def running_server(model_store: Path, workdir: Path, models: dict[str, str] | None = None,
                   ready_timeout: float = 120, **options):
    """A real TorchServe on free loopback ports, its models READY; always stopped on exit.

    `options` go to scripts.serve.start_server (e.g. extra_config={...}).
    """
    from scripts.serve import free_ports, start_server

    names = ("inference_port", "management_port", "metrics_port", "grpc_inference_port", "grpc_management_port")
    ports = dict(zip(names, free_ports(len(names))))
    server = start_server(model_store, workdir=workdir, models=models, **ports, **options)
    try:
        for name in models or {}:
            server.wait_ready(name, timeout=ready_timeout)
        yield server
    finally:
        server.stop()


def assert_same_answers(found: dict, expected: dict) -> None:
    """Batch records keyed by (image_id, path): the same inputs, and for each the same status, category,
    probability and neighbours (or the same error code)."""
    assert found.keys() == expected.keys()
    for key, record in found.items():
        reference = expected[key]
        assert record["status"] == reference["status"], key
        if record["status"] == "ok":
            assert record["category"] == reference["category"], key
            assert record["probability"] == pytest.approx(reference["probability"], abs=1e-4)
            assert [n["image_id"] for n in record["neighbours"]] == [n["image_id"] for n in reference["neighbours"]]
        else:
            assert record["code"] == reference["code"], key
