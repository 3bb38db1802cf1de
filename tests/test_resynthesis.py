"""Resynthesis evidence runner: one row per split with every column, failures counted, own-vs-other similarity."""

from __future__ import annotations

import csv
import json
import math
from dataclasses import asdict
from pathlib import Path

import numpy as np
import pesq
import pytest
import torch
import yaml
from conftest import write_set
from test_av2av import UNITS, config, save_stage, stages  # noqa: F401  (module fixtures: tiny stage checkpoints)

from av2av_lightning.av2av import AV2AVPipeline
from av2av_lightning.data.sidecar import SidecarWriter
from av2av_lightning.sync_expert import SyncExpertTraining, load_sync_expert
from data_prep.units import dedup
from evaluation import resynthesis
from evaluation.resynthesis import Scorers, SplitUnits, own_vs_other, speaker_kind

SPLITS = ("valid", "test_unseen")
NUMERIC = (
    "stoi",
    "estoi",
    "wer",
    "reference_wer",
    "psnr",
    "ssim",
    "mouth_motion",
    "lse_c",
    "lse_d",
    "lse_c_real_audio",
    "lse_d_real_audio",
    "reference_lse_c",
    "reference_lse_d",
)


class FakeASR:
    """Hears the same words in every clip; records the languages it was asked for."""

    def __init__(self) -> None:
        self.langs: list[str | None] = []

    def __call__(self, waves, lang):
        self.langs.append(lang)
        return ["utterance"] * len(waves)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    """Both splits' shards (6 en/es sentence clips each) and their 25 Hz unit sidecars, in one folder."""
    out = tmp_path_factory.mktemp("resynthesis")
    rng = np.random.default_rng(0)
    for seed, split in enumerate(SPLITS):
        shards = write_set(out / "sentences", [10, 12, 14, 11, 13, 15], per_shard=3, prefix=split, seed=seed)
        with (
            SidecarWriter(out / "units" / f"{split}.units.npz", "units", None, np.int16) as units,
            SidecarWriter(out / "units" / f"{split}.durations.npz", "durations", None, np.int16) as durations,
        ):
            for key, frames in shards.lengths.items():
                ids, runs = dedup(rng.integers(0, UNITS, size=frames))
                units.add(key, ids)
                durations.add(key, runs)
    manifest = {"speakers": [{"id": f"spk{i}", "held_out": False} for i in range(4)]}
    (out / "manifest.json").write_text(json.dumps(manifest))
    return out


@pytest.fixture(scope="module")
def pipeline_yaml(config, corpus) -> Path:  # noqa: F811
    path = corpus / "pipeline.yaml"
    path.write_text(yaml.safe_dump(asdict(config)))
    return path


@pytest.fixture(scope="module")
def scorers(tmp_path_factory) -> Scorers:
    expert = save_stage(SyncExpertTraining("tiny"), tmp_path_factory.mktemp("expert") / "sync.ckpt")
    return Scorers(FakeASR(), load_sync_expert(expert), asr_languages=("en",))  # as an English-only Whisper


def arguments(corpus: Path, pipeline_yaml: Path, out: Path, *extra: str):
    return resynthesis.parse_args(
        ["--pipeline", str(pipeline_yaml), "--sentences", str(corpus / "sentences"), "--units", str(corpus / "units")]
        + ["--manifest", str(corpus / "manifest.json"), "--out", str(out), *extra]
    )


def read_rows(out: Path) -> list[dict[str, str]]:
    with open(out / "resynthesis.csv") as handle:
        return list(csv.DictReader(handle))


def test_one_row_per_split_with_every_column_and_failing_pesq_counted(
    corpus,
    pipeline_yaml,
    config,  # noqa: F811
    scorers,
    tmp_path,
    monkeypatch,
):
    pipeline = AV2AVPipeline(config)
    args = arguments(corpus, pipeline_yaml, tmp_path / "ok", "--limit", "4")
    text = resynthesis.run(args, pipeline, scorers)
    rows = read_rows(tmp_path / "ok")
    assert [row["split"] for row in rows] == list(SPLITS) and text.count("\n") == 3
    for row in rows:
        assert row["clips"] == "4" and row["speakers"] == "seen" and row["no_units"] == row["undecodable"] == "0"
        assert all(math.isfinite(float(row[key])) for key in NUMERIC), row
        assert 0.0 <= float(row["stoi"]) <= 1.0 and 0.0 <= float(row["ssim"]) <= 1.0
        if row["pesq"].startswith("n/a"):  # every clip the scorer refused is counted
            assert row["pesq_failed"] == "4"
        else:
            assert 1.0 <= float(row["pesq"]) <= 4.7
        assert int(row["similarity_scored"]) <= 4
    assert set(scorers.transcriber.langs) == {"en"}  # only English clips are transcribed, output and original
    assert len(scorers.transcriber.langs) == 2 * sum(int(row["transcribed"]) for row in rows) > 0

    def refuse(*_):
        raise pesq.NoUtterancesError("no utterances detected")

    monkeypatch.setattr(pesq, "pesq", refuse)
    resynthesis.run(arguments(corpus, pipeline_yaml, tmp_path / "failing", "--limit", "2"), pipeline, Scorers())
    for row in read_rows(tmp_path / "failing"):
        assert row["pesq_failed"] == row["clips"] == "2" and row["pesq"] == "n/a: no clip scored"
        assert math.isfinite(float(row["stoi"]))
        assert row["wer"] == "n/a: no --transcriber" and row["lse_c"] == "n/a: no --sync-expert"
    every_language = FakeASR()  # a recogniser of every corpus language hears every clip, in its own language
    resynthesis.run(
        arguments(corpus, pipeline_yaml, tmp_path / "all", "--limit", "2"), pipeline, Scorers(every_language)
    )
    assert sorted(every_language.langs) == ["en"] * 4 + ["es"] * 4
    assert all(row["transcribed"] == "2" for row in read_rows(tmp_path / "all"))


def test_cross_identity_rows_speak_with_another_speaker(corpus, pipeline_yaml, config, scorers, tmp_path, monkeypatch):  # noqa: F811
    pipeline = AV2AVPipeline(config)
    speakers = []  # (content speaker, identity speaker, identity clip is the content clip) per scored clip
    original = resynthesis.score_clip

    def recording(scores, pipeline, clip, meta, wave, face, identity):
        speakers.append((meta.speaker, identity[0].speaker, identity[1] is clip))
        original(scores, pipeline, clip, meta, wave, face, identity)

    monkeypatch.setattr(resynthesis, "score_clip", recording)
    args = arguments(corpus, pipeline_yaml, tmp_path, "--limit", "4", "--identities", "own", "other")
    resynthesis.run(args, pipeline, scorers)
    rows = read_rows(tmp_path)
    assert [(r["split"], r["identity"]) for r in rows] == [(s, i) for s in SPLITS for i in ("own", "other")]
    own, other = rows[0], rows[1]
    assert own["no_identity"] == "0" and int(other["no_identity"]) >= 1  # the first clip has no earlier speaker
    assert other["clips"] == "4" and other["psnr"] == "n/a: another speaker's face has no aligned reference"
    assert other["mouth_motion"] == other["psnr"]
    for key in ("stoi", "lse_c", "lse_d", "lse_c_real_audio", "similarity_own", "similarity_other"):
        assert math.isfinite(float(other[key])), key
    assert len(speakers) == 16
    assert all(content == identity and same for content, identity, same in speakers[:4])
    assert all(content != identity and not same for content, identity, same in speakers[4:8])


def test_rotated_content_moves_each_clips_units_by_half(corpus, pipeline_yaml, config, scorers, tmp_path, monkeypatch):  # noqa: F811
    pipeline = AV2AVPipeline(config)
    streams = []  # (units, durations) each clip was resynthesised from
    original = resynthesis.resynthesize

    def recording(pipeline, clip, units, durations, identity):
        streams.append((units, durations))
        return original(pipeline, clip, units, durations, identity)

    monkeypatch.setattr(resynthesis, "resynthesize", recording)
    args = arguments(
        corpus, pipeline_yaml, tmp_path, "--splits", "valid", "--limit", "3", "--contents", "own", "rotated"
    )
    resynthesis.run(args, pipeline, scorers)
    rows = read_rows(tmp_path)
    assert [(r["identity"], r["content"]) for r in rows] == [("own", "own"), ("own", "rotated")]
    assert rows[0]["psnr"] != rows[1]["psnr"] and math.isfinite(float(rows[1]["psnr"]))
    for (units, durations), (rotated, rotated_durations) in zip(streams[:3], streams[3:]):
        half = len(units) // 2
        assert rotated == units[half:] + units[:half] and rotated_durations == durations[half:] + durations[:half]
        assert sum(rotated_durations) == sum(durations) and rotated != units


def test_own_vs_other_compares_with_the_right_speakers():
    e = torch.eye(4)
    speakers = ["a", "a", "b", "b", "c"]
    # the first reference of a is off (e[3]): its own output must be compared with the other a clip only
    references = torch.stack([e[3], e[0], e[1], e[1], e[2]])
    outputs = torch.stack([e[0], e[0], e[0], e[1], e[2]])
    found = own_vs_other(outputs, references, speakers)
    # clip 0: own = a without clip 0 = e0 -> 1; others: b = e1, c = e2 -> 0
    # clip 1: own = e3 -> 0; others b, c -> 0.   clip 2 (b, sounds like a): own 0; others a=(e3+e0)/2 -> 0.707, c 0
    # clip 3: own 1; others a, c -> 0.           clip 4: c has no other clip: not scored
    own = [1.0, 0.0, 0.0, 1.0]
    other = [0.0, 0.0, math.sqrt(0.5) / 2, 0.0]
    assert found["scored"] == 4
    assert found["similarity_own"] == pytest.approx(np.mean(own))
    assert found["similarity_other"] == pytest.approx(np.mean(other))
    assert found["own_above_other"] == pytest.approx(0.5)  # clips 0 and 3
    alone = own_vs_other(outputs[:2], references[:2], ["a", "a"])  # one speaker: nothing to compare with
    assert alone["scored"] == 0 and math.isnan(alone["similarity_own"])
    with pytest.raises(ValueError, match="2 outputs, 2 references and 1 speakers"):
        own_vs_other(outputs[:2], references[:2], ["a"])


def test_speaker_kind_from_the_manifest(tmp_path):
    manifest = tmp_path / "manifest.json"
    manifest.write_text(json.dumps({"speakers": [{"id": "x", "held_out": False}, {"id": "y", "held_out": True}]}))
    assert speaker_kind(manifest, {"x"}) == "seen"
    assert speaker_kind(manifest, {"y"}) == "unseen (zero-shot)"
    assert speaker_kind(manifest, {"x", "y"}) == "mixed"
    assert speaker_kind(tmp_path / "none.json", {"x"}).startswith("unknown")


def test_units_reach_the_vocoder_at_50_hz_and_a_foreign_sidecar_is_refused(corpus):
    units = SplitUnits.load(corpus / "units", "valid", 25)
    key = next(iter(units.units))
    frames = int(units.durations[key].sum())
    ids, durations = units.stream(key, frames)
    assert ids == units.units[key].tolist() and durations == (2 * units.durations[key]).tolist()
    with pytest.raises(ValueError, match=rf"^{key}: units x durations span {frames} frames at 25 Hz but the clip"):
        units.stream(key, frames + 10)


def test_bad_input_is_a_one_line_error(corpus, pipeline_yaml, tmp_path, capsys):
    common = ["--pipeline", str(pipeline_yaml), "--sentences", str(corpus / "sentences"), "--out", str(tmp_path)]
    cases = [
        (["--units", str(corpus / "units"), "--splits", "nope"], "unknown split 'nope': no shards"),
        (["--units", str(tmp_path), "--splits", "valid"], "valid.units.npz: no such unit sidecar"),
        (["--units", str(corpus / "units"), "--unit-rate", "30"], "--unit-rate must be 25 or 50 Hz, got 30"),
    ]
    for extra, message in cases:
        assert resynthesis.main(common + extra) == 2
        err = capsys.readouterr().err
        assert message in err and err.count("\n") == 1, err
    assert not (tmp_path / "resynthesis.csv").exists()


def test_unknown_identity_or_content_is_a_one_line_error():
    with pytest.raises(ValueError, match=r"^identity must be one of own, other, got 'mine'$"):
        resynthesis.evaluate_split(None, [], None, None, None, identity="mine")
    with pytest.raises(ValueError, match=r"^content must be one of own, rotated, got 'shifted'$"):
        resynthesis.evaluate_split(None, [], None, None, None, content="shifted")
