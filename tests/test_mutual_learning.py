"""Cross-modal mutual learning: the codebook, the KL terms, both tasks learning on the tiny corpus."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F

from av2av_lightning.data.datamodule import AVDataModule
from av2av_lightning.models.codebook import (
    ModalityInvariantCodebook,
    basis_perplexity,
    frame_entropy,
    kmeans_basis,
    symmetric_kl,
)
from av2av_lightning.mutual_learning import CrossModalMutualLearning
from data_prep.vocab import count_words, read_words, top_words, train_sentencepiece

SMALL = {"embed_dim": 64, "layers": 2, "ffn_dim": 128, "heads": 2, "resnet_width": 8, "dropout": 0.0}


def shards(corpus, subset: str, split: str) -> list[str]:
    out, manifest = corpus
    return [str(out / p) for p in manifest["subsets"][subset][split]["shards"]]


@pytest.fixture(scope="module")
def word_list(tiny_corpus, tmp_path_factory):
    words = top_words(count_words(shards(tiny_corpus, "words", "train")), per_language=10)
    path = tmp_path_factory.mktemp("vocab") / "words.txt"
    path.write_text("".join(f"{w}\n" for w in words))
    return path


def test_codebook_weights_are_distributions_over_a_shared_basis():
    codebook = ModalityInvariantCodebook(dim=16, num_basis=8)
    features = torch.randn(2, 5, 16)
    mixed, log_weights = codebook(features)
    assert mixed.shape == (2, 5, 16) and log_weights.shape == (2, 5, 8)
    assert torch.allclose(log_weights.exp().sum(-1), torch.ones(2, 5))
    # the mix lies in the span of the basis: projecting it onto the basis loses nothing
    solution = torch.linalg.lstsq(codebook.basis.T.detach(), mixed.detach().reshape(-1, 16).T).solution
    assert torch.allclose(solution.T @ codebook.basis.detach(), mixed.detach().reshape(-1, 16), atol=1e-4)
    with pytest.raises(ValueError, match="at least 2"):
        ModalityInvariantCodebook(16, 1)


def test_basis_perplexity_counts_the_vectors_in_use():
    uniform = torch.full((3, 5, 8), 1 / 8).log()
    assert torch.isclose(basis_perplexity(uniform), torch.tensor(8.0))
    collapsed = torch.nn.functional.one_hot(torch.full((3, 5), 2), 8).float().clamp_min(1e-9).log()
    assert torch.isclose(basis_perplexity(collapsed), torch.tensor(1.0), atol=1e-4)
    two = torch.nn.functional.one_hot(torch.tensor([[0, 1, 7, 7]]), 8).float().clamp_min(1e-9).log()
    valid = torch.tensor([[True, True, False, False]])  # the padded frames would add a third vector
    assert torch.isclose(basis_perplexity(two, valid), torch.tensor(2.0), atol=1e-4)


def test_frame_entropy_tells_spread_frames_from_decided_ones():
    uniform = torch.full((3, 5, 8), 1 / 8).log()
    one_each = F.one_hot(torch.arange(15).view(3, 5) % 8, 8).float().clamp_min(1e-9).log()
    assert torch.isclose(frame_entropy(uniform), torch.tensor(1.0))  # the basis fully used either way...
    assert frame_entropy(one_each) < 1e-6  # ...but only here does each frame choose
    mixed = torch.cat([uniform[:, :2], one_each[:, 2:]], 1)
    valid = torch.tensor([[False, False, True, True, True]] * 3)
    assert frame_entropy(mixed, valid) < 1e-6 and torch.isclose(frame_entropy(mixed), torch.tensor(0.4))


def test_peer_targets_keep_the_value_and_pull_each_side_towards_the_other_only():
    p = torch.randn(3, 6).log_softmax(-1).requires_grad_()
    q = torch.randn(3, 6).log_softmax(-1).requires_grad_()
    loss = symmetric_kl(p, q, peer_targets=True)
    assert torch.allclose(loss, symmetric_kl(p, q))
    loss.backward()
    # only KL(q_fixed || p) reaches p: its gradient is -q / positions, as if q were a label distribution
    assert torch.allclose(p.grad, -q.detach().exp() / 3) and torch.allclose(q.grad, -p.detach().exp() / 3)


def test_kmeans_basis_puts_one_vector_at_each_cluster_mean():
    torch.manual_seed(0)
    directions = F.normalize(torch.randn(4, 32), dim=-1)
    scales = torch.tensor([1.0, 2.0, 4.0, 8.0])  # cosine clusters ignore the norm; the means keep it
    labels = torch.arange(4).repeat_interleave(200)
    features = (directions * scales[:, None])[labels] + 0.05 * torch.randn(800, 32)
    basis = kmeans_basis(features, 4)
    means = torch.stack([features[labels == c].mean(0) for c in range(4)])
    nearest = torch.cdist(means, basis).min(1).values
    assert nearest.max() < 1e-4, nearest
    codebook = ModalityInvariantCodebook(32, 4)
    with torch.no_grad():
        codebook.basis.copy_(basis)
    chosen = codebook.log_weights(features).argmax(-1)  # every cluster picks its own vector
    assert torch.equal(torch.bincount(chosen, minlength=4), torch.full((4,), 200))


def test_symmetric_kl_is_symmetric_zero_on_equal_and_masked():
    p, q = torch.randn(3, 4, 6).log_softmax(-1), torch.randn(3, 4, 6).log_softmax(-1)
    assert torch.allclose(symmetric_kl(p, q), symmetric_kl(q, p))
    assert symmetric_kl(p, p).abs() < 1e-7 and symmetric_kl(p, q) > 0
    reference = (p.exp() * (p - q)).sum(-1) + (q.exp() * (q - p)).sum(-1)
    valid = torch.tensor([[True, True, False, False]] * 3)
    assert torch.allclose(symmetric_kl(p, q, valid), reference[valid].mean())


def test_bad_settings_are_one_line_errors(word_list):
    with pytest.raises(ValueError, match="unknown codebook_init 'pca'"):
        CrossModalMutualLearning(words=str(word_list), encoder=SMALL, codebook_size=8, codebook_init="pca")
    with pytest.raises(ValueError, match="codebook_size > 0"):
        CrossModalMutualLearning(words=str(word_list), encoder=SMALL, lambda_ling=1.0)
    with pytest.raises(ValueError, match="codebook_size > 0"):
        CrossModalMutualLearning(words=str(word_list), encoder=SMALL, lambda_diversity=1.0)
    with pytest.raises(ValueError, match="codebook_size > 0"):
        CrossModalMutualLearning(words=str(word_list), encoder=SMALL, codebook_residual=True)
    with pytest.raises(ValueError, match="needs a word list"):
        CrossModalMutualLearning(encoder=SMALL)
    with pytest.raises(ValueError, match="unknown task"):
        CrossModalMutualLearning(task="phones")
    with pytest.raises(ValueError, match=r"modalities must be audio and/or video, each once; got \['audio', 'audio'\]"):
        CrossModalMutualLearning(words=str(word_list), encoder=SMALL, modalities=["audio", "audio"])
    with pytest.raises(ValueError, match="set modalities to audio and video"):
        CrossModalMutualLearning(words=str(word_list), encoder=SMALL, modalities=["audio"], lambda_pred=1.0)


def test_residual_codebook_adds_the_rebuilt_features_and_with_a_zero_basis_is_the_baseline(word_list):
    torch.manual_seed(0)
    module = CrossModalMutualLearning(words=str(word_list), encoder=SMALL, codebook_size=8, codebook_residual=True)
    features = torch.randn(2, 5, SMALL["embed_dim"])
    rebuilt, log_weights = module.codebook(features)
    head_input, weights_seen = module.rebuild(features)
    assert torch.equal(head_input, features + rebuilt) and torch.equal(weights_seen, log_weights)
    with torch.no_grad():
        module.codebook.basis.zero_()
    assert torch.equal(module.rebuild(features)[0], features)  # what the baseline's head sees


def test_kmeans_codebook_starts_at_the_training_features_and_a_resumed_run_keeps_its_basis(
    tiny_corpus, word_list, cpu_trainer, tmp_path
):
    train = shards(tiny_corpus, "words", "train")

    def fit(steps: int, ckpt_path: str | None = None) -> tuple[CrossModalMutualLearning, object]:
        torch.manual_seed(0)
        module = CrossModalMutualLearning(
            words=str(word_list), encoder=SMALL, codebook_size=8, codebook_init_frames=1000
        )
        data = AVDataModule(train_shards=train, max_frames=29 * 8, num_workers=0, seed=0)
        trainer = cpu_trainer(max_steps=steps, limit_val_batches=0, default_root_dir=tmp_path)
        trainer.fit(module, datamodule=data, ckpt_path=ckpt_path)
        return module, trainer

    started, trainer = fit(0)  # no step yet: the basis is what the initialisation made of these features
    features = started.training_features()
    cosine = F.normalize(features, dim=-1) @ F.normalize(started.codebook.basis, dim=-1).T
    assert cosine.max(1).values.mean() > 0.8  # every frame lies near a basis vector (a random basis: near 0)
    assert len(cosine.argmax(1).unique()) == 8  # and each vector is some frames' nearest
    assert torch.allclose(started.codebook.basis, kmeans_basis(features, 8, seed=0))

    with torch.no_grad():
        started.codebook.basis.neg_()  # a basis no clustering would give
    trainer.save_checkpoint(tmp_path / "one.ckpt")
    resumed, _ = fit(0, ckpt_path=str(tmp_path / "one.ckpt"))
    assert torch.equal(resumed.codebook.basis, started.codebook.basis)  # restored, not clustered again


@pytest.fixture(scope="module")
def word_batch(tiny_corpus, word_list):
    data = AVDataModule(val_shards=shards(tiny_corpus, "words", "train"), max_frames=29 * 4, num_workers=0,
                        words=str(word_list))  # fmt: skip
    data.setup("validate")
    return next(iter(data.val_dataloader()))


def test_alignment_weights_warm_up_from_zero(word_list, word_batch):
    torch.manual_seed(0)
    module = CrossModalMutualLearning(
        words=str(word_list), encoder=SMALL, codebook_size=8, lambda_ling=0.5, lambda_pred=2.0, align_warmup_steps=40
    )

    def loss_at(step: int, training: bool = True) -> tuple[float, float]:
        module._trainer = SimpleNamespace(global_step=step)  # the only thing the warm-up reads
        module.train(training)
        with torch.no_grad():
            loss, parts = module.mutual_learning_loss(word_batch)
        classification = float(parts["cls_audio"] + parts["cls_video"])
        alignment = float(0.5 * parts["ling_align"] + 2.0 * parts["pred_align"])
        assert alignment > 0
        return float(loss) - classification, alignment

    for step, share in ((0, 0.0), (10, 0.25), (40, 1.0), (400, 1.0)):
        added, alignment = loss_at(step)
        assert added == pytest.approx(share * alignment, rel=1e-4, abs=1e-6), step
    added, alignment = loss_at(0, training=False)  # validation scores the full objective
    assert added == pytest.approx(alignment, rel=1e-4)


def test_one_modality_trains_alone_and_only_it_is_scored(word_list, word_batch):
    """``modalities: [audio]`` (a speech recogniser): the loss is the audio classification loss and nothing else,
    the video front end gets no gradient, and validation scores audio only."""
    torch.manual_seed(0)
    both = CrossModalMutualLearning(words=str(word_list), encoder=SMALL, codebook_size=8, lambda_diversity=1.0)
    audio = CrossModalMutualLearning(words=str(word_list), encoder=SMALL, modalities=["audio"])
    audio.load_state_dict({k: v for k, v in both.state_dict().items() if not k.startswith("codebook.")})
    both.eval(), audio.eval()  # no dropout: the two forward passes must match
    loss, parts = audio.mutual_learning_loss(word_batch)
    assert set(parts) == {"cls_audio"}
    features = both.features(word_batch, True, False)
    expected = F.nll_loss(
        both.head(features, word_batch.padding_mask), audio.word_targets(word_batch), ignore_index=-100
    )
    assert float(loss.detach()) == pytest.approx(float(expected.detach()), rel=1e-5)
    loss.backward()
    video_grads = [p.grad for n, p in audio.encoder.named_parameters() if "video" in n and p.requires_grad]
    assert video_grads and all(g is None for g in video_grads)
    assert set(audio.accuracy) == {"audio"}
    single = CrossModalMutualLearning(
        words=str(word_list), encoder=SMALL, modalities=["audio"], codebook_size=8, lambda_diversity=1.0
    )
    _, parts = single.mutual_learning_loss(word_batch)  # a one-modality codebook keeps its own terms, no alignment
    assert set(parts) == {"cls_audio", "diversity", "frame_entropy", "basis_used"}


def test_diversity_term_spreads_a_collapsed_codebook(word_list, word_batch):
    """Every frame starts on one basis vector; descending the diversity term alone brings the others into use."""
    torch.manual_seed(0)
    module = CrossModalMutualLearning(words=str(word_list), encoder=SMALL, codebook_size=8, lambda_diversity=1.0)
    module.train()
    with torch.no_grad():  # vector 0 along the features' mean, the rest opposite: every frame picks vector 0
        mean = torch.cat([module.features(word_batch, *inputs) for inputs in ((True, False), (False, True))]).mean(
            (0, 1)
        )
        module.codebook.basis.copy_(torch.cat([mean[None], -mean + 0.1 * torch.randn(7, 64)]))
    optimizer = torch.optim.Adam(module.codebook.parameters(), lr=0.05)
    history = []
    for _ in range(30):
        _, parts = module.mutual_learning_loss(word_batch)
        optimizer.zero_grad()
        parts["diversity"].backward()
        optimizer.step()
        history.append((parts["diversity"].item(), parts["basis_used"].item()))
    (first_diversity, first_used), (last_diversity, last_used) = history[0], history[-1]
    assert first_used < 2.5 and last_used > 2 * first_used, history
    assert last_diversity < first_diversity and 0 <= last_diversity < 1


def test_confidence_term_makes_each_frame_choose_its_vectors(word_list, word_batch):
    """Training on the whole loss: with ``lambda_confidence`` each frame's weights end sharper than
    without it (the diversity term alone is met by spreading every frame over the whole basis)."""

    def trained_frame_entropy(lambda_confidence: float) -> tuple[float, float]:
        torch.manual_seed(0)
        module = CrossModalMutualLearning(
            words=str(word_list), encoder=SMALL, codebook_size=8, lambda_diversity=1.0,
            lambda_confidence=lambda_confidence,
        )  # fmt: skip
        module.train()
        optimizer = torch.optim.Adam(module.parameters(), lr=0.01)
        for _ in range(30):
            loss, parts = module.mutual_learning_loss(word_batch)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
        return parts["frame_entropy"].item(), parts["basis_used"].item()

    spread, _ = trained_frame_entropy(0.0)
    sharp, used = trained_frame_entropy(1.0)
    assert sharp < spread - 0.1, (sharp, spread)
    assert used > 4  # still more than half of the 8 vectors in use over the batch


def test_the_pretrained_encoder_learns_at_its_share_of_the_rate(word_list):
    module = CrossModalMutualLearning(
        words=str(word_list), encoder=SMALL, codebook_size=8, encoder_lr_scale=0.1, lr=1e-3, total_steps=10
    )
    optimizer = module.configure_optimizers()["optimizer"]
    rate = {id(p): g["lr"] for g in optimizer.param_groups for p in g["params"]}
    encoder = [rate[id(p)] for p in module.encoder.parameters() if p.requires_grad]
    rest = [rate[id(p)] for n, p in module.named_parameters() if p.requires_grad and not n.startswith("encoder.")]
    assert len(set(rest)) == 1  # the heads and the codebook at the (warming-up) rate, the encoder at a tenth
    assert encoder == pytest.approx([0.1 * rest[0]] * len(encoder))


def test_word_list_is_per_language_and_read_back(word_list, tmp_path):
    words = read_words(word_list)
    assert words == sorted(words) and {w.split("/")[0] for w in words} == {"en", "es", "fr"}
    (tmp_path / "bad.txt").write_text("dog\n")
    with pytest.raises(ValueError, match="lang/label"):
        read_words(tmp_path / "bad.txt")


class Losses:
    """Training losses of a fit, recorded by a callback."""

    def __init__(self):
        import lightning as L

        history = self.history = []

        class Record(L.Callback):
            def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx):
                history.append(float(outputs["loss"]))

        self.callback = Record()

    def fell(self, window: int = 8) -> tuple[float, float]:
        return sum(self.history[:window]) / window, sum(self.history[-window:]) / window


@pytest.mark.slow
def test_word_classification_learns_with_codebook_and_alignment(tiny_corpus, word_list, cpu_trainer):
    """Overfitting the training clips: both modalities' losses fall and training accuracy beats chance."""
    torch.manual_seed(0)
    train = shards(tiny_corpus, "words", "train")
    module = CrossModalMutualLearning(
        words=str(word_list), encoder=SMALL, codebook_size=16, lambda_ling=0.1, lambda_pred=0.1, lr=3e-3,
        warmup_steps=5, total_steps=80,
    )  # fmt: skip
    data = AVDataModule(train_shards=train, val_shards=train, max_frames=29 * 16, train_batches_per_epoch=20,
                        num_workers=0, seed=0)  # fmt: skip
    losses = Losses()
    trainer = cpu_trainer(max_epochs=4, callbacks=[losses.callback])
    trainer.fit(module, datamodule=data)
    first, last = losses.fell()
    assert last < 0.9 * first, (first, last)
    chance = 1 / len(module.words)
    assert float(trainer.callback_metrics["val/acc_audio"]) > 2 * chance, trainer.callback_metrics
    assert "val/ling_align" in trainer.callback_metrics and "val/acc_video" in trainer.callback_metrics
    assert 1.0 <= float(trainer.callback_metrics["val/basis_used"]) <= len(module.codebook.basis)


@pytest.mark.slow
def test_sentence_ctc_task_learns_and_reports_wer_per_input(tiny_corpus, tmp_path, cpu_trainer):
    torch.manual_seed(0)
    train = shards(tiny_corpus, "sentences", "train")
    model = train_sentencepiece(train, tmp_path / "spm.model", vocab_size=40)
    module = CrossModalMutualLearning(
        task="sentences", spm_model=str(model), encoder=SMALL, codebook_size=16, lambda_ling=0.1, lambda_pred=0.1,
        lr=3e-3, warmup_steps=5, total_steps=60,
    )  # fmt: skip
    data = AVDataModule(train_shards=train, val_shards=train, max_frames=400, train_batches_per_epoch=15,
                        num_workers=0, seed=0)  # fmt: skip
    losses = Losses()
    trainer = cpu_trainer(max_epochs=4, callbacks=[losses.callback])
    trainer.fit(module, datamodule=data)
    first, last = losses.fell(6)
    assert last < 0.8 * first, (first, last)
    for name in ("audio", "video", "av"):
        assert float(trainer.callback_metrics[f"val/wer_{name}"]) >= 0.0
        assert float(trainer.callback_metrics[f"val/cer_{name}"]) >= 0.0
    # best path: repeats merged, blanks dropped, padding ignored
    a, b = 5, 7
    path = torch.tensor([a, a, module.blank, b, b, a, a])
    log_probs = torch.nn.functional.one_hot(path, module.blank + 1).float().log_softmax(-1)[None]
    assert module.greedy_decode(log_probs, torch.tensor([5])) == [module.pieces.decode([a, b])]


@pytest.fixture(scope="module")
def face_renderer(tmp_path_factory) -> Path:
    """A tiny face renderer checkpoint, untrained but with batch-norm statistics of real-range inputs (at their
    initial values an eval-mode renderer saturates and passes no gradient back to its units)."""
    from test_av2av import save_stage

    from av2av_lightning.face_rendering import FaceRendering

    torch.manual_seed(0)
    stage = FaceRendering("tiny", {"num_units": 12})
    with torch.no_grad():
        for _ in range(20):
            faces = torch.rand(8, 3, 96, 96)
            stage.model(faces, faces.roll(1, 0), torch.randint(0, 12, (8, 2 * stage.model.config.window)))
    return save_stage(stage, tmp_path_factory.mktemp("renderer") / "face.ckpt")


@pytest.mark.parametrize("delta", ["baseline", "codebook", "full", "full_confident", "full_rec"])
def test_ablation_configs_build_the_published_rows(delta, word_list, face_renderer):
    """Each ablation delta over the tiny config gives the row's module."""
    import yaml

    root = Path(__file__).parents[1] / "experiments"
    base = yaml.safe_load((root / "mutual_learning/tiny_words.yaml").read_text())["model"]["init_args"]
    delta_config = yaml.safe_load((root / f"ablations/mutual_learning/{delta}.yaml").read_text())
    row = delta_config["model"]["init_args"]
    args = {**base, **row, "words": str(word_list), "pretrained": None, "encoder": SMALL}
    if "renderer" in row:
        args["renderer"] = str(face_renderer)
    module = CrossModalMutualLearning(**args)
    assert (module.codebook is None) == (delta == "baseline")
    assert module.hparams.codebook_residual == (delta != "baseline")
    assert module.hparams.lambda_ling == row["lambda_ling"]
    assert (module.renderer is not None) == (delta == "full_rec")
    assert delta_config.get("data", {}).get("load_face", False) == (delta == "full_rec")


@pytest.mark.parametrize("delta", ["baseline", "codebook", "full", "full_confident"])
def test_sentence_config_takes_the_same_ablation_rows(delta, tiny_corpus, tmp_path):
    """The CTC recogniser config (also the project's transcriber) builds a sentences module under each row."""
    import yaml

    root = Path(__file__).parents[1] / "experiments"
    config = yaml.safe_load((root / "mutual_learning/tiny_sentences.yaml").read_text())
    row = yaml.safe_load((root / f"ablations/mutual_learning/{delta}.yaml").read_text())["model"]["init_args"]
    spm = train_sentencepiece(shards(tiny_corpus, "sentences", "train"), tmp_path / "spm.model", vocab_size=40)
    args = {**config["model"]["init_args"], **row, "spm_model": str(spm), "pretrained": None, "encoder": SMALL}
    module = CrossModalMutualLearning(**args)
    assert module.hparams.task == "sentences" and module.blank == 40
    assert (module.codebook is None) == (delta == "baseline")
    assert config["data"]["train_shards"].endswith("sentences/train-*.tar")


def test_soft_unit_windows_render_one_hot_units_as_their_ids():
    """The differentiable path of L_rec: one-hot unit distributions give the renderer exactly what unit ids give."""
    from av2av_lightning.models.face_renderer import FaceRenderer, FaceRendererConfig, soft_unit_windows, unit_windows

    torch.manual_seed(0)
    renderer = FaceRenderer(FaceRendererConfig.preset("tiny", num_units=7)).eval()
    units = torch.randint(0, 7, (2, 12))  # 6 frames of 50 Hz units
    ids = unit_windows(units, 6, renderer.config.window, pad=7)
    soft = soft_unit_windows(torch.nn.functional.one_hot(units, 7).float(), 6, renderer.config.window)
    assert soft.shape == (*ids.shape, 7)
    assert torch.equal(soft.argmax(-1)[ids != 7], ids[ids != 7]) and bool((soft.sum(-1) == 0).eq(ids == 7).all())
    faces = torch.rand(12, 3, 96, 96)
    with torch.no_grad():
        by_ids = renderer(faces, faces.flip(0), ids.reshape(12, -1))
        by_soft = renderer(faces, faces.flip(0), soft.reshape(12, -1, 7))
    torch.testing.assert_close(by_soft, by_ids)


def test_reconstruction_through_the_frozen_renderer_trains_the_encoder_not_the_renderer(
    tiny_corpus, word_list, face_renderer
):
    """+ L_rec on one batch: the redrawn faces' L1 falls as the encoder and the unit head learn; the renderer, whose
    batch-norm statistics are part of it, stays fixed and in eval mode. (An untrained renderer draws little from its
    units, so the fall is small; what it redraws is the point.)"""
    torch.manual_seed(0)
    module = CrossModalMutualLearning(
        words=str(word_list), encoder=SMALL, codebook_size=16, lambda_ling=0.1, lambda_pred=0.1, lambda_rec=1.0,
        renderer=str(face_renderer),
    )  # fmt: skip
    data = AVDataModule(val_shards=shards(tiny_corpus, "words", "train"), max_frames=29 * 4, num_workers=0,
                        load_face=True, words=str(word_list))  # fmt: skip
    data.setup("validate")
    batch = next(iter(data.val_dataloader()))
    renderer_before = {k: v.clone() for k, v in module.renderer.state_dict().items()}
    module.train()
    optimizer = torch.optim.Adam([p for p in module.parameters() if p.requires_grad], lr=3e-3)
    history = []
    for _ in range(25):
        torch.manual_seed(1)  # the same frames and references every step
        loss, parts = module.mutual_learning_loss(batch)
        optimizer.zero_grad()
        parts["rec"].backward()
        optimizer.step()
        history.append(float(parts["rec"]))
    assert module.unit_head.weight.grad.abs().sum() > 0
    assert module.encoder.encoder.layers[0].fc1.weight.grad.abs().sum() > 0
    assert not module.renderer.training and all(p.grad is None for p in module.renderer.parameters())
    assert all(torch.equal(renderer_before[k], v) for k, v in module.renderer.state_dict().items())
    assert history[-1] < history[0], history
    assert torch.isfinite(loss)


def test_reconstruction_needs_a_renderer_and_faces(word_list, face_renderer):
    with pytest.raises(ValueError, match="set renderer to a FaceRendering checkpoint"):
        CrossModalMutualLearning(words=str(word_list), encoder=SMALL, lambda_rec=1.0)
    with pytest.raises(FileNotFoundError):
        CrossModalMutualLearning(words=str(word_list), encoder=SMALL, lambda_rec=1.0, renderer="missing.ckpt")


def test_a_reconstruction_checkpoint_loads_for_recognition_without_its_renderer(word_list, face_renderer, tmp_path):
    """The renderer of + L_rec is a training aid read from its file: a recogniser loads without it, same outputs."""
    import shutil

    from test_av2av import save_stage

    from av2av_lightning.transcribers import load_recogniser

    renderer = shutil.copy(face_renderer, tmp_path / "face.ckpt")
    torch.manual_seed(0)
    module = CrossModalMutualLearning(
        words=str(word_list), encoder=SMALL, codebook_size=8, lambda_rec=1.0, renderer=str(renderer)
    ).eval()
    checkpoint = save_stage(module, tmp_path / "words.ckpt")
    Path(renderer).unlink()
    recogniser = load_recogniser(checkpoint, task="words").module
    assert recogniser.renderer is None and recogniser.unit_head is None
    features, padding = torch.randn(2, 7, SMALL["embed_dim"]), torch.zeros(2, 7, dtype=torch.bool)
    with torch.no_grad():
        torch.testing.assert_close(recogniser.recognise(features, padding), module.recognise(features, padding))
