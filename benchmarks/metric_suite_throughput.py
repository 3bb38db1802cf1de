"""Metric suite throughput: utterances per second scored by 1 and by 2 processes, and their ratio in one run.

    python benchmarks/metric_suite_throughput.py [--shards 'data/demo/sentences/test-*.tar'] [--limit 64]
        [--transcriber reference|whisper:DIR|ctc:CKPT] [--snr-db 10]

Each utterance of the split is scored as if its "generated" version were the reference speech with white noise at
``--snr-db`` and the reference face frames with pixel noise: ASR-BLEU, WER, CER, PESQ, STOI, ESTOI, PSNR and SSIM.
With ``--transcriber reference`` (the default) a fake ASR returns each utterance's reference text, so the figures
measure the metric suite itself, not an ASR. With 2 processes the utterances are split in two halves, each process
fills its own suite, and the parent merges the metric states (as DDP ranks would sync them) before ``compute``; the
merged scores are printed next to the single-process ones. Decoding the shards is done once, before any timing; the
2-process time includes starting the worker processes. No assertions: the machine may be shared.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from multiprocessing import get_context
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from av2av_lightning.metrics import MetricSuite, build_suite
from av2av_lightning.transcribers import build_transcriber
from av2av_lightning.translate_cli import iter_shard_clips

METRICS = ("asr_bleu", "wer", "cer", "pesq", "stoi", "estoi", "psnr", "ssim")
Utterance = tuple[str, str, np.ndarray, np.ndarray, np.ndarray | None, np.ndarray | None]  # text, lang, waves, faces


class ReferenceTranscriber:
    """A fake ASR that "hears" each generated wave's reference text (looked up by the wave's bytes)."""

    def __init__(self, utterances: list[Utterance]) -> None:
        self.texts = {_digest(pred): text for text, _, pred, *_ in utterances}

    def __call__(self, waves: list[np.ndarray], lang: str | None) -> list[str]:
        return [self.texts[_digest(wave)] for wave in waves]


def _digest(wave: np.ndarray) -> str:
    return hashlib.sha1(np.ascontiguousarray(wave, dtype=np.float32).tobytes()).hexdigest()


def load_utterances(shards, limit: int, snr_db: float, seed: int = 0) -> list[Utterance]:
    """(text, lang, generated wave, reference wave, generated face, reference face) for up to ``limit`` samples."""
    rng = np.random.default_rng(seed)
    out = []
    for meta, clip in iter_shard_clips(shards):
        if isinstance(clip, ValueError) or meta.kind != "sentence":
            continue
        power = float(np.mean(clip.wave**2)) or 1e-8
        noisy = clip.wave + rng.standard_normal(len(clip.wave)).astype(np.float32) * np.sqrt(
            power / 10 ** (snr_db / 10)
        )
        face = None
        if clip.face is not None:
            face = np.clip(clip.face + rng.normal(0, 8, clip.face.shape), 0, 255).astype(np.uint8)
        out.append((meta.text, meta.lang, noisy.astype(np.float32), clip.wave, face, clip.face))
        if len(out) == limit:
            break
    if not out:
        raise ValueError(f"{shards}: no decodable sentence sample")
    return out


_STATE: dict = {}  # what the forked workers inherit: utterances and the transcriber spec


def _suite() -> MetricSuite:
    return build_suite(METRICS, data_range=255, transcriber=_STATE["transcriber"])


def score(indices: list[int]) -> MetricSuite:
    """A suite filled with the utterances at ``indices`` (one update per utterance, as an evaluator streams)."""
    suite = _suite()
    for i in indices:
        text, lang, pred, ref, pred_face, ref_face = _STATE["utterances"][i]
        suite.update(pred_wave=[pred], ref_wave=[ref], ref_text=[text], lang=lang)
        if pred_face is not None:
            suite.update(pred_video=[pred_face], ref_video=[ref_face])
    return suite


def _worker_states(indices: list[int]) -> dict[str, dict]:
    return {name: metric.metric_state for name, metric in score(indices).items(keep_base=True)}


def run(processes: int) -> tuple[float, dict[str, float]]:
    """Seconds to score every utterance with ``processes`` processes, and the (merged) scores."""
    count = len(_STATE["utterances"])
    start = time.perf_counter()
    if processes == 1:
        suite = score(list(range(count)))
    else:
        parts = [list(range(count))[p::processes] for p in range(processes)]
        with ProcessPoolExecutor(processes, mp_context=get_context("fork")) as pool:
            states = list(pool.map(_worker_states, parts))
        suite = _suite()
        for state in states:
            for name, metric in suite.items(keep_base=True, copy_state=False):
                metric.merge_state(state[name])
                metric._update_count += 1  # a worker's updates (no compute-before-update warning)
    scores = {key: float(value) for key, value in suite.compute().items()}
    return time.perf_counter() - start, scores


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shards", default="data/demo/sentences/test-*.tar", help="the split to score")
    parser.add_argument("--limit", type=int, default=64, help="utterances to score")
    parser.add_argument("--transcriber", default="reference", help="'reference' (fake: measures the suite) or a spec")
    parser.add_argument("--snr-db", type=float, default=10.0, help="white noise on the 'generated' speech")
    args = parser.parse_args(argv)
    for name in ("OMP_NUM_THREADS", "MKL_NUM_THREADS"):
        os.environ.setdefault(name, "1")
    utterances = load_utterances(args.shards, args.limit, args.snr_db)
    _STATE["utterances"] = utterances
    reference = args.transcriber == "reference"
    _STATE["transcriber"] = ReferenceTranscriber(utterances) if reference else build_transcriber(args.transcriber)
    seconds = {}
    print(f"{len(utterances)} utterances from {args.shards}, metrics: {', '.join(METRICS)}")
    for processes in (1, 2):
        seconds[processes], scores = run(processes)
        shown = ", ".join(f"{k} {v:.4f}" for k, v in scores.items())
        print(
            f"{processes} process(es): {len(utterances) / seconds[processes]:.2f} utterances/s "
            f"({seconds[processes]:.2f} s); {shown}"
        )
    print(f"2-process / 1-process throughput: {seconds[1] / seconds[2]:.2f}x")


if __name__ == "__main__":
    main()
