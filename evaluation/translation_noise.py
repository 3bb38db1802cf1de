"""Translation under noise: the audio-unit translator fed source units from AV, A and V input, clean and noisy.

    python -m evaluation.translation_noise --encoder runs/demo/pretrain/last.ckpt \\
        --quantizer runs/demo/units/audio/kmeans.npz --translator runs/demo/translation/last.ckpt \\
        --label 'test=data/demo/sentences/test-*.tar' --label 'test_unseen=data/demo/sentences/test_unseen-*.tar' \\
        --out runs/eval/translation_noise

The translator was trained on units from audio-only input. For every split, input (``av``, ``audio``, ``video``)
and SNR (``clean`` and dB values; babble noise by default) the source units are extracted with the quantizer the
translator's training units were made with, translated (`UnitTranslation` validation: beam search) and scored
against the reference target units (clean audio): unit BLEU and unit edit distance overall, then unit BLEU per
direction. The ``shuffled`` input is the chance control: every sentence's clean audio units swapped for those of
another sentence of the same language, so what it scores comes from the translator's model of the target language
alone, and an input is only informative by how far it stays above it. Noise is mixed into the audio per sample key (`WaveNoise`), so A and AV hear the same noise; video-only
input hears none, so its clean units serve every SNR (its rows say noise ``none``).

Units are cached as ``OUT/units/CONDITION/SPLIT.units.npz``: a rerun extracts only what is missing or was made from
another source (the source spec in the sidecar header differs). Written: ``OUT/translation_noise.md`` and ``.csv``
(one row per split, input and SNR) and ``OUT/translation_noise.png`` (unit BLEU against SNR, one line per input,
one panel per split, clean drawn at the right).
"""

from __future__ import annotations

import argparse
import math
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import lightning as L
import numpy as np
from tqdm import tqdm

from av2av_lightning.checkpoints import expect_stage, load_checkpoint, load_encoder, recorded_init_args
from av2av_lightning.data.noise import NOISE_TYPES
from av2av_lightning.data.pipeline import resolve_shards
from av2av_lightning.data.sidecar import Sidecar, SidecarWriter, read_header
from av2av_lightning.data.unit_pairs import UnitPairDataModule
from av2av_lightning.models.avhubert import AVHubert
from av2av_lightning.translation import UnitTranslation
from data_prep.clustering.cli import parse_splits, resolve_device
from data_prep.clustering.kmeans import (
    MODALITIES,
    FeatureSource,
    KMeansQuantizer,
    WaveNoise,
    iter_metas,
    model_layer_source,
)
from data_prep.units import extract_units
from evaluation.tables import save_figure, write_table

SHUFFLED = "shuffled"
INPUTS = (*MODALITIES, SHUFFLED)  # av, audio, video and the chance control
SNRS = ("clean", "0", "-5")
NAME = "translation_noise"

Row = dict[str, str | int | float]

__all__ = ["INPUTS", "SHUFFLED", "SNRS", "Evaluator", "load_evaluator", "load_translation", "main", "parse_snr", "plot"]


def parse_snr(value: str | float | None) -> float | None:
    """``clean`` (None) or a finite SNR in dB."""
    if value is None or str(value).strip().lower() == "clean":
        return None
    try:
        snr = float(value)
    except ValueError:
        raise ValueError(f"SNR {value!r} is not a number of dB or 'clean'") from None
    if not math.isfinite(snr):
        raise ValueError(f"SNR {value!r} is not a finite number of dB (use 'clean' for no noise)")
    return snr


def load_translation(path: str | Path, beam_size: int | None = None) -> UnitTranslation:
    """The `UnitTranslation` of a checkpoint (``weights_only``), rebuilt from its hyperparameters, in eval mode;
    ``beam_size`` replaces the validation beam (1: greedy)."""
    checkpoint = load_checkpoint(path)
    expect_stage(checkpoint, "translation", path)
    args = recorded_init_args(checkpoint, UnitTranslation)
    args["translator"] = checkpoint["translator_config"]  # the configuration as trained, whatever the preset
    if beam_size is not None:
        if beam_size < 1:
            raise ValueError(f"beam size must be at least 1, got {beam_size}")
        args["beam_size"] = beam_size
    module = UnitTranslation(**args)
    module.load_state_dict(checkpoint["state_dict"])
    return module.eval()


@dataclass
class Evaluator:
    """An encoder layer and its quantizer (the translator's units), the translator, where they run."""

    encoder: AVHubert
    encoder_path: str
    layer: int
    quantizer: KMeansQuantizer
    translation: UnitTranslation
    device: str = "cpu"
    batch_size: int = 32
    batch_frames: int = 2000
    progress: bool = True

    def source(self, modality: str, snr: float | None, noise_type: str) -> FeatureSource:
        noise = None if snr is None else WaveNoise(snr, noise_type)
        return model_layer_source(
            self.encoder, self.layer, self.encoder_path, modality, self.batch_frames, self.device, noise
        )

    def units(self, split: str, shards, source: FeatureSource, out: Path) -> Path:
        """The split's unit sidecar from ``source``: cached when its header names the same source."""
        noise = source.noise
        condition = source.spec["modality"] + ("_clean" if noise is None else f"_{noise.kind}_{noise.snr_db:g}dB")
        folder = out / "units" / condition
        path = folder / f"{split}.units.npz"
        if path.is_file() and read_header(path).get("source") == source.spec:
            return path
        extract_units(shards, source, self.quantizer, folder, split, self.progress)
        return path

    def shuffled(self, split: str, shards, reference: Path, out: Path) -> Path:
        """The chance control's sidecar: each sentence gets the ``reference`` units of the next sentence of its
        language in a seeded permutation (a rotation, so never its own), rebuilt when the reference changed."""
        path = out / "units" / SHUFFLED / f"{split}.units.npz"
        source = {"control": SHUFFLED, "reference": read_header(reference).get("source")}
        if path.is_file() and read_header(path).get("source") == source:
            return path
        units = Sidecar.load(reference)
        by_language: dict[str, list[str]] = {}
        for meta in iter_metas(shards):
            if meta.key in units:
                by_language.setdefault(meta.lang, []).append(meta.key)
        writer = SidecarWriter(path, units.name, units.rate, units.dtype, source=source)
        rng = np.random.default_rng(0)
        for keys in by_language.values():
            if len(keys) < 2:
                raise ValueError(f"{split}: the shuffled control needs two sentences per language, got {keys}")
            order = [keys[i] for i in rng.permutation(len(keys))]
            for key, other in zip(order, order[1:] + order[:1]):
                writer.add(key, units[other])
        return writer.close()

    def score(self, shards, source_units: Path, target_units: Path) -> tuple[int, dict[str, float]]:
        """Translate every sentence pair of the shards; the number of pairs and the validation metrics."""
        data = UnitPairDataModule(
            val_shards=shards,
            val_units=str(source_units),
            val_target_units=str(target_units),
            languages=list(self.translation.config.languages),
            batch_size=self.batch_size,
        )
        trainer = L.Trainer(
            accelerator="gpu" if str(self.device).startswith("cuda") else "cpu",
            devices=1,
            logger=False,
            enable_checkpointing=False,
            enable_model_summary=False,
            enable_progress_bar=self.progress,
        )
        metrics = trainer.validate(self.translation, datamodule=data, verbose=False)[0]
        return len(data.datasets["val"]), {key: float(value) for key, value in metrics.items()}

    def run(
        self,
        splits: dict[str, str | list[str]],
        out: Path,
        inputs: Sequence[str] = INPUTS,
        snrs: Sequence[str | float | None] = SNRS,
        noise_type: str = "babble",
    ) -> list[Row]:
        """Rows ``{split, input, snr, noise, pairs, unit_bleu, unit_edit, unit_bleu_SRC-TGT...}``, split by split,
        input by input, SNR by SNR."""
        unknown = [name for name in inputs if name not in INPUTS]
        if unknown or not inputs:
            raise ValueError(f"unknown inputs {unknown or list(inputs)}; expected some of {', '.join(INPUTS)}")
        if noise_type not in NOISE_TYPES:
            raise ValueError(f"noise type must be one of {', '.join(NOISE_TYPES)}, got {noise_type!r}")
        levels = [parse_snr(snr) for snr in snrs]
        if not levels:
            raise ValueError("no SNR to evaluate: give 'clean' and/or dB values")
        for shards in splits.values():
            resolve_shards(shards)
        out = Path(out)
        conditions = [(split, name, snr) for split in splits for name in inputs for snr in levels]
        results = []
        scored: dict[Path, tuple[int, dict[str, float]]] = {}  # inputs without audio hear no noise: scored once
        for split, name, snr in tqdm(conditions, desc="conditions", unit="run", disable=not self.progress):
            reference = self.units(split, splits[split], self.source("audio", None, noise_type), out)
            if name == SHUFFLED:
                units, noise = self.shuffled(split, splits[split], reference, out), "none"
            else:
                source = self.source(name, snr, noise_type)
                units = self.units(split, splits[split], source, out)
                noise = "none" if source.noise is None else source.noise.kind
            if units not in scored:
                scored[units] = self.score(splits[split], units, reference)
            pairs, metrics = scored[units]
            results.append(({"split": split, "input": name, "snr": _snr(snr), "noise": noise, "pairs": pairs}, metrics))
        return table_rows(results, self.translation.directions())


def _snr(value: float | None) -> str | int | float:
    """``clean``, or whole dB as an int so the table reads -5, not -5.0000."""
    if value is None:
        return "clean"
    return int(value) if float(value).is_integer() else float(value)


def table_rows(results: list[tuple[Row, dict[str, float]]], directions: Sequence[str]) -> list[Row]:
    """Unit BLEU and edit distance overall, then unit BLEU of every direction any row has (NaN where absent)."""
    seen = [d for d in directions if any(f"val/unit_bleu_{d}" in metrics for _, metrics in results)]
    rows = []
    for fixed, metrics in results:
        scores = {"unit_bleu": metrics["val/unit_bleu"], "unit_edit": metrics["val/unit_edit"]}
        scores |= {f"unit_bleu_{d}": metrics.get(f"val/unit_bleu_{d}", math.nan) for d in seen}
        rows.append({**fixed, **scores})
    return rows


def load_evaluator(
    encoder: str | Path,
    quantizer: str | Path,
    translator: str | Path,
    layer: int | None = None,
    beam_size: int | None = None,
    device: str = "auto",
    **options,
) -> Evaluator:
    """Load and cross-check the three files: the quantizer must fit the encoder's layer features and the
    translator's unit inventory; ``layer`` defaults to the one the quantizer's header names."""
    model = load_encoder(encoder)
    units = KMeansQuantizer.load(quantizer)
    translation = load_translation(translator, beam_size)
    dim = model.config.embed_dim
    if units.dim != dim:
        raise ValueError(
            f"{quantizer}: a quantizer of {units.dim}-dim features, but the encoder of {encoder} has {dim}-dim layers"
        )
    known = translation.config.num_units
    if units.k > known:
        raise ValueError(f"{quantizer}: {units.k} units, but the translator of {translator} knows {known}")
    layer = units.spec.get("layer") if layer is None else layer
    if not isinstance(layer, int) or not 1 <= layer <= model.config.layers:
        raise ValueError(
            f"{quantizer}: layer {layer!r} is not one of the encoder's 1..{model.config.layers} (give --layer)"
        )
    device = resolve_device(device)
    return Evaluator(model, str(encoder), layer, units, translation.to(device), device, **options)


def plot(rows: list[Row], path: Path) -> Path:
    """Unit BLEU against SNR, one line per input and one panel per split; clean at the right of the noisy SNRs."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    splits = list(dict.fromkeys(row["split"] for row in rows))
    inputs = list(dict.fromkeys(row["input"] for row in rows))
    noisy = sorted({row["snr"] for row in rows if row["snr"] != "clean"})
    positions = {snr: float(snr) for snr in noisy}
    if any(row["snr"] == "clean" for row in rows):
        step = min((b - a for a, b in zip(noisy, noisy[1:])), default=5)
        positions["clean"] = noisy[-1] + step if noisy else 0.0
    figure, axes = plt.subplots(1, len(splits), figsize=(5 * len(splits), 4), sharey=True, squeeze=False)
    for axis, split in zip(axes[0], splits):
        for index, name in enumerate(inputs):
            mine = [row for row in rows if row["split"] == split and row["input"] == name]
            points = sorted((positions[row["snr"]], row["unit_bleu"]) for row in mine)
            axis.plot(*zip(*points), marker="o", color=f"C{index}", label=name)
        axis.set_xticks(list(positions.values()), [str(snr) for snr in positions])
        axis.set(title=split, xlabel="SNR (dB)", ylabel="unit BLEU")
        axis.grid(alpha=0.3)
        axis.legend(title="input")
    return save_figure(figure, path)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--encoder", required=True, type=Path, help="pretraining or mutual-learning checkpoint")
    parser.add_argument("--quantizer", required=True, type=Path, help="kmeans.npz the translator's units came from")
    parser.add_argument("--layer", type=int, help="encoder layer (default: the quantizer's)")
    parser.add_argument("--translator", required=True, type=Path, help="a UnitTranslation checkpoint")
    parser.add_argument(
        "--label", action="append", required=True, metavar="NAME=PATTERN", help="split to evaluate (repeatable)"
    )
    parser.add_argument("--out", required=True, type=Path, help="folder of the table, plot and cached units")
    parser.add_argument("--inputs", nargs="+", default=list(INPUTS), help=f"some of {', '.join(INPUTS)}")
    parser.add_argument("--snrs", nargs="+", default=list(SNRS), help="'clean' and/or SNRs in dB")
    parser.add_argument("--noise-type", default="babble", help=f"one of {', '.join(NOISE_TYPES)}")
    parser.add_argument("--beam-size", type=int, help="decoding beam (default: the checkpoint's; 1: greedy)")
    parser.add_argument("--batch-size", type=int, default=32, help="sentence pairs per decoding batch")
    parser.add_argument("--device", default="auto", help="cpu, cuda or auto")
    parser.add_argument("--quiet", action="store_true", help="no progress bars")
    args = parser.parse_args(argv)
    try:
        splits = parse_splits(args.label, [])
        evaluator = load_evaluator(
            args.encoder,
            args.quantizer,
            args.translator,
            args.layer,
            args.beam_size,
            args.device,
            batch_size=args.batch_size,
            progress=not args.quiet,
        )
        rows = evaluator.run(splits, args.out, args.inputs, args.snrs, args.noise_type)
    except (FileNotFoundError, ValueError) as err:
        print(f"{NAME}: error: {err}", file=sys.stderr)
        return 2
    print(write_table(rows, args.out, NAME))
    print(f"plot: {plot(rows, args.out / f'{NAME}.png')}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
