"""Audio features in torch: Mel filterbanks, log Mel spectrograms and AV-HuBERT's stacked filterbanks.

AV-HuBERT audio input (one 104-dim vector per 25 fps video frame):

1. pre-emphasis 0.97 (``y[0] = x[0]``, ``y[n] = x[n] - 0.97 x[n-1]``);
2. frames of 25 ms (400 samples) every 10 ms (160 samples) at 16 kHz, starting at sample 0.
   The signal is zero-padded at the end so that a wave of ``S`` samples gives
   ``ceil(S / 160)`` frames: exactly ``4 T`` frames for ``T`` video frames of 640 samples;
3. a Hamming window (default; ``window="povey"`` or ``"rectangular"`` are available — the
   reference's python_speech_features ``logfbank`` uses a rectangular window), a 512-point
   FFT, power spectrum ``|X|^2 / 512``;
4. 26 triangular HTK-Mel filters from 0 Hz to 8 kHz, natural log (energies floored at 1e-10);
5. 4 consecutive 100 Hz frames concatenated -> 104 dims at 25 Hz (a partial last group is
   zero-filled, as the reference's ``stacker`` does);
6. trimmed or zero-padded to the number of video frames;
7. per-frame layer norm over the 104 dims (``F.layer_norm(x, x.shape[1:])`` of the
   reference), without affine parameters. All-zero padding rows stay zero.

Every function takes a single wave ``[S]`` or a batch ``[B, S]`` (with optional
per-utterance lengths); a batch gives the same numbers as its utterances one by one.

`mel_filterbank` and `log_mel_spectrogram` are general (any number of Mels, HTK or Slaney
scale, power or magnitude, centred or not) for the speaker encoder (40 Mels) and vocoder
losses (80 Mels).
"""

from __future__ import annotations

import math
from functools import lru_cache

import torch
import torch.nn.functional as F

from av2av_lightning.data.schema import SAMPLE_RATE, SAMPLES_PER_FRAME

FBANK_MELS = 26
FBANK_WIN = 400  # 25 ms at 16 kHz
FBANK_HOP = 160  # 10 ms at 16 kHz
FBANK_NFFT = 512
PREEMPHASIS = 0.97
STACK = SAMPLES_PER_FRAME // FBANK_HOP  # 4 filterbank frames per video frame
AUDIO_FEATURE_DIM = FBANK_MELS * STACK  # 104
LOG_FLOOR = 1e-10

__all__ = [
    "AUDIO_FEATURE_DIM",
    "audio_features",
    "feature_frames",
    "hz_to_mel",
    "log_fbank",
    "log_mel_spectrogram",
    "mel_filterbank",
    "mel_to_hz",
    "stack_frames",
    "window_function",
]


# ---------------------------------------------------------------------------- Mel scale


def hz_to_mel(freq: torch.Tensor | float, scale: str = "htk") -> torch.Tensor:
    """Hertz -> Mel. ``htk``: 2595 log10(1 + f/700); ``slaney``: linear below 1 kHz, log above."""
    freq = torch.as_tensor(freq, dtype=torch.float64)
    if scale == "htk":
        return 2595.0 * torch.log10(1.0 + freq / 700.0)
    if scale == "slaney":
        linear = freq / (200.0 / 3)
        log_step = math.log(6.4) / 27.0
        return torch.where(freq >= 1000.0, 15.0 + torch.log(freq.clamp_min(1e-12) / 1000.0) / log_step, linear)
    raise ValueError(f"unknown Mel scale {scale!r} (use 'htk' or 'slaney')")


def mel_to_hz(mel: torch.Tensor | float, scale: str = "htk") -> torch.Tensor:
    """Mel -> Hertz, the inverse of `hz_to_mel`."""
    mel = torch.as_tensor(mel, dtype=torch.float64)
    if scale == "htk":
        return 700.0 * (10.0 ** (mel / 2595.0) - 1.0)
    if scale == "slaney":
        log_step = math.log(6.4) / 27.0
        return torch.where(mel >= 15.0, 1000.0 * torch.exp(log_step * (mel - 15.0)), mel * (200.0 / 3))
    raise ValueError(f"unknown Mel scale {scale!r} (use 'htk' or 'slaney')")


@lru_cache(maxsize=32)
@torch.inference_mode(False)  # cached and shared: one made during validation must still serve a training step
def _filterbank(n_mels: int, n_fft: int, sample_rate: int, f_min: float, f_max: float, scale: str, norm: str | None):
    if not 0 <= f_min < f_max <= sample_rate / 2:
        raise ValueError(f"need 0 <= f_min < f_max <= {sample_rate / 2}, got f_min={f_min}, f_max={f_max}")
    mel_points = torch.linspace(
        float(hz_to_mel(f_min, scale)), float(hz_to_mel(f_max, scale)), n_mels + 2, dtype=torch.float64
    )
    hz_points = mel_to_hz(mel_points, scale)
    bins = torch.arange(n_fft // 2 + 1, dtype=torch.float64) * sample_rate / n_fft
    lower, centre, upper = hz_points[:-2, None], hz_points[1:-1, None], hz_points[2:, None]
    rising = (bins[None] - lower) / (centre - lower)
    falling = (upper - bins[None]) / (upper - centre)
    weights = torch.clamp(torch.minimum(rising, falling), min=0.0)
    if norm == "slaney":  # equal area per filter
        weights = weights * (2.0 / (upper - lower))
    elif norm is not None:
        raise ValueError(f"unknown filterbank norm {norm!r} (use None or 'slaney')")
    return weights.float()


def mel_filterbank(
    n_mels: int,
    n_fft: int = FBANK_NFFT,
    sample_rate: int = SAMPLE_RATE,
    f_min: float = 0.0,
    f_max: float | None = None,
    scale: str = "htk",
    norm: str | None = None,
) -> torch.Tensor:
    """Triangular Mel filters ``[n_mels, n_fft // 2 + 1]`` for a power or magnitude spectrum.

    Filter ``m`` rises linearly from the centre frequency of filter ``m-1`` to its own and
    falls to that of ``m+1``; centres are evenly spaced on the Mel scale between ``f_min``
    and ``f_max`` (default Nyquist). ``norm="slaney"`` scales each filter to equal area
    (librosa's default, used by HiFi-GAN). The returned tensor is shared: do not modify it.
    """
    f_max = sample_rate / 2 if f_max is None else f_max
    return _filterbank(int(n_mels), int(n_fft), int(sample_rate), float(f_min), float(f_max), scale, norm)


def window_function(kind: str, length: int, device=None) -> torch.Tensor:
    """Symmetric analysis window: ``hamming``, ``hann``, ``povey`` (Kaldi: hann ** 0.85) or ``rectangular``."""
    if kind == "hamming":
        return torch.hamming_window(length, periodic=False, device=device)
    if kind == "hann":
        return torch.hann_window(length, periodic=False, device=device)
    if kind == "povey":
        return torch.hann_window(length, periodic=False, device=device).pow(0.85)
    if kind in ("rectangular", "none", None):
        return torch.ones(length, device=device)
    raise ValueError(f"unknown window {kind!r} (use hamming, hann, povey or rectangular)")


# ---------------------------------------------------------------------------- spectrograms


def _as_batch(wave: torch.Tensor) -> tuple[torch.Tensor, bool]:
    wave = torch.as_tensor(wave)
    if not wave.is_floating_point():
        wave = wave.float()
    if wave.dim() == 1:
        return wave[None], True
    if wave.dim() != 2:
        raise ValueError(f"expected a wave [S] or a batch [B, S], got shape {tuple(wave.shape)}")
    return wave, False


def _lengths(lengths, batch: int, full: int, device) -> torch.Tensor:
    if lengths is None:
        return torch.full((batch,), full, dtype=torch.long, device=device)
    lengths = torch.as_tensor(lengths, dtype=torch.long, device=device).reshape(-1)
    if lengths.numel() != batch:
        raise ValueError(f"got {lengths.numel()} lengths for a batch of {batch}")
    return lengths.clamp(0, full)


def _mask_beyond(x: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
    """Zero ``x[b, t, ...]`` for ``t >= lengths[b]``."""
    keep = torch.arange(x.shape[1], device=x.device)[None] < lengths[:, None]
    return x * keep.view(*keep.shape, *([1] * (x.dim() - 2))).to(x.dtype)


def log_fbank(
    wave: torch.Tensor,
    lengths: torch.Tensor | None = None,
    sample_rate: int = SAMPLE_RATE,
    n_mels: int = FBANK_MELS,
    win_length: int = FBANK_WIN,
    hop_length: int = FBANK_HOP,
    n_fft: int = FBANK_NFFT,
    window: str = "hamming",
    preemphasis: float = PREEMPHASIS,
) -> torch.Tensor:
    """Log Mel filterbank energies at 100 Hz: ``[S] -> [F, n_mels]`` or ``[B, S] -> [B, F, n_mels]``.

    ``F = ceil(S / hop)``; frame ``i`` covers samples ``[i*hop, i*hop + win)`` of the
    pre-emphasised wave, zero beyond its end (or beyond ``lengths[b]`` in a batch, where
    frames past ``ceil(lengths[b] / hop)`` are zero rows).
    """
    batch, single = _as_batch(wave)
    batch = batch.float()
    lengths = _lengths(lengths, batch.shape[0], batch.shape[1], batch.device)
    if preemphasis:
        batch = torch.cat([batch[:, :1], batch[:, 1:] - preemphasis * batch[:, :-1]], dim=1)
    batch = _mask_beyond(batch, lengths)
    num_frames = max(1, math.ceil(batch.shape[1] / hop_length))
    padded_len = (num_frames - 1) * hop_length + win_length
    batch = F.pad(batch, (0, padded_len - batch.shape[1]))
    frames = batch.unfold(1, win_length, hop_length) * window_function(window, win_length, batch.device)
    power = torch.fft.rfft(frames, n=n_fft).abs().pow(2) / n_fft
    energies = power @ mel_filterbank(n_mels, n_fft, sample_rate).to(power.device).T
    feats = torch.log(energies.clamp_min(LOG_FLOOR))
    feats = _mask_beyond(feats, (lengths + hop_length - 1) // hop_length)
    return feats[0] if single else feats


def stack_frames(feats: torch.Tensor, stack: int = STACK) -> torch.Tensor:
    """Concatenate ``stack`` consecutive frames: ``[..., F, D] -> [..., ceil(F/stack), D*stack]`` (zero-filled end)."""
    frames, dim = feats.shape[-2:]
    groups = math.ceil(frames / stack)
    feats = F.pad(feats, (0, 0, 0, groups * stack - frames))
    return feats.reshape(*feats.shape[:-2], groups, stack * dim)


def feature_frames(num_samples: int | torch.Tensor) -> int | torch.Tensor:
    """Number of 25 Hz feature frames the audio itself covers: ``ceil(S / 640)``."""
    if isinstance(num_samples, torch.Tensor):
        return (num_samples + SAMPLES_PER_FRAME - 1) // SAMPLES_PER_FRAME
    return math.ceil(num_samples / SAMPLES_PER_FRAME)


def audio_features(
    wave: torch.Tensor,
    num_frames: int | torch.Tensor | None = None,
    lengths: torch.Tensor | None = None,
    normalize: bool = True,
    window: str = "hamming",
) -> torch.Tensor:
    """AV-HuBERT audio features: ``[S] -> [T, 104]`` or ``[B, S] -> [B, T, 104]`` at 25 Hz.

    Args:
        wave: 16 kHz float audio, one utterance or a zero-padded batch.
        num_frames: video frames per utterance (int, or one per batch row). The features
            are trimmed or zero-padded to it; default: ``ceil(S / 640)`` (of each length).
        lengths: valid samples per batch row (default: all).
        normalize: per-frame layer norm over the 104 dims.
        window: analysis window (see `window_function`).

    In a batch, ``T = max(num_frames)`` and rows past ``num_frames[b]`` are zero.
    """
    batch, single = _as_batch(wave)
    lengths = _lengths(lengths, batch.shape[0], batch.shape[1], batch.device)
    feats = stack_frames(log_fbank(batch, lengths, window=window))
    own_frames = feature_frames(lengths)
    if num_frames is None:
        num_frames = own_frames
    num_frames = torch.as_tensor(num_frames, dtype=torch.long, device=batch.device).reshape(-1).expand(batch.shape[0])
    total = int(num_frames.max()) if num_frames.numel() else 0
    if feats.shape[1] < total:
        feats = F.pad(feats, (0, 0, 0, total - feats.shape[1]))
    feats = _mask_beyond(feats[:, :total], torch.minimum(num_frames, own_frames))
    if normalize:
        feats = F.layer_norm(feats, feats.shape[-1:])
        feats = _mask_beyond(feats, num_frames)
    return feats[0] if single else feats


def log_mel_spectrogram(
    wave: torch.Tensor,
    sample_rate: int = SAMPLE_RATE,
    n_fft: int = 1024,
    hop_length: int = 256,
    win_length: int | None = None,
    n_mels: int = 80,
    f_min: float = 0.0,
    f_max: float | None = None,
    window: str = "hann",
    power: float = 1.0,
    center: bool = True,
    pad_mode: str = "reflect",
    scale: str = "htk",
    norm: str | None = None,
    log_floor: float = 1e-5,
    log: bool = True,
) -> torch.Tensor:
    """General Mel spectrogram: ``[S] -> [F, n_mels]`` or ``[B, S] -> [B, F, n_mels]``.

    ``power`` 1 gives a magnitude spectrogram (HiFi-GAN), 2 a power spectrogram (GE2E).
    ``center`` pads ``n_fft // 2`` on both sides (``pad_mode``) so frame ``i`` is centred on
    sample ``i * hop_length``; otherwise frames start at ``i * hop_length`` (no padding).
    With ``log``, returns ``log(max(mel, log_floor))``. Differentiable.

    Examples: HiFi-GAN 16 kHz: ``n_fft=1024, hop_length=160 or 256, n_mels=80, f_max=8000,
    scale="slaney", norm="slaney", power=1``; GE2E: ``n_fft=512, win_length=400,
    hop_length=160, n_mels=40, power=2, log=False``.
    """
    batch, single = _as_batch(wave)
    win_length = win_length or n_fft
    window_tensor = window_function(window, win_length, batch.device).to(batch.dtype)
    if not center:
        batch = F.pad(batch, (0, max(0, n_fft - batch.shape[1])))
    spec = torch.stft(
        batch, n_fft, hop_length, win_length, window_tensor, center=center, pad_mode=pad_mode, return_complex=True
    )
    spec = spec.abs().pow(power) if power != 1.0 else spec.abs()
    filters = mel_filterbank(n_mels, n_fft, sample_rate, f_min, f_max, scale, norm).to(spec.device, spec.dtype)
    mel = torch.matmul(filters, spec).transpose(-1, -2)
    if log:
        mel = torch.log(mel.clamp_min(log_floor))
    return mel[0] if single else mel
