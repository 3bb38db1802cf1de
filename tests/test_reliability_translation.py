"""Reliability of the translation stage: SIGKILL mid-epoch, resume from ``last``, same weights and metrics."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from test_ddp_translation import TRANSLATOR, write_split
from test_reliability import kill_then_resume, load_checkpoint, metrics, trainer_settings, weights

from av2av_lightning.data.unit_pairs import UnitPairDataModule

LANGUAGES = ("en", "es", "fr")


@pytest.fixture(scope="module")
def unit_data(tmp_path_factory) -> dict:
    """30 training pairs (5 sentences x 6 directions: 4 batches of 8 per epoch) and 12 validation pairs."""
    folder, rng = tmp_path_factory.mktemp("resume_units"), np.random.default_rng(0)
    train_shards, train_units = write_split(folder, "train", {f"t{i}": LANGUAGES for i in range(5)}, rng)
    val_shards, val_units = write_split(folder, "valid", {f"v{i}": LANGUAGES for i in range(2)}, rng)
    return {
        "train_shards": train_shards,
        "train_units": str(train_units),
        "val_shards": val_shards,
        "val_units": str(val_units),
        "batch_size": 8,
        "num_workers": 1,  # workers draw indices as soon as their pass starts: what resuming broke
    }


def translation_config(root: Path, unit_data: dict) -> dict:
    """A few-second translator run with dropout on (its draws come from the reliability callback's seeds)."""
    translator = {**TRANSLATOR, "dropout": 0.1, "attention_dropout": 0.1}
    return {
        "seed_everything": 0,
        "trainer": trainer_settings(root),
        "model": {
            "class_path": "av2av_lightning.translation.UnitTranslation",
            "init_args": {"preset": "tiny", "translator": translator, "lr": 3e-3, "warmup_steps": 2, "beam_size": 2},
        },
        "data": {"class_path": "av2av_lightning.data.unit_pairs.UnitPairDataModule", "init_args": unit_data},
    }


def test_training_order_is_a_function_of_the_epoch_alone(unit_data):
    """A fresh data module (a resumed run) shuffles epoch 1 as the one that went through epoch 0, even when its
    iterator was made before ``set_epoch``."""

    def order(batches) -> list[str]:
        return [f"{i}:{s}-{t}" for b in batches for i, s, t in zip(b.sentence_ids, b.src_langs, b.tgt_langs)]

    loader = UnitPairDataModule(**unit_data).train_dataloader()
    epochs = []
    for epoch in range(2):
        loader.sampler.set_epoch(epoch)  # as Lightning's fit loop does at each epoch start
        epochs.append(order(loader))
    fresh = UnitPairDataModule(**unit_data).train_dataloader()
    passes = iter(fresh)  # Lightning's first iter() (with a worker) comes before a resumed run's set_epoch(1)
    fresh.sampler.set_epoch(1)
    assert order(passes) == epochs[1] != epochs[0]
    assert sorted(epochs[0]) == sorted(epochs[1]) and len(set(epochs[0])) == 30  # each pair once per epoch
    other = UnitPairDataModule(**{**unit_data, "seed": 1}).train_dataloader()
    other.sampler.set_epoch(1)
    assert order(other) != epochs[1]


@pytest.mark.slow
def test_sigkill_mid_epoch_then_resume_gives_the_same_weights_and_metrics(unit_data, tmp_path):
    straight, killed, _, start = kill_then_resume(lambda root: translation_config(root, unit_data), tmp_path)
    assert start["av2av_stage"] == "translation"
    final, again = weights(straight / "ckpt" / "last.ckpt"), weights(killed / "ckpt" / "last.ckpt")
    assert load_checkpoint(straight / "ckpt" / "last.ckpt")["global_step"] == 8
    assert final.keys() == again.keys()
    assert all(torch.equal(final[name], again[name]) for name in final)
    assert not all(torch.equal(final[n], start["state_dict"][n]) for n in final)  # the resumed run trained
    reference, replay = metrics(straight, 0), metrics(killed, 1)
    after_resume = {key: value for key, value in reference.items() if int(key[0]) >= 4}
    assert replay == after_resume
    assert {"train/loss", "val/loss", "val/unit_bleu"} <= {name for _, name in replay}
