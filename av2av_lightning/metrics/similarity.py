"""Speaker similarity: the renderer should keep the source speaker's voice (or face) without parallel data."""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torchmetrics import Metric

from av2av_lightning.metrics._common import check_pairs, safe_mean


class SpeakerSimilarity(Metric):
    """Mean cosine similarity of paired speaker embeddings ``[B, D]`` (generated vs reference speaker); the
    embeddings come from the speaker encoder, so the metric stays independent of which one is used."""

    is_differentiable = False
    higher_is_better = True
    full_state_update = False

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.add_state("similarity_sum", torch.tensor(0.0, dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("pairs", torch.tensor(0, dtype=torch.long), dist_reduce_fx="sum")

    def update(self, pred_embedding: torch.Tensor, ref_embedding: torch.Tensor) -> None:
        pred, ref = torch.as_tensor(pred_embedding), torch.as_tensor(ref_embedding)
        check_pairs(pred, ref)
        cosine = F.cosine_similarity(pred.double(), ref.double().to(pred.device), dim=-1)
        self.similarity_sum += cosine.sum().to(self.device)
        self.pairs += cosine.numel()

    def compute(self) -> dict[str, torch.Tensor]:
        return {"speaker_similarity": safe_mean(self.similarity_sum, self.pairs)}
