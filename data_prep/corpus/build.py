"""Build the embedded trilingual audio-visual corpus into WebDataset shards.

Sentences from the phrasebook grammar are spoken by eSpeak NG (one synthesiser per worker
process), a face is rendered whose lips follow the phoneme timings, and everything is
written as shards with a manifest:

    OUT/sentences/{train,valid,test,test_unseen}-NNNNNN.tar
    OUT/words/{train,valid,test,test_unseen}-NNNNNN.tar   (LRW-style word clips)
    OUT/manifest.json

Every random choice derives from the preset's seed, so the same preset gives the same corpus.
"""

from __future__ import annotations

import logging
import math
import random
import time
from collections import Counter, defaultdict
from dataclasses import asdict, dataclass, replace
from functools import lru_cache
from pathlib import Path

import numpy as np
from tqdm import tqdm

from av2av_lightning.data.codecs import encode_audio, encode_video
from av2av_lightning.data.schema import LANGUAGES, SAMPLE_RATE, SAMPLES_PER_FRAME, SampleMeta
from av2av_lightning.data.shards import sample_record, write_manifest, write_shards
from data_prep.corpus import word_clips
from data_prep.corpus.face import make_identity, render_face
from data_prep.corpus.grammar import SentenceTriple, generate_sentences, split_sentences, vocabulary
from data_prep.corpus.speakers import Speaker, make_speakers
from data_prep.corpus.speech import synthesize
from data_prep.corpus.visemes import mouth_trajectory
from data_prep.parallel import ordered_map

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class CorpusConfig:
    """Size and seed of a corpus; the presets below are the ones the tests and the demo use."""

    name: str
    train_sentences: int
    valid_sentences: int
    test_sentences: int
    speakers: int = 12
    held_out_speakers: int = 2
    seed: int = 1234
    max_per_shard: int = 200
    word_clips: bool = True


PRESETS = {
    "tiny": CorpusConfig("tiny", train_sentences=24, valid_sentences=6, test_sentences=6, max_per_shard=16),
    "demo": CorpusConfig("demo", train_sentences=2000, valid_sentences=100, test_sentences=100, max_per_shard=250),
}


@dataclass(frozen=True)
class UtteranceTask:
    """One sentence spoken by one speaker in one language, with its own render seed."""

    key: str
    split: str
    lang: str
    speaker: Speaker
    triple: SentenceTriple
    seed: int


def plan_utterances(config: CorpusConfig) -> list[UtteranceTask]:
    """Decide who says what: seen speakers for train/valid/test, held-out speakers for test_unseen."""
    rng = random.Random(config.seed)
    total = config.train_sentences + config.valid_sentences + config.test_sentences
    triples = generate_sentences(total, seed=config.seed)
    splits = split_sentences(triples, valid=config.valid_sentences, test=config.test_sentences, seed=config.seed)
    speakers = make_speakers(config.speakers, config.held_out_speakers, seed=config.seed)
    seen = [s for s in speakers if not s.held_out]
    unseen = [s for s in speakers if s.held_out] or seen
    plan = [("train", splits["train"], seen), ("valid", splits["valid"], seen), ("test", splits["test"], seen)]
    if config.held_out_speakers:
        plan.append(("test_unseen", splits["test"], unseen))
    tasks = []
    for split, split_triples, pool in plan:
        for triple in split_triples:
            for lang in LANGUAGES:
                speaker = rng.choice(pool)
                key = f"{split}-{triple.sentence_id}-{lang}-{speaker.speaker_id}"
                tasks.append(UtteranceTask(key, split, lang, speaker, triple, seed=rng.randrange(2**31)))
    return tasks


@lru_cache(maxsize=64)
def _identity(face_seed: int):
    return make_identity(face_seed)


def render_utterance(task: UtteranceTask) -> tuple[dict, list[dict], float]:
    """Speak and render one utterance; returns its shard record, its word-clip records and its duration."""
    utterance = synthesize(task.triple.texts[task.lang], task.lang, task.speaker.voice)
    num_frames = math.ceil(len(utterance.wave) / SAMPLES_PER_FRAME)
    wave = np.zeros(num_frames * SAMPLES_PER_FRAME, dtype=np.float32)
    wave[: len(utterance.wave)] = utterance.wave
    mouth = mouth_trajectory(utterance.phonemes, num_frames)
    face, lip = render_face(_identity(task.speaker.face_seed), mouth, seed=task.seed)
    meta = SampleMeta(
        key=task.key,
        split=task.split,
        lang=task.lang,
        speaker=task.speaker.speaker_id,
        text=task.triple.texts[task.lang],
        sentence_id=task.triple.sentence_id,
        num_frames=num_frames,
        phonemes=list(utterance.phonemes),
        words=list(utterance.words),
    )
    record = sample_record(task.key, meta.to_json(), encode_audio(wave), encode_video(lip), encode_video(face))
    return record, _word_clip_records(task, meta, wave, lip, face), len(wave) / SAMPLE_RATE


def _word_clip_records(task: UtteranceTask, meta: SampleMeta, wave, lip, face) -> list[dict]:
    keywords = set(task.triple.keywords[task.lang])
    records = []
    for index, (word, start, end) in enumerate(meta.words):
        label = word_clips.spoken_form(word)
        if label not in keywords:
            continue
        first = word_clips.clip_window(start, end)
        clip_meta = replace(
            meta,
            key=f"{task.key}-w{index}",
            kind="word",
            label=label,
            num_frames=word_clips.WORD_CLIP_FRAMES,
            phonemes=word_clips.shift_timings(meta.phonemes, first),
            words=word_clips.shift_timings(meta.words, first),
        )
        records.append(
            sample_record(
                clip_meta.key,
                clip_meta.to_json(),
                encode_audio(word_clips.cut_audio(wave, first)),
                encode_video(word_clips.cut_frames(lip, first)),
                encode_video(word_clips.cut_frames(face, first)),
            )
        )
    return records


def build_corpus(config: CorpusConfig, out_dir: str | Path, workers: int = 2, progress: bool = True) -> dict:
    """Generate the corpus into `out_dir` and return its manifest (also written as manifest.json)."""
    out_dir = Path(out_dir)
    started = time.monotonic()
    tasks = plan_utterances(config)
    sentences: dict[str, list[dict]] = defaultdict(list)
    words: dict[str, list[dict]] = defaultdict(list)
    seconds: Counter = Counter()
    word_seconds = word_clips.WORD_CLIP_FRAMES * SAMPLES_PER_FRAME / SAMPLE_RATE
    with ordered_map(workers, chunksize=4) as mapper:  # one eSpeak NG per worker process
        results = mapper(render_utterance, tasks)
        for task, (record, clips, duration) in tqdm(
            zip(tasks, results), total=len(tasks), desc=f"corpus {config.name}", disable=not progress, unit="utt"
        ):
            sentences[task.split].append(record)
            seconds[("sentences", task.split)] += duration
            if config.word_clips:
                words[task.split].extend(clips)
                seconds[("words", task.split)] += word_seconds * len(clips)
    manifest = {
        "name": config.name,
        "config": asdict(config),
        "languages": list(LANGUAGES),
        "sample_rate": SAMPLE_RATE,
        "fps": SAMPLE_RATE // SAMPLES_PER_FRAME,
        "speakers": [
            {"id": s.speaker_id, "held_out": s.held_out, "voice": asdict(s.voice)}
            for s in make_speakers(config.speakers, config.held_out_speakers, seed=config.seed)
        ],
        "vocabulary": {lang: len(vocabulary(lang)) for lang in LANGUAGES},
        "subsets": {},
    }
    for subset, by_split in (("sentences", sentences), ("words", words)):
        manifest["subsets"][subset] = {}
        for split, records in by_split.items():
            paths = write_shards(records, len(records), out_dir / subset / split, config.max_per_shard)
            manifest["subsets"][subset][split] = {
                "samples": len(records),
                "hours": round(seconds[(subset, split)] / 3600, 4),
                "languages": dict(Counter(_lang_of(r) for r in records)),
                "shards": [str(p.relative_to(out_dir)) for p in paths],
            }
    manifest["build_seconds"] = round(time.monotonic() - started, 1)
    write_manifest(out_dir / "manifest.json", manifest)
    return manifest


def _lang_of(record: dict) -> str:
    return SampleMeta.from_json(record["json"]).lang


def format_stats(manifest: dict) -> str:
    """A human-readable table of a corpus manifest."""
    lines = [
        f"corpus {manifest['name']}: languages {', '.join(manifest['languages'])}, "
        f"{len(manifest['speakers'])} speakers ({sum(s['held_out'] for s in manifest['speakers'])} held out), "
        f"vocabulary " + ", ".join(f"{k} {v}" for k, v in manifest["vocabulary"].items()),
        f"{'subset':<10} {'split':<12} {'samples':>8} {'hours':>8} {'shards':>7}  per language",
    ]
    total_hours = 0.0
    for subset, splits in manifest["subsets"].items():
        for split, info in splits.items():
            total_hours += info["hours"]
            per_lang = " ".join(f"{k}={v}" for k, v in sorted(info["languages"].items()))
            lines.append(
                f"{subset:<10} {split:<12} {info['samples']:>8} {info['hours']:>8.3f} {len(info['shards']):>7}  {per_lang}"
            )
    lines.append(f"total {total_hours:.3f} h of audio-visual speech, built in {manifest.get('build_seconds', 0)} s")
    return "\n".join(lines)
