"""Speech quality against the reference speech: PESQ (wide band), STOI and ESTOI.

An utterance that cannot be scored (silent or non-finite reference, too short, the scorer refusing it) is
counted in ``<name>_failed`` next to the mean over the scored ones, never dropped silently and never a crash:
PESQ raises on silence, and pystoi returns a meaningless 0 or 1e-5 there, so those are caught explicitly.
Pairs of different lengths are trimmed to the shorter and counted in ``<name>_trimmed``.
"""

from __future__ import annotations

import warnings
from abc import abstractmethod
from collections.abc import Sequence
from typing import Any

import numpy as np
import pesq
import pystoi
import torch
from torchmetrics import Metric

from av2av_lightning.data.schema import SAMPLE_RATE
from av2av_lightning.metrics._common import Wave, check_pairs, safe_mean, to_wave


class _UnscorableError(Exception):
    """An utterance pair the measure cannot score."""


class _SpeechQuality(Metric):
    """Mean of a per-utterance intrusive measure over the utterances it could score, with failure counts."""

    is_differentiable = False
    higher_is_better = True
    full_state_update = False
    key: str

    def __init__(self, sample_rate: int = SAMPLE_RATE, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.sample_rate = sample_rate
        self.add_state("score_sum", torch.tensor(0.0, dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("scored", torch.tensor(0, dtype=torch.long), dist_reduce_fx="sum")
        self.add_state("failed", torch.tensor(0, dtype=torch.long), dist_reduce_fx="sum")
        self.add_state("trimmed", torch.tensor(0, dtype=torch.long), dist_reduce_fx="sum")

    @abstractmethod
    def _score(self, reference: np.ndarray, degraded: np.ndarray) -> float:
        """Score one 16 kHz pair of equal length; raise ``_UnscorableError`` when the measure cannot."""

    def update(self, pred_wave: Sequence[Wave], ref_wave: Sequence[Wave]) -> None:
        check_pairs(pred_wave, ref_wave)
        for pred, ref in zip(pred_wave, ref_wave):
            degraded, reference = to_wave(pred, self.sample_rate), to_wave(ref, self.sample_rate)
            if len(degraded) != len(reference):
                self.trimmed += 1
                length = min(len(degraded), len(reference))
                degraded, reference = degraded[:length], reference[:length]
            try:
                if not (np.isfinite(reference).all() and np.isfinite(degraded).all()):
                    raise _UnscorableError("non-finite samples")
                if not np.abs(reference).max(initial=0.0) > 0:
                    raise _UnscorableError("silent reference")
                score = self._score(reference, degraded)
            except _UnscorableError:
                self.failed += 1
                continue
            self.score_sum += score
            self.scored += 1

    def compute(self) -> dict[str, torch.Tensor]:
        return {
            self.key: safe_mean(self.score_sum, self.scored),
            f"{self.key}_scored": self.scored,
            f"{self.key}_failed": self.failed,
            f"{self.key}_trimmed": self.trimmed,
        }


class PESQ(_SpeechQuality):
    """Wide-band PESQ (ITU-T P.862.2) at 16 kHz; other input rates are resampled to 16 kHz first."""

    key = "pesq"

    def _score(self, reference: np.ndarray, degraded: np.ndarray) -> float:
        try:
            return float(pesq.pesq(SAMPLE_RATE, reference, degraded, "wb"))
        except pesq.PesqError as error:
            raise _UnscorableError(str(error)) from error


class STOI(_SpeechQuality):
    """Short-time objective intelligibility (pystoi, which resamples to its 10 kHz internally)."""

    key = "stoi"
    extended = False

    def _score(self, reference: np.ndarray, degraded: np.ndarray) -> float:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            try:
                score = float(pystoi.stoi(reference, degraded, SAMPLE_RATE, extended=self.extended))
            except (ValueError, IndexError) as error:  # too short for a single STFT frame
                raise _UnscorableError(str(error)) from error
        # pystoi warns and returns 1e-5 when too few frames are left after removing silent ones.
        if any("Not enough STFT frames" in str(w.message) for w in caught):
            raise _UnscorableError("too few non-silent frames")
        return score


class ESTOI(STOI):
    """Extended STOI (Jensen & Taal 2016), robust to modulated noise."""

    key = "estoi"
    extended = True
