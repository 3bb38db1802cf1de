"""The AV2AV inference pipeline: a talking-face clip in one language -> the same face and voice in another.

Stages, each from its own checkpoint (named together in one `PipelineConfig`):

1. **units**: the AV-HuBERT encoder (`load_encoder`: pretrained or aligned by mutual learning) on the asked-for input (``av``, ``audio`` or ``video``; a
   missing modality is zeros, as in AV-HuBERT's modality dropout), then a k-means quantizer on one layer or the
   model's own label heads (`data_prep.units`), consecutive repeats removed;
2. **translation**: the unit translator (`load_translator`) with language tags, beam search or greedy;
3. **speaker**: the source speaker's embedding (`load_speaker_encoder`) from the clip's audio, when it has any;
4. **vocoder**: the unit HiFi-GAN (`load_unit_vocoder`) predicts a 50 Hz duration per unit and synthesises 320
   samples per unit;
5. **face**: the unit-driven face renderer (`load_face_renderer`) draws one 96x96 frame per 2 units (25 fps) from
   the masked source frame and the clip's first frame as reference (as its validation does). When the
   translation is longer than the source, the source frames play back and forth (`pingpong_indices`).

The output is locked: ``len(wave) == 640 * frames`` (the speech is zero-padded to a whole frame). Identity comes
from whatever the clip holds (a video-only request of a clip with sound still takes its voice from the sound);
only the encoder is restricted to the asked-for modalities. A clip without video (a WAV) gives speech only.

Real footage (frames larger than a prepared crop, or ``real_footage=True``) goes through `face_tracking`: the face
and mouth crops are cut along the tracked landmarks, and the rendered faces are pasted back into the original
frames, so the output keeps the input's resolution.
"""

from __future__ import annotations

import math
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import av
import numpy as np
import torch
import yaml

from av2av_lightning.checkpoints import load_encoder
from av2av_lightning.data.schema import SAMPLE_RATE, SAMPLES_PER_FRAME, VIDEO_FPS, SampleMeta
from av2av_lightning.data.transforms import face_transform
from av2av_lightning.face_rendering import load_face_renderer
from av2av_lightning.face_tracking import FaceTrack, is_footage, track_faces
from av2av_lightning.models.face_renderer import UNITS_PER_FRAME, mask_lower_half, unit_windows
from av2av_lightning.models.hifigan import durations_from_log
from av2av_lightning.models.mel_spectrum import mean_voice_mels
from av2av_lightning.models.unit_translator import pad_tokens
from av2av_lightning.speaker_encoding import load_speaker_encoder
from av2av_lightning.translation import load_translator
from av2av_lightning.vocoder import load_unit_vocoder
from data_prep.clustering.kmeans import ClusterSample, KMeansQuantizer, model_layer_source
from data_prep.converters.media import (
    MediaSource,
    fit_audio,
    fit_frames,
    read_audio,
    read_boxes,
    read_face,
    read_face_and_mouth,
    read_lip_video,
)
from data_prep.units import dedup, expand, head_source

INPUTS = ("av", "audio", "video")
MIN_FRAMES = 5  # one SyncNet window: anything shorter has no lip motion to speak of
RENDER_CHUNK = 64  # frames rendered per forward pass (bounds memory on long clips)

__all__ = [
    "INPUTS",
    "MIN_FRAMES",
    "AV2AVPipeline",
    "PipelineConfig",
    "SourceClip",
    "Translation",
    "load_source_clip",
    "pingpong_indices",
    "write_mp4",
]


# ---------------------------------------------------------------------------- configuration


@dataclass
class PipelineConfig:
    """Which checkpoint serves each stage, and how to decode.

    Units come either from ``quantizer`` (a ``kmeans.npz``) on encoder ``layer`` (1-based), or from the encoder's
    label heads (``heads: true``). ``face_renderer`` and ``speaker_encoder`` may be left out (speech only; no
    speaker conditioning). ``transcriber`` is a `build_transcriber` spec (``"whisper:DIR"``, ``"ctc:CKPT"``).
    Relative paths are relative to the working directory.
    """

    encoder: str
    translator: str
    vocoder: str
    face_renderer: str | None = None
    speaker_encoder: str | None = None
    quantizer: str | None = None
    layer: int | None = None
    heads: bool = False
    beam_size: int = 5
    len_penalty: float = 1.0
    max_len_a: float = 1.5
    max_len_b: int = 10
    max_seconds: float = 60.0
    transcriber: str | dict | None = None
    device: str = "cpu"

    def __post_init__(self) -> None:
        if self.heads and (self.quantizer or self.layer is not None):
            raise ValueError("pipeline: heads reads the encoder's label heads; give no quantizer or layer")
        if not self.heads and (self.quantizer is None or self.layer is None):
            raise ValueError("pipeline: give quantizer and layer (k-means units of that layer), or heads: true")
        if self.beam_size < 1:
            raise ValueError(f"pipeline: beam_size must be >= 1, got {self.beam_size}")
        if self.max_seconds <= 0:
            raise ValueError(f"pipeline: max_seconds must be positive, got {self.max_seconds}")

    @classmethod
    def from_yaml(cls, path: str | Path) -> PipelineConfig:
        """A YAML mapping of this class's fields; unknown or missing keys are one-line errors naming the file."""
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"{path}: no such pipeline config")
        try:
            values = yaml.safe_load(path.read_text())
        except yaml.YAMLError as err:
            raise ValueError(f"{path}: not valid YAML ({str(err).splitlines()[0]})") from None
        if not isinstance(values, dict):
            raise ValueError(f"{path}: a pipeline config must be a mapping of stage checkpoints")
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ValueError(f"{path}: unknown pipeline key(s) {unknown}; expected some of {sorted(known)}")
        missing = [name for name in ("encoder", "translator", "vocoder") if not values.get(name)]
        if missing:
            raise ValueError(f"{path}: the pipeline needs {', '.join(missing)}")
        try:
            return cls(**values)
        except ValueError as err:
            raise ValueError(f"{path}: {err}") from None


# ---------------------------------------------------------------------------- input


@dataclass
class SourceClip:
    """A clip at 25 fps / 16 kHz: ``wave`` [640 F] float32, ``lip`` [F, 96, 96] and ``face`` [F, 96, 96, 3] uint8;
    a stream the clip does not have is None. ``track`` holds the original frames of real footage."""

    name: str
    num_frames: int
    wave: np.ndarray | None = None
    lip: np.ndarray | None = None
    face: np.ndarray | None = None
    track: FaceTrack | None = None

    def check(self, input: str, max_seconds: float) -> None:
        """The streams ``input`` needs are there and the length is within [MIN_FRAMES, max_seconds]."""
        if input not in INPUTS:
            raise ValueError(f"input modality must be one of {', '.join(INPUTS)}, got {input!r}")
        if input in ("av", "audio") and self.wave is None:
            raise ValueError(f"{self.name}: no audio track, but input {input!r} needs audio")
        if input in ("av", "video") and self.lip is None:
            raise ValueError(f"{self.name}: no video track, but input {input!r} needs video")
        _check_length(self.name, self.num_frames / VIDEO_FPS, max_seconds)

    def paste_back(self, faces: np.ndarray) -> np.ndarray:
        """Rendered faces [F, 96, 96, 3] in this clip's original frames (real footage: pasted along the track, whose
        frames ping-pong as the render's poses did); crops are returned as they are."""
        if self.track is None:
            return faces
        return self.track.paste(faces, pingpong_indices(len(self.track), len(faces)))


def _check_length(name: str, seconds: float, max_seconds: float) -> None:
    if seconds * VIDEO_FPS < MIN_FRAMES:
        raise ValueError(
            f"{name}: too short ({seconds:.2f} s); a clip needs at least {MIN_FRAMES} frames at {VIDEO_FPS} fps"
        )
    if seconds > max_seconds:
        raise ValueError(f"{name}: too long ({seconds:.1f} s); at most {max_seconds:g} s (max_seconds)")


def _probe(path: Path) -> tuple[bool, bool, float | None]:
    """(has audio, has video, duration in seconds or None) without decoding."""
    try:
        with av.open(str(path)) as container:
            duration = container.duration / av.time_base if container.duration else None
            return bool(container.streams.audio), bool(container.streams.video), duration
    except av.FFmpegError as err:
        raise ValueError(f"{path}: unreadable media file ({err})") from None


def _read_video(
    path: Path, real_footage: bool | None, face_index: int | None
) -> tuple[np.ndarray, np.ndarray, FaceTrack | None]:
    """Face [F, 96, 96, 3] and mouth crops [F, 96, 96] at 25 fps, and the face track of real footage.

    Real footage (``real_footage``; None: a ``face_index`` is given, or frames larger than a prepared crop and no
    mouth files beside it) is tracked; otherwise the converters' ``NAME.lip.mp4`` / ``NAME.bbox.*`` beside the file are used when present
    (else the lower middle of the frame is the mouth)."""
    source = MediaSource.beside(path)
    if real_footage is None:
        real_footage = face_index is not None or (source.mouth_is_guessed and is_footage(path))
    if real_footage:
        track = track_faces(path, face_index)
        return track.face_crops(), track.mouth_crops(), track
    if source.lip is not None:
        return read_face(path), read_lip_video(source.lip), None
    boxes = read_boxes(source.bbox) if source.bbox is not None else None
    return *read_face_and_mouth(path, boxes, source.bbox, True), None


def load_source_clip(
    path: str | Path,
    input: str = "av",
    max_seconds: float = 60.0,
    real_footage: bool | None = None,
    face_index: int | None = None,
) -> SourceClip:
    """Decode a video (with or without sound) or an audio file, converting any rate and channel count to 16 kHz
    mono / 25 fps; the streams ``input`` needs must be there and the length within limits (one-line errors).
    ``real_footage`` / ``face_index``: see `_read_video` and `face_tracking.pick_faces`."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such input file")
    has_audio, has_video, duration = _probe(path)
    if duration is not None:
        _check_length(str(path), duration, max_seconds)
    face = lip = wave = track = None
    if has_video:
        face, lip, track = _read_video(path, real_footage, face_index)
    if has_audio:
        wave = read_audio(path)
    frames = len(lip) if lip is not None else int(round(len(wave) / SAMPLES_PER_FRAME)) if wave is not None else 0
    clip = SourceClip(str(path), frames, None if wave is None else fit_audio(wave, frames), lip, face, track)
    clip.check(input, max_seconds)
    if face is not None:
        clip.face = fit_frames(face, frames)
    return clip


def pingpong_indices(length: int, count: int) -> np.ndarray:
    """``count`` source frame indices playing ``length`` frames forwards, then backwards, and so on
    (0 1 2 1 0 1 2 ... for 3 frames), so a longer output never jumps from the last frame to the first."""
    if length < 1:
        raise ValueError(f"ping-pong needs at least one source frame, got {length}")
    if length == 1:
        return np.zeros(count, dtype=np.int64)
    period = 2 * (length - 1)
    phase = np.arange(count) % period
    return np.where(phase < length, phase, period - phase)


# ---------------------------------------------------------------------------- the pipeline


@dataclass
class Translation:
    """The output of one clip: speech ``wave`` [640 F] at 16 kHz, ``face`` [F, 96, 96, 3] uint8 at 25 fps (None when
    the clip had no face; for real footage the original frames [F, H, W, 3] with the face pasted back), the
    de-duplicated target units and their 50 Hz durations, and seconds per stage."""

    wave: np.ndarray
    face: np.ndarray | None
    units: list[int]
    durations: list[int]
    source_units: list[int]
    src_lang: str
    tgt_lang: str
    input: str
    seconds: dict[str, float] = field(default_factory=dict)
    transcript: str | None = None

    @property
    def num_frames(self) -> int:
        return len(self.wave) // SAMPLES_PER_FRAME

    def summary(self) -> dict[str, Any]:
        """What the JSON beside an output holds."""
        return {
            "src_lang": self.src_lang,
            "tgt_lang": self.tgt_lang,
            "input": self.input,
            "frames": self.num_frames,
            "seconds_of_speech": len(self.wave) / SAMPLE_RATE,
            "source_units": self.source_units,
            "units": self.units,
            "durations": self.durations,
            "transcript": self.transcript,
            "stage_seconds": self.seconds,
        }


class StageTimer:
    """Seconds per stage, added up under a name."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}

    @contextmanager
    def __call__(self, name: str) -> Iterator[None]:
        start = time.perf_counter()
        try:
            yield
        finally:
            self.seconds[name] = self.seconds.get(name, 0.0) + time.perf_counter() - start


class AV2AVPipeline:
    """Every stage loaded once; `translate` runs a clip through them. Stage checkpoints of the wrong kind and unit
    inventories that do not fit together are one-line errors at construction."""

    def __init__(self, config: PipelineConfig) -> None:
        self.config = config
        self.device = torch.device(config.device)
        self.encoder = load_encoder(config.encoder).to(self.device)
        self.translator = load_translator(config.translator).to(self.device)
        self.vocoder = load_unit_vocoder(config.vocoder).to(self.device)
        self.renderer = load_face_renderer(config.face_renderer).to(self.device) if config.face_renderer else None
        self.speaker_encoder = (
            load_speaker_encoder(config.speaker_encoder).to(self.device) if config.speaker_encoder else None
        )
        self.quantizer = None if config.heads else KMeansQuantizer.load(config.quantizer)
        self._check_inventories()
        self._transcriber = None

    @classmethod
    def from_yaml(cls, path: str | Path) -> AV2AVPipeline:
        return cls(PipelineConfig.from_yaml(path))

    @property
    def languages(self) -> tuple[str, ...]:
        return self.translator.vocab.languages

    def _check_inventories(self) -> None:
        """One unit dictionary from the unit extractor through the translator to both renderers."""
        c = self.config
        if self.quantizer is not None:
            if self.quantizer.dim != self.encoder.config.embed_dim:
                raise ValueError(
                    f"{c.quantizer}: quantizer of {self.quantizer.dim}-dim features, but the encoder {c.encoder} "
                    f"gives {self.encoder.config.embed_dim}"
                )
            if not 1 <= c.layer <= self.encoder.config.layers:
                raise ValueError(f"pipeline: layer {c.layer} outside the encoder's 1..{self.encoder.config.layers}")
            units, origin = self.quantizer.k, str(c.quantizer)
        else:
            classes = set(self.encoder.config.num_classes)
            if len(classes) != 1:
                raise ValueError(f"{c.encoder}: label heads of different sizes {sorted(classes)} are no unit stream")
            units, origin = classes.pop(), f"{c.encoder} (label heads)"
        if self.translator.config.num_units != units:
            raise ValueError(
                f"{c.translator}: a translator of {self.translator.config.num_units} units, but {origin} gives {units}"
            )
        stages = [(c.vocoder, self.vocoder.config.num_units)]
        if self.renderer is not None:
            stages.append((c.face_renderer, self.renderer.config.num_units))
        for path, table in stages:
            if table < units:
                raise ValueError(f"{path}: a table of {table} units cannot take the {units} units of {origin}")
        speaker_dim = self.vocoder.config.speaker_dim
        if self.speaker_encoder is not None and speaker_dim and self.speaker_encoder.embed_dim != speaker_dim:
            raise ValueError(
                f"{c.speaker_encoder}: {self.speaker_encoder.embed_dim}-dim speaker embeddings, but the vocoder "
                f"{c.vocoder} takes {speaker_dim}"
            )

    def check_languages(self, *langs: str) -> None:
        for lang in langs:
            if lang not in self.languages:
                raise ValueError(f"unknown language {lang!r}; the translator knows {', '.join(self.languages)}")

    # -- stages

    @torch.inference_mode()
    def source_units(self, clip: SourceClip, input: str) -> list[int]:
        """De-duplicated units of the clip's asked-for modalities (the other one is zeros inside the encoder)."""
        if self.config.heads:
            source = head_source(self.encoder, modality=input, device=self.device)
        else:
            source = model_layer_source(self.encoder, self.config.layer, modality=input, device=self.device)
        meta = SampleMeta(
            key=clip.name, split="", lang="", speaker="", text="", sentence_id="", num_frames=clip.num_frames
        )
        wave = clip.wave if clip.wave is not None else np.zeros(clip.num_frames * SAMPLES_PER_FRAME, np.float32)
        (features,) = source.fn([ClusterSample(meta, wave, clip.lip)])
        frames = self.quantizer(features) if self.quantizer is not None else features.astype(np.int64).reshape(-1)
        return dedup(frames)[0].tolist()

    @torch.inference_mode()
    def translate_units(self, units: list[int], src_lang: str, tgt_lang: str) -> list[int]:
        vocab = self.translator.vocab
        tokens, mask = pad_tokens([vocab.encode_source(units, src_lang)], self.device)
        lengths = dict(max_len_a=self.config.max_len_a, max_len_b=self.config.max_len_b)
        if self.config.beam_size == 1:
            return self.translator.greedy(tokens, mask, [tgt_lang], **lengths)[0]
        return self.translator.beam_search(
            tokens, mask, [tgt_lang], self.config.beam_size, len_penalty=self.config.len_penalty, **lengths
        )[0]

    @torch.inference_mode()
    def speaker_embedding(self, wave: np.ndarray | None) -> torch.Tensor | None:
        """The vocoder's speaker vector of this speech: the speaker encoder's embedding (zeros without an encoder),
        then the mean voice Mels when the vocoder takes them; None (the vocoder's neutral voice) without audio."""
        config = self.vocoder.config
        if wave is None or not config.condition_dim:
            return None
        audio = torch.from_numpy(wave).to(self.device)
        parts = []
        if config.speaker_dim:
            encoder = self.speaker_encoder
            parts.append(encoder.embed_utterance(audio) if encoder is not None else audio.new_zeros(config.speaker_dim))
        if config.voice_mels:
            parts.append(mean_voice_mels(audio))
        return torch.cat(parts)

    @torch.inference_mode()
    def synthesize(
        self, units: list[int], speaker: torch.Tensor | None, durations: list[int] | None = None
    ) -> tuple[np.ndarray, list[int]]:
        """Speech zero-padded to whole 25 fps frames, and the 50 Hz durations of the units: predicted, unless
        ``durations`` (e.g. a clip's own, for resynthesis) are given."""
        ids = torch.tensor(units, dtype=torch.long, device=self.device)
        if durations is None:
            durations = durations_from_log(self.vocoder.log_durations(ids[None])[0])
        else:
            durations = torch.tensor(durations, dtype=torch.long, device=self.device)
        wave = self.vocoder.synthesize(ids, speaker, durations).float().cpu().numpy()
        frames = math.ceil(int(durations.sum()) / UNITS_PER_FRAME)
        return fit_audio(wave, frames), durations.tolist()

    @torch.inference_mode()
    def render(self, face: np.ndarray, units: list[int], durations: list[int], frames: int) -> np.ndarray:
        """``frames`` faces [F, 96, 96, 3] uint8 speaking the 50 Hz units; poses ping-pong over the source frames."""
        pad = self.renderer.config.num_units
        stream = torch.as_tensor(expand(units, durations), device=self.device)[None]
        windows = unit_windows(stream, frames, self.renderer.config.window, pad)[0]
        targets = face_transform(face[pingpong_indices(len(face), frames)]).to(self.device)
        reference = face_transform(face[:1]).to(self.device)
        out = []
        for start in range(0, frames, RENDER_CHUNK):
            target = targets[start : start + RENDER_CHUNK]
            out.append(
                self.renderer(
                    mask_lower_half(target), reference.expand_as(target), windows[start : start + RENDER_CHUNK]
                )
            )
        rendered = torch.cat(out).movedim(1, -1).mul(255.0).round().clamp(0, 255)
        return rendered.to(torch.uint8).cpu().numpy()

    def transcribe(self, wave: np.ndarray, lang: str) -> str | None:
        if self.config.transcriber is None:
            return None
        if self._transcriber is None:
            from av2av_lightning.transcribers import build_transcriber

            self._transcriber = build_transcriber(self.config.transcriber)
        return self._transcriber([wave], lang)[0]

    # -- the whole clip

    def translate(
        self,
        clip: SourceClip | str | Path,
        src_lang: str,
        tgt_lang: str,
        input: str = "av",
        real_footage: bool | None = None,
        face_index: int | None = None,
    ) -> Translation:
        """Translate a clip (a `SourceClip` or a media file) from ``src_lang`` to ``tgt_lang``, encoding the ``input``
        modalities; see the module docstring for what the output holds (and `load_source_clip` for real footage)."""
        self.check_languages(src_lang, tgt_lang)
        if src_lang == tgt_lang:
            raise ValueError(f"source and target language are both {src_lang!r}")
        timer = StageTimer()
        with timer("input"):
            if isinstance(clip, SourceClip):
                clip.check(input, self.config.max_seconds)
            else:
                clip = load_source_clip(clip, input, self.config.max_seconds, real_footage, face_index)
        with timer("units"):
            source = self.source_units(clip, input)
        with timer("translation"):
            units = self.translate_units(source, src_lang, tgt_lang)
        if not units:
            raise ValueError(f"{clip.name}: the translator produced no units for {src_lang}->{tgt_lang}")
        with timer("speaker"):
            speaker = self.speaker_embedding(clip.wave)
        with timer("vocoder"):
            wave, durations = self.synthesize(units, speaker)
        face = None
        if self.renderer is not None and clip.face is not None:
            with timer("face"):
                face = self.render(clip.face, units, durations, len(wave) // SAMPLES_PER_FRAME)
            if clip.track is not None:
                with timer("paste"):
                    face = clip.paste_back(face)
        result = Translation(wave, face, units, durations, source, src_lang, tgt_lang, input, timer.seconds)
        if self.config.transcriber is not None:
            with timer("transcription"):
                result.transcript = self.transcribe(wave, tgt_lang)
        return result


# ---------------------------------------------------------------------------- output


def write_mp4(path: str | Path, wave: np.ndarray, face: np.ndarray | None, crf: int = 18) -> Path:
    """H.264 video (25 fps, yuv420p) and AAC audio (16 kHz mono) in one MP4; audio only when ``face`` is None.
    yuv420p needs even sizes: a frame of odd width or height gains a copy of its last column or row."""
    path = Path(path)
    if face is not None and (face.shape[1] % 2 or face.shape[2] % 2):
        face = np.pad(face, ((0, 0), (0, face.shape[1] % 2), (0, face.shape[2] % 2), (0, 0)), mode="edge")
    path.parent.mkdir(parents=True, exist_ok=True)
    with av.open(str(path), mode="w", format="mp4") as container:
        streams = []  # every stream is added before the first packet: the MP4 header lists them
        if face is not None:
            video = container.add_stream("libx264", rate=VIDEO_FPS)
            video.width, video.height, video.pix_fmt = face.shape[2], face.shape[1], "yuv420p"
            video.options = {"crf": str(crf), "preset": "veryfast"}
            frames = [av.VideoFrame.from_ndarray(np.ascontiguousarray(image), format="rgb24") for image in face]
            streams.append((video, frames))
        audio = container.add_stream("aac", rate=SAMPLE_RATE)
        audio.layout = "mono"
        samples = av.AudioFrame.from_ndarray(
            np.clip(wave, -1.0, 1.0).astype(np.float32)[None], format="fltp", layout="mono"
        )
        samples.sample_rate, samples.pts = SAMPLE_RATE, 0
        streams.append((audio, [samples]))
        for stream, items in streams:
            for item in [*items, None]:  # None flushes the encoder
                for packet in stream.encode(item):
                    container.mux(packet)
    return path
