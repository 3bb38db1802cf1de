"""What one audio-visual sample is, on disk (WebDataset fields) and in memory.

Every stage reads the same shards, so the field names, rates and the metadata record
live here and nowhere else.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field

import numpy as np

SAMPLE_RATE = 16_000
VIDEO_FPS = 25
SAMPLES_PER_FRAME = SAMPLE_RATE // VIDEO_FPS  # 640: audio and video stay locked frame by frame
FACE_SIZE = 96
LIP_SIZE = 96

LANGUAGES = ("en", "es", "fr")
SPLITS = ("train", "valid", "test", "test_unseen")
KINDS = ("sentence", "word")

# WebDataset field names (file extensions inside the tar).
AUDIO_FIELD = "flac"
LIP_FIELD = "lip.mp4"
FACE_FIELD = "face.mp4"
META_FIELD = "json"
REQUIRED_FIELDS = (AUDIO_FIELD, LIP_FIELD, META_FIELD)


class SchemaError(ValueError):
    """A metadata record or sample that does not follow the schema."""


Timing = tuple[str, float, float]  # (label, start seconds, end seconds)


@dataclass
class SampleMeta:
    """Metadata of one sample; `phonemes` and `words` are (label, start_s, end_s) triples."""

    key: str
    split: str
    lang: str
    speaker: str
    text: str
    sentence_id: str
    num_frames: int
    kind: str = "sentence"
    label: str | None = None
    phonemes: list[Timing] = field(default_factory=list)
    words: list[Timing] = field(default_factory=list)

    def to_json(self) -> bytes:
        return json.dumps(asdict(self), ensure_ascii=False).encode("utf-8")

    @classmethod
    def from_json(cls, data: bytes | str | dict, source: str = "<metadata>") -> SampleMeta:
        """Parse and validate; errors name the source and the offending field."""
        try:
            record = data if isinstance(data, dict) else json.loads(data)
        except (json.JSONDecodeError, UnicodeDecodeError) as err:
            raise SchemaError(f"{source}: metadata is not valid JSON ({err})") from None
        if not isinstance(record, dict):
            raise SchemaError(f"{source}: metadata must be a JSON object, got {type(record).__name__}")
        missing = [name for name in ("key", "lang", "speaker", "text", "num_frames") if name not in record]
        if missing:
            raise SchemaError(f"{source}: metadata lacks field(s) {', '.join(missing)}")
        if record.get("kind", "sentence") not in KINDS:
            raise SchemaError(f"{source}: kind must be one of {KINDS}, got {record.get('kind')!r}")
        try:
            num_frames = int(record["num_frames"])
        except (TypeError, ValueError, OverflowError):
            raise SchemaError(f"{source}: num_frames must be an integer, got {record['num_frames']!r}") from None
        if num_frames <= 0:
            raise SchemaError(f"{source}: num_frames must be positive, got {num_frames}")
        known = {name: record[name] for name in cls.__dataclass_fields__ if name in record}
        known["num_frames"] = num_frames
        known.setdefault("split", "")
        known.setdefault("sentence_id", known["key"])
        for name in ("phonemes", "words"):
            known[name] = _timings(known.get(name, []), name, source)
        return cls(**known)


def _timings(items, name: str, source: str) -> list[tuple]:
    """``[[label, start, end], ...]`` as tuples; anything else is a `SchemaError` naming the field."""
    try:
        timings = [tuple(item) for item in items]
    except TypeError:
        raise SchemaError(f"{source}: {name} must be a list of [label, start, end], got {items!r}") from None
    if any(len(t) != 3 or not all(isinstance(x, (int, float)) for x in t[1:]) for t in timings):
        raise SchemaError(f"{source}: {name} must be a list of [label, start, end], got {items!r}")
    return timings


@dataclass
class AVSample:
    """One decoded sample: 16 kHz mono audio, grayscale lip frames, optional RGB face frames."""

    meta: SampleMeta
    audio: np.ndarray  # float32 [num_samples]
    lip: np.ndarray  # uint8 [num_frames, 96, 96]
    face: np.ndarray | None = None  # uint8 [num_frames, 96, 96, 3]

    @property
    def key(self) -> str:
        return self.meta.key
