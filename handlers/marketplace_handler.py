"""TorchServe handler: a photo and/or the seller's words in, the category and the most similar listings out.
Loads everything once per worker; per batch, one forward pass over the valid photos and one catalogue search per
category filter, a bad request its own 4xx JSON error. The logic lives in marketplace_search.inference."""
import faiss  # noqa: F401  (before torch: both bring an OpenMP runtime, and this order is the safe one)

import dataclasses
import logging
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch

# BaseHandler imports OpenVINO's torch.compile backend, slowing every worker's start for nothing: that import fails.
sys.modules.setdefault("openvino.torch", None)
from ts.metrics.dimension import Dimension  # noqa: E402
from ts.torch_handler.base_handler import BaseHandler  # noqa: E402

import numpy as np

from marketplace_search.inference import (BODY_PARTS, Batch, CategoryBlend, RequestError, batch_answers,
                                          blend_categories, internal_error, parse_request, read_words, search_batch,
                                          text_categories, text_neighbours)
from marketplace_search.files import sha256_file
from marketplace_search.layout import ARCHIVE_CATALOGUE, ARCHIVE_CHECKPOINT, ARCHIVE_TEXT_MODEL, archive_file
from marketplace_search.live import BUNDLED, LiveFollower, Served
from marketplace_search.models import load_checkpoint, vector_dim
from marketplace_search.presets import Preprocess, eval_transform
from marketplace_search.runtime import fastest_chunk, load_backend, pick_device, usable_cores
from marketplace_search.search import Catalogue
from marketplace_search.text import RERANK_POOL, TextModel

logger = logging.getLogger(__name__)

# Counters per batch size: batches served (per backend: what this CPU chose), and milliseconds per stage (which tell
# the model's time from the rest).
BATCH_METRIC = "MarketplaceBatches"
STAGE_METRIC = "MarketplaceStageMilliseconds"
STAGES = ("decode", "forward", "search", "text", "answer")  # decode = decode + transform of every request


class MarketplaceHandler(BaseHandler):
    """Categorise a photo and find the nearest catalogue listings."""

    def initialize(self, context):
        model_dir = Path(context.system_properties["model_dir"])
        self.manifest = context.manifest
        gpu_id = context.system_properties.get("gpu_id")  # TorchServe's, when it gave this worker a GPU
        self.device = pick_device("cpu" if gpu_id is None else "auto", gpu_id)
        settings = (context.model_yaml_config or {}).get("handler") or {}
        threads = thread_count(context.model_yaml_config or {})
        torch.set_num_threads(threads)
        # malloc keeps its defaults here (no marketplace_search.memory): kept freed memory grows without end.
        self.decoders = ThreadPoolExecutor(max_workers=threads, thread_name_prefix="decode")
        faiss.omp_set_num_threads(1)  # a batch's few queries: more threads only wait on each other and on torch
        checkpoint_path = archive_file(model_dir, self.manifest["model"].get("serializedFile", ARCHIVE_CHECKPOINT))
        model, checkpoint = load_checkpoint(checkpoint_path)
        self.backend = load_backend(model, settings.get("runtime", "torch"), settings.get("precision", "fp32"),
                                    model_dir, settings.get("layout", "auto"), self.device.type, threads)
        self.model = self.backend.model
        self.classes = checkpoint["classes"]
        self.preprocess_settings = Preprocess.from_dict(checkpoint["preprocess"])
        self.transform = eval_transform(self.preprocess_settings)
        bundled = Catalogue.load(archive_file(model_dir, ARCHIVE_CATALOGUE))
        self.category_blend = CategoryBlend.from_dict(settings.get("category_blend"))
        text_dir = self.text_dir = model_dir / ARCHIVE_TEXT_MODEL
        self.text_model = TextModel.load(text_dir) if text_dir.is_dir() else None
        if self.text_model is not None and self.text_model.classes != checkpoint["classes"]:
            raise ValueError(f"{text_dir} was trained on other categories than {checkpoint_path.name}")
        if bundled.dimension != vector_dim(checkpoint):
            raise ValueError(f"{model_dir / ARCHIVE_CATALOGUE} holds {bundled.dimension}-d vectors but "
                             f"{checkpoint_path.name} makes {vector_dim(checkpoint)}-d embeddings")
        live = settings.get("live_catalogue")
        listing_words, listing_words_sha256 = (None, None) if self.text_model is None else (
            self.text_model.listing_words, self.text_model.reader_sha256)  # a live generation's words: these
        self.live = LiveFollower(live, bundled, sha256_file(checkpoint_path), background=True,
                                 text_listing_words=listing_words, text_sha256=listing_words_sha256) if live else None
        self._served_text: TextModel | None = None
        self._archive_listing_words_released = False
        self.served = self.live.current() if self.live else Served(bundled, BUNDLED)
        # TorchServe's Context knows the registered name; its unit-test MockContext does not.
        self.model_info = {"name": getattr(context, "model_name", None) or self.manifest["model"].get("modelName"),
                           "version": self.manifest["model"].get("modelVersion"), "backend": self.backend.name}
        self.warmed_batch_sizes = []
        if settings.get("warm_up", True):
            self.warm_up(int(context.system_properties.get("batch_size") or 1))
        self.initialized = True
        logger.info("loaded %s (%s, %d classes) and %d catalogue photos (generation %d%s); %d threads, backend %s "
                    "(fastest at batch %s), device %s, category blend %s", checkpoint_path.name, checkpoint["arch"],
                    len(self.classes), self.catalogue.visible, self.served.generation,
                    f", following {self.live.live}" if self.live else "", threads, self.backend.name,
                    self.backend.chunk or "? (no warm-up)", self.device,
                    self.category_blend.to_dict() if self.category_blend.weight else "off (head alone)")

    def describe_handle(self) -> dict:
        """The worker's `customizedMetadata` (GET /models/NAME/VERSION?customized=true): what it serves."""
        return {"backend": self.backend.name, "requested": self.backend.requested or self.backend.name,
                "chunk": self.backend.chunk or None, "catalogue": self.served.info}

    @property
    def catalogue(self) -> Catalogue:
        """What this batch searches: the served generation's view (the archive's snapshot without a live folder)."""
        return self.served.catalogue

    @property
    def served_text_model(self) -> TextModel | None:
        """The text model this batch reads words with: the archive's, with the served live generation's words when
        it has them; the archive's own words are then let go (they are as large) until needed again."""
        listing_words = self.served.listing_words
        if self.text_model is None:
            return None
        if listing_words is None:
            if self._archive_listing_words_released:
                self.text_model = TextModel.load(self.text_dir, self.text_model.encoder)  # its encoder kept
                self._archive_listing_words_released = False
                logger.info("serving the archive's own words again (generation %d has none)", self.served.generation)
            return self.text_model
        if self._served_text is None or self._served_text.listing_words is not listing_words:
            self._served_text = dataclasses.replace(self.text_model, listing_words=listing_words)
            if not self._archive_listing_words_released and self.text_model.listing_words is not None:
                self.text_model = dataclasses.replace(self.text_model, listing_words=None)
                self._archive_listing_words_released = True
        return self._served_text

    def preprocess(self, data):
        """Decode and transform every request of the batch, several at a time; a bad one becomes its error."""
        started = time.perf_counter()
        if self.live:  # the whole batch is answered from one generation, whatever changes meanwhile
            self.served = self.live.current()
        pool = self.decoders if len(data) > 1 else None  # a lone request skips the hand-off to a thread
        prepared = list((pool.map if pool else map)(self.prepare_request, range(len(data)), data))
        batch = Batch([item if isinstance(item, RequestError) else item[0] for item in prepared])
        tensors = [item[1] for item in prepared if not isinstance(item, RequestError) and item[1] is not None]
        if tensors:
            batch.images = torch.stack(tensors)
        batch.milliseconds["decode"] = (time.perf_counter() - started) * 1000
        return batch

    def prepare_request(self, idx: int, request: dict):
        """`(Query, image tensor)` for request `idx`, or the RequestError that refuses it (a 4xx, or a logged 500)."""
        try:
            headers = self.context.get_all_request_header(idx)
            query = parse_request(request, self.catalogue.categories, body_content_type(headers), headers,
                                  fit_size=self.preprocess_settings.resize)
            if query.title is not None and self.text_model is None:
                return RequestError("this model version reads photos only (its archive has no text model): "
                                    "send the request without title/description", kind="text_not_supported")
            return query, None if query.image is None else self.transform(query.image)
        except RequestError as error:
            return error
        except MemoryError:
            logger.warning("request %d: out of memory while decoding or transforming it", idx, exc_info=True)
            return RequestError("upload: too large to decode in the memory available", 413, "image_too_large")
        except Exception:
            logger.exception("request %d: unexpected failure while preparing it", idx)
            return internal_error()

    def inference(self, batch, *args, **kwargs):
        queries = batch.queries
        if not queries:
            return batch
        text_model = self.served_text_model
        started = searched = time.perf_counter()
        rows = batch.photo_rows
        batch.probabilities = np.zeros((len(queries), len(self.classes)), np.float32)
        batch.vectors = np.zeros((len(queries), self.catalogue.dimension), np.float32)
        batch.neighbours = [[] for _ in queries]
        if rows:
            probabilities, vectors = self.backend(batch.images)
            batch.vectors[rows] = vectors
            searched = time.perf_counter()
            # a query with words keeps the pool its words re-rank (text_neighbours): one search serves both
            pool_k = RERANK_POOL if text_model is not None and text_model.reranks else 0
            neighbours, voters = search_batch(self.catalogue, batch.vectors[rows], [queries[row] for row in rows],
                                              self.category_blend.vote_k, pool_k)
            batch.probabilities[rows] = blend_categories(probabilities, voters, self.classes, self.category_blend)
            for row, found in zip(rows, neighbours):
                batch.neighbours[row] = found
        batch.milliseconds["forward"] = (searched - started) * 1000
        texted = time.perf_counter()
        batch.milliseconds["search"] = (texted - searched) * 1000
        readings = read_words(text_model, queries)  # each query's words read once for both
        batch.probabilities = text_categories(text_model, queries, batch.probabilities, readings)
        batch.neighbours = text_neighbours(text_model, queries, batch.neighbours, readings, self.catalogue,
                                           batch.vectors)
        batch.milliseconds["text"] = (time.perf_counter() - texted) * 1000
        return batch

    def postprocess(self, batch):
        started = time.perf_counter()
        answers = batch_answers(batch, self.classes, self.model_info, self.served.info)
        for idx, slot in enumerate(batch.slots):
            self.context.set_response_content_type(idx, "application/json")
            if isinstance(slot, RequestError):  # the reason phrase: one ASCII line (the JSON body has it whole)
                phrase = " ".join(str(slot).split()).encode("ascii", "replace").decode("ascii")[:200]
                self.context.set_response_status(slot.status, phrase, idx)
        batch.milliseconds["answer"] = (time.perf_counter() - started) * 1000
        self.record_batch(len(batch.slots), batch.milliseconds)
        return answers

    def warm_up(self, batch_size: int) -> None:
        """Before READY: a forward pass per batch size the worker can get (kernels are built per input shape), and
        the batch size that runs fastest per photo here, which larger batches are split into."""
        self.backend.chunk = fastest_chunk(self.backend, max(1, batch_size), self.preprocess_settings.crop)
        self.warmed_batch_sizes = list(range(1, max(1, batch_size) + 1))
        if self.text_model is not None and self.text_model.encoder is not None:
            self.text_model.encoder.encode(["warm-up"])

    def record_batch(self, size: int, milliseconds: dict[str, float]) -> None:
        """Count the batch and add each stage's milliseconds (a stage that did not run adds 0)."""
        logger.debug("batch of %d request(s): %s", size,
                     ", ".join(f"{stage} {milliseconds.get(stage, 0.0):.1f} ms" for stage in STAGES))
        batch_size = Dimension("BatchSize", str(size))
        backend = Dimension("Backend", self.backend.name)
        self.context.metrics.add_counter(BATCH_METRIC, 1, dimensions=[batch_size, backend])
        for stage in STAGES:
            self.context.metrics.add_counter(STAGE_METRIC, milliseconds.get(stage, 0.0),
                                             dimensions=[Dimension("Stage", stage), batch_size])


def body_content_type(headers: dict) -> str | None:
    """The Content-Type TorchServe recorded for the body part ({"body": {"content-type": ...}})."""
    for name in BODY_PARTS:
        if isinstance(headers.get(name), dict):
            return headers[name].get("content-type")
    return None


def thread_count(model_config: dict) -> int:
    """Torch threads per worker: `handler.threads`, else usable cores / maxWorkers (workers sharing cores get
    slower)."""
    configured = (model_config.get("handler") or {}).get("threads")
    if configured:
        return int(configured)
    return max(1, usable_cores() // max(1, int(model_config.get("maxWorkers", 1))))
