"""Helpers shared by the metrics: wave conversion, external models kept out of the module tree, safe means."""

from __future__ import annotations

from collections.abc import Sequence
from math import gcd
from typing import Any, Protocol

import numpy as np
import torch
from scipy.signal import resample_poly

from av2av_lightning.data.schema import SAMPLE_RATE

Wave = np.ndarray | torch.Tensor


class Transcriber(Protocol):
    """An ASR for a target language: 16 kHz mono waves in, one transcript per wave out."""

    def __call__(self, waves: list[np.ndarray], lang: str | None) -> list[str]: ...


def attach_external(module: torch.nn.Module, name: str, obj: Any) -> None:
    """Hold an external model (ASR, SyncNet expert) as a plain attribute rather than a submodule, so its weights
    never enter the state_dict of the stage checkpoint that owns the metric and ``metric.to()`` leaves it where
    its owner put it."""
    object.__setattr__(module, name, obj)


def to_wave(wave: Wave, sample_rate: int) -> np.ndarray:
    """A float32 mono wave at 16 kHz: the rate PESQ (wide band), the ASRs and the sync expert expect."""
    if isinstance(wave, torch.Tensor):
        wave = wave.detach().cpu().numpy()
    wave = np.asarray(wave, dtype=np.float64).reshape(-1)
    if sample_rate != SAMPLE_RATE:
        divisor = gcd(SAMPLE_RATE, sample_rate)
        wave = resample_poly(wave, SAMPLE_RATE // divisor, sample_rate // divisor)
    return wave.astype(np.float32)


def transcribe(transcriber: Transcriber, waves: Sequence[Wave], lang: str | None, sample_rate: int) -> list[str]:
    texts = list(transcriber([to_wave(w, sample_rate) for w in waves], lang))
    if len(texts) != len(waves):
        raise ValueError(f"the transcriber returned {len(texts)} texts for {len(waves)} waves")
    return texts


def check_pairs(preds: Sequence, target: Sequence) -> None:
    if len(preds) != len(target):
        raise ValueError(f"{len(preds)} predictions for {len(target)} references")


def safe_mean(total: torch.Tensor, count: torch.Tensor) -> torch.Tensor:
    """``total / count``, NaN (not a division error or a misleading 0) when nothing was counted."""
    if count == 0:
        return torch.tensor(float("nan"), dtype=torch.float64, device=total.device)
    return total.double() / count
