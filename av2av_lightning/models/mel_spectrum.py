"""The unit vocoder's view of speech, 80 log-magnitude Mels at 100 Hz, and its inverse by Griffin-Lim.

`vocoder_mels` is what the vocoder's Mel losses compare (HiFi-GAN's spectrogram at 16 kHz, hop 160 so that two
frames make one 50 Hz unit). `griffin_lim` turns such a spectrogram back into a wave without training anything:
the Mel filters' pseudo-inverse gives a linear magnitude, and the fast Griffin-Lim iteration (Perraudin et al. 2013:
alternating projections with momentum) finds a phase consistent with it. It is the waveform decoder of a vocoder
that predicts Mels from units (``synthesis: griffin_lim``), for budgets too short to train a GAN generator.
"""

from __future__ import annotations

import math
from functools import lru_cache

import torch
import torch.nn.functional as F
from torch import Tensor

from av2av_lightning.data.features import log_mel_spectrogram, mel_filterbank, window_function
from av2av_lightning.data.schema import SAMPLE_RATE

__all__ = ["MELS_PER_UNIT", "N_MELS", "griffin_lim", "mean_voice_mels", "vocoder_mels"]

N_FFT, HOP, WINDOW, N_MELS, F_MAX = 1024, 160, 640, 80, 8000
MELS_PER_UNIT = 2  # 100 Hz frames per 50 Hz unit


def vocoder_mels(wave: Tensor) -> Tensor:
    """``[S] -> [F, 80]`` (or batched) log-magnitude Slaney Mels at 100 Hz: the vocoder losses' view."""
    return log_mel_spectrogram(
        wave, n_fft=N_FFT, hop_length=HOP, win_length=WINDOW, n_mels=N_MELS, f_max=F_MAX, scale="slaney", norm="slaney"
    )


def mean_voice_mels(wave: Tensor) -> Tensor:
    """``[S] -> [80]``: per Mel band, the median `vocoder_mels` of the loud frames, a voice's spectral envelope.

    Loud: above the midpoint between the quietest and the loudest frame (in log-Mels), so the pauses of an
    utterance, however long, do not pull the voice towards silence; the median, so neither do the few frames
    where speech starts or stops.
    """
    mels = vocoder_mels(wave)
    loudness = mels.mean(dim=-1)
    return mels[loudness >= (loudness.min() + loudness.max()) / 2].median(dim=0).values


@lru_cache(maxsize=4)
def _inverse_filters(device: torch.device) -> Tensor:
    filters = mel_filterbank(N_MELS, N_FFT, SAMPLE_RATE, 0.0, F_MAX, "slaney", "slaney")
    return torch.linalg.pinv(filters.double()).float().to(device)  # [513, 80]


def griffin_lim(log_mels: Tensor, iterations: int = 32, momentum: float = 0.99, seed: int = 0) -> Tensor:
    """A wave ``[HOP x F]`` whose `vocoder_mels` approximate ``log_mels`` ``[F, 80]``; seeded, so repeatable."""
    if log_mels.ndim != 2 or log_mels.shape[1] != N_MELS:
        raise ValueError(f"griffin_lim takes log-Mels [frames, {N_MELS}], got {tuple(log_mels.shape)}")
    log_mels = log_mels.detach().float()
    magnitude = (_inverse_filters(log_mels.device) @ log_mels.exp().T).clamp(min=0.0)  # [513, F]
    window = window_function("hann", WINDOW, log_mels.device)
    length = HOP * (log_mels.shape[0] - 1)  # the centred STFT of this many samples has exactly F frames

    def stft(wave: Tensor) -> Tensor:
        return torch.stft(wave, N_FFT, HOP, WINDOW, window, center=True, pad_mode="reflect", return_complex=True)

    def istft(spectrum: Tensor) -> Tensor:
        return torch.istft(spectrum, N_FFT, HOP, WINDOW, window, center=True, length=length)

    generator = torch.Generator().manual_seed(seed)
    angles = torch.polar(torch.ones_like(magnitude), 2 * math.pi * torch.rand(magnitude.shape, generator=generator))
    previous = torch.zeros_like(angles)
    for _ in range(iterations):
        rebuilt = stft(istft(magnitude * angles))
        accelerated = rebuilt - (momentum / (1 + momentum)) * previous
        angles = accelerated / accelerated.abs().clamp(min=1e-8)
        previous = rebuilt
    return F.pad(istft(magnitude * angles), (0, HOP)).clamp(-1.0, 1.0)
