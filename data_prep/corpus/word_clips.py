"""LRW-style word clips: one word centred in a 29-frame (1.16 s) window cut from a sentence."""

from __future__ import annotations

import numpy as np

from av2av_lightning.data.schema import SAMPLES_PER_FRAME, VIDEO_FPS, Timing

WORD_CLIP_FRAMES = 29


def spoken_form(word: str) -> str:
    """Strip a French elided article or pronoun ("l'oiseau" -> "oiseau") so labels match the noun."""
    return word.rsplit("'", 1)[-1].lower()


def clip_window(start_s: float, end_s: float, num_frames: int = WORD_CLIP_FRAMES) -> int:
    """First frame of the window centred on the word (may be negative or run past the end)."""
    centre = round((start_s + end_s) / 2 * VIDEO_FPS)
    return centre - num_frames // 2


def cut_frames(frames: np.ndarray, first: int, count: int = WORD_CLIP_FRAMES) -> np.ndarray:
    """Frames [first, first+count), repeating the edge frames where the window leaves the sentence."""
    index = np.clip(np.arange(first, first + count), 0, len(frames) - 1)
    return frames[index]


def cut_audio(wave: np.ndarray, first: int, count: int = WORD_CLIP_FRAMES) -> np.ndarray:
    """Audio of frames [first, first+count), zero-padded outside the sentence."""
    out = np.zeros(count * SAMPLES_PER_FRAME, dtype=np.float32)
    lo, hi = first * SAMPLES_PER_FRAME, (first + count) * SAMPLES_PER_FRAME
    src_lo, src_hi = max(lo, 0), min(hi, len(wave))
    if src_hi > src_lo:
        out[src_lo - lo : src_hi - lo] = wave[src_lo:src_hi]
    return out


def shift_timings(timings: list[Timing], first: int, count: int = WORD_CLIP_FRAMES) -> list[Timing]:
    """Timings relative to the window, clipped to it; spans outside the window are dropped."""
    offset, length = first / VIDEO_FPS, count / VIDEO_FPS
    shifted = []
    for label, start, end in timings:
        start, end = max(start - offset, 0.0), min(end - offset, length)
        if end > start:
            shifted.append((label, round(start, 4), round(end, 4)))
    return shifted
