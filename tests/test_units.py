"""Unit extraction: de-duplication with durations, the unit dictionary, sidecars the datamodules read."""

from __future__ import annotations

import argparse
from dataclasses import asdict

import numpy as np
import pytest
import torch

from av2av_lightning.data.datamodule import AVDataModule
from av2av_lightning.data.features import audio_features
from av2av_lightning.data.sidecar import Sidecar
from av2av_lightning.data.unit_pairs import join_pairs
from av2av_lightning.models.avhubert import AVHubert, AVHubertConfig
from data_prep.clustering.kmeans import KMeansQuantizer, extract_features, iter_metas, iter_samples, model_layer_source
from data_prep.units import (
    add_arguments,
    build_units,
    dedup,
    expand,
    head_source,
    read_unit_dictionary,
    write_unit_dictionary,
)


def test_dedup_round_trip_keeps_durations():
    units, durations = dedup([5, 5, 5, 2, 7, 7, 5, 5])
    assert units.tolist() == [5, 2, 7, 5] and durations.tolist() == [3, 1, 2, 2]
    rng = np.random.default_rng(0)
    for _ in range(20):
        frames = rng.integers(0, 4, size=rng.integers(1, 60))
        units, durations = dedup(frames)
        assert (expand(units, durations) == frames).all()
        assert (units[1:] != units[:-1]).all() and (durations >= 1).all()
    units, durations = dedup([])
    assert len(units) == 0 and len(durations) == 0


def test_expand_refuses_bad_durations():
    with pytest.raises(ValueError, match="3 units but 2 durations"):
        expand([1, 2, 3], [1, 1])
    with pytest.raises(ValueError, match="durations must be >= 1"):
        expand([1, 2], [1, 0])


def test_unit_dictionary_round_trip_and_errors(tmp_path):
    path = write_unit_dictionary(tmp_path / "dict.txt", np.array([4, 0, 9]))
    assert path.read_text() == "0 4\n1 0\n2 9\n"
    assert read_unit_dictionary(path) == 3
    (tmp_path / "bad.txt").write_text("0 4\n2 1\n")
    with pytest.raises(ValueError, match=r"bad.txt:2: expected '1 COUNT'"):
        read_unit_dictionary(tmp_path / "bad.txt")
    with pytest.raises(FileNotFoundError, match="no such unit dictionary"):
        read_unit_dictionary(tmp_path / "missing.txt")


@pytest.fixture(scope="module")
def tiny_encoder():
    torch.manual_seed(0)
    return AVHubert(AVHubertConfig.tiny()).eval()


@pytest.fixture(scope="module")
def audio_units(tiny_corpus, tiny_encoder, tmp_path_factory):
    """Units of the tiny corpus's train and valid sentences from audio-only input (k = 8, fitted on train)."""
    root, _ = tiny_corpus
    out = tmp_path_factory.mktemp("units") / "audio"
    source = model_layer_source(tiny_encoder, layer=2, checkpoint="tiny.ckpt", modality="audio", batch_frames=400)
    splits = {split: str(root / "sentences" / f"{split}-*.tar") for split in ("train", "valid")}
    k, paths = build_units(splits, source, out, train_shards=splits["train"], k=8, sample_fraction=1.0)
    assert k == 8
    return root, out, KMeansQuantizer.load(out / "kmeans.npz"), paths, source


@pytest.mark.slow  # builds the tiny corpus and fits k-means
def test_extraction_writes_units_durations_and_dictionary(audio_units):
    root, out, quantizer, paths, source = audio_units
    units, durations = Sidecar.load(paths["train"]), Sidecar.load(out / "train.durations.npz")
    assert units.rate is None and set(units) == set(durations)
    frames = list(extract_features(str(root / "sentences" / "train-*.tar"), source))
    assert {meta.key for meta, _ in frames} == set(units)
    for meta, feats in frames:
        assert (expand(units[meta.key], durations[meta.key]) == quantizer(feats)).all()
        assert durations[meta.key].sum() == meta.num_frames
    assert read_unit_dictionary(out / "dict.txt") == quantizer.k
    assert KMeansQuantizer.load(out / "kmeans.npz").spec["modality"] == "audio"


@pytest.mark.slow  # builds the tiny corpus and fits k-means
def test_unit_sidecar_reads_through_the_datamodule(audio_units):
    root, out, _, paths, _ = audio_units
    units = Sidecar.load(paths["valid"])
    datamodule = AVDataModule(val_shards=str(root / "sentences" / "valid-*.tar"), sidecars={"units": paths["valid"]})
    datamodule.num_workers = 0
    batches = list(datamodule.val_dataloader())
    seen = 0
    for batch in batches:
        for row, key in enumerate(batch.keys):
            length = int(batch.label_lengths["units"][row])
            assert batch.labels["units"][row, :length].tolist() == units[key].tolist()
            seen += 1
    assert seen == len(units)


@pytest.mark.slow  # builds the tiny corpus and fits k-means
def test_units_join_into_parallel_pairs_by_sentence_id(audio_units):
    root, _, _, paths, _ = audio_units
    metas = list(iter_metas(str(root / "sentences" / "train-*.tar")))
    pairs = join_pairs(metas, Sidecar.load(paths["train"]))
    sentences = {m.sentence_id for m in metas}
    assert len(pairs) == len(sentences) * 6  # en/es/fr: every ordered pair of different languages
    by_key = {m.key: m for m in metas}
    for pair in pairs:
        src, tgt = by_key[pair.src_key], by_key[pair.tgt_key]
        assert src.sentence_id == tgt.sentence_id == pair.sentence_id
        assert (src.lang, tgt.lang) == (pair.src_lang, pair.tgt_lang) and src.lang != tgt.lang


@pytest.mark.slow  # builds the tiny corpus and fits k-means
def test_units_extract_command_labels_video_input_with_an_audio_quantizer(audio_units, tiny_encoder, tmp_path):
    root, out, quantizer, _, _ = audio_units
    checkpoint = tmp_path / "pretrain.ckpt"
    state = {f"model.{k}": v for k, v in tiny_encoder.state_dict().items()}
    torch.save(
        {"av2av_stage": "pretraining", "encoder_config": asdict(tiny_encoder.config), "state_dict": state}, checkpoint
    )
    parser = argparse.ArgumentParser()
    add_arguments(parser.add_subparsers(dest="command"))
    valid = str(root / "sentences" / "valid-*.tar")
    args = parser.parse_args(
        ["units", "extract", "--checkpoint", str(checkpoint), "--layer", "2", "--modality", "video",
         "--quantizer", str(out / "kmeans.npz"), "--label", f"valid={valid}", "--out", str(tmp_path / "video"),
         "--device", "cpu", "--quiet"]
    )  # fmt: skip
    args.handler(args)
    video_units, audio = Sidecar.load(tmp_path / "video" / "valid.units.npz"), Sidecar.load(out / "valid.units.npz")
    assert set(video_units) == set(audio)
    assert max(int(u.max()) for u in video_units.values()) < quantizer.k
    assert not (tmp_path / "video" / "kmeans.npz").exists()  # the given quantizer is reused, not refitted
    with pytest.raises(ValueError, match="--shards"):
        args.quantizer = None
        args.handler(args)


@pytest.mark.slow  # builds the tiny corpus
def test_two_label_heads_interleave_into_50_hz_units(tiny_corpus, tmp_path):
    root, _ = tiny_corpus
    torch.manual_seed(0)
    model = AVHubert(AVHubertConfig.tiny(num_classes=[6, 6])).eval()
    valid = str(root / "sentences" / "valid-*.tar")
    source = head_source(model, modality="audio", batch_frames=400)
    k, paths = build_units({"valid": valid}, source, tmp_path)
    assert k == 6 and not (tmp_path / "kmeans.npz").exists()
    units, durations = Sidecar.load(paths["valid"]), Sidecar.load(tmp_path / "valid.durations.npz")
    sample = next(iter_samples(valid))
    with torch.inference_mode():
        features = model.extract_features(audio_features(torch.from_numpy(sample.wave), sample.num_frames)[None])[0]
        heads = torch.stack([model.logits(features, i).argmax(-1)[0] for i in range(2)], -1)
    frames = expand(units[sample.key], durations[sample.key])
    assert len(frames) == 2 * sample.num_frames  # 50 Hz: head 0 and head 1 alternate within each 25 Hz frame
    assert (frames == heads.reshape(-1).numpy()).all()
    with pytest.raises(ValueError, match="different numbers of classes"):
        head_source(AVHubert(AVHubertConfig.tiny(num_classes=[6, 7])))
