"""scripts.batch: in-process on a tiny archive, against a real TorchServe, through an overloaded proxy, killed and resumed."""
import faiss  # noqa: F401  (before torch: OpenMP, see README)

import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections import Counter
from contextlib import contextmanager
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
import requests

from handlers import local
from scripts import batch
from tests.serving_fixtures import archive_tiny_run, make_tiny_run, photo_jpeg, running_server

REPO = Path(__file__).resolve().parents[1]
NAME = "marketplace"
PHOTOS = 16  # p000..p015; p000..p011 are byte-identical to the tiny catalogue's img-000..img-011
BAD_FILES = {"corrupt.jpg": photo_jpeg(99)[:300], "empty.jpg": b"", "notes.txt": b"not a photo\n"}


@dataclass
class Tiny:
    mar: Path
    inputs: Path  # PHOTOS photos and the BAD_FILES, plus a sub-folder and a dot-file that are not inputs
    store: Path
    root: Path

    def keys(self) -> set[tuple[str, str]]:
        return {(path.stem, str(path)) for path in self.inputs.iterdir()
                if path.is_file() and not path.name.startswith(".")}


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Tiny:
    root = tmp_path_factory.mktemp("batch")
    run = make_tiny_run(root / "runs" / "2025-01-31_142233")
    mar = archive_tiny_run(run, root / "store", version="1.0")
    inputs = root / "inputs"
    (inputs / "sub-folder").mkdir(parents=True)
    for number in range(PHOTOS):
        (inputs / f"p{number:03d}.jpg").write_bytes(photo_jpeg(number))
    for name, data in BAD_FILES.items():
        (inputs / name).write_bytes(data)
    (inputs / ".DS_Store").write_bytes(b"\0\0")
    return Tiny(mar, inputs, root / "store", root)


@pytest.fixture(scope="module")
def server(tiny):
    with running_server(tiny.store, tiny.root / "torchserve", {NAME: tiny.mar.name}) as server:
        yield server


@pytest.fixture(scope="module")
def local_output(tiny, tmp_path_factory) -> Path:
    output = tmp_path_factory.mktemp("local") / "results.jsonl"
    batch.main([str(tiny.inputs), "--output", str(output), "--local", str(tiny.mar), "--batch-size", "4"])
    return output


def read_lines(output: Path) -> list[dict]:
    return [json.loads(line) for line in output.read_text().splitlines()]


def by_key(output: Path) -> dict[tuple[str, str], dict]:
    lines = read_lines(output)
    keyed = {(line["image_id"], line["path"]): line for line in lines}
    assert len(keyed) == len(lines), "an input has more than one line"
    return keyed


def assert_same_answers(found: dict, expected: dict) -> None:
    assert found.keys() == expected.keys()
    for key, line in found.items():
        reference = expected[key]
        assert line["status"] == reference["status"], key
        if line["status"] == "ok":
            assert line["category"] == reference["category"]
            assert line["probability"] == pytest.approx(reference["probability"], abs=1e-4)
            assert [n["image_id"] for n in line["neighbours"]] == [n["image_id"] for n in reference["neighbours"]]
        else:
            assert line["code"] == reference["code"]


# --- inputs and the output file ---------------------------------------------------------------------

def test_folder_inputs_are_every_file_sorted_by_name(tiny):
    items = batch.list_inputs(tiny.inputs)
    assert [item.image_id for item in items] == ["corrupt", "empty", "notes"] + [f"p{n:03d}" for n in range(PHOTOS)]
    assert {item.key for item in items} == tiny.keys()


def test_csv_inputs_by_path_or_by_image_id(tmp_path, tiny):
    (tmp_path / "photos").mkdir()
    table = tmp_path / "inputs.csv"
    table.write_text("image_id,path\nfirst,photos/a.jpg\n,photos/b.jpg\nthird,\nfirst,photos/a.jpg\n")
    items = batch.list_inputs(table, images_dir=tiny.inputs)
    assert [item.key for item in items] == [("first", str(tmp_path / "photos" / "a.jpg")),
                                            ("b", str(tmp_path / "photos" / "b.jpg")),
                                            ("third", str(tiny.inputs / "third.jpg"))]
    ids_only = tmp_path / "ids.csv"
    ids_only.write_text("image_id\np001\n")
    with pytest.raises(ValueError, match="--images"):
        batch.list_inputs(ids_only)
    assert batch.list_inputs(ids_only, tiny.inputs)[0].path == str(tiny.inputs / "p001.jpg")
    (tmp_path / "other.csv").write_text("photo\nx.jpg\n")
    with pytest.raises(ValueError, match="neither an image_id nor a path column"):
        batch.list_inputs(tmp_path / "other.csv")


def test_recovery_cuts_a_half_written_line_and_refuses_a_foreign_file(tmp_path):
    output = tmp_path / "results.jsonl"
    whole = json.dumps({"image_id": "a", "path": "/a.jpg", "status": "ok"}) + "\n"
    output.write_text(whole + '{"image_id": "b", "pa')
    records, cut = batch.recover_output(output)
    assert list(records) == [("a", "/a.jpg")] and cut == len('{"image_id": "b", "pa')
    assert output.read_text() == whole
    output.write_text("not json\n" + whole)
    with pytest.raises(ValueError, match="line 1 is not a batch result"):
        batch.recover_output(output)


# --- in-process (--local) ---------------------------------------------------------------------------

def test_local_answers_every_input_once_with_bad_files_as_errors(tiny, local_output):
    lines = by_key(local_output)
    assert lines.keys() == tiny.keys()
    errors = {key[0]: line for key, line in lines.items() if line["status"] == "error"}
    assert set(errors) == {"corrupt", "empty", "notes"}
    assert all(line["code"] == 400 and line["error"] for line in errors.values())
    for (image_id, _), line in lines.items():
        if line["status"] == "ok":
            assert set(line) == {"image_id", "path", "status", *batch.ANSWER_FIELDS}
            assert line["model"] == {"name": NAME, "version": "1.0"}
            assert len(line["neighbours"]) == 6  # every listing of the tiny catalogue
    for number in range(12):  # photos that are in the catalogue find themselves first
        assert lines[(f"p{number:03d}", str(tiny.inputs / f"p{number:03d}.jpg"))]["neighbours"][0]["image_id"] \
            == f"img-{number:03d}"


def test_local_on_an_extracted_folder_reports_unreadable_inputs(tiny, tmp_path):
    folder = tmp_path / "model"
    with batch.model_folder(tiny.mar) as extracted:
        shutil.copytree(extracted, folder)
    table = tmp_path / "inputs.csv"
    table.write_text(f"image_id,path\nthere,{tiny.inputs / 'p000.jpg'}\nmissing,{tmp_path / 'missing.jpg'}\n")
    output = tmp_path / "results.jsonl"
    summary = batch.main([str(table), "--output", str(output), "--local", str(folder), "--k", "2"])
    lines = {line["image_id"]: line for line in read_lines(output)}
    assert lines["there"]["status"] == "ok" and len(lines["there"]["neighbours"]) == 2
    assert lines["missing"]["code"] == batch.FILE_ERROR and "missing.jpg" in lines["missing"]["error"]
    assert summary["ok"] == 1 and summary["failed_by_code"] == {batch.FILE_ERROR: 1}


@pytest.fixture
def local_calls(monkeypatch) -> list[str]:
    """sha1 of every photo sent through the in-process handler."""
    sent = []
    original = local.predict_local

    def counting(handler, requests_, headers=None):
        sent.extend(hashlib.sha1(request["body"]).hexdigest() for request in requests_)
        return original(handler, requests_, headers)

    monkeypatch.setattr(local, "predict_local", counting)
    return sent


def test_resume_after_a_kill_mid_line_sends_only_what_is_missing(tiny, local_output, tmp_path, local_calls):
    lines = local_output.read_bytes().splitlines(keepends=True)
    done = 7
    output = tmp_path / "results.jsonl"
    output.write_bytes(b"".join(lines[:done]) + lines[done][:40])  # killed while writing line 8
    summary = batch.main([str(tiny.inputs), "--output", str(output), "--local", str(tiny.mar)])
    assert len(local_calls) == len(lines) - done
    assert summary["skipped"] == done and summary["ok"] + summary["failed"] == len(lines) - done
    assert output.read_bytes().startswith(b"".join(lines[:done]))
    assert_same_answers(by_key(output), by_key(local_output))

    local_calls.clear()
    again = batch.main([str(tiny.inputs), "--output", str(output), "--local", str(tiny.mar)])
    assert local_calls == [] and again["skipped"] == len(lines)


# --- served -----------------------------------------------------------------------------------------

@pytest.mark.server
def test_served_gives_the_same_output_as_local(tiny, server, local_output, tmp_path):
    output = tmp_path / "results.jsonl"
    summary = batch.main([str(tiny.inputs), "--output", str(output), "--url", server.inference_url,
                          "--concurrency", "4"])
    assert summary["ok"] == PHOTOS and summary["failed_by_code"] == {"400": 3} and summary["retries"] == 0
    assert_same_answers(by_key(output), by_key(local_output))


class Proxy:
    """A loopback HTTP proxy in front of TorchServe that fakes overload (503) on demand; counts POSTs.

    mode "first-503": the first POST of each distinct body gets 503, later ones are forwarded;
    "always-503": every POST gets 503; "forward": everything is forwarded.
    """

    def __init__(self, upstream: str, mode: str):
        self.upstream, self.mode = upstream, mode
        self.posts: list[str] = []  # sha1 of each POSTed body, in arrival order
        self.lock = threading.Lock()
        proxy = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self):
                proxy.forward(self, requests.get(proxy.upstream + self.path, timeout=10))

            def do_POST(self):
                body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
                if proxy.overloaded(hashlib.sha1(body).hexdigest()):
                    self.send_response(503)
                    self.send_header("Content-Type", "application/json")
                    message = b'{"code": 503, "type": "ServiceUnavailableException", "message": "overloaded"}'
                    self.send_header("Content-Length", str(len(message)))
                    self.end_headers()
                    self.wfile.write(message)
                    return
                headers = {name: self.headers[name] for name in ("Content-Type", "X-K") if self.headers[name]}
                proxy.forward(self, requests.post(proxy.upstream + self.path, data=body, headers=headers, timeout=60))

            def log_message(self, *args):
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"

    def overloaded(self, digest: str) -> bool:
        with self.lock:
            first = digest not in self.posts
            self.posts.append(digest)
        return self.mode == "always-503" or (self.mode == "first-503" and first)

    @staticmethod
    def forward(handler: BaseHTTPRequestHandler, response: requests.Response) -> None:
        handler.send_response(response.status_code)
        handler.send_header("Content-Type", response.headers.get("Content-Type", "application/json"))
        handler.send_header("Content-Length", str(len(response.content)))
        handler.end_headers()
        handler.wfile.write(response.content)


@contextmanager
def proxy_to(server, mode: str):
    proxy = Proxy(server.inference_url, mode)
    thread = threading.Thread(target=proxy.server.serve_forever, daemon=True)
    thread.start()
    try:
        yield proxy
    finally:
        proxy.server.shutdown()
        proxy.server.server_close()
        thread.join(10)


def digests(folder: Path) -> Counter:
    return Counter(hashlib.sha1(path.read_bytes()).hexdigest() for path in folder.iterdir()
                   if path.is_file() and not path.name.startswith("."))


@pytest.mark.server
def test_overload_is_retried_and_a_4xx_is_final(tiny, server, local_output, tmp_path):
    output = tmp_path / "results.jsonl"
    with proxy_to(server, "first-503") as proxy:
        summary = batch.main([str(tiny.inputs), "--output", str(output), "--url", proxy.url, "--concurrency", "4",
                              "--backoff", "0.01"])
    # every photo, the three 4xx ones included, is sent exactly twice: one 503, one final answer
    assert Counter(proxy.posts) == {digest: 2 * count for digest, count in digests(tiny.inputs).items()}
    assert summary["retries"] == len(tiny.keys()) and summary["failed_by_code"] == {"400": 3}
    assert_same_answers(by_key(output), by_key(local_output))


@pytest.mark.server
def test_exhausted_retries_are_error_lines_that_retry_errors_sends_again(tiny, server, local_output, tmp_path):
    output = tmp_path / "results.jsonl"
    arguments = [str(tiny.inputs), "--output", str(output), "--concurrency", "4", "--backoff", "0.01"]
    with proxy_to(server, "always-503") as proxy:
        summary = batch.main(arguments + ["--url", proxy.url, "--retries", "2"])
    assert len(proxy.posts) == 3 * len(tiny.keys())
    assert summary["failed_by_code"] == {"503": len(tiny.keys())}
    assert all(line["code"] == 503 and "3 attempt(s)" in line["error"] for line in read_lines(output))

    with proxy_to(server, "forward") as proxy:
        batch.main(arguments + ["--url", proxy.url])
        assert proxy.posts == []  # error lines are answers: not re-sent without --retry-errors
        summary = batch.main(arguments + ["--url", proxy.url, "--retry-errors"])
        assert len(proxy.posts) == len(tiny.keys())
    assert summary["ok"] == PHOTOS and summary["failed_by_code"] == {"400": 3}
    assert_same_answers(by_key(output), by_key(local_output))


@pytest.mark.server
def test_unknown_model_stops_the_run_before_writing_errors(tiny, server, tmp_path):
    output = tmp_path / "results.jsonl"
    with pytest.raises(SystemExit, match="404"):
        batch.main([str(tiny.inputs), "--output", str(output), "--url", server.inference_url, "--model", "nope"])
    assert not output.exists() or output.read_text() == ""


@pytest.mark.server
def test_sigkill_then_resume_answers_every_input_exactly_once(tiny, server, tmp_path):
    inputs = tmp_path / "many"
    inputs.mkdir()
    for number in range(240):
        (inputs / f"q{number:03d}.jpg").write_bytes(photo_jpeg(1000 + number, size=(48, 40)))
    (inputs / "broken.jpg").write_bytes(b"\xff\xd8\xff" + b"\0" * 50)
    output = tmp_path / "results.jsonl"
    command = [sys.executable, "-m", "scripts.batch", str(inputs), "--output", str(output),
               "--url", server.inference_url, "--concurrency", "2"]
    child = subprocess.Popen(command, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and child.poll() is None:
            if output.exists() and output.read_bytes().count(b"\n") >= 20:
                break
            time.sleep(0.02)
        assert child.poll() is None, "the batch finished (or died) before it could be killed"
        os.kill(child.pid, signal.SIGKILL)
    finally:
        child.kill()
        child.wait(10)
    written = output.read_bytes().count(b"\n")
    assert 20 <= written < 241

    with proxy_to(server, "forward") as proxy:
        summary = batch.main([str(inputs), "--output", str(output), "--url", proxy.url, "--concurrency", "4"])
    assert len(proxy.posts) == 241 - written  # nothing that had its line was sent again
    assert summary["skipped"] == written
    lines = by_key(output)
    assert {key[0] for key in lines} == {path.stem for path in inputs.iterdir()}
    assert lines[("broken", str(inputs / "broken.jpg"))]["code"] == 400
    assert sum(line["status"] == "ok" for line in lines.values()) == 240
