"""``av2av cluster {mfcc,quality}``: k-means targets for AV-HuBERT and the quality of discrete units."""

from __future__ import annotations

import argparse
from pathlib import Path

from data_prep.clustering.kmeans import FEATURE_NORMS


def parse_splits(items: list[str] | None, train: list[str]) -> dict[str, str | list[str]]:
    """``--label NAME=PATTERN`` pairs (a repeated name adds patterns); default: the training shards as ``train``."""
    if not items:
        return {"train": train}
    splits: dict[str, list[str]] = {}
    for item in items:
        name, sep, pattern = item.partition("=")
        if not sep or not name or not pattern:
            raise ValueError(f"--label needs NAME=PATTERN, got {item!r}")
        splits.setdefault(name, []).append(pattern)
    return splits


def _mfcc(args: argparse.Namespace) -> None:
    from av2av_lightning.data.sidecar import Sidecar
    from data_prep.clustering.kmeans import build_targets, mfcc_source
    from data_prep.clustering.unit_quality import format_quality, sidecar_quality

    if args.k < 1 or args.batch_size < 1 or args.n_init < 1 or args.max_iter < 1:
        raise ValueError("--k, --batch-size, --n-init and --max-iter must be positive")
    import torch

    # one utterance's MFCCs are far too small for intra-op threads: with a busy second core they only spin-wait
    # (measured: 155 utterances/s with one thread, 7 with two)
    torch.set_num_threads(1)
    splits = parse_splits(args.label, args.shards)
    quantizer, paths = build_targets(
        args.shards,
        splits,
        mfcc_source(),
        args.out,
        args.k,
        sample_fraction=args.sample_fraction,
        seed=args.seed,
        progress=not args.quiet,
        batch_size=args.batch_size,
        norm=args.norm,
        n_init=args.n_init,
        max_iter=args.max_iter,
    )
    print(
        f"{Path(args.out) / 'kmeans.npz'}: k={quantizer.k}, dim={quantizer.dim}, "
        f"inertia {quantizer.inertia:.4f} per frame"
    )
    reports = {}
    for split, path in paths.items():
        print(f"{path}: {split} labels at 100 Hz")
        try:
            reports[split] = sidecar_quality(splits[split], Sidecar.load(path))
        except ValueError as err:
            print(f"{split}: no unit quality ({err})")
    if reports:
        print(format_quality(reports))


def _layer(args: argparse.Namespace) -> None:
    """Iteration n: k-means on a layer of the previous iteration's encoder (or label with a saved quantizer)."""
    from av2av_lightning.checkpoints import load_encoder
    from data_prep.clustering.kmeans import KMeansQuantizer, build_targets, label_shards, model_layer_source

    device = resolve_device(args.device)
    source = model_layer_source(
        load_encoder(args.checkpoint), args.layer, args.checkpoint, args.modality, device=device
    )
    if not args.shards and not args.label:
        raise ValueError("give --shards to fit on, or --quantizer with --label NAME=PATTERN to label")
    splits = parse_splits(args.label, args.shards)
    if args.quantizer:
        quantizer = KMeansQuantizer.load(args.quantizer)
        out = Path(args.out)
        for split, pattern in splits.items():
            path = label_shards(
                pattern, source, quantizer, out / f"{split}.km{quantizer.k}.npz", progress=not args.quiet
            )
            print(f"{path}: {split} labels from {args.modality} input at 25 Hz")
        return
    if not args.shards:
        raise ValueError("--shards (training shards to fit on) is required without --quantizer")
    quantizer, paths = build_targets(
        args.shards, splits, source, args.out, args.k, args.sample_fraction, args.seed, not args.quiet, args.norm
    )
    print(
        f"{Path(args.out) / 'kmeans.npz'}: k={quantizer.k}, dim={quantizer.dim}, {quantizer.norm} normalisation, "
        f"inertia {quantizer.inertia:.4f}"
    )
    for split, path in paths.items():
        print(f"{path}: {split} labels from {args.modality} input at 25 Hz")


def resolve_device(device: str) -> str:
    """``auto`` is CUDA when available, else the CPU; any other name is used as given."""
    if device != "auto":
        return device
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def _quality(args: argparse.Namespace) -> None:
    from av2av_lightning.data.sidecar import Sidecar
    from data_prep.clustering.unit_quality import format_quality, sidecar_quality

    labels = Sidecar.load(args.labels)
    compare = Sidecar.load(args.compare) if args.compare else None
    report = sidecar_quality(args.shards, labels, compare, progress=not args.quiet)
    print(format_quality({Path(labels.source).name: report}))


NORM_HELP = "per-utterance feature normalisation before k-means, kept in kmeans.npz (a --quantizer has its own)"


def add_arguments(commands) -> None:
    """Add ``cluster`` and its actions to the ``av2av`` subparsers."""
    cluster = commands.add_parser("cluster", help="k-means cluster targets and unit quality")
    actions = cluster.add_subparsers(dest="cluster_command", required=True, metavar="ACTION")
    mfcc = actions.add_parser("mfcc", help="iteration-1 targets: k-means on 39-dim MFCC at 100 Hz")
    mfcc.add_argument("--shards", action="append", required=True, help="training shards to fit on (repeatable)")
    mfcc.add_argument(
        "--label",
        action="append",
        metavar="NAME=PATTERN",
        help="split to label (repeatable); writes OUT/NAME.kmK.npz (default: the training shards as 'train')",
    )
    mfcc.add_argument("--out", required=True, help="output folder (kmeans.npz and label sidecars)")
    mfcc.add_argument("--k", type=int, default=100, help="number of clusters")
    mfcc.add_argument("--sample-fraction", type=float, default=0.1, help="fraction of training utterances to fit on")
    mfcc.add_argument("--seed", type=int, default=0)
    mfcc.add_argument("--batch-size", type=int, default=10_000, help="MiniBatchKMeans batch size")
    mfcc.add_argument("--n-init", type=int, default=20, help="k-means++ initialisations")
    mfcc.add_argument("--max-iter", type=int, default=100, help="passes over the fitting sample")
    mfcc.add_argument("--norm", choices=FEATURE_NORMS, default="none", help=NORM_HELP)
    mfcc.add_argument("--quiet", action="store_true", help="no progress bars")
    mfcc.set_defaults(handler=_mfcc)
    layer = actions.add_parser("layer", help="iteration-n targets: k-means on a layer of an encoder checkpoint")
    layer.add_argument("--checkpoint", required=True, help="pretraining or mutual-learning checkpoint (its encoder)")
    layer.add_argument("--layer", type=int, required=True, help="encoder layer (1-based) whose features are clustered")
    layer.add_argument("--modality", choices=("av", "audio", "video"), default="av", help="encoder input")
    layer.add_argument("--shards", action="append", help="training shards to fit on (repeatable)")
    layer.add_argument("--label", action="append", metavar="NAME=PATTERN", help="split to label (repeatable)")
    layer.add_argument("--quantizer", help="label with this saved kmeans.npz instead of fitting a new one")
    layer.add_argument("--norm", choices=FEATURE_NORMS, default="utterance-cosine", help=NORM_HELP)
    layer.add_argument("--out", required=True, help="output folder (kmeans.npz and label sidecars)")
    layer.add_argument("--k", type=int, default=100, help="number of clusters")
    layer.add_argument("--sample-fraction", type=float, default=0.1, help="fraction of training utterances to fit on")
    layer.add_argument("--seed", type=int, default=0)
    layer.add_argument("--device", default="auto", help="cpu, cuda or auto")
    layer.add_argument("--quiet", action="store_true", help="no progress bars")
    layer.set_defaults(handler=_layer)
    quality = actions.add_parser("quality", help="PNMI and purity of label sidecars against phoneme alignments")
    quality.add_argument("--shards", action="append", required=True, help="shards with phoneme alignments (repeatable)")
    quality.add_argument("--labels", required=True, help="label sidecar (.npz)")
    quality.add_argument("--compare", help="second sidecar of the same samples: also report frame agreement")
    quality.add_argument("--quiet", action="store_true", help="no progress bars")
    quality.set_defaults(handler=_quality)
