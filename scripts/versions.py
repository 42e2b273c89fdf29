"""Release, roll back and retire versions of a served model through TorchServe's management API (the server runs
with --enable-model-api): a new default only once its canary answer keeps the contract (docs/serving.md).
"""
import argparse
import io
import json
import sys
import zipfile
from pathlib import Path

import numpy as np
from packaging.version import InvalidVersion, Version
from PIL import Image

from marketplace_search.files import write_json_atomically
from marketplace_search.layout import ARCHIVE_MANIFEST
from marketplace_search.schema import AnswerError, check_answer as check_contract
from scripts import api
from scripts.api import DEFAULT_INFERENCE_URL, DEFAULT_MANAGEMENT_URL, ApiError, describe, register, set_default, \
    unregister


HISTORY_FILE = "releases.json"  # in the model store; its layout: read_history


class ReleaseError(RuntimeError):
    """A release, rollback or retirement that cannot be done as asked."""


class CanaryError(ReleaseError):
    """The new version did not answer its canary query with the contract's answer."""


def version_key(version: str):
    """Versions in release order: PEP 440 numbers (1.0 < 2.0 < 20250131.142233), other strings first."""
    try:
        return (1, Version(version), "")
    except InvalidVersion:
        return (0, Version("0"), version)


def versions_of(url: str, name: str, token: str | None) -> tuple[list[dict], str]:
    """(every registered version's description, oldest first; the default version)."""
    every = sorted(describe(url, name, "all", token), key=lambda d: version_key(d["modelVersion"]))
    return every, describe(url, name, token=token)[0]["modelVersion"]


def canary_photo(path: Path | None) -> bytes:
    """The canary query: a given photo, else a generated one (the check is the answer's shape)."""
    if path:
        return path.read_bytes()
    pixels = np.random.default_rng(0).integers(0, 256, size=(224, 224, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels, "RGB").save(buffer, "JPEG")
    return buffer.getvalue()


def check_answer(answer: dict, name: str, version: str) -> None:
    """The answer keeps the contract (marketplace_search.schema), came from this version, and found listings."""
    try:
        check_contract(answer)
    except AnswerError as error:
        raise CanaryError(str(error)) from error
    if (answer["model"]["name"], answer["model"]["version"]) != (name, version):
        raise CanaryError(f"answer came from {answer['model']}, not {name} {version}")
    if not answer["neighbours"]:
        raise CanaryError("no neighbours: is the catalogue in the archive empty?")


def read_history(path: Path | None) -> dict[str, dict]:
    """{name: {"defaults": [version, ...] (in release order, the last the current one), "archives": {version: mar}}}"""
    if path is None or not Path(path).is_file():
        return {}
    return json.loads(Path(path).read_text())


def released_default(history_file: Path | None, name: str) -> dict | None:
    """The last released default of `name` as {"version", "mar"} (mar None if unknown), or None."""
    model = read_history(history_file).get(name)
    if not model or not model["defaults"]:
        return None
    version = model["defaults"][-1]
    return {"version": version, "mar": model["archives"].get(version)}


def record_default(history_file: Path | None, name: str, version: str, archives: dict[str, str],
                   previous: str | None = None, rolled_back: bool = False) -> None:
    """Note VERSION as NAME's default, pushed on release (after the default it replaced) or popped back to on a
    rollback; ARCHIVES ({version: its archive}) are kept so that a rollback can register a version again."""
    if history_file is None:
        return
    history = read_history(history_file)
    model = history.setdefault(name, {"defaults": [], "archives": {}})
    defaults = model["defaults"]
    if rolled_back:
        defaults.pop()
    else:
        if not defaults and previous and previous != version:
            defaults.append(previous)
        defaults.append(version)
    model["archives"].update(archives)
    write_json_atomically(history_file, history)


def registered_archives(descriptions: list[dict]) -> dict[str, str]:
    """{version: the archive it was registered from} of the versions DESCRIPTIONS describe (GET /models/NAME/all)."""
    return {description["modelVersion"]: description["modelUrl"] for description in descriptions}


def current_default(url, name: str, token: str | None) -> str | None:
    try:
        return describe(url, name, token=token)[0]["modelVersion"]
    except ApiError as error:
        if error.status == 404:
            return None
        raise


def release(url, inference_url, mar: str, name: str, version: str, *, token: str | None = None,
            inference_token: str | None = None, initial_workers: int = 1, warm_queries: int = 3,
            photo: Path | None = None, timeout: float = 180, history: Path | None = None) -> dict:
    """Register, warm and canary the version (unregistered on any failure), then make it the default; the answer."""
    previous = current_default(url, name, token)
    registered = {} if previous is None else registered_archives(describe(url, name, "all", token))
    if version in registered:
        raise ReleaseError(f"{name} {version} is already registered: a version label names one archive for good; "
                           f"release a new version")
    register(url, mar, name, initial_workers=initial_workers, synchronous=True, token=token)
    try:
        api.wait_ready(url, name, version, timeout, token)
        query = canary_photo(photo)
        for _ in range(warm_queries):
            api.predict(inference_url, query, model=name, version=version, token=inference_token)
        answer = api.predict(inference_url, query, model=name, version=version, token=inference_token)
        check_answer(answer, name, version)
    except Exception as error:  # any failure of the canary (a refusal, a crash, a malformed answer) fails it
        unregister(url, name, version, token)
        raise CanaryError(f"{name} {version} failed its canary and was unregistered: "
                          f"{type(error).__name__}: {error}") from error
    set_default(url, name, version, token)
    record_default(history, name, version, {**registered, version: mar}, previous)
    return answer


def rollback(url, name: str, to: str | None = None, token: str | None = None,
             history: Path | None = None) -> tuple[str, str]:
    """Make TO, else the previous default (without a history, the newest version older than the default), the
    default, registering it again if need be; returns (old default, new default)."""
    every, default = versions_of(url, name, token)
    registered = registered_archives(every)
    model = read_history(history).get(name, {"defaults": [], "archives": {}})
    defaults = model["defaults"]
    to_previous = len(defaults) >= 2 and defaults[-1] == default and (to is None or to == defaults[-2])
    if to_previous:
        to = defaults[-2]
    elif to is None:
        older = [v for v in registered if version_key(v) < version_key(default)]
        if not older:
            raise ReleaseError(f"{name}: no registered version older than the default {default} "
                               f"(registered: {', '.join(registered)})")
        to = older[-1]
    if to not in registered:
        mar = model["archives"].get(to)
        if mar is None:
            raise ReleaseError(f"{name} {to} is not registered (registered: {', '.join(registered)}) and "
                               f"{HISTORY_FILE} names no archive for it")
        register(url, mar, name, initial_workers=1, synchronous=True, token=token)
        api.wait_ready(url, name, to, token=token)
        registered[to] = mar
    set_default(url, name, to, token)
    record_default(history, name, to, registered, previous=default, rolled_back=to_previous)
    return default, to


def retire(url: str, name: str, version: str, token: str | None = None) -> None:
    _, default = versions_of(url, name, token)
    if version == default:
        raise ReleaseError(f"{name} {version} is the default version: release or roll back to another first")
    unregister(url, name, version, token)


def print_versions(url: str, name: str, token: str | None) -> None:
    every, default = versions_of(url, name, token)
    for description in every:
        marker = "*" if description["modelVersion"] == default else " "
        workers = ", ".join(worker["status"] for worker in description.get("workers", [])) or "no workers"
        print(f"{marker} {description['modelVersion']:<18} {description['modelUrl']:<32} "
              f"batch {description['batchSize']}/{description['maxBatchDelay']} ms  {workers}")
    print("(* = default)")


def mar_reference(mar: str) -> tuple[str, str | None]:
    """(what to register: the file name for a local archive in the store, or the URL; its version if readable)."""
    path = Path(mar)
    if not path.is_file():
        return mar, None
    with zipfile.ZipFile(path) as archive:
        return path.name, json.loads(archive.read(str(ARCHIVE_MANIFEST)))["model"]["modelVersion"]


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--url", default=DEFAULT_MANAGEMENT_URL, help="management API address")
    parser.add_argument("--inference-url", default=DEFAULT_INFERENCE_URL, help="inference API address (canary)")
    parser.add_argument("--store", type=Path, default=Path("model_store"),
                        help=f"the server's model store: its {HISTORY_FILE} records the defaults in release order")
    api.add_key_arguments(parser, "management")
    commands = parser.add_subparsers(dest="command", required=True)
    listing = commands.add_parser("list", help="every registered version, the default marked")
    listing.add_argument("name")
    releasing = commands.add_parser("release", help="register, canary, then make default")
    releasing.add_argument("--mar", required=True, help="archive in the server's model store (path or file name) or URL")
    releasing.add_argument("--name", required=True)
    releasing.add_argument("--version", help="the archive's version (read from a local .mar when omitted)")
    releasing.add_argument("--timeout", type=float, default=180, help="seconds to wait for READY")
    rolling = commands.add_parser("rollback", help="make the previous version the default")
    rolling.add_argument("name")
    rolling.add_argument("--to", help="this version instead of the next older one")
    retiring = commands.add_parser("retire", help="unregister a version that is not the default")
    retiring.add_argument("name")
    retiring.add_argument("version")
    args = parser.parse_args(argv)
    token = api.resolve_token("management", args.token, args.key_file)
    history = args.store / HISTORY_FILE if args.store.is_dir() else None
    try:
        if args.command == "list":
            print_versions(args.url, args.name, token)
        elif args.command == "release":
            mar, archived = mar_reference(args.mar)
            version = args.version or archived
            if version is None:
                raise SystemExit("--version is required when --mar is not a local file")
            if archived and archived != version:
                raise SystemExit(f"{args.mar} holds version {archived}, not {version}")
            inference_token = api.resolve_token("inference", key_file=args.key_file, env="TS_INFERENCE_TOKEN")
            answer = release(args.url, args.inference_url, mar, args.name, version, token=token,
                             inference_token=inference_token, timeout=args.timeout, history=history)
            print(f"{args.name} {version} is now the default (canary: {answer['category']}, "
                  f"{len(answer['neighbours'])} neighbours)")
        elif args.command == "rollback":
            old, new = rollback(args.url, args.name, args.to, token, history)
            print(f"{args.name}: default {old} -> {new}")
        else:
            retire(args.url, args.name, args.version, token)
            print(f"{args.name} {args.version} unregistered")
    except (ReleaseError, ApiError) as error:
        print(f"error: {error}", file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    main()
