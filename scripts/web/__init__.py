"""The search page: drop a photo, see its category and the similar listings' photos.

One FastAPI app beside TorchServe. It serves the page, forwards each search to TorchServe with the inference key
it holds (the browser never sees a key) and serves the catalogue's photos as thumbnails, found by image_id.
"""
import csv
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import psutil
import requests
from fastapi import FastAPI, Form, Request, UploadFile
from fastapi.responses import FileResponse, JSONResponse, Response
from fastapi.staticfiles import StaticFiles
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.middleware.trustedhost import TrustedHostMiddleware

from marketplace_search.files import path_identity, replaced_atomically
from marketplace_search.images import ImageError, decode_image
from scripts import api

STATIC = Path(__file__).with_name("static")
MAX_UPLOAD = 20 * 2**20  # config.properties' max_request_size: the page takes what TorchServe would
PAGE_HEADER = "X-Search-Page"  # a header no cross-site form can send: other sites cannot search through the page
PHOTO_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp")
THUMBNAIL_SIZE = 320
RESCAN_AFTER = 10.0  # seconds: an unknown id lists the folders again at most this often (the live catalogue grows)
FORWARD_TIMEOUT = 60
TABLE = Path("tables") / "training_table.csv"  # a training work folder's listings (training.tables)
PAGE_PID, PAGE_LOG = "page.pid", "page.log"  # in scripts.serve's working folder
LOOPBACK = ("127.0.0.1", "localhost", "::1", "[::1]")


class Photos:
    """The catalogue's photos by image_id, listed from FOLDERS (an id is looked up, never joined into a path) and
    their thumbnails, made once into CACHE."""

    def __init__(self, folders: list[Path], cache: Path):
        self.folders = [photos_folder(Path(folder)) for folder in folders]
        self.cache = Path(cache)
        self.cache.mkdir(parents=True, exist_ok=True)
        self.lock = threading.Lock()
        self.scan()
        self.categories = sorted({category for folder in folders for category in table_categories(Path(folder))})

    def scan(self) -> None:
        paths = {}
        for folder in self.folders:
            for entry in os.scandir(folder):
                image_id, suffix = os.path.splitext(entry.name)
                if suffix.lower() in PHOTO_SUFFIXES and entry.is_file():
                    paths.setdefault(image_id, Path(entry.path))
        self.paths, self.scanned = paths, time.monotonic()

    def path(self, image_id: str) -> Path | None:
        if image_id not in self.paths and time.monotonic() - self.scanned > RESCAN_AFTER:
            with self.lock:
                self.scan()
        return self.paths.get(image_id)

    def thumbnail(self, image_id: str) -> Path | None:
        source = self.path(image_id)
        if source is None:
            return None
        target = self.cache / f"{image_id}.jpg"  # image_id is a file name found in a folder: no separator in it
        if not target.is_file() or target.stat().st_mtime_ns < source.stat().st_mtime_ns:
            image = decode_image(source, fit_size=THUMBNAIL_SIZE)
            image.thumbnail((THUMBNAIL_SIZE, THUMBNAIL_SIZE))
            with replaced_atomically(target, durable=False) as temporary:
                image.save(temporary, "JPEG", quality=85)
        return target


def photos_folder(folder: Path) -> Path:
    """FOLDER's photos: a training work folder's photos/, a raw data folder's images/, or FOLDER itself."""
    for inside in ("photos", "images"):
        if (folder / inside).is_dir():
            return folder / inside
    if not folder.is_dir():
        raise FileNotFoundError(f"photos folder {folder} does not exist")
    return folder


def table_categories(folder: Path) -> set[str]:
    """The categories of a training work folder's listings (none for a plain photos folder)."""
    if not (folder / TABLE).is_file():
        return set()
    with open(folder / TABLE, newline="") as table:
        return {row["category"] for row in csv.DictReader(table) if row.get("category")}


class InferenceKey:
    """The inference key the page sends, read again whenever its key file changes (TorchServe renews keys)."""

    def __init__(self, token: str | None = None, key_file: Path | None = None):
        self.key = api.resolve_token("inference", token, key_file)
        self.identity = self.file_identity()

    def file_identity(self):
        return path_identity(self.key.file) if self.key.file else None

    def current(self) -> api.Key:
        identity = self.file_identity()
        if identity != self.identity:
            self.key = api.Key(api.read_key_file(self.key.file, "inference"), self.key.source, self.key.file)
            self.identity = identity
        return self.key


def refusal(status: int, kind: str, message: str) -> JSONResponse:
    return JSONResponse({"code": status, "type": kind, "error": message}, status_code=status)


def create_app(inference_url: str, photos: Photos, key: InferenceKey, model: str = "marketplace",
               max_upload: int = MAX_UPLOAD, hosts: tuple[str, ...] = LOOPBACK) -> FastAPI:
    """The page server: GET / (the page), POST /api/search, GET /photos/{image_id}, GET /api/settings; a body
    over MAX_UPLOAD is refused (413) as it comes in, before anything is forwarded."""
    app = FastAPI(title="Marketplace search page", docs_url=None, redoc_url=None, openapi_url=None,
                  max_body_size=max_upload)
    app.add_middleware(TrustedHostMiddleware, allowed_hosts=list(hosts))  # no DNS rebinding onto the page
    prediction_url = f"{inference_url.rstrip('/')}/predictions/{model}"

    @app.exception_handler(StarletteHTTPException)
    async def as_refusal(request, error):
        return refusal(error.status_code, "not_found" if error.status_code == 404 else "bad_request",
                       str(error.detail))

    @app.middleware("http")
    async def page_headers(request, call_next):
        response = await call_next(request)
        response.headers["Content-Security-Policy"] = "default-src 'self'; img-src 'self' blob: data:"
        response.headers["X-Content-Type-Options"] = "nosniff"
        response.headers["Referrer-Policy"] = "no-referrer"
        return response

    @app.get("/")
    def page():
        return FileResponse(STATIC / "index.html", headers={"Cache-Control": "no-cache"})

    @app.get("/healthz")
    def healthz():
        return {"status": "ok", "photos": len(photos.paths)}

    @app.get("/api/settings")
    def settings():
        return {"categories": photos.categories, "max_upload": max_upload}

    @app.get("/photos/{image_id}")
    def thumbnail(image_id: str):
        try:
            path = photos.thumbnail(image_id)
        except ImageError as error:
            return refusal(500, "unreadable_photo", f"catalogue photo {image_id!r} cannot be read: {error}")
        if path is None:
            return refusal(404, "unknown_photo", f"no catalogue photo has the id {image_id!r}")
        return FileResponse(path, media_type="image/jpeg", headers={"Cache-Control": "public, max-age=86400"})

    @app.post("/api/search")
    def search(request: Request, photo: UploadFile | None = None, image_id: str | None = Form(None),
               title: str | None = Form(None), description: str | None = Form(None), k: str | None = Form(None),
               category: str | None = Form(None)):
        if request.headers.get(PAGE_HEADER) != "1":
            return refusal(403, "not_the_page", f"searches come from the page (header {PAGE_HEADER}: 1)")
        if image_id:  # "more like this": a catalogue photo
            path = photos.path(image_id)
            if path is None:
                return refusal(404, "unknown_photo", f"no catalogue photo has the id {image_id!r}")
            data = path.read_bytes()
        else:
            data = photo.file.read() if photo is not None else b""
        parts = {name: (None, value) for name, value in (("title", title), ("description", description),
                                                         ("k", k), ("category", category)) if value}
        if data:
            parts["photo"] = ("photo", data, api.content_type(data))
        if not parts:
            return refusal(400, "empty_request", "choose a photo or type a title")
        return forward(prediction_url, parts, key)

    app.mount("/static", StaticFiles(directory=STATIC), name="static")
    return app


def forward(url: str, parts: dict, key: InferenceKey) -> Response:
    """POST PARTS as multipart to TorchServe; its answer or its refusal as it is, or why it did not answer."""
    for attempt in range(2):
        token = key.current()
        try:
            response = api.session().post(url, files=parts, headers=api.auth_headers(token), timeout=FORWARD_TIMEOUT)
        except requests.RequestException as error:
            return refusal(503, "service_unavailable", f"the search service at {url} is not answering "
                           f"({type(error).__name__}); it may be starting or restarting: try again in a few seconds")
        if not api.key_refused(response):
            break
        key.identity = None  # read the key file again: TorchServe may have renewed it
    else:
        return refusal(502, "key_refused", f"the search service refused the page server's key: "
                                           f"{api.refused_key('inference', token)}")
    if response.ok:
        return Response(response.content, media_type="application/json")
    kind = "service_unavailable" if response.status_code in (503, 507) else "refused"
    try:
        kind = response.json().get("type", kind) if response.status_code < 500 else kind
    except ValueError:
        pass
    return refusal(response.status_code, kind, api.error_text(response))


def start_page(workdir: Path, inference_url: str, photos: list[Path], port: int, key_file: Path | None = None,
               host: str = "127.0.0.1", timeout: float = 60) -> str:
    """Start `python -m scripts.web` in the background, logging into WORKDIR; its address once it answers."""
    workdir = Path(workdir).resolve()
    if page_address(workdir):
        raise RuntimeError(f"a search page already runs from {workdir}: stop it first")
    command = [sys.executable, "-m", "scripts.web", "--inference-url", inference_url, "--port", str(port),
               "--host", host, "--cache", str(workdir / "thumbnails"), *(f"--photos={Path(folder).resolve()}" for folder in photos)]
    if key_file is not None and Path(key_file).is_file():  # none when TorchServe runs without keys
        command += ["--key-file", str(Path(key_file).resolve())]
    with open(workdir / PAGE_LOG, "a") as log:
        process = subprocess.Popen(command, cwd=Path(__file__).resolve().parents[2], stdout=log,
                                   stderr=subprocess.STDOUT, start_new_session=True)
    address = f"http://{'127.0.0.1' if host == '0.0.0.0' else host}:{port}/"
    (workdir / PAGE_PID).write_text(f"{process.pid} {address}\n")
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"the search page exited ({process.returncode}); see {workdir / PAGE_LOG}")
        try:
            if requests.get(f"{address}healthz", timeout=2).ok:
                return address
        except requests.ConnectionError:
            time.sleep(0.2)
    stop_page(workdir)
    raise RuntimeError(f"the search page did not answer within {timeout:.0f} s; see {workdir / PAGE_LOG}")


def page_process(workdir: Path) -> tuple[psutil.Process, str] | None:
    """The page server started from WORKDIR and its address, if it still runs."""
    path = Path(workdir) / PAGE_PID
    if not path.is_file():
        return None
    pid, address = path.read_text().split()
    try:
        process = psutil.Process(int(pid))
        return (process, address) if "scripts.web" in process.cmdline() else None
    except psutil.Error:
        return None


def page_address(workdir: Path) -> str | None:
    found = page_process(workdir)
    return found[1] if found else None


def stop_page(workdir: Path) -> int | None:
    """Stop the page server started from WORKDIR; its pid, or None if none ran."""
    found = page_process(workdir)
    (Path(workdir) / PAGE_PID).unlink(missing_ok=True)
    if found is None:
        return None
    process, _ = found
    process.terminate()
    try:
        process.wait(10)
    except psutil.TimeoutExpired:
        process.kill()
    return process.pid


def main(argv=None) -> None:
    import argparse

    import uvicorn

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--inference-url", default=api.DEFAULT_INFERENCE_URL, help="TorchServe's inference API")
    api.add_key_arguments(parser, "inference")
    parser.add_argument("--photos", type=Path, action="append", required=True,
                        help="the catalogue's photos: a training work folder, a raw data folder or a folder of "
                             "IMAGE_ID.jpg files (repeat for several)")
    parser.add_argument("--cache", type=Path, help="thumbnails (default: .thumbnails in the first --photos)")
    parser.add_argument("--model", default="marketplace")
    parser.add_argument("--host", default="127.0.0.1", help="the address to bind (default: loopback only)")
    parser.add_argument("--port", type=int, default=8090)
    parser.add_argument("--max-upload", type=int, default=MAX_UPLOAD, help="bytes (TorchServe's max_request_size)")
    args = parser.parse_args(argv)
    photos = Photos(args.photos, args.cache or args.photos[0] / ".thumbnails")
    hosts = LOOPBACK if args.host in LOOPBACK else ("*",) if args.host == "0.0.0.0" else (*LOOPBACK, args.host)
    app = create_app(args.inference_url, photos, InferenceKey(args.token, args.key_file), args.model,
                     args.max_upload, hosts)
    print(f"search page: http://{args.host}:{args.port}/ ({len(photos.paths)} catalogue photos, "
          f"TorchServe at {args.inference_url})", flush=True)
    uvicorn.run(app, host=args.host, port=args.port, log_level="warning")
