"""Phoneme timings -> per-video-frame mouth parameters.

Lip reading sees visemes, not phonemes: several sounds look alike on the lips (p/b/m,
f/v, t/d/n/s/z ...). Each eSpeak NG phoneme of English, Spanish and French maps to one of
a small set of visemes, each viseme is a target vector of mouth parameters, and the
targets are blended over time the way real articulators move: smoothly, anticipating the
next sound, with lip closures (bilabials) dominating their neighbours. The result is one
row of `MOUTH_PARAMS` per 40 ms video frame, which `face.render_face` draws.
"""

from __future__ import annotations

import unicodedata

import numpy as np

MOUTH_PARAMS = ("open", "width", "round", "teeth", "tongue")
"""open: lip/jaw aperture; width: spread (1) vs narrow (0); round: protrusion/rounding;
teeth: upper teeth visible; tongue: tongue tip visible. All in [0, 1]."""

REST = "rest"
NEUTRAL = "mid"

# Viseme -> (open, width, round, teeth, tongue).
_TARGETS = {
    REST: (0.00, 0.50, 0.15, 0.00, 0.00),
    "bilabial": (0.00, 0.45, 0.20, 0.00, 0.00),
    "labiodental": (0.10, 0.50, 0.05, 0.70, 0.00),
    "dental": (0.22, 0.55, 0.05, 0.50, 0.90),
    "alveolar": (0.20, 0.58, 0.10, 0.35, 0.15),
    "postalveolar": (0.18, 0.25, 0.80, 0.40, 0.00),
    "palatal": (0.22, 0.72, 0.05, 0.35, 0.00),
    "velar": (0.32, 0.50, 0.15, 0.30, 0.00),
    "glottal": (0.45, 0.50, 0.15, 0.30, 0.00),
    "open": (0.90, 0.62, 0.05, 0.35, 0.05),
    NEUTRAL: (0.55, 0.58, 0.12, 0.40, 0.00),
    "close_front": (0.36, 0.92, 0.00, 0.60, 0.00),
    "rounded": (0.62, 0.30, 0.72, 0.20, 0.00),
    "close_rounded": (0.30, 0.12, 1.00, 0.05, 0.00),
    "front_rounded": (0.38, 0.22, 0.88, 0.20, 0.00),
}
VISEMES: dict[str, np.ndarray] = {name: np.array(target, dtype=np.float32) for name, target in _TARGETS.items()}

# How strongly a viseme imposes itself on its neighbours (Cohen & Massaro's dominance):
# lips must really meet for p/b/m and touch the teeth for f/v, while tongue-back sounds
# barely show and simply take the shape of the surrounding vowels.
_DOMINANCE = {
    "bilabial": 6.0,
    "labiodental": 4.0,
    "dental": 2.0,
    "postalveolar": 2.0,
    "close_rounded": 1.5,
    "alveolar": 0.8,
    "palatal": 0.8,
    "velar": 0.4,
    "glottal": 0.3,
}

_VISEME_OF = {
    REST: "_",
    "bilabial": "p b m ɱ β ɸ",
    "labiodental": "f v ʋ",
    "dental": "θ ð",
    "alveolar": "t d n l s z ɾ r ɹ ɬ ts dz ɫ",
    "postalveolar": "ʃ ʒ tʃ dʒ",
    "palatal": "j ɲ ʎ c ɟ ç ʝ",
    "velar": "k g ɡ ŋ x ɣ ʁ ʀ q ɢ χ ɰ",
    "glottal": "h ɦ ʔ",
    "open": "a ɑ æ ɐ ä ɶ",
    NEUTRAL: "e ɛ ə ɜ ʌ ɘ ɚ ɝ ɞ ᵻ ɨ",
    "close_front": "i ɪ",
    "rounded": "o ɔ ɒ ɤ ɵ",
    "close_rounded": "u ʊ w ɯ ʍ",
    "front_rounded": "y ø œ ɥ ʏ",
}
_PHONEME_TO_VISEME = {ph: viseme for viseme, phonemes in _VISEME_OF.items() for ph in phonemes.split()}

_MODIFIERS = "ːˑˈˌ̃ʰʲʷ"  # length, stress, nasal tilde, aspiration, palatalisation, labialisation

SAMPLE_RATE_HZ = 200  # fine time grid of the targets before smoothing (5 ms)
VIDEO_FPS = 25
COARTICULATION_S = 0.025  # std of the Gaussian blending neighbouring targets (~60 ms wide at half height)
ANTICIPATION_S = 0.02  # lips move this much ahead of the sound


def _strip(label: str) -> str:
    """Drop combining diacritics (nasal tilde, ...) and length/stress/secondary marks."""
    decomposed = unicodedata.normalize("NFD", label)
    return "".join(ch for ch in decomposed if ch not in _MODIFIERS and not unicodedata.combining(ch))


def _segments(label: str) -> list[str]:
    """The viseme targets a phoneme passes through, e.g. "aɪ" -> ["open", "close_front"].

    Tries the whole label, then its bare form, then splits it greedily into known
    phonemes (diphthongs and clusters eSpeak writes as one phoneme); a character nobody
    knows becomes the neutral mid viseme, so the mapping never fails.
    """
    for candidate in (label, _strip(label)):
        if candidate in _PHONEME_TO_VISEME:
            return [_PHONEME_TO_VISEME[candidate]]
    bare = _strip(label)
    segments, position = [], 0
    while position < len(bare):
        for size in (2, 1):
            piece = bare[position : position + size]
            if len(piece) == size and piece in _PHONEME_TO_VISEME:
                segments.append(_PHONEME_TO_VISEME[piece])
                position += size
                break
        else:
            segments.append(NEUTRAL)
            position += 1
    deduplicated = [seg for index, seg in enumerate(segments) if index == 0 or seg != segments[index - 1]]
    return deduplicated or [NEUTRAL]


def viseme_of(phoneme: str) -> str:
    """The viseme a phoneme starts with (a diphthong's first target); never raises."""
    return _segments(phoneme)[0]


def _target_track(phonemes, num_samples: int, rate: float) -> tuple[np.ndarray, np.ndarray]:
    """Targets and dominance on the fine grid: rest everywhere, each phoneme's viseme(s) over its span."""
    targets = np.tile(VISEMES[REST], (num_samples, 1))
    dominance = np.ones(num_samples, dtype=np.float32)
    # Sample k covers [k, k+1) / rate; shifting the phonemes earlier anticipates them.
    for label, start, end in phonemes:
        segments = _segments(label)
        first = max(0, round((start - ANTICIPATION_S) * rate))
        last = min(num_samples, round((end - ANTICIPATION_S) * rate))
        if last <= first:
            continue
        bounds = np.linspace(first, last, len(segments) + 1).round().astype(int)
        for segment, lo, hi in zip(segments, bounds[:-1], bounds[1:]):
            targets[lo:hi] = VISEMES[segment]
            dominance[lo:hi] = _DOMINANCE.get(segment, 1.0)
    return targets, dominance


def _gaussian_kernel(std_samples: float) -> np.ndarray:
    radius = int(np.ceil(3.5 * std_samples))
    offsets = np.arange(-radius, radius + 1, dtype=np.float32)
    kernel = np.exp(-0.5 * (offsets / std_samples) ** 2)
    return kernel / kernel.sum()


def _smooth(values: np.ndarray, kernel: np.ndarray) -> np.ndarray:
    """Convolve along time, holding the first/last value beyond the ends."""
    radius = len(kernel) // 2
    padded = np.pad(values, [(radius, radius)] + [(0, 0)] * (values.ndim - 1), mode="edge")
    windows = np.lib.stride_tricks.sliding_window_view(padded, len(kernel), axis=0)
    return np.einsum("...k,k->...", windows, kernel)  # no BLAS: bit-identical in every worker


def mouth_trajectory(phonemes, num_frames: int, params_per_second: float = VIDEO_FPS) -> np.ndarray:
    """Mouth parameters per video frame, float32 [num_frames, len(MOUTH_PARAMS)] in [0, 1].

    `phonemes` is a list of (ipa_label, start_s, end_s); "_" and everything outside the
    phonemes is the closed rest pose. Targets are blended with dominance-weighted Gaussian
    co-articulation (so p/b/m still close the lips between two vowels) and averaged over
    each frame's interval, as a camera integrates over its exposure.
    """
    if num_frames <= 0:
        return np.zeros((0, len(MOUTH_PARAMS)), dtype=np.float32)
    samples_per_frame = max(1, round(SAMPLE_RATE_HZ / params_per_second))
    rate = samples_per_frame * params_per_second
    targets, dominance = _target_track(phonemes, num_frames * samples_per_frame, rate)
    kernel = _gaussian_kernel(COARTICULATION_S * rate)
    blended = _smooth(targets * dominance[:, None], kernel) / _smooth(dominance, kernel)[:, None]
    per_frame = blended.reshape(num_frames, samples_per_frame, -1).mean(axis=1)
    return np.clip(per_frame, 0.0, 1.0).astype(np.float32)
