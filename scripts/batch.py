"""Run every photo of a folder or CSV through the model into a JSON Lines file; resumable.

INPUT is a folder (image id = file stem) or a CSV with `image_id` and/or `path` (relative to the CSV; image_id
alone reads --images DIR/<image_id>.jpg) and optionally `title` and `description` (a row without a photo is
answered from its words). OUTPUT gets one line per input, {"image_id", "path", "status": "ok", ...the answer} or
{..., "status": "error", "code", "error"}; 401/403/404 stop the run. A re-run with the same OUTPUT skips every
input that has a line."""
import argparse
import csv
import itertools
import json
import os
import sys
from concurrent.futures import FIRST_COMPLETED, ThreadPoolExecutor, wait
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import requests
from tenacity import Retrying

from marketplace_search.extras import installed, needs_extra
from marketplace_search.files import replaced_atomically
from scripts import api
from scripts.api import TRANSIENT_STATUSES, TransientError
from scripts.records import (MAX_FILE_BYTES, FatalError, Item, RefusedInput, Tally, answer_record, error_record,
                             file_error, format_summary, load_handler, local_answers, model_folder, read_input,
                             request_payload, summarise, write_answers)

NO_ANSWER_CODES = ("connection_error", "timeout")
FATAL_STATUSES = (401, 403, 404)  # every photo would get the same answer
MAX_BACKOFF = 30  # seconds: the longest wait between retries
ENGINES = ("served", "local", "ray")
TEXT_COLUMNS = ("title", "description")


def absolute(path: Path | str) -> Path:
    """An absolute, normalised path (symlinks kept): the same input gets the same key from any cwd."""
    return Path(os.path.abspath(path))


def list_inputs(source: Path, images_dir: Path | None = None) -> list[Item]:
    """The inputs of a folder or a CSV, in order, each (image_id, path) once."""
    source = Path(source)
    if source.is_dir():
        items = folder_inputs(source)
    elif source.is_file() and source.suffix.lower() == ".csv":
        items = csv_inputs(source, images_dir)
    else:
        raise FileNotFoundError(f"input {source} is neither a folder of photos nor a .csv file")
    return list(dict.fromkeys(items))  # a row listed twice is answered once


def folder_inputs(folder: Path) -> list[Item]:
    """Every non-folder entry, sorted by name (unreadable ones become error lines, not gaps)."""
    folder = absolute(folder)
    return [Item(path.stem, str(path), str(folder)) for path in sorted(folder.iterdir())
            if not path.name.startswith(".") and not path.is_dir()]


def csv_inputs(csv_path: Path, images_dir: Path | None) -> list[Item]:
    csv_path = absolute(csv_path)
    with open(csv_path, newline="", encoding="utf-8-sig") as handle:
        reader = csv.DictReader(handle)
        columns = [name.strip() for name in reader.fieldnames or []]
        reader.fieldnames = columns
        if not set(columns) & {"image_id", "path", "title"}:
            raise ValueError(f"{csv_path} has neither an image_id, a path nor a title column (columns: {columns})")
        if "path" not in columns and images_dir is None:
            if "title" not in columns:
                raise ValueError(f"{csv_path} has image_id but no path column: pass --images DIR "
                                 f"(photos are read as DIR/<image_id>.jpg)")
            print(f"{csv_path} has no path column and no --images was given: its rows are answered from "
                  f"their words alone", file=sys.stderr)
        return [csv_item(row, csv_path, reader.line_num, images_dir) for row in reader]


def csv_item(row: dict, csv_path: Path, line: int, images_dir: Path | None) -> Item:
    image_id = (row.get("image_id") or "").strip()
    path = (row.get("path") or "").strip()
    words = {name: (row.get(name) or "").strip() or None for name in TEXT_COLUMNS}
    if path:
        full = absolute(csv_path.parent / path)  # an absolute `path` stays as it is: read_input refuses it
        return Item(image_id or full.stem, str(full), str(csv_path.parent), **words)
    if image_id and images_dir is not None:
        return Item(image_id, str(absolute(images_dir / f"{image_id}.jpg")), str(absolute(images_dir)), **words)
    if any(words.values()):  # words alone; the model answers 400 missing_title to a description alone
        return Item(image_id or f"line-{line}", "", "", **words)
    raise ValueError(f"{csv_path} line {line}: no path" + ("" if image_id else " and no image_id")
                     + " and no title"
                     + ("" if images_dir or not image_id else " (pass --images DIR to read DIR/<image_id>.jpg)"))


def record_key(record: dict) -> tuple[str, str]:
    return record["image_id"], record["path"]


def recover_output(output: Path) -> tuple[dict[tuple[str, str], dict], int]:
    """(the records in OUTPUT by key, bytes of a half-written last line cut off); a broken line elsewhere is refused."""
    if not output.exists():
        return {}, 0
    data = output.read_bytes()
    complete = data.rfind(b"\n") + 1
    if complete < len(data):
        os.truncate(output, complete)
    records = {}
    for number, line in enumerate(data[:complete].split(b"\n")[:-1], start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
            records[record_key(record)] = record
        except (json.JSONDecodeError, KeyError, TypeError) as error:
            raise ValueError(f"{output} line {number} is not a batch result ({error}): "
                             f"{line[:120]!r}; was the file written by something else?") from error
    return records, len(data) - complete


def drop_records(output: Path, keys: set) -> None:
    """Rewrite OUTPUT without the lines of `keys`; atomic, so a kill leaves the old file or the new."""
    with replaced_atomically(output) as temporary, open(output, "rb") as source, open(temporary, "wb") as target:
        target.writelines(line for line in source if not (line.strip() and record_key(json.loads(line)) in keys))


@dataclass
class Target:
    url: str  # .../predictions/NAME[/VERSION]
    k: int
    timeout: float
    token: api.Key | None = None  # its key file is read again when the server refuses it (keys expire)
    max_file_bytes: int = MAX_FILE_BYTES

    def headers(self, photo: bytes | None) -> dict:
        return api.prediction_headers(photo, self.token, k=self.k)

    def renewed_token(self) -> bool:
        """Take the key file's current inference key; True if it differs from the one refused."""
        if getattr(self.token, "file", None) is None:
            return False
        token = api.resolve_token("inference", key_file=self.token.file)
        renewed, self.token = token != self.token, token
        return renewed


def check_server(url: str, timeout: float) -> None:
    """Fail before the first photo when nothing answers at URL, rather than once per photo."""
    try:
        api.ping(url, timeout=timeout)
    except requests.RequestException as error:
        raise FatalError(f"no TorchServe answering at {url} ({type(error).__name__}); start one "
                         f"(python -m scripts.serve start ...) or run in-process with --local ARCHIVE") from error


def post_photo(target: Target, photo: bytes | None, words: dict[str, str] | None = None) -> tuple[int, dict]:
    """One POST: the final (status, JSON answer), or TransientError when it is worth asking again."""
    data, extra = request_payload(photo, words or {})
    response = api.post_photo(target.url, data, {**target.headers(photo), **extra}, target.timeout)
    if api.key_refused(response) and target.renewed_token():
        response = api.post_photo(target.url, data, {**target.headers(photo), **extra}, target.timeout)
    if api.key_refused(response):
        raise FatalError(f"POST {target.url}: {api.refused_key('inference', target.token)} "
                         f"({api.error_text(response)})")
    if response.status_code in FATAL_STATUSES:
        raise FatalError(f"POST {target.url} -> {response.status_code}: {api.error_text(response)} "
                         f"(check --url, --model, --version and --token/--key-file)")
    if not response.ok:
        return response.status_code, {"error": api.error_text(response)}
    try:
        return response.status_code, response.json()
    except requests.JSONDecodeError as error:
        raise FatalError(f"POST {target.url} answered {response.status_code} with no JSON: "
                         f"{response.text[:200]!r}") from error


def answer_served(item: Item, target: Target, policy: Retrying) -> dict:
    try:
        photo = read_input(item, target.max_file_bytes)
    except (OSError, RefusedInput) as error:
        return file_error(item, error)
    try:
        status, answer = policy(post_photo, target, photo, item.words)
    except TransientError as error:
        attempts = policy.stop.max_attempt_number
        return error_record(item, error.code, f"no answer after {attempts} attempt(s): {error}")
    return answer_record(item, status, answer)


def answers_in_pool(items: list[Item], answer, concurrency: int):
    """Yield `answer(item)` for every item as each finishes, in CONCURRENCY threads with at most two items each."""
    queue = iter(items)
    running = set()
    with ThreadPoolExecutor(max_workers=concurrency, thread_name_prefix="batch") as pool:
        try:
            while True:
                for item in itertools.islice(queue, 2 * concurrency - len(running)):
                    running.add(pool.submit(answer, item))
                if not running:
                    return
                done, running = wait(running, return_when=FIRST_COMPLETED)
                for future in done:
                    yield future.result()
        finally:
            for future in running:
                future.cancel()


def pending_inputs(items: list[Item], output: Path, retry_errors: bool) -> list[Item]:
    """The inputs still to answer: those without a line in OUTPUT, and with RETRY_ERRORS those of transient errors."""
    records, cut = recover_output(output)
    if cut:
        print(f"cut a half-written last line ({cut} bytes) off {output}", file=sys.stderr)
    redo = {key for key, record in records.items() if retry_errors and record["status"] == "error"
            and (record["code"] in TRANSIENT_STATUSES or record["code"] in NO_ANSWER_CODES)}
    if redo:
        print(f"re-sending {len(redo)} input(s) whose last answer was a transient error", file=sys.stderr)
        drop_records(output, redo)
    done = set(records) - redo
    return [item for item in items if item.key not in done]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("input", type=Path, help="folder of photos, or CSV with image_id, path and/or title")
    parser.add_argument("--output", required=True, type=Path, help="JSON Lines results (appended to, resumable)")
    parser.add_argument("--images", type=Path, help="folder of <image_id>.jpg for a CSV without a path column")
    parser.add_argument("--url", default=api.DEFAULT_INFERENCE_URL, help="TorchServe inference API")
    parser.add_argument("--model", default="marketplace", help="registered model name (served)")
    parser.add_argument("--version", help="model version (default: the server's default version)")
    parser.add_argument("--k", type=int, default=10, help="similar listings per photo (1-100)")
    parser.add_argument("--concurrency", type=int, default=8, help="requests in flight (served)")
    parser.add_argument("--retries", type=int, default=5, help="retries per photo on overload/connection errors")
    parser.add_argument("--timeout", type=float, default=60, help="seconds per request")
    parser.add_argument("--backoff", type=float, default=0.5, help="first retry wait in seconds (then doubling)")
    parser.add_argument("--retry-errors", action="store_true", help="re-send inputs whose line is a transient error")
    api.add_key_arguments(parser, "inference")
    parser.add_argument("--engine", choices=ENGINES,
                        help="served: TorchServe at --url (default); local: --archive in this process; "
                             "ray: --archive in Ray actors (default: local when --local is given)")
    parser.add_argument("--archive", type=Path, metavar="MAR_OR_DIR", help="the archive --engine local/ray runs")
    parser.add_argument("--local", type=Path, metavar="MAR_OR_DIR", help="= --engine local --archive MAR_OR_DIR")
    parser.add_argument("--batch-size", type=int, default=8, help="photos per forward pass (local, ray)")
    ray_options = parser.add_argument_group("--engine ray (scripts/ray_batch.py)")
    ray_options.add_argument("--address", help="join this Ray cluster (auto, ray://HOST:PORT), else start a local Ray")
    ray_options.add_argument("--actors", type=int, default=1, help="actors, each loading the archive once")
    ray_options.add_argument("--cpus-per-actor", type=float,
                             help="CPUs (= torch threads) per actor (default: a share of all but half a CPU)")
    ray_options.add_argument("--ray-cpus", type=int, help="CPUs of the local Ray (default: every core)")
    ray_options.add_argument("--ray-temp-dir", type=Path, help="the local Ray's session folder (default /tmp/ray)")
    ray_options.add_argument("--format", choices=("jsonl", "parquet"), default="jsonl",
                             help="parquet: OUTPUT is a folder of shards, resumed shard by shard")
    ray_options.add_argument("--shard-size", type=int, default=1000, help="inputs per Parquet shard")
    parser.add_argument("--max-file-bytes", type=int, default=MAX_FILE_BYTES,
                        help="larger inputs are refused unread (default: the server's max_request_size, 20 MiB)")
    return parser


def check_arguments(args: argparse.Namespace) -> None:
    for name in ("k", "concurrency", "batch_size", "max_file_bytes", "actors", "shard_size"):
        if getattr(args, name) < 1:
            raise SystemExit(f"--{name.replace('_', '-')} must be at least 1, got {getattr(args, name)}")
    if args.retries < 0:
        raise SystemExit(f"--retries must be 0 or more, got {args.retries}")
    if args.local:
        if args.engine not in (None, "local") or (args.archive and args.archive != args.local):
            raise SystemExit("--local ARCHIVE means --engine local --archive ARCHIVE: give one or the other")
        args.engine, args.archive = "local", args.local
    args.engine = args.engine or "served"
    if args.engine != "served" and not args.archive:
        raise SystemExit(f"--engine {args.engine} runs an archive: pass --archive MAR_OR_DIR")
    if (args.engine == "ray" or args.format == "parquet") and not installed("ray"):
        raise SystemExit(needs_extra(f"--engine {args.engine} --format {args.format}", "Ray", "scale"))
    if args.archive and not args.archive.exists():
        raise SystemExit(f"--archive {args.archive}: no such file or folder")
    if args.format == "parquet" and args.engine != "ray":
        raise SystemExit("--format parquet is written by --engine ray")


def main(argv=None) -> dict:
    args = build_parser().parse_args(argv)
    check_arguments(args)
    items = list_inputs(args.input, args.images)
    tally = Tally()
    try:
        seconds = run(args, items, tally)
    except FatalError as error:
        raise SystemExit(f"stopped: {error}\nwhat was written stays in {args.output}; fix the cause and re-run the "
                         f"same command to resume") from error
    summary = summarise(tally, len(items), seconds)
    print(format_summary(summary, args.output))
    return summary


def run(args: argparse.Namespace, items: list[Item], tally: Tally) -> float:
    """Answer the ITEMS not yet in args.output into it; returns the seconds spent answering."""
    if args.format == "parquet":
        from scripts.ray_batch import run_parquet

        return run_parquet(args, items, tally)
    args.output.parent.mkdir(parents=True, exist_ok=True)
    todo = pending_inputs(items, args.output, args.retry_errors)
    tally.skipped = len(items) - len(todo)
    if not todo:
        return 0.0
    if args.engine == "ray":
        from scripts.ray_batch import run_ray  # Ray is imported by this engine alone, as torch by local

        return run_ray(args, todo, tally)
    if args.engine == "local":
        with model_folder(args.archive) as folder:
            handler = load_handler(folder, args.version, args.batch_size)
            answers = local_answers(handler, todo, args.k, args.batch_size, args.max_file_bytes)
            return write_answers(answers, args.output, tally, len(todo))
    check_server(args.url, args.timeout)
    target = Target(api.prediction_url(args.url, args.model, args.version), args.k, args.timeout,
                    api.resolve_token("inference", args.token, args.key_file), args.max_file_bytes)
    policy = api.retrying(args.retries, args.backoff, MAX_BACKOFF, before_sleep=tally.add_retry)
    answers = answers_in_pool(todo, partial(answer_served, target=target, policy=policy), args.concurrency)
    return write_answers(answers, args.output, tally, len(todo))


if __name__ == "__main__":
    main()
