"""HuBERT-style span masking and the AV-HuBERT input-masking operations.

Per sample of valid length n, ``int(prob * n / span + u)`` spans (u ~ U[0, 1), at least ``min_spans``) start at
distinct random positions inside the valid frames; spans may overlap, so the masked fraction is a little below
``prob``. Padding is never masked.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor


@dataclass
class Spans:
    """Masked spans of one batch: per sample the start frames and the span length (shorter for tiny samples)."""

    starts: list[Tensor]
    lengths: list[int]

    def to_mask(self, frames: int, device: torch.device | None = None) -> Tensor:
        """Bool [B, frames], True = masked."""
        mask = torch.zeros(len(self.starts), frames, dtype=torch.bool, device=device)
        for row, (starts, span) in enumerate(zip(self.starts, self.lengths)):
            if len(starts):
                mask[row, (starts[:, None] + torch.arange(span)).flatten().to(device)] = True
        return mask


def sample_spans(lengths: Tensor, prob: float, span: int, min_spans: int = 2) -> Spans:
    """Draws span starts for valid lengths ``lengths`` [B] (uses the global torch RNG, so ``manual_seed`` fixes it)."""
    starts, spans = [], []
    for valid in lengths.tolist():
        length = min(span, valid)
        positions = valid - length + 1 if valid > 0 else 0
        count = int(prob * valid / max(length, 1) + torch.rand(()).item())
        count = min(max(count, min_spans), positions)
        starts.append(torch.randperm(positions)[:count].sort().values)
        spans.append(length)
    return Spans(starts, spans)


def mask_audio(audio: Tensor, mask: Tensor, mask_emb: Tensor) -> Tensor:
    """Replaces masked audio frames [B, T, F] by the learned F-dim mask embedding."""
    return torch.where(mask[..., None], mask_emb.to(audio.dtype), audio)


def swap_video_spans(video: Tensor, spans: Spans, lengths: Tensor) -> Tensor:
    """Fills each masked span of ``video`` [B, C, T, H, W] with an equally long span from elsewhere in the same clip.

    The source start is uniform over the other valid start positions, and sources are read from the unmasked clip, so
    a masked frame always shows a real frame of the same speaker (AV-HuBERT's ``same_seq`` substitution). A clip no
    longer than the span has nowhere else to copy from and is left unchanged.
    """
    frames = video.shape[2]
    source = torch.arange(frames).repeat(video.shape[0], 1)
    for row, (starts, span, valid) in enumerate(zip(spans.starts, spans.lengths, lengths.tolist())):
        positions = valid - span + 1
        if positions < 2 or not len(starts):
            continue
        shift = 1 + torch.randint(positions - 1, (len(starts),))  # never the span itself
        offsets = torch.arange(span)
        target = starts[:, None] + offsets
        source[row, target.flatten()] = (((starts + shift) % positions)[:, None] + offsets).flatten()
    index = source.to(video.device)[:, None, :, None, None].expand_as(video)
    return video.gather(2, index)
