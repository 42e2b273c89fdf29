"""A worker killed under load: every request gets an answer, the few failed by the kill are JSON 5xx,
and the server answers again within seconds (issue acceptance: 32 clients, 2,000 requests)."""
import pytest

from scripts.benchmark.fault import load_and_kill, worker_processes
from scripts.benchmark.photos import generate_photos
from tests.serving_fixtures import archive_tiny_run, make_tiny_run, running_server


@pytest.mark.server
def test_a_worker_killed_under_load_fails_only_its_batch(tmp_path):
    run = make_tiny_run(tmp_path / "run")
    mar = archive_tiny_run(run, tmp_path / "store", batch_size=8, max_batch_delay=5)
    with running_server(tmp_path / "store", tmp_path / "ts", {"marketplace": mar.name}) as server:
        first_worker = worker_processes(server)[0].pid
        figures = load_and_kill(server, "marketplace", generate_photos(16, (320, 240)), clients=32, total=2000)
        assert figures["answers"] == 2000 and figures["no_answer"] == 0, figures
        assert figures["ok"] + figures["failed"] == 2000
        assert set(figures["failed_by_status"]) <= set(range(500, 600)), figures  # the kill's, never a 4xx
        assert figures["not_json"] == 0, figures
        # Only what the dead worker held (a batch or two, and what queued behind it) may fail.
        assert figures["failed"] <= 64, figures
        assert figures["recovery_s"] is not None and figures["recovery_s"] < 30, figures
        assert worker_processes(server)[0].pid != first_worker  # a new worker answers now
        print(figures)
