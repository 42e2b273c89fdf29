"""End to end: archives built from tiny runs, served by a real TorchServe on free loopback ports."""
import faiss  # noqa: F401  (before torch: both bring an OpenMP runtime, and this order is the safe one)

import base64
import io
import json
import os
import re
import threading
import time
import zipfile
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import requests
from PIL import Image

from marketplace_search.schema import ANSWER_FIELDS, check_answer
from scripts import api, client, serve, versions
from scripts.archive import build_archive
from tests.serving_fixtures import TinyRun, archive_tiny_run, make_tiny_run, png_with_declared_size, running_server

REPO = Path(__file__).resolve().parents[1]
NAME = "marketplace"


@dataclass
class Served:
    server: serve.Server
    run: TinyRun  # served as 1.0 (resnet18)
    other: TinyRun  # archived as 2.0 (mobilenet_v2, other weights)
    store: Path


@pytest.fixture(scope="module")
def runs(module_tmp) -> tuple[TinyRun, TinyRun]:
    root = module_tmp("runs")
    return (make_tiny_run(root / "2025-01-31_142233", seed=0),
            make_tiny_run(root / "2025-02-07_090000", arch="mobilenet_v2", seed=1, created="2025-02-07T09:00:00+00:00"))


@pytest.fixture(scope="module")
def served(module_tmp, runs):
    root = module_tmp("served")
    store = root / "model_store"
    v1 = archive_tiny_run(runs[0], store, version="1.0", batch_size=8, max_batch_delay=100)
    archive_tiny_run(runs[1], store, version="2.0", batch_size=8, max_batch_delay=20)
    with running_server(store, root / "torchserve", {NAME: v1.name}, enable_model_api=True) as server:
        yield Served(server, runs[0], runs[1], store)


def inference_key(server: serve.Server) -> dict:
    return api.auth_headers(server.token("inference"))


def post(served: Served, data: bytes, content_type: str | None = "image/jpeg", path: str = NAME,
         headers: dict | None = None, **options) -> requests.Response:
    headers = {**({"Content-Type": content_type} if content_type else {}), **inference_key(served.server),
               **(headers or {})}
    return requests.post(f"{served.server.inference_url}/predictions/{path}", data=data, headers=headers,
                         timeout=60, **options)


def photo(run: TinyRun, number: int) -> bytes:
    return run.photo_bytes(f"img-{number:03d}")


def tiff_16bit() -> bytes:
    buffer = io.BytesIO()
    Image.frombytes("I;16B", (40, 30), (np.arange(1200) * 50).astype(">u2").tobytes()).save(buffer, "TIFF")
    return buffer.getvalue()


@pytest.mark.server
def test_every_input_form_gets_the_same_answer(served):
    jpeg = photo(served.run, 4)
    url = f"{served.server.inference_url}/predictions/{NAME}"
    raw = post(served, jpeg)
    key = inference_key(served.server)
    multipart = requests.post(url, files={"photo": ("photo.jpg", jpeg, "image/jpeg")}, data={"k": "3"}, timeout=60,
                              headers=key)
    as_json = requests.post(url, json={"image": base64.b64encode(jpeg).decode(), "k": 3, "embedding": True},
                            timeout=60, headers=key)
    for response in (raw, multipart, as_json):
        assert response.status_code == 200, response.text
        assert response.headers["content-type"] == "application/json"
    raw, multipart, as_json = raw.json(), multipart.json(), as_json.json()
    assert set(raw) == set(ANSWER_FIELDS) and set(as_json) == set(ANSWER_FIELDS) | {"embedding"}
    for answer in (raw, multipart, as_json):
        check_answer(answer)  # the contract every client relies on, against a real served answer
    assert raw["model"] == {"name": NAME, "version": "1.0"}
    assert raw["neighbours"][0]["image_id"] == "img-004"
    assert raw["neighbours"][0]["similarity"] == pytest.approx(1.0, abs=1e-4)
    assert raw["neighbours"][:3] == multipart["neighbours"] == as_json["neighbours"]
    assert raw["top_categories"] == multipart["top_categories"] == as_json["top_categories"]


BAD_INPUTS = {
    "empty body": (b"", "image/jpeg", {}, 400),
    "text bytes": (b"name,price\nlamp,5\n", "image/jpeg", {}, 415),
    "truncated JPEG": ("truncated", "image/jpeg", {}, 400),
    "bomb dimensions": (png_with_declared_size(30_000, 30_000), "image/png", {}, 413),
    "bad JSON": (b'{"image": ', "application/json", {}, 400),
    "bad base64": (json.dumps({"image": "***"}).encode(), "application/json", {}, 400),
    "k=0": ("photo", "image/jpeg", {"X-K": "0"}, 400),
    "k=1000": ("photo", "image/jpeg", {"X-K": "1000"}, 400),
    "unknown category": ("photo", "image/jpeg", {"X-Category": "Spaceships"}, 400),
}


@pytest.mark.server
@pytest.mark.parametrize("case", list(BAD_INPUTS))
def test_bad_input_gets_its_4xx_with_a_json_message(served, case):
    data, content_type, headers, status = BAD_INPUTS[case]
    jpeg = photo(served.run, 0)
    data = {"photo": jpeg, "truncated": jpeg[: len(jpeg) // 2]}.get(data, data)
    response = post(served, data, content_type, headers=headers)
    assert response.status_code == status, response.text
    body = response.json()
    assert body["code"] == status and body["error"]


@pytest.mark.server
def test_sixteen_bit_tiff_is_served(served):
    response = post(served, tiff_16bit(), "image/tiff")
    assert response.status_code == 200, response.text


@pytest.mark.server
def test_oversize_upload_is_refused_with_413(served):
    limit = int(serve.read_properties(serve.DEFAULT_CONFIG)["max_request_size"])
    assert limit == 20 * 1024 * 1024
    too_big = b"\xff\xd8\xff" + bytes(limit + 1024)
    response = post(served, too_big)
    assert response.status_code == 413
    assert post(served, photo(served.run, 0)).status_code == 200  # the server is fine afterwards


def batch_sizes(metrics_text: str) -> dict[int, float]:
    """{batch size: batches} from the handler's MarketplaceBatches counter."""
    found = re.findall(r'^MarketplaceBatches\{BatchSize="(\d+)"[^}]*\}\s+([0-9.]+)', metrics_text, re.MULTILINE)
    return {int(size): float(count) for size, count in found}


@pytest.mark.server
def test_concurrent_requests_are_served_in_batches_each_answer_in_its_slot(served):
    numbers = list(range(12)) * 2
    barrier = threading.Barrier(len(numbers))

    def query(number):
        barrier.wait()
        return number, post(served, photo(served.run, number))

    with ThreadPoolExecutor(len(numbers)) as pool:
        results = list(pool.map(query, numbers))
    for number, response in results:
        assert response.status_code == 200, response.text
        assert response.json()["neighbours"][0]["image_id"] == f"img-{number:03d}"  # no mixed-up slots

    deadline, sizes = time.monotonic() + 10, {}
    while time.monotonic() < deadline and not any(size > 1 for size in sizes):
        sizes = batch_sizes(requests.get(f"{served.server.metrics_url}/metrics", timeout=10).text)
        time.sleep(0.5)
    assert any(size > 1 for size in sizes), f"only batches of one were seen: {sizes}"


@pytest.mark.server
def test_metrics_endpoint_speaks_prometheus(served):
    post(served, photo(served.run, 1))
    response = requests.get(f"{served.server.metrics_url}/metrics", timeout=10)
    assert response.status_code == 200
    assert "# TYPE ts_inference_requests_total counter" in response.text
    assert re.search(r'^ts_inference_requests_total\{model_name="marketplace"', response.text, re.MULTILINE)
    # The handler's time per stage of a batch, per batch size, beside its batch counter.
    stages = {}
    for labels, milliseconds in re.findall(r'^MarketplaceStageMilliseconds\{([^}]*)\}\s+([0-9.eE+-]+)$', response.text,
                                          re.MULTILINE):
        label = dict(re.findall(r'(\w+)="([^"]*)"', labels))
        stages[label["Stage"], int(label["BatchSize"])] = float(milliseconds)
    assert {stage for stage, _ in stages} == {"decode", "forward", "search", "text", "answer"}
    assert {size for _, size in stages} <= set(batch_sizes(response.text))
    assert all(stages[stage, size] > 0 for stage, size in stages if stage in ("decode", "forward"))


@pytest.mark.server
def test_worker_started_without_openmp_trouble(served):
    assert "KMP_DUPLICATE_LIB_OK" not in os.environ
    log = (served.server.workdir / "model_log.log").read_text()
    assert "loaded best.pt (resnet18, 3 classes) and 12 catalogue photos" in log
    assert "OMP: Error" not in log


@pytest.mark.server
def test_client_cli_prints_category_and_neighbours(served, capsys, tmp_path):
    photo_file = tmp_path / "query.jpg"
    photo_file.write_bytes(photo(served.run, 2))
    client.main([str(photo_file), "--url", served.server.inference_url, "--k", "3",
                 "--key-file", str(served.server.workdir / api.KEY_FILE)])
    printed = capsys.readouterr().out
    assert printed.startswith("category: ") and "Listing 1" in printed and "£11.00" in printed
    assert len([line for line in printed.splitlines() if re.match(r"\s*\d+\s", line)]) == 3
    with pytest.raises(api.ApiError, match="400"):
        api.predict(served.server, photo(served.run, 2), category="Spaceships")


@pytest.mark.server
def test_serve_cli_status_finds_the_server(served, capsys):
    serve.main(["status", "--workdir", str(served.server.workdir)])
    printed = capsys.readouterr().out
    assert f"pid {served.server.pid}" in printed and "marketplace 1.0 (marketplace-v1.0.mar): READY" in printed


@pytest.mark.server
def test_release_rollback_retire(served, tmp_path, capsys):
    server = served.server
    not_a_photo = tmp_path / "not-a-photo.jpg"
    not_a_photo.write_text("definitely not a photo")

    with pytest.raises(versions.CanaryError, match="failed its canary and was unregistered"):
        versions.release(server, server, "marketplace-v2.0.mar", NAME, "2.0", photo=not_a_photo, warm_queries=0)
    assert [d["modelVersion"] for d in api.describe(server, NAME, "all")] == ["1.0"]

    answer = versions.release(server, server, "marketplace-v2.0.mar", NAME, "2.0", warm_queries=2)
    assert answer["model"] == {"name": NAME, "version": "2.0"}
    jpeg = photo(served.run, 5)
    default, pinned = post(served, jpeg).json(), post(served, jpeg, path=f"{NAME}/1.0").json()
    assert default["model"]["version"] == "2.0" and pinned["model"]["version"] == "1.0"
    assert default["top_categories"] != pinned["top_categories"]  # two different models answered

    with pytest.raises(api.ApiError) as refused:
        api.unregister(server, NAME, "2.0")  # the default cannot go while 1.0 is registered
    assert refused.value.status == 403

    versions.main(["--url", server.management_url, "--key-file", str(server.workdir / api.KEY_FILE), "list", NAME])
    listing = capsys.readouterr().out
    assert re.search(r"^\* 2\.0 ", listing, re.MULTILINE) and re.search(r"^  1\.0 ", listing, re.MULTILINE)

    assert versions.rollback(server, NAME) == ("2.0", "1.0")
    assert post(served, jpeg).json()["model"]["version"] == "1.0"
    with pytest.raises(versions.ReleaseError, match="no registered version older"):
        versions.rollback(server, NAME)
    with pytest.raises(versions.ReleaseError, match="is the default version"):
        versions.retire(server, NAME, "1.0")
    versions.retire(server, NAME, "2.0")
    assert [d["modelVersion"] for d in api.describe(server, NAME, "all")] == ["1.0"]
    assert post(served, jpeg, path=f"{NAME}/2.0").status_code == 404


def refused_for_its_key(response: requests.Response) -> bool:
    """TorchServe 0.12 refuses a missing or wrong key with 400 InvalidKeyException (not 401)."""
    return response.status_code in (400, 401) and "Token Authorization failed" in response.text


@pytest.mark.server
def test_shipped_config_wants_the_right_key_on_each_api_and_no_model_control(runs, tmp_path, capsys):
    store = tmp_path / "model_store"
    mar = archive_tiny_run(runs[0], store, version="1.0")
    with running_server(store, tmp_path / "ts", {NAME: mar.name}) as server:  # config.properties as shipped
        keys = {which: server.token(which) for which in api.APIS}
        assert all(keys.values()) and keys["inference"] != keys["management"]
        jpeg, predictions = photo(runs[0], 1), f"{server.inference_url}/predictions/{NAME}"

        def predict_with(key):
            return requests.post(predictions, data=jpeg, timeout=60,
                                 headers={"Content-Type": "image/jpeg", **api.auth_headers(key)})

        def models_with(key):
            return requests.get(f"{server.management_url}/models", headers=api.auth_headers(key), timeout=10)

        assert refused_for_its_key(predict_with(None)) and refused_for_its_key(models_with(None))
        assert predict_with(keys["inference"]).status_code == 200
        assert refused_for_its_key(models_with(keys["inference"]))
        assert refused_for_its_key(predict_with(keys["management"]))
        assert models_with(keys["management"]).status_code == 200
        with pytest.raises(api.ApiError) as refused:  # model-control API off: no register, no unregister
            api.register(server, mar.name, "another")
        assert refused.value.status == 405
        # The CLIs take each API's key from the key file.
        client.main([str(runs[0].photos["img-001"]), "--url", server.inference_url,
                     "--key-file", str(server.workdir / api.KEY_FILE)])
        assert capsys.readouterr().out.startswith("category: ")


@pytest.mark.server
def test_with_model_control_on_archives_register_from_the_store_only(runs, tmp_path):
    store = tmp_path / "model_store"
    mar = archive_tiny_run(runs[0], store, version="1.0")
    outside = archive_tiny_run(runs[0], tmp_path / "elsewhere", version="9.0")
    with running_server(store, tmp_path / "ts", enable_model_api=True) as server:
        for url in (outside.as_uri(), "http://127.0.0.1:9/marketplace-v9.0.mar", f"{store.as_uri()}/../x.mar"):
            with pytest.raises(api.ApiError) as refused:
                api.register(server, url, "intruder", initial_workers=0)
            assert 400 <= refused.value.status < 500, (url, refused.value)
        assert [model["modelName"] for model in api.list_models(server)] == []
        api.register(server, mar.name, NAME, initial_workers=0, synchronous=False)  # from the store: fine
        assert [model["modelName"] for model in api.list_models(server)] == [NAME]


@pytest.mark.server
def test_rollback_follows_release_history_and_a_restart_serves_the_released_default(runs, tmp_path):
    store = tmp_path / "model_store"
    history = store / versions.HISTORY_FILE
    v1 = archive_tiny_run(runs[0], store, version="1.0")
    archive_tiny_run(runs[1], store, version="3.0")
    archive_tiny_run(runs[0], store, version="2.0")
    jpeg = photo(runs[0], 3)

    def default_version(server) -> str:
        return api.predict(server, jpeg)["model"]["version"]

    with running_server(store, tmp_path / "ts", {NAME: v1.name}, enable_model_api=True) as server:
        versions.release(server, server, "marketplace-v3.0.mar", NAME, "3.0", warm_queries=0, history=history)
        versions.release(server, server, "marketplace-v2.0.mar", NAME, "2.0", warm_queries=0, history=history)
        with pytest.raises(versions.ReleaseError, match="already registered"):
            versions.release(server, server, "marketplace-v3.0.mar", NAME, "3.0", history=history)
        assert default_version(server) == "2.0"
        # The previous default is 3.0 (released before 2.0), not 1.0 (the next lower number).
        assert versions.rollback(server, NAME, history=history) == ("2.0", "3.0")
        assert default_version(server) == "3.0"
        assert versions.rollback(server, NAME, history=history) == ("3.0", "1.0")
        assert versions.read_history(history)[NAME]["defaults"] == ["1.0"]
        versions.rollback(server, NAME, to="3.0", history=history)
    # A restart asked to serve 1.0 serves the released default, 3.0, instead.
    models = serve.released_models({NAME: v1.name}, store)
    assert models == {NAME: "marketplace-v3.0.mar"}
    with running_server(store, tmp_path / "ts2", models) as restarted:
        assert default_version(restarted) == "3.0"


def test_a_versioned_archive_is_never_overwritten(runs, tmp_path):
    store = _folder(tmp_path / "store")
    build_archive(runs[0].run_dir, store, version="1.0", output_name="{name}-v{version}")
    with pytest.raises(FileExistsError, match="version 1.0 is taken"):
        build_archive(runs[1].run_dir, store, version="1.0", output_name="{name}-v{version}")
    build_archive(runs[0].run_dir, store, version="1.0")  # "marketplace.mar", the latest build: replaced
    build_archive(runs[0].run_dir, store, version="1.1")


def test_two_builds_from_one_run_have_identical_members(runs, tmp_path):
    first = build_archive(runs[0].run_dir, _folder(tmp_path / "a"), version="1.0")
    second = build_archive(runs[0].run_dir, _folder(tmp_path / "b"), version="1.0")
    with zipfile.ZipFile(first) as a, zipfile.ZipFile(second) as b:
        assert sorted(a.namelist()) == sorted(b.namelist())
        for name in a.namelist():
            if name != "MAR-INF/MANIFEST.json":
                assert a.read(name) == b.read(name), name
        manifests = [json.loads(z.read("MAR-INF/MANIFEST.json")) for z in (a, b)]
        card = json.loads(a.read("model_card.json"))
    for manifest in manifests:
        manifest.pop("createdOn")
    assert manifests[0] == manifests[1]
    assert card["created"] == "2025-01-31T14:22:33+00:00" and card["version"] == "1.0"
    assert card["evaluation"]["fine_tuned"]["top1_accuracy"] == 0.5
    assert len(card["checkpoint"]["sha256"]) == 64


def test_default_version_comes_from_the_run(runs, tmp_path):
    mar = build_archive(runs[1].run_dir, _folder(tmp_path), output_name="{name}-v{version}")
    assert mar.name == "marketplace-v20250207.090000.mar"
    with zipfile.ZipFile(mar) as archive:
        assert json.loads(archive.read("MAR-INF/MANIFEST.json"))["model"]["modelVersion"] == "20250207.090000"
        members = set(archive.namelist())
        # The core package whole (every module of this checkout), the catalogue, and no pipeline stage.
        core = {f"marketplace_search/{path.name}" for path in (REPO / "marketplace_search").glob("*.py")}
        assert core <= members and "catalogue/catalogue.faiss" in members
        assert not any(name.startswith("training/") for name in members)


def test_archive_refuses_an_index_from_another_checkpoint(runs, tmp_path):
    import shutil

    run_dir = shutil.copytree(runs[0].run_dir, tmp_path / "run")
    shutil.copyfile(runs[1].run_dir / "weights" / "best.pt", run_dir / "weights" / "best.pt")
    with pytest.raises(ValueError, match="was built from checkpoint"):
        build_archive(run_dir, _folder(tmp_path / "store"), version="1.0")


def _folder(path: Path) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    return path


def test_a_workdir_too_deep_for_the_worker_socket_is_refused_before_starting(tmp_path):
    deep = tmp_path / ("d" * 100)
    with pytest.raises(serve.ServerError, match="over the 107-byte limit of Unix socket paths"):
        serve.start_server(tmp_path, workdir=deep)
    assert not deep.exists()  # nothing was started or written
