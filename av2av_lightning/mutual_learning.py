"""Cross-modal mutual learning: one encoder recognises speech from audio and from lips, and the two agree.

Each batch runs the encoder twice, on audio only and on video only. With a codebook, both
feature streams are rebuilt from the same K basis vectors (``s = w B``; added to the features
with ``codebook_residual``) before the recognition head, and the loss adds two symmetric KL terms:

    L = L_cls(a) + L_cls(v) + lambda_l (KL(w^a || w^v) + KL(w^v || w^a)) + lambda_p (KL(d^a || d^v) + KL(d^v || d^a))

where ``w`` are the basis weights per frame and ``d`` the prediction distributions (per clip
for words, per frame for CTC), all in log space and over valid frames only. With a face
renderer checkpoint, ``+ lambda_r L_rec`` asks each modality's (rebuilt) features to carry
what the renderer needs: a linear head predicts the renderer's 50 Hz unit distributions, and
the frozen renderer redraws the lower half of random frames of the clip from them (L1 to the
real frames, differentiable through the expected unit embeddings). Two tasks share
the module: ``words`` (LRW-style word classification) and ``sentences`` (CTC over a
sentencepiece vocabulary, scored with WER/CER for audio, video and audio-visual input).
"""

from __future__ import annotations

from dataclasses import asdict
from typing import Any

import lightning as L
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from av2av_lightning.checkpoints import STAGE_KEY, load_encoder
from av2av_lightning.data.batching import IGNORE_INDEX, AVBatch
from av2av_lightning.distributed import refuse_layerdrop_under_plain_ddp
from av2av_lightning.face_rendering import load_face_renderer
from av2av_lightning.metrics import CharErrorRate, WordAccuracy, WordErrorRate
from av2av_lightning.models.avhubert import AVHubert, AVHubertConfig
from av2av_lightning.models.codebook import (
    ModalityInvariantCodebook,
    basis_perplexity,
    frame_entropy,
    kmeans_basis,
    symmetric_kl,
)
from av2av_lightning.models.face_renderer import UNITS_PER_FRAME, mask_lower_half, soft_unit_windows
from av2av_lightning.models.recognition_head import RecognitionHead
from av2av_lightning.optim import stage_optimizer
from data_prep.vocab import read_words, word_key

TASKS = ("words", "sentences")
MODALITIES = ("audio", "video")
INPUTS = {"audio": (True, False), "video": (False, True), "av": (True, True)}
CODEBOOK_INITS = ("kmeans", "random")


class CrossModalMutualLearning(L.LightningModule):
    """Word classification or CTC recognition from audio and from video with a shared codebook and KL alignment.

    Args:
        task: ``words`` (needs ``words``, a word list from ``av2av vocab words``) or ``sentences``
            (needs ``spm_model`` from ``av2av vocab spm``).
        modalities: the inputs trained and scored, ``audio`` and ``video`` (mutual learning); ``[audio]`` alone
            trains a speech recogniser, the project's own transcriber for ASR-BLEU (no alignment terms then).
        pretrained: the encoder to start from: an `AVHubertPretraining` checkpoint, or a mutual-learning one (e.g.
            an audio-only recogniser run first: the demo's cheap stand-in for a full-size pretraining's phonetic
            audio features); None trains the encoder from scratch (``preset`` and ``encoder`` overrides, as in
            pretraining).
        freeze_encoder_steps: keep the encoder fixed for this many steps (the heads settle first).
        encoder_lr_scale: the encoder's learning rate as a share of ``lr``. Fresh Adam moments move every weight by
            about the full learning rate on the first steps after the freeze; at ``lr`` a pretrained encoder's
            features jump, and a codebook loses most of its vectors within five steps (demo corpus: 60 -> 20 of 64).
        codebook_size: K basis vectors; 0 is the baseline without a codebook (then ``lambda_ling`` must be 0).
        codebook_temperature: softmax temperature of the basis weights.
        codebook_residual: the head sees ``f + s`` instead of ``s`` alone. Through ``s`` alone the encoder's
            gradient is about a fifth of the baseline's (normalised similarities, softmax), and the codebook rows
            stayed near 0.19 visual word accuracy where the baseline reaches 0.64 (demo corpus, 400 steps; neither
            another temperature, K = 256 nor dropping the diversity term helped); with the residual they reach
            0.55, and the alignment still acts through ``w``.
        codebook_init: ``kmeans`` starts a fresh run's basis at cluster means of ``codebook_init_frames`` audio-only
            and video-only encoder frames of the training data (see `kmeans_basis`); ``random`` draws it.
        lambda_ling, lambda_pred: weights of the basis-weight and prediction alignment terms.
        peer_targets: align each modality to the other's current distributions held fixed (`symmetric_kl`).
        align_warmup_steps: the alignment weights grow linearly from 0 to ``lambda_*`` over these first steps, so
            the classifiers have learned something before the modalities are asked to agree (agreeing on one
            constant prediction is otherwise the cheapest answer).
        lambda_diversity: weight of the codebook diversity term ``1 - perplexity / K`` of each modality's basis
            weights over the batch (as wav2vec 2.0's): alignment alone is cheapest when both modalities put every
            frame on the same few vectors (demo corpus: 20 of 64), this term keeps the whole basis in use.
        lambda_confidence: weight of the mean per-frame entropy of the basis weights over ``log K``. The diversity
            term alone is also met by every frame spreading its weight over the whole basis (demo corpus: 52 of
            64 vectors per frame); with both, each frame picks a few vectors and the batch uses them all (together
            they maximise the mutual information between frames and basis vectors).
        lambda_rec: weight of the reconstruction term through the renderer (the "+ L_rec" row of the ablation).
        renderer: a `FaceRendering` checkpoint, frozen; needed when ``lambda_rec`` > 0 (with ``load_face`` data).
        rec_frames: frames per clip redrawn for ``L_rec`` each step.
        lr, warmup_steps, total_steps, weight_decay: AdamW with warm-up and linear decay.
    """

    def __init__(
        self,
        task: str = "words",
        words: str | None = None,
        spm_model: str | None = None,
        modalities: tuple[str, ...] = MODALITIES,
        pretrained: str | None = None,
        preset: str = "tiny",
        encoder: dict[str, Any] | None = None,
        freeze_encoder_steps: int = 0,
        encoder_lr_scale: float = 1.0,
        codebook_size: int = 0,
        codebook_temperature: float = 0.1,
        codebook_residual: bool = False,
        codebook_init: str = "kmeans",
        codebook_init_frames: int = 20_000,
        lambda_ling: float = 0.0,
        lambda_pred: float = 0.0,
        peer_targets: bool = False,
        align_warmup_steps: int = 0,
        lambda_diversity: float = 0.0,
        lambda_confidence: float = 0.0,
        lambda_rec: float = 0.0,
        renderer: str | None = None,
        rec_frames: int = 4,
        lr: float = 1e-3,
        warmup_steps: int = 100,
        total_steps: int | None = None,
        weight_decay: float = 0.01,
    ) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.modalities = tuple(modalities)
        if task not in TASKS:
            raise ValueError(f"unknown task {task!r}; expected one of {', '.join(TASKS)}")
        if not modalities or set(modalities) - set(MODALITIES) or len(set(modalities)) != len(modalities):
            raise ValueError(f"modalities must be audio and/or video, each once; got {list(modalities)}")
        if len(modalities) < 2 and (lambda_ling or lambda_pred):
            raise ValueError("lambda_ling and lambda_pred align the two modalities: set modalities to audio and video")
        if codebook_init not in CODEBOOK_INITS:
            raise ValueError(f"unknown codebook_init {codebook_init!r}; expected one of {', '.join(CODEBOOK_INITS)}")
        if lambda_rec and not renderer:
            raise ValueError(
                "lambda_rec reconstructs faces through a renderer: set renderer to a FaceRendering checkpoint"
            )
        if (lambda_ling or lambda_diversity or lambda_confidence or codebook_residual) and not codebook_size:
            raise ValueError(
                "lambda_ling, lambda_diversity, lambda_confidence and codebook_residual act on the codebook: "
                "set codebook_size > 0"
            )
        self.encoder = _encoder(pretrained, preset, encoder)
        dim = self.encoder.config.embed_dim
        self.codebook = ModalityInvariantCodebook(dim, codebook_size, codebook_temperature) if codebook_size else None
        if task == "words":
            if not words:
                raise ValueError("task 'words' needs a word list (words: path from `av2av vocab words`)")
            self.words = read_words(words)
            self.word_ids = {w: i for i, w in enumerate(self.words)}
            self.head = RecognitionHead(dim, len(self.words), pool=True)
            self.scored = self.modalities
            self.accuracy = nn.ModuleDict({m: WordAccuracy() for m in self.scored})
        else:
            if not spm_model:
                raise ValueError("task 'sentences' needs a sentencepiece model (spm_model: from `av2av vocab spm`)")
            import sentencepiece

            self.pieces = sentencepiece.SentencePieceProcessor(model_file=spm_model)
            self.blank = self.pieces.get_piece_size()
            self.head = RecognitionHead(dim, self.blank + 1, pool=False)
            self.scored = (*self.modalities, "av") if len(self.modalities) == 2 else self.modalities
            self.wer = nn.ModuleDict({m: WordErrorRate() for m in self.scored})
            self.cer = nn.ModuleDict({m: CharErrorRate() for m in self.scored})
        self.renderer = self.unit_head = None
        if lambda_rec:
            self.renderer = load_face_renderer(renderer).eval().requires_grad_(False)
            self.unit_head = nn.Linear(dim, UNITS_PER_FRAME * self.renderer.config.num_units)

    def train(self, mode: bool = True) -> CrossModalMutualLearning:
        """The frozen renderer stays in eval mode (its batch-norm statistics and dropout are part of it)."""
        super().train(mode)
        if self.renderer is not None:
            self.renderer.eval()
        return self

    def on_fit_start(self) -> None:
        """Refuse LayerDrop that DDP cannot train. A fresh run (not a resumed one, whose basis comes from its
        checkpoint) with ``codebook_init: kmeans`` starts the basis at cluster means of encoder features; every rank
        takes rank 0's."""
        refuse_layerdrop_under_plain_ddp(self.trainer, self)
        if self.codebook is None or self.hparams.codebook_init != "kmeans" or self.trainer.ckpt_path is not None:
            return
        basis = kmeans_basis(self.training_features(), len(self.codebook.basis), seed=torch.initial_seed() % 2**31)
        with torch.no_grad():
            self.codebook.basis.copy_(self.trainer.strategy.broadcast(basis, src=0).to(self.device))

    @torch.no_grad()
    def training_features(self) -> Tensor:
        """``[N, D]`` encoder features of valid frames, of each trained modality alone, from the first training
        batches (at least ``codebook_init_frames``), read through a loader the training loop does not track."""
        loader = getattr(self.trainer.datamodule, "untracked_loader", None)
        if loader is None:
            raise ValueError(
                "codebook_init: kmeans reads training batches through AVDataModule; use codebook_init: random"
            )
        chunks, frames = [], 0
        was_training = self.training
        self.eval()
        for batch in loader("train"):
            batch = batch.to(self.device)
            valid = ~batch.padding_mask
            for modality in self.modalities:
                chunks.append(self.features(batch, *INPUTS[modality])[valid].float())
            frames += len(self.modalities) * int(valid.sum())
            if frames >= self.hparams.codebook_init_frames:
                break
        self.train(was_training)
        if frames < len(self.codebook.basis):
            raise ValueError(
                f"codebook_init: kmeans needs at least {len(self.codebook.basis)} frames, the data has {frames}"
            )
        return torch.cat(chunks)

    # ------------------------------------------------------------------ features

    def trained_for(self, audio: bool, video: bool) -> bool:
        """Whether every modality of this input was trained (a speech recogniser has no lip reading to offer)."""
        return all(modality in self.modalities for modality, used in zip(MODALITIES, (audio, video)) if used)

    def features(self, batch: AVBatch, audio: bool, video: bool) -> Tensor:
        """Encoder output for the chosen inputs (a missing modality is zeros), without masking."""
        frozen = self.training and self.global_step < self.hparams.freeze_encoder_steps
        with torch.set_grad_enabled(torch.is_grad_enabled() and not frozen):
            output = self.encoder(
                batch.audio if audio else None, batch.video if video else None, batch.padding_mask, mask=False
            )
        return output.features

    def rebuild(self, features: Tensor) -> tuple[Tensor, Tensor | None]:
        """The features the head sees (``s = w B`` with a codebook, ``f + s`` with ``codebook_residual``, else the
        encoder's ``f``) and the log basis weights."""
        if self.codebook is None:
            return features, None
        rebuilt, log_weights = self.codebook(features)
        return (features + rebuilt if self.hparams.codebook_residual else rebuilt), log_weights

    def recognise(self, features: Tensor, padding_mask: Tensor) -> tuple[Tensor, Tensor | None]:
        """Log-probabilities of the head (per clip for words, per frame for sentences) and the log basis weights."""
        features, log_weights = self.rebuild(features)
        return self.head(features, padding_mask), log_weights

    # ------------------------------------------------------------------ losses

    def word_targets(self, batch: AVBatch) -> Tensor:
        ids = [self.word_ids.get(word_key(m.lang, m.label or ""), IGNORE_INDEX) for m in batch.meta]
        return torch.tensor(ids, dtype=torch.long, device=self.device)

    def sentence_targets(self, batch: AVBatch) -> tuple[Tensor, Tensor]:
        pieces = [self.pieces.encode(m.text.lower()) for m in batch.meta]
        lengths = torch.tensor([len(p) for p in pieces], dtype=torch.long)
        flat = torch.tensor([i for p in pieces for i in p], dtype=torch.long)
        return flat, lengths

    def classification_loss(self, log_probs: Tensor, batch: AVBatch) -> Tensor:
        if self.hparams.task == "words":
            return F.nll_loss(log_probs, self.word_targets(batch), ignore_index=IGNORE_INDEX)
        targets, target_lengths = self.sentence_targets(batch)
        return F.ctc_loss(
            log_probs.transpose(0, 1),
            targets,
            batch.lengths.cpu(),
            target_lengths,
            blank=self.blank,
            zero_infinity=True,
        )

    def reconstruction_loss(self, features: Tensor, batch: AVBatch) -> Tensor:
        """L1 of ``rec_frames`` random frames per clip redrawn by the frozen renderer (lower half masked, a random
        frame of the same clip as reference) from the unit distributions the unit head predicts from ``features``."""
        if batch.face is None:
            raise ValueError("lambda_rec redraws the input faces: build the datamodule with load_face=True")
        clips, frames = features.shape[:2]
        units = self.unit_head(features).view(clips, frames * UNITS_PER_FRAME, -1).softmax(-1)
        units = units * (~batch.padding_mask).repeat_interleave(UNITS_PER_FRAME, 1).unsqueeze(-1)
        windows = soft_unit_windows(units, frames, self.renderer.config.window)
        clip = torch.arange(clips, device=self.device).repeat_interleave(self.hparams.rec_frames)
        lengths = batch.lengths.to(self.device)[clip]
        frame, reference = ((torch.rand(2, len(clip), device=self.device) * lengths).long()).unbind(0)
        target = batch.face[clip, frame]
        redrawn = self.renderer(mask_lower_half(target), batch.face[clip, reference], windows[clip, frame])
        return F.l1_loss(redrawn, target)

    def mutual_learning_loss(self, batch: AVBatch) -> tuple[Tensor, dict[str, Tensor]]:
        valid = ~batch.padding_mask
        rebuilt, log_weights, log_probs = {}, {}, {}
        for modality in self.modalities:
            rebuilt[modality], log_weights[modality] = self.rebuild(self.features(batch, *INPUTS[modality]))
            log_probs[modality] = self.head(rebuilt[modality], batch.padding_mask)
        parts = {f"cls_{m}": self.classification_loss(log_probs[m], batch) for m in self.modalities}
        loss = sum(parts.values())
        both = len(self.modalities) == 2
        align = self.alignment_share()
        if both:
            prediction_valid = None if self.hparams.task == "words" else valid
            peer = self.hparams.peer_targets
            parts["pred_align"] = symmetric_kl(log_probs["audio"], log_probs["video"], prediction_valid, peer)
            loss = loss + align * self.hparams.lambda_pred * parts["pred_align"]
        if self.codebook is not None:
            weights = list(log_weights.values())
            used = [basis_perplexity(w, valid) for w in weights]
            parts["diversity"] = 1 - sum(used) / (len(used) * len(self.codebook.basis))
            parts["frame_entropy"] = sum(frame_entropy(w, valid) for w in weights) / len(weights)
            with torch.no_grad():  # a diagnostic: falls towards 1 when the codebook collapses
                parts["basis_used"] = basis_perplexity(torch.cat(weights), valid.repeat(len(weights), 1))
            loss = loss + self.hparams.lambda_diversity * parts["diversity"]
            loss = loss + self.hparams.lambda_confidence * parts["frame_entropy"]
            if both:
                parts["ling_align"] = symmetric_kl(log_weights["audio"], log_weights["video"], valid, peer)
                loss = loss + align * self.hparams.lambda_ling * parts["ling_align"]
        if self.renderer is not None:
            rec = [self.reconstruction_loss(rebuilt[m], batch) for m in self.modalities]
            parts["rec"] = sum(rec) / len(rec)
            loss = loss + self.hparams.lambda_rec * parts["rec"]
        return loss, parts

    def alignment_share(self) -> float:
        """The share of ``lambda_ling`` / ``lambda_pred`` in force: 1 after ``align_warmup_steps`` (and when
        not training), rising linearly from 0 before."""
        warmup = self.hparams.align_warmup_steps
        if not self.training or not warmup:
            return 1.0
        return min(1.0, self.global_step / warmup)

    # ------------------------------------------------------------------ Lightning hooks

    def training_step(self, batch: AVBatch, batch_idx: int) -> Tensor:
        loss, parts = self.mutual_learning_loss(batch)
        self.log("train/loss", loss, prog_bar=True, batch_size=len(batch))
        self.log_dict({f"train/{k}": v for k, v in parts.items()}, batch_size=len(batch))
        return loss

    def validation_step(self, batch: AVBatch, batch_idx: int) -> None:
        loss, parts = self.mutual_learning_loss(batch)
        self.log("val/loss", loss, batch_size=len(batch), sync_dist=True)
        self.log_dict({f"val/{k}": v for k, v in parts.items()}, batch_size=len(batch), sync_dist=True)
        for name in self.scored:
            log_probs, _ = self.recognise(self.features(batch, *INPUTS[name]), batch.padding_mask)
            self._score(name, log_probs, batch)

    def _score(self, name: str, log_probs: Tensor, batch: AVBatch) -> None:
        if self.hparams.task == "words":
            targets = self.word_targets(batch)
            known = targets != IGNORE_INDEX
            if known.any():
                self.accuracy[name].update(log_probs[known], targets[known])
            return
        hypotheses = self.greedy_decode(log_probs, batch.lengths)
        references = [m.text for m in batch.meta]
        for metric in (self.wer[name], self.cer[name]):
            metric.update(references, pred_text=hypotheses)

    def on_validation_epoch_end(self) -> None:
        """Corpus-level scores (synced over ranks by torchmetrics), logged as ``val/acc_video``, ``val/wer_av``..."""
        if self.hparams.task == "words":
            scores = {f"val/acc_{name}": metric.compute()["word_accuracy"] for name, metric in self.accuracy.items()}
            metrics = list(self.accuracy.values())
        else:
            scores = {f"val/wer_{name}": metric.compute()["wer"] for name, metric in self.wer.items()}
            scores |= {f"val/cer_{name}": metric.compute()["cer"] for name, metric in self.cer.items()}
            metrics = [*self.wer.values(), *self.cer.values()]
        self.log_dict({k: v.float() for k, v in scores.items()})
        for metric in metrics:
            metric.reset()

    def greedy_decode(self, log_probs: Tensor, lengths: Tensor) -> list[str]:
        """Best path: argmax per frame, repeats merged, blanks dropped, pieces joined into text."""
        best = log_probs.argmax(-1).cpu()
        texts = []
        for row, length in zip(best, lengths.tolist()):
            path = torch.unique_consecutive(row[:length]).tolist()
            texts.append(self.pieces.decode([p for p in path if p != self.blank]))
        return texts

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        checkpoint[STAGE_KEY] = "mutual_learning"
        checkpoint["encoder_config"] = asdict(self.encoder.config)

    def configure_optimizers(self) -> dict:
        return stage_optimizer(self, self, lr_scales={"encoder.": self.hparams.encoder_lr_scale})


def _encoder(pretrained: str | None, preset: str, overrides: dict | None) -> AVHubert:
    """The pretrained encoder (or a fresh one), with modality dropout off: each modality is fed on its own. The
    masked-prediction head and mask embedding are frozen: nothing here reaches them, and DDP refuses parameters
    that never get a gradient."""
    if pretrained:
        encoder = load_encoder(pretrained).train()
        encoder.config.modality_dropout = 0.0
    else:
        encoder = AVHubert(AVHubertConfig.preset(preset, **{**(overrides or {}), "modality_dropout": 0.0}))
    for unused in (encoder.mask_emb, encoder.label_embs_concat, *encoder.final_proj.parameters()):
        unused.requires_grad_(False)
    return encoder
