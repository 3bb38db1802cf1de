"""Settings a multi-process run cannot train with, refused when the fit starts instead of found as a hang."""

from __future__ import annotations

import lightning as L
from torch.nn.parallel import DistributedDataParallel

from av2av_lightning.models.transformer import TransformerEncoder


def refuse_layerdrop_under_plain_ddp(trainer: L.Trainer, module: L.LightningModule) -> None:
    """LayerDrop skips layers by each rank's own random draws. Plain DDP expects every trained parameter's gradient
    from every rank, so once the draws differ, a rank that used a layer the others skipped waits for ever in the
    all-reduce of its gradients. ``find_unused_parameters`` (strategy ``ddp_find_unused_parameters_true``) lets DDP
    go on without them; a frozen encoder has no gradients to wait for."""
    wrapped = trainer.strategy.model
    if trainer.world_size < 2 or not isinstance(wrapped, DistributedDataParallel) or wrapped.find_unused_parameters:
        return
    for name, layer in module.named_modules():
        if not isinstance(layer, TransformerEncoder) or layer.layerdrop == 0:
            continue
        if any(p.requires_grad for p in layer.parameters()):
            raise ValueError(
                f"{name} has layerdrop {layer.layerdrop:g}, which plain DDP cannot train (a layer skipped on one "
                "rank only leaves the others waiting for its gradients for ever): use strategy "
                "ddp_find_unused_parameters_true, or layerdrop 0"
            )
