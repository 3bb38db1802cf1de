"""GE2E speaker encoder: an LSTM over 40 log Mels that maps speech to a unit-norm 256-d speaker embedding.

Used two ways: the vocoder is conditioned on the embedding of the source speaker (zero-shot voice), and
`SpeakerSimilarity` compares the embeddings of generated and reference speech. Long utterances are embedded
as the renormalised mean over 160-frame (1.6 s) partial windows at 50% overlap, so the embedding does not
depend on how long the utterance is.
"""

from __future__ import annotations

from dataclasses import dataclass, fields

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from av2av_lightning.data.features import log_mel_spectrogram

MEL_HOP = 160  # 10 ms at 16 kHz
MEL_WIN = 400  # 25 ms


@dataclass
class SpeakerEncoderConfig:
    """Architecture and framing; `preset` gives ``tiny`` (CPU tests, demo) and ``published`` (GE2E)."""

    n_mels: int = 40
    hidden_dim: int = 256
    layers: int = 3
    embed_dim: int = 256
    partial_frames: int = 160
    partial_overlap: float = 0.5

    @classmethod
    def preset(cls, name: str, **overrides) -> SpeakerEncoderConfig:
        if name not in SPEAKER_ENCODER_PRESETS:
            raise ValueError(f"unknown speaker encoder preset {name!r} (use {', '.join(SPEAKER_ENCODER_PRESETS)})")
        unknown = set(overrides) - {f.name for f in fields(cls)}
        if unknown:
            raise ValueError(f"unknown speaker encoder option(s) {sorted(unknown)}")
        return cls(**{**SPEAKER_ENCODER_PRESETS[name], **overrides})


SPEAKER_ENCODER_PRESETS: dict[str, dict] = {
    "tiny": {"hidden_dim": 64, "embed_dim": 64},
    "published": {},
}


def speaker_mels(wave: Tensor) -> Tensor:
    """Log Mel energies for the encoder: ``[S] -> [F, 40]`` or ``[B, S] -> [B, F, 40]`` (25 ms / 10 ms, power)."""
    return log_mel_spectrogram(
        wave, n_fft=512, win_length=MEL_WIN, hop_length=MEL_HOP, n_mels=40, power=2.0, log_floor=1e-6
    )


def mel_frames(num_samples: int) -> int:
    """Frames `speaker_mels` gives for ``num_samples`` samples (centred STFT)."""
    return num_samples // MEL_HOP + 1


def partial_starts(num_frames: int, window: int, overlap: float) -> list[int]:
    """Start frames of the partial windows covering ``num_frames``; the last one is aligned to the end."""
    if num_frames <= window:
        return [0]
    hop = max(1, int(round(window * (1.0 - overlap))))
    starts = list(range(0, num_frames - window + 1, hop))
    if starts[-1] + window < num_frames:
        starts.append(num_frames - window)
    return starts


class SpeakerEncoder(nn.Module):
    """LSTM -> last hidden state -> Linear -> ReLU -> L2 norm (Wan et al. 2018, GE2E)."""

    def __init__(self, config: SpeakerEncoderConfig | None = None) -> None:
        super().__init__()
        self.config = config or SpeakerEncoderConfig()
        c = self.config
        self.lstm = nn.LSTM(c.n_mels, c.hidden_dim, num_layers=c.layers, batch_first=True)
        self.proj = nn.Linear(c.hidden_dim, c.embed_dim)

    @property
    def embed_dim(self) -> int:
        return self.config.embed_dim

    def forward(self, mels: Tensor) -> Tensor:
        """Embeddings ``[N, D]`` of equally long Mel segments ``[N, F, n_mels]``."""
        if mels.dim() != 3 or mels.shape[-1] != self.config.n_mels:
            raise ValueError(f"expected Mels [N, F, {self.config.n_mels}], got shape {tuple(mels.shape)}")
        _, (hidden, _) = self.lstm(mels)
        return F.normalize(F.relu(self.proj(hidden[-1])), dim=-1, eps=1e-8)

    def embed_mels(self, mels: Tensor) -> Tensor:
        """One utterance's embedding ``[D]`` from its Mels ``[F, n_mels]``: partial windows averaged, renormalised."""
        window = self.config.partial_frames
        starts = partial_starts(mels.shape[0], window, self.config.partial_overlap)
        partials = torch.stack([mels[s : s + window] for s in starts])
        return F.normalize(self(partials).mean(0), dim=-1, eps=1e-8)

    def embed_utterance(self, wave: Tensor) -> Tensor:
        """Embedding ``[D]`` of one 16 kHz utterance ``[S]``."""
        if wave.dim() != 1:
            raise ValueError(f"embed_utterance takes one wave [S], got shape {tuple(wave.shape)}")
        return self.embed_mels(speaker_mels(wave))

    def embed_batch(self, wave: Tensor, lengths: Tensor) -> Tensor:
        """Embeddings ``[B, D]`` of a zero-padded batch ``[B, S]`` with valid samples ``lengths``."""
        return torch.stack([self.embed_utterance(w[: int(n)]) for w, n in zip(wave, lengths)])
