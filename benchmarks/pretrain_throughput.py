"""Pretraining throughput: AV-HuBERT training steps in frames per second, and the fraction of matmul peak reached.

    python benchmarks/pretrain_throughput.py [--presets tiny base] [--batch-size N] [--frames T] [--steps N]

One step is what `AVHubertPretraining.training_step` does on one rank, plus the optimiser:
`masked_prediction_loss` (forward with span masking, cross entropy over masked frames against
random 100 Hz cluster targets) normalised per masked frame, + ``feature_penalty_weight`` x the
feature penalty, backward, and an AdamW step (`adam_with_schedule`, the optimiser of
`configure_optimizers`). Inputs are synthetic (random features and lip crops, no padding): the
data loader has its own benchmark (``loader_throughput.py``).

Figures:

- frames/s: valid 25 Hz frames trained per wall second (best step of ``--steps`` timed steps, after
  ``--warmup`` untimed ones; the machine may be shared, so the best is the reproducible figure; the
  median is printed too); real-time factor = frames/s / 25;
- GFLOP per step: `torch.utils.flop_counter.FlopCounterMode` over one full forward + backward
  (2 FLOPs per multiply-add). It counts matmuls (``mm``/``addmm``/``bmm``: linear layers, the cosine
  logits, and attention on the math path, which CPU training takes because of attention dropout),
  convolutions of any rank (the Conv3d stem, the Conv2d trunk, the grouped Conv1d positional
  embedding; forward and only the gradients actually computed: the stem's input needs none; dense
  taps, padding included) and fused SDPA kernels (CUDA flash/efficient/cuDNN; their backward formula
  also counts the recomputed attention scores; CPU's fused kernel has no formula in torch, so this
  script registers the same one for it). Not counted: elementwise ops, norms, softmax, GELU, pooling,
  the loss and the optimiser (the usual "model FLOPs" convention). A breakdown by kind and analytic
  cross-checks of the Conv3d stem and the attention are printed. LayerDrop is off by default
  (``--layerdrop``) so that every step does the counted work;
- utilisation: achieved FLOP/s of the step / FLOP/s of a large square matmul of the same precision
  timed in the same run (the baseline: the best case of this machine's BLAS; timed before the steps
  and after each preset, best kept, since the machine may be shared).

On a GPU (``torch.cuda.is_available()``, unless ``--device cpu``) the default precisions are fp32
and bf16 autocast, each against its own matmul peak: model FLOPs utilisation (MFU). TF32 follows
torch's default (``torch.get_float32_matmul_precision()``), for the steps and the baseline alike.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch
from torch.utils.flop_counter import FlopCounterMode, flop_registry

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from av2av_lightning.data.batching import AVBatch
from av2av_lightning.data.schema import VIDEO_FPS
from av2av_lightning.models.avhubert import AUDIO_DIM
from av2av_lightning.optim import adam_with_schedule
from av2av_lightning.pretraining import AVHubertPretraining

LABEL_RATE = 100  # MFCC k-means targets (first iteration)
LIP_SIZE = 88
DEFAULT_BATCH = {"cpu": {"tiny": 4, "base": 2, "large": 1}, "cuda": {"tiny": 32, "base": 16, "large": 8}}
DEFAULT_STEPS = {"cpu": {"tiny": (2, 10), "base": (1, 3), "large": (1, 2)}, "cuda": {"tiny": (5, 20), "base": (5, 20)}}
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


# ---------------------------------------------------------------------------- matmul peak (the baseline)


def matmul_peak(device: torch.device, precision: str, size: int, repeats: int, inner: int) -> float:
    """Best FLOP/s of ``inner`` back-to-back [size x size] @ [size x size] matmuls, over ``repeats`` tries."""
    a = torch.randn(size, size, device=device, dtype=DTYPES[precision])
    b = torch.randn(size, size, device=device, dtype=DTYPES[precision])
    torch.mm(a, b)  # warm-up (BLAS / cuBLAS handles, clocks)
    sync(device)
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        for _ in range(inner):
            torch.mm(a, b)
        sync(device)
        best = min(best, (time.perf_counter() - start) / inner)
    return 2 * size**3 / best


# ---------------------------------------------------------------------------- FLOP counting


def _sdpa_flop(query_shape, key_shape, value_shape, *args, out_shape=None, **kwargs) -> int:
    from torch.utils.flop_counter import sdpa_flop_count

    return sdpa_flop_count(query_shape, key_shape, value_shape)


def _sdpa_backward_flop(grad_out_shape, query_shape, key_shape, value_shape, *args, out_shape=None, **kwargs) -> int:
    from torch.utils.flop_counter import sdpa_backward_flop_count

    return sdpa_backward_flop_count(grad_out_shape, query_shape, key_shape, value_shape)


def flop_counter() -> FlopCounterMode:
    """`FlopCounterMode` with the SDPA formulas also registered for CPU's fused attention kernel (torch has none;
    it runs in inference or without attention dropout, training with dropout takes the math path = ``bmm``)."""
    custom = {}
    for name, formula in (
        ("_scaled_dot_product_flash_attention_for_cpu", _sdpa_flop),
        ("_scaled_dot_product_flash_attention_for_cpu_backward", _sdpa_backward_flop),
    ):
        op = getattr(torch.ops.aten, name, None)
        if op is not None and op not in flop_registry:
            custom[op] = formula
    return FlopCounterMode(display=False, depth=None, custom_mapping=custom)


def flop_breakdown(counter: FlopCounterMode) -> dict[str, int]:
    """Counted FLOPs by kind: linear layers, attention, Conv3d stem, Conv2d trunk, other convolutions."""
    counts = counter.get_flop_counts()
    by_op = {str(op): n for op, n in counts["Global"].items()}
    conv = sum(n for op, n in by_op.items() if "conv" in op)

    def module_conv(suffix: str) -> int:
        names = [name for name in counts if name.endswith(suffix)]
        return sum(n for name in names for op, n in counts[name].items() if "conv" in str(op))

    stem, trunk = module_conv(".resnet.frontend3D"), module_conv(".resnet.trunk")
    return {
        "linear": sum(n for op, n in by_op.items() if op.split(".")[1] in ("mm", "addmm")),
        "attention": sum(n for op, n in by_op.items() if "bmm" in op or "attention" in op),
        "conv3d stem": stem,
        "conv2d trunk": trunk,
        "other conv": conv - stem - trunk,
        "uncategorised": sum(
            n for op, n in by_op.items() if not any(k in op for k in ("mm", "conv", "attention"))
        ),  # e.g. a future op with a formula
    }


def analytic_checks(module: AVHubertPretraining, batch: int, frames: int) -> dict[str, int]:
    """Expected counts of two parts whose formulas are easy to get wrong: the Conv3d stem (forward + weight
    gradient; its input needs no gradient) and SDPA (QK^T and AV: 4 B T^2 D forward, twice that backward),
    without LayerDrop and padding."""
    config = module.config
    stem = module.model.feature_extractor_video.resnet.frontend3D[0]
    out_hw = [
        (LIP_SIZE + 2 * p - k) // s + 1 for k, s, p in zip(stem.kernel_size[1:], stem.stride[1:], stem.padding[1:])
    ]
    kernel = stem.kernel_size[0] * stem.kernel_size[1] * stem.kernel_size[2]
    stem_fwd = 2 * batch * frames * out_hw[0] * out_hw[1] * stem.out_channels * stem.in_channels * kernel
    grad_mult = 2 if config.feature_grad_mult != 0 else 1
    attention = 12 * batch * frames**2 * config.embed_dim * config.layers
    return {"conv3d stem": grad_mult * stem_fwd, "attention": attention}


# ---------------------------------------------------------------------------- the training step


def synthetic_batch(batch: int, frames: int, classes: int, device: torch.device, generator: torch.Generator) -> AVBatch:
    keys = [f"bench_{i}" for i in range(batch)]
    lengths = torch.full((batch,), frames, dtype=torch.long)
    ratio = LABEL_RATE // VIDEO_FPS
    labels = torch.randint(0, classes, (batch, frames * ratio), generator=generator)
    return AVBatch(
        keys=keys,
        meta=[],
        audio=torch.randn(batch, frames, AUDIO_DIM, generator=generator),
        video=torch.randn(batch, 1, frames, LIP_SIZE, LIP_SIZE, generator=generator),
        lengths=lengths,
        padding_mask=torch.zeros(batch, frames, dtype=torch.bool),
        wave=torch.zeros(batch, 0),
        wave_lengths=torch.zeros(batch, dtype=torch.long),
        labels={"km": labels},
        label_lengths={"km": torch.full((batch,), frames * ratio, dtype=torch.long)},
    ).to(device)


class Trainer:
    """`AVHubertPretraining.training_step` on one rank without Lightning, + AdamW (the published settings)."""

    def __init__(self, preset: str, layerdrop: float | None, device: torch.device, precision: str) -> None:
        encoder = {} if layerdrop is None else {"layerdrop": layerdrop}
        self.module = AVHubertPretraining(preset=preset, encoder=encoder, labels=["km"], label_rate=LABEL_RATE)
        self.module.to(device).train()
        self.classes = self.module.config.num_classes[0]
        optim = adam_with_schedule(self.module.model, lr=5e-4, total_steps=10**6, warmup_steps=1000)
        self.optimizer, self.scheduler = optim["optimizer"], optim["lr_scheduler"]["scheduler"]
        self.device = device
        self.autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=precision == "bf16")

    def loss(self, batch: AVBatch) -> torch.Tensor:
        with self.autocast:
            summed, stats = self.module.masked_prediction_loss(batch)
        loss = summed / max(stats["frames"], 1)
        return loss + self.module.hparams.feature_penalty_weight * stats["feature_penalty"]

    def forward_backward(self, batch: AVBatch) -> torch.Tensor:
        self.optimizer.zero_grad(set_to_none=True)
        loss = self.loss(batch)
        loss.backward()
        return loss

    def step(self, batch: AVBatch) -> float:
        """Wall seconds of one full step (forward + backward + optimiser), device-synchronised."""
        sync(self.device)
        start = time.perf_counter()
        loss = self.forward_backward(batch)
        self.optimizer.step()
        self.scheduler.step()
        sync(self.device)
        elapsed = time.perf_counter() - start
        if not torch.isfinite(loss):
            raise RuntimeError(f"non-finite loss {loss.item()}")
        return elapsed


def run_preset(args, preset: str, precision: str, device: torch.device) -> dict:
    kind = device.type
    batch_size = args.batch_size or DEFAULT_BATCH[kind][preset]
    warmup, steps = DEFAULT_STEPS[kind].get(preset, (2, 5))
    warmup = warmup if args.warmup is None else args.warmup
    steps = steps if args.steps is None else args.steps
    torch.manual_seed(args.seed)
    generator = torch.Generator().manual_seed(args.seed)
    trainer = Trainer(preset, args.layerdrop, device, precision)
    batch = synthetic_batch(batch_size, args.frames, trainer.classes, device, generator)
    params = sum(p.numel() for p in trainer.module.model.parameters())

    counter = flop_counter()
    with counter:
        trainer.forward_backward(batch)
    flops = counter.get_total_flops()
    breakdown = flop_breakdown(counter)
    expected = analytic_checks(trainer.module, batch_size, args.frames)

    for _ in range(warmup):
        trainer.step(batch)
    times = [trainer.step(batch) for _ in range(max(1, steps))]
    best, median = min(times), statistics.median(times)
    frames = batch_size * args.frames
    return {
        "preset": preset,
        "precision": precision,
        "params": params,
        "batch": batch_size,
        "steps": len(times),
        "warmup": warmup,
        "step_s": best,
        "median_s": median,
        "fps": frames / best,
        "flops": flops,
        "achieved": flops / best,
        "breakdown": breakdown,
        "expected": expected,
    }


# ---------------------------------------------------------------------------- report


def print_table(rows: list[dict], frames: int, mfu: bool) -> None:
    header = (
        f"{'preset':6s} {'prec':4s} {'params(M)':>9s} {'B x T':>8s} {'step(s)':>8s} {'frames/s':>9s} {'RTF':>7s} "
        f"{'GFLOP/step':>10s} {'GFLOP/s':>9s} {'peak GFLOP/s':>12s} {'MFU %' if mfu else 'util %':>7s}"
    )
    print(header)
    print("-" * len(header))
    for r in rows:
        print(
            f"{r['preset']:6s} {r['precision']:4s} {r['params'] / 1e6:9.1f} {str(r['batch']) + ' x ' + str(frames):>8s} "
            f"{r['step_s']:8.3f} {r['fps']:9.1f} {r['fps'] / VIDEO_FPS:7.2f} {r['flops'] / 1e9:10.1f} "
            f"{r['achieved'] / 1e9:9.1f} {r['peak'] / 1e9:12.1f} {100 * r['achieved'] / r['peak']:7.1f}"
        )


def print_coverage(rows: list[dict], layerdrop: float | None) -> None:
    print("\nFLOPs counted per step (forward + backward) by kind, and analytic cross-checks:")
    for r in rows:
        total = r["flops"]
        parts = ", ".join(
            f"{name} {n / 1e9:.2f} ({100 * n / total:.0f}%)"
            for name, n in r["breakdown"].items()
            if n or name != "uncategorised"
        )
        print(f"  {r['preset']} {r['precision']}: {parts}")
        for name, want in r["expected"].items():
            got = r["breakdown"][name]
            verdict = "ok" if abs(got - want) <= 1e-6 * want else "MISMATCH"
            if name == "attention" and abs(got - want * 14 / 12) <= 1e-6 * want:
                verdict = "ok: fused kernel, whose backward formula also counts the recomputed scores (+1/6)"
            if name == "attention" and layerdrop not in (None, 0.0) and got < want:
                verdict = "below (LayerDrop skipped layers)"
            print(f"    {name}: counted {got / 1e9:.4f} GFLOP, analytic {want / 1e9:.4f} GFLOP -> {verdict}")
        print(
            f"    timed steps: {r['steps']} after {r['warmup']} warm-up; best {r['step_s']:.3f} s, "
            f"median {r['median_s']:.3f} s ({r['fps'] * r['step_s'] / r['median_s']:.1f} frames/s at the median)"
        )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--presets", nargs="+", default=["tiny", "base"], choices=["tiny", "base", "large"])
    parser.add_argument("--batch-size", type=int, help="utterances per batch (default: tiny 4, base 2 on CPU)")
    parser.add_argument("--frames", type=int, default=75, help="frames per utterance at 25 Hz (75 = 3 s)")
    parser.add_argument("--steps", type=int, help="timed steps (default: tiny 10, base 3 on CPU; 20 on GPU)")
    parser.add_argument("--warmup", type=int, help="untimed steps first (default: tiny 2, base 1 on CPU; 5 on GPU)")
    parser.add_argument("--threads", type=int, help="torch intra-op threads (default: torch's choice)")
    parser.add_argument("--device", choices=["cpu", "cuda"], help="default: cuda when available")
    parser.add_argument(
        "--precision",
        nargs="+",
        choices=list(DTYPES),
        help="fp32 and/or bf16 autocast (default: fp32 on CPU, both on GPU)",
    )
    parser.add_argument(
        "--layerdrop", type=float, default=0.0, help="LayerDrop (preset: 0.05); 0 keeps every step the same work"
    )
    parser.add_argument("--matmul-size", type=int, help="baseline matmul size (default: 2048 on CPU, 8192 on GPU)")
    parser.add_argument("--matmul-repeats", type=int, default=5, help="baseline tries (the best is reported)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)

    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if args.threads:
        torch.set_num_threads(args.threads)
    precisions = args.precision or (["fp32", "bf16"] if device.type == "cuda" else ["fp32"])
    size = args.matmul_size or (8192 if device.type == "cuda" else 2048)
    inner = 20 if device.type == "cuda" else 1
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        print(f"device: {name}; float32 matmul precision {torch.get_float32_matmul_precision()!r}")
    else:
        print(f"device: CPU, {torch.get_num_threads()} thread(s); torch {torch.__version__}")

    # the baseline is timed before the training steps and again after each preset, and the best is kept, so that
    # a busy machine (other jobs on the same cores) does not flatter the utilisation
    tries = {precision: [matmul_peak(device, precision, size, args.matmul_repeats, inner)] for precision in precisions}
    rows = []
    for precision in precisions:
        for preset in args.presets:
            start = time.perf_counter()
            rows.append(run_preset(args, preset, precision, device))
            tries[precision].append(matmul_peak(device, precision, size, args.matmul_repeats, inner))
            print(f"{preset} {precision}: measured in {time.perf_counter() - start:.0f} s", flush=True)
    peaks = {precision: max(values) for precision, values in tries.items()}
    for precision, values in tries.items():
        print(
            f"baseline matmul {size}x{size} {precision}: {peaks[precision] / 1e9:.1f} GFLOP/s (best of "
            f"{args.matmul_repeats} tries before the steps and after each preset: "
            f"{', '.join(f'{v / 1e9:.1f}' for v in values)})"
        )
    for row in rows:
        row["peak"] = peaks[row["precision"]]
    print()
    print_table(rows, args.frames, mfu=device.type == "cuda")
    print_coverage(rows, args.layerdrop)
    return 0


if __name__ == "__main__":
    sys.exit(main())
