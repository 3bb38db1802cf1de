"""Unit-to-unit translation: one many-to-many `UnitTranslator` over every language pair of the corpus.

`UnitTranslation` trains with label-smoothed cross entropy under the shared warm-up/decay schedule on
`UnitPairBatch` batches (`av2av_lightning.data.unit_pairs`): parallel sentences joined by sentence id, with
units extracted from audio-only input. Validation decodes (beam search or greedy) and scores the unit strings
against the reference target units: unit BLEU (sacrebleu, corpus level), unit edit distance (edit operations
per reference unit) and exact-match rate, overall and per direction.
"""

from __future__ import annotations

from dataclasses import asdict
from typing import Any

import lightning as L
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from av2av_lightning.checkpoints import STAGE_KEY, load_stage_model
from av2av_lightning.data.unit_pairs import UnitPairBatch
from av2av_lightning.metrics.text import ASRBleu, WordAccuracy, WordErrorRate
from av2av_lightning.models.unit_translator import PAD, UnitTranslator, UnitTranslatorConfig, pad_tokens
from av2av_lightning.optim import stage_optimizer

__all__ = ["UnitTranslation", "load_translator", "unit_string"]


def unit_string(units) -> str:
    """Units as the whitespace-separated string BLEU and edit distance are computed on."""
    return " ".join(str(int(u)) for u in units)


class UnitTranslation(L.LightningModule):
    """Label-smoothed encoder-decoder training and unit BLEU / edit distance evaluation.

    Args:
        preset: ``tiny`` or ``large`` (`UnitTranslatorConfig` presets).
        translator: overrides of preset fields, e.g. ``{"num_units": 1000, "languages": [en, es, fr]}``.
        label_smoothing: of the cross entropy (0.1 as in fairseq speech-to-speech recipes).
        lr, warmup_steps, total_steps: peak learning rate and the polynomial-decay schedule
            (``total_steps=None``: the trainer's estimated number of steps).
        weight_decay, betas, eps: AdamW settings.
        beam_size: beam of validation decoding (1: greedy).
        len_penalty, max_len_a, max_len_b: length penalty and maximum output length ``a * source + b``.
    """

    def __init__(
        self,
        preset: str = "tiny",
        translator: dict[str, Any] | None = None,
        label_smoothing: float = 0.1,
        lr: float = 5e-4,
        warmup_steps: int = 4000,
        total_steps: int | None = None,
        weight_decay: float = 0.01,
        betas: tuple[float, float] = (0.9, 0.98),
        eps: float = 1e-6,
        beam_size: int = 5,
        len_penalty: float = 1.0,
        max_len_a: float = 1.5,
        max_len_b: int = 10,
    ) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.config = UnitTranslatorConfig.preset(preset, **(translator or {}))
        self.model = UnitTranslator(self.config)
        self.bleu = nn.ModuleDict()
        self.edit = nn.ModuleDict()
        self.exact = nn.ModuleDict()
        for name in ["all", *self.directions()]:
            self.bleu[name], self.edit[name], self.exact[name] = ASRBleu(), WordErrorRate(), WordAccuracy()

    def directions(self) -> list[str]:
        languages = self.config.languages
        return [f"{src}-{tgt}" for src in languages for tgt in languages if src != tgt]

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        checkpoint[STAGE_KEY] = "translation"
        checkpoint["translator_config"] = asdict(self.config)

    def tokens(self, batch: UnitPairBatch) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """Source tokens and mask, decoder input and prediction target (``<pad>`` where nothing is predicted)."""
        vocab = self.model.vocab
        src = [vocab.encode_source(u, lang) for u, lang in zip(batch.src_units, batch.src_langs)]
        tgt = [vocab.encode_target(u, lang) for u, lang in zip(batch.tgt_units, batch.tgt_langs)]
        src_tokens, src_mask = pad_tokens(src, self.device)
        tgt_tokens, _ = pad_tokens(tgt, self.device)
        return src_tokens, src_mask, tgt_tokens[:, :-1], tgt_tokens[:, 1:]

    def loss(self, batch: UnitPairBatch) -> tuple[Tensor, dict]:
        """Summed label-smoothed cross entropy, and counts (target tokens, correct argmax tokens, summed NLL)."""
        src, src_mask, prev, target = self.tokens(batch)
        logits = self.model(src, src_mask, prev).float()
        flat_logits, flat_target = logits.flatten(0, 1), target.flatten()
        smoothed = F.cross_entropy(
            flat_logits,
            flat_target,
            ignore_index=PAD,
            label_smoothing=self.hparams.label_smoothing,
            reduction="sum",
        )
        valid = flat_target != PAD
        nll = F.cross_entropy(flat_logits[valid], flat_target[valid], reduction="sum").detach()
        correct = int((flat_logits[valid].argmax(-1) == flat_target[valid]).sum())
        return smoothed, {"tokens": int(valid.sum()), "correct": correct, "nll": nll}

    def training_step(self, batch: UnitPairBatch, batch_idx: int) -> Tensor:
        summed, stats = self.loss(batch)
        # per target token over the whole world (DDP averages gradients, so scale by the world size)
        tokens = self.trainer.strategy.reduce(torch.tensor(float(stats["tokens"]), device=self.device), reduce_op="sum")
        loss = summed / tokens.clamp(min=1.0) * self.trainer.world_size
        self.log_dict(
            {
                "train/loss": loss,
                "train/nll": stats["nll"] / max(stats["tokens"], 1),
                "train/token_acc": stats["correct"] / max(stats["tokens"], 1),
            },
            prog_bar=True,
            batch_size=len(batch),
        )
        return loss

    def translate(self, batch: UnitPairBatch, beam_size: int | None = None) -> list[list[int]]:
        """Target units of every pair of the batch (beam search; ``beam_size`` 1 decodes greedily)."""
        beam = self.hparams.beam_size if beam_size is None else beam_size
        vocab = self.model.vocab
        src, src_mask = pad_tokens(
            [vocab.encode_source(u, lang) for u, lang in zip(batch.src_units, batch.src_langs)], self.device
        )
        lengths = dict(max_len_a=self.hparams.max_len_a, max_len_b=self.hparams.max_len_b)
        if beam == 1:
            return self.model.greedy(src, src_mask, batch.tgt_langs, **lengths)
        return self.model.beam_search(
            src, src_mask, batch.tgt_langs, beam, len_penalty=self.hparams.len_penalty, **lengths
        )

    def validation_step(self, batch: UnitPairBatch, batch_idx: int) -> None:
        summed, stats = self.loss(batch)
        self.log("val/loss", summed / max(stats["tokens"], 1), batch_size=len(batch), sync_dist=True)
        self.log("val/nll", stats["nll"] / max(stats["tokens"], 1), batch_size=len(batch), sync_dist=True)
        hyps = [unit_string(u) for u in self.translate(batch)]
        refs = [unit_string(u) for u in batch.tgt_units]
        directions = [f"{s}-{t}" for s, t in zip(batch.src_langs, batch.tgt_langs)]
        for name in ["all", *sorted(set(directions))]:
            chosen = [i for i, d in enumerate(directions) if name in ("all", d)]
            if name not in self.bleu:
                continue
            pick_hyps, pick_refs = [hyps[i] for i in chosen], [refs[i] for i in chosen]
            self.bleu[name].update(pick_refs, pred_text=pick_hyps)
            self.edit[name].update(pick_refs, pred_text=pick_hyps)
            self.exact[name].update(pick_hyps, pick_refs)

    def on_validation_epoch_end(self) -> None:
        """Scores of every direction that any rank saw (counted over ranks first: each compute() syncs, so all
        ranks must compute the same directions in the same order)."""
        names = list(self.bleu)
        local = torch.stack([self.exact[name].total.float() for name in names]).to(self.device)
        seen = self.trainer.strategy.reduce(local, reduce_op="sum")
        scores = {}
        for name, count in zip(names, seen.tolist()):
            if count == 0:
                continue
            suffix = "" if name == "all" else f"_{name}"
            scores[f"val/unit_bleu{suffix}"] = self.bleu[name].compute()["asr_bleu"].float()
            scores[f"val/unit_edit{suffix}"] = self.edit[name].compute()["wer"].float()
            scores[f"val/exact_match{suffix}"] = self.exact[name].compute()["word_accuracy"].float()
        self.log_dict(scores)
        for metrics in (self.bleu, self.edit, self.exact):
            for metric in metrics.values():
                metric.reset()

    def configure_optimizers(self) -> dict:
        return stage_optimizer(self, self.model)


def load_translator(path) -> UnitTranslator:
    """The translator of a `UnitTranslation` checkpoint, in eval mode."""
    return load_stage_model(
        path, "translation", lambda c: UnitTranslator(UnitTranslatorConfig(**c["translator_config"]))
    )
