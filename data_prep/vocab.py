"""Vocabularies of the recognition tasks, fixed before training so every run maps labels to the same ids.

- word classification (LRW style): the most frequent word labels of the training clips, one
  ``lang/label`` per line in class-id order (``av2av vocab words``);
- sentence recognition (CTC): a sentencepiece model trained on the training transcripts of
  every language (``av2av vocab spm``).
"""

from __future__ import annotations

import argparse
from collections import Counter
from pathlib import Path


def word_key(lang: str, label: str) -> str:
    """One class per word and language: 'tomate' in Spanish and in French are different sounds."""
    return f"{lang}/{label}"


def count_words(shards) -> Counter:
    from data_prep.clustering.kmeans import iter_metas

    return Counter(word_key(m.lang, m.label) for m in iter_metas(shards) if m.kind == "word" and m.label)


def top_words(counts: Counter, per_language: int, min_count: int = 1) -> list[str]:
    """The ``per_language`` most frequent words of each language with at least ``min_count`` clips, sorted."""
    by_language: dict[str, list[tuple[int, str]]] = {}
    for key, count in counts.items():
        if count >= min_count:
            by_language.setdefault(key.split("/", 1)[0], []).append((-count, key))
    return sorted(key for ranked in by_language.values() for _, key in sorted(ranked)[:per_language])


def read_words(path: str | Path) -> list[str]:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no word list (make one with `av2av vocab words`)")
    words = [line.strip() for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    if not words or any("/" not in w for w in words):
        raise ValueError(f"{path}: expected one 'lang/label' per line")
    return words


def _vocab(args: argparse.Namespace) -> None:
    counts = count_words(args.shards)
    if not counts:
        raise ValueError(f"no labelled word clips in {args.shards}")
    words = top_words(counts, args.per_language, args.min_count)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text("".join(f"{w}\n" for w in words), encoding="utf-8")
    clips = sum(counts[w] for w in words)
    print(f"{args.out}: {len(words)} words covering {clips} of {sum(counts.values())} training clips")


def train_sentencepiece(shards, out: str | Path, vocab_size: int) -> Path:
    """A unigram sentencepiece model of the (lowercased) training transcripts; returns the ``.model`` path."""
    import sentencepiece as spm

    from data_prep.clustering.kmeans import iter_metas

    texts = [m.text.lower() for m in iter_metas(shards) if m.kind == "sentence" and m.text]
    if not texts:
        raise ValueError(f"no transcripts in {shards}")
    prefix = Path(out).with_suffix("")
    prefix.parent.mkdir(parents=True, exist_ok=True)
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(texts),
        model_prefix=str(prefix),
        vocab_size=vocab_size,
        model_type="unigram",
        character_coverage=1.0,
        num_threads=1,  # deterministic
        minloglevel=2,
    )
    return prefix.with_suffix(".model")


def _spm(args: argparse.Namespace) -> None:
    path = train_sentencepiece(args.shards, args.out, args.vocab_size)
    print(f"{path}: sentencepiece unigram model with {args.vocab_size} pieces")


def add_arguments(commands) -> None:
    vocab = commands.add_parser("vocab", help="word lists and sentencepiece models for the recognition tasks")
    actions = vocab.add_subparsers(dest="vocab_command", required=True, metavar="ACTION")
    words = actions.add_parser("words", help="the most frequent word labels of training word clips")
    words.add_argument("--shards", action="append", required=True, help="training word-clip shards (repeatable)")
    words.add_argument("--per-language", type=int, default=50, help="words kept per language")
    words.add_argument("--min-count", type=int, default=10, help="fewest training clips a kept word has")
    words.add_argument("--out", required=True, help="word list file (one lang/label per line)")
    words.set_defaults(handler=_vocab)
    pieces = actions.add_parser("spm", help="a sentencepiece model of the training transcripts")
    pieces.add_argument("--shards", action="append", required=True, help="training sentence shards (repeatable)")
    pieces.add_argument("--vocab-size", type=int, default=256, help="number of pieces")
    pieces.add_argument("--out", required=True, help="model file (.model)")
    pieces.set_defaults(handler=_spm)
