"""Griffin-Lim inverts the vocoder's Mels: a wave rebuilt from them has nearly the same Mels, far closer than noise
and than the random phases it starts from, and exactly 160 samples per frame."""

from __future__ import annotations

import math

import pytest
import torch

from av2av_lightning.models.mel_spectrum import HOP, N_MELS, griffin_lim, vocoder_mels


def vowel(seconds: float = 0.5, pitch: float = 140.0) -> torch.Tensor:
    """A harmonic tone with formant-like band weights and a slow amplitude contour."""
    t = torch.arange(int(16000 * seconds)) / 16000
    wave = sum(
        math.exp(-(((k * pitch) - 700) ** 2) / 2e5) * torch.sin(2 * math.pi * k * pitch * t) for k in range(1, 40)
    )
    return 0.3 * wave * torch.sin(math.pi * t / seconds) / wave.abs().max()


def test_griffin_lim_rebuilds_a_wave_with_the_same_mels():
    wave = vowel()
    mels = vocoder_mels(wave)[:-1]  # 2 frames per 320-sample unit
    rebuilt = griffin_lim(mels, iterations=48)
    assert rebuilt.shape == (HOP * len(mels),) and rebuilt.abs().max() <= 1.0

    def error(candidate: torch.Tensor) -> float:
        return float((vocoder_mels(candidate)[:-1] - mels).abs().mean())

    random_phases = error(griffin_lim(mels, iterations=0))
    assert error(rebuilt) < 0.6 * random_phases < 0.2 * error(0.05 * torch.randn(len(rebuilt)))
    assert torch.equal(griffin_lim(mels, iterations=4), griffin_lim(mels, iterations=4))  # seeded


def test_griffin_lim_refuses_other_shapes():
    with pytest.raises(ValueError, match=rf"griffin_lim takes log-Mels \[frames, {N_MELS}\], got \(2, 10, 80\)"):
        griffin_lim(torch.zeros(2, 10, N_MELS))
