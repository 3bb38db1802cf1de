"""Cluster targets (MFCC, k-means, label sidecars) and unit-quality metrics."""

from __future__ import annotations

import argparse
import json
import math

import numpy as np
import pytest
import torch

from av2av_lightning.data.codecs import encode_audio, encode_video
from av2av_lightning.data.datamodule import AVDataModule
from av2av_lightning.data.schema import SAMPLE_RATE, SAMPLES_PER_FRAME, SampleMeta
from av2av_lightning.data.shards import sample_record, write_shards
from av2av_lightning.data.sidecar import Sidecar
from data_prep.clustering.cli import add_arguments
from data_prep.clustering.kmeans import (
    KMeansQuantizer,
    extract_features,
    fit_kmeans,
    label_shards,
    layer_source,
    model_layer_source,
    normalize_utterance,
    sample_selector,
)
from data_prep.clustering.mfcc import deltas, mfcc_features
from data_prep.clustering.unit_quality import (
    PhoneCounts,
    agreement,
    cluster_purity,
    phone_frames,
    phone_purity,
    pnmi,
    sidecar_quality,
)

# ---------------------------------------------------------------------------- MFCC


def test_mfcc_has_four_frames_per_video_frame():
    rng = np.random.default_rng(0)
    for frames, samples in [(10, 6400), (10, 6000), (10, 7000), (1, 100)]:
        feats = mfcc_features(0.1 * rng.standard_normal(samples).astype(np.float32), frames)
        assert feats.shape == (4 * frames, 39)
        assert torch.isfinite(feats).all()
    assert mfcc_features(np.zeros(6400 + 1, np.float32)).shape == (44, 39)  # default: ceil(S / 640) frames


def test_deltas_of_constant_are_zero_and_of_a_ramp_are_its_slope():
    constant = torch.full((20, 13), 3.5)
    assert torch.equal(deltas(constant), torch.zeros(20, 13))
    ramp = torch.arange(20.0)[:, None].expand(20, 2)
    assert torch.allclose(deltas(ramp)[2:-2], torch.ones(16, 2))  # edges are replicated, the inside is exact
    silence = mfcc_features(np.zeros(6400, np.float32), 10)
    assert torch.equal(silence[:, 13:], torch.zeros(40, 26))


def test_mfcc_tells_a_tone_from_noise():
    t = np.arange(16000) / SAMPLE_RATE
    tone = mfcc_features((0.3 * np.sin(2 * np.pi * 440 * t)).astype(np.float32), 25)
    noise = mfcc_features(0.3 * np.random.default_rng(1).standard_normal(16000).astype(np.float32), 25)
    within = (tone[4:-8, :13] - tone[4:-8, :13].mean(0)).norm(dim=1).mean()
    between = (tone[4:-8, :13].mean(0) - noise[4:-8, :13].mean(0)).norm()
    assert between > 5 * within


# ---------------------------------------------------------------------------- k-means


def _blobs(n_per: int = 50, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    centres = 20.0 * np.eye(4, 5)
    feats = np.concatenate([c + rng.standard_normal((n_per, 5)) for c in centres]).astype(np.float32)
    return feats, np.repeat(np.arange(4), n_per)


def test_kmeans_recovers_separated_blobs():
    feats, truth = _blobs()
    quantizer = fit_kmeans(feats, 4, seed=0, batch_size=64, n_init=3, max_iter=20, spec={"kind": "test"})
    counts = PhoneCounts(4)
    counts.add([str(t) for t in truth], quantizer(feats))
    assert phone_purity(counts.matrix()) == 1.0 and cluster_purity(counts.matrix()) == 1.0
    assert pnmi(counts.matrix()) == pytest.approx(1.0)
    assert quantizer.inertia == pytest.approx(5.0, rel=0.3)  # 5 unit-variance dims
    with pytest.raises(ValueError, match="at least k frames"):
        fit_kmeans(feats[:3], 4)


def test_quantizer_round_trip_and_matches_sklearn(tmp_path):
    from sklearn.cluster import MiniBatchKMeans

    rng = np.random.default_rng(3)
    feats = rng.standard_normal((500, 8)).astype(np.float32)
    kmeans = MiniBatchKMeans(n_clusters=16, random_state=0, n_init=3, batch_size=128).fit(feats)
    quantizer = KMeansQuantizer(kmeans.cluster_centers_, {"kind": "layer", "layer": 6, "checkpoint": "it1.ckpt"})
    test = rng.standard_normal((2000, 8)).astype(np.float32)
    assert np.array_equal(quantizer(test), kmeans.predict(test))
    assert quantizer(test.reshape(4, 500, 8)).shape == (4, 500)  # batched [B, T, D]
    loaded = KMeansQuantizer.load(quantizer.save(tmp_path / "km.npz"))
    assert np.array_equal(loaded(test), quantizer(test))
    assert loaded.spec == quantizer.spec and (loaded.k, loaded.dim) == (16, 8)


def test_normalize_utterance_standardises_and_scales_frames():
    feats = np.random.default_rng(0).normal(3.0, 2.0, (50, 6)).astype(np.float32)
    standard = normalize_utterance(feats, "utterance")
    assert np.allclose(standard.mean(0), 0, atol=1e-5) and np.allclose(standard.std(0), 1, atol=1e-3)
    assert np.allclose(np.linalg.norm(normalize_utterance(feats, "cosine"), axis=1), 1)
    both = normalize_utterance(torch.from_numpy(feats), "utterance-cosine")
    assert isinstance(both, torch.Tensor) and torch.allclose(
        both, torch.nn.functional.normalize(torch.from_numpy(standard))
    )
    assert normalize_utterance(feats, "none") is feats
    with pytest.raises(ValueError, match=r"needs one utterance's features \[T, D\], got shape \(2, 50, 6\)"):
        normalize_utterance(np.stack([feats, feats]), "utterance")
    with pytest.raises(ValueError, match="must be one of none, utterance, cosine, utterance-cosine, got 'l2'"):
        normalize_utterance(feats, "l2")


def test_normalised_quantizer_ignores_an_utterance_offset_and_keeps_its_norm(tmp_path):
    """Two speakers whose features differ by a per-utterance offset and scale: raw k-means splits them by speaker,
    the utterance-normalised quantizer labels their frames alike (what per-utterance normalisation is for)."""
    feats, truth = _blobs()
    order = np.random.default_rng(1).permutation(len(feats))
    feats, truth = feats[order], truth[order]
    first, second = feats[: len(feats) // 2], feats[len(feats) // 2 :]
    speaker_b = 2.5 * second + 40.0
    parts = [normalize_utterance(first, "utterance-cosine"), normalize_utterance(speaker_b, "utterance-cosine")]
    quantizer = fit_kmeans(np.concatenate(parts), 4, n_init=3, norm="utterance-cosine")
    raw = fit_kmeans(np.concatenate([first, speaker_b]), 4, n_init=3)

    def purity(model, utterances):
        counts = PhoneCounts(4)
        for utterance, phones in zip(utterances, np.split(truth, 2)):
            counts.add([str(p) for p in phones], model(utterance))
        return phone_purity(counts.matrix())

    assert purity(quantizer, [first, speaker_b]) > 0.95 and purity(raw, [first, speaker_b]) < 0.75
    loaded = KMeansQuantizer.load(quantizer.save(tmp_path / "km.npz"))
    assert loaded.norm == "utterance-cosine" and np.array_equal(loaded(speaker_b), quantizer(speaker_b))
    header = {"format": "av2av-kmeans", "version": 1, "k": 2, "dim": 3, "spec": {}}
    np.savez(tmp_path / "old.npz", header=np.array(json.dumps(header)), centroids=np.zeros((2, 3), np.float32))
    assert KMeansQuantizer.load(tmp_path / "old.npz").norm == "none"  # written before normalisation existed
    np.savez(tmp_path / "odd.npz", header=np.array(json.dumps(header | {"norm": "l2"})), centroids=np.zeros((2, 3)))
    with pytest.raises(ValueError, match=r"odd.npz: unknown feature normalisation 'l2'"):
        KMeansQuantizer.load(tmp_path / "odd.npz")


def test_quantizer_load_refuses_other_files(tmp_path):
    garbage = tmp_path / "garbage.npz"
    garbage.write_bytes(b"not a zip file at all")
    wrong_format = tmp_path / "wrong.npz"
    np.savez(wrong_format, header=np.array(json.dumps({"format": "other"})), centroids=np.zeros((2, 3), np.float32))
    wrong_shape = tmp_path / "shape.npz"
    header = {"format": "av2av-kmeans", "version": 1, "k": 4, "dim": 3, "spec": {}}
    np.savez(wrong_shape, header=np.array(json.dumps(header)), centroids=np.zeros((2, 3), np.float32))
    pickled = tmp_path / "pickled.npz"
    np.savez(pickled, header=np.array(json.dumps(header)), centroids=np.array([{"a": 1}], dtype=object))
    for path in (garbage, wrong_format, wrong_shape, pickled):
        with pytest.raises(ValueError) as err:
            KMeansQuantizer.load(path)
        assert str(path) in str(err.value) and "\n" not in str(err.value)
    with pytest.raises(FileNotFoundError):
        KMeansQuantizer.load(tmp_path / "missing.npz")


def test_sample_selector_is_seeded_and_keeps_about_the_fraction():
    keys = [f"utt{i}" for i in range(2000)]
    first = [k for k in keys if sample_selector(0.1, 7)(k)]
    assert first == [k for k in keys if sample_selector(0.1, 7)(k)]
    assert first != [k for k in keys if sample_selector(0.1, 8)(k)]
    assert 150 < len(first) < 250
    with pytest.raises(ValueError):
        sample_selector(0.0, 0)


# ---------------------------------------------------------------------------- unit quality


def test_pnmi_cases():
    rng = np.random.default_rng(0)
    phones = rng.integers(0, 4, 100_000)

    def counts(units, k):
        matrix = np.zeros((4, k), np.int64)
        np.add.at(matrix, (phones, units), 1)
        return matrix

    assert pnmi(counts(phones, 4)) == pytest.approx(1.0)
    assert pnmi(counts(rng.integers(0, 4, len(phones)), 4)) < 0.001
    assert pnmi(counts(phones // 2, 2)) == pytest.approx(0.5, abs=0.01)  # merge pairs: 1 of 2 bits
    assert pnmi(counts(2 * phones + rng.integers(0, 2, len(phones)), 8)) == pytest.approx(1.0)  # split: no loss
    assert math.isnan(pnmi(np.array([[5, 3]])))  # one phone: nothing to explain


def test_purities_by_hand():
    # phones x units: unit 0 = 3 a + 1 b, unit 1 = 2 b, unit 2 = 4 c
    counts = np.array([[3, 0, 0], [1, 2, 0], [0, 0, 4]])
    assert phone_purity(counts) == pytest.approx((3 + 2 + 4) / 10)
    assert cluster_purity(counts) == pytest.approx((3 + 2 + 4) / 10)
    counts = np.array([[2, 2], [0, 6]])  # phone a split over two units, unit 1 mixes a and b
    assert phone_purity(counts) == pytest.approx((2 + 6) / 10)
    assert cluster_purity(counts) == pytest.approx((2 + 6) / 10)
    counts = np.array([[4, 0], [3, 3]])
    assert phone_purity(counts) == pytest.approx((4 + 3) / 10)
    assert cluster_purity(counts) == pytest.approx((4 + 3) / 10)
    counts = np.array([[5, 1, 0], [0, 0, 4]])
    assert phone_purity(counts) == pytest.approx(10 / 10)
    assert cluster_purity(counts) == pytest.approx(9 / 10)


def test_agreement_and_phone_frames():
    assert agreement([1, 2, 3, -100], [1, 5, 3, 4]) == pytest.approx(2 / 3)
    assert math.isnan(agreement([-100], [1]))
    with pytest.raises(ValueError):
        agreement([1, 2], [1])
    # 100 Hz: frame i centred at (i + 0.5) / 100 s
    frames = phone_frames([("a", 0.0, 0.02), ("_", 0.02, 0.03), ("b", 0.03, 0.05)], 6, 100)
    assert frames == ["a", "a", "sil", "b", "b", "sil"]


# ---------------------------------------------------------------------------- end to end

PHONE_TONES = {"a": 300.0, "e": 800.0, "i": 1800.0, "o": 3500.0}


def _phone_tone_shards(root, count: int = 8, seed: int = 0):
    """Utterances whose phones are tones of a phone-specific frequency (pauses silent), with alignments."""
    rng = np.random.default_rng(seed)
    records, metas = [], {}
    for index in range(count):
        frames = int(rng.integers(20, 31))
        seconds = frames / 25
        wave = np.zeros(frames * SAMPLES_PER_FRAME, np.float32)
        phonemes, start = [], 0.0
        while start < seconds - 0.05:
            phone = str(rng.choice(list(PHONE_TONES) + ["_"]))
            end = min(seconds, start + float(rng.uniform(0.06, 0.16)))
            if phone != "_":
                a, b = int(start * SAMPLE_RATE), int(end * SAMPLE_RATE)
                t = np.arange(b - a) / SAMPLE_RATE
                wave[a:b] = 0.3 * np.sin(2 * np.pi * PHONE_TONES[phone] * t)
            phonemes.append((phone, round(start, 4), round(end, 4)))
            start = end
        wave += 0.003 * rng.standard_normal(len(wave)).astype(np.float32)
        key = f"tone_{index:03d}"
        meta = SampleMeta(key, "train", "en", "spk0", "tones", key, frames, phonemes=phonemes)
        lip = np.full((frames, 96, 96), 120, np.uint8)
        lip[:, 40:60, 30:66] = (40 + 5 * np.arange(frames) % 80).astype(np.uint8)[:, None, None]
        records.append(sample_record(key, meta.to_json(), encode_audio(wave), encode_video(lip)))
        metas[key] = meta
    paths = write_shards(records, len(records), root / "train", max_per_shard=4)
    return [str(p) for p in paths], metas


@pytest.fixture(scope="module")
def tone_shards(tmp_path_factory):
    return _phone_tone_shards(tmp_path_factory.mktemp("tones"))


def _cli(argv):
    parser = argparse.ArgumentParser()
    add_arguments(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    args.handler(args)


def test_cluster_mfcc_end_to_end(tone_shards, tmp_path, capsys):
    paths, metas = tone_shards
    out = tmp_path / "labels"
    argv = ["cluster", "mfcc", "--shards", paths[0], "--shards", paths[1], "--label", f"train={paths[0]}"]
    argv += ["--label", f"train={paths[1]}", "--label", f"half={paths[1]}", "--out", str(out), "--k", "12"]
    _cli(argv + ["--sample-fraction", "1.0", "--n-init", "3", "--quiet"])
    printed = capsys.readouterr().out
    assert "inertia" in printed and "PNMI" in printed
    quantizer = KMeansQuantizer.load(out / "kmeans.npz")
    assert quantizer.spec["kind"] == "mfcc" and (quantizer.k, quantizer.dim) == (12, 39)

    labels = Sidecar.load(out / "train.km12.npz")
    assert labels.rate == 100 and labels.dtype == np.int16 and set(labels) == set(metas)
    for key, meta in metas.items():
        assert len(labels[key]) == 4 * meta.num_frames
    assert len(Sidecar.load(out / "half.km12.npz")) == 4

    quality = sidecar_quality(paths, labels)
    shuffled = {key: np.random.default_rng(0).integers(0, 12, len(labels[key])) for key in labels}
    random_counts = PhoneCounts()
    for key, meta in metas.items():
        random_counts.add_utterance(meta, shuffled[key], 100)
    assert quality.pnmi > 0.5 and quality.pnmi > 5 * pnmi(random_counts.matrix())
    assert quality.phones == 5

    module = AVDataModule(train_shards=paths, val_shards=paths, sidecars={"km": str(out / "train.km12.npz")})
    module.num_workers = 0
    seen = 0
    for batch in module.val_dataloader():
        for row, key in enumerate(batch.keys):
            n = 4 * int(batch.lengths[row])
            assert torch.equal(batch.labels["km"][row, :n], torch.from_numpy(labels[key].astype(np.int64)))
            seen += 1
    assert seen == len(metas)

    _cli(
        ["cluster", "quality", "--shards", paths[0], "--shards", paths[1], "--labels", str(out / "train.km12.npz")]
        + ["--compare", str(out / "train.km12.npz"), "--quiet"]
    )
    table = capsys.readouterr().out.splitlines()
    assert table[0].split()[:2] == ["labels", "PNMI"] and "1.000" in table[2]


def test_cluster_mfcc_without_alignments_reports_none(av_shards, tmp_path, capsys):
    _cli(
        ["cluster", "mfcc", "--shards", av_shards.pattern, "--out", str(tmp_path), "--k", "4", "--quiet"]
        + ["--sample-fraction", "0.5", "--n-init", "1", "--max-iter", "10"]
    )
    assert "no unit quality" in capsys.readouterr().out
    assert len(Sidecar.load(tmp_path / "train.km4.npz")) == len(av_shards.keys)
    with pytest.raises(ValueError, match="NAME=PATTERN"):
        _cli(["cluster", "mfcc", "--shards", av_shards.pattern, "--out", str(tmp_path), "--label", "x"])


def test_layer_source_per_sample_and_batched_agree(tone_shards, tmp_path):
    paths, metas = tone_shards
    weights = torch.randn(104 + 88 * 88, 6, generator=torch.Generator().manual_seed(0))

    def layer(audio, video):  # a stand-in "model layer": [T,104], [T,88,88] -> [T,6]
        return torch.cat([audio, video.flatten(1)], 1) @ weights

    def layer_batched(audio, video, padding_mask):
        assert padding_mask.shape == audio.shape[:2] == video.shape[:2]
        return torch.cat([audio, video.flatten(2)], 2) @ weights

    single = layer_source(layer, layer=6, checkpoint="it1.ckpt")
    batched = layer_source(layer_batched, layer=6, checkpoint="it1.ckpt", batched=True, batch_frames=80)
    first = dict((m.key, f) for m, f in extract_features(paths, single))
    second = dict((m.key, f) for m, f in extract_features(paths, batched))
    for key, meta in metas.items():
        assert first[key].shape == (meta.num_frames, 6)
        np.testing.assert_allclose(first[key], second[key], rtol=1e-4, atol=1e-3)

    quantizer = fit_kmeans(np.concatenate(list(first.values())), 5, n_init=1, spec=single.spec)
    labels = Sidecar.load(label_shards(paths, batched, quantizer, tmp_path / "it2.npz"))
    assert labels.rate == 25 and all(len(labels[k]) == m.num_frames for k, m in metas.items())

    audio_only = layer_source(lambda audio, video: audio[:, :6], layer=6, modality="audio")
    assert not audio_only.needs_video and audio_only.spec["modality"] == "audio"
    with pytest.raises(ValueError, match="expected"):
        list(extract_features(paths, layer_source(lambda audio, video: audio[:-1], layer=1)))


def test_model_layer_source_labels_with_an_avhubert_layer(tone_shards, tmp_path):
    avhubert = pytest.importorskip("av2av_lightning.models.avhubert")
    paths, metas = tone_shards
    torch.manual_seed(0)
    model = avhubert.AVHubert(avhubert.AVHubertConfig.tiny())
    two = set(sorted(metas)[:2]).__contains__
    for modality in ("audio", "video"):
        source = model_layer_source(model, layer=1, checkpoint="it1.ckpt", modality=modality, batch_frames=60)
        feats = dict((m.key, f) for m, f in extract_features(paths[:1], source, select=two))
        assert len(feats) == 2
        assert all(f.shape[0] == metas[k].num_frames and np.isfinite(f).all() for k, f in feats.items())
    quantizer = fit_kmeans(np.concatenate(list(feats.values())), 4, n_init=1, spec=source.spec)
    source = model_layer_source(model, layer=1, checkpoint="it1.ckpt", batch_frames=60)
    labels = Sidecar.load(label_shards(paths[:1], source, quantizer, tmp_path / "it2.npz"))
    assert labels.rate == 25 and len(labels) == 4
