"""training.embed --engine ray on a real local Ray (2 CPUs, no dashboard): the same vectors as the
local stage, Parquet shards resumed shard by shard, and the index stage reading them memory-mapped."""
import faiss  # noqa: F401  (before torch: both bring an OpenMP runtime, and this order is the safe one)

import json

import numpy as np
import pandas as pd
import pytest

from scripts.ray_batch import short_path
from training import embed
from training.data import load_embeddings
from training.ray_embed import SHARDS_DIR, read_shard
from training.tiny_run import make_tiny_run


@pytest.fixture(scope="module")
def work(module_tmp):
    work = module_tmp("rayembed")
    run = make_tiny_run(work / "model_evaluation" / "2025-01-31_142233", photos_dir=work / "photos", listings=7)
    image_ids = sorted(run.photos)
    pd.DataFrame({"image_id": image_ids, "product_id": [run.listings[i]["product_id"] for i in image_ids],
                  "label": [run.classes.index(run.listings[i]["category"]) for i in image_ids],
                  "split": "train"}).to_csv(work / "split.csv", index=False)
    return work, run.run_dir


@pytest.fixture(scope="module")
def ray_local(module_tmp):
    import ray

    with short_path(module_tmp("ray")) as temp_dir:
        ray.init(num_cpus=2, include_dashboard=False, _temp_dir=temp_dir, log_to_driver=False)
        try:
            yield ray
        finally:
            ray.shutdown()


def test_ray_embed_stage_equals_local_and_resumes_by_shard(work, ray_local):
    work, run_dir = work
    folder = run_dir / "embeddings"
    embed.main(["--work", str(work), "--run", str(run_dir), "--workers", "0", "--batch-size", "4"])
    local_ids, local_vectors, local_probabilities, _ = load_embeddings(run_dir)
    local_json = json.loads((folder / "image_embeddings.json").read_text())
    local_vectors, local_probabilities = np.array(local_vectors), np.array(local_probabilities)

    options = ["--work", str(work), "--run", str(run_dir), "--engine", "ray", "--actors", "2", "--shard-size", "5",
               "--batch-size", "3"]
    embed.main(options)
    shards = sorted((folder / SHARDS_DIR).glob("part-*.parquet"))
    assert [path.name for path in shards] == ["part-00000.parquet", "part-00001.parquet", "part-00002.parquet"]
    ids, vectors, probabilities, meta = load_embeddings(run_dir, mmap=True)
    assert isinstance(vectors, np.memmap) and meta["engine"] == "ray" and meta["shards"] == 3
    assert ids == local_ids and read_shard(shards[1])[0] == local_ids[5:10]
    np.testing.assert_allclose(vectors, local_vectors, atol=1e-5)
    np.testing.assert_allclose(probabilities, local_probabilities, atol=1e-5)
    assert json.loads((folder / "image_embeddings.json").read_text()).keys() == local_json.keys()

    kept = shards[0].stat().st_mtime_ns
    shards[1].unlink()  # as if killed before the second shard was written
    embed.main(options)
    assert shards[1].exists() and shards[0].stat().st_mtime_ns == kept  # only the missing shard embedded again
    np.testing.assert_allclose(load_embeddings(run_dir)[1], local_vectors, atol=1e-5)
