"""W&B run bookkeeping for `av2av fit`: the full resolved config on the run, grouped and tagged by experiment.

`WandbConfigCallback` replaces LightningCLI's ``SaveConfigCallback`` (``LightningCLI(save_config_callback=
WandbConfigCallback, ...)``): it still writes ``config.yaml`` to the log folder, and on rank 0 it logs the
resolved config (every default filled in, secrets redacted) to each `WandbLogger` of the trainer, with
``experiment`` (the first ``--config`` file, e.g. ``pretrain/tiny``) and ``ablation`` (the stems of later
``--config`` files, e.g. ``no_modality_dropout``) as config keys and tags, so runs compare by them in the UI.
Other loggers are left alone, so a CSV run never imports wandb. Tests and clusters without network run W&B
with ``WANDB_MODE=offline`` (``wandb sync`` uploads later); nothing here waits on a server.
"""

from __future__ import annotations

import re
from pathlib import Path

import yaml
from lightning.pytorch.cli import SaveConfigCallback

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


class WandbConfigCallback(SaveConfigCallback):
    """`SaveConfigCallback` that also puts the resolved config, experiment and ablation on every W&B run."""

    def save_config(self, trainer, pl_module, stage: str) -> None:
        loggers = [logger for logger in trainer.loggers if type(logger).__name__ == "WandbLogger"]
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
