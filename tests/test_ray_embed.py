"""training.embed --engine ray on a real local Ray: the local stage's vectors, in Parquet shards resumed one by one."""
import json

import numpy as np
import pytest

from tests.test_runtime import write_split
from training import embed
from training.data import load_embeddings
from training.ray_embed import SHARDS_DIR, ray_cluster, read_shard
from training.tiny_run import make_tiny_run

pytestmark = pytest.mark.slow  # a real Ray


@pytest.fixture(scope="module")
def work(module_tmp):
    work = module_tmp("rayembed")
    run = make_tiny_run(work / "model_evaluation" / "2025-01-31_142233", photos_dir=work / "photos", listings=7)
    write_split(run, work, splits=("train",))
    return work, run.run_dir


@pytest.fixture(scope="module")
def ray_local(module_tmp):
    with ray_cluster(None, module_tmp("ray"), num_cpus=2) as ray:
        yield ray


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
