"""Release, roll back and retire versions of a served model through TorchServe's management API.

  python -m scripts.versions list marketplace
  python -m scripts.versions release --mar model_store/marketplace-v2.0.mar --name marketplace --version 2.0
  python -m scripts.versions rollback marketplace            # the next older registered version becomes default
  python -m scripts.versions retire marketplace 1.0          # unregister a version that is not the default

`release` registers the new version beside the current one (with workers, synchronously), waits
until it is READY, warms it with a few queries, sends a canary query to /predictions/NAME/VERSION
and checks the answer has every contract field; only then does it make the version the default.
The previous version stays registered, so `rollback` is instant. A failed canary unregisters the
new version and exits non-zero; the default is untouched.

The same steps with curl (management API on :8081, inference on :8080):
  curl http://127.0.0.1:8081/models/marketplace/all                                     # every version
  curl http://127.0.0.1:8081/models/marketplace                                         # the default version
  curl -X POST "http://127.0.0.1:8081/models?url=marketplace-v2.0.mar&model_name=marketplace&initial_workers=1&synchronous=true"
  curl -H 'Content-Type: image/jpeg' --data-binary @photo.jpg http://127.0.0.1:8080/predictions/marketplace/2.0
  curl -X PUT http://127.0.0.1:8081/models/marketplace/2.0/set-default                  # release
  curl -X PUT http://127.0.0.1:8081/models/marketplace/1.0/set-default                  # rollback
  curl -X DELETE http://127.0.0.1:8081/models/marketplace/1.0                           # retire (403 for the default)
With tokens on, add -H "Authorization: Bearer <key>": the "management" key of key_file.json for
:8081 and the "inference" key for :8080 (each API refuses the other's key; --key-file reads both).
"""
import argparse
import io
import json
import os
import sys
import zipfile
from pathlib import Path

import numpy as np
import requests
from packaging.version import InvalidVersion, Version
from PIL import Image

from marketplace_search.layout import ARCHIVE_MANIFEST
from marketplace_search.schema import AnswerError, check_answer as check_contract
from scripts import api
from scripts.api import DEFAULT_INFERENCE_URL, DEFAULT_MANAGEMENT_URL, ApiError, describe, register, set_default, \
    unregister


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


def archive_version(mar: Path) -> str:
    """modelVersion from a local .mar's MAR-INF/MANIFEST.json."""
    with zipfile.ZipFile(mar) as archive:
        return json.loads(archive.read(str(ARCHIVE_MANIFEST)))["model"]["modelVersion"]


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
    if answer["model"] != {"name": name, "version": version}:
        raise CanaryError(f"answer came from {answer['model']}, not {name} {version}")
    if not answer["neighbours"]:
        raise CanaryError("no neighbours: is the catalogue in the archive empty?")


def release(url: str, inference_url: str, mar: str, name: str, version: str, *, token: str | None = None,
            inference_token: str | None = None, initial_workers: int = 1, warm_queries: int = 3,
            photo: Path | None = None, timeout: float = 180) -> dict:
    """Register, wait READY, warm, canary, then set default; unregister the new version on failure.

    Returns the canary answer.
    """
    register(url, mar, name, initial_workers=initial_workers, synchronous=True, token=token)
    try:
        api.wait_ready(url, name, version, timeout, token)
        query = canary_photo(photo)
        for _ in range(warm_queries):
            api.predict(inference_url, query, model=name, version=version, token=inference_token)
        answer = api.predict(inference_url, query, model=name, version=version, token=inference_token)
        check_answer(answer, name, version)
    except (CanaryError, ApiError, requests.RequestException, ValueError) as error:
        unregister(url, name, version, token)
        raise CanaryError(f"{name} {version} failed its canary and was unregistered: {error}") from error
    set_default(url, name, version, token)
    return answer


def rollback(url: str, name: str, to: str | None = None, token: str | None = None) -> tuple[str, str]:
    """Make `to`, else the newest registered version older than the default, the default.

    Returns (old default, new default).
    """
    every, default = versions_of(url, name, token)
    registered = [d["modelVersion"] for d in every]
    if to is None:
        older = [v for v in registered if version_key(v) < version_key(default)]
        if not older:
            raise ReleaseError(f"{name}: no registered version older than the default {default} "
                              f"(registered: {', '.join(registered)})")
        to = older[-1]
    elif to not in registered:
        raise ReleaseError(f"{name} {to} is not registered (registered: {', '.join(registered)})")
    set_default(url, name, to, token)
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
    if path.is_file():
        return path.name, archive_version(path)
    return mar, None


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--url", default=DEFAULT_MANAGEMENT_URL, help="management API address")
    parser.add_argument("--inference-url", default=DEFAULT_INFERENCE_URL, help="inference API address (canary)")
    parser.add_argument("--key-file", type=Path,
                        help="the server's key_file.json (tokens on): its management key for the management API, "
                             "its inference key for the canary")
    parser.add_argument("--token", help="management key (default: --key-file's, else $TS_TOKEN)")
    parser.add_argument("--inference-token", help="inference key for the canary (default: --key-file's, else "
                                                  "$TS_INFERENCE_TOKEN)")
    commands = parser.add_subparsers(dest="command", required=True)
    listing = commands.add_parser("list", help="every registered version, the default marked")
    listing.add_argument("name")
    releasing = commands.add_parser("release", help="register, canary, then make default")
    releasing.add_argument("--mar", required=True, help="archive in the server's model store (path or file name) or URL")
    releasing.add_argument("--name", required=True)
    releasing.add_argument("--version", help="the archive's version (read from a local .mar when omitted)")
    releasing.add_argument("--initial-workers", type=int, default=1)
    releasing.add_argument("--warm", type=int, default=3, help="warm-up queries before the canary")
    releasing.add_argument("--photo", type=Path, help="canary photo (default: a generated one)")
    releasing.add_argument("--timeout", type=float, default=180, help="seconds to wait for READY")
    rolling = commands.add_parser("rollback", help="make the previous version the default")
    rolling.add_argument("name")
    rolling.add_argument("--to", help="this version instead of the next older one")
    retiring = commands.add_parser("retire", help="unregister a version that is not the default")
    retiring.add_argument("name")
    retiring.add_argument("version")
    args = parser.parse_args(argv)
    token = api.resolve_token("management", args.token, args.key_file)
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
            inference_token = (args.inference_token
                               or (api.resolve_token("inference", key_file=args.key_file) if args.key_file
                                   else os.environ.get("TS_INFERENCE_TOKEN")))
            answer = release(args.url, args.inference_url, mar, args.name, version, token=token,
                             inference_token=inference_token, initial_workers=args.initial_workers,
                             warm_queries=args.warm, photo=args.photo, timeout=args.timeout)
            print(f"{args.name} {version} is now the default (canary: {answer['category']}, "
                  f"{len(answer['neighbours'])} neighbours)")
        elif args.command == "rollback":
            old, new = rollback(args.url, args.name, args.to, token)
            print(f"{args.name}: default {old} -> {new}")
        else:
            retire(args.url, args.name, args.version, token)
            print(f"{args.name} {args.version} unregistered")
    except (ReleaseError, ApiError) as error:
        print(f"error: {error}", file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    main()
