"""Unit-to-unit translator: an mBART-style pre-norm Transformer encoder-decoder over discrete speech units.

Vocabulary (`UnitVocabulary`): 4 specials ``<s> <pad> </s> <unk>``, then one token per unit, then one tag
``[lang]`` per language, then ``<mask>``. A source is ``<s> units </s> [src]``; the decoder input starts from
``[tgt]`` and the target ends with ``</s>``. Decoding forces ``[tgt]`` as the first token and never emits any
language tag or special other than ``</s>``, so one many-to-many model serves every direction.

Token embeddings are shared by encoder, decoder and output projection (mBART ``share_all_embeddings``),
scaled by sqrt(D), plus fixed sinusoidal positions and an embedding LayerNorm. The encoder layers are the
pre-LN layers of `av2av_lightning.models.transformer`; decoder layers add causal self-attention with a
key/value cache (incremental decoding) and cross-attention, both on ``scaled_dot_product_attention``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field, replace

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from av2av_lightning.models.transformer import EncoderLayer, SelfAttention

SPECIALS = ("<s>", "<pad>", "</s>", "<unk>")
BOS, PAD, EOS, UNK = range(len(SPECIALS))
MASK_SYMBOL = "<mask>"

__all__ = ["BOS", "EOS", "PAD", "UnitTranslator", "UnitTranslatorConfig", "UnitVocabulary", "pad_tokens"]


class UnitVocabulary:
    """Token ids of specials, units (``unit + 4``), language tags and ``<mask>``; checks units and languages."""

    def __init__(self, num_units: int, languages: Sequence[str]) -> None:
        if num_units < 1:
            raise ValueError(f"num_units must be positive, got {num_units}")
        if not languages or len(set(languages)) != len(languages):
            raise ValueError(f"languages must be a non-empty list without repeats, got {list(languages)}")
        self.num_units = int(num_units)
        self.languages = tuple(languages)
        self.unit_offset = len(SPECIALS)
        self.lang_offset = self.unit_offset + self.num_units
        self.mask = self.lang_offset + len(self.languages)

    def __len__(self) -> int:
        return self.mask + 1

    def lang_id(self, lang: str) -> int:
        if lang not in self.languages:
            raise ValueError(f"unknown language {lang!r}; the translator knows {', '.join(self.languages)}")
        return self.lang_offset + self.languages.index(lang)

    @property
    def lang_ids(self) -> list[int]:
        return list(range(self.lang_offset, self.mask))

    def unit_tokens(self, units: Sequence[int] | Tensor) -> list[int]:
        units = np.array(units.cpu() if isinstance(units, Tensor) else units, dtype=np.int64).reshape(-1)
        outside = (units < 0) | (units >= self.num_units)
        if outside.any():
            raise ValueError(f"unit id {units[outside][0]} is outside the unit dictionary of {self.num_units} units")
        return (units + self.unit_offset).tolist()

    def encode_source(self, units: Sequence[int] | Tensor, lang: str) -> list[int]:
        """``<s> units </s> [src]``."""
        return [BOS, *self.unit_tokens(units), EOS, self.lang_id(lang)]

    def encode_target(self, units: Sequence[int] | Tensor, lang: str) -> list[int]:
        """``[tgt] units </s>``: the decoder input is all but the last token, the prediction target all but the first."""
        return [self.lang_id(lang), *self.unit_tokens(units), EOS]

    def decode(self, tokens: Sequence[int]) -> list[int]:
        """Unit ids of generated tokens up to the first ``</s>`` (anything that is not a unit is dropped)."""
        units = []
        for token in tokens:
            if token == EOS:
                break
            if self.unit_offset <= token < self.lang_offset:
                units.append(token - self.unit_offset)
        return units


def pad_tokens(rows: list[list[int]], device=None) -> tuple[Tensor, Tensor]:
    """``[B, L]`` token ids padded with ``<pad>`` and the padding mask (True = padding)."""
    longest = max(len(r) for r in rows)
    tokens = torch.full((len(rows), longest), PAD, dtype=torch.long)
    for i, row in enumerate(rows):
        tokens[i, : len(row)] = torch.tensor(row, dtype=torch.long)
    tokens = tokens.to(device)
    return tokens, tokens == PAD


@dataclass
class UnitTranslatorConfig:
    """Sizes of the translator; `large` is the published 12+12 x 1024 model (FFN 4096, 16 heads)."""

    num_units: int = 1000
    languages: list[str] = field(default_factory=lambda: ["en", "es", "fr", "it", "pt"])
    dim: int = 1024
    encoder_layers: int = 12
    decoder_layers: int = 12
    ffn_dim: int = 4096
    heads: int = 16
    dropout: float = 0.1
    attention_dropout: float = 0.1
    activation_dropout: float = 0.0
    max_positions: int = 1024

    @classmethod
    def preset(cls, name: str, **overrides) -> UnitTranslatorConfig:
        builders = {"tiny": cls.tiny, "large": cls.large}
        if name not in builders:
            raise ValueError(f"unknown translator preset {name!r}; expected one of {', '.join(builders)}")
        return builders[name](**overrides)

    @classmethod
    def tiny(cls, **overrides) -> UnitTranslatorConfig:
        """Trains on 2 CPU cores in minutes."""
        tiny = cls(
            num_units=50,
            languages=["en", "es", "fr"],
            dim=128,
            encoder_layers=2,
            decoder_layers=2,
            ffn_dim=256,
            heads=4,
        )
        return replace(tiny, **overrides)

    @classmethod
    def large(cls, **overrides) -> UnitTranslatorConfig:
        return replace(cls(), **overrides)


def sinusoidal_positions(length: int, dim: int, offset: int = 0, device=None) -> Tensor:
    """Fixed ``[length, dim]`` embeddings of positions ``offset ..``: sines in the first half, cosines in the second."""
    half = dim // 2
    frequencies = torch.exp(torch.arange(half, device=device) * -(math.log(10_000.0) / max(half - 1, 1)))
    angles = torch.arange(offset, offset + length, device=device, dtype=torch.float32)[:, None] * frequencies[None]
    table = torch.cat([angles.sin(), angles.cos()], dim=1)
    return F.pad(table, (0, dim % 2))


class Attention(SelfAttention):
    """`SelfAttention`'s projections with separate query and key/value inputs and an optional cache."""

    def project_kv(self, x: Tensor) -> tuple[Tensor, Tensor]:
        return self._split(self.k_proj(x)), self._split(self.v_proj(x))

    def attend(self, query: Tensor, key: Tensor, value: Tensor, mask: Tensor | None, causal: bool) -> Tensor:
        q = self._split(self.q_proj(query))
        out = F.scaled_dot_product_attention(
            q, key, value, attn_mask=mask, dropout_p=self.dropout if self.training else 0.0, is_causal=causal
        )
        return self.out_proj(out.transpose(1, 2).flatten(2))


class DecoderLayer(nn.Module):
    """Pre-LN: x + SelfAttn(LN(x)) (causal), x + CrossAttn(LN(x), memory), x + FFN(LN(x))."""

    def __init__(
        self, dim: int, ffn_dim: int, heads: int, dropout: float, attention_dropout: float, act_dropout: float
    ):
        super().__init__()
        self.self_attn = Attention(dim, heads, attention_dropout)
        self.self_attn_layer_norm = nn.LayerNorm(dim)
        self.encoder_attn = Attention(dim, heads, attention_dropout)
        self.encoder_attn_layer_norm = nn.LayerNorm(dim)
        self.fc1 = nn.Linear(dim, ffn_dim)
        self.fc2 = nn.Linear(ffn_dim, dim)
        self.final_layer_norm = nn.LayerNorm(dim)
        self.dropout = nn.Dropout(dropout)
        self.activation_dropout = nn.Dropout(act_dropout)

    def forward(self, x: Tensor, memory_kv: tuple[Tensor, Tensor], memory_mask: Tensor, cache: dict | None) -> Tensor:
        """``cache`` (incremental decoding): ``x`` holds only the new positions; their keys/values are appended."""
        h = self.self_attn_layer_norm(x)
        key, value = self.self_attn.project_kv(h)
        if cache is not None:
            if "k" in cache:
                key, value = torch.cat([cache["k"], key], 2), torch.cat([cache["v"], value], 2)
            cache["k"], cache["v"] = key, value
        # one new position attends to the whole prefix; a full sequence needs the causal mask
        causal = x.shape[1] > 1
        x = x + self.dropout(self.self_attn.attend(h, key, value, None, causal))
        h = self.encoder_attn_layer_norm(x)
        x = x + self.dropout(self.encoder_attn.attend(h, *memory_kv, memory_mask, False))
        hidden = self.activation_dropout(F.gelu(self.fc1(self.final_layer_norm(x))))
        return x + self.dropout(self.fc2(hidden))


@dataclass
class EncoderState:
    """What decoding needs from the encoder: per decoder layer the cross-attention keys/values, and the mask."""

    memory_kv: list[tuple[Tensor, Tensor]]
    attend: Tensor  # [B, 1, 1, S] True = attend

    def select(self, index: Tensor) -> EncoderState:
        return EncoderState([(k[index], v[index]) for k, v in self.memory_kv], self.attend[index])


class UnitTranslator(nn.Module):
    """Encoder-decoder over `UnitVocabulary` tokens; ``forward`` gives teacher-forced logits, `greedy` and
    `beam_search` generate unit sequences."""

    def __init__(self, config: UnitTranslatorConfig) -> None:
        super().__init__()
        self.config = config
        self.vocab = UnitVocabulary(config.num_units, config.languages)
        dim = config.dim
        self.embed_tokens = nn.Embedding(len(self.vocab), dim, padding_idx=PAD)
        nn.init.normal_(self.embed_tokens.weight, mean=0.0, std=dim**-0.5)
        nn.init.zeros_(self.embed_tokens.weight[PAD])
        self.embed_scale = math.sqrt(dim)
        self.encoder_embed_norm = nn.LayerNorm(dim)
        self.decoder_embed_norm = nn.LayerNorm(dim)
        layer_args = (config.dropout, config.attention_dropout, config.activation_dropout)
        self.encoder_layers = nn.ModuleList(
            EncoderLayer(dim, config.ffn_dim, config.heads, *layer_args) for _ in range(config.encoder_layers)
        )
        self.decoder_layers = nn.ModuleList(
            DecoderLayer(dim, config.ffn_dim, config.heads, *layer_args) for _ in range(config.decoder_layers)
        )
        self.encoder_norm = nn.LayerNorm(dim)
        self.decoder_norm = nn.LayerNorm(dim)
        self.dropout = nn.Dropout(config.dropout)
        suppressed = torch.zeros(len(self.vocab), dtype=torch.bool)
        suppressed[[BOS, PAD, UNK, self.vocab.mask, *self.vocab.lang_ids]] = True
        self.register_buffer("suppressed", suppressed, persistent=False)

    def _embed(self, tokens: Tensor, norm: nn.LayerNorm, offset: int = 0) -> Tensor:
        positions = sinusoidal_positions(tokens.shape[1], self.config.dim, offset, tokens.device)
        return self.dropout(norm(self.embed_scale * self.embed_tokens(tokens) + positions))

    def _check_length(self, length: int, what: str) -> None:
        if length > self.config.max_positions:
            raise ValueError(f"{what} of {length} tokens is longer than max_positions={self.config.max_positions}")

    def encode(self, src_tokens: Tensor, src_padding_mask: Tensor) -> EncoderState:
        """``src_tokens`` [B, S], ``src_padding_mask`` [B, S] True = padding."""
        self._check_length(src_tokens.shape[1], "a source")
        x = self._embed(src_tokens, self.encoder_embed_norm)
        for layer in self.encoder_layers:
            x = layer(x, src_padding_mask)
        memory = self.encoder_norm(x)
        kv = [layer.encoder_attn.project_kv(memory) for layer in self.decoder_layers]
        return EncoderState(kv, ~src_padding_mask[:, None, None, :])

    def decode(self, state: EncoderState, prev_tokens: Tensor, caches: list[dict] | None = None, offset: int = 0):
        """Logits ``[B, T, V]`` of the next token after each of ``prev_tokens`` (positions from ``offset``)."""
        x = self._embed(prev_tokens, self.decoder_embed_norm, offset)
        for index, layer in enumerate(self.decoder_layers):
            x = layer(x, state.memory_kv[index], state.attend, None if caches is None else caches[index])
        return F.linear(self.decoder_norm(x), self.embed_tokens.weight)

    def forward(self, src_tokens: Tensor, src_padding_mask: Tensor, prev_tokens: Tensor) -> Tensor:
        self._check_length(prev_tokens.shape[1], "a target")
        return self.decode(self.encode(src_tokens, src_padding_mask), prev_tokens)

    # ------------------------------------------------------------------------------------------ generation

    def _next_log_probs(self, state: EncoderState, tokens: Tensor, caches: list[dict] | None) -> Tensor:
        """Log-probabilities of the next token after ``tokens`` [N, t], suppressed tokens at -inf."""
        if caches is None:
            logits = self.decode(state, tokens)[:, -1]
        else:
            logits = self.decode(state, tokens[:, -1:], caches, offset=tokens.shape[1] - 1)[:, 0]
        return logits.float().masked_fill(self.suppressed, float("-inf")).log_softmax(-1)

    def _max_steps(self, src_padding_mask: Tensor, max_len_a: float, max_len_b: int) -> int:
        longest = int((~src_padding_mask).sum(1).max())
        return max(1, min(int(max_len_a * longest + max_len_b), self.config.max_positions - 1))

    def _start(self, tgt_langs: Sequence[str], batch: int, device) -> Tensor:
        if len(tgt_langs) != batch:
            raise ValueError(f"{len(tgt_langs)} target languages for a batch of {batch}")
        return torch.tensor([[self.vocab.lang_id(lang)] for lang in tgt_langs], device=device)

    @torch.no_grad()
    def greedy(
        self,
        src_tokens: Tensor,
        src_padding_mask: Tensor,
        tgt_langs: Sequence[str],
        max_len_a: float = 1.5,
        max_len_b: int = 10,
        use_cache: bool = True,
        raw: bool = False,
    ) -> list[list[int]]:
        """The most likely next token at every step, from ``[tgt]`` until ``</s>``: unit ids per sentence
        (``raw``: the token ids, ``[tgt]`` first)."""
        state = self.encode(src_tokens, src_padding_mask)
        tokens = self._start(tgt_langs, len(src_tokens), src_tokens.device)
        caches = [{} for _ in self.decoder_layers] if use_cache else None
        finished = torch.zeros(len(tokens), dtype=torch.bool, device=tokens.device)
        for _ in range(self._max_steps(src_padding_mask, max_len_a, max_len_b)):
            best = self._next_log_probs(state, tokens, caches).argmax(-1).masked_fill(finished, PAD)
            tokens = torch.cat([tokens, best[:, None]], 1)
            finished |= best == EOS
            if finished.all():
                break
        return self._outputs(tokens, raw)

    @torch.no_grad()
    def beam_search(
        self,
        src_tokens: Tensor,
        src_padding_mask: Tensor,
        tgt_langs: Sequence[str],
        beam_size: int = 5,
        len_penalty: float = 1.0,
        max_len_a: float = 1.5,
        max_len_b: int = 10,
        use_cache: bool = True,
        raw: bool = False,
    ) -> list[list[int]]:
        """Batched beam search; finished hypotheses stay in their beam (extended by ``<pad>`` at no cost) and the
        best one is chosen by ``score / length ** len_penalty`` (length counts ``</s>``). Returns what `greedy` does."""
        if beam_size < 1:
            raise ValueError(f"beam_size must be >= 1, got {beam_size}")
        batch, device = len(src_tokens), src_tokens.device
        rows = torch.arange(batch, device=device).repeat_interleave(beam_size)
        state = self.encode(src_tokens, src_padding_mask).select(rows)
        tokens = self._start(tgt_langs, batch, device)[rows]
        caches = [{} for _ in self.decoder_layers] if use_cache else None
        scores = torch.full((batch, beam_size), float("-inf"), device=device)
        scores[:, 0] = 0.0  # all beams start identical: expand only the first
        finished = torch.zeros(batch * beam_size, dtype=torch.bool, device=device)
        lengths = torch.zeros(batch * beam_size, device=device)
        pad_only = torch.full((len(self.vocab),), float("-inf"), device=device)
        pad_only[PAD] = 0.0
        for _ in range(self._max_steps(src_padding_mask, max_len_a, max_len_b)):
            log_probs = self._next_log_probs(state, tokens, caches)
            log_probs = torch.where(finished[:, None], pad_only, log_probs)
            candidates = (scores.reshape(-1, 1) + log_probs).view(batch, -1)
            scores, flat = candidates.topk(beam_size, dim=1)
            origin = (flat // len(self.vocab) + torch.arange(batch, device=device)[:, None] * beam_size).reshape(-1)
            chosen = (flat % len(self.vocab)).reshape(-1)
            tokens = torch.cat([tokens[origin], chosen[:, None]], 1)
            lengths = lengths[origin] + (~finished[origin]).float()
            finished = finished[origin] | (chosen == EOS)
            if caches is not None:
                for cache in caches:
                    cache["k"], cache["v"] = cache["k"][origin], cache["v"][origin]
            if finished.all():
                break
        normalised = scores / lengths.view(batch, beam_size).clamp(min=1.0) ** len_penalty
        best = normalised.argmax(1) + torch.arange(batch, device=device) * beam_size
        return self._outputs(tokens[best], raw)

    def _outputs(self, tokens: Tensor, raw: bool) -> list[list[int]]:
        if raw:
            return [[t for t in row if t != PAD] for row in tokens.tolist()]
        return [self.vocab.decode(row) for row in tokens[:, 1:].tolist()]
