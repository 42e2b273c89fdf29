"""scripts.batch: in-process on a tiny archive, against a real TorchServe, through an overloaded proxy, killed and resumed."""
import faiss  # noqa: F401  (before torch: both bring an OpenMP runtime, and this order is the safe one)

import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
import zipfile
from collections import Counter
from contextlib import contextmanager
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
import requests

from handlers import local
from marketplace_search.schema import ANSWER_FIELDS
from scripts import api, batch
from scripts.records import (FILE_ERROR, REFUSED_INPUT, FatalError, RefusedInput, answer_local_batch, extract_archive,
                             file_error, model_folder, read_input)
from tests.serving_fixtures import archive_tiny_run, assert_same_answers, make_tiny_run, photo_jpeg, running_server

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
def tiny(module_tmp) -> Tiny:
    root = module_tmp("batch")
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
def local_output(tiny, module_tmp) -> Path:
    output = module_tmp("local") / "results.jsonl"
    batch.main([str(tiny.inputs), "--output", str(output), "--local", str(tiny.mar), "--batch-size", "4"])
    return output


def read_lines(output: Path) -> list[dict]:
    return [json.loads(line) for line in output.read_text().splitlines()]


def by_key(output: Path) -> dict[tuple[str, str], dict]:
    lines = read_lines(output)
    keyed = {(line["image_id"], line["path"]): line for line in lines}
    assert len(keyed) == len(lines), "an input has more than one line"
    return keyed


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
    with pytest.raises(ValueError, match="neither an image_id, a path nor a title column"):
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
    assert {image_id: line["code"] for image_id, line in errors.items()} == {"corrupt": 400, "empty": 400, "notes": 415}
    assert all(line["error"] for line in errors.values())
    for (image_id, _), line in lines.items():
        if line["status"] == "ok":
            assert set(line) == {"image_id", "path", "status", *ANSWER_FIELDS}
            assert line["model"] == {"name": NAME, "version": "1.0"}
            assert len(line["neighbours"]) == 6  # every listing of the tiny catalogue
    for number in range(12):  # photos that are in the catalogue find themselves first
        assert lines[(f"p{number:03d}", str(tiny.inputs / f"p{number:03d}.jpg"))]["neighbours"][0]["image_id"] \
            == f"img-{number:03d}"


def test_local_on_an_extracted_folder_reports_unreadable_and_refused_inputs(tiny, tmp_path):
    folder = tmp_path / "model"
    with model_folder(tiny.mar) as extracted:
        shutil.copytree(extracted, folder)
    table = tmp_path / "inputs.csv"
    shutil.copy(tiny.inputs / "p000.jpg", tmp_path / "there.jpg")
    (tmp_path / "big.jpg").write_bytes(photo_jpeg(3) + bytes(2000))
    table.write_text(f"image_id,path\nthere,there.jpg\nmissing,missing.jpg\noutside,{tiny.inputs / 'p001.jpg'}\n"
                     f"big,big.jpg\n")
    output = tmp_path / "results.jsonl"
    summary = batch.main([str(table), "--output", str(output), "--local", str(folder), "--k", "2",
                          "--max-file-bytes", str((tmp_path / "there.jpg").stat().st_size)])
    lines = {line["image_id"]: line for line in read_lines(output)}
    assert lines["there"]["status"] == "ok" and len(lines["there"]["neighbours"]) == 2
    assert lines["missing"]["code"] == FILE_ERROR and "missing.jpg" in lines["missing"]["error"]
    assert lines["outside"]["code"] == REFUSED_INPUT and "outside" in lines["outside"]["error"]
    assert lines["big"]["code"] == REFUSED_INPUT and "--max-file-bytes" in lines["big"]["error"]
    assert summary["ok"] == 1 and summary["failed_by_code"] == {FILE_ERROR: 1, REFUSED_INPUT: 2}


def test_csv_paths_must_stay_in_the_csv_folder_and_be_regular_files(tmp_path):
    root, elsewhere = tmp_path / "inputs", tmp_path / "elsewhere"
    (root / "sub").mkdir(parents=True)
    elsewhere.mkdir()
    (root / "sub" / "a.jpg").write_bytes(b"a")
    (elsewhere / "secret.jpg").write_bytes(b"s")
    (root / "inside-link.jpg").symlink_to(root / "sub" / "a.jpg")
    (root / "outside-link.jpg").symlink_to(elsewhere / "secret.jpg")
    (root / "escape").symlink_to(elsewhere)
    os.mkfifo(root / "pipe.jpg")  # reading it would block for ever
    (root / "large.jpg").write_bytes(bytes(101))
    rows = {"plain": "sub/a.jpg", "inside_link": "inside-link.jpg", "dotdot_inside": "sub/../sub/a.jpg",
            "absolute": str(elsewhere / "secret.jpg"), "dotdot": "../elsewhere/secret.jpg",
            "outside_link": "outside-link.jpg", "folder_link": "escape/secret.jpg", "folder": "sub",
            "pipe": "pipe.jpg", "large": "large.jpg", "missing": "nothing.jpg"}
    (root / "inputs.csv").write_text("image_id,path\n" + "".join(f"{key},{path}\n" for key, path in rows.items()))
    items = {item.image_id: item for item in batch.list_inputs(root / "inputs.csv")}
    outcomes = {}
    for image_id, item in items.items():
        try:
            outcomes[image_id] = read_input(item, max_bytes=100)
        except RefusedInput as error:
            outcomes[image_id] = str(error)
        except OSError as error:
            outcomes[image_id] = type(error).__name__
    assert outcomes.pop("plain") == outcomes.pop("inside_link") == outcomes.pop("dotdot_inside") == b"a"
    assert outcomes.pop("missing") == "FileNotFoundError"
    assert "not a regular file" in outcomes.pop("folder") and "not a regular file" in outcomes.pop("pipe")
    assert "over the limit of 100 bytes" in outcomes.pop("large")
    assert all("is outside" in message for message in outcomes.values()), outcomes
    assert set(outcomes) == {"absolute", "dotdot", "outside_link", "folder_link"}
    # --images DIR/<image_id>.jpg: an image_id cannot walk out of DIR either
    (root / "ids.csv").write_text("image_id\n../elsewhere/secret\n")
    [item] = batch.list_inputs(root / "ids.csv", images_dir=root)
    with pytest.raises(RefusedInput, match="is outside"):
        read_input(item)
    assert file_error(item, RefusedInput("x"))["code"] == REFUSED_INPUT


def make_zip(path: Path, members: dict[str, bytes]) -> Path:
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as archive:
        for name, data in members.items():
            archive.writestr(name, data)
    return path


@pytest.mark.parametrize("members, limits, message", [
    ({"ok.txt": b"x", "../evil.py": b"x"}, {}, "outside the folder"),
    ({"/etc/evil.py": b"x"}, {}, "outside the folder"),
    ({"a/../../evil.py": b"x"}, {}, "outside the folder"),
    ({f"m{n}": b"" for n in range(11)}, {"max_members": 10}, "11 members, over the limit of 10"),
    ({"bomb.bin": bytes(10_001)}, {"max_bytes": 10_000}, "unpacks to 10,001 bytes"),
])
def test_archive_extraction_is_refused_beyond_its_limits(tmp_path, members, limits, message):
    mar = make_zip(tmp_path / "evil.mar", members)
    with pytest.raises(FatalError, match=message):
        extract_archive(mar, tmp_path / "out", **limits)
    assert not (tmp_path / "out").exists() and not (tmp_path.parent / "evil.py").exists()


def test_local_with_a_hostile_archive_stops_before_loading(tmp_path, tiny):
    mar = make_zip(tmp_path / "evil.mar", {"../escaped.py": b"print('pwned')"})
    with pytest.raises(SystemExit, match="outside the folder"):
        batch.main([str(tiny.inputs), "--output", str(tmp_path / "out.jsonl"), "--local", str(mar)])


def test_a_handler_failure_lands_on_the_photo_that_causes_it(tmp_path):
    """If the handler fails a whole batch, --local answers its photos alone: one 500 line, the rest answered."""
    for name in ("a", "bad", "c"):
        (tmp_path / f"{name}.jpg").write_bytes(name.encode())
    items = batch.list_inputs(tmp_path)
    answer = {name: 1.0 for name in ANSWER_FIELDS}

    def predict(handler, bodies, headers):
        if any(body["body"] == b"bad" for body in bodies):
            raise TypeError("a bug the photo triggers")
        return [(200, answer)] * len(bodies)

    records = answer_local_batch(None, items, 3, predict)
    assert [(record["image_id"], record["status"], record.get("code")) for record in records] == [
        ("a", "ok", None), ("bad", "error", 500), ("c", "ok", None)]
    assert "TypeError: a bug the photo triggers" in records[1]["error"]


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
    summary = batch.main([str(tiny.inputs), "--output", str(output), "--url", server.inference_url, *key_file(server),
                          "--concurrency", "4"])
    assert summary["ok"] == PHOTOS and summary["failed_by_code"] == {"400": 2, "415": 1} and summary["retries"] == 0
    assert_same_answers(by_key(output), by_key(local_output))


def key_file(server) -> list[str]:
    """The server's key file, from which the batch job reads the inference key (tokens are on)."""
    return ["--key-file", str(server.workdir / api.KEY_FILE)]


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
                headers = {name: self.headers[name] for name in ("Content-Type", "X-K", "Authorization")
                           if self.headers[name]}
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
        summary = batch.main([str(tiny.inputs), "--output", str(output), "--url", proxy.url, *key_file(server), "--concurrency", "4",
                              "--backoff", "0.01"])
    # every photo, the three 4xx ones included, is sent exactly twice: one 503, one final answer
    assert Counter(proxy.posts) == {digest: 2 * count for digest, count in digests(tiny.inputs).items()}
    assert summary["retries"] == len(tiny.keys()) and summary["failed_by_code"] == {"400": 2, "415": 1}
    assert_same_answers(by_key(output), by_key(local_output))


@pytest.mark.server
def test_exhausted_retries_are_error_lines_that_retry_errors_sends_again(tiny, server, local_output, tmp_path):
    output = tmp_path / "results.jsonl"
    arguments = [str(tiny.inputs), "--output", str(output), "--concurrency", "4", "--backoff", "0.01"]
    with proxy_to(server, "always-503") as proxy:
        summary = batch.main(arguments + ["--url", proxy.url, *key_file(server), "--retries", "2"])
    assert len(proxy.posts) == 3 * len(tiny.keys())
    assert summary["failed_by_code"] == {"503": len(tiny.keys())}
    assert all(line["code"] == 503 and "3 attempt(s)" in line["error"] for line in read_lines(output))

    with proxy_to(server, "forward") as proxy:
        batch.main(arguments + ["--url", proxy.url, *key_file(server)])
        assert proxy.posts == []  # error lines are answers: not re-sent without --retry-errors
        summary = batch.main(arguments + ["--url", proxy.url, *key_file(server), "--retry-errors"])
        assert len(proxy.posts) == len(tiny.keys())
    assert summary["ok"] == PHOTOS and summary["failed_by_code"] == {"400": 2, "415": 1}
    assert_same_answers(by_key(output), by_key(local_output))


@pytest.mark.server
def test_unknown_model_stops_the_run_before_writing_errors(tiny, server, tmp_path):
    output = tmp_path / "results.jsonl"
    with pytest.raises(SystemExit, match="404"):
        batch.main([str(tiny.inputs), "--output", str(output), "--url", server.inference_url, *key_file(server), "--model", "nope"])
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
               "--url", server.inference_url, *key_file(server), "--concurrency", "2"]
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
        summary = batch.main([str(inputs), "--output", str(output), "--url", proxy.url, *key_file(server), "--concurrency", "4"])
    assert len(proxy.posts) == 241 - written  # nothing that had its line was sent again
    assert summary["skipped"] == written
    lines = by_key(output)
    assert {key[0] for key in lines} == {path.stem for path in inputs.iterdir()}
    assert lines[("broken", str(inputs / "broken.jpg"))]["code"] == 400
    assert sum(line["status"] == "ok" for line in lines.values()) == 240
