"""scripts.batch --engine ray on a local Ray: --local's answers, bad files as errors, killed runs resumed."""
import os
import shutil
import signal
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

from scripts import batch, ray_batch
from tests.serving_fixtures import BAD_FILES, REPO, assert_same_answers, by_key, read_jsonl, wait_until

pytestmark = pytest.mark.slow

RAY = ["--engine", "ray", "--ray-cpus", "2"]


def ray_options(tmp_path: Path) -> list[str]:
    return [*RAY, "--ray-temp-dir", str(tmp_path / "ray")]


def ray_is_down() -> None:
    import ray

    assert not ray.is_initialized(), "the run left Ray initialised in this process"


def test_ray_answers_as_local_per_input_and_bad_files_are_error_lines(batch_inputs, local_lines, tmp_path):
    output = tmp_path / "ray.jsonl"
    summary = batch.main([str(batch_inputs.folder), "--output", str(output), "--archive", str(batch_inputs.mar),
                          "--batch-size", "4", "--actors", "2", *ray_options(tmp_path)])
    ray_is_down()
    found = by_key(read_jsonl(output))
    assert found.keys() == batch_inputs.keys()
    assert_same_answers(found, local_lines)
    assert summary["ok"] == 16 and summary["failed"] == len(BAD_FILES)
    for name in BAD_FILES:
        assert found[(name.split(".")[0], str(batch_inputs.folder / name))]["code"] in (400, 415)
    again = batch.main([str(batch_inputs.folder), "--output", str(output), "--archive", str(batch_inputs.mar),
                        *ray_options(tmp_path)])
    assert again["skipped"] == len(found) and again["ok"] + again["failed"] == 0


def test_sigkill_mid_run_then_resume_gives_exactly_one_result_per_input(batch_inputs, local_lines, tmp_path, request):
    inputs = tmp_path / "many"
    inputs.mkdir()
    for copy in range(16):  # 304 inputs answered one per batch: the run is still going when killed
        for path in batch_inputs.files():
            (inputs / f"{path.stem}-{copy:02d}{path.suffix}").write_bytes(path.read_bytes())
    total = len(list(inputs.iterdir()))
    output = tmp_path / "killed.jsonl"
    # A SIGKILLed run cannot remove the short link it would make to a long --ray-temp-dir: give it a short one.
    ray_dir = Path(tempfile.mkdtemp(prefix="ray-test-"))
    request.addfinalizer(lambda: shutil.rmtree(ray_dir, ignore_errors=True))
    command = [sys.executable, "-m", "scripts.batch", str(inputs), "--output", str(output), "--archive",
               str(batch_inputs.mar), "--batch-size", "1", *RAY, "--ray-temp-dir", str(ray_dir)]
    # TMPDIR too: the archive it unzips into a temporary folder is left behind by the kill.
    child = subprocess.Popen(command, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                             start_new_session=True, env={**os.environ, "TMPDIR": str(ray_dir)})
    try:
        assert wait_until(lambda: child.poll() is not None or (output.exists()
                                                               and output.read_bytes().count(b"\n") >= 5), 180, 0.05)
        assert child.poll() is None, "the batch finished (or died) before it could be killed"
        os.killpg(child.pid, signal.SIGKILL)  # the driver and the local Ray it started
        child.wait(timeout=30)
    finally:
        if child.poll() is None:
            os.killpg(child.pid, signal.SIGKILL)
            child.wait()
    written = output.read_bytes().count(b"\n")
    assert 5 <= written < total
    summary = batch.main([str(inputs), "--output", str(output), "--archive", str(batch_inputs.mar), "--batch-size", "8",
                          *ray_options(tmp_path)])
    ray_is_down()
    found = by_key(read_jsonl(output))
    assert len(found) == total and summary["skipped"] == written  # what had its line was not answered again
    expected = {}
    for (image_id, path), record in local_lines.items():
        for copy in range(16):
            name = f"{image_id}-{copy:02d}"
            expected[(name, str(inputs / f"{name}{Path(path).suffix}"))] = record
    assert_same_answers(found, expected)


def test_a_csv_with_titles_in_parquet_shards_is_answered_as_local_does_and_resumed_by_shard(batch_inputs, tmp_path):
    titles = ["wooden rake", "", "guitar amplifier", "sofa cushion"]
    for number in range(len(titles)):
        shutil.copy(batch_inputs.folder / f"p{number:03d}.jpg", tmp_path)
    rows = ["path,title", *(f"p{number:03d}.jpg,{title}" for number, title in enumerate(titles)), ",old guitar"]
    (tmp_path / "in.csv").write_text("\n".join(rows) + "\n", encoding="utf-8")
    batch.main([str(tmp_path / "in.csv"), "--output", str(tmp_path / "local.jsonl"), "--engine", "local",
                "--archive", str(batch_inputs.mar)])
    local = by_key(read_jsonl(tmp_path / "local.jsonl"))
    output = tmp_path / "shards"
    arguments = [str(tmp_path / "in.csv"), "--output", str(output), "--archive", str(batch_inputs.mar), "--format",
                 "parquet", "--shard-size", "2", "--batch-size", "3", "--actors", "1", *ray_options(tmp_path)]
    first = batch.main(arguments)
    ray_is_down()
    assert sorted(path.name for path in output.glob("part-*.parquet")) == [f"part-{n:05d}.parquet" for n in range(3)]
    found = by_key(ray_batch.read_shards(output))
    assert first["ok"] == 5 and found.keys() == local.keys()
    assert_same_answers(found, local)
    assert all(found[key]["inputs"] == local[key]["inputs"] for key in found)
    assert sorted(tuple(record["inputs"]) for record in found.values()) == ([("photo",)] + [("photo", "title")] * 3
                                                                            + [("title",)])
    assert all(record["catalogue"]["generation"] == 0 for record in found.values())
    (output / "part-00001.parquet").unlink()  # as if the run had been killed before that shard was written
    second = batch.main(arguments)
    assert second["skipped"] == 3 and second["ok"] + second["failed"] == 2
    assert_same_answers(by_key(ray_batch.read_shards(output)), local)
    with pytest.raises(SystemExit, match="other inputs than shard 0"):
        batch.main([*arguments, "--shard-size", "3"])


def test_actors_leave_cpus_to_ray_data():
    assert ray_batch.actor_cpus(2, 2, None) == (0.75, 1)
    assert ray_batch.actor_cpus(16, 2, None) == (7.75, 8)
    with pytest.raises(batch.FatalError, match="would hang"):
        ray_batch.actor_cpus(2, 2, 1.0)
