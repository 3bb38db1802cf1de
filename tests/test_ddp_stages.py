"""Mutual learning, the speaker encoder, the vocoder, the SyncNet expert and the face renderer under 2-process DDP
(gloo on the CPU) through `av2av fit`, as `tests/test_ddp.py` runs pretraining. For each stage: equal training
batches per rank, every validation sample read by exactly one rank, the logged validation metrics the same on both
ranks and equal to one process validating the whole set with the same weights, the first step's gradients
all-reduced (equal on both ranks) and, where the maths allows, equal to one process's."""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import lightning as L
import pytest
import torch
import torch.nn.functional as F
import yaml
from torch import Tensor, nn

from av2av_lightning.data.batching import AVBatch
from av2av_lightning.data.datamodule import AVDataModule
from av2av_lightning.data.schema import SampleMeta
from tests.test_ddp import DETERMINISTIC, StepRecorder, ddp_trainer, launch
from tests.test_face_renderer import SMALL as RENDERER
from tests.test_mutual_learning import word_list  # noqa: F401 (a fixture)
from tests.test_vocoder import NUM_UNITS, unit_sidecar  # noqa: F401 (a fixture)

pytestmark = pytest.mark.usefixtures("one_thread")  # as each rank computes (`one_thread`)
UNUSED_PARAMETERS = {"strategy": "ddp_find_unused_parameters_true"}
BATCH_TENSORS = ("audio", "video", "lengths", "padding_mask", "wave", "wave_lengths", "face", "labels", "label_lengths")
ENCODER = {"embed_dim": 32, "layers": 1, "ffn_dim": 64, "heads": 2, "resnet_width": 4, **DETERMINISTIC}


def batchnorm_layers(module: nn.Module) -> list[nn.Module]:
    return [layer for layer in module.modules() if isinstance(layer, nn.modules.batchnorm._BatchNorm)]


class StageRecorder(StepRecorder):
    """Also the whole first batch with the CPU random state before its step (a stage drawing random windows or
    pairs draws the same ones again from it), and the keys and weights of the last validation; the gradients are
    those of the first step that has any.

    ``freeze_batchnorm``: BatchNorm in eval mode, since per-rank batch statistics differ from one process's."""

    def __init__(self, out: str, freeze_batchnorm: bool = False) -> None:
        super().__init__(out)
        self.freeze_batchnorm = freeze_batchnorm
        self.record["val_keys"] = []

    def describe_batch(self, batch: AVBatch) -> dict:
        tensors = {name: getattr(batch, name) for name in BATCH_TENSORS}
        meta = [m.to_json().decode() for m in batch.meta]
        return {**tensors, "keys": list(batch.keys), "meta": meta, "rng": torch.get_rng_state()}

    def on_train_batch_start(self, trainer, module, batch, batch_idx) -> None:
        if self.freeze_batchnorm:
            for layer in batchnorm_layers(module):
                layer.eval()
        super().on_train_batch_start(trainer, module, batch, batch_idx)

    def on_before_optimizer_step(self, trainer, module, optimizer) -> None:
        """The first step that has gradients (the speaker encoder takes zero-gradient steps while its banks fill)."""
        if any(p.grad is not None and p.grad.any() for p in module.parameters()):
            super().on_before_optimizer_step(trainer, module, optimizer)

    def on_validation_epoch_start(self, trainer, module) -> None:
        self.record["val_keys"] = []
        self.record["val_weights"] = {k: v.detach().clone() for k, v in module.state_dict().items()}

    def on_validation_batch_start(self, trainer, module, batch, batch_idx, dataloader_idx=0) -> None:
        self.record["val_keys"] += list(batch.keys)


def as_batch(recorded: dict) -> AVBatch:
    """The `AVBatch` a `StageRecorder` described."""
    tensors = {name: recorded[name] for name in BATCH_TENSORS}
    return AVBatch(keys=recorded["keys"], meta=[SampleMeta.from_json(m) for m in recorded["meta"]], **tensors)


def face_l1(module, batch: AVBatch) -> Tensor:
    """The face renderer's training loss without sync and adversarial terms (its step, less the optimisers)."""
    windows = module.frame_units(batch)
    clip, frames, references = module.sample_windows(batch.lengths)
    target = batch.face[clip[:, None], frames]
    generated = module.render(target, batch.face[clip[:, None], references], windows[clip[:, None], frames])
    return F.l1_loss(generated, target)


@dataclass
class Stage:
    """A stage's tiny DDP run and what it must satisfy.

    ``metrics``: logged keys that one process validating the whole set reproduces. ``loss``: the first step's loss
    of one batch, replayed in one process for the gradient check (None where the maths gives no one-process
    equivalent)."""

    model: str
    init_args: dict
    data: dict
    metrics: tuple[str, ...]
    train_batches: int = 2
    freeze_batchnorm: bool = False
    loss: Callable[[nn.Module, AVBatch], Tensor] | None = None
    trainer: dict = field(default_factory=dict)


def corpus_shards(corpus, subset: str, split: str) -> list[str]:
    folder, manifest = corpus
    return [str(folder / p) for p in manifest["subsets"][subset][split]["shards"]]


def stage(name: str, request, tmp_path: Path) -> Stage:
    if name == "mutual_learning":
        corpus, words = request.getfixturevalue("tiny_corpus"), request.getfixturevalue("word_list")
        train = corpus_shards(corpus, "words", "train")
        # validation on clips of the listed words (the valid split's words are not among them): about 10 clips
        data = {"train_shards": train, "val_shards": train[:2], "words": str(words), "max_frames": 29 * 4}
        init_args = {"words": str(words), "encoder": ENCODER, "codebook_size": 8, "lambda_ling": 0.1}
        init_args |= {"lambda_pred": 0.1, "warmup_steps": 1}
        # BatchNorm of the video ResNet frozen: then DDP's mean of the ranks' mean losses is the maths
        return Stage(
            "av2av_lightning.mutual_learning.CrossModalMutualLearning",
            init_args,
            data,
            metrics=("val/acc_audio", "val/acc_video"),
            freeze_batchnorm=True,
            loss=lambda module, batch: module.mutual_learning_loss(batch)[0],
        )
    shards = request.getfixturevalue("av_shards")
    data = {"train_shards": shards.pattern, "val_shards": [str(p) for p in shards.paths[:2]]}  # 8 samples
    units = {"sidecars": {"units": str(request.getfixturevalue("unit_sidecar"))}}
    # one sample per batch (any two exceed 15 frames): the ranks' mean losses weigh their samples as one process
    # would, and the vocoder's convolutions see no padding that would differ from one process's batches
    single = {"max_frames": 15}
    if name == "speaker_encoder":
        init_args = {"speakers_per_batch": 2, "utterances_per_speaker": 2, "bank_size": 2, "train_frames": 40}
        # no one-process gradient: each rank draws its GE2E batch from its own bank of earlier batches, and GE2E
        # contrasts the speakers within one batch, so DDP averages two GE2E losses rather than computing one
        return Stage(
            "av2av_lightning.speaker_encoding.SpeakerEncoderTraining",
            {**init_args, "warmup_steps": 1},
            # small batches: the banks fill at different steps on the two ranks (after 2 and 3 batches), so the
            # ranks take zero-gradient steps together until both can draw a GE2E batch
            {**data, "max_frames": 80, "buffer_size": 8},
            metrics=("val/eer",),
            train_batches=6,
        )
    if name == "vocoder":
        init_args = {"vocoder": {"num_units": NUM_UNITS}, "unit_rate": 25, "segment_units": 8, "val_audio_samples": 0}
        # no one-process gradient: a GAN step (the first gradients are the discriminator's, on random segments)
        # has no single-process equivalent to compare with; the ranks must still agree
        return Stage(
            "av2av_lightning.vocoder.UnitVocoder",
            init_args,
            {**data, **units, **single},
            metrics=tuple(f"val/{m}{s}" for m in ("stoi", "estoi", "pesq") for s in ("", "_scored")),
            trainer=UNUSED_PARAMETERS,  # the discriminator's backward leaves the generator without gradients
        )
    if name == "sync_expert":
        init_args = {"windows_per_clip": 2, "min_shift": 2, "val_shift": 3, "max_offset": 3, "warmup_steps": 1}
        lipsync = [f"val/lse_{m}_{v}" for m in ("d", "c", "offset") for v in ("real", "shifted")]
        # val/sync_acc and val/loss are synced but not one process's: validation seeds its pairs with the
        # rank-local batch index, so a clip gets other pairs on another rank
        return Stage(
            "av2av_lightning.sync_expert.SyncExpertTraining",
            init_args,
            {**data, **single, "load_face": True},
            metrics=(*lipsync, "val/lse_d_real_at_zero", "val/lse_d_shifted_at_zero"),
            freeze_batchnorm=True,
            loss=lambda module, batch: module.sync_loss(*module.pair_probabilities(batch)),
        )
    init_args = {"renderer": RENDERER, "unit_rate": 25, "windows_per_clip": 1, "quality_frames": 2}
    return Stage(
        "av2av_lightning.face_rendering.FaceRendering",
        {**init_args, "warmup_steps": 1, "sample_dir": str(tmp_path / "samples")},
        {**data, **units, **single, "load_face": True},
        metrics=("val/l1", "val/psnr", "val/ssim"),
        freeze_batchnorm=True,
        loss=face_l1,
    )


def run(spec: Stage, out: Path) -> list[dict]:
    """`test_ddp.launch` with this file's recorder (a second ``--config`` replaces the pretraining recorder)."""
    data = {**spec.data, "train_batches_per_epoch": spec.train_batches, "num_workers": 0, "seed": 0}
    settings = {
        "seed_everything": 0,
        "trainer": {**ddp_trainer(out, max_epochs=1), **spec.trainer},
        "model": {"class_path": spec.model, "init_args": spec.init_args},
        "data": data,
    }
    recorder = {"out": str(out), "freeze_batchnorm": spec.freeze_batchnorm}
    callbacks = {
        "trainer": {"callbacks": [{"class_path": "tests.test_ddp_stages.StageRecorder", "init_args": recorder}]}
    }
    (out / "recorder.yaml").parent.mkdir(parents=True, exist_ok=True)
    (out / "recorder.yaml").write_text(yaml.safe_dump(callbacks))
    return launch(settings, out, False, "--config", str(out / "recorder.yaml"))


def build(spec: Stage) -> L.LightningModule:
    module_name, class_name = spec.model.rsplit(".", 1)
    return getattr(importlib.import_module(module_name), class_name)(**spec.init_args)


def replayed_gradients(spec: Stage, weights: dict, recorded: dict) -> dict[str, Tensor]:
    """One process's gradients of the first step's loss on one rank's batch, with that rank's random draws."""
    module = build(spec)
    module.load_state_dict(weights)
    module.train()
    for layer in batchnorm_layers(module) if spec.freeze_batchnorm else []:
        layer.eval()
    torch.set_rng_state(recorded["rng"])
    spec.loss(module, as_batch(recorded)).backward()
    return {n: p.grad for n, p in module.named_parameters() if p.grad is not None}


STAGES = ("mutual_learning", "speaker_encoder", "vocoder", "sync_expert", "face_rendering")


@pytest.mark.slow
@pytest.mark.parametrize("name", STAGES)
def test_ddp_stage_splits_batches_and_samples_and_syncs_metrics_and_gradients(name, request, tmp_path):
    spec = stage(name, request, tmp_path)
    ranks = run(spec, tmp_path)
    assert [r["rank"] for r in ranks] == [0, 1] and {r["world_size"] for r in ranks} == {2}
    assert [r["train_batches"] for r in ranks] == [[spec.train_batches]] * 2

    data = AVDataModule(**{**spec.data, "num_workers": 0})
    expected = [key for batch in data.val_dataloader() for key in batch.keys]
    seen = ranks[0]["val_keys"] + ranks[1]["val_keys"]
    assert len(expected) >= 4 and sorted(seen) == sorted(expected)  # none missing, none twice
    assert ranks[0]["val_keys"] and ranks[1]["val_keys"]

    # synced: every logged validation value is the same on both ranks
    logged = [r["logged"] for r in ranks]
    assert set(spec.metrics) <= set(logged[0]) and logged[0] == logged[1]

    # one process validating the whole set with the weights of the DDP validation logs the same scores
    weights = ranks[0]["val_weights"]
    assert all(torch.equal(weights[k], ranks[1]["val_weights"][k]) for k in weights)
    module = build(spec)
    module.load_state_dict(weights)
    trainer = L.Trainer(accelerator="cpu", devices=1, logger=False, enable_progress_bar=False)
    single = trainer.validate(module, AVDataModule(**{**spec.data, "num_workers": 0}), verbose=False)[0]
    for key in spec.metrics:
        assert logged[0][key] == pytest.approx(single[key], abs=1e-5), key

    # the first step's gradients are all-reduced: the same on both ranks
    gradients = [r["gradients"] for r in ranks]
    assert gradients[0].keys() == gradients[1].keys() and any(g.any() for g in gradients[0].values())
    assert all(torch.equal(gradients[0][n], gradients[1][n]) for n in gradients[0])
    if spec.loss is None:
        return
    # DDP averages the ranks' gradients: the mean of one process's gradients of each rank's batch
    replayed = [replayed_gradients(spec, ranks[0]["weights"], r["first_batch"]) for r in ranks]
    assert replayed[0].keys() == replayed[1].keys() == gradients[0].keys()
    for n, gradient in gradients[0].items():
        mean = (replayed[0][n] + replayed[1][n]) / 2
        torch.testing.assert_close(gradient, mean, rtol=1e-4, atol=1e-6, msg=lambda m, n=n: f"{n}: {m}")
