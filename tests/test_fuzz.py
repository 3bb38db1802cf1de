"""Fuzzing the decoders and parsers with random bytes and malformed metadata: only the documented errors come out.

Decoders raise `CorruptSampleError` (converters: its subclass `MediaError`), metadata
`SchemaError`, text parsers a `ValueError` naming the file; anything else would crash a loader
or a converter instead of skipping the sample with a reason.
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from av2av_lightning.data.codecs import CorruptSampleError, decode_audio, decode_video, encode_audio, encode_video
from av2av_lightning.data.schema import SampleMeta, SchemaError
from data_prep.converters.lrs3 import parse_transcript
from data_prep.converters.media import MediaError, read_audio, read_boxes, read_lip_video
from data_prep.converters.muavic import read_translations, read_tsv

# derandomize: the same examples every run, so CI does not flake; new bugs show up when the strategies change
FAST = settings(max_examples=60, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow])

FLAC = encode_audio(np.sin(np.arange(1600) / 5).astype(np.float32) * 0.3)
MP4 = encode_video(np.full((3, 16, 16), 128, dtype=np.uint8))
BAD_BRAND = MP4[:8] + b"\x80" + MP4[9:]  # a non-UTF-8 byte in the 'ftyp' major brand (found by this fuzzer)


def mangled(valid: bytes) -> st.SearchStrategy[bytes]:
    """A valid file cut short, with random bytes spliced in, or pure noise."""
    cut = st.integers(0, len(valid)).map(lambda n: valid[:n])
    spliced = st.tuples(st.integers(0, len(valid)), st.binary(min_size=1, max_size=64)).map(
        lambda a: valid[: a[0]] + a[1] + valid[a[0] + len(a[1]) :]
    )
    return st.one_of(cut, spliced, st.binary(max_size=4096))


def temp_file(data: bytes | str, suffix: str) -> Path:
    folder = Path(tempfile.mkdtemp(prefix="fuzz"))
    path = folder / f"sample{suffix}"
    path.write_bytes(data if isinstance(data, bytes) else data.encode("utf-8", "surrogatepass"))
    return path


@FAST
@given(mangled(FLAC))
def test_decode_audio_raises_only_corrupt_sample(data):
    try:
        wave = decode_audio(data, name="fuzz.flac")
    except CorruptSampleError as err:
        assert "fuzz.flac" in str(err)
    else:
        assert wave.dtype == np.float32 and wave.ndim == 1 and wave.size > 0


@FAST
@given(mangled(MP4), st.booleans())
@example(BAD_BRAND, True)
def test_decode_video_raises_only_corrupt_sample(data, gray):
    try:
        frames = decode_video(data, name="fuzz.mp4", gray=gray)
    except CorruptSampleError as err:
        assert "fuzz.mp4" in str(err)
    else:
        assert frames.dtype == np.uint8 and len(frames) > 0


@FAST
@given(mangled(MP4))
@example(BAD_BRAND)
def test_converter_media_readers_raise_only_media_error(data):
    path = temp_file(data, ".mp4")
    for reader in (read_audio, read_lip_video):
        try:
            reader(path)
        except MediaError as err:
            assert str(path) in str(err)


JSON_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=True) | st.text(max_size=8),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=8), children, max_size=4),
    max_leaves=12,
)
META_FIELDS = ("key", "split", "lang", "speaker", "text", "sentence_id", "num_frames", "kind", "words", "phonemes")


@FAST
@given(st.dictionaries(st.sampled_from(META_FIELDS), JSON_VALUES, max_size=len(META_FIELDS)) | JSON_VALUES)
def test_sample_metadata_raises_only_schema_error(record):
    try:
        SampleMeta.from_json(json.dumps(record), source="shard:key")
    except SchemaError as err:
        assert "shard:key" in str(err)


@pytest.mark.parametrize("bad", [{"num_frames": float("inf")}, {"words": [1]}, {"phonemes": [None]}])
def test_metadata_with_bad_numbers_or_timings_is_a_schema_error(bad):
    record = {"key": "k", "lang": "en", "speaker": "s", "text": "t", "num_frames": 3, **bad}
    with pytest.raises(SchemaError, match="shard:key"):
        SampleMeta.from_json(json.dumps(record), source="shard:key")


@FAST
@given(st.binary(max_size=512))
def test_metadata_bytes_raise_only_schema_error(data):
    try:
        SampleMeta.from_json(data, source="shard:key")
    except SchemaError as err:
        assert "shard:key" in str(err)


BOX_TEXT = st.lists(
    st.lists(st.one_of(st.integers(-5, 500).map(str), st.text(max_size=4), st.just("nan")), max_size=6).map(" ".join),
    max_size=6,
).map("\n".join)


@FAST
@given(st.one_of(BOX_TEXT, st.text(max_size=64)), st.sampled_from([".bbox.txt", ".bbox.csv"]))
def test_bbox_text_raises_only_media_error(text, suffix):
    path = temp_file(text, suffix)
    try:
        boxes = read_boxes(path)
    except MediaError as err:
        assert str(path) in str(err)
    else:
        assert boxes.ndim == 2 and boxes.shape[1] == 4


@FAST
@given(JSON_VALUES)
def test_bbox_json_raises_only_media_error(value):
    path = temp_file(json.dumps(value), ".bbox.json")
    try:
        read_boxes(path)
    except MediaError as err:
        assert str(path) in str(err)


LRS3_LINES = st.lists(
    st.one_of(
        st.just("Text: hello world"),
        st.just("WORD START END ASDSCORE"),
        st.text(max_size=12),
        st.tuples(st.text(max_size=5), st.text(max_size=5), st.text(max_size=5)).map(" ".join),
    ),
    max_size=8,
).map("\n".join)


@FAST
@given(LRS3_LINES)
def test_lrs3_transcript_raises_only_value_error_naming_the_file(text):
    path = temp_file(text, ".txt")
    try:
        sentence, words = parse_transcript(path)
    except ValueError as err:
        assert str(path) in str(err)
    else:
        assert isinstance(sentence, str) and all(len(word) == 3 for word in words)


@FAST
@given(st.lists(st.one_of(st.text(max_size=20), JSON_VALUES.map(json.dumps)), max_size=5).map("\n".join))
def test_muavic_parsers_raise_only_value_error_naming_the_file(text):
    for parse, suffix in ((read_tsv, ".tsv"), (read_translations, ".jsonl")):
        path = temp_file(text, suffix)
        try:
            parse(path)
        except ValueError as err:
            assert str(path) in str(err)
