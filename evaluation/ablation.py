"""Run an ablation: every config delta of a folder x several seeds, then a table of mean +- std.

    python -m evaluation.ablation --config experiments/mutual_learning/tiny_words.yaml \\
        --deltas experiments/ablations/mutual_learning --seeds 0 1 2 \\
        --metrics val/acc_video val/acc_audio --out runs/ablations/mutual_learning

Each run is ``av2av fit --config BASE --config DELTA --seed_everything S`` with a CSV logger
under ``OUT/DELTA/seedS``; the last logged value of each metric is its result. A run that
fails (a row that is refused, such as the + L_rec row before the renderer exists) is shown
as ``n/a`` with its one-line reason, never dropped. The table is printed and written as
``OUT/table.md`` and ``OUT/table.csv``; finished runs are not repeated. ``--jobs N`` trains N
runs at a time (give each ``OMP_NUM_THREADS`` = cores / N on a CPU machine).
"""

from __future__ import annotations

import argparse
import csv
import math
import re
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from evaluation.tables import write_table

_EXCEPTION = re.compile(r"^[A-Za-z_.]*(?:Error|Exception): (.+)$", re.MULTILINE)


@dataclass
class RowResult:
    """One delta's results over its seeds: metric -> values, and the reasons of failed runs."""

    name: str
    values: dict[str, list[float]] = field(default_factory=dict)
    failures: list[str] = field(default_factory=list)


def fit_command(base: Path, delta: Path, seed: int, run_dir: Path, extra: list[str]) -> list[str]:
    return [
        sys.executable, "-m", "av2av_lightning", "fit", "--config", str(base), "--config", str(delta),
        "--seed_everything", str(seed),
        "--trainer.logger", "lightning.pytorch.loggers.CSVLogger",
        "--trainer.logger.init_args.save_dir", str(run_dir), "--trainer.logger.init_args.name", "",
        "--trainer.logger.init_args.version", "", "--trainer.default_root_dir", str(run_dir), *extra,
    ]  # fmt: skip


def last_values(metrics_csv: Path, names: list[str]) -> dict[str, float]:
    """The last logged value of each metric in a Lightning CSV log."""
    values: dict[str, float] = {}
    with open(metrics_csv, newline="") as handle:
        for row in csv.DictReader(handle):
            values.update({name: float(row[name]) for name in names if row.get(name)})
    return values


def failure_reason(stderr: str) -> str:
    """The message of the first exception a failed run printed (the cause; later ones wrap it), or its last line."""
    errors = _EXCEPTION.findall(stderr)
    if errors:
        return errors[0].strip()
    lines = stderr.strip().splitlines()
    return lines[-1] if lines else ""


def summarise(rows: list[RowResult], metrics: list[str]) -> list[dict[str, str]]:
    """Table cells: ``mean +- std (n)`` per metric, ``n/a: reason`` for a row without results."""
    table = []
    for row in rows:
        cells = {"row": row.name}
        for metric in metrics:
            values = row.values.get(metric, [])
            if not values:
                cells[metric] = "n/a" + (f": {row.failures[0]}" if row.failures else "")
            else:
                std = float(np.std(values, ddof=1)) if len(values) > 1 else math.nan
                cells[metric] = f"{float(np.mean(values)):.4f} +- {std:.4f} (n={len(values)})"
        table.append(cells)
    return table


def run_folder(out: Path, delta: Path, seed: int) -> Path:
    return out / delta.stem / f"seed{seed}"


def fit_once(base: Path, delta: Path, seed: int, out: Path, extra: list[str]) -> str | None:
    """Train one (delta, seed) run unless its log exists; the one-line reason when it fails, else None."""
    run_dir = run_folder(out, delta, seed)
    if not (run_dir / "metrics.csv").exists():
        result = subprocess.run(fit_command(base, delta, seed, run_dir, extra), capture_output=True, text=True)
        if result.returncode != 0:
            reason = failure_reason(result.stderr) or f"exit {result.returncode}"
            print(f"{delta.stem} seed {seed}: failed ({reason})", file=sys.stderr)
            return reason
    print(f"{delta.stem} seed {seed}: done", file=sys.stderr)
    return None


def run_ablation(
    base: Path, deltas: list[Path], seeds: list[int], metrics: list[str], out: Path, extra: list[str], jobs: int = 1
) -> list[dict[str, str]]:
    """Every (delta, seed) run, ``jobs`` at a time, then the table cells."""
    runs = [(delta, seed) for delta in deltas for seed in seeds]
    with ThreadPoolExecutor(max_workers=jobs) as pool:
        failures = dict(zip(runs, pool.map(lambda run: fit_once(base, *run, out, extra), runs)))
    rows = []
    for delta in deltas:
        row = RowResult(delta.stem)
        for seed in seeds:
            if failures[delta, seed] is not None:
                row.failures.append(failures[delta, seed])
                continue
            for name, value in last_values(run_folder(out, delta, seed) / "metrics.csv", metrics).items():
                row.values.setdefault(name, []).append(value)
        rows.append(row)
    return summarise(rows, metrics)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", required=True, type=Path, help="base LightningCLI config")
    parser.add_argument("--deltas", required=True, type=Path, help="folder of config deltas (one row each)")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--metrics", nargs="+", required=True, help="logged metrics to tabulate")
    parser.add_argument("--out", required=True, type=Path, help="run folders and the table")
    parser.add_argument("--jobs", type=int, default=1, help="runs trained at the same time")
    args, extra = parser.parse_known_args(argv)
    if args.jobs < 1:
        print(f"ablation: error: --jobs {args.jobs}: expected at least 1 run at a time", file=sys.stderr)
        return 2
    deltas = sorted(args.deltas.glob("*.yaml"))
    if not deltas:
        print(f"ablation: error: {args.deltas} holds no .yaml deltas", file=sys.stderr)
        return 2
    table = run_ablation(args.config, deltas, args.seeds, args.metrics, args.out, extra, args.jobs)
    print(write_table(table, args.out))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
