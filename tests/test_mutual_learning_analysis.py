"""Mutual-learning analysis: encoders of either stage, sound-alike pairs, basis-weight KL, unit agreement, figures."""

from __future__ import annotations

import csv

import matplotlib.image
import pytest
import torch

from av2av_lightning.checkpoints import STAGE_KEY, load_avhubert, load_encoder
from av2av_lightning.data.datamodule import AVDataModule
from av2av_lightning.data.schema import SampleMeta
from av2av_lightning.models.codebook import symmetric_kl
from av2av_lightning.mutual_learning import CrossModalMutualLearning
from av2av_lightning.pretraining import AVHubertPretraining
from av2av_lightning.transcribers import load_recogniser
from data_prep.clustering.cli import add_arguments
from data_prep.vocab import count_words, top_words
from evaluation import mutual_learning_analysis as analysis
from evaluation.recognition import split_batches

SMALL = {"embed_dim": 64, "layers": 2, "ffn_dim": 128, "heads": 2, "resnet_width": 8, "dropout": 0.0}


def word_shards(corpus, split: str) -> list[str]:
    out, manifest = corpus
    return [str(out / p) for p in manifest["subsets"]["words"][split]["shards"]]


def read_csv(path) -> list[dict[str, str]]:
    with open(path, newline="") as handle:
        return list(csv.DictReader(handle))


def save_as_lightning_would(module, path):
    """The checkpoint ``trainer.save_checkpoint`` writes, as far as loading an encoder needs it."""
    checkpoint = {"state_dict": module.state_dict(), "hyper_parameters": dict(module.hparams)}
    module.on_save_checkpoint(checkpoint)
    torch.save(checkpoint, path)
    return path


@pytest.fixture(scope="module")
def word_list(tiny_corpus, tmp_path_factory):
    words = top_words(count_words(word_shards(tiny_corpus, "train")), per_language=10)
    path = tmp_path_factory.mktemp("vocab") / "words.txt"
    path.write_text("".join(f"{w}\n" for w in words))
    return path


@pytest.fixture(scope="module")
def pretrained(tmp_path_factory):
    torch.manual_seed(0)
    module = AVHubertPretraining(encoder={**SMALL, "num_classes": [8]})
    return module, save_as_lightning_would(module, tmp_path_factory.mktemp("pretrain") / "pretrain.ckpt")


@pytest.fixture(scope="module")
def trained(tiny_corpus, word_list, pretrained, tmp_path_factory, cpu_trainer):
    """A codebook model with both alignments, started from the pretraining checkpoint and trained 8 steps."""
    torch.manual_seed(0)
    module = CrossModalMutualLearning(
        words=str(word_list), pretrained=str(pretrained[1]), codebook_size=16, lambda_ling=0.1, lambda_pred=0.1,
        lr=3e-3, warmup_steps=2, total_steps=8,
    )  # fmt: skip
    train = word_shards(tiny_corpus, "train")
    data = AVDataModule(train_shards=train, max_frames=29 * 16, train_batches_per_epoch=8, num_workers=0, seed=0)
    trainer = cpu_trainer(max_steps=8)
    trainer.fit(module, datamodule=data)
    path = tmp_path_factory.mktemp("mutual") / "full.ckpt"
    trainer.save_checkpoint(path)
    return path, train[:2]


def test_load_encoder_reads_pretraining_and_mutual_learning_checkpoints(pretrained, word_list, tmp_path):
    module, path = pretrained
    for loaded in (load_encoder(path), load_avhubert(path)):
        assert loaded.state_dict().keys() == module.model.state_dict().keys()
        assert all(torch.equal(v, module.model.state_dict()[k]) for k, v in loaded.state_dict().items())
    torch.manual_seed(1)
    mutual = CrossModalMutualLearning(words=str(word_list), pretrained=str(path), codebook_size=4)
    with torch.no_grad():
        mutual.encoder.final_proj.weight.add_(1.0)  # differs from the pretrained encoder it started from
    encoder = load_encoder(save_as_lightning_would(mutual, tmp_path / "mutual.ckpt"))
    assert all(torch.equal(v, mutual.encoder.state_dict()[k]) for k, v in encoder.state_dict().items())
    assert not encoder.training and encoder.config.embed_dim == SMALL["embed_dim"]
    with pytest.raises(ValueError, match="expected 'pretraining'"):
        load_avhubert(tmp_path / "mutual.ckpt")  # unchanged: only pretraining checkpoints
    other = torch.load(path, weights_only=True)
    other[STAGE_KEY] = "translation"
    torch.save(other, tmp_path / "other.ckpt")
    with pytest.raises(ValueError) as err:
        load_encoder(tmp_path / "other.ckpt")
    assert str(err.value) == f"{tmp_path / 'other.ckpt'}: a checkpoint of stage 'translation', expected " + (
        "'pretraining' or 'mutual_learning'"
    )


def test_mutual_learning_starts_from_a_mutual_learning_checkpoint(pretrained, word_list, tmp_path):
    """The demo's chain: an audio-only recogniser first, then mutual learning from its encoder."""
    _, path = pretrained
    audio_first = CrossModalMutualLearning(words=str(word_list), pretrained=str(path), modalities=["audio"])
    with torch.no_grad():
        audio_first.encoder.encoder.layers[0].fc1.weight.add_(1.0)  # what the audio-only run learned
    saved = save_as_lightning_would(audio_first, tmp_path / "audio.ckpt")
    mutual = CrossModalMutualLearning(words=str(word_list), pretrained=str(saved), lambda_pred=0.1)
    expected = audio_first.encoder.state_dict()
    assert all(torch.equal(v, expected[k]) for k, v in mutual.encoder.state_dict().items())
    assert mutual.encoder.training and mutual.encoder.config.modality_dropout == 0.0


def test_cluster_layer_accepts_a_mutual_learning_checkpoint(pretrained, word_list, tiny_corpus, tmp_path):
    import argparse

    parser = argparse.ArgumentParser()
    add_arguments(parser.add_subparsers(dest="command"))
    path = save_as_lightning_would(
        CrossModalMutualLearning(words=str(word_list), pretrained=str(pretrained[1])), tmp_path / "m.ckpt"
    )
    shards = word_shards(tiny_corpus, "valid")[0]
    args = parser.parse_args(["cluster", "layer", "--checkpoint", str(path), "--layer", "1", "--shards", shards,
                              "--k", "3", "--sample-fraction", "1", "--out", str(tmp_path / "km"), "--quiet"])  # fmt: skip
    args.handler(args)
    assert (tmp_path / "km" / "kmeans.npz").is_file() and (tmp_path / "km" / "train.km3.npz").is_file()


def test_sound_alike_pairs_on_hand_made_transcriptions():
    words = {
        "en/cat": ["k", "æ", "t"],
        "en/bat": ["b", "æ", "t"],
        "en/dog": ["d", "ɒ", "ɡ"],
        "en/fog": ["f", "ɒ", "ɡ"],
        "en/elephant": ["ɛ", "l", "ɪ", "f", "ə", "n", "t"],
        "en/knight": ["n", "aɪ", "t"],
        "en/night": ["n", "aɪ", "t"],
    }
    assert analysis.edit_distance("kitten", "sitting") == 3 and analysis.edit_distance([], ["a"]) == 1
    assert analysis.phoneme_distance(words["en/elephant"], words["en/fog"]) == pytest.approx(6 / 7)
    alike, unlike = analysis.sound_alike_pairs(words, 2)
    # one phoneme apart (1/3); the homophones knight/night (distance 0) are not a pair to compare
    assert alike == [("en/bat", "en/cat"), ("en/dog", "en/fog")]
    # nothing in common (distance 1), first by name, each word once: not bat with both dog and fog
    assert unlike == [("en/bat", "en/dog"), ("en/cat", "en/fog")]
    with pytest.raises(ValueError, match="at least 2 words"):
        analysis.sound_alike_pairs({"en/knight": ["n"], "en/night": ["n"]}, 3)


def test_word_phonemes_come_from_the_labelled_words_span():
    meta = SampleMeta(
        key="k", split="valid", lang="fr", speaker="s", text="", sentence_id="s", num_frames=29, kind="word",
        label="oiseau", words=[("le", 0.0, 0.2), ("l'oiseau", 0.4, 0.8)],
        phonemes=[("l", 0.0, 0.1), ("ə", 0.1, 0.2), ("l", 0.4, 0.45), ("w", 0.45, 0.6), ("a", 0.6, 0.7), ("z", 0.7, 0.8),
                  ("o", 0.8, 0.9)],
    )  # fmt: skip
    assert analysis.word_phonemes(meta) == ("l", "w", "a", "z")
    assert analysis.transcriptions([meta, meta]) == {"fr/oiseau": ("l", "w", "a", "z")}
    assert analysis.word_phonemes(SampleMeta(key="k", lang="en", speaker="s", text="", split="", sentence_id="s",
                                             num_frames=29, kind="word", label="cat")) == ()  # fmt: skip


@pytest.mark.slow
def test_symmetric_kl_and_word_weights_equal_a_direct_computation(trained):
    path, shards = trained
    recogniser = load_recogniser(path)
    stats = analysis.analyse(recogniser.module, split_batches(shards, recogniser))
    module = recogniser.module
    audio, video, counts = [], [], {}
    with torch.no_grad():
        for batch in split_batches(shards, recogniser):
            valid = ~batch.padding_mask
            audio.append(module.codebook.log_weights(module.features(batch, True, False))[valid])
            video.append(module.codebook.log_weights(module.features(batch, False, True))[valid])
            for meta in batch.meta:
                counts[f"{meta.lang}/{meta.label}"] = counts.get(f"{meta.lang}/{meta.label}", 0) + 1
    direct = symmetric_kl(torch.cat(audio), torch.cat(video))
    assert stats.symmetric_kl == pytest.approx(float(direct), rel=1e-5) and stats.symmetric_kl > 0
    assert dict(stats.clips) == counts and len(stats.metas) == sum(counts.values())
    word = analysis.choose_word(stats, None)
    assert stats.clips[word] == max(counts.values())
    for modality in ("audio", "video"):
        assert stats.mean_weights(word, modality).sum() == pytest.approx(1.0)
    assert 0.0 <= stats.accuracy["audio"] <= 1.0 and 0.0 <= stats.accuracy["video"] <= 1.0


@pytest.mark.slow
def test_unit_agreement_is_one_for_the_same_input_and_a_fraction_otherwise(trained):
    path, shards = trained
    encoder = load_encoder(path)
    same = analysis.unit_agreement(encoder, shards, layer=1, k=4, inputs=("audio", "audio"))
    assert same == 1.0
    cross = analysis.unit_agreement(encoder, shards, layer=1, k=4)
    assert 0.0 <= cross <= 1.0


@pytest.mark.slow
def test_command_writes_both_figures_and_the_tables(trained, pretrained, tmp_path, capsys):
    path, shards = trained
    args = ["--checkpoint", str(path), "--baseline-checkpoint", str(path), "--pretrained", str(pretrained[1]),
            "--shards", *shards, "--out", str(tmp_path), "--k", "4", "--pairs", "3", "--wandb", "test"]  # fmt: skip
    assert analysis.main(args) == 0
    for name in ("basis_weights", "basis_pca"):
        image = matplotlib.image.imread(tmp_path / f"{name}.png")
        assert image.ndim == 3 and image.shape[0] > 100
    rows = read_csv(tmp_path / "mutual_learning.csv")
    assert [row["model"] for row in rows] == ["aligned", "baseline"]
    assert rows[0]["sym_kl_av"] == rows[1]["sym_kl_av"] and float(rows[0]["sym_kl_av"]) > 0
    for column in ("acc_audio", "acc_video", "shared_basis_sound_alike", "shared_basis_not_alike"):
        assert 0.0 <= float(rows[0][column]) <= 1.0
    agreement = read_csv(tmp_path / "unit_agreement.csv")
    assert [row["encoder"] for row in agreement] == ["aligned", "pretrained"]
    assert all(0.0 <= float(row["agreement_a_v"]) <= 1.0 for row in agreement)
    assert (tmp_path / "mutual_learning.md").read_text().startswith("| model | checkpoint |")
    assert list((tmp_path / "wandb").glob("offline-run-*"))  # offline by default, nothing waits on a server


def test_bad_input_is_a_one_line_error(pretrained, tmp_path, capsys):
    assert analysis.main(["--checkpoint", str(tmp_path / "none.ckpt"), "--shards", "x", "--out", str(tmp_path)]) == 2
    assert analysis.main(["--checkpoint", str(pretrained[1]), "--shards", str(pretrained[1]), "--out", str(tmp_path)])
    errors = capsys.readouterr().err.strip().splitlines()
    assert len(errors) == 2 and all(line.startswith("mutual_learning_analysis: error:") for line in errors)
    assert "expected 'mutual_learning'" in errors[1]
