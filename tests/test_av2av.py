"""AV2AV pipeline: locked 25 fps / 16 kHz output, ping-pong identity frames, A / V / AV input, input checks, CLI."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import av
import numpy as np
import pytest
import soundfile as sf
import torch
import yaml
from conftest import synthetic_audio, synthetic_face, write_set

from av2av_lightning.av2av import (
    AV2AVPipeline,
    PipelineConfig,
    SourceClip,
    load_source_clip,
    pingpong_indices,
    write_mp4,
)
from av2av_lightning.data.schema import SAMPLE_RATE, SAMPLES_PER_FRAME
from av2av_lightning.data.transforms import face_transform
from av2av_lightning.face_rendering import FaceRendering
from av2av_lightning.models.face_renderer import mask_lower_half
from av2av_lightning.models.mel_spectrum import mean_voice_mels
from av2av_lightning.models.unit_translator import EOS
from av2av_lightning.pretraining import AVHubertPretraining
from av2av_lightning.speaker_encoding import SpeakerEncoderTraining
from av2av_lightning.translate_cli import INDEX_NAME, add_arguments
from av2av_lightning.translation import UnitTranslation
from av2av_lightning.vocoder import UnitVocoder
from data_prep.clustering.kmeans import KMeansQuantizer

UNITS = 12
LAYER = 2
EXPERIMENTS = Path(__file__).resolve().parents[1] / "experiments" / "pipeline"


def save_stage(module, path: Path) -> Path:
    """What Lightning writes that the loaders read: the state dict and the stage's own ``on_save_checkpoint`` keys."""
    checkpoint = {"state_dict": module.state_dict(), "hyper_parameters": dict(module.hparams)}
    module.on_save_checkpoint(checkpoint)
    torch.save(checkpoint, path)
    return path


@pytest.fixture(scope="module")
def stages(tmp_path_factory) -> dict[str, Path]:
    """Untrained tiny checkpoints of every stage, sharing one dictionary of UNITS units."""
    out = tmp_path_factory.mktemp("stages")
    torch.manual_seed(0)
    translation = UnitTranslation("tiny", {"num_units": UNITS})
    with torch.no_grad():  # untrained, the tied </s> embedding often wins the first step: an empty translation
        translation.model.embed_tokens.weight[EOS] = 0.0
    paths = {
        "encoder": save_stage(AVHubertPretraining("tiny", {"num_classes": [UNITS]}), out / "encoder.ckpt"),
        "translator": save_stage(translation, out / "translator.ckpt"),
        "speaker_encoder": save_stage(SpeakerEncoderTraining("tiny"), out / "speaker.ckpt"),
        "face_renderer": save_stage(FaceRendering("tiny", {"num_units": UNITS}), out / "renderer.ckpt"),
    }
    vocoder = UnitVocoder("tiny", {"num_units": UNITS}, speaker_encoder=str(paths["speaker_encoder"]))
    paths["vocoder"] = save_stage(vocoder, out / "vocoder.ckpt")
    centroids = np.random.default_rng(0).standard_normal((UNITS, 128)).astype(np.float32)
    paths["quantizer"] = KMeansQuantizer(centroids, {"kind": "layer", "layer": LAYER}).save(out / "kmeans.npz")
    return paths


@pytest.fixture(scope="module")
def config(stages) -> PipelineConfig:
    return PipelineConfig(**{k: str(v) for k, v in stages.items()}, layer=LAYER, beam_size=2, max_seconds=10.0)


@pytest.fixture(scope="module")
def pipeline(config) -> AV2AVPipeline:
    return AV2AVPipeline(config)


def write_clip(path: Path, frames: int, fps: int = 30, rate: int = 22050, channels: int = 2, video=True, audio=True):
    """A talking-face MP4 at a foreign frame rate, sample rate and channel count (128x128 RGB)."""
    rng = np.random.default_rng(frames)
    seconds = frames / fps
    with av.open(str(path), "w", format="mp4") as container:
        streams = []
        if video:
            stream = container.add_stream("libx264", rate=fps)
            stream.width = stream.height = 128
            stream.pix_fmt = "yuv420p"
            faces = np.repeat(np.repeat(synthetic_face(frames, rng), 4, 1), 4, 2)[:, 16:144, 16:144]
            streams.append(
                (stream, [av.VideoFrame.from_ndarray(np.ascontiguousarray(f), format="rgb24") for f in faces])
            )
        if audio:
            stream = container.add_stream("aac", rate=rate)
            stream.layout = "stereo" if channels == 2 else "mono"
            wave = synthetic_audio(int(np.ceil(seconds * rate / SAMPLES_PER_FRAME)), rng)[: int(seconds * rate)]
            frame = av.AudioFrame.from_ndarray(np.stack([wave] * channels), format="fltp", layout=stream.layout.name)
            frame.sample_rate, frame.pts = rate, 0
            streams.append((stream, [frame]))
        for stream, items in streams:
            for item in [*items, None]:
                for packet in stream.encode(item):
                    container.mux(packet)
    return path


def decode_mp4(path: Path) -> tuple[float, int, int, int]:
    """(video fps, video frames, audio sample rate, audio samples) as PyAV decodes the file."""
    with av.open(str(path)) as container:
        video = container.streams.video[0]
        fps, frames = float(video.average_rate), sum(1 for _ in container.decode(video))
    with av.open(str(path)) as container:
        audio = container.streams.audio[0]
        rate, samples = audio.rate, sum(f.samples for f in container.decode(audio))
    return fps, frames, rate, samples


# ---------------------------------------------------------------------------- pieces


def test_pingpong_plays_forwards_then_backwards():
    assert pingpong_indices(3, 9).tolist() == [0, 1, 2, 1, 0, 1, 2, 1, 0]
    assert pingpong_indices(4, 3).tolist() == [0, 1, 2]
    assert pingpong_indices(1, 4).tolist() == [0, 0, 0, 0]
    steps = np.abs(np.diff(pingpong_indices(7, 50)))
    assert steps.max() == 1  # never a jump from the last frame back to the first


def test_config_yaml_names_its_problems(tmp_path, stages):
    good = tmp_path / "good.yaml"
    good.write_text(yaml.safe_dump({k: str(v) for k, v in stages.items()} | {"layer": LAYER}))
    assert PipelineConfig.from_yaml(good).layer == LAYER
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump({"encoder": "e.ckpt", "translator": "t.ckpt", "vocoder": "v.ckpt", "bogus": 1}))
    with pytest.raises(ValueError, match=r"bad.yaml: unknown pipeline key\(s\) \['bogus'\]"):
        PipelineConfig.from_yaml(bad)
    bad.write_text(yaml.safe_dump({"encoder": "e.ckpt", "translator": "t.ckpt", "vocoder": "v.ckpt"}))
    with pytest.raises(ValueError, match=r"bad.yaml: pipeline: give quantizer and layer"):
        PipelineConfig.from_yaml(bad)
    with pytest.raises(FileNotFoundError, match=r"missing.yaml: no such pipeline config"):
        PipelineConfig.from_yaml(tmp_path / "missing.yaml")


def test_checked_in_tiny_config_parses():
    config = PipelineConfig.from_yaml(EXPERIMENTS / "tiny.yaml")
    assert config.encoder == "runs/demo/mutual_learning/last.ckpt" and config.layer == 3 and config.quantizer


def test_wrong_stage_checkpoint_and_mismatched_units_are_one_line_errors(config, stages, tmp_path):
    with pytest.raises(ValueError, match=r"translator.ckpt: a checkpoint of stage 'translation', expected 'vocoder'$"):
        AV2AVPipeline(replace(config, vocoder=config.translator))
    other = KMeansQuantizer(np.zeros((UNITS + 3, 128), np.float32)).save(tmp_path / "k15.npz")
    with pytest.raises(ValueError, match=rf"a translator of {UNITS} units, but .*k15.npz gives {UNITS + 3}$"):
        AV2AVPipeline(replace(config, quantizer=str(other)))
    with pytest.raises(FileNotFoundError, match=r"nothing.ckpt: no such checkpoint"):
        AV2AVPipeline(replace(config, encoder=str(tmp_path / "nothing.ckpt")))


# ---------------------------------------------------------------------------- translating


def test_av_clip_gives_locked_25fps_16khz_mp4(pipeline, tmp_path):
    source = write_clip(tmp_path / "clip.mp4", frames=24, fps=30, rate=22050, channels=2)
    clip = load_source_clip(source)
    assert clip.num_frames == 20 and clip.wave.shape == (20 * SAMPLES_PER_FRAME,)  # 0.8 s at 30 fps -> 25 fps
    assert clip.lip.shape == (20, 96, 96) and clip.face.shape == (20, 96, 96, 3)
    result = pipeline.translate(source, "en", "es", "av")
    assert len(result.units) > 0 and all(0 <= u < UNITS for u in result.units)
    assert len(result.durations) == len(result.units) and min(result.durations) >= 1
    frames = int(np.ceil(sum(result.durations) / 2))
    assert result.face.shape == (frames, 96, 96, 3) and result.face.dtype == np.uint8
    assert len(result.wave) == SAMPLES_PER_FRAME * frames
    assert set(result.seconds) >= {"input", "units", "translation", "speaker", "vocoder", "face"}
    assert all(seconds > 0 for seconds in result.seconds.values())
    out = write_mp4(tmp_path / "out.mp4", result.wave, result.face)
    fps, video_frames, rate, samples = decode_mp4(out)
    assert (fps, video_frames, rate) == (25.0, frames, SAMPLE_RATE)
    assert abs(samples - SAMPLES_PER_FRAME * frames) < 2048  # AAC priming and padding to 1024-sample frames


def test_odd_frame_sizes_are_padded_to_what_h264_takes(tmp_path):
    """yuv420p needs even sizes: an odd-sized frame gains one edge row and column and keeps its picture."""
    rng = np.random.default_rng(0)
    frames = np.repeat(rng.integers(0, 256, (1, 101, 99, 3), dtype=np.uint8), 10, axis=0)
    frames = np.repeat(np.repeat(frames[:, ::4, ::4], 4, axis=1), 4, axis=2)[:, :101, :99]  # smooth 4x4 blocks
    out = write_mp4(tmp_path / "odd.mp4", np.zeros(10 * SAMPLES_PER_FRAME, np.float32), frames)
    with av.open(str(out)) as container:
        decoded = [frame.to_ndarray(format="rgb24") for frame in container.decode(video=0)]
    assert len(decoded) == 10 and decoded[0].shape == (102, 100, 3)
    assert np.abs(decoded[0][:101, :99].astype(float) - frames[0]).mean() < 12  # the picture, not a shifted one


def test_missing_modality_reaches_the_encoder_as_zeros(pipeline, tmp_path):
    """The fused front-end features (audio half, video half) of A and V input: the absent half is all zeros."""
    source = write_clip(tmp_path / "clip.mp4", frames=15, fps=25, rate=16000, channels=1)
    fused = []
    hook = pipeline.encoder.layer_norm.register_forward_hook(lambda module, args, out: fused.append(args[0]))
    try:
        results = {modality: pipeline.translate(source, "en", "fr", modality) for modality in ("audio", "video", "av")}
    finally:
        hook.remove()
    dim = pipeline.encoder.config.embed_dim
    audio_only, video_only, both = fused
    assert audio_only[..., dim:].abs().max() == 0 and audio_only[..., :dim].abs().max() > 0
    assert video_only[..., :dim].abs().max() == 0 and video_only[..., dim:].abs().max() > 0
    assert both[..., :dim].abs().max() > 0 and both[..., dim:].abs().max() > 0
    for result in results.values():
        assert len(result.wave) == SAMPLES_PER_FRAME * result.face.shape[0]


def test_output_longer_than_source_plays_source_frames_back_and_forth(pipeline):
    rng = np.random.default_rng(3)
    face = rng.integers(0, 256, (5, 96, 96, 3), dtype=np.uint8)
    seen = []
    hook = pipeline.renderer.register_forward_hook(lambda module, args, out: seen.append(args))
    try:
        out = pipeline.render(face, [1, 2, 3], [10, 7, 9], 13)
    finally:
        hook.remove()
    masked, reference = torch.cat([a[0] for a in seen]), torch.cat([a[1] for a in seen])
    expected = mask_lower_half(face_transform(face[[0, 1, 2, 3, 4, 3, 2, 1, 0, 1, 2, 3, 4]]))
    assert out.shape == (13, 96, 96, 3)
    torch.testing.assert_close(masked, expected)
    torch.testing.assert_close(reference, face_transform(face[:1]).expand(13, -1, -1, -1))


def test_audio_file_and_silent_video_inputs(pipeline, tmp_path):
    wav = tmp_path / "speech.wav"
    sf.write(wav, np.stack([synthetic_audio(35, np.random.default_rng(0))] * 2, 1), 44100)  # stereo, 0.51 s
    speech = pipeline.translate(wav, "en", "es", "audio")
    assert speech.face is None and len(speech.wave) % SAMPLES_PER_FRAME == 0
    out = write_mp4(tmp_path / "speech.mp4", speech.wave, None)
    with av.open(str(out)) as container:
        assert not container.streams.video and container.streams.audio[0].rate == SAMPLE_RATE
    silent = write_clip(tmp_path / "silent.mp4", frames=10, fps=25, audio=False)
    result = pipeline.translate(silent, "es", "en", "video")
    assert result.face.shape[0] * SAMPLES_PER_FRAME == len(result.wave)
    assert "speaker" in result.seconds  # no audio: the vocoder gets no speaker embedding, but the stage is timed


def test_input_checks_are_one_line_errors(pipeline, tmp_path):
    silent = write_clip(tmp_path / "silent.mp4", frames=10, fps=25, audio=False)
    wav = tmp_path / "speech.wav"
    sf.write(wav, synthetic_audio(10, np.random.default_rng(0)), 16000)
    short = write_clip(tmp_path / "short.mp4", frames=3, fps=25, audio=False)
    long = write_clip(tmp_path / "long.mp4", frames=300, fps=25, video=False)
    broken = tmp_path / "broken.mp4"
    broken.write_bytes(b"not a video at all" * 10)
    cases = [
        (silent, "av", "en", ValueError, r"silent.mp4: no audio track, but input 'av' needs audio"),
        (silent, "audio", "en", ValueError, r"silent.mp4: no audio track, but input 'audio' needs audio"),
        (wav, "video", "en", ValueError, r"speech.wav: no video track, but input 'video' needs video"),
        (short, "av", "en", ValueError, r"short.mp4: too short \(0.12 s\); a clip needs at least 5 frames"),
        (long, "audio", "en", ValueError, r"long.mp4: too long \(12.0 s\); at most 10 s \(max_seconds\)"),
        (broken, "av", "en", ValueError, r"broken.mp4: unreadable media file"),
        (tmp_path / "absent.mp4", "av", "en", FileNotFoundError, r"absent.mp4: no such input file"),
        (wav, "audio", "de", ValueError, r"unknown language 'de'; the translator knows en, es, fr"),
    ]
    for path, modality, src, kind, message in cases:
        with pytest.raises(kind, match=message) as info:
            pipeline.translate(path, src, "es", modality)
        assert "\n" not in str(info.value), str(info.value)
    with pytest.raises(ValueError, match=r"^source and target language are both 'es'$"):
        pipeline.translate(wav, "es", "es", "audio")
    clip = SourceClip("prepared", 4, np.zeros(4 * SAMPLES_PER_FRAME, np.float32))
    with pytest.raises(ValueError, match=r"^prepared: too short"):
        pipeline.translate(clip, "en", "es", "audio")


def test_label_head_units_and_an_empty_translation(config, stages, tmp_path):
    heads = AV2AVPipeline(replace(config, heads=True, quantizer=None, layer=None))
    clip = SourceClip("clip", 8, synthetic_audio(8, np.random.default_rng(1)))
    units = heads.source_units(clip, "audio")
    assert len(units) > 0 and all(0 <= u < UNITS for u in units)
    assert all(a != b for a, b in zip(units, units[1:]))  # repeats removed
    translation = UnitTranslation("tiny", {"num_units": UNITS})
    with torch.no_grad():  # every decoder output is the (longest) </s> embedding, so </s> wins at once (Cauchy-Schwarz)
        model = translation.model
        model.embed_tokens.weight[EOS] *= 100.0
        model.decoder_norm.weight.zero_()
        model.decoder_norm.bias.copy_(model.embed_tokens.weight[EOS])
    stops = AV2AVPipeline(replace(config, translator=str(save_stage(translation, tmp_path / "stops.ckpt"))))
    with pytest.raises(ValueError, match=r"^clip: the translator produced no units for en->es$"):
        stops.translate(clip, "en", "es", "audio")


# ---------------------------------------------------------------------------- command line


def run_cli(argv: list[str]) -> None:
    import argparse

    parser = argparse.ArgumentParser()
    add_arguments(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["translate", *argv])
    args.handler(args)


def test_cli_writes_mp4_and_json(config, tmp_path, capsys):
    yaml_path = tmp_path / "pipeline.yaml"
    fields = {k: v for k, v in vars(config).items() if v is not None}
    yaml_path.write_text(yaml.safe_dump(fields))
    source = write_clip(tmp_path / "clip.mp4", frames=12, fps=25, rate=16000, channels=1)
    out = tmp_path / "out" / "translated.mp4"
    run_cli(["--pipeline", str(yaml_path), "--input", str(source), "--src", "en", "--tgt", "fr", "--out", str(out)])
    fps, frames, rate, _ = decode_mp4(out)
    summary = json.loads(out.with_suffix(".json").read_text())
    assert (fps, rate) == (25.0, SAMPLE_RATE) and frames == summary["frames"]
    assert summary["frames"] * 2 >= sum(summary["durations"]) and len(summary["units"]) == len(summary["durations"])
    assert summary["src_lang"] == "en" and summary["tgt_lang"] == "fr" and summary["transcript"] is None
    assert all(v > 0 for v in summary["stage_seconds"].values())
    assert str(out) in capsys.readouterr().out


def test_batch_mode_writes_one_output_per_sample_and_an_index(config, tmp_path):
    shards = write_set(tmp_path / "shards", [8, 12, 6, 9, 10], per_shard=2, langs=("en", "es"))
    yaml_path = tmp_path / "pipeline.yaml"
    yaml_path.write_text(yaml.safe_dump({k: v for k, v in vars(config).items() if v is not None} | {"beam_size": 1}))
    out = tmp_path / "batch"
    run_cli(["--pipeline", str(yaml_path), "--shards", shards.pattern, "--tgt", "fr", "--out", str(out)])
    entries = [json.loads(line) for line in (out / INDEX_NAME).read_text().splitlines()]
    assert [e["key"] for e in entries] == shards.keys
    for entry in entries:
        assert "error" not in entry, entry
        assert entry["src_lang"] == shards.metas[entry["key"]].lang and entry["tgt_lang"] == "fr"
        fps, frames, rate, _ = decode_mp4(out / entry["output"])
        assert (fps, rate, frames) == (25.0, SAMPLE_RATE, entry["frames"])
        assert json.loads((out / entry["json"]).read_text())["key"] == entry["key"]
    run_cli(["--pipeline", str(yaml_path), "--shards", shards.pattern, "--src", "es", "--tgt", "en", "--out", str(out)])
    entries = [json.loads(line) for line in (out / INDEX_NAME).read_text().splitlines()]
    assert [e["key"] for e in entries] == [k for k in shards.keys if shards.metas[k].lang == "es"]


def test_batch_mode_translates_each_sample_into_every_other_target(config, tmp_path, capsys):
    shards = write_set(tmp_path / "shards", [8, 12, 6, 9], per_shard=2, langs=("en", "es"))
    yaml_path = tmp_path / "pipeline.yaml"
    yaml_path.write_text(yaml.safe_dump({k: v for k, v in vars(config).items() if v is not None} | {"beam_size": 1}))
    out = tmp_path / "batch"
    run_cli(["--pipeline", str(yaml_path), "--shards", shards.pattern, "--tgt", "en", "es", "fr", "--out", str(out)])
    entries = [json.loads(line) for line in (out / INDEX_NAME).read_text().splitlines()]
    expected = [(k, t) for k in shards.keys for t in ("en", "es", "fr") if t != shards.metas[k].lang]
    assert [(e["key"], e["tgt_lang"]) for e in entries] == expected
    assert all(e["output"] == f"{e['key']}.{e['tgt_lang']}.mp4" and (out / e["output"]).is_file() for e in entries)
    assert f"{len(expected)} translated, 0 failed (any -> en es fr)" in capsys.readouterr().out
    run_cli(
        [
            "--pipeline",
            str(yaml_path),
            "--shards",
            shards.pattern,
            "--tgt",
            "es",
            "fr",
            "--limit",
            "2",
            "--out",
            str(out),
        ]
    )
    entries = [json.loads(line) for line in (out / INDEX_NAME).read_text().splitlines()]
    assert len({e["key"] for e in entries}) == 2  # the limit counts samples, not translations


def test_one_clip_into_several_targets_is_refused_in_one_line(config, tmp_path):
    source = write_clip(tmp_path / "clip.mp4", frames=12, fps=25, rate=16000, channels=1)
    argv = ["--pipeline", "unread.yaml", "--input", str(source), "--src", "en", "--tgt", "es", "fr", "--out", "o.mp4"]
    with pytest.raises(
        ValueError, match=r"^--tgt es fr: one clip goes into one target language \(several: --shards\)$"
    ):
        run_cli(argv)


def test_synthesis_follows_given_durations_instead_of_predicting_them(pipeline):
    """Resynthesis passes a clip's own durations: the speech lasts exactly as long, 320 samples per 50 Hz unit."""
    units, durations = [1, 2, 3], [4, 1, 3]  # 8 units at 50 Hz: 4 video frames
    wave, used = pipeline.synthesize(units, None, durations)
    assert used == durations and len(wave) == 4 * 640
    predicted, _ = pipeline.synthesize(units, None)
    assert len(predicted) % 640 == 0


def test_a_vocoder_with_voice_mels_gets_the_embedding_and_the_mean_voice_of_the_speech(config, stages, tmp_path):
    vocoder_config = {"num_units": UNITS, "context_layers": 1, "synthesis": "griffin_lim", "voice_mels": True}
    vocoder = UnitVocoder("tiny", vocoder_config, speaker_encoder=str(stages["speaker_encoder"]))
    pipeline = AV2AVPipeline(replace(config, vocoder=str(save_stage(vocoder, tmp_path / "vocoder.ckpt"))))
    wave = synthetic_audio(50, np.random.default_rng(1))
    vector = pipeline.speaker_embedding(wave)
    audio = torch.from_numpy(wave)
    with torch.no_grad():
        assert torch.allclose(vector[:64], pipeline.speaker_encoder.embed_utterance(audio), atol=1e-6)
        assert torch.allclose(vector[64:], mean_voice_mels(audio), atol=1e-6)
    assert pipeline.speaker_embedding(None) is None  # no speech: the vocoder's average voice
    speech, _ = pipeline.synthesize([1, 2, 3], vector, [2, 2, 2])
    assert len(speech) == 3 * 640 and np.abs(speech).max() > 0
