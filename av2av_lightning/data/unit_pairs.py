"""Parallel unit pairs for the translator: utterances of one sentence in two languages, joined by sentence id.

The translator needs neither audio nor video, so this reads only the shards' metadata (sentence id, language,
split) and unit sidecars (`data_prep.units`); every ordered pair of languages of a sentence is one example.
Source and target units may come from different sidecars, so evaluation can translate units extracted from
AV, A or V input against reference target units from audio.

Training batches come from a `DistributedSampler` of this module's own (one replica outside DDP; padded, so
every rank steps equally often) whose order is a function of (seed, epoch) alone: Lightning calls its ``set_epoch``
at every epoch start, and `LazyLoader` draws a pass's indices only then, so a run resumed from a checkpoint
shuffles each later epoch as the uninterrupted run did (a generator seeded once would restart the sequence of
orders on resume). Validation and test pairs are split over
the ranks by `ExactlyOnceSampler`, which gives each pair to exactly one rank (the padded sampler would score
some pairs twice), so the synced metrics are those of one process.

Batches are `UnitPairBatch` (unit arrays and language names); the translation stage turns them into tokens with
its own vocabulary, so a unit or language the model does not know fails there in one line.

Example YAML::

    data:
      class_path: av2av_lightning.data.unit_pairs.UnitPairDataModule
      init_args:
        train_shards: data/demo/sentences/train-*.tar
        train_units: data/demo/units/audio/train.units.npz
        val_shards: data/demo/sentences/valid-*.tar
        val_units: data/demo/units/audio/valid.units.npz
"""

from __future__ import annotations

import itertools
import logging
from collections import defaultdict
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass

import lightning as L
import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, DistributedSampler

from av2av_lightning.data.datamodule import PassPosition, ResumableTrainLoader
from av2av_lightning.data.schema import SampleMeta
from av2av_lightning.data.sidecar import Sidecar

log = logging.getLogger(__name__)

__all__ = [
    "ExactlyOnceSampler",
    "LazyLoader",
    "ResumableSampler",
    "UnitPair",
    "UnitPairBatch",
    "UnitPairDataModule",
    "UnitPairDataset",
    "collate_pairs",
    "join_pairs",
]


@dataclass
class UnitPair:
    """One translation example: source units in ``src_lang``, reference units in ``tgt_lang``."""

    sentence_id: str
    src_lang: str
    tgt_lang: str
    src_units: np.ndarray
    tgt_units: np.ndarray
    src_key: str = ""
    tgt_key: str = ""


@dataclass
class UnitPairBatch:
    src_units: list[np.ndarray]
    tgt_units: list[np.ndarray]
    src_langs: list[str]
    tgt_langs: list[str]
    sentence_ids: list[str]

    def __len__(self) -> int:
        return len(self.src_units)


def join_pairs(
    metas: Iterable[SampleMeta],
    source_units: Mapping[str, np.ndarray],
    target_units: Mapping[str, np.ndarray] | None = None,
    languages: Sequence[str] | None = None,
) -> list[UnitPair]:
    """Every ordered (source, target) language pair of each sentence (same split and sentence id).

    Word clips, languages outside ``languages`` and samples without units are left out (the last counted
    in a log line).
    """
    target_units = source_units if target_units is None else target_units
    groups: dict[tuple[str, str], dict[str, list[str]]] = defaultdict(lambda: defaultdict(list))
    for meta in metas:
        if meta.kind == "sentence" and (languages is None or meta.lang in languages):
            groups[(meta.split, meta.sentence_id)][meta.lang].append(meta.key)
    pairs, missing = [], 0
    for (_, sentence_id), by_lang in sorted(groups.items()):
        for src_lang, src_keys in sorted(by_lang.items()):
            for tgt_lang, tgt_keys in sorted(by_lang.items()):
                if src_lang == tgt_lang:
                    continue
                for src_key in src_keys:
                    for tgt_key in tgt_keys:
                        if src_key not in source_units or tgt_key not in target_units:
                            missing += 1
                            continue
                        src, tgt = np.asarray(source_units[src_key]), np.asarray(target_units[tgt_key])
                        pairs.append(UnitPair(sentence_id, src_lang, tgt_lang, src, tgt, src_key, tgt_key))
    if missing:
        log.warning("%d sentence pairs left out: a side has no units", missing)
    return pairs


class UnitPairDataset(Dataset):
    def __init__(self, pairs: Sequence[UnitPair]) -> None:
        self.pairs = list(pairs)

    def __len__(self) -> int:
        return len(self.pairs)

    def __getitem__(self, index: int) -> UnitPair:
        return self.pairs[index]


def collate_pairs(pairs: Sequence[UnitPair]) -> UnitPairBatch:
    return UnitPairBatch(
        [p.src_units for p in pairs],
        [p.tgt_units for p in pairs],
        [p.src_lang for p in pairs],
        [p.tgt_lang for p in pairs],
        [p.sentence_id for p in pairs],
    )


class ExactlyOnceSampler(DistributedSampler):
    """Rank ``r`` of ``n`` reads the ``r``-th of ``n`` contiguous blocks of the dataset, with no padding: every
    index exactly once over the ranks (block sizes differ by at most one). Contiguous blocks keep the pairs of a
    sentence (all its directions) together on one rank. A `DistributedSampler`, so Lightning does not replace it."""

    def __init__(self, dataset: Dataset, num_replicas: int, rank: int) -> None:
        super().__init__(dataset, num_replicas=num_replicas, rank=rank, shuffle=False)
        size = len(dataset)
        self.start, self.stop = size * rank // num_replicas, size * (rank + 1) // num_replicas
        self.num_samples = self.stop - self.start

    def __iter__(self):
        return iter(range(self.start, self.stop))


class ResumableSampler(DistributedSampler):
    """A `DistributedSampler` whose next pass can start after its first samples (a run resumed mid-epoch)."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.skip = 0

    def __iter__(self) -> Iterator[int]:
        skip, self.skip = self.skip, 0
        return itertools.islice(super().__iter__(), skip, None)


class LazyLoader(DataLoader):
    """A `DataLoader` whose pass (worker processes, the sampler's indices) starts at its first batch, not at ``iter()``.

    Lightning calls ``iter()`` on the training loader before it restores a checkpoint (for the estimated number of
    steps) and before the epoch's ``set_epoch``, and reuses that iterator for the first epoch of a resumed run;
    workers would draw their first indices at once, from epoch 0's order. Its `PassPosition` (epoch, batches
    yielded) goes into checkpoints; restored, the next pass of that epoch starts after those batches (the sampler
    drops their indices, so nothing is loaded for them).
    """

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.position = PassPosition()

    def state_dict(self) -> dict[str, int]:
        return self.position.state_dict()

    def load_state_dict(self, state_dict: dict[str, int]) -> None:
        self.position.load_state_dict(state_dict)

    def __iter__(self) -> Iterator[UnitPairBatch]:
        skip = self.position.start(getattr(self.sampler, "epoch", 0))
        if skip:
            self.sampler.skip = skip * self.batch_size
        yield from self.position.count(super().__iter__())


def _world() -> tuple[int, int]:
    """(world size, rank) of the initialised process group, or (1, 0)."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_world_size(), torch.distributed.get_rank()
    return 1, 0


class UnitPairDataModule(ResumableTrainLoader, L.LightningDataModule):
    """Parallel unit pairs per split from shards (metadata only) and unit sidecars.

    Args:
        train_shards, val_shards, test_shards: shard patterns (as `AVDataModule` takes them).
        train_units, val_units, test_units: unit sidecar(s) of the source side (``.units.npz``).
        val_target_units, test_target_units: sidecar(s) of the reference target side (default: the source's),
            e.g. audio-only units while the sources come from video-only input.
        languages: keep only these languages (None: all).
        batch_size: sentence pairs per batch.
        num_workers: DataLoader worker processes.
        seed: of the training shuffle (each epoch's order is drawn from seed + epoch).
    """

    def __init__(
        self,
        train_shards: str | list[str] | None = None,
        train_units: str | list[str] | None = None,
        val_shards: str | list[str] | None = None,
        val_units: str | list[str] | None = None,
        val_target_units: str | list[str] | None = None,
        test_shards: str | list[str] | None = None,
        test_units: str | list[str] | None = None,
        test_target_units: str | list[str] | None = None,
        languages: list[str] | None = None,
        batch_size: int = 32,
        num_workers: int = 0,
        seed: int = 0,
    ) -> None:
        super().__init__()
        if batch_size < 1:
            raise ValueError(f"batch_size must be positive, got {batch_size}")
        self.save_hyperparameters(logger=False)
        self.sources = {
            "train": (train_shards, train_units, None),
            "val": (val_shards, val_units, val_target_units),
            "test": (test_shards, test_units, test_target_units),
        }
        self.datasets: dict[str, UnitPairDataset] = {}

    def build_dataset(self, split: str) -> UnitPairDataset:
        from data_prep.clustering.kmeans import iter_metas

        shards, units, target_units = self.sources[split]
        if shards is None or units is None:
            raise ValueError(f"{split}: give both {split}_shards and {split}_units")
        source = Sidecar.load(units)
        target = Sidecar.load(target_units) if target_units is not None else source
        pairs = join_pairs(iter_metas(shards), source, target, self.hparams.languages)
        if not pairs:
            raise ValueError(f"{split}: no parallel sentence pair in {shards!r} with units in {units!r}")
        return UnitPairDataset(pairs)

    def setup(self, stage: str | None = None) -> None:
        wanted = {"fit": ("train", "val"), "validate": ("val",), "test": ("test",)}.get(stage, ("train", "val", "test"))
        for split in wanted:
            if self.sources[split][0] is not None and split not in self.datasets:
                self.datasets[split] = self.build_dataset(split)

    def _loader(self, split: str) -> LazyLoader:
        if split not in self.datasets:
            self.datasets[split] = self.build_dataset(split)
        dataset, (world, rank) = self.datasets[split], _world()
        if split == "train":
            sampler = ResumableSampler(dataset, num_replicas=world, rank=rank, shuffle=True, seed=self.hparams.seed)
        else:
            sampler = ExactlyOnceSampler(dataset, world, rank) if world > 1 else None
        return LazyLoader(
            dataset,
            batch_size=self.hparams.batch_size,
            sampler=sampler,
            num_workers=self.hparams.num_workers,
            collate_fn=collate_pairs,
        )

    def train_dataloader(self) -> LazyLoader:
        return self._resumable(self._loader("train"))

    def val_dataloader(self) -> LazyLoader | list:
        return self._loader("val") if self.sources["val"][0] is not None else []

    def test_dataloader(self) -> LazyLoader:
        return self._loader("test")
