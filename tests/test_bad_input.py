"""Bad input to every `av2av` entry point: a non-zero exit and one line naming the problem, never a traceback.

Each row runs `av2av` in-process (fast: one import of torch and Lightning) and checks the
exit code and the single ``av2av COMMAND: error: ...`` line; two rows run as real processes
to check the whole of stderr has no traceback.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from av2av_lightning.checkpoints import STAGE_KEY
from av2av_lightning.cli import main

SMALL = {"embed_dim": 32, "layers": 1, "ffn_dim": 64, "heads": 2, "resnet_width": 4}


@pytest.fixture(scope="module")
def files(av_shards, tmp_path_factory) -> dict[str, str]:
    """Named inputs, good and bad, that the rows refer to as ``{name}`` (dots as underscores)."""
    root = tmp_path_factory.mktemp("bad_input")
    paths = {name: root / name for name in ("text.txt", "garbage.ckpt", "garbage.npz", "not_a_tar.tar", "words.txt")}
    paths["text.txt"].write_text("hello\n")
    paths["garbage.ckpt"].write_bytes(b"hello\n")  # pickle opcode h: a memo lookup that fails
    paths["garbage.npz"].write_text("x\n")
    paths["not_a_tar.tar"].write_text("not a tar\n")
    paths["words.txt"].write_text("en/hello\nes/hola\n")
    for stage in ("pretraining", "mutual_learning", "vocoder"):
        paths[f"{stage}.ckpt"] = root / f"{stage}.ckpt"
        torch.save({STAGE_KEY: stage, "state_dict": {}}, paths[f"{stage}.ckpt"])
    mutual = {
        "trainer": {
            "max_steps": 1,
            "accelerator": "cpu",
            "logger": False,
            "enable_checkpointing": False,
            "default_root_dir": str(root),  # where LightningCLI writes config.yaml
        },
        "model": {
            "class_path": "av2av_lightning.mutual_learning.CrossModalMutualLearning",
            "init_args": {"task": "words", "words": str(paths["words.txt"]), "encoder": SMALL},
        },
        "data": {"train_shards": av_shards.pattern, "num_workers": 0, "kinds": ["word"]},
    }
    configs = {
        "mutual.yaml": mutual,
        "unknown_key.yaml": {**mutual, "trainer": {**mutual["trainer"], "bogus_key": 3}},
        "no_model.yaml": {"trainer": mutual["trainer"], "data": mutual["data"]},
    }
    for name, config in configs.items():
        paths[name] = root / name
        paths[name].write_text(yaml.safe_dump(config))
    paths["nowhere"] = root / "nowhere"
    return {name.replace(".", "_"): str(path) for name, path in paths.items()}


ROWS = [
    # (id, argv, words the error line must contain)
    ("fit-missing-config", "fit --config {nowhere}/x.yaml", ["x.yaml", "does not exist"]),
    ("fit-unknown-key", "fit --config {unknown_key_yaml}", ["bogus_key"]),
    ("fit-missing-model-key", "fit --config {no_model_yaml}", ["model"]),
    ("fit-no-shards", "fit --config {mutual_yaml} --data.train_shards {nowhere}/t-*.tar", ["nowhere", "no shards"]),
    ("fit-unknown-task", "fit --config {mutual_yaml} --model.init_args.task poems", ["poems"]),
    ("fit-bad-word-list", "fit --config {mutual_yaml} --model.init_args.words {text_txt}", ["text.txt"]),
    (
        "mutual-pretrained-wrong-stage",
        "fit --config {mutual_yaml} --model.init_args.pretrained {vocoder_ckpt}",
        ["vocoder.ckpt", "stage 'vocoder'", "expected 'pretraining' or 'mutual_learning'"],
    ),
    (
        "mutual-pretrained-missing",
        "fit --config {mutual_yaml} --model.init_args.pretrained {nowhere}/p.ckpt",
        ["p.ckpt", "no such checkpoint"],
    ),
    (
        "mutual-pretrained-not-a-checkpoint",
        "fit --config {mutual_yaml} --model.init_args.pretrained {not_a_tar_tar}",
        ["not_a_tar.tar", "not a loadable checkpoint"],
    ),
    (
        "resume-wrong-stage",
        "fit --config {mutual_yaml} --ckpt_path {pretraining_ckpt}",
        ["pretraining.ckpt", "expected 'mutual_learning'"],
    ),
    ("resume-missing", "validate --config {mutual_yaml} --ckpt_path {nowhere}/r.ckpt", ["r.ckpt", "no such"]),
    ("resume-not-a-checkpoint", "test --config {mutual_yaml} --ckpt_path {not_a_tar_tar}", ["not_a_tar.tar"]),
    ("corpus-stats-missing", "corpus stats {nowhere}", ["nowhere", "no corpus manifest"]),
    ("corpus-stats-wrong-format", "corpus stats {text_txt}", ["text.txt", "not a corpus manifest"]),
    ("convert-lrs3-missing", "convert lrs3 {nowhere} --out {nowhere}/o", ["nowhere", "LRS3"]),
    ("convert-lrw-missing", "convert lrw {nowhere} --out {nowhere}/o", ["nowhere", "LRW"]),
    ("convert-muavic-unknown-language", "convert muavic {nowhere}/.. --out {nowhere}/o --langs xx", ["xx"]),
    ("convert-extract-wrong-format", "convert extract {not_a_tar_tar} --out {nowhere}/o", ["not_a_tar.tar"]),
    ("cluster-mfcc-no-shards", "cluster mfcc --shards {nowhere}/s-*.tar --out {nowhere}/o", ["nowhere", "no shards"]),
    (
        "cluster-layer-wrong-stage",
        "cluster layer --checkpoint {vocoder_ckpt} --layer 1 --shards {nowhere}/s.tar --out {nowhere}/o",
        ["vocoder.ckpt", "stage 'vocoder'", "expected 'pretraining'"],
    ),
    ("vocab-words-no-shards", "vocab words --shards {nowhere}/s-*.tar --out {nowhere}/w.txt", ["no shards"]),
    ("vocab-spm-no-shards", "vocab spm --shards {nowhere}/s-*.tar --out {nowhere}/spm", ["no shards"]),
]

KNOWN_GAPS = [
    pytest.param(
        "resume-text-file",
        "fit --config {mutual_yaml} --ckpt_path {garbage_ckpt}",
        ["garbage.ckpt", "not a loadable checkpoint"],
        id="resume-text-file",
    ),
    pytest.param(
        "cluster-quality-wrong-format",
        "cluster quality --shards {nowhere}/s.tar --labels {garbage_npz}",
        ["garbage.npz"],
        id="cluster-quality-wrong-format",
    ),
    pytest.param(
        "fit-unknown-language",
        "fit --config {mutual_yaml} --data.languages [xx]",
        ["xx"],
        id="fit-unknown-language",
    ),
]


def run_in_process(argv: list[str], capsys) -> tuple[int, list[str]]:
    code = main(argv)
    lines = [line for line in capsys.readouterr().err.splitlines() if line.startswith("av2av ")]
    return code, lines


@pytest.mark.parametrize(("row", "command", "words"), [pytest.param(*row, id=row[0]) for row in ROWS] + KNOWN_GAPS)
def test_bad_input_is_one_line_naming_the_problem(row, command, words, files, capsys):
    argv = command.format(**files).split()
    code, lines = run_in_process(argv, capsys)
    assert code != 0
    assert len(lines) == 1 and lines[0].startswith(f"av2av {argv[0]}: error: "), lines
    for word in words:
        assert word in lines[0], (word, lines[0])


def real_process_error(command: str) -> str:
    """The one error line of ``av2av COMMAND`` run as a real process, after checking there is one and no traceback."""
    result = subprocess.run(
        [sys.executable, "-m", "av2av_lightning", *command.split()],
        capture_output=True,
        text=True,
        timeout=300,
        env={"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "PATH": "/usr/bin:/bin"},
        cwd=Path(__file__).parents[1],
    )
    assert result.returncode == 2 and "Traceback" not in result.stderr
    errors = [line for line in result.stderr.splitlines() if "error" in line.lower()]
    assert len(errors) == 1 and errors[0].startswith(f"av2av {command.split()[0]}: error: "), result.stderr
    return errors[0]


@pytest.mark.parametrize("row", ["fit-unknown-key", "mutual-pretrained-wrong-stage"])
def test_the_whole_stderr_of_a_real_process_has_no_traceback(row, files):
    real_process_error(dict((r[0], r[1]) for r in ROWS)[row].format(**files))
