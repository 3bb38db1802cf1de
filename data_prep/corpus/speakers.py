"""The corpus's speakers: each a consistent voice (eSpeak variant, pitch, rate) and a consistent face.

A speaker keeps the same voice settings and face in every language, so identity can be
carried across a translation; held-out speakers never appear in training splits and
serve the zero-shot (unseen speaker) tests.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

from data_prep.corpus.speech import VoiceSpec

# Distinct eSpeak voice variants; male and female alternate so held-out speakers cover both.
VOICE_VARIANTS = (
    "m1",
    "f1",
    "m2",
    "f2",
    "m3",
    "f3",
    "m4",
    "f4",
    "m5",
    "f5",
    "m6",
    "klatt2",
    "m7",
    "klatt3",
    "klatt",
    "klatt4",
)


@dataclass(frozen=True)
class Speaker:
    speaker_id: str
    voice: VoiceSpec
    face_seed: int
    held_out: bool


def make_speakers(count: int, held_out: int, seed: int) -> list[Speaker]:
    """`count` speakers with seeded voices and faces; the last `held_out` are kept out of training."""
    if not 1 <= count <= len(VOICE_VARIANTS):
        raise ValueError(f"speaker count must be in 1..{len(VOICE_VARIANTS)}, got {count}")
    if not 0 <= held_out < count:
        raise ValueError(f"held-out speakers must be in 0..{count - 1}, got {held_out}")
    rng = random.Random(seed)
    speakers = []
    for index in range(count):
        voice = VoiceSpec(
            variant=VOICE_VARIANTS[index],
            rate=rng.randint(135, 175),
            pitch=rng.randint(25, 75),
            pitch_range=rng.randint(30, 70),
        )
        speakers.append(
            Speaker(f"spk{index:02d}", voice, face_seed=rng.randrange(2**31), held_out=index >= count - held_out)
        )
    return speakers
