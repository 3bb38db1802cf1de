"""Unit vocoder training: HiFi-GAN on discrete units with a speaker embedding and a duration predictor.

`UnitVocoder` reads units from a label sidecar (``batch.labels[units]``) at 25 or 50 Hz, either frame-aligned
or de-duplicated with a second sidecar of durations (what unit extraction writes); 25 Hz units are
repeated x2 so the generator always sees 50 Hz units, 320 samples each. It trains on random segments
with manual optimisation: a least-squares discriminator step, then a generator step on
``adversarial + fm_weight x feature matching + mel_weight x mel L1 + duration_weight x duration MSE``
(``+ context_mel_weight x`` the L1 of the unit context's own Mels, with ``context_layers``). A vocoder that speaks
through Griffin-Lim (``synthesis: griffin_lim``) has no generator and no discriminator: it trains the unit context's
Mels and the durations alone.

The speaker embedding comes from (the mode is recorded in the checkpoint):

- ``encoder``: a frozen `SpeakerEncoder` checkpoint (``speaker_encoder``), zero-shot for unseen speakers;
- ``table``: a learned embedding per speaker id of the ``speakers`` list (seen speakers only);
- ``none``: no speaker conditioning.

With ``voice_mels`` (a Griffin-Lim vocoder) the speaker vector also carries the mean log-Mels of the utterance's own
speech (`mean_voice_mels`), and the model keeps the average of those it trained on for inputs without speech.
"""

from __future__ import annotations

from dataclasses import asdict
from pathlib import Path
from typing import Any

import lightning as L
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from av2av_lightning.checkpoints import STAGE_KEY, load_stage_model
from av2av_lightning.data.batching import AVBatch
from av2av_lightning.data.schema import SAMPLE_RATE, VIDEO_FPS
from av2av_lightning.data.sidecar import expect_ids_below, expect_rates
from av2av_lightning.logging_utils import log_media_table
from av2av_lightning.metrics.speech import ESTOI, PESQ, STOI
from av2av_lightning.models.hifigan import (
    SAMPLES_PER_UNIT,
    HiFiGANDiscriminator,
    UnitHiFiGAN,
    UnitHiFiGANConfig,
    deduplicate,
    expand,
)
from av2av_lightning.models.mel_spectrum import MELS_PER_UNIT, N_MELS, mean_voice_mels, vocoder_mels
from av2av_lightning.optim import manual_step, stage_optimizer
from av2av_lightning.speaker_encoding import load_speaker_encoder

STAGE = "vocoder"
UNIT_RATE = 50  # Hz the generator runs at
PAD_UNIT = -1


def discriminator_loss(real: list[Tensor], fake: list[Tensor]) -> Tensor:
    """Least-squares GAN: real scores towards 1, fake towards 0, summed over sub-discriminators."""
    return sum(torch.mean((1 - r) ** 2) + torch.mean(f**2) for r, f in zip(real, fake))


def generator_adversarial_loss(fake: list[Tensor]) -> Tensor:
    return sum(torch.mean((1 - f) ** 2) for f in fake)


def feature_matching_loss(real: list[list[Tensor]], fake: list[list[Tensor]]) -> Tensor:
    """Mean L1 between discriminator feature maps of real and generated speech, summed over layers."""
    return sum(F.l1_loss(f, r.detach()) for rs, fs in zip(real, fake) for r, f in zip(rs, fs))


def duration_targets(units: Tensor, lengths: Tensor) -> tuple[Tensor, Tensor]:
    """Deduplicated units and their durations per row, padded: ``([B, U'] with PAD_UNIT, [B, U'] with 0)``."""
    rows = [deduplicate(u[: int(n)]) for u, n in zip(units, lengths)]
    width = max(len(u) for u, _ in rows)
    dedup = units.new_full((len(rows), width), PAD_UNIT)
    durations = units.new_zeros((len(rows), width))
    for row, (u, d) in enumerate(rows):
        dedup[row, : len(u)], durations[row, : len(d)] = u, d
    return dedup, durations


class UnitVocoder(L.LightningModule):
    """Unit HiFi-GAN with GAN, feature-matching, mel and duration losses (manual optimisation).

    Args:
        preset: ``tiny`` or ``published`` (`UnitHiFiGANConfig.preset`); ``vocoder`` overrides its fields.
        units: name of the unit sidecar in ``batch.labels``; ``unit_rate``: its frame rate, 25 or 50 Hz.
        durations: name of a durations sidecar when ``units`` holds de-duplicated units (unit extraction's
            ``{split}.units.npz`` + ``{split}.durations.npz``, rate null): the frames are ``units x durations``.
        speaker_encoder: a `SpeakerEncoderTraining` checkpoint (frozen) for ``encoder`` mode;
        speakers: speaker ids for a learned table (``table`` mode); neither: no speaker conditioning.
        segment_units: 50 Hz units per training segment of the generator (cut to the shortest utterance of a batch);
            a vocoder without a generator trains on whole utterances.
        mel_weight, fm_weight, duration_weight: loss weights (HiFi-GAN: 45, 2; duration 1).
        context_mel_weight: weight of the L1 between the unit context's predicted Mels and the speech's (a vocoder
            with ``context_layers``; the only speech loss of one with ``synthesis: griffin_lim``).
        gan_start_step: generator steps trained on mel and duration losses alone before the GAN joins.
        lr, betas, weight_decay, warmup_steps, total_steps: AdamW for both optimisers with `optim.py`'s schedule.
        val_audio_samples: resynthesised utterances logged next to their references per validation epoch
            (a W&B table, TensorBoard audio).
    """

    def __init__(
        self,
        preset: str = "tiny",
        vocoder: dict[str, Any] | None = None,
        units: str = "units",
        unit_rate: int = 50,
        durations: str | None = None,
        speaker_encoder: str | None = None,
        speakers: list[str] | None = None,
        segment_units: int = 28,
        mel_weight: float = 45.0,
        fm_weight: float = 2.0,
        duration_weight: float = 1.0,
        context_mel_weight: float = 1.0,
        gan_start_step: int = 0,
        lr: float = 2e-4,
        betas: tuple[float, float] = (0.8, 0.99),
        weight_decay: float = 0.01,
        warmup_steps: int = 0,
        total_steps: int | None = None,
        val_audio_samples: int = 2,
    ) -> None:
        super().__init__()
        if unit_rate not in (VIDEO_FPS, UNIT_RATE):
            raise ValueError(f"unit_rate must be {VIDEO_FPS} or {UNIT_RATE} Hz, got {unit_rate}")
        if speaker_encoder and speakers:
            raise ValueError("give either speaker_encoder (zero-shot) or speakers (a learned table), not both")
        self.save_hyperparameters()
        self.automatic_optimization = False
        overrides = dict(vocoder or {})
        self.speaker_encoder = None
        self.speaker_table = None
        self.speakers = list(speakers or [])
        if speaker_encoder:
            self.speaker_mode = "encoder"
            self.speaker_encoder = load_speaker_encoder(speaker_encoder).requires_grad_(False)
            overrides["speaker_dim"] = self.speaker_encoder.embed_dim
        elif self.speakers:
            self.speaker_mode = "table"
            speaker_dim = overrides.get("speaker_dim") or UnitHiFiGANConfig.preset(preset).speaker_dim
            self.speaker_table = nn.Embedding(len(self.speakers), speaker_dim)
            overrides["speaker_dim"] = speaker_dim
        else:
            self.speaker_mode = "none"
            overrides["speaker_dim"] = 0
        self.config = UnitHiFiGANConfig.preset(preset, **overrides)
        self.model = UnitHiFiGAN(self.config)
        self.discriminator = None
        if self.model.generator is not None:
            self.discriminator = HiFiGANDiscriminator(self.config.discriminator_width)
        self.speech_metrics = nn.ModuleList([STOI(), ESTOI(), PESQ()])

    def setup(self, stage: str) -> None:
        """Refuse unit sidecars of another frame rate (aligned units at ``unit_rate``, de-duplicated ones and their
        durations with none: a 25 Hz stream read as 50 Hz would still train, on misaligned audio) or of another k."""
        aligned = None if self.hparams.durations else self.hparams.unit_rate
        rates = {self.hparams.units: aligned, **({self.hparams.durations: None} if self.hparams.durations else {})}
        reader = f"the vocoder (unit_rate {self.hparams.unit_rate}, durations {self.hparams.durations!r})"
        sidecars = getattr(self.trainer.datamodule, "sidecars", None) or {}
        expect_rates(sidecars, rates, reader)
        expect_ids_below(sidecars, self.hparams.units, self.config.num_units, "the vocoder")

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        checkpoint[STAGE_KEY] = STAGE
        checkpoint["vocoder_config"] = asdict(self.config)
        checkpoint["speaker_mode"] = self.speaker_mode
        checkpoint["speakers"] = self.speakers

    # -- inputs

    def unit_stream(self, batch: AVBatch) -> tuple[Tensor, Tensor]:
        """50 Hz units ``[B, U]`` (PAD_UNIT beyond each length) and their counts, within the audio."""
        units, lengths = self._frame_units(batch)
        repeat = UNIT_RATE // self.hparams.unit_rate
        units = units.repeat_interleave(repeat, dim=1)
        lengths = torch.minimum(lengths * repeat, batch.wave_lengths // SAMPLES_PER_UNIT)
        units = units[:, : int(lengths.max())]
        padding = torch.arange(units.shape[1], device=units.device)[None] >= lengths[:, None]
        return units.masked_fill(padding, PAD_UNIT), lengths

    def _frame_units(self, batch: AVBatch) -> tuple[Tensor, Tensor]:
        """Units at ``unit_rate`` with their counts: the aligned sidecar, or de-duplicated units x durations."""
        for name in filter(None, (self.hparams.units, self.hparams.durations)):
            if name not in batch.labels:
                raise KeyError(f"batch has no labels {name!r} (datamodule sidecars: {sorted(batch.labels)})")
        units, lengths = batch.labels[self.hparams.units], batch.label_lengths[self.hparams.units]
        if not self.hparams.durations:
            return units, lengths
        durations = batch.labels[self.hparams.durations]
        rows = [expand(u[: int(n)], d[: int(n)]) for u, d, n in zip(units, durations, lengths)]
        lengths = torch.tensor([len(r) for r in rows], device=units.device)
        audio = batch.wave_lengths // (SAMPLE_RATE // self.hparams.unit_rate)
        worst = int((lengths - audio).abs().argmax())
        if abs(int(lengths[worst]) - int(audio[worst])) > 2 * self.hparams.unit_rate // VIDEO_FPS:
            raise ValueError(
                f"{batch.keys[worst]}: units x durations give {int(lengths[worst])} frames but the audio has "
                f"{int(audio[worst])} (de-duplicated units need uncropped samples: max_sample_frames null)"
            )
        frames = units.new_full((len(rows), int(lengths.max())), PAD_UNIT)
        for row, values in enumerate(rows):
            frames[row, : len(values)] = values
        return frames, lengths

    def speaker_embedding(self, batch: AVBatch) -> Tensor | None:
        """The speaker vectors ``[B, condition_dim]`` of the batch's utterances (None without speaker conditioning):
        the embedding of their speaker, then with ``voice_mels`` the mean voice Mels of their own speech."""
        embedding = self._embedding(batch)
        if not self.config.voice_mels:
            return embedding
        voices = torch.stack([mean_voice_mels(w[: int(n)]) for w, n in zip(batch.wave, batch.wave_lengths)])
        return voices if embedding is None else torch.cat([embedding, voices], dim=1)

    def _embedding(self, batch: AVBatch) -> Tensor | None:
        if self.speaker_encoder is not None:
            self.speaker_encoder.eval()
            with torch.no_grad():
                return self.speaker_encoder.embed_batch(batch.wave, batch.wave_lengths)
        if self.speaker_table is not None:
            index = {speaker: i for i, speaker in enumerate(self.speakers)}
            unknown = sorted({m.speaker for m in batch.meta} - set(index))
            if unknown:
                raise ValueError(f"speaker(s) {unknown} are not in the vocoder's speaker table of {len(index)}")
            ids = torch.tensor([index[m.speaker] for m in batch.meta], device=self.device)
            return self.speaker_table(ids)
        return None

    def segments(self, units: Tensor, lengths: Tensor, wave: Tensor) -> tuple[Tensor, Tensor]:
        """Random aligned crops: units ``[B, n]`` and wave ``[B, 320 n]``, ``n = min(segment_units, lengths)``."""
        size = int(min(self.hparams.segment_units, int(lengths.min())))
        starts = [int(torch.randint(0, int(n) - size + 1, ())) for n in lengths]
        seg_units = torch.stack([u[s : s + size] for u, s in zip(units, starts)])
        seg_wave = torch.stack([w[s * SAMPLES_PER_UNIT : (s + size) * SAMPLES_PER_UNIT] for w, s in zip(wave, starts)])
        return seg_units, seg_wave

    def duration_loss(self, units: Tensor, lengths: Tensor) -> Tensor:
        """MSE between predicted and true ``log(1 + d)`` over the deduplicated units."""
        dedup, durations = duration_targets(units, lengths)
        predicted = self.model.log_durations(dedup)
        valid = dedup != PAD_UNIT
        return F.mse_loss(predicted[valid], torch.log1p(durations[valid].float()))

    # -- training

    def training_step(self, batch: AVBatch, batch_idx: int) -> None:
        units, lengths = self.unit_stream(batch)
        speaker = self.speaker_embedding(batch)
        if self.config.voice_mels:  # the running mean over training batches: the voice of inputs without speech
            voices = speaker[:, -N_MELS:].mean(dim=0)
            self.model.average_voice.lerp_(voices, 1.0 / (self.global_step + 1))
        duration = self.duration_loss(units, lengths)
        loss_g = self.hparams.duration_weight * duration
        logs = {"train/duration_mse": duration}
        (optimizer, scheduler), discriminator_step = self.optimiser_pairs()
        if discriminator_step is None:  # no generator: the context reads whole utterances (an LSTM costs little)
            context_units, context_wave = units, batch.wave[:, : units.shape[1] * SAMPLES_PER_UNIT]
        else:
            context_units, context_wave = self.segments(units, lengths, batch.wave)
            use_gan = scheduler.last_epoch >= self.hparams.gan_start_step
            gan_step = discriminator_step if use_gan else None
            loss_g = loss_g + self.generator_loss(context_units, speaker, context_wave, gan_step, logs)
        if self.model.context is not None:
            context_mel = self.context_mel_loss(context_units, speaker, context_wave)
            loss_g = loss_g + self.hparams.context_mel_weight * context_mel
            logs["train/context_mel_l1"] = context_mel
        manual_step(self, optimizer, scheduler, loss_g)
        logs["train/loss_g"] = loss_g
        self.log_dict(logs, prog_bar=True, batch_size=len(batch))

    def context_mel_loss(self, units: Tensor, speaker: Tensor | None, wave: Tensor) -> Tensor:
        """L1 between the unit context's Mels and those of the speech, over the frames of real units."""
        predicted = self.model.mels(units, speaker)
        real = vocoder_mels(wave)[:, : predicted.shape[1]]
        valid = (units >= 0).repeat_interleave(MELS_PER_UNIT, dim=1)
        return (predicted - real).abs()[valid].mean()

    def optimiser_pairs(self) -> tuple[tuple, tuple | None]:
        """(optimiser, schedule) of the generator side, and of the discriminator (None without one)."""
        optimizers, schedulers = self.optimizers(), self.lr_schedulers()
        if self.discriminator is None:
            return (optimizers, schedulers), None
        return (optimizers[0], schedulers[0]), (optimizers[1], schedulers[1])

    def generator_loss(
        self, units: Tensor, speaker: Tensor | None, real: Tensor, gan_step: tuple | None, logs: dict
    ) -> Tensor:
        """The generator's speech terms; with the GAN on (``gan_step``: the discriminator's optimiser and schedule),
        a discriminator step first."""
        fake = self.model(units, speaker)
        if gan_step is not None:
            real_scores, _ = self.discriminator(real)
            fake_scores, _ = self.discriminator(fake.detach())
            loss_d = discriminator_loss(real_scores, fake_scores)
            manual_step(self, *gan_step, loss_d)
            logs["train/loss_d"] = loss_d
        mel = F.l1_loss(vocoder_mels(fake), vocoder_mels(real))
        logs["train/mel_l1"] = mel
        loss = self.hparams.mel_weight * mel
        if gan_step is not None:
            fake_scores, fake_features = self.discriminator(fake)
            with torch.no_grad():
                _, real_features = self.discriminator(real)
            adversarial = generator_adversarial_loss(fake_scores)
            matching = feature_matching_loss(real_features, fake_features)
            loss = loss + adversarial + self.hparams.fm_weight * matching
            logs.update({"train/adversarial": adversarial, "train/feature_matching": matching})
        return loss

    # -- validation

    def validation_step(self, batch: AVBatch, batch_idx: int) -> None:
        """Resynthesis of whole utterances from their true units: mel L1, duration MSE, STOI/ESTOI/PESQ, audio."""
        units, lengths = self.unit_stream(batch)
        speaker = self.speaker_embedding(batch)
        fake = self.model(units, speaker)
        preds = [f[: int(n) * SAMPLES_PER_UNIT] for f, n in zip(fake, lengths)]
        refs = [w[: int(n) * SAMPLES_PER_UNIT] for w, n in zip(batch.wave, lengths)]
        mel = torch.stack([F.l1_loss(vocoder_mels(p), vocoder_mels(r)) for p, r in zip(preds, refs)]).mean()
        self.log("val/mel_l1", mel, prog_bar=True, batch_size=len(batch), sync_dist=True)
        self.log("val/duration_mse", self.duration_loss(units, lengths), batch_size=len(batch), sync_dist=True)
        if self.model.context is not None:
            context_mel = self.context_mel_loss(units, speaker, batch.wave[:, : units.shape[1] * SAMPLES_PER_UNIT])
            self.log("val/context_mel_l1", context_mel, batch_size=len(batch), sync_dist=True)
        for metric in self.speech_metrics:
            metric.update(preds, refs)
        if batch_idx == 0:
            count = self.hparams.val_audio_samples
            rows = [{"key": k, "generated": p, "reference": r} for k, p, r in zip(batch.keys, preds, refs)]
            log_media_table(self.trainer, "val/audio", rows[:count])

    def on_validation_epoch_end(self) -> None:
        for metric in self.speech_metrics:
            self.log_dict({f"val/{k}": float(v) for k, v in metric.compute().items()})
            metric.reset()

    def configure_optimizers(self) -> tuple[list, list]:
        generator = nn.ModuleList([self.model] + ([self.speaker_table] if self.speaker_table is not None else []))
        trained = [generator] + ([self.discriminator] if self.discriminator is not None else [])
        configured = [stage_optimizer(self, module, eps=1e-9) for module in trained]
        return [c["optimizer"] for c in configured], [c["lr_scheduler"]["scheduler"] for c in configured]


def load_unit_vocoder(path: str | Path) -> UnitHiFiGAN:
    """The generator (with duration predictor) of a `UnitVocoder` checkpoint, in eval mode."""
    return load_stage_model(path, STAGE, lambda c: UnitHiFiGAN(UnitHiFiGANConfig(**c["vocoder_config"])))
