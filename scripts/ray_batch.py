"""scripts.batch --engine ray: the archive's handler in a pool of Ray actors, via Ray Data; each actor reads its
photos within the other engines' limits. With --address, photos, archive and OUTPUT must be on shared storage.
--format parquet writes shards part-NNNNN.parquet of --shard-size inputs, each whole; a re-run skips those there."""
import json
import math
import sys
import time
from pathlib import Path

import numpy as np

from marketplace_search.files import TEMPORARY_SUFFIX, replaced_atomically
from scripts.records import FatalError, Item, Tally, load_handler, local_answers, model_folder, write_answers
from training.ray_embed import RESERVED_CPUS, SHARD_PATTERN, actor_blocks, ray_cluster

PARQUET_COLUMNS = ("image_id", "path", "status", "code", "error", "category", "probability", "top_categories",
                   "neighbours", "model", "catalogue", "inputs")
NESTED_COLUMNS = ("top_categories", "neighbours", "model", "catalogue", "inputs")  # stored as JSON text


class Answerer:
    """One Ray actor: the archive's handler loaded once, answering batches of photos."""

    def __init__(self, model_dir: str, version: str | None, k: int, batch_size: int, max_file_bytes: int, threads: int):
        import faiss  # noqa: F401  (before torch: both bring an OpenMP runtime, and this order is the safe one)
        import torch

        self.handler = load_handler(Path(model_dir), version, batch_size)
        torch.set_num_threads(threads)  # the CPUs Ray gave this actor, not the model config's share
        self.k, self.max_file_bytes = k, max_file_bytes

    def __call__(self, rows: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        items = [Item(str(image_id), str(path), str(root), str(title) or None, str(description) or None)
                 for image_id, path, root, title, description in zip(rows["image_id"], rows["path"], rows["root"],
                                                                      rows["title"], rows["description"])]
        records = local_answers(self.handler, items, self.k, len(items), self.max_file_bytes)
        return {"position": rows["position"],
                "record": np.array([json.dumps(record, ensure_ascii=False) for record in records], dtype=object)}


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
    cluster_cpus = ray.cluster_resources().get("CPU", 0)
    cpus, threads = actor_cpus(cluster_cpus, args.actors, args.cpus_per_actor)
    print(f"ray: {args.actors} actor(s) x {cpus:g} CPU ({threads} torch thread(s)) of {cluster_cpus:g} CPUs",
          file=sys.stderr)
    rows = [{"position": position, "image_id": item.image_id, "path": item.path, "root": item.root,
             "title": item.title or "", "description": item.description or ""}  # a CSV's words travel too
            for position, item in zip(positions, todo)]
    for block in actor_blocks(Answerer, rows, args.batch_size, args.actors, cpus, {
            "model_dir": str(model_dir), "version": args.version, "k": args.k, "batch_size": args.batch_size,
            "max_file_bytes": args.max_file_bytes, "threads": threads}):
        if clock is not None:
            clock.block(len(block["position"]))
        for position, record in zip(block["position"], block["record"]):
            yield int(position), json.loads(record)


class SteadyClock:
    """A run's seconds at the rate of the answers after the first, model loading left out as --engine local does."""

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
        write_answers((record for _, record in answers), args.output, tally, len(todo))
    return clock.seconds()


def finished_shards(output: Path, items: list[Item], shard_size: int) -> set[int]:
    """The shards already in OUTPUT; refuses a shard whose inputs are not the ones it would hold now."""
    import pyarrow.parquet as pq

    done = set()
    for shard in range(math.ceil(len(items) / shard_size)):
        path = output / SHARD_PATTERN.format(shard)
        if not path.exists():
            continue
        table = pq.read_table(path, columns=["image_id", "path"])
        found = list(zip(table["image_id"].to_pylist(), table["path"].to_pylist()))
        expected = [item.key for item in items[shard * shard_size:(shard + 1) * shard_size]]
        if found != expected:
            raise FatalError(f"{path} holds other inputs than shard {shard} of this input list (of --shard-size "
                             f"{shard_size}): the input or --shard-size changed since; use a new --output folder")
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


def run_parquet(args, items: list[Item], tally: Tally) -> float:
    """--format parquet: answer the inputs of the shards not yet in args.output; the seconds spent answering."""
    output = args.output
    output.mkdir(parents=True, exist_ok=True)
    for stale in output.glob(f".part-*{TEMPORARY_SUFFIX}"):  # a shard being written when a run was killed
        stale.unlink()
    size = args.shard_size
    done = finished_shards(output, items, size)
    positions = [position for position in range(len(items)) if position // size not in done]
    tally.skipped = len(items) - len(positions)
    if not positions:
        return 0.0
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
                    write_shard(output / SHARD_PATTERN.format(shard), [records[p] for p in sorted(records)])
                yield record

        write_answers(answers(), None, tally, len(todo))
    return clock.seconds()
