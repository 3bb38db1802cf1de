"""Loader throughput: the shard pipeline vs. a per-file loader, in seconds of speech per second per worker.

    python benchmarks/loader_throughput.py [--shards PATTERN] [--workers N] [--face]

Both loaders deliver the same thing for every utterance: 104-dim stacked log filterbanks
(layer-normalised, 25 Hz), normalised 88x88 lip crops (and RGB faces with ``--face``),
padded into batches.

- pipeline: `AVDataModule.test_dataloader()` (WebDataset shards -> decode FLAC + H.264 ->
  validate -> frame-budget batches -> features/transforms), ``--workers`` DataLoader workers;
- per-file baseline: what the reference implementations do: one WAV and one MP4 file per
  utterance read individually from disk (written out by this script from the same
  samples), ``sf.read`` + PyAV decode (same decoder settings as the pipeline), the same
  features and transforms per utterance, a map-style DataLoader with the same number of
  workers and a padding collate.

Without ``--shards`` it first writes a temporary set of synthetic shards (``--utterances``
utterances of 2-6 s). Figures are real-time factors divided by the number of workers
(a worker = one process; with ``--workers 0`` the main process is the worker). Files are
read through the page cache after being written, so I/O is cheap for both: the comparison
is mostly about per-file overheads and batching, not disk speed.
"""

from __future__ import annotations

import argparse
import logging
import os
import shutil
import sys
import tarfile
import tempfile
import time
from multiprocessing import Pool
from pathlib import Path

import numpy as np
import soundfile as sf
import torch
from torch.utils.data import DataLoader, Dataset

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from av2av_lightning.data.codecs import decode_audio, decode_video, encode_audio, encode_video
from av2av_lightning.data.datamodule import AVDataModule
from av2av_lightning.data.features import audio_features
from av2av_lightning.data.pipeline import resolve_shards
from av2av_lightning.data.schema import (
    AUDIO_FIELD,
    FACE_FIELD,
    LIP_FIELD,
    META_FIELD,
    SAMPLE_RATE,
    SAMPLES_PER_FRAME,
    VIDEO_FPS,
    SampleMeta,
)
from av2av_lightning.data.shards import sample_record, write_shards
from av2av_lightning.data.transforms import face_transform, lip_transform

TARGET_RTF = 100.0


# ---------------------------------------------------------------------------- synthetic data


def _synthetic_record(args: tuple[int, int, int, bool]) -> dict:
    index, frames, seed, with_face = args
    rng = np.random.default_rng([seed, index])
    t = np.arange(frames * SAMPLES_PER_FRAME) / SAMPLE_RATE
    f0 = rng.uniform(90, 220) * (1 + 0.1 * np.sin(2 * np.pi * rng.uniform(0.5, 2) * t))
    phase = 2 * np.pi * np.cumsum(f0) / SAMPLE_RATE
    envelope = 0.5 + 0.5 * np.sin(2 * np.pi * rng.uniform(3, 6) * t) ** 2
    wave = sum(np.sin(k * phase) / k for k in range(1, 12)) * envelope * 0.1 + 0.005 * rng.standard_normal(len(t))
    yy, xx = np.mgrid[:96, :96]
    texture = rng.normal(0, 12, size=(96, 96))
    opening = 5 + 12 * np.abs(np.sin(np.arange(frames) / rng.uniform(2, 4)))
    mouth = ((xx - 48) / 24.0) ** 2 + ((yy[None] - 56) / opening[:, None, None]) ** 2 <= 1
    lip = np.clip(np.where(mouth, 50, 150) + texture + rng.normal(0, 4, size=(frames, 96, 96)), 0, 255).astype(np.uint8)
    meta = SampleMeta(
        key=f"bench_{index:05d}",
        split="test",
        lang="en",
        speaker=f"spk{index % 20}",
        text=f"synthetic utterance {index}",
        sentence_id=f"s{index}",
        num_frames=frames,
    )
    face = None
    if with_face:
        rgb = np.stack([lip, np.clip(lip.astype(int) + 30, 0, 255), np.clip(lip.astype(int) - 20, 0, 255)], -1)
        face = encode_video(rgb.astype(np.uint8))
    return sample_record(meta.key, meta.to_json(), encode_audio(wave), encode_video(lip), face)


def write_synthetic_shards(out: Path, utterances: int, seed: int, with_face: bool, processes: int) -> str:
    rng = np.random.default_rng(seed)
    frames = rng.integers(2 * VIDEO_FPS, 6 * VIDEO_FPS + 1, size=utterances)
    jobs = [(i, int(n), seed, with_face) for i, n in enumerate(frames)]
    with Pool(max(1, processes)) as pool:
        records = pool.map(_synthetic_record, jobs, chunksize=8)
    paths = write_shards(records, len(records), out / "bench", max_per_shard=100)
    return str(out / f"bench-{{000000..{len(paths) - 1:06d}}}.tar")


# ---------------------------------------------------------------------------- per-file baseline


def export_per_file(urls: list[str], out: Path, with_face: bool) -> list[dict]:
    """Each sample as ``key.wav`` (16-bit PCM), ``key.lip.mp4`` (and ``key.face.mp4``) files."""
    out.mkdir(parents=True, exist_ok=True)
    items = []
    for url in urls:
        with tarfile.open(url) as tar:
            sample: dict[str, dict] = {}
            for member in tar.getmembers():
                key, field = member.name.split(".", 1)
                sample.setdefault(key, {})[field] = tar.extractfile(member).read()
        for key, fields in sample.items():
            if not all(f in fields for f in (AUDIO_FIELD, LIP_FIELD, META_FIELD)):
                continue
            meta = SampleMeta.from_json(fields[META_FIELD])
            wav_path = out / f"{key}.wav"
            sf.write(wav_path, decode_audio(fields[AUDIO_FIELD]), SAMPLE_RATE, subtype="PCM_16")
            (out / f"{key}.lip.mp4").write_bytes(fields[LIP_FIELD])
            item = {"key": key, "wav": str(wav_path), "lip": str(out / f"{key}.lip.mp4"), "frames": meta.num_frames}
            if with_face and FACE_FIELD in fields:
                (out / f"{key}.face.mp4").write_bytes(fields[FACE_FIELD])
                item["face"] = str(out / f"{key}.face.mp4")
            items.append(item)
    return items


def _read_video(path: str, gray: bool) -> np.ndarray:
    """Read an MP4 file and decode it with the same decoder the pipeline uses: only the access pattern differs."""
    return decode_video(Path(path).read_bytes(), path, gray)


class PerFileDataset(Dataset):
    def __init__(self, items: list[dict], with_face: bool) -> None:
        self.items = items
        self.with_face = with_face

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: int):
        item = self.items[index]
        wave, rate = sf.read(item["wav"], dtype="float32")
        lip = _read_video(item["lip"], gray=True)
        frames = len(lip)
        wave = np.pad(wave[: frames * SAMPLES_PER_FRAME], (0, max(0, frames * SAMPLES_PER_FRAME - len(wave))))
        feats = audio_features(torch.from_numpy(wave), num_frames=frames)
        video = lip_transform(lip)
        face = face_transform(_read_video(item["face"], gray=False)) if self.with_face else None
        return feats, video, face, torch.from_numpy(wave)


def pad_collate(items):
    lengths = torch.tensor([len(f) for f, *_ in items])
    total = int(lengths.max())
    feats = torch.zeros(len(items), total, 104)
    video = torch.zeros(len(items), 1, total, 88, 88)
    wave = torch.zeros(len(items), total * SAMPLES_PER_FRAME)
    face = torch.zeros(len(items), total, 3, 96, 96) if items[0][2] is not None else None
    for i, (f, v, fc, w) in enumerate(items):
        feats[i, : len(f)] = f
        video[i, 0, : len(v)] = v
        wave[i, : len(w)] = w
        if face is not None:
            face[i, : len(fc)] = fc
    return feats, video, face, wave, lengths


# ---------------------------------------------------------------------------- timing


def time_loader(loader, lengths_of) -> tuple[float, float]:
    """(seconds of speech delivered, wall seconds) for one full pass."""
    frames = 0
    start = time.perf_counter()
    for batch in loader:
        frames += int(lengths_of(batch).sum())
    return frames / VIDEO_FPS, time.perf_counter() - start


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shards", help="shard pattern (default: write synthetic shards)")
    parser.add_argument("--workers", type=int, default=2, help="DataLoader workers for both loaders")
    parser.add_argument("--utterances", type=int, default=300, help="synthetic utterances (without --shards)")
    parser.add_argument("--max-frames", type=int, default=1000, help="frame budget per batch")
    parser.add_argument("--batch-size", type=int, default=8, help="baseline batch size")
    parser.add_argument("--face", action="store_true", help="also decode the RGB face video")
    parser.add_argument("--passes", type=int, default=2, help="timed passes (the best is reported)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.ERROR)

    tmp = Path(tempfile.mkdtemp(prefix="av2av_bench_"))
    try:
        if args.shards:
            pattern = args.shards
        else:
            start = time.perf_counter()
            pattern = write_synthetic_shards(tmp / "shards", args.utterances, args.seed, args.face, os.cpu_count() or 1)
            print(
                f"wrote {args.utterances} synthetic utterances of 2-6 s in {time.perf_counter() - start:.1f} s: {pattern}"
            )
        urls = resolve_shards(pattern)
        items = export_per_file(urls, tmp / "files", args.face)
        shard_bytes = sum(os.path.getsize(u) for u in urls)
        print(
            f"{len(urls)} shards ({shard_bytes / 2**20:.1f} MiB), {len(items)} utterances, "
            f"{sum(i['frames'] for i in items) / VIDEO_FPS / 3600:.3f} h; per-file copies in {tmp / 'files'}"
        )

        workers = max(args.workers, 0)
        per = max(workers, 1)
        dm = AVDataModule(
            test_shards=pattern,
            max_frames=args.max_frames,
            num_workers=workers,
            load_face=args.face,
            require_text=False,
            pin_memory=False,
        )
        baseline = DataLoader(
            PerFileDataset(items, args.face), batch_size=args.batch_size, num_workers=workers, collate_fn=pad_collate
        )
        results = {}
        for name, make, lengths_of in (
            ("pipeline (shards)", dm.test_dataloader, lambda b: b.lengths),
            ("per-file baseline", lambda: baseline, lambda b: b[-1]),
        ):
            best = None
            for _ in range(max(1, args.passes)):
                speech, wall = time_loader(make(), lengths_of)
                best = wall if best is None else min(best, wall)
            results[name] = speech / best / per
            print(
                f"{name:20s}: {speech:8.1f} s of speech in {best:6.2f} s with {workers} worker(s) "
                f"-> {speech / best:7.1f}x real time, {results[name]:7.1f}x per worker"
            )
        ratio = results["pipeline (shards)"] / results["per-file baseline"]
        met = results["pipeline (shards)"] >= TARGET_RTF
        print(f"ratio pipeline / per-file: {ratio:.2f}")
        print(
            f"target >= {TARGET_RTF:.0f}x real time per worker: {'met' if met else 'NOT met'} "
            f"({results['pipeline (shards)']:.1f}x)"
        )
        if dm.skipped:
            print(f"skipped samples: {dict(dm.skipped)}")
        return 0
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
