"""39-dim MFCC + delta + delta-delta at 100 Hz: the features AV-HuBERT's first iteration clusters.

HuBERT/AV-HuBERT iteration 1 takes k-means targets from 13 MFCCs with first and second
order deltas (39 dims) at 100 Hz. The recipe here, in torch:

1. the wave is trimmed or zero-padded to ``num_frames * 640`` samples (as the data
   pipeline does), so an utterance of ``T`` video frames gives exactly ``4 T`` frames and
   the labels line up with the 25 fps video at 100 Hz;
2. log Mel filterbank energies from `av2av_lightning.data.features.log_fbank` (25 ms
   windows every 10 ms, pre-emphasis 0.97; 23 HTK-Mel filters and a Povey window as in
   Kaldi's MFCC defaults, which HuBERT's reference feature dump uses; unlike Kaldi, no DC
   removal, filters from 0 Hz, and frames start at sample 0 with the end zero-padded);
3. an orthonormal DCT-II over the Mel axis, keeping cepstra 0..12, with Kaldi's sinusoidal
   liftering (L = 22) so the higher cepstra are not drowned by c0 in Euclidean k-means;
4. deltas by linear regression over +-N = 2 frames,
   ``d_t = sum_n n (c_{t+n} - c_{t-n}) / (2 sum_n n^2)``, edges replicated; delta-deltas are
   the deltas of the deltas.
"""

from __future__ import annotations

import math
from functools import lru_cache

import numpy as np
import torch
import torch.nn.functional as F

from av2av_lightning.data.features import log_fbank
from av2av_lightning.data.schema import SAMPLES_PER_FRAME

MFCC_RATE = 100  # frames per second
NUM_CEPS = 13
MFCC_MELS = 23
MFCC_WINDOW = "povey"
LIFTER = 22.0
DELTA_WINDOW = 2
MFCC_DIM = 3 * NUM_CEPS

__all__ = ["MFCC_DIM", "MFCC_RATE", "deltas", "dct_matrix", "mfcc", "mfcc_features"]


@lru_cache(maxsize=8)
def dct_matrix(n_in: int, n_out: int) -> torch.Tensor:
    """Orthonormal DCT-II basis ``[n_in, n_out]``: ``x @ dct_matrix(...)`` gives the first ``n_out`` coefficients."""
    n = torch.arange(n_in, dtype=torch.float64)
    k = torch.arange(n_out, dtype=torch.float64)
    basis = torch.cos(math.pi / n_in * (n[:, None] + 0.5) * k[None])
    scale = torch.full((n_out,), math.sqrt(2.0 / n_in), dtype=torch.float64)
    scale[0] = math.sqrt(1.0 / n_in)
    return (basis * scale).float()


def deltas(feats: torch.Tensor, window: int = DELTA_WINDOW) -> torch.Tensor:
    """Regression deltas over ``+-window`` frames along the time axis of ``[..., F, D]`` (edges replicated)."""
    frames = feats.shape[-2]
    padded = torch.cat([feats[..., :1, :].expand(*feats.shape[:-2], window, feats.shape[-1]), feats], dim=-2)
    padded = torch.cat([padded, feats[..., -1:, :].expand(*feats.shape[:-2], window, feats.shape[-1])], dim=-2)
    out = torch.zeros_like(feats)
    for n in range(1, window + 1):
        ahead = padded[..., window + n : window + n + frames, :]
        behind = padded[..., window - n : window - n + frames, :]
        out = out + n * (ahead - behind)
    return out / (2 * sum(n * n for n in range(1, window + 1)))


def mfcc(wave: torch.Tensor, num_ceps: int = NUM_CEPS, n_mels: int = MFCC_MELS, lifter: float = LIFTER) -> torch.Tensor:
    """Static cepstra ``[S] -> [ceil(S/160), num_ceps]`` (or batched ``[B, S] -> [B, F, num_ceps]``)."""
    log_mel = log_fbank(torch.as_tensor(wave), n_mels=n_mels, window=MFCC_WINDOW)
    ceps = log_mel @ dct_matrix(n_mels, num_ceps).to(log_mel.device)
    if lifter:
        index = torch.arange(num_ceps, dtype=torch.float32, device=ceps.device)
        ceps = ceps * (1.0 + 0.5 * lifter * torch.sin(math.pi * index / lifter))
    return ceps


def mfcc_features(wave: np.ndarray | torch.Tensor, num_frames: int | None = None) -> torch.Tensor:
    """39-dim MFCC + deltas ``[4 * num_frames, 39]`` of one 16 kHz utterance of ``num_frames`` video frames.

    ``num_frames`` defaults to ``ceil(S / 640)``; the wave is trimmed or zero-padded to it first.
    """
    wave = torch.as_tensor(np.asarray(wave, dtype=np.float32) if isinstance(wave, np.ndarray) else wave).float()
    if wave.dim() != 1:
        raise ValueError(f"expected one wave [S], got shape {tuple(wave.shape)}")
    if num_frames is None:
        num_frames = max(1, math.ceil(wave.shape[0] / SAMPLES_PER_FRAME))
    if num_frames <= 0:
        raise ValueError(f"num_frames must be positive, got {num_frames}")
    samples = num_frames * SAMPLES_PER_FRAME
    wave = F.pad(wave[:samples], (0, max(0, samples - wave.shape[0])))
    ceps = mfcc(wave)
    first = deltas(ceps)
    return torch.cat([ceps, first, deltas(first)], dim=-1)
