"""The shared optimiser: weight-decay groups, per-prefix learning-rate scales, the warm-up/decay schedule."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from av2av_lightning.optim import adam_with_schedule, polynomial_decay_with_warmup


class EncoderAndHead(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.encoder = nn.Linear(4, 4)
        self.head = nn.Linear(4, 2)


def group_of(optimizer: torch.optim.Optimizer, parameter: nn.Parameter) -> dict:
    return next(g for g in optimizer.param_groups if any(p is parameter for p in g["params"]))


def test_lr_scales_give_a_prefix_its_share_of_the_scheduled_rate():
    module = EncoderAndHead()
    config = adam_with_schedule(module, lr=1e-3, total_steps=10, warmup_steps=2, lr_scales={"encoder.": 0.1})
    optimizer, scheduler = config["optimizer"], config["lr_scheduler"]["scheduler"]
    assert sum(len(g["params"]) for g in optimizer.param_groups) == 4
    encoder, head = group_of(optimizer, module.encoder.weight), group_of(optimizer, module.head.weight)
    assert group_of(optimizer, module.encoder.bias)["weight_decay"] == 0.0 and encoder["weight_decay"] == 0.01
    for _ in range(3):
        assert encoder["lr"] == pytest.approx(0.1 * head["lr"])
        optimizer.step()
        scheduler.step()
    assert head["lr"] == pytest.approx(1e-3 * polynomial_decay_with_warmup(3, 2, 10))


def test_without_scales_the_groups_keep_the_decay_then_no_decay_order_of_older_checkpoints():
    module = nn.Sequential(nn.LayerNorm(4), nn.Linear(4, 4))  # a no-decay parameter comes first
    optimizer = adam_with_schedule(module, lr=1e-3, total_steps=10, warmup_steps=0)["optimizer"]
    assert [g["weight_decay"] for g in optimizer.param_groups] == [0.01, 0.0]
    assert all(g["lr"] == 1e-3 for g in optimizer.param_groups)
