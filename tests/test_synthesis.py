"""Manipulation: content units from one clip, voice and face from another, in the four synthesis directions."""

from __future__ import annotations

import argparse
import json
from dataclasses import replace

import numpy as np
import pytest
import soundfile as sf
import torch
import yaml
from conftest import synthetic_audio
from test_av2av import config, decode_mp4, pipeline, stages, write_clip  # noqa: F401 (module-scoped fixtures)

from av2av_lightning.av2av import AV2AVPipeline, SourceClip, load_source_clip
from av2av_lightning.data.schema import SAMPLE_RATE, SAMPLES_PER_FRAME
from av2av_lightning.data.transforms import face_transform
from av2av_lightning.synthesis import synthesize
from av2av_lightning.synthesize_cli import add_arguments

DIRECTIONS = {  # (content_from, output)
    "face-to-voice": ("video", "audio"),
    "voice-to-face": ("audio", "video"),
    "voice-to-voice": ("audio", "audio"),
    "face-to-face": ("video", "video"),
    "av-to-av": ("av", "av"),
}


@pytest.fixture(scope="module")
def clips(tmp_path_factory) -> dict:
    """Two different talking-face clips (each with sound), a WAV and a silent video."""
    out = tmp_path_factory.mktemp("clips")
    wav = out / "speech.wav"
    sf.write(wav, synthetic_audio(12, np.random.default_rng(5)), SAMPLE_RATE)
    return {
        "content": write_clip(out / "content.mp4", frames=14, fps=25, rate=16000, channels=1),
        "identity": write_clip(out / "identity.mp4", frames=9, fps=25, rate=16000, channels=1),
        "wav": wav,
        "silent": write_clip(out / "silent.mp4", frames=8, fps=25, audio=False),
    }


@pytest.mark.parametrize("direction", DIRECTIONS)
def test_each_direction_speaks_the_content_with_the_identity(pipeline, clips, monkeypatch, direction):  # noqa: F811
    content_from, output = DIRECTIONS[direction]
    content, identity = load_source_clip(clips["content"]), load_source_clip(clips["identity"])
    embedded, conditioned, seen = [], [], []
    embed, vocode = pipeline.speaker_encoder.embed_utterance, pipeline.vocoder.synthesize
    monkeypatch.setattr(
        pipeline.speaker_encoder, "embed_utterance", lambda w: embedded.append((w, embed(w))) or embedded[-1][1]
    )
    monkeypatch.setattr(pipeline.vocoder, "synthesize", lambda u, s, d: conditioned.append((u, s)) or vocode(u, s, d))
    hook = pipeline.renderer.register_forward_hook(lambda module, args, out: seen.append(args[1]))
    try:
        result = synthesize(pipeline, clips["content"], clips["identity"], content_from, output)
    finally:
        hook.remove()
    expected = pipeline.source_units(content, content_from)
    assert result.units == expected and result.source_units == expected and result.input == content_from
    assert conditioned[0][0].tolist() == expected  # the vocoder spoke the content's units
    ((wave, embedding),) = embedded
    np.testing.assert_array_equal(wave.numpy(), identity.wave)  # the identity's voice, not the content's
    torch.testing.assert_close(conditioned[0][1], embedding)
    assert len(result.durations) == len(expected) and min(result.durations) >= 1
    if output == "audio":
        assert result.face is None and not seen
    else:
        frames = int(np.ceil(sum(result.durations) / 2))
        assert result.face.shape == (frames, 96, 96, 3) and len(result.wave) == SAMPLES_PER_FRAME * frames
        reference = face_transform(identity.face[:1]).expand(frames, -1, -1, -1)
        torch.testing.assert_close(torch.cat(seen), reference)  # the identity's face is the renderer's reference
    assert set(result.seconds) >= {"input", "units", "speaker", "vocoder"} and "translation" not in result.seconds


def test_silent_identity_gives_a_face_with_the_unconditioned_voice(pipeline, clips):  # noqa: F811
    result = synthesize(pipeline, clips["wav"], clips["silent"], "audio", "video")
    assert result.face.shape[0] * SAMPLES_PER_FRAME == len(result.wave)
    assert result.units == pipeline.source_units(load_source_clip(clips["wav"], "audio"), "audio")


def test_missing_streams_are_one_line_errors(pipeline, config, clips):  # noqa: F811
    faceless = SourceClip("faceless", 8, synthetic_audio(8, np.random.default_rng(2)), np.zeros((8, 96, 96), np.uint8))
    cases = [
        (
            clips["silent"],
            clips["identity"],
            "audio",
            "av",
            r"silent.mp4: no audio track, but input 'audio' needs audio",
        ),
        (clips["wav"], clips["identity"], "video", "audio", r"speech.wav: no video track, but input 'video' needs"),
        (clips["content"], clips["silent"], "video", "audio", r"silent.mp4: no audio track, but input 'audio' needs"),
        (clips["content"], clips["wav"], "audio", "video", r"speech.wav: no video track, but input 'video' needs"),
        (
            clips["content"],
            faceless,
            "av",
            "av",
            r"^faceless: no face video, but output 'av' takes the identity's face",
        ),
        (
            clips["content"],
            clips["identity"],
            "lips",
            "av",
            r"^content_from must be one of av, audio, video, got 'lips'",
        ),
        (clips["content"], clips["identity"], "av", "text", r"^output must be one of av, audio, video, got 'text'"),
    ]
    for content, identity, content_from, output, message in cases:
        with pytest.raises(ValueError, match=message) as info:
            synthesize(pipeline, content, identity, content_from, output)
        assert "\n" not in str(info.value), str(info.value)
    speech_only = AV2AVPipeline(replace(config, face_renderer=None))
    with pytest.raises(ValueError, match=r"^output 'video' renders the identity's face, but the pipeline has no face"):
        synthesize(speech_only, clips["content"], clips["identity"], "audio", "video")
    voiceless = AV2AVPipeline(replace(config, speaker_encoder=None))
    with pytest.raises(
        ValueError, match=r"^output 'audio' takes the identity's voice, but the pipeline has no speaker"
    ):
        synthesize(voiceless, clips["content"], clips["identity"], "audio", "audio")


def test_cli_writes_mp4_and_json(config, clips, tmp_path, capsys):  # noqa: F811
    yaml_path = tmp_path / "pipeline.yaml"
    yaml_path.write_text(yaml.safe_dump({k: v for k, v in vars(config).items() if v is not None}))
    out = tmp_path / "out" / "synth.mp4"
    parser = argparse.ArgumentParser()
    add_arguments(parser.add_subparsers(dest="command"))
    argv = ["--pipeline", str(yaml_path), "--content", str(clips["content"]), "--content-from", "audio"]
    args = parser.parse_args(["synthesize", *argv, "--identity", str(clips["identity"]), "--out", str(out)])
    args.handler(args)
    fps, frames, rate, _ = decode_mp4(out)
    summary = json.loads(out.with_suffix(".json").read_text())
    assert (fps, rate) == (25.0, SAMPLE_RATE) and frames == summary["frames"]
    assert summary["content_file"] == str(clips["content"]) and summary["identity_file"] == str(clips["identity"])
    assert summary["content_from"] == "audio" and summary["output_modality"] == "av"
    assert summary["units"] == summary["source_units"] and len(summary["units"]) == len(summary["durations"])
    assert str(out) in capsys.readouterr().out
    args = parser.parse_args(["synthesize", *argv, "--identity", str(tmp_path / "nobody.mp4"), "--out", str(out)])
    with pytest.raises(FileNotFoundError, match=r"nobody.mp4: no such input file$"):
        args.handler(args)
