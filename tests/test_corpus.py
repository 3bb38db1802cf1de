"""The embedded corpus: determinism, audio/video alignment, lips that follow speech, splits, word clips."""

from __future__ import annotations

import tarfile
from collections import defaultdict
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
from conftest import TINY_CORPUS as TINY

from av2av_lightning.data.codecs import decode_audio, decode_video
from av2av_lightning.data.schema import SAMPLES_PER_FRAME, SampleMeta
from data_prep.corpus.build import build_corpus, format_stats, plan_utterances, render_utterance
from data_prep.corpus.word_clips import WORD_CLIP_FRAMES
from evaluation.corpus_report import audio_envelope, lip_motion, plot_corpus


def read_samples(paths) -> dict[str, dict]:
    """All samples of some tar shards as {key: {field: bytes}}."""
    samples: dict[str, dict] = defaultdict(dict)
    for path in paths:
        with tarfile.open(path) as tar:
            for member in tar.getmembers():
                key, field = member.name.split(".", 1)
                samples[key][field] = tar.extractfile(member).read()
    return dict(samples)


@pytest.fixture(scope="module")
def corpus(tiny_corpus) -> tuple[Path, dict]:
    return tiny_corpus


def split_samples(corpus, subset: str, split: str) -> dict[str, dict]:
    out, manifest = corpus
    return read_samples(out / p for p in manifest["subsets"][subset][split]["shards"])


def test_manifest_counts_splits_and_stats(corpus):
    out, manifest = corpus
    sentences = manifest["subsets"]["sentences"]
    assert set(sentences) == {"train", "valid", "test", "test_unseen"}
    assert sentences["train"]["samples"] == TINY.train_sentences * 3
    assert sentences["test_unseen"]["samples"] == TINY.test_sentences * 3
    assert sentences["train"]["languages"] == {"en": 8, "es": 8, "fr": 8}
    for split, info in sentences.items():
        sizes = [len(read_samples([out / p])) for p in info["shards"]]
        assert sum(sizes) == info["samples"] and max(sizes) - min(sizes) <= 1, split
        assert info["hours"] > 0
    assert len(manifest["speakers"]) >= 12
    assert "test_unseen" in format_stats(manifest)


def test_held_out_speakers_only_in_unseen_split(corpus):
    _, manifest = corpus
    held_out = {s["id"] for s in manifest["speakers"] if s["held_out"]}
    assert held_out
    for split in ("train", "valid", "test", "test_unseen"):
        speakers = {SampleMeta.from_json(s["json"]).speaker for s in split_samples(corpus, "sentences", split).values()}
        assert (speakers <= held_out) if split == "test_unseen" else not (speakers & held_out), split


def test_test_sentences_never_in_train(corpus):
    texts = {
        split: {SampleMeta.from_json(s["json"]).text for s in split_samples(corpus, "sentences", split).values()}
        for split in ("train", "test")
    }
    assert texts["test"] and not texts["test"] & texts["train"]


def test_parallel_versions_share_sentence_id(corpus):
    by_id = defaultdict(set)
    for sample in split_samples(corpus, "sentences", "train").values():
        meta = SampleMeta.from_json(sample["json"])
        by_id[meta.sentence_id].add(meta.lang)
    assert all(langs == {"en", "es", "fr"} for langs in by_id.values())


def test_audio_and_video_are_locked_frame_by_frame(corpus):
    for key, sample in split_samples(corpus, "sentences", "valid").items():
        meta = SampleMeta.from_json(sample["json"], key)
        audio = decode_audio(sample["flac"], key)
        lip = decode_video(sample["lip.mp4"], key)
        face = decode_video(sample["face.mp4"], key, gray=False)
        assert len(audio) == meta.num_frames * SAMPLES_PER_FRAME
        assert lip.shape == (meta.num_frames, 96, 96)
        assert face.shape == (meta.num_frames, 96, 96, 3)
        assert meta.phonemes and meta.words and meta.text
        assert all(0 <= start < end <= meta.num_frames / 25 + 1e-3 for _, start, end in meta.phonemes)


def test_mouth_opening_follows_the_speech(corpus):
    """Frame by frame, the lips move when there is sound and rest in silence."""
    motion, envelope = [], []
    for key, sample in split_samples(corpus, "sentences", "train").items():
        audio = decode_audio(sample["flac"], key)
        lip = decode_video(sample["lip.mp4"], key)
        motion.append(lip_motion(lip))
        envelope.append(audio_envelope(audio))
    correlation = np.corrcoef(np.concatenate(motion), np.concatenate(envelope))[0, 1]
    assert correlation > 0.5, correlation


def test_word_clips_are_centred_labelled_windows(corpus):
    clips = split_samples(corpus, "words", "train")
    assert clips
    for key, sample in clips.items():
        meta = SampleMeta.from_json(sample["json"], key)
        assert meta.kind == "word" and meta.label and meta.num_frames == WORD_CLIP_FRAMES
        assert len(decode_audio(sample["flac"], key)) == WORD_CLIP_FRAMES * SAMPLES_PER_FRAME
        assert decode_video(sample["lip.mp4"], key).shape == (WORD_CLIP_FRAMES, 96, 96)
        centre = WORD_CLIP_FRAMES / 25 / 2
        assert any(start <= centre + 0.05 and end >= centre - 0.05 for _, start, end in meta.words)


def test_generation_is_deterministic():
    first, second = plan_utterances(TINY), plan_utterances(TINY)
    assert [t.key for t in first] == [t.key for t in second]
    record_a, clips_a, _ = render_utterance(first[0])
    record_b, clips_b, _ = render_utterance(second[0])
    assert record_a == record_b and clips_a == clips_b
    other = plan_utterances(replace(TINY, seed=TINY.seed + 1))
    assert [t.key for t in other] != [t.key for t in first]


def test_build_is_reproducible_across_worker_counts(corpus, tmp_path):
    out, manifest = corpus
    config = replace(TINY, train_sentences=2, valid_sentences=1, test_sentences=1)
    single = build_corpus(config, tmp_path / "one", workers=1, progress=False)
    double = build_corpus(config, tmp_path / "two", workers=2, progress=False)
    for shard in single["subsets"]["sentences"]["train"]["shards"]:
        assert (tmp_path / "one" / shard).read_bytes() == (tmp_path / "two" / shard).read_bytes()
    assert single["subsets"] == double["subsets"]


def test_corpus_plot_is_written(corpus, tmp_path):
    out, manifest = corpus
    png = plot_corpus(out, manifest, tmp_path / "corpus.png")
    assert png.read_bytes()[:4] == b"\x89PNG"


def test_datamodule_reads_the_corpus(corpus):
    from av2av_lightning.data.datamodule import AVDataModule

    out, manifest = corpus
    valid = manifest["subsets"]["sentences"]["valid"]
    words = manifest["subsets"]["words"]["train"]
    module = AVDataModule(
        val_shards=[str(out / p) for p in valid["shards"]],
        test_shards=[str(out / p) for p in words["shards"]],
        num_workers=0,
        max_frames=400,
        load_face=True,
    )
    batches = list(module.val_dataloader())
    assert sum(len(b.keys) for b in batches) == valid["samples"] and not module.skipped
    batch = batches[0]
    assert batch.audio.shape[-1] == 104 and batch.video.shape[-2:] == (88, 88)
    assert batch.face.shape[2:] == (3, 96, 96)
    word_batches = list(module.test_dataloader())
    assert {len(m.text) > 0 and m.kind for b in word_batches for m in b.meta} == {"word"}
    assert all(b.lengths.eq(WORD_CLIP_FRAMES).all() for b in word_batches)


def test_demo_data_config_reads_a_corpus(corpus):
    """experiments/data/demo.yaml names real datamodule arguments and globs that match a built corpus."""
    import yaml

    from av2av_lightning.data.datamodule import AVDataModule

    out, manifest = corpus
    config = yaml.safe_load((Path(__file__).parents[1] / "experiments/data/demo.yaml").read_text())["data"]
    config = {k: v.replace("data/demo", str(out)) if isinstance(v, str) else v for k, v in config.items()}
    module = AVDataModule(**{**config, "num_workers": 0})
    batches = list(module.val_dataloader())
    assert sum(len(b.keys) for b in batches) == manifest["subsets"]["sentences"]["valid"]["samples"]
