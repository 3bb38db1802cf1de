"""Unit HiFi-GAN vocoder: exact output lengths, duration round trips, unit streams from a 25 Hz sidecar, a mel
loss that falls, one GAN step with validation metrics and sample audio, the published size, one-line errors; the
unit context's Mels, and a Griffin-Lim vocoder that learns them and reloads speaking the same; voice Mels that
shift the predicted Mels by a voice's mean spectrum, whatever the pauses."""

from __future__ import annotations

from pathlib import Path

import lightning as L
import numpy as np
import pytest
import torch
import yaml

from av2av_lightning import vocoder
from av2av_lightning.checkpoints import STAGE_KEY
from av2av_lightning.data.datamodule import AVDataModule
from av2av_lightning.data.sidecar import Sidecar, SidecarWriter
from av2av_lightning.models.hifigan import (
    SAMPLES_PER_UNIT,
    HiFiGANDiscriminator,
    UnitHiFiGAN,
    UnitHiFiGANConfig,
    deduplicate,
    durations_from_log,
    expand,
)
from av2av_lightning.models.mel_spectrum import N_MELS, mean_voice_mels, vocoder_mels
from av2av_lightning.speaker_encoding import SpeakerEncoderTraining
from av2av_lightning.vocoder import PAD_UNIT, UnitVocoder, duration_targets, load_unit_vocoder

NUM_UNITS = 8
ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def unit_sidecar(av_shards, tmp_path_factory) -> Path:
    """25 Hz units of the synthetic shards: the loudest of 8 Mel bands of each frame (they follow the audio)."""
    loader = AVDataModule(val_shards=av_shards.pattern, max_frames=400, num_workers=0).val_dataloader()
    path = tmp_path_factory.mktemp("units") / "units.npz"
    with SidecarWriter(path, "units", rate_hz=25, dtype="int16") as writer:
        for batch in loader:
            bands = batch.audio[..., :24].reshape(*batch.audio.shape[:2], NUM_UNITS, 3).mean(-1)
            for key, row, n in zip(batch.keys, bands.argmax(-1), batch.lengths):
                writer.add(key, row[: int(n)].numpy())
    return path


def datamodule(av_shards, unit_sidecar, **overrides) -> AVDataModule:
    settings = dict(
        train_shards=av_shards.pattern,
        val_shards=av_shards.pattern,
        sidecars={"units": str(unit_sidecar)},
        max_frames=80,
        train_batches_per_epoch=10,
        num_workers=0,
        seed=0,
    )
    return AVDataModule(**{**settings, **overrides})


def tiny(**overrides) -> UnitHiFiGAN:
    return UnitHiFiGAN(UnitHiFiGANConfig.preset("tiny", **overrides))


def test_output_is_320_samples_per_unit():
    torch.manual_seed(0)
    model = tiny().eval()
    with torch.no_grad():
        for length in (1, 7, 13):
            wave = model(torch.randint(0, 100, (2, length)), torch.randn(2, 64))
            assert wave.shape == (2, SAMPLES_PER_UNIT * length)
            assert wave.abs().max() <= 1.0
        padded = model(torch.tensor([[3, 4, 5, PAD_UNIT, PAD_UNIT]]), None)
    assert padded.shape == (1, 5 * SAMPLES_PER_UNIT)
    assert (padded[0, 3 * SAMPLES_PER_UNIT :] == 0).all() and padded[0, : 3 * SAMPLES_PER_UNIT].abs().sum() > 0


def test_unit_context_feeds_the_generator_and_predicts_two_mel_frames_per_unit():
    torch.manual_seed(0)
    model = tiny(context_layers=2, context_hidden=24).eval()
    units, speaker = torch.randint(0, 100, (2, 9)), torch.randn(2, 64)
    with torch.no_grad():
        assert model.mels(units, speaker).shape == (2, 18, 80)
        assert model(units, speaker).shape == (2, 9 * SAMPLES_PER_UNIT)
        later = units.clone()
        later[:, -1] = (later[:, -1] + 1) % 100
        assert not torch.equal(model.mels(units, speaker)[:, :2], model.mels(later, speaker)[:, :2])  # both ways
    assert model.generator.pre.weight.shape[1] == 48  # the context's features, not the raw embeddings
    with torch.no_grad():  # a padded batch gives each row's own Mels: padding never reaches the backward direction
        short = units[1:, :5]
        batch = torch.cat([units[:1], torch.cat([short, torch.full((1, 4), PAD_UNIT)], dim=1)])
        alone = model.mels(short, speaker[1:])
        assert torch.allclose(model.mels(batch, speaker)[1:, :10], alone, atol=1e-5)
    speaking = tiny(context_layers=1, synthesis="griffin_lim")
    assert speaking.generator is None
    with torch.no_grad():
        assert speaking(torch.tensor([[3, 4, PAD_UNIT]]), torch.randn(1, 64)).shape == (1, 3 * SAMPLES_PER_UNIT)


def test_voice_mels_shift_the_predicted_mels_by_the_voice_and_default_to_the_average_voice():
    torch.manual_seed(0)
    model = tiny(context_layers=1, synthesis="griffin_lim", voice_mels=True).eval()
    assert model.config.condition_dim == 64 + N_MELS
    units, speaker = torch.randint(0, 100, (2, 6)), torch.randn(2, 64 + N_MELS)
    shift = torch.cat([torch.zeros(2, 64), torch.linspace(-1, 1, N_MELS).expand(2, -1)], dim=1)
    with torch.no_grad():
        assert torch.allclose(model.mels(units, speaker + shift), model.mels(units, speaker) + shift[:, None, 64:])
        model.average_voice.fill_(-3.0)
        neutral = torch.cat([torch.zeros(2, 64), torch.full((2, N_MELS), -3.0)], dim=1)
        assert torch.equal(model.mels(units, None), model.mels(units, neutral))
    with pytest.raises(ValueError, match=r"^speaker vector must be \[2, 144\], got \(2, 64\)$"):
        model.mels(units, speaker[:, :64])


def buzz(f0: float, tilt: float) -> torch.Tensor:
    """One second of a voice-like buzz: harmonics of f0 falling as ``1 / k^tilt``, 4 Hz loudness, short fades."""
    t = torch.arange(16000) / 16000
    wave = sum(torch.sin(2 * torch.pi * f0 * k * t) / k**tilt for k in range(1, int(7000 // f0)))
    fade = torch.clamp(torch.minimum(t, t[-1] - t) / 0.02, max=1.0)
    return 0.1 * wave * fade * (0.6 + 0.4 * torch.sin(2 * torch.pi * 4 * t))


def test_mean_voice_mels_follow_the_voice_not_its_pauses():
    def paused(wave: torch.Tensor, before: int, after: int) -> torch.Tensor:
        return torch.cat([torch.zeros(before), wave, torch.zeros(after)])

    low, high = buzz(120, 1.0), buzz(240, 0.5)
    short, long = paused(low, 1600, 1600), paused(low, 40000, 8000)
    voice = mean_voice_mels(short)
    assert voice.shape == (N_MELS,) and torch.allclose(mean_voice_mels(long), voice, atol=1e-4)
    assert (vocoder_mels(long).mean(0) - vocoder_mels(short).mean(0)).abs().mean() > 2.0  # a plain mean would move
    assert (mean_voice_mels(paused(high, 1600, 1600)) - voice).abs().mean() > 1.0


def test_duration_round_trip():
    units = torch.tensor([5, 5, 5, 2, 9, 9, 2, 2, 2, 2, 7])
    dedup, durations = deduplicate(units)
    assert dedup.tolist() == [5, 2, 9, 2, 7] and durations.tolist() == [3, 1, 2, 4, 1]
    assert torch.equal(expand(dedup, durations), units)
    assert torch.equal(durations_from_log(torch.log1p(durations.float())), durations)
    assert durations_from_log(torch.tensor([-3.0, 0.0, 0.2])).tolist() == [1, 1, 1]  # never below one frame
    model = tiny(speaker_dim=0).eval()
    with torch.no_grad():
        assert torch.equal(model.synthesize(dedup, durations=durations), model(units[None])[0])
        predicted = model.synthesize(dedup)
    assert len(predicted) % SAMPLES_PER_UNIT == 0 and len(predicted) >= SAMPLES_PER_UNIT * len(dedup)


def test_duration_targets_are_padded_per_row():
    units = torch.tensor([[1, 1, 2, 2, 2, 3], [4, 4, 4, 4, PAD_UNIT, PAD_UNIT]])
    dedup, durations = duration_targets(units, torch.tensor([6, 4]))
    assert dedup.tolist() == [[1, 2, 3], [4, PAD_UNIT, PAD_UNIT]]
    assert durations.tolist() == [[2, 3, 1], [4, 0, 0]]


def test_unit_stream_repeats_25hz_units_and_matches_the_audio(av_shards, unit_sidecar):
    module = UnitVocoder(units="units", unit_rate=25)
    batch = next(iter(datamodule(av_shards, unit_sidecar).val_dataloader()))
    units, lengths = module.unit_stream(batch)
    assert torch.equal(lengths, batch.wave_lengths // SAMPLES_PER_UNIT)
    assert torch.equal(lengths, 2 * batch.lengths)
    first = batch.labels["units"][0, : batch.lengths[0]]
    assert torch.equal(units[0, : lengths[0]], first.repeat_interleave(2))
    assert (units[0, lengths[0] :] == PAD_UNIT).all()


@pytest.fixture(scope="module")
def dedup_sidecars(unit_sidecar, tmp_path_factory) -> dict[str, str]:
    """The same units as unit extraction writes them: de-duplicated units and their durations (rate null)."""
    out = tmp_path_factory.mktemp("dedup")
    aligned = Sidecar.load(unit_sidecar)
    with (
        SidecarWriter(out / "units", "units", None, "int16") as units,
        SidecarWriter(out / "dur", "durations", None) as durations,
    ):
        for key in aligned:
            dedup, counts = deduplicate(torch.from_numpy(aligned[key].astype(np.int64)))
            units.add(key, dedup.numpy())
            durations.add(key, counts.numpy())
    return {"units": str(out / "units.npz"), "durations": str(out / "dur.npz")}


def test_deduplicated_units_with_durations_give_the_same_stream(av_shards, unit_sidecar, dedup_sidecars):
    aligned_batch = next(iter(datamodule(av_shards, unit_sidecar).val_dataloader()))
    dedup_batch = next(iter(datamodule(av_shards, dedup_sidecars["units"], sidecars=dedup_sidecars).val_dataloader()))
    assert dedup_batch.keys == aligned_batch.keys
    expected = UnitVocoder(unit_rate=25).unit_stream(aligned_batch)
    found = UnitVocoder(unit_rate=25, durations="durations").unit_stream(dedup_batch)
    assert torch.equal(found[0], expected[0]) and torch.equal(found[1], expected[1])


def test_cropped_samples_with_deduplicated_units_are_refused(av_shards, dedup_sidecars):
    module = UnitVocoder(unit_rate=25, durations="durations")
    loader = datamodule(av_shards, None, sidecars=dedup_sidecars, max_sample_frames=8).val_dataloader()
    with pytest.raises(ValueError, match=r"units x durations give \d+ frames but the audio has \d+"):
        for batch in loader:
            module.unit_stream(batch)


def test_one_line_errors(tmp_path):
    with pytest.raises(ValueError, match="unit id 100 is outside the vocoder's table of 100 units"):
        tiny()(torch.tensor([[5, 100]]))
    with pytest.raises(ValueError, match="unit_rate must be 25 or 50 Hz, got 100"):
        UnitVocoder(unit_rate=100)
    with pytest.raises(ValueError, match="unknown unit HiFi-GAN preset 'huge'"):
        UnitHiFiGANConfig.preset("huge")
    with pytest.raises(ValueError, match="must multiply to 320"):
        UnitHiFiGANConfig.preset("tiny", upsample_rates=[5, 4, 4, 2])
    with pytest.raises(ValueError, match="unknown synthesis 'wavenet'; expected one of generator, griffin_lim"):
        UnitHiFiGANConfig.preset("tiny", synthesis="wavenet")
    with pytest.raises(ValueError, match="synthesis griffin_lim speaks the Mels the unit context predicts"):
        UnitHiFiGANConfig.preset("tiny", synthesis="griffin_lim")
    with pytest.raises(
        ValueError, match="voice_mels shapes the Mels that Griffin-Lim speaks: set synthesis griffin_lim"
    ):
        UnitHiFiGANConfig.preset("tiny", context_layers=1, voice_mels=True)
    with pytest.raises(ValueError, match=r"no unit context to predict Mels \(context_layers: 0\)"):
        tiny().mels(torch.tensor([[1, 2]]))
    speaker_checkpoint = tmp_path / "speaker.ckpt"
    torch.save({STAGE_KEY: "speaker_encoder", "state_dict": {}}, speaker_checkpoint)
    with pytest.raises(ValueError, match="a checkpoint of stage 'speaker_encoder', expected 'vocoder'"):
        load_unit_vocoder(speaker_checkpoint)
    with pytest.raises(FileNotFoundError, match="no such checkpoint"):
        load_unit_vocoder(tmp_path / "missing.ckpt")


def _conv(cin: int, cout: int, kernel: int) -> int:
    return cin * cout * kernel + cout


def generator_size(config: UnitHiFiGANConfig) -> int:
    """Conv weights and biases of the generator: input conv, upsampling, multi-receptive-field blocks, output."""
    channels = config.initial_channels
    expected = _conv(config.unit_dim + config.speaker_proj_dim, channels, 7)
    for kernel in config.upsample_kernels:
        expected += _conv(channels, channels // 2, kernel)
        channels //= 2
        expected += sum(2 * len(config.resblock_dilations) * _conv(channels, channels, k) for k in (3, 7, 11))
    return expected + _conv(channels, 1, 7)


def generator_parameters(config: UnitHiFiGANConfig) -> int:
    with torch.device("meta"):
        return sum(p.numel() for p in UnitHiFiGAN(config).generator.parameters())


def test_published_generator_size():
    """Conv weights and biases of the published unit HiFi-GAN generator (weight-norm gains add < 0.1%)."""
    config = UnitHiFiGANConfig.preset("published")
    expected = generator_size(config)
    with torch.device("meta"):
        model = UnitHiFiGAN(config)
        discriminator = HiFiGANDiscriminator()
    count = generator_parameters(config)
    assert 13_000_000 < expected < 14_000_000
    assert abs(count - expected) / expected < 0.005, (count, expected)
    assert model.units.weight.shape == (1000, 128) and model.speaker_proj.weight.shape == (128, 256)
    # duration predictor: 2 convs (128 -> 128, k=3), 2 LayerNorms, linear head
    assert sum(p.numel() for p in model.duration.parameters()) == 2 * _conv(128, 128, 3) + 4 * 128 + 129
    assert sum(p.numel() for p in discriminator.parameters()) > 40_000_000  # MPD ~41 M + MSD ~29 M (HiFi-GAN)


def test_single_gpu_config_is_hifigan_v2_width_with_published_discriminators():
    """experiments/renderer/vocoder_gpu.yaml: a ~1 M-parameter generator (HiFi-GAN V2's 128 channels; V2 has
    0.93 M with its 80-Mel input conv) trained against the published discriminators, from the first step."""
    init = yaml.safe_load((ROOT / "experiments/renderer/vocoder_gpu.yaml").read_text())["model"]["init_args"]
    config = UnitHiFiGANConfig.preset(init["preset"], **init["vocoder"])
    expected = generator_size(config)
    assert 950_000 < expected < 1_100_000
    assert abs(generator_parameters(config) - expected) / expected < 0.005
    assert config.discriminator_width == 1.0 and init["gan_start_step"] == 0


class History(L.Callback):
    def __init__(self, key: str) -> None:
        self.key, self.values = key, []

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx) -> None:
        self.values.append(float(trainer.callback_metrics[self.key]))


@pytest.mark.slow
def test_mel_l1_falls_without_gan(av_shards, unit_sidecar, cpu_trainer, tmp_path):
    torch.manual_seed(0)
    module = UnitVocoder(
        vocoder={"num_units": NUM_UNITS}, unit_rate=25, segment_units=16, gan_start_step=10**9, lr=2e-3, total_steps=200
    )
    history = History("train/mel_l1")
    trainer = cpu_trainer(max_steps=40, callbacks=[history], limit_val_batches=0, default_root_dir=tmp_path)
    trainer.fit(module, datamodule=datamodule(av_shards, unit_sidecar))
    first, last = np.mean(history.values[:5]), np.mean(history.values[-5:])
    assert len(history.values) == 40
    assert last < 0.75 * first, (first, last)


@pytest.mark.slow
def test_gan_step_validation_metrics_audio_and_checkpoint(av_shards, unit_sidecar, cpu_trainer, tmp_path, monkeypatch):
    """Speakers from a (frozen) speaker-encoder checkpoint; one GAN step moves the discriminator."""
    encoder = SpeakerEncoderTraining()
    speaker_checkpoint = {"state_dict": encoder.state_dict()}
    encoder.on_save_checkpoint(speaker_checkpoint)
    torch.save(speaker_checkpoint, tmp_path / "speaker.ckpt")
    torch.manual_seed(0)
    module = UnitVocoder(
        vocoder={"num_units": NUM_UNITS}, unit_rate=25, segment_units=8, speaker_encoder=str(tmp_path / "speaker.ckpt")
    )
    assert module.speaker_mode == "encoder" and module.config.speaker_dim == 64
    before = [p.detach().clone() for p in module.discriminator.parameters()]
    tables = []
    monkeypatch.setattr(vocoder, "log_media_table", lambda trainer, key, rows: tables.append((key, rows)))
    trainer = cpu_trainer(max_epochs=1, limit_val_batches=1, num_sanity_val_steps=0, default_root_dir=tmp_path)
    trainer.fit(module, datamodule=datamodule(av_shards, unit_sidecar, train_batches_per_epoch=1))
    assert trainer.global_step == 2  # one batch: a discriminator and a generator step
    metrics = trainer.callback_metrics
    for key in ("train/loss_d", "train/adversarial", "train/feature_matching", "val/mel_l1", "val/stoi", "val/estoi"):
        assert torch.isfinite(metrics[key]), key
    assert metrics["val/pesq_scored"] + metrics["val/pesq_failed"] > 0
    assert any(not torch.equal(a, b) for a, b in zip(before, module.discriminator.parameters()))
    (key, rows) = tables[0]
    assert key == "val/audio" and set(rows[0]) == {"key", "generated", "reference"}
    assert len(rows[0]["generated"]) % SAMPLES_PER_UNIT == 0
    checkpoint = tmp_path / "vocoder.ckpt"
    trainer.save_checkpoint(checkpoint)
    loaded = load_unit_vocoder(checkpoint)
    units, speaker = torch.randint(0, NUM_UNITS, (1, 6)), torch.randn(1, 64)
    module.model.eval()
    with torch.no_grad():
        assert torch.allclose(loaded(units, speaker), module.model(units, speaker), atol=1e-6)
    assert torch.load(checkpoint, weights_only=True)["speaker_mode"] == "encoder"


class Voices(L.Callback):
    """The mean voice Mels of each training batch (a vocoder with voice_mels)."""

    def __init__(self) -> None:
        self.batch_means = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if pl_module.config.voice_mels:
            self.batch_means.append(pl_module.speaker_embedding(batch)[:, -N_MELS:].mean(0))


@pytest.mark.slow
@pytest.mark.parametrize("voice_mels", [False, True])
def test_griffin_lim_vocoder_learns_its_mels_and_reloads_speaking_the_same(
    av_shards, unit_sidecar, cpu_trainer, tmp_path, voice_mels
):
    """No generator or discriminator: one optimiser on the context's Mels and the durations. With voice Mels, the
    vocoder keeps the average voice it trained on, for inputs without speech (the Mels' fall from units: the demo's
    vocoder stage)."""
    torch.manual_seed(0)
    config = {"num_units": NUM_UNITS, "context_layers": 1, "context_hidden": 32, "synthesis": "griffin_lim"}
    module = UnitVocoder(vocoder={**config, "voice_mels": voice_mels}, unit_rate=25, lr=3e-3, total_steps=200)
    assert module.discriminator is None
    history, voices = History("train/context_mel_l1"), Voices()
    trainer = cpu_trainer(max_steps=40, callbacks=[history, voices], limit_val_batches=1, default_root_dir=tmp_path)
    trainer.fit(module, datamodule=datamodule(av_shards, unit_sidecar))
    assert trainer.global_step == 40
    if not voice_mels:  # given the voice, the Mels start within 0.4 of the speech's: these synthetic units add little
        first, last = np.mean(history.values[:5]), np.mean(history.values[-5:])
        assert last < 0.6 * first, (first, last)
    for key in ("val/mel_l1", "val/context_mel_l1", "val/stoi"):
        assert torch.isfinite(trainer.callback_metrics[key]), key
    checkpoint = tmp_path / "vocoder.ckpt"
    trainer.save_checkpoint(checkpoint)
    loaded, units = load_unit_vocoder(checkpoint), torch.tensor([1, 5, 2])
    module.model.eval()
    assert torch.equal(loaded.synthesize(units, None, torch.tensor([2, 3, 1])),
                       module.model.synthesize(units, None, torch.tensor([2, 3, 1])))  # fmt: skip
    if voice_mels:  # the average over the batches it trained on
        assert torch.equal(loaded.average_voice, module.model.average_voice)
        assert torch.allclose(loaded.average_voice, torch.stack(voices.batch_means).mean(0), atol=1e-5)


def test_speaker_table_mode_and_unknown_speakers(av_shards, unit_sidecar):
    module = UnitVocoder(vocoder={"num_units": NUM_UNITS}, unit_rate=25, speakers=["spk0", "spk1", "spk2", "spk3"])
    batch = next(iter(datamodule(av_shards, unit_sidecar).val_dataloader()))
    assert module.speaker_mode == "table" and module.speaker_embedding(batch).shape == (len(batch), 64)
    module = UnitVocoder(vocoder={"num_units": NUM_UNITS}, unit_rate=25, speakers=["spk9"])
    with pytest.raises(ValueError, match=r"speaker\(s\) \[.*'spk0'.*\] are not in the vocoder's speaker table of 1"):
        module.speaker_embedding(batch)
    assert UnitVocoder(vocoder={"num_units": NUM_UNITS}).speaker_mode == "none"
