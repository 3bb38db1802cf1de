"""Pre-LayerNorm Transformer encoder with a convolutional positional embedding (wav2vec 2.0 / HuBERT style).

Parameter names match fairseq (``pos_conv.0``, ``layers.{i}.self_attn.{q,k,v,out}_proj``,
``self_attn_layer_norm``, ``fc1``, ``fc2``, ``final_layer_norm``, ``layer_norm``). The one difference is the
weight norm of the positional convolution: it uses ``torch.nn.utils.parametrizations.weight_norm``, so fairseq's
``pos_conv.0.weight_g`` / ``weight_v`` are stored here as ``pos_conv.0.parametrizations.weight.original0`` /
``original1`` (same shapes and meaning: magnitude g over dim 2, direction v).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.utils.parametrizations import weight_norm


class SelfAttention(nn.Module):
    """Multi-head self-attention on ``scaled_dot_product_attention`` with a key padding mask."""

    def __init__(self, dim: int, heads: int, dropout: float = 0.0) -> None:
        super().__init__()
        if dim % heads:
            raise ValueError(f"embed_dim {dim} is not divisible by heads {heads}")
        self.heads = heads
        self.dropout = dropout
        self.q_proj = nn.Linear(dim, dim)
        self.k_proj = nn.Linear(dim, dim)
        self.v_proj = nn.Linear(dim, dim)
        self.out_proj = nn.Linear(dim, dim)

    def _split(self, x: Tensor) -> Tensor:
        batch, length, dim = x.shape
        return x.view(batch, length, self.heads, dim // self.heads).transpose(1, 2)

    def forward(self, x: Tensor, padding_mask: Tensor | None = None) -> Tensor:
        """``x`` [B, T, D]; ``padding_mask`` [B, T] True = padding (never attended to)."""
        q, k, v = self._split(self.q_proj(x)), self._split(self.k_proj(x)), self._split(self.v_proj(x))
        attend = None if padding_mask is None else ~padding_mask[:, None, None, :]
        out = F.scaled_dot_product_attention(
            q, k, v, attn_mask=attend, dropout_p=self.dropout if self.training else 0.0
        )
        return self.out_proj(out.transpose(1, 2).flatten(2))


class EncoderLayer(nn.Module):
    """x + Attn(LN(x)), then x + FFN(LN(x)) with GELU: the pre-LN layer of AV-HuBERT (``layer_norm_first``)."""

    def __init__(
        self,
        dim: int,
        ffn_dim: int,
        heads: int,
        dropout: float = 0.1,
        attention_dropout: float = 0.1,
        activation_dropout: float = 0.0,
    ) -> None:
        super().__init__()
        self.self_attn = SelfAttention(dim, heads, attention_dropout)
        self.self_attn_layer_norm = nn.LayerNorm(dim)
        self.fc1 = nn.Linear(dim, ffn_dim)
        self.fc2 = nn.Linear(ffn_dim, dim)
        self.final_layer_norm = nn.LayerNorm(dim)
        self.dropout = nn.Dropout(dropout)
        self.activation_dropout = nn.Dropout(activation_dropout)

    def forward(self, x: Tensor, padding_mask: Tensor | None = None) -> Tensor:
        x = x + self.dropout(self.self_attn(self.self_attn_layer_norm(x), padding_mask))
        hidden = self.activation_dropout(F.gelu(self.fc1(self.final_layer_norm(x))))
        return x + self.dropout(self.fc2(hidden))


class TrimLast(nn.Module):
    """Drops the last output frame: a conv with an even kernel and padding k/2 yields T + 1 frames."""

    def forward(self, x: Tensor) -> Tensor:
        return x[..., :-1]


def positional_conv(dim: int, kernel: int, groups: int, dropout: float = 0.1) -> nn.Sequential:
    """Grouped Conv1d with weight norm over dim 2, then GELU: a relative position signal without a max length."""
    conv = nn.Conv1d(dim, dim, kernel_size=kernel, padding=kernel // 2, groups=groups)
    nn.init.normal_(conv.weight, mean=0.0, std=math.sqrt(4 * (1.0 - dropout) / (kernel * dim)))
    nn.init.zeros_(conv.bias)
    conv = weight_norm(conv, name="weight", dim=2)
    layers: list[nn.Module] = [conv, TrimLast()] if kernel % 2 == 0 else [conv]
    return nn.Sequential(*layers, nn.GELU())


def init_bert_params(module: nn.Module) -> None:
    """N(0, 0.02) linear weights and zero biases, the BERT init fairseq applies to the encoder."""
    if isinstance(module, nn.Linear):
        nn.init.normal_(module.weight, mean=0.0, std=0.02)
        if module.bias is not None:
            nn.init.zeros_(module.bias)


class TransformerEncoder(nn.Module):
    """Conv positional embedding + pre-LN layers with LayerDrop + final LayerNorm.

    ``forward(x, padding_mask, layer=k)`` returns the output of layer k (1-based, no final LayerNorm; 0 = the input
    of the first layer, i.e. features plus positional embedding); ``layer=None`` runs all layers and applies the final
    LayerNorm. Padded frames are zeroed before the positional convolution so that padding never leaks into valid
    frames (zeros are what the convolution pads with anyway).
    """

    def __init__(
        self,
        dim: int,
        layers: int,
        ffn_dim: int,
        heads: int,
        pos_conv_kernel: int = 128,
        pos_conv_groups: int = 16,
        dropout: float = 0.1,
        attention_dropout: float = 0.1,
        activation_dropout: float = 0.0,
        layerdrop: float = 0.0,
    ) -> None:
        super().__init__()
        self.pos_conv = positional_conv(dim, pos_conv_kernel, pos_conv_groups, dropout)
        self.layers = nn.ModuleList(
            EncoderLayer(dim, ffn_dim, heads, dropout, attention_dropout, activation_dropout) for _ in range(layers)
        )
        self.layer_norm = nn.LayerNorm(dim)
        self.dropout = nn.Dropout(dropout)
        self.layerdrop = layerdrop
        self.layers.apply(init_bert_params)

    def _skip(self) -> bool:
        """LayerDrop: in training each layer is skipped with probability ``layerdrop``."""
        return self.training and self.layerdrop > 0 and torch.rand(()).item() < self.layerdrop

    def forward(self, x: Tensor, padding_mask: Tensor | None = None, layer: int | None = None) -> Tensor:
        if layer is not None and not 0 <= layer <= len(self.layers):
            raise ValueError(f"layer must be in [0, {len(self.layers)}], got {layer}")
        if padding_mask is not None:
            x = x.masked_fill(padding_mask[..., None], 0.0)
        x = x + self.pos_conv(x.transpose(1, 2)).transpose(1, 2)
        x = self.dropout(x)
        for block in self.layers[:layer]:
            if not self._skip():
                x = block(x, padding_mask)
        return self.layer_norm(x) if layer is None else x
