"""Stage 5 on Ray (training.embed --engine ray): Ray actors embed the catalogue into Parquet shards of
--shard-size photos, each written whole so that a re-run embeds only the missing ones, from which the stage's
usual files are assembled one shard at a time; `ray_cluster` serves scripts.ray_batch too."""
import json
import math
import os
import tempfile
from contextlib import contextmanager
from pathlib import Path

import numpy as np

from marketplace_search.files import replaced_atomically

SHARDS_DIR = "shards"
SHARD_PATTERN = "part-{:05d}.parquet"
RESERVED_CPUS = 0.5  # left to Ray Data's own tasks: an actor pool holding every CPU hangs the job


class Embedder:
    """One Ray actor: the checkpoint loaded once; batches of image ids in, vectors and probabilities out."""

    def __init__(self, checkpoint: str, photos_dir: str, threads: int, photos: int):
        import faiss  # noqa: F401  (before torch: both bring an OpenMP runtime, and this order is the safe one)
        import torch

        from marketplace_search.models import load_checkpoint
        from marketplace_search.presets import Preprocess, eval_transform
        from marketplace_search.memory import keep_freed_memory
        from marketplace_search.runtime import embedding_backend

        keep_freed_memory()
        torch.set_num_threads(threads)
        self.model, saved = load_checkpoint(Path(checkpoint))
        preprocess = Preprocess.from_dict(saved["preprocess"])
        self.backend = embedding_backend(self.model, preprocess.crop, photos)  # PHOTOS: the actor's share
        self.transform = eval_transform(preprocess)
        self.photos_dir = Path(photos_dir)

    def __call__(self, rows: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        import torch

        from training.data import read_photo

        images = torch.stack([self.transform(read_photo(self.photos_dir, image_id)) for image_id in rows["image_id"]])
        probabilities, vectors = self.backend.forward(images)
        return {"position": rows["position"], "image_id": rows["image_id"], "vector": vectors,
                "probabilities": probabilities}


@contextmanager
def ray_cluster(address: str | None, temp_dir: Path | None = None, num_cpus: int | None = None):
    """Ray joined at ADDRESS, else a local one (NUM_CPUS, default all; its files under TEMP_DIR) started and
    stopped here; a Ray already initialised (a test's, a notebook's) is used as it is and left running."""
    import ray

    if ray.is_initialized():
        yield ray
        return
    with short_path(temp_dir) as temp_dir:
        if address:
            ray.init(address=address, log_to_driver=False)
        else:
            # Ray nices its workers by default: on a machine shared with other jobs they get a fraction of their CPUs.
            os.environ.setdefault("RAY_worker_niceness", "0")
            ray.init(num_cpus=num_cpus or os.cpu_count(), include_dashboard=False, log_to_driver=False,
                     _temp_dir=temp_dir)
        try:
            yield ray
        finally:
            ray.shutdown()


@contextmanager
def short_path(folder: Path | None):
    """A short link to FOLDER (None for None): Ray's sockets live in it, and a socket path has at most 107 bytes."""
    if folder is None:
        yield None
        return
    Path(folder).mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="ray-") as links:
        link = Path(links) / "t"
        link.symlink_to(Path(folder).resolve(), target_is_directory=True)
        yield str(link)


def actor_blocks(actor: type, rows: list[dict], batch_size: int, actors: int, cpus: float, settings: dict):
    """Numpy blocks of the answers of ACTORS Ray actors of CPUS each (ACTOR(**SETTINGS)) to ROWS, in any order."""
    import ray.data

    ray.data.DataContext.get_current().enable_progress_bars = False  # the caller shows its own
    dataset = ray.data.from_items(rows, override_num_blocks=max(1, min(len(rows) // batch_size, 1000)))
    return dataset.map_batches(actor, batch_size=batch_size, concurrency=actors, num_cpus=cpus,
                               fn_constructor_kwargs=settings).iter_batches(batch_size=None, batch_format="numpy")


def write_shard(path: Path, image_ids: list[str], vectors: np.ndarray, probabilities: np.ndarray) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    table = pa.table({"image_id": pa.array(image_ids, pa.string()),
                      "vector": pa.FixedSizeListArray.from_arrays(pa.array(vectors.ravel(), pa.float32()),
                                                                  vectors.shape[1]),
                      "probabilities": pa.FixedSizeListArray.from_arrays(
                          pa.array(probabilities.ravel(), pa.float32()), probabilities.shape[1])})
    with replaced_atomically(path) as temporary:
        pq.write_table(table, temporary)


def read_shard(path: Path) -> tuple[list[str], np.ndarray, np.ndarray]:
    """(image ids, vectors (n, d), probabilities (n, classes)) of one shard."""
    import pyarrow.parquet as pq

    table = pq.read_table(path)

    def matrix(name):
        column = table[name].combine_chunks()
        return column.flatten().to_numpy().reshape(len(column), column.type.list_size)

    return table["image_id"].to_pylist(), matrix("vector"), matrix("probabilities")


def embed_shards(checkpoint: Path, image_ids: list[str], photos_dir: Path, shards_dir: Path, *,
                 shard_size: int = 10_000, actors: int = 1, batch_size: int = 32,
                 address: str | None = None) -> list[Path]:
    """Write every missing shard of IMAGE_IDS into SHARDS_DIR; returns all the shard paths, in order."""
    shards_dir.mkdir(parents=True, exist_ok=True)
    paths = [shards_dir / SHARD_PATTERN.format(shard) for shard in range(math.ceil(len(image_ids) / shard_size))]
    for shard, path in enumerate(paths):
        if path.exists() and read_shard(path)[0] != image_ids[shard * shard_size:(shard + 1) * shard_size]:
            raise ValueError(f"{path} holds other photos than shard {shard} of this split (--shard-size "
                             f"{shard_size}): the split changed since; delete {shards_dir} to embed again")
    positions = [p for p in range(len(image_ids)) if not paths[p // shard_size].exists()]
    if not positions:
        return paths
    with ray_cluster(address) as ray:
        cpus = max(0.25, (ray.cluster_resources().get("CPU", 1) - RESERVED_CPUS) / actors)
        rows = [{"position": p, "image_id": image_ids[p]} for p in positions]
        blocks = actor_blocks(Embedder, rows, batch_size, actors, cpus, {
            "checkpoint": str(checkpoint), "photos_dir": str(photos_dir), "threads": max(1, round(cpus)),
            "photos": len(positions) // actors})
        pending: dict[int, dict[int, tuple]] = {}
        for block in blocks:
            for position, vector, probability in zip(block["position"], block["vector"], block["probabilities"]):
                shard = int(position) // shard_size
                pending.setdefault(shard, {})[int(position)] = (vector, probability)
                size = min(shard_size, len(image_ids) - shard * shard_size)
                if len(pending[shard]) == size:
                    done = pending.pop(shard)
                    order = sorted(done)
                    write_shard(paths[shard], [image_ids[p] for p in order], np.stack([done[p][0] for p in order]),
                                np.stack([done[p][1] for p in order]))
    return paths


def assemble(paths: list[Path], out_dir: Path) -> tuple[list[str], int]:
    """Write training.embed's files from the shards, one shard in memory at a time: (image ids, dimension)."""
    import pyarrow.parquet as pq

    first = read_shard(paths[0])
    counts = [pq.ParquetFile(path).metadata.num_rows for path in paths]
    total, dimension, classes = sum(counts), first[1].shape[1], first[2].shape[1]
    vectors = np.lib.format.open_memmap(out_dir / "embeddings.npy", "w+", np.float32, (total, dimension))
    probabilities = np.lib.format.open_memmap(out_dir / "probabilities.npy", "w+", np.float32, (total, classes))
    image_ids, start = [], 0
    with open(out_dir / "image_embeddings.json", "w") as as_json:
        as_json.write("{")
        for path in paths:
            ids, shard_vectors, shard_probabilities = read_shard(path)
            vectors[start:start + len(ids)] = shard_vectors
            probabilities[start:start + len(ids)] = shard_probabilities
            for image_id, vector in zip(ids, shard_vectors):
                as_json.write(("" if start == 0 and image_id == ids[0] else ", ")
                              + json.dumps(image_id) + ": " + json.dumps([round(float(x), 7) for x in vector]))
            image_ids += ids
            start += len(ids)
        as_json.write("}")
    vectors.flush()
    probabilities.flush()
    (out_dir / "image_ids.json").write_text(json.dumps(image_ids))
    return image_ids, dimension
