"""Run a W&B sweep file locally, without a W&B server: expand it, run each point, tabulate and plot.

    python -m evaluation.sweep experiments/sweeps/lr_random.yaml --out runs/sweeps/lr [--max-runs N] [--dry-run]

The sweep file is the one a W&B agent runs (``method``, ``parameters``, ``metric``, ``command`` with
``${args}``). Grids are expanded in full, random search draws ``--max-runs`` (else the file's ``run_cap``)
points from ``--seed``. Each point renders ``${args}`` exactly as the agent does (``--name=value``) and runs
through the ablation runner (`evaluation.ablation.run_ablation`: the same ``av2av fit``, CSV logging,
``n/a: reason`` for a failed run, finished runs not repeated), with the sweep's first ``--config`` as the base
and its second, if any, as the delta. The results go to ``OUT/table.md``, ``OUT/table.csv`` and ``OUT/sweep.png``
(the metric against each swept value). Extra arguments are passed on to every run (``--trainer.max_steps=50``).
"""

from __future__ import annotations

import argparse
import hashlib
import itertools
import json
import math
import random
import shlex
import sys
from pathlib import Path

import yaml

from evaluation.ablation import last_values, run_ablation
from evaluation.tables import save_figure, write_table

METHODS = ("grid", "random")


def load_sweep(path: Path) -> dict:
    """The sweep file, checked for what the local runner needs."""
    if not Path(path).is_file():
        raise FileNotFoundError(f"{path}: no such sweep file")
    spec = yaml.safe_load(Path(path).read_text())
    if not isinstance(spec, dict) or not spec.get("parameters") or not spec.get("command"):
        raise ValueError(f"{path}: expected a W&B sweep with 'parameters' and 'command'")
    if spec.get("method") not in METHODS:
        raise ValueError(f"{path}: method {spec.get('method')!r} cannot run locally; expected one of {METHODS}")
    if "${args}" not in spec["command"]:
        raise ValueError(f"{path}: the command must pass the values with ${{args}}")
    return spec


def sample(name: str, parameter: dict, rng: random.Random):
    """One draw of a parameter: a constant, a choice of values, or a W&B distribution."""
    if "value" in parameter:
        return parameter["value"]
    if "values" in parameter:
        return rng.choice(parameter["values"])
    kind = parameter.get("distribution", "uniform")
    low, high = parameter.get("min"), parameter.get("max")
    if kind == "uniform":
        return rng.uniform(low, high)
    if kind == "log_uniform_values":
        return math.exp(rng.uniform(math.log(low), math.log(high)))
    if kind == "int_uniform":
        return rng.randint(low, high)
    raise ValueError(
        f"parameter {name}: distribution {kind!r} not supported; use uniform, log_uniform_values, int_uniform"
    )


def expand(spec: dict, max_runs: int | None = None, seed: int = 0) -> list[dict]:
    """The sweep's points: every grid combination (in file order), or ``max_runs`` / ``run_cap`` random draws."""
    parameters = spec["parameters"]
    if spec["method"] == "grid":
        choices = []
        for name, parameter in parameters.items():
            if "value" not in parameter and "values" not in parameter:
                raise ValueError(f"parameter {name}: a grid needs 'values' (or 'value'), got {sorted(parameter)}")
            choices.append([parameter["value"]] if "value" in parameter else parameter["values"])
        points = [dict(zip(parameters, combination)) for combination in itertools.product(*choices)]
        return points[:max_runs] if max_runs else points
    count = max_runs or spec.get("run_cap")
    if not count:
        raise ValueError("random search needs --max-runs or a run_cap in the sweep file")
    rng = random.Random(seed)
    return [{name: sample(name, p, rng) for name, p in parameters.items()} for _ in range(count)]


def render(command: list[str], values: dict, program: str | None = None) -> list[str]:
    """The command line a W&B agent runs: ``${args}`` becomes ``--name=value`` per parameter."""
    macros = {"${env}": ["/usr/bin/env"], "${interpreter}": [sys.executable], "${program}": [program or ""]}
    macros["${args}"] = [f"--{name}={value}" for name, value in values.items()]
    return [part for item in command for part in macros.get(item, [item])]


def config_files(command: list[str]) -> list[Path]:
    """The ``--config`` files of a sweep command, checked to exist."""
    files = [Path(command[i + 1]) for i, item in enumerate(command[:-1]) if item == "--config"]
    files += [Path(item.split("=", 1)[1]) for item in command if item.startswith("--config=")]
    if not 1 <= len(files) <= 2:
        raise ValueError(f"the local runner takes one or two --config files (base, delta), got {len(files)}")
    for path in files:
        if not path.is_file():
            raise FileNotFoundError(f"{path}: config of the sweep command not found")
    return files


def label(value) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value)


def run_name(index: int, values: dict) -> str:
    """``run003-1a2b3c``: the hash keeps a finished run from being reused for other values (another --seed)."""
    digest = hashlib.sha1(json.dumps(values, sort_keys=True).encode()).hexdigest()[:6]
    return f"run{index:03d}-{digest}"


def run_sweep(
    spec: dict, points: list[dict], out: Path, metrics: list[str], seed: int, extra: list[str]
) -> tuple[list[dict], list[dict]]:
    """Runs every point through the ablation runner: table rows (cells) and the numeric results per point."""
    configs = config_files(spec["command"])
    base, delta = configs[0], configs[-1]  # one config: loading it twice changes nothing
    rows, results = [], []
    for index, values in enumerate(points):
        run_out = out / run_name(index, values)
        args = render(["${args}"], values)
        (cells,) = run_ablation(base, [delta], [seed], metrics, run_out, [*args, *extra])
        log = run_out / delta.stem / f"seed{seed}" / "metrics.csv"
        results.append(last_values(log, metrics) if log.exists() else {})
        swept = {name: label(value) for name, value in values.items()}
        rows.append({"row": run_out.name, **swept, **{k: v for k, v in cells.items() if k != "row"}})
    return rows, results


def plot(points: list[dict], results: list[dict], metric: str, png: Path) -> Path:
    """The metric against each swept parameter (one panel each; log axis for values spanning 30x or more)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(points[0])
    figure, axes = plt.subplots(1, len(names), figsize=(4 * len(names), 3.2), squeeze=False)
    for axis, name in zip(axes[0], names):
        pairs = [(p[name], r[metric]) for p, r in zip(points, results) if metric in r]
        numeric = all(isinstance(x, int | float) and not isinstance(x, bool) for x, _ in pairs)
        xs = [x if numeric else str(x) for x, _ in pairs]
        axis.scatter(xs, [y for _, y in pairs])
        if numeric and pairs and min(xs) > 0 and max(xs) / min(xs) >= 30:
            axis.set_xscale("log")
        axis.set_xlabel(name.rsplit(".", 1)[-1])
        axis.set_ylabel(metric)
        axis.grid(alpha=0.3)
    return save_figure(figure, png)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("sweep", type=Path, help="W&B sweep file (experiments/sweeps/*.yaml)")
    parser.add_argument("--out", required=True, type=Path, help="run folders, table and plot")
    parser.add_argument("--max-runs", type=int, help="at most this many points (random search: how many draws)")
    parser.add_argument("--seed", type=int, default=0, help="random-search draws and every run's seed_everything")
    parser.add_argument("--metrics", nargs="+", help="logged metrics to tabulate (default: the sweep's metric)")
    parser.add_argument("--dry-run", action="store_true", help="print the W&B command of each point, run nothing")
    args, extra = parser.parse_known_args(argv)
    try:
        spec = load_sweep(args.sweep)
        points = expand(spec, args.max_runs, args.seed)
        metrics = args.metrics or [spec.get("metric", {}).get("name")]
        if not metrics[0]:
            raise ValueError(f"{args.sweep}: no metric in the sweep file; name one with --metrics")
        if args.dry_run:
            for index, values in enumerate(points):
                print(f"{run_name(index, values)}: {shlex.join(render(spec['command'], values, spec.get('program')))}")
            return 0
        rows, results = run_sweep(spec, points, args.out, metrics, args.seed, extra)
    except (OSError, ValueError) as err:
        print(f"sweep: error: {err}", file=sys.stderr)
        return 2
    print(write_table(rows, args.out))
    print(f"plot: {plot(points, results, metrics[0], args.out / 'sweep.png')}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
