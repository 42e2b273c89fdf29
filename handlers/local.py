"""Run an archive's handler in this process, as a TorchServe worker would (batch jobs, tests):
`predict_local(load_local_handler(model_dir), [{"body": photo}])` gives [(status, answer)]. The handler and the
core package are imported from the archive folder, not this checkout, so `--local` answers exactly as the served
archive does; this module imports nothing of the core package for that reason."""
import importlib
import json
import sys
from contextlib import contextmanager
from pathlib import Path

import ts
import yaml
from ts.context import Context, RequestProcessor
from ts.metrics.metric_cache_yaml_impl import MetricsCacheYamlImpl

HANDLER_MODULE = "marketplace_handler"
CORE_PACKAGE = "marketplace_search"  # = marketplace_search.layout.CORE_PACKAGE (not imported: see above)
MANIFEST = Path("MAR-INF") / "MANIFEST.json"
TS_METRICS_CONFIG = Path(ts.__file__).parent / "configs" / "metrics.yaml"


def archived_name(name: str) -> bool:
    return name in (HANDLER_MODULE, CORE_PACKAGE) or name.startswith(CORE_PACKAGE + ".")


@contextmanager
def archived_imports(model_dir: Path):
    """Imports inside resolve to the archive's modules; the process's own copies come back afterwards."""
    own = {name: module for name, module in sys.modules.items() if archived_name(name)}
    for name in own:
        del sys.modules[name]
    sys.path.insert(0, str(model_dir))
    try:
        yield
    finally:
        sys.path.remove(str(model_dir))
        for name in [name for name in sys.modules if archived_name(name)]:
            del sys.modules[name]
        sys.modules.update(own)


def load_local_handler(model_dir: Path | str, model_name: str | None = None, batch_size: int = 8):
    """An extracted archive's MarketplaceHandler initialised in this process with TorchServe's own Context."""
    model_dir = Path(model_dir).resolve()
    if not (model_dir / MANIFEST).is_file():  # the archive's handler checks the files it reads itself
        raise FileNotFoundError(f"{model_dir} is not an extracted archive: it has no {MANIFEST} "
                                f"(rebuild the archive with scripts.archive)")
    manifest = json.loads((model_dir / MANIFEST).read_text())
    config_file = manifest["model"].get("configFile")
    model_config = yaml.safe_load((model_dir / config_file).read_text()) if config_file else {}
    metrics = MetricsCacheYamlImpl(config_file_path=str(TS_METRICS_CONFIG))
    metrics.initialize_cache()
    context = Context(model_name or manifest["model"]["modelName"], str(model_dir), manifest, batch_size,
                      None, "local", metrics=metrics, model_yaml_config=model_config)
    with archived_imports(model_dir):
        module = importlib.import_module(HANDLER_MODULE)
        handler = module.MarketplaceHandler()
        handler.initialize(context)
    handler.context = context
    handler.body_parts = module.BODY_PARTS
    return handler


def predict_local(handler, requests: list[dict], headers: list[dict] | None = None) -> list[tuple[int, dict]]:
    """One batch of TorchServe-style requests (and their headers) through `handler.handle`: `(status, answer)` each."""
    headers = headers or [{} for _ in requests]
    context = handler.context
    context.request_ids = {idx: f"local-{idx}" for idx in range(len(requests))}
    context.request_processor = [RequestProcessor(request_headers(request, own, handler.body_parts))
                                 for request, own in zip(requests, headers)]
    context.metrics.set_request_ids(context.request_ids)
    answers = handler.handle(requests, context)
    return [(context.get_response_status(idx)[0], answer) for idx, answer in enumerate(answers)]


def request_headers(request: dict, headers: dict, body_parts: tuple[str, ...]) -> dict:
    """Headers as TorchServe's worker records them: the HTTP headers plus one entry per body part."""
    content_type = next((value for key, value in headers.items() if key.lower() == "content-type"), None)
    parts = {name: {"content-type": content_type or ""} for name in request if name in body_parts}
    return {**headers, **parts}
