"""An exponential moving average of a model's weights (and BatchNorm statistics) during training.

The trainable tail overfits the cached views within a few epochs; an average of the weights over
the last steps is a remedy that costs no extra forward pass. `WeightAverage` keeps float32 copies
(on the model's device) of every floating-point entry of the model's state dict, updated after each
optimizer step with `decay` (warmed up as min(decay, (1 + n) / (10 + n)) so the first steps do not
tie the average to the starting point); integer buffers (BatchNorm's num_batches_tracked) are copied. training.train
(--ema-decay) validates and saves the averaged weights and keeps the live ones for the optimizer.
"""
import torch
from torch import nn


class WeightAverage:
    def __init__(self, model: nn.Module, decay: float):
        if not 0.0 < decay < 1.0:
            raise ValueError(f"EMA decay must be in (0, 1), got {decay}")
        self.decay = decay
        self.updates = 0
        self.average = {name: tensor.detach().to(torch.float32 if tensor.is_floating_point() else tensor.dtype,
                                                 copy=True)
                        for name, tensor in model.state_dict().items()}

    def current_decay(self) -> float:
        return min(self.decay, (1 + self.updates) / (10 + self.updates))

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        decay = self.current_decay()
        for name, tensor in model.state_dict().items():
            average = self.average[name]
            if tensor.is_floating_point():
                average.mul_(decay).add_(tensor.detach().float(), alpha=1 - decay)
            else:
                average.copy_(tensor.detach())
        self.updates += 1

    def weights_for(self, model: nn.Module) -> dict[str, torch.Tensor]:
        """The averaged state dict in the model's own dtypes and device."""
        return {name: self.average[name].to(tensor.device, tensor.dtype)
                for name, tensor in model.state_dict().items()}

    def state_dict(self) -> dict:
        """For a resumable checkpoint (tensors on the CPU)."""
        return {"decay": self.decay, "updates": self.updates,
                "average": {name: tensor.cpu() for name, tensor in self.average.items()}}

    def load_state_dict(self, state: dict) -> None:
        self.decay, self.updates = state["decay"], state["updates"]
        self.average = {name: tensor.to(self.average[name].device) for name, tensor in state["average"].items()}
