"""One metric suite that a stage or the evaluator builds from metric names.

Every metric takes named inputs from one vocabulary, so a ``MetricCollection`` can hand each metric the ones
its ``update`` names (torchmetrics filters keyword arguments by signature) and the caller passes everything
it has in one call::

    suite = build_suite(["asr_bleu", "wer", "pesq", "stoi", "psnr", "ssim"], data_range=255, transcriber=asr)
    suite.update(pred_wave=..., ref_wave=..., ref_text=..., lang="es")  # text and speech metrics
    suite.update(pred_video=..., ref_video=...)  # frame metrics; a metric updates when all its inputs are given
    suite.compute()  # {"asr_bleu": ..., "asr_chrf": ..., "wer": ..., "pesq": ..., "pesq_failed": ..., ...}

Inputs: ``pred_text``/``ref_text`` (lists of str), ``pred_wave``/``ref_wave`` (lists of 1-D waves),
``pred_video``/``ref_video`` (lists of ``[T, H, W(, C)]`` clips), ``pred_embedding``/``ref_embedding``
(``[B, D]``), ``pred_label``/``ref_label`` (word labels), ``lang`` (target language for the ASR).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from torchmetrics import Metric, MetricCollection

from av2av_lightning.data.schema import SAMPLE_RATE
from av2av_lightning.metrics._common import Transcriber, attach_external, transcribe
from av2av_lightning.metrics.lipsync import LipSync, SyncExpert
from av2av_lightning.metrics.similarity import SpeakerSimilarity
from av2av_lightning.metrics.speech import ESTOI, PESQ, STOI
from av2av_lightning.metrics.text import ASRBleu, CharErrorRate, WordAccuracy, WordErrorRate
from av2av_lightning.metrics.video import MouthMotion, VideoPSNR, VideoSSIM

METRIC_NAMES = (
    "asr_bleu",
    "wer",
    "cer",
    "pesq",
    "stoi",
    "estoi",
    "psnr",
    "ssim",
    "mouth_motion",
    "lse",
    "speaker_similarity",
    "word_accuracy",
)


class MetricSuite(MetricCollection):
    """A ``MetricCollection`` where each metric updates from the inputs it needs whenever they are all given (so
    text, speech and video can arrive in separate calls), and which transcribes the generated speech once per
    update for all its text metrics (built without a transcriber of their own) instead of once per metric.
    Use it through ``update``/``compute``: corpus scores have no meaningful per-batch value."""

    def __init__(
        self,
        metrics: dict[str, Metric],
        transcriber: Transcriber | None = None,
        lang: str | None = None,
        sample_rate: int = SAMPLE_RATE,
    ) -> None:
        super().__init__(metrics, compute_groups=False)  # metrics of one class differ in options, not in states
        attach_external(self, "transcriber", transcriber)
        self.lang = lang
        self.sample_rate = sample_rate

    def update(self, **kwargs: Any) -> None:
        given = {key for key, value in kwargs.items() if value is not None}
        if self.transcriber is not None and {"pred_wave", "ref_text"} <= given and "pred_text" not in given:
            lang = kwargs.get("lang") or self.lang
            kwargs["pred_text"] = transcribe(self.transcriber, kwargs["pred_wave"], lang, self.sample_rate)
            given.add("pred_text")
        updated = False
        for metric in self.values(copy_state=False):
            if _required_inputs(metric) <= given:
                metric.update(**metric._filter_kwargs(**kwargs))
                updated = True
        if not updated:
            raise ValueError(f"no metric in the suite takes only {sorted(given)}")


def _required_inputs(metric: Metric) -> set[str]:
    parameters = metric._update_signature.parameters.values()
    return {p.name for p in parameters if p.default is p.empty and p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)}


def build_suite(
    names: Sequence[str],
    *,
    data_range: float | None = None,
    transcriber: Transcriber | None = None,
    sync_expert: SyncExpert | None = None,
    lang: str | None = None,
    sample_rate: int = SAMPLE_RATE,
) -> MetricSuite:
    """The suite of the named metrics (see ``METRIC_NAMES``). ``data_range`` is required by psnr/ssim,
    ``sync_expert`` by lse; with a ``transcriber`` the text metrics score transcripts of ``pred_wave``."""
    unknown = sorted(set(names) - set(METRIC_NAMES))
    if unknown:
        raise ValueError(f"unknown metrics {unknown}; known: {', '.join(METRIC_NAMES)}")
    if {"psnr", "ssim"} & set(names) and data_range is None:
        raise ValueError("psnr and ssim need an explicit data_range (255 for uint8 frames, 1.0 for [0, 1] floats)")
    if "lse" in names and sync_expert is None:
        raise ValueError("lse needs a sync_expert")
    builders = {
        "asr_bleu": lambda: ASRBleu(),
        "wer": lambda: WordErrorRate(),
        "cer": lambda: CharErrorRate(),
        "pesq": lambda: PESQ(sample_rate=sample_rate),
        "stoi": lambda: STOI(sample_rate=sample_rate),
        "estoi": lambda: ESTOI(sample_rate=sample_rate),
        "psnr": lambda: VideoPSNR(data_range=data_range),
        "ssim": lambda: VideoSSIM(data_range=data_range),
        "mouth_motion": lambda: MouthMotion(),
        "lse": lambda: LipSync(sync_expert, sample_rate=sample_rate),
        "speaker_similarity": lambda: SpeakerSimilarity(),
        "word_accuracy": lambda: WordAccuracy(),
    }
    return MetricSuite({name: builders[name]() for name in names}, transcriber, lang, sample_rate)
