"""Units from noisy input (seeded per key, the same for A and AV, none for V) and the translation-under-noise table."""

from __future__ import annotations

import argparse
import csv
from dataclasses import asdict

import numpy as np
import pytest
import torch

from av2av_lightning.data.features import audio_features
from av2av_lightning.data.noise import measured_snr_db
from av2av_lightning.data.sidecar import Sidecar, read_header
from av2av_lightning.data.transforms import lip_transform
from av2av_lightning.models.avhubert import AVHubert, AVHubertConfig
from av2av_lightning.models.unit_translator import EOS
from av2av_lightning.translation import UnitTranslation
from data_prep.clustering.kmeans import (
    KMeansQuantizer,
    WaveNoise,
    extract_features,
    iter_metas,
    iter_samples,
    layer_source,
)
from data_prep.clustering.kmeans import model_layer_source as layer_of
from data_prep.units import add_arguments, dedup, extract_units, head_source
from evaluation.translation_noise import main, parse_snr

UNITS, LAYER = 8, 2


def recording_source(modality: str, noise: WaveNoise | None, seen: dict):
    """A per-sample layer source whose model records the audio and video inputs it is given, by key order."""

    def fn(audio, video):
        seen.setdefault("inputs", []).append((audio, video))
        return torch.zeros((audio if audio is not None else video).shape[0], 2)

    return layer_source(fn, 1, modality=modality, noise=noise)


def model_inputs(shards, modality: str, noise: WaveNoise | None) -> dict[str, tuple]:
    seen: dict = {}
    keys = [meta.key for meta, _ in extract_features(shards, recording_source(modality, noise, seen))]
    return dict(zip(keys, seen["inputs"]))


@pytest.mark.parametrize("kind", ["white", "babble"])
def test_noise_is_seeded_per_key_the_same_for_audio_and_av_and_absent_for_video(av_shards, kind):
    noise = WaveNoise(0.0, kind)
    clean = model_inputs(av_shards.pattern, "audio", None)
    audio, again = model_inputs(av_shards.pattern, "audio", noise), model_inputs(av_shards.pattern, "audio", noise)
    av = model_inputs(av_shards.pattern, "av", noise)
    assert set(audio) == set(av) == set(clean) == set(av_shards.keys)
    for key in clean:
        assert torch.equal(audio[key][0], again[key][0]) and torch.equal(audio[key][0], av[key][0])
        assert not torch.allclose(audio[key][0], clean[key][0])
    keys = sorted(audio)
    assert not torch.equal(audio[keys[1]][0][:8], audio[keys[2]][0][:8])  # not one noise for every clip
    video_clean, video_noisy = (
        model_inputs(av_shards.pattern, "video", None),
        model_inputs(av_shards.pattern, "video", noise),
    )
    assert all(video_noisy[key][0] is None and torch.equal(video_noisy[key][1], video_clean[key][1]) for key in keys)
    assert (
        "noise" not in recording_source("video", noise, {}).spec and recording_source("video", noise, {}).noise is None
    )
    assert recording_source("av", noise, {}).spec["noise"] == {"snr_db": 0.0, "type": kind, "talkers": 5, "seed": 0}


@pytest.mark.parametrize("kind", ["white", "babble"])
@pytest.mark.parametrize("snr", [0.0, -5.0, 7.5])
def test_noise_is_mixed_at_the_asked_snr(av_shards, kind, snr):
    clean = {s.key: s.wave for s in iter_samples(av_shards.pattern)}
    noisy = list(WaveNoise(snr, kind).mix(iter_samples(av_shards.pattern)))
    assert [s.key for s in noisy] == list(clean)
    for sample in noisy:
        assert sample.wave.shape == clean[sample.key].shape and sample.wave.dtype == np.float32
        assert measured_snr_db(clean[sample.key], sample.wave) == pytest.approx(snr, abs=1e-3)


def test_white_noise_of_a_key_does_not_depend_on_the_other_samples(av_shards):
    full = {s.key: s.wave for s in WaveNoise(-5.0, "white").mix(iter_samples(av_shards.pattern))}
    chosen = set(av_shards.keys[3::4])
    some = list(WaveNoise(-5.0, "white").mix(iter_samples(av_shards.pattern, select=chosen.__contains__)))
    assert {s.key for s in some} == chosen and all(np.array_equal(s.wave, full[s.key]) for s in some)
    reseeded = {s.key: s.wave for s in WaveNoise(-5.0, "white", seed=1).mix(iter_samples(av_shards.pattern))}
    assert not any(np.array_equal(reseeded[key], full[key]) for key in full)


def test_noise_settings_are_checked():
    with pytest.raises(ValueError, match="noise type must be one of white, babble, got 'pink'"):
        WaveNoise(0.0, "pink")
    with pytest.raises(ValueError, match="finite number of dB, got inf"):
        WaveNoise(float("inf"))
    assert parse_snr("clean") is None and parse_snr("-5") == -5.0
    with pytest.raises(ValueError, match="SNR 'loud' is not a number of dB or 'clean'"):
        parse_snr("loud")


@pytest.fixture(scope="module")
def encoder() -> AVHubert:
    torch.manual_seed(0)
    return AVHubert(AVHubertConfig.tiny()).eval()


@pytest.fixture(scope="module")
def files(encoder, tmp_path_factory) -> dict:
    """A tiny random encoder (pretraining checkpoint), a random quantizer of its layer, an untrained translator."""
    out = tmp_path_factory.mktemp("noise_files")
    state = {f"model.{k}": v for k, v in encoder.state_dict().items()}
    checkpoint = {"av2av_stage": "pretraining", "encoder_config": asdict(encoder.config), "state_dict": state}
    torch.save(checkpoint, out / "encoder.ckpt")
    dim = encoder.config.embed_dim
    # at the scale of the random encoder's features (norm ~7), so frames spread over the units
    centroids = 0.1 * np.random.default_rng(0).standard_normal((UNITS, dim)).astype(np.float32)
    KMeansQuantizer(centroids, {"kind": "layer", "layer": LAYER}).save(out / "kmeans.npz")
    KMeansQuantizer(centroids[:, :7], {"kind": "layer", "layer": LAYER}).save(out / "kmeans7.npz")
    torch.manual_seed(0)
    translation = UnitTranslation("tiny", {"num_units": UNITS}, beam_size=1)
    with torch.no_grad():  # untrained, the tied </s> embedding often wins the first step: an empty translation
        translation.model.embed_tokens.weight[EOS] = 0.0
    saved = {"state_dict": translation.state_dict(), "hyper_parameters": dict(translation.hparams)}
    translation.on_save_checkpoint(saved)
    torch.save(saved, out / "translator.ckpt")
    return {name: out / f"{name}.{ext}" for name, ext in [("encoder", "ckpt"), ("translator", "ckpt")]} | {
        "quantizer": out / "kmeans.npz",
        "quantizer7": out / "kmeans7.npz",
    }


def test_clean_extraction_is_unchanged(av_shards, encoder, files, tmp_path):
    """Units with no noise are those of the decoded waves themselves (one utterance per forward pass, as the
    reference computes them), bit for bit, and the header names the clean source."""
    quantizer = KMeansQuantizer.load(files["quantizer"])
    source = layer_of(encoder, LAYER, "encoder.ckpt", "av", batch_frames=1)
    path, _, _ = extract_units(av_shards.pattern, source, quantizer, tmp_path / "clean", "valid")
    units = Sidecar.load(path)
    for sample in iter_samples(av_shards.pattern, with_video=True):
        with torch.inference_mode():
            audio = audio_features(torch.from_numpy(sample.wave), sample.num_frames)[None]
            video = lip_transform(sample.lip)[None, None]
            feats = encoder.extract_features(
                audio, video, torch.zeros(1, sample.num_frames, dtype=torch.bool), layer=LAYER
            )[0]
        assert np.array_equal(units[sample.key], dedup(quantizer(feats[0]))[0])
    assert read_header(path)["source"] == source.spec and "noise" not in source.spec
    noisy = layer_of(encoder, LAYER, "encoder.ckpt", "av", batch_frames=1, noise=WaveNoise(-5.0, "white"))
    path, _, _ = extract_units(av_shards.pattern, noisy, quantizer, tmp_path / "noisy", "valid")
    assert any(not np.array_equal(Sidecar.load(path)[key], units[key]) for key in units)


def test_head_source_records_its_noise(encoder):
    noise = WaveNoise(-5.0, "white")
    heads = head_source(encoder, modality="av", noise=noise)
    assert heads.noise == noise and heads.spec["noise"] == noise.spec and heads.spec["kind"] == "heads"
    video = head_source(encoder, modality="video", noise=noise)
    assert video.noise is None and "noise" not in video.spec


def test_units_extract_noise_option_reaches_the_sidecar_header(av_shards, files, tmp_path):
    parser = argparse.ArgumentParser()
    add_arguments(parser.add_subparsers(dest="command"))
    common = ["units", "extract", "--checkpoint", str(files["encoder"]), "--layer", str(LAYER), "--quantizer",
              str(files["quantizer"]), "--label", f"valid={av_shards.pattern}", "--device", "cpu", "--quiet"]  # fmt: skip
    for modality in ("audio", "video"):
        args = parser.parse_args([*common, "--modality", modality, "--out", str(tmp_path / modality)])
        args.noise_snr, args.noise_type = -5.0, "white"
        args.handler(args)
    for name in ("units", "durations"):
        header = read_header(tmp_path / "audio" / f"valid.{name}.npz")
        assert header["source"]["noise"] == {"snr_db": -5.0, "type": "white", "talkers": 5, "seed": 0}
        assert header["source"]["modality"] == "audio"
        video = read_header(tmp_path / "video" / f"valid.{name}.npz")["source"]
        assert video["modality"] == "video" and "noise" not in video  # video-only input hears no noise
    parsed = parser.parse_args([*common, "--out", "x", "--noise-snr", "0"])
    assert (parsed.noise_snr, parsed.noise_type) == (0.0, "babble")
    with pytest.raises(SystemExit):
        parser.parse_args([*common, "--out", "x", "--noise-snr", "0", "--noise-type", "pink"])


def test_bad_input_gives_one_line_errors(av_shards, files, tmp_path, capsys):
    base = ["--encoder", str(files["encoder"]), "--translator", str(files["translator"]), "--label",
            f"valid={av_shards.pattern}", "--out", str(tmp_path), "--device", "cpu", "--quiet"]  # fmt: skip
    cases = {
        "unknown inputs ['lips']; expected some of av, audio, video, shuffled": ["--inputs", "av", "lips"],
        "SNR 'loud' is not a number of dB or 'clean'": ["--snrs", "clean", "loud"],
        "noise type must be one of white, babble, got 'pink'": ["--noise-type", "pink"],
    }
    for message, extra in cases.items():
        assert main([*base, "--quantizer", str(files["quantizer"]), *extra]) == 2
        assert capsys.readouterr().err == f"translation_noise: error: {message}\n"
    assert main([*base, "--quantizer", str(files["quantizer7"])]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "a quantizer of 7-dim features, but the encoder" in err and "128-dim" in err
    assert main([*base, "--quantizer", str(tmp_path / "none.npz")]) == 2
    assert "no such k-means file" in capsys.readouterr().err
    assert not list(tmp_path.glob("units/*"))  # nothing extracted before the inputs were checked


@pytest.mark.slow  # builds the tiny corpus, extracts 7 unit sets and translates 8 times
def test_runner_writes_every_input_and_snr_row_and_the_plot(tiny_corpus, files, tmp_path, capsys):
    root, _ = tiny_corpus
    test = str(root / "sentences" / "test-*.tar")
    args = ["--encoder", str(files["encoder"]), "--quantizer", str(files["quantizer"]), "--translator",
            str(files["translator"]), "--label", f"test={test}", "--out", str(tmp_path), "--device", "cpu", "--quiet"]  # fmt: skip
    assert main(args) == 0
    with open(tmp_path / "translation_noise.csv") as handle:
        rows = list(csv.DictReader(handle))
    assert [(r["input"], r["snr"]) for r in rows] == [
        (i, s) for i in ("av", "audio", "video", "shuffled") for s in ("clean", "0", "-5")
    ]
    directions = [f"unit_bleu_{s}-{t}" for s in ("en", "es", "fr") for t in ("en", "es", "fr") if s != t]
    assert list(rows[0]) == ["split", "input", "snr", "noise", "pairs", "unit_bleu", "unit_edit", *directions]
    assert {r["pairs"] for r in rows} == {"12"}  # 2 sentences x 6 directions
    assert [r["noise"] for r in rows] == ["none", "babble", "babble"] * 2 + ["none"] * 6
    video = [r for r in rows if r["input"] == "video"]
    assert all(r["unit_bleu"] == video[0]["unit_bleu"] and r["unit_edit"] == video[0]["unit_edit"] for r in video)
    assert all(0.0 <= float(r["unit_bleu"]) <= 100.0 and float(r["unit_edit"]) >= 0.0 for r in rows)
    markdown = (tmp_path / "translation_noise.md").read_text()
    assert markdown.startswith("| split | input | snr | noise | pairs | unit_bleu | unit_edit | unit_bleu_en-es |")
    assert (tmp_path / "translation_noise.png").read_bytes()[:4] == b"\x89PNG"
    cached = sorted(p.parent.name for p in tmp_path.glob("units/*/test.units.npz"))
    assert cached == ["audio_babble_-5dB", "audio_babble_0dB", "audio_clean", "av_babble_-5dB", "av_babble_0dB",
                      "av_clean", "shuffled", "video_clean"]  # fmt: skip
    # the chance control: every sentence holds the clean units of another sentence of its own language
    clean, shuffled = (Sidecar.load(tmp_path / "units" / n / "test.units.npz") for n in ("audio_clean", "shuffled"))
    language = {meta.key: meta.lang for meta in iter_metas(test)}
    assert set(shuffled) == set(clean)
    for key in shuffled:
        donors = [k for k in clean if language[k] == language[key] and np.array_equal(clean[k], shuffled[key])]
        assert donors and key not in donors, key
    av, audio = (Sidecar.load(tmp_path / "units" / f"{n}_babble_-5dB" / "test.units.npz") for n in ("av", "audio"))
    assert set(av) == set(audio) and any(not np.array_equal(av[k], audio[k]) for k in av)  # same noise, lips added
    stamps = {p: p.stat().st_mtime_ns for p in tmp_path.glob("units/*/*.npz")}
    capsys.readouterr()
    assert main([*args, "--inputs", "audio", "video", "shuffled", "--snrs", "-5"]) == 0  # all cached: no re-extraction
    assert {p: p.stat().st_mtime_ns for p in tmp_path.glob("units/*/*.npz")} == stamps
    assert "| test | audio | -5 | babble | 12 |" in capsys.readouterr().out
