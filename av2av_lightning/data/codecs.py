"""Audio (FLAC/WAV via soundfile) and video (H.264 MP4 via PyAV) to and from bytes.

Everything works in memory so shards never touch temporary files. Decoding failures
raise `CorruptSampleError` with the name of the sample, so a loader can skip and count.
"""

from __future__ import annotations

import io
from fractions import Fraction

import av
import numpy as np
import soundfile as sf
from av.video.reformatter import VideoReformatter
from scipy.signal import resample_poly

from av2av_lightning.data.schema import SAMPLE_RATE, VIDEO_FPS


class CorruptSampleError(ValueError):
    """A sample whose bytes cannot be decoded or whose streams do not fit together."""


def encode_audio(wave: np.ndarray, sample_rate: int = SAMPLE_RATE, fmt: str = "FLAC") -> bytes:
    """Mono float waveform in [-1, 1] -> 16-bit FLAC (or WAV) bytes."""
    buffer = io.BytesIO()
    sf.write(buffer, np.clip(np.asarray(wave, dtype=np.float32), -1.0, 1.0), sample_rate, format=fmt, subtype="PCM_16")
    return buffer.getvalue()


def to_mono(wave: np.ndarray) -> np.ndarray:
    return wave.mean(axis=1) if wave.ndim == 2 else wave


def resample(wave: np.ndarray, rate_in: int, rate_out: int = SAMPLE_RATE) -> np.ndarray:
    """Polyphase resampling with the exact rational ratio (e.g. 22050 -> 16000 is 320/441)."""
    if rate_in == rate_out:
        return wave.astype(np.float32, copy=False)
    ratio = Fraction(rate_out, rate_in)
    return resample_poly(wave, ratio.numerator, ratio.denominator).astype(np.float32)


def decode_audio(data: bytes, name: str = "<audio>", sample_rate: int | None = SAMPLE_RATE) -> np.ndarray:
    """Audio bytes -> float32 mono, converted to `sample_rate` (None keeps the file's rate)."""
    try:
        wave, rate = sf.read(io.BytesIO(data), dtype="float32", always_2d=False)
    except Exception as err:  # soundfile raises several types for broken data
        raise CorruptSampleError(f"{name}: undecodable audio ({err})") from None
    wave = to_mono(wave)
    if wave.size == 0:
        raise CorruptSampleError(f"{name}: audio has no samples")
    return wave if sample_rate is None else resample(wave, rate, sample_rate)


def encode_video(frames: np.ndarray, fps: int = VIDEO_FPS, crf: int = 18) -> bytes:
    """uint8 frames [F,H,W] (grayscale) or [F,H,W,3] (RGB) -> H.264 MP4 bytes (yuv420p)."""
    frames = np.asarray(frames, dtype=np.uint8)
    if frames.ndim not in (3, 4) or len(frames) == 0:
        raise ValueError(f"expected frames [F,H,W] or [F,H,W,3] with F > 0, got shape {frames.shape}")
    pixel_format = "gray" if frames.ndim == 3 else "rgb24"
    height, width = frames.shape[1:3]
    buffer = io.BytesIO()
    with av.open(buffer, mode="w", format="mp4") as container:
        stream = container.add_stream("libx264", rate=fps)
        stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
        # mbtree off: its floating-point propagation made x264 occasionally encode the same frames differently
        # (seen once in ~10 processes), which breaks reproducible shards; the size cost is small at this crf
        stream.options = {"crf": str(crf), "preset": "veryfast", "x264-params": "mbtree=0"}
        stream.thread_count = 1  # many small clips in parallel workers: threads only add overhead
        for frame in frames:
            for packet in stream.encode(av.VideoFrame.from_ndarray(frame, format=pixel_format)):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return buffer.getvalue()


# limited-range (16..235) luma to full-range gray, rounded as swscale's yuv420p -> gray conversion does
_LIMITED_TO_FULL = np.clip(np.round((np.arange(256) - 16) * 255 / 219), 0, 255).astype(np.uint8)


def _gray_frame(frame: av.VideoFrame, reformatter: VideoReformatter) -> np.ndarray:
    """Gray pixels of a frame; for limited-range yuv420p (what `encode_video` writes) the luma plane through a lookup
    table, identical to swscale's result at a third of the cost."""
    if frame.format.name != "yuv420p" or frame.color_range == 2:  # 2: full-range (JPEG) luma
        return reformatter.reformat(frame, format="gray").to_ndarray()
    plane = frame.planes[0]
    luma = np.frombuffer(plane, np.uint8).reshape(plane.height, plane.line_size)[:, : plane.width]
    return _LIMITED_TO_FULL[luma]


def _rgb_frame(frame: av.VideoFrame, reformatter: VideoReformatter) -> np.ndarray:
    return reformatter.reformat(frame, format="rgb24").to_ndarray()


def decode_video(data: bytes, name: str = "<video>", gray: bool = True) -> np.ndarray:
    """MP4 bytes -> uint8 frames [F,H,W] (gray) or [F,H,W,3] (RGB).

    One `VideoReformatter` per clip: `to_ndarray(format=...)` would build a pixel-format
    converter per frame, which costs more than decoding a 96x96 frame.
    """
    try:
        with av.open(io.BytesIO(data)) as container:
            if not container.streams.video:
                raise CorruptSampleError(f"{name}: no video stream")
            stream = container.streams.video[0]
            stream.thread_count = 1
            reformatter = VideoReformatter()
            convert = _gray_frame if gray else _rgb_frame
            frames = [convert(frame, reformatter) for frame in container.decode(stream)]
    except CorruptSampleError:
        raise
    except Exception as err:  # PyAV raises FFmpeg errors of many kinds for broken data
        raise CorruptSampleError(f"{name}: undecodable video ({err})") from None
    if not frames:
        raise CorruptSampleError(f"{name}: video has no frames")
    return np.stack(frames)
