"""W&B sweep files and their local runner: grid expansion, seeded random search, ``${args}`` rendered as the W&B
agent renders it, values reaching the resolved config, and a 2-point sweep run into a table and a plot."""

from __future__ import annotations

import csv
import math
import sys
from pathlib import Path

import pytest
import yaml
from wandb.sdk.launch.sweeps.utils import create_sweep_command_args

from av2av_lightning.cli import run_training
from av2av_lightning.logging_utils import WandbConfigCallback, experiment_names, redact
from data_prep.vocab import count_words, top_words
from evaluation.sweep import config_files, expand, load_sweep, main, render

ROOT = Path(__file__).parents[1]
SWEEPS = ROOT / "experiments" / "sweeps"


def test_grids_expand_every_combination_in_file_order():
    modality = expand(load_sweep(SWEEPS / "modality_dropout_grid.yaml"))
    assert len(modality) == 8
    assert modality[0] == {
        "model.init_args.encoder.modality_dropout": 0.0,
        "model.init_args.encoder.audio_dropout": 0.0,
    }
    assert modality[1]["model.init_args.encoder.audio_dropout"] == 0.5
    lambdas = expand(load_sweep(SWEEPS / "lambda_grid.yaml"))
    assert len(lambdas) == 16 and len({tuple(p.values()) for p in lambdas}) == 16
    assert expand(load_sweep(SWEEPS / "lambda_grid.yaml"), max_runs=3) == lambdas[:3]


def test_random_search_is_reproducible_from_its_seed_and_stays_in_range():
    spec = load_sweep(SWEEPS / "lr_random.yaml")
    points = expand(spec, seed=0)
    assert len(points) == spec["run_cap"] and points == expand(spec, seed=0)
    assert expand(spec, max_runs=4, seed=0) == points[:4]  # fewer runs: the same first draws
    assert expand(spec, seed=1) != points
    lrs = [p["model.init_args.lr"] for p in points]
    assert all(3e-4 <= lr <= 1e-2 for lr in lrs) and max(lrs) / min(lrs) > 3  # spread over the log range
    assert all(isinstance(p["model.init_args.warmup_steps"], int) for p in points)
    assert all(20 <= p["model.init_args.warmup_steps"] <= 200 for p in points)


@pytest.mark.parametrize("name", ["modality_dropout_grid", "lambda_grid", "lr_random"])
def test_args_render_as_the_wandb_agent_renders_them(name):
    spec = load_sweep(SWEEPS / f"{name}.yaml")
    values = expand(spec, max_runs=1, seed=3)[0]
    agent = create_sweep_command_args({"args": {k: {"value": v} for k, v in values.items()}})
    command = render(spec["command"], values, spec["program"])
    assert command[:3] == ["/usr/bin/env", "av2av", "fit"]
    assert command[-len(values) :] == agent["args"]
    assert all(path.is_file() for path in config_files(spec["command"]))


def _dotted(config: dict, name: str):
    for part in name.split("."):
        config = config[part]
    return config


@pytest.mark.parametrize(
    "name",
    [
        "modality_dropout_grid",
        "lambda_grid",
        "lr_random",
    ],
)
def test_swept_values_reach_the_resolved_config_with_their_types(name, capsys, monkeypatch):
    """What every DDP rank parses: LightningCLI resolves the rendered command (printed instead of run)."""
    monkeypatch.setattr(sys, "argv", ["av2av"])  # pytest's own arguments are not the command's
    spec = load_sweep(SWEEPS / f"{name}.yaml")
    values = expand(spec, max_runs=2, seed=0)[-1]
    command = render(spec["command"], values, spec["program"])
    with pytest.raises(SystemExit):
        run_training([*command[2:], "--print_config"])
    resolved = yaml.safe_load(capsys.readouterr().out)
    for key, value in values.items():
        assert _dotted(resolved, key) == value and type(_dotted(resolved, key)) is type(value), key


def test_bad_sweep_files_are_one_line_errors(tmp_path):
    good = yaml.safe_load((SWEEPS / "lr_random.yaml").read_text())
    cases = {
        "bayes": ({**good, "method": "bayes"}, "cannot run locally"),
        "no_args": ({**good, "command": good["command"][:-1]}, r"\$\{args\}"),
    }
    for stem, (spec, message) in cases.items():
        (tmp_path / f"{stem}.yaml").write_text(yaml.safe_dump(spec))
        with pytest.raises(ValueError, match=message):
            load_sweep(tmp_path / f"{stem}.yaml")
    with pytest.raises(FileNotFoundError, match="missing.yaml"):
        load_sweep(tmp_path / "missing.yaml")
    with pytest.raises(ValueError, match="needs --max-runs or a run_cap"):
        expand({key: value for key, value in good.items() if key != "run_cap"})
    with pytest.raises(ValueError, match="a grid needs 'values'"):
        expand({**good, "method": "grid"})
    with pytest.raises(FileNotFoundError, match="nowhere.yaml"):
        config_files(["fit", "--config", "nowhere.yaml", "${args}"])
    assert main([str(tmp_path / "bayes.yaml"), "--out", str(tmp_path / "out")]) == 2


def test_dry_run_prints_each_point_and_runs_nothing(tmp_path, capsys):
    assert main([str(SWEEPS / "lr_random.yaml"), "--out", str(tmp_path), "--max-runs", "2", "--dry-run"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert (
        len(lines) == 2
        and lines[0].startswith("run000-")
        and " /usr/bin/env av2av fit --config experiments/pretrain/" in lines[0]
    )
    assert "--model.init_args.lr=" in lines[1] and not any(tmp_path.iterdir())


def tiny_words_base(tiny_corpus, tmp_path: Path) -> Path:
    """The tiny word classifier of experiments/mutual_learning, cut down to 2 steps of a small encoder."""
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
    return tmp_path / "base.yaml"


@pytest.mark.slow
def test_local_sweep_runs_each_point_and_tabulates_and_plots(tiny_corpus, tmp_path, capsys):
    """Two learning rates of the tiny word classifier: two runs, each with its value in the model's hparams."""
    base = tiny_words_base(tiny_corpus, tmp_path)
    sweep = yaml.safe_load((SWEEPS / "lambda_grid.yaml").read_text())
    sweep["command"] = ["${env}", "${program}", "fit", "--config", str(base), "${args}"]
    sweep["parameters"] = {"model.init_args.lr": {"values": [1.0e-3, 2.5e-3]}}
    sweep["metric"]["name"] = "val/acc_audio"
    (tmp_path / "sweep.yaml").write_text(yaml.safe_dump(sweep))

    runs = tmp_path / "runs"
    assert main([str(tmp_path / "sweep.yaml"), "--out", str(runs)]) == 0
    with open(runs / "table.csv", newline="") as handle:
        table = list(csv.DictReader(handle))
    assert [row["row"][:6] for row in table] == ["run000", "run001"]
    assert [row["model.init_args.lr"] for row in table] == ["0.001", "0.0025"]
    assert all(row["val/acc_audio"].endswith("(n=1)") for row in table)
    for row, lr in zip(table, (1.0e-3, 2.5e-3)):
        hparams = yaml.safe_load((runs / row["row"] / "base" / "seed0" / "hparams.yaml").read_text())
        assert math.isclose(hparams["lr"], lr)
    assert (runs / "sweep.png").stat().st_size > 1000 and f"| {table[1]['row']} | 0.0025 |" in (
        runs / "table.md"
    ).read_text()
    assert "plot: " in capsys.readouterr().out


def test_config_redaction_and_experiment_names():
    config = {"trainer": {"logger": {"init_args": {"api_key": "k", "project": "av2av"}}}, "x": [{"WANDB_TOKEN": 1}]}
    assert redact(config) == {
        "trainer": {"logger": {"init_args": {"api_key": "<redacted>", "project": "av2av"}}},
        "x": [{"WANDB_TOKEN": "<redacted>"}],
    }
    files = ["experiments/pretrain/tiny.yaml", "experiments/ablations/pretrain/no_modality_dropout.yaml"]
    assert experiment_names(files) == ("pretrain/tiny", ["no_modality_dropout"])
    assert experiment_names(["/tmp/x/base.yaml"]) == ("x/base", [])


@pytest.mark.slow
def test_wandb_run_gets_the_resolved_config_and_tags_offline(tiny_corpus, tmp_path, monkeypatch):
    """`av2av fit` as the CLI runs it, with `WandbConfigCallback` and an offline W&B logger that also logs the
    checkpoint as a model artifact (``log_model``: uploaded by ``wandb sync``, or at once when online)."""
    import lightning as L
    import wandb
    from lightning.pytorch.cli import LightningCLI

    from av2av_lightning.data.datamodule import AVDataModule

    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.setattr(sys, "argv", ["av2av"])
    base = tiny_words_base(tiny_corpus, tmp_path)
    delta = ROOT / "experiments/ablations/mutual_learning/baseline.yaml"
    logger = [
        "--trainer.logger=lightning.pytorch.loggers.WandbLogger",
        f"--trainer.logger.init_args.save_dir={tmp_path}",
        "--trainer.logger.init_args.log_model=true",
    ]
    args = ["fit", "--config", str(base), "--config", str(delta), *logger, "--model.init_args.lr=0.0042"]
    args += ["--trainer.max_steps=1", f"--trainer.default_root_dir={tmp_path}"]
    cli = LightningCLI(L.LightningModule, AVDataModule, subclass_mode_model=True, args=args,
                       save_config_callback=WandbConfigCallback, save_config_kwargs={"overwrite": True})  # fmt: skip
    run = cli.trainer.logger.experiment
    try:
        assert run.config["model"]["init_args"]["lr"] == 0.0042 and run.config["model"]["init_args"]["lambda_ling"] == 0
        assert run.config["trainer"]["max_steps"] == 1 and run.config["ablation"] == "baseline"
        assert set(run.tags) == {f"experiment:{base.parent.name}/base", "ablation:baseline"}
    finally:
        wandb.finish()
    [log] = (tmp_path / "wandb").glob(f"offline-run-*/run-{run.id}.wandb")
    records = log.read_bytes()  # the run's protobuf record log: the artifact's name and its one file
    assert f"model-{run.id}".encode() in records and b"model.ckpt" in records
