"""Training the SyncNet lip-sync expert on in-sync vs shifted windows of the same clip.

Each clip of a batch gives ``windows_per_clip`` video windows (5 frames of the face's lower half); each video window
is paired once with its own audio window (label 1) and once with the audio window of the same clip shifted by at
least ``min_shift`` frames (label 0), so batches are balanced and the expert cannot use speaker or clip identity.
The loss is the BCE of the embeddings' cosine similarity, as Wav2Lip trains its expert.

Validation reports the sync accuracy (cosine > 0.5 on held-out pairs, drawn with a fixed seed) and the LSE-D /
LSE-C of the validation clips through the `LipSync` metric twice: on the clips as they are and with the audio
delayed by ``val_shift`` frames; a useful expert scores the real clips with the lower LSE-D at offset 0 and finds
``val_shift`` as the best offset of the shifted ones. `load_sync_expert` returns the trained `SyncNet` for the
face renderer's sync loss and for the metric suite.
"""

from __future__ import annotations

from dataclasses import asdict
from pathlib import Path
from typing import Any

import lightning as L
import torch
import torch.nn.functional as F
from torch import Tensor
from torchmetrics import MeanMetric

from av2av_lightning.checkpoints import STAGE_KEY, load_stage_model
from av2av_lightning.data.batching import AVBatch
from av2av_lightning.data.schema import SAMPLES_PER_FRAME
from av2av_lightning.metrics.lipsync import LipSync
from av2av_lightning.models.syncnet import SYNC_FRAMES, SyncNet, SyncNetConfig
from av2av_lightning.optim import stage_optimizer

STAGE = "sync_expert"
LIPSYNC_VARIANTS = ("real", "shifted", "real_at_zero", "shifted_at_zero")

__all__ = ["STAGE", "SyncExpertTraining", "load_sync_expert", "sample_pairs", "shift_clip"]


def sample_pairs(
    lengths: Tensor, windows_per_clip: int, min_shift: int, generator: torch.Generator | None = None
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Balanced in-sync and shifted window pairs: ``(clip, video_start, audio_start, label)``, each ``[N]``.

    Clips too short to hold two windows ``min_shift`` frames apart are skipped.
    """
    clips, video, audio, labels = [], [], [], []
    for clip, length in enumerate(lengths.tolist()):
        starts = length - SYNC_FRAMES + 1  # valid window starts 0 .. starts - 1
        if starts < 2 * min_shift:  # the shift below needs [min_shift, starts - min_shift] to be non-empty
            continue
        t = torch.randint(0, starts, (windows_per_clip,), generator=generator)
        # a shift in [min_shift, starts - 1], then wrapped into the clip: never closer than min_shift to t
        shift = torch.randint(min_shift, starts - min_shift + 1, (windows_per_clip,), generator=generator)
        wrong = (t + shift) % starts
        clips += [clip] * (2 * windows_per_clip)
        video += [t, t]
        audio += [t, wrong]
        labels += [torch.ones(windows_per_clip), torch.zeros(windows_per_clip)]
    if not clips:
        raise ValueError(f"no clip of the batch is long enough for sync pairs (lengths {lengths.tolist()})")
    return torch.tensor(clips), torch.cat(video), torch.cat(audio), torch.cat(labels)


def shift_clip(faces: Tensor, wave: Tensor, frames: int) -> tuple[Tensor, Tensor]:
    """The clip with its audio lagging the video by ``frames`` frames (both trimmed to the overlap):
    video frames ``frames ..`` against audio from the start, so the expert's best offset is ``+frames``."""
    length = len(faces) - frames
    return faces[frames:], wave[: length * SAMPLES_PER_FRAME]


class SyncExpertTraining(L.LightningModule):
    """BCE on the cosine of SyncNet embeddings of in-sync vs shifted pairs.

    Args:
        preset: ``tiny`` or ``base`` (`SyncNetConfig` presets).
        model: overrides of preset fields, e.g. ``{"embed_dim": 128}``.
        windows_per_clip: video windows drawn per clip and step (each gives one positive and one negative pair).
        min_shift: the least offset in frames of a negative pair's audio (windows overlap below 5).
        val_shift: audio delay in frames of the shifted copies validation scores with `LipSync`.
        max_offset: offsets searched by `LipSync` (frames either way).
        lr, warmup_steps, total_steps, weight_decay: AdamW with warm-up and polynomial decay
            (``total_steps=None``: the trainer's estimate).
    """

    def __init__(
        self,
        preset: str = "tiny",
        model: dict[str, Any] | None = None,
        windows_per_clip: int = 8,
        min_shift: int = 3,
        val_shift: int = 5,
        max_offset: int = 15,
        lr: float = 1e-3,
        warmup_steps: int = 50,
        total_steps: int | None = None,
        weight_decay: float = 0.01,
    ) -> None:
        super().__init__()
        self.save_hyperparameters()
        if min_shift < 1 or val_shift < 1:
            raise ValueError(f"min_shift and val_shift must be >= 1 frame, got {min_shift} and {val_shift}")
        self.config = SyncNetConfig.preset(preset, **(model or {}))
        self.model = SyncNet(self.config)
        self.accuracy = MeanMetric()
        self.lipsync_real = LipSync(self.model, max_offset=max_offset)
        self.lipsync_shifted = LipSync(self.model, max_offset=max_offset)
        self.lipsync_real_at_zero = LipSync(self.model, max_offset=0)
        self.lipsync_shifted_at_zero = LipSync(self.model, max_offset=0)

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        """Record the stage and the resolved architecture, so `load_sync_expert` rebuilds the expert alone."""
        checkpoint[STAGE_KEY] = STAGE
        checkpoint["syncnet_config"] = asdict(self.config)

    def pair_probabilities(self, batch: AVBatch, generator: torch.Generator | None = None) -> tuple[Tensor, Tensor]:
        """Sync probabilities and labels ``[N]`` of a batch's balanced pairs."""
        if batch.face is None:
            raise ValueError("the sync expert needs face video: build the datamodule with load_face=True")
        clip, video_start, audio_start, labels = sample_pairs(
            batch.lengths.cpu(), self.hparams.windows_per_clip, self.hparams.min_shift, generator
        )
        clip, video_start, audio_start = clip.to(self.device), video_start.to(self.device), audio_start.to(self.device)
        offsets = torch.arange(SYNC_FRAMES, device=self.device)
        video = batch.face[clip[:, None], video_start[:, None] + offsets]  # [N, 5, 3, 96, 96]
        audio = self.model.audio_windows(batch.wave, batch.wave_lengths)[clip, audio_start]  # [N, 20, mels]
        return self.model(video, audio), labels.to(self.device)

    @staticmethod
    def sync_loss(probability: Tensor, labels: Tensor) -> Tensor:
        return F.binary_cross_entropy(probability.clamp(1e-6, 1 - 1e-6), labels)

    def training_step(self, batch: AVBatch, batch_idx: int) -> Tensor:
        probability, labels = self.pair_probabilities(batch)
        loss = self.sync_loss(probability, labels)
        accuracy = ((probability > 0.5).float() == labels).float().mean()
        self.log_dict({"train/loss": loss, "train/sync_acc": accuracy}, prog_bar=True, batch_size=len(batch))
        return loss

    def validation_step(self, batch: AVBatch, batch_idx: int) -> None:
        generator = torch.Generator().manual_seed(batch_idx)
        probability, labels = self.pair_probabilities(batch, generator)
        self.log("val/loss", self.sync_loss(probability, labels), batch_size=len(batch), sync_dist=True)
        self.accuracy.update(((probability > 0.5).float() == labels).float())
        self.log("val/sync_acc", self.accuracy, batch_size=len(batch))
        self.update_lipsync(batch)

    def on_validation_epoch_end(self) -> None:
        """LSE-D / LSE-C / best offset of real and shifted clips, searched over offsets and at offset 0."""
        for name in LIPSYNC_VARIANTS:
            metric = getattr(self, f"lipsync_{name}")
            if int(metric.clips) == 0:
                continue
            scores = metric.compute()
            keys = ("lse_d",) if metric.max_offset == 0 else tuple(scores)  # no confidence or offset without a search
            self.log_dict({f"val/{key}_{name}": scores[key].float() for key in keys})
            metric.reset()

    def update_lipsync(self, batch: AVBatch) -> None:
        """Score every clip long enough for the shift as it is and with its audio delayed by ``val_shift``."""
        shift = self.hparams.val_shift
        for faces, wave, length in zip(batch.face, batch.wave, batch.lengths.tolist()):
            if length - shift < SYNC_FRAMES:
                continue
            faces, wave = faces[:length], wave[: length * SAMPLES_PER_FRAME]
            shifted = shift_clip(faces, wave, shift)
            self.lipsync_real.update([faces], [wave])
            self.lipsync_real_at_zero.update([faces], [wave])
            self.lipsync_shifted.update([shifted[0]], [shifted[1]])
            self.lipsync_shifted_at_zero.update([shifted[0]], [shifted[1]])

    def configure_optimizers(self) -> dict:
        return stage_optimizer(self, self.model)


def load_sync_expert(path: str | Path) -> SyncNet:
    """The `SyncNet` of a `SyncExpertTraining` checkpoint, in eval mode (satisfies `SyncExpert`)."""
    return load_stage_model(path, STAGE, lambda c: SyncNet(SyncNetConfig(**c["syncnet_config"])))
