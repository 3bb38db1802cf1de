"""Evidence for cross-modal mutual learning: do audio and lips describe a word with the same basis vectors?

    python -m evaluation.mutual_learning_analysis --checkpoint runs/.../full.ckpt \\
        --baseline-checkpoint runs/.../codebook.ckpt --pretrained runs/pretrain/tiny/iter1/last.ckpt \\
        --shards 'data/demo/words/valid-*.tar' --out runs/eval/mutual_learning [--wandb PROJECT]

On a split of word clips, a words-task mutual-learning checkpoint (and a baseline trained without alignment) gives:

- ``basis_weights.png``: the top-30 basis weights of one word (``--word``, default the split's most frequent),
  mean over its clips' valid frames, from audio input next to visual input;
- ``basis_pca.png``: a 2-D PCA of the codebook's basis vectors with the vector each word selects (highest mean
  weight above the split's mean) for words that sound alike and for words that do not. *Sound alike* is measured on the corpus's phoneme
  transcriptions (a word's phonemes are those inside its span in the clip metadata): the pairs of words with the
  smallest non-zero phoneme edit distance (Levenshtein / length of the longer word; homophones are left out) sound
  alike, the pairs with the largest do not, each word in at most one pair of a group;
- ``mutual_learning.md|csv``: per checkpoint, word accuracy from audio and from video, the mean symmetric KL between
  the audio and the visual basis weights of the same clip (`symmetric_kl` over all valid frames), and how often a
  pair shares its selected basis vector (alike vs not alike);
- ``unit_agreement.md|csv`` (with ``--pretrained``): k-means fitted on a layer's audio-visual features, then the
  fraction of frames where audio-only and video-only input get the same cluster, for the aligned encoder against
  the pretrained one.

With ``--wandb PROJECT`` the figures and tables go to a W&B run too (offline unless ``WANDB_MODE`` says otherwise).
"""

from __future__ import annotations

import argparse
import itertools
import math
import os
import sys
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from av2av_lightning.checkpoints import load_encoder
from av2av_lightning.data.batching import AVBatch
from av2av_lightning.data.pipeline import resolve_shards
from av2av_lightning.data.schema import SampleMeta
from av2av_lightning.models.avhubert import AVHubert
from av2av_lightning.models.codebook import symmetric_kl
from av2av_lightning.mutual_learning import CrossModalMutualLearning
from av2av_lightning.transcribers import load_recogniser
from data_prep.clustering.kmeans import extract_features, fit_on_shards, model_layer_source
from data_prep.clustering.unit_quality import agreement
from data_prep.corpus.word_clips import spoken_form
from data_prep.vocab import word_key
from evaluation.recognition import recognition_metrics, split_batches, update
from evaluation.tables import Cell, save_figure, write_table

TOP_BASIS = 30
Pair = tuple[str, str]

# ---------------------------------------------------------------------------- words that sound alike


def word_phonemes(meta: SampleMeta) -> tuple[str, ...]:
    """The phonemes of a clip's labelled word: those whose middle lies in the word's span (the occurrence nearest
    the clip centre, as the clip was cut around it); empty when the metadata has no such word."""
    spans = [(start, end) for word, start, end in meta.words if spoken_form(word) == (meta.label or "").lower()]
    if not spans:
        return ()
    centre = meta.num_frames / 25 / 2
    start, end = min(spans, key=lambda span: abs((span[0] + span[1]) / 2 - centre))
    return tuple(label for label, lo, hi in meta.phonemes if start <= (lo + hi) / 2 < end)


def transcriptions(metas: Iterable[SampleMeta]) -> dict[str, tuple[str, ...]]:
    """``lang/label`` -> the word's most frequent phoneme sequence over its clips (edge clips may cut a phoneme)."""
    counts: dict[str, Counter] = {}
    for meta in metas:
        phonemes = word_phonemes(meta)
        if phonemes:
            counts.setdefault(word_key(meta.lang, meta.label or ""), Counter())[phonemes] += 1
    return {word: counter.most_common(1)[0][0] for word, counter in counts.items()}


def edit_distance(first: Sequence[str], second: Sequence[str]) -> int:
    """Levenshtein distance between two phoneme sequences (insertions, deletions, substitutions cost 1)."""
    previous = list(range(len(second) + 1))
    for i, a in enumerate(first, 1):
        current = [i]
        for j, b in enumerate(second, 1):
            current.append(min(previous[j] + 1, current[j - 1] + 1, previous[j - 1] + (a != b)))
        previous = current
    return previous[-1]


def phoneme_distance(first: Sequence[str], second: Sequence[str]) -> float:
    """Edit distance over the longer length: 0 for the same phonemes, 1 for nothing in common."""
    return edit_distance(first, second) / max(len(first), len(second), 1)


def sound_alike_pairs(words: dict[str, Sequence[str]], count: int) -> tuple[list[Pair], list[Pair]]:
    """Up to ``count`` pairs with the smallest phoneme distance (sound alike) and up to ``count`` with the largest
    (do not). Homophones (distance 0: one sound, nothing to compare) are left out, each word is in at most one
    pair of a group and ties go by name, so the choice is stable and not one word paired with all others."""
    pairs = itertools.combinations(sorted(words), 2)
    distances = {pair: phoneme_distance(words[pair[0]], words[pair[1]]) for pair in pairs}
    distances = {pair: distance for pair, distance in distances.items() if distance > 0}
    if not distances:
        raise ValueError(f"need at least 2 words with different phoneme transcriptions to pair, got {len(words)}")
    alike = _disjoint(sorted(distances, key=lambda pair: (distances[pair], pair)), count)
    unlike = _disjoint(sorted(distances, key=lambda pair: (-distances[pair], pair)), count)
    return alike, unlike


def _disjoint(ranked: list[Pair], count: int) -> list[Pair]:
    """The first ``count`` pairs of ``ranked`` whose words are not in an earlier chosen pair."""
    chosen: list[Pair] = []
    used: set[str] = set()
    for pair in ranked:
        if len(chosen) == count:
            break
        if not used & set(pair):
            chosen.append(pair)
            used |= set(pair)
    return chosen


# ---------------------------------------------------------------------------- one checkpoint on a split


@dataclass
class WeightStats:
    """Basis weights and scores of one checkpoint on a split, accumulated over batches.

    ``weights[modality][word]`` is the sum of the basis weights over the word's valid frames, ``frames[word]`` their
    number; ``kl_sum`` / ``kl_frames`` give the mean symmetric KL between the audio and visual weights per frame.
    """

    weights: dict[str, dict[str, np.ndarray]] = field(default_factory=lambda: {"audio": {}, "video": {}})
    frames: Counter = field(default_factory=Counter)
    clips: Counter = field(default_factory=Counter)
    kl_sum: float = 0.0
    kl_frames: int = 0
    accuracy: dict[str, float] = field(default_factory=dict)
    metas: list[SampleMeta] = field(default_factory=list)

    @property
    def symmetric_kl(self) -> float:
        return self.kl_sum / self.kl_frames if self.kl_frames else math.nan

    def mean_weights(self, word: str, modality: str) -> np.ndarray:
        return self.weights[modality][word] / self.frames[word]

    def both(self, word: str) -> np.ndarray:
        """Mean weights from audio plus those from video."""
        return self.mean_weights(word, "audio") + self.mean_weights(word, "video")

    def selected_basis(self, word: str) -> int:
        """The basis vector a word selects: highest mean weight (both modalities) above that of the whole split.

        The plain argmax is the same for every word when one vector carries weight everywhere (seen on the 200-step
        demo checkpoint), so it would say nothing about the word.
        """
        overall = sum(self.both(w) * self.frames[w] for w in self.frames) / sum(self.frames.values())
        return int(np.argmax(self.both(word) - overall))


@torch.no_grad()
def analyse(module: CrossModalMutualLearning, batches: Iterable[AVBatch]) -> WeightStats:
    """One pass over the split feeding audio only and video only: word accuracy per input and, with a codebook,
    the basis weights per word and the audio-visual symmetric KL."""
    if module.hparams.task != "words":
        raise ValueError(f"the analysis needs a words-task checkpoint, got task {module.hparams.task!r}")
    stats = WeightStats()
    metrics = {name: recognition_metrics("words") for name in ("audio", "video")}
    for batch in batches:
        batch = batch.to(module.device)
        log_weights = {}
        for name, inputs in (("audio", (True, False)), ("video", (False, True))):
            log_probs, log_weights[name] = module.recognise(module.features(batch, *inputs), batch.padding_mask)
            update(module, metrics[name], log_probs, batch)
        stats.metas += batch.meta
        if module.codebook is not None:
            add_weights(stats, log_weights["audio"], log_weights["video"], batch)
    stats.accuracy = {name: float(named["accuracy"].compute()["word_accuracy"]) for name, named in metrics.items()}
    return stats


def add_weights(stats: WeightStats, log_audio: Tensor, log_video: Tensor, batch: AVBatch) -> None:
    valid = ~batch.padding_mask
    frames = int(valid.sum())
    stats.kl_sum += float(symmetric_kl(log_audio, log_video, valid)) * frames
    stats.kl_frames += frames
    for modality, log_weights in (("audio", log_audio), ("video", log_video)):
        summed = (log_weights.exp() * valid.unsqueeze(-1)).sum(1).double().cpu().numpy()
        for row, meta in zip(summed, batch.meta):
            word = word_key(meta.lang, meta.label or "")
            stats.weights[modality][word] = stats.weights[modality].get(word, 0.0) + row
    for length, meta in zip(valid.sum(1).tolist(), batch.meta):
        stats.frames[word_key(meta.lang, meta.label or "")] += length
        stats.clips[word_key(meta.lang, meta.label or "")] += 1


def shared_basis_rate(stats: WeightStats, pairs: list[Pair]) -> float:
    """Fraction of pairs whose two words select the same basis vector."""
    return float(np.mean([stats.selected_basis(a) == stats.selected_basis(b) for a, b in pairs]))


# ---------------------------------------------------------------------------- figures


def plot_basis_weights(stats: WeightStats, word: str, path: Path, top: int = TOP_BASIS) -> Path:
    """Two panels, audio and video, with the same ``top`` basis vectors (by mean weight over both) in order."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    audio, video = stats.mean_weights(word, "audio"), stats.mean_weights(word, "video")
    order = np.argsort(-stats.both(word), kind="stable")[:top]
    figure, axes = plt.subplots(1, 2, figsize=(12, 3.8), sharey=True)
    for axis, name, weights, colour in ((axes[0], "audio", audio, "C0"), (axes[1], "video", video, "C1")):
        axis.bar(range(len(order)), weights[order], color=colour)
        axis.set_xticks(range(len(order)), [str(i) for i in order], rotation=90, fontsize=7)
        axis.set(title=f"{name} input", xlabel="basis vector", ylabel="mean weight")
        axis.grid(axis="y", alpha=0.3)
    figure.suptitle(f"top-{len(order)} basis weights of '{word}' ({stats.clips[word]} clips)")
    return _save(figure, path)


def plot_basis_pca(
    basis: np.ndarray, stats: WeightStats, groups: dict[str, list[Pair]], words: dict[str, Sequence[str]], path: Path
) -> Path:
    """The basis vectors in their first two principal components, one panel per group of word pairs; each pair's
    selected basis vectors are marked in one colour and joined by a line."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    points = pca_2d(basis)
    figure, axes = plt.subplots(1, len(groups), figsize=(6.5 * len(groups), 5.5), sharex=True, sharey=True)
    for axis, (title, pairs) in zip(np.atleast_1d(axes), groups.items()):
        axis.scatter(points[:, 0], points[:, 1], s=12, color="0.8", label="basis vectors")
        labels: dict[int, list[str]] = {}  # one note per selected vector, listing every word that selected it
        for index, pair in enumerate(pairs):
            selected = [stats.selected_basis(word) for word in pair]
            xy = points[selected]
            axis.plot(xy[:, 0], xy[:, 1], "-o", color=f"C{index % 10}", markersize=7, linewidth=1)
            for word, basis_index in zip(pair, selected):
                labels.setdefault(basis_index, []).append(f"{word} /{''.join(words[word])}/")
        for basis_index, names in labels.items():
            note = "\n".join(dict.fromkeys(names))
            axis.annotate(note, tuple(points[basis_index]), fontsize=7, xytext=(4, 4), textcoords="offset points")
        axis.set(title=title, xlabel="PC 1", ylabel="PC 2")
        axis.grid(alpha=0.3)
    figure.suptitle("codebook basis vectors selected by word pairs (PCA)")
    return _save(figure, path)


def pca_2d(vectors: np.ndarray) -> np.ndarray:
    """``[N, D] -> [N, 2]``: coordinates on the two directions of largest variance."""
    centred = vectors - vectors.mean(0, keepdims=True)
    _, _, components = np.linalg.svd(centred, full_matrices=False)
    return centred @ components[:2].T


def _save(figure, path: Path) -> Path:

    return save_figure(figure, path, dpi=110)


# ---------------------------------------------------------------------------- unit agreement


def unit_agreement(
    encoder: AVHubert,
    shards: str | list[str],
    layer: int,
    k: int,
    sample_fraction: float = 1.0,
    seed: int = 0,
    inputs: tuple[str, str] = ("audio", "video"),
    device: str = "cpu",
) -> float:
    """k-means fitted on the layer's audio-visual features, then the fraction of frames where the two ``inputs``
    (``audio``, ``video`` or ``av``) get the same cluster."""
    fit = model_layer_source(encoder, layer, modality="av", device=device)
    quantizer = fit_on_shards(shards, fit, k, sample_fraction, seed)
    labels = []
    for modality in inputs:
        source = model_layer_source(encoder, layer, modality=modality, device=device)
        labels.append(np.concatenate([quantizer(features) for _, features in extract_features(shards, source)]))
    return agreement(*labels)


# ---------------------------------------------------------------------------- the command


def checkpoint_row(name: str, path: Path, stats: WeightStats, groups: dict[str, list[Pair]]) -> dict[str, Cell]:
    codebook = stats.kl_frames > 0
    row: dict[str, Cell] = {"model": name, "checkpoint": str(path), "clips": len(stats.metas)}
    row |= {"acc_audio": stats.accuracy["audio"], "acc_video": stats.accuracy["video"]}
    row["sym_kl_av"] = stats.symmetric_kl if codebook else "n/a (no codebook)"
    for title, pairs in groups.items():
        row[f"shared_basis_{title.replace(' ', '_')}"] = shared_basis_rate(stats, pairs) if codebook else "n/a"
    return row


def load_module(path: Path, vocab: Path | None, device: str):
    recogniser = load_recogniser(path, task="words", vocab=vocab)
    recogniser.module.to(device)
    return recogniser


def choose_word(stats: WeightStats, word: str | None) -> str:
    """The ``--word`` (``lang/label``) if given, else the word with the most clips in the split."""
    if word is None:
        return max(sorted(stats.clips), key=lambda w: stats.clips[w])
    if word not in stats.clips:
        raise ValueError(
            f"--word {word!r} has no clip in the split; expected lang/label, e.g. {next(iter(stats.clips))}"
        )
    return word


def run(args: argparse.Namespace) -> dict[str, Path]:
    """Figures and tables into ``args.out``; returns their paths by name."""
    resolve_shards(args.shards)
    recogniser = load_module(args.checkpoint, args.vocab, args.device)
    if recogniser.module.codebook is None:
        raise ValueError(f"{args.checkpoint}: a checkpoint without a codebook (codebook_size 0) has no basis weights")
    stats = analyse(recogniser.module, split_batches(args.shards, recogniser, args.max_frames))
    words = transcriptions(m for m in stats.metas if word_key(m.lang, m.label or "") in stats.frames)
    alike, unlike = sound_alike_pairs(words, args.pairs)
    for title, pairs in (("sound alike", alike), ("not alike", unlike)):
        print(f"{title}: " + ", ".join(f"{a} /{' '.join(words[a])}/ ~ {b} /{' '.join(words[b])}/" for a, b in pairs))
    groups = {"sound alike": alike, "not alike": unlike}
    word = choose_word(stats, args.word)
    outputs = {
        "basis_weights": plot_basis_weights(stats, word, args.out / "basis_weights.png"),
        "basis_pca": plot_basis_pca(
            recogniser.module.codebook.basis.detach().cpu().numpy(), stats, groups, words, args.out / "basis_pca.png"
        ),
    }
    rows = [checkpoint_row("aligned", args.checkpoint, stats, groups)]
    if args.baseline_checkpoint:
        baseline = load_module(args.baseline_checkpoint, args.vocab, args.device)
        baseline_stats = analyse(baseline.module, split_batches(args.shards, baseline, args.max_frames))
        rows.append(checkpoint_row("baseline", args.baseline_checkpoint, baseline_stats, groups))
    print(write_table(rows, args.out, "mutual_learning"))
    outputs["mutual_learning"] = args.out / "mutual_learning.md"
    if args.pretrained:
        outputs["unit_agreement"] = agreement_table(args, recogniser.module.encoder)
    if args.wandb:
        log_to_wandb(args.wandb, args.out, outputs)
    return outputs


def agreement_table(args: argparse.Namespace, aligned: AVHubert) -> Path:
    pretrained = load_encoder(args.pretrained)
    layer = args.layer or aligned.config.layers
    rows = []
    for name, path, encoder in (("aligned", args.checkpoint, aligned), ("pretrained", args.pretrained, pretrained)):
        rate = unit_agreement(encoder, args.shards, layer, args.k, args.sample_fraction, args.seed, device=args.device)
        rows.append({"encoder": name, "checkpoint": str(path), "layer": layer, "k": args.k, "agreement_a_v": rate})
    print(write_table(rows, args.out, "unit_agreement"))
    return args.out / "unit_agreement.md"


def log_to_wandb(project: str, out: Path, outputs: dict[str, Path]) -> None:
    """Figures as images and tables as W&B tables, in a run under ``OUT/wandb``; offline unless asked otherwise."""
    import csv

    import wandb

    mode = os.environ.get("WANDB_MODE", "offline")
    run = wandb.init(project=project, dir=str(out), job_type="mutual_learning_analysis", mode=mode)
    try:
        for name, path in outputs.items():
            if path.suffix == ".png":
                run.log({name: wandb.Image(str(path))})
                continue
            with open(path.with_suffix(".csv"), newline="") as handle:
                rows = list(csv.reader(handle))
            run.log({name: wandb.Table(columns=rows[0], data=rows[1:])})
    finally:
        run.finish()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--checkpoint", required=True, type=Path, help="words-task mutual-learning checkpoint")
    parser.add_argument("--baseline-checkpoint", type=Path, help="the same model trained without alignment")
    parser.add_argument("--pretrained", type=Path, help="pretraining checkpoint: also the unit agreement table")
    parser.add_argument("--shards", required=True, nargs="+", help="word clips of the split to analyse")
    parser.add_argument("--out", required=True, type=Path, help="folder of the figures and tables")
    parser.add_argument("--word", help="lang/label of the basis-weight figure (default: the most frequent)")
    parser.add_argument("--pairs", type=int, default=5, help="word pairs per group in the PCA figure")
    parser.add_argument("--vocab", type=Path, help="word list, if it moved since training")
    parser.add_argument("--layer", type=int, help="encoder layer clustered for unit agreement (default: the last)")
    parser.add_argument("--k", type=int, default=100, help="k-means clusters for unit agreement")
    parser.add_argument("--sample-fraction", type=float, default=1.0, help="fraction of clips k-means is fitted on")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--max-frames", type=int, default=1000, help="frame budget per batch")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--wandb", metavar="PROJECT", help="also log figures and tables to a W&B run")
    args = parser.parse_args(argv)
    try:
        outputs = run(args)
    except (FileNotFoundError, ValueError) as err:
        print(f"mutual_learning_analysis: error: {err}", file=sys.stderr)
        return 2
    for name, path in outputs.items():
        print(f"{name}: {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
