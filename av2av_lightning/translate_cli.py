"""``av2av translate``: one clip (or every sample of a shard split) through the AV2AV pipeline to MP4 + JSON.

One clip: ``av2av translate --pipeline CONFIG --input clip.mp4 --src en --tgt es --out out.mp4`` writes ``out.mp4``
(H.264 25 fps + AAC 16 kHz) and ``out.json`` (units, durations, stage seconds, transcript when configured). An
ordinary video (frames larger than a prepared crop, or ``--real-footage``) has its face tracked, cropped and the
translated face pasted back at the original resolution; ``--face-index`` picks one of several faces (0 = largest).

Batch: ``av2av translate --pipeline CONFIG --shards 'test-*.tar' --tgt es fr --out DIR`` translates every sample of
the split into each target language but its own (``--src`` keeps one source language) as ``DIR/KEY.TGT.mp4`` +
``DIR/KEY.TGT.json``, and writes ``DIR/index.jsonl``: one line per translation with its key, languages, source text
and outputs, or the one-line error that stopped it.
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Iterator, Sequence
from dataclasses import replace
from pathlib import Path

import webdataset as wds

from av2av_lightning.av2av import INPUTS, AV2AVPipeline, PipelineConfig, SourceClip, Translation, write_mp4
from av2av_lightning.data.codecs import CorruptSampleError, decode_audio, decode_video
from av2av_lightning.data.pipeline import resolve_shards
from av2av_lightning.data.schema import AUDIO_FIELD, FACE_FIELD, LIP_FIELD, META_FIELD, SampleMeta, SchemaError
from data_prep.converters.media import fit_audio, fit_frames

INDEX_NAME = "index.jsonl"

__all__ = ["INDEX_NAME", "add_arguments", "iter_shard_clips", "save_translation", "translate_shards"]


def save_translation(result: Translation, out: str | Path, extra: dict | None = None) -> tuple[Path, Path]:
    """``out`` (MP4) and the JSON beside it (same name, ``.json``)."""
    mp4 = write_mp4(out, result.wave, result.face)
    summary = {**(extra or {}), "output": str(mp4), **result.summary()}
    sidecar = mp4.with_suffix(".json")
    sidecar.write_text(json.dumps(summary, indent=1, ensure_ascii=False) + "\n")
    return mp4, sidecar


def _shard_clip(raw: dict, meta: SampleMeta) -> SourceClip:
    """A shard sample as a `SourceClip`: streams fitted to the metadata's frame count, no face if none stored."""
    frames = meta.num_frames
    wave = fit_audio(decode_audio(raw.get(AUDIO_FIELD) or b"", name=f"{meta.key}.{AUDIO_FIELD}"), frames)
    lip = fit_frames(decode_video(raw.get(LIP_FIELD) or b"", name=f"{meta.key}.{LIP_FIELD}"), frames)
    face = raw.get(FACE_FIELD)
    face = None if face is None else fit_frames(decode_video(face, name=f"{meta.key}.{FACE_FIELD}", gray=False), frames)
    return SourceClip(meta.key, frames, wave, lip, face)


def iter_shard_clips(shards) -> Iterator[tuple[SampleMeta, SourceClip | ValueError]]:
    """Every sample of the shards with its decoded clip, or the error that kept it from decoding."""
    for url in resolve_shards(shards):
        for raw in wds.tarfile_samples([{"url": url}]):
            key = raw.get("__key__", "<no key>")
            try:
                meta = SampleMeta.from_json(raw.get(META_FIELD) or b"", source=f"{url}:{key}")
            except SchemaError:
                continue  # not a sample of the schema: nothing to name in the index
            try:
                yield meta, _shard_clip(raw, meta)
            except CorruptSampleError as err:
                yield meta, err


def translate_shards(
    pipeline: AV2AVPipeline,
    shards,
    tgt_langs: str | Sequence[str],
    out_dir: str | Path,
    input: str = "av",
    src_lang: str | None = None,
    limit: int | None = None,
) -> Path:
    """Translate every sample of ``shards`` (only ``src_lang`` ones when given; the first ``limit`` of them when
    given) into each of ``tgt_langs`` but its own language, and write the outputs and ``index.jsonl`` into
    ``out_dir``; a translation that fails gets its error in the index."""
    tgt_langs = [tgt_langs] if isinstance(tgt_langs, str) else list(tgt_langs)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    pipeline.check_languages(*filter(None, (src_lang, *tgt_langs)))
    index = out_dir / INDEX_NAME
    written = 0
    with open(index, "w") as handle:
        for meta, clip in iter_shard_clips(shards):
            targets = [lang for lang in tgt_langs if lang != meta.lang]
            if not targets or (src_lang and meta.lang != src_lang):
                continue
            if limit is not None and written >= limit:
                break
            written += 1
            for tgt_lang in targets:
                entry = translate_entry(pipeline, meta, clip, tgt_lang, input, out_dir)
                handle.write(json.dumps(entry, ensure_ascii=False) + "\n")
    return index


def translate_entry(
    pipeline: AV2AVPipeline, meta: SampleMeta, clip: SourceClip | ValueError, tgt_lang: str, input: str, out_dir: Path
) -> dict:
    """The index line of one sample translated into ``tgt_lang`` (``out_dir/KEY.TGT.mp4``), or of why it failed."""
    entry = {"key": meta.key, "src_lang": meta.lang, "tgt_lang": tgt_lang, "input": input, "text": meta.text}
    try:
        if isinstance(clip, ValueError):
            raise clip
        result = pipeline.translate(clip, meta.lang, tgt_lang, input)
        mp4, sidecar = save_translation(result, out_dir / f"{meta.key}.{tgt_lang}.mp4", {"key": meta.key})
        entry.update(output=mp4.name, json=sidecar.name, frames=result.num_frames, units=len(result.units))
        entry.update(transcript=result.transcript, stage_seconds=result.seconds)
    except ValueError as err:
        entry["error"] = str(err)
    return entry


def load_pipeline(args: argparse.Namespace) -> AV2AVPipeline:
    """The pipeline of ``--pipeline`` with the command line's overrides (beam size, longest clip, device)."""
    overrides = {"beam_size": args.beam_size, "max_seconds": args.max_seconds, "device": args.device}
    config = replace(PipelineConfig.from_yaml(args.pipeline), **{k: v for k, v in overrides.items() if v is not None})
    return AV2AVPipeline(config)


def _translate(args: argparse.Namespace) -> None:
    if (args.input is None) == (args.shards is None):
        raise ValueError("give either --input (one clip) or --shards (a split), not both")
    if args.input is not None and not args.input.is_file():
        raise FileNotFoundError(f"{args.input}: no such input file")  # before loading every stage
    if args.shards and (args.real_footage or args.face_index is not None):
        raise ValueError("--real-footage and --face-index apply to one --input clip, not to --shards")
    if args.input is not None and len(args.tgt) > 1:
        raise ValueError(f"--tgt {' '.join(args.tgt)}: one clip goes into one target language (several: --shards)")
    pipeline = load_pipeline(args)
    if args.shards:
        index = translate_shards(pipeline, args.shards, args.tgt, args.out, args.input_modality, args.src, args.limit)
        entries = [json.loads(line) for line in index.read_text().splitlines()]
        failed = sum("error" in e for e in entries)
        targets = " ".join(args.tgt)
        print(f"{index}: {len(entries) - failed} translated, {failed} failed ({args.src or 'any'} -> {targets})")
        return
    if args.src is None:
        raise ValueError("--src is required with --input (the language spoken in the clip)")
    real_footage = True if args.real_footage else None  # None: decided by the frame size
    result = pipeline.translate(args.input, args.src, args.tgt[0], args.input_modality, real_footage, args.face_index)
    save_and_report(result, args.out, {"input_file": str(args.input)})


def save_and_report(result, out: Path, extra: dict) -> None:
    """Write the MP4 and its JSON, and print one line of what came out and where the time went."""
    mp4, sidecar = save_translation(result, out, extra)
    stages = ", ".join(f"{name} {seconds:.2f} s" for name, seconds in result.seconds.items())
    video = "speech only"
    if result.face is not None:
        video = f"{result.num_frames} frames of {result.face.shape[2]}x{result.face.shape[1]}"
    print(f"{mp4}: {len(result.units)} units, {len(result.wave) / 16000:.2f} s, {video}; {stages} (units in {sidecar})")
    if result.transcript is not None:
        print(f"transcript: {result.transcript}")


def add_arguments(commands) -> None:
    """Add ``translate`` to the ``av2av`` subparsers."""
    parser = commands.add_parser(
        "translate", help="AV2AV: a talking-face clip (or a shard split) into another language"
    )
    parser.add_argument("--pipeline", required=True, help="pipeline YAML naming the stage checkpoints")
    parser.add_argument("--input", type=Path, help="a video with sound, a silent video, or an audio file")
    parser.add_argument("--shards", help="batch mode: a shard pattern, e.g. 'data/demo/sentences/test-*.tar'")
    parser.add_argument("--src", help="source language (batch mode: only samples in it; default every other)")
    parser.add_argument("--tgt", required=True, nargs="+", help="target language (batch mode: one or more)")
    parser.add_argument("--input-modality", choices=INPUTS, default="av", help="what the encoder sees")
    parser.add_argument(
        "--real-footage",
        action="store_true",
        help="track the face in --input even if its frames are crop-sized (default: when larger than 224 px)",
    )
    parser.add_argument("--face-index", type=int, help="real footage with several faces: which one (0 = largest)")
    parser.add_argument("--out", required=True, type=Path, help="output MP4 (batch mode: output folder)")
    parser.add_argument("--limit", type=int, help="batch mode: translate at most this many samples")
    parser.add_argument("--beam-size", type=int, help="override the pipeline's beam size (1: greedy)")
    parser.add_argument("--max-seconds", type=float, help="override the pipeline's longest accepted clip")
    parser.add_argument("--device", help="override the pipeline's device (cpu, cuda)")
    parser.set_defaults(handler=_translate)
