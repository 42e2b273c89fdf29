"""Stage 4: fine-tune a pretrained torchvision backbone to the root categories.

Two modes, both writing a self-describing checkpoint every epoch to RUN/weights/epoch_<N>.pt (and
the best by validation accuracy to best.pt) and TensorBoard scalars to RUN/logs:

- `--trainable-stages 0` (default): the backbone is frozen, so its pooled features are computed
  once (several augmented views of the training photos) and cached under WORK/cache; the
  embedding layer and the head then train for many epochs in seconds. CPU-practical on 10k photos.
- `--trainable-stages N`: the last N backbone blocks train too, on photos decoded every epoch
  with the train transform (slow on a CPU; use a GPU or a small subset).
"""
import argparse
import hashlib
import json
import math
import shutil
import time
from pathlib import Path

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset
from torch.utils.tensorboard import SummaryWriter
from tqdm import tqdm

from training.dataset import ListingPhotos, load_split
from marketplace_search.models import ARCHS, MarketplaceNet, load_pretrained_backbone, save_checkpoint, set_trainable
from marketplace_search.presets import Preprocess, eval_transform, train_transform
from marketplace_search.layout import BEST_CHECKPOINT, TENSORBOARD_DIR, WEIGHTS_DIR, epoch_checkpoint, new_run_dir, update_run_info

CACHE_DIR = "cache"


class FlipTransform:
    """The eval transform of a horizontally mirrored photo: a cheap, label-preserving view."""

    def __init__(self, preprocess: Preprocess):
        self.transform = eval_transform(preprocess)

    def __call__(self, image):
        return self.transform(image.transpose(0))  # PIL.Image.Transpose.FLIP_LEFT_RIGHT


def view_transform(view: int, preprocess: Preprocess):
    """View 0 is the eval transform, 1 its mirror, 2+ random train-transform crops."""
    if view == 0:
        return eval_transform(preprocess)
    if view == 1:
        return FlipTransform(preprocess)
    return train_transform(preprocess)


def extract_features(backbone: nn.Module, rows, photos_dir: Path, transform, batch_size: int,
                     workers: int, description: str) -> np.ndarray:
    """Pooled backbone features (n, feature_dim) float32 for `rows`, in row order."""
    loader = DataLoader(ListingPhotos(rows, photos_dir, transform), batch_size=batch_size,
                        num_workers=workers, shuffle=False)
    backbone.eval()
    chunks = []
    with torch.inference_mode():
        for images, _, _ in tqdm(loader, desc=description, unit="batch"):
            chunks.append(backbone(images).float().numpy())
    return np.concatenate(chunks) if chunks else np.zeros((0, 0), np.float32)


def cached_features(work_dir: Path, backbone: nn.Module, rows, photos_dir: Path, view: int,
                    cache_key: str, preprocess: Preprocess, batch_size: int, workers: int) -> np.ndarray:
    """Features of view `view` for `rows`, each photo computed once per (backbone, preprocess, view).

    The cache is WORK/cache/features-<key>-view<N>.pt; photos missing from it are computed and added.
    """
    path = Path(work_dir) / CACHE_DIR / f"features-{cache_key}-view{view}.pt"
    cached = torch.load(path, weights_only=True) if path.is_file() else {"image_ids": [], "features": None}
    position = {image_id: i for i, image_id in enumerate(cached["image_ids"])}
    missing = rows[~rows["image_id"].isin(position)]
    if len(missing):
        if view >= 2:
            torch.manual_seed(view)  # random crops, but the same ones on every re-run
        computed = torch.from_numpy(extract_features(
            backbone, missing, photos_dir, view_transform(view, preprocess), batch_size, workers,
            f"backbone features, view {view}"))
        known = [cached["features"]] if cached["features"] is not None else []
        cached = {"image_ids": cached["image_ids"] + list(missing["image_id"]),
                  "features": torch.cat(known + [computed])}
        position = {image_id: i for i, image_id in enumerate(cached["image_ids"])}
        path.parent.mkdir(parents=True, exist_ok=True)
        torch.save(cached, path.with_suffix(".tmp"))
        path.with_suffix(".tmp").replace(path)
    return cached["features"][[position[i] for i in rows["image_id"]]].numpy()


def features_cache_key(arch: str, weights_description: str, preprocess: Preprocess) -> str:
    text = json.dumps([arch, weights_description, preprocess.to_dict()], sort_keys=True)
    return f"{arch}-{hashlib.sha1(text.encode()).hexdigest()[:10]}"


def run_epoch(model: MarketplaceNet, loader, criterion, optimizer=None, scheduler=None,
              on_features=True) -> tuple[float, float]:
    """One pass over `loader`; trains when an optimizer is given. Returns (mean loss, accuracy)."""
    training = optimizer is not None
    total_loss, correct, seen = 0.0, 0, 0
    with torch.set_grad_enabled(training):
        # Photos are slow on a CPU: show progress; cached features take seconds per epoch.
        for batch in tqdm(loader, desc="train" if training else "val", unit="batch", disable=on_features,
                          leave=False):
            inputs, labels = batch[0], batch[1]
            logits, _ = model.forward_features(inputs) if on_features else model(inputs)
            loss = criterion(logits, labels)
            if training:
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
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


def train(args: argparse.Namespace) -> Path:
    """Train a model for WORK's split; returns the run folder."""
    torch.manual_seed(args.seed)
    if args.threads:
        torch.set_num_threads(args.threads)
    work_dir = Path(args.work)
    split = load_split(work_dir)
    classes = json.loads((work_dir / "tables" / "decoder.json").read_text())
    classes = [classes[str(label)] for label in range(len(classes))]
    photos_dir = work_dir / "photos"
    preprocess = Preprocess(resize=args.resize, crop=args.crop)

    model = MarketplaceNet(args.arch, len(classes), embedding_dim=args.embedding_dim, dropout=args.dropout)
    weights_description = load_pretrained_backbone(model, args.weights)
    if args.weights == "none":
        print("WARNING: training from random initialisation (--weights none): expect low accuracy")
    unfrozen = set_trainable(model, args.trainable_stages)
    run_dir = Path(args.run) if args.run else new_run_dir(work_dir)
    (run_dir / WEIGHTS_DIR).mkdir(parents=True, exist_ok=True)
    config = {key: str(value) if isinstance(value, Path) else value for key, value in vars(args).items()}
    update_run_info(run_dir, config={"train": config}, weights_source=weights_description,
                    classes=classes, work=str(work_dir.resolve()))
    print(f"run {run_dir}\n  {args.arch}, weights: {weights_description}, "
          f"trainable blocks: {unfrozen or 'none (head only)'}")

    train_rows = split[split["split"] == "train"].reset_index(drop=True)
    val_rows = split[split["split"] == "val"].reset_index(drop=True)
    started = time.perf_counter()
    if args.trainable_stages == 0:
        key = features_cache_key(args.arch, weights_description, preprocess)

        def features(rows, view):
            return torch.from_numpy(cached_features(work_dir, model.backbone, rows, photos_dir, view, key,
                                                    preprocess, args.batch_size, args.workers))

        train_set = TensorDataset(
            torch.cat([features(train_rows, view) for view in range(args.feature_views)]),
            torch.tensor(list(train_rows["label"]) * args.feature_views),
        )
        val_set = TensorDataset(features(val_rows, 0), torch.tensor(val_rows["label"].to_numpy()))
        batch_size, workers = args.head_batch_size, 0
    else:
        train_set = ListingPhotos(train_rows, photos_dir, train_transform(preprocess))
        val_set = ListingPhotos(val_rows, photos_dir, eval_transform(preprocess))
        batch_size, workers = args.batch_size, args.workers
    train_loader = DataLoader(train_set, batch_size=batch_size, shuffle=True, num_workers=workers,
                              drop_last=len(train_set) > batch_size)
    val_loader = DataLoader(val_set, batch_size=batch_size * 2, num_workers=workers)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad],
                                  lr=args.lr, weight_decay=args.weight_decay)
    scheduler = cosine_schedule(optimizer, args.epochs, len(train_loader))
    criterion = nn.CrossEntropyLoss(label_smoothing=args.label_smoothing)
    on_features = args.trainable_stages == 0
    writer = SummaryWriter(log_dir=str(run_dir / TENSORBOARD_DIR))
    best_accuracy, history = -1.0, []
    for epoch in range(1, args.epochs + 1):
        set_mode(model, True, unfrozen)
        train_loss, train_accuracy = run_epoch(model, train_loader, criterion, optimizer, scheduler, on_features)
        set_mode(model, False, unfrozen)
        val_loss, val_accuracy = run_epoch(model, val_loader, criterion, on_features=on_features)
        metrics = {"train_loss": train_loss, "train_accuracy": train_accuracy,
                   "val_loss": val_loss, "val_accuracy": val_accuracy}
        history.append({"epoch": epoch, **metrics})
        for name, value in metrics.items():
            split_name, metric = name.split("_", 1)
            writer.add_scalar(f"{metric}/{split_name}", value, epoch)
        checkpoint = epoch_checkpoint(run_dir, epoch)
        save_checkpoint(checkpoint, model, classes=classes, preprocess=preprocess, epoch=epoch,
                        metrics=metrics, config=config)
        if val_accuracy > best_accuracy:
            best_accuracy = val_accuracy
            shutil.copyfile(checkpoint, run_dir / WEIGHTS_DIR / BEST_CHECKPOINT)
        print(f"epoch {epoch:3d}  train loss {train_loss:.3f} acc {train_accuracy:.3f}  "
              f"val loss {val_loss:.3f} acc {val_accuracy:.3f}")
    writer.close()
    best_epoch = max(history, key=lambda row: row["val_accuracy"])["epoch"]
    update_run_info(run_dir, train={"history": history, "best_epoch": best_epoch,
                                    "best_val_accuracy": best_accuracy,
                                    "seconds": round(time.perf_counter() - started, 1)})
    print(f"best epoch {best_epoch} (val accuracy {best_accuracy:.3f}) -> {run_dir / WEIGHTS_DIR / BEST_CHECKPOINT}")
    return run_dir


def add_arguments(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("training")
    group.add_argument("--arch", default="resnet50", choices=ARCHS)
    group.add_argument("--weights", default="imagenet",
                       help="'imagenet' (torchvision weights enum, cached under $TORCH_HOME), 'none', or a "
                            "state-dict file, e.g. ../shared/weights/mobilenet_v2_imagenet_features.pth")
    group.add_argument("--epochs", type=int, default=10)
    group.add_argument("--trainable-stages", type=int, default=0,
                       help="backbone blocks to fine-tune, last first (0 = frozen backbone, cached features)")
    group.add_argument("--feature-views", type=int, default=3,
                       help="frozen mode: views per training photo (eval, mirror, then random crops)")
    group.add_argument("--embedding-dim", type=int, default=256)
    group.add_argument("--dropout", type=float, default=0.5)
    group.add_argument("--lr", type=float, default=1e-3)
    group.add_argument("--weight-decay", type=float, default=5e-2)
    group.add_argument("--label-smoothing", type=float, default=0.1)
    group.add_argument("--batch-size", type=int, default=32, help="photos per forward pass")
    group.add_argument("--head-batch-size", type=int, default=256, help="frozen mode: features per step")
    group.add_argument("--resize", type=int, default=256)
    group.add_argument("--crop", type=int, default=224)
    group.add_argument("--workers", type=int, default=2, help="photo decoding processes")
    group.add_argument("--threads", type=int, default=0, help="torch threads (0 = torch's default)")
    group.add_argument("--seed", type=int, default=0)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--work", required=True, type=Path, help="work folder with tables/, photos/, split.csv")
    parser.add_argument("--run", type=Path, help="run folder (default: WORK/model_evaluation/<timestamp>)")
    add_arguments(parser)
    train(parser.parse_args(argv))


if __name__ == "__main__":
    main()
