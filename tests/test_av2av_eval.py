"""AV2AV evaluation: BLEU per direction equal to sacrebleu, the chance and ceiling rows, optional speaker /
lip-sync columns, one-line input errors, and the published tables' layout."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import sacrebleu
from conftest import build_record, synthetic_audio
from test_av2av import save_stage

from av2av_lightning.av2av import Translation
from av2av_lightning.data.schema import SAMPLES_PER_FRAME
from av2av_lightning.data.shards import write_shards
from av2av_lightning.speaker_encoding import SpeakerEncoderTraining, load_speaker_encoder
from av2av_lightning.sync_expert import SyncExpertTraining, load_sync_expert
from av2av_lightning.translate_cli import INDEX_NAME, translate_shards
from evaluation import av2av_eval
from evaluation.av2av_eval import Scorers, evaluate
from evaluation.published_tables import recognition_rows, talking_face_rows, voice_rows, write_published

# sentence id -> language -> (reference text, frames of that utterance); frames are distinct so the fake ASR can
# tell every utterance (and output) apart by its length
SENTENCES = {
    "s0": {"en": ("the red cat sleeps", 10), "es": ("el gato rojo duerme", 11), "fr": ("le chat rouge dort", 12)},
    "s1": {"en": ("a big dog runs fast", 13), "es": ("un perro grande corre", 14), "fr": ("un grand chien court", 15)},
    "s2": {"en": ("my friend eats bread", 16), "es": ("mi amigo come pan", 17)},  # no French: no reference
}
# output frames per source key and what the fake ASR hears in them
HEARD = {
    "test_s0_en": (30, "le chat rouge"),
    "test_s1_en": (31, "un chien court vite"),
    "test_s0_es": (32, "le chat rouge dort"),
    "test_s1_es": (33, "un grand chat court"),
    "test_s2_en": (34, "mon ami mange"),
    "test_s2_es": (35, "mon ami mange du pain"),
}
CEILING = {"s0": "le chat rouge dort", "s1": "un grand chien"}  # what the fake ASR hears in the French references


def write_parallel_shards(out: Path) -> str:
    rng = np.random.default_rng(0)
    records = []
    for sentence, langs in SENTENCES.items():
        for lang, (text, frames) in langs.items():
            record, meta = build_record(f"test_{sentence}_{lang}", frames, rng, lang=lang, text=text)
            record["json"] = replace(meta, sentence_id=sentence, split="test").to_json()
            records.append(record)
    paths = write_shards(records, len(records), out / "test", max_per_shard=4)
    return str(out / f"test-{{000000..{len(paths) - 1:06d}}}.tar")


class FakeASR:
    """Recognises an utterance by its length: known strings for every output and reference (French ones as
    ``CEILING`` hears them, the others word for word)."""

    def __init__(self) -> None:
        self.texts = {frames: text for langs in SENTENCES.values() for text, frames in langs.values()}
        self.texts |= {frames: text for frames, text in HEARD.values()}
        self.texts |= {SENTENCES[s]["fr"][1]: text for s, text in CEILING.items()}
        self.langs: list[str | None] = []

    def __call__(self, waves, lang):
        self.langs.append(lang)
        return [self.texts[len(wave) // SAMPLES_PER_FRAME] for wave in waves]


class FakePipeline:
    """Stands in for `AV2AVPipeline` in `translate_shards`: an output of ``HEARD`` frames per key, the source face
    played for video; ``fail`` keys raise as a real failure would."""

    def __init__(self, fail: tuple[str, ...] = ()) -> None:
        self.fail = fail

    def check_languages(self, *langs: str) -> None:
        pass

    def translate(self, clip, src_lang, tgt_lang, input="av") -> Translation:
        if clip.name in self.fail:
            raise ValueError(f"{clip.name}: the translator produced no units")
        frames = HEARD[clip.name][0]
        wave = synthetic_audio(frames, np.random.default_rng(frames))
        face = clip.face[np.arange(frames) % len(clip.face)]
        return Translation(wave, face, [1, 2], [2, 2], [3], src_lang, tgt_lang, input)


@pytest.fixture(scope="module")
def split(tmp_path_factory) -> str:
    return write_parallel_shards(tmp_path_factory.mktemp("parallel"))


@pytest.fixture(scope="module")
def outputs(tmp_path_factory, split) -> Path:
    out = tmp_path_factory.mktemp("translated")
    translate_shards(FakePipeline(fail=("test_s1_es",)), split, "fr", out, input="audio")
    return out


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory) -> dict[str, Path]:
    out = tmp_path_factory.mktemp("scorers")
    return {
        "speaker_encoder": save_stage(SpeakerEncoderTraining("tiny"), out / "speaker.ckpt"),
        "sync_expert": save_stage(SyncExpertTraining("tiny"), out / "sync.ckpt"),
    }


def by(rows, direction, system):
    return next(r for r in rows if r["direction"] == direction and r["system"] == system)


def test_bleu_per_direction_equals_sacrebleu_and_the_chance_and_ceiling_rows(outputs, split):
    asr = FakeASR()
    rows = evaluate([outputs], split, Scorers(asr))
    assert [(r["direction"], r["system"], r["input"]) for r in rows] == [
        (d, s, i)
        for d in ("en-fr", "es-fr", "all")
        for s, i in (("av2av", "audio"), ("shuffled", "audio"), ("reference", "-"))
    ]
    refs = {s: SENTENCES[s]["fr"][0] for s in ("s0", "s1")}
    expected = {
        "en-fr": (["le chat rouge", "un chien court vite"], [refs["s0"], refs["s1"]]),
        "es-fr": (["le chat rouge dort"], [refs["s0"]]),  # s1 failed to translate
        "all": (["le chat rouge", "un chien court vite", "le chat rouge dort"], [refs["s0"], refs["s1"], refs["s0"]]),
    }
    for direction, (hyps, references) in expected.items():
        row = by(rows, direction, "av2av")
        assert row["asr_bleu"] == pytest.approx(sacrebleu.corpus_bleu(hyps, [references]).score, abs=1e-9)
        assert row["asr_chrf"] == pytest.approx(sacrebleu.corpus_chrf(hyps, [references]).score, abs=1e-9)
        ceiling = [CEILING["s0"] if r == refs["s0"] else CEILING["s1"] for r in references]
        assert by(rows, direction, "reference")["asr_bleu"] == pytest.approx(
            sacrebleu.corpus_bleu(ceiling, [references]).score, abs=1e-9
        )
    counts = {d: [by(rows, d, "av2av")[k] for k in ("utterances", "failed", "no_reference")] for d in expected}
    assert counts == {"en-fr": [2, 0, 1], "es-fr": [1, 1, 1], "all": [3, 1, 2]}
    assert set(asr.langs) == {"fr"}  # the chance row transcribes nothing again
    # chance: each transcript against the other sentences' references (es-fr scored one output: no other)
    chance = sacrebleu.corpus_chrf(expected["en-fr"][0], [[refs["s1"], refs["s0"]]]).score
    assert by(rows, "en-fr", "shuffled")["asr_chrf"] == pytest.approx(chance, abs=1e-9)
    assert by(rows, "all", "shuffled")["asr_chrf"] == pytest.approx(chance, abs=1e-9)
    assert by(rows, "es-fr", "shuffled")["asr_bleu"] == "n/a: needs two scored sentences"
    assert by(rows, "en-fr", "av2av")["asr_chrf"] > chance
    for row in rows:
        if row["system"] == "shuffled":
            assert row["speaker_similarity"] == row["lse_c"] == "n/a: the chance row scores transcripts only"
        else:
            assert row["speaker_similarity"] == "n/a: no --speaker-encoder" and row["lse_c"] == "n/a: no --sync-expert"


def test_speaker_and_lip_sync_columns_with_tiny_checkpoints(outputs, split, checkpoints, tmp_path):
    args = av2av_eval.parse_args(
        ["--outputs", str(outputs), "--shards", split, "--transcriber", "unused", "--out", str(tmp_path)]
        + ["--speaker-encoder", str(checkpoints["speaker_encoder"]), "--sync-expert", str(checkpoints["sync_expert"])]
    )
    scorers = Scorers(
        FakeASR(), load_speaker_encoder(args.speaker_encoder), load_sync_expert(args.sync_expert)
    )  # the CLI's load_scorers with the fake ASR
    text = av2av_eval.run(args, scorers)
    rows = evaluate([outputs], split, scorers)
    for row in (r for r in rows if r["system"] != "shuffled"):
        assert -1.0 <= row["speaker_similarity"] <= 1.0
        assert row["lse_d"] >= 0.0 and row["lse_c"] >= 0.0
    assert by(rows, "all", "av2av")["lse_d"] != by(rows, "all", "reference")["lse_d"]
    assert "| all | reference |" in text
    header = (tmp_path / "av2av_eval.csv").read_text().splitlines()[0]
    columns = "direction,system,input,utterances,failed,no_reference,asr_bleu,asr_chrf,speaker_similarity,lse_c,lse_d"
    assert header == columns
    face = (tmp_path / "talking_face.md").read_text()
    assert f"{by(rows, 'all', 'av2av')['lse_c']:.2f}" in face  # audio units -> face: the cross-modality row
    assert "| cross-modality | audio units -> face | n/a: a translation has no frame-aligned" in face
    assert "| intra-modality | visual units -> face | n/a: the outputs were translated from audio" in face


def test_missing_index_and_foreign_keys_are_one_line_errors(outputs, split, tmp_path, capsys):
    argv = ["--shards", split, "--transcriber", "whisper:/nowhere", "--out", str(tmp_path / "eval")]
    assert av2av_eval.main(["--outputs", str(tmp_path), *argv]) == 2
    err = capsys.readouterr().err.strip()
    assert err == f"av2av_eval: error: {tmp_path / INDEX_NAME}: no such file; expected the folder of an " + (
        "'av2av translate --shards' run"
    )
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    entries = (outputs / INDEX_NAME).read_text().splitlines()
    entry = json.loads(entries[0]) | {"key": "elsewhere_0001"}
    (foreign / INDEX_NAME).write_text("\n".join([*entries, json.dumps(entry)]) + "\n")
    with pytest.raises(ValueError, match=r"1 output key\(s\) not in the shards \(first: elsewhere_0001\)$"):
        evaluate([foreign], split, Scorers(FakeASR()))


def test_the_chance_row_never_pairs_a_transcript_with_its_own_sentence():
    """Two speakers' clips of one sentence: rotating them onto each other would score a match, not chance."""
    pairs = [("le chat dort", "le chat dort"), ("le chat", "le chat dort"), ("un chien court", "un grand chien court")]
    hyps = ["le chat dort", "le chat", "un chien court", "un chien court"]
    refs = ["un grand chien court", "un grand chien court", "le chat dort", "le chat dort"]
    chrf = av2av_eval.shuffled_suite(pairs).compute()["asr_chrf"]
    assert float(chrf) == pytest.approx(sacrebleu.corpus_chrf(hyps, [refs]).score, abs=1e-6)
    assert av2av_eval.shuffled_suite(pairs[:2]) is None  # one sentence only: no chance pairing


def test_one_row_per_input_and_each_reference_scored_once(outputs, split, tmp_path):
    """Outputs translated from audio and (here: the same clips again) from video: a row per input, the reference
    row heard once per source, and the inputs' rows equal when their outputs are."""
    video = tmp_path / "video"
    translate_shards(FakePipeline(fail=("test_s1_es",)), split, "fr", video, input="video")
    asr = FakeASR()
    rows = evaluate([outputs, video], split, Scorers(asr))
    assert [(r["direction"], r["system"], r["input"]) for r in rows] == [
        (d, s, i)
        for d in ("en-fr", "es-fr", "all")
        for s, i in (
            ("av2av", "audio"),
            ("av2av", "video"),
            ("shuffled", "audio"),
            ("shuffled", "video"),
            ("reference", "-"),
        )
    ]
    for direction in ("en-fr", "es-fr", "all"):
        audio, video_row, _, _, reference = (r for r in rows if r["direction"] == direction)
        assert {k: v for k, v in audio.items() if k != "input"} == {k: v for k, v in video_row.items() if k != "input"}
        assert reference["utterances"] == audio["utterances"] and reference["failed"] == 0
    assert len(asr.langs) == 3 * 2 + 3  # 3 outputs for each of 2 inputs, and their 3 references once


def test_outputs_in_several_target_languages_each_meet_their_own_reference(split, tmp_path):
    """One index with every Spanish source in two target languages: each output is scored against the reference of its
    own target language (and the reference speech of each target is heard once per source)."""
    out = tmp_path / "two_targets"
    translate_shards(FakePipeline(), split, ["en", "fr"], out, input="audio", src_lang="es")
    asr = FakeASR()
    rows = evaluate([out], split, Scorers(asr))
    assert sorted({r["direction"] for r in rows}) == ["all", "es-en", "es-fr"]
    heard = {key: text for key, (_, text) in HEARD.items()}
    english = [SENTENCES[s]["en"][0] for s in ("s0", "s1", "s2")]
    hyps = [heard[f"test_{s}_es"] for s in ("s0", "s1", "s2")]
    assert by(rows, "es-en", "av2av")["asr_bleu"] == pytest.approx(
        sacrebleu.corpus_bleu(hyps, [english]).score, abs=1e-9
    )
    assert by(rows, "es-en", "reference")["asr_bleu"] == pytest.approx(100.0)  # English references heard as said
    assert by(rows, "es-fr", "reference")["utterances"] == 2 and by(rows, "es-fr", "av2av")["no_reference"] == 1
    assert sorted(asr.langs) == ["en"] * 6 + ["fr"] * 4  # es-en: 3 outputs + 3 references; es-fr: 2 + 2


class EnglishOnlyASR(FakeASR):
    """An English-only judge, as Whisper tiny.en: it is never asked for another language."""

    languages = ("en",)

    def __call__(self, waves, lang):
        assert lang == "en", f"an English-only ASR was asked for {lang!r}"
        return super().__call__(waves, lang)


def test_an_english_only_asr_scores_the_directions_into_english_alone(split, tmp_path):
    out = tmp_path / "two_targets"
    translate_shards(FakePipeline(), split, ["en", "fr"], out, input="audio", src_lang="es")
    asr = EnglishOnlyASR()
    rows = evaluate([out], split, Scorers(asr))
    assert sorted({r["direction"] for r in rows}) == ["all", "es-en"]
    assert by(rows, "all", "av2av")["asr_bleu"] == by(rows, "es-en", "av2av")["asr_bleu"]
    assert asr.langs == ["en"] * 6  # 3 outputs, 3 references
    only_french = tmp_path / "only_french"
    translate_shards(FakePipeline(), split, "fr", only_french, input="audio", src_lang="es")
    with pytest.raises(
        ValueError, match=r"only_french/index.jsonl: no output into a language the transcriber hears \(en\)$"
    ):
        evaluate([only_french], split, Scorers(EnglishOnlyASR()))


# ---------------------------------------------------------------------------- published tables


def test_talking_face_and_voice_tables_lay_out_given_numbers(tmp_path):
    face = talking_face_rows(
        {
            "intra": {"psnr": 33.4, "ssim": 0.96, "lse_c": 7.1, "lse_d": 6.9, "word_accuracy": 0.221},
            "cross": {"word_accuracy": 0.277, "psnr": "needs frame-aligned references"},
        }
    )
    assert face[0] == {
        "setting": "intra-modality",
        "units": "visual units -> face",
        "PSNR": 33.4,
        "SSIM": 0.96,
        "LSE-C": 7.1,
        "LSE-D": 6.9,
        "LSA (%)": pytest.approx(22.1),
    }
    assert face[1]["LSA (%)"] == pytest.approx(27.7) and face[1]["PSNR"] == "n/a: needs frame-aligned references"
    assert face[1]["SSIM"] == "n/a: not measured"
    voice = voice_rows({"intra": {"stoi": 0.866, "estoi": 0.746, "pesq": 2.25}, "cross": "no face-to-voice model"})
    assert [r["units"] for r in voice] == ["audio units -> voice", "visual units -> voice"]
    assert voice[1] == {
        "setting": "cross-modality",
        "units": "visual units -> voice",
        **dict.fromkeys(("STOI", "ESTOI", "PESQ"), "n/a: no face-to-voice model"),
    }
    text = write_published(voice, tmp_path, "voice")
    assert "| intra-modality | audio units -> voice | 0.87 | 0.75 | 2.25 |" in text
    assert (tmp_path / "voice.csv").read_text().splitlines()[
        1
    ] == "intra-modality,audio units -> voice,0.866,0.746,2.25"
    with pytest.raises(ValueError, match=r"unknown settings \['both'\]"):
        voice_rows({"both": {}})


def test_recognition_table_per_modality():
    rows = recognition_rows({"A": {"utterances": 9, "wer": 0.25, "cer": 0.1}, "V": {"wer": 0.5, "cer": 0.3}})
    assert [r["modality"] for r in rows] == ["audio", "visual", "audio-visual"]
    assert rows[0]["WER (%)"] == pytest.approx(25.0) and rows[1]["CER (%)"] == pytest.approx(30.0)
    assert rows[2] == {"modality": "audio-visual", "WER (%)": "n/a: not measured", "CER (%)": "n/a: not measured"}
    words = recognition_rows({"A": {"accuracy": 0.9845}, "V": {"accuracy": 0.8845}, "AV": "no AV checkpoint"})
    assert list(words[0]) == ["modality", "Acc (%)"] and words[1]["Acc (%)"] == pytest.approx(88.45)
    assert words[2]["Acc (%)"] == "n/a: no AV checkpoint"
    with pytest.raises(ValueError, match=r"no recognition metric"):
        recognition_rows({"A": {"utterances": 3}})
