"""Schema records, audio/video codecs and shard writing round-trip; broken bytes raise named errors."""

from __future__ import annotations

import numpy as np
import pytest
import webdataset as wds

from av2av_lightning.data.codecs import (
    CorruptSampleError,
    decode_audio,
    decode_video,
    encode_audio,
    encode_video,
    resample,
)
from av2av_lightning.data.schema import SampleMeta, SchemaError
from av2av_lightning.data.shards import read_manifest, sample_record, shard_sizes, write_manifest, write_shards


def test_audio_round_trip_within_16_bit_precision():
    wave = 0.5 * np.sin(np.linspace(0, 200, 16000)).astype(np.float32)
    assert np.abs(decode_audio(encode_audio(wave)) - wave).max() < 1e-4


def test_audio_is_converted_to_16k_mono():
    stereo = np.stack([np.ones(44100), np.zeros(44100)], axis=1).astype(np.float32) * 0.5
    decoded = decode_audio(encode_audio(stereo, 44100, fmt="WAV"))
    assert decoded.ndim == 1 and len(decoded) == 16000
    assert np.allclose(decoded[1000:-1000], 0.25, atol=1e-3)


def test_resample_uses_exact_ratio():
    assert len(resample(np.zeros(22050, dtype=np.float32), 22050, 16000)) == 16000


@pytest.mark.parametrize("shape, gray", [((12, 96, 96), True), ((12, 96, 96, 3), False)])
def test_video_round_trip(shape, gray):
    rng = np.random.default_rng(0)
    # smooth content: H.264 at this quality keeps it within a few grey levels
    base = np.linspace(0, 255, 96, dtype=np.float32)[None, None, :] * np.ones(shape[:3])
    frames = (base + rng.normal(0, 1, shape[:3])).clip(0, 255).astype(np.uint8)
    if not gray:
        frames = np.stack([frames, 255 - frames, frames // 2], axis=-1)
    decoded = decode_video(encode_video(frames), gray=gray)
    assert decoded.shape == shape
    assert np.abs(decoded.astype(int) - frames).mean() < 3


def test_broken_bytes_raise_named_errors():
    with pytest.raises(CorruptSampleError, match="clip7: undecodable audio"):
        decode_audio(b"not flac", "clip7")
    with pytest.raises(CorruptSampleError, match="clip7: undecodable video"):
        decode_video(b"\x00" * 100, "clip7")
    truncated = encode_video(np.zeros((25, 96, 96), np.uint8))[:200]
    with pytest.raises(CorruptSampleError, match="clip7"):
        decode_video(truncated, "clip7")


def test_metadata_round_trip_and_errors():
    meta = SampleMeta("k1", "train", "fr", "spk01", "le chat noir", "s1", 40, phonemes=[("l", 0.0, 0.1)])
    assert SampleMeta.from_json(meta.to_json()) == meta
    with pytest.raises(SchemaError, match="shard3/k2: metadata lacks field\\(s\\) text"):
        SampleMeta.from_json(b'{"key": "k2", "lang": "en", "speaker": "s", "num_frames": 3}', "shard3/k2")
    with pytest.raises(SchemaError, match="num_frames must be positive"):
        SampleMeta.from_json({"key": "k", "lang": "en", "speaker": "s", "text": "a", "num_frames": 0})
    with pytest.raises(SchemaError, match="not valid JSON"):
        SampleMeta.from_json(b"{oops")


def test_shard_sizes_are_balanced():
    assert shard_sizes(10, 4) == [4, 3, 3]
    assert shard_sizes(8, 4) == [4, 4]
    assert shard_sizes(0, 4) == []


def test_shards_round_trip_and_are_reproducible(tmp_path):
    records = [sample_record(f"k{i}", b"{}", b"a" * i, b"v", b"f") for i in range(5)]
    paths = write_shards(records, 5, tmp_path / "a" / "train", max_per_shard=2)
    again = write_shards(records, 5, tmp_path / "b" / "train", max_per_shard=2)
    assert [p.name for p in paths] == ["train-000000.tar", "train-000001.tar", "train-000002.tar"]
    assert [p.read_bytes() for p in paths] == [p.read_bytes() for p in again]
    keys = [sample["__key__"] for sample in wds.WebDataset([str(p) for p in paths], shardshuffle=False)]
    assert keys == [f"k{i}" for i in range(5)]
    assert not list(tmp_path.rglob("*.partial"))


def test_manifest_round_trip(tmp_path):
    write_manifest(tmp_path / "manifest.json", {"name": "x"})
    assert read_manifest(tmp_path) == {"name": "x"}
    with pytest.raises(FileNotFoundError, match="nowhere: no corpus manifest"):
        read_manifest(tmp_path / "nowhere")


@pytest.mark.parametrize("levels", [np.arange(256), np.random.default_rng(3).integers(0, 256, 256)])
def test_fast_gray_decoding_equals_swscale(levels):
    """The luma lookup-table path gives exactly what FFmpeg's own yuv420p -> gray conversion gives."""
    import io

    import av
    from av.video.reformatter import VideoReformatter

    frames = np.broadcast_to(levels.astype(np.uint8).reshape(16, 16).repeat(6, 0).repeat(6, 1), (5, 96, 96)).copy()
    data = encode_video(frames)
    with av.open(io.BytesIO(data)) as container:
        reference = np.stack(
            [VideoReformatter().reformat(f, format="gray").to_ndarray() for f in container.decode(video=0)]
        )
    assert np.array_equal(decode_video(data), reference)
