"""The ablation runner: config deltas x seeds -> runs -> a mean +- std table, refused rows shown as n/a."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
from test_sweep import tiny_words_base

from evaluation.ablation import RowResult, failure_reason, main, summarise
from evaluation.tables import markdown

ROOT = Path(__file__).parents[1]


def test_summary_cells_and_markdown():
    rows = [RowResult("baseline", {"acc": [0.5, 0.7]}), RowResult("full_rec", failures=["needs the renderer"])]
    assert failure_reason("ValueError: needs the renderer\n...\nTypeError: wrapped\n") == "needs the renderer"
    table = summarise(rows, ["acc"])
    assert table[0]["acc"] == "0.6000 +- 0.1414 (n=2)"
    assert table[1]["acc"] == "n/a: needs the renderer"
    assert markdown(table).splitlines()[0] == "| row | acc |"


def test_bad_jobs_is_a_one_line_error(tmp_path, capsys):
    args = ["--config", "base.yaml", "--deltas", str(tmp_path), "--metrics", "acc", "--out", str(tmp_path)]
    assert main([*args, "--jobs", "0"]) == 2
    assert capsys.readouterr().err.strip() == "ablation: error: --jobs 0: expected at least 1 run at a time"


@pytest.mark.slow
def test_runs_every_delta_and_seed_and_tabulates(tiny_corpus, tmp_path, capsys):
    base = tiny_words_base(tiny_corpus, tmp_path)
    deltas = tmp_path / "deltas"
    deltas.mkdir()
    for row in ("baseline", "full_rec"):
        shutil.copy(ROOT / f"experiments/ablations/mutual_learning/{row}.yaml", deltas)
    rec = deltas / "full_rec.yaml"  # a renderer that does not exist here, whatever this machine's runs/ holds
    rec.write_text(rec.read_text().replace("runs/demo/face/last.ckpt", str(tmp_path / "no_renderer" / "last.ckpt")))
    args = ["--config", str(base), "--deltas", str(deltas), "--seeds", "0", "1", "--jobs", "2"]
    assert main([*args, "--metrics", "val/acc_audio", "--out", str(tmp_path / "runs")]) == 0
    table = (tmp_path / "runs" / "table.md").read_text()
    # the + L_rec row without its renderer checkpoint: shown as n/a with the missing file, never dropped
    assert "(n=2)" in table and "n/a: " in table and "no_renderer/last.ckpt" in table
    assert (tmp_path / "runs" / "table.csv").exists() and "baseline" in capsys.readouterr().out
