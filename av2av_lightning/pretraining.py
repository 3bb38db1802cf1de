"""AV-HuBERT pretraining: masked prediction of cluster targets with modality dropout.

`AVHubertPretraining` owns the loss, optimiser and logging around the plain `AVHubert`
module. Targets come from the datamodule's label sidecars (``batch.labels[name]``) at any
rate that is a multiple of the 25 Hz feature rate (MFCC k-means labels are 100 Hz; later
iterations label encoder layers at 25 Hz); like the reference implementation, frame ``t``
predicts the label at ``t * rate / 25``.
"""

from __future__ import annotations

from dataclasses import asdict
from typing import Any

import lightning as L
import torch
import torch.nn.functional as F
from torch import Tensor
from torchmetrics import MeanMetric

from av2av_lightning.checkpoints import STAGE_KEY
from av2av_lightning.data.batching import IGNORE_INDEX, AVBatch
from av2av_lightning.data.schema import VIDEO_FPS
from av2av_lightning.data.sidecar import expect_rates
from av2av_lightning.distributed import refuse_layerdrop_under_plain_ddp
from av2av_lightning.models.avhubert import AVHubert, AVHubertConfig
from av2av_lightning.optim import stage_optimizer

INPUTS = ("av", "a", "v")  # validation reports masked-prediction accuracy for each input


class AVHubertPretraining(L.LightningModule):
    """Masked prediction over one or more label sets (cosine logits against label embeddings).

    Args:
        preset: ``tiny``, ``base`` or ``large`` (`AVHubertConfig` presets).
        encoder: overrides of preset fields, e.g. ``{"modality_dropout": 0.5, "num_classes": [100]}``.
        labels: names of the label sidecars in ``batch.labels``, one per label set (``num_classes`` order).
        label_rate: frames per second of the labels (100 for MFCC targets, 25 for layer targets).
        masked_weight, unmasked_weight: loss weights of masked and unmasked frames.
        feature_penalty_weight: weight of the mean square of the fused front-end features.
        lr, warmup_steps, total_steps: peak learning rate and the polynomial-decay schedule
            (``total_steps=None``: the trainer's estimated number of steps).
        weight_decay, betas, eps: AdamW settings as published.
    """

    def __init__(
        self,
        preset: str = "tiny",
        encoder: dict[str, Any] | None = None,
        labels: list[str] | None = None,
        label_rate: float = 100.0,
        masked_weight: float = 1.0,
        unmasked_weight: float = 0.0,
        feature_penalty_weight: float = 10.0,
        lr: float = 5e-4,
        warmup_steps: int = 32_000,
        total_steps: int | None = None,
        weight_decay: float = 0.01,
        betas: tuple[float, float] = (0.9, 0.98),
        eps: float = 1e-6,
    ) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.config = AVHubertConfig.preset(preset, **(encoder or {}))
        self.labels = list(labels or ["km"])
        if len(self.labels) != len(self.config.num_classes):
            raise ValueError(
                f"{len(self.labels)} label set(s) {self.labels} but num_classes has {len(self.config.num_classes)}"
            )
        if label_rate % VIDEO_FPS:
            raise ValueError(f"label_rate must be a multiple of {VIDEO_FPS} Hz, got {label_rate}")
        self.model = AVHubert(self.config)
        self.accuracy = torch.nn.ModuleDict({name: MeanMetric() for name in INPUTS})

    def setup(self, stage: str) -> None:
        """Refuse label sidecars of another frame rate than ``label_rate`` (labels are never resampled)."""
        sidecars = getattr(self.trainer.datamodule, "sidecars", None) or {}
        rates = dict.fromkeys(self.labels, self.hparams.label_rate)
        expect_rates(sidecars, rates, f"pretraining (label_rate {self.hparams.label_rate:g})")

    def on_fit_start(self) -> None:
        refuse_layerdrop_under_plain_ddp(self.trainer, self)

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        """Record the stage and the resolved architecture, so later stages can rebuild the encoder alone."""
        checkpoint[STAGE_KEY] = "pretraining"
        checkpoint["encoder_config"] = asdict(self.config)

    def targets(self, batch: AVBatch) -> list[Tensor]:
        """Each label set at the 25 Hz feature rate: [B, T] with IGNORE_INDEX on padding and missing labels."""
        ratio = int(self.hparams.label_rate // VIDEO_FPS)
        frames = batch.audio.shape[1]
        out = []
        for name in self.labels:
            if name not in batch.labels:
                raise KeyError(f"batch has no labels {name!r} (datamodule sidecars: {sorted(batch.labels)})")
            labels = batch.labels[name][:, ::ratio][:, :frames]
            if labels.shape[1] < frames:
                labels = F.pad(labels, (0, frames - labels.shape[1]), value=IGNORE_INDEX)
            out.append(labels.masked_fill(batch.padding_mask, IGNORE_INDEX))
        return out

    def masked_prediction_loss(self, batch: AVBatch, audio: bool = True, video: bool = True) -> tuple[Tensor, dict]:
        """Summed cross entropy over masked (and optionally unmasked) frames, plus per-label-set counts."""
        output = self.model(batch.audio if audio else None, batch.video if video else None, batch.padding_mask)
        total = output.features.new_zeros(())
        stats = {"masked_frames": 0, "correct": 0}
        frames = 0
        for logits, target in zip(output.logits, self.targets(batch)):
            valid = target != IGNORE_INDEX
            for weight, selected in (
                (self.hparams.masked_weight, valid & output.mask_indices),
                (self.hparams.unmasked_weight, valid & ~output.mask_indices),
            ):
                if weight > 0 and selected.any():
                    total = total + weight * F.cross_entropy(logits[selected], target[selected], reduction="sum")
            masked = valid & output.mask_indices
            stats["masked_frames"] += int(masked.sum())
            stats["correct"] += int((logits.argmax(-1) == target)[masked].sum())
            frames += int(masked.sum()) if self.hparams.unmasked_weight == 0 else int(valid.sum())
        stats["frames"] = frames
        stats["feature_penalty"] = output.feature_penalty
        return total, stats

    def training_step(self, batch: AVBatch, batch_idx: int) -> Tensor:
        summed, stats = self.masked_prediction_loss(batch)
        # normalise per frame over the whole world, not per rank: DDP averages gradients, so scale by world size
        frames = self.trainer.strategy.reduce(torch.tensor(float(stats["frames"]), device=self.device), reduce_op="sum")
        loss = summed / frames.clamp(min=1.0) * self.trainer.world_size
        loss = loss + self.hparams.feature_penalty_weight * stats["feature_penalty"]
        accuracy = stats["correct"] / max(stats["masked_frames"], 1)
        self.log_dict(
            {
                "train/loss": loss,
                "train/acc_masked": accuracy,
                "train/feature_penalty": stats["feature_penalty"],
            },
            prog_bar=True,
            batch_size=len(batch),
        )
        self.log("train/skipped", float(batch.num_skipped), reduce_fx="sum", batch_size=len(batch))
        return loss

    def validation_step(self, batch: AVBatch, batch_idx: int) -> None:
        for name in INPUTS:
            summed, stats = self.masked_prediction_loss(batch, audio=name != "v", video=name != "a")
            if stats["masked_frames"]:
                self.accuracy[name].update(stats["correct"] / stats["masked_frames"], stats["masked_frames"])
            if name == "av":
                self.log("val/loss", summed / max(stats["frames"], 1), batch_size=len(batch), sync_dist=True)
        for name in INPUTS:
            self.log(f"val/acc_masked_{name}", self.accuracy[name], batch_size=len(batch))

    def configure_optimizers(self) -> dict:
        return stage_optimizer(self, self.model)
