"""Real footage: corpus faces pasted into larger frames along known paths stand in for ordinary video."""

from __future__ import annotations

import json
from pathlib import Path

import av
import numpy as np
import pytest
from conftest import synthetic_audio
from test_av2av import config, run_cli, stages  # noqa: F401  (the tiny pipeline's fixtures)

from av2av_lightning.av2av import write_mp4
from av2av_lightning.data.codecs import encode_video
from av2av_lightning.face_tracking import (
    MOUTH,
    STABLE_POINTS,
    TEMPLATE,
    FaceTrack,
    default_landmarker,
    fill_gaps,
    is_footage,
    lower_face_weight,
    pick_faces,
    smooth,
    track_faces,
)
from data_prep.converters.media import resize
from data_prep.corpus.face import make_identity, render_face

HEIGHT, WIDTH = 240, 320
SCALE = 1.5  # the 96x96 corpus face as 144 px: dlib's HOG detector looks for faces of 80 px and more
BACKGROUND = (90, 120, 150)


def talking_face(frames: int, seed: int = 3) -> tuple[np.ndarray, np.ndarray]:
    """A corpus face [F, 96, 96, 3] and its lip view [F, 96, 96] with the mouth opening and closing."""
    mouth = np.zeros((frames, 5), np.float32)
    mouth[:, 0] = 0.4 + 0.4 * np.sin(np.arange(frames) / 2)
    return render_face(make_identity(seed), mouth, seed=1)


def footage(faces: list[np.ndarray], paths: list[np.ndarray]) -> np.ndarray:
    """Frames [F, 240, 320, 3]: each face sequence pasted with its top-left corner along its (x, y) path."""
    frames = np.empty((len(paths[0]), HEIGHT, WIDTH, 3), np.uint8)
    frames[:] = BACKGROUND
    for face, path in zip(faces, paths):
        for frame, patch, (x, y) in zip(frames, face, path):
            frame[y : y + patch.shape[0], x : x + patch.shape[1]] = patch
    return frames


def moving_path(frames: int) -> np.ndarray:
    """Left to right and down across the frame at a steady speed: integer (x, y) per frame."""
    t = np.linspace(0, 1, frames)
    return np.stack([20 + 130 * t, 20 + 60 * t], axis=1).round().astype(int)


def expected_points(path: np.ndarray, scale: float = SCALE) -> np.ndarray:
    """Where the stable landmarks of the pasted face must be: the template (the corpus faces' mean landmarks)
    scaled and moved along the path (pixel-index coordinates: centres shift by half a pixel under scaling)."""
    return path[:, None, :] + (TEMPLATE[None] + 0.5) * scale - 0.5


@pytest.fixture(scope="module")
def clip() -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """(frames, path, the corpus face, its lip view) of a 20-frame moving talking face."""
    face, lip = talking_face(20)
    path = moving_path(20)
    return footage([resize(face, int(96 * SCALE))], [path]), path, face, lip


def best_shift(ours: np.ndarray, corpus: np.ndarray, reach: int = 6) -> tuple[float, int, int]:
    """(mean absolute difference, dy, dx) of the shift of ``ours`` that best matches ``corpus`` (borders left out)."""
    inner = (slice(None), slice(reach, -reach), slice(reach, -reach))
    target = corpus[inner].astype(float)
    scores = [
        (np.abs(np.roll(ours, (dy, dx), axis=(1, 2))[inner] - target).mean(), dy, dx)
        for dy in range(-reach, reach + 1)
        for dx in range(-reach, reach + 1)
    ]
    return min(scores)


def dlib_track(frames: np.ndarray, **kwargs) -> np.ndarray:
    landmarker = default_landmarker()
    return pick_faces([landmarker(frame) for frame in frames], "clip", **kwargs)


# ---------------------------------------------------------------------------- detection


def test_detector_finds_the_moving_face_within_a_few_pixels(clip):
    frames, path, _, _ = clip
    track = dlib_track(frames)
    assert track.shape == (len(frames), 68, 2) and not np.isnan(track).any()
    stable = track[:, list(STABLE_POINTS)]
    offset = np.median(stable - path[:, None], axis=0)  # where the points sit on the pasted face
    # the template is the mean of all corpus faces: this one's eyes and nose lie within a few pixels of it
    assert np.linalg.norm(offset + path[0] - expected_points(path)[0], axis=-1).max() < 5.0
    follows = np.linalg.norm(stable - path[:, None] - offset, axis=-1)  # and they follow the path, frame by frame
    assert follows.max() < 5.0 and np.median(follows) < 1.5, follows.max(axis=1)


def test_smoothing_reduces_jitter_and_gaps_are_filled_from_neighbours():
    rng = np.random.default_rng(0)
    shape = rng.uniform(0, 100, (68, 2))
    truth = shape[None] + np.arange(40)[:, None, None] * np.array([2.0, -1.0])  # steady motion
    np.testing.assert_allclose(smooth(truth), truth, atol=1e-9)  # a centred average keeps linear motion
    noisy = truth + rng.normal(0, 1.5, truth.shape)
    raw_rms = np.sqrt(((noisy - truth) ** 2).mean())
    smooth_rms = np.sqrt(((smooth(noisy) - truth) ** 2).mean())
    assert smooth_rms < 0.4 * raw_rms, (raw_rms, smooth_rms)
    gappy = truth.copy()
    gappy[[0, 1, 10, 11, 12, 39]] = np.nan
    expected = truth.copy()  # the middle gap interpolated (exact for steady motion), the ends held
    expected[[0, 1]], expected[39] = truth[2], truth[38]
    np.testing.assert_allclose(fill_gaps(gappy), expected, atol=1e-9)


def test_crops_match_the_corpus_views_and_pasting_them_back_changes_little(clip):
    frames, path, face, lip = clip
    track = FaceTrack.from_landmarks(frames, smooth(fill_gaps(dlib_track(frames))))
    crops, mouths = track.face_crops(), track.mouth_crops()
    assert crops.shape == (20, 96, 96, 3) and mouths.shape == (20, 96, 96) and mouths.dtype == np.uint8
    # the crops frame the face as the corpus does: best aligned as they are (within 2 px), with a small residual
    # (resampling twice, the corpus's sensor noise)
    for ours, corpus, residual in ((crops, face, 6.0), (mouths, lip, 5.0)):
        error, dy, dx = best_shift(ours, corpus)
        assert abs(dy) <= 2 and abs(dx) <= 2 and error < residual, (error, dy, dx)
    pasted = track.paste(crops, np.arange(20))
    assert pasted.shape == frames.shape
    difference = np.abs(pasted.astype(float) - frames)
    lower_face = np.zeros(frames.shape[:3], bool)
    for frame, affine in enumerate(track.face_affine):
        ys, xs = np.mgrid[:HEIGHT, :WIDTH]
        u = affine[0, 0] * xs + affine[0, 1] * ys + affine[0, 2]
        v = affine[1, 0] * xs + affine[1, 1] * ys + affine[1, 2]
        lower_face[frame] = lower_face_weight(u, v) > 0
    assert difference[lower_face].mean() < 3.0
    assert difference[~lower_face].max() == 0  # nothing outside the feathered lower-face mask changes
    black = track.paste(np.zeros_like(crops), np.arange(20))  # a different face does show, fully over the mouth
    mouth = track.landmarks[:, MOUTH].mean(axis=1).round().astype(int)
    assert black[np.arange(20), mouth[:, 1], mouth[:, 0]].max() == 0


# ---------------------------------------------------------------------------- clips and errors


def write_video(path: Path, frames: np.ndarray) -> Path:
    path.write_bytes(encode_video(frames))
    return path


def test_no_face_and_several_faces_are_one_line_errors(tmp_path):
    empty = write_video(tmp_path / "empty.mp4", footage([], [np.zeros((8, 2), int)]))
    with pytest.raises(ValueError, match=r"empty.mp4: no face found in any of its 8 frames$"):
        track_faces(empty)
    big, _ = talking_face(8, seed=3)
    small, _ = talking_face(8, seed=5)
    frames = footage([resize(big, 144), resize(small, 120)], [np.full((8, 2), (4, 40)), np.full((8, 2), (180, 60))])
    crowd = write_video(tmp_path / "crowd.mp4", frames)
    with pytest.raises(ValueError, match=r"crowd.mp4: 2 faces in 8 of 8 frames; choose one with --face-index") as info:
        track_faces(crowd)
    assert "\n" not in str(info.value)
    with pytest.raises(ValueError, match=r"crowd.mp4: --face-index 2, but no frame shows more than 2 face\(s\)$"):
        track_faces(crowd, face_index=2)
    right = track_faces(crowd, face_index=1)  # the smaller face, on the right
    left = track_faces(crowd, face_index=0)
    assert (right.landmarks[..., 0] > 180).all() and (left.landmarks[..., 0] < 150).all()


def test_the_chosen_face_is_followed_by_position_when_sizes_cross():
    """Two faces whose sizes cross mid-clip (one walks closer, one away): the largest in the first frame stays the
    track, where ranking every frame would jump to the other person; a frame without it is a gap, not the other."""
    square = np.stack(np.meshgrid(np.linspace(-0.5, 0.5, 17), np.linspace(-0.5, 0.5, 4)), -1).reshape(-1, 2)[:68]

    def face(centre_x: float, width: float) -> np.ndarray:
        return np.array([centre_x, 100.0]) + width * square

    widths = np.linspace(100, 60, 10)
    found = [
        [face(80 + frame, left), face(300, right)] for frame, (left, right) in enumerate(zip(widths, widths[::-1]))
    ]
    found[6] = found[6][1:]  # the left face is missed in frame 6
    track = pick_faces(found, "walk", face_index=0)
    centres = track.mean(axis=1)[:, 0]
    assert np.isnan(centres[6]) and np.allclose(np.delete(centres, 6), 80 + np.delete(np.arange(10), 6))
    other = pick_faces(found, "walk", face_index=1)  # the smaller one in frame 0: the right face throughout
    assert np.allclose(other.mean(axis=1)[:, 0], 300)
    late = [[], [], *found[2:]]  # nobody in the first frames: chosen where it first appears, followed back and on
    assert np.isnan(pick_faces(late, "late", face_index=0)[:2]).all()


def test_frames_missing_a_face_are_filled_from_their_neighbours(clip, tmp_path):
    frames, path, _, _ = clip
    hidden = frames.copy()
    hidden[[5, 6]] = BACKGROUND  # the face is gone for two frames
    track = track_faces(write_video(tmp_path / "gap.mp4", hidden))
    error = np.linalg.norm(track.landmarks[:, list(STABLE_POINTS)] - expected_points(path), axis=-1)
    assert error[[5, 6]].max() < 6.0  # interpolated between frames 4 and 7 of a smooth path


def decode_size(path: Path) -> tuple[float, int, int, int]:
    """(fps, frames, width, height) of the first video stream."""
    with av.open(str(path)) as container:
        stream = container.streams.video[0]
        frames = [frame.to_ndarray(format="rgb24") for frame in container.decode(stream)]
        return float(stream.average_rate), len(frames), frames[0].shape[1], frames[0].shape[0]


def test_translate_cli_on_real_footage_writes_the_original_resolution(config, tmp_path, capsys):  # noqa: F811
    import yaml

    frames = footage([resize(talking_face(15)[0], 144)], [moving_path(15)])
    source = write_mp4(tmp_path / "footage.mp4", synthetic_audio(15, np.random.default_rng(0)), frames)
    assert is_footage(source) and not is_footage(write_video(tmp_path / "crop.mp4", frames[:, :96, :96]))
    pipeline = tmp_path / "pipeline.yaml"
    pipeline.write_text(yaml.safe_dump({k: v for k, v in vars(config).items() if v is not None}))
    out = tmp_path / "out.mp4"
    run_cli(["--pipeline", str(pipeline), "--input", str(source), "--src", "en", "--tgt", "es", "--out", str(out)])
    summary = json.loads(out.with_suffix(".json").read_text())
    assert decode_size(out) == (25.0, summary["frames"], WIDTH, HEIGHT)
    assert summary["stage_seconds"]["paste"] > 0
    assert f"frames of {WIDTH}x{HEIGHT}" in capsys.readouterr().out
    with av.open(str(out)) as container:
        first = next(container.decode(video=0)).to_ndarray(format="rgb24").astype(float)
    assert np.abs(first[:, 200:] - frames[0, :, 200:]).mean() < 3  # away from the face the frame is the source's
    with pytest.raises(ValueError, match=r"--real-footage and --face-index apply to one --input clip"):
        run_cli(["--pipeline", str(pipeline), "--shards", "x-*.tar", "--tgt", "es", "--out", "o", "--face-index", "0"])
    assert len(summary["units"]) > 0


def test_synthesize_pastes_the_face_back_into_real_footage_of_the_identity(config, tmp_path):  # noqa: F811
    """Voice-and-face swap with an ordinary video as identity: the output has that video's frame size."""
    import yaml

    from av2av_lightning.cli import main

    frames = footage([resize(talking_face(15)[0], 144)], [moving_path(15)])
    identity = write_mp4(tmp_path / "footage.mp4", synthetic_audio(15, np.random.default_rng(1)), frames)
    content = write_mp4(tmp_path / "crop.mp4", synthetic_audio(15, np.random.default_rng(2)), frames[:, :96, :96])
    pipeline = tmp_path / "pipeline.yaml"
    pipeline.write_text(yaml.safe_dump({k: v for k, v in vars(config).items() if v is not None}))
    out = tmp_path / "swap.mp4"
    argv = ["synthesize", "--pipeline", str(pipeline), "--content", str(content), "--content-from", "audio"]
    assert main([*argv, "--identity", str(identity), "--output", "av", "--out", str(out)]) == 0
    summary = json.loads(out.with_suffix(".json").read_text())
    assert decode_size(out) == (25.0, summary["frames"], WIDTH, HEIGHT) and summary["stage_seconds"]["paste"] > 0
    crop_out = tmp_path / "crop_swap.mp4"  # a prepared crop as identity stays a crop
    assert main([*argv, "--identity", str(content), "--output", "video", "--out", str(crop_out)]) == 0
    assert decode_size(crop_out)[2:] == (96, 96)
    assert "paste" not in json.loads(crop_out.with_suffix(".json").read_text())["stage_seconds"]
