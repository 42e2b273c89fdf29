"""Operating the service: the live catalogue fed from an archive of the real recipe, a removal that loads no
model, a rollback across restarts, and the client commands finding the server's key on their own."""
import faiss  # noqa: F401  (before torch: both bring an OpenMP runtime, and this order is the safe one)

import csv
import json
import re
import subprocess
import sys
import zipfile
from dataclasses import dataclass
from pathlib import Path

import pytest

from marketplace_search import live
from marketplace_search.models import MarketplaceNet
from scripts import api, batch, catalogue as cli, client, serve, versions
from tests.serving_fixtures import TinyRun, archive_tiny_run, make_tiny_run, running_server
from tests.test_live import write_new_listings
from training.tiny_run import make_tiny_encoder, make_tiny_text_model

REPO = Path(__file__).resolve().parents[1]
NAME = "marketplace"
V1 = "marketplace-v1.0.mar"


@dataclass
class Recipe:
    run: TinyRun
    store: Path
    v1: Path
    v2: Path


@pytest.fixture(scope="module")
def recipe(module_tmp) -> Recipe:
    """A tiny run made as the real recipe makes one (search vector embedding+features, a text model with its
    sentence encoder), archived as 1.0 and 2.0."""
    root = module_tmp("operations")
    model = MarketplaceNet("resnet18", 3, embedding_dim=32, vector="embedding+features")
    run = make_tiny_run(root / "runs" / "2025-01-31_142233", model=model)
    make_tiny_text_model(run.run_dir, encoder=make_tiny_encoder(root / "encoder"))
    store = root / "model_store"
    return Recipe(run, store, archive_tiny_run(run, store, version="1.0"), archive_tiny_run(run, store, version="2.0"))


class Served:
    """The recipe served by scripts.serve from FOLDER/logs, the working folder `scripts.serve start` uses when
    run in FOLDER, with the model-control API on; (re)started as `scripts.serve start --models
    marketplace=marketplace-v1.0.mar --enable-model-api` starts it: with the released default if there is one."""

    def __init__(self, store: Path, folder: Path):
        self.store, self.folder, self.server, self._running = store, folder, None, None

    def start(self) -> None:
        models = serve.released_models({NAME: V1}, self.store)
        self._running = running_server(self.store, self.folder / serve.DEFAULT_WORKDIR, models, enable_model_api=True)
        self.server = self._running.__enter__()

    def stop(self) -> None:
        self._running.__exit__(None, None, None)

    def restart(self) -> None:
        self.stop()
        self.start()


@pytest.fixture(scope="module")
def served(recipe, module_tmp):
    served = Served(recipe.store, module_tmp("operations-server"))
    served.start()
    try:
        yield served
    finally:
        served.stop()


@pytest.fixture
def no_key_given(monkeypatch):
    for name in ("TS_TOKEN", "TS_INFERENCE_TOKEN"):
        monkeypatch.delenv(name, raising=False)
    return monkeypatch


def test_the_live_catalogue_is_seeded_and_fed_from_an_archive_with_its_sentence_encoder(recipe, tmp_path):
    assert any(name.startswith("text_model/encoder/") for name in zipfile.ZipFile(recipe.v1).namelist())
    folder = tmp_path / "live"
    seeded = cli.main(["--live", str(folder), "init", "--archive", str(recipe.v1)])
    assert seeded["photos"] == 12 and seeded["listings_by_words"] > 0
    write_new_listings(tmp_path / "new", 2, titles=["red sofa", "old guitar"])
    added = cli.main(["--live", str(folder), "add", "--data", str(tmp_path / "new"), "--archive", str(recipe.v1),
                      "--workers", "1"])
    assert added["generation"] == 2 and added["added_listings"] == 2
    assert added["words"] == {"added_listings": 2, "unknown_category": 0, "from": "generation"}
    assert {"new-0000", "new-0001"} <= set(live.load_generation(folder).listing_words.product_ids)


def test_remove_writes_the_removal_without_loading_a_model(recipe, tmp_path):
    folder = tmp_path / "live"
    cli.main(["--live", str(folder), "init", "--run", str(recipe.run.run_dir)])
    removed = subprocess.run([sys.executable, "-X", "importtime", "-m", "scripts.catalogue", "--live", str(folder),
                              "remove", "prod-001"], cwd=REPO, capture_output=True, text=True,
                             timeout=300)
    assert removed.returncode == 0, removed.stderr[-3000:]
    imported = {line.rsplit("|", 1)[-1].strip() for line in removed.stderr.splitlines()
                if line.startswith("import time:")}
    assert "marketplace_search.live" in imported
    assert not imported & {"torch", "torchvision", "marketplace_search.models", "marketplace_search.sentences"}
    assert json.loads(removed.stdout) == {"removed": ["prod-001"], "already_removed": [], "removal_list": 1}
    assert set(live.read_removed(folder)) == {"prod-001"}


def titled_inputs(path: Path) -> Path:
    """A CSV of two photos (by image_id, read from --images) with their listings' titles."""
    with open(path, "w", newline="") as out:
        rows = csv.writer(out)
        rows.writerow(["image_id", "title"])
        rows.writerows([("img-000", "red sofa"), ("img-003", "old guitar")])
    return path


@pytest.mark.server
def test_client_commands_find_the_key_of_the_server_scripts_serve_runs(recipe, served, no_key_given, tmp_path, capsys):
    no_key_given.chdir(served.folder)
    photos = recipe.run.photos["img-000"].parent
    summary = batch.main([str(photos), "--output", str(tmp_path / "b.jsonl"), "--concurrency", "4",
                          "--url", served.server.inference_url])
    assert (summary["ok"], summary["failed"]) == (12, 0)
    summary = batch.main([str(titled_inputs(tmp_path / "titled.csv")), "--images", str(photos),
                          "--output", str(tmp_path / "t.jsonl"), "--url", served.server.inference_url])
    assert (summary["ok"], summary["failed"]) == (2, 0)
    assert all(json.loads(line)["inputs"] == ["photo", "title"] for line in open(tmp_path / "t.jsonl"))
    capsys.readouterr()
    client.main([str(recipe.run.photos["img-001"]), "--url", served.server.inference_url, "--k", "3"])
    assert capsys.readouterr().out.startswith("category: ")
    versions.main(["--url", served.server.management_url, "list", NAME])
    assert "(* = default)" in capsys.readouterr().out


@pytest.mark.server
def test_a_refused_request_says_which_key_was_sent_or_that_none_was(recipe, served, no_key_given, tmp_path, capsys):
    photos, url = str(recipe.run.photos["img-000"].parent), served.server.inference_url
    stale = tmp_path / "stale_key_file.json"
    stale.write_text(json.dumps({"inference": {"key": "stale"}, "management": {"key": "stale"}}))
    with pytest.raises(SystemExit, match=f"the inference key from key file {re.escape(str(stale))} was refused"):
        batch.main([photos, "--output", str(tmp_path / "stale.jsonl"), "--url", url, "--key-file", str(stale)])
    no_key_given.chdir(tmp_path)  # no server runs from here: no logs/key_file.json
    with pytest.raises(SystemExit, match="no inference key was sent"):
        batch.main([photos, "--output", str(tmp_path / "none.jsonl"), "--url", url])
    with pytest.raises(SystemExit):
        client.main([str(recipe.run.photos["img-001"]), "--url", url])
    assert "no inference key was sent" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        versions.main(["--url", served.server.management_url, "--key-file", str(stale), "list", NAME])
    assert f"the management key from key file {stale} was refused" in capsys.readouterr().err


@pytest.mark.server
def test_a_rollback_after_a_restart_serves_the_version_the_server_started_with(recipe, served, no_key_given):
    no_key_given.chdir(served.folder)
    photo = recipe.run.photo_bytes("img-002")

    def default_version() -> str:
        return api.predict(served.server, photo)["model"]["version"]

    management = ["--url", served.server.management_url, "--inference-url", served.server.inference_url,
                  "--store", str(recipe.store)]
    versions.main(management + ["release", "--mar", str(recipe.v2), "--name", NAME, "--warm", "0"])
    assert default_version() == "2.0"
    served.restart()
    assert default_version() == "2.0"  # the released default, though started with 1.0's archive
    versions.main(["--url", served.server.management_url, "--store", str(recipe.store), "rollback", NAME])
    assert default_version() == "1.0"
    served.restart()
    assert default_version() == "1.0"
    assert versions.read_history(recipe.store / versions.HISTORY_FILE)[NAME] == {
        "defaults": ["1.0"], "archives": {"1.0": V1, "2.0": recipe.v2.name}}
