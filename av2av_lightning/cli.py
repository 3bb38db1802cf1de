"""The `av2av` command.

Training stages run through LightningCLI (`av2av fit|validate|test|predict --config ...`),
so every stage shares one configuration system; data preparation and evaluation are plain
subcommands. Expected failures (bad paths, bad values, bad configs, a run stopped by
`NonFiniteGuard`) print one line, never a traceback; ``AV2AV_TRACEBACK=1`` shows it anyway.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import traceback
from pathlib import Path

TRAINING_SUBCOMMANDS = ("fit", "validate", "test", "predict")
# what bad input raises: configs (argparse.ArgumentError from jsonargparse), files and values
EXPECTED_ERRORS: tuple[type[BaseException], ...] = (argparse.ArgumentError, OSError, ValueError)


def run_training(argv: list[str]) -> None:
    """LightningCLI over any stage (imported late: Lightning takes seconds to import)."""
    from av2av_lightning.lightning_cli import run_training as run

    run(argv)


def _one_line_error(command: str, err: BaseException) -> int:
    """``av2av COMMAND: error: MESSAGE`` on stderr (whitespace collapsed); exit status 2."""
    if os.environ.get("AV2AV_TRACEBACK"):
        raise err
    while err.__cause__ is not None and _raised_in_jsonargparse(err):
        err = err.__cause__  # its wrapper lists every union member it tried; the cause names the problem
    message = " ".join(str(err).split()) or type(err).__name__
    print(f"av2av {command}: error: {message}", file=sys.stderr)
    return 2


def _raised_in_jsonargparse(err: BaseException) -> bool:
    frames = traceback.extract_tb(err.__traceback__)
    return bool(frames) and f"{os.sep}jsonargparse{os.sep}" in frames[-1].filename


def _corpus_build(args: argparse.Namespace) -> None:
    from dataclasses import asdict, replace

    from av2av_lightning.data.shards import read_manifest
    from data_prep.corpus.build import PRESETS, build_corpus, format_stats

    config = PRESETS[args.preset]
    if args.seed is not None:
        config = replace(config, seed=args.seed)
    manifest_path = Path(args.out) / "manifest.json"
    if manifest_path.exists() and not args.force and read_manifest(manifest_path).get("config") == asdict(config):
        print(f"{args.out}: corpus '{config.name}' already built with this configuration (--force rebuilds)")
        manifest = read_manifest(manifest_path)
    else:
        manifest = build_corpus(config, args.out, workers=args.workers, progress=not args.quiet)
    print(format_stats(manifest))
    if args.plot:
        _plot(args.out, manifest, args.plot)


def _corpus_stats(args: argparse.Namespace) -> None:
    from av2av_lightning.data.shards import read_manifest
    from data_prep.corpus.build import format_stats

    try:
        manifest = read_manifest(args.corpus)
    except json.JSONDecodeError as err:
        raise ValueError(f"{args.corpus}: not a corpus manifest (invalid JSON: {err})") from None
    print(json.dumps(manifest, indent=2) if args.json else format_stats(manifest))
    if args.plot:
        _plot(Path(args.corpus).parent if Path(args.corpus).is_file() else args.corpus, manifest, args.plot)


def _plot(corpus_dir, manifest: dict, png: str) -> None:
    from evaluation.corpus_report import plot_corpus

    print(f"plot: {plot_corpus(corpus_dir, manifest, png)}")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="av2av",
        description="Audio-visual speech to audio-visual speech translation. Training stages: "
        f"`av2av {{{','.join(TRAINING_SUBCOMMANDS)}}} --config experiments/...yaml` (LightningCLI; --help for each).",
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name in TRAINING_SUBCOMMANDS:
        commands.add_parser(name, help=f"LightningCLI {name} of a training stage", add_help=False)

    corpus = commands.add_parser("corpus", help="the embedded multilingual audio-visual corpus")
    corpus_commands = corpus.add_subparsers(dest="corpus_command", required=True, metavar="ACTION")
    build = corpus_commands.add_parser("build", help="generate the corpus into WebDataset shards")
    build.add_argument("--preset", choices=("tiny", "demo"), default="demo")
    build.add_argument("--out", required=True, help="output folder (shards and manifest.json)")
    build.add_argument("--workers", type=int, default=2, help="worker processes (one eSpeak each)")
    build.add_argument("--seed", type=int, default=None, help="override the preset's seed")
    build.add_argument("--force", action="store_true", help="rebuild even if the same corpus exists")
    build.add_argument("--quiet", action="store_true", help="no progress bar")
    build.add_argument("--plot", metavar="PNG", help="also draw durations and one utterance's lips against its sound")
    build.set_defaults(handler=_corpus_build)
    stats = corpus_commands.add_parser("stats", help="print a corpus's statistics")
    stats.add_argument("corpus", help="corpus folder or its manifest.json")
    stats.add_argument("--json", action="store_true", help="print the whole manifest")
    stats.add_argument("--plot", metavar="PNG", help="also draw durations and one utterance's lips against its sound")
    stats.set_defaults(handler=_corpus_stats)

    from av2av_lightning.synthesize_cli import add_arguments as add_synthesize_arguments
    from av2av_lightning.translate_cli import add_arguments as add_translate_arguments
    from data_prep.clustering.cli import add_arguments as add_cluster_arguments
    from data_prep.converters.cli import add_arguments as add_converter_arguments
    from data_prep.units import add_arguments as add_unit_arguments
    from data_prep.vocab import add_arguments as add_vocab_arguments

    add_converter_arguments(commands)
    add_cluster_arguments(commands)
    add_vocab_arguments(commands)
    add_unit_arguments(commands)
    add_translate_arguments(commands)
    add_synthesize_arguments(commands)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] in TRAINING_SUBCOMMANDS:
        import pickle

        from av2av_lightning.reliability import NonFiniteLossError

        try:
            run_training(argv)
        except (*EXPECTED_ERRORS, NonFiniteLossError, pickle.UnpicklingError) as err:
            return _one_line_error(argv[0], err)
        return 0
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    args = build_parser().parse_args(argv)
    try:
        args.handler(args)
    except EXPECTED_ERRORS as err:
        return _one_line_error(args.command, err)
    return 0
