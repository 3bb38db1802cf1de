"""Wav2Lip-style face renderer driven by discrete speech units instead of a Mel spectrogram.

Per output frame the generator sees 6 channels: the target frame with its lower half masked (pose, head, upper
face) and an unmasked reference frame of the same speaker (identity, teeth, lips). A convolutional encoder
downsamples 96 -> 1 with residual blocks, the decoder upsamples back with a skip connection from every encoder
stage, and its bottleneck input is a per-frame code of the units around the frame: a unit embedding table, a
window of ``2 * window`` units (50 Hz, 2 units per frame: ``window=10`` gives AV2AV's 20 units, 0.4 s, centred on
the frame), one pre-LN Transformer layer and a mean over the window. The published preset has Wav2Lip's face
encoder/decoder widths with a 1000 x 512 unit embedding in place of its audio encoder (~37 M parameters).

Trained for minutes as Wav2Lip is (whole-face L1, the code entering at the 1x1 bottleneck as a mean over its
window), the renderer draws the same mouth whatever its units, even oracle visemes: the lips are about 1 % of the
pixels, the code gets about a thousandth of the encoder's gradient, and the mean pooling sees the window as a bag of
units, blind to when in it the mouth opens. Four options, off by default (Wav2Lip's design), change that:

- ``over_reference``: the output edits the reference frame (its logit plus the generator's, zero-initialised), so
  training starts from a copy of the speaker's lower face instead of drawing it from nothing;
- ``keep_upper_half``: the given upper half is output as it is;
- ``unit_pooling="flatten"``: the code is a linear map of every window position (timing kept), not a mean;
- ``unit_modulation``: the code also scales and shifts every decoder stage's features (FiLM, zero-initialised),
  a path to the 24-96 px stages where the lips are drawn.

Measured on 50 clips of held-out speakers of the demo corpus, each rendered from its first frame (`MouthMotion`:
correlation over time of the rendered and the real lips' opening; 300 steps). With oracle visemes: mean pooling with
FiLM and a mouth L1 0.28; flattened 0.86 (PSNR 22.0 dB); with ``over_reference`` too 0.87 (35.8 dB); flattened over
the reference without FiLM or mouth loss 0.14. With the demo's audio units, all four and a squared-error mouth loss
(`FaceRendering`'s ``mouth_loss``): 0.61 and 34.2 dB, -0.04 with the units rotated in time (mean pooling 0.38;
without ``keep_upper_half`` 32.8 dB); the demo's renderer before (100 steps, none of them): 0.07 and 22.3 dB.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from av2av_lightning.data.schema import FACE_SIZE
from av2av_lightning.models.transformer import EncoderLayer, init_bert_params

UNITS_PER_FRAME = 2  # 50 Hz units, 25 fps video

__all__ = [
    "UNITS_PER_FRAME",
    "FaceDiscriminator",
    "FaceRenderer",
    "FaceRendererConfig",
    "mask_lower_half",
    "unit_windows",
]


@dataclass
class FaceRendererConfig:
    """Widths and depths of the generator; stage ``i`` of the encoder has ``encoder_blocks[i]`` residual blocks after
    its (strided) first convolution, decoder stage ``i`` likewise after its transposed convolution."""

    encoder_channels: list[int] = field(default_factory=lambda: [16, 32, 64, 128, 256, 512, 512])
    encoder_blocks: list[int] = field(default_factory=lambda: [0, 2, 3, 2, 2, 1, 0])
    decoder_channels: list[int] = field(default_factory=lambda: [512, 512, 384, 256, 128, 64])
    decoder_blocks: list[int] = field(default_factory=lambda: [1, 2, 2, 2, 2, 2])
    output_channels: int = 32
    num_units: int = 1000
    unit_dim: int = 512
    window: int = 10  # units either side of the frame centre (2 * window units per frame)
    heads: int = 8
    ffn_dim: int = 2048
    dropout: float = 0.1
    unit_modulation: bool = False  # FiLM of every decoder stage by the unit code
    keep_upper_half: bool = False  # output the given upper half as it is; the generator draws the lower half only
    over_reference: bool = False  # the generator's output edits the reference frame (zero-initialised: a copy)
    unit_pooling: str = "mean"  # window -> code: "mean" over positions, or "flatten" (positions kept, then linear)

    def __post_init__(self) -> None:
        for name in ("encoder_channels", "encoder_blocks", "decoder_channels", "decoder_blocks"):
            setattr(self, name, list(getattr(self, name)))
        if len(self.encoder_channels) != 7 or len(self.encoder_blocks) != 7:
            raise ValueError("encoder_channels and encoder_blocks need 7 stages (96, 96, 48, 24, 12, 6, 3 -> 1)")
        if len(self.decoder_channels) != 6 or len(self.decoder_blocks) != 6:
            raise ValueError("decoder_channels and decoder_blocks need 6 stages (1 -> 3, 6, 12, 24, 48, 96)")
        if self.unit_pooling not in ("mean", "flatten"):
            raise ValueError(f"unit_pooling must be 'mean' or 'flatten', got {self.unit_pooling!r}")
        if self.unit_dim != self.encoder_channels[-1]:
            raise ValueError(f"unit_dim {self.unit_dim} must equal the bottleneck width {self.encoder_channels[-1]}")

    @classmethod
    def preset(cls, name: str, **overrides) -> FaceRendererConfig:
        """``tiny`` (about an eighth of the widths: the full-resolution stages dominate CPU time) or ``published``."""
        tiny = cls(
            encoder_channels=[4, 8, 8, 16, 32, 64, 64],
            decoder_channels=[64, 64, 48, 32, 16, 8],
            output_channels=8,
            unit_dim=64,
            heads=4,
            ffn_dim=256,
        )
        presets = {"tiny": tiny, "published": cls()}
        if name not in presets:
            raise ValueError(f"unknown face renderer preset {name!r}; expected one of {', '.join(presets)}")
        return replace(presets[name], **overrides)


class ConvBlock(nn.Module):
    """Conv (or transposed conv) -> BatchNorm -> ReLU, with an identity residual for shape-keeping blocks."""

    def __init__(
        self, cin: int, cout: int, kernel: int, stride: int, padding: int, residual: bool = False, **transpose
    ) -> None:
        super().__init__()
        conv = nn.ConvTranspose2d if transpose else nn.Conv2d
        self.conv = conv(cin, cout, kernel, stride, padding, **transpose)
        self.norm = nn.BatchNorm2d(cout)
        self.residual = residual

    def forward(self, x: Tensor) -> Tensor:
        out = self.norm(self.conv(x))
        return F.relu(out + x if self.residual else out)


def _stage(first: ConvBlock, width: int, blocks: int) -> nn.Sequential:
    return nn.Sequential(first, *(ConvBlock(width, width, 3, 1, 1, residual=True) for _ in range(blocks)))


def mask_lower_half(faces: Tensor) -> Tensor:
    """``[..., 3, 96, 96]`` faces with rows 48..95 zeroed: what the generator must fill in."""
    masked = faces.clone()
    masked[..., FACE_SIZE // 2 :, :] = 0.0
    return masked


def unit_windows(units: Tensor, frames: int, window: int, pad: int) -> Tensor:
    """``[B, U]`` 50 Hz units -> ``[B, frames, 2 * window]``: for frame ``t`` the units ``2t + 1 - window ..
    2t + window``, centred on the frame (its units are ``2t`` and ``2t + 1``); outside the sequence ``pad``."""
    needed = UNITS_PER_FRAME * frames
    units = units[:, :needed]
    units = F.pad(units, (window - 1, window + 1 + needed - units.shape[1]), value=pad)
    return units.unfold(1, 2 * window, UNITS_PER_FRAME)[:, :frames]


def soft_unit_windows(units: Tensor, frames: int, window: int) -> Tensor:
    """`unit_windows` of unit distributions: ``[B, U, K]`` at 50 Hz -> ``[B, frames, 2 * window, K]``, all-zero rows
    outside the sequence (a model that predicts units renders through them and stays differentiable)."""
    needed = UNITS_PER_FRAME * frames
    units = units[:, :needed]
    units = F.pad(units, (0, 0, window - 1, window + 1 + needed - units.shape[1]))
    return units.unfold(1, 2 * window, UNITS_PER_FRAME)[:, :frames].transpose(-1, -2)


class UnitConditioner(nn.Module):
    """A window of units -> one code per frame: embedding + learned positions, one Transformer layer, then a mean
    over the positions or (``unit_pooling="flatten"``) a linear map of all of them."""

    def __init__(self, config: FaceRendererConfig) -> None:
        super().__init__()
        self.pad = config.num_units
        self.embedding = nn.Embedding(config.num_units + 1, config.unit_dim, padding_idx=config.num_units)
        self.positions = nn.Parameter(torch.randn(2 * config.window, config.unit_dim) * 0.02)
        self.layer = EncoderLayer(config.unit_dim, config.ffn_dim, config.heads, config.dropout, config.dropout)
        self.layer.apply(init_bert_params)
        self.norm = nn.LayerNorm(config.unit_dim)
        width = 2 * config.window * config.unit_dim
        self.flatten = nn.Linear(width, config.unit_dim) if config.unit_pooling == "flatten" else None

    def forward(self, windows: Tensor) -> Tensor:
        """``[N, 2W]`` unit ids (``num_units`` = padding), or ``[N, 2W, num_units]`` unit distributions (all-zero
        rows = padding; their embedding is the expected one), -> ``[N, unit_dim]``."""
        if windows.is_floating_point():
            padding = windows.sum(-1) == 0
            embedded = windows @ self.embedding.weight[: self.pad]
        else:
            padding = windows == self.pad
            embedded = self.embedding(windows)
        x = self.layer(embedded + self.positions, padding)
        keep = (~padding).unsqueeze(-1).float()
        if self.flatten is not None:
            return self.norm(self.flatten((x * keep).flatten(1)))
        return self.norm((x * keep).sum(1) / keep.sum(1).clamp(min=1.0))


class FaceRenderer(nn.Module):
    """``forward(masked target, reference, unit windows) -> face`` for a flat batch of frames."""

    def __init__(self, config: FaceRendererConfig | None = None) -> None:
        super().__init__()
        self.config = config = config or FaceRendererConfig()
        enc, dec = config.encoder_channels, config.decoder_channels
        first = [ConvBlock(6, enc[0], 7, 1, 3)]
        first += [ConvBlock(enc[i - 1], enc[i], 3, 2, 1) for i in range(1, 6)]
        first.append(ConvBlock(enc[5], enc[6], 3, 1, 0))  # 3 -> 1
        self.encoder = nn.ModuleList(_stage(f, w, n) for f, w, n in zip(first, enc, config.encoder_blocks))
        self.bottleneck = ConvBlock(enc[6], enc[6], 1, 1, 0)  # after the encoder's last stage (Wav2Lip's 1x1)
        self.conditioner = UnitConditioner(config)
        self.unit_proj = ConvBlock(config.unit_dim, config.unit_dim, 1, 1, 0)  # Wav2Lip's first decoder block
        skips = enc[::-1]  # widths at 1, 3, 6, 12, 24, 48 and 96 pixels
        inputs = [config.unit_dim + skips[0]] + [dec[i - 1] + skips[i] for i in range(1, 6)]
        ups = [ConvBlock(inputs[0], dec[0], 3, 1, 0, output_padding=0)]  # 1 -> 3
        ups += [ConvBlock(inputs[i], dec[i], 3, 2, 1, output_padding=1) for i in range(1, 6)]  # doubling to 96
        self.decoder = nn.ModuleList(_stage(u, w, n) for u, w, n in zip(ups, dec, config.decoder_blocks))
        self.modulation = (
            nn.ModuleList(nn.Linear(config.unit_dim, 2 * w) for w in dec) if config.unit_modulation else None
        )
        for film in self.modulation or ():
            nn.init.zeros_(film.weight)
            nn.init.zeros_(film.bias)
        self.output = nn.Sequential(
            ConvBlock(dec[5] + skips[6], config.output_channels, 3, 1, 1), nn.Conv2d(config.output_channels, 3, 1)
        )
        if config.over_reference:
            nn.init.zeros_(self.output[-1].weight)
            nn.init.zeros_(self.output[-1].bias)

    def forward(self, masked: Tensor, reference: Tensor, windows: Tensor) -> Tensor:
        """``masked``, ``reference`` ``[N, 3, 96, 96]`` in [0, 1], ``windows`` ``[N, 2W]`` unit ids or ``[N, 2W, K]``
        unit distributions -> ``[N, 3, 96, 96]``."""
        if tuple(masked.shape[1:]) != (3, FACE_SIZE, FACE_SIZE) or masked.shape != reference.shape:
            raise ValueError(
                f"expected target and reference faces [N, 3, {FACE_SIZE}, {FACE_SIZE}], got"
                f" {tuple(masked.shape)} and {tuple(reference.shape)}"
            )
        x = torch.cat([masked, reference], dim=1)
        skips = []
        for stage in self.encoder:
            x = stage(x)
            skips.append(x)
        skips[-1] = self.bottleneck(skips[-1])
        code = self.conditioner(windows)
        x = self.unit_proj(code[:, :, None, None])
        for index, (stage, skip) in enumerate(zip(self.decoder, skips[::-1])):
            x = stage(torch.cat([x, skip], dim=1))
            if self.modulation is not None:
                scale, shift = self.modulation[index](code)[:, :, None, None].chunk(2, dim=1)
                x = x * (1 + scale) + shift
        logits = self.output(torch.cat([x, skips[0]], dim=1))
        if self.config.over_reference:
            logits = logits + torch.logit(reference, eps=1e-3)
        face = torch.sigmoid(logits)
        if self.config.keep_upper_half:
            face = torch.cat([masked[..., : FACE_SIZE // 2, :], face[..., FACE_SIZE // 2 :, :]], dim=-2)
        return face


class FaceDiscriminator(nn.Module):
    """Patch discriminator on the lower half of faces (where the generator works): strided convs with LeakyReLU,
    one real/fake logit per patch ``[N, P]``."""

    def __init__(self, channels: list[int] | tuple[int, ...] = (32, 64, 128, 256)) -> None:
        super().__init__()
        layers, previous = [], 3
        for width in channels:
            layers += [nn.Conv2d(previous, width, 4, 2, 1), nn.LeakyReLU(0.2, inplace=True)]
            previous = width
        self.body = nn.Sequential(*layers, nn.Conv2d(previous, 1, 3, 1, 1))

    def forward(self, faces: Tensor) -> Tensor:
        return self.body(faces[..., FACE_SIZE // 2 :, :]).flatten(1)
