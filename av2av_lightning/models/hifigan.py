"""Unit HiFi-GAN: discrete 50 Hz speech units plus a speaker embedding in, 16 kHz speech out.

The generator embeds each unit, concatenates a projection of the speaker embedding to every frame, and
upsamples x320 (``5*4*4*2*2``) through transposed convolutions, each followed by a multi-receptive-field
fusion of residual blocks (Kong et al. 2020; Polyak et al. 2021 for units). A duration predictor on
deduplicated units predicts ``log(1 + d)``, so translated units, which arrive deduplicated, get their
lengths back at inference. The discriminators (multi-period and multi-scale) only serve training.

Units of a small or briefly trained encoder say less per frame than the published ones: with ``context_layers``
a bidirectional LSTM reads the embedded units and speaker across the utterance and predicts the speech's Mels
(`UnitContext`); the generator then starts from its features. ``synthesis: griffin_lim`` skips the generator and
speaks the predicted Mels through Griffin-Lim (`mel_spectrum.griffin_lim`): no GAN to train, for CPU-minute budgets.

A speaker embedding trained on ten voices places a new voice poorly, so a vocoder conditioned on it alone speaks
unseen speakers in a voice near one it knows. With ``voice_mels`` the speaker vector also carries the mean log-Mels
of the speaker's own speech (`mean_voice_mels`), and the context predicts the Mels *around* that mean: the spectral
envelope of any voice, heard or not, is added to the output rather than inferred from an embedding. On the demo
it gave resynthesised speech held-out voices but made translated units less intelligible (experiments/demo/vocoder.yaml).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, fields

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.utils.parametrizations import weight_norm

from av2av_lightning.models.mel_spectrum import MELS_PER_UNIT, N_MELS, griffin_lim

SAMPLES_PER_UNIT = 320  # 50 Hz units at 16 kHz
LRELU_SLOPE = 0.1
SYNTHESES = ("generator", "griffin_lim")


@dataclass
class UnitHiFiGANConfig:
    """Generator and duration-predictor sizes; presets ``tiny`` and ``published`` (AV2AV's unit vocoder)."""

    num_units: int = 1000
    unit_dim: int = 128
    speaker_dim: int = 256  # input speaker embedding (0: no speaker conditioning)
    speaker_proj_dim: int = 128
    initial_channels: int = 512
    upsample_rates: list[int] = field(default_factory=lambda: [5, 4, 4, 2, 2])
    upsample_kernels: list[int] = field(default_factory=lambda: [11, 8, 8, 4, 4])
    resblock_kernels: list[int] = field(default_factory=lambda: [3, 7, 11])
    resblock_dilations: list[int] = field(default_factory=lambda: [1, 3, 5])
    duration_hidden: int = 128
    duration_kernel: int = 3
    duration_dropout: float = 0.5
    discriminator_width: float = 1.0  # channel multiplier of both discriminators
    context_layers: int = 0  # bidirectional LSTM layers over the units before the generator (0: published)
    context_hidden: int = 128  # per direction
    synthesis: str = "generator"  # or "griffin_lim": the context's Mels through Griffin-Lim (needs context_layers)
    voice_mels: bool = False  # the speaker vector ends with the speech's mean log-Mels, added to the predicted Mels

    @property
    def condition_dim(self) -> int:
        """Width of the speaker vector: the embedding, then the mean voice Mels with ``voice_mels``."""
        return self.speaker_dim + (N_MELS if self.voice_mels else 0)

    @classmethod
    def preset(cls, name: str, **overrides) -> UnitHiFiGANConfig:
        if name not in HIFIGAN_PRESETS:
            raise ValueError(f"unknown unit HiFi-GAN preset {name!r} (use {', '.join(HIFIGAN_PRESETS)})")
        unknown = set(overrides) - {f.name for f in fields(cls)}
        if unknown:
            raise ValueError(f"unknown unit HiFi-GAN option(s) {sorted(unknown)}")
        config = cls(**{**HIFIGAN_PRESETS[name], **overrides})
        if math.prod(config.upsample_rates) != SAMPLES_PER_UNIT:
            raise ValueError(f"upsample_rates {config.upsample_rates} must multiply to {SAMPLES_PER_UNIT}")
        if len(config.upsample_kernels) != len(config.upsample_rates):
            raise ValueError("upsample_kernels and upsample_rates must have the same length")
        if config.synthesis not in SYNTHESES:
            raise ValueError(f"unknown synthesis {config.synthesis!r}; expected one of {', '.join(SYNTHESES)}")
        if config.synthesis == "griffin_lim" and not config.context_layers:
            raise ValueError("synthesis griffin_lim speaks the Mels the unit context predicts: set context_layers > 0")
        if config.voice_mels and config.synthesis != "griffin_lim":
            raise ValueError("voice_mels shapes the Mels that Griffin-Lim speaks: set synthesis griffin_lim")
        return config


HIFIGAN_PRESETS: dict[str, dict] = {
    "tiny": {
        "num_units": 100,
        "unit_dim": 32,
        "speaker_dim": 64,
        "speaker_proj_dim": 16,
        "initial_channels": 64,
        "duration_hidden": 32,
        "discriminator_width": 1 / 16,
    },
    "published": {},
}


# ---------------------------------------------------------------------------- durations


def deduplicate(units: Tensor) -> tuple[Tensor, Tensor]:
    """Consecutive repeats removed: ``[T] -> (units [U], durations [U])``."""
    unique, counts = torch.unique_consecutive(units, return_counts=True)
    return unique, counts


def expand(units: Tensor, durations: Tensor) -> Tensor:
    """Each unit repeated by its duration: the inverse of `deduplicate`."""
    return torch.repeat_interleave(units, durations.to(torch.long))


def durations_from_log(log_durations: Tensor) -> Tensor:
    """Frames per unit from predicted ``log(1 + d)``: ``clamp(round(exp(p) - 1), min=1)``."""
    return torch.clamp(torch.round(torch.exp(log_durations) - 1), min=1).long()


def unit_lengths(units: Tensor) -> Tensor:
    """Real units per row of ``[B, T]`` (padding, negative ids, only at the end)."""
    return (units >= 0).sum(dim=1)


class DurationPredictor(nn.Module):
    """Two (conv -> ReLU -> LayerNorm -> dropout) layers and a linear head: ``[B, U, C] -> log(1 + d) [B, U]``."""

    def __init__(self, in_dim: int, hidden: int, kernel: int, dropout: float) -> None:
        super().__init__()
        self.convs = nn.ModuleList(
            [
                nn.Conv1d(in_dim, hidden, kernel, padding=kernel // 2),
                nn.Conv1d(hidden, hidden, kernel, padding=kernel // 2),
            ]
        )
        self.norms = nn.ModuleList([nn.LayerNorm(hidden), nn.LayerNorm(hidden)])
        self.dropout = nn.Dropout(dropout)
        self.head = nn.Linear(hidden, 1)

    def forward(self, x: Tensor) -> Tensor:
        for conv, norm in zip(self.convs, self.norms):
            x = self.dropout(norm(F.relu(conv(x.transpose(1, 2)).transpose(1, 2))))
        return self.head(x).squeeze(-1)


# ---------------------------------------------------------------------------- generator


class ResBlock(nn.Module):
    """Pairs of (dilated conv, plain conv) with LeakyReLU and a residual connection per pair."""

    def __init__(self, channels: int, kernel: int, dilations: list[int]) -> None:
        super().__init__()
        self.dilated = nn.ModuleList(
            [
                weight_norm(nn.Conv1d(channels, channels, kernel, dilation=d, padding=d * (kernel - 1) // 2))
                for d in dilations
            ]
        )
        self.plain = nn.ModuleList(
            [weight_norm(nn.Conv1d(channels, channels, kernel, padding=(kernel - 1) // 2)) for _ in dilations]
        )

    def forward(self, x: Tensor) -> Tensor:
        for dilated, plain in zip(self.dilated, self.plain):
            x = x + plain(F.leaky_relu(dilated(F.leaky_relu(x, LRELU_SLOPE)), LRELU_SLOPE))
        return x


class HiFiGANGenerator(nn.Module):
    """Frames ``[B, C_in, T]`` -> wave ``[B, T * prod(upsample_rates)]`` in [-1, 1]."""

    def __init__(self, in_channels: int, config: UnitHiFiGANConfig) -> None:
        super().__init__()
        channels = config.initial_channels
        self.pre = weight_norm(nn.Conv1d(in_channels, channels, 7, padding=3))
        self.ups = nn.ModuleList()
        self.mrfs = nn.ModuleList()
        for rate, kernel in zip(config.upsample_rates, config.upsample_kernels):
            if (kernel - rate) % 2:
                raise ValueError(f"upsample kernel {kernel} and rate {rate} must differ by an even number")
            self.ups.append(
                weight_norm(nn.ConvTranspose1d(channels, channels // 2, kernel, rate, padding=(kernel - rate) // 2))
            )
            channels //= 2
            self.mrfs.append(
                nn.ModuleList([ResBlock(channels, k, config.resblock_dilations) for k in config.resblock_kernels])
            )
        self.post = weight_norm(nn.Conv1d(channels, 1, 7, padding=3))

    def forward(self, x: Tensor) -> Tensor:
        x = self.pre(x)
        for up, mrf in zip(self.ups, self.mrfs):
            x = up(F.leaky_relu(x, LRELU_SLOPE))
            x = sum(block(x) for block in mrf) / len(mrf)
        return torch.tanh(self.post(F.leaky_relu(x))).squeeze(1)


class UnitContext(nn.Module):
    """A bidirectional LSTM over the conditioned unit frames and a linear Mel head:
    ``[B, T, C], lengths [B] -> (features [B, T, 2 x hidden], log-Mels [B, 2 T, 80])``. Rows are packed to their
    lengths, so padding never reaches the backward direction: a batch gives what its rows give one by one."""

    def __init__(self, in_dim: int, hidden: int, layers: int) -> None:
        super().__init__()
        self.lstm = nn.LSTM(in_dim, hidden, num_layers=layers, batch_first=True, bidirectional=True)
        self.mels = nn.Linear(2 * hidden, MELS_PER_UNIT * N_MELS)

    @property
    def out_dim(self) -> int:
        return 2 * self.lstm.hidden_size

    def forward(self, x: Tensor, lengths: Tensor) -> tuple[Tensor, Tensor]:
        packed = nn.utils.rnn.pack_padded_sequence(
            x, lengths.clamp(min=1).cpu(), batch_first=True, enforce_sorted=False
        )
        features, _ = nn.utils.rnn.pad_packed_sequence(self.lstm(packed)[0], batch_first=True, total_length=x.shape[1])
        return features, self.mels(features).reshape(x.shape[0], -1, N_MELS)


class UnitHiFiGAN(nn.Module):
    """Unit embedding + speaker projection (+ unit context) -> HiFi-GAN generator; plus the duration predictor.

    ``forward(units [B, T], speaker [B, condition_dim] or None) -> wave [B, 320 * T]``; padding units
    (negative ids) become zeros in the output. Without a speaker vector the embedding is zeros and, with
    ``voice_mels``, the voice is ``average_voice``: the mean voice Mels of the speech the vocoder trained on.
    """

    def __init__(self, config: UnitHiFiGANConfig | None = None) -> None:
        super().__init__()
        self.config = c = config or UnitHiFiGANConfig()
        self.units = nn.Embedding(c.num_units, c.unit_dim)
        self.speaker_proj = nn.Linear(c.speaker_dim, c.speaker_proj_dim) if c.speaker_dim else None
        frame_dim = c.unit_dim + (c.speaker_proj_dim if c.speaker_dim else 0)
        self.context = UnitContext(frame_dim, c.context_hidden, c.context_layers) if c.context_layers else None
        generator_input = self.context.out_dim if self.context is not None else frame_dim
        self.generator = HiFiGANGenerator(generator_input, c) if c.synthesis == "generator" else None
        self.duration = DurationPredictor(c.unit_dim, c.duration_hidden, c.duration_kernel, c.duration_dropout)
        if c.voice_mels:
            self.register_buffer("average_voice", torch.zeros(N_MELS))

    def embed_units(self, units: Tensor) -> Tensor:
        """``[B, T]`` ids -> ``[B, T, unit_dim]``; negative ids (padding) embed as unit 0, out-of-table ids raise."""
        if units.numel() and int(units.max()) >= self.config.num_units:
            raise ValueError(
                f"unit id {int(units.max())} is outside the vocoder's table of {self.config.num_units} units"
            )
        return self.units(units.clamp(min=0))

    def split_speaker(self, speaker: Tensor | None, batch: int) -> tuple[Tensor | None, Tensor | None]:
        """The speaker vector ``[B, condition_dim]`` as (embedding ``[B, speaker_dim]``, voice Mels ``[B, 80]``),
        each None when the config has no such part; a missing vector gives zeros and the average voice."""
        c = self.config
        if speaker is None:
            embedding = torch.zeros(batch, c.speaker_dim, device=self.units.weight.device)
            voice = self.average_voice.expand(batch, -1) if c.voice_mels else None
        elif speaker.shape != (batch, c.condition_dim):
            raise ValueError(f"speaker vector must be [{batch}, {c.condition_dim}], got {tuple(speaker.shape)}")
        else:
            embedding, voice = speaker[:, : c.speaker_dim], (speaker[:, c.speaker_dim :] if c.voice_mels else None)
        return (embedding if c.speaker_dim else None), voice

    def frames(self, units: Tensor, speaker: Tensor | None) -> Tensor:
        """``[B, T, unit_dim (+ speaker_proj_dim)]``: each unit's embedding with the speaker's projection."""
        x = self.embed_units(units)
        embedding = self.split_speaker(speaker, x.shape[0])[0]
        if embedding is None:
            return x
        return torch.cat([x, self.speaker_proj(embedding)[:, None].expand(-1, x.shape[1], -1)], dim=-1)

    def mels(self, units: Tensor, speaker: Tensor | None = None) -> Tensor:
        """The unit context's predicted log-Mels ``[B, 2 T, 80]`` (the `vocoder_mels` of the speech)."""
        if self.context is None:
            raise ValueError("this vocoder has no unit context to predict Mels (context_layers: 0)")
        mels = self.context(self.frames(units, speaker), unit_lengths(units))[1]
        voice = self.split_speaker(speaker, units.shape[0])[1]
        return mels if voice is None else mels + voice[:, None]

    def forward(self, units: Tensor, speaker: Tensor | None = None) -> Tensor:
        if self.generator is None:
            mels = self.mels(units, speaker)
            wave = torch.stack([griffin_lim(m) for m in mels])
        else:
            x = self.frames(units, speaker)
            if self.context is not None:
                x = self.context(x, unit_lengths(units))[0]
            wave = self.generator(x.transpose(1, 2))
        valid = (units >= 0).repeat_interleave(SAMPLES_PER_UNIT, dim=1)
        return wave * valid.to(wave.dtype)

    def log_durations(self, dedup_units: Tensor) -> Tensor:
        """Predicted ``log(1 + d)`` ``[B, U]`` for deduplicated units ``[B, U]``."""
        return self.duration(self.embed_units(dedup_units))

    @torch.no_grad()
    def synthesize(self, dedup_units: Tensor, speaker: Tensor | None = None, durations: Tensor | None = None) -> Tensor:
        """One utterance: deduplicated units ``[U]`` -> wave ``[320 * sum(durations)]`` (predicted when not given)."""
        if durations is None:
            durations = durations_from_log(self.log_durations(dedup_units[None])[0])
        units = expand(dedup_units, durations)
        return self(units[None], None if speaker is None else speaker[None])[0]


# ---------------------------------------------------------------------------- discriminators


def _width(channels: int, factor: float) -> int:
    return max(4, int(round(channels * factor)))


class PeriodDiscriminator(nn.Module):
    """The wave folded into ``[T / p, p]`` and judged by 2D convolutions along time (one period ``p``)."""

    def __init__(self, period: int, width: float) -> None:
        super().__init__()
        self.period = period
        sizes = [1] + [_width(c, width) for c in (32, 128, 512, 1024, 1024)]
        self.convs = nn.ModuleList(
            weight_norm(nn.Conv2d(cin, cout, (5, 1), (3 if i < 4 else 1, 1), padding=(2, 0)))
            for i, (cin, cout) in enumerate(zip(sizes[:-1], sizes[1:]))
        )
        self.post = weight_norm(nn.Conv2d(sizes[-1], 1, (3, 1), padding=(1, 0)))

    def forward(self, wave: Tensor) -> tuple[Tensor, list[Tensor]]:
        pad = (-wave.shape[-1]) % self.period
        x = F.pad(wave[:, None], (0, pad), mode="reflect" if pad < wave.shape[-1] else "constant")
        x = x.view(x.shape[0], 1, -1, self.period)
        return _score_with_features(self.convs, self.post, x)


def _score_with_features(convs: nn.ModuleList, post: nn.Module, x: Tensor) -> tuple[Tensor, list[Tensor]]:
    """A discriminator's flattened scores and every layer's output (the feature-matching loss compares them)."""
    features = []
    for conv in convs:
        x = F.leaky_relu(conv(x), LRELU_SLOPE)
        features.append(x)
    x = post(x)
    features.append(x)
    return x.flatten(1), features


class ScaleDiscriminator(nn.Module):
    """Grouped 1D convolutions over the wave at one resolution."""

    def __init__(self, width: float) -> None:
        super().__init__()
        layers = [(1, 128, 15, 1, 1), (128, 128, 41, 2, 4), (128, 256, 41, 2, 16), (256, 512, 41, 4, 16)]
        layers += [(512, 1024, 41, 4, 16), (1024, 1024, 41, 1, 16), (1024, 1024, 5, 1, 1)]
        self.convs = nn.ModuleList()
        for cin, cout, kernel, stride, groups in layers:
            cin_w, cout_w = (1 if cin == 1 else _width(cin, width)), _width(cout, width)
            groups = math.gcd(groups, math.gcd(cin_w, cout_w))
            self.convs.append(weight_norm(nn.Conv1d(cin_w, cout_w, kernel, stride, padding=kernel // 2, groups=groups)))
        self.post = weight_norm(nn.Conv1d(_width(1024, width), 1, 3, padding=1))

    def forward(self, wave: Tensor) -> tuple[Tensor, list[Tensor]]:
        x = wave[:, None]
        return _score_with_features(self.convs, self.post, x)


class HiFiGANDiscriminator(nn.Module):
    """Multi-period (2, 3, 5, 7, 11) and multi-scale (the wave, then average-pooled x2 and x4) discriminators together.

    ``forward(wave [B, S]) -> (scores, features)``: one score map and one feature-map list per sub-discriminator.
    """

    def __init__(self, width: float = 1.0, periods: tuple[int, ...] = (2, 3, 5, 7, 11), scales: int = 3) -> None:
        super().__init__()
        self.periods = nn.ModuleList(PeriodDiscriminator(p, width) for p in periods)
        self.scales = nn.ModuleList(ScaleDiscriminator(width) for _ in range(scales))

    def forward(self, wave: Tensor) -> tuple[list[Tensor], list[list[Tensor]]]:
        outputs = [d(wave) for d in self.periods]
        for index, d in enumerate(self.scales):
            if index:  # each further scale halves the rate again
                wave = F.avg_pool1d(wave[:, None], 4, 2, padding=2).squeeze(1)
            outputs.append(d(wave))
        return [score for score, _ in outputs], [features for _, features in outputs]
