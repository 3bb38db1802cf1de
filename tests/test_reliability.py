"""Reliability: exact resume after SIGKILL, atomic checkpoints, non-finite losses, skipped samples in the log."""

from __future__ import annotations

import csv
import os
import signal
import subprocess
import sys
import tarfile
import textwrap
from pathlib import Path

import lightning as L
import numpy as np
import pytest
import torch
import yaml

from av2av_lightning.checkpoints import STAGE_KEY, load_checkpoint
from av2av_lightning.cli import main
from av2av_lightning.data.datamodule import AVDataModule
from av2av_lightning.data.schema import META_FIELD, SampleMeta
from av2av_lightning.data.sidecar import SidecarWriter
from av2av_lightning.pretraining import AVHubertPretraining
from av2av_lightning.reliability import (
    AtomicCheckpointIO,
    NonFiniteGuard,
    NonFiniteLossError,
    Reliability,
)

ROOT = Path(__file__).parents[1]
SMALL = {"embed_dim": 32, "layers": 1, "ffn_dim": 64, "heads": 2, "resnet_width": 4, "num_classes": [8]}
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "PYTHONHASHSEED": "0"}


def run_av2av(*args: str, extra_path: Path | None = None) -> subprocess.CompletedProcess:
    env = dict(ENV)
    if extra_path is not None:
        env["PYTHONPATH"] = os.pathsep.join([str(extra_path), env.get("PYTHONPATH", "")])
    return subprocess.run(
        [sys.executable, "-m", "av2av_lightning", *args], capture_output=True, text=True, timeout=300, env=env
    )


def write_labels(path: Path, frames: dict[str, int], k: int = 8, seed: int = 0) -> Path:
    """Random 100 Hz labels for every key (corrupt samples too, so they are skipped for their own reason)."""
    rng = np.random.default_rng(seed)
    with SidecarWriter(path, "km", 100.0) as writer:
        for key, count in frames.items():
            writer.add(key, rng.integers(0, k, size=count * 4))
    return path


def frames_of(shards: list[str]) -> dict[str, int]:
    """key -> frame count, from the metadata members of the shards."""
    frames = {}
    for shard in shards:
        with tarfile.open(shard) as tar:
            for member in tar.getmembers():
                if member.name.endswith(f".{META_FIELD}"):
                    meta = SampleMeta.from_json(tar.extractfile(member).read())
                    frames[meta.key] = meta.num_frames
    return frames


def trainer_settings(root: Path) -> dict:
    """CPU, log every step, per-epoch checkpoints with ``last.ckpt``, the reliability callback."""
    return dict(
        max_epochs=2,
        accelerator="cpu",
        devices=1,
        log_every_n_steps=1,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=str(root),
        logger={"class_path": "lightning.pytorch.loggers.CSVLogger", "init_args": {"save_dir": str(root)}},
        callbacks=[
            {
                "class_path": "lightning.pytorch.callbacks.ModelCheckpoint",
                "init_args": {"dirpath": str(root / "ckpt"), "filename": "{epoch}", "save_last": True},
            },
            {"class_path": "av2av_lightning.reliability.Reliability"},
        ],
    )


def pretraining_config(root: Path, train, val, labels: list[str]) -> dict:
    """A few-second AV-HuBERT pretraining run (experiments/pretrain/tiny.yaml, smaller)."""
    base = yaml.safe_load((ROOT / "experiments/pretrain/tiny.yaml").read_text())
    base["trainer"].update(trainer_settings(root))
    base["model"]["init_args"].update(encoder={**base["model"]["init_args"]["encoder"], **SMALL}, warmup_steps=4)
    base["data"] = dict(
        train_shards=train,
        val_shards=val,
        sidecars={"km": labels},
        max_frames=240,
        max_sample_frames=60,
        train_batches_per_epoch=4,
        num_workers=1,
    )
    return base


def mutual_learning_config(root: Path, train, val, words: str) -> dict:
    """A few-second word classifier (experiments/mutual_learning/tiny_words.yaml, smaller, from scratch)."""
    base = yaml.safe_load((ROOT / "experiments/mutual_learning/tiny_words.yaml").read_text())
    base["trainer"].update(trainer_settings(root))
    encoder = {k: v for k, v in SMALL.items() if k != "num_classes"}
    base["model"]["init_args"].update(
        words=words, pretrained=None, encoder=encoder, freeze_encoder_steps=3, codebook_size=8, warmup_steps=4
    )
    base["data"].update(
        train_shards=train, val_shards=val, words=words, max_frames=232, train_batches_per_epoch=4, num_workers=1
    )
    return base


def write_yaml(path: Path, config: dict) -> Path:
    path.write_text(yaml.safe_dump(config))
    return path


def metrics(root: Path, version: int) -> dict[tuple[str, str], str]:
    """(step, metric) -> value as logged (strings: exact comparison)."""
    rows = csv.DictReader((root / "lightning_logs" / f"version_{version}" / "metrics.csv").open())
    return {(row["step"], name): value for row in rows for name, value in row.items() if value and name != "step"}


def weights(path: Path) -> dict[str, torch.Tensor]:
    return load_checkpoint(path)["state_dict"]


# ---------------------------------------------------------------------------- exact resume


class Exploit:
    """Unpickling it calls ``function(*args)``: what a crafted checkpoint does to plain ``torch.load``."""

    def __init__(self, function, *args) -> None:
        self.call = (function, args)

    def __reduce__(self):
        return self.call


KILLER = """
import os, signal
from lightning.pytorch.callbacks import Callback


class KillAt(Callback):
    def __init__(self, step: int):
        self.step = step

    def on_train_batch_end(self, trainer, *args):
        if trainer.global_step == self.step:
            os.kill(os.getpid(), signal.SIGKILL)
"""


@pytest.fixture(scope="module")
def stage_configs(tiny_corpus, tmp_path_factory):
    """``stage -> (root -> config)`` on the tiny corpus: pretraining on sentences, mutual learning on words."""
    from data_prep.vocab import count_words, top_words

    out, manifest = tiny_corpus
    folder = tmp_path_factory.mktemp("stages")

    def shards(subset: str, split: str) -> list[str]:
        return [str(out / p) for p in manifest["subsets"][subset][split]["shards"]]

    labels = [str(write_labels(folder / f"{s}.npz", frames_of(shards("sentences", s)))) for s in ("train", "valid")]
    words = folder / "words.txt"
    words.write_text("".join(f"{w}\n" for w in top_words(count_words(shards("words", "train")), per_language=10)))
    return {
        "pretraining": lambda root: pretraining_config(
            root, shards("sentences", "train"), shards("sentences", "valid"), labels
        ),
        "mutual_learning": lambda root: mutual_learning_config(
            root, shards("words", "train"), shards("words", "valid"), str(words)
        ),
    }


def kill_then_resume(
    config_of, tmp_path: Path, kill_at: int = 6, save_every: int | None = None
) -> tuple[Path, Path, Path, dict]:
    """An uninterrupted run and a run SIGKILLed at step ``kill_at`` (mid-epoch 1 of 4-step epochs) side by side,
    then the killed one resumed: with ``--ckpt_path last`` (written at the end of epoch 0), or with ``save_every``
    from the step checkpoint ``steps/step=<save_every>.ckpt`` written mid-epoch. Returns (straight root, killed
    root, resumed config, start checkpoint)."""
    (tmp_path / "killer.py").write_text(textwrap.dedent(KILLER))

    def configured(root: Path) -> dict:
        config = config_of(root)
        if save_every:
            steps = {"dirpath": str(root / "steps"), "filename": "{step}", "every_n_train_steps": save_every}
            steps["save_top_k"] = -1
            checkpoints = {"class_path": "lightning.pytorch.callbacks.ModelCheckpoint", "init_args": steps}
            config["trainer"]["callbacks"].append(checkpoints)
        return config

    straight, killed = tmp_path / "straight", tmp_path / "killed"
    config = write_yaml(tmp_path / "run.yaml", configured(straight))
    resumed_config = configured(killed)
    resumed = write_yaml(tmp_path / "resumed.yaml", resumed_config)
    resumed_config["trainer"]["callbacks"].append({"class_path": "killer.KillAt", "init_args": {"step": kill_at}})
    doomed = write_yaml(tmp_path / "doomed.yaml", resumed_config)

    # one core each
    env = {**ENV, "PYTHONPATH": os.pathsep.join([str(tmp_path), ENV.get("PYTHONPATH", "")])}
    command = [sys.executable, "-m", "av2av_lightning", "fit", "--config"]
    procs = [subprocess.Popen([*command, str(c)], env=env, stderr=subprocess.PIPE, text=True) for c in (config, doomed)]
    outputs = [p.communicate(timeout=300)[1] for p in procs]
    assert procs[0].returncode == 0, outputs[0][-3000:]
    assert procs[1].returncode == -signal.SIGKILL, outputs[1][-3000:]
    checkpoint = killed / "steps" / f"step={save_every}.ckpt" if save_every else killed / "ckpt" / "last.ckpt"
    start = load_checkpoint(checkpoint)
    assert start["global_step"] == (save_every or 4)  # mid-epoch, or the end of epoch 0

    result = run_av2av("fit", "--config", str(resumed), "--ckpt_path", str(checkpoint) if save_every else "last")
    assert result.returncode == 0, result.stderr[-3000:]
    return straight, killed, resumed, start


@pytest.mark.slow
@pytest.mark.parametrize("stage", ["pretraining", "mutual_learning"])
def test_sigkill_mid_epoch_then_resume_gives_the_same_weights_and_metrics(stage_configs, stage, tmp_path):
    straight, killed, resumed, start = kill_then_resume(stage_configs[stage], tmp_path)
    final, again = weights(straight / "ckpt" / "last.ckpt"), weights(killed / "ckpt" / "last.ckpt")
    assert final.keys() == again.keys()
    assert all(torch.equal(final[name], again[name]) for name in final)
    assert not all(torch.equal(final[n], start["state_dict"][n]) for n in final)  # the resumed run trained
    reference, replay = metrics(straight, 0), metrics(killed, 1)
    after_resume = {key: value for key, value in reference.items() if int(key[0]) >= 4}
    assert replay == after_resume and any(name == "train/loss" for _, name in replay)

    # A crafted last.ckpt is refused on resume (weights_only=True by default), and its code never runs.
    marker = tmp_path / "pwned"
    torch.save({"state_dict": {}, "poison": Exploit(os.system, f"touch {marker}")}, killed / "ckpt" / "last.ckpt")
    result = run_av2av("fit", "--config", str(resumed), "--ckpt_path", "last")
    assert result.returncode == 2 and "Traceback" not in result.stderr and not marker.exists()
    assert "av2av fit: error: Weights only load failed" in result.stderr


# ---------------------------------------------------------------------------- atomic checkpoints


WRITER = """
import os, signal, sys
import torch
from av2av_lightning.reliability import AtomicCheckpointIO


class DiesWhilePickled:
    def __reduce__(self):
        os.kill(os.getpid(), signal.SIGKILL)


checkpoint = {"global_step": 2, "state_dict": {"w": torch.zeros(100_000)}, "poison": DiesWhilePickled()}
if sys.argv[2] == "atomic":
    AtomicCheckpointIO().save_checkpoint(checkpoint, sys.argv[1])
else:
    torch.save(checkpoint, sys.argv[1])
"""


@pytest.mark.parametrize("writer", ["atomic", "plain"])
def test_a_killed_checkpoint_write_leaves_the_previous_last_ckpt(tmp_path, writer):
    last = tmp_path / "last.ckpt"
    AtomicCheckpointIO().save_checkpoint({"global_step": 1, "state_dict": {"w": torch.ones(3)}}, last)
    script = tmp_path / "writer.py"
    script.write_text(textwrap.dedent(WRITER))
    result = subprocess.run([sys.executable, str(script), str(last), writer], env=ENV, capture_output=True, timeout=120)
    assert result.returncode == -signal.SIGKILL
    if writer == "plain":  # the control: torch.save straight into the file truncates it
        with pytest.raises(ValueError, match="not a loadable checkpoint"):
            load_checkpoint(last)
        return
    assert load_checkpoint(last)["global_step"] == 1
    assert torch.equal(load_checkpoint(last)["state_dict"]["w"], torch.ones(3))


def test_reliability_installs_atomic_checkpoint_io(cpu_trainer):
    trainer = cpu_trainer(callbacks=[Reliability()], max_steps=0)
    Reliability().setup(trainer, AVHubertPretraining(encoder=SMALL), "fit")
    assert isinstance(trainer.strategy.checkpoint_io, AtomicCheckpointIO)


# ---------------------------------------------------------------------------- non-finite losses


class NaNAt(AVHubertPretraining):
    """Pretraining whose loss is NaN on the given training-step calls (0-based)."""

    def __init__(self, nan_calls: list[int], **kwargs) -> None:
        super().__init__(**kwargs)
        self.nan_calls = set(nan_calls)
        self.calls = 0
        self.snapshots: list[dict[str, torch.Tensor]] = []

    def training_step(self, batch, batch_idx):
        self.snapshots.append({k: v.detach().clone() for k, v in self.state_dict().items()})
        loss = super().training_step(batch, batch_idx)
        self.calls += 1
        return loss * float("nan") if self.calls - 1 in self.nan_calls else loss


@pytest.fixture(scope="module")
def labelled_shards(av_shards, tmp_path_factory):
    return av_shards, write_labels(tmp_path_factory.mktemp("nan") / "km.npz", av_shards.lengths)


def small_datamodule(labelled_shards, batches: int) -> AVDataModule:
    shards, labels = labelled_shards
    return AVDataModule(
        train_shards=shards.pattern,
        sidecars={"km": str(labels)},
        max_frames=160,
        train_batches_per_epoch=batches,
        num_workers=0,
    )


def test_a_non_finite_loss_skips_the_step_and_is_counted(labelled_shards, cpu_trainer):
    torch.manual_seed(0)
    module = NaNAt([1, 3], encoder=SMALL, labels=["km"], warmup_steps=1, lr=1e-2)
    guard = NonFiniteGuard(max_consecutive=2)
    trainer = cpu_trainer(max_epochs=1, callbacks=[guard])
    trainer.fit(module, small_datamodule(labelled_shards, batches=5))
    states = [*module.snapshots, {k: v.detach().clone() for k, v in module.state_dict().items()}]
    changed = [any(not torch.equal(a[k], b[k]) for k in a) for a, b in zip(states, states[1:])]
    assert changed == [True, False, True, False, True]  # NaN calls 1 and 3 change nothing, buffers included
    assert guard.nonfinite_total == 2 and trainer.callback_metrics["train/nonfinite_skipped"] == 2
    assert trainer.global_step == 5  # Lightning still counts the (empty) optimiser call of a skipped step
    assert "training_step" not in vars(module)  # the wrapper is gone after fit


def test_too_many_non_finite_losses_stop_with_a_checkpoint_of_the_last_good_state(
    labelled_shards, cpu_trainer, tmp_path
):
    torch.manual_seed(0)
    module = NaNAt([2, 3, 4], encoder=SMALL, labels=["km"], warmup_steps=1, lr=1e-2)
    trainer = cpu_trainer(max_epochs=1, callbacks=[Reliability(max_consecutive_nonfinite=3)], default_root_dir=tmp_path)
    with pytest.raises(NonFiniteLossError, match=r"3 non-finite training losses in a row .*nonfinite-last-good\.ckpt"):
        trainer.fit(module, small_datamodule(labelled_shards, batches=8))
    saved = load_checkpoint(tmp_path / NonFiniteGuard.CHECKPOINT_NAME)
    assert saved[STAGE_KEY] == "pretraining" and saved["global_step"] == 5 and module.calls == 5
    good = module.snapshots[2]  # the state after the last finite step (call 1)
    assert all(torch.equal(saved["state_dict"][k], good[k]) for k in good)


def test_av2av_fit_stops_on_non_finite_losses_with_one_line(labelled_shards, tmp_path, capsys):
    shards, labels = labelled_shards
    config = {
        "trainer": {**trainer_settings(tmp_path), "max_epochs": 1},
        "model": {
            "class_path": f"{__name__}.NaNAt",
            "init_args": {"nan_calls": [1, 2, 3, 4, 5], "encoder": SMALL, "labels": ["km"], "warmup_steps": 1},
        },
        "data": {"train_shards": shards.pattern, "sidecars": {"km": str(labels)}, "max_frames": 160},
    }
    config["trainer"]["callbacks"][1]["init_args"] = {"max_consecutive_nonfinite": 2}
    config["data"].update(train_batches_per_epoch=6, num_workers=0)
    assert main(["fit", "--config", str(write_yaml(tmp_path / "nan.yaml", config))]) == 2
    errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("av2av fit: error:")]
    assert len(errors) == 1 and "2 non-finite training losses in a row" in errors[0]
    assert errors[0].endswith(str(tmp_path / "ckpt" / NonFiniteGuard.CHECKPOINT_NAME))
    assert load_checkpoint(tmp_path / "ckpt" / NonFiniteGuard.CHECKPOINT_NAME)[STAGE_KEY] == "pretraining"


class ManualNaN(L.LightningModule):
    """Manual optimisation (like the GAN stages) with a NaN loss on the second step."""

    def __init__(self) -> None:
        super().__init__()
        self.automatic_optimization = False
        self.layer = torch.nn.Linear(4, 1)
        self.snapshots: list[torch.Tensor] = []

    def training_step(self, batch, batch_idx):
        self.snapshots.append(self.layer.weight.detach().clone())
        loss = self.layer(batch).pow(2).mean() * (float("nan") if batch_idx == 1 else 1.0)
        optimizer = self.optimizers()
        optimizer.zero_grad()
        self.manual_backward(loss)
        optimizer.step()

    def configure_optimizers(self):
        return torch.optim.Adam(self.parameters(), lr=0.1)

    def train_dataloader(self):
        return torch.utils.data.DataLoader(torch.randn(4, 4), batch_size=1)


def test_manual_optimisation_drops_a_step_with_non_finite_gradients(cpu_trainer):
    module, guard = ManualNaN(), NonFiniteGuard(max_consecutive=2)
    cpu_trainer(max_epochs=1, callbacks=[guard]).fit(module)
    states = [*module.snapshots, module.layer.weight.detach()]
    assert [not torch.equal(a, b) for a, b in zip(states, states[1:])] == [True, False, True, True]
    assert guard.nonfinite_total == 1 and guard.nonfinite_in_a_row == 0 and torch.isfinite(states[-1]).all()


# ---------------------------------------------------------------------------- fault injection


CORRUPT = {1: "truncated_flac", 3: "bad_mp4", 5: "missing_lip", 7: "nan_audio", 9: "empty_text", 10: "length_mismatch"}


def corrupt_split(shard_writer, prefix: str, folder: Path) -> tuple[list[str], str]:
    """Shards with the CORRUPT samples plus a clean shard cut mid-member (a truncated tar); the labels for all."""
    lengths = [30, 34, 38, 42, 46, 50, 54, 58, 62, 66, 70, 74]
    shards = shard_writer(lengths, per_shard=4, face=False, corrupt=CORRUPT, prefix=prefix)
    extra = shard_writer([40, 44, 48], per_shard=3, face=False, prefix=f"{prefix}_cut", seed=2)
    cut = extra.paths[0]
    cut.write_bytes(cut.read_bytes()[: cut.stat().st_size // 2])
    labels = write_labels(folder / f"{prefix}.npz", {**shards.lengths, **extra.lengths})
    return [str(p) for p in shards.paths] + [str(cut)], str(labels)


@pytest.mark.slow
def test_fit_and_validate_finish_on_corrupt_shards_and_name_the_bad_samples(shard_writer, tmp_path):
    (train, train_labels), (val, val_labels) = (corrupt_split(shard_writer, p, tmp_path) for p in ("train", "valid"))
    config = pretraining_config(tmp_path / "run", train, val, [train_labels, val_labels])
    config["data"].update(num_workers=0)
    path = write_yaml(tmp_path / "run.yaml", config)

    fit = run_av2av("fit", "--config", str(path))
    assert fit.returncode == 0, fit.stderr[-3000:]
    for index in CORRUPT:  # evaluation reads every sample, so each bad one is named (training names those it drew)
        assert f"skipping sample valid_{index:04d} in " in fit.stderr, index
    assert "skipping sample train_" in fit.stderr
    assert "skipping unreadable data in shard" in fit.stderr and "valid_cut-000000.tar" in fit.stderr
    logged = metrics(tmp_path / "run", 0)
    reasons = ("undecodable_audio", "undecodable_video", "missing_field", "non-finite_audio", "empty_transcript")
    for reason in (*reasons, "length_mismatch"):
        assert [v for (_, name), v in logged.items() if name == f"skipped/val/{reason}"] == ["1.0"] * 2, reason
    val_totals = [float(v) for (_, name), v in logged.items() if name == "skipped/val"]
    assert len(val_totals) == 2 and val_totals[0] == val_totals[1] > len(CORRUPT)  # plus the cut shard
    assert float(max(v for (_, name), v in logged.items() if name == "skipped/train")) > 0

    validate = run_av2av("validate", "--config", str(path), "--ckpt_path", str(tmp_path / "run" / "ckpt" / "last.ckpt"))
    assert validate.returncode == 0, validate.stderr[-3000:]
    assert "skipped/val" in validate.stdout and f"val: skipped {int(val_totals[0])} samples" in validate.stderr
