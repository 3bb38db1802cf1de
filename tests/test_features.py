"""Audio features, video transforms and noise mixing."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from av2av_lightning.data.features import (
    AUDIO_FEATURE_DIM,
    audio_features,
    hz_to_mel,
    log_fbank,
    log_mel_spectrogram,
    mel_filterbank,
    mel_to_hz,
)
from av2av_lightning.data.noise import (
    NoiseAugmenter,
    babble_noise,
    measured_snr_db,
    mix_at_snr,
    white_noise,
)
from av2av_lightning.data.schema import SAMPLE_RATE, SAMPLES_PER_FRAME
from av2av_lightning.data.transforms import (
    LIP_MEAN,
    LIP_STD,
    crop_lip,
    face_transform,
    lip_transform,
    normalize_lip,
)


def speechy(frames: int, seed: int = 0) -> torch.Tensor:
    rng = np.random.default_rng(seed)
    t = np.arange(frames * SAMPLES_PER_FRAME) / SAMPLE_RATE
    wave = sum(
        np.sin(2 * np.pi * rng.uniform(100, 4000) * t) * (1 + np.sin(2 * np.pi * rng.uniform(1, 5) * t))
        for _ in range(4)
    )
    return torch.from_numpy((0.05 * wave + 0.01 * rng.standard_normal(len(t))).astype(np.float32))


# ---------------------------------------------------------------------------- features


@pytest.mark.parametrize("frames", [1, 7, 50])
def test_feature_shape_matches_video_frames(frames):
    feats = audio_features(speechy(frames))
    assert feats.shape == (frames, AUDIO_FEATURE_DIM) == (frames, 104)
    assert feats.dtype == torch.float32 and torch.isfinite(feats).all()


def test_features_trimmed_or_padded_to_video_frames():
    wave = speechy(30)
    longer = audio_features(wave, num_frames=25)
    assert longer.shape == (25, 104)
    torch.testing.assert_close(longer, audio_features(wave)[:25])
    shorter = audio_features(wave[: 27 * SAMPLES_PER_FRAME], num_frames=30)
    assert shorter.shape == (30, 104)
    assert shorter[27:].abs().max() == 0  # zero padding, as the reference does
    assert shorter[:27].abs().sum(-1).min() > 0


def test_per_utterance_normalisation():
    feats = audio_features(speechy(40) * 7.0)
    assert feats.mean(-1).abs().max() < 1e-4
    assert (feats.std(-1, unbiased=False) - 1).abs().max() < 1e-3
    raw = audio_features(speechy(40), normalize=False)
    assert raw.mean(-1).abs().max() > 1  # log energies are far from zero-mean before the norm
    # Scale invariance: a louder copy gives (almost) the same normalised features.
    torch.testing.assert_close(audio_features(speechy(40) * 7.0), audio_features(speechy(40)), atol=2e-3, rtol=0)


def test_batched_equals_single():
    frames = [20, 33, 9]
    waves = [speechy(n, seed=i) for i, n in enumerate(frames)]
    batch = torch.zeros(3, max(frames) * SAMPLES_PER_FRAME)
    for i, wave in enumerate(waves):
        batch[i, : len(wave)] = wave
    lengths = torch.tensor([len(w) for w in waves])
    out = audio_features(batch, num_frames=torch.tensor(frames), lengths=lengths)
    assert out.shape == (3, 33, 104)
    for i, (wave, n) in enumerate(zip(waves, frames)):
        torch.testing.assert_close(out[i, :n], audio_features(wave), atol=1e-4, rtol=1e-4)
        assert out[i, n:].abs().max() == 0 if n < 33 else True


@pytest.mark.parametrize("freq", [300.0, 1000.0, 4000.0])
def test_pure_tone_energy_in_the_right_mel_band(freq):
    t = torch.arange(SAMPLE_RATE) / SAMPLE_RATE
    fbank = log_fbank(0.5 * torch.sin(2 * math.pi * freq * t), preemphasis=0.0)
    assert fbank.shape == (100, 26)  # 100 Hz frames
    centres = mel_to_hz(torch.linspace(0, float(hz_to_mel(8000.0)), 28))[1:-1]
    assert int(fbank.mean(0).argmax()) == int((centres - freq).abs().argmin())


def test_mel_filterbank_helper():
    filters = mel_filterbank(80, 1024, 16000, f_max=8000)
    assert filters.shape == (80, 513) and (filters >= 0).all() and filters.max() <= 1 + 1e-6
    assert (filters.sum(1) > 0).all()  # no empty filter
    slaney = mel_filterbank(40, 512, 16000, scale="slaney", norm="slaney")
    assert slaney.shape == (40, 257)
    mel = log_mel_spectrogram(speechy(25), n_fft=1024, hop_length=160, n_mels=80)
    assert mel.shape == (101, 80) and torch.isfinite(mel).all()
    assert log_mel_spectrogram(torch.stack([speechy(25), speechy(25, 1)]), n_mels=40).shape[::2] == (2, 40)
    torch.testing.assert_close(
        mel_to_hz(hz_to_mel(torch.tensor([440.0, 3000.0]), "slaney"), "slaney").float(), torch.tensor([440.0, 3000.0])
    )


# ---------------------------------------------------------------------------- transforms


def test_lip_crop_sizes_and_center():
    frames = np.random.default_rng(0).integers(0, 256, size=(5, 96, 96), dtype=np.uint8)
    assert crop_lip(frames).shape == (5, 88, 88)
    assert crop_lip(frames).dtype == torch.uint8
    assert torch.equal(crop_lip(frames), torch.from_numpy(frames[:, 4:92, 4:92]))
    out = lip_transform(frames, train=True, rng=np.random.default_rng(1))
    assert out.shape == (5, 88, 88) and out.dtype == torch.float32


def test_flip_only_in_training():
    # A left/right asymmetric clip: its crop is flipped iff the left column is bright.
    frames = np.zeros((3, 96, 96), dtype=np.uint8)
    frames[:, :, :48] = 255
    for seed in range(20):
        assert crop_lip(frames, train=False, rng=np.random.default_rng(seed))[0, 0, 0] == 255
    flipped = [int(crop_lip(frames, train=True, rng=np.random.default_rng(s))[0, 0, 0] == 0) for s in range(200)]
    assert 60 < sum(flipped) < 140  # p = 0.5
    # Random offsets within the 8-pixel margin: read them off a frame whose pixel = row * 96 + col.
    positions = torch.arange(96 * 96, dtype=torch.int32).reshape(1, 96, 96)
    corners = [
        int(crop_lip(positions, train=True, rng=np.random.default_rng(s), flip_prob=0.0)[0, 0, 0]) for s in range(30)
    ]
    offsets = {divmod(c, 96) for c in corners}
    assert len(offsets) > 5 and all(0 <= top <= 8 and 0 <= left <= 8 for top, left in offsets)
    clip = np.random.default_rng(3).integers(0, 256, size=(4, 96, 96), dtype=np.uint8)
    clip[:] = clip[0]
    crop = crop_lip(clip, train=True, rng=np.random.default_rng(7))
    assert all(torch.equal(crop[0], crop[i]) for i in range(4))


def test_lip_normalisation_constants():
    assert LIP_MEAN == 0.421 and LIP_STD == 0.165
    values = torch.tensor([0, 107, 255], dtype=torch.uint8)
    expected = (values.float() / 255 - 0.421) / 0.165
    torch.testing.assert_close(normalize_lip(values), expected)
    gray = np.full((2, 96, 96), 0.421 * 255, dtype=np.uint8)
    assert lip_transform(gray).abs().max() < 0.03


def test_face_transform():
    face = np.random.default_rng(0).integers(0, 256, size=(4, 96, 96, 3), dtype=np.uint8)
    out = face_transform(face)
    assert out.shape == (4, 3, 96, 96) and out.dtype == torch.float32
    assert out.min() >= 0 and out.max() <= 1
    torch.testing.assert_close(out[2, 1], torch.from_numpy(face[2, :, :, 1]).float() / 255)


# ---------------------------------------------------------------------------- noise


@pytest.mark.parametrize("snr", [-20.0, -5.0, 0.0, 7.5, 20.0])
def test_mixed_snr_is_the_requested_one(snr):
    rng = np.random.default_rng(0)
    clean = speechy(30).numpy()
    pool = [speechy(n, seed=s).numpy() for s, n in enumerate([10, 40, 25])]
    for noise in (white_noise(len(clean), rng), babble_noise(len(clean), pool, 3, rng)):
        mixed = mix_at_snr(clean, noise, snr)
        assert mixed.dtype == np.float32 and mixed.shape == clean.shape
        assert abs(measured_snr_db(clean, mixed) - snr) < 0.1


def test_augmenter_is_deterministic_with_seed_and_records_snr():
    clean = speechy(20).numpy()
    pool = [speechy(15, seed=s).numpy() for s in range(4)]

    def run(seed):
        aug = NoiseAugmenter(prob=1.0, snr_db=(-5.0, 5.0), types=("white", "babble"), seed=seed)
        for wave in pool:
            aug.observe(wave)
        return [aug(clean) for _ in range(4)]

    first, again, other = run(1), run(1), run(2)
    for (a, snr_a), (b, snr_b) in zip(first, again):
        assert np.array_equal(a, b) and snr_a == snr_b
        assert -5 <= snr_a <= 5 and abs(measured_snr_db(clean, a) - snr_a) < 0.1
    assert not all(np.array_equal(a, b) for (a, _), (b, _) in zip(first, other))
    off = NoiseAugmenter(prob=0.0)
    wave, snr = off(clean)
    assert wave is clean and snr == math.inf


def test_babble_differs_from_white():
    rng = np.random.default_rng(0)
    pool = [speechy(25, seed=s).numpy() for s in range(5)]
    babble = babble_noise(16000, pool, 3, rng)
    white = white_noise(16000, rng)

    def flatness(x):  # spectral flatness: ~0.56 for white Gaussian noise, near 0 for tonal babble
        spectrum = np.abs(np.fft.rfft(x)) ** 2 + 1e-12
        return float(np.exp(np.mean(np.log(spectrum))) / np.mean(spectrum))

    assert flatness(white) > 0.4 and flatness(babble) < 0.1
    # Babble needs a pool; the augmenter falls back to white noise when its reservoir is empty.
    aug = NoiseAugmenter(prob=1.0, snr_db=0.0, types=("babble",), seed=0)
    noisy, snr = aug(pool[0])
    assert snr == 0.0 and flatness(noisy - pool[0]) > 0.4
    aug.observe(pool[1])
    aug.observe(pool[2])
    noisy, _ = aug(pool[0])
    assert flatness(noisy - pool[0]) < 0.1


def test_a_filterbank_first_made_under_inference_mode_still_serves_a_training_step():
    """The filterbank is cached: one built during validation (inference mode) must not break a later backward."""
    with torch.inference_mode():
        log_mel_spectrogram(torch.randn(4000), n_mels=77)
    wave = torch.randn(4000, requires_grad=True)
    log_mel_spectrogram(wave, n_mels=77).sum().backward()
    assert wave.grad.abs().sum() > 0
