"""Scale-out of the local fleet (scripts/fleet.py), through its one address: photos/s of 1 replica and of 2, each
limited to CPUS cores, at CLIENTS clients; and what the entry point adds to a lone request's p50 (one replica's
TorchServe asked directly and through the one address, in turns). Both in one run, on the store's released model.

  python -m scripts.benchmark.fleet --store model_store --photos DIR [--clients 32] [--seconds 30]
"""
import argparse
import tempfile
import time
from pathlib import Path

from scripts import api, fleet as fleet_tools
from scripts.benchmark.__main__ import describe_machine, markdown_table
from scripts.benchmark.common import generate_photos, interruptible, percentiles_ms, read_photos
from scripts.benchmark.served import load_test

NAME = fleet_tools.NAME
COLUMNS = [("replicas", "replicas"), ("cpus", "CPUs each"), ("concurrency", "clients"), ("requests", "requests"),
           ("errors", "errors"), ("photos_per_s", "photos/s"), ("p50_ms", "p50 ms"), ("p95_ms", "p95 ms"),
           ("scale", "× 1 replica")]
LONE_COLUMNS = [("path", "a lone request"), ("p50_ms", "p50 ms"), ("p95_ms", "p95 ms"), ("added_ms", "added p50 ms")]


def lone_requests(fleet, photos: list[bytes], count: int) -> list[dict]:
    """COUNT requests one at a time, in turns: replica 0's TorchServe directly (no key: loopback, the fleet's
    config), then the same photo through the one address (two nginx hops and the key check)."""
    replica = fleet.replicas[0]
    paths = {"TorchServe directly": (f"http://127.0.0.1:{replica.ports['inference']}", None),
             "through the entry point": (fleet.address, fleet.keys()["inference"])}
    seconds: dict[str, list[float]] = {path: [] for path in paths}
    for number in range(count):
        photo = photos[number % len(photos)]
        for path, (address, token) in paths.items():
            started = time.perf_counter()
            api.predict(address, photo, token=token, retries=0)
            seconds[path].append(time.perf_counter() - started)
    rows = [{"path": path, **percentiles_ms(times)} for path, times in seconds.items()]
    rows[1]["added_ms"] = rows[1]["p50_ms"] - rows[0]["p50_ms"]
    return rows


def bench_fleet(args) -> tuple[list[dict], list[dict]]:
    photos = read_photos(args.photos, 32) if args.photos else generate_photos(32)
    rows, lone = [], []
    for replicas in (1, 2):
        fleet = fleet_tools.up(args.workdir, args.store, replicas, args.cpus, None, port=0, image=args.image)
        token = fleet.keys()["inference"]
        url = f"{fleet.address}/predictions/{NAME}"
        load_test(url, photos, args.clients, args.clients * 4, token=token)  # warm-up: every worker, every batch
        if replicas == 1:
            lone = lone_requests(fleet, photos, args.lone)
        row = load_test(url, photos, args.clients, 10**9, max_seconds=args.seconds, token=token)
        rows.append({"replicas": replicas, "cpus": args.cpus, **row})
        rows[-1]["scale"] = rows[-1]["photos_per_s"] / rows[0]["photos_per_s"]
        print(rows[-1], flush=True)
    fleet_tools.down(args.workdir)
    return rows, lone


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(prog="python -m scripts.benchmark.fleet", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--store", type=Path, required=True, help="the model store (its released default is served)")
    parser.add_argument("--photos", type=Path, help="a folder of photos to send (default: generated ones)")
    parser.add_argument("--clients", type=int, default=32)
    parser.add_argument("--seconds", type=float, default=30, help="each load's length after its warm-up")
    parser.add_argument("--cpus", type=float, default=1.0, help="each replica's CPU limit")
    parser.add_argument("--lone", type=int, default=100, help="lone requests on each path")
    parser.add_argument("--image", default=fleet_tools.IMAGE)
    parser.add_argument("--workdir", type=Path, default=Path(tempfile.gettempdir()) / "fleet-bench")
    args = parser.parse_args(argv)
    print(describe_machine())
    with interruptible():
        try:
            rows, lone = bench_fleet(args)
        finally:
            if (args.workdir / "fleet.json").exists():
                fleet_tools.down(args.workdir)
    print(f"\nThroughput through the one address ({args.clients} clients, {args.seconds:g} s each):\n")
    print(markdown_table(rows, COLUMNS))
    print(f"\nA lone request ({args.lone} in turns on each path, 1 replica):\n")
    print(markdown_table(lone, LONE_COLUMNS))


if __name__ == "__main__":
    main()
