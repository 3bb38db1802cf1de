"""In-process eSpeak NG speech synthesis with phoneme and word timings (ctypes, no subprocess).

`synthesize(text, lang, voice)` speaks a sentence with the libespeak-ng shipped by
`espeakng-loader` and returns an `Utterance`: 16 kHz float32 mono audio plus IPA phoneme and
word timings in seconds, measured on the returned wave.

What the output looks like
--------------------------
* **Margins.** eSpeak's output is cut to the speech (from the start of the first phoneme to
  the later of the end of the last phoneme and the last non-silent sample) and exactly
  ``MARGIN_S`` (0.1 s) of silence is kept (or zero-padded) before and after it. All timings
  are shifted with the audio, so the first phoneme starts at 0.1 s and the last one ends
  0.1 s before the end of the wave.
* **Phonemes** are ``(ipa, start_s, end_s)`` tuples in order, contiguous (each ends where
  the next starts) and covering the speech from the first phoneme to the last; each has
  ``start_s < end_s``. Labels are eSpeak's IPA names with the stress marks ``ˈ`` and ``ˌ``
  removed (for example ``"əʊ"``, ``"ɜː"``, ``"eɪ"``; ASCII
  non-letters eSpeak appends, as in ``"ə-"``, are dropped too). **Pauses inside the utterance**
  (between clauses and sentences) **are reported as ``"_"``** (consecutive pause events are
  merged into one); the silent margins before the first and after the last phoneme are not
  reported. A word starts with its first phoneme: when eSpeak's word event comes before the
  word's first phoneme event (the closure of a stop, for instance), the phoneme is extended
  back to the word event, so word and phoneme boundaries coincide.
* **Words** are ``(word, start_s, end_s)`` where ``word`` is the whitespace-separated token
  of the input with leading and trailing punctuation removed (``"¿Dónde"`` -> ``"Dónde"``,
  ``"niño?"`` -> ``"niño"``, ``"L'homme"`` and ``"aujourd'hui."`` -> ``"L'homme"`` and
  ``"aujourd'hui"``). eSpeak's word events are mapped to tokens through their 1-based
  character ``text_position``; several events within one token (numbers, elisions) are
  merged. A token made only of punctuation or symbols is not listed as a word (whatever
  eSpeak says for it stays in the phonemes). A word spans its phonemes, pauses excluded.
* **Loudness.** The wave is scaled so that the RMS of its non-silent part is
  ``TARGET_RMS`` (0.1, about -20 dBFS); if that would push the peak above ``PEAK_LIMIT``
  (0.95), it is scaled down to that peak instead. eSpeak's 22050 Hz PCM is resampled to
  16 kHz with ``scipy.signal.resample_poly(x, 320, 441)``.

Concurrency and determinism
---------------------------
libespeak-ng keeps global state (one voice, one set of parameters, one callback, and
synthesis state in static variables), so a process has one synthesiser, created lazily on
first use, and every utterance is made by a freshly loaded private copy of the library (see
`_Synthesizer`): the same text, language and voice always give the identical wave, whatever
was spoken before. A lock makes calls from several threads safe but serialises them: threads
are not a supported way to parallelise. Use worker processes (forked or spawned; each loads
its own copy). Seeding eSpeak's noise also reseeds libc ``rand()`` of the calling process.
"""

from __future__ import annotations

import _ctypes
import atexit
import ctypes
import os
import shutil
import tempfile
import threading
import unicodedata
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from scipy.signal import resample_poly

SAMPLE_RATE = 16_000
"""Sample rate of `Utterance.wave`."""
ESPEAK_RATE = 22_050
"""Sample rate of eSpeak NG's own output (checked against espeak_Initialize at start-up)."""
LANGUAGES = ("en", "es", "fr")
MARGIN_S = 0.1
"""Silence kept before the first and after the last phoneme, in seconds."""
PAUSE = "_"
"""Label of a pause inside an utterance."""
TARGET_RMS = 0.1
PEAK_LIMIT = 0.95
SILENCE_FRACTION = 0.01
"""A raw sample is silent when its magnitude is below this fraction of the utterance's peak."""

RANDOM_SEED = 1
"""Seed given to eSpeak's noise generators before every utterance (determinism)."""
RATE_RANGE = (80, 450)  # espeakRATE_MINIMUM, espeakRATE_MAXIMUM (words per minute)

# speak_lib.h constants.
_AUDIO_OUTPUT_SYNCHRONOUS = 2
_INITIALIZE_PHONEME_EVENTS = 0x1
_INITIALIZE_PHONEME_IPA = 0x2
_POS_CHARACTER = 1
_CHARS_UTF8 = 1
_EVENT_LIST_TERMINATED = 0
_EVENT_WORD = 1
_EVENT_END = 5
_EVENT_MSG_TERMINATED = 6
_EVENT_PHONEME = 7
_PARAM_RATE = 1
_PARAM_PITCH = 3
_PARAM_RANGE = 4


@dataclass(frozen=True)
class VoiceSpec:
    """One speaker's eSpeak voice: variant (without "+", e.g. "m3", "f2", "klatt2") and prosody."""

    variant: str  # eSpeak variant name without "+", e.g. "m3", "f2", "klatt2"
    rate: int  # words per minute, e.g. 130..190 (eSpeak accepts 80..450)
    pitch: int  # base pitch 0..100 (50 is the voice's normal)
    pitch_range: int  # pitch range 0..100 (0 is monotone, 50 normal)


@dataclass
class Utterance:
    """Synthesised speech with its timings (seconds on `wave`); see the module docstring."""

    wave: np.ndarray  # float32 mono at 16 kHz, in [-1, 1]
    phonemes: list[tuple[str, float, float]]  # (IPA phoneme or "_" for a pause, start_s, end_s)
    words: list[tuple[str, float, float]]  # (word as in the input, start_s, end_s)

    @property
    def duration(self) -> float:
        return len(self.wave) / SAMPLE_RATE


# ---------------------------------------------------------------------------------------
# ctypes binding (layouts from espeak-ng's speak_lib.h)


class _EventId(ctypes.Union):
    _fields_ = [
        ("number", ctypes.c_int),
        ("name", ctypes.c_char_p),
        ("string", ctypes.c_char * 8),
    ]


class _Event(ctypes.Structure):
    _fields_ = [
        ("type", ctypes.c_int),
        ("unique_identifier", ctypes.c_uint),
        ("text_position", ctypes.c_int),
        ("length", ctypes.c_int),
        ("audio_position", ctypes.c_int),
        ("sample", ctypes.c_int),
        ("user_data", ctypes.c_void_p),
        ("id", _EventId),
    ]


_SynthCallback = ctypes.CFUNCTYPE(ctypes.c_int, ctypes.POINTER(ctypes.c_short), ctypes.c_int, ctypes.POINTER(_Event))


@dataclass
class _RawEvent:
    kind: int
    sample: int  # index into eSpeak's 22050 Hz output
    text_position: int  # 1-based character position in the input
    name: str  # phoneme IPA for phoneme events, else ""


class _Synthesizer:
    """The process's eSpeak NG, loaded afresh for every utterance.

    libespeak-ng keeps synthesis state in static variables that no API call resets (the
    pitch-flutter phase, echo buffers, resonator memories, Klatt generator state), so the same
    text would come out slightly different depending on what was spoken before. To make every
    utterance depend only on its own input, each one loads a private copy of the library
    (never shared with other users of libespeak-ng in the process), initialises it,
    synthesises, terminates it and unloads it again; that costs a few milliseconds. The
    random generators eSpeak draws noise from (its own and libc ``rand()``) are seeded with
    ``RANDOM_SEED`` before each utterance.
    """

    def __init__(self) -> None:
        import espeakng_loader

        data_path = Path(espeakng_loader.get_data_path())
        self._variants_dir = data_path / "voices" / "!v"
        self._data_parent = str(data_path.parent).encode()
        self._source = Path(espeakng_loader.get_library_path())
        self._copy: Path | None = None
        self._copy_pid = -1
        self._callback = _SynthCallback(self._on_synth)  # keep a reference: C holds only the pointer
        self._libc = ctypes.CDLL(None)
        self._libc.srand.argtypes = [ctypes.c_uint]
        self._libc.srand.restype = None
        self._chunks: list[np.ndarray] = []
        self._events: list[_RawEvent] = []
        self._lock = threading.Lock()

    def _library_copy(self) -> Path:
        """A private copy of libespeak-ng for this process (a forked child makes its own)."""
        if self._copy is None or self._copy_pid != os.getpid() or not self._copy.exists():
            folder = Path(tempfile.mkdtemp(prefix="av2av-espeak-"))
            copy = folder / "libespeak-ng-private.so"
            shutil.copyfile(self._source, copy)
            pid = os.getpid()
            atexit.register(_remove_copy, folder, pid)
            self._copy, self._copy_pid = copy, pid
        return self._copy

    def _load(self) -> ctypes.CDLL:
        lib = ctypes.CDLL(str(self._library_copy()))
        lib.espeak_Initialize.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_char_p, ctypes.c_int]
        lib.espeak_Initialize.restype = ctypes.c_int
        lib.espeak_SetSynthCallback.argtypes = [_SynthCallback]
        lib.espeak_SetSynthCallback.restype = None
        lib.espeak_SetVoiceByName.argtypes = [ctypes.c_char_p]
        lib.espeak_SetVoiceByName.restype = ctypes.c_int
        lib.espeak_SetParameter.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int]
        lib.espeak_SetParameter.restype = ctypes.c_int
        lib.espeak_Synth.argtypes = [
            ctypes.c_void_p,
            ctypes.c_size_t,
            ctypes.c_uint,
            ctypes.c_int,
            ctypes.c_uint,
            ctypes.c_uint,
            ctypes.c_void_p,
            ctypes.c_void_p,
        ]
        lib.espeak_Synth.restype = ctypes.c_int
        lib.espeak_Synchronize.argtypes = []
        lib.espeak_Synchronize.restype = ctypes.c_int
        lib.espeak_Terminate.argtypes = []
        lib.espeak_Terminate.restype = ctypes.c_int
        lib.espeak_ng_SetRandSeed.argtypes = [ctypes.c_long]
        lib.espeak_ng_SetRandSeed.restype = ctypes.c_int
        return lib

    def _on_synth(self, wav, numsamples, events) -> int:
        if numsamples > 0 and wav:
            self._chunks.append(np.ctypeslib.as_array(wav, shape=(numsamples,)).copy())
        if events:
            index = 0
            while True:
                event = events[index]
                if event.type == _EVENT_LIST_TERMINATED:
                    break
                name = ""
                if event.type == _EVENT_PHONEME:
                    name = event.id.string.decode("utf-8", errors="ignore")
                self._events.append(_RawEvent(event.type, event.sample, event.text_position, name))
                index += 1
        return 0

    def has_variant(self, variant: str) -> bool:
        return bool(variant) and "/" not in variant and (self._variants_dir / variant).is_file()

    def run(self, text: str, voice_name: bytes, voice: VoiceSpec) -> tuple[np.ndarray, list[_RawEvent]]:
        """Synthesise `text`; returns eSpeak's int16 PCM at 22050 Hz and its events."""
        with self._lock:
            self._chunks, self._events = [], []
            lib = self._load()
            try:
                options = _INITIALIZE_PHONEME_EVENTS | _INITIALIZE_PHONEME_IPA
                rate = lib.espeak_Initialize(_AUDIO_OUTPUT_SYNCHRONOUS, 0, self._data_parent, options)
                if rate != ESPEAK_RATE:
                    raise RuntimeError(f"espeak_Initialize returned sample rate {rate}, expected {ESPEAK_RATE}")
                try:
                    lib.espeak_SetSynthCallback(self._callback)
                    status = lib.espeak_SetVoiceByName(voice_name)
                    if status != 0:
                        raise ValueError(f"eSpeak NG has no voice {voice_name.decode()!r} (error {status})")
                    lib.espeak_SetParameter(_PARAM_RATE, int(voice.rate), 0)
                    lib.espeak_SetParameter(_PARAM_PITCH, int(voice.pitch), 0)
                    lib.espeak_SetParameter(_PARAM_RANGE, int(voice.pitch_range), 0)
                    lib.espeak_ng_SetRandSeed(RANDOM_SEED)
                    self._libc.srand(RANDOM_SEED)
                    data = text.encode("utf-8")
                    status = lib.espeak_Synth(data, len(data) + 1, 0, _POS_CHARACTER, 0, _CHARS_UTF8, None, None)
                    if status != 0:
                        raise RuntimeError(f"espeak_Synth failed with error {status}")
                    lib.espeak_Synchronize()
                finally:
                    lib.espeak_Terminate()
            finally:
                handle = lib._handle
                del lib
                _ctypes.dlclose(handle)
            chunks, events = self._chunks, self._events
            self._chunks, self._events = [], []
        pcm = np.concatenate(chunks) if chunks else np.zeros(0, dtype=np.int16)
        return pcm, events


def _remove_copy(folder: Path, pid: int) -> None:
    if os.getpid() == pid:
        shutil.rmtree(folder, ignore_errors=True)


_SYNTH: _Synthesizer | None = None
_SYNTH_LOCK = threading.Lock()


def _synthesizer() -> _Synthesizer:
    global _SYNTH
    with _SYNTH_LOCK:
        if _SYNTH is None:
            _SYNTH = _Synthesizer()
        return _SYNTH


# ---------------------------------------------------------------------------------------
# Timings


def _clean_phoneme(name: str) -> str:
    """eSpeak's IPA phoneme name without stress marks and ASCII non-letters (e.g. "ə-" -> "ə")."""
    return "".join(ch for ch in name if ch not in "ˈˌ" and (ch.isalpha() or not ch.isascii()) and not ch.isspace())


def _word_tokens(text: str) -> list[tuple[int, int, str]]:
    """Whitespace-separated tokens as (start, end) 0-based character spans and their label
    (the token without leading/trailing punctuation); tokens that are only punctuation are dropped."""
    tokens = []
    index, n = 0, len(text)
    while index < n:
        if text[index].isspace():
            index += 1
            continue
        start = index
        while index < n and not text[index].isspace():
            index += 1
        label = _strip_punctuation(text[start:index])
        if label:
            tokens.append((start, index, label))
    return tokens


def _strip_punctuation(token: str) -> str:
    def is_punct(ch: str) -> bool:
        return unicodedata.category(ch)[0] in "PS"

    lo, hi = 0, len(token)
    while lo < hi and is_punct(token[lo]):
        lo += 1
    while hi > lo and is_punct(token[hi - 1]):
        hi -= 1
    return token[lo:hi]


def _token_at(tokens: list[tuple[int, int, str]], position: int) -> int | None:
    """Index of the token containing 0-based character `position`, or None."""
    for index, (start, end, _) in enumerate(tokens):
        if start <= position < end:
            return index
    return None


def _timings(text: str, events: list[_RawEvent], pcm: np.ndarray):
    """Phoneme and word spans in raw (22050 Hz) samples, plus the speech region [s0, s1)."""
    n = len(pcm)
    # Walk the events: phonemes with their start (moved back to a preceding word event of
    # the same word) and the token each belongs to.
    tokens = _word_tokens(text)
    phones: list[list] = []  # [label, start, token index or None]
    pending_word: int | None = None  # sample of a word event not yet matched to a phoneme
    current_token: int | None = None
    stop_sample = n  # the last END / MSG_TERMINATED event
    for event in events:
        sample = min(max(event.sample, 0), n)
        if event.kind == _EVENT_WORD:
            pending_word = sample
            current_token = _token_at(tokens, event.text_position - 1)
        elif event.kind == _EVENT_PHONEME:
            label = _clean_phoneme(event.name)
            if not label:
                phones.append([PAUSE, sample, None])
                pending_word = None  # the pause belongs to no word; keep the word start at its phoneme
                continue
            start = sample
            if pending_word is not None:
                previous_start = phones[-1][1] if phones else 0
                if previous_start <= pending_word <= sample:
                    start = pending_word
                pending_word = None
            phones.append([label, start, current_token])
        elif event.kind in (_EVENT_END, _EVENT_MSG_TERMINATED) and phones:
            stop_sample = sample
    # Pauses before the first / after the last spoken phoneme are margins, not pauses.
    spoken = [i for i, p in enumerate(phones) if p[0] != PAUSE]
    if not spoken:
        return None
    first, last = spoken[0], spoken[-1]
    next_after_last = phones[last + 1][1] if last + 1 < len(phones) else stop_sample
    magnitude = np.abs(pcm.astype(np.int32))
    loud = np.flatnonzero(magnitude > SILENCE_FRACTION * max(int(magnitude.max(initial=0)), 1))
    s0 = phones[first][1]
    s1 = max(next_after_last, phones[last][1] + 1)
    if loud.size:
        s0 = min(s0, int(loud[0]))
        s1 = max(s1, int(loud[-1]) + 1)
    s1 = min(s1, n)
    phones = phones[first : last + 1]
    phones[0][1] = s0
    # Contiguous spans: each phoneme ends where the next starts, the last at s1; merge pauses.
    spans: list[list] = []
    for index, (label, start, token) in enumerate(phones):
        end = phones[index + 1][1] if index + 1 < len(phones) else s1
        if end <= start:
            continue
        if spans and label == PAUSE and spans[-1][0] == PAUSE:
            spans[-1][2] = end
            continue
        spans.append([label, start, end, token])
    # Words: the spoken phonemes of each token.
    words: dict[int, list] = {}
    for label, start, end, token in spans:
        if label == PAUSE or token is None:
            continue
        if token in words:
            words[token][2] = end
        else:
            words[token] = [tokens[token][2], start, end]
    word_spans = [words[k] for k in sorted(words)]
    return [tuple(s[:3]) for s in spans], word_spans, s0, s1


def synthesize(text: str, lang: str, voice: VoiceSpec) -> Utterance:
    """Speak `text` in `lang` ("en", "es", "fr") with `voice`; 16 kHz output (resample the
    22050 Hz PCM with scipy.signal.resample_poly 320/441), timings in seconds at the output.

    See the module docstring for margins, pauses ("_"), word labels and loudness.
    Raises ValueError for an unknown language or variant, empty text, out-of-range voice
    parameters, or text that produces no speech.
    """
    if lang not in LANGUAGES:
        raise ValueError(f"unknown language {lang!r}: expected one of {', '.join(LANGUAGES)}")
    if not isinstance(text, str) or not text.strip():
        raise ValueError(f"text to synthesise is empty: {text!r}")
    if not RATE_RANGE[0] <= voice.rate <= RATE_RANGE[1]:
        raise ValueError(f"voice rate must be in {RATE_RANGE[0]}..{RATE_RANGE[1]} words per minute, got {voice.rate}")
    for field_name in ("pitch", "pitch_range"):
        value = getattr(voice, field_name)
        if not 0 <= value <= 100:
            raise ValueError(f"voice {field_name} must be in 0..100, got {value}")
    synth = _synthesizer()
    if not synth.has_variant(voice.variant):
        raise ValueError(f"unknown eSpeak voice variant {voice.variant!r}")
    # The base language name, not e.g. "fr-fr": eSpeak ignores the variant for some full names.
    pcm, events = synth.run(text, f"{lang}+{voice.variant}".encode(), voice)
    result = _timings(text, events, pcm) if len(pcm) else None
    if result is None:
        raise ValueError(f"text produced no speech: {text!r}")
    phones, words, s0, s1 = result

    margin = round(MARGIN_S * ESPEAK_RATE)
    offset = s0 - margin  # raw sample that becomes output sample 0 (before resampling)
    segment = np.zeros(s1 - s0 + 2 * margin, dtype=np.float64)
    lo, hi = max(offset, 0), min(s1 + margin, len(pcm))
    segment[lo - offset : hi - offset] = pcm[lo:hi] / 32768.0
    wave = resample_poly(segment, 320, 441)
    wave = _normalise(wave).astype(np.float32)
    duration = len(wave) / SAMPLE_RATE

    def seconds(sample: int) -> float:
        return float(min(max((sample - offset) / ESPEAK_RATE, 0.0), duration))

    phonemes = [(label, seconds(start), seconds(end)) for label, start, end in phones]
    word_list = [(label, seconds(start), seconds(end)) for label, start, end in words]
    return Utterance(wave=wave, phonemes=phonemes, words=word_list)


def _normalise(wave: np.ndarray) -> np.ndarray:
    peak = float(np.abs(wave).max(initial=0.0))
    if peak <= 0.0:
        return wave
    active = wave[np.abs(wave) > SILENCE_FRACTION * peak]
    rms = float(np.sqrt(np.mean(active**2))) if active.size else peak
    gain = min(TARGET_RMS / rms, PEAK_LIMIT / peak)
    return np.clip(wave * gain, -1.0, 1.0)
