"""Resynthesis evidence: how well the trained renderers reproduce a clip from its own ground-truth units.

    python -m evaluation.resynthesis --pipeline experiments/pipeline/tiny.yaml --sentences data/demo/sentences \\
        --splits valid test_unseen --sync-expert runs/demo/syncnet/last.ckpt [--transcriber SPEC] --limit 20 \\
        --out runs/demo/resynthesis

No translation is involved, so every output has a frame-aligned reference (the clip itself). Per clip of a split:

- **voice**: the clip's de-duplicated units with their ground-truth durations (``{split}.units.npz`` /
  ``.durations.npz`` in ``--units``, by default the folder of the pipeline's quantizer) through the pipeline's
  vocoder, conditioned on the clip's own speaker embedding; STOI, ESTOI and wide-band PESQ against the original
  audio (clips a measure cannot score are counted in ``*_failed``), and with ``--transcriber`` (``ctc:CKPT``, or
  ``whisper:DIR``: an English-only model hears the English clips only) the WER of the clips against their
  transcripts, next to the WER of the original audio (the ASR's own ceiling);
- **speaker similarity**: the output's speaker embedding against its own speaker's mean embedding (the split's
  other original clips of that speaker: the clip that conditioned the vocoder is left out) and against the mean
  embedding of each other speaker of the split (averaged); both means and the fraction of clips where own > other;
- **face**: the same units, frame-aligned, through the pipeline's face renderer (`AV2AVPipeline.render`: each
  frame masked, the clip's first frame as identity); PSNR / SSIM against the real frames, the correlation of the
  rendered lips' opening with the real ones' over time (`MouthMotion`), and with
  ``--sync-expert`` LSE-C / LSE-D of the rendered video with the resynthesised speech, and with the clip's original
  audio (``*_real_audio``: the renderer judged apart from the vocoder), next to those of the original video with
  its own audio.

With ``--identities own other`` each split also gets a cross-identity row (zero-shot when its speakers are held
out): the same units with the identity, voice embedding and face, of the most recent earlier clip of another
speaker of the split, as the manipulation directions use it. There, speaker similarity is to the identity's speaker
(``similarity_own``) against every other speaker, the content's speaker included; PSNR / SSIM have no frame-aligned
reference and are ``n/a``; LSE-C / LSE-D and the speech columns are scored as for the clip's own identity.

With ``--contents own rotated`` each row also gets a control: the clip's own units and durations rotated by half
their length, so every frame is rendered from the units of another moment of the same clip (same units, same
total length, same identity). A renderer that reads its units loses mouth motion (and PSNR / SSIM, the vocoder
STOI) there; one that copies its identity frame does not.

One row per split, identity and content in ``--out``/``resynthesis.md|csv``; ``speakers`` says whether the split's speakers were held out
of training (zero-shot), from the corpus manifest (``--manifest``, by default the one beside ``--sentences``).
"""

from __future__ import annotations

import argparse
import glob
import itertools
import json
import math
import sys
from collections import Counter
from collections.abc import Collection
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from av2av_lightning.av2av import AV2AVPipeline, PipelineConfig, SourceClip
from av2av_lightning.data.schema import VIDEO_FPS, SampleMeta
from av2av_lightning.data.sidecar import Sidecar
from av2av_lightning.metrics import MetricSuite, SyncExpert, Transcriber, build_suite
from av2av_lightning.sync_expert import load_sync_expert
from av2av_lightning.transcribers import build_transcriber
from av2av_lightning.translate_cli import iter_shard_clips
from av2av_lightning.vocoder import UNIT_RATE
from data_prep.converters.media import fit_audio
from evaluation.tables import Cell, write_table

TABLE = "resynthesis"
FRAME_TOLERANCE = 2  # video frames units x durations may differ from the audio (as the vocoder's training allows)
SPEECH_METRICS = ("stoi", "estoi", "pesq")
SIMILARITY_KEYS = ("similarity_own", "similarity_other", "own_above_other")
ALIGNED_FACE_KEYS = ("psnr", "ssim", "mouth_motion")  # face scores that need the real frames of the same moment
LSE = ("lse_c", "lse_d")
SYNC_KEYS = (*LSE, "lse_c_real_audio", "lse_d_real_audio", "reference_lse_c", "reference_lse_d")
IDENTITIES = ("own", "other")  # the clip's own speaker, or another speaker of the split
CONTENTS = ("own", "rotated")  # the clip's units in place, or rotated by half their length (a control)

Row = dict[str, Cell]


@dataclass
class Scorers:
    """What scores the outputs beyond the pipeline itself, each optional: an ASR (of ``asr_languages`` only, None:
    every language) and a SyncNet expert."""

    transcriber: Transcriber | None = None
    sync_expert: SyncExpert | None = None
    asr_languages: Collection[str] | None = None


@dataclass
class SplitUnits:
    """A split's ground-truth units: de-duplicated units and their durations at ``rate`` Hz, per sample key."""

    units: Sidecar
    durations: Sidecar
    rate: int

    @classmethod
    def load(cls, folder: Path, split: str, rate: int) -> SplitUnits:
        return cls(Sidecar.load(folder / f"{split}.units.npz"), Sidecar.load(folder / f"{split}.durations.npz"), rate)

    def stream(self, key: str, frames: int) -> tuple[list[int], list[int]]:
        """The sample's units and their durations at the vocoder's 50 Hz; a stream that does not span the clip's
        ``frames`` (a sidecar of another split or rate) is a one-line error."""
        units, durations = self.units[key].astype(np.int64), self.durations[key].astype(np.int64)
        spanned = int(durations.sum()) * VIDEO_FPS / self.rate
        if abs(spanned - frames) > FRAME_TOLERANCE:
            raise ValueError(
                f"{key}: units x durations span {spanned:g} frames at {self.rate} Hz but the clip has {frames} "
                f"(wrong --unit-rate or sidecar?)"
            )
        return units.tolist(), (durations * (UNIT_RATE // self.rate)).tolist()


@dataclass
class SplitScores:
    """Everything measured on one split: the metric suites, the speaker embeddings and the clip counts."""

    speech: MetricSuite
    face: MetricSuite
    asr: MetricSuite | None
    asr_reference: MetricSuite | None
    sync: MetricSuite | None
    sync_real_audio: MetricSuite | None
    sync_reference: MetricSuite | None
    outputs: list[torch.Tensor] = field(default_factory=list)
    references: list[torch.Tensor] = field(default_factory=list)
    speakers: list[str] = field(default_factory=list)
    counts: Counter = field(default_factory=Counter)
    asr_languages: Collection[str] | None = None  # None: every language

    @classmethod
    def build(cls, scorers: Scorers) -> SplitScores:
        """Suites for the outputs and, for the ASR and lip sync, the same again for the original clips (lip sync also
        for the rendered faces with the original audio)."""
        asr, expert = scorers.transcriber, scorers.sync_expert
        wer = [build_suite(["wer"], transcriber=asr) if asr is not None else None for _ in range(2)]
        lse = [build_suite(["lse"], sync_expert=expert) if expert is not None else None for _ in range(3)]
        speech, face = build_suite(SPEECH_METRICS), build_suite(["psnr", "ssim", "mouth_motion"], data_range=255)
        return cls(speech, face, *wer, *lse, asr_languages=scorers.asr_languages)

    def transcribes(self, lang: str) -> bool:
        return self.asr is not None and (self.asr_languages is None or lang in self.asr_languages)


def rotate_half(units: list[int], durations: list[int]) -> tuple[list[int], list[int]]:
    """De-duplicated units and their durations rotated by half their count: the same stream and length, each
    frame given the units of another moment."""
    half = len(units) // 2
    return units[half:] + units[:half], durations[half:] + durations[:half]


def own_vs_other(outputs: torch.Tensor, references: torch.Tensor, speakers: list[str]) -> dict[str, float]:
    """Mean cosine of each output embedding ``[N, D]`` with its own speaker's mean reference embedding (leaving out
    its own reference, which conditioned it) and with each other speaker's mean (averaged over those speakers), and
    the fraction of outputs closer to their own speaker; a clip without another clip of its speaker, or a split of
    one speaker, is not scored (``scored`` counts the rest; NaN means when none is)."""
    if not len(outputs) == len(references) == len(speakers):
        raise ValueError(f"{len(outputs)} outputs, {len(references)} references and {len(speakers)} speakers")
    references = F.normalize(references.double(), dim=-1)
    outputs = F.normalize(outputs.double(), dim=-1)
    names = sorted(set(speakers))
    member = torch.tensor([[s == name for name in names] for s in speakers], dtype=torch.float64)  # [N, S]
    sums, counts = member.T @ references, member.sum(0)  # [S, D], [S]
    own, other, above = [], [], []
    for index, speaker in enumerate(speakers):
        mine = names.index(speaker)
        if counts[mine] < 2 or len(names) < 2:
            continue
        own_mean = sums[mine] - references[index]
        others = torch.cat([sums[:mine] / counts[:mine, None], sums[mine + 1 :] / counts[mine + 1 :, None]])
        own.append(float(F.cosine_similarity(outputs[index], own_mean, dim=0)))
        other.append(float(F.cosine_similarity(outputs[index][None], others, dim=-1).mean()))
        above.append(own[-1] > other[-1])
    return {
        "similarity_own": _mean(own),
        "similarity_other": _mean(other),
        "own_above_other": _mean(above),
        "scored": len(own),
    }


def _mean(values: list) -> float:
    return float(np.mean(values)) if values else math.nan


def speaker_kind(manifest: Path | None, speakers: set[str]) -> str:
    """``seen``, ``unseen (zero-shot)`` or ``mixed`` from the corpus manifest's held-out speakers (else unknown)."""
    if manifest is None or not manifest.is_file():
        return "unknown: no corpus manifest"
    held_out = {s["id"] for s in json.loads(manifest.read_text()).get("speakers", []) if s.get("held_out")}
    if not speakers & held_out:
        return "seen"
    return "unseen (zero-shot)" if speakers <= held_out else "mixed"


@torch.inference_mode()
def embed(pipeline: AV2AVPipeline, wave: np.ndarray) -> torch.Tensor:
    return pipeline.speaker_encoder.embed_utterance(torch.from_numpy(wave).to(pipeline.device)).cpu()


def resynthesize(
    pipeline: AV2AVPipeline, clip: SourceClip, units: list[int], durations: list[int], identity: SourceClip
) -> tuple[np.ndarray, np.ndarray | None]:
    """The clip's speech (and face, when the identity has one and the pipeline a renderer) from its ground-truth
    units: the pipeline's vocoder with the given 50 Hz durations and the identity's voice, fitted to the clip's
    frames, and its face renderer over the identity's face."""
    wave, _ = pipeline.synthesize(units, pipeline.speaker_embedding(identity.wave), durations)
    wave = fit_audio(wave, clip.num_frames)
    face = None
    if pipeline.renderer is not None and identity.face is not None:
        face = pipeline.render(identity.face, units, durations, clip.num_frames)
    return wave, face


def score_clip(
    scores: SplitScores,
    pipeline: AV2AVPipeline,
    clip: SourceClip,
    meta: SampleMeta,
    wave: np.ndarray,
    face: np.ndarray | None,
    identity: tuple[SampleMeta, SourceClip],
) -> None:
    """Add one resynthesised clip's scores against the original clip (speaker similarity: against the identity's
    speaker, whose clip conditioned it; frame-aligned face scores only for the clip's own identity)."""
    identity_meta, identity_clip = identity
    scores.speech.update(pred_wave=[wave], ref_wave=[clip.wave])
    if scores.transcribes(meta.lang):
        scores.asr.update(pred_wave=[wave], ref_text=[meta.text], lang=meta.lang)
        scores.asr_reference.update(pred_wave=[clip.wave], ref_text=[meta.text], lang=meta.lang)
        scores.counts["transcribed"] += 1
    if pipeline.speaker_encoder is not None:
        scores.outputs.append(embed(pipeline, wave))
        scores.references.append(embed(pipeline, identity_clip.wave))
        scores.speakers.append(identity_meta.speaker)
    if face is not None:
        if identity_clip is clip:
            scores.face.update(pred_video=[face], ref_video=[clip.face])
        if scores.sync is not None:
            scores.sync.update(pred_video=[face], pred_wave=[wave])
            scores.sync_real_audio.update(pred_video=[face], pred_wave=[clip.wave])  # the units' own audio
            scores.sync_reference.update(pred_video=[clip.face], pred_wave=[clip.wave])
        scores.counts["rendered"] += 1


def evaluate_split(
    pipeline: AV2AVPipeline,
    shards: list[str],
    units: SplitUnits,
    scorers: Scorers,
    limit: int | None,
    identity: str = "own",
    content: str = "own",
) -> SplitScores:
    """Resynthesise and score the split's sentence clips (the first ``limit`` that have units), each with its own
    identity or with that of the most recent earlier clip of another speaker (a clip before any such is counted
    in ``no_identity``), from its units in place or rotated by half (``content``)."""
    for name, value, choices in (("identity", identity, IDENTITIES), ("content", content, CONTENTS)):
        if value not in choices:
            raise ValueError(f"{name} must be one of {', '.join(choices)}, got {value!r}")
    scores = SplitScores.build(scorers)
    latest: dict[str, tuple[SampleMeta, SourceClip]] = {}  # each speaker's most recent clip, oldest speaker first
    for meta, clip in iter_shard_clips(shards):
        if meta.kind != "sentence":
            continue
        if limit is not None and scores.counts["clips"] >= limit:
            break
        if isinstance(clip, ValueError) or clip.wave is None:
            scores.counts["undecodable"] += 1
            continue
        if meta.key not in units.units or meta.key not in units.durations:
            scores.counts["no_units"] += 1
            continue
        donor = (meta, clip)
        if identity == "other":
            others = [entry for speaker, entry in latest.items() if speaker != meta.speaker]
            latest.pop(meta.speaker, None)
            latest[meta.speaker] = (meta, clip)
            if not others:
                scores.counts["no_identity"] += 1
                continue
            donor = others[-1]
        stream = units.stream(meta.key, clip.num_frames)
        wave, face = resynthesize(pipeline, clip, *(rotate_half(*stream) if content == "rotated" else stream), donor[1])
        score_clip(scores, pipeline, clip, meta, wave, face, donor)
        scores.counts["clips"] += 1
    return scores


def split_row(
    split: str, kind: str, scores: SplitScores, pipeline: AV2AVPipeline, identity: str = "own", content: str = "own"
) -> Row:
    """The split's row: counts, then every score (``n/a: why`` where it is not measured)."""
    counts = scores.counts
    row: Row = {"split": split, "speakers": kind, "identity": identity, "content": content, "clips": counts["clips"]}
    row |= {"no_identity": counts["no_identity"], "no_units": counts["no_units"], "undecodable": counts["undecodable"]}
    nothing = "n/a: no clip scored"
    speech = {k: float(v) for k, v in scores.speech.compute().items()}
    for key in SPEECH_METRICS:
        row[key] = _defined(speech[key], nothing)
        row[f"{key}_failed"] = int(speech[f"{key}_failed"])
    absent = "n/a: no --transcriber" if scores.asr is None else "n/a: no clip in the ASR's languages"
    row |= {"transcribed": counts["transcribed"], "wer": absent, "reference_wer": absent}
    if counts["transcribed"]:
        row["wer"] = float(scores.asr.compute()["wer"])
        row["reference_wer"] = float(scores.asr_reference.compute()["wer"])
    row |= _similarity(scores, pipeline)
    row |= _face(scores, pipeline, identity)
    return row


def _defined(value: float, reason: str) -> Cell:
    return reason if math.isnan(value) else value


def _similarity(scores: SplitScores, pipeline: AV2AVPipeline) -> Row:
    if pipeline.speaker_encoder is None:
        return {key: "n/a: no speaker_encoder in the pipeline" for key in SIMILARITY_KEYS} | {"similarity_scored": 0}
    found = own_vs_other(torch.stack(scores.outputs), torch.stack(scores.references), scores.speakers)
    reason = "n/a: needs two clips of a speaker and two speakers"
    return {key: _defined(found[key], reason) for key in SIMILARITY_KEYS} | {"similarity_scored": found["scored"]}


def _face(scores: SplitScores, pipeline: AV2AVPipeline, identity: str = "own") -> Row:
    reason = "n/a: no face_renderer in the pipeline" if pipeline.renderer is None else "n/a: no clip with a face"
    if not scores.counts["rendered"]:
        return {key: reason for key in (*ALIGNED_FACE_KEYS, *SYNC_KEYS)}
    if identity == "own":
        face = {k: float(v) for k, v in scores.face.compute().items()}
        row: Row = {key: face[key] for key in ALIGNED_FACE_KEYS}
    else:
        row = {key: "n/a: another speaker's face has no aligned reference" for key in ALIGNED_FACE_KEYS}
    if scores.sync is None:
        return row | {key: "n/a: no --sync-expert" for key in SYNC_KEYS}
    ours, real_audio, theirs = (
        suite.compute() for suite in (scores.sync, scores.sync_real_audio, scores.sync_reference)
    )
    row |= {key: float(ours[key]) for key in LSE} | {f"{key}_real_audio": float(real_audio[key]) for key in LSE}
    return row | {f"reference_{key}": float(theirs[key]) for key in LSE}


# ---------------------------------------------------------------------------- command line


def split_shards(sentences: Path, split: str) -> list[str]:
    shards = sorted(glob.glob(str(sentences / f"{split}-*.tar")))
    if not shards:
        raise ValueError(f"unknown split {split!r}: no shards {sentences / f'{split}-*.tar'}")
    return shards


def units_folder(args: argparse.Namespace, config: PipelineConfig) -> Path:
    if args.units is not None:
        return args.units
    if config.quantizer is None:
        raise ValueError(f"{args.pipeline}: a label-head pipeline has no quantizer folder; give --units")
    return Path(config.quantizer).parent


def run(args: argparse.Namespace, pipeline: AV2AVPipeline, scorers: Scorers) -> str:
    """Score every split and write the table; returns its Markdown."""
    folder = units_folder(args, pipeline.config)
    inputs = {
        split: (split_shards(args.sentences, split), SplitUnits.load(folder, split, args.unit_rate))
        for split in args.splits
    }
    manifest = args.manifest if args.manifest is not None else args.sentences.parent / "manifest.json"
    rows = []
    for split, (shards, units) in inputs.items():
        for identity, content in itertools.product(args.identities, args.contents):
            scores = evaluate_split(pipeline, shards, units, scorers, args.limit, identity, content)
            if not scores.counts["clips"]:
                raise ValueError(
                    f"split {split!r}: no sentence clip with units (and, for identity {identity}, an earlier clip of "
                    f"another speaker) in {shards[0]} ... ({dict(scores.counts)})"
                )
            kind = speaker_kind(manifest, set(scores.speakers))
            rows.append(split_row(split, kind, scores, pipeline, identity, content))
    return write_table(rows, args.out, TABLE)


def check_inputs(args: argparse.Namespace) -> PipelineConfig:
    """Bad input fails before any model loads: the config, every split's shards and unit sidecars."""
    if args.unit_rate not in (VIDEO_FPS, UNIT_RATE):
        raise ValueError(f"--unit-rate must be {VIDEO_FPS} or {UNIT_RATE} Hz, got {args.unit_rate}")
    if args.limit is not None and args.limit < 1:
        raise ValueError(f"--limit must be >= 1, got {args.limit}")
    config = PipelineConfig.from_yaml(args.pipeline)
    folder = units_folder(args, config)
    for split in args.splits:
        split_shards(args.sentences, split)
        for name in ("units", "durations"):
            if not (folder / f"{split}.{name}.npz").is_file():
                raise FileNotFoundError(
                    f"{folder / f'{split}.{name}.npz'}: no such unit sidecar (av2av units extract --label {split}=...)"
                )
    return config


def load_scorers(args: argparse.Namespace) -> Scorers:
    transcriber = build_transcriber(args.transcriber) if args.transcriber else None
    expert = load_sync_expert(args.sync_expert) if args.sync_expert else None
    return Scorers(transcriber, expert, transcriber.languages if transcriber is not None else None)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--pipeline", required=True, type=Path, help="the pipeline config naming the stage checkpoints")
    parser.add_argument("--sentences", required=True, type=Path, help="folder of the SPLIT-*.tar sentence shards")
    parser.add_argument("--splits", nargs="+", default=["valid", "test_unseen"], help="splits to score, one row each")
    parser.add_argument("--units", type=Path, help="folder of SPLIT.units.npz / .durations.npz (default: quantizer's)")
    parser.add_argument("--unit-rate", type=int, default=VIDEO_FPS, help="Hz of the durations' frames (25 or 50)")
    parser.add_argument("--sync-expert", type=Path, help="a SyncNet expert checkpoint (LSE-C/D)")
    parser.add_argument("--transcriber", help="'ctc:CHECKPOINT' or 'whisper:MODEL_DIR': WER of the speech")
    parser.add_argument("--manifest", type=Path, help="corpus manifest (held-out speakers); default: beside shards")
    parser.add_argument("--limit", type=int, help="at most this many clips per split")
    for flag, choices, meaning in (
        ("--identities", IDENTITIES, "the clip's own identity and/or another speaker's (cross-identity)"),
        ("--contents", CONTENTS, "the clip's units in place and/or rotated by half their length (a control)"),
    ):
        parser.add_argument(flag, nargs="+", choices=choices, default=["own"], help=f"rows: {meaning}")
    parser.add_argument("--out", required=True, type=Path, help="folder of resynthesis.md / .csv")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        config = check_inputs(args)
        print(run(args, AV2AVPipeline(config), load_scorers(args)))
    except (FileNotFoundError, ValueError) as err:
        print(f"resynthesis: error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
