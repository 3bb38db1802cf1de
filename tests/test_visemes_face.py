"""The synthetic face: phonemes -> visemes -> mouth trajectory -> rendered face and lip views."""

from __future__ import annotations

import numpy as np
import pytest

from data_prep.corpus.face import FaceIdentity, make_identity, render_face
from data_prep.corpus.visemes import MOUTH_PARAMS, REST, VISEMES, mouth_trajectory, viseme_of

OPEN = MOUTH_PARAMS.index("open")

# Phonemes eSpeak NG writes for English, Spanish and French (stress marks removed).
ESPEAK_PHONEMES = (
    ["p", "b", "m", "f", "v", "θ", "ð", "t", "d", "n", "l", "s", "z", "ɾ", "r", "ɹ", "ʃ", "ʒ", "tʃ", "dʒ"]
    + ["k", "g", "ɡ", "ŋ", "x", "ɣ", "h", "ʁ", "j", "w", "ɥ", "ɲ", "ʎ", "β"]
    + ["a", "ɑ", "æ", "ɐ", "e", "ɛ", "ə", "ɜ", "ɜː", "ʌ", "i", "iː", "ɪ", "y", "ø", "œ"]
    + ["o", "ɔ", "ɔː", "ɒ", "ɑː", "u", "uː", "ʊ", "ɑ̃", "ɛ̃", "ɔ̃", "œ̃"]
    + ["aɪ", "aʊ", "eɪ", "əʊ", "oʊ", "ɔɪ", "eə", "ɪə", "ʊə", "ts", "dz", "ɚ", "ɐ̃", "ɫ", "ç", "ʔ"]
)


def _phonemes(*spans):
    """(label, duration) pairs laid out from 0.1 s on, as eSpeak's timings are."""
    timings, start = [], 0.1
    for label, duration in spans:
        timings.append((label, start, start + duration))
        start += duration
    return timings


def _frames_of(start: float, end: float) -> slice:
    return slice(int(np.ceil(start * 25)), int(end * 25))


def _dark_pixels(lip: np.ndarray) -> np.ndarray:
    return (lip < 60).sum(axis=(1, 2))


@pytest.fixture(scope="module")
def speech():
    phonemes = _phonemes(("h", 0.06), ("a", 0.3), ("m", 0.16), ("a", 0.3), ("_", 0.3), ("s", 0.1), ("u", 0.25))
    return phonemes, mouth_trajectory(phonemes, 60)


def test_every_espeak_phoneme_has_a_viseme_and_lookalikes_share_one():
    for label in ESPEAK_PHONEMES:
        assert viseme_of(label) in VISEMES, label
    assert viseme_of("p") == viseme_of("b") == viseme_of("m")
    assert viseme_of("f") == viseme_of("v") != viseme_of("p")
    assert viseme_of("t") == viseme_of("d") == viseme_of("n") == viseme_of("s")
    assert viseme_of("ɔ̃") == viseme_of("ɔ") and viseme_of("iː") == viseme_of("i")
    assert len({viseme_of(label) for label in ESPEAK_PHONEMES}) >= 12


@pytest.mark.parametrize("label", ["", "Q", "ǃ", "ʘː", "a̰", "xyz", "ˈ"])
def test_unknown_labels_fall_back_without_error(label):
    assert viseme_of(label) in VISEMES
    assert mouth_trajectory([(label, 0.1, 0.3)], 10).shape == (10, len(MOUTH_PARAMS))


def test_trajectory_shape_range_and_rest_in_silence(speech):
    phonemes, mouth = speech
    assert mouth.shape == (60, len(MOUTH_PARAMS)) and mouth.dtype == np.float32
    assert mouth.min() >= 0 and mouth.max() <= 1
    rest = VISEMES[REST]
    np.testing.assert_allclose(mouth[0], rest, atol=0.03)  # before the first phoneme
    np.testing.assert_allclose(mouth[-1], rest, atol=1e-4)  # after the last
    _, pause_start, pause_end = phonemes[4]
    pause_middle = int((pause_start + pause_end) / 2 * 25)
    assert mouth[pause_middle, OPEN] < 0.05
    np.testing.assert_allclose(mouth_trajectory([], 8), np.tile(rest, (8, 1)), atol=1e-6)


def test_vowels_open_more_than_consonants_and_bilabials_close(speech):
    phonemes, mouth = speech
    (_, a_start, a_end), (_, m_start, m_end), (_, s_start, s_end) = phonemes[1], phonemes[2], phonemes[5]
    vowel_open = mouth[_frames_of(a_start + 0.05, a_end - 0.05), OPEN]
    assert vowel_open.min() > 0.6
    bilabial_open = mouth[_frames_of(m_start, m_end), OPEN]
    assert bilabial_open.min() < 0.1 and bilabial_open.max() < vowel_open.min()
    assert mouth[_frames_of(s_start, s_end), OPEN].max() < vowel_open.min()


def test_diphthong_moves_between_its_targets():
    mouth = mouth_trajectory(_phonemes(("_", 0.1), ("aɪ", 0.5), ("_", 0.2)), 25)
    width = MOUTH_PARAMS.index("width")
    start, end = _frames_of(0.2, 0.33), _frames_of(0.58, 0.7)
    assert mouth[start, OPEN].mean() > mouth[end, OPEN].mean() + 0.2
    assert mouth[end, width].mean() > mouth[start, width].mean() + 0.1


def test_coarticulation_is_smooth_and_anticipates(speech):
    _, mouth = speech
    assert np.abs(np.diff(mouth, axis=0)).max() < 0.55  # a release from closure takes more than one frame
    onset = 1.0
    late = mouth_trajectory([("_", 0.1, onset), ("a", onset, 1.4)], 40)
    frame_before_onset = int(onset * 25) - 1  # covers 0.96-1.0 s, all before the vowel sounds
    assert late[frame_before_onset, OPEN] > 0.1
    assert late[frame_before_onset - 5, OPEN] < 0.01


def test_trajectory_is_deterministic(speech):
    phonemes, mouth = speech
    assert np.array_equal(mouth_trajectory(phonemes, 60), mouth)


# ---------------------------------------------------------------------------------------
# Rendering


def _constant_mouth(num_frames: int, **values) -> np.ndarray:
    mouth = np.tile(VISEMES[REST], (num_frames, 1))
    for name, value in values.items():
        mouth[:, MOUTH_PARAMS.index(name)] = value
    return mouth


def test_identity_is_seeded_and_varies():
    assert make_identity(7) == make_identity(7)
    identities = [make_identity(seed) for seed in range(8)]
    assert all(isinstance(identity, FaceIdentity) for identity in identities)
    assert len({identity.skin for identity in identities}) == 8
    assert len({identity.hair_style for identity in identities}) > 1


def test_render_shapes_dtypes_and_determinism(speech):
    _, mouth = speech
    identity = make_identity(3)
    face, lip = render_face(identity, mouth, seed=11)
    assert face.shape == (60, 96, 96, 3) and face.dtype == np.uint8
    assert lip.shape == (60, 96, 96) and lip.dtype == np.uint8
    again_face, again_lip = render_face(make_identity(3), mouth.copy(), seed=11)
    assert np.array_equal(face, again_face) and np.array_equal(lip, again_lip)
    other_face, _ = render_face(make_identity(4), mouth, seed=11)
    assert np.abs(face.astype(int) - other_face).mean() > 10


def test_open_mouth_is_dark_in_the_lip_view_and_closed_is_not():
    mouth = np.concatenate([_constant_mouth(5), _constant_mouth(5, open=0.8, width=0.6)])
    _, lip = render_face(make_identity(5), mouth, seed=0)
    dark = _dark_pixels(lip)
    assert dark[:5].max() < 5
    assert dark[5:].min() > 300


def test_same_mouth_gives_the_same_opening_on_every_face():
    mouth = _constant_mouth(4, open=0.6, width=0.6, teeth=0.3)
    areas = [_dark_pixels(render_face(make_identity(seed), mouth, seed=1)[1]).mean() for seed in range(6)]
    assert max(areas) < 1.1 * min(areas), areas


def test_opening_grows_with_the_open_parameter():
    mouth = _constant_mouth(6)
    mouth[:, OPEN] = np.linspace(0.2, 1.0, 6)
    dark = _dark_pixels(render_face(make_identity(9), mouth, seed=2)[1])
    assert np.all(np.diff(dark) > 0), dark


def test_take_seed_moves_the_head_but_not_the_mouth(speech):
    _, mouth = speech
    identity = make_identity(2)
    face_a, lip_a = render_face(identity, mouth, seed=1)
    face_b, lip_b = render_face(identity, mouth, seed=2)
    assert not np.array_equal(face_a, face_b) and not np.array_equal(lip_a, lip_b)
    dark_a, dark_b = _dark_pixels(lip_a), _dark_pixels(lip_b)
    assert np.abs(dark_a - dark_b).max() <= 0.06 * dark_a.max() + 5


def test_head_motion_is_small_and_shared_by_both_views():
    mouth = _constant_mouth(50)
    identity = make_identity(4)
    face, lip = render_face(identity, mouth, seed=3)
    lip_frames = lip.astype(np.float32)
    # Vertical profile of the (static) face: its shift between frames is the head motion.
    profile = lip_frames.mean(axis=2)
    lags = [np.argmax(np.correlate(p - p.mean(), profile[0] - profile[0].mean(), "full")) for p in profile]
    assert max(lags) - min(lags) <= 6
    assert np.abs(face[1:].astype(int) - face[:-1]).mean() < 6


def test_some_takes_blink():
    mouth = _constant_mouth(100)  # four seconds
    identity = make_identity(6)
    cx = identity.head_centre[0]
    reach = identity.eye_spacing + identity.eye_size + 2
    eyes = (slice(int(identity.eye_y) - 5, int(identity.eye_y) + 6), slice(int(cx - reach), int(cx + reach) + 1))

    def visible_eye_white(seed):
        face, _ = render_face(identity, mouth, seed=seed)
        return (face[:, eyes[0], eyes[1]].min(axis=3) > 200).sum(axis=(1, 2))

    blinked = 0
    for seed in range(6):
        white = visible_eye_white(seed)
        assert np.median(white) > 20  # open eyes most of the time
        blinked += white.min() < 0.3 * np.median(white)
    assert 1 <= blinked < 6
