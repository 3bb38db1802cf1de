"""The modality-invariant codebook of cross-modal mutual learning.

Audio and video features are each expressed as weights over one shared set of K learnable
basis vectors (``w = softmax(cos(f, B) / t)``) and replaced by their mix ``s = w B``. Because
both modalities must describe speech with the same basis, the weights of the same word can be
compared across modalities, and aligned with a KL term.

A randomly drawn basis in D dimensions is nearly orthogonal to every feature, so all weights start
almost uniform and ``s`` near the basis mean: the few vectors that first move towards the features
take every frame and the rest are never chosen. `kmeans_basis` starts the basis where the features
are instead, one vector per cluster (demo corpus: 56 of 64 vectors in use at the first steps).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn


class ModalityInvariantCodebook(nn.Module):
    def __init__(self, dim: int, num_basis: int, temperature: float = 0.1) -> None:
        super().__init__()
        if num_basis < 2:
            raise ValueError(f"a codebook needs at least 2 basis vectors, got {num_basis}")
        # unit-variance entries: the rebuilt features have the scale of the LayerNorm-ed encoder output they replace
        self.basis = nn.Parameter(torch.randn(num_basis, dim))
        self.temperature = temperature

    def log_weights(self, features: Tensor) -> Tensor:
        """``[..., D] -> [..., K]`` log of the basis weights (log space keeps the KL terms stable)."""
        similarity = F.normalize(features, dim=-1) @ F.normalize(self.basis, dim=-1).T
        return F.log_softmax(similarity / self.temperature, dim=-1)

    def forward(self, features: Tensor) -> tuple[Tensor, Tensor]:
        """The features rebuilt from the basis ``s = w B`` and the log weights ``log w``."""
        log_weights = self.log_weights(features)
        return log_weights.exp() @ self.basis, log_weights


def kmeans_basis(features: Tensor, num_basis: int, seed: int = 0) -> Tensor:
    """``[N, D]`` features -> ``[K, D]`` basis: clusters by cosine (spherical k-means, the similarity the weights
    use), each vector the mean of its cluster's features, so ``s = w B`` keeps the features' scale."""
    from data_prep.clustering.kmeans import fit_kmeans

    features = features.detach().float().cpu()
    directions = F.normalize(features, dim=-1)
    labels = fit_kmeans(directions.numpy(), num_basis, seed=seed, n_init=3).assign(directions)
    sums = torch.zeros(num_basis, features.shape[1]).index_add_(0, labels, features)
    counts = torch.bincount(labels, minlength=num_basis).unsqueeze(1)
    return sums / counts.clamp_min(1)


def symmetric_kl(log_p: Tensor, log_q: Tensor, valid: Tensor | None = None, peer_targets: bool = False) -> Tensor:
    """``KL(p || q) + KL(q || p)`` of distributions given as log probabilities over the last dim, averaged over
    the positions where ``valid`` is True (all when None).

    ``peer_targets`` takes each KL with its first distribution as a fixed target (deep mutual learning): the
    same value, but the gradient moves p towards q's current value and q towards p's, instead of moving both
    towards wherever they agree most cheaply, such as one shared basis vector."""
    if peer_targets:
        p, q = log_p.detach(), log_q.detach()
        per_position = (p.exp() * (p - log_q) + q.exp() * (q - log_p)).sum(-1)
    else:
        per_position = ((log_p.exp() - log_q.exp()) * (log_p - log_q)).sum(-1)  # the two KLs share this form
    if valid is None:
        return per_position.mean()
    return per_position[valid].mean() if valid.any() else per_position.new_zeros(())


def basis_perplexity(log_weights: Tensor, valid: Tensor | None = None) -> Tensor:
    """How many basis vectors are in use: ``exp`` of the entropy of the basis weights averaged over the (valid)
    positions. ``K`` when every vector carries the same share, 1 when one takes everything (a collapsed codebook)."""
    weights = log_weights.exp()
    mean = (weights[valid] if valid is not None else weights.reshape(-1, weights.shape[-1])).mean(0)
    return torch.exp(-(mean * mean.clamp_min(1e-12).log()).sum())


def frame_entropy(log_weights: Tensor, valid: Tensor | None = None) -> Tensor:
    """Mean entropy of the per-position basis weights over the (valid) positions, as a share of ``log K``: 0 when
    every position puts all its weight on one vector, 1 when it spreads it evenly over the whole basis."""
    entropy = -(log_weights.exp() * log_weights).sum(-1)
    entropy = entropy[valid] if valid is not None else entropy.reshape(-1)
    return entropy.mean() / math.log(log_weights.shape[-1])
