"""A picture of a corpus: durations per language and split, and one utterance's lips against its sound."""

from __future__ import annotations

import tarfile
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np

from av2av_lightning.data.codecs import decode_audio, decode_video
from av2av_lightning.data.schema import SAMPLES_PER_FRAME, VIDEO_FPS, SampleMeta
from evaluation.tables import save_figure


def lip_motion(lip: np.ndarray) -> np.ndarray:
    """Per frame, how far the mouth crop is from the clip's most closed-looking frame (fewest dark pixels)."""
    frames = lip.astype(np.float32)
    rest = frames[np.argmin((frames < 60).sum(axis=(1, 2)))]
    return np.abs(frames - rest).mean(axis=(1, 2))


def audio_envelope(wave: np.ndarray) -> np.ndarray:
    """RMS per video frame (640 samples at 16 kHz)."""
    frames = len(wave) // SAMPLES_PER_FRAME
    return np.sqrt((wave[: frames * SAMPLES_PER_FRAME].reshape(frames, -1) ** 2).mean(axis=1))


def _first_samples(shard: Path, count: int) -> list[dict]:
    samples: dict[str, dict] = {}
    with tarfile.open(shard) as tar:
        for member in tar.getmembers():
            key, field = member.name.split(".", 1)
            if key not in samples and len(samples) == count:
                break
            samples.setdefault(key, {})[field] = tar.extractfile(member).read()
    return list(samples.values())


def plot_corpus(corpus_dir: str | Path, manifest: dict, out_png: str | Path) -> Path:
    """Hours per split and language (left) and lips vs sound of one training utterance (right)."""
    corpus_dir, out_png = Path(corpus_dir), Path(out_png)
    figure, (bars, trace) = plt.subplots(1, 2, figsize=(13, 4.2), gridspec_kw={"width_ratios": [1, 2]})
    splits = manifest["subsets"]["sentences"]
    languages = manifest["languages"]
    for offset, lang in enumerate(languages):
        share = [
            splits[s]["hours"] * splits[s]["languages"].get(lang, 0) / max(splits[s]["samples"], 1) for s in splits
        ]
        bars.bar(np.arange(len(splits)) + 0.27 * (offset - 1), share, width=0.27, label=lang)
    bars.set_xticks(range(len(splits)), list(splits))
    bars.set_ylabel("hours of speech")
    bars.set_title(f"corpus '{manifest['name']}'")
    bars.legend()

    sample = _first_samples(corpus_dir / splits["train"]["shards"][0], 1)[0]
    meta = SampleMeta.from_json(sample["json"])
    motion = lip_motion(decode_video(sample["lip.mp4"], meta.key))
    envelope = audio_envelope(decode_audio(sample["flac"], meta.key))
    seconds = (np.arange(len(motion)) + 0.5) / VIDEO_FPS
    trace.plot(seconds, envelope / envelope.max(), label="audio RMS")
    trace.plot(seconds, motion / motion.max(), label="lip motion (video)")
    for label, start, _ in meta.phonemes:
        trace.text(start, 1.03, label, fontsize=7)
    correlation = np.corrcoef(motion, envelope)[0, 1]
    trace.set_title(f"[{meta.lang}] {meta.text}  (r = {correlation:.2f})", fontsize=9)
    trace.set_xlabel("seconds")
    trace.legend(loc="lower right")
    return save_figure(figure, out_png, dpi=110)
