"""Evaluate AV2AV outputs: ASR-BLEU (and chrF), speaker similarity and lip sync per translation direction.

    python -m evaluation.av2av_eval --outputs runs/demo/translated [MORE ...] \\
        --shards 'data/demo/sentences/test_unseen-*.tar' --transcriber ctc:runs/asr/last.ckpt [--sync-expert SYNC.ckpt] \\
        [--speaker-encoder SPK.ckpt] --out runs/eval/av2av

``--outputs`` are ``av2av translate --shards`` folders (``index.jsonl`` + ``KEY.mp4``), e.g. one per input modality
(``--input-modality av``, ``audio``, ``video``); ``--shards`` the split they were translated from. Each output is
scored against the split's utterance of the same sentence (split and sentence id) in the target language: its text
is the BLEU reference, and its own speech, transcribed by the same ASR, is the ceiling row (``reference``). An
ASR that hears some languages only (Whisper tiny.en: English) scores the directions into them alone. The
chance row (``shuffled``, per input) scores the same transcripts against the references of the direction's other
sentences: target-language function words match any sentence, and a system must beat this row, not 0. With
``--speaker-encoder``: cosine similarity of each output's voice to its source speaker's own voice (on the reference
row: the reference utterance's voice to the source voice). With ``--sync-expert``: LSE-C / LSE-D of the output
video, and of the reference video on the reference row.

Written into ``--out``: ``av2av_eval.md`` / ``.csv`` (rows per direction: one per input, then the reference; then
``all``), and the seeds' ``talking_face`` and ``voice`` tables (`evaluation.published_tables`) with what a
translation can measure.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from collections import Counter, defaultdict
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import av
import numpy as np
import torch

from av2av_lightning.av2av import INPUTS
from av2av_lightning.data.schema import SampleMeta
from av2av_lightning.metrics import MetricSuite, SyncExpert, Transcriber, build_suite
from av2av_lightning.speaker_encoding import load_speaker_encoder
from av2av_lightning.sync_expert import load_sync_expert
from av2av_lightning.transcribers import build_transcriber
from av2av_lightning.translate_cli import INDEX_NAME, iter_shard_clips
from data_prep.clustering.kmeans import iter_metas
from data_prep.converters.media import fit_audio, fit_frames, read_audio, read_face
from evaluation.published_tables import talking_face_rows, voice_rows, write_published
from evaluation.tables import Cell, write_table

SYSTEMS = ("av2av", "shuffled", "reference")
ALL = "all"
REFERENCE_INPUT = "-"  # the reference row is the corpus's own target-language speech, translated from no input
# which published row a translation's video / voice belongs to, by the modality its units came from
FACE_SETTING = {"video": "intra", "audio": "cross"}
VOICE_SETTING = {"audio": "intra", "video": "cross"}
NO_FRAME_REFERENCE = "a translation has no frame-aligned reference (needs same-language resynthesis)"

Row = dict[str, Cell]
Group = tuple[str, str, str]  # direction, system, input


@dataclass
class Scorers:
    """The models the evaluation runs: an ASR, and optionally a speaker encoder and a sync expert."""

    transcriber: Transcriber
    speaker_encoder: torch.nn.Module | None = None
    sync_expert: SyncExpert | None = None

    def suite(self) -> MetricSuite:
        names = ["asr_bleu"] + ["speaker_similarity"] * bool(self.speaker_encoder) + ["lse"] * bool(self.sync_expert)
        return build_suite(names, sync_expert=self.sync_expert)

    @torch.inference_mode()
    def embed(self, wave: np.ndarray | None) -> torch.Tensor | None:
        if self.speaker_encoder is None or wave is None:
            return None
        return self.speaker_encoder.embed_utterance(torch.from_numpy(wave))[None]


@dataclass
class Speech:
    """One utterance to score: its 16 kHz wave and 25 fps RGB face (None without video)."""

    wave: np.ndarray
    face: np.ndarray | None


def load_index(outputs: Path) -> list[dict]:
    index = Path(outputs) / INDEX_NAME
    if not index.is_file():
        raise FileNotFoundError(f"{index}: no such file; expected the folder of an 'av2av translate --shards' run")
    return [json.loads(line) for line in index.read_text().splitlines() if line.strip()]


def reference_keys(entries: list[dict], metas: dict[str, SampleMeta], index: str) -> dict[tuple[str, str], str | None]:
    """(source key, target language) -> key of the split's utterance of the same sentence in the target language
    (None if none)."""
    missing = [e["key"] for e in entries if e["key"] not in metas]
    if missing:
        raise ValueError(f"{index}: {len(missing)} output key(s) not in the shards (first: {missing[0]})")
    by_sentence: dict[tuple[str, str, str], list[str]] = defaultdict(list)
    for meta in metas.values():
        if meta.kind == "sentence":
            by_sentence[(meta.split, meta.sentence_id, meta.lang)].append(meta.key)
    refs = {}
    for entry in entries:
        meta = metas[entry["key"]]
        keys = sorted(by_sentence.get((meta.split, meta.sentence_id, entry["tgt_lang"]), []))
        refs[entry["key"], entry["tgt_lang"]] = keys[0] if keys else None
    return refs


def has_video(path: Path) -> bool:
    with av.open(str(path)) as container:
        return bool(container.streams.video)


def read_output(path: Path, frames: int, with_face: bool) -> Speech:
    """An output MP4 as 640 samples per frame of speech and, when wanted and present, its frames."""
    face = fit_frames(read_face(path), frames) if with_face and has_video(path) else None
    return Speech(fit_audio(read_audio(path), frames), face)


def read_split(shards, wanted: set[str], with_face: bool) -> dict[str, Speech]:
    """The wanted samples of the split (speech, and faces when asked for); undecodable ones are left out."""
    found = {}
    for meta, clip in iter_shard_clips(shards):
        if meta.key in wanted and not isinstance(clip, ValueError):
            found[meta.key] = Speech(clip.wave, clip.face if with_face else None)
    return found


def update(
    suite: MetricSuite, scorers: Scorers, speech: Speech, text: str, lang: str, source: torch.Tensor | None
) -> str:
    """Score one utterance: its transcript (returned) against ``text``, its voice against the source's, its lip sync."""
    transcript = scorers.transcriber([speech.wave], lang)
    suite.update(
        pred_text=transcript,
        ref_text=[text],
        pred_embedding=scorers.embed(speech.wave) if source is not None else None,
        ref_embedding=source,
        pred_video=None if speech.face is None else [speech.face],
        pred_wave=None if speech.face is None else [speech.wave],
    )
    return transcript[0]


def shuffled_suite(pairs: list[tuple[str, str]]) -> MetricSuite | None:
    """ASR-BLEU of each transcript against the reference of every other sentence (all rotations, skipping those
    that land on the same sentence, as another speaker's clip of it would): the chance level."""
    chance = [
        (transcript, pairs[(index + shift) % len(pairs)][1])
        for shift in range(1, len(pairs))
        for index, (transcript, reference) in enumerate(pairs)
        if pairs[(index + shift) % len(pairs)][1] != reference
    ]
    if not chance:
        return None
    suite = build_suite(["asr_bleu"])
    suite.update(pred_text=[t for t, _ in chance], ref_text=[r for _, r in chance])
    return suite


def merge_suites(target: MetricSuite, source: MetricSuite) -> None:
    """Add ``source``'s metric states to ``target``'s (same metrics): corpus scores over both."""
    for name, metric in target.items(keep_base=True, copy_state=False):
        metric.merge_state(source[name])
        metric._update_count += source[name]._update_count  # merged updates count as updates (no compute warning)


def heard(scorers: Scorers) -> tuple[str, ...] | None:
    """The target languages the transcriber hears (None: any), e.g. ``("en",)`` for an English-only Whisper."""
    return getattr(scorers.transcriber, "languages", None)


def heard_entries(entries: list[tuple[Path, dict]], scorers: Scorers) -> list[tuple[Path, dict]]:
    """The outputs the transcriber can score: all, or those into a language it hears (an English-only judge
    scores the directions into English and leaves the others out of every row)."""
    languages = heard(scorers)
    return entries if languages is None else [(f, e) for f, e in entries if e["tgt_lang"] in languages]


def evaluate(outputs: Sequence[Path], shards, scorers: Scorers) -> list[Row]:
    """Rows per direction (sorted): one per input the outputs were translated from (``av``, ``audio``, ``video``:
    one folder each, or mixed), then the reference; then the ``all`` rows. Each row: utterances scored, failed
    translations, outputs without a target-language reference, ASR-BLEU, chrF, speaker similarity and LSE-C/D. The
    reference utterance of a source is scored once, however many inputs translated it. Outputs into a language
    the transcriber does not hear are left out."""
    indexes = ", ".join(str(Path(folder) / INDEX_NAME) for folder in outputs)
    entries = heard_entries([(Path(folder), entry) for folder in outputs for entry in load_index(folder)], scorers)
    if not entries:
        raise ValueError(f"{indexes}: no output into a language the transcriber hears ({', '.join(heard(scorers))})")
    metas = {meta.key: meta for meta in iter_metas(shards)}
    refs = reference_keys([entry for _, entry in entries], metas, indexes)
    with_face = scorers.sync_expert is not None
    wanted = {k for _, e in entries for k in (e["key"], refs[e["key"], e["tgt_lang"]]) if k}
    split = read_split(shards, wanted, with_face)
    suites: dict[Group, MetricSuite] = {}
    counts: dict[Group, Counter] = defaultdict(Counter)
    referenced: set[tuple[str, str]] = set()  # (direction, source key) whose reference speech is scored
    transcribed: dict[Group, list[tuple[str, str]]] = defaultdict(list)  # output transcripts and their references
    for folder, entry in entries:
        direction, ref = f"{entry['src_lang']}-{entry['tgt_lang']}", refs[entry["key"], entry["tgt_lang"]]
        group = (direction, "av2av", entry.get("input", "av"))
        if "error" in entry:
            counts[group]["failed"] += 1
            continue
        if ref is None or ref not in split:
            counts[group]["no_reference"] += 1
            continue
        source = scorers.embed(split[entry["key"]].wave) if entry["key"] in split else None
        scored = [(group, read_output(folder / entry["output"], int(entry["frames"]), with_face))]
        if (direction, entry["key"]) not in referenced:
            referenced.add((direction, entry["key"]))
            scored.append(((direction, "reference", REFERENCE_INPUT), split[ref]))
        for target, speech in scored:
            suite = suites.setdefault(target, scorers.suite())
            transcript = update(suite, scorers, speech, metas[ref].text, entry["tgt_lang"], source)
            counts[target]["utterances"] += 1
            if target == group:
                transcribed[group].append((transcript, metas[ref].text))
    if not suites:
        raise ValueError(f"{indexes}: no output could be scored ({dict(sum(counts.values(), Counter()))})")
    for (direction, _, input), pairs in transcribed.items():
        chance = (direction, "shuffled", input)
        counts[chance]["utterances"] = len(pairs)
        if (suite := shuffled_suite(pairs)) is not None:
            suites[chance] = suite
    groups = sorted(counts, key=_group_order)
    totals = list(dict.fromkeys((ALL, system, input) for _, system, input in groups))
    for total in totals:
        members = [group for group in groups if group[1:] == total[1:]]
        suites[total] = build_suite(["asr_bleu"]) if total[1] == "shuffled" else scorers.suite()
        for member in members:
            if member in suites:
                merge_suites(suites[total], suites[member])
        counts[total] = sum((counts[member] for member in members), Counter())
    return [_row(group, counts[group], suites.get(group), scorers) for group in groups + totals]


def _group_order(group: Group) -> tuple[str, int, int]:
    """Direction, then the outputs by input (the pipeline's order: av, audio, video), then the reference."""
    direction, system, input = group
    return direction, SYSTEMS.index(system), INPUTS.index(input) if input in INPUTS else len(INPUTS)


def _row(group: Group, counts: Counter, suite: MetricSuite | None, scorers: Scorers) -> Row:
    direction, system, input = group
    row: Row = {"direction": direction, "system": system, "input": input, "utterances": counts["utterances"]}
    row |= {"failed": counts["failed"], "no_reference": counts["no_reference"]}
    scores = {k: float(v) for k, v in suite.compute().items()} if suite is not None else {}
    scores = {k: v for k, v in scores.items() if not math.isnan(v)}  # e.g. LSE when no output had video
    nothing = "n/a: no scored utterance" if system != "shuffled" else "n/a: needs two scored sentences"
    row |= {key: scores.get(key, nothing) for key in ("asr_bleu", "asr_chrf")}
    absent = {"speaker_similarity": "no --speaker-encoder", "lse_c": "no --sync-expert", "lse_d": "no --sync-expert"}
    for key, reason in absent.items():
        if system == "shuffled":
            row[key] = "n/a: the chance row scores transcripts only"
        else:
            row[key] = scores.get(key, nothing) if key in _measured(scorers) else f"n/a: {reason}"
    return row


def _measured(scorers: Scorers) -> set[str]:
    measured = {"speaker_similarity"} if scorers.speaker_encoder is not None else set()
    return measured | ({"lse_c", "lse_d"} if scorers.sync_expert is not None else set())


def published(rows: list[Row], inputs: set[str]) -> tuple[list[Row], list[Row]]:
    """The talking-face and voice tables with what the translated outputs measure: LSE-C/D of the rendered faces
    in the row of the modality the units came from; everything needing a frame-aligned reference is n/a."""
    overall = next(r for r in rows if r["direction"] == ALL and r["system"] == "av2av")
    if len(inputs) != 1:
        reason = f"outputs from several inputs ({', '.join(sorted(inputs))})"
        return talking_face_rows({"intra": reason, "cross": reason}), voice_rows({"intra": reason, "cross": reason})
    (input,) = inputs
    elsewhere = f"the outputs were translated from {input} units"
    face = {
        "psnr": NO_FRAME_REFERENCE,
        "ssim": NO_FRAME_REFERENCE,
        "lse_c": overall["lse_c"],
        "lse_d": overall["lse_d"],
        "word_accuracy": "needs a visual recogniser on the rendered faces",
    }
    voice = {key: NO_FRAME_REFERENCE for key in ("stoi", "estoi", "pesq")}
    face_settings = {s: elsewhere for s in ("intra", "cross")}
    voice_settings = dict(face_settings)
    if input in FACE_SETTING:
        face_settings[FACE_SETTING[input]] = face
    if input in VOICE_SETTING:
        voice_settings[VOICE_SETTING[input]] = voice
    return talking_face_rows(face_settings), voice_rows(voice_settings)


def load_scorers(args: argparse.Namespace) -> Scorers:
    speaker = load_speaker_encoder(args.speaker_encoder) if args.speaker_encoder else None
    expert = load_sync_expert(args.sync_expert) if args.sync_expert else None
    return Scorers(build_transcriber(args.transcriber), speaker, expert)


def run(args: argparse.Namespace, scorers: Scorers) -> str:
    """Evaluate and write every table; returns the main table's Markdown."""
    rows = evaluate(args.outputs, args.shards, scorers)
    inputs = {entry.get("input", "av") for folder in args.outputs for entry in load_index(folder)}
    face, voice = published(rows, inputs)
    write_published(face, args.out, "talking_face")
    write_published(voice, args.out, "voice")
    return write_table(rows, args.out, "av2av_eval")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--outputs",
        required=True,
        type=Path,
        nargs="+",
        help="'av2av translate --shards' output folders (one per input)",
    )
    parser.add_argument("--shards", required=True, nargs="+", help="shards of the split the outputs came from")
    parser.add_argument("--transcriber", required=True, help="'ctc:CHECKPOINT' or 'whisper:MODEL_DIR'")
    parser.add_argument("--sync-expert", type=Path, help="a SyncNet expert checkpoint (LSE-C/D)")
    parser.add_argument("--speaker-encoder", type=Path, help="a speaker encoder checkpoint (speaker similarity)")
    parser.add_argument("--out", required=True, type=Path, help="folder of the tables")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        for folder in args.outputs:
            load_index(folder)  # bad input fails before any model loads
        print(run(args, load_scorers(args)))
    except (FileNotFoundError, ValueError) as err:
        print(f"av2av_eval: error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
