"""README.md's commands, run as written on the session's recipe run by `clone.run(HANDLE)` (the command that is or
contains HANDLE) or named in NOT_RUN with the reason, in a user's order: each test builds on the ones before it."""
import ast
import json
import os
import re
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path
from unittest import mock

import pytest
import requests

from marketplace_search.files import sha256_file
from marketplace_search.schema import check_answer
from scripts import api, serve, web
from tests.conftest import skip_or_fail
from tests.serving_fixtures import (assert_same_answers, by_key, photo_jpeg, read_jsonl, write_listings,
                                    write_new_listings)

pytestmark = [pytest.mark.server, pytest.mark.slow]

README = Path(__file__).resolve().parents[1] / "README.md"
RUN = "work/marketplace/model_evaluation/2025-01-31_142233"
PLACEHOLDERS = {"work/marketplace/model_evaluation/<timestamp>": RUN, "RUN": RUN, "../shared/data/marketplace": "data",
                "8b1a...-sold-id 77c0...-withdrawn-id": "prod-000 prod-001", "Home & Garden": "Home"}
NOT_RUN = {
    "make ": "`make test` is this suite, and `make demo` runs scripts.demo, run below beside the README's server",
    "training.pipeline": "trains on the real listings for an hour (minutes for the ResNet50 check); "
                         "tests/test_training.py runs the pipeline on generated listings",
    "--address auto --actors 64": "needs a Ray cluster; the same command on a local Ray is run here",
    "docker ": "needs root with buildah and podman: `make image-test`",
    "<inference key>": "the key of the Docker container above",
    "scripts.benchmark": "runs for minutes (--quick) to an hour; tests/test_benchmark.py runs its sections",
    "kubectl ": "no Kubernetes cluster here: tests/test_deploy.py validates deploy/ and runs a pod's parts",
    "--replica http://10.0.0.11:8000": "a cluster's pods: tests/test_deploy.py releases across two local pods",
    "scripts.fleet": "needs root, podman and the built image: `make fleet-test` runs the local fleet",
}
NO_KEY = ("TS_TOKEN", "TS_INFERENCE_TOKEN")
PAGE = "http://127.0.0.1:8090"  # the search page of the README's `serve start --page`


def readme_commands() -> list[str]:
    """Each command of the README's bash blocks, continuation lines joined and spaces collapsed."""
    commands = []
    for block in re.findall(r"```(?:bash|sh)\n(.*?)```", README.read_text(), re.DOTALL):
        for line in block.replace("\\\n", " ").splitlines():
            if line.strip() and not line.lstrip().startswith("#"):
                commands.append(" ".join(line.split()))
    return commands


def handles() -> set[str]:
    """The HANDLE of every `clone.run("HANDLE")` in this module."""
    return {node.args[0].value for node in ast.walk(ast.parse(Path(__file__).read_text()))
            if isinstance(node, ast.Call) and getattr(node.func, "attr", None) == "run"
            and getattr(node.func.value, "id", None) == "clone"}


def named_by(handle: str, commands: list[str]) -> list[str]:
    """The README commands HANDLE names: the one equal to it, else those containing it."""
    return [command for command in commands if command == handle] or [c for c in commands if handle in c]


class Clone:
    """A folder laid out as a clone after the README's pipeline, where README commands run."""

    def __init__(self, folder: Path):
        self.folder = folder
        self.assignments: list[str] = []  # shell variables set by earlier commands (KEY=..., AUTH=...)

    def run(self, handle: str) -> str:
        """The standard output of the README command HANDLE names, run in bash as written (a process each: Ray's and
        OpenVINO's state must not outlive a command in the test process)."""
        [command] = named_by(handle, readme_commands())
        for placeholder, value in PLACEHOLDERS.items():
            command = command.replace(placeholder, value)
        with mock.patch.dict(os.environ, {"PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}"}):
            for name in NO_KEY:
                os.environ.pop(name, None)
            return self.in_bash(command)

    def in_bash(self, command: str) -> str:
        script = ["set -euo pipefail", 'curl() { command curl --silent --show-error --fail-with-body "$@"; }',
                  *(self.assignments if "$" in command else []), command]
        done = subprocess.run(["bash", "-c", "\n".join(script)], cwd=self.folder, capture_output=True, text=True,
                              timeout=300)
        assert done.returncode == 0, f"`{command}` exited {done.returncode}\n{done.stdout[-2000:]}{done.stderr[-2000:]}"
        if re.match(r"[A-Z]+=", command):
            self.assignments.append(command)
        return done.stdout

    def key(self, which: str) -> str:
        return api.read_key_file(self.folder / serve.DEFAULT_WORKDIR / api.KEY_FILE, which)

    def default_version(self) -> str:
        photo = (self.folder / "photo.jpg").read_bytes()
        return api.predict(api.DEFAULT_INFERENCE_URL, photo, token=self.key("inference"))["model"]["version"]

    def results(self) -> dict:
        return by_key(read_jsonl(self.folder / "results.jsonl"))


@pytest.fixture(scope="module")
def clone(recipe, module_tmp):
    """The recipe laid out as a clone with the files the commands name; the README's server stopped at the end."""
    try:
        serve.check_ports_free(serve.read_properties(serve.DEFAULT_CONFIG))
        serve.check_ports_free({"inference_address": PAGE})
    except serve.ServerError as error:
        skip_or_fail(f"the README's commands need TorchServe's default ports: {error}")
    folder = module_tmp("readme")
    shutil.copytree(recipe.work, folder / "work" / "marketplace", symlinks=True)
    shutil.copytree(recipe.data, folder / "data")
    (folder / "model_store").mkdir()
    (folder / ".venv").symlink_to(Path(sys.executable).parents[1])  # `.venv/bin/python -m ...` as on a clone
    for name in ("photo.jpg", "some_photo.jpg"):
        shutil.copyfile(recipe.run.photos["img-004"], folder / name)
    (folder / "listings.csv").write_text("path,title,description\nphoto.jpg,red sofa,Comfy.\n"
                                         ",old guitar,Six strings.\n")
    write_new_listings(folder / "NEW_LISTINGS", 2, titles=["red sofa", "old guitar"])
    kept = {image_id: listing for image_id, listing in recipe.run.listings.items()
            if listing["product_id"] != "prod-000"}
    fresh = {"fresh-photo": {"product_id": "fresh", "title": "Vintage spade", "price": 5.0, "location": "Leeds",
                             "category": "Garden"}}
    photos = {image_id: recipe.run.photo_bytes(image_id) for image_id in kept}
    write_listings(folder / "new_catalogue", {**kept, **fresh}, {**photos, "fresh-photo": photo_jpeg(777)})
    yield Clone(folder)
    web.stop_page(folder / serve.DEFAULT_WORKDIR)
    running = serve.attach(folder / serve.DEFAULT_WORKDIR)
    if running is not None:
        running.stop()


def test_every_readme_command_is_run_here_or_not_run_for_a_reason():
    commands, used = readme_commands(), handles()
    for command in commands:
        named = [handle for handle in used if command in named_by(handle, commands)] + [
            reason for key, reason in NOT_RUN.items() if key in command]
        assert len(named) == 1, f"README command `{command}` is named {len(named)} times here: {named}"
    for handle in used:
        assert len(named_by(handle, commands)) == 1, f"{handle!r} names no single README command"
    assert all(any(key in command for command in commands) for key in NOT_RUN)


def test_a_run_is_archived_with_each_backend(clone):
    clone.run("--run RUN --runtime torch --precision fp32")
    clone.run("--run RUN --runtime openvino --precision int8")
    figures = clone.run('training.guard --run RUN --backends "openvino bf16,openvino int8,torch bf16"')
    assert figures.count("PASS") == 3, figures
    clone.run("archive --run RUN # openvino bf16, the default")
    clone.run("--name marketplace --version 1.0 --store model_store")
    for mar in ("marketplace-v20250131.142233.mar", "marketplace-v1.0.mar"):
        with zipfile.ZipFile(clone.folder / "model_store" / mar) as archive:
            card = json.loads(archive.read("model_card.json"))
            assert any(name.startswith("text_model/encoder/") for name in archive.namelist())
        assert (card["inference"]["runtime"], card["inference"]["precision"]) == ("openvino", "bf16")
        assert card["inference"]["guard"]["passed"] and card["checkpoint"]["vector"] == "embedding+features"


def test_releases_a_refresh_and_a_rollback_after_a_restart(clone):
    clone.run("--enable-model-api --wait")
    clone.run("--run RUN --version 2.0")
    assert clone.run("scripts.gate").startswith("evaluation set: 6 photos")
    assert "accuracy gate on 6 photos: candidate 2.0" in clone.run("versions release")
    assert re.search(r"^\* 2\.0 ", clone.run("versions list marketplace"), re.MULTILINE)
    clone.run("versions rollback marketplace")
    assert clone.default_version() == "1.0"
    clone.run("versions retire marketplace 2.0")
    clone.run("scripts.refresh")
    assert clone.default_version() == "3.0"
    removed = api.predict(api.DEFAULT_INFERENCE_URL, (clone.folder / "data" / "images" / "img-000.jpg").read_bytes(),
                          k=100, token=clone.key("inference"))
    assert "prod-000" not in {neighbour["product_id"] for neighbour in removed["neighbours"]}
    clone.run("scripts.serve stop")
    clone.run("--enable-model-api --wait")  # started with 1.0's archive: serves the released default
    assert clone.default_version() == "3.0"
    clone.run("versions rollback marketplace")  # 1.0, dropped by the restart, registered again from its archive
    assert clone.default_version() == "1.0"
    clone.run("scripts.serve stop")


def test_the_served_run_answers_every_documented_request_with_keys_found_as_documented(clone):
    clone.run("--models marketplace=marketplace-v1.0.mar --wait")
    assert clone.default_version() == "1.0"  # restarted again after the rollback: still 1.0
    found = requests.post(f"{PAGE}/api/search", files={"photo": ("photo.jpg", (clone.folder / "photo.jpg").read_bytes())},
                          headers={web.PAGE_HEADER: "1"}, timeout=60).json()  # --page: the archive's work folder
    assert found["model"]["version"] == "1.0" and requests.get(f"{PAGE}/photos/{found['neighbours'][0]['image_id']}",
                                                               timeout=10).headers["content-type"] == "image/jpeg"
    assert clone.run("scripts.client some_photo.jpg").startswith("category: ")
    clone.run("KEY=$(python -c")
    clone.run('AUTH="Authorization: Bearer $KEY"')
    answers = [clone.run("curl -H \"$AUTH\" -H 'Content-Type: image/jpeg' --data-binary @photo.jpg "
                         "http://127.0.0.1:8080/predictions/marketplace"),
               clone.run("-H 'X-Embedding: true'"), clone.run("-F 'photo=@photo.jpg' -F k=5"),
               clone.run("base64 -w0 photo.jpg"), clone.run("-d '{"), clone.run("predictions/marketplace/1.0")]
    for answer in answers:
        check_answer(json.loads(answer))
    assert [json.loads(answer)["inputs"] for answer in answers] == [
        ["photo"], ["photo", "title"], ["photo", "title", "description"], ["photo"], ["title"], ["photo"]]
    for printed in (clone.run("client photo.jpg --k 5"), clone.run("client photo.jpg --title"),
                    clone.run("client --title")):
        assert printed.startswith("category: ")
    # Security: each API takes its own key only, and the model-control API is off as started here.
    keys = {which: clone.key(which) for which in api.APIS}
    photo = (clone.folder / "photo.jpg").read_bytes()
    predictions = f"{api.DEFAULT_INFERENCE_URL}/predictions/marketplace"
    for key, wanted in ((None, 400), (keys["management"], 400), (keys["inference"], 200)):
        response = requests.post(predictions, data=photo, timeout=60,
                                 headers={"Content-Type": "image/jpeg", **api.auth_headers(key)})
        assert response.status_code == wanted, response.text
    for key, wanted in ((None, 400), (keys["inference"], 400), (keys["management"], 200)):
        response = requests.get(f"{api.DEFAULT_MANAGEMENT_URL}/models", headers=api.auth_headers(key), timeout=10)
        assert response.status_code == wanted, response.text
    with pytest.raises(api.ApiError) as refused:
        api.register(api.DEFAULT_MANAGEMENT_URL, "marketplace-v1.0.mar", "another", token=keys["management"])
    assert refused.value.status == 405
    # Batch: a folder and a CSV of titles through the server, then the same folder in-process.
    clone.run("images --output results.jsonl --concurrency 8")
    served = clone.results()
    assert len(served) == 12 and all(line["status"] == "ok" for line in served.values())
    clone.run("batch listings.csv --output results.jsonl")
    titled = {key[0]: line for key, line in clone.results().items() if key not in served}
    assert {image_id: line["inputs"] for image_id, line in titled.items()} == {
        "photo": ["photo", "title", "description"], "line-3": ["title", "description"]}
    (clone.folder / "results.jsonl").unlink()
    clone.run("--local model_store/marketplace-v1.0.mar")
    assert_same_answers(clone.results(), served)


def test_the_demo_beside_the_readme_server_takes_free_ports_and_leaves_the_user_s_files(clone):
    folder = clone.folder
    paths = [*(folder / "work" / "marketplace").rglob("*"), *(folder / "model_store").iterdir(),
             folder / serve.DEFAULT_WORKDIR / api.KEY_FILE]
    before = {path: sha256_file(path) for path in paths if path.is_file()}
    printed = clone.in_bash(".venv/bin/python -m scripts.demo --out work/demo --listings 60 --epochs 1")  # make demo
    assert "port 8080 is already in use" in printed and "takes free ports instead" in printed
    assert "demo finished" in printed and (folder / "work" / "demo" / "model_store" / "marketplace-v1.0.mar").is_file()
    assert {path: sha256_file(path) for path in before} == before
    assert serve.attach(folder / "work" / "demo" / "logs") is None and not serve.processes_under(folder / "work" / "demo")
    assert clone.default_version() == "1.0"  # the README's server still answers
    [page] = re.findall(r"^search page: (http://127\.0\.0\.1:\d+/) ", printed, re.MULTILINE)
    assert page != f"{PAGE}/" and requests.get(PAGE, timeout=10).ok  # the README's page holds 8090
    with pytest.raises(requests.ConnectionError):
        requests.get(page, timeout=10)  # the demo's page stopped with its server
    clone.run("scripts.serve stop")
    with pytest.raises(requests.ConnectionError):
        requests.get(PAGE, timeout=10)


def test_the_live_catalogue_and_ray_on_the_archive(clone):
    seeded = json.loads(clone.run("init --archive model_store/marketplace-v1.0.mar"))
    assert seeded["photos"] == 12 and seeded["listings_by_words"] > 0  # the text model and its sentence encoder
    assert json.loads(clone.run("LIVE remove"))["removed"] == ["prod-000", "prod-001"]
    added = json.loads(clone.run("add --data NEW_LISTINGS/"))
    assert (added["generation"], added["added_listings"], added["words"]["added_listings"]) == (2, 2, 2)
    assert json.loads(clone.run("LIVE status"))["removed"] == 2
    assert json.loads(clone.run("LIVE compact"))["generation"] == 3
    assert json.loads(clone.run("LIVE prune --keep 3"))["deleted"] == []
    local = clone.results()  # --local's, above
    (clone.folder / "results.jsonl").unlink()
    clone.run("--engine ray --archive model_store/marketplace-v1.0.mar --actors 1")
    assert_same_answers(clone.results(), local)
    clone.run("training.embed --work work/marketplace --engine ray")
