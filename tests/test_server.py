"""The session's TorchServe on the recipe's archive: limits, metrics, command lines, keys, releases, archives."""
import json
import os
import re
import shutil
import zipfile
from pathlib import Path

import pytest
import requests

from marketplace_search.files import sha256_file
from scripts import api, batch, client, serve, versions
from scripts.archive import build_archive
from scripts.benchmark.served import read_counters
from tests.serving_fixtures import NAME, RECIPE_BACKEND, REPO, make_tiny_run

pytestmark = pytest.mark.server

RELEASED = "released"  # the recipe's archives under a second name, so that releasing leaves `marketplace` alone


def post(server, data: bytes, content_type: str | None = "image/jpeg", path: str = NAME, headers: dict | None = None,
         **options) -> requests.Response:
    headers = {**({"Content-Type": content_type} if content_type else {}),
               **api.auth_headers(server.token("inference")), **(headers or {})}
    return requests.post(f"{server.inference_url}/predictions/{path}", data=data, headers=headers, timeout=60,
                         **options)


def test_an_oversize_upload_gets_torchserve_s_413_and_the_server_goes_on(served, recipe):
    limit = int(serve.read_properties(serve.DEFAULT_CONFIG)["max_request_size"])
    assert limit == 20 * 1024 * 1024
    assert post(served, b"\xff\xd8\xff" + bytes(limit + 1024)).status_code == 413
    assert post(served, recipe.run.photo_bytes("img-000")).status_code == 200


def test_metrics_speak_prometheus_with_the_handler_s_stages(served, recipe):
    post(served, recipe.run.photo_bytes("img-001"))
    text = api.metrics_text(served)
    assert "# TYPE ts_inference_requests_total counter" in text
    assert re.search(r'^ts_inference_requests_total\{model_name="marketplace"', text, re.MULTILINE)
    assert re.search(rf'^MarketplaceBatches\{{.*Backend="{RECIPE_BACKEND}"', text, re.MULTILINE)  # what it chose
    counters = read_counters(text)  # the handler's batches, and milliseconds of each stage, by batch size
    stages = {name: sizes for name, sizes in counters.items() if name not in ("batches", "frontend")}
    assert set(stages) == {"decode", "forward", "search", "text", "answer"}
    assert all(sizes.keys() <= counters["batches"].keys() for sizes in stages.values())
    assert all(milliseconds > 0 for stage in ("decode", "forward") for milliseconds in stages[stage].values())


def test_the_worker_started_without_openmp_trouble(served):
    assert "KMP_DUPLICATE_LIB_OK" not in os.environ
    log = (served.workdir / "model_log.log").read_text()
    assert re.search(r"loaded best.pt \(resnet18, 3 classes\) and 12 catalogue photos", log)
    assert "OMP: Error" not in log


def test_the_client_and_serve_command_lines(served, recipe, capsys):
    server = ["--url", served.inference_url, "--key-file", str(served.workdir / api.KEY_FILE)]
    client.main([str(recipe.run.photos["img-002"]), "--k", "3", *server])
    printed = capsys.readouterr().out
    assert printed.startswith("category: ") and "Listing 1" in printed and "£11.00" in printed
    assert len([line for line in printed.splitlines() if re.match(r"\s*\d+\s", line)]) == 3
    client.main(["--title", "large vinyl", "--k", "2", *server])
    printed = capsys.readouterr().out.splitlines()
    assert printed[2].endswith("(from title)") and printed[4].split()[-1] == "words"
    assert printed[5].split()[:3] == ["1", "Listing", "2"] and len(printed) == 7  # 2 listings, found by words
    with pytest.raises(SystemExit):  # neither photo nor title
        client.main(["--url", served.inference_url])
    # a non-ASCII title travels as UTF-8 header bytes, and the handler reads the same words
    answer = api.predict(served, recipe.run.photo_bytes("img-004"), title="Étagère lawnmower")
    assert (answer["inputs"], answer["category"]) == (["photo", "title"], "Garden")
    with pytest.raises(api.ApiError, match="400"):
        api.predict(served, recipe.run.photo_bytes("img-002"), category="Spaceships")
    serve.main(["status", "--workdir", str(served.workdir)])
    printed = capsys.readouterr().out
    assert f"pid {served.pid}" in printed
    assert (f"marketplace 1.0 (marketplace-v1.0.mar): READY\n    sha256 {sha256_file(recipe.v1)[:12]}, "
            f"run 2025-01-31_142233, 12 catalogue photos, backend {RECIPE_BACKEND}"
            + ("" if RECIPE_BACKEND == "openvino bf16" else " (the archive asks for openvino bf16)")) in printed
    assert re.search(r", fastest at batch [1248]\n", printed)  # timed at warm-up, of batch sizes 1 to 8


def test_a_refused_request_says_which_key_was_sent_or_that_none_was(served, recipe, monkeypatch, tmp_path, capsys):
    for name in ("TS_TOKEN", "TS_INFERENCE_TOKEN"):
        monkeypatch.delenv(name, raising=False)
    photos, url = str(recipe.run.photos["img-000"].parent), served.inference_url
    stale = tmp_path / "stale_key_file.json"
    stale.write_text(json.dumps({"inference": {"key": "stale"}, "management": {"key": "stale"}}))
    with pytest.raises(SystemExit, match=f"the inference key from key file {re.escape(str(stale))} was refused"):
        batch.main([photos, "--output", str(tmp_path / "stale.jsonl"), "--url", url, "--key-file", str(stale)])
    monkeypatch.chdir(tmp_path)  # no server runs from here: no logs/key_file.json
    with pytest.raises(SystemExit, match="no inference key was sent"):
        batch.main([photos, "--output", str(tmp_path / "none.jsonl"), "--url", url])
    with pytest.raises(SystemExit):
        client.main([str(recipe.run.photos["img-001"]), "--url", url])
    assert "no inference key was sent" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        versions.main(["--url", served.management_url, "--key-file", str(stale), "list", NAME])
    assert f"the management key from key file {stale} was refused" in capsys.readouterr().err


def test_archives_register_from_the_model_store_only(served, recipe, tmp_path):
    outside = shutil.copy(recipe.v1, tmp_path / "marketplace-v9.0.mar")
    for url in (Path(outside).as_uri(), "http://127.0.0.1:9/marketplace-v9.0.mar", f"{recipe.store.as_uri()}/../x.mar"):
        with pytest.raises(api.ApiError) as refused:
            api.register(served, url, "intruder", initial_workers=0)
        assert 400 <= refused.value.status < 500, (url, refused.value)
    assert "intruder" not in {model["modelName"] for model in api.list_models(served)}


def test_release_rollback_and_retire_go_by_release_order(served, recipe, tmp_path):
    history, jpeg = tmp_path / versions.HISTORY_FILE, recipe.run.photo_bytes("img-005")
    not_a_photo = tmp_path / "not-a-photo.jpg"
    not_a_photo.write_text("definitely not a photo")

    def versions_of() -> list[str]:
        return [description["modelVersion"] for description in api.describe(served, RELEASED, "all")]

    api.register(served, recipe.v2.name, RELEASED, initial_workers=1, synchronous=True)  # 2.0 serves first
    try:
        with pytest.raises(versions.CanaryError, match="failed its canary: .*was unregistered from 1 replica"):
            versions.release(served, served, recipe.v1.name, RELEASED, "1.0", photo=not_a_photo, warm_queries=0)
        assert versions_of() == ["2.0"]
        answer = versions.release(served, served, recipe.v1.name, RELEASED, "1.0", warm_queries=1, history=history)
        assert answer["model"] == {"name": RELEASED, "version": "1.0", "backend": RECIPE_BACKEND}
        assert post(served, jpeg, path=RELEASED).json()["model"]["version"] == "1.0"
        assert post(served, jpeg, path=f"{RELEASED}/2.0").json()["model"]["version"] == "2.0"
        with pytest.raises(api.ApiError) as refused:
            api.unregister(served, RELEASED, "1.0")  # the default cannot go while 2.0 is registered
        assert refused.value.status == 403
        with pytest.raises(versions.ReleaseError, match="already registered"):
            versions.release(served, served, recipe.v2.name, RELEASED, "2.0", history=history)
        # Back to the previous default in release order, 2.0, where the next lower number would be none.
        assert versions.rollback(served, RELEASED, history=history) == ("1.0", "2.0")
        assert post(served, jpeg, path=RELEASED).json()["model"]["version"] == "2.0"
        with pytest.raises(versions.ReleaseError, match="is the default version"):
            versions.retire(served, RELEASED, "2.0")
        versions.retire(served, RELEASED, "1.0")
        assert versions_of() == ["2.0"] and post(served, jpeg, path=f"{RELEASED}/1.0").status_code == 404
        with pytest.raises(versions.ReleaseError, match="no registered version older"):
            versions.rollback(served, RELEASED)
        # A version no longer registered comes back from the archive its release recorded.
        assert versions.rollback(served, RELEASED, to="1.0", history=history) == ("2.0", "1.0")
        assert post(served, jpeg, path=RELEASED).json()["model"]["version"] == "1.0"
    finally:
        default = api.describe(served, RELEASED)[0]["modelVersion"]
        for version in sorted(versions_of(), key=lambda version: version == default):  # the default last
            api.unregister(served, RELEASED, version)


def test_two_builds_of_one_run_have_identical_members_and_the_run_s_version(recipe, tmp_path):
    store = tmp_path / "store"
    store.mkdir()
    first = shutil.copy(build_archive(recipe.run.run_dir, store), tmp_path / "first.mar")
    second = build_archive(recipe.run.run_dir, store, replace=True)
    with zipfile.ZipFile(first) as a, zipfile.ZipFile(second) as b:
        assert sorted(a.namelist()) == sorted(b.namelist())
        for name in a.namelist():
            if name != "MAR-INF/MANIFEST.json":
                assert a.read(name) == b.read(name), name
        manifests = [json.loads(z.read("MAR-INF/MANIFEST.json")) for z in (a, b)]
        card, members = json.loads(a.read("model_card.json")), set(a.namelist())
    for manifest in manifests:
        manifest.pop("createdOn")
    assert manifests[0] == manifests[1] and manifests[0]["model"]["modelVersion"] == "20250131.142233"
    assert card["created"] == "2025-01-31T14:22:33+00:00" and card["version"] == "20250131.142233"
    assert card["evaluation"]["fine_tuned"]["top1_accuracy"] == 0.5 and len(card["checkpoint"]["sha256"]) == 64
    # The core package whole (every module of this checkout), the catalogue, and no pipeline stage.
    core = {f"marketplace_search/{path.name}" for path in (REPO / "marketplace_search").glob("*.py")}
    assert core <= members and "catalogue/catalogue.faiss" in members
    assert not any(name.startswith("training/") for name in members)


def test_the_archive_refuses_an_index_from_another_checkpoint(recipe, tmp_path):
    run_dir = shutil.copytree(recipe.run.run_dir, tmp_path / "run")
    other = make_tiny_run(tmp_path / "other", seed=1)
    shutil.copyfile(other.run_dir / "weights" / "best.pt", run_dir / "weights" / "best.pt")
    with pytest.raises(ValueError, match="was built from checkpoint"):
        build_archive(run_dir, tmp_path)


def test_a_workdir_too_deep_for_the_worker_socket_is_refused_before_starting(tmp_path):
    deep = tmp_path / ("d" * 100)
    with pytest.raises(serve.ServerError, match="over the 107-byte limit of Unix socket paths"):
        serve.start_server(tmp_path, workdir=deep)
    assert not deep.exists()  # nothing was started or written
