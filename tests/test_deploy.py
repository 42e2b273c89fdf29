"""deploy/: the Kubernetes manifests against the schemas and the design they promise, and their entry point
(nginx, as each pod runs it) in front of a real TorchServe."""
import contextlib
import json
import shutil
import subprocess
import time
from pathlib import Path

import kubernetes_validate
import pytest
import requests
import yaml

from scripts import api, catalogue, gate, versions
from scripts import fleet as fleet_tools
from scripts.serve import free_ports, serving
from tests.conftest import skip_or_fail
from tests.serving_fixtures import NAME, ClientLoop, archive_tiny_run, wait_until
from marketplace_search.layout import CHECKPOINT
from marketplace_search.models import load_checkpoint
from training.tiny_run import CLASSES, make_tiny_run

DEPLOY = Path(__file__).resolve().parents[1] / "deploy"
KUBERNETES = "1.33.0"
NGINX = Path("/usr/sbin/nginx")


def documents() -> dict[tuple[str, str], dict]:
    """Every object kustomization.yaml applies, by (kind, name)."""
    kustomization = yaml.safe_load((DEPLOY / "kustomization.yaml").read_text())
    found = {}
    for name in kustomization["resources"]:
        for document in yaml.safe_load_all((DEPLOY / name).read_text()):
            found[(document["kind"], document["metadata"]["name"])] = document
    return found


def test_the_manifests_validate_and_kustomize_applies_every_file():
    kustomization = yaml.safe_load((DEPLOY / "kustomization.yaml").read_text())
    assert sorted(kustomization["resources"]) == sorted(p.name for p in DEPLOY.glob("*.yaml")
                                                       if p.name != "kustomization.yaml")
    for document in documents().values():
        kubernetes_validate.validate(document, KUBERNETES, strict=True)


def test_the_manifests_keep_the_fleet_s_design():
    objects = documents()
    deployment = objects[("Deployment", "marketplace")]
    labels = deployment["spec"]["template"]["metadata"]["labels"]
    for kind, name in (("Service", "marketplace"), ("Service", "marketplace-replicas")):
        assert objects[(kind, name)]["spec"]["selector"].items() <= labels.items()
    for kind in ("PodDisruptionBudget", "NetworkPolicy"):
        selector = objects[(kind, "marketplace")]["spec"].get("selector") or objects[(kind, "marketplace")]["spec"]["podSelector"]
        assert selector["matchLabels"].items() <= labels.items()
    assert objects[("HorizontalPodAutoscaler", "marketplace")]["spec"]["scaleTargetRef"]["name"] == "marketplace"
    assert deployment["spec"]["replicas"] >= 2 and objects[("HorizontalPodAutoscaler", "marketplace")]["spec"]["minReplicas"] >= 2
    torchserve, entry = deployment["spec"]["template"]["spec"]["containers"]
    assert "READY" in " ".join(torchserve["readinessProbe"]["exec"]["command"])  # not just /ping
    assert torchserve["livenessProbe"] and torchserve["lifecycle"]["preStop"] and entry["lifecycle"]["preStop"]
    assert all(mount["readOnly"] for mount in torchserve["volumeMounts"])
    assert torchserve["resources"]["requests"]["cpu"] and "ports" not in torchserve  # reached through the entry only
    [port] = entry["ports"]
    policy = objects[("NetworkPolicy", "marketplace")]["spec"]["ingress"]
    assert [rule["ports"] for rule in policy] == [[{"port": port["containerPort"], "protocol": "TCP"}]]
    properties = fleet_properties()
    assert all(properties[key].startswith("http://127.0.0.1:") for key in
               ("inference_address", "management_address", "metrics_address"))
    assert properties["allowed_urls"].startswith("file://") and "load_models" not in properties
    secrets = {env["valueFrom"]["secretKeyRef"]["key"] for env in entry["env"] if "valueFrom" in env}
    assert secrets == {"inference", "inference-next", "management", "management-next"}


def fleet_properties() -> dict:
    text = documents()[("ConfigMap", "marketplace-torchserve")]["data"]["config.properties"]
    return dict(line.split("=", 1) for line in text.splitlines() if line.strip() and not line.startswith("#"))


def entry_config(listen: int, torchserve: dict[str, int], folder: Path) -> Path:
    """The pod's nginx template as nginx's image renders it, with KEYS, on test ports."""
    config = folder / "nginx.conf"
    config.write_text(fleet_tools.nginx_config(folder, fleet_tools.entry_server(listen, fleet_tools.loopback(torchserve), KEYS), daemon=False))
    return config


KEYS = {"inference": "inference-key-1", "inference-next": "inference-key-2",
        "management": "management-key-1"}  # no management-next: the optional key left unset


@contextlib.contextmanager
def pod(store: Path, folder: Path, models: dict | None = None):
    """A pod on this machine: TorchServe as the fleet's config runs it (no keys of its own, the model-control API
    on) and nginx in front with KEYS; yields (the entry point's address, the server)."""
    if not NGINX.is_file():
        skip_or_fail(f"{NGINX} is missing: `make venv` installs Debian's nginx")
    properties = fleet_properties()
    extra = {key: properties[key] for key in ("disable_token_authorization", "enable_model_api")}
    with serving(store, folder / "ts", models or {}, extra_config=extra) as server:
        ports = {name: int(getattr(server, f"{name}_url").rsplit(":", 1)[1])
                 for name in ("inference", "management", "metrics")}
        [listen] = free_ports(1)
        nginx = subprocess.Popen([str(NGINX), "-c", str(entry_config(listen, ports, folder)), "-p", str(folder)])
        address = f"http://127.0.0.1:{listen}"
        try:
            deadline = time.monotonic() + 20
            while True:
                try:
                    requests.get(f"{address}/healthz", timeout=2)
                    break
                except requests.ConnectionError:
                    assert nginx.poll() is None and time.monotonic() < deadline, (folder / "error.log").read_text()
                    time.sleep(0.1)
            yield address, server
        finally:
            nginx.terminate()
            nginx.wait(10)


@pytest.mark.server
def test_the_entry_point_lets_in_the_fleet_s_keys_only(fleet, recipe):
    address, keys = fleet[1][0], KEYS
    photo = recipe.run.photo_bytes("img-002")
    assert api.predict(address, photo, token=keys["inference"])["model"]["version"] == "1.0"
    assert api.predict(address, photo, token=keys["inference-next"], k=2)["neighbours"]  # mid-rotation
    for wrong in (None, "", keys["management"], "inference-key"):
        with pytest.raises(api.ApiError) as refused:
            api.predict(address, photo, token=wrong, retries=0)
        assert refused.value.status == 401 and "fleet inference key" in str(refused.value)
    response = requests.post(f"{address}/predictions/{NAME}", data=photo, timeout=30,
                             headers={"Content-Type": "image/jpeg", "Authorization": "Bearer "})
    assert response.status_code == 401  # the unset management-next lets no empty key in
    management = f"{address}/management"
    assert api.describe(management, NAME, token=keys["management"])[0]["modelVersion"] == "1.0"
    with pytest.raises(api.ApiError, match="401"):
        api.describe(management, NAME, token=keys["inference"])
    with pytest.raises(api.ApiError, match="401"):
        api.describe(management, NAME, token="")
    assert requests.get(f"{address}/healthz", timeout=5).json() == {"status": "ok"}
    assert requests.get(f"{address}/metrics", timeout=5).ok
    assert requests.get(f"{address}/ping", timeout=5).status_code == 404  # only what clients need leaves the pod


def release_store(recipe, store: Path, module_tmp) -> Path:
    """STORE with the recipe's 1.0 and 2.0, and 3.0: 1.0's model with every category renamed, in its classes and
    its catalogue; released default 1.0; returns its evaluation set's folder (see label_set)."""
    for mar in (recipe.v1, recipe.v2):
        shutil.copy(mar, store)
    model, _ = load_checkpoint(recipe.run.run_dir / CHECKPOINT)
    renamed = make_tiny_run(module_tmp("renamed") / "model_evaluation" / "2025-02-01_000000", model=model,
                            classes=CLASSES[1:] + CLASSES[:1])
    archive_tiny_run(renamed, store, version="3.0")
    versions.record_default(store / versions.HISTORY_FILE, NAME, "1.0", {"1.0": recipe.v1.name})
    return gate.make_set(recipe.work, store)


def label_set(folder: Path, category_of) -> None:
    """The evaluation set labelled with CATEGORY_OF(photo) (1.0's answers), so that 1.0 scores 1 and 3.0 0."""
    rows = gate.read_set(folder)
    (folder / gate.LABELS).write_text("image_id,product_id,category\n" + "".join(
        f"{row['image_id']},{row['product_id']},{category_of(row['photo'])}\n" for row in rows))


@pytest.fixture(scope="module")
def fleet(recipe, module_tmp):
    """Two pods on release_store's model store, both on 1.0."""
    store = module_tmp("fleet-store")
    folder = release_store(recipe, store, module_tmp)
    with contextlib.ExitStack() as stack:
        pods = [stack.enter_context(pod(store, module_tmp(f"pod-{number}"))) for number in range(2)]
        replicas = [versions.Replica(server, server) for _, server in pods]  # what each pod's postStart does
        assert versions.on_every(replicas, lambda replica: versions.sync(replica.management, NAME, store))[1] == [
            "1.0", "1.0"]
        label_set(folder, lambda photo: api.predict(pods[0][1], photo)["category"])
        yield store, [address for address, _ in pods]


def defaults(addresses: list[str]) -> list[str]:
    return [api.describe(f"{address}/management", NAME, token=KEYS["management"])[0]["modelVersion"]
            for address in addresses]


@pytest.mark.server
@pytest.mark.slow
def test_a_release_and_a_rollback_move_every_replica_and_lose_no_request(fleet, recipe, monkeypatch, capsys):
    store, addresses = fleet
    monkeypatch.setenv("TS_INFERENCE_TOKEN", KEYS["inference"])
    command = [f"--replica={address}" for address in addresses] + [
        "--token", KEYS["management"], "--store", str(store)]
    headers = api.auth_headers(KEYS["inference"])
    loops = [ClientLoop(f"{address}/predictions/{NAME}", recipe.run.photo_bytes("img-001"), headers)
             for address in addresses]
    with contextlib.ExitStack() as stack:
        for loop in loops:
            stack.enter_context(loop)
        versions.main([*command, "release", "--mar", str(store / recipe.v2.name), "--name", NAME])
        assert defaults(addresses) == ["2.0", "2.0"]
        printed = capsys.readouterr().out
        assert "accuracy gate on 6 photos: candidate 2.0: top1" in printed and "default 1.0: top1" in printed
        with pytest.raises(SystemExit):
            versions.main([*command, "release", "--mar", str(store / "marketplace-v3.0.mar"), "--name", NAME])
        assert "answers the evaluation set worse than 2.0" in capsys.readouterr().err
        assert defaults(addresses) == ["2.0", "2.0"]  # and 3.0 is gone from both
        for address in addresses:
            assert {d["modelVersion"] for d in api.describe(f"{address}/management", NAME, "all",
                                                            token=KEYS["management"])} == {"1.0", "2.0"}
        versions.main([*command, "rollback", NAME])
        assert defaults(addresses) == ["1.0", "1.0"]
        time.sleep(1)  # answers on both sides of the last switch
    answered = [outcome[3]["model"]["version"] for loop in loops for outcome in loop.outcomes if outcome[2] == 200]
    assert [loop.failures() for loop in loops] == [[], []] and {"1.0", "2.0"} <= set(answered)
    gates = json.loads((store / versions.HISTORY_FILE).read_text())[NAME]["gates"]
    assert [(entry["candidate"]["version"], entry["passed"]) for entry in gates] == [("2.0", True), ("3.0", False)]
    assert gates[1]["candidate"]["top1"] < gates[1]["default"]["top1"] - gate.MARGIN


@pytest.mark.server
@pytest.mark.slow
def test_a_replica_that_restarts_comes_back_on_the_released_default(fleet, recipe, module_tmp):
    store, addresses = fleet
    managed = [versions.entry_replica(address).management for address in addresses]
    versions.rollback(managed, NAME, to="2.0", token=KEYS["management"], history=store / versions.HISTORY_FILE)
    assert defaults(addresses) == ["2.0", "2.0"]
    with pod(store, module_tmp("pod-restarted")) as (address, server):
        assert versions.sync(server, NAME, store) == "2.0"
        assert api.predict(address, recipe.run.photo_bytes("img-003"), token=KEYS["inference"])["model"][
            "version"] == "2.0"


@pytest.mark.server
@pytest.mark.slow
def test_a_listing_removed_from_the_shared_live_catalogue_leaves_every_replica_within_2_s(fleet, recipe, module_tmp):
    store, addresses = fleet
    live = module_tmp("fleet-live") / "live"
    mar = archive_tiny_run(recipe.run, store, name="live", live_catalogue=live)
    catalogue.main(["--live", str(live), "init", "--archive", str(mar)])
    versions.on_every([versions.entry_replica(address) for address in addresses], lambda replica: api.register(
        replica.management, mar.name, "live", initial_workers=1, synchronous=True, token=KEYS["management"]))
    photo = recipe.run.photo_bytes("img-000")  # prod-000's own photo: first in every answer while it is there

    def products(address: str) -> set[str]:
        answer = api.predict(address, photo, model="live", k=100, token=KEYS["inference"])
        return {neighbour["product_id"] for neighbour in answer["neighbours"]}

    assert all("prod-000" in products(address) for address in addresses)
    catalogue.main(["--live", str(live), "remove", "prod-000"])
    removed = time.monotonic()
    for address in addresses:
        assert wait_until(lambda: "prod-000" not in products(address), 5)
    assert time.monotonic() - removed < 2.0
