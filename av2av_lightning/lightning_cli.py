"""The LightningCLI behind ``av2av fit|validate|test|predict``: any stage, any datamodule, checked resumes.

- The model is any `LightningModule` named by ``class_path`` (every stage of the project).
- The datamodule defaults to the shared `AVDataModule`, so a config's ``data:`` section may list its settings
  directly; a stage with other data (unit translation) names its datamodule with ``class_path``.
- A resume checkpoint (``--ckpt_path FILE``) is loaded with ``weights_only=True`` and checked to come from the
  same stage before Lightning touches it; Lightning 2.6 itself would unpickle ``--ckpt_path last`` unsafely.
- `WandbConfigCallback` writes ``config.yaml`` and puts the resolved config on W&B runs.
- Config errors raise instead of exiting, so ``av2av`` prints them on one line.
"""

from __future__ import annotations

import sys

import lightning as L
from lightning.pytorch.cli import LightningCLI

from av2av_lightning.checkpoints import STAGE_KEY, expect_stage, load_checkpoint
from av2av_lightning.cli import TRAINING_SUBCOMMANDS
from av2av_lightning.logging_utils import WandbConfigCallback

DEFAULT_DATAMODULE = "av2av_lightning.data.datamodule.AVDataModule"
SYMBOLIC_CHECKPOINTS = ("last", "best", "hpc", "registry")


class AV2AVCLI(LightningCLI):
    """LightningCLI with the shared datamodule as default and resume checkpoints checked before use."""

    def add_arguments_to_parser(self, parser) -> None:
        parser.set_defaults({"data": {"class_path": DEFAULT_DATAMODULE}})

    def _ckpt_file(self) -> str | None:
        """The resume checkpoint when it is a local file (not ``last``/``best``/..., not a URL)."""
        path = self.config[self.config.subcommand].get("ckpt_path") if self.config.get("subcommand") else None
        return None if path is None or path in SYMBOLIC_CHECKPOINTS or "://" in str(path) else path

    def _parse_ckpt_path(self) -> None:  # LightningCLI torch.loads the file here to read its hyperparameters
        path, self.ckpt_stage = self._ckpt_file(), None
        if path is not None:
            checkpoint = load_checkpoint(path)
            self.ckpt_stage = checkpoint.get(STAGE_KEY)
            saved = checkpoint.get("hyper_parameters", {}).get("_class_path")
            wanted = self.config[self.config.subcommand].model.get("class_path")
            if saved and wanted and saved != wanted:
                raise ValueError(f"{path}: a checkpoint of {saved} (stage {self.ckpt_stage!r}), expected {wanted}")
        super()._parse_ckpt_path()

    def check_stage(self) -> None:
        arguments = self.config_init[self.subcommand]
        if arguments.get("weights_only") is None:
            arguments["weights_only"] = True
        path, stage = self._ckpt_file(), {}
        if path is None:
            return
        try:
            self.model.on_save_checkpoint(stage)  # every stage writes its name here
        except RuntimeError:  # a stage whose hook needs a trainer: Lightning's own restore reports a mismatch
            return
        if STAGE_KEY in stage:
            expect_stage({STAGE_KEY: self.ckpt_stage}, stage[STAGE_KEY], path)

    before_fit = before_validate = before_test = before_predict = check_stage


def run_training(argv: list[str]) -> None:
    """``av2av fit|validate|test|predict ...`` (argv without the program name)."""
    raise_on_error = {"exit_on_error": False}
    AV2AVCLI(
        L.LightningModule,
        L.LightningDataModule,
        subclass_mode_model=True,
        subclass_mode_data=True,
        args=None if argv == sys.argv[1:] else argv,  # LightningCLI warns when given the process's own argv
        save_config_callback=WandbConfigCallback,
        save_config_kwargs={"overwrite": True},
        parser_kwargs={**raise_on_error, **{name: raise_on_error for name in TRAINING_SUBCOMMANDS}},
    )
