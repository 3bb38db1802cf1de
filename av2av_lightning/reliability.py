"""Reliability callbacks every training stage opts into with one config line.

Add ``- class_path: av2av_lightning.reliability.Reliability`` to ``trainer.callbacks``. It bundles:

- `AtomicCheckpoints`: checkpoints go through `AtomicCheckpointIO`, which writes a temporary
  file in the target folder, fsyncs it and ``os.replace``s it over the target, so a killed
  write leaves the previous ``last.ckpt`` intact. Lightning 2.6's own `TorchCheckpointIO`
  writes through an fsspec transaction whose temporary file lives in ``$TMPDIR``; when that
  is another file system (tmpfs, a scratch disk) ``shutil.move`` falls back to copying into
  the target, so a kill mid-copy truncates it, and nothing is fsynced.
- `StepSeeder`: reseeds torch, numpy and ``random`` before every training batch from (seed,
  epoch, batch index, rank), so the model's random draws (masks, dropout) after a resume are
  those of an uninterrupted run whatever ran before (sanity check, worker start-up).
- `NonFiniteGuard`: a non-finite training loss skips the step (no backward, no optimiser
  step, module buffers such as batch-norm statistics restored; with manual optimisation the
  whole batch is undone: weights, optimiser moments and step counts, LR schedulers, buffers),
  is counted and logged; ``max_consecutive`` in a row save the last good state and stop with
  `NonFiniteLossError`.
- `SkippedSamplesLogger`: per epoch and split, how many samples the data pipeline skipped
  and why (``skipped/<split>`` summed over ranks, ``skipped/<split>/<reason>`` of rank 0),
  plus one log line; the pipeline itself logs each skipped sample's key and shard.
"""

from __future__ import annotations

import copy
import logging
import os
import random
import tempfile
from collections import Counter
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import torch
from lightning.fabric.plugins.io.torch_io import TorchCheckpointIO
from lightning.pytorch.callbacks import Callback

log = logging.getLogger(__name__)

__all__ = [
    "AtomicCheckpointIO",
    "AtomicCheckpoints",
    "NonFiniteGuard",
    "NonFiniteLossError",
    "Reliability",
    "SkippedSamplesLogger",
    "StepSeeder",
    "atomic_torch_save",
]


# ---------------------------------------------------------------------------- atomic checkpoints


def atomic_torch_save(obj: Any, path: str | Path) -> None:
    """``torch.save`` to a temporary file beside ``path``, fsync, then ``os.replace``: all or nothing."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, temp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(handle, "wb") as file:
            torch.save(obj, file)
            file.flush()
            os.fsync(file.fileno())
        os.replace(temp, path)
    except BaseException:
        Path(temp).unlink(missing_ok=True)
        raise
    _fsync_dir(path.parent)


def _fsync_dir(folder: Path) -> None:
    """Make the rename itself durable (a no-op where folders cannot be opened, e.g. Windows)."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class AtomicCheckpointIO(TorchCheckpointIO):
    """`TorchCheckpointIO` whose local writes are atomic (`atomic_torch_save`); remote URLs are left to fsspec."""

    def save_checkpoint(self, checkpoint: dict[str, Any], path, storage_options: Any | None = None) -> None:
        if storage_options is not None:
            raise TypeError(f"{type(self).__name__} takes no storage_options, got {storage_options!r}")
        if "://" in str(path) and not str(path).startswith("file://"):
            super().save_checkpoint(checkpoint, path)
            return
        atomic_torch_save(checkpoint, str(path).removeprefix("file://"))


class AtomicCheckpoints(Callback):
    """Installs `AtomicCheckpointIO` unless the trainer was given a checkpoint IO plugin of its own."""

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if type(trainer.strategy.checkpoint_io) is TorchCheckpointIO:
            trainer.strategy.checkpoint_io = AtomicCheckpointIO()
        super().setup(trainer, pl_module, stage)


# ---------------------------------------------------------------------------- random state per step


class StepSeeder(Callback):
    """Seeds the global RNGs before each training batch from (seed, epoch, batch index, rank).

    Lightning restores weights, optimiser and loop counters but not the RNG streams, and
    the draws between start-up and the first step differ between a fresh and a resumed
    run; per-batch seeds make every batch's draws a function of its position alone (the
    batch index, not the global step, so accumulated micro-batches draw differently).

    Args:
        seed: base seed; None takes ``seed_everything``'s (``PL_GLOBAL_SEED``), else 0.
    """

    def __init__(self, seed: int | None = None) -> None:
        self.seed = seed

    def on_train_batch_start(
        self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        base = self.seed if self.seed is not None else int(os.environ.get("PL_GLOBAL_SEED", 0))
        words = np.random.SeedSequence([base, trainer.current_epoch, batch_idx, trainer.global_rank]).generate_state(4)
        torch.manual_seed(int(words[0]) << 32 | int(words[1]))  # also seeds every CUDA device
        np.random.seed(int(words[2]))
        random.seed(int(words[3]))
        super().on_train_batch_start(trainer, pl_module, batch, batch_idx)


# ---------------------------------------------------------------------------- non-finite losses


class NonFiniteLossError(RuntimeError):
    """Too many non-finite training losses in a row; the message names the saved last good state."""


def _loss_of(output: Any) -> torch.Tensor | None:
    if isinstance(output, torch.Tensor):
        return output
    if isinstance(output, dict):
        return output.get("loss")
    return None


class NonFiniteGuard(Callback):
    """Skips training steps whose loss is NaN or infinite; too many in a row stop the run.

    Automatic optimisation: it wraps the module's ``training_step``; a non-finite loss
    becomes ``None``, which Lightning treats as "skip backward and the optimiser update"
    (Lightning still counts the empty step in ``global_step`` and the LR schedule). The
    decision is taken over all ranks, so DDP ranks never disagree. Buffers updated by the
    forward pass (batch-norm statistics) are restored, so a skipped step changes nothing.

    Manual optimisation (GAN stages): an optimiser step whose gradients are not all finite
    is dropped (gradients set to None, so the optimiser leaves weights and moments alone), and
    so is every later step of the batch; at the batch's end everything the batch changed is put
    back as it was before it (`_BatchState`: the weights of every optimiser, their moments and
    step counts, the LR schedulers the module stepped, module buffers), so a discriminator step
    taken before the generator's non-finite one, or batch-norm statistics, leave no trace. That
    costs one copy of the weights and optimiser state per batch. Gradients are already reduced
    over ranks there, so ranks agree without a sync. As with automatic optimisation, Lightning
    still counts the dropped optimiser calls in ``global_step``.

    Args:
        max_consecutive: this many skipped steps in a row save ``nonfinite-last-good.ckpt``
            (in the checkpoint folder, else the trainer's root folder) and raise `NonFiniteLossError`.
    """

    CHECKPOINT_NAME = "nonfinite-last-good.ckpt"

    def __init__(self, max_consecutive: int = 5) -> None:
        if max_consecutive < 1:
            raise ValueError(f"max_consecutive must be >= 1, got {max_consecutive}")
        self.max_consecutive = max_consecutive
        self.nonfinite_total = 0
        self.nonfinite_in_a_row = 0
        self._wrapped: L.LightningModule | None = None
        self._skipped_in_batch = False
        self._before_batch: _BatchState | None = None

    def state_dict(self) -> dict[str, Any]:
        return {"nonfinite_total": self.nonfinite_total}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.nonfinite_total = int(state_dict.get("nonfinite_total", 0))

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if stage == "fit" and pl_module.automatic_optimization and self._wrapped is None:
            step = pl_module.training_step  # the bound method of the module's class

            def guarded(*args: Any, **kwargs: Any) -> Any:
                buffers = [(b, b.detach().clone()) for b in pl_module.buffers()]
                output = step(*args, **kwargs)
                loss = _loss_of(output)
                if loss is None or self._all_finite(trainer, loss):
                    self.nonfinite_in_a_row = 0
                    return output
                with torch.no_grad():
                    for buffer, saved in buffers:
                        buffer.copy_(saved)
                self._skipped(trainer, pl_module, loss)
                return None

            pl_module.training_step = guarded
            self._wrapped = pl_module
        super().setup(trainer, pl_module, stage)

    def teardown(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if self._wrapped is pl_module:
            del pl_module.training_step  # the instance attribute; the class's method shows again
            self._wrapped = None
        super().teardown(trainer, pl_module, stage)

    @staticmethod
    def _all_finite(trainer: L.Trainer, loss: torch.Tensor) -> bool:
        bad = (~torch.isfinite(loss.detach())).any().float()
        return not bool(trainer.strategy.reduce(bad, reduce_op="max") > 0)

    def _skipped(self, trainer: L.Trainer, pl_module: L.LightningModule, loss: torch.Tensor) -> None:
        self.nonfinite_total += 1
        self.nonfinite_in_a_row += 1
        self._skipped_in_batch = True
        log.warning(
            "non-finite training loss or gradients %s at step %d (epoch %d): step skipped (%d in a row, %d in all)",
            loss.detach().flatten()[:1].tolist(),
            trainer.global_step,
            trainer.current_epoch,
            self.nonfinite_in_a_row,
            self.nonfinite_total,
        )
        pl_module.log("train/nonfinite_skipped", float(self.nonfinite_total), reduce_fx="max", batch_size=1)

    def on_train_batch_start(
        self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        self._skipped_in_batch = False
        if not pl_module.automatic_optimization:
            self._before_batch = _BatchState.capture(trainer, pl_module)
        super().on_train_batch_start(trainer, pl_module, batch, batch_idx)

    def on_before_optimizer_step(
        self, trainer: L.Trainer, pl_module: L.LightningModule, optimizer: torch.optim.Optimizer
    ) -> None:
        super().on_before_optimizer_step(trainer, pl_module, optimizer)
        if pl_module.automatic_optimization:
            return
        grads = [p.grad for group in optimizer.param_groups for p in group["params"] if p.grad is not None]
        if not self._skipped_in_batch and all(torch.isfinite(g).all() for g in grads):
            return
        for group in optimizer.param_groups:
            for param in group["params"]:
                param.grad = None
        if not self._skipped_in_batch:  # later steps of a batch being undone are dropped without a count
            self._skipped(trainer, pl_module, torch.tensor(float("nan")))

    def on_train_batch_end(
        self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        if self._before_batch is not None and self._skipped_in_batch:
            self._before_batch.restore(trainer)
        self._before_batch = None
        super().on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)
        if not pl_module.automatic_optimization and not self._skipped_in_batch:
            self.nonfinite_in_a_row = 0
        if self.nonfinite_in_a_row < self.max_consecutive:
            return
        folder = getattr(trainer.checkpoint_callback, "dirpath", None) or trainer.default_root_dir
        path = Path(folder) / self.CHECKPOINT_NAME
        trainer.save_checkpoint(path)
        raise NonFiniteLossError(
            f"{self.nonfinite_in_a_row} non-finite training losses in a row (up to step {trainer.global_step}, "
            f"epoch {trainer.current_epoch}): stopped; the last good state is in {path}"
        )


class _BatchState:
    """A copy of what a manual-optimisation batch may change, to undo a batch with a non-finite step.

    The module steps its optimisers and LR schedulers itself, so a dropped generator step can follow a
    discriminator step that already happened, and the schedulers (which may gate when a loss joins,
    e.g. the vocoder's ``gan_start_step``) would count the batch.
    """

    def __init__(self, tensors: list[torch.Tensor], optimizers: list[dict], schedulers: list[dict]) -> None:
        self.tensors = [(tensor, tensor.detach().clone()) for tensor in tensors]
        self.optimizers = optimizers
        self.schedulers = schedulers

    @classmethod
    def capture(cls, trainer: L.Trainer, pl_module: L.LightningModule) -> _BatchState:
        params = {id(p): p for optimizer in trainer.optimizers for g in optimizer.param_groups for p in g["params"]}
        return cls(
            [*params.values(), *pl_module.buffers()],
            [copy.deepcopy(optimizer.state_dict()) for optimizer in trainer.optimizers],
            [copy.deepcopy(config.scheduler.state_dict()) for config in trainer.lr_scheduler_configs],
        )

    def restore(self, trainer: L.Trainer) -> None:
        with torch.no_grad():
            for tensor, saved in self.tensors:
                tensor.copy_(saved)
        for optimizer, state in zip(trainer.optimizers, self.optimizers):
            optimizer.load_state_dict(state)
        for config, state in zip(trainer.lr_scheduler_configs, self.schedulers):
            config.scheduler.load_state_dict(state)


# ---------------------------------------------------------------------------- skipped samples


class SkippedSamplesLogger(Callback):
    """Logs per epoch how many samples each split's loader skipped and why (from ``batch.skipped``)."""

    def __init__(self) -> None:
        self.skipped_by_split: dict[str, Counter] = {"train": Counter(), "val": Counter(), "test": Counter()}

    def _count(self, split: str, trainer: L.Trainer, batch: Any) -> None:
        if not trainer.sanity_checking:
            self.skipped_by_split[split].update(getattr(batch, "skipped", None) or {})

    def on_train_batch_end(
        self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        self._count("train", trainer, batch)
        super().on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)

    def on_validation_batch_end(
        self,
        trainer: L.Trainer,
        pl_module: L.LightningModule,
        outputs: Any,
        batch: Any,
        batch_idx: int,
        dataloader_idx: int = 0,
    ) -> None:
        self._count("val", trainer, batch)
        super().on_validation_batch_end(trainer, pl_module, outputs, batch, batch_idx, dataloader_idx)

    def _report(self, split: str, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        counts = self.skipped_by_split[split]
        total = sum(counts.values())
        pl_module.log(f"skipped/{split}", float(total), reduce_fx="sum", sync_dist=True, batch_size=1)
        for reason, count in sorted(counts.items()):
            pl_module.log(
                f"skipped/{split}/{reason.replace(' ', '_')}", float(count), rank_zero_only=True, batch_size=1
            )
        if total:
            reasons = ", ".join(f"{reason}: {count}" for reason, count in sorted(counts.items()))
            log.warning("epoch %d %s: skipped %d samples (%s)", trainer.current_epoch, split, total, reasons)
        counts.clear()

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._report("train", trainer, pl_module)
        super().on_train_epoch_end(trainer, pl_module)

    def on_validation_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not trainer.sanity_checking:
            self._report("val", trainer, pl_module)
        super().on_validation_epoch_end(trainer, pl_module)

    def on_test_batch_end(
        self,
        trainer: L.Trainer,
        pl_module: L.LightningModule,
        outputs: Any,
        batch: Any,
        batch_idx: int,
        dataloader_idx: int = 0,
    ) -> None:
        self._count("test", trainer, batch)
        super().on_test_batch_end(trainer, pl_module, outputs, batch, batch_idx, dataloader_idx)

    def on_test_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._report("test", trainer, pl_module)
        super().on_test_epoch_end(trainer, pl_module)


# ---------------------------------------------------------------------------- the bundle


class Reliability(NonFiniteGuard, SkippedSamplesLogger, StepSeeder, AtomicCheckpoints):
    """All of the above in one callback (each part's hooks call ``super()``, so they chain).

    Args:
        max_consecutive_nonfinite: `NonFiniteGuard`'s ``max_consecutive``.
        seed: `StepSeeder`'s seed (None: ``seed_everything``'s).
    """

    def __init__(self, max_consecutive_nonfinite: int = 5, seed: int | None = None) -> None:
        NonFiniteGuard.__init__(self, max_consecutive_nonfinite)
        SkippedSamplesLogger.__init__(self)
        StepSeeder.__init__(self, seed)
