"""Speaker encoder training with the GE2E softmax loss, validated by the equal error rate on unseen speakers.

GE2E needs batches of N speakers x M utterances, but the shared datamodule yields frame-budget batches of
whatever utterances come along. `SpeakerEncoderTraining` therefore keeps a small bank of recent Mel
spectrograms per speaker (inputs, not embeddings: every step re-encodes them with the current weights) and
draws each GE2E batch from it; a step is skipped until at least two speakers have M utterances banked.
With ``speed_perturb`` every utterance is also banked sped up or slowed down (pitch, formants and rate
together) under a new pseudo-speaker: ten corpus voices are too few for the embedding to place voices it has never
heard, and each factor adds as many voices again (speaker augmentation, Yamamoto et al. 2019).
The bank and its sampler's state are saved in checkpoints, so a resumed run draws what the interrupted one would
have (under DDP the checkpoint holds rank 0's bank, which every rank then resumes from).

Under DDP every rank banks its own batches. Lightning cannot skip a step there (DDP all-reduces gradients in every
rank's backward), so until every rank can draw a GE2E batch all ranks take a zero-gradient step instead: Adam's
moments are still zero before the first real step, so without weight decay (the default) the weights do not move.
The validation EER is
computed on every rank over the embeddings of all ranks.
"""

from __future__ import annotations

import random
from collections import deque
from dataclasses import asdict
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from lightning.pytorch.utilities import rank_zero_warn
from sklearn.metrics import roc_curve
from torch import Tensor, nn

from av2av_lightning.checkpoints import STAGE_KEY, load_stage_model
from av2av_lightning.data.batching import AVBatch
from av2av_lightning.data.codecs import resample
from av2av_lightning.data.schema import SAMPLE_RATE
from av2av_lightning.models.speaker_encoder import SpeakerEncoder, SpeakerEncoderConfig, speaker_mels
from av2av_lightning.optim import stage_optimizer

STAGE = "speaker_encoder"


def ge2e_similarity(embeddings: Tensor, w: Tensor, b: Tensor) -> Tensor:
    """Scaled cosine similarities ``[N, M, N]`` of each utterance ``[N, M, D]`` to each speaker centroid.

    An utterance is compared with its own speaker's centroid computed *without* it (Wan et al. 2018, eq. 8).
    """
    n, m, _ = embeddings.shape
    if m < 2:
        raise ValueError(f"GE2E needs at least 2 utterances per speaker, got {m}")
    centroids = embeddings.mean(1)
    exclusive = (embeddings.sum(1, keepdim=True) - embeddings) / (m - 1)
    to_centroids = F.cosine_similarity(embeddings[:, :, None], centroids[None, None], dim=-1, eps=1e-8)
    to_own = F.cosine_similarity(embeddings, exclusive, dim=-1, eps=1e-8)
    own = torch.eye(n, dtype=torch.bool, device=embeddings.device)[:, None, :]
    return w * torch.where(own, to_own[..., None], to_centroids) + b


def ge2e_loss(similarity: Tensor) -> Tensor:
    """GE2E softmax loss: mean over utterances of ``-S[j,i,j] + log sum_k exp S[j,i,k]``."""
    n, m, _ = similarity.shape
    target = torch.arange(n, device=similarity.device).repeat_interleave(m)
    return F.cross_entropy(similarity.reshape(n * m, n), target)


def equal_error_rate(scores: np.ndarray, same: np.ndarray) -> float:
    """The operating point where false acceptances equal false rejections (interpolated at the ROC crossing)."""
    same = np.asarray(same, dtype=bool)
    if same.all() or not same.any():
        raise ValueError("the equal error rate needs both same-speaker and different-speaker pairs")
    fpr, tpr, _ = roc_curve(same, scores)
    fnr = 1.0 - tpr
    i = int(np.argmin(np.abs(fnr - fpr)))
    return float((fpr[i] + fnr[i]) / 2)


def pairwise_eer(embeddings: Tensor, speakers: list[str]) -> float:
    """EER over all utterance pairs, scored by cosine similarity of their embeddings."""
    embeddings = F.normalize(embeddings.double(), dim=-1)
    first, second = torch.triu_indices(len(speakers), len(speakers), offset=1)
    scores = (embeddings[first] * embeddings[second]).sum(-1).numpy()
    ids = np.array(speakers)
    return equal_error_rate(scores, ids[first.numpy()] == ids[second.numpy()])


def gather_objects(value: Any) -> list[Any]:
    """Every rank's ``value`` in rank order (``[value]`` without an initialised process group)."""
    if not (dist.is_available() and dist.is_initialized()):
        return [value]
    gathered: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, value)
    return gathered


class SpeakerEncoderTraining(L.LightningModule):
    """GE2E training of `SpeakerEncoder` over the shared datamodule's batches.

    Args:
        preset: ``tiny`` or ``published`` (`SpeakerEncoderConfig.preset`).
        encoder: overrides of preset fields.
        speakers_per_batch, utterances_per_speaker: N and M of a GE2E batch (fewer speakers while the bank fills).
        bank_size: Mel spectrograms kept per speaker.
        train_frames: length of the random crop of every utterance in a GE2E batch (cut to the shortest
            banked utterance of the batch when that is shorter).
        init_w, init_b: initial scale and offset of the similarity (the paper's 10 and -5).
        lr, warmup_steps, total_steps, weight_decay: AdamW with warm-up and polynomial decay (`optim.py`).
        speed_perturb: speed factors (e.g. ``[0.9, 1.1]``); each banks a resampled copy of every utterance as a
            pseudo-speaker of its own.
        seed: the bank's sampling seed.
    """

    def __init__(
        self,
        preset: str = "tiny",
        encoder: dict[str, Any] | None = None,
        speakers_per_batch: int = 8,
        utterances_per_speaker: int = 4,
        bank_size: int = 16,
        train_frames: int = 160,
        init_w: float = 10.0,
        init_b: float = -5.0,
        lr: float = 1e-3,
        warmup_steps: int = 100,
        total_steps: int | None = None,
        weight_decay: float = 0.0,
        speed_perturb: tuple[float, ...] = (),
        seed: int = 0,
    ) -> None:
        super().__init__()
        if speakers_per_batch < 2 or utterances_per_speaker < 2:
            raise ValueError(
                f"GE2E needs >= 2 speakers x >= 2 utterances, got {speakers_per_batch} x {utterances_per_speaker}"
            )
        if any(not 0.5 <= factor <= 2.0 or factor == 1.0 for factor in speed_perturb):
            raise ValueError(f"speed_perturb factors must lie in [0.5, 2] and differ from 1, got {list(speed_perturb)}")
        if bank_size < utterances_per_speaker:
            raise ValueError(f"bank_size {bank_size} is smaller than utterances_per_speaker {utterances_per_speaker}")
        self.save_hyperparameters()
        self.config = SpeakerEncoderConfig.preset(preset, **(encoder or {}))
        self.model = SpeakerEncoder(self.config)
        self.w = nn.Parameter(torch.tensor(float(init_w)))
        self.b = nn.Parameter(torch.tensor(float(init_b)))
        self.bank: dict[str, deque[Tensor]] = {}
        self.rng = random.Random(seed)
        self._val_embeddings: list[Tensor] = []
        self._val_speakers: list[str] = []

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        checkpoint[STAGE_KEY] = STAGE
        checkpoint["speaker_encoder_config"] = asdict(self.config)
        checkpoint["ge2e_bank"] = {speaker: list(mels) for speaker, mels in self.bank.items()}
        checkpoint["ge2e_rng"] = self.rng.getstate()

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        """A resumed run draws its GE2E batches from the bank and sampler state of the interrupted one."""
        size = self.hparams.bank_size
        self.bank = {speaker: deque(mels, maxlen=size) for speaker, mels in checkpoint.get("ge2e_bank", {}).items()}
        if "ge2e_rng" in checkpoint:
            version, state, gauss = checkpoint["ge2e_rng"]
            self.rng.setstate((version, tuple(state), gauss))

    def remember(self, batch: AVBatch) -> None:
        """Add the batch's utterances (their Mels, on the CPU) to the per-speaker bank, with their speed-perturbed
        copies under pseudo-speakers ``spk03@1.1``."""
        with torch.no_grad():
            for wave, length, meta in zip(batch.wave, batch.wave_lengths, batch.meta):
                wave = wave[: int(length)]
                self._bank(meta.speaker).append(speaker_mels(wave).cpu())
                for factor in self.hparams.speed_perturb:
                    faster = resample(wave.float().cpu().numpy(), round(SAMPLE_RATE * factor), SAMPLE_RATE)
                    mels = speaker_mels(torch.from_numpy(faster).to(wave.device))
                    self._bank(f"{meta.speaker}@{factor:g}").append(mels.cpu())

    def _bank(self, speaker: str) -> deque[Tensor]:
        return self.bank.setdefault(speaker, deque(maxlen=self.hparams.bank_size))

    def ge2e_batch(self) -> Tensor | None:
        """Mels ``[N, M, F, n_mels]`` drawn from the bank, or None while fewer than two speakers qualify."""
        m = self.hparams.utterances_per_speaker
        eligible = sorted(s for s, mels in self.bank.items() if len(mels) >= m)
        if len(eligible) < 2:
            return None
        speakers = self.rng.sample(eligible, min(self.hparams.speakers_per_batch, len(eligible)))
        chosen = [self.rng.sample(list(self.bank[s]), m) for s in speakers]
        frames = min(self.hparams.train_frames, *(len(mels) for group in chosen for mels in group))
        crops = []
        for group in chosen:
            for mels in group:
                start = self.rng.randrange(len(mels) - frames + 1)
                crops.append(mels[start : start + frames])
        return torch.stack(crops).view(len(speakers), m, frames, -1).to(self.device)

    def training_step(self, batch: AVBatch, batch_idx: int) -> Tensor | None:
        self.remember(batch)
        mels = self.ge2e_batch()
        if not self.trainer.strategy.reduce_boolean_decision(mels is not None, all=True):
            if self.trainer.world_size == 1:
                return None  # the bank is still filling: Lightning skips the step
            return sum(p.sum() for p in self.parameters()) * 0.0  # a bank fills here or on another rank
        n, m = mels.shape[:2]
        embeddings = self.model(mels.flatten(0, 1)).view(n, m, -1)
        loss = ge2e_loss(ge2e_similarity(embeddings, self.w.clamp(min=1e-6), self.b))
        self.log_dict({"train/loss": loss, "train/w": self.w, "train/speakers": float(n)}, prog_bar=True, batch_size=n)
        return loss

    def on_validation_epoch_start(self) -> None:
        self._val_embeddings, self._val_speakers = [], []

    def validation_step(self, batch: AVBatch, batch_idx: int) -> None:
        self._val_embeddings.append(self.model.embed_batch(batch.wave, batch.wave_lengths).cpu())
        self._val_speakers.extend(meta.speaker for meta in batch.meta)

    def on_validation_epoch_end(self) -> None:
        """EER over all pairs of validation utterances, gathered from every rank (pairs span ranks, so no rank's
        share or mean of shares gives it); every rank computes the same value."""
        local = torch.cat(self._val_embeddings) if self._val_embeddings else torch.empty(0, self.model.embed_dim)
        shares = gather_objects((local, self._val_speakers))
        speakers = [speaker for _, names in shares for speaker in names]
        if len(set(speakers)) < 2:
            rank_zero_warn("speaker EER skipped: the validation data has fewer than 2 speakers")
            return
        eer = pairwise_eer(torch.cat([embeddings for embeddings, _ in shares]), speakers)
        self.log("val/eer", eer, prog_bar=True)

    def configure_optimizers(self) -> dict:
        return stage_optimizer(self, self, betas=(0.9, 0.999), eps=1e-8)  # GE2E: plain Adam settings


def load_speaker_encoder(path: str | Path) -> SpeakerEncoder:
    """The encoder of a `SpeakerEncoderTraining` checkpoint, in eval mode."""
    return load_stage_model(path, STAGE, lambda c: SpeakerEncoder(SpeakerEncoderConfig(**c["speaker_encoder_config"])))
