"""Training the unit-driven face renderer: L1 reconstruction plus an optional sync loss from a frozen expert.

A training step draws ``windows_per_clip`` windows of 5 consecutive frames per clip; every frame is generated from
itself with the lower half masked, a reference frame drawn from anywhere in the same clip (so the lips must come
from the units, not from the reference) and the window of units around it. The loss is the mean L1 to the real
frames plus ``mouth_weight`` times the mean L1 over the mouth box of the aligned crop (the lips are under 1 % of
the pixels, so whole-face L1 barely rewards them: after 600 demo steps on L1 alone, the renderer draws the same
mouth whatever its units, see ``evaluation.resynthesis --contents own rotated``) plus ``sync_weight`` times the
BCE of the frozen SyncNet expert (`load_sync_expert`) scoring the generated windows against their audio as in
sync, as Wav2Lip does (``sync_weight=0`` trains on L1 alone and needs no expert), plus, with
``adversarial_weight > 0``, a GAN loss from a patch discriminator on the lower half, trained in the same step on
the detached output (manual optimisation, one optimiser each).

Units come from the sidecar named by ``units``; at ``unit_rate`` 25 Hz each unit is repeated to the 50 Hz the
renderer reads (2 per frame). Validation renders every frame of every clip from its first frame as the
reference and logs the L1 and PSNR / SSIM (`VideoPSNR`, `VideoSSIM`, data range 1, on ``quality_frames`` frames
per clip); the first clip of each
validation pass is written as a PNG grid (target, masked input, reference, output) and sent to the logger when
it can show images (W&B), and logged as generated vs reference video (`logging_utils.log_media_table`).
"""

from __future__ import annotations

from dataclasses import asdict
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import Tensor
from torchmetrics import MeanMetric

from av2av_lightning.checkpoints import STAGE_KEY, load_stage_model
from av2av_lightning.data.batching import IGNORE_INDEX, AVBatch
from av2av_lightning.data.schema import FACE_SIZE, VIDEO_FPS
from av2av_lightning.data.sidecar import expect_ids_below, expect_rates
from av2av_lightning.logging_utils import log_media_table
from av2av_lightning.metrics._common import attach_external
from av2av_lightning.metrics.video import VideoPSNR, VideoSSIM
from av2av_lightning.models.face_renderer import (
    UNITS_PER_FRAME,
    FaceDiscriminator,
    FaceRenderer,
    FaceRendererConfig,
    mask_lower_half,
    unit_windows,
)
from av2av_lightning.models.syncnet import SYNC_FRAMES, SyncNet
from av2av_lightning.optim import manual_step, stage_optimizer
from av2av_lightning.sync_expert import load_sync_expert

STAGE = "face_rendering"
GRID_FRAMES = 8
MOUTH_BOX = (56, 84, 28, 68)  # rows top..bottom, columns left..right of the lips and jaw in an aligned 96x96 face
DISCRIMINATOR = [32, 64, 128, 256]

__all__ = ["STAGE", "FaceRendering", "gan_loss", "load_face_renderer"]


def gan_loss(logits: Tensor, real: bool) -> Tensor:
    """Non-saturating GAN loss: BCE of patch logits against all-real or all-fake."""
    return F.binary_cross_entropy_with_logits(logits, torch.full_like(logits, float(real)))


class FaceRendering(L.LightningModule):
    """L1 (+ sync, + adversarial) training of `FaceRenderer` on face video and a unit sidecar.

    Args:
        preset: ``tiny`` or ``published`` (`FaceRendererConfig` presets).
        renderer: overrides of preset fields, e.g. ``{"num_units": 100}``.
        units: name of the unit sidecar in ``batch.labels``.
        unit_rate: rate of those units in Hz, 25 or 50 (25 Hz units are repeated to 50 Hz).
        windows_per_clip: 5-frame windows drawn per clip and training step.
        mouth_weight: weight of an extra loss over ``mouth_box`` (0: whole-face L1 alone, as Wav2Lip).
        mouth_loss: ``l1``, or ``l2`` (squared error): where the units say the mouth is open only some of the time,
            L1's optimum is the median (a closed mouth) and squared error's the mean, which moves with the units.
        mouth_box: ``(top, bottom, left, right)`` pixel bounds of the mouth in the aligned face crop.
        sync_weight: weight of the expert's sync loss (0: L1 only).
        expert: path of a `SyncExpertTraining` checkpoint; required when ``sync_weight > 0``.
        adversarial_weight: weight of the non-saturating GAN loss of a patch discriminator on the lower half (0: none).
        discriminator: its channel widths (default 32, 64, 128, 256).
        quality_frames: frames per clip (evenly spaced) that validation scores with PSNR/SSIM; None: all. SSIM runs
            in float64 and costs ~0.1-0.3 s per frame on a CPU, so scoring every frame would dominate validation.
        sample_dir: where the validation grids go (default: ``<default_root_dir>/samples``).
        lr, warmup_steps, total_steps, weight_decay: AdamW with warm-up and polynomial decay.
    """

    def __init__(
        self,
        preset: str = "tiny",
        renderer: dict[str, Any] | None = None,
        units: str = "units",
        unit_rate: float = 50.0,
        windows_per_clip: int = 2,
        mouth_weight: float = 0.0,
        mouth_loss: str = "l1",
        mouth_box: tuple[int, int, int, int] = MOUTH_BOX,
        sync_weight: float = 0.0,
        expert: str | None = None,
        adversarial_weight: float = 0.0,
        discriminator: list[int] | None = None,
        quality_frames: int | None = 8,
        sample_dir: str | None = None,
        lr: float = 1e-3,
        warmup_steps: int = 50,
        total_steps: int | None = None,
        weight_decay: float = 0.0,
    ) -> None:
        super().__init__()
        self.save_hyperparameters()
        if unit_rate not in (25, 50):
            raise ValueError(f"unit_rate must be 25 or 50 Hz, got {unit_rate}")
        if adversarial_weight < 0:
            raise ValueError(f"adversarial_weight must be >= 0, got {adversarial_weight}")
        if sync_weight < 0:
            raise ValueError(f"sync_weight must be >= 0, got {sync_weight}")
        if mouth_weight < 0:
            raise ValueError(f"mouth_weight must be >= 0, got {mouth_weight}")
        if mouth_loss not in ("l1", "l2"):
            raise ValueError(f"mouth_loss must be 'l1' or 'l2', got {mouth_loss!r}")
        top, bottom, left, right = mouth_box
        if not (0 <= top < bottom <= FACE_SIZE and 0 <= left < right <= FACE_SIZE):
            raise ValueError(f"mouth_box {tuple(mouth_box)} must be (top, bottom, left, right) inside {FACE_SIZE} px")
        if sync_weight > 0 and expert is None:
            raise ValueError(f"sync_weight {sync_weight} needs an expert checkpoint (the expert argument)")
        self.config = FaceRendererConfig.preset(preset, **(renderer or {}))
        self.model = FaceRenderer(self.config)
        self.discriminator = FaceDiscriminator(discriminator or DISCRIMINATOR) if adversarial_weight > 0 else None
        self.automatic_optimization = False  # the optional discriminator has its own optimiser
        attach_external(self, "expert", self._frozen_expert(expert) if sync_weight > 0 else None)
        self.psnr = VideoPSNR(data_range=1.0)
        self.ssim = VideoSSIM(data_range=1.0)
        self.val_l1 = MeanMetric()
        self.val_mouth_l1 = MeanMetric()

    @staticmethod
    def _frozen_expert(path: str) -> SyncNet:
        expert = load_sync_expert(path)
        expert.requires_grad_(False)
        return expert

    def setup(self, stage: str) -> None:
        """Refuse a unit sidecar of another frame rate than ``unit_rate`` (de-duplicated units have none) or k."""
        reader = f"the face renderer (unit_rate {self.hparams.unit_rate:g})"
        sidecars = getattr(self.trainer.datamodule, "sidecars", None) or {}
        expect_rates(sidecars, {self.hparams.units: self.hparams.unit_rate}, reader)
        expect_ids_below(sidecars, self.hparams.units, self.config.num_units, "the face renderer")

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        """Record the stage and the resolved architecture, so `load_face_renderer` rebuilds the renderer alone."""
        checkpoint[STAGE_KEY] = STAGE
        checkpoint["renderer_config"] = asdict(self.config)

    def on_fit_start(self) -> None:
        if self.expert is not None:
            self.expert.to(self.device).eval()

    # -- inputs

    def frame_units(self, batch: AVBatch) -> Tensor:
        """Unit windows of every frame ``[B, T, 2W]`` (padding and missing units -> the pad id)."""
        if self.hparams.units not in batch.labels:
            raise KeyError(f"batch has no units {self.hparams.units!r} (datamodule sidecars: {sorted(batch.labels)})")
        if batch.face is None:
            raise ValueError("the face renderer needs face video: build the datamodule with load_face=True")
        if tuple(batch.face.shape[-3:]) != (3, FACE_SIZE, FACE_SIZE):
            raise ValueError(f"expected faces [B, T, 3, {FACE_SIZE}, {FACE_SIZE}], got {tuple(batch.face.shape)}")
        units = batch.labels[self.hparams.units]
        valid = units != IGNORE_INDEX
        if bool(((units < 0) | (units >= self.config.num_units))[valid].any()):
            raise ValueError(f"units {self.hparams.units!r} must lie in [0, {self.config.num_units}) for this renderer")
        units = units.masked_fill(~valid, self.config.num_units)
        units = units.repeat_interleave(int(UNITS_PER_FRAME * VIDEO_FPS // self.hparams.unit_rate), dim=1)
        return unit_windows(units, batch.face.shape[1], self.config.window, self.config.num_units)

    def render(self, faces: Tensor, reference: Tensor, windows: Tensor) -> Tensor:
        """Frames ``[..., 3, 96, 96]`` generated from themselves (masked), references and unit windows ``[..., 2W]``."""
        shape = faces.shape
        flat = self.model(
            mask_lower_half(faces.reshape(-1, *shape[-3:])),
            reference.reshape(-1, *shape[-3:]),
            windows.reshape(-1, windows.shape[-1]),
        )
        return flat.reshape(shape)

    def mouth_error(self, generated: Tensor, target: Tensor, squared: bool = False) -> Tensor:
        """Mean L1 (``squared``: squared error) over the mouth box of faces ``[..., 3, 96, 96]``."""
        top, bottom, left, right = self.hparams.mouth_box
        error = F.mse_loss if squared else F.l1_loss
        return error(generated[..., top:bottom, left:right], target[..., top:bottom, left:right])

    def sample_windows(self, lengths: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """``(clip [N], frames [N, 5], reference frames [N, 5])`` for ``windows_per_clip`` windows of each clip."""
        clips, frames, references = [], [], []
        for clip, length in enumerate(lengths.tolist()):
            if length < SYNC_FRAMES:
                continue
            starts = torch.randint(0, length - SYNC_FRAMES + 1, (self.hparams.windows_per_clip, 1))
            clips.append(torch.full((len(starts),), clip))
            frames.append(starts + torch.arange(SYNC_FRAMES))
            references.append(torch.randint(0, length, (len(starts), SYNC_FRAMES)))
        if not clips:
            raise ValueError(f"no clip of the batch has {SYNC_FRAMES} frames (lengths {lengths.tolist()})")
        return torch.cat(clips), torch.cat(frames), torch.cat(references)

    # -- training

    def sync_loss(self, generated: Tensor, batch: AVBatch, clip: Tensor, start: Tensor) -> Tensor:
        """BCE of the frozen expert's sync probability of generated windows ``[N, 5, 3, 96, 96]`` against 1."""
        audio = self.expert.audio_windows(batch.wave, batch.wave_lengths)[clip, start]
        probability = self.expert(generated, audio)
        return F.binary_cross_entropy(probability.clamp(1e-6, 1 - 1e-6), torch.ones_like(probability))

    def training_step(self, batch: AVBatch, batch_idx: int) -> Tensor:
        """Manual optimisation: a discriminator step on the detached output (when adversarial), then the renderer."""
        optimizers, schedulers = self.optimizers(), self.lr_schedulers()
        opt_g, *opt_d = optimizers if isinstance(optimizers, list) else [optimizers]
        sched_g, *sched_d = schedulers if isinstance(schedulers, list) else [schedulers]
        windows = self.frame_units(batch)
        clip, frames, references = (x.to(self.device) for x in self.sample_windows(batch.lengths.cpu()))
        target = batch.face[clip[:, None], frames]  # [N, 5, 3, 96, 96]
        generated = self.render(target, batch.face[clip[:, None], references], windows[clip[:, None], frames])
        logs = {}
        if self.discriminator is not None:
            real_logits = self.discriminator(target.flatten(0, 1))
            fake_logits = self.discriminator(generated.detach().flatten(0, 1))
            loss_d = gan_loss(real_logits, True) + gan_loss(fake_logits, False)
            manual_step(self, opt_d[0], sched_d[0], loss_d)
            logs["train/loss_d"] = loss_d
        l1, mouth = F.l1_loss(generated, target), self.mouth_error(generated, target)
        mouth_term = self.mouth_error(generated, target, squared=True) if self.hparams.mouth_loss == "l2" else mouth
        loss = l1 + self.hparams.mouth_weight * mouth_term
        logs |= {"train/l1": l1, "train/mouth_l1": mouth}
        if self.hparams.sync_weight > 0:
            sync = self.sync_loss(generated, batch, clip, frames[:, 0])
            loss = loss + self.hparams.sync_weight * sync
            logs["train/sync"] = sync
        if self.discriminator is not None:
            adversarial = gan_loss(self.discriminator(generated.flatten(0, 1)), True)
            loss = loss + self.hparams.adversarial_weight * adversarial
            logs["train/adversarial"] = adversarial
        manual_step(self, opt_g, sched_g, loss)
        self.log_dict({"train/loss": loss, **logs}, prog_bar=True, batch_size=len(batch))
        return loss.detach()

    # -- validation

    def validation_step(self, batch: AVBatch, batch_idx: int) -> None:
        windows = self.frame_units(batch)
        for index, length in enumerate(batch.lengths.tolist()):
            faces = batch.face[index, :length]
            generated = self.render(faces, faces[:1].expand_as(faces), windows[index, :length])
            self.val_l1.update(F.l1_loss(generated, faces), length)
            self.val_mouth_l1.update(self.mouth_error(generated, faces), length)
            pick = self.quality_frames(length)
            self.psnr.update([generated[pick].permute(0, 2, 3, 1)], [faces[pick].permute(0, 2, 3, 1)])
            self.ssim.update([generated[pick].permute(0, 2, 3, 1)], [faces[pick].permute(0, 2, 3, 1)])
            if batch_idx == 0 and index == 0 and self.trainer.is_global_zero:
                self.write_grid(faces, generated)
                row = {"key": batch.keys[index], "generated": generated, "reference": faces}
                log_media_table(self.trainer, "val/videos", [row])
        self.log("val/l1", self.val_l1, batch_size=len(batch))
        self.log("val/mouth_l1", self.val_mouth_l1, batch_size=len(batch))

    def quality_frames(self, length: int) -> Tensor:
        """Indices of the frames PSNR/SSIM score: ``quality_frames`` evenly spaced ones, or all (None)."""
        count = self.hparams.quality_frames
        if count is None or count >= length:
            return torch.arange(length, device=self.device)
        return torch.linspace(0, length - 1, count, device=self.device).round().long()

    def on_validation_epoch_end(self) -> None:
        scores = {**self.psnr.compute(), **self.ssim.compute()}
        self.log_dict({f"val/{key}": scores[key].float() for key in ("psnr", "ssim")})
        self.psnr.reset()
        self.ssim.reset()

    def write_grid(self, faces: Tensor, generated: Tensor) -> Path:
        """A PNG of up to 8 evenly spaced frames: rows target, masked input, reference, output."""
        pick = torch.linspace(0, len(faces) - 1, min(GRID_FRAMES, len(faces))).round().long().to(faces.device)
        rows = [faces[pick], mask_lower_half(faces[pick]), faces[:1].expand(len(pick), -1, -1, -1), generated[pick]]
        grid = torch.cat([torch.cat(list(row), dim=-1) for row in rows], dim=-2)  # [3, 4*96, n*96]
        image = (grid.permute(1, 2, 0).clamp(0, 1) * 255).round().to(torch.uint8).cpu().numpy()
        folder = Path(self.hparams.sample_dir or Path(self.trainer.default_root_dir) / "samples")
        folder.mkdir(parents=True, exist_ok=True)
        path = folder / f"epoch{self.current_epoch:03d}_step{self.global_step:06d}.png"
        Image.fromarray(np.ascontiguousarray(image)).save(path)
        if hasattr(self.logger, "log_image"):
            self.logger.log_image(key="val/samples", images=[str(path)], step=self.global_step)
        return path

    def configure_optimizers(self) -> tuple[list, list]:
        modules = [self.model] + ([self.discriminator] if self.discriminator is not None else [])
        configured = [stage_optimizer(self, module) for module in modules]
        return [c["optimizer"] for c in configured], [c["lr_scheduler"]["scheduler"] for c in configured]


def load_face_renderer(path: str | Path) -> FaceRenderer:
    """The `FaceRenderer` of a `FaceRendering` checkpoint, in eval mode."""
    return load_stage_model(path, STAGE, lambda c: FaceRenderer(FaceRendererConfig(**c["renderer_config"])))
