"""SyncNet-style lip-sync expert: a 5-frame mouth window against the matching 0.2 s of audio.

Video input is the **lower half of the 96x96 RGB face** (rows 48..95), not the 88x88 lip crop: the face renderer
generates whole faces and its sync loss must score exactly what it generates (Wav2Lip's expert does the same), and
the lip-sync metric scores rendered face video, which has no separate lip crop. Five frames are stacked on the
channel axis (15 x 48 x 96).

Audio input is the 26-band log Mel filterbank at 100 Hz that the data pipeline uses for AV-HuBERT
(`av2av_lightning.data.features.log_fbank`), 4 frames per video frame, so a 5-frame video window starting at
frame ``t`` meets audio frames ``4t .. 4t + 19`` (0.2 s). Both encoders end in ReLU and L2 normalisation, so the
cosine similarity of two embeddings lies in [0, 1] and is read as the probability of being in sync (BCE, as
Wav2Lip's expert is trained). ``embed_video`` / ``embed_audio`` satisfy the `SyncExpert` protocol of
`av2av_lightning.metrics.lipsync`: row ``t`` of each covers video frames ``t .. t + 4``.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from av2av_lightning.data.features import FBANK_MELS, STACK, log_fbank
from av2av_lightning.data.schema import FACE_SIZE, SAMPLES_PER_FRAME

SYNC_FRAMES = 5  # video frames per window (0.2 s at 25 fps)
AUDIO_FRAMES = SYNC_FRAMES * STACK  # 100 Hz filterbank frames per window

__all__ = ["AUDIO_FRAMES", "SYNC_FRAMES", "SyncNet", "SyncNetConfig", "lower_half", "to_face_frames"]


@dataclass
class SyncNetConfig:
    """Channel widths of the two convolutional encoders (each stage halves the resolution) and the embedding size."""

    video_channels: list[int] = field(default_factory=lambda: [64, 128, 256, 512, 512])
    audio_channels: list[int] = field(default_factory=lambda: [64, 128, 256, 512])
    embed_dim: int = 512
    n_mels: int = FBANK_MELS

    def __post_init__(self) -> None:
        self.video_channels = list(self.video_channels)
        self.audio_channels = list(self.audio_channels)

    @classmethod
    def preset(cls, name: str, **overrides) -> SyncNetConfig:
        """``tiny`` (trains on 2 CPU cores in minutes) or ``base`` (Wav2Lip-expert widths, 512-d embeddings)."""
        presets = {
            "tiny": cls(video_channels=[16, 32, 64, 64], audio_channels=[16, 32, 64], embed_dim=64),
            "base": cls(),
        }
        if name not in presets:
            raise ValueError(f"unknown SyncNet preset {name!r}; expected one of {', '.join(presets)}")
        return replace(presets[name], **overrides)


def _conv(cin: int, cout: int, stride: int | tuple[int, int]) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, 3, stride, 1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True))


def _encoder(cin: int, channels: list[int], dim: int, first_stride: int | tuple[int, int]) -> nn.Sequential:
    """Strided conv stages -> global average pool -> linear -> ReLU (non-negative, so cosines lie in [0, 1])."""
    layers, previous = [], cin
    for index, width in enumerate(channels):
        layers.append(_conv(previous, width, first_stride if index == 0 else 2))
        previous = width
    return nn.Sequential(*layers, nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(previous, dim), nn.ReLU())


def to_face_frames(frames: Tensor) -> Tensor:
    """Face video as ``[T, 3, 96, 96]`` float in [0, 1], from that layout or ``[T, 96, 96, 3]`` (uint8 or float)."""
    if frames.ndim != 4:
        raise ValueError(f"expected face frames [T, 3, H, W] or [T, H, W, 3], got shape {tuple(frames.shape)}")
    if frames.shape[1] != 3 and frames.shape[-1] == 3:
        frames = frames.permute(0, 3, 1, 2)
    if tuple(frames.shape[1:]) != (3, FACE_SIZE, FACE_SIZE):
        raise ValueError(
            f"expected RGB faces of {FACE_SIZE}x{FACE_SIZE}, got frames of shape {tuple(frames.shape[1:])}"
        )
    return frames.float() / 255.0 if frames.dtype == torch.uint8 else frames.float()


def lower_half(faces: Tensor) -> Tensor:
    """Rows 48..95 of ``[..., 3, 96, 96]`` faces: the mouth and jaw."""
    return faces[..., FACE_SIZE // 2 :, :]


class SyncNet(nn.Module):
    """Face-window and audio-window encoders whose cosine similarity says whether the two are in sync."""

    def __init__(self, config: SyncNetConfig | None = None) -> None:
        super().__init__()
        self.config = config or SyncNetConfig()
        self.video_encoder = _encoder(3 * SYNC_FRAMES, self.config.video_channels, self.config.embed_dim, (1, 2))
        self.audio_encoder = _encoder(1, self.config.audio_channels, self.config.embed_dim, 1)

    # -- windows

    def encode_video(self, windows: Tensor) -> Tensor:
        """``[N, 5, 3, 96, 96]`` faces (or ``[N, 5, 3, 48, 96]`` lower halves) -> L2-normalised ``[N, D]``."""
        if windows.shape[-2] == FACE_SIZE:
            windows = lower_half(windows)
        if tuple(windows.shape[1:]) != (SYNC_FRAMES, 3, FACE_SIZE // 2, FACE_SIZE):
            raise ValueError(f"expected face windows [N, {SYNC_FRAMES}, 3, 96, 96], got {tuple(windows.shape)}")
        return F.normalize(self.video_encoder(windows.flatten(1, 2)), dim=-1)

    def encode_audio(self, windows: Tensor) -> Tensor:
        """``[N, 20, n_mels]`` log filterbank windows -> L2-normalised ``[N, D]``."""
        if tuple(windows.shape[1:]) != (AUDIO_FRAMES, self.config.n_mels):
            raise ValueError(
                f"expected audio windows [N, {AUDIO_FRAMES}, {self.config.n_mels}], got {tuple(windows.shape)}"
            )
        return F.normalize(self.audio_encoder(windows.unsqueeze(1)), dim=-1)

    def forward(self, video_windows: Tensor, audio_windows: Tensor) -> Tensor:
        """Sync probability ``[N]`` in [0, 1]: the cosine of the two embeddings."""
        return (self.encode_video(video_windows) * self.encode_audio(audio_windows)).sum(-1)

    # -- whole clips (the SyncExpert protocol)

    @staticmethod
    def video_windows(faces: Tensor) -> Tensor:
        """``[T, 3, 96, 96]`` -> every 5-frame window ``[T - 4, 5, 3, 96, 96]`` (views, no copy)."""
        return faces.unfold(0, SYNC_FRAMES, 1).permute(0, 4, 1, 2, 3)

    def audio_windows(self, wave: Tensor, lengths: Tensor | None = None) -> Tensor:
        """``[S]`` -> ``[S // 640 - 4, 20, n_mels]``, or ``[B, S]`` -> ``[B, S // 640 - 4, 20, n_mels]``:
        window ``t`` is the audio of video frames ``t .. t + 4``."""
        frames = wave.shape[-1] // SAMPLES_PER_FRAME
        feats = log_fbank(wave, lengths, n_mels=self.config.n_mels)[..., : frames * STACK, :]
        return feats.unfold(-2, AUDIO_FRAMES, STACK).transpose(-1, -2)

    def _device(self) -> torch.device:
        return next(self.parameters()).device

    def embed_video(self, frames: Tensor) -> Tensor:
        """Face video ``[T, 3, 96, 96]`` in [0, 1] or ``[T, 96, 96, 3]`` uint8 -> ``[T - 4, D]``."""
        faces = to_face_frames(torch.as_tensor(frames)).to(self._device())
        if len(faces) < SYNC_FRAMES:
            return faces.new_zeros(0, self.config.embed_dim)
        return self.encode_video(self.video_windows(faces))

    def embed_audio(self, wave: Tensor) -> Tensor:
        """16 kHz wave ``[S]`` -> ``[S // 640 - 4, D]``."""
        wave = torch.as_tensor(wave).float().to(self._device())
        if wave.shape[-1] // SAMPLES_PER_FRAME < SYNC_FRAMES:
            return wave.new_zeros(0, self.config.embed_dim)
        return self.encode_audio(self.audio_windows(wave))
