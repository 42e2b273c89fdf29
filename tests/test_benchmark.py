"""The benchmark's figures from known inputs, its sections on tiny sizes, every server stopped on SIGTERM."""
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import psutil
import pytest
import torch

from marketplace_search.models import MarketplaceNet
from marketplace_search.presets import Preprocess
from scripts.benchmark import __main__ as cli
from scripts.benchmark import bare, common, index, served, soak, words
from scripts.serve import processes_under
from training.tiny_run import make_tiny_run

REPO = Path(__file__).resolve().parents[1]


def test_options_win_over_the_profile_unknown_sections_are_refused_and_tables_formatted(capsys):
    table = cli.markdown_table([{"a": 1234, "b": 0.5}, {"a": "x|y"}], [("a", "A"), ("b", "B s")])
    assert table.splitlines() == ["| A | B s |", "|---|---|", "| 1,234 | 0.50 |", "| x\\|y |  |"]
    assert [cli.parse_size(text) for text in ("10k", "1M", "2500", "1.5k")] == [10_000, 1_000_000, 2500, 1500]
    settings = cli.resolve_settings(cli.build_parser().parse_args(["--quick", "--sizes", "5k", "--sections", "index"]))
    assert settings["sizes"] == [5000] and settings["sections"] == ["index"]
    with pytest.raises(SystemExit):
        cli.main(["--sections", "bare,gpu"])
    assert "unknown section(s) ['gpu']" in capsys.readouterr().err


def test_backends_are_timed_in_turns_and_their_drift_computed_from_known_outputs():
    order = []
    times = common.time_in_turns({"a": lambda: order.append("a"), "b": lambda: order.append("b")}, min_seconds=0,
                                 min_repeats=3)
    assert order == ["a", "a", "b", "b"] * 3 and [len(times["a"]), len(times["b"])] == [3, 3]  # untimed, then timed
    probabilities = np.array([[0.7, 0.3], [0.4, 0.6]], np.float32)
    embeddings = np.array([[1.0, 0.0], [0.0, 1.0]], np.float32)
    flipped = np.array([[0.7, 0.3], [0.6, 0.4]], np.float32)  # the second photo changes category
    turned = np.array([[1.0, 0.0], [np.sqrt(0.5), np.sqrt(0.5)]], np.float32)  # 45 degrees
    drift = bare.output_drift((probabilities, embeddings), (flipped, turned))
    assert drift == pytest.approx({"max_abs_dprob": 0.2, "top1_agreement": 0.5, "cosine_min": np.sqrt(0.5),
                                   "cosine_mean": (1 + np.sqrt(0.5)) / 2})


@pytest.mark.slow
def test_bare_section_times_each_backend_at_each_batch_against_torch_fp32():
    torch.manual_seed(0)
    model, tiny, generated = MarketplaceNet("resnet18", 3, embedding_dim=16), Preprocess(resize=40, crop=32), \
        common.generate_photos(4, size=(48, 40))
    bare.calibrate_batchnorm(model, common.preprocess_photos(generated, tiny))
    settings = {"backends": ["torch fp32", "openvino fp32"], "batches": [1, 8], "min_seconds": 0, "min_repeats": 1,
                "phone_photos": 1, "phone_size": (400, 320)}
    rows = bare.bench_bare(bare.Subject("tiny", model, tiny, "test"), generated, settings)["rows"]
    assert [(row["variant"], row["batch"]) for row in rows if "backend" in row] == [
        ("torch fp32", 1), ("openvino fp32", 1), ("torch fp32", 8), ("openvino fp32", 8)]
    by_name = {(row["variant"], row["batch"]): row for row in rows}
    assert by_name["torch fp32", 8]["speedup"] == 1.0 and by_name["torch fp32", 8]["cosine_min"] == pytest.approx(1)
    assert by_name["openvino fp32", 8]["cosine_min"] > 0.999  # the same network, converted
    assert "cosine_min" not in by_name["openvino fp32", 1]  # drift is measured at one batch size
    flops, converted = bare.photo_flops(bare.Subject("", model, tiny, "")), by_name["openvino fp32", 8]
    assert converted["gflops"] == pytest.approx(flops * converted["photos_per_s"] / 1e9)
    larger = bare.photo_flops(bare.Subject("", model, Preprocess(resize=80, crop=64), ""))
    assert larger == pytest.approx(4 * flops, rel=0.05)  # a convolution's FLOPs grow with the photo's area
    draft, full = (row for row in rows if row["variant"].startswith("phone photo"))  # JPEG draft, then full decode
    assert draft["speedup"] == pytest.approx(draft["photos_per_s"] / full["photos_per_s"])
    assert 0.9 < draft["cosine_min"] < 1.0  # 400x320 decoded at 1/8 scale for a 40-pixel resize: other pixels


def test_index_section_has_exact_search_as_its_reference_and_marks_what_auto_builds(tmp_path, capsys, monkeypatch):
    output, raw = tmp_path / "bench.md", tmp_path / "bench.json"
    cli.main(["--quick", "--sections", "index", "--sizes", "400", "--output", str(output), "--json", str(raw)])
    assert output.read_text() in capsys.readouterr().out
    figures = json.loads(raw.read_text())
    rows = figures["sections"]["index"]["rows"]
    assert figures["settings"]["sizes"] == [400]
    assert [(row["type"], row["settings"]) for row in rows[:3]] == [  # efSearch 128: build_index's default
        ("flat", ""), ("hnsw", "M=32, efSearch=64"), ("hnsw", "M=32, efSearch=128")] and rows[3]["type"] == "ivfpq"
    assert rows[0]["recall_at_10"] == 1.0 and [row["auto"] for row in rows] == [True, False, False, False]
    assert "| 400 | flat |  | yes |" in output.read_text()
    assert "NOT MEASURED" in figures["sections"]["index"]["verdict"]  # 400 vectors, not the target's 1M
    assert index.recall_at_k(np.array([[3, 1, 9], [-1, -1, -1]]), np.array([[1, 2, 3], [4, 5, 6]]), k=3) == 1 / 3
    monkeypatch.setattr(index.search, "FLAT_MAX", 100)  # above it, auto builds HNSW at its defaults
    rows = index.bench_index({"sizes": [300], "dim": 8, "queries": 20, "single_queries": 5, "ef_search": [16]})["rows"]
    assert [(row["type"], row["settings"]) for row in rows if row["auto"]] == [("hnsw", "M=32, efSearch=128")]


def test_load_test_counts_refusals_and_overload_once_each_and_leaves_out_the_ramp_up(monkeypatch):
    assert served.steady_rate([13.5, 10.0, 12.5, 10.5, 11.5], concurrency=2) == pytest.approx(1.0)
    assert served.steady_rate([1.0, 2.0], concurrency=2) is None  # nothing after each client's first answer
    sent = []

    def post(url, photo, headers, timeout):
        sent.append(photo)
        if photo == b"busy":
            raise served.api.TransientError(503, "queue full")
        return SimpleNamespace(ok=photo != b"bad", status_code=400 if photo == b"bad" else 200)

    monkeypatch.setattr(served.api, "post_photo", post)
    monkeypatch.setattr(served.api, "error_text", lambda response: "bad photo")
    figures = served.load_test("url", [b"\xff\xd8jpeg", b"bad", b"busy"], concurrency=3, total=9)
    assert (figures["requests"], figures["errors"], len(sent)) == (9, 6, 9) and "first error" in figures["note"]
    with pytest.raises(RuntimeError, match="all 2 requests to url failed; first: HTTP 400 bad photo"):
        served.load_test("url", [b"bad"], concurrency=1, total=2)


def test_served_soak_and_words_figures_come_from_their_readings_and_targets_are_judged_on_the_best_row():
    after = served.read_counters("\n".join([
        'MarketplaceBatches{BatchSize="8",ModelName="bench"} 3.0',
        'MarketplaceBatches{BatchSize="2",ModelName="bench"} 1.0',
        'MarketplaceStageMilliseconds{Stage="forward",BatchSize="8",ModelName="bench"} 1200.0',
        'MarketplaceStageMilliseconds{Stage="forward",BatchSize="2",ModelName="bench"} 100.0',
        'ts_inference_requests_total{model_name="bench",model_version="default",} 26.0',
        'ts_inference_requests_total{model_name="other",model_version="default",} 99.0',
        'ts_inference_latency_microseconds{model_name="bench",model_version="default",} 1300000.0',
        'ts_queue_latency_microseconds{model_name="bench",model_version="default",} 52000.0']))
    before = {"batches": {8: 1.0}, "forward": {8: 400.0},
              "frontend": {"requests": 6.0, "backend_ms": 300_000.0, "queue_ms": 12_000.0}}
    assert served.server_figures(before, after) == pytest.approx(  # since then: two batches of 8, one of 2
        {"mean_batch": 6.0, "forward_ms": 300.0, "backend_ms": 50.0, "queue_ms": 2.0})
    rates = {1: 10.0, 8: 20.0}
    loaded = {"concurrency": 32, "photos_per_s": 18.0, "mean_batch": 7.5, "forward_ms": 375.0, "p50_ms": 900.0}
    between = {"concurrency": 8, "photos_per_s": 8.0, "mean_batch": 4.0}
    single = {"concurrency": 1, "photos_per_s": 9.0, "mean_batch": 1.0, "forward_ms": 95.0, "p50_ms": 104.0}
    for row in (loaded, between, single):
        served.compare_with_bare(row, rates)
    assert loaded == pytest.approx({**loaded, "bare_batch": 8, "served_vs_bare": 0.9, "forward_share": 0.9})
    assert "p50_over_bare_ms" not in loaded and "served_vs_bare" not in between  # 4 is no batch size measured
    assert single == pytest.approx({**single, "bare_batch": 1, "served_vs_bare": 0.9, "forward_share": 0.855,
                                    "p50_over_bare_ms": 4.0, "p50_over_forward_ms": 9.0})
    common_ = {"backend": "openvino bf16", "batching": "8 / 1 ms"}
    rows = [{**common_, "concurrency": 32, "served_vs_bare": 0.93, "forward_share": 0.85},
            {**common_, "concurrency": 1, "forward_share": 0.99, "p50_over_bare_ms": 6.0, "p50_over_forward_ms": 12.0},
            {**common_, "batching": "off", "concurrency": 1, "p50_over_bare_ms": 8.0, "p50_over_forward_ms": 10.5}]
    ratio, share, over_bare, over_forward = served.verdicts(rows)
    assert "PASS, best 0.930" in ratio and "FAIL, best 0.850" in share  # concurrency 1's share does not count
    assert "PASS, best +6.0 ms" in over_bare
    assert "FAIL, best +10.5 ms (openvino bf16, batching off, concurrency 1)" in over_forward
    samples = [{"answered": n, "uss_mb": 500.0 + (300 if n <= 250 else 0) + 0.002 * n} for n in range(100, 1100, 100)]
    assert soak.growth_per_1000(samples, "uss_mb") == pytest.approx(2.0)  # the warm-up's jump left out
    exact = np.arange(24, dtype=np.float32)  # 12 listings twice; the own listing (0) is left out
    assert words.agreement(exact, exact, own=0, listings=12) == 1.0
    assert words.agreement(exact, np.where(exact == 23, 0, exact), own=0, listings=12) == 0.9  # the nearest missed


@pytest.fixture(scope="module")
def short_tmp():
    folder = Path(tempfile.mkdtemp(prefix="bench-", dir="/tmp"))  # short: TorchServe's worker sockets live under it
    make_tiny_run(folder / "runs" / "2025-01-31_142233")
    yield folder
    for process in processes_under(folder):  # what a failing test left
        process.kill()
    shutil.rmtree(folder, ignore_errors=True)


@pytest.mark.server
@pytest.mark.slow
def test_the_sections_on_a_real_torchserve_and_sigterm_stops_every_server_the_benchmark_started(short_tmp, monkeypatch):
    monkeypatch.setattr(tempfile, "tempdir", str(short_tmp))
    tiny_run = short_tmp / "runs" / "2025-01-31_142233"
    settings = {**cli.PROFILES["quick"], "sections": ["served", "live", "words", "soak", "page"], "run": tiny_run,
                "served": [("torch fp32", 2)], "concurrency": [1, 2], "requests": 4, "warm_up_requests": 4,
                "live_add_photos": 4, "live_removes": 1, "photo_size": (64, 48), "sizes": [50], "words_queries": 3,
                "soak_requests": 12, "soak_every": 6, "soak_clients": 2, "phone_size": (320, 240), "page_requests": 2}
    sections = cli.run_sections(settings, common.generate_photos(4, size=(64, 48)))
    rows = sections["served"]["rows"]
    assert [(row["backend"], row["batching"], row["concurrency"]) for row in rows] == [
        ("torch fp32", "2 / 1 ms", 1), ("torch fp32", "2 / 1 ms", 2)]
    assert all(row["errors"] == 0 and row["requests"] >= 4 and 1 <= row["mean_batch"] <= 2 for row in rows)
    assert all({"forward_ms", "decode_ms", "backend_ms", "ready_s", "uss_ready_mb", "uss_after_mb"} <= set(row)
               for row in rows)  # the handler's and TorchServe's counters were read
    assert [row["unit"] for row in sections["live"]["rows"]] == ["ms per photo"] + ["s (median)"] * 3
    assert "remove` returns within 1 s" in sections["live"]["verdict"]
    [row] = sections["words"]["rows"]  # one size, the listings' own rows as queries
    assert row["speed_up"] == row["exact_p50_ms"] / row["pruned_p50_ms"] and row["query"] == "listing's row"
    assert [sample["answered"] for sample in sections["soak"]["rows"]] == [6, 12]
    assert all(sample["unexpected"] == 0 for sample in sections["soak"]["rows"])  # truncated photos got a 4xx
    direct, page, thumbnail = sections["page"]["rows"]
    assert [row["requests"] for row in (direct, page, thumbnail)] == [2, 2, 2]
    assert page["extra_p50_ms"] == page["p50_ms"] - direct["p50_ms"]
    assert processes_under(short_tmp) == []
    log = short_tmp / "benchmark.log"
    with open(log, "w") as output:
        process = subprocess.Popen([sys.executable, "-m", "scripts.benchmark", "--quick", "--sections", "served",
                                    "--run", str(tiny_run)], cwd=REPO, env={**os.environ, "TMPDIR": str(short_tmp)},
                                   stdout=output, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 300
        while "READY in" not in log.read_text():  # the server is up, its warm-up requests on their way
            assert process.poll() is None and time.monotonic() < deadline, log.read_text()
            time.sleep(0.5)
        assert (started := processes_under(short_tmp)), log.read_text()
        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=180) != 0
        assert psutil.wait_procs(started, timeout=10)[1] == [] and processes_under(short_tmp) == [], log.read_text()
        assert "interrupted (SIGTERM)" in log.read_text()
    finally:
        if process.poll() is None:
            process.kill()
