"""Face renderer: masks, unit windows, shapes, the published size, unit rates, the frozen-expert sync loss, one-line
errors, and L1 falling in a short CPU run on the tiny corpus with a unit sidecar (PSNR/SSIM and a sample grid)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

from av2av_lightning.checkpoints import STAGE_KEY, load_checkpoint
from av2av_lightning.data.batching import AVBatch
from av2av_lightning.data.datamodule import AVDataModule
from av2av_lightning.data.sidecar import SidecarWriter
from av2av_lightning.face_rendering import FaceRendering, load_face_renderer
from av2av_lightning.models.face_renderer import FaceRenderer, FaceRendererConfig, mask_lower_half, unit_windows
from av2av_lightning.sync_expert import SyncExpertTraining

# a renderer small enough for a few CPU steps per second (the full-resolution stages dominate the cost)
SMALL = dict(
    encoder_channels=[4, 8, 8, 16, 32, 32, 32],
    encoder_blocks=[0, 1, 1, 1, 1, 0, 0],
    decoder_channels=[32, 32, 16, 16, 8, 8],
    decoder_blocks=[0, 1, 1, 1, 1, 1],
    output_channels=8,
    unit_dim=32,
    ffn_dim=64,
    heads=2,
    num_units=32,
)


def batch_with_units(clips: int, frames: int, units: torch.Tensor) -> AVBatch:
    generator = torch.Generator().manual_seed(0)
    lengths = torch.full((clips,), frames)
    return AVBatch(
        keys=[f"clip{i}" for i in range(clips)],
        meta=[],
        audio=torch.zeros(clips, frames, 104),
        video=torch.zeros(clips, 1, frames, 88, 88),
        lengths=lengths,
        padding_mask=torch.zeros(clips, frames, dtype=torch.bool),
        wave=torch.randn(clips, frames * 640, generator=generator) * 0.1,
        wave_lengths=lengths * 640,
        face=torch.rand(clips, frames, 3, 96, 96, generator=generator),
        labels={"units": units},
    )


def test_mask_zeroes_exactly_the_lower_half():
    faces = torch.rand(2, 5, 3, 96, 96) + 0.1
    masked = mask_lower_half(faces)
    assert (masked[..., 48:, :] == 0).all() and torch.equal(masked[..., :48, :], faces[..., :48, :])
    assert (faces[..., 48:, :] > 0).all()  # the input is left alone


def test_unit_windows_are_centred_on_each_frame():
    units = torch.arange(12)[None]  # 6 frames of 50 Hz units
    windows = unit_windows(units, frames=6, window=3, pad=99)
    assert windows.shape == (1, 6, 6)
    assert windows[0, 0].tolist() == [99, 99, 0, 1, 2, 3]  # frame 0's units 0, 1 sit in the middle
    assert windows[0, 2].tolist() == [2, 3, 4, 5, 6, 7]
    assert windows[0, 5].tolist() == [8, 9, 10, 11, 99, 99]
    assert unit_windows(units[:, :7], frames=6, window=3, pad=99)[0, 4].tolist() == [6, 99, 99, 99, 99, 99]


def test_renderer_output_shape_range_and_face_size_error():
    model = FaceRenderer(FaceRendererConfig.preset("tiny", **SMALL)).eval()
    faces = torch.rand(4, 3, 96, 96)
    out = model(mask_lower_half(faces), faces, torch.randint(0, 32, (4, 20)))
    assert out.shape == (4, 3, 96, 96) and (out > 0).all() and (out < 1).all()
    with pytest.raises(ValueError, match=r"\[N, 3, 96, 96\]") as error:
        model(torch.rand(4, 3, 64, 64), torch.rand(4, 3, 64, 64), torch.randint(0, 32, (4, 20)))
    assert "\n" not in str(error.value)


def test_unit_modulation_starts_as_the_plain_renderer_and_then_follows_the_units():
    torch.manual_seed(0)
    plain = FaceRenderer(FaceRendererConfig.preset("tiny", **SMALL)).eval()
    modulated = FaceRenderer(FaceRendererConfig.preset("tiny", **SMALL, unit_modulation=True)).eval()
    missing, unexpected = modulated.load_state_dict(plain.state_dict(), strict=False)
    assert not unexpected and missing and all(key.startswith("modulation.") for key in missing)
    faces, units = torch.rand(3, 3, 96, 96), torch.randint(0, 32, (3, 20))
    with torch.no_grad():
        assert torch.equal(modulated(mask_lower_half(faces), faces, units), plain(mask_lower_half(faces), faces, units))
        for film in modulated.modulation:  # what training does to the zero-initialised layers
            film.weight.normal_(0, 0.1)
        own = modulated(mask_lower_half(faces), faces, units)
        other = modulated(mask_lower_half(faces), faces, (units + 1) % 32)
    assert (own - other).abs().max() > 1e-3


def test_keep_upper_half_returns_the_given_upper_half_exactly():
    model = FaceRenderer(FaceRendererConfig.preset("tiny", **SMALL, keep_upper_half=True)).eval()
    faces, reference = torch.rand(3, 3, 96, 96), torch.rand(3, 3, 96, 96)
    with torch.no_grad():
        out = model(mask_lower_half(faces), reference, torch.randint(0, 32, (3, 20)))
    assert torch.equal(out[..., :48, :], faces[..., :48, :])
    assert not torch.allclose(out[..., 48:, :], faces[..., 48:, :], atol=0.05)  # the lower half is drawn


def test_over_reference_starts_as_a_copy_of_the_reference_and_then_edits_it():
    torch.manual_seed(0)
    model = FaceRenderer(FaceRendererConfig.preset("tiny", **SMALL, over_reference=True)).eval()
    faces, reference = torch.rand(3, 3, 96, 96), torch.rand(3, 3, 96, 96) * 0.98 + 0.01
    units = torch.randint(0, 32, (3, 20))
    with torch.no_grad():
        torch.testing.assert_close(model(mask_lower_half(faces), reference, units), reference)
        model.output[-1].weight.normal_(0, 0.1)  # what training does to the zero-initialised output layer
        assert (model(mask_lower_half(faces), reference, units) - reference).abs().max() > 1e-2


def test_flatten_pooling_tells_where_in_the_window_a_unit_is():
    """Mean pooling sees a window's units almost as a bag; flattening keeps each position's own weights, so a unit
    moved within the window (the timing the lips must follow) changes the code by as much as another unit does."""
    torch.manual_seed(0)
    flat = FaceRenderer(FaceRendererConfig.preset("tiny", **SMALL, unit_pooling="flatten", dropout=0.0)).eval()
    window = torch.full((1, 20), 3)
    early, late = window.clone(), window.clone()
    early[0, 2], late[0, 17] = 7, 7
    with torch.no_grad():
        early_code, late_code, other = (flat.conditioner(w) for w in (early, late, window))
    assert (early_code - late_code).norm() > 0.5 * (early_code - other).norm()
    with pytest.raises(ValueError, match="unit_pooling must be 'mean' or 'flatten', got 'max'"):
        FaceRendererConfig.preset("tiny", unit_pooling="max")


def _conv(cin: int, cout: int, kernel: int, norm: bool = True) -> int:
    return kernel * kernel * cin * cout + cout + (2 * cout if norm else 0)


def expected_published_parameters() -> int:
    """Wav2Lip's face encoder/decoder (conv + BatchNorm blocks, residual repeats) and our unit conditioner,
    counted from the published layer table rather than from the module."""
    encoder = _conv(6, 16, 7)
    for cin, cout, repeats in ((16, 32, 2), (32, 64, 3), (64, 128, 2), (128, 256, 2), (256, 512, 1)):
        encoder += _conv(cin, cout, 3) + repeats * _conv(cout, cout, 3)
    encoder += _conv(512, 512, 3) + _conv(512, 512, 1)
    decoder = _conv(512, 512, 1)  # first decoder block on the per-frame code
    for cin, cout, repeats in (
        (1024, 512, 1),
        (1024, 512, 2),
        (768, 384, 2),
        (512, 256, 2),
        (320, 128, 2),
        (160, 64, 2),
    ):
        decoder += _conv(cin, cout, 3) + repeats * _conv(cout, cout, 3)
    decoder += _conv(80, 32, 3) + _conv(32, 3, 1, norm=False)
    dim, ffn = 512, 2048
    transformer = 4 * (dim * dim + dim) + dim * ffn + ffn + ffn * dim + dim + 2 * 2 * dim
    conditioner = 1001 * dim + 20 * dim + transformer + 2 * dim  # 1000 units + padding, positions, final LayerNorm
    return encoder + decoder + conditioner


def test_published_preset_has_the_expected_size():
    with torch.device("meta"):
        model = FaceRenderer(FaceRendererConfig.preset("published"))
    count = sum(p.numel() for p in model.parameters())
    expected = expected_published_parameters()
    assert abs(count - expected) / expected < 0.01
    # Wav2Lip's generator is ~36 M with a ~2.8 M Mel encoder; ours swaps that for ~3.7 M of unit conditioning
    assert 36e6 < count < 38.5e6
    assert model.conditioner.embedding.weight.shape == (1001, 512)


def test_units_at_25_hz_are_repeated_to_50_hz():
    rendering = FaceRendering(renderer=SMALL, unit_rate=25)
    units25 = torch.randint(0, 32, (2, 10))
    units25[1, 8:] = -100  # padding
    windows25 = rendering.frame_units(batch_with_units(2, 10, units25))
    rendering50 = FaceRendering(renderer=SMALL, unit_rate=50)
    windows50 = rendering50.frame_units(batch_with_units(2, 10, units25.repeat_interleave(2, dim=1)))
    assert torch.equal(windows25, windows50) and windows25.shape == (2, 10, 20)
    assert (windows25[1, 9, :] == 32).sum() > (windows25[1, 5, :] == 32).sum()  # padding becomes the pad id
    with pytest.raises(ValueError, match=r"\[0, 32\)"):
        rendering.frame_units(batch_with_units(2, 10, torch.full((2, 10), 40)))
    with pytest.raises(ValueError, match="unit_rate"):
        FaceRendering(unit_rate=100)


def _expert_checkpoint(path, stage: str = "sync_expert"):
    module = SyncExpertTraining()
    checkpoint = {"state_dict": module.state_dict()}
    module.on_save_checkpoint(checkpoint)
    checkpoint[STAGE_KEY] = stage
    torch.save(checkpoint, path)
    return path


def test_expert_checkpoint_of_the_wrong_stage_is_a_one_line_error(tmp_path):
    path = _expert_checkpoint(tmp_path / "renderer.ckpt", stage="face_rendering")
    with pytest.raises(ValueError, match="stage 'face_rendering', expected 'sync_expert'") as error:
        FaceRendering(renderer=SMALL, sync_weight=0.1, expert=str(path))
    assert "\n" not in str(error.value)
    with pytest.raises(ValueError, match="expert checkpoint"):
        FaceRendering(sync_weight=0.1)


def test_sync_loss_trains_the_renderer_through_a_frozen_expert(tmp_path, cpu_trainer):
    path = _expert_checkpoint(tmp_path / "expert.ckpt")
    rendering = FaceRendering(renderer=SMALL, sync_weight=0.5, expert=str(path), warmup_steps=0)
    expert_before = {k: v.clone() for k, v in rendering.expert.state_dict().items()}
    renderer_before = {k: v.clone() for k, v in rendering.model.state_dict().items()}
    batches = [batch_with_units(2, 12, torch.randint(0, 32, (2, 24))) for _ in range(2)]
    trainer = cpu_trainer(max_steps=2, limit_val_batches=0)
    trainer.fit(rendering, DataLoader(batches, batch_size=None, collate_fn=lambda batch: batch))
    assert math.isfinite(float(trainer.callback_metrics["train/sync"]))
    assert all(torch.equal(v, expert_before[k]) for k, v in rendering.expert.state_dict().items())
    assert not rendering.expert.training and all(p.grad is None for p in rendering.expert.parameters())
    assert any(not torch.equal(v, renderer_before[k]) for k, v in rendering.model.state_dict().items())
    assert not any(k.startswith("expert.") for k in rendering.state_dict())  # the expert stays out of checkpoints


def test_adversarial_loss_trains_renderer_and_discriminator(cpu_trainer):
    rendering = FaceRendering(renderer=SMALL, adversarial_weight=0.1, discriminator=[8, 16], warmup_steps=0)
    before = {
        name: {k: v.clone() for k, v in module.state_dict().items()}
        for name, module in (("model", rendering.model), ("discriminator", rendering.discriminator))
    }
    batches = [batch_with_units(2, 12, torch.randint(0, 32, (2, 24))) for _ in range(2)]
    trainer = cpu_trainer(max_steps=4, limit_val_batches=0)  # two optimiser steps per batch
    trainer.fit(rendering, DataLoader(batches, batch_size=None, collate_fn=lambda batch: batch))
    for key in ("train/loss_d", "train/adversarial", "train/l1"):
        assert math.isfinite(float(trainer.callback_metrics[key])), key
    for name, module in (("model", rendering.model), ("discriminator", rendering.discriminator)):
        assert any(not torch.equal(v, before[name][k]) for k, v in module.state_dict().items()), name
    assert FaceRendering(renderer=SMALL).discriminator is None
    with pytest.raises(ValueError, match="adversarial_weight"):
        FaceRendering(adversarial_weight=-1.0)


def test_mouth_loss_scores_the_mouth_box_alone_and_trains_the_renderer(cpu_trainer):
    rendering = FaceRendering(renderer=SMALL, mouth_weight=10.0, mouth_box=(56, 84, 28, 68), warmup_steps=0)
    faces = torch.zeros(2, 3, 96, 96)
    outside, inside = faces.clone(), faces.clone()
    outside[..., :56, :] = 1.0  # everything above the box
    inside[..., 60:70, 30:50] = 1.0  # 200 of the box's 28 x 40 pixels
    assert float(rendering.mouth_error(outside, faces)) == 0.0
    assert float(rendering.mouth_error(inside, faces)) == pytest.approx(200 / (28 * 40))
    inside[..., 60:70, 30:50] = 0.5
    assert float(rendering.mouth_error(inside, faces, squared=True)) == pytest.approx(0.25 * 200 / (28 * 40))
    batches = [batch_with_units(2, 12, torch.randint(0, 32, (2, 24))) for _ in range(2)]
    trainer = cpu_trainer(max_steps=2, limit_val_batches=0)
    trainer.fit(rendering, DataLoader(batches, batch_size=None, collate_fn=lambda batch: batch))
    metrics = trainer.callback_metrics
    expected = metrics["train/l1"] + 10.0 * metrics["train/mouth_l1"]
    assert float(metrics["train/loss"]) == pytest.approx(float(expected), rel=1e-5)
    with pytest.raises(ValueError, match=r"mouth_box \(50, 40, 0, 96\) must be \(top, bottom, left, right\)"):
        FaceRendering(mouth_box=(50, 40, 0, 96))
    with pytest.raises(ValueError, match="mouth_weight"):
        FaceRendering(mouth_weight=-1.0)
    with pytest.raises(ValueError, match="mouth_loss must be 'l1' or 'l2', got 'l3'"):
        FaceRendering(mouth_loss="l3")


def test_squared_mouth_loss_enters_the_training_loss(cpu_trainer):
    torch.manual_seed(0)
    rendering = FaceRendering(renderer=SMALL, mouth_weight=10.0, mouth_loss="l2", warmup_steps=0)
    batch = batch_with_units(2, 12, torch.randint(0, 32, (2, 24)))
    trainer = cpu_trainer(max_steps=1, limit_val_batches=0)
    trainer.fit(rendering, DataLoader([batch], batch_size=None, collate_fn=lambda batch: batch))
    metrics = trainer.callback_metrics
    squared = float(metrics["train/loss"] - metrics["train/l1"]) / 10.0
    assert 0 < squared < float(metrics["train/mouth_l1"])  # errors below 1: their squares are smaller


def energy_units(wave: torch.Tensor, bins: int = 32) -> np.ndarray:
    """Test units at 50 Hz: the log energy of each 320-sample frame quantised into ``bins`` levels."""
    frames = wave[: len(wave) // 320 * 320].reshape(-1, 320)
    energy = torch.log(frames.pow(2).mean(1) + 1e-8)
    return ((energy + 16) / 16 * bins).clamp(0, bins - 1).long().numpy()


@pytest.mark.slow
def test_l1_falls_and_validation_scores_and_draws(tiny_corpus, cpu_trainer, tmp_path):
    import lightning as L

    folder, _ = tiny_corpus
    with SidecarWriter(tmp_path / "units.npz", "units", 50) as writer:
        for split in ("train", "valid"):
            reader = AVDataModule(test_shards=str(folder / "sentences" / f"{split}-*.tar"), num_workers=0)
            for batch in reader.test_dataloader():
                for key, wave, samples in zip(batch.keys, batch.wave, batch.wave_lengths):
                    writer.add(key, energy_units(wave[:samples]))
    data = AVDataModule(
        train_shards=str(folder / "sentences" / "train-*.tar"),
        val_shards=str(folder / "sentences" / "valid-*.tar"),
        sidecars={"units": str(tmp_path / "units.npz")},
        load_face=True,
        num_workers=0,
        max_frames=60,
        max_sample_frames=30,
        train_batches_per_epoch=30,  # ~10 frames a step
    )
    L.seed_everything(0)
    rendering = FaceRendering(
        renderer=SMALL, windows_per_clip=1, lr=3e-3, warmup_steps=3, quality_frames=4, sample_dir=str(tmp_path)
    )
    losses: list[float] = []

    class Record(L.Callback):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            losses.append(float(outputs["loss"]))

    # no inference mode: metric states reset under it could not be updated by the fit's validation afterwards
    trainer = cpu_trainer(
        max_epochs=1, num_sanity_val_steps=0, callbacks=[Record()], limit_val_batches=1, inference_mode=False
    )
    before = trainer.validate(rendering, data, verbose=False)[0]
    trainer.fit(rendering, data)
    after = trainer.callback_metrics
    assert np.mean(losses[-5:]) < 0.85 * np.mean(losses[:5])
    assert float(after["val/l1"]) < 0.8 * before["val/l1"]  # the same held-out clips, first frame as reference
    assert float(after["val/psnr"]) > before["val/psnr"] and 0 < float(after["val/ssim"]) <= 1
    grids = list(tmp_path.glob("epoch*.png"))
    assert len(grids) == 2  # one per validation pass
    from PIL import Image

    assert Image.open(grids[0]).size[1] == 4 * 96  # target, masked input, reference, output
    trainer.save_checkpoint(tmp_path / "renderer.ckpt")
    assert load_checkpoint(tmp_path / "renderer.ckpt")[STAGE_KEY] == "face_rendering"
    model = load_face_renderer(tmp_path / "renderer.ckpt")
    faces, windows = torch.rand(2, 3, 96, 96), torch.randint(0, 32, (2, 20))
    rendering.model.eval()
    assert torch.allclose(
        model(mask_lower_half(faces), faces, windows), rendering.model(mask_lower_half(faces), faces, windows)
    )
