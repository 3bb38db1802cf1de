"""Evaluation metrics as torchmetrics ``Metric``s (states reduce across DDP ranks), composed by ``build_suite``."""

from av2av_lightning.metrics._common import Transcriber
from av2av_lightning.metrics.lipsync import LipSync, SyncExpert
from av2av_lightning.metrics.similarity import SpeakerSimilarity
from av2av_lightning.metrics.speech import ESTOI, PESQ, STOI
from av2av_lightning.metrics.suite import METRIC_NAMES, MetricSuite, build_suite
from av2av_lightning.metrics.text import ASRBleu, CharErrorRate, WordAccuracy, WordErrorRate, normalize_text
from av2av_lightning.metrics.video import MouthMotion, VideoPSNR, VideoSSIM

__all__ = [
    "ESTOI",
    "METRIC_NAMES",
    "PESQ",
    "STOI",
    "ASRBleu",
    "CharErrorRate",
    "LipSync",
    "MetricSuite",
    "MouthMotion",
    "SpeakerSimilarity",
    "SyncExpert",
    "Transcriber",
    "VideoPSNR",
    "VideoSSIM",
    "WordAccuracy",
    "WordErrorRate",
    "build_suite",
    "normalize_text",
]
