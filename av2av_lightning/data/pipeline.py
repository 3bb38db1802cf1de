"""The WebDataset pipeline: shards -> validated samples -> frame-budget batches (`AVBatch`).

`AVShardDataset` is a ``torch.utils.data.IterableDataset`` that yields whole batches (use
it with ``DataLoader(batch_size=None)``). Per DataLoader worker it runs

    shard list -> tar samples -> metadata, filters, sidecar presence -> bucketing buffer
    (raw bytes, sorted by the frame count in the metadata) -> decode + validate + crop +
    noise + lip crop, one packed batch at a time -> `collate`.

Decoding after bucketing keeps only compressed bytes in the buffer, so the buffer can be
large (good buckets) at little memory.

**Training** (``train=True``): each (rank, worker) draws shards from its own generator
(seed, epoch, rank, worker: the `wds.ResampledShards` idea) in a fresh random order per
cycle, every shard once per cycle, reads up to ``shards_in_parallel`` of them interleaved
(never more than there are shards: one shard opened twice at once would be read in
lockstep, and bucketing would pack its copies of a sample into one batch), and yields
*exactly* its share of
``batches_per_epoch`` (``len(dataset)``), so every rank gets the same number of batches
whatever the number of workers. Global batch ``i`` of an epoch comes from worker
``i % num_workers`` (the DataLoader's round-robin), so a pass resumed after ``k`` batches
(`AVShardDataset.skip_batches`) gives worker ``w`` the stream of worker ``(w + k) % num_workers``.

**Evaluation** (``train=False``): every sample exactly once over all ranks and workers.
With G = world_size x num_workers global workers and S shards, global worker g reads
whole shards g, g+G, ... among the first S - (S mod G), and every G-th sample (offset g)
of each of the remaining S mod G shards (all of them when S < G), so shares stay balanced. Ranks get different
numbers of batches, so evaluation steps must not synchronise across ranks per step
(epoch-end metric syncs are fine).

**Validation of samples**: a sample is skipped, counted by reason and logged with its key
and shard when a field is missing, the metadata is invalid, audio or video do not decode,
audio contains NaN/inf, audio and video (or metadata, or face video) differ by more than
``length_tolerance`` frames, the transcript is empty (``require_text``), or a sidecar has no
entry for it (reason ``no <name> label``). Within the tolerance audio is trimmed/zero-padded
to the lip video's frame count, face video trimmed/padded (last frame repeated), aligned
labels trimmed/padded with -100. Counts travel with the next batch (`AVBatch.skipped`).

**Cropping**: with ``max_sample_frames``, longer samples are cropped to that many frames
(audio, video, face and aligned labels together): a random window in training, the first
frames in evaluation.

**Noise**: with ``noise_prob > 0`` white or babble noise (babble from a reservoir of recent
clean utterances of the same worker) is added at ``noise_snr_db`` (fixed, or a (low, high)
range). In evaluation the draw for a sample is seeded by its key (the babble pool still
depends on the order a worker reads samples).
"""

from __future__ import annotations

import glob
import itertools
import logging
import math
import os
import random
import re
import zlib
from collections import Counter
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch
import webdataset as wds
from torch.utils.data import IterableDataset, get_worker_info
from webdataset.shardlists import expand_urls

from av2av_lightning.data.batching import IGNORE_INDEX, AVBatch, Example, collate, label_frames, pack_by_budget
from av2av_lightning.data.codecs import CorruptSampleError, decode_audio, decode_video
from av2av_lightning.data.noise import NOISE_TYPES, NoiseAugmenter
from av2av_lightning.data.schema import (
    AUDIO_FIELD,
    FACE_FIELD,
    LIP_FIELD,
    META_FIELD,
    REQUIRED_FIELDS,
    SAMPLES_PER_FRAME,
    VIDEO_FPS,
    SampleMeta,
    SchemaError,
)
from av2av_lightning.data.sidecar import Sidecar
from av2av_lightning.data.transforms import LIP_CROP, crop_lip
from data_prep.vocab import word_key

log = logging.getLogger(__name__)

__all__ = ["AVShardDataset", "SkipReason", "distributed_info", "resolve_shards", "split_for_worker"]


class SkipReason:
    MISSING_FIELD = "missing field"
    BAD_METADATA = "bad metadata"
    UNDECODABLE_AUDIO = "undecodable audio"
    UNDECODABLE_VIDEO = "undecodable video"
    UNDECODABLE_FACE = "undecodable face video"
    NON_FINITE_AUDIO = "non-finite audio"
    LENGTH_MISMATCH = "length mismatch"
    EMPTY_TRANSCRIPT = "empty transcript"
    UNREADABLE_SHARD = "unreadable shard"

    @staticmethod
    def no_label(name: str) -> str:
        return f"no {name} label"

    @staticmethod
    def label_length(name: str) -> str:
        return f"{name} label length mismatch"


# ---------------------------------------------------------------------------- shard lists

_SCHEME = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]+:")


def _is_remote(url: str) -> bool:
    return bool(_SCHEME.match(url)) and not url.startswith("file:")


def resolve_shards(spec: str | Path | Sequence[str | Path] | None) -> list[str]:
    """Shard URLs from a path, a brace pattern, a glob, a directory (its ``*.tar``), a URL or a list of these.

    Local shards must exist; remote URLs (``http(s)://``, ``pipe:``, ``s3://``...) are passed
    to webdataset unchecked. Raises a one-line ``ValueError`` naming the pattern when nothing
    matches or local shards are missing.
    """
    if spec is None or (isinstance(spec, (str, Path)) and not str(spec).strip()):
        raise ValueError(f"no shards: empty shard pattern {spec!r}")
    specs = [spec] if isinstance(spec, (str, Path)) else list(spec)
    if not specs:
        raise ValueError("no shards: empty list of shard patterns")
    urls: list[str] = []
    for pattern in map(str, specs):
        expanded = expand_urls(os.path.expanduser(pattern.strip()))
        missing = []
        found_here = []
        for item in expanded:
            if _is_remote(item):
                found_here.append(item)
                continue
            path = item[len("file:") :] if item.startswith("file:") else item
            if os.path.isdir(path):
                tars = sorted(glob.glob(os.path.join(glob.escape(path), "*.tar")))
                if not tars:
                    raise ValueError(f"shard pattern {pattern!r}: directory {path} holds no .tar shards")
                found_here.extend(tars)
            elif glob.has_magic(path):
                found_here.extend(sorted(glob.glob(path)))
            elif os.path.isfile(path):
                found_here.append(path)
            else:
                missing.append(path)
        if missing:
            raise ValueError(
                f"shard pattern {pattern!r}: {len(missing)} of {len(expanded)} shard(s) not found (first: {missing[0]})"
            )
        if not found_here:
            raise ValueError(f"shard pattern {pattern!r} matches no shards")
        urls.extend(found_here)
    return urls


def distributed_info() -> tuple[int, int]:
    """(rank, world_size) from torch.distributed when initialised, else (0, 1)."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return 0, 1


def split_for_worker(num_shards: int, global_worker: int, global_workers: int) -> list[tuple[int, int, int]]:
    """Exactly-once, balanced assignment: ``(shard index, part, parts)`` triples for one global worker.

    The worker reads samples ``i`` of each listed shard with ``i % parts == part``. The first
    ``num_shards - num_shards % global_workers`` shards go whole to the workers in turn; each
    remaining shard is read by every worker, which keeps every ``global_workers``-th sample.
    Over all workers every (shard, sample) pair is read exactly once, and workers get
    nearly equal shares even with fewer shards than workers.
    """
    whole = num_shards - num_shards % global_workers
    plan = [(s, 0, 1) for s in range(global_worker, whole, global_workers)]
    plan += [(s, global_worker, global_workers) for s in range(whole, num_shards)]
    return plan


# ---------------------------------------------------------------------------- the dataset


@dataclass
class _Pending:
    """A sample whose metadata passed; still compressed bytes."""

    raw: dict
    meta: SampleMeta
    shard: str

    @property
    def key(self) -> str:
        return self.meta.key


class _State:
    """Per-iteration state of one worker: generators, skip counts, the noise reservoir."""

    def __init__(self, seed: int, noise: NoiseAugmenter | None) -> None:
        self.rng = np.random.default_rng(seed)
        self.py_rng = random.Random(seed)
        self.noise = noise
        self.skipped: Counter = Counter()
        self.shards_opened = 0

    def take_skipped(self) -> dict[str, int]:
        skipped = dict(self.skipped)
        self.skipped.clear()
        return skipped


class AVShardDataset(IterableDataset):
    """Batches of audio-visual samples from WebDataset shards; see the module docstring.

    Args:
        shards: pattern(s) for `resolve_shards`.
        train: resampled shards, random crops/flips, shuffled batches, fixed length.
        max_frames: frame budget of a padded batch (``max length x batch size``).
        max_sample_frames: crop longer samples to this many frames (None: never crop).
        batches_per_epoch: batches per rank per epoch in training (required when ``train``).
        load_face: also decode the RGB face video (``AVBatch.face``).
        kinds, languages: keep only these sample kinds (sentence/word) / languages.
        words: keep only word clips whose ``lang/label`` is in this list (a classifier's vocabulary): the other
            clips would carry no target.
        sidecars: ``name -> path(s)`` or loaded `Sidecar`; joined by key into ``AVBatch.labels``.
        noise_prob, noise_snr_db, noise_types, noise_talkers: noise augmentation (see `NoiseAugmenter`).
        length_tolerance: frames audio/video/metadata may differ before a sample is skipped.
        require_text: skip samples with an empty transcript.
        buffer_size: samples per bucketing buffer.
        shards_in_parallel: shards read interleaved in training.
        window: analysis window of the audio features.
        seed: base seed (combined with epoch, rank and worker).
        rank, world_size: override the distributed position (default: torch.distributed).
    """

    def __init__(
        self,
        shards: str | Sequence[str],
        train: bool = False,
        *,
        max_frames: int = 1000,
        max_sample_frames: int | None = None,
        batches_per_epoch: int | None = None,
        load_face: bool = False,
        kinds: Sequence[str] | None = None,
        languages: Sequence[str] | None = None,
        words: Sequence[str] | None = None,
        sidecars: Mapping[str, str | Sequence[str] | Sidecar] | None = None,
        noise_prob: float = 0.0,
        noise_snr_db: float | Sequence[float] = 0.0,
        noise_types: Sequence[str] = NOISE_TYPES,
        noise_talkers: int = 5,
        length_tolerance: int = 2,
        require_text: bool = True,
        buffer_size: int = 256,
        shards_in_parallel: int = 4,
        window: str = "hamming",
        seed: int = 0,
        rank: int | None = None,
        world_size: int | None = None,
    ) -> None:
        super().__init__()
        self.pattern = shards
        self.urls = resolve_shards(shards)
        self.train = bool(train)
        if max_frames <= 0:
            raise ValueError(f"max_frames must be positive, got {max_frames}")
        if max_sample_frames is not None and max_sample_frames <= 0:
            raise ValueError(f"max_sample_frames must be positive or None, got {max_sample_frames}")
        if self.train and (batches_per_epoch is None or batches_per_epoch <= 0):
            raise ValueError(f"training needs a positive batches_per_epoch, got {batches_per_epoch}")
        self.max_frames = int(max_frames)
        self.max_sample_frames = max_sample_frames
        self.batches_per_epoch = batches_per_epoch
        self.load_face = bool(load_face)
        self.kinds = set(kinds) if kinds else None
        self.languages = set(languages) if languages else None
        self.words = set(words) if words else None
        self.sidecars: dict[str, Sidecar] = {
            name: value if isinstance(value, Sidecar) else Sidecar.load(value)
            for name, value in (sidecars or {}).items()
        }
        # Validate the noise options now (the augmenter itself is built per worker and epoch).
        NoiseAugmenter(noise_prob, noise_snr_db, noise_types, noise_talkers)
        self.noise_prob = float(noise_prob)
        self.noise_snr_db = noise_snr_db
        self.noise_types = tuple(noise_types)
        self.noise_talkers = int(noise_talkers)
        self.length_tolerance = int(length_tolerance)
        self.require_text = bool(require_text)
        self.buffer_size = int(buffer_size)
        self.shards_in_parallel = max(1, int(shards_in_parallel))
        self.window = window
        self.seed = int(seed)
        self.rank = rank
        self.world_size = world_size
        self.epoch = 0
        self._iterations = 0
        self._resume_skip = 0
        self._warned: set[tuple[str, str]] = set()
        self.required_fields = REQUIRED_FIELDS + ((FACE_FIELD,) if self.load_face else ())

    # -- sizes and positions

    def __len__(self) -> int:
        if not self.train:
            raise TypeError("an evaluation AVShardDataset has no length (batches depend on the data)")
        return int(self.batches_per_epoch)

    def set_epoch(self, epoch: int) -> None:
        """The epoch of the next pass; later passes without a ``set_epoch`` (persistent workers keep the copy made
        at their start) count on from it, so the stream of a training epoch depends on its number alone."""
        self.epoch = int(epoch)
        self._iterations = 0

    def skip_batches(self, count: int) -> None:
        """Start the next training pass after the first ``count`` batches of this rank's epoch (a resumed run).

        Worker ``w`` takes the role of worker ``(w + count) % num_workers``, whose stream holds the next batch, so
        the loader's round-robin over its workers yields the uninterrupted order. The skipped batches are replayed
        without collating: their decoding decides which samples fail and the random draws of the later ones.
        """
        if count < 0 or (count and not self.train):
            raise ValueError(f"only training passes skip batches, and a count >= 0; got {count} (train={self.train})")
        self._resume_skip = int(count)

    def position(self) -> tuple[int, int, int, int]:
        """(rank, world_size, worker id, number of workers) of the calling process."""
        rank, world = distributed_info()
        rank = rank if self.rank is None else int(self.rank)
        world = world if self.world_size is None else int(self.world_size)
        if not 0 <= rank < world:
            raise ValueError(f"rank {rank} is outside world size {world}")
        info = get_worker_info()
        return rank, world, (info.id if info else 0), (info.num_workers if info else 1)

    def worker_batches(self, worker: int, num_workers: int) -> int:
        """This worker's share of ``batches_per_epoch`` (shares differ by at most one)."""
        total = int(self.batches_per_epoch)
        return total // num_workers + (1 if worker < total % num_workers else 0)

    @property
    def label_rates(self) -> dict[str, float | None]:
        return {name: sidecar.rate for name, sidecar in self.sidecars.items()}

    # -- iteration

    def __iter__(self) -> Iterator[AVBatch]:
        rank, world, worker, num_workers = self.position()
        self._iterations += 1
        skip, self._resume_skip = self._resume_skip, 0  # this pass only (a persistent worker's copy sees it once)
        role = (worker + skip) % num_workers
        # The 1 stands where earlier versions counted passes: the first pass of a run keeps its stream.
        seed = [self.seed, self.epoch + self._iterations - 1, 1, rank, role]
        state = _State(int(np.random.SeedSequence(seed).generate_state(1)[0]), self._noise(seed))
        if self.train:
            done = len(range(role, skip, num_workers))  # this role's batches among the skipped ones
            wanted = self.worker_batches(role, num_workers) - done
            if wanted <= 0:
                return
            batches = self._batches(self._interleaved(self._resampled_urls(state), state), state, replay=done)
            yield from itertools.islice(batches, wanted)
        else:
            plan = split_for_worker(len(self.urls), rank * num_workers + worker, world * num_workers)
            yield from self._batches(self._planned_samples(plan, state), state)

    def _noise(self, seed: list[int]) -> NoiseAugmenter | None:
        if self.noise_prob <= 0.0:
            return None
        return NoiseAugmenter(
            self.noise_prob,
            self.noise_snr_db,
            self.noise_types,
            self.noise_talkers,
            seed=np.random.SeedSequence(seed + [1]),
        )

    # -- reading shards

    def _read_shard(self, url: str, state: _State) -> Iterator[dict]:
        def handler(exn: Exception) -> bool:
            state.skipped[SkipReason.UNREADABLE_SHARD] += 1
            log.warning("skipping unreadable data in shard %s: %s", url, exn)
            return True

        state.shards_opened += 1
        yield from wds.tarfile_samples([{"url": url}], handler=handler)

    def _resampled_urls(self, state: _State) -> Iterator[str]:
        """Every shard once per cycle, in a new random order each cycle, for ever."""
        while True:
            for index in state.rng.permutation(len(self.urls)):
                yield self.urls[int(index)]

    def _interleaved(self, urls: Iterator[str], state: _State) -> Iterator[_Pending]:
        """Round-robin over ``shards_in_parallel`` open shards (at most one per shard); a finished shard is
        replaced by the next URL."""
        limit = max(20, 3 * len(self.urls), 2 * self.shards_in_parallel)
        opened_at_last_sample = 0
        streams = []
        for url in urls:
            streams.append((url, self._read_shard(url, state)))
            if len(streams) >= min(self.shards_in_parallel, len(self.urls)):
                break
        while streams:
            for index in range(len(streams)):
                url, stream = streams[index]
                raw = next(stream, None)
                if raw is None:
                    if state.shards_opened - opened_at_last_sample > limit:
                        raise ValueError(  # a bad filter or unusable data: the input is wrong, not the code
                            f"no usable sample in {limit} shards of {self.pattern!r} "
                            f"(filters kinds={self.kinds}, languages={self.languages}, words={len(self.words) if self.words else None}; skipped {dict(state.skipped)})"
                        )
                    next_url = next(urls, None)
                    streams[index] = (next_url, self._read_shard(next_url, state)) if next_url else None
                    continue
                pending = self._prepare(raw, url, state)
                if pending is not None:
                    opened_at_last_sample = state.shards_opened
                    yield pending
            streams = [s for s in streams if s is not None]

    def _planned_samples(self, plan: list[tuple[int, int, int]], state: _State) -> Iterator[_Pending]:
        for shard_index, part, parts in plan:
            url = self.urls[shard_index]
            for index, raw in enumerate(self._read_shard(url, state)):
                if index % parts != part:
                    continue
                pending = self._prepare(raw, url, state)
                if pending is not None:
                    yield pending

    # -- per-sample checks

    def _skip(self, state: _State, reason: str, key: str, shard: str, detail: str = "") -> None:
        state.skipped[reason] += 1
        if (key, reason) in self._warned:  # resampled training sees the same bad sample again
            return
        if len(self._warned) < 100_000:
            self._warned.add((key, reason))
        log.warning("skipping sample %s in %s: %s%s", key, shard, reason, f" ({detail})" if detail else "")

    def _prepare(self, raw: dict, shard: str, state: _State) -> _Pending | None:
        key = raw.get("__key__", "<no key>")
        missing = [name for name in self.required_fields if not raw.get(name)]
        if missing:
            self._skip(state, SkipReason.MISSING_FIELD, key, shard, ", ".join(missing))
            return None
        try:
            meta = SampleMeta.from_json(raw[META_FIELD], source=f"{shard}:{key}")
        except SchemaError as err:
            self._skip(state, SkipReason.BAD_METADATA, key, shard, str(err))
            return None
        if self.kinds is not None and meta.kind not in self.kinds:
            return None
        if self.languages is not None and meta.lang not in self.languages:
            return None
        if self.words is not None and word_key(meta.lang, meta.label or "") not in self.words:
            return None
        if self.require_text and not meta.text.strip():
            self._skip(state, SkipReason.EMPTY_TRANSCRIPT, meta.key, shard)
            return None
        for name, sidecar in self.sidecars.items():
            if meta.key not in sidecar:
                self._skip(state, SkipReason.no_label(name), meta.key, shard)
                return None
        return _Pending(raw, meta, shard)

    def _bucket_length(self, pending: _Pending) -> int:
        frames = pending.meta.num_frames
        return min(frames, self.max_sample_frames) if self.max_sample_frames else frames

    def _decode(self, pending: _Pending, state: _State) -> Example | None:
        meta, raw, shard, key = pending.meta, pending.raw, pending.shard, pending.key
        tolerance = self.length_tolerance
        try:
            audio = decode_audio(raw[AUDIO_FIELD], name=f"{key}.{AUDIO_FIELD}")
        except CorruptSampleError as err:
            self._skip(state, SkipReason.UNDECODABLE_AUDIO, key, shard, str(err))
            return None
        if not np.isfinite(audio).all():
            self._skip(state, SkipReason.NON_FINITE_AUDIO, key, shard)
            return None
        try:
            lip = decode_video(raw[LIP_FIELD], name=f"{key}.{LIP_FIELD}", gray=True)
        except CorruptSampleError as err:
            self._skip(state, SkipReason.UNDECODABLE_VIDEO, key, shard, str(err))
            return None
        if lip.shape[1] < LIP_CROP or lip.shape[2] < LIP_CROP:
            self._skip(state, SkipReason.UNDECODABLE_VIDEO, key, shard, f"lip frames {lip.shape[1:]} < {LIP_CROP}")
            return None
        frames = len(lip)
        audio_frames = len(audio) / SAMPLES_PER_FRAME
        if abs(audio_frames - frames) > tolerance or abs(meta.num_frames - frames) > tolerance:
            detail = f"audio {audio_frames:.2f} frames, lip video {frames}, metadata {meta.num_frames}"
            self._skip(state, SkipReason.LENGTH_MISMATCH, key, shard, detail)
            return None
        audio = _fit(audio, frames * SAMPLES_PER_FRAME, 0.0)
        face = None
        if self.load_face:
            try:
                face = decode_video(raw[FACE_FIELD], name=f"{key}.{FACE_FIELD}", gray=False)
            except CorruptSampleError as err:
                self._skip(state, SkipReason.UNDECODABLE_FACE, key, shard, str(err))
                return None
            if abs(len(face) - frames) > tolerance:
                self._skip(
                    state, SkipReason.LENGTH_MISMATCH, key, shard, f"face video {len(face)} frames, lip {frames}"
                )
                return None
            face = _fit(face, frames, None)
        labels = {}
        for name, sidecar in self.sidecars.items():
            values = np.asarray(sidecar[key])
            expected = label_frames(frames, sidecar.rate)
            if expected is not None:
                if abs(len(values) - expected) > tolerance * sidecar.rate / VIDEO_FPS:
                    detail = f"{len(values)} labels at {sidecar.rate:g} Hz, expected {expected}"
                    self._skip(state, SkipReason.label_length(name), key, shard, detail)
                    return None
                values = _fit(values.astype(np.int64), expected, IGNORE_INDEX)
            labels[name] = values
        # Crop long samples (all streams together).
        if self.max_sample_frames and frames > self.max_sample_frames:
            size = self.max_sample_frames
            start = int(state.rng.integers(0, frames - size + 1)) if self.train else 0
            lip = lip[start : start + size]
            face = face[start : start + size] if face is not None else None
            audio = audio[start * SAMPLES_PER_FRAME : (start + size) * SAMPLES_PER_FRAME]
            for name, sidecar in self.sidecars.items():
                if sidecar.rate is not None:
                    begin = label_frames(start, sidecar.rate)
                    labels[name] = labels[name][begin : begin + label_frames(size, sidecar.rate)]
            frames = size
        meta = replace(meta, num_frames=frames)
        rng = state.rng if self.train else np.random.default_rng([self.seed, zlib.crc32(key.encode())])
        noisy, snr = None, math.inf
        if state.noise is not None:
            noisy, snr = state.noise(audio, rng)
            state.noise.observe(audio, rng)
        return Example(
            meta=meta,
            wave=np.ascontiguousarray(audio, dtype=np.float32),
            lip=crop_lip(lip, self.train, rng),
            face=face,
            labels=labels,
            noisy=None if noisy is audio else noisy,
            snr_db=snr,
        )

    # -- batches

    def _batches(self, pending: Iterator[_Pending], state: _State, replay: int = 0) -> Iterator[AVBatch]:
        """Bucket, decode one packed group at a time, collate.

        A batch is held back until the next group is decoded, so samples skipped while
        decoding the last groups are still counted in the worker's last batch. The first
        ``replay`` batches are built but neither collated nor yielded (with their skip counts).
        """
        max_failures = max(1000, 10 * self.buffer_size)
        failures = 0
        buffer: list[_Pending] = []
        held: list[Example] | None = None

        def emit(examples: list[Example]) -> Iterator[AVBatch]:
            nonlocal replay
            if replay:
                replay -= 1
                state.take_skipped()
                return
            yield collate(
                examples,
                self.label_rates,
                with_noise=state.noise is not None,
                with_face=self.load_face,
                window=self.window,
                skipped=state.take_skipped(),
            )

        def flush() -> Iterator[AVBatch]:
            nonlocal failures, held
            groups = pack_by_budget([self._bucket_length(p) for p in buffer], self.max_frames)
            if self.train:
                state.py_rng.shuffle(groups)
            for group in groups:
                examples = []
                for index in group:
                    example = self._decode(buffer[index], state)
                    if example is None:
                        failures += 1
                        continue
                    failures = 0
                    examples.append(example)
                if self.train and failures > max_failures:
                    raise RuntimeError(
                        f"{failures} samples in a row failed to decode in {self.pattern!r}: {dict(state.skipped)}"
                    )
                # Decoded lengths may exceed the metadata's by the tolerance: re-pack to keep the budget.
                for subgroup in pack_by_budget([ex.num_frames for ex in examples], self.max_frames):
                    if held is not None:
                        yield from emit(held)
                    held = [examples[i] for i in subgroup]
            buffer.clear()

        for item in pending:
            buffer.append(item)
            if len(buffer) >= self.buffer_size:
                yield from flush()
        if buffer:
            yield from flush()
        if held is not None:
            yield from emit(held)
        elif state.skipped:
            log.warning("no batch to carry the skip counts of this worker: %s", dict(state.skipped))


def _fit(array: np.ndarray, length: int, pad_value) -> np.ndarray:
    """Trim or pad the first axis to ``length``; ``pad_value=None`` repeats the last element."""
    if len(array) >= length:
        return array[:length]
    if pad_value is None:
        padding = np.repeat(array[-1:], length - len(array), axis=0)
    else:
        padding = np.full((length - len(array), *array.shape[1:]), pad_value, dtype=array.dtype)
    return np.concatenate([array, padding])
