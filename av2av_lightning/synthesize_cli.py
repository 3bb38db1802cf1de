"""``av2av synthesize``: what one clip says, with another clip's voice and face, to MP4 + JSON.

``av2av synthesize --pipeline CONFIG --content A.mp4 --content-from video --identity B.mp4 --output audio --out
out.mp4`` (face-to-voice) writes ``out.mp4`` and ``out.json`` (units, durations, stage seconds, both inputs) as
``av2av translate`` does; see `av2av_lightning.synthesis`.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from av2av_lightning.av2av import INPUTS
from av2av_lightning.synthesis import OUTPUTS, synthesize
from av2av_lightning.translate_cli import load_pipeline, save_and_report

__all__ = ["add_arguments"]


def _synthesize(args: argparse.Namespace) -> None:
    for path in (args.content, args.identity):
        if not path.is_file():
            raise FileNotFoundError(f"{path}: no such input file")  # before loading every stage
    pipeline = load_pipeline(args)
    result = synthesize(pipeline, args.content, args.identity, args.content_from, args.output, args.lang or "")
    extra = {
        "content_file": str(args.content),
        "identity_file": str(args.identity),
        "content_from": args.content_from,
        "output_modality": args.output,
    }
    save_and_report(result, args.out, extra)


def add_arguments(commands) -> None:
    """Add ``synthesize`` to the ``av2av`` subparsers."""
    parser = commands.add_parser(
        "synthesize", help="one clip's content with another clip's voice and face (face-to-voice, voice-to-face, ...)"
    )
    parser.add_argument("--pipeline", required=True, help="pipeline YAML naming the stage checkpoints")
    parser.add_argument("--content", required=True, type=Path, help="the clip whose words are spoken")
    parser.add_argument("--content-from", choices=INPUTS, default="av", help="what the encoder sees of --content")
    parser.add_argument("--identity", required=True, type=Path, help="the clip whose voice and face speak them")
    parser.add_argument("--output", choices=OUTPUTS, default="av", help="audio: speech only; video or av: faces too")
    parser.add_argument("--out", required=True, type=Path, help="output MP4 (the JSON goes beside it)")
    parser.add_argument("--lang", help="the content's language (recorded; transcribes the output when configured)")
    parser.add_argument("--max-seconds", type=float, help="override the pipeline's longest accepted clip")
    parser.add_argument("--device", help="override the pipeline's device (cpu, cuda)")
    parser.set_defaults(handler=_synthesize, beam_size=None)  # no translation: no beam
