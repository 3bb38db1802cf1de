"""SyncNet expert: window shapes and alignment, pair sampling, training on a synthetic sync task, the LipSync metric
finding a planted shift with the trained expert, checkpoint round trip and one-line errors."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

from av2av_lightning.checkpoints import STAGE_KEY
from av2av_lightning.data.batching import AVBatch
from av2av_lightning.data.datamodule import AVDataModule
from av2av_lightning.data.features import log_fbank
from av2av_lightning.metrics import LipSync
from av2av_lightning.models.syncnet import SyncNet, SyncNetConfig
from av2av_lightning.sync_expert import SyncExpertTraining, load_sync_expert, sample_pairs, shift_clip

FRAMES = 24


def synthetic_clip(frames: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """A face whose mouth (a dark ellipse in the lower half) opens with the loudness of the noise in each frame."""
    loudness = torch.rand(frames, generator=generator)
    wave = (torch.randn(frames, 640, generator=generator) * (0.02 + 0.5 * loudness[:, None])).reshape(-1)
    yy, xx = torch.meshgrid(torch.arange(96.0), torch.arange(96.0), indexing="ij")
    mouth = ((xx - 48) / 16) ** 2 + ((yy - 70) / (1 + 12 * loudness[:, None, None])) ** 2 <= 1
    skin = (0.4 + 0.4 * torch.rand(3, generator=generator))[None, :, None, None].expand(frames, 3, 96, 96)
    return torch.where(mouth[:, None], torch.tensor(0.1), skin), wave


def synthetic_batch(clips: int, seed: int, frames: int = FRAMES) -> AVBatch:
    generator = torch.Generator().manual_seed(seed)
    faces, waves = zip(*(synthetic_clip(frames, generator) for _ in range(clips)))
    lengths = torch.full((clips,), frames)
    return AVBatch(
        keys=[f"clip{seed}_{i}" for i in range(clips)],
        meta=[],
        audio=torch.zeros(clips, frames, 104),
        video=torch.zeros(clips, 1, frames, 88, 88),
        lengths=lengths,
        padding_mask=torch.zeros(clips, frames, dtype=torch.bool),
        wave=torch.stack(waves),
        wave_lengths=lengths * 640,
        face=torch.stack(faces),
    )


def loader(batches: list[AVBatch]) -> DataLoader:
    return DataLoader(batches, batch_size=None, collate_fn=lambda batch: batch)


def test_windows_are_aligned_and_embeddings_normalised():
    model = SyncNet(SyncNetConfig.preset("tiny")).eval()
    faces, wave = synthetic_clip(12, torch.Generator().manual_seed(0))
    video, audio = model.embed_video(faces), model.embed_audio(wave)
    assert video.shape == audio.shape == (8, 64)  # T - 4 windows of 5 frames
    assert torch.allclose(video.norm(dim=-1), torch.ones(8), atol=1e-5) and (video >= 0).all()
    channels_last = (faces.permute(0, 2, 3, 1) * 255).round().to(torch.uint8)
    assert torch.allclose(model.embed_video(channels_last), video, atol=1e-2)
    windows = model.audio_windows(wave)
    assert windows.shape == (8, 20, 26)
    assert torch.equal(windows[3], log_fbank(wave)[12:32])  # window t starts at filterbank frame 4t
    probability = model(model.video_windows(faces), windows)
    assert probability.shape == (8,) and (probability >= 0).all() and (probability <= 1 + 1e-6).all()


@pytest.mark.parametrize("shape", [(10, 3, 64, 64), (10, 96, 96), (10, 1, 96, 96)])
def test_wrong_face_size_is_a_one_line_error(shape):
    with pytest.raises(ValueError, match="96") as error:
        SyncNet(SyncNetConfig.preset("tiny")).embed_video(torch.zeros(shape))
    assert "\n" not in str(error.value)


def test_pairs_are_balanced_and_negatives_shifted():
    clip, video, audio, labels = sample_pairs(torch.tensor([20, 6, 12]), 16, 3, torch.Generator().manual_seed(0))
    assert set(clip.tolist()) == {0, 2}  # 6 frames: 2 window starts, too few for a shift of 3
    assert labels.sum() == len(labels) / 2
    assert torch.equal(video[labels == 1], audio[labels == 1])
    starts = torch.tensor([16, 0, 8])[clip]  # valid window starts per clip
    gap = (video - audio).abs()
    negative = labels == 0
    assert (torch.minimum(gap, starts - gap)[negative] >= 3).all() and (audio < starts).all()
    with pytest.raises(ValueError, match="long enough"):
        sample_pairs(torch.tensor([6]), 4, 3)


def test_shift_clip_delays_the_audio():
    faces, wave = torch.arange(10.0)[:, None, None, None].expand(10, 3, 96, 96), torch.arange(6400.0)
    shifted_faces, shifted_wave = shift_clip(faces, wave, 3)
    assert len(shifted_faces) == 7 and len(shifted_wave) == 7 * 640
    assert shifted_faces[0, 0, 0, 0] == 3 and shifted_wave[0] == 0  # video frame 3 meets audio frame 0


def test_expert_checkpoint_of_the_wrong_stage_is_refused(tmp_path):
    module = SyncExpertTraining()
    checkpoint = {"state_dict": module.state_dict(), STAGE_KEY: "pretraining"}
    torch.save(checkpoint, tmp_path / "wrong.ckpt")
    with pytest.raises(ValueError, match="stage 'pretraining', expected 'sync_expert'") as error:
        load_sync_expert(tmp_path / "wrong.ckpt")
    assert "\n" not in str(error.value)
    with pytest.raises(FileNotFoundError):
        load_sync_expert(tmp_path / "missing.ckpt")


@pytest.fixture(scope="module")
def trained_expert(tmp_path_factory, cpu_trainer):
    """A tiny expert trained for 60 steps on the synthetic task (mouth opening follows loudness), saved and reloaded."""
    import lightning as L

    L.seed_everything(0)
    module = SyncExpertTraining(windows_per_clip=8, lr=2e-3, warmup_steps=5, val_shift=4, max_offset=6)
    losses: list[float] = []

    class Record(L.Callback):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            losses.append(float(outputs["loss"]))

    trainer = cpu_trainer(max_steps=60, callbacks=[Record()], num_sanity_val_steps=0, limit_val_batches=2)
    train = loader([synthetic_batch(4, seed) for seed in range(60)])
    val = loader([synthetic_batch(4, 1000 + seed, frames=30) for seed in range(2)])
    trainer.fit(module, train_dataloaders=train, val_dataloaders=val)
    path = tmp_path_factory.mktemp("expert") / "expert.ckpt"
    trainer.save_checkpoint(path)
    return module, load_sync_expert(path), losses, trainer.callback_metrics


@pytest.mark.slow
def test_expert_learns_sync_and_reloads(trained_expert):
    module, expert, losses, metrics = trained_expert
    assert np.mean(losses[-10:]) < np.mean(losses[:10]) - 0.1
    assert metrics["val/sync_acc"] > 0.65  # held-out in-sync vs shifted pairs (chance 0.5)
    assert metrics["val/lse_d_real_at_zero"] < metrics["val/lse_d_shifted_at_zero"]
    faces, wave = synthetic_clip(10, torch.Generator().manual_seed(7))
    module.model.eval()
    assert torch.allclose(expert.embed_video(faces), module.model.embed_video(faces), atol=1e-6)
    assert torch.allclose(expert.embed_audio(wave), module.model.embed_audio(wave), atol=1e-6)


@pytest.mark.slow
def test_lipsync_with_trained_expert_finds_a_planted_shift(trained_expert):
    _, expert, _, _ = trained_expert
    clips = [synthetic_clip(40, torch.Generator().manual_seed(500 + i)) for i in range(4)]
    shifted = [shift_clip(faces, wave, 4) for faces, wave in clips]
    at_zero = {}
    for name, data in (("real", clips), ("shifted", shifted)):
        metric = LipSync(expert, max_offset=0)
        metric.update([faces for faces, _ in data], [wave for _, wave in data])
        at_zero[name] = metric.compute()["lse_d"].item()
    assert at_zero["real"] < at_zero["shifted"]
    search = LipSync(expert, max_offset=8)
    search.update([faces for faces, _ in shifted], [wave for _, wave in shifted])
    result = search.compute()
    assert abs(result["lse_offset"].item() - 4) <= 1
    assert math.isfinite(result["lse_c"].item()) and result["lse_c"].item() > 0


@pytest.mark.slow
def test_expert_trains_on_the_tiny_corpus(tiny_corpus, cpu_trainer):
    folder, _ = tiny_corpus
    data = AVDataModule(
        train_shards=str(folder / "sentences" / "train-*.tar"),
        val_shards=str(folder / "sentences" / "valid-*.tar"),
        load_face=True,
        num_workers=0,
        max_frames=150,
        max_sample_frames=40,
        train_batches_per_epoch=4,
    )
    module = SyncExpertTraining(warmup_steps=2)
    trainer = cpu_trainer(max_epochs=1, num_sanity_val_steps=0)
    trainer.fit(module, data)
    metrics = trainer.callback_metrics
    for key in ("train/loss", "val/sync_acc", "val/lse_d_real", "val/lse_c_shifted", "val/lse_offset_shifted"):
        assert math.isfinite(float(metrics[key])), key
