"""Variety for the trainable tail on cached trunk outputs (training.train, cached mode).

The cache holds a few fixed views per photo, and the tail overfits them within a few epochs. Two
remedies cost no extra trunk pass:
- `epoch_views`: each epoch trains on `per_epoch` of the cached views of each photo, drawn afresh
  (so four cached views give each epoch a new pair at the cost of two);
- `FeatureMix`: mixup (a convex mix of two items) or CutMix (a box of one item's feature map pasted
  into another's), on the trunk's feature maps, with the loss mixed in the same proportion.
Both draw from generators seeded by (seed, epoch): a resumed run sees the same items as an
uninterrupted one.
"""
import numpy as np
import torch
from torch.utils.data import TensorDataset


def epoch_views(views: torch.Tensor, labels: torch.Tensor, per_epoch: int, seed: int, epoch: int) -> TensorDataset:
    """`per_epoch` distinct views of each photo out of `views` ((views, photos, ...)), drawn for this epoch.

    Items are laid out view-draw by view-draw (photo order inside each), like the fixed views' dataset.
    """
    count, photos = views.shape[:2]
    if not 1 <= per_epoch <= count:
        raise ValueError(f"views per epoch must be 1..{count} (the cached views), got {per_epoch}")
    if per_epoch == count:
        return TensorDataset(views.reshape(-1, *views.shape[2:]), labels.repeat(count))
    generator = torch.Generator().manual_seed(seed * 7_919 + epoch)
    chosen = torch.argsort(torch.rand(photos, count, generator=generator), dim=1)[:, :per_epoch]  # (photos, k)
    photo = torch.arange(photos).repeat(per_epoch)
    return TensorDataset(views[chosen.T.reshape(-1), photo], labels.repeat(per_epoch))


class FeatureMix:
    """Mixup (Beta(`mixup`, `mixup`) proportions) and CutMix (Beta(`cutmix`, `cutmix`) area) of a batch
    with a shuffled copy of itself; with both set, each batch takes one of the two at random.
    0 turns one off. Inputs are (n, c, h, w) feature maps (CutMix) or any (n, ...) tensor (mixup)."""

    def __init__(self, mixup: float = 0.0, cutmix: float = 0.0):
        if mixup < 0 or cutmix < 0:
            raise ValueError(f"mixup and cutmix alphas must be >= 0, got {mixup} and {cutmix}")
        self.mixup, self.cutmix = mixup, cutmix

    def __bool__(self) -> bool:
        return bool(self.mixup or self.cutmix)

    def __call__(self, inputs: torch.Tensor, labels: torch.Tensor, generator: torch.Generator):
        """`(mixed inputs, partner labels, lam)`: the loss is lam x loss(labels) + (1 - lam) x loss(partners)."""
        partners = torch.randperm(len(inputs), generator=generator).to(inputs.device)
        use_cutmix = self.cutmix > 0 and (self.mixup == 0 or torch.rand(1, generator=generator).item() < 0.5)
        alpha = self.cutmix if use_cutmix else self.mixup
        lam = float(np.random.default_rng(int(torch.randint(0, 2**31 - 1, (1,), generator=generator))).beta(alpha, alpha))
        if not use_cutmix:
            return lam * inputs + (1 - lam) * inputs[partners], labels[partners.to(labels.device)], lam
        if inputs.dim() != 4:
            raise ValueError(f"CutMix needs (n, c, h, w) feature maps, got shape {tuple(inputs.shape)}")
        height, width = inputs.shape[-2:]
        box_h, box_w = round(height * np.sqrt(1 - lam)), round(width * np.sqrt(1 - lam))
        centre_y = int(torch.randint(0, height, (1,), generator=generator))
        centre_x = int(torch.randint(0, width, (1,), generator=generator))
        top, bottom = max(centre_y - box_h // 2, 0), min(centre_y + (box_h + 1) // 2, height)
        left, right = max(centre_x - box_w // 2, 0), min(centre_x + (box_w + 1) // 2, width)
        mixed = inputs.clone()
        mixed[:, :, top:bottom, left:right] = inputs[partners][:, :, top:bottom, left:right]
        lam = 1 - (bottom - top) * (right - left) / (height * width)  # the share actually kept
        return mixed, labels[partners.to(labels.device)], lam
