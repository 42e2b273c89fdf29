"""The benchmark harness on tiny sizes: its figures are computed right and its tables are complete.

No timing is asserted: speed is what the benchmark reports, not what tests check.
"""
import faiss  # noqa: F401  (before torch: OpenMP, see README)

import argparse
import json
import shutil
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from scripts import benchmark
from marketplace_search.images import decode_image
from marketplace_search.models import MarketplaceNet
from marketplace_search.presets import Preprocess

TINY = Preprocess(resize=40, crop=32)


def test_recall_at_k_counts_shared_ids_and_ignores_missing():
    exact = np.array([[1, 2, 3], [4, 5, 6]])
    found = np.array([[3, 1, 9], [-1, -1, -1]])  # 2 of 3, then nothing found
    assert benchmark.recall_at_k(found, exact, k=3) == pytest.approx(1 / 3)
    assert benchmark.recall_at_k(exact, exact, k=3) == 1.0


def test_output_drift_of_a_known_change():
    probabilities = np.array([[0.7, 0.3], [0.4, 0.6]], np.float32)
    embeddings = np.array([[1.0, 0.0], [0.0, 1.0]], np.float32)
    same = benchmark.output_drift((probabilities, embeddings), (probabilities, embeddings))
    assert same == {"max_abs_dprob": 0.0, "top1_agreement": 1.0, "cosine_mean": 1.0, "cosine_min": 1.0}
    flipped = np.array([[0.7, 0.3], [0.6, 0.4]], np.float32)  # second photo changes category
    turned = np.array([[1.0, 0.0], [np.sqrt(0.5), np.sqrt(0.5)]], np.float32)  # 45 degrees
    drift = benchmark.output_drift((probabilities, embeddings), (flipped, turned))
    assert drift["max_abs_dprob"] == pytest.approx(0.2)
    assert drift["top1_agreement"] == 0.5
    assert drift["cosine_min"] == pytest.approx(np.sqrt(0.5))
    assert drift["cosine_mean"] == pytest.approx((1 + np.sqrt(0.5)) / 2)


def test_markdown_table_has_the_columns_and_blank_missing_values():
    table = benchmark.markdown_table([{"a": 1234, "b": 0.5}, {"a": "x|y"}], [("a", "A"), ("b", "B s")])
    lines = table.splitlines()
    assert lines[0] == "| A | B s |"
    assert lines[1] == "|---|---|"
    assert lines[2] == "| 1,234 | 0.50 |"
    assert lines[3] == "| x\\|y |  |"


@pytest.mark.parametrize("text, size", [("10k", 10_000), ("1M", 1_000_000), ("2500", 2500), ("1.5k", 1500)])
def test_parse_size(text, size):
    assert benchmark.parse_size(text) == size


def test_time_round_robin_calls_each_function_in_turns():
    order = []
    calls = {"a": (lambda: order.append("a"), 1), "b": (lambda: order.append("b"), 1)}
    times = benchmark.time_round_robin(calls, min_seconds=0, min_repeats=3)
    assert order == ["a", "b"] * 4  # one untimed warm-up each, then 3 timed rounds
    assert [len(times["a"]), len(times["b"])] == [3, 3]


def test_generated_photos_are_decodable_jpegs():
    photos = benchmark.generate_photos(3, size=(64, 48))
    assert all(photo[:2] == b"\xff\xd8" for photo in photos)
    assert decode_image(photos[0]).size == (64, 48)
    assert len(set(photos)) == 3


def test_read_photos_samples_image_files_only(tmp_path):
    for number, photo in enumerate(benchmark.generate_photos(3, size=(32, 24))):
        (tmp_path / f"photo-{number}.jpg").write_bytes(photo)
    (tmp_path / "notes.txt").write_text("not a photo")
    assert len(benchmark.read_photos(tmp_path, 2)) == 2
    assert sorted(benchmark.read_photos(tmp_path, 10)) == sorted(p.read_bytes() for p in tmp_path.glob("*.jpg"))
    with pytest.raises(FileNotFoundError, match="not a folder"):
        benchmark.read_photos(tmp_path / "missing", 2)


def test_read_test_set_takes_test_photos_and_labels(tmp_path):
    photos = benchmark.generate_photos(4, size=(32, 24))
    (tmp_path / "photos").mkdir()
    for number, photo in enumerate(photos):
        (tmp_path / "photos" / f"img-{number}.jpg").write_bytes(photo)
    (tmp_path / "split.csv").write_text("image_id,product_id,label,split\nimg-0,p0,0,train\nimg-1,p1,2,test\n"
                                        "img-2,p2,1,val\nimg-3,p3,1,test\n")
    test_photos, labels = benchmark.read_test_set(tmp_path, 10)
    assert test_photos == [photos[1], photos[3]]
    assert labels.tolist() == [2, 1]


def test_clustered_vectors_are_normalised_and_closer_than_random():
    vectors, clusters = benchmark.clustered_vectors(2000, 32, seed=1, clusters=20)
    assert set(clusters) == set(range(20))
    assert vectors.shape == (2000, 32) and vectors.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(vectors, axis=1), 1.0, rtol=1e-5)
    uniform = np.random.default_rng(1).normal(size=(2000, 32)).astype(np.float32)
    uniform /= np.linalg.norm(uniform, axis=1, keepdims=True)

    def nearest_similarity(x):
        similarities = x[:100] @ x.T
        similarities[np.arange(100), np.arange(100)] = -1
        return similarities.max(axis=1).mean()

    assert nearest_similarity(vectors) > nearest_similarity(uniform) + 0.1


def tiny_bare_settings(**overrides) -> dict:
    settings = {"threads": 1, "knob_batch": 2, "batches": [1, 2], "crops": [24], "compile": False,
                "min_seconds": 0.0, "min_repeats": 1, "phone_photos": 0}
    return {**settings, **overrides}


def test_phone_photo_rows_time_draft_against_full_decoding_and_state_the_output_change():
    torch.manual_seed(0)
    model = MarketplaceNet("resnet18", 3, embedding_dim=16)
    preprocess = Preprocess(resize=40, crop=32)
    benchmark.calibrate_batchnorm(model, benchmark.preprocess_photos(benchmark.generate_photos(4, (48, 40)),
                                                                     preprocess))
    subject = benchmark.Subject("tiny", model, preprocess, "test", trained=False)
    settings = tiny_bare_settings(phone_photos=2, phone_size=(400, 320))
    draft, full = benchmark.bench_phone_decode(subject, settings, {"min_seconds": 0.0, "min_repeats": 1})
    assert draft["variant"] == "phone photo 400x320: decode + preprocess, JPEG draft (as served)"
    assert full["variant"] == "phone photo 400x320: decode + preprocess, full decode"
    assert draft["speedup"] == pytest.approx(draft["photos_per_s"] / full["photos_per_s"])
    # 400x320 decodes at 1/8 scale for a 40-pixel resize: other pixels, nearly the same embedding
    assert 0.9 < draft["cosine_min"] < 1.0 and draft["max_abs_dprob"] > 0


def test_bench_subject_rows_cover_every_knob_with_output_effects():
    torch.manual_seed(0)
    model = MarketplaceNet("resnet18", 3, embedding_dim=16)
    photos = benchmark.generate_photos(4, size=(48, 40))
    benchmark.calibrate_batchnorm(model, benchmark.preprocess_photos(photos, TINY))
    subject = benchmark.Subject("tiny", model, TINY, "test", trained=True)
    labels = np.array([0, 1, 2])
    rows = benchmark.bench_subject(subject, photos, tiny_bare_settings(), test_set=(photos[:3], labels))

    variants = [row["variant"] for row in rows]
    assert variants[0] == "decode + preprocess, 1 thread"  # the settings ask for 1 thread: one decode row
    assert variants[1:3] == ["baseline", "baseline"]
    assert {"layout nhwc", "layout none", "NCHW + no_grad (the handler before tuning)", "int8 dynamic Linear",
            "torch.compile"} <= set(variants)  # resnet18: the baseline is layout mkldnn
    assert "layout mkldnn" not in variants
    assert any(variant.startswith("crop 24") for variant in variants)
    by_name = {(row["variant"], row["batch"]): row for row in rows}
    baseline = by_name["baseline", 2]
    assert baseline["max_abs_dprob"] == 0 and baseline["top1_agreement"] == 1
    assert baseline["speedup"] == pytest.approx(1.0)
    assert 0 <= baseline["test_accuracy"] <= 1 and baseline["test_top1_agreement"] == 1
    assert baseline["note"] == "layout mkldnn"
    for layout in ("nhwc", "none"):  # the same network in other memory layouts
        row = by_name[f"layout {layout}", 2]
        assert row["cosine_min"] > 0.9999 and row["top1_agreement"] == 1 and row["photos_per_s"] > 0
    assert by_name["torch.compile", 2]["note"].startswith("skipped")
    assert "photos_per_s" not in by_name["torch.compile", 2]
    assert all(row["photos_per_s"] > 0 for row in rows if "photos_per_s" in row)


def test_torch_compile_failure_is_a_skipped_row_with_the_reason(monkeypatch):
    def broken_compile(model):
        def fail(images):
            raise RuntimeError("InvalidCxxCompiler: No working C++ compiler found\nmore detail")
        return fail

    monkeypatch.setattr(benchmark.torch, "compile", broken_compile)
    variant = benchmark.compiled_variant(torch.nn.Identity(), TINY, 1, torch.zeros(1, 3, 32, 32))
    assert variant.forward is None
    assert variant.note == "skipped: InvalidCxxCompiler: No working C++ compiler found"


def test_load_subjects_calibrates_fresh_models():
    photos = benchmark.generate_photos(4, size=(48, 40))
    [subject] = benchmark.load_subjects(None, ["mobilenet_v2"], {}, photos)
    assert subject.name == "mobilenet_v2" and not subject.trained
    batchnorm = subject.model.backbone.features[0][1]
    assert batchnorm.running_var.mean() != pytest.approx(1.0)  # calibrated, not the fresh 1.0
    assert not subject.model.training


def tiny_index_settings(**overrides) -> dict:
    settings = {"dim": 8, "queries": 20, "single_queries": 5, "filtered_queries": 5, "sizes": [300],
                "hnsw_m": [16, 32], "hnsw_m_max_size": 1000, "ef_search": [16, 64], "nprobe": [2, 4],
                "ivf_max_size": 1000, "hnsw_sq8": True}
    return {**settings, **overrides}


def test_bench_index_measures_flat_hnsw_and_ivf_against_exact_search():
    section = benchmark.bench_index(tiny_index_settings())
    rows = section["rows"]
    swept = sorted({16, 64, benchmark.search_default("ef_search")})  # the shipped value is always added
    assert [row["type"] for row in rows] == (["flat"] + ["hnsw"] * 2 * len(swept) + ["hnsw_sq8"] * len(swept)
                                             + ["ivf"] * 2)
    flat = rows[0]
    assert flat["recall_at_10"] == 1.0 and flat["auto"] == "yes"  # 300 vectors: auto is exact search
    assert all(0 <= row["recall_at_10"] <= 1 for row in rows)
    assert all(row["index_mb"] > 0 and row["p50_ms"] > 0 and row["p50_ms_1t"] > 0 for row in rows)
    hnsw = [row.get("efSearch") for row in rows if row["type"] == "hnsw"]
    assert hnsw == swept * 2
    sq8 = [row for row in rows if row["type"] == "hnsw_sq8"]
    assert [row["efSearch"] for row in sq8] == swept and not any(row["auto"] for row in sq8)
    same_graph = [r["index_mb"] for r in rows if r["type"] == "hnsw" and r["M"] == sq8[0]["M"]]
    assert all(row["index_mb"] < min(same_graph) for row in sq8)  # same M, vectors in a quarter of the bytes
    assert [row.get("nprobe") for row in rows if row["type"] == "ivf"] == [2, 4]
    assert flat["filtered_recall_at_10"] == 1.0
    assert all(0 <= row["filtered_recall_at_10"] <= 1 and row["filtered_p50_ms_1t"] > 0 for row in rows)
    assert "NOT MEASURED" in section["verdict"] and "300" in section["verdict"]
    assert "300 → flat" in section["legend"]


def test_nprobe_beyond_the_number_of_lists_gives_one_row():
    vectors, _ = benchmark.clustered_vectors(300, 8, seed=3)
    workload = benchmark.Workload("synthetic", vectors[:280], vectors[280:], np.zeros(280, int), np.zeros(20, int),
                                  filtered_queries=2)
    index, params, _ = benchmark.timed_build(workload.vectors, "ivf")
    benchmark.exact_answers(benchmark.search.build_index(workload.vectors, "flat")[0], workload)
    rows = benchmark.sweep_rows(index, params, {}, workload, 3, "nprobe", [2, index.nlist, 4 * index.nlist])
    assert [row["nprobe"] for row in rows] == [2, index.nlist]  # 4 x nlist searches the same lists as nlist


def test_filtered_search_returns_only_the_query_category():
    vectors, clusters = benchmark.clustered_vectors(500, 8, seed=2, clusters=20)
    categories = clusters % 3
    workload = benchmark.Workload("synthetic", vectors[:450], vectors[450:], categories[:450], categories[450:],
                                  filtered_queries=10)
    index, _ = benchmark.search.build_index(workload.vectors, "flat")
    for row in range(10):
        found = workload.search_filtered(index, row)
        assert set(categories[found]) == {workload.query_categories[row]}
        same_category = categories[:450] == workload.query_categories[row]
        similarities = np.where(same_category, vectors[:450] @ vectors[450 + row], -np.inf)
        np.testing.assert_array_equal(np.sort(found), np.sort(np.argsort(-similarities)[:10]))


def test_run_workload_holds_out_a_tenth_of_the_run_embeddings(tmp_path):
    from training.embed import save_embeddings

    vectors, clusters = benchmark.clustered_vectors(50, 8, seed=3)
    image_ids = [f"img-{i}" for i in range(50)]
    save_embeddings(tmp_path / "embeddings", image_ids, vectors, np.zeros((50, 3), np.float32), {})
    listings = {image_id: {"category": f"cat-{cluster % 3}"} for image_id, cluster in zip(image_ids, clusters)}
    (tmp_path / "index").mkdir()
    (tmp_path / "index" / "listings.json").write_text(json.dumps(listings))
    workload = benchmark.run_workload(tmp_path, {"queries": 100, "filtered_queries": 3})
    assert (len(workload.vectors), len(workload.queries)) == (45, 5)
    assert workload.data == "run" and set(workload.categories) <= {"cat-0", "cat-1", "cat-2"}
    rows = {tuple(row) for row in np.round(workload.vectors, 6)} | {tuple(row) for row in np.round(workload.queries, 6)}
    assert len(rows) == 50  # every photo once, catalogue and queries disjoint


def test_auto_rows_follow_build_index_above_flat_max(monkeypatch):
    monkeypatch.setattr(benchmark.search, "FLAT_MAX", 100)
    rows = benchmark.bench_index(tiny_index_settings(ivf_max_size=0))["rows"]
    auto = [(row["type"], row.get("M"), row.get("efSearch")) for row in rows if row["auto"]]
    assert auto == [("hnsw", benchmark.search_default("hnsw_m"), benchmark.search_default("ef_search"))]


def test_index_verdict_passes_only_at_the_target_size():
    row = {"vectors": 1_000_000, "type": "hnsw", "settings": "M=32", "p50_ms": 1.0, "p95_ms": 9.0,
           "p50_ms_1t": 1.0, "p95_ms_1t": 2.0, "recall_at_10": 0.96, "threads": 2}
    row["target"] = benchmark.target_status(row)
    assert row["target"] == "1 thread"
    assert benchmark.index_verdict([row]).split(": ")[1].startswith("PASS")
    assert "FAIL" in benchmark.index_verdict([{**row, "target": ""}])
    assert "NOT MEASURED" in benchmark.index_verdict([{**row, "vectors": 100_000}])


METRICS_TEXT = """# TYPE MarketplaceBatches counter
MarketplaceBatches{BatchSize="8",Level="Model",Hostname="vm",ModelName="bench"} 3.0
MarketplaceBatches{BatchSize="2",Level="Model",Hostname="vm",ModelName="bench"} 1.0
# TYPE MarketplaceForwardMilliseconds counter
MarketplaceForwardMilliseconds{BatchSize="8",Level="Model",Hostname="vm",ModelName="bench"} 1200.0
MarketplaceForwardMilliseconds{BatchSize="2",Level="Model",Hostname="vm",ModelName="bench"} 100.0
ts_inference_requests_total{model_name="bench",model_version="default",} 26.0
ts_inference_requests_total{model_name="other",model_version="default",} 99.0
ts_inference_latency_microseconds{model_name="bench",model_version="default",} 1300000.0
ts_queue_latency_microseconds{model_name="bench",model_version="default",} 52000.0
"""


class PhotoEndpoint(BaseHTTPRequestHandler):
    """Answers every POST with JSON, except a photo starting with b"bad" (HTTP 400); GET /metrics
    answers a Prometheus page like TorchServe's."""

    def do_GET(self):
        payload = METRICS_TEXT.encode()
        self.send_response(200)
        self.send_header("Content-Length", str(len(payload)))
        self.end_headers()
        self.wfile.write(payload)

    def do_POST(self):
        body = self.rfile.read(int(self.headers["Content-Length"]))
        ok = self.headers["Content-Type"] == "image/jpeg" and not body.startswith(b"bad")
        payload = json.dumps({"category": "Home"} if ok else {"error": "bad photo"}).encode()
        self.send_response(200 if ok else 400)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(payload)))
        self.end_headers()
        self.wfile.write(payload)

    def log_message(self, *args):
        pass


@pytest.fixture
def photo_endpoint():
    server = ThreadingHTTPServer(("127.0.0.1", 0), PhotoEndpoint)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}/predictions/tiny"
    server.shutdown()
    server.server_close()


def test_load_test_counts_answers_and_errors(photo_endpoint):
    figures = benchmark.load_test(photo_endpoint, [b"photo-1", b"photo-2", b"bad"], concurrency=3, total=9)
    assert figures["requests"] == 9 and figures["errors"] == 3
    assert "HTTP 400" in figures["note"]
    assert figures["photos_per_s"] > 0 and figures["wall_s"] > 0 and figures["client_cpu_ms"] > 0
    assert figures["p50_ms"] <= figures["p95_ms"] <= figures["p99_ms"]


def test_steady_rate_leaves_out_each_clients_first_answer():
    # Two clients: answers at 10 s and 10.5 s (ramp-up), then one every second.
    assert benchmark.steady_rate([10.0, 10.5, 11.5, 12.5, 13.5], concurrency=2) == pytest.approx(3 / 3.0)
    assert benchmark.steady_rate([13.5, 10.0, 12.5, 10.5, 11.5], concurrency=2) == pytest.approx(1.0)  # any order
    assert benchmark.steady_rate([1.0, 2.0], concurrency=2) is None  # nothing after the ramp-up
    assert benchmark.steady_rate([1.0, 1.0, 1.0], concurrency=1) is None  # no time to divide by


def test_load_test_fails_when_nothing_is_answered(photo_endpoint):
    with pytest.raises(RuntimeError, match="all 2 requests .* failed; first: HTTP 400"):
        benchmark.load_test(photo_endpoint, [b"bad"], concurrency=1, total=2)


def test_handler_counters_give_mean_batch_and_forward_time(photo_endpoint):
    server = SimpleNamespace(metrics_url=photo_endpoint.rsplit("/predictions", 1)[0])
    counters = benchmark.handler_counters(server)
    assert counters == {"MarketplaceBatches": {8: 3.0, 2: 1.0}, "MarketplaceForwardMilliseconds": {8: 1200.0, 2: 100.0}}
    before = {"MarketplaceBatches": {8: 1.0}, "MarketplaceForwardMilliseconds": {8: 400.0}}
    # Since `before`: two batches of 8 (800 ms) and one of 2 (100 ms).
    assert benchmark.batch_figures(before, counters) == {"mean_batch": pytest.approx((2 * 8 + 2) / 3),
                                                         "forward_ms": pytest.approx(900 / 3)}
    assert benchmark.batch_figures(counters, counters) == {"mean_batch": None}


def test_forward_share_is_the_workers_time_in_forward_passes():
    # 2 workers, batches of 4 taking 200 ms: each worker can do 20 photos/s; 30 served is 75% of that.
    assert benchmark.forward_share({"photos_per_s": 30.0, "forward_ms": 200.0, "mean_batch": 4.0}, workers=2) == {
        "forward_share": pytest.approx(0.75)}
    assert benchmark.forward_share({"photos_per_s": 30.0, "mean_batch": None}, workers=1) == {}


def test_cpu_figures_per_request_and_cores_busy():
    figures = {"requests": 10, "wall_s": 2.0, "client_cpu_ms": 5.0}
    cpu = benchmark.cpu_figures({"frontend": 1.0, "workers": 3.0}, {"frontend": 1.1, "workers": 6.0}, figures)
    assert cpu == {"frontend_cpu_ms": pytest.approx(10.0), "worker_cpu_ms": pytest.approx(300.0),
                   "cores_busy": pytest.approx((0.1 + 3.0 + 0.05) / 2.0)}


def test_frontend_counters_of_the_served_model_give_worker_and_queue_time(photo_endpoint):
    server = SimpleNamespace(metrics_url=photo_endpoint.rsplit("/predictions", 1)[0])
    after = benchmark.frontend_counters(server)
    assert after == {"ts_inference_requests_total": 26.0, "ts_inference_latency_microseconds": 1_300_000.0,
                     "ts_queue_latency_microseconds": 52_000.0}
    before = {"ts_inference_requests_total": 6.0, "ts_inference_latency_microseconds": 300_000.0,
              "ts_queue_latency_microseconds": 12_000.0}
    assert benchmark.backend_times(before, after) == {"backend_ms": pytest.approx(50.0), "queue_ms": pytest.approx(2.0)}
    assert benchmark.backend_times(after, after) == {}


def test_serve_configs_pair_batching_on_and_off_per_worker_layout():
    configs = benchmark.serve_configs({"workers": ["1x0", "2x1"], "batch_size": 8, "max_batch_delay": 5})
    assert [(c.batch_size, c.max_batch_delay, c.workers, c.threads) for c in configs] == [
        (8, 5, 1, 0), (1, 0, 1, 0), (8, 5, 2, 1), (1, 0, 2, 1)]
    assert configs[0].labels["batching"] == "on (8, 5 ms)" and configs[1].labels["batching"] == "off (1)"
    assert configs[0].labels["worker_threads"].endswith("(default)") and configs[2].labels["worker_threads"] == "2 × 1"
    assert len({config.archive_name("resnet50") for config in configs}) == 4
    run_archive = configs[0].archive_name("mobilenet_v2 (2025-01-31_142233)")
    assert run_archive == "mobilenet_v2-2025-01-31_142233-batch8-workers1-threads0"


@pytest.mark.parametrize("text, layout", [("1x0", (1, 0)), ("2X1", (2, 1)), ("3", (3, 0))])
def test_parse_workers(text, layout):
    assert benchmark.parse_workers(text) == layout


@pytest.mark.parametrize("text", ["0x1", "x2", "2x-1", "twoxone"])
def test_parse_workers_refuses_nonsense(text):
    with pytest.raises(argparse.ArgumentTypeError, match="WORKERSxTHREADS"):
        benchmark.parse_workers(text)


def test_served_verdicts_name_the_best_configuration_per_target():
    rows = [{"model": "m", "batching": "on (8, 5 ms)", "worker_threads": "1 × 2 (default)", "concurrency": 8,
             "mean_batch": 8.0, "bare_batch": 8, "served_vs_bare": 0.93, "p50_ms": 500.0},
            {"model": "m", "batching": "off (1)", "worker_threads": "1 × 2 (default)", "concurrency": 1,
             "mean_batch": 1.0, "bare_batch": 1, "served_vs_bare": 0.8, "p50_ms": 66.0, "p50_over_bare_ms": 6.0,
             "p50_over_forward_ms": 4.5, "forward_ms": 61.5},
            {"model": "m", "batching": "on (8, 5 ms)", "worker_threads": "1 × 2 (default)", "concurrency": 1,
             "mean_batch": 1.0, "bare_batch": 1, "served_vs_bare": 0.7, "p50_ms": 72.0, "p50_over_bare_ms": 12.0},
            {"model": "m", "batching": "on (8, 5 ms)", "worker_threads": "1 × 2 (default)", "concurrency": 4,
             "mean_batch": 4.0, "p50_ms": 300.0}]  # no bare figure at batch 4: not compared
    throughput, latency, overhead = benchmark.served_verdicts(rows)
    assert ("PASS, best 0.930 (batching on (8, 5 ms), 1 × 2 (default), concurrency 8, mean batch 8.0 vs bare 8)"
            in throughput)
    assert "PASS, best +6.0 ms (p50 66.0 ms, +4.5 ms over the worker's own forward pass of 61.5 ms (bare: 60.0 ms); " \
           "batching off (1)" in latency
    assert "(p50 − worker forward): PASS, best +4.5 ms (batching off (1)" in overhead
    rows[0]["served_vs_bare"] = 0.85
    rows[1]["p50_over_bare_ms"] = 10.5
    throughput, latency, _ = benchmark.served_verdicts(rows)
    assert ": FAIL, best 0.850" in throughput and ": FAIL, best +10.5 ms" in latency


def test_served_verdicts_also_compare_with_the_workers_own_forward_passes():
    rows = [{"model": "m", "batching": "off (1)", "worker_threads": "2 × 1", "concurrency": 1, "forward_share": 0.5,
             "p50_ms": 70.0, "forward_ms": 62.0, "p50_over_forward_ms": 8.0},
            {"model": "m", "batching": "off (1)", "worker_threads": "2 × 1", "concurrency": 8, "forward_share": 0.95},
            {"model": "m", "batching": "on (8, 5 ms)", "worker_threads": "1 × 2", "concurrency": 32,
             "forward_share": 0.88}]
    share, overhead = benchmark.served_verdicts(rows)  # no bare section: only the workers' own figures
    assert "forward share): PASS, best 0.950 (batching off (1), 2 × 1, concurrency 8)" in share
    assert "(p50 − worker forward): PASS, best +8.0 ms" in overhead
    rows[1]["forward_share"] = 0.5  # at concurrency 1 the share is low by nature: not counted
    assert "FAIL, best 0.880" in benchmark.served_verdicts(rows)[0]


def test_served_figures_are_compared_with_bare_at_the_batch_size_run():
    bare_rows = [{"model": "resnet50", "variant": "decode + preprocess, 2 threads", "batch": 1, "photos_per_s": 40.0},
                 {"model": "resnet50", "variant": "decode + preprocess, 1 thread", "batch": 1, "photos_per_s": 80.0},
                 {"model": "resnet50", "variant": "baseline", "batch": 1, "photos_per_s": 10.0},
                 {"model": "resnet50", "variant": "baseline", "batch": 8, "photos_per_s": 20.0},
                 {"model": "resnet50", "variant": "channels_last", "batch": 8, "photos_per_s": 99.0}]
    rates = benchmark.bare_rates(bare_rows)
    batched = {"photos_per_s": 8.0, "mean_batch": 7.3}
    benchmark.compare_with_bare(batched, "resnet50", rates)
    assert batched["bare_batch"] == 8 and batched["served_vs_bare"] == pytest.approx(0.4)
    assert batched["served_vs_pipeline"] == pytest.approx(8.0 * (1 / 20 + 1 / 40))
    between = {"photos_per_s": 8.0, "mean_batch": 7.1}  # more than 10% below 8: no bare figure to compare with
    benchmark.compare_with_bare(between, "resnet50", rates)
    assert between == {"photos_per_s": 8.0, "mean_batch": 7.1}
    single = {"photos_per_s": 5.0, "mean_batch": 1.0, "concurrency": 1, "p50_ms": 130.0, "forward_ms": 120.0}
    benchmark.compare_with_bare(single, "resnet50", rates)
    assert single["bare_batch"] == 1 and single["served_vs_bare"] == pytest.approx(0.5)
    assert single["p50_over_bare_ms"] == pytest.approx(130.0 - 100.0)  # bare batch 1: 10 photos/s
    assert single["p50_over_forward_ms"] == pytest.approx(10.0)  # the worker's own forward: 120 ms
    assert "p50_over_bare_ms" not in batched  # only single requests are compared with one forward
    unmatched = {"photos_per_s": 8.0, "mean_batch": 1.0}
    benchmark.compare_with_bare(unmatched, "mobilenet_v2", rates)
    assert unmatched == {"photos_per_s": 8.0, "mean_batch": 1.0}


@pytest.mark.server
@pytest.mark.skipif(shutil.which("java") is None, reason="TorchServe needs Java")
def test_serving_sections_against_a_real_torchserve():
    settings = {"run": None, "arch": ["mobilenet_v2"], "workers": ["2x1"], "batch_size": 2, "max_batch_delay": 5,
                "concurrency": [1, 2], "requests": 4, "max_load_seconds": 20.0, "warm_up_requests": 6}
    photos = benchmark.generate_photos(4, size=(64, 48))
    subjects = benchmark.load_subjects(None, settings["arch"], {}, photos)
    bare_rows = [{"model": "mobilenet_v2", "variant": "baseline", "batch": 1, "photos_per_s": 10.0}]
    served, startup = benchmark.bench_serving(subjects, photos, settings, bare_rows, with_load=True)
    assert [(row["batching"], row["worker_threads"], row["concurrency"]) for row in served["rows"]] == [
        ("on (2, 5 ms)", "2 × 1", 1), ("on (2, 5 ms)", "2 × 1", 2),
        ("off (1)", "2 × 1", 1), ("off (1)", "2 × 1", 2)]
    assert all(row["errors"] == 0 and row["requests"] >= 4 for row in served["rows"])
    assert all(1 <= row["mean_batch"] <= 2 and row["forward_ms"] > 0 for row in served["rows"])
    assert all(0 < row["forward_share"] <= 1.05 for row in served["rows"])  # 5%: timer and rate windows differ
    assert all(row["frontend_cpu_ms"] > 0 and row["worker_cpu_ms"] > 0 and row["cores_busy"] > 0
               for row in served["rows"])
    compared = [row for row in served["rows"] if "bare_batch" in row]  # mean batch 1 (within 10%)
    assert compared and all(row["bare_batch"] == 1 and row["served_vs_bare"] > 0 for row in compared)
    assert all(0 < row["backend_ms"] < row["p50_ms"] + row["p99_ms"] and row["queue_ms"] >= 0 for row in served["rows"])
    single = [row for row in served["rows"] if row["concurrency"] == 1]
    assert all(row["p50_over_bare_ms"] == pytest.approx(row["p50_ms"] - 100.0) for row in single)
    assert all(0 < row["p50_over_forward_ms"] < row["p50_ms"] for row in single)
    assert len(served["verdict"]) == 4 and all(line in served["legend"] for line in served["verdict"])
    assert [row["workers"] for row in startup["rows"]] == [2, 2]  # both workers READY before the load
    assert all(row["ready_s"] > row["api_s"] > 0 and row["worker_uss_mb"] > 0 for row in startup["rows"])


def test_main_writes_tables_and_raw_figures(tmp_path, capsys):
    output, raw = tmp_path / "bench.md", tmp_path / "bench.json"
    benchmark.main(["--sections", "index", "--sizes", "400", "--dim", "8", "--queries", "10", "--ef-search", "16",
                    "--hnsw-m", "32", "--no-hnsw-sq8", "--nprobe", "4", "--ivf-max-size", "1k", "--output", str(output),
                    "--json", str(raw)])
    report = output.read_text()
    assert "Machine:" in report and "torch " in report and "faiss " in report
    assert "## index" in report
    assert "| vectors | index | settings | auto | build s | index MB |" in report
    assert report in capsys.readouterr().out
    figures = json.loads(raw.read_text())
    assert figures["machine"]["logical_cores"] >= 1
    types = [row["type"] for row in figures["sections"]["index"]["rows"]]
    assert types[0] == "flat" and types[-1] == "ivf" and set(types[1:-1]) == {"hnsw"}  # --no-hnsw-sq8


def test_main_bare_section_prints_the_knob_table(capsys):
    benchmark.main(["--sections", "bare", "--arch", "mobilenet_v2", "--batches", "1", "--knob-batch", "2",
                    "--num-photos", "2", "--photo-size", "64x48", "--crops", "160", "--no-compile",
                    "--min-seconds", "0", "--threads", "1", "--phone-photos", "1"])
    out = capsys.readouterr().out
    assert "| model | variant | batch | ms/batch | photos/s | × baseline | compile s | max abs Δprob |" in out
    for variant in ("decode + preprocess", "| baseline | 1 |", "| baseline | 2 |", "layout mkldnn", "layout none",
                    "int8 dynamic Linear", "torch.compile", "crop 160 (resize 183)",
                    "phone photo 4032x3024: decode + preprocess, JPEG draft (as served)"):
        assert variant in out
    assert "BatchNorm calibrated on 2 photos" in out


def test_unknown_section_is_refused():
    with pytest.raises(SystemExit, match="unknown section"):
        benchmark.main(["--sections", "bare,gpu"])
