"""`AVDataModule`: the one LightningDataModule every stage reads its shards through.

It builds an `AVShardDataset` per split and wraps it in an `AVDataLoader` (a plain
``torch.utils.data.DataLoader`` with ``batch_size=None``: batching happens in the
pipeline). The loader adds the skip counts each batch carries to ``datamodule.skipped``
(reason -> count, this process only), so a stage can log them, e.g.
``self.log_dict({f"skipped/{k}": v for k, v in dm.skipped.items()})``; each batch also
carries ``batch.num_skipped`` for per-step logging.

Exact resume: the training loader's `PassPosition` (epoch, batches yielded) goes into every
checkpoint, also one written mid-epoch (``ModelCheckpoint(every_n_train_steps=...)``); a run
resumed from it continues with the batch that would have come next. The position counts
batches handed to the training loop, so a checkpoint written in the middle of a training step
(Lightning's SLURM auto-requeue handler) resumes one batch late.

Distributed: rank and world size come from the attached trainer (``global_rank``,
``world_size``), else torch.distributed, else (0, 1); `set_distributed` overrides them.
Training batches per epoch are the same on every rank (``train_batches_per_epoch``);
evaluation reads each sample exactly once over all ranks and workers, so ranks may see
different numbers of evaluation batches (sync metrics at epoch end, not per step).

Example YAML (LightningCLI)::

    data:
      class_path: av2av_lightning.data.datamodule.AVDataModule
      init_args:
        train_shards: data/demo/sentences/train-{000000..000003}.tar
        val_shards: data/demo/sentences/valid-000000.tar
        sidecars: {km100: data/labels/mfcc_km100.npz}
        max_frames: 1000
        train_batches_per_epoch: 500
"""

from __future__ import annotations

import warnings
from collections import Counter
from collections.abc import Callable, Iterator
from typing import TypeVar

import lightning as L
import torch
from torch.utils.data import DataLoader

from av2av_lightning.data.batching import AVBatch
from av2av_lightning.data.noise import NOISE_TYPES
from av2av_lightning.data.pipeline import AVShardDataset, distributed_info
from av2av_lightning.data.sidecar import Sidecar
from data_prep.vocab import read_words

__all__ = ["AVDataLoader", "AVDataModule", "PassPosition", "ResumableTrainLoader"]

SPLITS = ("train", "val", "test", "predict")
Loader = TypeVar("Loader", bound=DataLoader)

# Lightning warns about any IterableDataset with __len__; ours is exact per rank (each worker
# yields precisely its share of the batches), so the warning would only mislead.
warnings.filterwarnings("ignore", message=r"Your `IterableDataset` has `__len__` defined", category=UserWarning)


class PassPosition:
    """Where a training loader's pass stands: its epoch and the batches it has yielded.

    Lightning saves it in checkpoints (through the loader's ``state_dict``), also mid-epoch; restored, it makes the
    next pass of the same epoch skip the batches the interrupted run had already trained on, so a resumed run
    continues with the batch that would have come next.
    """

    def __init__(self) -> None:
        self.epoch = 0
        self.batches = 0
        self._restored = False

    def state_dict(self) -> dict[str, int]:
        return {"epoch": self.epoch, "batches": self.batches}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.epoch, self.batches, self._restored = int(state["epoch"]), int(state["batches"]), True

    def start(self, epoch: int) -> int:
        """Begin a pass of ``epoch``: the batches it must skip (those of a restored position in the same epoch)."""
        skip = self.batches if self._restored and epoch == self.epoch else 0
        self.epoch, self.batches, self._restored = epoch, skip, False
        return skip

    def count(self, batches: Iterator) -> Iterator:
        for batch in batches:
            self.batches += 1
            yield batch


class ResumableTrainLoader:
    """Data-module mixin: the training loader's `PassPosition` goes into the data module's checkpoint state too.

    Lightning restores a training loader's own state only if it builds the loader after loading the checkpoint;
    every stage reads ``trainer.estimated_stepping_batches`` in ``configure_optimizers``, which builds it before
    (Lightning 2.6), so the position would be lost. A data module's state is restored first, and handed here to
    the next training loader.
    """

    _train_loader = None
    _train_position: dict[str, int] | None = None

    def state_dict(self) -> dict:
        return {"train_position": self._train_loader.state_dict()} if self._train_loader is not None else {}

    def load_state_dict(self, state_dict: dict) -> None:
        self._train_position = state_dict.get("train_position")
        if self._train_loader is not None and self._train_position is not None:
            self._train_loader.load_state_dict(self._train_position)

    def _resumable(self, loader: Loader) -> Loader:
        self._train_loader = loader
        if self._train_position is not None:
            loader.load_state_dict(self._train_position)
            self._train_position = None
        return loader


class AVDataLoader(DataLoader):
    """DataLoader over an `AVShardDataset` that tallies ``batch.skipped`` into ``counter``.

    Before each pass it sets the dataset's epoch (from ``epoch_source`` when given, else
    a pass counter), so worker processes re-created every epoch draw new random streams.
    The pass (and its worker processes) starts at the first batch, not at ``iter()``: Lightning
    makes the iterator before it sets the epoch and restores a checkpoint's `PassPosition`.
    """

    def __init__(
        self,
        dataset: AVShardDataset,
        *args,
        counter: Counter | None = None,
        epoch_source: Callable[[], int | None] | None = None,
        **kwargs,
    ) -> None:
        kwargs.setdefault("batch_size", None)
        super().__init__(dataset, *args, **kwargs)
        self.counter = counter if counter is not None else Counter()
        self.epoch_source = epoch_source
        self.position = PassPosition()
        self._passes = 0

    def state_dict(self) -> dict[str, int]:
        return self.position.state_dict()

    def load_state_dict(self, state_dict: dict[str, int]) -> None:
        """Resume at a saved position; without an epoch source the pass counter continues from its epoch."""
        self.position.load_state_dict(state_dict)
        if self.epoch_source is None:
            self._passes = self.position.epoch

    def __iter__(self) -> Iterator[AVBatch]:
        epoch = self.epoch_source() if self.epoch_source is not None else None
        epoch = self._passes if epoch is None else epoch
        self._passes += 1
        skip = self.position.start(epoch)
        if hasattr(self.dataset, "set_epoch"):
            self.dataset.set_epoch(epoch)
        if hasattr(self.dataset, "skip_batches"):
            self.dataset.skip_batches(skip)
        for batch in self.position.count(super().__iter__()):
            if isinstance(batch, AVBatch) and batch.skipped:
                self.counter.update(batch.skipped)
            yield batch


class AVDataModule(ResumableTrainLoader, L.LightningDataModule):
    """Audio-visual shards for every stage: frame-budget batches of `AVBatch`.

    Args:
        train_shards, val_shards, test_shards, predict_shards: shard patterns (path, brace
            pattern ``data/train-{000000..000003}.tar``, glob, directory, URL or a list);
            ``predict_shards`` defaults to ``test_shards``.
        sidecars: ``label name -> sidecar .npz path`` (or list of paths), joined by sample key
            into ``batch.labels[name]``; samples without an entry are skipped and counted.
        max_frames: frame budget per batch (``max length x batch size``, 25 fps frames).
        max_sample_frames: crop longer samples (random window in training, start in evaluation).
        train_batches_per_epoch: batches per rank per training epoch.
        num_workers: DataLoader worker processes per rank.
        load_face: decode the RGB face video into ``batch.face``.
        kinds: keep only these kinds (``sentence``, ``word``); None keeps all.
        languages: keep only these languages; None keeps all.
        words: a word list (a file from ``av2av vocab words``, or its ``lang/label`` entries): keep only the word
            clips it names, the classes of a word classifier; None keeps all.
        noise_prob: probability of adding noise to an utterance (0 disables noise).
        noise_snr_db: SNR in dB, or ``[low, high]`` for a uniform draw.
        noise_types: ``white`` and/or ``babble``.
        noise_splits: which splits get noise (``train``, ``val``, ``test``, ``predict``).
        length_tolerance: frames audio, video and metadata may differ before a sample is skipped.
        require_text: skip samples with an empty transcript (False for unlabelled pretraining data).
        buffer_size: samples per bucketing buffer.
        pin_memory: pinned host memory for batches (None: when CUDA is available).
        persistent_workers: keep workers between epochs.
        window: audio feature analysis window (hamming, povey, rectangular).
        seed: base seed of shard sampling, crops, flips and noise.
    """

    def __init__(
        self,
        train_shards: str | list[str] | None = None,
        val_shards: str | list[str] | None = None,
        test_shards: str | list[str] | None = None,
        predict_shards: str | list[str] | None = None,
        sidecars: dict[str, str | list[str]] | None = None,
        max_frames: int = 1000,
        max_sample_frames: int | None = None,
        train_batches_per_epoch: int = 1000,
        num_workers: int = 2,
        load_face: bool = False,
        kinds: list[str] | None = None,
        languages: list[str] | None = None,
        words: str | list[str] | None = None,
        noise_prob: float = 0.0,
        noise_snr_db: float | tuple[float, float] = 0.0,
        noise_types: tuple[str, ...] = NOISE_TYPES,
        noise_splits: tuple[str, ...] = ("train",),
        length_tolerance: int = 2,
        require_text: bool = True,
        buffer_size: int = 256,
        pin_memory: bool | None = None,
        persistent_workers: bool = False,
        window: str = "hamming",
        seed: int = 0,
    ) -> None:
        super().__init__()
        unknown = set(noise_splits) - set(SPLITS)
        if unknown:
            raise ValueError(f"noise_splits must be among {SPLITS}, got {sorted(unknown)}")
        if num_workers < 0:
            raise ValueError(f"num_workers must be >= 0, got {num_workers}")
        self.save_hyperparameters(logger=False)
        self.shards = {
            "train": train_shards,
            "val": val_shards,
            "test": test_shards,
            "predict": predict_shards if predict_shards is not None else test_shards,
        }
        self.sidecars = dict(sidecars or {})
        self.max_frames = max_frames
        self.max_sample_frames = max_sample_frames
        self.train_batches_per_epoch = train_batches_per_epoch
        self.num_workers = num_workers
        self.load_face = load_face
        self.kinds = kinds
        self.languages = languages
        self.words = read_words(words) if isinstance(words, str) else words
        self.noise = {"noise_prob": noise_prob, "noise_snr_db": noise_snr_db, "noise_types": tuple(noise_types)}
        self.noise_splits = tuple(noise_splits)
        self.length_tolerance = length_tolerance
        self.require_text = require_text
        self.buffer_size = buffer_size
        self.pin_memory = torch.cuda.is_available() if pin_memory is None else pin_memory
        self.persistent_workers = persistent_workers
        self.window = window
        self.seed = seed
        self.skipped: Counter = Counter()
        self.datasets: dict[str, AVShardDataset] = {}
        self._loaded_sidecars = None
        self._distributed: tuple[int, int] | None = None

    # -- distributed position

    def set_distributed(self, rank: int, world_size: int) -> None:
        """Pretend to be ``rank`` of ``world_size`` (tests, manual sharding)."""
        self._distributed = (int(rank), int(world_size))
        for dataset in self.datasets.values():
            dataset.rank, dataset.world_size = self._distributed

    def distributed(self) -> tuple[int, int]:
        if self._distributed is not None:
            return self._distributed
        trainer = self._trainer_or_none()
        if trainer is not None:
            return trainer.global_rank, trainer.world_size
        return distributed_info()

    def _trainer_or_none(self):
        return getattr(self, "trainer", None)

    # -- datasets

    def _sidecars(self):
        if self._loaded_sidecars is None:
            self._loaded_sidecars = {name: Sidecar.load(path) for name, path in self.sidecars.items()}
        return self._loaded_sidecars

    def build_dataset(self, split: str) -> AVShardDataset:
        """The dataset of one split (``train``, ``val``, ``test``, ``predict``); errors name a bad pattern."""
        if split not in SPLITS:
            raise ValueError(f"unknown split {split!r}, use one of {SPLITS}")
        pattern = self.shards[split]
        if pattern is None:
            raise ValueError(f"no {split}_shards configured for {type(self).__name__}")
        rank, world = self.distributed()
        noise = self.noise if split in self.noise_splits else {"noise_prob": 0.0}
        return AVShardDataset(
            pattern,
            train=split == "train",
            max_frames=self.max_frames,
            max_sample_frames=self.max_sample_frames,
            batches_per_epoch=self.train_batches_per_epoch if split == "train" else None,
            load_face=self.load_face,
            kinds=self.kinds,
            languages=self.languages,
            words=self.words,
            sidecars=self._sidecars(),
            length_tolerance=self.length_tolerance,
            require_text=self.require_text,
            buffer_size=self.buffer_size,
            window=self.window,
            seed=self.seed + 1000 * SPLITS.index(split),
            rank=rank,
            world_size=world,
            **noise,
        )

    def setup(self, stage: str | None = None) -> None:
        wanted = {
            "fit": ("train", "val"),
            "validate": ("val",),
            "test": ("test",),
            "predict": ("predict",),
            None: SPLITS,
        }.get(stage, SPLITS)
        for split in wanted:
            optional = (split == "val" and stage == "fit") or stage is None
            if self.shards[split] is None and optional:
                continue
            self.datasets[split] = self.build_dataset(split)

    def _loader(self, split: str) -> AVDataLoader:
        if split not in self.datasets:
            self.datasets[split] = self.build_dataset(split)
        dataset = self.datasets[split]
        dataset.rank, dataset.world_size = self.distributed()
        trainer = self._trainer_or_none()
        epoch_source = (lambda: trainer.current_epoch) if trainer is not None and split == "train" else None
        return AVDataLoader(
            dataset,
            num_workers=self.num_workers,
            pin_memory=self.pin_memory,
            persistent_workers=self.persistent_workers and self.num_workers > 0,
            counter=self.skipped,
            epoch_source=epoch_source,
        )

    def train_dataloader(self) -> AVDataLoader:
        return self._resumable(self._loader("train"))

    def untracked_loader(self, split: str) -> AVDataLoader:
        """A loader over ``split`` whose position no checkpoint keeps: a look at the data outside the training loop
        (e.g. a data-dependent initialisation) that leaves a resumed run's place in its epoch alone."""
        return self._loader(split)

    def val_dataloader(self) -> AVDataLoader | list:
        if self.shards["val"] is None:
            return []
        return self._loader("val")

    def test_dataloader(self) -> AVDataLoader:
        return self._loader("test")

    def predict_dataloader(self) -> AVDataLoader:
        return self._loader("predict")
