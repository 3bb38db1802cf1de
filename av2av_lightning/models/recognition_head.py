"""The recognition back-end of cross-modal mutual learning: temporal convolutions, then a linear classifier.

Word classifiers on LRW put a temporal back-end (TCN, BiGRU) between the front-end and the classifier because a
word is an order of sounds or lip shapes. Averaging the encoder output alone keeps much of that order, since a
Transformer's features carry context; averaging features rebuilt from a few shared basis vectors (``s = w B``)
keeps only how often each vector was chosen. The same back-end serves every row of the ablation, so the codebook
is compared on equal terms.
"""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor, nn


class TemporalBlock(nn.Module):
    """Pre-norm residual 1-D convolution over time; padded frames are zeroed before each convolution."""

    def __init__(self, dim: int, kernel_size: int, dropout: float) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(dim)
        self.conv = nn.Conv1d(dim, dim, kernel_size, padding=kernel_size // 2)
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: Tensor, valid: Tensor) -> Tensor:
        h = self.norm(x) * valid
        h = self.conv(h.transpose(1, 2)).transpose(1, 2)
        return x + self.dropout(F.gelu(h))


class RecognitionHead(nn.Module):
    """``[B, T, D]`` features -> log-probabilities: ``[B, C]`` per clip (``pool``, word classification, the mean
    over valid frames) or ``[B, T, C]`` per frame (CTC)."""

    def __init__(
        self, dim: int, num_classes: int, pool: bool, layers: int = 2, kernel_size: int = 5, dropout: float = 0.1
    ) -> None:
        super().__init__()
        self.pool = pool
        self.blocks = nn.ModuleList(TemporalBlock(dim, kernel_size, dropout) for _ in range(layers))
        self.norm = nn.LayerNorm(dim)
        self.classifier = nn.Linear(dim, num_classes)

    def forward(self, features: Tensor, padding_mask: Tensor) -> Tensor:
        valid = (~padding_mask).unsqueeze(-1).to(features.dtype)
        x = features
        for block in self.blocks:
            x = block(x, valid)
        x = self.norm(x)
        if self.pool:
            x = (x * valid).sum(1) / valid.sum(1).clamp(min=1.0)
        return F.log_softmax(self.classifier(x).float(), dim=-1)
