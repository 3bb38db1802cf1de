"""Discrete speech units for translation: k-means on an encoder layer for AV, audio-only or video-only input.

Reuses the cluster-target code (`data_prep.clustering.kmeans`): a `model_layer_source` over a pretrained (or
aligned) AV-HuBERT encoder gives 25 Hz features for the chosen input, a `KMeansQuantizer` labels them. A
quantizer fitted once (usually on audio-only or AV features) labels every input, so units from A, V and AV
input share one dictionary and can be compared.

The other way, as AV2AV does: `head_source` reads the model's own label heads (the argmax of each head's
cosine logits per 25 Hz frame) and interleaves them, so two heads give a 50 Hz unit stream; no k-means.

Units from noisy speech: every source takes a `WaveNoise` (SNR, white or babble) mixed into the waveform before
the audio features, seeded per sample key so A and AV units of a clip hear the same noise; video-only input reads
no audio and is unaffected. The source spec (with its noise) is recorded as ``source`` in each sidecar's header.

Consecutive repeats are removed for translation; their run lengths are kept for the renderer, so the frame
sequence is exactly ``np.repeat(units, durations)``. For each split the output folder gets:

- ``{split}.units.npz``: de-duplicated units per sample key (sidecar, ``rate`` null, int16);
- ``{split}.durations.npz``: the frames each unit lasts (sidecar, ``rate`` null, int16), at 25 Hz (50 Hz from
  two label heads);
- ``kmeans.npz``: the quantizer (unless an existing one was given);
- ``dict.txt``: the unit dictionary, one ``unit count`` line per unit id 0..k-1 (fairseq ``dict.txt`` form,
  counts over the de-duplicated units of the written splits).
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from av2av_lightning.data.noise import NOISE_TYPES
from av2av_lightning.data.schema import VIDEO_FPS
from av2av_lightning.data.sidecar import SidecarWriter
from data_prep.clustering.cli import NORM_HELP
from data_prep.clustering.kmeans import (
    FEATURE_NORMS,
    LABEL_DTYPE,
    FeatureSource,
    KMeansQuantizer,
    WaveNoise,
    extract_features,
    fit_on_shards,
    layer_source,
)

DICTIONARY_NAME = "dict.txt"

__all__ = [
    "dedup",
    "expand",
    "extract_units",
    "build_units",
    "head_source",
    "read_unit_dictionary",
    "write_unit_dictionary",
    "add_arguments",
]


def dedup(frames: np.ndarray | Sequence[int]) -> tuple[np.ndarray, np.ndarray]:
    """Consecutive repeats removed: ``(units, durations)`` with ``np.repeat(units, durations) == frames``."""
    frames = np.asarray(frames).reshape(-1)
    if len(frames) == 0:
        return frames.copy(), np.zeros(0, dtype=np.int64)
    starts = np.flatnonzero(np.concatenate([[True], frames[1:] != frames[:-1]]))
    durations = np.diff(np.append(starts, len(frames)))
    return frames[starts], durations


def expand(units: np.ndarray | Sequence[int], durations: np.ndarray | Sequence[int]) -> np.ndarray:
    """The frame sequence of de-duplicated units: each unit repeated for its duration."""
    units, durations = np.asarray(units).reshape(-1), np.asarray(durations).reshape(-1)
    if len(units) != len(durations):
        raise ValueError(f"{len(units)} units but {len(durations)} durations")
    if (durations < 1).any():
        raise ValueError(f"durations must be >= 1, got {int(durations.min())}")
    return np.repeat(units, durations)


def write_unit_dictionary(path: str | Path, counts: np.ndarray) -> Path:
    """``unit count`` per line for unit ids ``0 .. len(counts) - 1``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(f"{unit} {int(count)}\n" for unit, count in enumerate(counts)))
    return path


def read_unit_dictionary(path: str | Path) -> int:
    """The number of units of a dictionary file; a file that is not one is a one-line ``ValueError``."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such unit dictionary")
    lines = path.read_text().splitlines()
    for index, line in enumerate(lines):
        fields = line.split()
        if len(fields) != 2 or fields[0] != str(index) or not fields[1].isdigit():
            raise ValueError(f"{path}:{index + 1}: expected '{index} COUNT', got {line!r}")
    if not lines:
        raise ValueError(f"{path}: empty unit dictionary")
    return len(lines)


def head_source(
    model,
    checkpoint: str | None = None,
    modality: str = "audio",
    batch_frames: int = 2000,
    device="cpu",
    noise: WaveNoise | None = None,
) -> FeatureSource:
    """Units from the model's own label heads: per 25 Hz frame the argmax of each head, as ``[frames, heads]``
    "features" that `extract_units` (``quantizer=None``) flattens frame by frame into ``heads x 25`` Hz units.

    All heads must share one unit inventory (AV2AV: two heads of 1000 classes -> 50 Hz units).
    """
    classes = list(model.config.num_classes)
    if len(set(classes)) != 1:
        raise ValueError(f"label heads have different numbers of classes {classes}; units need one inventory")
    model = model.to(device)

    def fn(audio, video, padding_mask):
        video = None if video is None else video.unsqueeze(1)
        features = model.extract_features(audio, video, padding_mask)[0]
        return torch.stack([model.logits(features, i).argmax(-1) for i in range(len(classes))], -1).float()

    source = layer_source(
        fn, 0, checkpoint, modality, batched=True, batch_frames=batch_frames, device=device, noise=noise
    )
    rate = VIDEO_FPS * len(classes)
    # the layer source's checkpoint, modality and noise describe head units as well; its layer does not
    spec = {key: value for key, value in source.spec.items() if key != "layer"}
    source.spec = spec | {"kind": "heads", "heads": len(classes), "k": classes[0], "rate": rate}
    return source


def extract_units(
    shards,
    source: FeatureSource,
    quantizer: KMeansQuantizer | None,
    out_dir: str | Path,
    split: str,
    progress: bool = False,
) -> tuple[Path, Path, np.ndarray]:
    """Label every sample (``quantizer``; None: the labels of a `head_source`), de-duplicate, write
    ``{split}.units.npz`` and ``{split}.durations.npz``.

    Returns both paths and the count of each unit id (after de-duplication).
    """
    k = quantizer.k if quantizer is not None else source.spec.get("k")
    if k is None:
        raise ValueError("give a k-means quantizer, or a head_source whose labels are the units")
    if k > np.iinfo(LABEL_DTYPE).max + 1:
        raise ValueError(f"k={k} does not fit the {LABEL_DTYPE} units of a sidecar")
    out_dir = Path(out_dir)
    units_out = SidecarWriter(out_dir / f"{split}.units.npz", "units", None, LABEL_DTYPE, source=source.spec)
    durations_out = SidecarWriter(
        out_dir / f"{split}.durations.npz", "durations", None, LABEL_DTYPE, source=source.spec
    )
    counts = np.zeros(k, dtype=np.int64)
    for meta, feats in extract_features(shards, source, progress=progress, desc=f"units {split}"):
        frames = quantizer(feats) if quantizer is not None else feats.astype(np.int64).reshape(-1)
        units, durations = dedup(frames)
        units_out.add(meta.key, units)
        durations_out.add(meta.key, np.minimum(durations, np.iinfo(LABEL_DTYPE).max))
        counts += np.bincount(units, minlength=k)
    if counts.sum() == 0:
        raise ValueError(f"no readable sample in {shards!r} to extract units from")
    return units_out.close(), durations_out.close(), counts


def build_units(
    splits: dict[str, str | Sequence[str]],
    source: FeatureSource,
    out_dir: str | Path,
    quantizer: KMeansQuantizer | None = None,
    train_shards: str | Sequence[str] | None = None,
    k: int = 100,
    sample_fraction: float = 0.1,
    seed: int = 0,
    progress: bool = False,
    norm: str = "utterance-cosine",
) -> tuple[int, dict[str, Path]]:
    """Units of every split with ``quantizer``, or with one fitted on ``train_shards`` (saved as ``kmeans.npz``),
    or from the label heads of a `head_source`; writes the unit dictionary and returns the number of units and
    the unit sidecar of each split. ``norm`` is the fitted quantizer's per-utterance feature normalisation."""
    out_dir = Path(out_dir)
    heads = source.spec.get("kind") == "heads"
    if quantizer is None and not heads:
        if train_shards is None:
            raise ValueError("give train_shards to fit k-means on, or a fitted quantizer")
        quantizer = fit_on_shards(train_shards, source, k, sample_fraction, seed, progress, norm)
        quantizer.save(out_dir / "kmeans.npz")
    counts, paths = 0, {}
    for split, pattern in splits.items():
        paths[split], _, split_counts = extract_units(pattern, source, quantizer, out_dir, split, progress)
        counts = counts + split_counts
    write_unit_dictionary(out_dir / DICTIONARY_NAME, counts)
    return len(counts), paths


# ---------------------------------------------------------------------------- av2av units extract


def _extract(args: argparse.Namespace) -> None:
    from av2av_lightning.checkpoints import load_encoder
    from data_prep.clustering.cli import parse_splits, resolve_device
    from data_prep.clustering.kmeans import model_layer_source

    if not args.label and not args.shards:
        raise ValueError("give --label NAME=PATTERN (splits to extract) and --shards or --quantizer")
    if args.layer is None and not args.heads:
        raise ValueError("give --layer (k-means units of that layer) or --heads (the model's label heads)")
    if args.heads and args.quantizer:
        raise ValueError("--heads reads the model's label heads: give no --quantizer")
    if args.quantizer is None and not args.shards and not args.heads:
        raise ValueError("--shards (training shards to fit k-means on) is required without --quantizer")
    noise = None if args.noise_snr is None else WaveNoise(args.noise_snr, args.noise_type)
    if noise is not None and args.modality == "video":
        print(f"video-only input reads no audio: --noise-snr {args.noise_snr:g} does not apply")
    device = resolve_device(args.device)
    model = load_encoder(args.checkpoint)
    if args.heads:
        source = head_source(model, args.checkpoint, args.modality, device=device, noise=noise)
    else:
        source = model_layer_source(model, args.layer, args.checkpoint, args.modality, device=device, noise=noise)
    quantizer = KMeansQuantizer.load(args.quantizer) if args.quantizer else None
    k, paths = build_units(
        parse_splits(args.label, args.shards),
        source,
        args.out,
        quantizer,
        args.shards,
        args.k,
        args.sample_fraction,
        args.seed,
        not args.quiet,
        args.norm,
    )
    print(f"{Path(args.out) / DICTIONARY_NAME}: {k} units at {source.spec['rate']:g} Hz before de-duplication")
    heard = f" with {noise.kind} noise at {noise.snr_db:g} dB" if source.noise is not None else ""
    for split, path in paths.items():
        print(f"{path}: {split} units from {args.modality} input{heard}, repeats removed (durations beside it)")


def add_arguments(commands) -> None:
    """Add ``units`` and its actions to the ``av2av`` subparsers."""
    units = commands.add_parser("units", help="discrete units for translation (A, V or AV input)")
    actions = units.add_subparsers(dest="units_command", required=True, metavar="ACTION")
    extract = actions.add_parser("extract", help="k-means units of an encoder layer, repeats removed, with durations")
    extract.add_argument("--checkpoint", required=True, help="pretraining or mutual-learning checkpoint (its encoder)")
    extract.add_argument("--layer", type=int, help="encoder layer (1-based) whose features are clustered")
    extract.add_argument("--heads", action="store_true", help="units from the model's label heads, interleaved")
    extract.add_argument("--modality", choices=("av", "audio", "video"), default="audio", help="encoder input")
    extract.add_argument("--shards", action="append", help="training shards to fit k-means on (repeatable)")
    extract.add_argument("--label", action="append", metavar="NAME=PATTERN", help="split to extract (repeatable)")
    extract.add_argument("--quantizer", help="use this kmeans.npz (e.g. fitted on audio) instead of fitting")
    extract.add_argument("--out", required=True, help="output folder (unit and duration sidecars, dict.txt)")
    extract.add_argument("--k", type=int, default=100, help="number of units (1000 at base/large)")
    extract.add_argument("--sample-fraction", type=float, default=0.1, help="fraction of utterances to fit on")
    extract.add_argument("--seed", type=int, default=0)
    extract.add_argument("--norm", choices=FEATURE_NORMS, default="utterance-cosine", help=NORM_HELP)
    extract.add_argument("--noise-snr", type=float, metavar="DB", help="mix noise into the audio at this SNR (dB)")
    extract.add_argument("--noise-type", choices=NOISE_TYPES, default="babble", help="noise of --noise-snr")
    extract.add_argument("--device", default="auto", help="cpu, cuda or auto")
    extract.add_argument("--quiet", action="store_true", help="no progress bars")
    extract.set_defaults(handler=_extract)
