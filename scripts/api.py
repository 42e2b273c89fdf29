"""The one client of TorchServe's inference and management APIs: keys, requests, retries, readiness.

A target is a base URL or a running `scripts.serve.Server`, which knows its URLs and keys. Every command finds
a key the same way (`resolve_token`), and a refused request says which key was sent and from where."""
import json
import os
import threading
import time
from pathlib import Path
from typing import Callable

import requests
from tenacity import Retrying, retry_if_exception_type, stop_after_attempt, wait_exponential_jitter

DEFAULT_INFERENCE_URL = "http://127.0.0.1:8080"
DEFAULT_MANAGEMENT_URL = "http://127.0.0.1:8081"
KEY_FILE = "key_file.json"  # written by TorchServe into its working folder when tokens are on
SERVE_WORKDIR = Path("logs")  # scripts.serve's working folder unless told otherwise
APIS = ("inference", "management")
# Worth asking again: overload (503 queue full, 507 worker died mid-batch, 429), gateway hiccups.
TRANSIENT_STATUSES = frozenset({429, 502, 503, 504, 507})
CONTENT_TYPES = {b"\xff\xd8\xff": "image/jpeg", b"\x89PNG": "image/png", b"GIF8": "image/gif", b"RIFF": "image/webp",
                 b"BM": "image/bmp", b"II*\x00": "image/tiff", b"MM\x00*": "image/tiff"}


class ApiError(RuntimeError):
    """The server refused a call (4xx/5xx), or never became ready; carries the status and its message."""

    def __init__(self, message: str, status: int | None = None):
        super().__init__(f"{status}: {message}" if status else message)
        self.status = status


class TransientError(RuntimeError):
    """No final answer yet (timeout, connection error, a TRANSIENT_STATUSES answer): worth asking again."""

    def __init__(self, code: int | str, message: str):
        super().__init__(f"{code}: {message}")
        self.code = code


def read_key_file(path: Path | str, api: str) -> str | None:
    """The `api` key from TorchServe's key_file.json ({"management": {"key": ...}, "inference": ...})."""
    if api not in APIS:
        raise ValueError(f"api must be one of {', '.join(APIS)}, got {api!r}")
    if not Path(path).is_file():
        return None
    for _ in range(20):  # TorchServe may be writing the file right now (seen empty at start-up)
        try:
            keys = json.loads(Path(path).read_text())
            break
        except json.JSONDecodeError:
            time.sleep(0.1)
    else:
        raise ApiError(f"{path} is not a JSON key file")
    if api not in keys:
        raise ApiError(f"{path} has no {api!r} key (has {', '.join(keys)})")
    return keys[api]["key"]


class Key(str):
    """A key to send ("" if none), where it came from, and the key file to read again when refused (keys expire)."""

    def __new__(cls, token: str | None, source: str, file: Path | None = None) -> "Key":
        key = super().__new__(cls, token or "")
        key.source, key.file = source, file
        return key


def resolve_token(api: str, token: str | None = None, key_file: Path | str | None = None, env: str = "TS_TOKEN") -> Key:
    """The key for API: TOKEN, else KEY_FILE's, else $ENV, else that of scripts.serve's server here; "" if none."""
    if token:
        return Key(token, "the key given")
    if key_file:
        if not Path(key_file).is_file():
            raise ApiError(f"key file {key_file} does not exist (TorchServe writes it into its working folder "
                           f"when token authorisation is on)")
        return Key(read_key_file(key_file, api), f"key file {key_file}", Path(key_file))
    if os.environ.get(env):
        return Key(os.environ[env], f"${env}")
    default = SERVE_WORKDIR / KEY_FILE
    if default.is_file():
        return Key(read_key_file(default, api), f"key file {default.absolute()}", default)
    return Key(None, f"no key given, no ${env}, and no key file {default.absolute()} of a server scripts.serve "
                     f"started here: pass --key-file")


def add_key_arguments(parser, which: str) -> None:
    """--key-file and --token of a command line, as resolve_token reads them."""
    parser.add_argument("--key-file", type=Path, help=f"the server's key_file.json (default after --token and "
                                                      f"$TS_TOKEN: {SERVE_WORKDIR / KEY_FILE}, scripts.serve's)")
    parser.add_argument("--token", help=f"the {which} key itself (default: --key-file's, else $TS_TOKEN)")


def refused_key(api: str, token: str | None) -> str:
    """What a refused request says of its key: that none was sent, or which was and where it came from."""
    source = getattr(token, "source", None)
    if not token:
        return f"no {api} key was sent" + (f" ({source})" if source else "")
    return f"the {api} key" + (f" from {source}" if source else "") + " was refused (keys expire: renew it)"


def auth_headers(token: str | None) -> dict:
    return {"Authorization": f"Bearer {token}"} if token else {}


def endpoint(target, api: str, token: str | None = None) -> tuple[str, str | None]:
    """(base URL, key) of `api` on `target`: a URL string, or a Server that knows both."""
    if isinstance(target, str):
        return target.rstrip("/"), token
    return getattr(target, f"{api}_url").rstrip("/"), token or target.token(api)


def error_text(response: requests.Response) -> str:
    """The message of a refused call: our handler's `error`, TorchServe's `message`, or the raw text."""
    try:
        body = response.json()
    except ValueError:
        return response.text or response.reason
    if not isinstance(body, dict):
        return json.dumps(body)
    return body.get("error") or body.get("message") or json.dumps(body)


_sessions = threading.local()


def session() -> requests.Session:
    """One keep-alive session per thread (a Session is not safe to share between threads)."""
    if not hasattr(_sessions, "session"):
        _sessions.session = requests.Session()
    return _sessions.session


def retrying(retries: int, backoff: float = 0.5, max_backoff: float = 10.0,
             before_sleep: Callable | None = None) -> Retrying:
    """Ask again on TransientError up to `retries` more times, with exponential backoff and jitter."""
    return Retrying(stop=stop_after_attempt(retries + 1),
                    # jitter in proportion, so that clients refused together do not come back together
                    wait=wait_exponential_jitter(multiplier=backoff, max=max_backoff, jitter=backoff),
                    retry=retry_if_exception_type(TransientError), before_sleep=before_sleep, reraise=True)


def key_refused(response: requests.Response) -> bool:
    """TorchServe 0.12 refuses a missing, wrong or expired key with 400 InvalidKeyException (not 401)."""
    if response.status_code not in (400, 401):
        return False
    try:
        body = response.json()
    except ValueError:
        return False
    return isinstance(body, dict) and body.get("type") == "InvalidKeyException"


def content_type(photo: bytes) -> str:
    """The image Content-Type from the file's magic bytes (TorchServe needs one for raw bodies)."""
    return next((kind for magic, kind in CONTENT_TYPES.items() if photo.startswith(magic)), "application/octet-stream")


def prediction_url(target, model: str = "marketplace", version: str | None = None) -> str:
    url, _ = endpoint(target, "inference")
    return f"{url}/predictions/{model}" + (f"/{version}" if version else "")


def prediction_headers(photo: bytes | None, token: str | None = None, k: int | None = None, category: str | None = None,
                       embedding: bool = False, title: str | None = None) -> dict:
    """Headers of a raw-photo POST (PHOTO None: words alone), options as X- headers: TorchServe drops a query string."""
    options = {"X-K": None if k is None else str(k), "X-Category": category,
               "X-Embedding": "true" if embedding else None,
               "X-Title": None if title is None else title.encode("utf-8")}  # the handler reads UTF-8 bytes back
    return {"Content-Type": content_type(photo or b""), **auth_headers(token),
            **{name: value for name, value in options.items() if value is not None}}


def post_photo(url: str, photo: bytes, headers: dict, timeout: float = 60) -> requests.Response:
    """One POST of a photo; an answer worth asking again for raises TransientError, any other is returned."""
    try:
        response = session().post(url, data=photo, headers=headers, timeout=timeout)
    except requests.Timeout as error:
        raise TransientError("timeout", f"no answer within {timeout:g} s") from error
    except (requests.ConnectionError, requests.exceptions.ChunkedEncodingError) as error:
        raise TransientError("connection_error", f"{type(error).__name__}: {error}") from error
    if response.status_code in TRANSIENT_STATUSES:
        raise TransientError(response.status_code, error_text(response))
    return response


def predict(target, photo: bytes | None, *, model: str = "marketplace", version: str | None = None,
            k: int | None = None, category: str | None = None, embedding: bool = False,
            token: str | None = None, timeout: float = 60, retries: int = 2, title: str | None = None) -> dict:
    """The answer for PHOTO (None: the title alone), asking again RETRIES times on TransientError; else ApiError."""
    url, token = endpoint(target, "inference", token)
    photo = b"" if photo is None else photo
    headers = prediction_headers(photo, token, k, category, embedding, title)
    try:
        response = retrying(retries)(post_photo, prediction_url(url, model, version), photo, headers, timeout)
    except TransientError as error:
        raise ApiError(f"no answer after {retries + 1} attempt(s): {error}",
                       error.code if isinstance(error.code, int) else None) from error
    if not response.ok:
        refusal = f"{refused_key('inference', token)}: " if key_refused(response) else ""
        raise ApiError(refusal + error_text(response), response.status_code)
    return response.json()


def ping(target, timeout: float = 5) -> dict:
    """GET /ping: the frontend answers (it says Healthy before any model is loaded: see wait_ready)."""
    url, _ = endpoint(target, "inference")
    return requests.get(f"{url}/ping", timeout=timeout).json()


def metrics_text(target, timeout: float = 10) -> str:
    """The Prometheus text of the metrics API (no key needed)."""
    url = target.rstrip("/") if isinstance(target, str) else target.metrics_url
    response = requests.get(f"{url}/metrics", timeout=timeout)
    response.raise_for_status()
    return response.text


def management_call(target, method: str, path: str, token: str | None = None, timeout: float = 300,
                    **params) -> dict | list:
    """One management API call; raises ApiError with the status and TorchServe's message."""
    url, token = endpoint(target, "management", token)
    params = {key: str(value).lower() if isinstance(value, bool) else value
              for key, value in params.items() if value is not None}
    response = requests.request(method, f"{url}{path}", params=params, headers=auth_headers(token), timeout=timeout)
    if not response.ok:
        refusal = f"{refused_key('management', token)}: " if key_refused(response) else ""
        raise ApiError(f"{method} {path}: {refusal}{error_text(response)}", response.status_code)
    return response.json()


def describe(target, name: str, version: str | None = None, token: str | None = None,
             customized: bool | None = None) -> list[dict]:
    """GET /models/NAME[/VERSION] ("all": every version); CUSTOMIZED: with each worker's `customizedMetadata`."""
    return management_call(target, "GET", f"/models/{name}" + (f"/{version}" if version else ""), token,
                           customized=customized)


def describe_known(target, name: str, version: str | None = None, token: str | None = None) -> list[dict]:
    """describe(), or [] when TARGET has no NAME registered."""
    try:
        return describe(target, name, version, token)
    except ApiError as error:
        if error.status == 404:
            return []
        raise


def worker_serves(target, name: str, version: str | None = None, token: str | None = None) -> dict:
    """What a worker of NAME (VERSION) serves, as it describes itself: `backend`, `requested`, `catalogue`."""
    [described] = describe(target, name, version, token, customized=True)
    served = described["customizedMetadata"]  # TorchServe parses the handler's JSON
    return json.loads(served) if isinstance(served, str) else served


def register(target, mar: str | Path, name: str | None = None, *, batch_size: int | None = None,
             max_batch_delay: int | None = None, initial_workers: int = 1, synchronous: bool = True,
             response_timeout: int | None = None, token: str | None = None) -> dict:
    """POST /models: load MAR (a file in the model store) under NAME at its own version, not made the default."""
    return management_call(target, "POST", "/models", token, url=str(mar), model_name=name,
                           batch_size=batch_size, max_batch_delay=max_batch_delay, initial_workers=initial_workers,
                           synchronous=synchronous, response_timeout=response_timeout)


def set_default(target, name: str, version: str, token: str | None = None) -> dict:
    return management_call(target, "PUT", f"/models/{name}/{version}/set-default", token)


def unregister(target, name: str, version: str | None = None, token: str | None = None, retries: int = 2) -> dict:
    """DELETE /models/NAME[/VERSION]; the default version cannot go while others remain (403). TorchServe answers
    500 when stopping the version's workers fails after it has already dropped the version: gone is done, else
    it is asked again."""
    path = f"/models/{name}" + (f"/{version}" if version else "")
    for attempt in range(retries + 1):
        try:
            return management_call(target, "DELETE", path, token)
        except ApiError as error:
            if error.status != 500:
                raise
            if not any(version in (None, d["modelVersion"]) for d in describe_known(target, name, "all", token)):
                return {"status": f"{name} {version or ''} unregistered (its workers' stop: {error})"}
            if attempt == retries:
                raise
            time.sleep(1)


def list_models(target, token: str | None = None) -> list[dict]:
    return management_call(target, "GET", "/models", token)["models"]


def wait_ready(target, name: str, version: str | None = None, timeout: float = 120, token: str | None = None,
               check_alive: Callable[[], None] | None = None, describe_failure: Callable[[], str] | None = None) -> dict:
    """NAME[/VERSION]'s description once a worker is READY; `check_alive` raises if the server died meanwhile."""
    deadline = time.monotonic() + timeout
    last = "no answer"
    while time.monotonic() < deadline:
        if check_alive:
            check_alive()
        try:
            description = describe(target, name, version, token)[0]
            workers = [worker["status"] for worker in description.get("workers", [])]
            if "READY" in workers:
                return description
            last = f"workers {workers}"
        except ApiError as error:
            last = str(error)
        except requests.ConnectionError:
            last = "management API not answering yet"
        time.sleep(0.5)
    details = describe_failure() if describe_failure else ""
    raise ApiError(f"{name}{' ' + version if version else ''} not READY after {timeout:.0f} s ({last})"
                   + (f"\n{details}" if details else ""))
