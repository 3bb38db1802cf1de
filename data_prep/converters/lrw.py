"""LRW as published: ``ROOT/WORD/{train,val,test}/WORD_NNNNN.mp4`` (+ optional ``WORD_NNNNN.txt``).

Each clip is 29 frames (1.16 s) with the word spoken in the middle; the ``.txt`` file's
``Duration: 0.53 seconds`` line gives the word's length, so its timing is that span centred
in the clip. Samples are ``kind="word"`` with the lowercased word as label and text; LRW
has no speaker ids, so speaker is ``"unknown"``.
"""

from __future__ import annotations

import re
from pathlib import Path

from av2av_lightning.data.schema import VIDEO_FPS, SampleMeta
from data_prep.converters.common import (
    DEFAULT_OPTIONS,
    Converted,
    ConvertOptions,
    SampleTask,
    convert,
    find_videos,
    make_key,
    no_samples,
)
from data_prep.converters.media import MediaSource
from data_prep.corpus.word_clips import WORD_CLIP_FRAMES

LAYOUT = "ROOT/WORD/{train,val,test}/WORD_NNNNN.mp4"
FOLDER_SPLITS = {"train": "train", "val": "valid", "test": "test"}
DURATION = re.compile(r"^Duration:\s*([0-9.]+)", re.MULTILINE)


def word_timing(txt: Path, label: str) -> list[tuple[str, float, float]]:
    """The word's (label, start, end), centred in the clip, if ``txt`` gives its duration."""
    if not txt.is_file():
        return []
    match = DURATION.search(txt.read_text(encoding="utf-8", errors="replace"))
    if match is None:
        return []
    clip = WORD_CLIP_FRAMES / VIDEO_FPS
    duration = min(float(match.group(1)), clip)
    start = (clip - duration) / 2
    return [(label, round(start, 4), round(start + duration, 4))]


def list_samples(root: Path) -> list[SampleTask]:
    tasks = []
    for word_dir in sorted(p for p in root.iterdir() if p.is_dir()) if root.is_dir() else []:
        label = word_dir.name.lower()
        for folder, split in FOLDER_SPLITS.items():
            for video in find_videos(word_dir / folder):
                meta = SampleMeta(
                    key=make_key("lrw", split, video.stem),
                    split=split,
                    lang="en",
                    speaker="unknown",
                    text=label,
                    sentence_id=video.stem,
                    num_frames=0,
                    kind="word",
                    label=label,
                    words=word_timing(video.with_suffix(".txt"), label),
                )
                tasks.append(SampleTask(meta, MediaSource.beside(video), num_frames=WORD_CLIP_FRAMES))
    return tasks


def convert_lrw(root: str | Path, out_dir: str | Path, options: ConvertOptions = DEFAULT_OPTIONS) -> Converted:
    root = Path(root)
    tasks = list_samples(root)
    if not tasks:
        raise no_samples(root, "LRW", LAYOUT)
    return convert(tasks, out_dir, "lrw", "words", options)
