"""scripts.batch on the recipe's archive: in-process, and through an overloaded proxy to the session's TorchServe."""
import hashlib
import json
import os
import shutil
import threading
import zipfile
from collections import Counter
from pathlib import Path

import pytest
import requests

from marketplace_search.schema import ANSWER_FIELDS
from scripts import api, batch
from scripts.records import (FILE_ERROR, REFUSED_INPUT, FatalError, RefusedInput, answer_local_batch, extract_archive,
                             file_error, model_folder, read_input)
from tests.serving_fixtures import NAME, RECIPE_BACKEND, assert_same_answers, by_key, photo_jpeg, read_jsonl

pytestmark = pytest.mark.server

PHOTOS = 16


def test_folder_inputs_are_every_file_sorted_by_name(batch_inputs):
    items = batch.list_inputs(batch_inputs.folder)
    assert [item.image_id for item in items] == ["corrupt", "empty", "notes"] + [f"p{n:03d}" for n in range(PHOTOS)]
    assert {item.key for item in items} == batch_inputs.keys()


def test_csv_inputs_by_path_or_by_image_id(tmp_path, batch_inputs):
    (tmp_path / "photos").mkdir()
    table = tmp_path / "inputs.csv"
    table.write_text("image_id,path\nfirst,photos/a.jpg\n,photos/b.jpg\nthird,\nfirst,photos/a.jpg\n")
    items = batch.list_inputs(table, images_dir=batch_inputs.folder)
    assert [item.key for item in items] == [("first", str(tmp_path / "photos" / "a.jpg")),
                                            ("b", str(tmp_path / "photos" / "b.jpg")),
                                            ("third", str(batch_inputs.folder / "third.jpg"))]
    ids_only = tmp_path / "ids.csv"
    ids_only.write_text("image_id\np001\n")
    with pytest.raises(ValueError, match="--images"):
        batch.list_inputs(ids_only)
    assert batch.list_inputs(ids_only, batch_inputs.folder)[0].path == str(batch_inputs.folder / "p001.jpg")
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


def test_local_answers_every_input_once_with_bad_files_as_errors(batch_inputs, local_lines):
    assert local_lines.keys() == batch_inputs.keys()
    errors = {key[0]: line for key, line in local_lines.items() if line["status"] == "error"}
    assert set(errors) == {"corrupt", "empty", "notes"}
    assert {image_id: line["code"] for image_id, line in errors.items()} == {"corrupt": 400, "empty": 400, "notes": 415}
    assert all(line["error"] for line in errors.values())
    for (image_id, _), line in local_lines.items():
        if line["status"] == "ok":
            assert set(line) == {"image_id", "path", "status", *ANSWER_FIELDS}
            assert line["model"] == {"name": NAME, "version": "1.0", "backend": RECIPE_BACKEND}
            assert len(line["neighbours"]) == 6  # every listing of the tiny catalogue
    for number in range(12):  # photos that are in the catalogue find themselves first
        line = local_lines[(f"p{number:03d}", str(batch_inputs.folder / f"p{number:03d}.jpg"))]
        assert line["neighbours"][0]["image_id"] == f"img-{number:03d}"


def test_local_on_an_extracted_folder_reports_missing_and_refused_inputs(batch_inputs, tmp_path):
    folder = tmp_path / "model"
    with model_folder(batch_inputs.mar) as extracted:
        shutil.copytree(extracted, folder)
    table = tmp_path / "inputs.csv"
    shutil.copy(batch_inputs.folder / "p000.jpg", tmp_path / "there.jpg")
    (tmp_path / "big.jpg").write_bytes(photo_jpeg(3) + bytes(2000))
    table.write_text("image_id,path\nthere,there.jpg\nmissing,missing.jpg\nbig,big.jpg\n")
    output = tmp_path / "results.jsonl"
    summary = batch.main([str(table), "--output", str(output), "--local", str(folder), "--k", "2",
                          "--max-file-bytes", str((tmp_path / "there.jpg").stat().st_size)])
    lines = {line["image_id"]: line for line in read_jsonl(output)}
    assert lines["there"]["status"] == "ok" and len(lines["there"]["neighbours"]) == 2
    assert lines["missing"]["code"] == FILE_ERROR and "missing.jpg" in lines["missing"]["error"]
    assert lines["big"]["code"] == REFUSED_INPUT and "--max-file-bytes" in lines["big"]["error"]
    assert summary["ok"] == 1 and summary["failed_by_code"] == {FILE_ERROR: 1, REFUSED_INPUT: 1}


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


def test_local_with_a_hostile_archive_stops_before_loading(tmp_path, batch_inputs):
    mar = make_zip(tmp_path / "evil.mar", {"../escaped.py": b"print('pwned')"})
    with pytest.raises(SystemExit, match="outside the folder"):
        batch.main([str(batch_inputs.folder), "--output", str(tmp_path / "out.jsonl"), "--local", str(mar)])


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


def served_arguments(server) -> list[str]:
    """The server, and its key file from which the batch job reads the inference key (tokens are on)."""
    return ["--url", server.inference_url, "--key-file", str(server.workdir / api.KEY_FILE)]


class Overload:
    """In place of api.session(): a POST gets a 503 as MODE says ("first": the first POST of each body, "always",
    "never"), else goes to the server; `posts` counts the POSTs of each body (sha1)."""

    def __init__(self, mode: str):
        self.mode, self.posts, self.lock = mode, Counter(), threading.Lock()

    def post(self, url: str, data: bytes, **options) -> requests.Response:
        with self.lock:
            digest = hashlib.sha1(data).hexdigest()
            self.posts[digest] += 1
            overloaded = self.mode == "always" or (self.mode == "first" and self.posts[digest] == 1)
        if not overloaded:
            return requests.post(url, data=data, **options)
        response = requests.Response()
        response.status_code, response._content = 503, b'{"code": 503, "message": "overloaded"}'
        return response


def test_served_answers_as_local_overload_is_retried_a_4xx_is_final_and_exhausted_retries_are_sent_again(
        batch_inputs, served, local_lines, tmp_path, monkeypatch):
    inputs = Counter(hashlib.sha1(path.read_bytes()).hexdigest() for path in batch_inputs.files())
    arguments = [str(batch_inputs.folder), "--concurrency", "4", "--backoff", "0.01", *served_arguments(served)]
    fake = Overload("first")
    monkeypatch.setattr(api, "session", lambda: fake)  # the batch job's POSTs, through each `fake` below
    summary = batch.main([*arguments, "--output", str(tmp_path / "first.jsonl")])
    # every photo, the three 4xx ones included, is sent exactly twice: one 503, one final answer
    assert fake.posts == {digest: 2 * count for digest, count in inputs.items()}
    assert summary["retries"] == len(batch_inputs.keys()) and summary["ok"] == PHOTOS
    assert summary["failed_by_code"] == {"400": 2, "415": 1}
    assert_same_answers(by_key(read_jsonl(tmp_path / "first.jsonl")), local_lines)

    output = tmp_path / "always.jsonl"
    fake = Overload("always")
    summary = batch.main([*arguments, "--output", str(output), "--retries", "2"])
    assert fake.posts.total() == 3 * len(batch_inputs.keys())
    assert summary["failed_by_code"] == {"503": len(batch_inputs.keys())}
    assert all(line["code"] == 503 and "3 attempt(s)" in line["error"] for line in read_jsonl(output))
    fake = Overload("never")
    batch.main([*arguments, "--output", str(output)])
    assert not fake.posts  # error lines are answers: not sent again without --retry-errors
    summary = batch.main([*arguments, "--output", str(output), "--retry-errors"])
    assert fake.posts.total() == len(batch_inputs.keys())
    assert summary["ok"] == PHOTOS and summary["failed_by_code"] == {"400": 2, "415": 1}
    assert_same_answers(by_key(read_jsonl(output)), local_lines)


def test_unknown_model_stops_the_run_before_writing_errors(batch_inputs, served, tmp_path):
    output = tmp_path / "results.jsonl"
    with pytest.raises(SystemExit, match="404"):
        batch.main([str(batch_inputs.folder), "--output", str(output), *served_arguments(served), "--model", "nope"])
    assert not output.exists() or output.read_text() == ""
