"""scripts.batch --engine ray: the archive's handler in a pool of Ray actors, via Ray Data.

  python -m scripts.batch photos/ --output results.jsonl --engine ray --archive model_store/marketplace-v1.0.mar
  python -m scripts.batch listings.csv --output results/ --format parquet --engine ray --archive ... \\
      --address auto --actors 16                     # join a running cluster instead of starting one

Each actor loads the archive once (handlers.local, as --engine local does) and answers batches of
--batch-size photos, reading each photo itself within the same limits as the other engines
(scripts.records.read_input): an unreadable, refused or undecodable file is an error line, never a
failed task. Without --address a local Ray starts on this machine (every core, no dashboard,
--ray-temp-dir) and stops at the end; with one, the run joins that cluster and photos, archive and
OUTPUT must be paths every node reads alike (shared storage): a .mar is then unzipped beside OUTPUT,
where every node finds it, instead of into this machine's temporary folder.

Output and resuming: JSON Lines as the other engines write them (a re-run skips every input with
a line), or with --format parquet a folder of shards part-NNNNN.parquet of --shard-size inputs
each (in input order), each written whole when its last answer arrives: a re-run skips the shards
that exist. Either way a run killed at any point and resumed ends with exactly one result per input.

Ray is imported only here: the core package and the other engines never load it.
"""
import json
import math
import os
import sys
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path

import numpy as np

from marketplace_search.files import TEMPORARY_SUFFIX, replaced_atomically
from scripts.records import (FatalError, Item, Tally, answer_local_batch, format_summary, load_handler, model_folder,
                             summarise, timed_write, write_answers)

SHARD_PATTERN = "part-{:05d}.parquet"
# A Ray actor pool that takes every CPU starves Ray Data's own tasks and the job hangs without an
# error (/work/shared/RAY_NOTES.md): actors share what is left after this many CPUs.
RESERVED_CPUS = 0.5
# Ray puts SESSION_NAME/sockets/plasma_store (about 64 bytes) under its temp dir.
MAX_TEMP_DIR_CHARS = 40
PARQUET_COLUMNS = ("image_id", "path", "status", "code", "error", "category", "probability", "top_categories",
                   "neighbours", "model", "catalogue", "inputs")
NESTED_COLUMNS = ("top_categories", "neighbours", "model", "catalogue", "inputs")  # stored as JSON text


class Answerer:
    """One Ray actor: the archive's handler loaded once, answering batches of photos."""

    def __init__(self, model_dir: str, version: str | None, k: int, batch_size: int, max_file_bytes: int,
                 threads: int):
        import faiss  # noqa: F401  (before torch: both bring an OpenMP runtime, and this order is the safe one)
        import torch

        self.handler = load_handler(Path(model_dir), version, batch_size)
        torch.set_num_threads(threads)  # the CPUs Ray gave this actor, not the model config's share
        self.k, self.max_file_bytes = k, max_file_bytes

    def __call__(self, rows: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        from handlers.local import predict_local

        items = [Item(str(image_id), str(path), str(root), str(title) or None, str(description) or None)
                 for image_id, path, root, title, description in zip(rows["image_id"], rows["path"], rows["root"],
                                                                      rows["title"], rows["description"])]
        records = answer_local_batch(self.handler, items, self.k, predict_local, self.max_file_bytes)
        return {"position": rows["position"],
                "record": np.array([json.dumps(record, ensure_ascii=False) for record in records], dtype=object)}


@contextmanager
def ray_cluster(address: str | None, temp_dir: Path | None = None, num_cpus: int | None = None):
    """Ray for this run: joined at ADDRESS, else a local one started (and stopped) here.

    An already initialised Ray (a test's, a notebook's) is used as it is and left running.
    """
    import ray

    if ray.is_initialized():
        yield ray
        return
    with short_path(temp_dir) as temp_dir:
        if address:
            ray.init(address=address, log_to_driver=False)
        else:
            # Ray nices its workers by default: on a machine shared with other jobs the actors then get
            # a fraction of their CPUs; Ray's own job API starts them at 0 too.
            os.environ.setdefault("RAY_worker_niceness", "0")
            ray.init(num_cpus=num_cpus or os.cpu_count(), include_dashboard=False, log_to_driver=False,
                     _temp_dir=temp_dir)
        try:
            yield ray
        finally:
            ray.shutdown()


@contextmanager
def short_path(folder: Path | None):
    """FOLDER, or a short link to it: Ray's sockets live in it and a socket path has at most 107 bytes."""
    if folder is None:
        yield None
        return
    folder = Path(folder).resolve()
    folder.mkdir(parents=True, exist_ok=True)
    if len(str(folder)) <= MAX_TEMP_DIR_CHARS:
        yield str(folder)
        return
    with tempfile.TemporaryDirectory(prefix="ray-") as links:
        link = Path(links) / "t"
        link.symlink_to(folder, target_is_directory=True)
        yield str(link)


def shared_parent(args) -> Path | None:
    """Where a .mar is unzipped: beside OUTPUT on a cluster (shared storage), else a local temporary folder."""
    if not args.address:
        return None
    return args.output if args.format == "parquet" else args.output.parent


def actor_cpus(cluster_cpus: float, actors: int, asked: float | None) -> tuple[float, int]:
    """(CPUs per actor, torch threads per actor): ASKED, else an equal share of all but RESERVED_CPUS."""
    cpus = asked if asked else max(0.25, (cluster_cpus - RESERVED_CPUS) / actors)
    if cpus * actors > cluster_cpus - RESERVED_CPUS + 1e-9:
        raise FatalError(f"{actors} actors x {cpus} CPUs leave less than {RESERVED_CPUS} of the cluster's "
                               f"{cluster_cpus:g} CPUs for Ray Data's own tasks: the job would hang; "
                               f"use fewer --actors or a smaller --cpus-per-actor")
    return cpus, max(1, round(cpus))


def ray_answers(ray, todo: list[Item], positions: list[int], model_dir: Path, args, clock=None):
    """Yield `(position, record)` for every item of TODO as the actors answer them (any order)."""
    import ray.data

    context = ray.data.DataContext.get_current()
    context.enable_progress_bars = False  # scripts.batch shows its own
    cluster_cpus = ray.cluster_resources().get("CPU", 0)
    cpus, threads = actor_cpus(cluster_cpus, args.actors, args.cpus_per_actor)
    print(f"ray: {args.actors} actor(s) x {cpus:g} CPU ({threads} torch thread(s)) of {cluster_cpus:g} CPUs",
          file=sys.stderr)
    rows = [{"position": position, "image_id": item.image_id, "path": item.path, "root": item.root,
             "title": item.title or "", "description": item.description or ""}  # a CSV's words travel too
            for position, item in zip(positions, todo)]
    dataset = ray.data.from_items(rows, override_num_blocks=max(1, min(len(rows) // args.batch_size, 1000)))
    answered = dataset.map_batches(
        Answerer, batch_size=args.batch_size, concurrency=args.actors, num_cpus=cpus,
        fn_constructor_kwargs={"model_dir": str(model_dir), "version": args.version, "k": args.k,
                               "batch_size": args.batch_size, "max_file_bytes": args.max_file_bytes,
                               "threads": threads})
    for block in answered.iter_batches(batch_size=None, batch_format="numpy"):
        if clock is not None:
            clock.block(len(block["position"]))
        for position, record in zip(block["position"], block["record"]):
            yield int(position), json.loads(record)


class SteadyClock:
    """The seconds of a run at its steady rate, as --engine local counts them (model loading excluded).

    Ray starts the actors and loads the archive inside the run: the clock starts at the first answer,
    and the rate of the answers after it stands for the whole run.
    """

    def __init__(self):
        self.first_at, self.first_count, self.count = None, 0, 0

    def block(self, size: int) -> None:
        if self.first_at is None:
            self.first_at, self.first_count = time.perf_counter(), size
        self.count += size

    def seconds(self) -> float:
        if self.first_at is None:
            return 0.0
        elapsed = time.perf_counter() - self.first_at
        after = self.count - self.first_count
        return elapsed * self.count / after if after > 0 else elapsed


def run_ray(args, todo: list[Item], tally: Tally) -> float:
    """--engine ray, JSON Lines: answer TODO into args.output; the seconds spent answering."""
    clock = SteadyClock()
    with model_folder(args.archive, shared_parent(args)) as model_dir, \
            ray_cluster(args.address, args.ray_temp_dir, args.ray_cpus) as ray:
        answers = ray_answers(ray, todo, list(range(len(todo))), model_dir, args, clock)
        timed_write((record for _, record in answers), args.output, tally, len(todo))
    return clock.seconds()


# --- Parquet shards -----------------------------------------------------------------------------------

def shard_path(output: Path, shard: int) -> Path:
    return output / SHARD_PATTERN.format(shard)


def finished_shards(output: Path, items: list[Item], shard_size: int) -> set[int]:
    """The shards already in OUTPUT; refuses a shard whose inputs are not the ones it would hold now."""
    import pyarrow.parquet as pq

    done = set()
    for shard in range(math.ceil(len(items) / shard_size)):
        path = shard_path(output, shard)
        if not path.exists():
            continue
        table = pq.read_table(path, columns=["image_id", "path"])
        found = list(zip(table["image_id"].to_pylist(), table["path"].to_pylist()))
        expected = [item.key for item in items[shard * shard_size:(shard + 1) * shard_size]]
        if found != expected:
            raise FatalError(f"{path} holds other inputs than shard {shard} of this input list (of "
                                   f"--shard-size {shard_size}): the input or --shard-size changed since it "
                                   f"was written; use a new --output folder")
        done.add(shard)
    return done


def parquet_row(record: dict) -> dict:
    """One record as a row: scalars as they are, code as text, nested answers as JSON text."""
    row = {name: record.get(name) for name in PARQUET_COLUMNS}
    row["code"] = None if row["code"] is None else str(row["code"])
    for name in NESTED_COLUMNS:
        row[name] = None if row[name] is None else json.dumps(row[name], ensure_ascii=False)
    return row


def write_shard(path: Path, records: list[dict]) -> None:
    """Write a whole shard under a temporary name, then rename it: a shard exists only complete."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    schema = pa.schema([(name, pa.float64() if name == "probability" else pa.string()) for name in PARQUET_COLUMNS])
    table = pa.Table.from_pylist([parquet_row(record) for record in records], schema=schema)
    with replaced_atomically(path) as temporary:
        pq.write_table(table, temporary)


def read_shards(output: Path) -> list[dict]:
    """Every record of a Parquet OUTPUT folder, shard by shard, nested answers decoded."""
    import pyarrow.parquet as pq

    records = []
    for path in sorted(output.glob("part-*.parquet")):
        for row in pq.read_table(path).to_pylist():
            record = {name: value for name, value in row.items() if value is not None}
            for name in NESTED_COLUMNS:
                if name in record:
                    record[name] = json.loads(record[name])
            if record.get("status") == "error" and str(record["code"]).isdigit():
                record["code"] = int(record["code"])
            records.append(record)
    return records


class ShardsOnly:
    """The writer of --format parquet's progress loop: the records go to shards, not to a lines file."""

    def write(self, record: dict) -> None:
        pass


def run_parquet(args, items: list[Item]) -> dict:
    """--format parquet: answer the inputs of the shards not yet in args.output; the run's summary."""
    output = args.output
    output.mkdir(parents=True, exist_ok=True)
    for stale in output.glob(f".part-*{TEMPORARY_SUFFIX}"):  # a shard being written when a run was killed
        stale.unlink()
    size = args.shard_size
    done = finished_shards(output, items, size)
    positions = [position for position in range(len(items)) if position // size not in done]
    tally = Tally(skipped=len(items) - len(positions))
    seconds = 0.0
    if positions:
        todo = [items[position] for position in positions]
        pending: dict[int, dict[int, dict]] = {}
        clock = SteadyClock()
        expected = {shard: min(size, len(items) - shard * size) for shard in {p // size for p in positions}}
        with model_folder(args.archive, shared_parent(args)) as model_dir, \
                ray_cluster(args.address, args.ray_temp_dir, args.ray_cpus) as ray:
            def answers():
                for position, record in ray_answers(ray, todo, positions, model_dir, args, clock):
                    shard = position // size
                    pending.setdefault(shard, {})[position] = record
                    if len(pending[shard]) == expected[shard]:
                        records = pending.pop(shard)
                        write_shard(shard_path(output, shard), [records[p] for p in sorted(records)])
                    yield record

            write_answers(answers(), ShardsOnly(), tally, len(todo))
            seconds = clock.seconds()
    summary = summarise(tally, len(items), seconds)
    print(format_summary(summary, output))
    return summary

