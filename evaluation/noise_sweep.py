"""Noise robustness: recognition per input (A, V, AV) with white or babble noise added to the audio at each SNR.

    python -m evaluation.noise_sweep --checkpoint runs/mutual_learning/tiny/last.ckpt \\
        --shards 'data/demo/sentences/test-*.tar' --out runs/eval/noise_sweep --snrs -20 -15 -10 -5 0 5 10

Every utterance gets noise (the datamodule's noise with probability 1, seeded per sample key, so every input and
every run sees the same noisy audio); babble is built from the split's other utterances. The clean split is
scored too (``noise = clean``, SNR ``inf``). A word classifier sees only the clips of its own words (the others
carry no target); ``--max-batches`` scores just the first batches of every pass (a quick sweep: the demo's).
Written: ``OUT/noise_sweep.md`` and ``.csv`` (one row per noise, SNR and input) and ``OUT/noise_sweep.png`` (the
metric against SNR per input, one panel per noise, clean dashed).
"""

from __future__ import annotations

import argparse
import math
import sys
from collections.abc import Iterable, Sequence
from itertools import islice
from pathlib import Path

from av2av_lightning.data.batching import AVBatch
from av2av_lightning.data.noise import NOISE_TYPES
from av2av_lightning.transcribers import Recogniser
from evaluation.recognition import add_arguments, evaluate, load, split_batches, table_rows
from evaluation.tables import save_figure, write_table

SNRS = (-20, -15, -10, -5, 0, 5, 10)

Row = dict[str, str | int | float]


def sweep(
    recogniser: Recogniser,
    shards: str | list[str],
    snrs: Sequence[float] = SNRS,
    noises: Sequence[str] = NOISE_TYPES,
    inputs: Sequence[str] | None = None,
    max_frames: int = 1000,
    max_batches: int | None = None,
) -> list[Row]:
    """Rows ``{noise, snr_db, input, utterances, metric...}``: the clean split first, then each noise and SNR;
    ``inputs`` None: every input the recogniser was trained on."""
    unknown = sorted(set(noises) - set(NOISE_TYPES))
    if unknown:
        raise ValueError(f"unknown noise types {unknown}; expected some of {', '.join(NOISE_TYPES)}")
    if max_batches is not None and max_batches < 1:
        raise ValueError(f"max_batches must be at least 1, got {max_batches}")
    clean = evaluate(recogniser.module, batches(recogniser, shards, max_frames, max_batches), inputs)
    rows = table_rows(clean, noise="clean", snr_db=math.inf)
    for noise in noises:
        for snr in snrs:
            noisy = batches(recogniser, shards, max_frames, max_batches, noise_prob=1.0, noise_snr_db=float(snr),
                            noise_types=(noise,))  # fmt: skip
            rows += table_rows(evaluate(recogniser.module, noisy, inputs), noise=noise, snr_db=_snr(snr))
    return rows


def batches(
    recogniser: Recogniser, shards: str | list[str], max_frames: int, max_batches: int | None, **noise
) -> Iterable[AVBatch]:
    """The split's batches, the first ``max_batches`` of them."""
    return islice(split_batches(shards, recogniser, max_frames, **noise), max_batches)


def _snr(value: float) -> int | float:
    """Whole dB as an int, so the table reads -20, not -20.0000."""
    return int(value) if float(value).is_integer() else float(value)


def metric_of(rows: list[Row]) -> str:
    """The headline metric of the rows: WER for sentences, accuracy for words."""
    return "wer" if "wer" in rows[0] else "accuracy"


def plot(rows: list[Row], path: Path, metric: str | None = None) -> Path:
    """``metric`` (default: WER or accuracy) against SNR, one line per input and one panel per noise; the clean
    score as a dashed line of the same colour."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    metric = metric or metric_of(rows)
    if metric not in rows[0]:
        raise ValueError(f"no column {metric!r} to plot; the table has {', '.join(rows[0])}")
    noises = list(dict.fromkeys(row["noise"] for row in rows if row["noise"] != "clean"))
    inputs = list(dict.fromkeys(row["input"] for row in rows))
    figure, axes = plt.subplots(1, len(noises), figsize=(5 * len(noises), 4), sharey=True, squeeze=False)
    for axis, noise in zip(axes[0], noises):
        for index, name in enumerate(inputs):
            colour = f"C{index}"
            points = sorted(
                (row["snr_db"], row[metric]) for row in rows if row["noise"] == noise and row["input"] == name
            )
            axis.plot(*zip(*points), marker="o", color=colour, label=name)
            clean = [row[metric] for row in rows if row["noise"] == "clean" and row["input"] == name]
            if clean:
                axis.axhline(clean[0], color=colour, linestyle="--", linewidth=1)
        axis.set(
            title=f"{noise} noise", xlabel="SNR (dB)", ylabel=metric.upper() if metric in ("wer", "cer") else metric
        )
        axis.grid(alpha=0.3)
        axis.legend(title="input")
    return save_figure(figure, path)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_arguments(parser)
    parser.add_argument("--snrs", type=float, nargs="+", default=list(SNRS), help="SNRs in dB")
    parser.add_argument("--noises", nargs="+", default=list(NOISE_TYPES), choices=list(NOISE_TYPES))
    parser.add_argument("--max-batches", type=int, help="score only the first batches of every pass (quick sweeps)")
    parser.add_argument("--plot-metric", choices=["wer", "cer", "accuracy"], help="default: wer, or accuracy (words)")
    args = parser.parse_args(argv)
    try:
        recogniser = load(args)
    except (FileNotFoundError, ValueError) as err:
        print(f"noise_sweep: error: {err}", file=sys.stderr)
        return 2
    rows = sweep(recogniser, args.shards, args.snrs, args.noises, args.inputs, args.max_frames, args.max_batches)
    print(write_table(rows, args.out, "noise_sweep"))
    try:
        print(f"plot: {plot(rows, args.out / 'noise_sweep.png', args.plot_metric)}")
    except ValueError as err:
        print(f"noise_sweep: error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
