"""Manipulation: what one clip says, spoken with the voice and face of another (no translation).

The four synthesis directions of cross-modal mutual learning: the linguistic content comes from the ``content``
clip's audio, video or both (``content_from``: the encoder sees only those, as in `AV2AVPipeline.translate`), the
identity from the ``identity`` clip: its voice (speaker encoder on its audio) and its face (renderer reference and
ping-pong pose frames). ``output`` picks what is made: ``audio`` (speech only), ``video`` or ``av`` (faces at
25 fps with the speech locked to them, ``len(wave) == 640 * frames``; an identity clip of real footage gets the
faces pasted back into its own frames, as `AV2AVPipeline.translate` does). Video content with audio output is
face-to-voice, audio content with video output voice-to-face, and so on.

Speech is always synthesised (its durations time the faces), so a ``video`` output keeps it as its sound track; its
voice is the identity's when the identity clip has sound, the vocoder's unconditioned one otherwise.
"""

from __future__ import annotations

from pathlib import Path

from av2av_lightning.av2av import INPUTS, AV2AVPipeline, SourceClip, StageTimer, Translation, load_source_clip
from av2av_lightning.data.schema import SAMPLES_PER_FRAME

__all__ = ["OUTPUTS", "synthesize"]

OUTPUTS = INPUTS  # "av", "audio", "video": what the output holds


def _needs(output: str) -> tuple[bool, bool]:
    """(voice, face): what an ``output`` takes from the identity clip."""
    return output in ("av", "audio"), output in ("av", "video")


def _check_request(pipeline: AV2AVPipeline, content_from: str, output: str) -> None:
    """Modalities are known and the pipeline has the stages the output needs."""
    if content_from not in INPUTS:
        raise ValueError(f"content_from must be one of {', '.join(INPUTS)}, got {content_from!r}")
    if output not in OUTPUTS:
        raise ValueError(f"output must be one of {', '.join(OUTPUTS)}, got {output!r}")
    voice, face = _needs(output)
    if voice and (pipeline.speaker_encoder is None or not pipeline.vocoder.config.speaker_dim):
        raise ValueError(
            f"output {output!r} takes the identity's voice, but the pipeline has no speaker encoder "
            "or its vocoder no speaker conditioning"
        )
    if face and pipeline.renderer is None:
        raise ValueError(f"output {output!r} renders the identity's face, but the pipeline has no face_renderer")


def _load(clip: SourceClip | str | Path, modality: str, max_seconds: float) -> SourceClip:
    """A clip with the streams ``modality`` needs, from a `SourceClip` or a media file."""
    if isinstance(clip, SourceClip):
        clip.check(modality, max_seconds)
        return clip
    return load_source_clip(clip, modality, max_seconds)


def _check_identity(clip: SourceClip, output: str) -> None:
    voice, face = _needs(output)
    if voice and clip.wave is None:
        raise ValueError(f"{clip.name}: no audio track, but output {output!r} takes the identity's voice from it")
    if face and clip.face is None:
        raise ValueError(f"{clip.name}: no face video, but output {output!r} takes the identity's face from it")


def synthesize(
    pipeline: AV2AVPipeline,
    content: SourceClip | str | Path,
    identity: SourceClip | str | Path,
    content_from: str = "av",
    output: str = "av",
    lang: str = "",
) -> Translation:
    """Speak ``content``'s units (from its ``content_from`` streams) with ``identity``'s voice and face; the result's
    ``units`` and ``source_units`` are both the content's units. ``lang`` (the content's language, optional) is
    recorded and, with a transcriber configured, transcribes the output."""
    _check_request(pipeline, content_from, output)
    timer = StageTimer()
    with timer("input"):
        content = _load(content, content_from, pipeline.config.max_seconds)
        identity = _load(identity, output, pipeline.config.max_seconds)
        _check_identity(identity, output)
    with timer("units"):
        units = pipeline.source_units(content, content_from)
    with timer("speaker"):
        speaker = pipeline.speaker_embedding(identity.wave)
    with timer("vocoder"):
        wave, durations = pipeline.synthesize(units, speaker)
    face = None
    if _needs(output)[1]:
        with timer("face"):
            face = pipeline.render(identity.face, units, durations, len(wave) // SAMPLES_PER_FRAME)
        if identity.track is not None:
            with timer("paste"):
                face = identity.paste_back(face)
    result = Translation(wave, face, units, durations, units, lang, lang, content_from, timer.seconds)
    if lang and pipeline.config.transcriber is not None:
        with timer("transcription"):
            result.transcript = pipeline.transcribe(wave, lang)
    return result
