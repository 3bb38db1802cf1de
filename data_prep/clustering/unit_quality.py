"""How well discrete units capture phones: PNMI, cluster and phone purity, cross-modal agreement.

Definitions follow the HuBERT paper (Hsu et al., 2021, Sec. IV-F). From the joint count
matrix ``C[y, z]`` of frame-level phones ``y`` and units ``z`` (``p(y, z) = C / N``):

- **PNMI** = ``I(y; z) / H(y)``: the fraction of phone uncertainty a unit removes
  (1 when the phone is a function of the unit, 0 when they are independent);
- **phone purity** = ``E_z[max_y p(y | z)]``: per unit, the fraction of its frames with its
  most common phone, weighted by the unit's frames (high when units never mix phones;
  trivially high with very many units);
- **cluster purity** = ``E_y[max_z p(z | y)]``: per phone, the fraction of its frames in its
  most common unit (high when a phone is not split over many units).

Phones come from the corpus alignments (`SampleMeta.phonemes`): label frame ``i`` at rate
``r`` covers ``[i/r, (i+1)/r)`` and takes the phone containing its centre; frames outside
every phone, and pauses (``_``, ``sil``, ``sp``, ``""``), are silence ``sil``.

**Agreement** of two label sequences of the same frames (e.g. audio-only and video-only
input quantised with one quantiser) is the fraction of frames, valid in both, where they are
equal: the cross-modal consistency the mutual-learning stage improves.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

import numpy as np

from av2av_lightning.data.schema import SampleMeta, Timing

SILENCE = "sil"
PAUSES = frozenset({"_", "sil", "sp", "", SILENCE})
IGNORE = -100

__all__ = [
    "SILENCE",
    "PhoneCounts",
    "UnitQuality",
    "agreement",
    "cluster_purity",
    "format_quality",
    "phone_frames",
    "phone_purity",
    "pnmi",
    "quality_from_counts",
    "sidecar_quality",
]


def phone_frames(phonemes: Iterable[Timing], num_labels: int, rate: float) -> list[str]:
    """Frame-level phone labels ``[num_labels]`` at ``rate`` Hz from ``(phone, start_s, end_s)`` triples."""
    frames = [SILENCE] * num_labels
    centres = (np.arange(num_labels) + 0.5) / rate
    for phone, start, end in phonemes:
        label = SILENCE if phone in PAUSES else str(phone)
        for index in np.nonzero((centres >= start) & (centres < end))[0]:
            frames[index] = label
    return frames


def _entropy(probabilities: np.ndarray) -> float:
    p = probabilities[probabilities > 0]
    return float(-(p * np.log(p)).sum())


def pnmi(counts: np.ndarray) -> float:
    """Phone-normalised mutual information ``I(y; z) / H(y)`` of ``[phones, units]`` counts (NaN if H(y) = 0)."""
    joint = np.asarray(counts, dtype=np.float64)
    joint = joint / joint.sum()
    h_phone = _entropy(joint.sum(1))
    if h_phone == 0.0:
        return math.nan
    mutual = h_phone + _entropy(joint.sum(0)) - _entropy(joint.ravel())
    return max(0.0, mutual / h_phone)


def phone_purity(counts: np.ndarray) -> float:
    """``E_z[max_y p(y|z)]``: frame-weighted fraction of each unit's frames that carry its most common phone."""
    counts = np.asarray(counts, dtype=np.float64)
    return float(counts.max(0).sum() / counts.sum())


def cluster_purity(counts: np.ndarray) -> float:
    """``E_y[max_z p(z|y)]``: frame-weighted fraction of each phone's frames that fall in its most common unit."""
    counts = np.asarray(counts, dtype=np.float64)
    return float(counts.max(1).sum() / counts.sum())


def agreement(first: np.ndarray, second: np.ndarray, ignore: int = IGNORE) -> float:
    """Fraction of frames valid in both (not ``ignore``) where two label sequences are equal (NaN if none)."""
    first, second = np.asarray(first), np.asarray(second)
    if first.shape != second.shape:
        raise ValueError(f"label sequences differ in shape: {first.shape} vs {second.shape}")
    valid = (first != ignore) & (second != ignore)
    return float((first[valid] == second[valid]).mean()) if valid.any() else math.nan


class PhoneCounts:
    """Accumulates the joint phone x unit count matrix over utterances."""

    def __init__(self, k: int | None = None) -> None:
        self.phones: dict[str, int] = {}
        self.k = k
        self._pairs: list[np.ndarray] = []

    def add(self, phones: list[str], units: np.ndarray) -> None:
        units = np.asarray(units, dtype=np.int64)
        if len(phones) != len(units):
            raise ValueError(f"{len(phones)} phone frames for {len(units)} unit frames")
        ids = np.array([self.phones.setdefault(p, len(self.phones)) for p in phones], dtype=np.int64)
        valid = units != IGNORE
        self._pairs.append(np.stack([ids[valid], units[valid]]))

    def add_utterance(self, meta: SampleMeta, units: np.ndarray, rate: float) -> None:
        self.add(phone_frames(meta.phonemes, len(units), rate), units)

    def matrix(self) -> np.ndarray:
        """``[num_phones, num_units]`` counts (units up to ``k`` or the largest seen)."""
        pairs = np.concatenate(self._pairs, axis=1) if self._pairs else np.zeros((2, 0), dtype=np.int64)
        if pairs.size and pairs[1].min() < 0:
            raise ValueError(f"negative unit label {pairs[1].min()}")
        units = max(self.k or 0, int(pairs[1].max()) + 1 if pairs.size else 0)
        counts = np.zeros((len(self.phones), units), dtype=np.int64)
        np.add.at(counts, (pairs[0], pairs[1]), 1)
        return counts


@dataclass
class UnitQuality:
    """Unit-quality report of one label set against phone alignments."""

    pnmi: float
    phone_purity: float
    cluster_purity: float
    frames: int
    phones: int
    units_used: int
    agreement: float | None = None


def quality_from_counts(counts: np.ndarray, agreement_rate: float | None = None) -> UnitQuality:
    """The report of a ``[phones, units]`` count matrix (and an optional agreement to carry along)."""
    counts = np.asarray(counts)
    if counts.sum() == 0:
        raise ValueError("no aligned frames to measure unit quality on")
    return UnitQuality(
        pnmi=pnmi(counts),
        phone_purity=phone_purity(counts),
        cluster_purity=cluster_purity(counts),
        frames=int(counts.sum()),
        phones=int((counts.sum(1) > 0).sum()),
        units_used=int((counts.sum(0) > 0).sum()),
        agreement=agreement_rate,
    )


def format_quality(reports: Mapping[str, UnitQuality]) -> str:
    """A plain-text table, one row per named report."""
    columns = ("labels", "PNMI", "phone pur.", "cluster pur.", "agreement", "frames", "phones", "units")
    rows = []
    for name, q in reports.items():
        agree = "-" if q.agreement is None or math.isnan(q.agreement) else f"{q.agreement:.3f}"
        pnmi_text = "n/a" if math.isnan(q.pnmi) else f"{q.pnmi:.3f}"
        rows.append(
            (name, pnmi_text, f"{q.phone_purity:.3f}", f"{q.cluster_purity:.3f}", agree)
            + (str(q.frames), str(q.phones), str(q.units_used))
        )
    widths = [max(len(str(r[i])) for r in [columns, *rows]) for i in range(len(columns))]
    lines = [
        "  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(row, widths)))
        for row in [columns, *rows]
    ]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def sidecar_quality(shards, labels, compare=None, progress: bool = False) -> UnitQuality:
    """Unit quality of a label `Sidecar` on the shards' phone alignments; ``compare`` adds agreement with another.

    Only samples that have both labels and phoneme alignments count. Raises ``ValueError``
    when there are none (e.g. a real dataset without alignments).
    """
    from data_prep.clustering.kmeans import iter_metas

    if labels.rate is None:
        raise ValueError(f"{labels.source}: labels are not time-aligned (rate null), cannot align phones")
    counts = PhoneCounts()
    matches = total = 0
    for meta in iter_metas(shards, progress):
        if meta.key not in labels:
            continue
        units = np.asarray(labels[meta.key], dtype=np.int64)
        if meta.phonemes:
            counts.add_utterance(meta, units, labels.rate)
        if compare is not None and meta.key in compare:
            other = np.asarray(compare[meta.key], dtype=np.int64)
            length = min(len(units), len(other))
            valid = (units[:length] != IGNORE) & (other[:length] != IGNORE)
            matches += int((units[:length] == other[:length])[valid].sum())
            total += int(valid.sum())
    if not counts.phones:
        raise ValueError(f"no sample of {shards!r} has both {labels.name} labels and phoneme alignments")
    return quality_from_counts(counts.matrix(), matches / total if total else None)
