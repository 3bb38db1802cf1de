"""LRS3-TED as published: ``ROOT/{pretrain,trainval,test}/SPEAKER/NNNNN.mp4`` + ``NNNNN.txt``.

The transcript file starts with ``Text:  THE WORDS`` and ``Conf:``, then (for most clips) a
table ``WORD START END ASDSCORE`` of word timings in seconds from the clip start. Text and
word labels are lowercased, as AV-HuBERT fine-tunes and ASR-BLEU scores them.

Splits: ``trainval`` -> train (minus a ``valid_fraction`` of its speakers, chosen by a hash
of the speaker id so the choice never changes when data is added), ``test`` -> test, and
``pretrain`` -> its own ``pretrain`` split when asked for (list its shards with train's for
AV-HuBERT pretraining).
"""

from __future__ import annotations

import zlib
from pathlib import Path

from av2av_lightning.data.schema import SampleMeta
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

LAYOUT = "ROOT/{pretrain,trainval,test}/SPEAKER_ID/NNNNN.mp4 with NNNNN.txt"
FOLDER_SPLITS = {"trainval": "train", "test": "test", "pretrain": "pretrain"}


def parse_transcript(path: Path) -> tuple[str, list[tuple[str, float, float]]]:
    """The ``Text:`` line (lowercased) and the word timings of an LRS3 ``.txt`` file."""
    lines = path.read_text(encoding="utf-8", errors="replace").splitlines()
    text = next((line.split(":", 1)[1].strip() for line in lines if line.startswith("Text:")), None)
    if text is None:
        raise ValueError(f"{path}: no 'Text:' line (expected an LRS3 transcript)")
    words = []
    header = next((i for i, line in enumerate(lines) if line.split()[:3] == ["WORD", "START", "END"]), None)
    for line in lines[header + 1 :] if header is not None else []:
        fields = line.split()
        if not fields:
            continue
        try:
            words.append((fields[0].lower(), float(fields[1]), float(fields[2])))
        except (IndexError, ValueError):
            raise ValueError(f"{path}: bad word timing line {line!r} (expected WORD START END ASDSCORE)") from None
    return text.lower(), words


def speaker_split(speaker: str, valid_fraction: float) -> str:
    """train or valid for a trainval speaker; a stable hash keeps each speaker on one side."""
    return "valid" if zlib.crc32(speaker.encode()) % 10_000 < valid_fraction * 10_000 else "train"


def list_samples(root: Path, valid_fraction: float = 0.0, pretrain: bool = False):
    """(tasks, skipped) for every clip of the wanted LRS3 folders."""
    tasks, skipped = [], []
    for folder, split in FOLDER_SPLITS.items():
        if folder == "pretrain" and not pretrain:
            continue
        for video in find_videos(root / folder, "*/*.mp4"):
            speaker, utterance = video.parent.name, video.stem
            key = make_key("lrs3", folder, speaker, utterance)
            transcript = video.with_suffix(".txt")
            try:
                text, words = parse_transcript(transcript)
            except OSError as err:
                skipped.append({"key": key, "reason": f"{transcript}: unreadable transcript ({err.strerror})"})
                continue
            except ValueError as err:
                skipped.append({"key": key, "reason": str(err)})
                continue
            sample_split = speaker_split(speaker, valid_fraction) if split == "train" else split
            meta = SampleMeta(
                key=key,
                split=sample_split,
                lang="en",
                speaker=speaker,
                text=text,
                sentence_id=f"{speaker}/{utterance}",
                num_frames=0,
                words=words,
            )
            tasks.append(SampleTask(meta, MediaSource.beside(video)))
    return tasks, skipped


def convert_lrs3(
    root: str | Path,
    out_dir: str | Path,
    options: ConvertOptions = DEFAULT_OPTIONS,
    valid_fraction: float = 0.0,
    pretrain: bool = False,
) -> Converted:
    root = Path(root)
    if not 0.0 <= valid_fraction < 1.0:
        raise ValueError(f"valid fraction must be in [0, 1), got {valid_fraction}")
    tasks, skipped = list_samples(root, valid_fraction, pretrain)
    if not tasks and not skipped:
        raise no_samples(root, "LRS3", LAYOUT)
    return convert(tasks, out_dir, "lrs3", "sentences", options, skipped=skipped)
