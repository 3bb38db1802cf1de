"""Text metrics: ASR-BLEU and chrF, WER and CER, word accuracy.

Corpus-level scores are not means of sentence scores, so the states are the sufficient statistics that the
corpus formula sums (sacrebleu's per-segment n-gram counts, jiwer's edit counts): summing them across ranks
(``dist_reduce_fx="sum"``) gives exactly the single-process corpus score, with no strings to gather.
"""

from __future__ import annotations

import re
import string
import unicodedata
from abc import abstractmethod
from collections.abc import Sequence
from typing import Any

import jiwer
import torch
from sacrebleu.metrics import BLEU, CHRF
from torchmetrics import Metric

from av2av_lightning.data.schema import SAMPLE_RATE
from av2av_lightning.metrics._common import Transcriber, Wave, attach_external, check_pairs, safe_mean, transcribe

_PARENTHESISED = re.compile(r"\([^()]*\)")
_ASCII_PUNCTUATION = set(string.punctuation)


def normalize_text(text: str) -> str:
    """Lowercase, drop parenthesised text (innermost first, so nesting goes too) and punctuation, collapse spaces:
    the normalisation the reference evaluations apply to hypotheses and references before ASR-BLEU.
    Punctuation is deleted, not spaced ("don't" -> "dont"), the same on both sides; Unicode punctuation
    (the Spanish and French marks) counts as punctuation too."""
    text = text.lower()
    previous = None
    while previous != text:
        previous, text = text, _PARENTHESISED.sub(" ", text)
    text = "".join(c for c in text if c not in _ASCII_PUNCTUATION and not unicodedata.category(c).startswith("P"))
    return " ".join(text.split())


class _TranscribedText(Metric):
    """Base of the metrics that score hypothesis texts against reference texts. With a ``transcriber`` the
    hypotheses are transcripts of ``pred_wave`` (ASR-BLEU, ASR-WER); without one they are ``pred_text``."""

    is_differentiable = False
    full_state_update = False

    def __init__(
        self,
        transcriber: Transcriber | None = None,
        lang: str | None = None,
        sample_rate: int = SAMPLE_RATE,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        attach_external(self, "transcriber", transcriber)
        self.lang = lang
        self.sample_rate = sample_rate

    def update(
        self,
        ref_text: Sequence[str],
        pred_text: Sequence[str] | None = None,
        pred_wave: Sequence[Wave] | None = None,
        lang: str | None = None,
    ) -> None:
        hyps, refs = self._pairs(ref_text, pred_text, pred_wave, lang)
        if not hyps:
            return
        self._accumulate(hyps, refs)

    @abstractmethod
    def _accumulate(self, hyps: list[str], refs: list[str]) -> None:
        """Add normalised hypothesis/reference pairs to the states."""

    def _pairs(
        self,
        ref_text: Sequence[str],
        pred_text: Sequence[str] | None,
        pred_wave: Sequence[Wave] | None,
        lang: str | None,
    ) -> tuple[list[str], list[str]]:
        if self.transcriber is not None:
            if pred_wave is None:
                raise ValueError(f"{type(self).__name__} has a transcriber: pass the generated speech as pred_wave")
            pred_text = transcribe(self.transcriber, pred_wave, lang or self.lang, self.sample_rate)
        elif pred_text is None:
            raise ValueError(f"{type(self).__name__} has no transcriber: pass the hypotheses as pred_text")
        check_pairs(pred_text, ref_text)
        return [normalize_text(t) for t in pred_text], [normalize_text(t) for t in ref_text]


class ASRBleu(_TranscribedText):
    """Corpus BLEU (sacrebleu defaults: 13a tokenisation, exp smoothing) and chrF of normalised transcripts
    against normalised reference translations, i.e. ``sacrebleu.corpus_bleu(hyps, [refs])``."""

    higher_is_better = True

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._bleu, self._chrf = BLEU(), CHRF()
        bleu_stats = 2 + 2 * self._bleu.max_ngram_order  # hyp len, ref len, matches and totals per order
        chrf_stats = 3 * (self._chrf.char_order + self._chrf.word_order)  # hyp, ref, match per order
        self.add_state("bleu_stats", torch.zeros(bleu_stats, dtype=torch.long), dist_reduce_fx="sum")
        self.add_state("chrf_stats", torch.zeros(chrf_stats, dtype=torch.long), dist_reduce_fx="sum")

    def _accumulate(self, hyps: list[str], refs: list[str]) -> None:
        # sacrebleu's corpus score is a function of these per-segment statistics summed over the corpus (private
        # API of the pinned sacrebleu; tests/test_metrics.py checks the score equals corpus_bleu bit for bit).
        for metric, state in ((self._bleu, "bleu_stats"), (self._chrf, "chrf_stats")):
            stats = torch.tensor(metric._extract_corpus_statistics(hyps, [refs]), dtype=torch.long)
            setattr(self, state, getattr(self, state) + stats.sum(0).to(self.device))

    def compute(self) -> dict[str, torch.Tensor]:
        bleu = self._bleu._compute_score_from_stats(self.bleu_stats.tolist()).score
        chrf = self._chrf._compute_score_from_stats(self.chrf_stats.tolist()).score
        return {
            "asr_bleu": torch.tensor(bleu, dtype=torch.float64),
            "asr_chrf": torch.tensor(chrf, dtype=torch.float64),
        }


class _ErrorRate(_TranscribedText):
    """Corpus error rate (substitutions + deletions + insertions over reference length) from jiwer's alignment;
    the summed counts make it exact across ranks, unlike a mean of per-batch rates."""

    higher_is_better = False
    key: str
    align: Any  # jiwer.process_words or jiwer.process_characters: (references, hypotheses) -> edit counts

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.add_state("errors", torch.tensor(0, dtype=torch.long), dist_reduce_fx="sum")
        self.add_state("reference_length", torch.tensor(0, dtype=torch.long), dist_reduce_fx="sum")

    def _accumulate(self, hyps: list[str], refs: list[str]) -> None:
        out = self.align(refs, hyps)
        self.errors += out.substitutions + out.deletions + out.insertions
        self.reference_length += out.substitutions + out.deletions + out.hits

    def compute(self) -> dict[str, torch.Tensor]:
        return {self.key: safe_mean(self.errors, self.reference_length)}


class WordErrorRate(_ErrorRate):
    key = "wer"
    align = staticmethod(jiwer.process_words)


class CharErrorRate(_ErrorRate):
    key = "cer"
    align = staticmethod(jiwer.process_characters)


class WordAccuracy(Metric):
    """Fraction of exact word-label matches (LRW-style word classification). Labels are class ids, words, or
    logits ``[B, C]`` for the predictions (argmax taken)."""

    is_differentiable = False
    higher_is_better = True
    full_state_update = False

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.add_state("correct", torch.tensor(0, dtype=torch.long), dist_reduce_fx="sum")
        self.add_state("total", torch.tensor(0, dtype=torch.long), dist_reduce_fx="sum")

    def update(self, pred_label: torch.Tensor | Sequence, ref_label: torch.Tensor | Sequence) -> None:
        if isinstance(pred_label, torch.Tensor) and pred_label.ndim == 2:
            pred_label = pred_label.argmax(-1)
        check_pairs(pred_label, ref_label)
        if isinstance(pred_label, torch.Tensor) and isinstance(ref_label, torch.Tensor):
            correct = int((pred_label.reshape(-1) == ref_label.reshape(-1).to(pred_label.device)).sum())
        else:
            correct = sum(_item(p) == _item(r) for p, r in zip(pred_label, ref_label))
        self.correct += correct
        self.total += len(ref_label)

    def compute(self) -> dict[str, torch.Tensor]:
        return {"word_accuracy": safe_mean(self.correct, self.total)}


def _item(label: Any) -> Any:
    return label.item() if isinstance(label, torch.Tensor) else label
