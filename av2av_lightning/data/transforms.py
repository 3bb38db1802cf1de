"""Video transforms: AV-HuBERT lip crops and RGB face frames.

Lip video (grayscale mouth ROI, stored 96x96): a centre 88x88 crop for evaluation; in
training a random 88x88 crop (one offset for the whole clip) and a horizontal flip of the
whole clip with probability 0.5. Then pixel / 255, normalised with mean 0.421 and std
0.165. The crop/flip works on uint8 (cheap), normalisation is separate so a batch can be
padded in uint8 and normalised once.

Face video (RGB, 96x96, for the renderer and speaker identity): ``[T,H,W,3]`` uint8 ->
``[T,3,H,W]`` float in [0, 1].
"""

from __future__ import annotations

import numpy as np
import torch

LIP_CROP = 88
LIP_MEAN = 0.421
LIP_STD = 0.165
FLIP_PROB = 0.5

__all__ = [
    "FLIP_PROB",
    "LIP_CROP",
    "LIP_MEAN",
    "LIP_STD",
    "crop_lip",
    "face_transform",
    "lip_transform",
    "normalize_lip",
]


def _tensor(frames) -> torch.Tensor:
    return frames if isinstance(frames, torch.Tensor) else torch.from_numpy(np.ascontiguousarray(frames))


def crop_lip(
    frames: np.ndarray | torch.Tensor,
    train: bool = False,
    rng: np.random.Generator | None = None,
    size: int = LIP_CROP,
    flip_prob: float = FLIP_PROB,
) -> torch.Tensor:
    """uint8 ``[T,H,W]`` -> uint8 ``[T,size,size]``: centre crop (eval) or random crop + flip (train)."""
    frames = _tensor(frames)
    if frames.dim() != 3:
        raise ValueError(f"expected lip frames [T,H,W], got shape {tuple(frames.shape)}")
    height, width = frames.shape[-2:]
    if height < size or width < size:
        raise ValueError(f"lip frames of {height}x{width} are smaller than the {size}x{size} crop")
    if train:
        rng = rng if rng is not None else np.random.default_rng()
        top = int(rng.integers(0, height - size + 1))
        left = int(rng.integers(0, width - size + 1))
        flip = bool(rng.random() < flip_prob)
    else:
        top, left, flip = (height - size) // 2, (width - size) // 2, False
    crop = frames[:, top : top + size, left : left + size]
    return crop.flip(-1) if flip else crop


def normalize_lip(frames: torch.Tensor) -> torch.Tensor:
    """uint8 (or float in 0..255) lip pixels -> float ``(x / 255 - 0.421) / 0.165``."""
    frames = _tensor(frames)
    out = frames.float()
    if out.data_ptr() == frames.data_ptr():  # float input: work on a copy
        out = out.clone()
    return out.mul_(1.0 / (255.0 * LIP_STD)).sub_(LIP_MEAN / LIP_STD)


def lip_transform(
    frames: np.ndarray | torch.Tensor, train: bool = False, rng: np.random.Generator | None = None
) -> torch.Tensor:
    """uint8 ``[T,96,96]`` -> float ``[T,88,88]``, cropped (and flipped in training) and normalised."""
    return normalize_lip(crop_lip(frames, train, rng))


def face_transform(frames: np.ndarray | torch.Tensor) -> torch.Tensor:
    """uint8 RGB ``[T,H,W,3]`` -> float ``[T,3,H,W]`` in [0, 1] (also batched ``[B,T,H,W,3]``)."""
    frames = _tensor(frames)
    if frames.dim() not in (4, 5) or frames.shape[-1] != 3:
        raise ValueError(f"expected face frames [T,H,W,3], got shape {tuple(frames.shape)}")
    return frames.movedim(-1, -3).float() / 255.0
