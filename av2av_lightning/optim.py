"""Optimisers and learning-rate schedules shared by the training stages."""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import nn


def polynomial_decay_with_warmup(
    step: int, warmup_steps: int, total_steps: int, power: float = 1.0, end_factor: float = 0.0
) -> float:
    """LR multiplier: linear warm-up from 0 to 1, then polynomial decay to ``end_factor`` at ``total_steps``
    (the fairseq ``polynomial_decay`` schedule AV-HuBERT pretraining uses)."""
    if warmup_steps > 0 and step < warmup_steps:
        return (step + 1) / warmup_steps
    if step >= total_steps:
        return end_factor
    remaining = 1.0 - (step - warmup_steps) / max(total_steps - warmup_steps, 1)
    return end_factor + (1.0 - end_factor) * remaining**power


def adam_with_schedule(
    module: nn.Module,
    lr: float,
    total_steps: int,
    warmup_steps: int,
    betas: tuple[float, float] = (0.9, 0.98),
    eps: float = 1e-6,
    weight_decay: float = 0.01,
    power: float = 1.0,
    end_factor: float = 0.0,
    lr_scales: Mapping[str, float] | None = None,
) -> dict:
    """Adam with decoupled weight decay (no decay on biases and norms) and a per-step warm-up/decay schedule,
    in the form ``LightningModule.configure_optimizers`` returns. ``lr_scales`` maps a parameter-name prefix
    (``"encoder."``) to a factor on its learning rate, e.g. a pretrained encoder fine-tuned more gently than
    fresh heads."""
    groups: dict[tuple[float, bool], list[nn.Parameter]] = {}
    for name, parameter in module.named_parameters():
        if parameter.requires_grad:
            scale = next((f for prefix, f in (lr_scales or {}).items() if name.startswith(prefix)), 1.0)
            decays = parameter.ndim >= 2 and not name.endswith(".bias")
            groups.setdefault((scale, decays), []).append(parameter)
    optimizer = torch.optim.AdamW(
        [
            {"params": params, "lr": lr * scale, "weight_decay": weight_decay if decays else 0.0}
            # decaying groups first: without scales, the [decay, no decay] order of older checkpoints' optimiser state
            for (scale, decays), params in sorted(groups.items(), key=lambda group: not group[0][1])
        ],
        lr=lr,
        betas=betas,
        eps=eps,
    )
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: polynomial_decay_with_warmup(step, warmup_steps, total_steps, power, end_factor)
    )
    return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}


def stage_optimizer(stage, parameters: nn.Module, **overrides) -> dict:
    """`adam_with_schedule` over ``parameters`` from a stage's hyperparameters: ``lr``, ``warmup_steps``,
    ``weight_decay``, ``total_steps`` (None: the trainer's estimate) and ``betas``/``eps`` where the stage has them;
    ``overrides`` win (a stage with fixed Adam settings)."""
    hparams = stage.hparams
    settings = {
        "lr": hparams.lr,
        "warmup_steps": hparams.warmup_steps,
        "weight_decay": hparams.weight_decay,
        "total_steps": hparams.get("total_steps") or int(stage.trainer.estimated_stepping_batches),
    }
    if "betas" in hparams:
        settings["betas"] = tuple(hparams.betas)
    if "eps" in hparams:
        settings["eps"] = hparams.eps
    return adam_with_schedule(parameters, **{**settings, **overrides})


def manual_step(stage, optimizer, scheduler, loss: torch.Tensor) -> None:
    """One optimiser and schedule step on ``loss`` for a stage with manual optimisation (the GAN stages, which
    step a discriminator and a generator in turn)."""
    optimizer.zero_grad()
    stage.manual_backward(loss)
    optimizer.step()
    scheduler.step()
