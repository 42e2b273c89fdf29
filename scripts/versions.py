"""Release, roll back and retire versions of a served model through TorchServe's management API (the server runs
with --enable-model-api): a new default only once its canary answer keeps the contract and, where the store holds
an evaluation set, its accuracy holds (scripts.gate). With --replica, a fleet's replicas move together."""
import argparse
import io
import json
import sys
import time
import zipfile
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from packaging.version import InvalidVersion, Version
from PIL import Image

from marketplace_search.files import write_json_atomically
from marketplace_search.layout import ARCHIVE_MANIFEST
from marketplace_search.schema import AnswerError, check_answer as check_contract
from scripts import api, gate
from scripts.api import DEFAULT_INFERENCE_URL, DEFAULT_MANAGEMENT_URL, ApiError, describe, describe_known, register, \
    set_default, unregister


HISTORY_FILE = "releases.json"  # in the model store; its layout: read_history


class ReleaseError(RuntimeError):
    """A release, rollback or retirement that cannot be done as asked."""


class CanaryError(ReleaseError):
    """The new version did not answer its canary query with the contract's answer."""


@dataclass(frozen=True)
class Replica:
    """One server of a fleet: its management and inference targets (URLs, or a running scripts.serve Server)."""

    management: object
    inference: object

    def __str__(self) -> str:
        return str(getattr(self.inference, "inference_url", self.inference))


def entry_replica(address: str) -> Replica:
    """A replica behind the fleet's entry point (deploy/): inference at ADDRESS, management at ADDRESS/management."""
    return Replica(f"{address.rstrip('/')}/management", address.rstrip("/"))


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


def record_gate(history_file: Path | None, name: str, figures: dict) -> None:
    """Append a release's accuracy gate figures, passed or refused, to NAME's history."""
    if history_file is None:
        return
    history = read_history(history_file)
    model = history.setdefault(name, {"defaults": [], "archives": {}})
    model.setdefault("gates", []).append({"at": time.strftime("%Y-%m-%dT%H:%M:%S%z"), **figures})
    write_json_atomically(history_file, history)


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


def release(url, inference_url, mar: str, name: str, version: str, **options) -> dict:
    """release_fleet on one server: URL's management API, INFERENCE_URL's predictions."""
    return release_fleet([Replica(url, inference_url)], mar, name, version, **options)


def release_fleet(fleet: list[Replica], mar: str, name: str, version: str, *, token: str | None = None,
                  inference_token: str | None = None, initial_workers: int = 1, warm_queries: int = 3,
                  photo: Path | None = None, timeout: float = 180, history: Path | None = None,
                  evaluation: Path | None = None, margin: float = gate.MARGIN) -> dict:
    """Register the version on every replica, warm and canary it on each, gate its accuracy on EVALUATION (when
    given), then make it the default on each (in HISTORY too). Any failure unregisters it everywhere, and a
    set-default that fails on one replica puts the others back: the fleet never serves two defaults. Returns
    the first replica's canary answer."""
    described = {str(replica): describe_known(replica.management, name, None, token) for replica in fleet}
    defaults = {replica: found[0]["modelVersion"] if found else None for replica, found in described.items()}
    previous = defaults[str(fleet[0])]
    if len(set(defaults.values())) > 1:
        raise ReleaseError(f"the replicas serve different defaults of {name} ({defaults}): `sync` them first")
    registered = {} if previous is None else registered_archives(describe(fleet[0].management, name, "all", token))
    if version in registered:
        raise ReleaseError(f"{name} {version} is already registered: a version label names one archive for good; "
                           f"release a new version")
    placed = []
    try:
        placed, _, failure = on_every(fleet, lambda replica: register(
            replica.management, mar, name, initial_workers=initial_workers, synchronous=True, token=token))
        if failure is None:
            _, answers, failure = on_every(fleet, lambda replica: canary(
                replica, name, version, token, inference_token, warm_queries, photo, timeout))
        if failure is not None:
            raise failure
        if evaluation is not None:
            figures = gate.gate(fleet[0].inference, name, version, previous, evaluation, inference_token, margin)
            record_gate(history, name, figures)
            print(gate.describe(figures), flush=True)
    except Exception as error:  # a refusal, a crash, a malformed answer, a loss of accuracy: nowhere a default
        removed = withdraw(placed, name, version, token)
        if isinstance(error, gate.GateError):
            record_gate(history, name, error.figures)
            raise ReleaseError(f"{error}; {removed}") from error
        raise CanaryError(f"{name} {version} failed its canary: {type(error).__name__}: {error}; {removed}") from error
    switched = []
    try:
        for replica in fleet:
            set_default(replica.management, name, version, token)
            switched.append(replica)
    except ApiError as error:
        for replica in switched:
            set_default(replica.management, name, previous, token)
        withdraw(placed, name, version, token)
        raise ReleaseError(f"{name} {version}: set-default failed on {fleet[len(switched)]} ({error}); every "
                           f"replica is back on {previous}") from error
    record_default(history, name, version, {**registered, version: mar}, previous)
    return answers[0]


def on_every(fleet: list[Replica], call) -> tuple[list[Replica], list, BaseException | None]:
    """CALL(replica) on every replica at once (a worker loads in seconds): the replicas it succeeded on, their
    results, and the first failure (None if none)."""
    with ThreadPoolExecutor(max_workers=len(fleet)) as pool:
        futures = [pool.submit(call, replica) for replica in fleet]
    done = [(replica, future.result()) for replica, future in zip(fleet, futures) if future.exception() is None]
    failures = [future.exception() for future in futures if future.exception() is not None]
    return [replica for replica, _ in done], [result for _, result in done], (failures[0] if failures else None)


def withdraw(placed: list[Replica], name: str, version: str, token) -> str:
    """Unregister a refused candidate from every replica it reached; says where it stayed (never raises: the
    refusal is the error to report)."""
    _, _, failure = on_every(placed, lambda replica: unregister(replica.management, name, version, token)) \
        if placed else ([], [], None)
    if failure is None:
        return f"{version} was unregistered from {len(placed)} replica(s)"
    return f"unregistering {version} failed on a replica ({failure}): retire it there"


def canary(replica: Replica, name: str, version: str, token, inference_token, warm_queries: int, photo, timeout):
    """The version READY on REPLICA, warmed, and its answer to the canary photo checked."""
    api.wait_ready(replica.management, name, version, timeout, token)
    query = canary_photo(photo)
    for _ in range(warm_queries):
        api.predict(replica.inference, query, model=name, version=version, token=inference_token)
    answer = api.predict(replica.inference, query, model=name, version=version, token=inference_token)
    check_answer(answer, name, version)
    return answer


def rollback(url, name: str, to: str | None = None, token: str | None = None,
             history: Path | None = None) -> tuple[str, str]:
    """Make TO, else the previous default (without a history, the newest version older than the default), the
    default on URL (a management target, or a list of every replica's), registering it again where need be;
    returns (old default, new default)."""
    targets = url if isinstance(url, list) else [url]
    every, default = versions_of(targets[0], name, token)
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
    mar = registered.get(to) or model["archives"].get(to)
    if mar is None:
        raise ReleaseError(f"{name} {to} is not registered (registered: {', '.join(registered)}) and "
                           f"{HISTORY_FILE} names no archive for it")
    for target in targets:
        make_default(target, name, to, mar, token)
    record_default(history, name, to, {**registered, to: mar}, previous=default, rolled_back=to_previous)
    return default, to


def make_default(target, name: str, version: str, mar: str, token: str | None, timeout: float = 180) -> None:
    """VERSION the default of NAME on TARGET, registered from MAR first if TARGET does not have it."""
    if version not in {d["modelVersion"] for d in describe_known(target, name, "all", token)}:
        register(target, mar, name, initial_workers=1, synchronous=True, token=token)
        api.wait_ready(target, name, version, timeout, token=token)
    set_default(target, name, version, token)


def sync(target, name: str, store: Path, token: str | None = None, timeout: float = 300) -> str:
    """Make TARGET serve NAME's released default (STORE's releases.json), else the newest archive of NAME in STORE:
    what a replica does when it starts, so that a restarted one rejoins the fleet on the same version."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            api.list_models(target, token)
            break
        except (ApiError, OSError) as error:  # not answering yet (requests' errors are OSErrors)
            if time.monotonic() > deadline:
                raise ReleaseError(f"{target}: the management API did not answer within {timeout:.0f} s") from error
            time.sleep(1)
    released = released_default(Path(store) / HISTORY_FILE, name)
    if released and released["mar"]:
        version, mar = released["version"], released["mar"]
    else:
        archives = [(model["modelVersion"], path.name) for path in Path(store).glob("*.mar")
                    if (model := manifest_model(path))["modelName"] == name]
        if not archives:
            raise ReleaseError(f"{store} holds no archive of {name} and {HISTORY_FILE} releases none")
        version, mar = max(archives, key=lambda found: version_key(found[0]))
    make_default(target, name, version, mar, token, timeout)
    return version


def manifest_model(path: Path) -> dict:
    """The `model` section (modelName, modelVersion...) of the archive's MANIFEST.json."""
    with zipfile.ZipFile(path) as archive:
        return json.loads(archive.read(str(ARCHIVE_MANIFEST)))["model"]


def retire(url, name: str, version: str, token: str | None = None) -> None:
    """Unregister VERSION from URL (a management target, or a list of every replica's); never the default."""
    targets = url if isinstance(url, list) else [url]
    for target in targets:
        _, default = versions_of(target, name, token)
        if version == default:
            raise ReleaseError(f"{name} {version} is the default version: release or roll back to another first")
    for target in targets:
        unregister(target, name, version, token)


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
    return path.name, manifest_model(path)["modelVersion"]


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--url", default=DEFAULT_MANAGEMENT_URL, help="management API address")
    parser.add_argument("--inference-url", default=DEFAULT_INFERENCE_URL, help="inference API address (canary)")
    parser.add_argument("--store", type=Path, default=Path("model_store"),
                        help=f"the server's model store: its {HISTORY_FILE} records the defaults in release order")
    parser.add_argument("--replica", action="append", metavar="ADDRESS",
                        help="a fleet replica's entry point (deploy/), once per replica: release, rollback and "
                             "retire move them all together (instead of --url and --inference-url)")
    api.add_key_arguments(parser, "management")
    commands = parser.add_subparsers(dest="command", required=True)
    listing = commands.add_parser("list", help="every registered version, the default marked")
    listing.add_argument("name")
    releasing = commands.add_parser("release", help="register, canary, then make default")
    releasing.add_argument("--mar", required=True, help="archive in the server's model store (path or file name) or URL")
    releasing.add_argument("--name", required=True)
    releasing.add_argument("--version", help="the archive's version (read from a local .mar when omitted)")
    releasing.add_argument("--timeout", type=float, default=180, help="seconds to wait for READY")
    releasing.add_argument("--evaluation", type=Path, help=f"the accuracy gate's set (default: STORE/"
                                                          f"{gate.EVALUATION_DIR} if it exists; scripts.gate makes it)")
    releasing.add_argument("--margin", type=float, default=gate.MARGIN,
                           help="refuse a candidate whose top-1 or P@5 is more than this below the default's")
    syncing = commands.add_parser("sync", help="serve the released default (a replica's start-up)")
    syncing.add_argument("name")
    rolling = commands.add_parser("rollback", help="make the previous version the default")
    rolling.add_argument("name")
    rolling.add_argument("--to", help="this version instead of the next older one")
    retiring = commands.add_parser("retire", help="unregister a version that is not the default")
    retiring.add_argument("name")
    retiring.add_argument("version")
    args = parser.parse_args(argv)
    token = api.resolve_token("management", args.token, args.key_file)
    history = args.store / HISTORY_FILE if args.store.is_dir() else None
    fleet = [entry_replica(address) for address in args.replica or []] or [Replica(args.url, args.inference_url)]
    managed = [replica.management for replica in fleet]
    try:
        if args.command == "list":
            for replica in fleet:
                print_versions(replica.management, args.name, token)
        elif args.command == "release":
            mar, archived = mar_reference(args.mar)
            version = args.version or archived
            if version is None:
                raise SystemExit("--version is required when --mar is not a local file")
            if archived and archived != version:
                raise SystemExit(f"{args.mar} holds version {archived}, not {version}")
            inference_token = api.resolve_token("inference", key_file=args.key_file, env="TS_INFERENCE_TOKEN")
            evaluation = args.evaluation or (args.store / gate.EVALUATION_DIR)
            if not (evaluation / gate.LABELS).is_file():
                if args.evaluation:
                    raise SystemExit(f"--evaluation {evaluation}: no {gate.LABELS} (python -m scripts.gate makes it)")
                print(f"no evaluation set in {evaluation}: accuracy not gated (python -m scripts.gate makes one)")
                evaluation = None
            answer = release_fleet(fleet, mar, args.name, version, token=token, inference_token=inference_token,
                                   timeout=args.timeout, history=history, evaluation=evaluation, margin=args.margin)
            print(f"{args.name} {version} is now the default (canary: {answer['category']}, "
                  f"{len(answer['neighbours'])} neighbours)")
        elif args.command == "rollback":
            old, new = rollback(managed, args.name, args.to, token, history)
            print(f"{args.name}: default {old} -> {new}" + (f" on {len(fleet)} replicas" if len(fleet) > 1 else ""))
        elif args.command == "sync":
            for target in managed:
                print(f"{args.name}: {target} serves {sync(target, args.name, args.store, token)}")
        else:
            retire(managed, args.name, args.version, token)
            print(f"{args.name} {args.version} unregistered")
    except (ReleaseError, ApiError) as error:
        print(f"error: {error}", file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    main()
