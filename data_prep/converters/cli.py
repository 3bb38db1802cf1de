"""``av2av convert {lrs3,muavic,lrw,extract}``: real datasets into the corpus's shard format."""

from __future__ import annotations

import argparse

from data_prep.converters.common import Converted, ConvertOptions


def _options(args: argparse.Namespace) -> ConvertOptions:
    if args.max_per_shard < 1 or args.workers < 1 or (args.limit is not None and args.limit < 1):
        raise ValueError("--max-per-shard, --workers and --limit must be positive")
    return ConvertOptions(
        max_per_shard=args.max_per_shard,
        workers=args.workers,
        face=args.face,
        limit=args.limit,
        progress=not args.quiet,
    )


def _report(converted: Converted, out: str) -> None:
    from data_prep.corpus.build import format_stats

    print(format_stats(converted.manifest))
    skipped = converted.manifest["skipped"]["count"]
    print(f"{out}: {len(converted.keys)} samples written, {skipped} skipped (see manifest.json)")


def _lrs3(args: argparse.Namespace) -> None:
    from data_prep.converters.lrs3 import convert_lrs3

    _report(convert_lrs3(args.root, args.out, _options(args), args.valid_fraction, args.pretrain), args.out)


def _muavic(args: argparse.Namespace) -> None:
    from data_prep.converters.muavic import convert_muavic

    _report(convert_muavic(args.root, args.out, _options(args), args.langs), args.out)


def _lrw(args: argparse.Namespace) -> None:
    from data_prep.converters.lrw import convert_lrw

    _report(convert_lrw(args.root, args.out, _options(args)), args.out)


def _extract(args: argparse.Namespace) -> None:
    from data_prep.converters.archive import safe_extract

    print(f"{args.out}: extracted {safe_extract(args.archive, args.out)} members of {args.archive}")


def _common() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("root", help="dataset root in its published layout")
    common.add_argument("--out", required=True, help="output folder (shards and manifest.json)")
    common.add_argument("--max-per-shard", type=int, default=200, help="samples per shard")
    common.add_argument("--workers", type=int, default=1, help="decoding processes")
    common.add_argument(
        "--face",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="also write the 96x96 RGB face video (not available for MuAViC)",
    )
    common.add_argument("--limit", type=int, default=None, help="at most N samples per split (smoke runs)")
    common.add_argument("--quiet", action="store_true", help="no progress bar")
    return common


def add_arguments(commands) -> None:
    """Add ``convert`` and its dataset subcommands to the ``av2av`` subparsers."""
    convert = commands.add_parser("convert", help="convert a real dataset (LRS3, MuAViC, LRW) into shards")
    datasets = convert.add_subparsers(dest="dataset", required=True, metavar="DATASET")
    common = _common()
    lrs3 = datasets.add_parser("lrs3", parents=[common], help="ROOT/{pretrain,trainval,test}/SPEAKER/NNNNN.mp4 + .txt")
    lrs3.add_argument(
        "--valid-fraction", type=float, default=0.0, help="fraction of trainval speakers held out as valid"
    )
    lrs3.add_argument("--pretrain", action="store_true", help="also convert pretrain/ (split 'pretrain')")
    lrs3.set_defaults(handler=_lrs3)
    muavic = datasets.add_parser("muavic", parents=[common], help="ROOT/{lang}/{split}.tsv and ROOT/{src}-{tgt}/")
    muavic.add_argument("--langs", nargs="+", default=None, help="source languages to convert (default: all found)")
    muavic.set_defaults(handler=_muavic)
    lrw = datasets.add_parser("lrw", parents=[common], help="ROOT/WORD/{train,val,test}/WORD_NNNNN.mp4")
    lrw.set_defaults(handler=_lrw)
    extract = datasets.add_parser("extract", help="safely extract a .tar/.tar.gz/.zip dataset archive")
    extract.add_argument("archive")
    extract.add_argument("--out", required=True, help="folder to extract into")
    extract.set_defaults(handler=_extract)
