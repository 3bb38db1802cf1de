"""Tiny synthetic WebDataset shards for the data tests (audio, gray lip video, RGB face video)."""

from __future__ import annotations

import io
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

from av2av_lightning.data.codecs import encode_audio, encode_video
from av2av_lightning.data.schema import SAMPLE_RATE, SAMPLES_PER_FRAME, SampleMeta
from av2av_lightning.data.shards import sample_record, write_shards

# W&B never goes online in tests: wandb reads its mode once per process, so set it before any test runs
os.environ["WANDB_MODE"] = "offline"
os.environ["WANDB_SILENT"] = "true"


def synthetic_audio(frames: int, rng: np.random.Generator) -> np.ndarray:
    """Random-ish speech-like audio: a few amplitude-modulated tones plus a little noise."""
    t = np.arange(frames * SAMPLES_PER_FRAME) / SAMPLE_RATE
    wave = np.zeros_like(t)
    for _ in range(3):
        freq, rate = rng.uniform(120, 3000), rng.uniform(2, 6)
        wave += np.sin(2 * np.pi * freq * t + rng.uniform(0, 6)) * (0.5 + 0.5 * np.sin(2 * np.pi * rate * t))
    wave = 0.2 * wave / 3 + 0.01 * rng.standard_normal(len(t))
    return wave.astype(np.float32)


def synthetic_lip(frames: int, rng: np.random.Generator) -> np.ndarray:
    """Gray 96x96 frames: a dark mouth ellipse whose opening changes over time."""
    yy, xx = np.mgrid[:96, :96]
    opening = 6 + 10 * np.abs(np.sin(np.arange(frames) / 3 + rng.uniform(0, 3)))
    inside = ((xx[None] - 48) / 22) ** 2 + ((yy[None] - 56) / opening[:, None, None]) ** 2 <= 1
    return np.where(inside, 40, 150 + (xx[None] // 8)).astype(np.uint8)


def synthetic_face(frames: int, rng: np.random.Generator) -> np.ndarray:
    base = np.broadcast_to(rng.integers(60, 200, size=3, dtype=np.uint8), (96, 96, 3))
    face = np.repeat(base[None], frames, axis=0).copy()
    face[:, 60:72, 30:66] = synthetic_lip(frames, rng)[:, 56:68, 30:66, None]
    return face


@dataclass
class ShardSet:
    paths: list[Path]
    keys: list[str]
    lengths: dict[str, int]
    metas: dict[str, SampleMeta] = field(default_factory=dict)

    @property
    def pattern(self) -> str:
        first, last = self.paths[0], self.paths[-1]
        prefix = first.name.rsplit("-", 1)[0]
        return str(first.parent / f"{prefix}-{{{first.stem.rsplit('-', 1)[1]}..{last.stem.rsplit('-', 1)[1]}}}.tar")


def build_record(
    key: str,
    frames: int,
    rng: np.random.Generator,
    lang: str = "en",
    kind: str = "sentence",
    text: str | None = None,
    face: bool = True,
    corrupt: str | None = None,
) -> tuple[dict, SampleMeta]:
    """One shard record; ``corrupt`` in {truncated_flac, bad_mp4, missing_lip, length_mismatch, nan_audio, empty_text}."""
    meta = SampleMeta(
        key=key,
        split="train",
        lang=lang,
        speaker=f"spk{int(rng.integers(0, 4))}",
        text="" if corrupt == "empty_text" else (text or f"utterance {key}"),
        sentence_id=key,
        num_frames=frames,
        kind=kind,
    )
    wave = synthetic_audio(frames + (5 if corrupt == "length_mismatch" else 0), rng)
    audio = encode_audio(wave)
    if corrupt == "truncated_flac":
        audio = audio[: len(audio) // 2]
    if corrupt == "nan_audio":
        wave[10:20] = np.nan
        buffer = io.BytesIO()
        sf.write(buffer, wave, SAMPLE_RATE, format="WAV", subtype="FLOAT")
        audio = buffer.getvalue()
    lip = encode_video(synthetic_lip(frames, rng))
    if corrupt == "bad_mp4":
        lip = bytes(rng.integers(0, 256, size=2000, dtype=np.uint8))
    record = sample_record(key, meta.to_json(), audio, lip, encode_video(synthetic_face(frames, rng)) if face else None)
    if corrupt == "missing_lip":
        del record["lip.mp4"]
    return record, meta


def write_set(
    out: Path,
    lengths: list[int],
    per_shard: int,
    prefix: str = "train",
    seed: int = 0,
    langs: tuple[str, ...] = ("en", "es"),
    kinds: tuple[str, ...] = ("sentence",),
    face: bool = True,
    corrupt: dict[int, str] | None = None,
) -> ShardSet:
    rng = np.random.default_rng(seed)
    records, metas = [], {}
    for index, frames in enumerate(lengths):
        key = f"{prefix}_{index:04d}"
        record, meta = build_record(
            key,
            int(frames),
            rng,
            lang=langs[index % len(langs)],
            kind=kinds[index % len(kinds)],
            face=face,
            corrupt=(corrupt or {}).get(index),
        )
        records.append(record)
        metas[key] = meta
    paths = write_shards(records, len(records), out / prefix, max_per_shard=per_shard)
    return ShardSet(paths, list(metas), {k: m.num_frames for k, m in metas.items()}, metas)


@pytest.fixture(scope="session")
def av_shards(tmp_path_factory) -> ShardSet:
    """20 clean samples of 8..40 frames in 5 shards of 4, languages en/es, kinds sentence/word, with face video."""
    lengths = np.random.default_rng(1).integers(8, 41, size=20).tolist()
    return write_set(tmp_path_factory.mktemp("av_shards"), lengths, per_shard=4, kinds=("sentence", "sentence", "word"))


@pytest.fixture
def shard_writer(tmp_path):
    """``shard_writer(lengths, per_shard, **kw) -> ShardSet`` writing into this test's tmp_path."""
    counter = iter(range(1000))

    def write(lengths, per_shard=4, **kwargs) -> ShardSet:
        return write_set(tmp_path / f"set{next(counter)}", list(lengths), per_shard, **kwargs)

    return write


@pytest.fixture(scope="session")
def cpu_trainer():
    """``cpu_trainer(**kw) -> L.Trainer`` on the CPU without logger, checkpoints or progress output."""
    import lightning as L

    def make(**kwargs) -> L.Trainer:
        quiet = dict(
            accelerator="cpu",
            logger=False,
            enable_checkpointing=False,
            enable_progress_bar=False,
            enable_model_summary=False,
        )
        return L.Trainer(**{**quiet, **kwargs})

    return make


@pytest.fixture
def one_thread():
    """Torch on one thread for the test: the DDP tests' ranks compute with one thread each, and a sum split over
    another number of threads rounds differently (enough to move a gradient by 1e-5 and PESQ by 0.03)."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _tiny_corpus_config():
    from dataclasses import replace

    from data_prep.corpus.build import PRESETS

    return replace(PRESETS["tiny"], train_sentences=8, valid_sentences=2, test_sentences=2, max_per_shard=8)


TINY_CORPUS = _tiny_corpus_config()


@pytest.fixture(scope="session")
def tiny_corpus(tmp_path_factory) -> tuple[Path, dict]:
    """The embedded corpus at its smallest (8/2/2 sentences x 3 languages, word clips): ``(folder, manifest)``."""
    from data_prep.corpus.build import build_corpus

    out = tmp_path_factory.mktemp("corpus")
    return out, build_corpus(TINY_CORPUS, out, workers=2, progress=False)
