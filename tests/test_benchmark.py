"""The benchmark harness on tiny sizes: its figures are computed right, each section runs and its
table has the promised columns with sane values.

No timing is asserted: speed is what the benchmark reports, not what tests check.
"""
import faiss  # (before torch: OpenMP, see README)

import argparse
import json
import shutil
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import numpy as np
import pytest
import torch

from marketplace_search.images import decode_image
from marketplace_search.models import MarketplaceNet, serving_layout
from marketplace_search.presets import Preprocess
from scripts import api
from scripts.benchmark import __main__ as cli
from scripts.benchmark import bare, index, photos, report, served, subjects

TINY = Preprocess(resize=40, crop=32)


@pytest.fixture(autouse=True)
def global_state():
    """The benchmark sets torch's and Faiss's thread counts and seeds torch: every test leaves them as found."""
    threads, faiss_threads = torch.get_num_threads(), faiss.omp_get_max_threads()
    with torch.random.fork_rng(devices=[]):
        yield
    torch.set_num_threads(threads)
    faiss.omp_set_num_threads(faiss_threads)


def headings(section: dict) -> list[str]:
    """The column headings of a section's rendered table."""
    header = report.markdown_table(section["rows"], section["columns"]).splitlines()[0]
    return [cell.strip() for cell in header.strip("|").split("|")]


def tiny_subject(trained: bool = False) -> tuple[subjects.Subject, list[bytes]]:
    """A calibrated resnet18 with 3 classes at a 32-pixel crop, and the 4 photos it was calibrated on."""
    torch.manual_seed(0)
    model = MarketplaceNet("resnet18", 3, embedding_dim=16)
    generated = photos.generate_photos(4, size=(48, 40))
    subjects.calibrate_batchnorm(model, photos.preprocess_photos(generated, TINY))
    return subjects.Subject("tiny", model, TINY, "test", trained=trained), generated


# ---------------------------------------------------------------- shared helpers and report

def test_markdown_table_has_the_columns_and_blank_missing_values():
    table = report.markdown_table([{"a": 1234, "b": 0.5}, {"a": "x|y"}], [("a", "A"), ("b", "B s")])
    lines = table.splitlines()
    assert lines[0] == "| A | B s |"
    assert lines[1] == "|---|---|"
    assert lines[2] == "| 1,234 | 0.50 |"
    assert lines[3] == "| x\\|y |  |"


def test_timed_sections_render_with_their_table():
    section = cli.timed(lambda: {"rows": [{"a": 1}], "columns": [("a", "A")], "legend": "legend"})
    assert section["seconds"] >= 0 and len(section["load_average"]) == 2
    rendered = report.render_section("demo", section, cores=2)
    assert rendered.startswith("## demo") and report.markdown_table(section["rows"], section["columns"]) in rendered


@pytest.mark.parametrize("text, size", [("10k", 10_000), ("1M", 1_000_000), ("2500", 2500), ("1.5k", 1500)])
def test_parse_size(text, size):
    assert cli.parse_size(text) == size


def test_generated_photos_are_decodable_jpegs():
    generated = photos.generate_photos(3, size=(64, 48))
    assert all(photo[:2] == b"\xff\xd8" for photo in generated)
    assert decode_image(generated[0]).size == (64, 48)
    assert len(set(generated)) == 3


def test_read_photos_samples_image_files_only(tmp_path):
    for number, photo in enumerate(photos.generate_photos(3, size=(32, 24))):
        (tmp_path / f"photo-{number}.jpg").write_bytes(photo)
    (tmp_path / "notes.txt").write_text("not a photo")
    assert len(photos.read_photos(tmp_path, 2)) == 2
    assert sorted(photos.read_photos(tmp_path, 10)) == sorted(p.read_bytes() for p in tmp_path.glob("*.jpg"))
    with pytest.raises(FileNotFoundError, match="not a folder"):
        photos.read_photos(tmp_path / "missing", 2)


def test_read_test_set_takes_test_photos_and_labels(tmp_path):
    generated = photos.generate_photos(4, size=(32, 24))
    (tmp_path / "photos").mkdir()
    for number, photo in enumerate(generated):
        (tmp_path / "photos" / f"img-{number}.jpg").write_bytes(photo)
    (tmp_path / "split.csv").write_text("image_id,product_id,label,split\nimg-0,p0,0,train\nimg-1,p1,2,test\n"
                                        "img-2,p2,1,val\nimg-3,p3,1,test\n")
    test_photos, labels = photos.read_test_set(tmp_path, 10)
    assert test_photos == [generated[1], generated[3]]
    assert labels.tolist() == [2, 1]


def test_load_subjects_calibrates_fresh_models():
    [subject] = subjects.load_subjects(None, ["mobilenet_v2"], {}, photos.generate_photos(4, size=(48, 40)))
    assert subject.name == "mobilenet_v2" and not subject.trained
    batchnorm = subject.model.backbone.features[0][1]
    assert batchnorm.running_var.mean() != pytest.approx(1.0)  # calibrated, not the fresh 1.0
    assert not subject.model.training


# ---------------------------------------------------------------- bare

def tiny_bare_settings(**overrides) -> dict:
    settings = {"threads": 1, "knob_batch": 2, "batches": [1, 2], "crops": [24], "compile": False,
                "min_seconds": 0.0, "min_repeats": 1, "phone_photos": 0}
    return {**settings, **overrides}


def test_output_drift_of_a_known_change():
    probabilities = np.array([[0.7, 0.3], [0.4, 0.6]], np.float32)
    embeddings = np.array([[1.0, 0.0], [0.0, 1.0]], np.float32)
    same = bare.output_drift((probabilities, embeddings), (probabilities, embeddings))
    assert same == {"max_abs_dprob": 0.0, "top1_agreement": 1.0, "cosine_mean": 1.0, "cosine_min": 1.0}
    flipped = np.array([[0.7, 0.3], [0.6, 0.4]], np.float32)  # second photo changes category
    turned = np.array([[1.0, 0.0], [np.sqrt(0.5), np.sqrt(0.5)]], np.float32)  # 45 degrees
    drift = bare.output_drift((probabilities, embeddings), (flipped, turned))
    assert drift["max_abs_dprob"] == pytest.approx(0.2)
    assert drift["top1_agreement"] == 0.5
    assert drift["cosine_min"] == pytest.approx(np.sqrt(0.5))
    assert drift["cosine_mean"] == pytest.approx((1 + np.sqrt(0.5)) / 2)


def test_time_round_robin_calls_each_function_in_turns():
    order = []
    calls = {"a": (lambda: order.append("a"), 1), "b": (lambda: order.append("b"), 1)}
    times = bare.time_round_robin(calls, min_seconds=0, min_repeats=3)
    assert order == ["a", "b"] * 4  # one untimed warm-up each, then 3 timed rounds
    assert [len(times["a"]), len(times["b"])] == [3, 3]


def test_phone_photo_rows_time_draft_against_full_decoding_and_state_the_output_change():
    subject, _ = tiny_subject()
    settings = tiny_bare_settings(phone_photos=2, phone_size=(400, 320))
    draft, full = bare.bench_phone_decode(subject, settings, {"min_seconds": 0.0, "min_repeats": 1})
    assert "draft" in draft["variant"] and "full" in full["variant"]
    assert draft["photos_per_s"] > 0 and full["photos_per_s"] > 0
    assert draft["speedup"] == pytest.approx(draft["photos_per_s"] / full["photos_per_s"])
    # 400x320 decodes at 1/8 scale for a 40-pixel resize: other pixels, nearly the same embedding
    assert 0.9 < draft["cosine_min"] < 1.0 and draft["max_abs_dprob"] > 0


def test_bench_subject_rows_cover_every_knob_with_output_effects():
    subject, generated = tiny_subject(trained=True)
    labels = np.array([0, 1, 2])
    rows = bare.bench_subject(subject, generated, tiny_bare_settings(), test_set=(generated[:3], labels))

    variants = [row["variant"] for row in rows]
    assert variants[0].startswith("decode") and not variants[1].startswith("decode")  # 1 thread: one decode row
    assert variants[1:3] == ["baseline", "baseline"]
    served_layout = serving_layout("resnet18")
    assert {"layout nhwc", "layout none", "layout mkldnn"} - {f"layout {served_layout}"} <= set(variants)
    assert f"layout {served_layout}" not in variants  # that one is the baseline
    assert {"NCHW + no_grad (the handler before tuning)", "int8 dynamic Linear", "torch.compile"} <= set(variants)
    assert any(variant.startswith("crop 24") for variant in variants)
    by_name = {(row["variant"], row["batch"]): row for row in rows}
    baseline = by_name["baseline", 2]
    assert baseline["max_abs_dprob"] == 0 and baseline["top1_agreement"] == 1
    assert baseline["speedup"] == pytest.approx(1.0)
    assert 0 <= baseline["test_accuracy"] <= 1 and baseline["test_top1_agreement"] == 1
    assert baseline["note"] == f"layout {served_layout}"
    for layout in {"nhwc", "none", "mkldnn"} - {served_layout}:  # the same network in other memory layouts
        row = by_name[f"layout {layout}", 2]
        assert row["cosine_min"] > 0.9999 and row["top1_agreement"] == 1 and row["photos_per_s"] > 0
    assert by_name["torch.compile", 2]["note"].startswith("skipped")
    assert "photos_per_s" not in by_name["torch.compile", 2]
    assert all(row["photos_per_s"] > 0 and row["ms_per_batch"] > 0 for row in rows if "photos_per_s" in row)
    assert all(0 <= row["top1_agreement"] <= 1 for row in rows if "top1_agreement" in row)


def test_torch_compile_failure_is_a_skipped_row_with_the_reason(monkeypatch):
    def broken_compile(model):
        def fail(images):
            raise RuntimeError("InvalidCxxCompiler: No working C++ compiler found\nmore detail")
        return fail

    monkeypatch.setattr(bare.torch, "compile", broken_compile)
    variant = bare.compiled_variant(torch.nn.Identity(), TINY, 1, torch.zeros(1, 3, 32, 32))
    assert variant.forward is None and variant.compile_seconds is None
    assert variant.note.startswith("skipped") and "InvalidCxxCompiler" in variant.note
    assert "more detail" not in variant.note  # the first line of the reason only: it goes into a table cell


def test_main_bare_section_has_a_row_per_knob_and_the_promised_columns(tmp_path):
    raw = tmp_path / "bench.json"
    cli.main(["--sections", "bare", "--arch", "mobilenet_v2", "--batches", "1", "--knob-batch", "2",
              "--num-photos", "2", "--photo-size", "64x48", "--crops", "160", "--no-compile",
              "--min-seconds", "0", "--threads", "1", "--phone-photos", "1", "--json", str(raw)])
    section = json.loads(raw.read_text())["sections"]["bare"]
    section["columns"] = bare.BARE_COLUMNS
    assert {"model", "variant", "batch", "ms/batch", "photos/s", "× baseline", "max abs Δprob", "top-1 agree",
            "cos min"} <= set(headings(section))
    rows = section["rows"]
    assert [(row["variant"], row["batch"]) for row in rows if row["variant"] == "baseline"] == [("baseline", 1),
                                                                                              ("baseline", 2)]
    variants = {row["variant"] for row in rows}
    assert {"int8 dynamic Linear", "torch.compile"} <= variants
    assert any(variant.startswith("crop 160") for variant in variants)
    assert sum(variant.startswith("phone photo") for variant in variants) == 2  # draft and full decoding
    backends = [row for row in rows if row["variant"].startswith("backend ")]
    assert {"backend torch fp32", "backend openvino fp32"} <= {row["variant"] for row in backends}
    assert {row["batch"] for row in backends} == {1, 2}
    assert all(row["speedup"] == 1.0 for row in backends if row["variant"] == "backend torch fp32")
    assert all(row["cosine_min"] > 0.99 for row in backends if row["variant"] == "backend openvino fp32" and
               row["batch"] == 2)  # the same network, converted
    assert all(row["photos_per_s"] > 0 for row in rows if "photos_per_s" in row)
    assert all(0 <= row["top1_agreement"] <= 1 and -1 <= row["cosine_min"] <= 1.0001
               for row in rows if "top1_agreement" in row)
    assert section["seconds"] > 0 and list(section["models"]) == ["mobilenet_v2"]


# ---------------------------------------------------------------- index

def tiny_index_settings(**overrides) -> dict:
    settings = {"dim": 8, "queries": 20, "single_queries": 5, "filtered_queries": 5, "sizes": [300],
                "hnsw_m": [16, 32], "hnsw_m_max_size": 1000, "ef_search": [16, 64], "nprobe": [2, 4],
                "ivf_max_size": 1000, "hnsw_sq8": True}
    return {**settings, **overrides}


def test_recall_at_k_counts_shared_ids_and_ignores_missing():
    exact = np.array([[1, 2, 3], [4, 5, 6]])
    found = np.array([[3, 1, 9], [-1, -1, -1]])  # 2 of 3, then nothing found
    assert index.recall_at_k(found, exact, k=3) == pytest.approx(1 / 3)
    assert index.recall_at_k(exact, exact, k=3) == 1.0


def test_clustered_vectors_are_normalised_and_closer_than_random():
    vectors, clusters = index.clustered_vectors(2000, 32, seed=1, clusters=20)
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


def test_bench_index_measures_flat_hnsw_and_ivf_against_exact_search():
    section = index.bench_index(tiny_index_settings())
    assert {"vectors", "index", "build s", "index MB", "1 query p50 ms", "p95 ms", "recall@10",
            "filtered recall@10"} <= set(headings(section))
    rows = section["rows"]
    swept = sorted({16, 64, index.search_default("ef_search")})  # the shipped value is always added
    assert [row["type"] for row in rows] == (["flat"] + ["hnsw"] * 2 * len(swept) + ["hnsw_sq8"] * len(swept)
                                             + ["ivf"] * 2 + ["ivfpq"])
    flat = rows[0]
    assert flat["recall_at_10"] == 1.0 and flat["auto"] == "yes"  # 300 vectors: auto is exact search
    assert all(0 <= row["recall_at_10"] <= 1 for row in rows)
    assert all(row["index_mb"] > 0 and row["build_s"] >= 0 for row in rows)
    assert all(0 < row["p50_ms"] <= row["p95_ms"] and 0 < row["p50_ms_1t"] <= row["p95_ms_1t"] for row in rows)
    hnsw = [row.get("efSearch") for row in rows if row["type"] == "hnsw"]
    assert hnsw == swept * 2
    sq8 = [row for row in rows if row["type"] == "hnsw_sq8"]
    assert [row["efSearch"] for row in sq8] == swept and not any(row["auto"] for row in sq8)
    same_graph = [r["index_mb"] for r in rows if r["type"] == "hnsw" and r["M"] == sq8[0]["M"]]
    assert all(row["index_mb"] < min(same_graph) for row in sq8)  # same M, vectors in a quarter of the bytes
    assert [row.get("nprobe") for row in rows if row["type"] == "ivf"] == [2, 4]
    assert flat["filtered_recall_at_10"] == 1.0
    assert all(0 <= row["filtered_recall_at_10"] <= 1 and row["filtered_p50_ms_1t"] > 0 for row in rows)
    assert "NOT MEASURED" in section["verdict"]  # 300 vectors, not the 1M of the target


def test_nprobe_beyond_the_number_of_lists_gives_one_row():
    vectors, _ = index.clustered_vectors(300, 8, seed=3)
    workload = index.Workload("synthetic", vectors[:280], vectors[280:], np.zeros(280, int), np.zeros(20, int),
                              filtered_queries=2)
    ivf, params, _ = index.timed_build(workload.vectors, "ivf")
    index.exact_answers(index.search.build_index(workload.vectors, "flat")[0], workload)
    rows = index.sweep_rows(ivf, params, {}, workload, 3, "nprobe", [2, ivf.nlist, 4 * ivf.nlist])
    assert [row["nprobe"] for row in rows] == [2, ivf.nlist]  # 4 x nlist searches the same lists as nlist


def test_filtered_search_returns_only_the_query_category():
    vectors, clusters = index.clustered_vectors(500, 8, seed=2, clusters=20)
    categories = clusters % 3
    workload = index.Workload("synthetic", vectors[:450], vectors[450:], categories[:450], categories[450:],
                              filtered_queries=10)
    flat, _ = index.search.build_index(workload.vectors, "flat")
    for row in range(10):
        found = workload.search_filtered(flat, row)
        assert set(categories[found]) == {workload.query_categories[row]}
        same_category = categories[:450] == workload.query_categories[row]
        similarities = np.where(same_category, vectors[:450] @ vectors[450 + row], -np.inf)
        np.testing.assert_array_equal(np.sort(found), np.sort(np.argsort(-similarities)[:10]))


def test_run_workload_holds_out_a_tenth_of_the_run_embeddings(tmp_path):
    from training.embed import save_embeddings

    vectors, clusters = index.clustered_vectors(50, 8, seed=3)
    image_ids = [f"img-{i}" for i in range(50)]
    save_embeddings(tmp_path / "embeddings", image_ids, vectors, np.zeros((50, 3), np.float32), {})
    listings = {image_id: {"category": f"cat-{cluster % 3}"} for image_id, cluster in zip(image_ids, clusters)}
    (tmp_path / "index").mkdir()
    (tmp_path / "index" / "listings.json").write_text(json.dumps(listings))
    workload = index.run_workload(tmp_path, {"queries": 100, "filtered_queries": 3})
    assert (len(workload.vectors), len(workload.queries)) == (45, 5)
    assert workload.data == "run" and set(workload.categories) <= {"cat-0", "cat-1", "cat-2"}
    rows = {tuple(row) for row in np.round(workload.vectors, 6)} | {tuple(row) for row in np.round(workload.queries, 6)}
    assert len(rows) == 50  # every photo once, catalogue and queries disjoint


def test_auto_rows_follow_build_index_above_flat_max(monkeypatch):
    monkeypatch.setattr(index.search, "FLAT_MAX", 100)
    rows = index.bench_index(tiny_index_settings(ivf_max_size=0))["rows"]
    auto = [(row["type"], row.get("M"), row.get("efSearch")) for row in rows if row["auto"]]
    assert auto == [("hnsw", index.search_default("hnsw_m"), index.search_default("ef_search"))]


def test_index_verdict_passes_only_at_the_target_size():
    row = {"vectors": 1_000_000, "type": "hnsw", "settings": "M=32", "p50_ms": 1.0, "p95_ms": 9.0,
           "p50_ms_1t": 1.0, "p95_ms_1t": 2.0, "recall_at_10": 0.96, "threads": 2}
    row["target"] = index.target_status(row)
    assert row["target"] == "1 thread"  # p95 over the target with 2 threads, under it with 1
    assert "PASS" in index.index_verdict([row])
    assert "FAIL" in index.index_verdict([{**row, "target": ""}])
    assert "NOT MEASURED" in index.index_verdict([{**row, "vectors": 100_000}])
    assert index.target_status({**row, "recall_at_10": 0.9}) == ""  # fast, but below the recall target


def test_main_index_section_writes_tables_and_raw_figures(tmp_path, capsys):
    output, raw = tmp_path / "bench.md", tmp_path / "bench.json"
    cli.main(["--sections", "index", "--sizes", "400", "--dim", "8", "--queries", "10", "--ef-search", "16",
              "--hnsw-m", "32", "--no-hnsw-sq8", "--nprobe", "4", "--ivf-max-size", "1k", "--output", str(output),
              "--json", str(raw)])
    markdown = output.read_text()
    assert markdown in capsys.readouterr().out
    figures = json.loads(raw.read_text())
    assert figures["machine"]["logical_cores"] >= 1 and list(figures["sections"]) == ["index"]
    section = {**figures["sections"]["index"], "columns": index.INDEX_COLUMNS}
    assert report.markdown_table(section["rows"], section["columns"]) in markdown
    types = [row["type"] for row in section["rows"]]
    assert types[0] == "flat" and types[-2:] == ["ivf", "ivfpq"] and set(types[1:-2]) == {"hnsw"}  # --no-hnsw-sq8
    assert all(row["vectors"] == 400 and 0 <= row["recall_at_10"] <= 1 and row["p95_ms"] > 0
               for row in section["rows"])


def test_unknown_section_is_refused():
    with pytest.raises(SystemExit, match="unknown section"):
        cli.main(["--sections", "bare,gpu"])


# ---------------------------------------------------------------- served and startup

METRICS_TEXT = """# TYPE MarketplaceBatches counter
MarketplaceBatches{BatchSize="8",Level="Model",Hostname="vm",ModelName="bench"} 3.0
MarketplaceBatches{BatchSize="2",Level="Model",Hostname="vm",ModelName="bench"} 1.0
# TYPE MarketplaceStageMilliseconds counter
MarketplaceStageMilliseconds{Stage="decode",BatchSize="8",Level="Model",Hostname="vm",ModelName="bench"} 300.0
MarketplaceStageMilliseconds{Stage="forward",BatchSize="8",Level="Model",Hostname="vm",ModelName="bench"} 1200.0
MarketplaceStageMilliseconds{Stage="search",BatchSize="8",Level="Model",Hostname="vm",ModelName="bench"} 6.0
MarketplaceStageMilliseconds{Stage="answer",BatchSize="8",Level="Model",Hostname="vm",ModelName="bench"} 3.0
MarketplaceStageMilliseconds{Stage="decode",BatchSize="2",Level="Model",Hostname="vm",ModelName="bench"} 20.0
MarketplaceStageMilliseconds{Stage="forward",BatchSize="2",Level="Model",Hostname="vm",ModelName="bench"} 100.0
MarketplaceStageMilliseconds{Stage="search",BatchSize="2",Level="Model",Hostname="vm",ModelName="bench"} 1.0
MarketplaceStageMilliseconds{Stage="answer",BatchSize="2",Level="Model",Hostname="vm",ModelName="bench"} 0.5
ts_inference_requests_total{model_name="bench",model_version="default",} 26.0
ts_inference_requests_total{model_name="other",model_version="default",} 99.0
ts_inference_latency_microseconds{model_name="bench",model_version="default",} 1300000.0
ts_queue_latency_microseconds{model_name="bench",model_version="default",} 52000.0
"""


class PhotoEndpoint(BaseHTTPRequestHandler):
    """Answers a JPEG POST with JSON, a body starting with b"bad" with HTTP 400 and one starting with
    b"busy" with 503 (overload); GET /metrics answers a Prometheus page like TorchServe's."""

    def do_GET(self):
        self.answer(200, METRICS_TEXT.encode())

    def do_POST(self):
        body = self.rfile.read(int(self.headers["Content-Length"]))
        if body.startswith(b"busy"):
            self.answer(503, json.dumps({"message": "queue full"}).encode())
        elif self.headers["Content-Type"] == "image/jpeg":
            self.answer(200, json.dumps({"category": "Home"}).encode())
        else:
            self.answer(400, json.dumps({"error": "bad photo"}).encode())

    def answer(self, status: int, payload: bytes):
        self.send_response(status)
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
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


def test_load_test_counts_answers_and_errors(photo_endpoint):
    jpegs = photos.generate_photos(2, size=(32, 24))
    figures = served.load_test(api.prediction_url(photo_endpoint, "tiny"), [*jpegs, b"bad"], concurrency=3, total=9)
    assert figures["requests"] == 9 and figures["errors"] == 3
    assert "400" in figures["note"] and "bad photo" in figures["note"]  # the server's own message
    assert figures["photos_per_s"] > 0 and figures["wall_s"] > 0 and figures["client_cpu_ms"] > 0
    assert 0 < figures["p50_ms"] <= figures["p95_ms"] <= figures["p99_ms"]


def test_load_test_counts_an_overloaded_server_as_errors_without_asking_again(photo_endpoint):
    jpegs = photos.generate_photos(1, size=(32, 24))
    figures = served.load_test(api.prediction_url(photo_endpoint, "tiny"), [*jpegs, b"busy"], concurrency=2, total=6)
    assert figures["requests"] == 6 and figures["errors"] == 3  # each 503 once: a failure, not a retry
    assert "503" in figures["note"]


def test_load_test_fails_when_nothing_is_answered(photo_endpoint):
    with pytest.raises(RuntimeError, match="all 2 requests .* failed; first: HTTP 400"):
        served.load_test(api.prediction_url(photo_endpoint, "tiny"), [b"bad"], concurrency=1, total=2)


def test_steady_rate_leaves_out_each_clients_first_answer():
    # Two clients: answers at 10 s and 10.5 s (ramp-up), then one every second.
    assert served.steady_rate([10.0, 10.5, 11.5, 12.5, 13.5], concurrency=2) == pytest.approx(3 / 3.0)
    assert served.steady_rate([13.5, 10.0, 12.5, 10.5, 11.5], concurrency=2) == pytest.approx(1.0)  # any order
    assert served.steady_rate([1.0, 2.0], concurrency=2) is None  # nothing after the ramp-up
    assert served.steady_rate([1.0, 1.0, 1.0], concurrency=1) is None  # no time to divide by


def test_handler_counters_give_mean_batch_and_ms_per_batch_of_each_stage(photo_endpoint):
    counters = served.handler_counters(api.metrics_text(photo_endpoint))
    assert counters == {"batches": {8: 3.0, 2: 1.0}, "decode": {8: 300.0, 2: 20.0}, "forward": {8: 1200.0, 2: 100.0},
                        "search": {8: 6.0, 2: 1.0}, "answer": {8: 3.0, 2: 0.5}}
    before = {"batches": {8: 1.0}, "decode": {8: 100.0}, "forward": {8: 400.0}, "search": {8: 2.0},
              "answer": {8: 1.0}}
    # Since `before`: two batches of 8 and one of 2.
    assert served.batch_figures(before, counters) == {
        "mean_batch": pytest.approx((2 * 8 + 2) / 3), "decode_ms": pytest.approx(220 / 3),
        "forward_ms": pytest.approx(900 / 3), "search_ms": pytest.approx(5 / 3), "answer_ms": pytest.approx(2.5 / 3)}
    assert served.batch_figures(counters, counters) == {"mean_batch": None}


def test_frontend_counters_of_the_served_model_give_worker_and_queue_time():
    after = served.frontend_counters(METRICS_TEXT)
    assert after == {"ts_inference_requests_total": 26.0, "ts_inference_latency_microseconds": 1_300_000.0,
                     "ts_queue_latency_microseconds": 52_000.0}  # the other model's requests left out
    before = {"ts_inference_requests_total": 6.0, "ts_inference_latency_microseconds": 300_000.0,
              "ts_queue_latency_microseconds": 12_000.0}
    assert served.backend_times(before, after) == {"backend_ms": pytest.approx(50.0), "queue_ms": pytest.approx(2.0)}
    assert served.backend_times(after, after) == {}


def test_forward_share_is_the_workers_time_in_forward_passes():
    # 2 workers, batches of 4 taking 200 ms: each worker can do 20 photos/s; 30 served is 75% of that.
    assert served.forward_share({"photos_per_s": 30.0, "forward_ms": 200.0, "mean_batch": 4.0}, workers=2) == {
        "forward_share": pytest.approx(0.75)}
    assert served.forward_share({"photos_per_s": 30.0, "mean_batch": None}, workers=1) == {}


def test_cpu_figures_per_request_and_cores_busy():
    figures = {"requests": 10, "wall_s": 2.0, "client_cpu_ms": 5.0}
    cpu = served.cpu_figures({"frontend": 1.0, "workers": 3.0}, {"frontend": 1.1, "workers": 6.0}, figures)
    assert cpu == {"frontend_cpu_ms": pytest.approx(10.0), "worker_cpu_ms": pytest.approx(300.0),
                   "cores_busy": pytest.approx((0.1 + 3.0 + 0.05) / 2.0)}


def test_serve_configs_pair_batching_on_and_off_per_worker_layout():
    configs = served.serve_configs({"workers": ["1x0", "2x1"], "batch_size": 8, "max_batch_delay": 5})
    assert [(c.batch_size, c.max_batch_delay, c.workers, c.threads) for c in configs] == [
        (8, 5, 1, 0), (1, 0, 1, 0), (8, 5, 2, 1), (1, 0, 2, 1)]
    assert configs[0].labels["batching"] == "on (8, 5 ms)" and configs[1].labels["batching"] == "off (1)"
    assert configs[0].labels["worker_threads"].endswith("(default)") and configs[2].labels["worker_threads"] == "2 × 1"
    assert len({config.archive_name("resnet50") for config in configs}) == 4
    run_archive = configs[0].archive_name("mobilenet_v2 (2025-01-31_142233)")
    assert run_archive == "mobilenet_v2-2025-01-31_142233-torch-fp32-batch8-workers1-threads0"
    both = served.serve_configs({"workers": ["1x0"], "batch_size": 8, "max_batch_delay": 5,
                                 "served_backends": ["torch fp32", "openvino bf16"]})
    assert [(c.backend, c.batch_size) for c in both] == [("torch fp32", 8), ("torch fp32", 1), ("openvino bf16", 8),
                                                          ("openvino bf16", 1)]
    assert both[2].labels["backend"] == "openvino bf16" and len({c.archive_name("m") for c in both}) == 4


@pytest.mark.parametrize("text, layout", [("1x0", (1, 0)), ("2X1", (2, 1)), ("3", (3, 0))])
def test_parse_workers(text, layout):
    assert served.parse_workers(text) == layout


@pytest.mark.parametrize("text", ["0x1", "x2", "2x-1", "twoxone"])
def test_parse_workers_refuses_nonsense(text):
    with pytest.raises(argparse.ArgumentTypeError, match="WORKERSxTHREADS"):
        served.parse_workers(text)


def served_row(**figures) -> dict:
    return {"model": "m", "batching": "on (8, 5 ms)", "worker_threads": "1 × 2 (default)", **figures}


def test_served_verdicts_pick_the_best_configuration_per_target():
    rows = [served_row(concurrency=8, mean_batch=8.0, bare_batch=8, served_vs_bare=0.93, p50_ms=500.0),
            served_row(batching="off (1)", concurrency=1, mean_batch=1.0, bare_batch=1, served_vs_bare=0.8,
                       p50_ms=66.0, p50_over_bare_ms=6.0, p50_over_forward_ms=4.5, forward_ms=61.5),
            served_row(concurrency=1, mean_batch=1.0, bare_batch=1, served_vs_bare=0.7, p50_ms=72.0,
                       p50_over_bare_ms=12.0),
            served_row(concurrency=4, mean_batch=4.0, p50_ms=300.0)]  # no bare figure at batch 4: not compared
    throughput, latency, overhead = served.served_verdicts(rows)
    assert "PASS" in throughput and "0.930" in throughput and "concurrency 8" in throughput  # the 0.93 row
    assert "PASS" in latency and "+6.0 ms" in latency and "off (1)" in latency  # the 6 ms row, not the 12 ms one
    assert "PASS" in overhead and "+4.5 ms" in overhead
    rows[0]["served_vs_bare"] = 0.85
    rows[1]["p50_over_bare_ms"] = 10.5
    throughput, latency, _ = served.served_verdicts(rows)
    assert "FAIL" in throughput and "0.850" in throughput
    assert "FAIL" in latency and "+10.5 ms" in latency


def test_served_verdicts_also_compare_with_the_workers_own_forward_passes():
    rows = [served_row(batching="off (1)", worker_threads="2 × 1", concurrency=1, forward_share=0.5, p50_ms=70.0,
                       forward_ms=62.0, p50_over_forward_ms=8.0),
            served_row(batching="off (1)", worker_threads="2 × 1", concurrency=8, forward_share=0.95),
            served_row(concurrency=32, forward_share=0.88)]
    share, overhead = served.served_verdicts(rows)  # no bare section: only the workers' own figures
    assert "PASS" in share and "0.950" in share and "concurrency 8" in share
    assert "PASS" in overhead and "+8.0 ms" in overhead
    rows[1]["forward_share"] = 0.5
    share, _ = served.served_verdicts(rows)
    assert "FAIL" in share and "0.880" in share  # concurrency 1 does not count, whatever its share


def test_backends_are_compared_with_torch_fp32_served_the_same_way():
    rows = [served_row(backend="torch fp32", concurrency=1, p50_ms=80.0, photos_per_s=12.0),
            served_row(backend="torch fp32", concurrency=32, photos_per_s=20.0),
            served_row(backend="openvino bf16", concurrency=1, p50_ms=40.0, photos_per_s=25.0),
            served_row(backend="openvino bf16", concurrency=32, photos_per_s=45.0),
            served_row(backend="openvino bf16", concurrency=32, photos_per_s=30.0, batching="off (1)")]
    lines = served.backend_verdicts("m", rows)
    assert len(lines) == 2  # the unbatched row has no torch fp32 row to compare with
    assert "PASS, 40.0 vs 80.0 ms" in lines[0] and "PASS, 2.25 ×" in lines[1]
    rows[3]["photos_per_s"] = 30.0
    assert "FAIL, 1.50 ×" in served.backend_verdicts("m", rows)[1]
    rates = served.bare_rates([{"model": "m", "variant": "baseline", "batch": 8, "photos_per_s": 20.0},
                               {"model": "m", "variant": "backend openvino bf16", "batch": 8, "photos_per_s": 50.0}])
    assert served.bare_key("m", "openvino bf16", rates) == "m|openvino bf16"
    assert served.bare_key("m", "torch fp32", rates) == "m"  # the baseline is torch fp32
    batched = {"photos_per_s": 45.0, "mean_batch": 8.0}
    served.compare_with_bare(batched, "m|openvino bf16", rates)
    assert batched["served_vs_bare"] == pytest.approx(0.9)


def test_served_figures_are_compared_with_bare_at_the_batch_size_run():
    bare_rows = [{"model": "resnet50", "variant": "decode + preprocess, 2 threads", "batch": 1, "photos_per_s": 40.0},
                 {"model": "resnet50", "variant": "decode + preprocess, 1 thread", "batch": 1, "photos_per_s": 80.0},
                 {"model": "resnet50", "variant": "baseline", "batch": 1, "photos_per_s": 10.0},
                 {"model": "resnet50", "variant": "baseline", "batch": 8, "photos_per_s": 20.0},
                 {"model": "resnet50", "variant": "channels_last", "batch": 8, "photos_per_s": 99.0}]
    rates = served.bare_rates(bare_rows)
    batched = {"photos_per_s": 8.0, "mean_batch": 7.3}
    served.compare_with_bare(batched, "resnet50", rates)
    assert batched["bare_batch"] == 8 and batched["served_vs_bare"] == pytest.approx(0.4)
    assert batched["served_vs_pipeline"] == pytest.approx(8.0 * (1 / 20 + 1 / 40))
    between = {"photos_per_s": 8.0, "mean_batch": 7.1}  # more than 10% below 8: no bare figure to compare with
    served.compare_with_bare(between, "resnet50", rates)
    assert between == {"photos_per_s": 8.0, "mean_batch": 7.1}
    single = {"photos_per_s": 5.0, "mean_batch": 1.0, "concurrency": 1, "p50_ms": 130.0, "forward_ms": 120.0}
    served.compare_with_bare(single, "resnet50", rates)
    assert single["bare_batch"] == 1 and single["served_vs_bare"] == pytest.approx(0.5)
    assert single["p50_over_bare_ms"] == pytest.approx(130.0 - 100.0)  # bare batch 1: 10 photos/s
    assert single["p50_over_forward_ms"] == pytest.approx(10.0)  # the worker's own forward: 120 ms
    assert "p50_over_bare_ms" not in batched  # only single requests are compared with one forward
    unmatched = {"photos_per_s": 8.0, "mean_batch": 1.0}
    served.compare_with_bare(unmatched, "mobilenet_v2", rates)
    assert unmatched == {"photos_per_s": 8.0, "mean_batch": 1.0}


@pytest.mark.server
@pytest.mark.skipif(shutil.which("java") is None, reason="TorchServe needs Java")
def test_served_and_startup_sections_against_a_real_torchserve():
    settings = {"run": None, "arch": ["mobilenet_v2"], "workers": ["2x1"], "batch_size": 2, "max_batch_delay": 5,
                "concurrency": [1, 2], "requests": 4, "max_load_seconds": 20.0, "warm_up_requests": 6}
    generated = photos.generate_photos(4, size=(64, 48))
    subjects_ = subjects.load_subjects(None, settings["arch"], {}, generated)
    bare_rows = [{"model": "mobilenet_v2", "variant": "baseline", "batch": 1, "photos_per_s": 10.0}]
    served_section, startup_section = served.bench_serving(subjects_, generated, settings, bare_rows, with_load=True)

    assert {"photos/s", "p50 ms", "p95 ms", "mean batch", "decode ms/batch", "forward ms/batch", "search ms/batch",
            "answer ms/batch", "forward share", "p50 − worker forward ms"} <= set(headings(served_section))
    rows = served_section["rows"]
    assert [(row["batching"], row["worker_threads"], row["concurrency"]) for row in rows] == [
        ("on (2, 5 ms)", "2 × 1", 1), ("on (2, 5 ms)", "2 × 1", 2),
        ("off (1)", "2 × 1", 1), ("off (1)", "2 × 1", 2)]
    assert all(row["errors"] == 0 and row["requests"] >= 4 and row["photos_per_s"] > 0 for row in rows)
    assert all(0 < row["p50_ms"] <= row["p95_ms"] <= row["p99_ms"] for row in rows)
    assert all(1 <= row["mean_batch"] <= 2 for row in rows)
    # Each stage of the handler timed per batch: the model and the decoding take time, the rest can be tiny.
    assert all(row["forward_ms"] > 0 and row["decode_ms"] > 0 and row["search_ms"] >= 0 and row["answer_ms"] >= 0
               for row in rows)
    assert all(row["decode_ms"] + row["forward_ms"] + row["search_ms"] + row["answer_ms"]
               < row["backend_ms"] * row["mean_batch"] * 1.5 for row in rows)  # the stages are inside the worker
    assert all(0 < row["forward_share"] <= 1.05 for row in rows)  # 5%: timer and rate windows differ
    assert all(row["frontend_cpu_ms"] > 0 and row["worker_cpu_ms"] > 0 and row["cores_busy"] > 0 for row in rows)
    compared = [row for row in rows if "bare_batch" in row]  # mean batch 1 (within 10%)
    assert compared and all(row["bare_batch"] == 1 and row["served_vs_bare"] > 0 for row in compared)
    assert all(0 < row["backend_ms"] < row["p50_ms"] + row["p99_ms"] and row["queue_ms"] >= 0 for row in rows)
    single = [row for row in rows if row["concurrency"] == 1]
    assert all(row["p50_over_bare_ms"] == pytest.approx(row["p50_ms"] - 100.0) for row in single)
    assert all(0 < row["p50_over_forward_ms"] < row["p50_ms"] for row in single)
    assert len(served_section["verdict"]) == 4 and all(line in served_section["legend"]
                                                       for line in served_section["verdict"])

    assert {"READY s", "workers", "worker RSS MB", "worker USS MB", "RSS after load MB"} <= set(
        headings(startup_section))
    assert [row["workers"] for row in startup_section["rows"]] == [2, 2]  # both workers READY before the load
    assert all(row["ready_s"] > row["api_s"] > 0 and row["worker_uss_mb"] > 0 and row["worker_rss_after_mb"] > 0
               for row in startup_section["rows"])


# ---------------------------------------------------------------- words
def test_copied_words_equal_words_built_from_the_copied_listings():
    from marketplace_search.text import TextNeighbours
    from scripts.benchmark.words import copied, listing_rows

    rng = np.random.default_rng(0)
    rows = [(np.sort(rng.choice(40, size, replace=False)).astype(np.int64), rng.random(size).astype(np.float32))
            for size in (3, 7, 1, 12)]
    words = TextNeighbours.from_rows(list("abcd"), [0, 1, 2, 0], rows, 40, k=3)
    three = copied(words, 3)
    built = TextNeighbours.from_rows(three.product_ids, np.tile(words.labels, 3), rows * 3, 40)
    for name in ("labels", "indptr", "rows", "values"):
        np.testing.assert_array_equal(getattr(three, name), getattr(built, name))
    assert three.k == 3 and [len(c) for c, _ in listing_rows(three)] == [3, 7, 1, 12] * 3


def test_main_words_section_reads_exactly_and_pruned_at_each_size(tmp_path, capsys):
    from scripts.benchmark import words

    output, raw = tmp_path / "bench.md", tmp_path / "bench.json"
    cli.main(["--sections", "words", "--words-sizes", "100,1k", "--words-queries", "5", "--output", str(output),
              "--json", str(raw)])
    markdown = output.read_text()
    assert markdown in capsys.readouterr().out
    section = {**json.loads(raw.read_text())["sections"]["words"], "columns": words.WORDS_COLUMNS}
    assert report.markdown_table(section["rows"], section["columns"]) in markdown
    rows = section["rows"]
    assert [row["query"] for row in rows] == ["listing's row"] * 2  # no --work: no titles
    assert rows[0]["listings"] < rows[1]["listings"] and rows[0]["entries_m"] < rows[1]["entries_m"]
    assert all(0 <= row["agreement"] <= 1 and row["exact_p50_ms"] > 0 and row["pruned_p50_ms"] > 0 for row in rows)


def test_growth_per_1000_is_the_slope_after_the_first_quarter():
    from scripts.benchmark.soak import growth_per_1000

    samples = [{"answered": n, "uss_mb": 500.0 + (300 if n <= 250 else 0) + 0.002 * n} for n in range(100, 1100, 100)]
    assert growth_per_1000(samples, "uss_mb") == pytest.approx(2.0)  # the warm-up's jump is left out
    assert growth_per_1000(samples[:1], "uss_mb") is None


@pytest.mark.server
def test_main_soak_section_answers_every_kind_and_reads_the_worker_after_each_stretch(tmp_path, capsys):
    from scripts.benchmark import soak

    raw = tmp_path / "bench.json"
    cli.main(["--sections", "soak", "--quick", "--soak-requests", "120", "--soak-every", "40", "--soak-clients", "4",
              "--json", str(raw)])
    section = {**json.loads(raw.read_text())["sections"]["soak"], "columns": soak.SOAK_COLUMNS}
    assert report.markdown_table(section["rows"], section["columns"]) in capsys.readouterr().out
    rows, summary = section["rows"], section["summary"]
    assert [row["answered"] for row in rows] == [40, 80, 120]
    assert all(row["uss_mb"] > 0 and row["rss_mb"] >= row["uss_mb"] and row["unexpected"] == 0 for row in rows)
    assert len({row["workers"] for row in rows}) == 1 and not summary["worker_restarted"]
    assert summary["answers"] == {kind: {"400" if kind == "truncated photo" else "200": 20} for kind in soak.KINDS}
    assert summary["uss_growth_mb_per_1000"] is not None and summary["ready_uss_mb"] > 0
