"""In-process eSpeak NG synthesis: audio format, determinism, voices, phoneme and word timings."""

from __future__ import annotations

import multiprocessing
import threading

import numpy as np
import pytest

from data_prep.corpus.speech import (
    MARGIN_S,
    PAUSE,
    SAMPLE_RATE,
    Utterance,
    VoiceSpec,
    synthesize,
)

VOICE = VoiceSpec(variant="m3", rate=160, pitch=50, pitch_range=50)
SENTENCES = {
    "en": "The boy drinks a café latte, and the girl reads a book.",
    "es": "¿Dónde está el niño? El niño bebe un café con leche.",
    "fr": "Le garçon boit un café au lait, et la fille lit un livre.",
}
WORDS = {
    "en": ["The", "boy", "drinks", "a", "café", "latte", "and", "the", "girl", "reads", "a", "book"],
    "es": ["Dónde", "está", "el", "niño", "El", "niño", "bebe", "un", "café", "con", "leche"],
    "fr": ["Le", "garçon", "boit", "un", "café", "au", "lait", "et", "la", "fille", "lit", "un", "livre"],
}

_cache: dict[tuple, Utterance] = {}


def speak(text: str, lang: str = "en", voice: VoiceSpec = VOICE) -> Utterance:
    key = (text, lang, voice)
    if key not in _cache:
        _cache[key] = synthesize(text, lang, voice)
    return _cache[key]


def rms(wave: np.ndarray, start_s: float, end_s: float) -> float:
    segment = wave[round(start_s * SAMPLE_RATE) : round(end_s * SAMPLE_RATE)].astype(np.float64)
    return float(np.sqrt(np.mean(segment**2))) if segment.size else 0.0


def median_f0(wave: np.ndarray) -> float:
    """Median autocorrelation pitch (Hz) over loud 40 ms frames."""
    frame, values = 640, []
    for start in range(0, len(wave) - frame, 320):
        x = wave[start : start + frame].astype(np.float64)
        if np.sqrt(np.mean(x**2)) < 0.05:
            continue
        x = x - x.mean()
        ac = np.correlate(x, x, "full")[frame - 1 :]
        lo, hi = SAMPLE_RATE // 400, SAMPLE_RATE // 60
        lag = lo + int(np.argmax(ac[lo:hi]))
        if ac[lag] > 0.3 * ac[0]:
            values.append(SAMPLE_RATE / lag)
    assert len(values) > 10
    return float(np.median(values))


# --------------------------------------------------------------------------------------
# Audio


@pytest.mark.parametrize("lang", sorted(SENTENCES))
def test_output_is_16k_float32_in_range(lang):
    utt = speak(SENTENCES[lang], lang)
    assert utt.wave.dtype == np.float32 and utt.wave.ndim == 1
    assert np.all(np.isfinite(utt.wave))
    peak = float(np.abs(utt.wave).max())
    assert 0.2 < peak <= 0.95 + 1e-6  # normalised, never clipped
    assert 2.0 < len(utt.wave) / SAMPLE_RATE < 8.0  # a spoken sentence, at 16 kHz


def test_duration_grows_with_text():
    short = speak("The boy reads.")
    longer = speak("The boy reads a book in the garden.")
    longest = speak("The boy reads a book in the garden, and the girl drinks a cup of tea with her friends.")
    durations = [len(u.wave) for u in (short, longer, longest)]
    assert 0.5 * SAMPLE_RATE < durations[0] < durations[1] < durations[2]


def test_same_input_gives_identical_wave_whatever_came_before():
    text = "The girl reads a book."
    first = synthesize(text, "en", VOICE)
    synthesize("Le garçon boit un café.", "fr", VoiceSpec("f2", 140, 70, 60))  # change all global state
    synthesize("El niño bebe.", "es", VoiceSpec("klatt2", 180, 30, 40))
    again = synthesize(text, "en", VOICE)
    assert np.array_equal(first.wave, again.wave)
    assert first.phonemes == again.phonemes and first.words == again.words


def test_voices_differ_on_the_same_text():
    text = SENTENCES["en"]
    male, female, klatt = (speak(text, "en", VoiceSpec(v, 160, 50, 50)) for v in ("m3", "f2", "klatt2"))
    assert [w for w, _, _ in male.words] == [w for w, _, _ in female.words] == [w for w, _, _ in klatt.words]
    n = min(len(male.wave), len(klatt.wave))
    assert not np.allclose(male.wave[:n], klatt.wave[:n], atol=1e-3)
    assert median_f0(female.wave) > 1.4 * median_f0(male.wave)


def test_pitch_parameter_raises_f0():
    text = SENTENCES["en"]
    low = speak(text, "en", VoiceSpec("m3", 160, 20, 50))
    high = speak(text, "en", VoiceSpec("m3", 160, 80, 50))
    assert median_f0(high.wave) > 1.3 * median_f0(low.wave)


def test_faster_rate_gives_shorter_audio():
    text = SENTENCES["fr"]
    slow = speak(text, "fr", VoiceSpec("m3", 130, 50, 50))
    fast = speak(text, "fr", VoiceSpec("m3", 190, 50, 50))
    assert len(fast.wave) < 0.85 * len(slow.wave)
    assert [w for w, _, _ in fast.words] == [w for w, _, _ in slow.words]


# --------------------------------------------------------------------------------------
# Timings


@pytest.mark.parametrize("lang", sorted(SENTENCES))
def test_phonemes_are_contiguous_and_inside_the_audio(lang):
    utt = speak(SENTENCES[lang], lang)
    duration = len(utt.wave) / SAMPLE_RATE
    assert len(utt.phonemes) > 20
    for label, start, end in utt.phonemes:
        assert label and "ˈ" not in label and "ˌ" not in label
        assert 0.0 <= start < end <= duration
    for (_, _, end), (_, start, _) in zip(utt.phonemes, utt.phonemes[1:]):
        assert end == start
    assert utt.phonemes[0][0] != PAUSE and utt.phonemes[-1][0] != PAUSE
    # A consistent margin of silence on both sides.
    assert utt.phonemes[0][1] == pytest.approx(MARGIN_S, abs=1e-3)
    assert duration - utt.phonemes[-1][2] == pytest.approx(MARGIN_S, abs=1e-3)


@pytest.mark.parametrize("lang", sorted(SENTENCES))
def test_phoneme_spans_cover_the_speech(lang):
    utt = speak(SENTENCES[lang], lang)
    wave = utt.wave
    duration = len(wave) / SAMPLE_RATE
    spoken = [(s, e) for label, s, e in utt.phonemes if label != PAUSE]
    speech = np.sqrt(np.mean([rms(wave, s, e) ** 2 for s, e in spoken]))
    lead, trail = rms(wave, 0, utt.phonemes[0][1]), rms(wave, utt.phonemes[-1][2], duration)
    assert speech > 0.05
    assert lead < 0.01 * speech and trail < 0.01 * speech
    # The comma / sentence break is a reported pause, and it is (nearly) silent.
    pauses = [(s, e) for label, s, e in utt.phonemes if label == PAUSE]
    assert pauses
    assert max(rms(wave, s, e) for s, e in pauses) < 0.1 * speech
    # Speech starts right where the first phoneme does.
    first_start = utt.phonemes[0][1]
    assert rms(wave, first_start, first_start + 0.15) > 0.1 * speech


@pytest.mark.parametrize("lang", sorted(SENTENCES))
def test_words_match_the_input_in_order(lang):
    utt = speak(SENTENCES[lang], lang)
    assert [word for word, _, _ in utt.words] == WORDS[lang]
    boundaries = {t for _, s, e in utt.phonemes for t in (s, e)}
    previous_end = 0.0
    for _, start, end in utt.words:
        assert previous_end <= start < end
        assert start in boundaries and end in boundaries  # words are made of whole phonemes
        previous_end = end
    assert utt.words[0][1] == utt.phonemes[0][1] and utt.words[-1][2] == utt.phonemes[-1][2]


def test_word_labels_keep_the_input_spelling():
    utt = speak("L'homme mange aujourd'hui, c'est-à-dire maintenant!", "fr")
    assert [w for w, _, _ in utt.words] == ["L'homme", "mange", "aujourd'hui", "c'est-à-dire", "maintenant"]
    utt = speak("Quiero 3 cafés — ¡gracias!", "es")
    assert [w for w, _, _ in utt.words] == ["Quiero", "3", "cafés", "gracias"]


def test_phonemes_are_ipa():
    def labels(text: str, lang: str) -> set[str]:
        return {label for label, _, _ in speak(text, lang).phonemes}

    assert "ɲ" in labels("El niño.", "es")
    assert "ɔ̃" in labels("Le garçon.", "fr")
    assert {"ð", "ə"} <= labels("The book.", "en")


# --------------------------------------------------------------------------------------
# Errors and concurrency


@pytest.mark.parametrize(
    ("text", "lang", "voice", "needle"),
    [
        ("Hello.", "de", VOICE, "'de'"),
        ("Hello.", "en-us", VOICE, "'en-us'"),
        ("", "en", VOICE, "empty"),
        ("   \n", "en", VOICE, "empty"),
        ("Hello.", "en", VoiceSpec("nosuchvariant", 160, 50, 50), "'nosuchvariant'"),
        ("Hello.", "en", VoiceSpec("m3", 20, 50, 50), "20"),
        ("Hello.", "en", VoiceSpec("m3", 160, 150, 50), "150"),
    ],
)
def test_errors_name_the_bad_value(text, lang, voice, needle):
    with pytest.raises(ValueError) as info:
        synthesize(text, lang, voice)
    message = str(info.value)
    assert needle in message and "\n" not in message


def _worker(queue):
    queue.put(synthesize("The girl reads a book.", "en", VOICE).wave)


def test_worker_process_gives_the_same_wave():
    expected = speak("The girl reads a book.")
    context = multiprocessing.get_context("fork")
    queue = context.Queue()
    process = context.Process(target=_worker, args=(queue,))
    process.start()
    wave = queue.get(timeout=30)
    process.join(timeout=30)
    assert process.exitcode == 0
    assert np.array_equal(wave, expected.wave)


def test_threads_are_serialised_safely():
    texts = ["The boy reads.", "The girl drinks tea.", "A book is on the table."]
    expected = [synthesize(t, "en", VOICE).wave for t in texts]
    results: dict[int, np.ndarray] = {}

    def run(index: int) -> None:
        results[index] = synthesize(texts[index % 3], "en", VOICE).wave

    threads = [threading.Thread(target=run, args=(i,)) for i in range(6)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert all(np.array_equal(results[i], expected[i % 3]) for i in range(6))
