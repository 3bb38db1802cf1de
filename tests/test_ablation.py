"""The ablation runner: config deltas x seeds -> runs -> a mean +- std table, refused rows shown as n/a."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import yaml

from data_prep.vocab import count_words, top_words
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


@pytest.mark.slow
def test_runs_every_delta_and_seed_and_tabulates(tiny_corpus, tmp_path, capsys):
    out, manifest = tiny_corpus
    words = [str(out / p) for p in manifest["subsets"]["words"]["train"]["shards"]]
    (tmp_path / "words.txt").write_text("".join(f"{w}\n" for w in top_words(count_words(words), per_language=5)))
    base = yaml.safe_load((ROOT / "experiments/mutual_learning/tiny_words.yaml").read_text())
    base["trainer"] = {"max_steps": 2, "limit_val_batches": 1, "accelerator": "cpu", "enable_progress_bar": False}
    base["model"]["init_args"].update(
        words=str(tmp_path / "words.txt"),
        pretrained=None,
        encoder={"embed_dim": 32, "layers": 1, "ffn_dim": 64, "heads": 2, "resnet_width": 4},
    )
    base["data"].update(
        train_shards=words,
        val_shards=words,
        words=str(tmp_path / "words.txt"),
        num_workers=0,
        train_batches_per_epoch=2,
    )
    (tmp_path / "base.yaml").write_text(yaml.safe_dump(base))
    deltas = tmp_path / "deltas"
    deltas.mkdir()
    for row in ("baseline", "full_rec"):
        shutil.copy(ROOT / f"experiments/ablations/mutual_learning/{row}.yaml", deltas)
    args = ["--config", str(tmp_path / "base.yaml"), "--deltas", str(deltas), "--seeds", "0", "1"]
    assert main([*args, "--metrics", "val/acc_audio", "--out", str(tmp_path / "runs")]) == 0
    table = (tmp_path / "runs" / "table.md").read_text()
    # the + L_rec row without its renderer checkpoint: shown as n/a with the missing file, never dropped
    assert "(n=2)" in table and "n/a: " in table and "face_tiny/last.ckpt" in table
    assert (tmp_path / "runs" / "table.csv").exists() and "baseline" in capsys.readouterr().out
