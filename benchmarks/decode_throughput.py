"""Unit-translation decoding throughput: beam search vs greedy, sentences per second at batch 1 and 32.

    python benchmarks/decode_throughput.py [--presets tiny large] [--batch-sizes 1 32] [--beam 5]
        [--src-len 40] [--repeats 3] [--no-cache] [--device cpu]

Each row decodes ``batch`` random source sentences of ``--src-len`` units into ``--src-len`` target units
(``max_len_a=1, max_len_b=0``). The weights are random, so ``</s>`` is suppressed: every hypothesis runs the
full length and the rows do the same work whatever the weights would predict. Figures:

- sentences/s: best of ``--repeats`` timed runs after one untimed run (the machine may be shared);
- outside forward: the share of decoding wall time spent outside the model's forward passes (`encode` and
  each `decode` step are timed; the rest is the search itself: log-softmax, masking, top-k, reordering the
  beams and the key/value cache, bookkeeping).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from av2av_lightning.models.unit_translator import EOS, UnitTranslator, UnitTranslatorConfig, pad_tokens


class ForwardTimer:
    """Wraps a model's ``encode`` and ``decode`` to add up the wall time spent in them."""

    def __init__(self, model: UnitTranslator, device: torch.device) -> None:
        self.seconds = 0.0
        self.device = device
        encode, decode = model.encode, model.decode

        def timed(fn, suppress_eos: bool):
            def run(*args, **kwargs):
                self._sync()
                start = time.perf_counter()
                out = fn(*args, **kwargs)
                if suppress_eos:
                    out[..., EOS] = float("-inf")
                self._sync()
                self.seconds += time.perf_counter() - start
                return out

            return run

        model.encode, model.decode = timed(encode, False), timed(decode, True)

    def _sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)


def measure(model: UnitTranslator, timer: ForwardTimer, batch: int, beam: int, args) -> tuple[float, float]:
    """(sentences per second, share of time outside forward passes) of the best timed run."""
    generator = torch.Generator().manual_seed(0)
    rows = [
        model.vocab.encode_source(torch.randint(0, model.config.num_units, (args.src_len,), generator=generator), "en")
        for _ in range(batch)
    ]
    src, mask = pad_tokens(rows, timer.device)
    langs = ["es"] * batch
    lengths = dict(max_len_a=1.0, max_len_b=0, use_cache=not args.no_cache)
    best = None
    for repeat in range(args.repeats + 1):
        timer.seconds = 0.0
        timer._sync()
        start = time.perf_counter()
        if beam == 1:
            model.greedy(src, mask, langs, **lengths)
        else:
            model.beam_search(src, mask, langs, beam_size=beam, **lengths)
        timer._sync()
        wall = time.perf_counter() - start
        if repeat and (best is None or wall < best[0]):
            best = (wall, 1.0 - timer.seconds / wall)
    return batch / best[0], best[1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--presets", nargs="+", default=["tiny"], choices=("tiny", "large"))
    parser.add_argument("--batch-sizes", nargs="+", type=int, default=[1, 32])
    parser.add_argument("--beam", type=int, default=5)
    parser.add_argument("--src-len", type=int, default=40, help="source (and output) units per sentence")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--no-cache", action="store_true", help="recompute the whole prefix at every step")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args()
    device = torch.device(args.device)
    print(
        f"device {device}, torch threads {torch.get_num_threads()}, {args.src_len} units in and out, "
        f"key/value cache {'off' if args.no_cache else 'on'}"
    )
    print(f"{'preset':<7} {'search':<8} {'batch':>5} {'sentences/s':>12} {'outside forward':>16}")
    for preset in args.presets:
        torch.manual_seed(0)
        model = UnitTranslator(UnitTranslatorConfig.preset(preset)).to(device).eval()
        timer = ForwardTimer(model, device)
        for batch in args.batch_sizes:
            for name, beam in (("greedy", 1), (f"beam {args.beam}", args.beam)):
                rate, outside = measure(model, timer, batch, beam, args)
                print(f"{preset:<7} {name:<8} {batch:>5} {rate:>12.2f} {outside:>15.1%}")


if __name__ == "__main__":
    main()
