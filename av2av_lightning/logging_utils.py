"""W&B run bookkeeping for `av2av fit`: the full resolved config on the run, grouped and tagged by experiment,
and validation media as tables.

`WandbConfigCallback` replaces LightningCLI's ``SaveConfigCallback`` (``LightningCLI(save_config_callback=
WandbConfigCallback, ...)``): it still writes ``config.yaml`` to the log folder, and on rank 0 it logs the
resolved config (every default filled in, secrets redacted) to each `WandbLogger` of the trainer, with
``experiment`` (the first ``--config`` file, e.g. ``pretrain/tiny``) and ``ablation`` (the stems of later
``--config`` files, e.g. ``no_modality_dropout``) as config keys and tags, so runs compare by them in the UI.
Other loggers are left alone, so a CSV run never imports wandb. Tests and clusters without network run W&B
with ``WANDB_MODE=offline`` (``wandb sync`` uploads later); nothing here waits on a server.

`log_media_table` puts generated samples next to their references in one ``wandb.Table`` per call (audio as
``wandb.Audio``, face clips as H.264 ``wandb.Video``), on every `WandbLogger` of the trainer; TensorBoard gets
the audio columns through ``add_audio``; other loggers get nothing.
"""

from __future__ import annotations

import io
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import yaml
from lightning.pytorch.cli import SaveConfigCallback

from av2av_lightning.data.codecs import encode_video
from av2av_lightning.data.schema import SAMPLE_RATE, VIDEO_FPS

SECRET = re.compile(r"api_?key|token|secret|password|credential", re.IGNORECASE)
REDACTED = "<redacted>"


def redact(config):
    """A copy of a nested config with every value under a secret-looking key replaced."""
    if isinstance(config, dict):
        return {k: REDACTED if SECRET.search(str(k)) else redact(v) for k, v in config.items()}
    if isinstance(config, list):
        return [redact(v) for v in config]
    return config


def experiment_names(config_files: list[str | Path]) -> tuple[str, list[str]]:
    """(experiment, ablations) from the ``--config`` files: ``experiments/pretrain/tiny.yaml`` -> ``pretrain/tiny``."""
    if not config_files:
        return "", []
    first = Path(config_files[0]).with_suffix("")
    parts = first.parts[first.parts.index("experiments") + 1 :] if "experiments" in first.parts else first.parts[-2:]
    return "/".join(parts), [Path(path).stem for path in config_files[1:]]


def loggers_of(trainer, name: str) -> list:
    """The trainer's loggers of class ``name`` (by name, so no logger module, wandb above all, gets imported)."""
    return [logger for logger in trainer.loggers if type(logger).__name__ == name]


def _array(value) -> np.ndarray:
    return value.detach().float().cpu().numpy() if isinstance(value, torch.Tensor) else np.asarray(value)


def _cell(wandb, value, caption: str, sample_rate: int, fps: int):
    """A table cell: a waveform [samples] -> ``wandb.Audio``, frames [T, 3, H, W] in [0, 1] -> ``wandb.Video``."""
    if not isinstance(value, (torch.Tensor, np.ndarray)):
        return value
    array = _array(value)
    if array.ndim == 1:
        return wandb.Audio(np.clip(array, -1, 1), sample_rate=sample_rate, caption=caption)
    if array.ndim == 4 and array.shape[1] == 3:
        frames = (np.clip(array.transpose(0, 2, 3, 1), 0, 1) * 255).round().astype(np.uint8)
        return wandb.Video(io.BytesIO(encode_video(frames, fps)), caption=caption, format="mp4")
    raise ValueError(f"media cell {caption!r}: expected a waveform [samples] or frames [T, 3, H, W], got {array.shape}")


def log_media_table(
    trainer,
    key: str,
    rows: Sequence[Mapping[str, Any]],
    sample_rate: int = SAMPLE_RATE,
    fps: int = VIDEO_FPS,
) -> int:
    """Log ``rows`` (column -> value, the same columns in each; a ``key`` column names the sample) as one table
    ``key`` on every W&B run of ``trainer`` (rank 0 only), and their audio columns to TensorBoard.
    Returns how many W&B runs got the table."""
    if not rows or not trainer.is_global_zero:
        return 0
    columns = list(rows[0])
    names = [str(row.get("key", index)) for index, row in enumerate(rows)]
    for logger in loggers_of(trainer, "TensorBoardLogger"):
        for name, row in zip(names, rows):
            for column in columns:
                value = row[column]
                if isinstance(value, (torch.Tensor, np.ndarray)) and value.ndim == 1:
                    wave = np.clip(_array(value), -1, 1)[None]
                    logger.experiment.add_audio(f"{key}/{name}/{column}", wave, trainer.global_step, sample_rate)
    runs = loggers_of(trainer, "WandbLogger")
    if runs:
        import wandb

        data = [[_cell(wandb, row[c], f"{n} {c}", sample_rate, fps) for c in columns] for n, row in zip(names, rows)]
        for logger in runs:
            logger.log_table(key, columns=columns, data=data, step=trainer.global_step)
    return len(runs)


class WandbConfigCallback(SaveConfigCallback):
    """`SaveConfigCallback` that also puts the resolved config, experiment and ablation on every W&B run."""

    def save_config(self, trainer, pl_module, stage: str) -> None:
        loggers = loggers_of(trainer, "WandbLogger")
        if not loggers:
            return
        resolved = redact(yaml.safe_load(self.parser.dump(self.config, skip_unset=False)))
        experiment, ablations = experiment_names([str(path) for path in self.config.get("config") or []])
        resolved.update(experiment=experiment, ablation="+".join(ablations) or "none")
        tags = [f"experiment:{experiment}", *(f"ablation:{name}" for name in ablations)]
        for logger in loggers:
            run = logger.experiment
            run.config.update(resolved, allow_val_change=True)
            run.tags = tuple(dict.fromkeys([*(run.tags or ()), *tags]))
