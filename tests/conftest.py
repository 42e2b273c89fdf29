"""Shared fixtures: tiny generated catalogues and work folders, awkward image bytes, the real data."""
import faiss  # noqa: F401  (before torch: both bring OpenMP)

import ctypes
import io
import os
import shutil
import signal
import sys
import tempfile
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from training import dataset, photos, tables
from training.data import PHOTOS_DIR, read_training_table
from training.sample import Mess, make_sample_catalogue

pytest_plugins = ["tests.serving_fixtures"]  # the recipe, its archives and the session's TorchServe

SHARED_DIR = Path(__file__).resolve().parents[2] / "shared"
SHARED_DATA = SHARED_DIR / "data" / "marketplace"


LIBC = ctypes.CDLL(None)


class SignalStack(ctypes.Structure):
    """sigaltstack(2)'s stack_t."""
    _fields_ = [("ss_sp", ctypes.c_void_p), ("ss_flags", ctypes.c_int), ("ss_size", ctypes.c_size_t)]


def signal_stack(new: SignalStack | None = None) -> SignalStack:
    """The main thread's alternate signal stack (set to NEW when given)."""
    old = SignalStack()
    LIBC.sigaltstack(None if new is None else ctypes.byref(new), ctypes.byref(old))
    return old


# The tests' TorchServe frontends live for seconds: Java's quick compiler and one GC thread start them sooner.
os.environ.setdefault("JAVA_TOOL_OPTIONS", "-XX:TieredStopAtLevel=1 -XX:+UseSerialGC")

# What the session started with; every test leaves it so. An in-process handler sets torch and Faiss threads;
# OpenVINO's CPU plugin leaves the thread's alternate signal stack in its own memory, and sessions that kept it so
# were killed by the kernel's SIGSEGV while stopping their last server, after every test had passed.
INITIAL_STATE = {"torch_threads": torch.get_num_threads(), "faiss_threads": faiss.omp_get_max_threads(),
                 "environ": dict(os.environ), "signal_stack": signal_stack()}


@pytest.fixture(autouse=True)
def leaves_no_global_state():
    yield
    torch.set_num_threads(INITIAL_STATE["torch_threads"])
    faiss.omp_set_num_threads(INITIAL_STATE["faiss_threads"])
    signal_stack(INITIAL_STATE["signal_stack"])
    initial = INITIAL_STATE["environ"]
    for name in set(os.environ) - set(initial) - {"PYTEST_CURRENT_TEST"}:  # pytest's own, it removes it
        del os.environ[name]
    for name, value in initial.items():
        if os.environ.get(name) != value:
            os.environ[name] = value


# The most the suite holds under the temporary folder at once (module_tmp below), with margin.
DISK_NEEDED = 2 * 1024**3


def pytest_sessionstart(session):
    free = shutil.disk_usage(tempfile.gettempdir()).free
    if free < DISK_NEEDED:
        pytest.exit(f"{tempfile.gettempdir()} has {free / 1024**3:.1f} GB free; the tests need about "
                    f"{DISK_NEEDED / 1024**3:.0f} GB there (set TMPDIR to a folder with more room)", returncode=1)
    signal.signal(signal.SIGTERM, interrupt)


def interrupt(signum, frame):
    """SIGTERM ends the session as Ctrl-C does, so the fixtures' finalisers stop the servers they started."""
    raise KeyboardInterrupt


# The longest modules first: `make test`'s workers take whole modules in this order, and the last one ends the run.
FIRST = ("test_readme", "test_benchmark", "test_ray_batch", "test_deploy", "test_server", "test_runtime", "test_web")


def pytest_collection_modifyitems(config, items):
    rank = {f"tests.{name}": place for place, name in enumerate(FIRST)}
    items.sort(key=lambda item: rank.get(item.module.__name__, len(FIRST)))  # stable: the rest keep their order


# Modules with a failed or erroring test: their folders are kept to look into (pytest keeps the last session's).
FAILED_MODULES: set[str] = set()


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item, call):
    report = yield
    if report.failed:
        FAILED_MODULES.add(item.module.__name__)
    return report


@pytest.fixture(scope="module")
def module_tmp(request, tmp_path_factory):
    """Factory: `module_tmp(name)` makes a folder removed when the module ends (kept when one of its tests failed):
    a module's runs, archives and servers take up to a gigabyte, and the suite's together filled a CI disk."""
    made = []

    def make(name: str) -> Path:
        made.append(tmp_path_factory.mktemp(name))
        return made[-1]

    yield make
    if request.module.__name__ not in FAILED_MODULES:
        for folder in made:
            shutil.rmtree(folder, ignore_errors=True)


def skip_or_fail(reason: str):
    """Skip a test whose inputs are absent, except under CI (CI=true), where ../shared is always there."""
    if os.environ.get("CI", "").lower() == "true":
        pytest.fail(f"{reason} (CI=true: ../shared must be present)")
    pytest.skip(reason)


@dataclass(frozen=True)
class RawCatalogue:
    """A generated raw-format catalogue and the manifest of what make_sample_catalogue put in it."""

    data_dir: Path
    manifest: dict


@pytest.fixture(scope="session")
def sample_catalogue(tmp_path_factory) -> RawCatalogue:
    """Clean raw data: 24 listings in 3 categories, 2 photos each (48 px)."""
    data_dir = tmp_path_factory.mktemp("sample_catalogue")
    return RawCatalogue(data_dir, make_sample_catalogue(data_dir, listings=24, categories=3, size=48, seed=1))


@pytest.fixture(scope="session")
def messy_catalogue(tmp_path_factory) -> RawCatalogue:
    """Raw data with one of every fault of `Mess` (and all four kinds of bad price) on 20 good listings."""
    data_dir = tmp_path_factory.mktemp("messy_catalogue")
    mess = replace(Mess.each(1), bad_prices=4)
    return RawCatalogue(data_dir, make_sample_catalogue(data_dir, listings=20, categories=3, size=48,
                                                        seed=2, mess=mess))


@pytest.fixture(scope="session")
def sample_work(tmp_path_factory, sample_catalogue) -> Path:
    """A work folder after stages 1-3 (tables, 64 px photos, split) on `sample_catalogue`. Read only."""
    work = tmp_path_factory.mktemp("sample_work")
    tables.clean_tables(sample_catalogue.data_dir, work)
    table = read_training_table(work)
    photos.normalise_photos(list(table["image_id"]), sample_catalogue.data_dir / "images",
                            work / PHOTOS_DIR, size=64, workers=1)
    dataset.make_split(work, seed=0)
    return work


@pytest.fixture
def shared_data() -> Path:
    """The real listings in ../shared (skips the test when they are absent; fails under CI)."""
    if not (SHARED_DATA / "Products.csv").is_file():
        skip_or_fail(f"real data not available at {SHARED_DATA}")
    return SHARED_DATA


def two_colour_image(width: int = 60, height: int = 30) -> Image.Image:
    """Left half red, right half blue: shows which way up a decoded photo is."""
    image = Image.new("RGB", (width, height), (0, 0, 255))
    image.paste((255, 0, 0), (0, 0, width // 2, height))
    return image


def encoded(image: Image.Image, format: str, **options) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=format, **options)
    return buffer.getvalue()


def make_image_variants() -> dict[str, bytes]:
    image = two_colour_image()
    transparent_left = image.convert("RGBA")
    transparent_left.putalpha(Image.new("L", image.size, 255))
    transparent_left.paste((0, 0, 0, 0), (0, 0, image.width // 2, image.height))
    exif = Image.Exif()
    exif[0x0112] = 6  # orientation: stored lying on its side, display rotated 90 degrees clockwise
    palette_transparent = image.convert("P", palette=Image.Palette.ADAPTIVE, colors=4)
    grey16 = Image.fromarray(np.tile(np.linspace(0, 65535, 60), (30, 1)).astype(np.uint16))
    jpeg = encoded(image, "JPEG", quality=95)
    return {
        "rgb_jpeg": jpeg,
        "cmyk_jpeg": encoded(image.convert("CMYK"), "JPEG", quality=95),
        "png_alpha": encoded(transparent_left, "PNG"),
        "palette_png": encoded(image.convert("P", palette=Image.Palette.ADAPTIVE, colors=4), "PNG"),
        "palette_transparent_png": encoded(palette_transparent, "PNG", transparency=0),
        "grey_png": encoded(image.convert("L"), "PNG"),
        "grey16_png": encoded(grey16, "PNG"),
        "exif_rotated_jpeg": encoded(image, "JPEG", quality=95, exif=exif),
        "webp": encoded(image, "WEBP", lossless=True),
        "text": b"name,price\nlamp,5\n",
        "empty": b"",
        "truncated_jpeg": jpeg[: len(jpeg) // 2],
    }


@pytest.fixture(scope="session")
def image_variants() -> dict[str, bytes]:
    """Bytes of awkward photos, usable and not, all drawn from `two_colour_image()` (60x30)."""
    return make_image_variants()


EXIT_STATUS = pytest.StashKey[int]()


def pytest_sessionfinish(session, exitstatus):
    session.config.stash[EXIT_STATUS] = int(exitstatus)


@pytest.hookimpl(trylast=True)
def pytest_unconfigure(config):
    """Leave without the interpreter's teardown, which has segfaulted after every test passed (OpenVINO's and
    torch's thread pools at exit), keeping pytest's own exit status."""
    if hasattr(config, "workerinput"):  # a pytest-xdist worker: its controller still reads from it
        return
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(config.stash.get(EXIT_STATUS, 1))

