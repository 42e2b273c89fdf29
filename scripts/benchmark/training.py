"""Training section: photos (or cached items) per second of each training stage, fp32 against bf16
autocast, and the process's peak memory. What a run of training.train spends its time on:

  trunk     the frozen trunk's forward over photos, once per view (training.train's cache)
  tail      a training step (forward, backward, AdamW) of the trainable blocks + head on cached outputs
  full      a training step of the whole trainable part on photos (the --no-cache fine-tune)
  embed     the eval forward of the whole model (training.embed over the catalogue)

Random weights (speed does not depend on them), generated photos at the arch's input size.
"""
import resource

import torch
from torch import nn

from marketplace_search.models import MarketplaceNet, default_preprocess, set_trainable, split_backbone
from scripts.benchmark.common import NUM_CLASSES, time_calls
from training.train import autocast, cpu_has_bf16

TRAINING_COLUMNS = [("arch", "model"), ("stage", "stage"), ("trainable", "trainable blocks"),
                    ("precision", "precision"), ("batch", "batch"), ("items_per_s", "items/s"),
                    ("vs_fp32", "÷ fp32"), ("peak_rss_mb", "peak RSS MB")]


def training_step(forward, parameters, batch: torch.Tensor, labels: torch.Tensor, dtype):
    optimizer = torch.optim.AdamW(parameters, lr=1e-4)
    criterion = nn.CrossEntropyLoss()

    def step():
        optimizer.zero_grad(set_to_none=True)
        with autocast(torch.device("cpu"), dtype):
            logits, _ = forward(batch)
            loss = criterion(logits.float(), labels)
        loss.backward()
        optimizer.step()

    return step


def stage_calls(model: MarketplaceNet, stages: int, photos: torch.Tensor, batch: int, dtype) -> dict:
    """One callable per training stage at this precision (batch of `batch` items)."""
    trunk, tail = split_backbone(model, stages) if stages else (model.backbone, nn.Identity())
    images = photos[:batch].contiguous(memory_format=torch.channels_last)
    labels = torch.arange(batch) % NUM_CLASSES
    with torch.no_grad(), autocast(torch.device("cpu"), dtype):  # not inference mode: the tail trains on it
        cached = trunk(images).float()
    set_trainable(model, stages)
    trainable = [p for p in model.parameters() if p.requires_grad]

    def trunk_forward():
        with torch.inference_mode(), autocast(torch.device("cpu"), dtype):
            trunk(images)

    def embed_forward():
        with torch.inference_mode(), autocast(torch.device("cpu"), dtype):
            model(images)

    model.train()
    calls = {"trunk": trunk_forward,
             "tail": training_step(lambda x: model.forward_features(tail(x)), trainable, cached, labels, dtype),
             "full": training_step(model, trainable, images, labels, dtype),
             "embed": embed_forward}
    return calls


def bench_training(settings: dict) -> dict:
    rows = []
    precisions = {"fp32": None, **({"bf16": torch.bfloat16} if cpu_has_bf16() else {})}
    for arch in settings["train_arch"]:
        torch.manual_seed(0)
        model = MarketplaceNet(arch, NUM_CLASSES).to(memory_format=torch.channels_last)
        crop = default_preprocess(arch).crop
        batch, stages = settings["train_batch"], settings["train_stages"]
        photos = torch.randn(batch, 3, crop, crop)
        fp32_rates = {}
        for precision, dtype in precisions.items():
            for stage, call in stage_calls(model, stages, photos, batch, dtype).items():
                times = time_calls(call, min_seconds=settings["min_seconds"], min_repeats=settings["min_repeats"])
                rate = batch / (sum(times) / len(times))
                fp32_rates.setdefault(stage, rate)
                rows.append({"arch": arch, "stage": stage, "trainable": stages if stage in ("tail", "full") else "-",
                             "precision": precision, "batch": batch, "items_per_s": rate,
                             "vs_fp32": rate / fp32_rates[stage],
                             "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024})
    legend = ("Items are photos, except for `tail`, whose items are cached trunk outputs. Peak RSS is this "
              "process's so far (it only grows). bf16 rows only where the CPU has native BF16 "
              f"({'present' if cpu_has_bf16() else 'absent'} here).")
    return {"rows": rows, "columns": TRAINING_COLUMNS, "legend": legend}
