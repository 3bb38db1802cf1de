"""Recognition accuracy per input modality: a mutual-learning checkpoint on a split, fed A, V and AV.

    python -m evaluation.recognition --checkpoint runs/mutual_learning/tiny/last.ckpt \\
        --shards 'data/demo/sentences/test-*.tar' --out runs/eval/recognition

Word classification checkpoints (``task: words``) are scored with word accuracy, sentence checkpoints (``task:
sentences``, greedy CTC) with corpus WER and CER. The table has one row per input (A: audio only, V: lips only,
AV: both; by default those the checkpoint was trained on) and, with ``--languages en es fr``, one more per input
and language; it is written as ``OUT/recognition.md`` and ``OUT/recognition.csv``.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Iterable, Sequence
from pathlib import Path

import torch
from torchmetrics import Metric

from av2av_lightning.data.batching import IGNORE_INDEX, AVBatch
from av2av_lightning.data.datamodule import AVDataModule
from av2av_lightning.data.pipeline import resolve_shards
from av2av_lightning.metrics import CharErrorRate, WordAccuracy, WordErrorRate
from av2av_lightning.mutual_learning import INPUTS as MODULE_INPUTS
from av2av_lightning.mutual_learning import CrossModalMutualLearning
from av2av_lightning.transcribers import Recogniser, load_recogniser
from evaluation.tables import write_table

INPUTS = {"A": MODULE_INPUTS["audio"], "V": MODULE_INPUTS["video"], "AV": MODULE_INPUTS["av"]}  # (audio, video)
KINDS = {"words": "word", "sentences": "sentence"}


def recognition_metrics(task: str) -> dict[str, Metric]:
    if task == "words":
        return {"accuracy": WordAccuracy()}
    return {"wer": WordErrorRate(), "cer": CharErrorRate()}


def split_batches(
    shards: str | list[str],
    recogniser: Recogniser,
    max_frames: int = 1000,
    languages: list[str] | None = None,
    **noise,
) -> Iterable[AVBatch]:
    """The split's batches (of ``languages`` only, when given) as the recogniser was trained to see them (its task's
    kind, a word classifier's words only, its feature window), with ``noise`` options of `AVDataModule`
    (``noise_prob``, ``noise_snr_db``, ``noise_types``) applied to it."""
    task = recogniser.module.hparams.task
    data = AVDataModule(
        test_shards=shards,
        max_frames=max_frames,
        num_workers=0,
        kinds=[KINDS[task]],
        words=recogniser.module.words if task == "words" else None,
        window=recogniser.window,
        languages=languages,
        noise_splits=("test",),
        **noise,
    )
    return data.test_dataloader()


def check_inputs(module: CrossModalMutualLearning, inputs: Sequence[str] | None) -> list[str]:
    """``inputs`` (None: every trained input), each a known input the module was trained for."""
    unknown = sorted(set(inputs or ()) - set(INPUTS))
    if unknown:
        raise ValueError(f"unknown inputs {unknown}; expected some of {', '.join(INPUTS)}")
    trained = [name for name, (audio, video) in INPUTS.items() if module.trained_for(audio, video)]
    untrained = [name for name in inputs or () if name not in trained]
    if untrained:
        raise ValueError(f"input {untrained[0]}: the checkpoint was trained on {' and '.join(module.modalities)} only")
    return trained if inputs is None else list(inputs)


@torch.no_grad()
def evaluate(
    module: CrossModalMutualLearning, batches: Iterable[AVBatch], inputs: Sequence[str] | None = None
) -> dict[str, dict[str, float]]:
    """``input -> {"utterances": n, metric: value}``: word accuracy or corpus WER/CER over all batches, for
    ``inputs`` (None: every input the module was trained on)."""
    inputs = check_inputs(module, inputs)
    task = module.hparams.task
    metrics = {name: recognition_metrics(task) for name in inputs}
    utterances = 0
    for batch in batches:
        batch = batch.to(module.device)
        utterances += len(batch)
        for name in inputs:
            audio, video = INPUTS[name]
            log_probs, _ = module.recognise(module.features(batch, audio, video), batch.padding_mask)
            update(module, metrics[name], log_probs, batch)
    results = {}
    for name, named in metrics.items():
        scores = {key: float(value) for metric in named.values() for key, value in metric.compute().items()}
        results[name] = {"utterances": utterances} | {_column(key): value for key, value in scores.items()}
    return results


def update(module: CrossModalMutualLearning, metrics: dict[str, Metric], log_probs: torch.Tensor, batch: AVBatch):
    """Score one batch's predictions: argmax word (unknown words skipped) or greedy CTC transcript."""
    if module.hparams.task == "words":
        targets = module.word_targets(batch)
        known = targets != IGNORE_INDEX
        if known.any():
            metrics["accuracy"].update(log_probs[known], targets[known])
        return
    hypotheses = module.greedy_decode(log_probs, batch.lengths)
    references = [meta.text for meta in batch.meta]
    for metric in metrics.values():
        metric.update(references, pred_text=hypotheses)


def _column(key: str) -> str:
    return "accuracy" if key == "word_accuracy" else key


def table_rows(results: dict[str, dict[str, float]], **fixed: str | float) -> list[dict[str, str | int | float]]:
    """One row per input, with ``fixed`` columns (noise, SNR) first."""
    return [{**fixed, "input": name, **scores} for name, scores in results.items()]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The options every recognition evaluation shares."""
    parser.add_argument("--checkpoint", required=True, type=Path, help="a mutual-learning checkpoint (words/sentences)")
    parser.add_argument("--shards", required=True, nargs="+", help="shards of the split to evaluate")
    parser.add_argument("--out", required=True, type=Path, help="folder of the table")
    parser.add_argument("--vocab", type=Path, help="word list / sentencepiece model, if it moved since training")
    parser.add_argument(
        "--inputs", nargs="+", choices=list(INPUTS), help="default: those the checkpoint was trained on"
    )
    parser.add_argument("--max-frames", type=int, default=1000, help="frame budget per batch")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")


def load(args: argparse.Namespace) -> Recogniser:
    """The recogniser on its device, after checking that the shards exist (bad input fails before any work)."""
    resolve_shards(args.shards)
    recogniser = load_recogniser(args.checkpoint, vocab=args.vocab)
    check_inputs(recogniser.module, args.inputs)
    recogniser.module.to(args.device)
    return recogniser


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_arguments(parser)
    parser.add_argument("--languages", nargs="+", help="also a row per input for each of these languages")
    args = parser.parse_args(argv)
    try:
        recogniser = load(args)
    except (FileNotFoundError, ValueError) as err:
        print(f"recognition: error: {err}", file=sys.stderr)
        return 2
    rows = []
    for lang in [None, *(args.languages or [])]:
        batches = split_batches(args.shards, recogniser, args.max_frames, languages=[lang] if lang else None)
        results = evaluate(recogniser.module, batches, args.inputs)
        rows += table_rows(results, **({"lang": lang or "all"} if args.languages else {}))
    print(write_table(rows, args.out, "recognition"))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
