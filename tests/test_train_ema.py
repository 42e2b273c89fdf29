"""Weight averaging (--ema-decay): the averaged weights are the ones validated and saved."""
import argparse

import pytest
import torch
from torch import nn

from marketplace_search.models import load_checkpoint
from training import train
from training.ema import WeightAverage
from tests.test_training import train_args


def test_the_average_follows_the_decay_and_copies_integer_buffers():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 2), nn.BatchNorm1d(2))
    start = {name: tensor.clone() for name, tensor in model.state_dict().items()}
    average = WeightAverage(model, decay=0.5)
    assert average.current_decay() == pytest.approx(0.1)  # warm-up: (1 + 0) / (10 + 0)
    with torch.no_grad():
        model[0].weight.add_(1.0)
    model.train()(torch.randn(4, 3))  # moves the BatchNorm statistics and its counter
    average.update(model)
    weights = average.weights_for(model)
    torch.testing.assert_close(weights["0.weight"], 0.1 * start["0.weight"] + 0.9 * model[0].weight.detach())
    torch.testing.assert_close(weights["1.running_mean"],
                               0.1 * start["1.running_mean"] + 0.9 * model[1].running_mean)
    assert weights["1.num_batches_tracked"].item() == 1 and weights["1.num_batches_tracked"].dtype == torch.int64
    for _ in range(100):
        average.update(model)
    assert average.current_decay() == 0.5  # the warm-up ends at the decay asked for
    with pytest.raises(ValueError):
        WeightAverage(model, decay=1.0)


def test_training_saves_the_averaged_weights_and_resumes_with_them(sample_work, tmp_path, monkeypatch):
    whole = train.train(train_args(sample_work, tmp_path / "whole", ema_decay=0.9, epochs=2))
    checkpoint = torch.load(whole / "weights" / "epoch_2.pt", map_location="cpu", weights_only=True)
    state = checkpoint["training_state"]
    averaged, live = state["ema"]["average"], state["live_state_dict"]
    trained = [name for name in checkpoint["state_dict"] if name.startswith(("embedding", "classifier"))]
    assert trained and any(not torch.equal(live[name], averaged[name]) for name in trained)
    for name, tensor in checkpoint["state_dict"].items():  # the served (saved) weights are the average's
        torch.testing.assert_close(tensor, averaged[name].to(tensor.dtype), msg=name)
    best, best_checkpoint = load_checkpoint(whole / "weights" / "best.pt")
    epoch_state = torch.load(whole / "weights" / f"epoch_{best_checkpoint['epoch']}.pt", map_location="cpu",
                             weights_only=True)["state_dict"]
    for name, tensor in best.state_dict().items():
        torch.testing.assert_close(tensor, epoch_state[name], msg=name)

    real_run_epoch, calls = train.run_epoch, []

    def interrupted(*args, **kwargs):
        calls.append(1)
        if len(calls) == 3:  # epoch 2's training pass
            raise KeyboardInterrupt
        return real_run_epoch(*args, **kwargs)

    monkeypatch.setattr(train, "run_epoch", interrupted)
    with pytest.raises(KeyboardInterrupt):
        train.train(train_args(sample_work, tmp_path / "broken", ema_decay=0.9, epochs=2))
    monkeypatch.setattr(train, "run_epoch", real_run_epoch)
    resumed = train.train(argparse.Namespace(resume=tmp_path / "broken"))
    got = torch.load(resumed / "weights" / "epoch_2.pt", map_location="cpu", weights_only=True)
    for name, tensor in checkpoint["state_dict"].items():
        torch.testing.assert_close(got["state_dict"][name], tensor, msg=name)
    for name, tensor in live.items():
        torch.testing.assert_close(got["training_state"]["live_state_dict"][name], tensor, msg=name)
