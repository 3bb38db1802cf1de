"""Lip-sync error LSE-D / LSE-C (Wav2Lip's protocol on a SyncNet-style expert).

For each clip and each offset o in [-max_offset, +max_offset] video windows: the mean over video windows t of
the L2 distance between video embedding t and audio embedding t + o, with the audio embeddings zero-padded by
max_offset at both ends as SyncNet's ``calc_pdist`` does (so every offset averages over all windows, and the
padding penalises large offsets instead of scoring them on fewer windows). LSE-D = min over offsets,
LSE-C = median - min, the best offset is the argmin; each averaged over clips. A positive offset means the
audio lags the video.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Protocol

import numpy as np
import torch
import torch.nn.functional as F
from torchmetrics import Metric

from av2av_lightning.data.schema import SAMPLE_RATE
from av2av_lightning.metrics._common import Wave, attach_external, check_pairs, safe_mean, to_wave


class SyncExpert(Protocol):
    """A SyncNet-style expert: embeddings of 5-frame video windows and of the matching audio windows
    (25 fps video, 16 kHz audio), one row per window, aligned so that row t of each covers the same time."""

    def embed_video(self, frames: torch.Tensor) -> torch.Tensor:
        """``frames [T, ...]`` -> ``[T', D]``."""
        ...

    def embed_audio(self, wave: torch.Tensor) -> torch.Tensor:
        """``wave [S]`` at 16 kHz -> ``[T', D]``."""
        ...


def offset_distances(video: torch.Tensor, audio: torch.Tensor, max_offset: int) -> torch.Tensor:
    """Mean distance per offset ``[2 * max_offset + 1]`` (offset -max_offset first) between video windows
    ``[T, D]`` and audio windows ``[T, D]``."""
    padded = F.pad(audio, (0, 0, max_offset, max_offset))
    shifts = torch.arange(2 * max_offset + 1, device=video.device)
    index = torch.arange(len(video), device=video.device)[:, None] + shifts[None, :]  # [T, offsets]
    return F.pairwise_distance(video[:, None, :].expand(-1, len(shifts), -1), padded[index]).mean(0)


class LipSync(Metric):
    """LSE-D (lower is better), LSE-C (higher is better) and the mean best offset in video frames."""

    is_differentiable = False
    full_state_update = False

    def __init__(self, expert: SyncExpert, max_offset: int = 15, sample_rate: int = SAMPLE_RATE, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        attach_external(self, "expert", expert)
        self.max_offset = max_offset
        self.sample_rate = sample_rate
        for name, dtype in (("lse_d_sum", torch.float64), ("lse_c_sum", torch.float64), ("offset_sum", torch.long)):
            self.add_state(name, torch.tensor(0, dtype=dtype), dist_reduce_fx="sum")
        self.add_state("clips", torch.tensor(0, dtype=torch.long), dist_reduce_fx="sum")

    @torch.no_grad()
    def update(self, pred_video: Sequence[np.ndarray | torch.Tensor], pred_wave: Sequence[Wave]) -> None:
        check_pairs(pred_video, pred_wave)
        for frames, wave in zip(pred_video, pred_wave):
            video = self.expert.embed_video(torch.as_tensor(frames)).float()
            audio = self.expert.embed_audio(torch.from_numpy(to_wave(wave, self.sample_rate))).float()
            windows = min(len(video), len(audio))
            if windows == 0:
                raise ValueError("a clip shorter than one sync window has no lip-sync score")
            distances = offset_distances(video[:windows], audio[:windows].to(video.device), self.max_offset)
            best = int(distances.argmin())
            self.lse_d_sum += float(distances[best])
            self.lse_c_sum += float(distances.median() - distances[best])
            self.offset_sum += best - self.max_offset
            self.clips += 1

    def compute(self) -> dict[str, torch.Tensor]:
        return {
            "lse_d": safe_mean(self.lse_d_sum, self.clips),
            "lse_c": safe_mean(self.lse_c_sum, self.clips),
            "lse_offset": safe_mean(self.offset_sum, self.clips),
        }
