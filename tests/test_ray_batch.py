"""scripts.batch --engine ray on a real local Ray (2 CPUs, no dashboard): the same answers as
--engine local per input, bad files as error lines, a SIGKILLed run resumed to one line per input,
Parquet shards resumed shard by shard."""
import faiss  # noqa: F401  (before torch: both bring an OpenMP runtime, and this order is the safe one)

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

from scripts import batch, ray_batch
from tests.serving_fixtures import archive_tiny_run, assert_same_answers, make_tiny_run, photo_jpeg
from training.tiny_run import make_tiny_text_model

REPO = Path(__file__).resolve().parents[1]
PHOTOS = 12
BAD_FILES = {"corrupt.jpg": photo_jpeg(99)[:300], "empty.jpg": b"", "notes.txt": b"not a photo\n"}
RAY = ["--engine", "ray", "--ray-cpus", "2"]


@dataclass
class Tiny:
    mar: Path
    inputs: Path
    root: Path

    def keys(self) -> set[tuple[str, str]]:
        return {(path.stem, str(path)) for path in self.inputs.iterdir() if path.is_file()}


@pytest.fixture(scope="module")
def tiny(module_tmp) -> Tiny:
    root = module_tmp("raybatch")
    run = make_tiny_run(root / "runs" / "2025-01-31_142233")
    make_tiny_text_model(run.run_dir)  # a CSV's titles reach the actors' handler too
    mar = archive_tiny_run(run, root / "store", version="1.0")
    inputs = root / "inputs"
    inputs.mkdir()
    for number in range(PHOTOS):
        (inputs / f"p{number:03d}.jpg").write_bytes(photo_jpeg(number))
    for name, data in BAD_FILES.items():
        (inputs / name).write_bytes(data)
    return Tiny(mar, inputs, root)


@pytest.fixture(scope="module")
def local_lines(tiny) -> dict:
    output = tiny.root / "local.jsonl"
    batch.main([str(tiny.inputs), "--output", str(output), "--engine", "local", "--archive", str(tiny.mar),
                "--batch-size", "4"])
    return by_key([json.loads(line) for line in output.read_text().splitlines()])


def ray_options(tmp_path: Path) -> list[str]:
    return [*RAY, "--ray-temp-dir", str(tmp_path / "ray")]


def by_key(records: list[dict]) -> dict[tuple[str, str], dict]:
    keyed = {(record["image_id"], record["path"]): record for record in records}
    assert len(keyed) == len(records), "an input has more than one result"
    return keyed


def ray_is_down() -> None:
    import ray

    assert not ray.is_initialized(), "the run left Ray initialised in this process"


def test_ray_answers_as_local_per_input_and_bad_files_are_error_lines(tiny, local_lines, tmp_path):
    output = tmp_path / "ray.jsonl"
    summary = batch.main([str(tiny.inputs), "--output", str(output), "--archive", str(tiny.mar), "--batch-size", "4",
                          "--actors", "2", *ray_options(tmp_path)])
    ray_is_down()
    found = by_key([json.loads(line) for line in output.read_text().splitlines()])
    assert found.keys() == tiny.keys()
    assert_same_answers(found, local_lines)
    assert summary["ok"] == PHOTOS and summary["failed"] == len(BAD_FILES)
    for name in BAD_FILES:
        assert found[(name.split(".")[0], str(tiny.inputs / name))]["code"] in (400, 415)
    # a re-run finds every input answered and starts nothing
    again = batch.main([str(tiny.inputs), "--output", str(output), "--archive", str(tiny.mar), *ray_options(tmp_path)])
    assert again["skipped"] == len(found) and again["ok"] + again["failed"] == 0


def test_sigkill_mid_run_then_resume_gives_exactly_one_result_per_input(tiny, local_lines, tmp_path, request):
    inputs = tmp_path / "many"
    inputs.mkdir()
    for copy in range(20):  # 300 inputs answered one per batch: the run is still going when killed
        for path in tiny.inputs.iterdir():
            (inputs / f"{path.stem}-{copy:02d}{path.suffix}").write_bytes(path.read_bytes())
    total = len(list(inputs.iterdir()))
    output = tmp_path / "killed.jsonl"
    # A SIGKILLed run cannot remove the short link it would make to a long --ray-temp-dir: give it a short one.
    ray_dir = Path(tempfile.mkdtemp(prefix="ray-test-"))
    request.addfinalizer(lambda: shutil.rmtree(ray_dir, ignore_errors=True))
    command = [sys.executable, "-m", "scripts.batch", str(inputs), "--output", str(output), "--archive",
               str(tiny.mar), "--batch-size", "1", *RAY, "--ray-temp-dir", str(ray_dir)]
    # TMPDIR too: the archive it unzips into a temporary folder is left behind by the kill.
    child = subprocess.Popen(command, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                             start_new_session=True, env={**os.environ, "TMPDIR": str(ray_dir)})
    try:
        deadline = time.monotonic() + 180
        while not (output.exists() and output.read_bytes().count(b"\n") >= 5):
            assert child.poll() is None, "the batch died before answering"
            assert time.monotonic() < deadline, "no answers within 180 s"
            time.sleep(0.05)
        assert child.poll() is None, "the batch finished before it could be killed"
        os.killpg(child.pid, signal.SIGKILL)  # the driver and the local Ray it started
        child.wait(timeout=30)
    finally:
        if child.poll() is None:
            os.killpg(child.pid, signal.SIGKILL)
            child.wait()
    written = output.read_bytes().count(b"\n")
    assert 5 <= written < total
    summary = batch.main([str(inputs), "--output", str(output), "--archive", str(tiny.mar), "--batch-size", "8",
                          *ray_options(tmp_path)])
    ray_is_down()
    found = by_key([json.loads(line) for line in output.read_text().splitlines()])
    assert len(found) == total and summary["skipped"] >= written
    expected = {}
    for (image_id, path), record in local_lines.items():
        for copy in range(20):
            name = f"{image_id}-{copy:02d}"
            expected[(name, str(inputs / f"{name}{Path(path).suffix}"))] = record
    assert_same_answers(found, expected)

def test_parquet_shards_resume_shard_by_shard(tiny, local_lines, tmp_path):
    output = tmp_path / "shards"
    arguments = [str(tiny.inputs), "--output", str(output), "--archive", str(tiny.mar), "--format", "parquet",
                 "--shard-size", "4", "--batch-size", "3", *ray_options(tmp_path)]
    first = batch.main(arguments)
    ray_is_down()
    shards = sorted(path.name for path in output.glob("part-*.parquet"))
    assert shards == [f"part-{n:05d}.parquet" for n in range(4)]  # 15 inputs in shards of 4
    assert first["ok"] + first["failed"] == len(tiny.keys())
    assert_same_answers(by_key(ray_batch.read_shards(output)), local_lines)
    (output / "part-00002.parquet").unlink()  # as if the run had been killed before its last shard
    second = batch.main(arguments)
    assert second["skipped"] == len(tiny.keys()) - 4 and second["ok"] + second["failed"] == 4
    assert_same_answers(by_key(ray_batch.read_shards(output)), local_lines)
    with pytest.raises(SystemExit, match="other inputs than shard 0"):
        batch.main([*arguments, "--shard-size", "5"])

def test_a_csv_with_titles_is_answered_from_photo_and_words_as_local_does(tiny, tmp_path):
    titles = ["wooden rake", "", "guitar amplifier", "sofa cushion"]
    for number in range(len(titles)):
        shutil.copy(tiny.inputs / f"p{number:03d}.jpg", tmp_path)
    rows = ["path,title", *(f"p{number:03d}.jpg,{title}" for number, title in enumerate(titles)), ",old guitar"]
    (tmp_path / "in.csv").write_text("\n".join(rows) + "\n", encoding="utf-8")
    batch.main([str(tmp_path / "in.csv"), "--output", str(tmp_path / "local.jsonl"), "--engine", "local",
                "--archive", str(tiny.mar)])
    local = by_key([json.loads(line) for line in (tmp_path / "local.jsonl").read_text().splitlines()])
    batch.main([str(tmp_path / "in.csv"), "--output", str(tmp_path / "shards"), "--archive", str(tiny.mar),
                "--format", "parquet", "--actors", "1", *ray_options(tmp_path)])
    ray_is_down()
    found = by_key(ray_batch.read_shards(tmp_path / "shards"))
    assert_same_answers(found, local)
    assert [found[key]["inputs"] for key in sorted(found)] == [local[key]["inputs"] for key in sorted(found)]
    assert sorted(tuple(record["inputs"]) for record in found.values()) == ([("photo",)] + [("photo", "title")] * 3
                                                                            + [("title",)])
    assert all(record["catalogue"]["generation"] == 0 for record in found.values())


def test_actors_leave_cpus_to_ray_data():
    assert ray_batch.actor_cpus(2, 2, None) == (0.75, 1)
    assert ray_batch.actor_cpus(16, 2, None) == (7.75, 8)
    with pytest.raises(batch.FatalError, match="would hang"):
        ray_batch.actor_cpus(2, 2, 1.0)
