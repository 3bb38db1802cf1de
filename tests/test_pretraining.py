"""AV-HuBERT pretraining stage: targets, losses that fall, per-input validation accuracy, published sizes."""

from __future__ import annotations

from pathlib import Path

import lightning as L
import numpy as np
import pytest
import torch
import yaml

from av2av_lightning.checkpoints import STAGE_KEY, load_avhubert
from av2av_lightning.cli import main
from av2av_lightning.data.batching import IGNORE_INDEX
from av2av_lightning.data.datamodule import AVDataModule
from av2av_lightning.data.sidecar import Sidecar
from av2av_lightning.pretraining import AVHubertPretraining
from data_prep.clustering.kmeans import KMeansQuantizer, build_targets, mfcc_source
from data_prep.clustering.unit_quality import agreement

EXPERIMENTS = Path(__file__).parents[1] / "experiments" / "pretrain"
SMALL = {"embed_dim": 64, "layers": 2, "ffn_dim": 128, "heads": 2, "resnet_width": 8, "num_classes": [8]}


@pytest.fixture(scope="module")
def labelled(av_shards, tmp_path_factory):
    """The synthetic shards with 100 Hz MFCC k-means labels (k=8)."""
    out = tmp_path_factory.mktemp("labels")
    _, paths = build_targets(
        av_shards.pattern, {"train": av_shards.pattern}, mfcc_source(), out, k=8, sample_fraction=1.0, progress=False
    )
    return av_shards, paths["train"]


def datamodule(labelled, **overrides) -> AVDataModule:
    shards, labels = labelled
    settings = dict(
        train_shards=shards.pattern,
        val_shards=shards.pattern,
        sidecars={"km": str(labels)},
        max_frames=160,
        train_batches_per_epoch=10,
        num_workers=0,
        seed=0,
    )
    return AVDataModule(**{**settings, **overrides})


def test_targets_follow_the_label_rate_and_ignore_padding(labelled):
    module = AVHubertPretraining(encoder=SMALL, label_rate=100)
    batch = next(iter(datamodule(labelled).val_dataloader()))
    (targets,) = module.targets(batch)
    assert targets.shape == batch.padding_mask.shape
    assert (targets[batch.padding_mask] == IGNORE_INDEX).all()
    assert torch.equal(targets[0, : batch.lengths[0]], batch.labels["km"][0, ::4][: batch.lengths[0]])


class LossHistory(L.Callback):
    def __init__(self) -> None:
        self.losses: list[float] = []

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx) -> None:
        self.losses.append(float(outputs["loss"]))


@pytest.fixture(scope="module")
def trained(labelled, tmp_path_factory, cpu_trainer):
    """A small model trained for 60 steps with modality dropout, and its checkpoint."""
    torch.manual_seed(0)
    module = AVHubertPretraining(
        encoder={**SMALL, "dropout": 0.0, "layerdrop": 0.0, "modality_dropout": 0.5, "audio_dropout": 0.5},
        lr=3e-3,
        warmup_steps=5,
        total_steps=60,
    )
    history = LossHistory()
    trainer = cpu_trainer(max_epochs=6, callbacks=[history], default_root_dir=tmp_path_factory.mktemp("run"))
    trainer.fit(module, datamodule=datamodule(labelled))
    checkpoint = Path(trainer.default_root_dir) / "last.ckpt"
    trainer.save_checkpoint(checkpoint)
    return module, trainer, history, checkpoint


def test_masked_prediction_loss_falls_and_validation_reports_each_input(trained):
    module, trainer, history, _ = trained
    first, last = sum(history.losses[:10]) / 10, sum(history.losses[-10:]) / 10
    assert last < 0.8 * first, (first, last)
    metrics = trainer.callback_metrics
    for name in ("av", "a", "v"):
        assert 0.0 <= float(metrics[f"val/acc_masked_{name}"]) <= 1.0
    # audio carries the MFCC targets: audio-visual input predicts them better than chance (1/8)
    assert float(metrics["val/acc_masked_av"]) > 0.25


def test_checkpoint_loads_the_encoder_safely_and_checks_the_stage(trained, tmp_path):
    module, _, _, checkpoint = trained
    encoder = load_avhubert(checkpoint)
    audio = torch.randn(1, 12, 104)
    expected, _ = module.model.extract_features(audio, None)
    assert torch.allclose(encoder.extract_features(audio, None)[0], expected, atol=1e-6)
    other = torch.load(checkpoint, weights_only=True)
    other[STAGE_KEY] = "translation"
    torch.save(other, tmp_path / "other.ckpt")
    with pytest.raises(ValueError, match="stage 'translation', expected 'pretraining'"):
        load_avhubert(tmp_path / "other.ckpt")
    (tmp_path / "junk.ckpt").write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match="junk.ckpt: not a loadable checkpoint"):
        load_avhubert(tmp_path / "junk.ckpt")


def test_next_iteration_targets_from_a_layer_and_cross_modal_agreement(trained, labelled, tmp_path):
    """`av2av cluster layer`: fit on layer features, then label audio-only and video-only input with the same
    quantizer and compare them."""
    _, _, _, checkpoint = trained
    shards, _ = labelled
    common = ["--checkpoint", str(checkpoint), "--layer", "1", "--quiet"]
    fit = ["cluster", "layer", *common, "--shards", shards.pattern, "--k", "4", "--sample-fraction", "1"]
    assert main([*fit, "--out", str(tmp_path / "iter2")]) == 0
    labels = Sidecar.load(tmp_path / "iter2" / "train.km4.npz")
    assert labels.rate == 25 and len(labels) == len(shards.keys)
    assert all(len(labels[key]) == frames for key, frames in shards.lengths.items())
    assert KMeansQuantizer.load(tmp_path / "iter2" / "kmeans.npz").norm == "utterance-cosine"  # the default
    assert main([*fit, "--norm", "none", "--out", str(tmp_path / "raw")]) == 0
    assert KMeansQuantizer.load(tmp_path / "raw" / "kmeans.npz").norm == "none"
    for modality in ("audio", "video"):
        assert (
            main(
                [
                    "cluster",
                    "layer",
                    *common,
                    "--modality",
                    modality,
                    "--out",
                    str(tmp_path / modality),
                    "--quantizer",
                    str(tmp_path / "iter2" / "kmeans.npz"),
                    "--label",
                    f"valid={shards.pattern}",
                ]
            )
            == 0
        )
    audio, video = (Sidecar.load(tmp_path / m / "valid.km4.npz") for m in ("audio", "video"))
    assert set(audio) == set(video) == set(shards.keys)
    rate = agreement(np.concatenate([audio[k] for k in shards.keys]), np.concatenate([video[k] for k in shards.keys]))
    assert 0.0 <= rate <= 1.0


def test_bad_settings_are_one_line_errors():
    with pytest.raises(ValueError, match="unknown AV-HuBERT preset 'huge'"):
        AVHubertPretraining(preset="huge")
    with pytest.raises(ValueError, match="2 label set"):
        AVHubertPretraining(encoder=SMALL, labels=["km", "km2"])
    with pytest.raises(ValueError, match="multiple of 25"):
        AVHubertPretraining(encoder=SMALL, label_rate=30)


@pytest.mark.parametrize(("config", "millions"), [("base.yaml", 103), ("large.yaml", 325)])
def test_published_configs_have_published_sizes(config, millions):
    """Built on the meta device: the architecture without allocating (or training) it."""
    init_args = yaml.safe_load((EXPERIMENTS / config).read_text())["model"]["init_args"]
    with torch.device("meta"):
        module = AVHubertPretraining(**init_args)
    count = sum(p.numel() for p in module.model.parameters()) / 1e6
    assert abs(count - millions) / millions < 0.03, count


def test_tiny_config_builds_and_steps_on_a_short_clip(labelled):
    init_args = yaml.safe_load((EXPERIMENTS / "tiny.yaml").read_text())["model"]["init_args"]
    module = AVHubertPretraining(**{**init_args, "encoder": {**init_args["encoder"], "num_classes": [8]}})
    batch = next(iter(datamodule(labelled).val_dataloader()))
    summed, stats = module.masked_prediction_loss(batch)
    summed.backward()
    assert stats["masked_frames"] > 0 and torch.isfinite(summed)
    assert module.model.feature_extractor_video.resnet.frontend3D[0].weight.grad is not None
