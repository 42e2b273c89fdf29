"""What the engines of scripts.batch share: inputs read within their limits, answers as records (output lines)
written and counted, and the archive's handler answering batches in this process (local engine, Ray actors)."""
import base64
import json
import os
import sys
import tempfile
import threading
import time
import zipfile
from collections import Counter
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

from tqdm import tqdm

from marketplace_search.schema import ANSWER_FIELDS
from scripts import api

FILE_ERROR = "file_error"
REFUSED_INPUT = "refused_input"
MAX_FILE_BYTES = 20 * 1024 * 1024  # = the server's max_request_size (config.properties)
MAX_ARCHIVE_BYTES = 8 * 2**30  # room for a checkpoint, a Faiss index of millions of photos and the code
MAX_ARCHIVE_MEMBERS = 10_000
FSYNC_SECONDS = 5.0


@dataclass(frozen=True)
class Item:
    """One input photo; `root` is the folder it must stay inside (not part of its identity)."""

    image_id: str
    path: str
    root: str = field(default="", compare=False)
    title: str | None = field(default=None, compare=False)
    description: str | None = field(default=None, compare=False)

    @property
    def words(self) -> dict[str, str]:
        return {name: value for name, value in (("title", self.title), ("description", self.description)) if value}

    @property
    def key(self) -> tuple[str, str]:
        return self.image_id, self.path


class RefusedInput(ValueError):
    """An input the batch will not read: outside its folder, not a regular file, or too large."""


class FatalError(RuntimeError):
    """An answer that every photo would get alike (wrong URL, model, version, token): stop the run."""


@dataclass
class Tally:
    """Counts for the summary; `retried` is bumped from worker threads."""

    skipped: int = 0
    outcomes: Counter = field(default_factory=Counter)  # "ok" or the error code
    retried: int = 0
    lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def add_retry(self, _retry_state=None) -> None:
        with self.lock:
            self.retried += 1

    def count(self, record: dict) -> None:
        self.outcomes["ok" if record["status"] == "ok" else record["code"]] += 1

    @property
    def answered(self) -> int:
        return sum(self.outcomes.values())


def read_input(item: Item, max_bytes: int = MAX_FILE_BYTES) -> bytes | None:
    """The input's photo (None for words alone); RefusedInput when outside its folder, not a file or too large."""
    if not item.path:
        return None
    path = Path(item.path)
    if item.root:
        root = Path(item.root).resolve()
        if not path.resolve().is_relative_to(root):  # an absolute path, a `..`, a symlink pointing out
            raise RefusedInput(f"{item.path} is outside {root}")
    if path.exists() and not path.is_file():
        raise RefusedInput(f"{item.path} is not a regular file")
    with open(path, "rb") as handle:
        data = handle.read(max_bytes + 1)  # never more, even if the file grows meanwhile
    if len(data) > max_bytes:
        raise RefusedInput(f"{item.path} is over the limit of {max_bytes:,} bytes (--max-file-bytes)")
    return data


def request_payload(photo: bytes | None, words: dict[str, str]) -> tuple[bytes, dict]:
    """(body, extra headers): the raw photo, or JSON with the photo (base64, when there is one) and the words."""
    if not words:
        return photo or b"", {}
    document = {**({} if photo is None else {"image": base64.b64encode(photo).decode("ascii")}), **words}
    return json.dumps(document, ensure_ascii=False).encode("utf-8"), {"Content-Type": "application/json"}


def error_record(item: Item, code: int | str, message: str) -> dict:
    return {"image_id": item.image_id, "path": item.path, "status": "error", "code": code, "error": message}


def answer_record(item: Item, status: int, answer: dict) -> dict:
    """The output line for a final answer: the result for 200, else the error with its status."""
    if status != 200:
        return error_record(item, status, answer.get("error") or answer.get("message") or json.dumps(answer))
    missing = [name for name in ANSWER_FIELDS if name not in answer]
    if missing:
        raise FatalError(f"the answer for {item.path} has no {', '.join(missing)}: is this a marketplace "
                         f"model? ({json.dumps(answer)[:200]})")
    return {"image_id": item.image_id, "path": item.path, "status": "ok",
            **{name: answer[name] for name in ANSWER_FIELDS}}


def file_error(item: Item, error: OSError | RefusedInput) -> dict:
    if isinstance(error, RefusedInput):
        return error_record(item, REFUSED_INPUT, f"refused: {error}")
    return error_record(item, FILE_ERROR, f"cannot read {item.path}: {error.strerror or error}")


@contextmanager
def appended_lines(output: Path | None):
    """A function appending a record to OUTPUT as a JSON line (None: a function that writes nothing), flushed at
    once so that a killed run loses none, and fsynced every FSYNC_SECONDS and at the end against a machine crash."""
    if output is None:
        yield lambda record: None
        return
    with open(output, "ab") as file:
        synced_at = time.monotonic()

        def append(record: dict) -> None:
            nonlocal synced_at
            file.write((json.dumps(record, ensure_ascii=False) + "\n").encode("utf-8"))
            file.flush()
            if time.monotonic() - synced_at >= FSYNC_SECONDS:
                os.fsync(file.fileno())
                synced_at = time.monotonic()

        try:
            yield append
        finally:
            os.fsync(file.fileno())


def write_answers(answers, output: Path | None, tally: Tally, total: int) -> float:
    """Each record appended to OUTPUT (None: written elsewhere) and counted, with a progress bar; the seconds spent."""
    started = time.perf_counter()
    with appended_lines(output) as append, tqdm(total=total, unit="photo", smoothing=0.05,
                                                  dynamic_ncols=True) as progress:
        for record in answers:
            append(record)
            tally.count(record)
            progress.update()
            if record["status"] != "ok":
                progress.set_postfix(failed=tally.answered - tally.outcomes["ok"], refresh=False)
    return time.perf_counter() - started


def summarise(tally: Tally, inputs: int, seconds: float) -> dict:
    failed = {str(code): count for code, count in sorted(tally.outcomes.items(), key=str) if code != "ok"}
    return {"inputs": inputs, "ok": tally.outcomes["ok"], "failed": sum(failed.values()), "failed_by_code": failed,
            "skipped": tally.skipped, "retries": tally.retried, "seconds": round(seconds, 2),
            "photos_per_s": round(tally.answered / seconds, 2) if seconds > 0 else None}


def format_summary(summary: dict, output: Path) -> str:
    by_code = ", ".join(f"{code}: {count}" for code, count in summary["failed_by_code"].items())
    rate = "" if summary["photos_per_s"] is None else f" = {summary['photos_per_s']:.1f} photos/s"
    return (f"{summary['inputs']} inputs: {summary['ok']} ok, {summary['failed']} failed"
            + (f" ({by_code})" if by_code else "")
            + f", {summary['skipped']} skipped (already in {output}); "
            f"{summary['ok'] + summary['failed']} answered in {summary['seconds']:.1f} s{rate}; "
            f"{summary['retries']} retries")


@contextmanager
def model_folder(archive: Path, parent: Path | None = None):
    """An extracted archive folder: `archive` itself, or a .mar unzipped into a temporary folder (in PARENT)."""
    archive = Path(archive)
    if archive.is_dir():
        yield archive
        return
    if not zipfile.is_zipfile(archive):
        raise FileNotFoundError(f"{archive} is neither an extracted archive folder nor a .mar file")
    with tempfile.TemporaryDirectory(prefix="batch-model-", dir=parent) as folder:
        extract_archive(archive, Path(folder))
        yield Path(folder)


def extract_archive(archive: Path, folder: Path, max_bytes: int = MAX_ARCHIVE_BYTES,
                    max_members: int = MAX_ARCHIVE_MEMBERS) -> Path:
    """Unzip a .mar into FOLDER (returned) once every member name stays inside it and the declared totals are
    within limits (zipfile never writes more than a member declares)."""
    with zipfile.ZipFile(archive) as mar:
        members = mar.infolist()
        if len(members) > max_members:
            raise FatalError(f"{archive} has {len(members):,} members, over the limit of {max_members:,}")
        for member in members:
            name = member.filename.replace("\\", "/")
            if name.startswith("/") or ".." in name.split("/") or (len(name) > 1 and name[1] == ":"):
                raise FatalError(f"{archive}: member {member.filename!r} would land outside the folder")
        total = sum(member.file_size for member in members)
        if total > max_bytes:
            raise FatalError(f"{archive} unpacks to {total:,} bytes, over the limit of {max_bytes:,}")
        mar.extractall(folder)
    return folder


def load_handler(folder: Path, version: str | None, batch_size: int):
    from handlers.local import load_local_handler

    handler = load_local_handler(folder, batch_size=batch_size)
    archived = handler.model_info["version"]
    if version and version != archived:
        raise FatalError(f"--version {version} asked, but the archive holds version {archived}")
    return handler


def answer_local_batch(handler, items: list[Item], k: int, predict, max_file_bytes: int = MAX_FILE_BYTES) -> list[dict]:
    """Answer `items` with one handler batch; unreadable or refused files get their error without being sent."""
    records, sent, bodies, headers = {}, [], [], []
    for item in items:
        try:
            photo = read_input(item, max_file_bytes)
        except (OSError, RefusedInput) as error:
            records[item.key] = file_error(item, error)
            continue
        sent.append(item)
        data, extra = request_payload(photo, item.words)
        bodies.append({"body": json.loads(data) if extra else photo})  # TorchServe hands JSON over parsed
        headers.append({**api.prediction_headers(photo, k=k), **extra})
    if sent:
        for item, (status, answer) in zip(sent, predict_each_on_failure(handler, bodies, headers, predict), strict=True):
            records[item.key] = answer_record(item, status, answer)
    return [records[item.key] for item in items]


def predict_each_on_failure(handler, bodies: list[dict], headers: list[dict], predict) -> list[tuple[int, dict]]:
    """The batch's answers; if the handler fails the batch, each photo alone, so the one that fails gets the 500."""
    try:
        return predict(handler, bodies, headers)
    except Exception as error:  # attributed below to the photo(s) that cause it, with its cause in the line
        if len(bodies) == 1:
            return [handler_failure(error)]
        print(f"the handler failed a batch of {len(bodies)} ({type(error).__name__}: {error}); "
              f"answering its photos one by one", file=sys.stderr)
    answers = []
    for body, header in zip(bodies, headers):
        try:
            answers.extend(predict(handler, [body], [header]))
        except Exception as error:
            answers.append(handler_failure(error))
    return answers


def handler_failure(error: Exception) -> tuple[int, dict]:
    return 500, {"error": f"the handler failed on this photo ({type(error).__name__}: {error})"}


def local_answers(handler, items: list[Item], k: int, batch_size: int, max_file_bytes: int = MAX_FILE_BYTES):
    # Imported here so that the served path never loads torch and faiss.
    from handlers.local import predict_local

    for start in range(0, len(items), batch_size):
        yield from answer_local_batch(handler, items[start:start + batch_size], k, predict_local, max_file_bytes)
