"""deploy/: the Kubernetes manifests against the schemas and the design they promise, and their entry point
(nginx, as each pod runs it) in front of a real TorchServe."""
import re
import shutil
import subprocess
import time
from pathlib import Path

import kubernetes_validate
import pytest
import requests
import yaml

from scripts import api
from scripts.serve import free_ports, read_properties, serving
from tests.conftest import skip_or_fail
from tests.serving_fixtures import NAME

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
    return dict(line.split("=", 1) for line in text.splitlines() if line.strip())


def entry_config(listen: int, torchserve: dict[str, int], keys: dict[str, str], folder: Path) -> Path:
    """The pod's nginx template as nginx's image renders it (its envsubst of the filtered names), on test ports."""
    template = documents()[("ConfigMap", "marketplace-entry")]["data"]["default.conf.template"]
    server = re.sub(r"\$\{((?:INFERENCE|MANAGEMENT)_KEY(?:_NEXT)?)\}", lambda m: keys.get(m.group(1), ""), template)
    server = server.replace("listen 8000;", f"listen 127.0.0.1:{listen};")
    for port, chosen in zip((8080, 8081, 8082), (torchserve["inference"], torchserve["management"],
                                                 torchserve["metrics"])):
        server = server.replace(f"127.0.0.1:{port}", f"127.0.0.1:{chosen}")
    config = folder / "nginx.conf"
    config.write_text(f"daemon off;\npid {folder}/nginx.pid;\nerror_log {folder}/error.log;\nevents {{}}\n"
                      f"http {{\naccess_log off;\nclient_body_temp_path {folder};\nproxy_temp_path {folder};\n"
                      f"{server}\n}}\n")
    return config


@pytest.fixture(scope="module")
def entry_point(recipe, module_tmp):
    """A pod on this machine: TorchServe as the fleet's config runs it (no keys of its own) and nginx in front."""
    if not NGINX.is_file():
        skip_or_fail(f"{NGINX} is missing: `make venv` installs Debian's nginx")
    folder = module_tmp("pod")
    properties = fleet_properties()
    extra = {key: properties[key] for key in ("disable_token_authorization", "enable_model_api")}
    with serving(recipe.store, folder / "ts", {NAME: recipe.v1.name}, extra_config=extra) as server:
        ports = {api_: int(getattr(server, f"{api_}_url").rsplit(":", 1)[1]) for api_ in ("inference", "management", "metrics")}
        keys = {"INFERENCE_KEY": "inference-key-1", "INFERENCE_KEY_NEXT": "inference-key-2",
                "MANAGEMENT_KEY": "management-key-1"}  # no MANAGEMENT_KEY_NEXT: the optional key left unset
        [listen] = free_ports(1)
        nginx = subprocess.Popen([str(NGINX), "-c", str(entry_config(listen, ports, keys, folder)), "-p", str(folder)])
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
            yield address, server, keys
        finally:
            nginx.terminate()
            nginx.wait(10)


@pytest.mark.server
def test_the_entry_point_lets_in_the_fleet_s_keys_only(entry_point, recipe):
    address, server, keys = entry_point
    photo = recipe.run.photo_bytes("img-002")
    assert api.predict(address, photo, token=keys["INFERENCE_KEY"])["model"]["version"] == "1.0"
    assert api.predict(address, photo, token=keys["INFERENCE_KEY_NEXT"], k=2)["neighbours"]  # mid-rotation
    for wrong in (None, "", keys["MANAGEMENT_KEY"], "inference-key"):
        with pytest.raises(api.ApiError) as refused:
            api.predict(address, photo, token=wrong, retries=0)
        assert refused.value.status == 401 and "fleet inference key" in str(refused.value)
    response = requests.post(f"{address}/predictions/{NAME}", data=photo, timeout=30,
                             headers={"Content-Type": "image/jpeg", "Authorization": "Bearer "})
    assert response.status_code == 401  # the unset MANAGEMENT_KEY_NEXT lets no empty key in
    management = f"{address}/management"
    assert api.describe(management, NAME, token=keys["MANAGEMENT_KEY"])[0]["modelVersion"] == "1.0"
    with pytest.raises(api.ApiError, match="401"):
        api.describe(management, NAME, token=keys["INFERENCE_KEY"])
    with pytest.raises(api.ApiError, match="401"):
        api.describe(management, NAME, token="")
    assert requests.get(f"{address}/healthz", timeout=5).json() == {"status": "ok"}
    assert requests.get(f"{address}/metrics", timeout=5).ok
    assert requests.get(f"{address}/ping", timeout=5).status_code == 404  # only what clients need leaves the pod
