"""TorchServe handler: a photo in, its category and the most similar listings out.

Loads the checkpoint, its eval transform and the Faiss catalogue once per worker; per batch it
decodes every request, runs ONE forward pass over the valid photos and one index search per
distinct category filter. A bad request gets its own 4xx and JSON error; the rest of the batch
is answered normally. Parsing and answer building live in training/inference.py.

In-process use (tests, batch jobs), on an extracted archive folder:
    handler = load_local_handler("work/extracted-mar")
    [(status, answer)] = predict_local(handler, [{"body": photo_bytes}])
"""
# Faiss before torch: both bring an OpenMP runtime, and this order is the safe one in-process. In a
# TorchServe worker `ts` has already imported torch; tests/test_server.py checks that start-up is clean.
import faiss  # noqa: F401

import json
import logging
import os
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch
import ts
import yaml
from ts.context import Context, RequestProcessor
from ts.metrics.dimension import Dimension
from ts.metrics.metric_cache_yaml_impl import MetricsCacheYamlImpl
from ts.torch_handler.base_handler import BaseHandler

from training.inference import BODY_PARTS, Batch, RequestError, batch_answers, parse_request, search_batch
from training.models import load_checkpoint, prepare_for_serving, serve_forward
from training.presets import Preprocess, eval_transform
from training.search import Catalogue

logger = logging.getLogger(__name__)

CHECKPOINT_FILE = "best.pt"
CATALOGUE_DIR = "catalogue"
# Counters per batch size (dimension BatchSize): batches served, which proves dynamic batching, and
# milliseconds spent in forward passes, which tells serving overhead from the model's own time.
BATCH_METRIC = "MarketplaceBatches"
FORWARD_METRIC = "MarketplaceForwardMilliseconds"
TS_METRICS_CONFIG = Path(ts.__file__).parent / "configs" / "metrics.yaml"


class MarketplaceHandler(BaseHandler):
    """Categorise a photo and find the nearest catalogue listings."""

    def initialize(self, context):
        model_dir = Path(context.system_properties["model_dir"])
        self.manifest = context.manifest
        self.device = pick_device(context.system_properties.get("gpu_id"))
        settings = (context.model_yaml_config or {}).get("handler") or {}
        threads = thread_count(context.model_yaml_config or {})
        torch.set_num_threads(threads)
        # Decoding and resizing photos (Pillow releases the GIL) run on the same number of threads.
        self.decoders = ThreadPoolExecutor(max_workers=threads, thread_name_prefix="decode")
        # A batch's search is a few queries: one OpenMP thread answers them faster than several that
        # wait on each other (scripts.benchmark, index section, 10k photos: p50 0.16 ms with 1 thread,
        # 0.39 ms with 2 on an idle machine; ~15 ms with 2 while the cores were busy).
        faiss.omp_set_num_threads(1)
        checkpoint_path = required_path(model_dir, self.manifest["model"].get("serializedFile", CHECKPOINT_FILE))
        self.model, checkpoint = load_checkpoint(checkpoint_path)
        self.model = prepare_for_serving(self.model.to(self.device), settings.get("layout", "auto"),
                                         self.device.type)
        self.classes = checkpoint["classes"]
        self.preprocess_settings = Preprocess.from_dict(checkpoint["preprocess"])
        self.transform = eval_transform(self.preprocess_settings)
        self.catalogue = Catalogue.load(required_path(model_dir, CATALOGUE_DIR))
        if self.catalogue.dimension != checkpoint["embedding_dim"]:
            raise ValueError(f"{model_dir / CATALOGUE_DIR} holds {self.catalogue.dimension}-d vectors but "
                             f"{checkpoint_path.name} makes {checkpoint['embedding_dim']}-d embeddings")
        # TorchServe's Context knows the registered name; its unit-test MockContext does not.
        self.model_info = {"name": getattr(context, "model_name", None) or self.manifest["model"].get("modelName"),
                           "version": self.manifest["model"].get("modelVersion")}
        if settings.get("warm_up", True):
            self.warm_up(int(context.system_properties.get("batch_size") or 1))
        self.initialized = True
        logger.info("loaded %s (%s, %d classes) and %d catalogue photos; %d threads, layout %s, device %s",
                    checkpoint_path.name, checkpoint["arch"], len(self.classes), self.catalogue.index.ntotal,
                    threads, self.model.serving_layout, self.device)

    def preprocess(self, data):
        """Decode and transform every request of the batch, several at a time; a bad one becomes its error."""
        pool = self.decoders if len(data) > 1 else None  # a lone request skips the hand-off to a thread
        prepared = list((pool.map if pool else map)(self.prepare_request, range(len(data)), data))
        batch = Batch([item if isinstance(item, RequestError) else item[0] for item in prepared])
        tensors = [item[1] for item in prepared if not isinstance(item, RequestError)]
        if tensors:
            batch.images = torch.stack(tensors)
        return batch

    def prepare_request(self, idx: int, request: dict):
        """`(Query, image tensor)` for request `idx`, or the RequestError that refuses it."""
        headers = self.context.get_all_request_header(idx)
        try:
            query = parse_request(request, self.catalogue.categories, body_content_type(headers), headers,
                                  fit_size=self.preprocess_settings.resize)
        except RequestError as error:
            return error
        return query, self.transform(query.image)

    def inference(self, batch, *args, **kwargs):
        if batch.images is None:
            self.record_batch(len(batch.slots), 0.0)
            return batch
        started = time.perf_counter()
        probabilities, vectors = serve_forward(self.model, batch.images.to(self.device))
        batch.probabilities = probabilities.float().cpu().numpy()
        batch.vectors = vectors.cpu().numpy()
        self.record_batch(len(batch.slots), (time.perf_counter() - started) * 1000)
        batch.neighbours = search_batch(self.catalogue, batch.vectors, batch.queries)
        return batch

    def postprocess(self, batch):
        answers = batch_answers(batch, self.classes, self.model_info)
        for idx, slot in enumerate(batch.slots):
            self.context.set_response_content_type(idx, "application/json")
            if isinstance(slot, RequestError):
                self.context.set_response_status(slot.status, status_phrase(slot), idx)
        return answers

    def warm_up(self, batch_size: int) -> None:
        """One forward pass per batch size the worker can get, before it reports READY.

        oneDNN builds its kernels for each input shape on first use: without this, the first batch
        of every size answers late (resnet50 on 2 cores: +30-80 ms per size, measured in-process).
        """
        crop = self.preprocess_settings.crop
        for size in range(1, max(1, batch_size) + 1):
            serve_forward(self.model, torch.zeros(size, 3, crop, crop, device=self.device))

    def record_batch(self, size: int, forward_ms: float) -> None:
        logger.debug("batch of %d request(s), forward pass %.1f ms", size, forward_ms)
        dimensions = [Dimension("BatchSize", str(size))]
        self.context.metrics.add_counter(BATCH_METRIC, 1, dimensions=dimensions)
        self.context.metrics.add_counter(FORWARD_METRIC, forward_ms, dimensions=dimensions)


def body_content_type(headers: dict) -> str | None:
    """The Content-Type TorchServe recorded for the body part ({"body": {"content-type": ...}})."""
    for name in BODY_PARTS:
        if isinstance(headers.get(name), dict):
            return headers[name].get("content-type")
    return None


def required_path(model_dir: Path, name: str) -> Path:
    path = model_dir / name
    if not path.exists():
        raise FileNotFoundError(f"{name} is missing from the model folder {model_dir} "
                                f"(rebuild the archive with scripts.archive)")
    return path


def pick_device(gpu_id) -> torch.device:
    if gpu_id is not None and torch.cuda.is_available():
        return torch.device(f"cuda:{gpu_id}")
    return torch.device("cpu")


def thread_count(model_config: dict) -> int:
    """Torch/Faiss threads per worker: `handler.threads` from the model config, else cores / maxWorkers.

    Several workers each using every core oversubscribe the CPU and get slower together.
    """
    configured = (model_config.get("handler") or {}).get("threads")
    if configured:
        return int(configured)
    return max(1, (os.cpu_count() or 1) // max(1, int(model_config.get("maxWorkers", 1))))


def status_phrase(error: RequestError) -> str:
    """An HTTP reason phrase from the error: one ASCII line (the JSON body has the full message)."""
    text = " ".join(str(error).split())
    return text.encode("ascii", "replace").decode("ascii")[:200]


def load_local_handler(model_dir: Path | str, model_name: str | None = None, batch_size: int = 8):
    """A MarketplaceHandler initialised in this process from an extracted archive folder.

    Uses TorchServe's own Context class, so per-request statuses behave as under the server.
    """
    model_dir = Path(model_dir).resolve()
    manifest = json.loads(required_path(model_dir, "MAR-INF/MANIFEST.json").read_text())
    config_file = manifest["model"].get("configFile")
    model_config = yaml.safe_load(required_path(model_dir, config_file).read_text()) if config_file else {}
    if str(model_dir) not in sys.path:
        sys.path.append(str(model_dir))  # as in a worker: the archived training/ package is importable
    metrics = MetricsCacheYamlImpl(config_file_path=str(TS_METRICS_CONFIG))
    metrics.initialize_cache()
    context = Context(model_name or manifest["model"]["modelName"], str(model_dir), manifest, batch_size,
                      None, "local", metrics=metrics, model_yaml_config=model_config)
    handler = MarketplaceHandler()
    handler.initialize(context)
    handler.context = context
    return handler


def predict_local(handler: MarketplaceHandler, requests: list[dict],
                  headers: list[dict] | None = None) -> list[tuple[int, dict]]:
    """Run one batch through `handler.handle`; returns `(HTTP status, answer)` per request.

    `requests` are TorchServe-style dicts (`{"body": photo_bytes}`, multipart fields by name);
    `headers[i]` are request i's HTTP headers, e.g. {"Content-Type": "application/json", "X-K": "3"}.
    """
    headers = headers or [{} for _ in requests]
    context = handler.context
    context.request_ids = {idx: f"local-{idx}" for idx in range(len(requests))}
    context.request_processor = [RequestProcessor(request_headers(request, own))
                                 for request, own in zip(requests, headers)]
    context.metrics.set_request_ids(context.request_ids)
    answers = handler.handle(requests, context)
    return [(context.get_response_status(idx)[0], answer) for idx, answer in enumerate(answers)]


def request_headers(request: dict, headers: dict) -> dict:
    """Headers as TorchServe's worker records them: the HTTP headers plus one entry per body part."""
    content_type = next((value for key, value in headers.items() if key.lower() == "content-type"), None)
    parts = {name: {"content-type": content_type or ""} for name in request if name in BODY_PARTS}
    return {**headers, **parts}
