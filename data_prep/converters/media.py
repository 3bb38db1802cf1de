"""Read a real dataset's media into the shard format: 25 fps, 16 kHz mono, 96x96 crops.

Published datasets come with any frame rate, sample rate and channel count, and give the
mouth region in one of three ways; all are accepted, looked up beside ``NAME.mp4``:

- ``NAME.lip.mp4``: a mouth-ROI video (as AV-HuBERT's preprocessing writes it), converted
  to gray and resized to 96x96;
- ``NAME.bbox.txt`` / ``NAME.bbox.csv``: one mouth box per frame of ``NAME.mp4``, one line
  ``x0 y0 x1 y1`` in pixels (separated by spaces or commas; blank lines and ``#`` comments
  ignored), or ``NAME.bbox.json``: a JSON list of ``[x0, y0, x1, y1]``. The box is cropped
  from each frame and resized to 96x96, so give square boxes to keep the aspect ratio;
- neither: the clip is taken to be face-centred (LRS3 and LRW are published that way) and
  the lower middle of the frame, ``DEFAULT_MOUTH_BOX``, is the mouth.

The face stream is the whole video resized to 96x96 (the datasets ship face-centred crops).
Everything reads through PyAV; failures raise `MediaError` naming the file, so a converter
can skip and count the sample.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import av
import numpy as np

from av2av_lightning.data.codecs import CorruptSampleError, resample
from av2av_lightning.data.schema import FACE_SIZE, LIP_SIZE, SAMPLES_PER_FRAME, VIDEO_FPS

LIP_SUFFIX = ".lip.mp4"
BBOX_SUFFIXES = (".bbox.txt", ".bbox.csv", ".bbox.json")
DEFAULT_MOUTH_BOX = (0.25, 0.5, 0.75, 1.0)  # fractions of width/height: lower middle of a face crop
MAX_FRAME_DRIFT = 3  # frames a separate lip video may differ from its face video at 25 fps
GRAY_WEIGHTS = np.array([0.299, 0.587, 0.114], dtype=np.float32)  # ITU-R BT.601 luma


class MediaError(CorruptSampleError):
    """A media file that is missing, unreadable, or does not fit the other files of its sample."""


@dataclass(frozen=True)
class MediaSource:
    """Where one sample's streams come from.

    ``audio`` None means the video's own audio track; ``lip`` a separate mouth-ROI video;
    ``bbox`` per-frame mouth boxes in ``video``; ``video_is_lip`` says the video itself is
    already the mouth ROI (MuAViC), so there is no face stream.
    """

    video: Path
    audio: Path | None = None
    lip: Path | None = None
    bbox: Path | None = None
    video_is_lip: bool = False

    @classmethod
    def beside(cls, video: Path, audio: Path | None = None) -> MediaSource:
        """The source of ``NAME.mp4`` with its ``NAME.lip.mp4`` or ``NAME.bbox.*`` when present."""
        stem = video.name[: -len(video.suffix)] if video.suffix else video.name
        lip = video.with_name(stem + LIP_SUFFIX)
        bbox = next((video.with_name(stem + s) for s in BBOX_SUFFIXES if video.with_name(stem + s).exists()), None)
        return cls(video, audio, lip if lip.exists() else None, bbox)

    @property
    def mouth_is_guessed(self) -> bool:
        return not (self.video_is_lip or self.lip or self.bbox)


@dataclass
class Clip:
    """One sample's decoded streams, locked together: len(audio) == len(lip) * 640."""

    audio: np.ndarray  # float32 [num_frames * 640]
    lip: np.ndarray  # uint8 [F, 96, 96]
    face: np.ndarray | None  # uint8 [F, 96, 96, 3]


def is_lip_video(path: Path) -> bool:
    return path.name.endswith(LIP_SUFFIX)


def _open(path: Path):
    if not path.is_file():
        raise MediaError(f"{path}: no such file")
    try:
        return av.open(str(path))
    except (av.FFmpegError, UnicodeDecodeError) as err:  # PyAV decodes container metadata as UTF-8
        raise MediaError(f"{path}: unreadable media file ({err})") from None


def resize(frames: np.ndarray, size: int) -> np.ndarray:
    """Bilinear resize of uint8 frames [F,H,W] or [F,H,W,C] to [F,size,size(,C)] (pixel centres aligned)."""

    def axis(n_in: int):
        pos = np.clip((np.arange(size) + 0.5) * n_in / size - 0.5, 0, n_in - 1)
        lo = np.floor(pos).astype(int)
        return lo, np.minimum(lo + 1, n_in - 1), (pos - lo).astype(np.float32)

    y0, y1, fy = axis(frames.shape[1])
    x0, x1, fx = axis(frames.shape[2])
    extra = (1,) * (frames.ndim - 3)
    image = frames.astype(np.float32)
    fy = fy.reshape(1, size, 1, *extra)
    rows = image[:, y0] * (1 - fy) + image[:, y1] * fy
    fx = fx.reshape(1, 1, size, *extra)
    out = rows[:, :, x0] * (1 - fx) + rows[:, :, x1] * fx
    return np.clip(np.rint(out), 0, 255).astype(np.uint8)


def to_gray(rgb: np.ndarray) -> np.ndarray:
    return np.clip(np.rint(rgb.astype(np.float32) @ GRAY_WEIGHTS), 0, 255).astype(np.uint8)


def crop(frame: np.ndarray, box, index: int, name: Path) -> np.ndarray:
    """The pixels of ``box`` (x0, y0, x1, y1), clipped to the frame; an empty box is an error."""
    height, width = frame.shape[:2]
    x0, y0, x1, y1 = (int(round(v)) for v in box)
    x0, x1 = max(x0, 0), min(x1, width)
    y0, y1 = max(y0, 0), min(y1, height)
    if x1 <= x0 or y1 <= y0:
        raise MediaError(f"{name}: box {index} {tuple(box)} lies outside the {width}x{height} frame")
    return frame[y0:y1, x0:x1]


def read_boxes(path: Path) -> np.ndarray:
    """Per-frame mouth boxes [F, 4] from a ``.bbox.txt/.csv`` (x0 y0 x1 y1 per line) or ``.bbox.json`` file."""
    try:
        text = path.read_text()
    except OSError as err:
        raise MediaError(f"{path}: unreadable box file ({err.strerror})") from None
    try:
        if path.suffix == ".json":
            rows = json.loads(text)
        else:
            lines = (line.split("#", 1)[0].replace(",", " ").split() for line in text.splitlines())
            rows = [[float(v) for v in line] for line in lines if line]
        boxes = np.asarray(rows, dtype=np.float64)
    except (ValueError, TypeError) as err:
        raise MediaError(f"{path}: expected one 'x0 y0 x1 y1' box per frame ({err})") from None
    if boxes.ndim != 2 or boxes.shape[1] != 4 or len(boxes) == 0:
        raise MediaError(f"{path}: expected one 'x0 y0 x1 y1' box per frame, got shape {boxes.shape}")
    return boxes


def frame_indices(times: np.ndarray, frame_duration: float, fps: int = VIDEO_FPS) -> np.ndarray:
    """For each output frame at ``i / fps``, the source frame nearest in time (any rate -> ``fps``)."""
    times = times - times[0]
    count = max(1, int(round((times[-1] + frame_duration) * fps)))
    if len(times) == 1:
        return np.zeros(count, dtype=int)
    targets = np.arange(count) / fps
    after = np.clip(np.searchsorted(times, targets), 1, len(times) - 1)
    before = after - 1
    nearer_before = (targets - times[before]) <= (times[after] - targets)
    return np.where(nearer_before, before, after)


def decode_video(path: Path, per_frame) -> tuple[list, np.ndarray]:
    """``per_frame(index, rgb)`` for every frame of the first video stream, resampled to 25 fps.

    Each frame is reduced (cropped, resized) as it is decoded so a minute-long clip never
    sits in memory at full resolution; the 25 fps index map is applied to the results.
    """
    with _open(path) as container:
        if not container.streams.video:
            raise MediaError(f"{path}: no video stream")
        stream = container.streams.video[0]
        rate = stream.average_rate or stream.guessed_rate or VIDEO_FPS
        results, times = [], []
        try:
            for index, frame in enumerate(container.decode(stream)):
                times.append(frame.time if frame.time is not None else index / float(rate))
                results.append(per_frame(index, frame.to_ndarray(format="rgb24")))
        except av.FFmpegError as err:
            raise MediaError(f"{path}: undecodable video ({err})") from None
    if not results:
        raise MediaError(f"{path}: video has no frames")
    indices = frame_indices(np.asarray(times, dtype=np.float64), 1.0 / float(rate))
    return [results[i] for i in indices], np.asarray(times)


def read_lip_video(path: Path) -> np.ndarray:
    """A mouth-ROI video as gray [F, 96, 96] at 25 fps."""
    frames, _ = decode_video(path, lambda _, rgb: resize(to_gray(rgb)[None], LIP_SIZE)[0])
    return np.stack(frames)


def read_face(path: Path) -> np.ndarray:
    """The whole (face-centred) video as RGB [F, 96, 96, 3] at 25 fps."""
    frames, _ = decode_video(path, lambda _, rgb: resize(rgb[None], FACE_SIZE)[0])
    return np.stack(frames)


def read_face_and_mouth(path: Path, boxes: np.ndarray | None, box_file: Path | None, want_face: bool):
    """Face [F,96,96,3] (or None) and mouth crops [F,96,96] from one decode of ``path``."""

    def per_frame(index: int, rgb: np.ndarray):
        if boxes is None:
            h, w = rgb.shape[:2]
            box = (
                DEFAULT_MOUTH_BOX[0] * w,
                DEFAULT_MOUTH_BOX[1] * h,
                DEFAULT_MOUTH_BOX[2] * w,
                DEFAULT_MOUTH_BOX[3] * h,
            )
        elif index < len(boxes):
            box = boxes[index]
        else:
            return None, None  # counted below: the error names both counts
        mouth = resize(to_gray(crop(rgb, box, index, box_file or path))[None], LIP_SIZE)[0]
        return (resize(rgb[None], FACE_SIZE)[0] if want_face else None), mouth

    frames, times = decode_video(path, per_frame)
    if boxes is not None and len(boxes) != len(times):
        raise MediaError(f"{box_file}: {len(boxes)} boxes for the {len(times)} frames of {path}")
    face = np.stack([f for f, _ in frames]) if want_face else None
    return face, np.stack([m for _, m in frames])


def read_audio(path: Path) -> np.ndarray:
    """The first audio stream of any file PyAV reads, as float32 16 kHz mono."""
    with _open(path) as container:
        if not container.streams.audio:
            raise MediaError(f"{path}: no audio stream")
        stream = container.streams.audio[0]
        resampler = av.AudioResampler(format="fltp")  # planar float, keeping rate and channels
        chunks, rate = [], stream.rate
        try:
            for frame in container.decode(stream):
                rate = frame.sample_rate
                chunks.extend(out.to_ndarray() for out in resampler.resample(frame))
            chunks.extend(out.to_ndarray() for out in resampler.resample(None))
        except av.FFmpegError as err:
            raise MediaError(f"{path}: undecodable audio ({err})") from None
    if not chunks:
        raise MediaError(f"{path}: audio stream has no samples")
    wave = np.concatenate(chunks, axis=1).mean(axis=0)
    return resample(wave, int(rate))


def fit_frames(frames: np.ndarray, count: int) -> np.ndarray:
    """Trim, or pad by repeating the last frame, to ``count`` frames."""
    return frames[np.minimum(np.arange(count), len(frames) - 1)]


def fit_audio(wave: np.ndarray, num_frames: int) -> np.ndarray:
    """Trim or zero-pad to exactly ``num_frames * 640`` samples, so audio and video stay locked."""
    out = np.zeros(num_frames * SAMPLES_PER_FRAME, dtype=np.float32)
    length = min(len(wave), len(out))
    out[:length] = wave[:length]
    return out


def load_clip(source: MediaSource, face: bool = True, num_frames: int | None = None) -> Clip:
    """Decode one sample's streams at 25 fps / 16 kHz; ``num_frames`` forces a fixed length (LRW)."""
    face_frames = None
    if source.video_is_lip:
        lip = read_lip_video(source.video)
    elif source.lip is not None:
        lip = read_lip_video(source.lip)
        if face:
            face_frames = read_face(source.video)
            if abs(len(face_frames) - len(lip)) > MAX_FRAME_DRIFT:
                raise MediaError(
                    f"{source.lip}: {len(lip)} frames at 25 fps, but {source.video} has {len(face_frames)}"
                )
    else:
        boxes = read_boxes(source.bbox) if source.bbox is not None else None
        face_frames, lip = read_face_and_mouth(source.video, boxes, source.bbox, face)
    count = num_frames or len(lip)
    audio = fit_audio(read_audio(source.audio or source.video), count)
    return Clip(audio, fit_frames(lip, count), None if face_frames is None else fit_frames(face_frames, count))
