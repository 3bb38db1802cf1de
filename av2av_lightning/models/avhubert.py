"""AV-HuBERT: audio + lip-video front-ends, fusion, span masking, a Transformer encoder and cluster-id logits.

The module and parameter names follow fairseq's AV-HuBERT (``feature_extractor_audio.proj``,
``feature_extractor_video.resnet.*``, ``layer_norm``, ``post_extract_proj``, ``mask_emb``, ``encoder.*``,
``final_proj``, ``label_embs_concat``), so converting a published checkpoint is a near-identity mapping; the
only rename is the positional conv weight norm (see :mod:`av2av_lightning.models.transformer`).

A missing modality is represented as in the reference implementation: its *front-end features* are zeros (the
same thing modality dropout does in training), not its raw input.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from av2av_lightning.models.masking import Spans, mask_audio, sample_spans, swap_video_spans
from av2av_lightning.models.resnet import ResEncoder
from av2av_lightning.models.transformer import TransformerEncoder

AUDIO_DIM = 104  # 26 log-Mel filterbanks x 4 stacked 100 Hz frames = one 25 Hz frame


@dataclass
class AVHubertConfig:
    """Architecture and pretraining behaviour; plain field types so it can be a LightningCLI/YAML init arg.

    ``dropout_features`` is accepted for parity with fairseq configs, where it only touches features no
    HuBERT loss reads, so it has no effect here. Feature masking and ``mask_same_spans`` draw one set of
    spans with the audio settings, and therefore require the image settings to be equal (as fairseq asserts).
    """

    embed_dim: int = 768
    layers: int = 12
    ffn_dim: int = 3072
    heads: int = 12
    resnet_width: int = 64
    resnet_layers: list[int] = field(default_factory=lambda: [2, 2, 2, 2])
    fusion: str = "concat"
    pos_conv_kernel: int = 128
    pos_conv_groups: int = 16
    dropout: float = 0.1
    attention_dropout: float = 0.1
    activation_dropout: float = 0.0
    dropout_input: float = 0.1
    dropout_features: float = 0.1
    layerdrop: float = 0.05
    feature_grad_mult: float = 0.1
    mask_type: str = "feature"
    mask_prob_audio: float = 0.8
    mask_length_audio: int = 10
    mask_prob_image: float = 0.8
    mask_length_image: int = 10
    mask_same_spans: bool = True
    mask_min_spans: int = 2
    modality_dropout: float = 0.0
    audio_dropout: float = 0.0
    num_classes: list[int] = field(default_factory=lambda: [100])
    final_dim: int = 256
    logit_temp: float = 0.1

    def __post_init__(self) -> None:
        self.resnet_layers = list(self.resnet_layers)
        self.num_classes = list(self.num_classes)
        if self.fusion not in ("concat", "add"):
            raise ValueError(f"fusion must be 'concat' or 'add', got {self.fusion!r}")
        if self.mask_type not in ("feature", "input"):
            raise ValueError(f"mask_type must be 'feature' or 'input', got {self.mask_type!r}")
        shared = self.mask_type == "feature" or self.mask_same_spans
        same = (self.mask_prob_audio, self.mask_length_audio) == (self.mask_prob_image, self.mask_length_image)
        if shared and not same:
            raise ValueError(
                "feature masking and mask_same_spans use one set of spans: mask_prob/length_audio and _image must match"
                " (use mask_type='input' with mask_same_spans=False for different per-modality settings)"
            )

    @classmethod
    def preset(cls, name: str, **overrides) -> AVHubertConfig:
        """A named size (``tiny``, ``base``, ``large``) with field overrides, as stage configs give it."""
        builders = {"tiny": cls.tiny, "base": cls.base, "large": cls.large}
        if name not in builders:
            raise ValueError(f"unknown AV-HuBERT preset {name!r}; expected one of {', '.join(builders)}")
        return builders[name](**overrides)

    @classmethod
    def tiny(cls, **overrides) -> AVHubertConfig:
        """Trains on 2 CPU cores in minutes."""
        tiny = cls(
            embed_dim=128,
            layers=4,
            ffn_dim=512,
            heads=4,
            resnet_width=16,
            resnet_layers=[1, 1, 1, 1],
            pos_conv_kernel=32,
            pos_conv_groups=8,
            final_dim=64,
            num_classes=[50],
        )
        return replace(tiny, **overrides)

    @classmethod
    def base(cls, **overrides) -> AVHubertConfig:
        """BASE as published (~103 M parameters); LRS3 iterations 1-4: feature masking, audio dropout 0.5."""
        return replace(cls(audio_dropout=0.5), **overrides)

    @classmethod
    def large(cls, **overrides) -> AVHubertConfig:
        """LARGE as published (~325 M): input masking (video 0.3/5, audio 0.8/10) and modality dropout 0.5/0.5."""
        large = cls(
            embed_dim=1024,
            layers=24,
            ffn_dim=4096,
            heads=16,
            mask_type="input",
            mask_prob_image=0.3,
            mask_length_image=5,
            mask_same_spans=False,
            modality_dropout=0.5,
            audio_dropout=0.5,
        )
        return replace(large, **overrides)


@dataclass
class AVHubertOutput:
    """``features`` [B, T, D] (final LayerNorm applied unless a layer was chosen), ``mask_indices`` [B, T] True =
    masked, ``logits`` one [B, T, C_i] per label set (padded frames hold garbage; the loss selects valid frames),
    ``feature_penalty`` the mean square of the fused front-end features over valid frames."""

    features: Tensor
    padding_mask: Tensor
    mask_indices: Tensor
    logits: list[Tensor]
    feature_penalty: Tensor


class GradMultiply(torch.autograd.Function):
    """Identity forward, gradient scaled by ``scale`` backward: slows the front-ends down relative to the encoder."""

    @staticmethod
    def forward(ctx, x: Tensor, scale: float) -> Tensor:
        ctx.scale = scale
        return x.clone()

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor, None]:
        return grad * ctx.scale, None


class AudioFrontEnd(nn.Module):
    def __init__(self, dim: int) -> None:
        super().__init__()
        self.proj = nn.Linear(AUDIO_DIM, dim)

    def forward(self, audio: Tensor) -> Tensor:
        return self.proj(audio)


class VideoFrontEnd(nn.Module):
    def __init__(self, dim: int, width: int, blocks: list[int]) -> None:
        super().__init__()
        self.resnet = ResEncoder(width, blocks)
        self.proj = nn.Linear(self.resnet.out_channels, dim)

    def forward(self, video: Tensor) -> Tensor:
        return self.proj(self.resnet(video))


class AVHubert(nn.Module):
    def __init__(self, config: AVHubertConfig) -> None:
        super().__init__()
        self.config = config
        dim = config.embed_dim
        fused = 2 * dim if config.fusion == "concat" else dim
        self.feature_extractor_audio = AudioFrontEnd(dim)
        self.feature_extractor_video = VideoFrontEnd(dim, config.resnet_width, config.resnet_layers)
        self.layer_norm = nn.LayerNorm(fused)
        self.post_extract_proj = nn.Linear(fused, dim) if fused != dim else nn.Identity()
        self.dropout_input = nn.Dropout(config.dropout_input)
        # fairseq keeps one ``mask_emb``: an audio-input vector for input masking, an encoder vector otherwise
        self.mask_emb = nn.Parameter(torch.empty(AUDIO_DIM if config.mask_type == "input" else dim).uniform_())
        self.encoder = TransformerEncoder(
            dim,
            config.layers,
            config.ffn_dim,
            config.heads,
            config.pos_conv_kernel,
            config.pos_conv_groups,
            config.dropout,
            config.attention_dropout,
            config.activation_dropout,
            config.layerdrop,
        )
        self.final_proj = nn.Linear(dim, config.final_dim * len(config.num_classes))
        self.label_embs_concat = nn.Parameter(torch.empty(sum(config.num_classes), config.final_dim).uniform_())

    def forward(
        self,
        audio: Tensor | None = None,
        video: Tensor | None = None,
        padding_mask: Tensor | None = None,
        mask: bool = True,
        output_layer: int | None = None,
    ) -> AVHubertOutput:
        """``audio`` [B, T, 104], ``video`` [B, 1, T, 88, 88], ``padding_mask`` [B, T] True = padding."""
        features, padding_mask, mask_indices, penalty = self._encode(audio, video, padding_mask, mask, output_layer)
        logits = [self.logits(features, index) for index in range(len(self.config.num_classes))]
        return AVHubertOutput(features, padding_mask, mask_indices, logits, penalty)

    def extract_features(
        self,
        audio: Tensor | None = None,
        video: Tensor | None = None,
        padding_mask: Tensor | None = None,
        layer: int | None = None,
    ) -> tuple[Tensor, Tensor]:
        """Features for unit extraction / downstream stages: no masking, and eval behaviour (no dropout, LayerDrop,
        modality dropout, BatchNorm batch statistics) even when the module is in training mode.

        ``layer=None``: the last layer after the final LayerNorm; ``layer=k``: output of layer k (1-based), 0 = the
        Transformer input (fused features + conv positional embedding). Gradients still flow.
        """
        training = self.training
        self.eval()
        try:
            features, padding_mask, _, _ = self._encode(audio, video, padding_mask, False, layer)
        finally:
            self.train(training)
        return features, padding_mask

    def logits(self, features: Tensor, label_set_index: int) -> Tensor:
        """Cosine similarity between the projected features and every cluster embedding of one label set, / temp."""
        count = len(self.config.num_classes)
        proj = self.final_proj(features).chunk(count, dim=-1)[label_set_index]
        embs = self.label_embs_concat.split(self.config.num_classes, dim=0)[label_set_index]
        cosine = F.normalize(proj.float(), dim=-1, eps=1e-8) @ F.normalize(embs.float(), dim=-1, eps=1e-8).T
        return cosine / self.config.logit_temp

    def _encode(
        self, audio: Tensor | None, video: Tensor | None, padding_mask: Tensor | None, mask: bool, layer: int | None
    ) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        batch, frames, device = _batch_shape(audio, video)
        if padding_mask is None:
            padding_mask = torch.zeros(batch, frames, dtype=torch.bool, device=device)
        mask_indices = torch.zeros(batch, frames, dtype=torch.bool, device=device)
        if mask and self.config.mask_type == "input":
            audio, video, mask_indices = self._mask_inputs(audio, video, padding_mask)
        audio_features, video_features = self._front_ends(audio, video, padding_mask, batch, frames)
        if self.training and self.config.modality_dropout > 0:
            audio_features, video_features = self._drop_modality(audio_features, video_features)
        if self.config.fusion == "concat":
            fused = torch.cat([audio_features, video_features], dim=-1)
        else:
            fused = audio_features + video_features
        penalty = fused.float().pow(2)[~padding_mask].mean()
        x = self.dropout_input(self.post_extract_proj(self.layer_norm(fused)))
        if mask and self.config.mask_type == "feature":
            mask_indices = self._spans(padding_mask, "audio").to_mask(frames, device)
            x = torch.where(mask_indices[..., None], self.mask_emb.to(x.dtype), x)
        return self.encoder(x, padding_mask, layer), padding_mask, mask_indices, penalty

    def _spans(self, padding_mask: Tensor, modality: str) -> Spans:
        suffix = "audio" if modality == "audio" or self.config.mask_same_spans else "image"
        prob, length = getattr(self.config, f"mask_prob_{suffix}"), getattr(self.config, f"mask_length_{suffix}")
        return sample_spans((~padding_mask).sum(1).cpu(), prob, length, self.config.mask_min_spans)

    def _mask_inputs(
        self, audio: Tensor | None, video: Tensor | None, padding_mask: Tensor
    ) -> tuple[Tensor | None, Tensor | None, Tensor]:
        """Input masking: audio spans -> ``mask_emb``, video spans -> frames from elsewhere in the clip."""
        frames, device = padding_mask.shape[1], padding_mask.device
        audio_spans = self._spans(padding_mask, "audio")
        video_spans = audio_spans if self.config.mask_same_spans else self._spans(padding_mask, "image")
        mask_indices = torch.zeros_like(padding_mask)
        if audio is not None:
            audio_mask = audio_spans.to_mask(frames, device)
            audio = mask_audio(audio, audio_mask, self.mask_emb)
            mask_indices |= audio_mask
        if video is not None:
            video = swap_video_spans(video, video_spans, (~padding_mask).sum(1).cpu())
            mask_indices |= video_spans.to_mask(frames, device)
        return audio, video, mask_indices

    def _front_ends(
        self, audio: Tensor | None, video: Tensor | None, padding_mask: Tensor, batch: int, frames: int
    ) -> tuple[Tensor, Tensor]:
        """Per-modality features [B, T, D]; a missing modality gives zeros. Padded video frames are zeroed first so
        the stem's temporal context never sees padding content."""
        if audio is not None:
            audio = self._scaled(self.feature_extractor_audio, audio)
        if video is not None:
            video = self._scaled(
                self.feature_extractor_video, video.masked_fill(padding_mask[:, None, :, None, None], 0)
            )
        reference = audio if audio is not None else video
        zeros = reference.new_zeros(batch, frames, self.config.embed_dim)
        return (zeros if audio is None else audio), (zeros if video is None else video)

    def _scaled(self, extractor: nn.Module, x: Tensor) -> Tensor:
        """Runs a front-end with its gradient scaled by ``feature_grad_mult`` (0: no graph at all, as fairseq)."""
        scale = self.config.feature_grad_mult
        if scale == 0:
            with torch.no_grad():
                return extractor(x)
        features = extractor(x)
        return features if scale == 1 else GradMultiply.apply(features, scale)

    def _drop_modality(self, audio: Tensor, video: Tensor) -> tuple[Tensor, Tensor]:
        """Per sample: with prob ``modality_dropout`` zero one modality, the audio with prob ``audio_dropout``."""
        batch = audio.shape[0]
        dropped = torch.rand(batch, device=audio.device) < self.config.modality_dropout
        audio_chosen = torch.rand(batch, device=audio.device) < self.config.audio_dropout
        keep_audio = ~(dropped & audio_chosen)
        keep_video = ~(dropped & ~audio_chosen)
        return audio * keep_audio[:, None, None], video * keep_video[:, None, None]


def _batch_shape(audio: Tensor | None, video: Tensor | None) -> tuple[int, int, torch.device]:
    """(B, T, device) from whichever modality is given; checks that both agree."""
    if audio is None and video is None:
        raise ValueError("AVHubert needs audio, video or both")
    if audio is not None and audio.shape[-1] != AUDIO_DIM:
        raise ValueError(f"audio must be [B, T, {AUDIO_DIM}], got {list(audio.shape)}")
    if video is not None and (video.dim() != 5 or video.shape[1] != 1):
        raise ValueError(f"video must be [B, 1, T, H, W], got {list(video.shape)}")
    shapes = {tuple(audio.shape[:2])} if audio is not None else set()
    if video is not None:
        shapes.add((video.shape[0], video.shape[2]))
    if len(shapes) > 1:
        raise ValueError(f"audio and video disagree on [B, T]: {sorted(shapes)}")
    (batch, frames), device = shapes.pop(), (audio if audio is not None else video).device
    return batch, frames, device
