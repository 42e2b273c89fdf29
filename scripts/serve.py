"""Start, stop and inspect a local TorchServe serving the marketplace model.

Each server has its own working folder (default logs/): its config copy with the chosen ports, its logs,
its key_file.json and its own TMPDIR (pid file, worker sockets), so several servers can run side by side."""
import argparse
import contextlib
import json
import os
import re
import socket
import subprocess
import sys
import time
import zipfile
from dataclasses import dataclass, field
from pathlib import Path

import psutil
import requests

from marketplace_search.files import sha256_file
from marketplace_search.layout import ARCHIVE_MODEL_CARD
from scripts import api, web
from scripts.versions import HISTORY_FILE, released_default

REPO = Path(__file__).resolve().parents[1]
DEFAULT_CONFIG = REPO / "config.properties"
DEFAULT_WORKDIR = api.SERVE_WORKDIR  # where the client commands look for its key_file.json
MAX_SOCKET_PATH = 107  # bytes: sockaddr_un.sun_path (108) less the final NUL
PID_FILE = ".model_server.pid"  # written by torchserve into TMPDIR
JAVA_MAIN = "org.pytorch.serve.ModelServer"
PORT_KEYS = {"inference": "inference_address", "management": "management_address", "metrics": "metrics_address"}
GRPC_KEYS = ("grpc_inference_port", "grpc_management_port")
PORT_OPTIONS = ("inference_port", "management_port", "metrics_port", *GRPC_KEYS)  # start_server's


class ServerError(RuntimeError):
    """TorchServe did not start, stop or answer as expected."""


@dataclass
class Server:
    """A TorchServe started by `start_server` (or found again by `attach`)."""

    workdir: Path
    pid: int
    properties: dict = field(repr=False)

    def __post_init__(self):
        self.inference_url = self.properties["inference_address"]
        self.management_url = self.properties["management_address"]
        self.metrics_url = self.properties["metrics_address"]

    @property
    def tmpdir(self) -> Path:
        return self.workdir / "tmp"

    def token(self, which: str = "management") -> str | None:
        """The API key from key_file.json ("management" or "inference"); None when tokens are off."""
        return api.read_key_file(self.workdir / api.KEY_FILE, which)

    def log_tail(self, lines: int = 40) -> str:
        """The end of TorchServe's own log and the model log, for error messages."""
        tails = []
        for name in ("ts_log.log", "model_log.log", "torchserve.out"):
            path = self.workdir / name
            if path.is_file():
                tails.append(f"--- {path}\n" + "\n".join(path.read_text(errors="replace").splitlines()[-lines:]))
        return "\n".join(tails)

    def check_alive(self) -> None:
        if java_process(self.pid) is None:
            raise ServerError(f"TorchServe (pid {self.pid}) exited\n{self.log_tail()}")

    def wait_ready(self, model_name: str, version: str | None = None, timeout: float = 120) -> dict:
        """Wait until the model (version) has a READY worker; see scripts.api.wait_ready."""
        return api.wait_ready(self, model_name, version, timeout, check_alive=self.check_alive,
                              describe_failure=self.log_tail)

    def stop(self, timeout: float = 60) -> None:
        """`torchserve --stop`, then wait until Java and its Python workers have exited."""
        java = java_process(self.pid)
        if java is not None:
            processes = [java] + java.children(recursive=True)
            run_torchserve(["--stop"], self.workdir, self.tmpdir, self.workdir / "torchserve.out")
            _, alive = psutil.wait_procs(processes, timeout=timeout)
            for process in alive:
                process.kill()
            psutil.wait_procs(alive, timeout=10)
        (self.tmpdir / PID_FILE).unlink(missing_ok=True)


def free_ports(count: int) -> list[int]:
    """`count` distinct free ports (the probe sockets stay open until all are chosen)."""
    probes = []
    try:
        for _ in range(count):
            probe = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            probes.append(probe)
            probe.bind(("127.0.0.1", 0))
        return [probe.getsockname()[1] for probe in probes]
    finally:
        for probe in probes:
            probe.close()


def read_properties(path: Path) -> dict:
    """key=value lines of a Java properties file, comments dropped, order kept."""
    properties = {}
    for line in Path(path).read_text().splitlines():
        line = line.strip()
        if line and not line.startswith(("#", "!")) and "=" in line:
            key, value = line.split("=", 1)
            properties[key.strip()] = value.strip()
    return properties


def server_properties(config: Path, model_store: Path, ports: dict, extra_config: dict | None) -> dict:
    """The base config with this server's model store, ports and extra settings."""
    properties = read_properties(config)
    properties["model_store"] = str(model_store)
    # Only archives of this store (by file name, or this file:// path): never a download from a URL.
    properties["allowed_urls"] = f"file://{re.escape(str(model_store))}/[^/]+[.]mar"
    for name, key in PORT_KEYS.items():
        if ports.get(name):
            properties[key] = f"http://127.0.0.1:{ports[name]}"
    for key in GRPC_KEYS:
        if ports.get(key):
            properties[key] = str(ports[key])
    properties.update({key: str(value).lower() if isinstance(value, bool) else str(value)
                       for key, value in (extra_config or {}).items()})
    return properties


def check_ports_free(properties: dict) -> None:
    ports = [int(properties[key].rsplit(":", 1)[1]) for key in PORT_KEYS.values() if key in properties]
    ports += [int(properties[key]) for key in GRPC_KEYS if key in properties]
    for port in ports:
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
            if probe.connect_ex(("127.0.0.1", port)) == 0:
                raise ServerError(f"port {port} is already in use (another TorchServe? `python -m scripts.serve "
                                  f"status`); pick other ports")


def run_torchserve(arguments: list[str], workdir: Path, tmpdir: Path, output: Path) -> None:
    """The `torchserve` launcher (it starts Java in the background and returns)."""
    launcher = Path(sys.executable).with_name("torchserve")
    if not launcher.is_file():
        raise ServerError(f"{launcher} not found: install the project (pip install -e .) in this environment")
    env = {key: value for key, value in os.environ.items() if key != "TS_CONFIG_FILE"}  # it overrides --ts-config
    env.update(TMPDIR=str(tmpdir), TEMP=str(tmpdir), LOG_LOCATION=str(workdir), METRICS_LOCATION=str(workdir))
    with open(output, "a") as log:  # Java inherits the launcher's stdout: a pipe would never close
        result = subprocess.run([str(launcher), *arguments], cwd=workdir, env=env, stdout=log,
                                stderr=subprocess.STDOUT, timeout=120)
    if result.returncode != 0:
        raise ServerError(f"torchserve {' '.join(arguments)} failed ({result.returncode}); see {output}")


def java_process(pid: int) -> psutil.Process | None:
    try:
        process = psutil.Process(pid)
        return process if JAVA_MAIN in process.cmdline() and process.status() != psutil.STATUS_ZOMBIE else None
    except psutil.Error:
        return None


def start_server(model_store: Path | str, *, workdir: Path | str, config: Path | str = DEFAULT_CONFIG,
                 models: dict[str, str] | None = None, inference_port: int | None = None,
                 management_port: int | None = None, metrics_port: int | None = None,
                 grpc_inference_port: int | None = None, grpc_management_port: int | None = None,
                 enable_model_api: bool = False, extra_config: dict | None = None, timeout: float = 60) -> Server:
    """Start TorchServe in the background and wait until its management API answers; MODELS ({name: .mar in the
    store}) load at start-up (`Server.wait_ready` waits for them). The config's security settings (tokens on,
    model-control API off) stand unless `enable_model_api` or `extra_config` change them, its ports unless given."""
    model_store, workdir = Path(model_store).resolve(), Path(workdir).resolve()
    if not model_store.is_dir():
        raise FileNotFoundError(f"model store {model_store} is not a folder")
    for mar in (models or {}).values():
        if not (model_store / mar).exists():
            raise FileNotFoundError(f"{model_store / mar} does not exist; build it with scripts.archive")
    tmpdir = workdir / "tmp"
    socket = tmpdir / ".ts.sock.65535"  # where TorchServe puts a worker's Unix socket
    if len(os.fsencode(socket)) > MAX_SOCKET_PATH:
        raise ServerError(f"workdir {workdir} is too deep: TorchServe's worker socket {socket} would be over the "
                          f"{MAX_SOCKET_PATH}-byte limit of Unix socket paths; use a shorter folder")
    tmpdir.mkdir(parents=True, exist_ok=True)
    running = attach_pid(tmpdir)
    if running is not None:
        raise ServerError(f"a TorchServe (pid {running}) already runs from {workdir}; stop it first")
    ports = {"inference": inference_port, "management": management_port, "metrics": metrics_port,
             "grpc_inference_port": grpc_inference_port, "grpc_management_port": grpc_management_port}
    properties = server_properties(Path(config), model_store, ports,
                                   {**({"enable_model_api": True} if enable_model_api else {}), **(extra_config or {})})
    check_ports_free(properties)
    config_copy = workdir / "config.properties"
    config_copy.write_text("".join(f"{key}={value}\n" for key, value in properties.items()))
    arguments = ["--start", "--ts-config", str(config_copy), "--model-store", str(model_store), "--ncs"]
    if models:
        arguments += ["--models", *(f"{name}={mar}" for name, mar in models.items())]
    run_torchserve(arguments, workdir, tmpdir, workdir / "torchserve.out")
    pid = attach_pid(tmpdir)
    if pid is None:
        raise ServerError(f"TorchServe did not start; see {workdir / 'torchserve.out'}")
    server = Server(workdir, pid, properties)
    wait_api(server, timeout)
    return server


def wait_api(server: Server, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        server.check_alive()
        try:
            api.ping(server, timeout=2)
            api.management_call(server, "GET", "/models", timeout=2)
            return
        except (requests.ConnectionError, api.ApiError):
            time.sleep(0.3)
    server.stop()
    raise ServerError(f"TorchServe APIs not answering after {timeout:.0f} s\n{server.log_tail()}")


def attach_pid(tmpdir: Path) -> int | None:
    """The pid of the TorchServe whose pid file is in `tmpdir`, if it still runs."""
    pid_file = tmpdir / PID_FILE
    if not pid_file.is_file():
        return None
    pid = int(pid_file.read_text().split()[0])
    return pid if java_process(pid) else None


def attach(workdir: Path | str = DEFAULT_WORKDIR) -> Server | None:
    """The running server started from `workdir` (by this module's `start`), or None."""
    workdir = Path(workdir).resolve()
    pid = attach_pid(workdir / "tmp")
    if pid is None:
        return None
    return Server(workdir, pid, read_properties(workdir / "config.properties"))


@contextlib.contextmanager
def serving(model_store: Path | str, workdir: Path | str, models: dict[str, str] | None = None,
            ready_timeout: float = 120, *, workers: int = 1, **options):
    """A TorchServe on free loopback ports with WORKERS READY workers per model; stopped whatever ends the
    block, a start cut short included (found by its folder). `options` go to start_server."""
    ports = dict(zip(PORT_OPTIONS, free_ports(len(PORT_OPTIONS))))
    started = time.monotonic()
    try:
        server = start_server(model_store, workdir=workdir, models=models, **ports, **options)
        for name in models or {}:
            server.wait_ready(name, timeout=ready_timeout)
            while sum(worker["status"] == "READY" for worker in api.describe(server, name)[0]["workers"]) < workers:
                if time.monotonic() - started > ready_timeout:
                    raise ServerError(f"{name}: fewer than {workers} workers READY after {ready_timeout:.0f} s")
                time.sleep(0.5)
        yield server
    finally:
        interrupted = None
        while (running := attach(workdir)) is not None:
            try:
                running.stop()
            except KeyboardInterrupt as error:  # a signal during the stop itself: finish stopping first
                interrupted = error
        for process in processes_under(workdir):  # started, but killed before its pid file was written
            process.kill()
        if interrupted is not None:
            raise interrupted


def processes_under(folder: Path | str) -> list[psutil.Process]:
    """TorchServe frontends running from FOLDER or below, and their workers."""
    folder = Path(folder).resolve()
    frontends = [process for process in psutil.process_iter(["cmdline", "cwd"])
                 if JAVA_MAIN in (process.info["cmdline"] or []) and process.info["cwd"]
                 and Path(process.info["cwd"]).is_relative_to(folder)]
    return frontends + [worker for frontend in frontends for worker in frontend.children(recursive=True)]


def parse_models(values: list[str]) -> dict[str, str]:
    models = {}
    for value in values:
        name, separator, mar = value.partition("=")
        if not separator or not name or not mar:
            raise SystemExit(f"--models {value!r}: expected NAME=FILE.mar")
        models[name] = mar
    return models


def released_models(models: dict[str, str], model_store: Path) -> dict[str, str]:
    """`models` with each name's released default (scripts.versions' releases.json) in place of the
    archive given, so a restarted server answers with what was last released, not with version 1."""
    chosen = dict(models)
    for name in models:
        released = released_default(Path(model_store) / HISTORY_FILE, name)
        if released and released["mar"] and released["mar"] != models[name]:
            if not (Path(model_store) / released["mar"]).is_file():
                raise SystemExit(f"{name}: the released default {released['version']} ({released['mar']}) is "
                                 f"missing from {model_store}; restore it or edit {HISTORY_FILE}")
            print(f"{name}: serving the released default {released['version']} ({released['mar']}) "
                  f"instead of {models[name]} ({HISTORY_FILE})")
            chosen[name] = released["mar"]
    return chosen


def describe_archive(mar: Path) -> str:
    """An archive's sha256 prefix, the run it came from and its catalogue size, from its model card."""
    if not mar.is_file():
        return f"{mar} is no longer in the model store"
    card = model_card_of(mar)
    return f"sha256 {sha256_file(mar)[:12]}, run {card['run']}, {card['catalogue']['count']} catalogue photos"


def model_card_of(mar: Path) -> dict:
    with zipfile.ZipFile(mar) as archive:
        return json.loads(archive.read(ARCHIVE_MODEL_CARD))


def archive_work(mar: Path) -> Path:
    """The training work folder an archive was made from (its tables and photos), from its model card."""
    card = model_card_of(mar)
    if not card.get("work") or not Path(card["work"]).is_dir():
        raise SystemExit(f"{mar.name} does not name a work folder on this machine ({card.get('work')}): "
                         f"pass the catalogue's photos with --photos")
    return Path(card["work"])


def print_status(server: Server) -> None:
    print(f"TorchServe pid {server.pid}: inference {server.inference_url}, management {server.management_url}, "
          f"metrics {server.metrics_url}; logs in {server.workdir}")
    for model in api.list_models(server):
        for version in api.describe(server, model["modelName"], "all"):
            workers = ", ".join(worker["status"] for worker in version.get("workers", [])) or "no workers"
            mar = Path(server.properties["model_store"], version["modelUrl"].removeprefix("file://"))
            print(f"  {version['modelName']} {version['modelVersion']} ({version['modelUrl']}): {workers}\n"
                  f"    {describe_archive(mar)}{served_backend(server, version)}")


def served_backend(server: Server, version: dict) -> str:
    """", backend X" as a READY worker of VERSION reports it (with what the archive asked for, if other)."""
    if not any(worker["status"] == "READY" for worker in version.get("workers", [])):
        return ""
    try:
        served = api.worker_serves(server, version["modelName"], version["modelVersion"])
    except (api.ApiError, KeyError, ValueError):
        return ", backend unknown (the worker did not describe itself)"
    asked = f" (the archive asks for {served['requested']})" if served["requested"] != served["backend"] else ""
    chunk = f", fastest at batch {served['chunk']}" if served.get("chunk") else ""
    return f", backend {served['backend']}{asked}{chunk}"


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("command", choices=["start", "stop", "status"])
    parser.add_argument("--model-store", default=Path("model_store"), type=Path)
    parser.add_argument("--models", nargs="*", default=[], metavar="NAME=FILE.mar",
                        help="archives to load at start-up (default: none; register later with scripts.versions)")
    parser.add_argument("--config", default=DEFAULT_CONFIG, type=Path, help="base config.properties")
    parser.add_argument("--workdir", default=DEFAULT_WORKDIR, type=Path,
                        help="logs, config copy, pid file and TMPDIR of the server")
    parser.add_argument("--enable-model-api", action="store_true",
                        help="start: allow registering and unregistering versions through the management API "
                             "(scripts.versions, scripts.refresh --release); off by default")
    parser.add_argument("--wait", action="store_true", help="start: wait until every --models model is READY")
    parser.add_argument("--timeout", type=float, default=180, help="seconds for --wait")
    parser.add_argument("--page", action="store_true", help="start: the search page too (python -m scripts.web)")
    parser.add_argument("--page-port", type=int, default=8090)
    parser.add_argument("--photos", type=Path, action="append",
                        help="the page's catalogue photos (default: the work folder of the first model's run)")
    args = parser.parse_args(argv)
    if args.command == "start":
        models = released_models(parse_models(args.models), args.model_store)
        server = start_server(args.model_store, workdir=args.workdir, config=args.config, models=models,
                              enable_model_api=args.enable_model_api)
        if args.wait:
            for name in models:
                server.wait_ready(name, timeout=args.timeout)
        print_status(server)
        if args.page:
            photos = args.photos or [archive_work(args.model_store / mar) for mar in list(models.values())[:1]]
            address = web.start_page(args.workdir, server.inference_url, photos, args.page_port,
                                     key_file=server.workdir / api.KEY_FILE)
            print(f"search page: {address}")
        return
    if args.command == "stop" and (pid := web.stop_page(args.workdir)):
        print(f"stopped the search page, pid {pid}")
    server = attach(args.workdir)
    if server is None:
        print(f"no TorchServe running from {args.workdir.resolve()}")
        if args.command == "status":
            sys.exit(1)
        return
    if args.command == "status":
        print_status(server)
        if address := web.page_address(args.workdir):
            print(f"search page: {address}")
    else:
        server.stop()
        print(f"stopped TorchServe pid {server.pid}")


if __name__ == "__main__":
    main()
