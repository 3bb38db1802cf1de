"""Reliability of the renderer stages: SIGKILL mid-epoch then resume gives the same weights, optimiser and scheduler
states and logged metrics (speaker encoder, vocoder with its GAN on, SyncNet expert, face renderer with its
discriminator), and a non-finite step of a GAN stage leaves everything as if its batch had never been trained on."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
import yaml
from test_face_renderer import SMALL as FACE_SMALL
from test_face_renderer import energy_units
from test_reliability import kill_then_resume, load_checkpoint, metrics, trainer_settings

from av2av_lightning.data.datamodule import AVDataModule
from av2av_lightning.data.sidecar import SidecarWriter
from av2av_lightning.face_rendering import FaceRendering
from av2av_lightning.reliability import NonFiniteGuard, StepSeeder
from av2av_lightning.vocoder import UnitVocoder

ROOT = Path(__file__).parents[1]
NUM_UNITS = 32  # energy_units' levels
SPEAKERS = [f"spk{i:02d}" for i in range(10)]  # the tiny corpus's seen speakers
VOCODER = {"num_units": NUM_UNITS, "speaker_dim": 16, "initial_channels": 32}


def same(a: Any, b: Any) -> bool:
    """Exact equality of nested checkpoint structures (tensors compared bit for bit)."""
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and a.shape == b.shape and a.dtype == b.dtype and torch.equal(a, b)
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(same(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return type(a) is type(b) and len(a) == len(b) and all(same(x, y) for x, y in zip(a, b))
    return a == b


@pytest.fixture(scope="module")
def corpus(tiny_corpus, tmp_path_factory) -> dict[str, Any]:
    """Sentence shards of the tiny corpus and a 50 Hz unit sidecar for them (quantised frame energy)."""
    folder, manifest = tiny_corpus

    def shards(split: str) -> list[str]:
        return [str(folder / p) for p in manifest["subsets"]["sentences"][split]["shards"]]

    units = tmp_path_factory.mktemp("renderer_units") / "units.npz"
    with SidecarWriter(units, "units", 50, "int16") as writer:
        for split in ("train", "valid"):
            for batch in AVDataModule(test_shards=shards(split), num_workers=0).test_dataloader():
                for key, wave, samples in zip(batch.keys, batch.wave, batch.wave_lengths):
                    writer.add(key, energy_units(wave[:samples], NUM_UNITS))
    return {"train": shards("train"), "valid": shards("valid"), "units": str(units)}


def renderer_config(name: str, root: Path, corpus: dict, model: dict, data: dict) -> dict:
    """``experiments/renderer/{name}_tiny.yaml`` with the reliability trainer settings, smaller and on the corpus."""
    base = yaml.safe_load((ROOT / f"experiments/renderer/{name}_tiny.yaml").read_text())
    base["trainer"].update(trainer_settings(root), limit_val_batches=2)
    base["model"]["init_args"].update(model)
    base["data"] = {"train_shards": corpus["train"], "val_shards": corpus["valid"], "num_workers": 1, **data}
    return base


# Stages with two optimisers (a discriminator) train 2 batches per epoch, the others 4: either way epoch 0 ends at
# global step 4 and step 6 is mid-epoch 1, as kill_then_resume expects.
STAGES = {
    "speaker": (
        {
            "encoder": {"hidden_dim": 32, "layers": 1, "embed_dim": 16},
            "speakers_per_batch": 4,
            "utterances_per_speaker": 2,
            "bank_size": 4,
            "train_frames": 50,
            "warmup_steps": 2,
        },
        {"max_frames": 300, "max_sample_frames": 50, "train_batches_per_epoch": 4},
    ),
    "vocoder": (
        {
            "vocoder": VOCODER,
            "units": "units",
            "unit_rate": 50,
            "durations": None,
            "speaker_encoder": None,
            "speakers": SPEAKERS,
            "segment_units": 8,
            "gan_start_step": 0,
            "warmup_steps": 2,
            "val_audio_samples": 0,
        },
        {"max_frames": 120, "max_sample_frames": 30, "train_batches_per_epoch": 2, "sidecars": {"units": None}},
    ),
    "syncnet": (
        {"windows_per_clip": 2, "max_offset": 3, "warmup_steps": 2},
        {"load_face": True, "max_frames": 120, "max_sample_frames": 30, "train_batches_per_epoch": 4},
    ),
    "face": (
        {
            "renderer": FACE_SMALL,
            "unit_rate": 50,
            "windows_per_clip": 1,
            "sync_weight": 0.0,
            "expert": None,
            "adversarial_weight": 0.1,
            "discriminator": [8, 16],
            "quality_frames": 2,
            "warmup_steps": 2,
        },
        {
            "load_face": True,
            "max_frames": 60,
            "max_sample_frames": 20,
            "train_batches_per_epoch": 2,
            "sidecars": {"units": None},
        },
    ),
}
BATCHES_PER_EPOCH = {"speaker": 4, "vocoder": 2, "syncnet": 4, "face": 2}


def stage_config(stage: str, root: Path, corpus: dict) -> dict:
    model, data = STAGES[stage]
    if "sidecars" in data:
        data = {**data, "sidecars": {"units": corpus["units"]}}
    return renderer_config(stage, root, corpus, model, data)


@pytest.mark.slow
@pytest.mark.parametrize(
    "stage",
    [
        "speaker",
        "vocoder",
        "syncnet",
        "face",
    ],
)
def test_sigkill_mid_epoch_then_resume_gives_the_same_weights_optimisers_and_metrics(stage, corpus, tmp_path):
    straight, killed, _, start = kill_then_resume(lambda root: stage_config(stage, root, corpus), tmp_path)
    final, again = load_checkpoint(straight / "ckpt" / "last.ckpt"), load_checkpoint(killed / "ckpt" / "last.ckpt")
    assert final["global_step"] == again["global_step"] == 8
    assert final["state_dict"].keys() == again["state_dict"].keys()
    assert [n for n in final["state_dict"] if not torch.equal(final["state_dict"][n], again["state_dict"][n])] == []
    assert not same(final["state_dict"], start["state_dict"])  # the resumed run trained
    optimisers = 2 if stage in ("vocoder", "face") else 1
    assert len(final["optimizer_states"]) == len(final["lr_schedulers"]) == optimisers
    assert same(final["optimizer_states"], again["optimizer_states"])
    assert same(final["lr_schedulers"], again["lr_schedulers"])
    if optimisers == 2:
        assert any(n.startswith("discriminator.") for n in final["state_dict"])
    reference, replay = metrics(straight, 0), metrics(killed, 1)
    after_resume = {key: value for key, value in reference.items() if int(key[0]) >= BATCHES_PER_EPOCH[stage]}
    assert replay == after_resume
    assert any(name.startswith("train/") for _, name in replay) and any(name.startswith("val/") for _, name in replay)


# ---------------------------------------------------------------------------- a non-finite GAN step


class NaNVocoder(UnitVocoder):
    """A vocoder whose ``where`` loss is NaN on one batch: ``input`` (the audio: both optimisers' gradients) or
    ``generator`` (the duration loss: after the discriminator has stepped)."""

    def __init__(self, nan_batch: int, where: str, **kwargs) -> None:
        super().__init__(**kwargs)
        self.nan_batch, self.where, self.batch_idx = nan_batch, where, -1

    def training_step(self, batch, batch_idx):
        self.batch_idx = batch_idx
        if batch_idx == self.nan_batch and self.where == "input":
            batch.wave = batch.wave * float("nan")
        return super().training_step(batch, batch_idx)

    def duration_loss(self, units, lengths):
        loss = super().duration_loss(units, lengths)
        nan = self.training and self.batch_idx == self.nan_batch and self.where == "generator"
        return loss * float("nan") if nan else loss


class SkipsBatch:
    """Stage mixin, the reference run: the stage does nothing on batch ``skip_batch``."""

    def __init__(self, skip_batch: int, **kwargs) -> None:
        super().__init__(**kwargs)
        self.skip_batch = skip_batch

    def training_step(self, batch, batch_idx):
        if batch_idx != self.skip_batch:
            return super().training_step(batch, batch_idx)


class SkippingVocoder(SkipsBatch, UnitVocoder):
    """The vocoder's reference run."""


class NaNFace(FaceRendering):
    """A face renderer (batch norm, a discriminator) whose faces are NaN on one batch."""

    def __init__(self, nan_batch: int, **kwargs) -> None:
        super().__init__(**kwargs)
        self.nan_batch = nan_batch

    def training_step(self, batch, batch_idx):
        if batch_idx == self.nan_batch:
            batch.face = batch.face * float("nan")
        return super().training_step(batch, batch_idx)


class SkippingFace(SkipsBatch, FaceRendering):
    """The face renderer's reference run."""


def trained_state(module, trainer) -> dict[str, Any]:
    return {
        "weights": module.state_dict(),
        "optimizers": [optimizer.state_dict() for optimizer in trainer.optimizers],
        "schedulers": [config.scheduler.state_dict() for config in trainer.lr_scheduler_configs],
    }


@pytest.mark.slow
@pytest.mark.parametrize("case", ["vocoder-input", "vocoder-generator", "face-input"])
def test_a_non_finite_gan_step_leaves_everything_as_if_its_batch_was_skipped(case, corpus, cpu_trainer):
    """Batch 1 of 3 non-finite vs a run whose batch 1 does nothing (per-batch seeds, so batch 2 draws alike): the same
    weights and buffers, optimiser moments and step counts, and LR schedules."""
    stage, where = case.split("-")
    model, data = STAGES[stage]
    settings = {**data, "sidecars": {"units": corpus["units"]}, "train_batches_per_epoch": 3, "num_workers": 0}
    data = AVDataModule(train_shards=corpus["train"], **settings)
    runs = {}
    for name in ("nan", "skip"):
        torch.manual_seed(0)
        if stage == "vocoder":
            module = NaNVocoder(1, where, **model) if name == "nan" else SkippingVocoder(1, **model)
        else:
            module = NaNFace(1, **model) if name == "nan" else SkippingFace(1, **model)
        guard = NonFiniteGuard(max_consecutive=2)
        trainer = cpu_trainer(max_epochs=1, limit_val_batches=0, callbacks=[guard, StepSeeder(seed=0)])
        trainer.fit(module, datamodule=data)
        runs[name] = trained_state(module, trainer), guard.nonfinite_total
    (nan_state, skipped), (reference, _) = runs["nan"], runs["skip"]
    assert skipped == 1
    assert [n for n in reference["weights"] if not torch.equal(reference["weights"][n], nan_state["weights"][n])] == []
    assert same(nan_state["optimizers"], reference["optimizers"])
    assert same(nan_state["schedulers"], reference["schedulers"])
    assert [s["last_epoch"] for s in reference["schedulers"]] == [2, 2]  # batches 0 and 2 trained
