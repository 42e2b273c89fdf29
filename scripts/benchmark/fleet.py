"""Scale-out of the local fleet (scripts/fleet.py), through its one address: photos/s of 1 replica and of 2, each
limited to CPUS cores, at CLIENTS clients; and what the entry point adds to a lone request's p50 (one replica's
TorchServe asked directly and through the one address, in turns). Both in one run, on the store's released model.
The load comes from Debian's `wrk` when installed (else the benchmark's Python threads: on a machine whose every
core the replicas hold, the clients' own CPU is taken from them, and wrk's is a fraction of theirs).

  python -m scripts.benchmark.fleet --store model_store --photos DIR [--clients 32] [--seconds 20] [--rounds 3]
"""
import argparse
import json
import os
import shutil
import statistics
import subprocess
import tempfile
import time
from pathlib import Path

from scripts import api, fleet as fleet_tools
from scripts.benchmark.__main__ import describe_machine, markdown_table
from scripts.benchmark.common import generate_photos, interruptible, percentiles_ms, read_photos
from scripts.benchmark.served import load_test

NAME = fleet_tools.NAME
WRK = shutil.which("wrk")
WRK_SCRIPT = """
bodies = {}
for path in string.gmatch(os.getenv("WRK_PHOTOS"), "[^:]+") do
  local file = assert(io.open(path, "rb")); bodies[#bodies + 1] = file:read("*a"); file:close()
end
headers = {["Content-Type"] = "image/jpeg", ["Authorization"] = "Bearer " .. os.getenv("WRK_KEY")}
sent = 0
request = function()
  sent = sent + 1
  return wrk.format("POST", nil, headers, bodies[sent % #bodies + 1])
end
done = function(summary, latency, requests)
  local errors = summary.errors
  io.write(string.format('RESULT {"requests": %d, "errors": %d, "seconds": %f, "p50_ms": %f, "p95_ms": %f, '
    .. '"p99_ms": %f}\\n', summary.requests, errors.connect + errors.read + errors.write + errors.status
    + errors.timeout, summary.duration / 1e6, latency:percentile(50) / 1e3, latency:percentile(95) / 1e3,
    latency:percentile(99) / 1e3))
end
"""
COLUMNS = [("round", "round"), ("client", "client"), ("replicas", "replicas serving"), ("cpus", "CPUs each"),
           ("concurrency", "clients"), ("requests", "requests"), ("errors", "errors"), ("photos_per_s", "photos/s"), ("p50_ms", "p50 ms"), ("p95_ms", "p95 ms"),
           ("replica_cpus", "CPUs the replicas used"), ("per_cpu", "photos per CPU-second"),
           ("scale", "× 1 replica (same round)")]
LONE_COLUMNS = [("path", "a lone request"), ("p50_ms", "p50 ms"), ("p95_ms", "p95 ms"), ("added_ms", "added p50 ms")]


def lone_requests(fleet, photos: list[bytes], count: int) -> list[dict]:
    """COUNT requests one at a time, in turns: replica 0's TorchServe directly (no key: loopback, the fleet's
    config), then the same photo through the one address (nginx: the key check and the proxy)."""
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


def wrk_files(photos: list[bytes], folder: Path) -> tuple[Path, list[Path]]:
    """wrk's script and the photos it sends, written once into FOLDER."""
    paths = [folder / f"photo-{number}.jpg" for number in range(len(photos))]
    for path, photo in zip(paths, photos):
        path.write_bytes(photo)
    (folder / "post-photos.lua").write_text(WRK_SCRIPT)
    return folder / "post-photos.lua", paths


def wrk_load(url: str, files: tuple[Path, list[Path]], clients: int, seconds: float, token: str) -> dict:
    """CLIENTS connections from one wrk thread for SECONDS, the photos (wrk_files) in turn."""
    script, paths = files
    done = subprocess.run([WRK, "-t1", f"-c{clients}", f"-d{seconds:g}s", "--timeout", "120s", "-s", str(script), url],
                          capture_output=True, text=True, check=True,
                          env={**os.environ, "WRK_PHOTOS": ":".join(map(str, paths)), "WRK_KEY": token})
    result = json.loads(done.stdout.split("RESULT ", 1)[1])
    return {"concurrency": clients, "requests": result["requests"], "errors": result["errors"],
            "photos_per_s": (result["requests"] - result["errors"]) / result["seconds"],
            **{key: result[key] for key in ("p50_ms", "p95_ms", "p99_ms")}}


def bench_fleet(args) -> tuple[list[dict], list[dict]]:
    """Two replicas started once; replica 1 drained out of the one address for the 1-replica loads, which
    alternate with 2-replica loads ROUNDS times, so that a slow minute of the machine costs both sides alike."""
    photos = read_photos(args.photos, 32) if args.photos else generate_photos(32)
    fleet = fleet_tools.up(args.workdir, args.store, 2, args.cpus, None, port=0, image=args.image)
    token = fleet.keys()["inference"]
    url = f"{fleet.address}/predictions/{NAME}"
    load_test(url, photos, args.clients, args.clients * 4, token=token)  # warm-up: both workers, full batches
    fleet_tools.drain(fleet, {1})
    lone = lone_requests(fleet, photos, args.lone)
    if args.client == "wrk":
        files = wrk_files(photos, args.workdir)
        load = lambda: wrk_load(url, files, args.clients, args.seconds, token)  # noqa: E731
    else:
        load = lambda: load_test(url, photos, args.clients, 10**9, max_seconds=args.seconds, token=token)  # noqa: E731
    rows = []
    for number in range(1, args.rounds + 1):
        for replicas in (1, 2):
            fleet_tools.drain(fleet, {1} if replicas == 1 else set())
            before, started = [fleet_tools.cpu_seconds(r.container) for r in fleet.replicas], time.perf_counter()
            rows.append({"round": number, "client": args.client, "replicas": replicas, "cpus": args.cpus, **load()})
            after, seconds = [fleet_tools.cpu_seconds(r.container) for r in fleet.replicas], time.perf_counter() - started
            if None not in before + after:  # the CPU the replicas got, of the cores the limit allowed them
                rows[-1]["replica_cpus"] = (sum(after) - sum(before)) / seconds
                rows[-1]["per_cpu"] = rows[-1]["photos_per_s"] / rows[-1]["replica_cpus"]
            print(rows[-1], flush=True)
            if replicas == 2:
                rows[-1]["scale"] = rows[-1]["photos_per_s"] / rows[-2]["photos_per_s"]
    median = {replicas: statistics.median(row["photos_per_s"] for row in rows if row["replicas"] == replicas)
              for replicas in (1, 2)}
    rows.append({"round": "median", "client": args.client, "replicas": 2, "cpus": args.cpus,
                 "photos_per_s": median[2], "scale": median[2] / median[1]})
    return rows, lone


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(prog="python -m scripts.benchmark.fleet", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--store", type=Path, required=True, help="the model store (its released default is served)")
    parser.add_argument("--photos", type=Path, help="a folder of photos to send (default: generated ones)")
    parser.add_argument("--clients", type=int, default=32)
    parser.add_argument("--seconds", type=float, default=20, help="each load's length")
    parser.add_argument("--rounds", type=int, default=3, help="1-replica and 2-replica loads in turns")
    parser.add_argument("--client", choices=("wrk", "python"), default="wrk" if WRK else "python",
                        help="the load's clients: wrk (Debian's, when installed) or the benchmark's Python threads")
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
    print(f"\nThroughput through the one address ({args.clients} clients, {args.seconds:g} s each; replica 1 "
          f"drained for the 1-replica loads):\n")
    print(markdown_table(rows, COLUMNS))
    print(f"\nA lone request ({args.lone} in turns on each path, 1 replica):\n")
    print(markdown_table(lone, LONE_COLUMNS))


if __name__ == "__main__":
    main()
