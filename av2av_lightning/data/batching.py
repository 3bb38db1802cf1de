"""Frame-budget batching with length bucketing, and the batch every stage receives (`AVBatch`).

Batching: samples are buffered (``buffer_size`` at a time), sorted by length and packed
greedily into batches whose *padded* size, ``max(length) * batch_size`` in video frames,
stays within ``max_frames``. A sample longer than the budget on its own gets a batch of its
own (the pipeline crops samples to ``max_sample_frames`` first when that is set). In
training the batch order is shuffled; in evaluation batches come out shortest first
within each buffer.

`AVBatch` layout (B utterances, T = longest in frames at 25 fps, S = T * 640 samples):

==================  ===========================  ===========================================
field               shape / type                 content
==================  ===========================  ===========================================
keys                list[str]                    sample keys
meta                list[SampleMeta]             metadata (num_frames = frames after crop)
audio               float32 [B, T, 104]          stacked log filterbanks (noisy if noise on)
video               float32 [B, 1, T, 88, 88]    normalised lip crops (AV-HuBERT B,C,T,H,W)
lengths             int64 [B]                    valid frames
padding_mask        bool [B, T]                  True = padding
wave                float32 [B, S]               clean 16 kHz audio, zero-padded
wave_lengths        int64 [B]                    valid samples (= 640 * lengths)
face                float32 [B, T, 3, 96, 96]    RGB face in [0,1], or None
labels              dict[str, int64 [B, T']]     sidecars, -100 = padding; T' = T * rate/25
                                                 (aligned), longest sequence (rate None)
label_lengths       dict[str, int64 [B]]         valid label frames per sample
noisy_wave          float32 [B, S] or None       the noisy audio the features come from
                                                 (None when noise is off for the split)
snr_db              float32 [B]                  SNR of the added noise, inf = clean
num_skipped         int                          samples the worker skipped since its last batch
skipped             dict[str, int]               the same, per reason
==================  ===========================  ===========================================

Padding is zero everywhere (also in normalised video/features), -100 in labels.
"""

from __future__ import annotations

import math
import random
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field, fields, replace

import numpy as np
import torch

from av2av_lightning.data.features import audio_features
from av2av_lightning.data.schema import SAMPLES_PER_FRAME, VIDEO_FPS, SampleMeta
from av2av_lightning.data.transforms import face_transform, normalize_lip

IGNORE_INDEX = -100

__all__ = [
    "IGNORE_INDEX",
    "AVBatch",
    "Example",
    "bucket_batches",
    "collate",
    "label_frames",
    "pack_by_budget",
]


@dataclass
class Example:
    """One decoded, validated, cropped sample on its way into a batch (worker side)."""

    meta: SampleMeta
    wave: np.ndarray  # float32 [T * 640], clean
    lip: torch.Tensor  # uint8 [T, 88, 88], cropped (and flipped)
    face: np.ndarray | None = None  # uint8 [T, 96, 96, 3]
    labels: dict[str, np.ndarray] = field(default_factory=dict)
    noisy: np.ndarray | None = None  # float32 [T * 640] when noise was added
    snr_db: float = math.inf

    @property
    def num_frames(self) -> int:
        return int(self.lip.shape[0])


def label_frames(num_frames: int, rate: float | None) -> int | None:
    """Label frames covering ``num_frames`` video frames at ``rate`` Hz (None: not aligned)."""
    return None if rate is None else int(round(num_frames * rate / VIDEO_FPS))


@dataclass
class AVBatch:
    keys: list[str]
    meta: list[SampleMeta]
    audio: torch.Tensor
    video: torch.Tensor
    lengths: torch.Tensor
    padding_mask: torch.Tensor
    wave: torch.Tensor
    wave_lengths: torch.Tensor
    face: torch.Tensor | None = None
    labels: dict[str, torch.Tensor] = field(default_factory=dict)
    label_lengths: dict[str, torch.Tensor] = field(default_factory=dict)
    noisy_wave: torch.Tensor | None = None
    snr_db: torch.Tensor | None = None
    num_skipped: int = 0
    skipped: dict[str, int] = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.keys)

    @property
    def batch_size(self) -> int:
        return len(self.keys)

    @property
    def num_frames(self) -> int:
        """Valid (unpadded) frames in the batch."""
        return int(self.lengths.sum())

    def _map(self, fn: Callable[[torch.Tensor], torch.Tensor]) -> AVBatch:
        changes = {}
        for f in fields(self):
            value = getattr(self, f.name)
            if isinstance(value, torch.Tensor):
                changes[f.name] = fn(value)
            elif isinstance(value, dict) and value and all(isinstance(v, torch.Tensor) for v in value.values()):
                changes[f.name] = {k: fn(v) for k, v in value.items()}
        return replace(self, **changes)

    def to(self, device: torch.device | str, non_blocking: bool = False) -> AVBatch:
        """A copy with every tensor on ``device`` (lists and metadata shared)."""
        return self._map(lambda t: t.to(device, non_blocking=non_blocking))

    def pin_memory(self) -> AVBatch:
        """Called by the DataLoader's pin-memory thread (``pin_memory=True``)."""
        return self._map(lambda t: t.pin_memory())


# ---------------------------------------------------------------------------- bucketing


def pack_by_budget(lengths: Sequence[int], max_frames: int) -> list[list[int]]:
    """Indices grouped into batches, shortest first, each with ``max(len) * size <= max_frames``.

    Greedy over the lengths sorted ascending (stable); a sample longer than the budget forms
    a batch of its own.
    """
    if max_frames <= 0:
        raise ValueError(f"max_frames must be positive, got {max_frames}")
    order = sorted(range(len(lengths)), key=lambda i: lengths[i])
    batches: list[list[int]] = []
    current: list[int] = []
    for index in order:
        longest = lengths[index]  # ascending: the newcomer is the longest
        if current and longest * (len(current) + 1) > max_frames:
            batches.append(current)
            current = []
        current.append(index)
    if current:
        batches.append(current)
    return batches


def bucket_batches(
    items: Iterable,
    length: Callable[[object], int],
    max_frames: int,
    buffer_size: int = 256,
    shuffle: bool = False,
    rng: random.Random | None = None,
) -> Iterator[list]:
    """Group a stream into frame-budget batches of similar lengths.

    Reads ``buffer_size`` items, packs them with `pack_by_budget`, yields the batches (in a
    random order when ``shuffle``), and repeats; the rest is packed at the end of the stream.
    """
    rng = rng or random.Random(0)
    buffer: list = []

    def flush():
        groups = pack_by_budget([length(item) for item in buffer], max_frames)
        if shuffle:
            rng.shuffle(groups)
        batch_items = [[buffer[i] for i in group] for group in groups]
        buffer.clear()
        return batch_items

    for item in items:
        buffer.append(item)
        if len(buffer) >= buffer_size:
            yield from flush()
    if buffer:
        yield from flush()


# ---------------------------------------------------------------------------- collation


def _pad_stack(arrays: Sequence[torch.Tensor], total: int, value=0) -> torch.Tensor:
    out = arrays[0].new_full((len(arrays), total, *arrays[0].shape[1:]), value)
    for row, array in enumerate(arrays):
        out[row, : len(array)] = array
    return out


def collate(
    examples: Sequence[Example],
    label_rates: dict[str, float | None] | None = None,
    with_noise: bool = False,
    with_face: bool = False,
    window: str = "hamming",
    skipped: dict[str, int] | None = None,
) -> AVBatch:
    """Pad a list of `Example` into an `AVBatch` (features computed batched)."""
    if not examples:
        raise ValueError("cannot collate an empty batch")
    lengths = torch.tensor([ex.num_frames for ex in examples], dtype=torch.long)
    total = int(lengths.max())
    wave_lengths = lengths * SAMPLES_PER_FRAME
    waves = _pad_stack([torch.from_numpy(ex.wave) for ex in examples], total * SAMPLES_PER_FRAME)
    noisy = None
    if with_noise:
        noisy = _pad_stack(
            [torch.from_numpy(ex.noisy if ex.noisy is not None else ex.wave) for ex in examples],
            total * SAMPLES_PER_FRAME,
        )
    audio = audio_features(noisy if noisy is not None else waves, lengths, wave_lengths, window=window)
    padding_mask = torch.arange(total)[None] >= lengths[:, None]
    video = normalize_lip(_pad_stack([ex.lip for ex in examples], total))
    video = video.masked_fill_(padding_mask[:, :, None, None], 0.0).unsqueeze(1)
    face = None
    if with_face:
        if any(ex.face is None for ex in examples):
            raise ValueError("with_face=True but a sample has no face video")
        face = face_transform(_pad_stack([torch.from_numpy(ex.face) for ex in examples], total))
    labels, label_lengths = {}, {}
    for name, rate in (label_rates or {}).items():
        arrays = [torch.from_numpy(np.asarray(ex.labels[name], dtype=np.int64)) for ex in examples]
        counts = torch.tensor([len(a) for a in arrays], dtype=torch.long)
        width = label_frames(total, rate) if rate is not None else int(counts.max())
        labels[name] = _pad_stack(arrays, max(width, int(counts.max())), IGNORE_INDEX)[:, :width]
        label_lengths[name] = counts.clamp(max=width)
    skipped = dict(skipped or {})
    return AVBatch(
        keys=[ex.meta.key for ex in examples],
        meta=[ex.meta for ex in examples],
        audio=audio,
        video=video,
        lengths=lengths,
        padding_mask=padding_mask,
        wave=waves,
        wave_lengths=wave_lengths,
        face=face,
        labels=labels,
        label_lengths=label_lengths,
        noisy_wave=noisy,
        snr_db=torch.tensor([ex.snr_db for ex in examples], dtype=torch.float32),
        num_skipped=sum(skipped.values()),
        skipped=skipped,
    )
