"""Additive noise at a target SNR: white noise and babble from other utterances of the corpus.

The SNR is measured on what is actually mixed: with clean power ``Ps`` (mean square over
the utterance) and the power ``Pn`` of the noise segment cut to the utterance's length,
the noise is scaled by ``sqrt(Ps / (Pn * 10^(snr/10)))``, so that
``10 log10(mean(clean^2) / mean((mixed - clean)^2)) == snr``. Nothing is clipped (the
mixture may exceed [-1, 1]; features do not care, and clipping would change the SNR).
An all-zero utterance is returned unchanged (its SNR is undefined).

Babble is the sum of ``talkers`` other utterances, each a random segment (tiled if shorter
than the target) scaled to unit power before summing. `NoiseAugmenter` keeps a small
reservoir of recent clean utterances to draw them from, so the loader needs no separate
noise corpus.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

NOISE_TYPES = ("white", "babble")

__all__ = [
    "NOISE_TYPES",
    "NoiseAugmenter",
    "babble_noise",
    "fit_length",
    "measured_snr_db",
    "mix_at_snr",
    "power",
    "white_noise",
]


def power(x: np.ndarray) -> float:
    """Mean square, in float64."""
    x = np.asarray(x, dtype=np.float64)
    return float(np.mean(x * x)) if x.size else 0.0


def measured_snr_db(clean: np.ndarray, mixed: np.ndarray) -> float:
    """SNR of a mixture in dB: clean power over the power of ``mixed - clean``."""
    clean = np.asarray(clean, dtype=np.float64)
    return 10.0 * math.log10(power(clean) / power(np.asarray(mixed, dtype=np.float64) - clean))


def mix_at_snr(clean: np.ndarray, noise: np.ndarray, snr_db: float) -> np.ndarray:
    """``clean + g * noise`` with ``g`` chosen so the SNR of the result is ``snr_db``; same length and dtype."""
    clean = np.asarray(clean)
    noise = np.asarray(noise)
    if noise.shape != clean.shape:
        raise ValueError(f"noise shape {noise.shape} differs from the clean shape {clean.shape}; use fit_length")
    clean_power, noise_power = power(clean), power(noise)
    if clean_power == 0.0 or noise_power == 0.0:
        return clean.copy()
    gain = math.sqrt(clean_power / (noise_power * 10.0 ** (snr_db / 10.0)))
    mixed = clean.astype(np.float64) + gain * noise.astype(np.float64)
    return mixed.astype(clean.dtype if clean.dtype.kind == "f" else np.float32)


def fit_length(wave: np.ndarray, length: int, rng: np.random.Generator) -> np.ndarray:
    """A random ``length``-sample segment of ``wave``, tiled first when it is shorter."""
    wave = np.asarray(wave)
    if len(wave) == 0:
        raise ValueError("cannot cut a segment from an empty wave")
    if len(wave) < length:
        wave = np.tile(wave, math.ceil(length / len(wave)) + 1)
    start = int(rng.integers(0, len(wave) - length + 1))
    return wave[start : start + length]


def white_noise(length: int, rng: np.random.Generator) -> np.ndarray:
    """Gaussian white noise, unit variance, float32."""
    return rng.standard_normal(length).astype(np.float32)


def babble_noise(length: int, pool: Sequence[np.ndarray], talkers: int, rng: np.random.Generator) -> np.ndarray:
    """Sum of ``talkers`` utterances drawn from ``pool`` (without replacement when it is large enough)."""
    usable = [wave for wave in pool if len(wave) and power(wave) > 0.0]
    if not usable:
        raise ValueError("babble noise needs at least one non-silent utterance in the pool")
    picks = rng.choice(len(usable), size=talkers, replace=len(usable) < talkers)
    babble = np.zeros(length, dtype=np.float64)
    for index in picks:
        segment = fit_length(usable[int(index)], length, rng).astype(np.float64)
        babble += segment / math.sqrt(power(segment) or 1.0)
    return babble.astype(np.float32)


class NoiseAugmenter:
    """Adds white or babble noise to a fraction of utterances at a fixed or random SNR.

    Args:
        prob: probability that an utterance gets noise.
        snr_db: a fixed SNR, or ``(low, high)`` for a uniform draw per utterance.
        types: noise types to choose from uniformly (``white``, ``babble``).
        talkers: utterances summed into babble.
        reservoir_size: clean utterances kept for babble (older ones are replaced at random).
        seed: seed of the generator used when `__call__` gets no generator.

    Babble with an empty reservoir (the very first utterances a worker sees) falls back to
    white noise.
    """

    def __init__(
        self,
        prob: float = 0.25,
        snr_db: float | Sequence[float] = 0.0,
        types: Sequence[str] = NOISE_TYPES,
        talkers: int = 5,
        reservoir_size: int = 32,
        seed: int | None = 0,
    ) -> None:
        if not 0.0 <= prob <= 1.0:
            raise ValueError(f"noise probability must be in [0, 1], got {prob}")
        unknown = [kind for kind in types if kind not in NOISE_TYPES]
        if unknown or not types:
            raise ValueError(f"noise types must be a non-empty subset of {NOISE_TYPES}, got {list(types)}")
        if isinstance(snr_db, (int, float)):
            self.snr_range = (float(snr_db), float(snr_db))
        else:
            low, high = (float(v) for v in snr_db)
            if low > high:
                raise ValueError(f"SNR range must be (low, high), got {snr_db}")
            self.snr_range = (low, high)
        self.prob = float(prob)
        self.types = tuple(types)
        self.talkers = int(talkers)
        self.reservoir_size = int(reservoir_size)
        self.reservoir: list[np.ndarray] = []
        self.rng = np.random.default_rng(seed)

    def observe(self, wave: np.ndarray, rng: np.random.Generator | None = None) -> None:
        """Offer a clean utterance to the babble reservoir."""
        rng = rng or self.rng
        if self.reservoir_size <= 0 or len(wave) == 0:
            return
        if len(self.reservoir) < self.reservoir_size:
            self.reservoir.append(np.asarray(wave, dtype=np.float32))
        else:
            self.reservoir[int(rng.integers(0, self.reservoir_size))] = np.asarray(wave, dtype=np.float32)

    def noise(self, kind: str, length: int, rng: np.random.Generator | None = None) -> np.ndarray:
        rng = rng or self.rng
        if kind == "babble" and any(power(w) > 0 for w in self.reservoir):
            return babble_noise(length, self.reservoir, self.talkers, rng)
        return white_noise(length, rng)

    def __call__(self, wave: np.ndarray, rng: np.random.Generator | None = None) -> tuple[np.ndarray, float]:
        """Returns ``(wave or noisy wave, snr_db)``; SNR is ``inf`` when no noise was added."""
        rng = rng or self.rng
        if self.prob <= 0.0 or rng.random() >= self.prob:
            return wave, math.inf
        kind = self.types[int(rng.integers(0, len(self.types)))]
        low, high = self.snr_range
        snr = low if low == high else float(rng.uniform(low, high))
        if power(wave) == 0.0:
            return wave, math.inf
        return mix_at_snr(wave, self.noise(kind, len(wave), rng), snr), snr
