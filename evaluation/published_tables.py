"""The seeds' result tables in their layout, from measured numbers: talking face (PSNR, SSIM, LSE-C/D, LSA) and voice
(STOI, ESTOI, PESQ) intra- vs cross-modality, recognition accuracy per input modality.

Intra-modality: the output stream is resynthesised from units of its own modality (face from visual units, voice
from audio units); cross-modality: from the other modality's units (face from audio, voice from face). A cell that
was not measured reads ``n/a: reason``; nothing is filled in.

Each function takes what the metrics return (``psnr``, ``ssim``, ``lse_c``, ``lse_d``, ``word_accuracy``, ``stoi``,
``estoi``, ``pesq``, ``wer``, ``cer``, ``accuracy`` keys) per setting, or a reason string for a setting that was
not measured at all, and returns rows for `evaluation.tables.write_table`.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

from evaluation.tables import Cell, write_table

Measured = Mapping[str, float | str]  # metric key -> value, or -> "reason" for one missing cell
Setting = Measured | str  # or one reason for the whole row

SETTINGS = ("intra", "cross")
SETTING_NAMES = {"intra": "intra-modality", "cross": "cross-modality"}
FACE_UNITS = {"intra": "visual units -> face", "cross": "audio units -> face"}
VOICE_UNITS = {"intra": "audio units -> voice", "cross": "visual units -> voice"}
FACE_COLUMNS = {"PSNR": "psnr", "SSIM": "ssim", "LSE-C": "lse_c", "LSE-D": "lse_d", "LSA (%)": "word_accuracy"}
VOICE_COLUMNS = {"STOI": "stoi", "ESTOI": "estoi", "PESQ": "pesq"}
MODALITIES = {"A": "audio", "V": "visual", "AV": "audio-visual"}
RECOGNITION_COLUMNS = {"accuracy": "Acc (%)", "wer": "WER (%)", "cer": "CER (%)"}
PERCENT = {"word_accuracy", "accuracy", "wer", "cer"}  # fractions the seeds print as percentages

Row = dict[str, Cell]


def _cell(measured: Setting | None, key: str) -> Cell:
    """A measured value (fractions as percent), or ``n/a: reason``."""
    if measured is None:
        return "n/a: not measured"
    if isinstance(measured, str):
        return f"n/a: {measured}"
    if key not in measured:
        return "n/a: not measured"
    value = measured[key]
    if isinstance(value, str):
        return value if value.startswith("n/a") else f"n/a: {value}"
    return 100.0 * float(value) if key in PERCENT else float(value)


def _check_settings(settings: Mapping[str, Setting]) -> None:
    unknown = sorted(set(settings) - set(SETTINGS))
    if unknown:
        raise ValueError(f"unknown settings {unknown}; expected some of {', '.join(SETTINGS)}")


def _intra_cross(settings: Mapping[str, Setting], units: dict[str, str], columns: dict[str, str]) -> list[Row]:
    _check_settings(settings)
    return [
        {"setting": SETTING_NAMES[s], "units": units[s], **{c: _cell(settings.get(s), k) for c, k in columns.items()}}
        for s in SETTINGS
    ]


def talking_face_rows(settings: Mapping[str, Setting]) -> list[Row]:
    """PSNR, SSIM, LSE-C, LSE-D and LSA (lip-reading accuracy of the rendered faces) for intra and cross."""
    return _intra_cross(settings, FACE_UNITS, FACE_COLUMNS)


def voice_rows(settings: Mapping[str, Setting]) -> list[Row]:
    """STOI, ESTOI and PESQ for intra (audio units) and cross (face-to-voice)."""
    return _intra_cross(settings, VOICE_UNITS, VOICE_COLUMNS)


def recognition_rows(results: Mapping[str, Setting]) -> list[Row]:
    """One row per input modality (A, V, AV) from `evaluation.recognition.evaluate` results: word accuracy, or
    WER and CER, in percent (the columns are those any modality measured)."""
    unknown = sorted(set(results) - set(MODALITIES))
    if unknown:
        raise ValueError(f"unknown modalities {unknown}; expected some of {', '.join(MODALITIES)}")
    keys = [k for k in RECOGNITION_COLUMNS if any(isinstance(r, Mapping) and k in r for r in results.values())]
    if not keys:
        raise ValueError(f"no recognition metric ({', '.join(RECOGNITION_COLUMNS)}) in the results")
    return [
        {"modality": name, **{RECOGNITION_COLUMNS[k]: _cell(results.get(m), k) for k in keys}}
        for m, name in MODALITIES.items()
    ]


def write_published(rows: list[Row], out: Path, name: str) -> str:
    """``OUT/NAME.md`` and ``.csv`` (2 decimals in Markdown, as the seeds print)."""
    return write_table(rows, out, name, digits=2)
