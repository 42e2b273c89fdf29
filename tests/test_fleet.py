"""The local fleet (scripts/fleet.py): containers of the built image under podman behind one address, released,
killed and fed a live catalogue while clients keep asking. `make fleet-test` (root, podman, the image: minutes);
not in `make test`."""
import json
import subprocess
import time

import pytest
import requests

from scripts import api, catalogue, fleet as fleet_tools, versions
from tests.serving_fixtures import NAME, ClientLoop, archive_tiny_run, wait_until
from tests.test_deploy import label_set, release_store

pytestmark = [pytest.mark.fleet, pytest.mark.server, pytest.mark.slow]


@pytest.fixture(scope="module")
def fleet(recipe, module_tmp):
    """Two replicas (1 CPU each) on release_store's model store and a live catalogue, started by the controller
    on the released default (1.0); the evaluation set labelled with 1.0's answers through the fleet."""
    if subprocess.run(["id", "-u"], capture_output=True, text=True).stdout.strip() != "0":
        pytest.skip("the local fleet needs root (podman)")
    store, live = module_tmp("fleet-store"), module_tmp("fleet-live") / "live"
    folder = release_store(recipe, store, module_tmp)
    mar = archive_tiny_run(recipe.run, store, name="live", live_catalogue=live)
    catalogue.main(["--live", str(live), "init", "--archive", str(mar)])
    for path in (store, live):
        subprocess.run(["chmod", "-R", "o+rX", str(path)], check=True)  # pytest's folders are private
    workdir = module_tmp("fleet")
    running = fleet_tools.up(workdir, store, replicas=2, cpus=1, live=live, port=0)
    try:
        keys = running.keys()
        label_set(folder, lambda photo: api.predict(running.address, photo, token=keys["inference"])["category"])
        yield running
    finally:
        fleet_tools.down(workdir)
        assert not fleet_tools.podman("ps", "-a", "--filter", f"label=marketplace-fleet={running.workdir}",
                                      "--format", "{{.Names}}").stdout.strip()


def defaults(fleet) -> list[str]:
    token = fleet.keys()["management"]
    return [api.describe(f"{replica.address}/management", NAME, token=token)[0]["modelVersion"]
            for replica in fleet.replicas]


def client_loop(fleet, recipe, clients: int = 2) -> ClientLoop:
    return ClientLoop(f"{fleet.address}/predictions/{NAME}", recipe.run.photo_bytes("img-001"),
                      api.auth_headers(fleet.keys()["inference"]), clients)


def test_one_address_one_key(fleet, recipe):
    photo, keys = recipe.run.photo_bytes("img-002"), fleet.keys()
    answer = api.predict(fleet.address, photo, token=keys["inference"])
    assert answer["model"]["version"] == "1.0" and answer["neighbours"]
    with pytest.raises(api.ApiError) as refused:
        api.predict(fleet.address, photo, token=keys["management"], retries=0)
    assert refused.value.status == 401
    for replica in fleet.replicas:  # TorchServe itself: on loopback, the fleet's config (no keys, no models loaded)
        assert requests.get(f"{replica.management}/models", timeout=5).json()["models"]


def test_a_release_a_refused_candidate_and_a_rollback_lose_no_request(fleet, recipe, capsys):
    store = fleet.store
    with client_loop(fleet, recipe) as loop:
        fleet_tools.main(["--workdir", str(fleet.workdir), "release", "--mar", str(store / recipe.v2.name),
                          "--name", NAME])
        assert defaults(fleet) == ["2.0", "2.0"]
        with pytest.raises(SystemExit):
            fleet_tools.main(["--workdir", str(fleet.workdir), "release", "--mar",
                              str(store / "marketplace-v3.0.mar"), "--name", NAME])
        assert "answers the evaluation set worse than 2.0" in capsys.readouterr().err
        assert defaults(fleet) == ["2.0", "2.0"]
        fleet_tools.main(["--workdir", str(fleet.workdir), "rollback", NAME])
        assert defaults(fleet) == ["1.0", "1.0"]
        time.sleep(1)
    answered = {outcome[3]["model"]["version"] for outcome in loop.outcomes if outcome[2] == 200}
    assert loop.failures() == [] and {"1.0", "2.0"} <= answered
    gates = json.loads((store / versions.HISTORY_FILE).read_text())[NAME]["gates"]
    assert [(entry["candidate"]["version"], entry["passed"]) for entry in gates] == [("2.0", True), ("3.0", False)]


def test_a_replica_killed_mid_load_is_replaced_and_costs_at_most_its_requests_in_flight(fleet, recipe):
    clients = 4
    with client_loop(fleet, recipe, clients) as loop:
        time.sleep(2)
        killed = time.monotonic()
        fleet_tools.podman("kill", "--signal", "KILL", fleet.replicas[0].container)
        assert wait_until(lambda: fleet_tools.status(fleet)["replaced"].get("0") == 1
                          and fleet_tools.status(fleet)["ready"] == [0, 1], 180)
        back = time.monotonic()
        time.sleep(2)
    failures = loop.failures()
    assert len(failures) <= clients, failures
    assert [outcome for outcome in loop.outcomes if killed < outcome[0] < back and outcome[2] == 200]  # one left
    released = versions.released_default(fleet.store / versions.HISTORY_FILE, NAME)["version"]
    assert defaults(fleet) == [released, released]  # the new replica came back on the released default
    print(f"killed replica 0: {len(failures)} failed of {len(loop.outcomes)} requests, READY again "
          f"{back - killed:.1f} s later")


def test_a_listing_removed_from_the_live_catalogue_leaves_every_replica_within_2_s(fleet, recipe):
    keys, live = fleet.keys(), fleet.live
    versions.on_every([versions.entry_replica(replica.address) for replica in fleet.replicas],
                      lambda replica: api.register(replica.management, next(fleet.store.glob("live*.mar")).name, "live",
                                                   initial_workers=1, synchronous=True, token=keys["management"]))
    photo = recipe.run.photo_bytes("img-000")  # prod-000's own photo: first in every answer while it is there

    def products(address: str) -> set[str]:
        answer = api.predict(address, photo, model="live", k=100, token=keys["inference"])
        return {neighbour["product_id"] for neighbour in answer["neighbours"]}

    assert all("prod-000" in products(replica.address) for replica in fleet.replicas)
    catalogue.main(["--live", str(live), "remove", "prod-000"])
    removed = time.monotonic()
    for replica in fleet.replicas:
        assert wait_until(lambda: "prod-000" not in products(replica.address), 5)
    assert time.monotonic() - removed < 2.0


def test_a_set_default_that_fails_on_one_replica_leaves_every_replica_on_the_old_default(fleet, recipe, monkeypatch):
    before = defaults(fleet)
    archive_tiny_run(recipe.run, fleet.store, version="4.0")  # 1.0's model: it passes the gate
    second = fleet.replicas[1].address
    real = versions.set_default

    def failing_on_the_second(target, name, version, token=None):
        if str(target).startswith(second) and version == "4.0":
            raise api.ApiError("injected: the replica went away", 503)
        return real(target, name, version, token)

    monkeypatch.setattr(versions, "set_default", failing_on_the_second)
    with client_loop(fleet, recipe) as loop, pytest.raises(SystemExit):
        fleet_tools.main(["--workdir", str(fleet.workdir), "release", "--mar",
                          str(fleet.store / "marketplace-v4.0.mar"), "--name", NAME])
    assert defaults(fleet) == before
    assert loop.failures() == []
    token = fleet.keys()["management"]
    for replica in fleet.replicas:
        assert "4.0" not in {d["modelVersion"] for d in api.describe(f"{replica.address}/management", NAME, "all",
                                                                     token=token)}
    assert versions.released_default(fleet.store / versions.HISTORY_FILE, NAME)["version"] == before[0]
