"""The `av2av` command: subcommands exist, errors are one line, the corpus builds and reports."""

from __future__ import annotations

import subprocess
import sys

import pytest

from av2av_lightning.cli import main


def run_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "av2av_lightning", *args], capture_output=True, text=True, timeout=300)


def test_help_lists_data_and_training_commands(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["--help"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    for command in ("fit", "validate", "test", "corpus", "convert"):
        assert command in out


def test_training_commands_are_lightning_cli_over_any_datamodule_the_shared_one_by_default():
    result = run_cli("fit", "--help")
    assert result.returncode == 0, result.stderr
    assert "--data CONFIG | CLASS_PATH_OR_NAME" in result.stdout and "--trainer.max_epochs" in result.stdout
    result = run_cli("fit", "--data.help", "AVDataModule")
    assert result.returncode == 0, result.stderr
    assert "--data.train_shards" in result.stdout


def test_missing_corpus_is_a_one_line_error(tmp_path):
    result = run_cli("corpus", "stats", str(tmp_path / "nowhere"))
    assert result.returncode == 2
    assert result.stderr.strip().count("\n") == 0 and "nowhere" in result.stderr and "Traceback" not in result.stderr


@pytest.mark.slow
def test_corpus_build_then_stats(tmp_path):
    result = run_cli("corpus", "build", "--preset", "tiny", "--out", str(tmp_path), "--quiet")
    assert result.returncode == 0, result.stderr
    assert "test_unseen" in result.stdout and "total" in result.stdout
    again = run_cli("corpus", "build", "--preset", "tiny", "--out", str(tmp_path), "--quiet")
    assert "already built" in again.stdout
    stats = run_cli("corpus", "stats", str(tmp_path))
    assert stats.returncode == 0 and "sentences" in stats.stdout and "words" in stats.stdout
