"""What the LRS3, MuAViC and LRW converters share: decode, encode, write shards, write the manifest.

A converter only lists its samples as `SampleTask`s (metadata without ``num_frames`` plus
where the media is); `convert` decodes them (in worker processes if asked), skips and counts
the ones that fail, and streams the rest into ``OUT/{subset}/{split}-NNNNNN.tar`` with a
``manifest.json`` in the format the embedded corpus uses.
"""

from __future__ import annotations

import logging
import os
import re
import time
from collections import Counter, defaultdict
from collections.abc import Iterable
from dataclasses import dataclass, replace
from functools import partial
from pathlib import Path

import webdataset as wds
from tqdm import tqdm

from av2av_lightning.data.codecs import encode_audio, encode_video
from av2av_lightning.data.schema import SAMPLE_RATE, SAMPLES_PER_FRAME, VIDEO_FPS, SampleMeta
from av2av_lightning.data.shards import sample_record, write_manifest
from data_prep.converters.media import MediaSource, is_lip_video, load_clip
from data_prep.parallel import ordered_map

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class SampleTask:
    """One sample to convert; ``meta.num_frames`` is filled in from the decoded video."""

    meta: SampleMeta
    source: MediaSource
    num_frames: int | None = None  # a fixed clip length (LRW word clips)


@dataclass(frozen=True)
class ConvertOptions:
    max_per_shard: int = 200
    workers: int = 1
    face: bool = True
    limit: int | None = None  # at most this many samples per split (smoke runs)
    progress: bool = True


DEFAULT_OPTIONS = ConvertOptions()


@dataclass
class Converted:
    manifest: dict
    keys: set[str]  # keys written to shards (skipped samples are not among them)


def make_key(*parts: str) -> str:
    """A WebDataset-safe key: no dots (they start the field extension) or slashes."""
    return "-".join(re.sub(r"[^A-Za-z0-9_-]", "_", str(part)) for part in parts if part != "")


def find_videos(folder: Path, pattern: str = "*.mp4") -> list[Path]:
    """Sample videos under ``folder``, leaving out the ``NAME.lip.mp4`` mouth-ROI companions."""
    return sorted(p for p in folder.glob(pattern) if p.is_file() and not is_lip_video(p))


def no_samples(root: Path, dataset: str, layout: str) -> Exception:
    """The one-line error for a dataset root without samples (or no root at all)."""
    if not root.is_dir():
        return FileNotFoundError(f"{root}: no such folder (expected the {dataset} layout {layout})")
    return ValueError(f"{root}: no {dataset} samples found (expected {layout})")


class ShardSink:
    """Stream records into ``{prefix}-NNNNNN.tar`` shards of ``max_per_shard``; each shard is renamed into place when full."""

    def __init__(self, prefix: Path, max_per_shard: int) -> None:
        self.prefix, self.max_per_shard = prefix, max_per_shard
        self.paths: list[Path] = []
        self._writer = None
        self._in_shard = 0

    def write(self, record: dict) -> None:
        if self._writer is None:
            if not self.paths:  # a re-conversion replaces the split: no stale shards left for a glob to pick up
                self.prefix.parent.mkdir(parents=True, exist_ok=True)
                for stale in self.prefix.parent.glob(f"{self.prefix.name}-*.tar"):
                    stale.unlink()
            self._partial = self._path().with_suffix(".tar.partial")
            self._writer = wds.TarWriter(str(self._partial), mtime=0)  # fixed mtime: reproducible shards
        self._writer.write(record)
        self._in_shard += 1
        if self._in_shard == self.max_per_shard:
            self.close()

    def _path(self) -> Path:
        return self.prefix.parent / f"{self.prefix.name}-{len(self.paths):06d}.tar"

    def close(self) -> None:
        if self._writer is None:
            return
        self._writer.close()
        path = self._path()
        os.replace(self._partial, path)
        self.paths.append(path)
        self._writer, self._in_shard = None, 0


def encode_task(task: SampleTask, face: bool) -> tuple[dict | None, str]:
    """The shard record of one task, or (None, reason) when its media cannot be used."""
    try:
        clip = load_clip(task.source, face=face, num_frames=task.num_frames)
        meta = replace(task.meta, num_frames=len(clip.lip))
        face_bytes = encode_video(clip.face) if clip.face is not None else None
        return sample_record(meta.key, meta.to_json(), encode_audio(clip.audio), encode_video(clip.lip), face_bytes), ""
    except (ValueError, OSError) as err:  # MediaError/CorruptSampleError are ValueErrors
        return None, str(err)


def select(tasks: Iterable[SampleTask], limit: int | None) -> list[SampleTask]:
    """Tasks in (split, key) order, at most ``limit`` per split; duplicate keys are an error."""
    by_split: dict[str, list[SampleTask]] = defaultdict(list)
    seen: dict[str, SampleTask] = {}
    for task in sorted(tasks, key=lambda t: (t.meta.split, t.meta.key)):
        if task.meta.key in seen:
            raise ValueError(
                f"{task.source.video}: sample key {task.meta.key!r} also used by {seen[task.meta.key].source.video}"
            )
        seen[task.meta.key] = task
        by_split[task.meta.split].append(task)
    return [t for split_tasks in by_split.values() for t in split_tasks[:limit]]


def convert(
    tasks: Iterable[SampleTask],
    out_dir: str | Path,
    name: str,
    subset: str,
    options: ConvertOptions,
    skipped: list[dict] | None = None,
    extra: dict | None = None,
) -> Converted:
    """Decode, encode and shard every task; write and return the manifest (plus ``extra`` entries).

    ``skipped`` lists samples the converter already rejected while listing (e.g. a transcript
    it could not parse) as ``{"key", "reason"}``; they are counted with the decoding failures.
    """
    out_dir = Path(out_dir)
    started = time.monotonic()
    tasks = select(tasks, options.limit)
    skipped = list(skipped or [])
    for entry in skipped:
        log.warning("skipped %s: %s", entry["key"], entry["reason"])
    guessed = sum(t.source.mouth_is_guessed for t in tasks)
    if guessed:
        log.info(
            "%d of %d videos have no .lip.mp4 or .bbox file: mouth = lower middle of the frame", guessed, len(tasks)
        )
    sinks: dict[str, ShardSink] = {}
    samples, seconds, languages = Counter(), Counter(), defaultdict(Counter)
    speakers, vocabulary, keys = set(), defaultdict(set), set()
    with ordered_map(options.workers, chunksize=2) as mapper:
        results = mapper(partial(encode_task, face=options.face), tasks)
        for task, (record, reason) in tqdm(
            zip(tasks, results), total=len(tasks), desc=f"convert {name}", unit="clip", disable=not options.progress
        ):
            if record is None:
                log.warning("skipped %s: %s", task.meta.key, reason)
                skipped.append({"key": task.meta.key, "reason": reason})
                continue
            split, meta = task.meta.split, task.meta
            if split not in sinks:
                sinks[split] = ShardSink(out_dir / subset / split, options.max_per_shard)
            sinks[split].write(record)
            keys.add(meta.key)
            samples[split] += 1
            seconds[split] += _duration(record)
            languages[split][meta.lang] += 1
            speakers.add(meta.speaker)
            vocabulary[meta.lang].update(meta.text.lower().split())
    for sink in sinks.values():
        sink.close()
    manifest = {
        "name": name,
        "languages": sorted({lang for counts in languages.values() for lang in counts}),
        "sample_rate": SAMPLE_RATE,
        "fps": VIDEO_FPS,
        "speakers": [{"id": s, "held_out": False} for s in sorted(speakers)],
        "vocabulary": {lang: len(words) for lang, words in sorted(vocabulary.items())},
        "subsets": {
            subset: {
                split: {
                    "samples": samples[split],
                    "hours": round(seconds[split] / 3600, 4),
                    "languages": dict(languages[split]),
                    "shards": [str(p.relative_to(out_dir)) for p in sinks[split].paths],
                }
                for split in sorted(sinks)
            }
        },
        "skipped": {"count": len(skipped), "samples": skipped},
        **(extra or {}),
        "build_seconds": round(time.monotonic() - started, 1),
    }
    write_manifest(out_dir / "manifest.json", manifest)
    if skipped and not keys:
        raise ValueError(
            f"{out_dir}: none of the {len(skipped)} samples could be converted (first: {skipped[0]['reason']})"
        )
    return Converted(manifest, keys)


def _duration(record: dict) -> float:
    return SampleMeta.from_json(record["json"]).num_frames * SAMPLES_PER_FRAME / SAMPLE_RATE
