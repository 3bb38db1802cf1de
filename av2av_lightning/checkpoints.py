"""Loading this project's stage checkpoints safely (``weights_only=True``) and checking which stage wrote them.

Every stage records its name in the checkpoint (``checkpoint["av2av_stage"]``), so a later
stage that is given the wrong file says so in one line instead of failing on key names.
"""

from __future__ import annotations

import inspect
import pickle
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

import torch

from av2av_lightning.models.avhubert import AVHubert, AVHubertConfig

STAGE_KEY = "av2av_stage"
M = TypeVar("M", bound=torch.nn.Module)


def load_checkpoint(path: str | Path) -> dict:
    """A checkpoint as plain tensors and containers; never runs code from the file."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such checkpoint")
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except (
        pickle.UnpicklingError,
        RuntimeError,
        EOFError,
        ValueError,
        KeyError,
        IndexError,
        UnicodeDecodeError,
    ) as err:
        # torch.load's error on a file that is no checkpoint at all depends on its first bytes
        first_line = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise ValueError(f"{path}: not a loadable checkpoint ({first_line})") from None
    if not isinstance(checkpoint, dict):
        raise ValueError(f"{path}: not a checkpoint (a {type(checkpoint).__name__}, expected a dict)")
    return checkpoint


def expect_stage(checkpoint: dict, stage: str, path: str | Path) -> None:
    found = checkpoint.get(STAGE_KEY)
    if found != stage:
        raise ValueError(f"{path}: a checkpoint of stage {found or 'unknown'!r}, expected {stage!r}")


# where each stage that holds an AV-HuBERT encoder keeps it in its state_dict
ENCODER_PREFIXES = {"pretraining": "model.", "mutual_learning": "encoder."}


def load_avhubert(path: str | Path) -> AVHubert:
    """The encoder of an `AVHubertPretraining` checkpoint, in eval mode."""
    checkpoint = load_checkpoint(path)
    expect_stage(checkpoint, "pretraining", path)
    return _encoder_of(checkpoint, "pretraining")


def load_encoder(path: str | Path) -> AVHubert:
    """The AV-HuBERT encoder, in eval mode, of a pretraining checkpoint or of a mutual-learning one (the aligned
    encoder), so unit extraction and analysis can compare the two."""
    checkpoint = load_checkpoint(path)
    stage = checkpoint.get(STAGE_KEY)
    if stage not in ENCODER_PREFIXES:
        expected = " or ".join(repr(name) for name in ENCODER_PREFIXES)
        raise ValueError(f"{path}: a checkpoint of stage {stage or 'unknown'!r}, expected {expected}")
    return _encoder_of(checkpoint, stage)


def _encoder_of(checkpoint: dict, stage: str) -> AVHubert:
    model = AVHubert(AVHubertConfig(**checkpoint["encoder_config"]))
    model.load_state_dict(submodule_state(checkpoint, ENCODER_PREFIXES[stage]))
    return model.eval()


def recorded_init_args(checkpoint: dict, stage_class: type) -> dict:
    """The hyperparameters a checkpoint recorded that ``stage_class`` takes: its LightningModule rebuilt as it was
    trained (what only Lightning itself adds to ``hyper_parameters`` is left out)."""
    accepted = inspect.signature(stage_class).parameters
    return {key: value for key, value in (checkpoint.get("hyper_parameters") or {}).items() if key in accepted}


def submodule_state(checkpoint: dict, prefix: str = "model.") -> dict:
    """The state dict of one submodule of a LightningModule checkpoint: keys under ``prefix``, prefix removed."""
    return {k[len(prefix) :]: v for k, v in checkpoint["state_dict"].items() if k.startswith(prefix)}


def load_stage_model(path: str | Path, stage: str, build: Callable[[dict], M], prefix: str = "model.") -> M:
    """The plain model a stage trains, in eval mode: ``build(checkpoint)`` makes it from the configuration the
    stage recorded, and its weights are the stage's ``prefix`` submodule."""
    checkpoint = load_checkpoint(path)
    expect_stage(checkpoint, stage, path)
    model = build(checkpoint)
    model.load_state_dict(submodule_state(checkpoint, prefix))
    return model.eval()
