"""A local fleet on this machine: the design of deploy/ run with podman instead of Kubernetes. REPLICAS containers of
the built image (TorchServe with the fleet's config), each behind its pod's entry point (deploy/'s nginx template
with the fleet's keys), and one address in front of the READY ones. A controller does what Kubernetes does for
deploy/: it replaces a replica that died (the Deployment), registers the released default on a new one (the pod's
postStart: scripts.versions sync) and sends requests only to replicas with a READY worker (readiness probe and
Service).

  python -m scripts.fleet up --store model_store [--replicas 2] [--cpus 1] [--live DIR] [--port 8000]
  python -m scripts.fleet status
  python -m scripts.fleet drain 1        # replica 1 out of the one address (no numbers: every one back in)
  python -m scripts.fleet release --mar model_store/marketplace-v2.0.mar     # also rollback, retire: every replica
  python -m scripts.fleet down

Clients send `Authorization: Bearer <inference>` from WORKDIR/keys.json to http://127.0.0.1:PORT/predictions/NAME.
Needs root, podman and the image (`bash scripts/image-test.sh build`), and Debian's nginx.
"""
import argparse
import contextlib
import functools
import json
import os
import secrets
import signal
import subprocess
import sys
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import psutil
import requests
import yaml

from marketplace_search.files import replaced_atomically
from scripts import api, versions
from scripts.serve import free_ports

REPO = Path(__file__).resolve().parents[1]
DEPLOY = REPO / "deploy"
NGINX = Path("/usr/sbin/nginx")
CONTAINER_BUILD = Path(os.environ.get("W", "/tmp/container-build"))  # scripts/image-test.sh's storage
IMAGE = "marketplace-serve"
NAME = "marketplace"
DEFAULT_WORKDIR = REPO / "logs" / "fleet"
STORE_IN_IMAGE = "/home/model-server/model-store"
FLEET_CONFIG = "/etc/marketplace-fleet/config.properties"
KEY_NAMES = {"inference": "INFERENCE_KEY", "inference-next": "INFERENCE_KEY_NEXT", "management": "MANAGEMENT_KEY",
             "management-next": "MANAGEMENT_KEY_NEXT"}  # the Secret's keys and the entry point's variables
PORTS = ("entry", "inference", "management", "metrics", "grpc_inference", "grpc_management")
TORCHSERVE_PORTS = {"inference": 8080, "management": 8081, "metrics": 8082}  # in deploy/'s config and template
POLL_SECONDS = 0.5
FAILURES_TO_LEAVE = 3  # probes in a row (a readiness probe's failureThreshold); a container gone leaves at once
SYNC_RETRY_SECONDS = 10


class FleetError(RuntimeError):
    pass


@dataclass
class Replica:
    number: int
    ports: dict[str, int]

    @property
    def container(self) -> str:
        return f"{NAME}-fleet-{self.number}"

    @property
    def address(self) -> str:
        """Its pod's entry point: what `scripts.versions --replica` takes."""
        return f"http://127.0.0.1:{self.ports['entry']}"

    @property
    def management(self) -> str:  # TorchServe's own, on loopback (the controller's probes)
        return f"http://127.0.0.1:{self.ports['management']}"


@dataclass
class Fleet:
    workdir: Path
    store: Path
    live: Path | None
    port: int
    cpus: float
    image: str = IMAGE
    replicas: list[Replica] = field(default_factory=list)

    @property
    def address(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def save(self) -> None:
        state = {**asdict(self), "workdir": str(self.workdir), "store": str(self.store),
                 "live": str(self.live) if self.live else None}
        with replaced_atomically(self.workdir / "fleet.json") as partial:
            partial.write_text(json.dumps(state, indent=2))

    @classmethod
    def load(cls, workdir: Path) -> "Fleet":
        try:
            state = json.loads((workdir / "fleet.json").read_text())
        except FileNotFoundError:
            raise FleetError(f"no fleet in {workdir}: start one with `python -m scripts.fleet up`") from None
        return cls(**{**state, "workdir": Path(state["workdir"]), "store": Path(state["store"]),
                      "live": Path(state["live"]) if state["live"] else None,
                      "replicas": [Replica(**replica) for replica in state["replicas"]]})

    def keys(self) -> dict[str, str]:
        return json.loads((self.workdir / "keys.json").read_text())


@functools.cache
def manifest(kind: str, name: str) -> dict:
    for document in yaml.safe_load_all((DEPLOY / "configmaps.yaml").read_text()):
        if document and document["kind"] == kind and document["metadata"]["name"] == name:
            return document
    raise FleetError(f"deploy/configmaps.yaml has no {kind} {name}")


def torchserve_properties(ports: dict[str, int]) -> str:
    """deploy/'s TorchServe config (ConfigMap marketplace-torchserve) on this replica's loopback ports: the
    replicas share the host's network here, not a pod's each."""
    text = manifest("ConfigMap", "marketplace-torchserve")["data"]["config.properties"]
    for name, port in TORCHSERVE_PORTS.items():
        text = text.replace(f"127.0.0.1:{port}", f"127.0.0.1:{ports[name]}")
    return text.replace("grpc_inference_port=7070", f"grpc_inference_port={ports['grpc_inference']}").replace(
        "grpc_management_port=7071", f"grpc_management_port={ports['grpc_management']}")


def entry_server(listen: int, targets: dict[str, str], keys: dict[str, str]) -> str:
    """A pod's entry point: deploy/'s nginx template as nginx's image renders it (envsubst of the key variables;
    an unset one is empty), on 127.0.0.1:LISTEN in front of TARGETS: TorchServe's inference, management and
    metrics addresses (host:port, or an upstream's name)."""
    template = manifest("ConfigMap", "marketplace-entry")["data"]["default.conf.template"]
    server = template[template.index("server {"):]  # the map before it: once per nginx, in nginx_config
    for name, variable in KEY_NAMES.items():
        server = server.replace("${" + variable + "}", keys.get(name, ""))
    server = server.replace("listen 8000;", f"listen 127.0.0.1:{listen};")
    for name, port in TORCHSERVE_PORTS.items():
        server = server.replace(f"127.0.0.1:{port}", targets[name])
    return server


def loopback(ports: dict[str, int]) -> dict[str, str]:
    return {name: f"127.0.0.1:{ports[name]}" for name in TORCHSERVE_PORTS}


def nginx_config(folder: Path, servers: str, daemon: bool = True) -> str:
    """nginx's main file around entry point SERVERS (with the template's map of the key a request carries), its
    pid, logs and request bodies in FOLDER."""
    template = manifest("ConfigMap", "marketplace-entry")["data"]["default.conf.template"]
    user = "user root;\n" if os.geteuid() == 0 else ""  # its workers write large bodies into FOLDER
    return (f"{user}{'' if daemon else 'daemon off;'}\npid {folder}/nginx.pid;\nerror_log {folder}/error.log;\n"
            f"events {{}}\nhttp {{\naccess_log off;\nclient_body_temp_path {folder};\nproxy_temp_path {folder};\n"
            f"{template[:template.index('server {')]}{servers}\n}}\n")


def front_server(port: int, ready: list[Replica], keys: dict[str, str]) -> str:
    """The one address: the entry point's checks, then the READY replicas' TorchServe, in turns. Kubernetes does
    this in two steps (the Service's kernel-level balancing, then the pod's nginx); one nginx does both here. A
    prediction whose replica died under it is sent to the next: answering one twice is harmless."""
    if not ready:
        body = "return 503 '{\"code\": 503, \"type\": \"no_replica_ready\", \"error\": \"no replica is READY\"}\\n';"
        return f"server {{\n  listen 127.0.0.1:{port};\n  default_type application/json;\n  location / {{ {body} }}\n}}\n"
    upstreams = "".join(
        f"upstream marketplace_{name} {{\n" + "".join(f"  server 127.0.0.1:{replica.ports[name]} max_fails=0;\n"
                                                  for replica in ready) + "  keepalive 16;\n}\n"
        for name in TORCHSERVE_PORTS)
    server = entry_server(port, {name: f"marketplace_{name}" for name in TORCHSERVE_PORTS}, keys)
    server = server.replace(f"listen 127.0.0.1:{port};", f"listen 127.0.0.1:{port};\n  proxy_http_version 1.1;\n"
                                                         f"  proxy_set_header Connection \"\";", 1)
    server = server.replace("proxy_pass http://marketplace_inference;", "proxy_pass http://marketplace_inference;\n"
                            "    proxy_next_upstream error timeout http_502 non_idempotent;")
    return upstreams + server


def write_nginx(fleet: Fleet, ready: list[Replica]) -> Path:
    keys = fleet.keys()
    servers = "".join(entry_server(replica.ports["entry"], loopback(replica.ports), keys) for replica in fleet.replicas)
    config = fleet.workdir / "nginx.conf"
    with replaced_atomically(config) as partial:
        partial.write_text(nginx_config(fleet.workdir, servers + front_server(fleet.port, ready, keys)))
    return config


def nginx(fleet: Fleet, *signal_args: str) -> None:
    config = fleet.workdir / "nginx.conf"
    result = subprocess.run([str(NGINX), "-c", str(config), "-p", str(fleet.workdir), *signal_args],
                            capture_output=True, text=True)
    if result.returncode:
        raise FleetError(f"nginx {' '.join(signal_args)} failed: {result.stderr.strip()}")


def podman(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    """podman as scripts/image-test.sh runs it here: its storage, cgroupfs (no systemd), runc."""
    command = ["podman", "--root", str(CONTAINER_BUILD / "storage"), "--runroot", str(CONTAINER_BUILD / "runroot"),
               "--storage-driver", "overlay", "--cgroup-manager", "cgroupfs", "--events-backend", "file",
               "--runtime", "runc", *args]
    result = subprocess.run(command, capture_output=True, text=True)
    if check and result.returncode:
        raise FleetError(f"podman {' '.join(args[:2])} failed: {result.stderr.strip()[-500:]}")
    return result


def start_replica(fleet: Fleet, replica: Replica) -> None:
    """A new container of the image for REPLICA (any old one removed): the store and the live catalogue read-only,
    the fleet's TorchServe config, at most CPUS cores."""
    properties = fleet.workdir / f"replica-{replica.number}.properties"
    properties.write_text(torchserve_properties(replica.ports))
    properties.chmod(0o644)
    podman("rm", "-f", "-t", "0", replica.container, check=False)
    live = ["-v", f"{fleet.live}:{fleet.live}:ro"] if fleet.live else []  # archives name its path on this machine
    podman("run", "-d", "--name", replica.container, "--label", f"marketplace-fleet={fleet.workdir}",
           "--network", "host", "--cpus", str(fleet.cpus), "--log-driver", "k8s-file",
           "--ulimit", "nofile=20000:20000", "--ulimit", "nproc=32768:32768",  # podman's defaults are refused here
           "-v", f"{fleet.store}:{STORE_IN_IMAGE}:ro", *live, "-v", f"{properties}:{FLEET_CONFIG}:ro",
           fleet.image, "--ts-config", FLEET_CONFIG)


def cpu_seconds(container: str) -> float | None:
    """CPU time the container's processes have used (its cgroup: v1 cpuacct or v2 cpu.stat); None if not found."""
    identity = podman("inspect", "--format", "{{.Id}}", container, check=False).stdout.strip()
    for path, read in ((Path(f"/sys/fs/cgroup/cpuacct/libpod_parent/libpod-{identity}/cpuacct.usage"),
                        lambda text: int(text) / 1e9),
                       (Path(f"/sys/fs/cgroup/libpod_parent/libpod-{identity}/cpu.stat"),
                        lambda text: int(text.split("usage_usec")[1].split()[0]) / 1e6)):
        if identity and path.is_file():
            return read(path.read_text())
    return None


def container_pid(replica: Replica) -> int | None:
    """The host pid of the replica's container (its init), None when it is not running."""
    found = podman("inspect", "--format", "{{.State.Pid}}", replica.container, check=False).stdout.strip()
    return int(found) if found.isdigit() and int(found) > 0 else None


def alive(pid: int | None) -> bool:
    try:
        return pid is not None and psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def probe(replica: Replica) -> str:
    """"ready" (a READY worker of NAME), "loading", "missing" (TorchServe answers without NAME) or "down"."""
    try:
        response = requests.get(f"{replica.management}/models/{NAME}", timeout=2)
    except requests.RequestException:
        return "down"
    if response.status_code == 404:
        return "missing"
    if not response.ok:
        return "loading"
    workers = [worker["status"] for model in response.json() for worker in model.get("workers", [])]
    return "ready" if "READY" in workers else "loading"


def control(fleet: Fleet, stopping: threading.Event) -> None:
    """Keep every replica running (a dead one is replaced), a new one on the released default, and the front
    address on the READY ones. Its view of the fleet goes to WORKDIR/status.json."""
    log = (fleet.workdir / "controller.log").open("a", buffering=1)
    say = lambda text: log.write(f"{time.strftime('%H:%M:%S')} {text}\n")  # noqa: E731
    replaced = {replica.number: 0 for replica in fleet.replicas}
    failing = {replica.number: FAILURES_TO_LEAVE for replica in fleet.replicas}  # failed probes in a row
    syncing: dict[int, float] = {}  # replica -> when its sync started
    pids: dict[int, int | None] = {}  # replica -> its container's pid: checked without podman (costs CPU)
    shown: list[int] | None = None
    written: dict | None = None
    while not stopping.is_set():
        for replica in fleet.replicas:
            if alive(pids.get(replica.number)):
                continue
            pids[replica.number] = container_pid(replica)
            if not alive(pids[replica.number]):
                say(f"replica {replica.number}: container gone, starting a new one")
                start_replica(fleet, replica)
                pids[replica.number] = container_pid(replica)
                replaced[replica.number] += 1
                syncing.pop(replica.number, None)
                failing[replica.number] = FAILURES_TO_LEAVE
        states = {replica.number: probe(replica) for replica in fleet.replicas}
        for number, state in states.items():
            failing[number] = 0 if state == "ready" else failing[number] + 1
        for replica in fleet.replicas:
            started = syncing.get(replica.number)
            if states[replica.number] == "missing" and (
                    started is None or time.monotonic() - started > SYNC_RETRY_SECONDS):
                syncing[replica.number] = time.monotonic()
                threading.Thread(target=sync, args=(fleet, replica, say), daemon=True).start()
        now_ready = [replica.number for replica in fleet.replicas if failing[replica.number] < FAILURES_TO_LEAVE]
        serving = [number for number in now_ready if number not in drained(fleet)]
        if serving != shown:
            write_nginx(fleet, [replica for replica in fleet.replicas if replica.number in serving])
            nginx(fleet, "-s", "reload")
            say(f"READY: {now_ready or 'none'}; in the one address: {serving or 'none'}")
            shown = serving
        seen = {"ready": now_ready, "serving": serving, "replaced": dict(replaced)}
        if seen != written:  # not twice a second: it changes when a replica does
            with replaced_atomically(fleet.workdir / "status.json", durable=False) as partial:
                partial.write_text(json.dumps(seen))
            written = seen
        stopping.wait(POLL_SECONDS)


def drained(fleet: Fleet) -> set[int]:
    """The replicas the operator took out of the one address (`drain`): they keep running and keep their
    version, and get no client requests until drained again with other numbers (or none)."""
    try:
        return set(json.loads((fleet.workdir / "drained.json").read_text()))
    except FileNotFoundError:
        return set()


def drain(fleet: Fleet, numbers: set[int], timeout: float = 10) -> None:
    """Take NUMBERS out of the one address (and put every other replica back); returns once nginx serves so."""
    with replaced_atomically(fleet.workdir / "drained.json") as partial:
        partial.write_text(json.dumps(sorted(numbers)))
    deadline = time.monotonic() + timeout
    while set(status(fleet)["serving"]) != set(status(fleet)["ready"]) - numbers:
        if time.monotonic() > deadline:
            raise FleetError(f"the controller did not apply the drain within {timeout:.0f} s")
        time.sleep(POLL_SECONDS / 2)
    time.sleep(POLL_SECONDS)  # nginx's old workers finish their requests


def sync(fleet: Fleet, replica: Replica, say) -> None:
    """What a pod's postStart does: the released default of the store's releases.json, else its newest archive."""
    try:
        say(f"replica {replica.number}: serves {NAME} {versions.sync(replica.management, NAME, fleet.store)}")
    except (versions.ReleaseError, api.ApiError, requests.RequestException) as error:
        say(f"replica {replica.number}: sync failed: {error}")


def controller_main(workdir: Path) -> None:
    fleet = Fleet.load(workdir)
    stopping = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stopping.set())
    control(fleet, stopping)


def check_readable(folder: Path) -> None:
    """The image runs as uid 1000: the store (and live catalogue) must be readable by others."""
    for path in [folder, *folder.rglob("*")]:
        if not path.stat().st_mode & (0o005 if path.is_dir() else 0o004):
            raise FleetError(f"{path} is not readable by others: the image's user (uid 1000) cannot read it "
                             f"(chmod -R o+rX {folder})")


def up(workdir: Path, store: Path, replicas: int, cpus: float, live: Path | None, port: int,
       image: str = IMAGE, timeout: float = 300) -> Fleet:
    """Start the fleet (or change its size): nginx, the controller and REPLICAS containers; returns once every
    replica is READY."""
    if os.geteuid() != 0:
        raise FleetError("the local fleet needs root (podman, as scripts/image-test.sh runs it)")
    if not NGINX.is_file():
        raise FleetError(f"{NGINX} is missing: `make venv` installs Debian's nginx")
    if podman("image", "exists", image, check=False).returncode:
        raise FleetError(f"no image {image}: build it with `bash scripts/image-test.sh build`")
    for folder in filter(None, (store, live)):
        check_readable(folder)
    workdir.mkdir(parents=True, exist_ok=True)
    if (workdir / "fleet.json").exists():
        down(workdir)
    keys = workdir / "keys.json"
    if not keys.exists():  # the operator's Secret; kept across restarts
        with replaced_atomically(keys) as partial:
            partial.write_text(json.dumps({"inference": secrets.token_hex(16), "management": secrets.token_hex(16)}))
            partial.chmod(0o600)
    ports = free_ports(1 + len(PORTS) * replicas)
    fleet = Fleet(workdir.resolve(), store.resolve(), live.resolve() if live else None, port or ports[0], cpus, image,
                  [Replica(number, dict(zip(PORTS, ports[1 + number * len(PORTS):]))) for number in range(replicas)])
    fleet.save()
    write_nginx(fleet, [])
    nginx(fleet)
    for replica in fleet.replicas:
        start_replica(fleet, replica)
    with (workdir / "controller.log").open("a") as log:
        controller = subprocess.Popen([sys.executable, "-m", "scripts.fleet", "--workdir", str(workdir), "control"],
                                      cwd=REPO, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    (workdir / "controller.pid").write_text(str(controller.pid))
    wait_ready(fleet, replicas, timeout)
    return fleet


def status(fleet: Fleet) -> dict:
    try:
        return json.loads((fleet.workdir / "status.json").read_text())
    except FileNotFoundError:
        return {"ready": [], "serving": [], "replaced": {}}


def wait_ready(fleet: Fleet, count: int, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while len(status(fleet)["serving"]) < count:
        if time.monotonic() > deadline:
            raise FleetError(f"{len(status(fleet)['ready'])} of {count} replicas READY after {timeout:.0f} s; see "
                             f"{fleet.workdir}/controller.log and `podman logs {fleet.replicas[0].container}`")
        time.sleep(POLL_SECONDS)


def down(workdir: Path) -> None:
    """The controller stops first (nothing is replaced any more), then the replicas (SIGTERM: TorchServe stops its
    workers), then nginx."""
    fleet = Fleet.load(workdir)
    with contextlib.suppress(FileNotFoundError, ProcessLookupError, ValueError):
        pid = int((workdir / "controller.pid").read_text())
        os.kill(pid, signal.SIGTERM)
        for _ in range(50):
            os.kill(pid, 0)
            time.sleep(0.1)
    names = [replica.container for replica in fleet.replicas]
    podman("stop", "-t", "30", *names, check=False)
    podman("rm", "-f", *names, check=False)
    if (workdir / "nginx.pid").exists():
        nginx(fleet, "-s", "quit")
    for name in ("fleet.json", "status.json", "controller.pid", "drained.json"):
        (workdir / name).unlink(missing_ok=True)


def print_status(fleet: Fleet) -> None:
    seen = status(fleet)
    print(f"fleet: {fleet.address} ({len(seen['serving'])} of {len(fleet.replicas)} replicas serving, "
          f"{fleet.cpus:g} CPU each); keys: {fleet.workdir / 'keys.json'}")
    for replica in fleet.replicas:
        print(f"  replica {replica.number}: {replica.address} (container {replica.container}), "
              f"{'READY' if replica.number in seen['ready'] else 'not READY'}, "
              f"{'serving' if replica.number in seen['serving'] else 'out of the one address'}, "
              f"replaced {seen['replaced'].get(str(replica.number), 0)} times")


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workdir", type=Path, default=DEFAULT_WORKDIR)
    commands = parser.add_subparsers(dest="command", required=True)
    start = commands.add_parser("up", help="start the fleet (or restart it with another size)")
    start.add_argument("--store", type=Path, required=True)
    start.add_argument("--replicas", type=int, default=2)
    start.add_argument("--cpus", type=float, default=1.0, help="each replica's CPU limit (podman --cpus)")
    start.add_argument("--live", type=Path, help="the live catalogue folder the archives name")
    start.add_argument("--port", type=int, default=8000, help="the one address's port (0: a free one)")
    start.add_argument("--image", default=IMAGE)
    commands.add_parser("status")
    draining = commands.add_parser("drain", help="take replicas out of the one address (none: every one back)")
    draining.add_argument("numbers", type=int, nargs="*")
    commands.add_parser("down")
    commands.add_parser("control", help=argparse.SUPPRESS)
    for name in ("release", "rollback", "retire"):
        commands.add_parser(name, help=f"scripts.versions {name} on every replica", add_help=False)
    args, rest = parser.parse_known_args(argv)
    try:
        if args.command == "up":
            print_status(up(args.workdir, args.store, args.replicas, args.cpus, args.live, args.port, args.image))
        elif args.command == "status":
            print_status(Fleet.load(args.workdir))
        elif args.command == "drain":
            drain(Fleet.load(args.workdir), set(args.numbers))
            print_status(Fleet.load(args.workdir))
        elif args.command == "down":
            down(args.workdir)
        elif args.command == "control":
            controller_main(args.workdir)
        else:
            fleet = Fleet.load(args.workdir)
            os.environ.setdefault("TS_INFERENCE_TOKEN", fleet.keys()["inference"])  # the canary's and the gate's
            versions.main([*(f"--replica={replica.address}" for replica in fleet.replicas),
                           "--token", fleet.keys()["management"], "--store", str(fleet.store), args.command, *rest])
    except FleetError as error:
        sys.exit(f"fleet: {error}")


if __name__ == "__main__":
    main()
