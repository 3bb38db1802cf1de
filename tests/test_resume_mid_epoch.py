"""Exact resume from a mid-epoch checkpoint: training loaders save their position (epoch, batches yielded) and a
restored one continues with the batch that would have come next; SIGKILL after a mid-epoch save, then resume."""

from __future__ import annotations

import hashlib
import itertools
from pathlib import Path

import numpy as np
import pytest
import torch
from test_ddp_translation import write_split
from test_reliability import kill_then_resume, metrics, weights

from av2av_lightning.data.datamodule import AVDataModule
from av2av_lightning.data.unit_pairs import UnitPairDataModule

BATCHES = 5  # per epoch


def av_data(av_shards, workers: int, persistent: bool = False) -> dict:
    """Random crops, flips and babble noise (a reservoir of earlier utterances): a skip must replay them all."""
    return dict(
        persistent_workers=persistent,
        train_shards=av_shards.pattern,
        max_frames=100,
        max_sample_frames=24,
        train_batches_per_epoch=BATCHES,
        num_workers=workers,
        noise_prob=0.7,
        noise_snr_db=(0.0, 10.0),
        buffer_size=8,
        seed=3,
    )


def signature(batch) -> tuple:
    """Sample keys and a digest of every tensor: equal signatures mean the same samples, crops and noise."""
    tensors = (batch.audio, batch.video, batch.wave, batch.noisy_wave, batch.face)
    digest = hashlib.sha1(b"".join(t.numpy().tobytes() for t in tensors if t is not None)).hexdigest()
    return tuple(batch.keys), digest


def unit_signature(batch) -> tuple:
    return tuple(f"{i}:{s}-{t}" for i, s, t in zip(batch.sentence_ids, batch.src_langs, batch.tgt_langs))


@pytest.mark.parametrize(
    ("workers", "consumed", "persistent"), [(0, 2, False), (1, 3, False), (2, 1, False), (2, 4, False), (2, 3, True)]
)
def test_a_restored_av_loader_continues_with_the_next_batch(av_shards, workers, consumed, persistent):
    straight = AVDataModule(**av_data(av_shards, workers, persistent)).train_dataloader()
    epochs = [[signature(b) for b in straight] for _ in range(2)]
    assert len(epochs[0]) == BATCHES and epochs[0] != epochs[1]

    interrupted = AVDataModule(**av_data(av_shards, workers, persistent))
    taken = [signature(b) for b in itertools.islice(interrupted.train_dataloader(), consumed)]
    assert taken == epochs[0][:consumed]
    state = interrupted.state_dict()
    assert state == {"train_position": {"epoch": 0, "batches": consumed}}

    resumed = AVDataModule(**av_data(av_shards, workers, persistent))
    resumed.load_state_dict(state)  # Lightning restores a data module before it asks for the loaders
    loader = resumed.train_dataloader()
    assert [signature(b) for b in loader] == epochs[0][consumed:]
    assert loader.state_dict() == {"epoch": 0, "batches": BATCHES}
    assert [signature(b) for b in loader] == epochs[1]  # the next epoch skips nothing


def test_a_loader_restored_after_iter_still_skips(av_shards):
    """Lightning calls ``iter()`` first and ``load_state_dict`` after (when it builds the loader before restoring)."""
    straight = [signature(b) for b in AVDataModule(**av_data(av_shards, 1)).train_dataloader()]
    loader = AVDataModule(**av_data(av_shards, 1)).train_dataloader()
    passes = iter(loader)
    loader.load_state_dict({"epoch": 0, "batches": 2})
    assert [signature(b) for b in passes] == straight[2:]


def test_a_position_of_another_epoch_skips_nothing(av_shards):
    """An end-of-epoch checkpoint: the resumed run's next pass is the next epoch, which starts at its beginning."""
    straight = AVDataModule(**av_data(av_shards, 0)).train_dataloader()
    epoch_one = [[signature(b) for b in straight] for _ in range(2)][1]
    loader = AVDataModule(**av_data(av_shards, 0)).train_dataloader()
    loader.epoch_source = lambda: 1  # the trainer's current epoch after an end-of-epoch checkpoint of epoch 0
    loader.load_state_dict({"epoch": 0, "batches": BATCHES})
    assert [signature(b) for b in loader] == epoch_one


def test_only_training_passes_skip(av_shards):
    dataset = AVDataModule(val_shards=av_shards.pattern, num_workers=0).build_dataset("val")
    with pytest.raises(ValueError, match="only training passes skip batches"):
        dataset.skip_batches(2)


@pytest.fixture(scope="module")
def unit_data(tmp_path_factory) -> dict:
    """30 training pairs (5 sentences x 6 directions: 4 batches of 8 per epoch) and 12 validation pairs."""
    folder, rng = tmp_path_factory.mktemp("mid_epoch_units"), np.random.default_rng(0)
    languages = ("en", "es", "fr")
    train_shards, train_units = write_split(folder, "train", {f"t{i}": languages for i in range(5)}, rng)
    val_shards, val_units = write_split(folder, "valid", {f"v{i}": languages for i in range(2)}, rng)
    return dict(
        train_shards=train_shards,
        train_units=str(train_units),
        val_shards=val_shards,
        val_units=str(val_units),
        batch_size=8,
        num_workers=1,
    )


@pytest.mark.parametrize(("workers", "consumed"), [(0, 1), (1, 3)])
def test_a_restored_unit_pair_loader_continues_with_the_next_batch(unit_data, workers, consumed):
    loader = UnitPairDataModule(**{**unit_data, "num_workers": workers}).train_dataloader()
    passes = iter(loader)  # before set_epoch, as Lightning does
    loader.sampler.set_epoch(1)
    straight = [unit_signature(b) for b in passes]
    assert len(straight) == 4

    interrupted = UnitPairDataModule(**{**unit_data, "num_workers": workers})
    loader = interrupted.train_dataloader()
    loader.sampler.set_epoch(1)
    assert [unit_signature(b) for b in itertools.islice(loader, consumed)] == straight[:consumed]
    state = interrupted.state_dict()
    assert state == {"train_position": {"epoch": 1, "batches": consumed}}

    resumed = UnitPairDataModule(**{**unit_data, "num_workers": workers})
    resumed.load_state_dict(state)
    loader = resumed.train_dataloader()
    passes = iter(loader)
    loader.sampler.set_epoch(1)
    assert [unit_signature(b) for b in passes] == straight[consumed:]
    loader.sampler.set_epoch(2)
    epoch_two = [unit_signature(b) for b in loader]  # whole, in its own order
    assert epoch_two != straight and sorted(sum(epoch_two, ())) == sorted(sum(straight, ()))


# ---------------------------------------------------------------------------- SIGKILL after a mid-epoch save


def kill_then_resume_mid_epoch(config_of, tmp_path: Path, save_every: int = 5, kill_at: int = 7) -> tuple:
    """`test_reliability.kill_then_resume` from a step checkpoint written mid-epoch (with 4-step epochs step 5 is
    after the first batch of epoch 1), whose saved loader position is checked. Returns (straight root, killed root,
    start checkpoint)."""
    straight, killed, _, start = kill_then_resume(config_of, tmp_path, kill_at, save_every)
    assert start["epoch"] == 1  # mid-epoch 1
    position = {"epoch": 1, "batches": save_every - 4}
    assert start["loops"]["fit_loop"]["state_dict"]["combined_loader"] == [position]  # Lightning's own copy
    assert [v["train_position"] for k, v in start.items() if k.endswith("DataModule")] == [position]  # ours
    return straight, killed, start


def assert_same_run(straight: Path, killed: Path, start: dict, resumed_at: int) -> dict:
    final, again = weights(straight / "ckpt" / "last.ckpt"), weights(killed / "ckpt" / "last.ckpt")
    assert final.keys() == again.keys()
    assert all(torch.equal(final[name], again[name]) for name in final)
    assert not all(torch.equal(final[n], start["state_dict"][n]) for n in final)  # the resumed run trained
    reference, replay = metrics(straight, 0), metrics(killed, 1)
    after_resume = {key: value for key, value in reference.items() if int(key[0]) >= resumed_at}
    assert replay == after_resume
    return replay


@pytest.fixture(scope="module")
def pretraining(tiny_corpus, tmp_path_factory):
    from test_reliability import frames_of, pretraining_config, write_labels

    out, manifest = tiny_corpus

    def shards(split: str) -> list[str]:
        return [str(out / p) for p in manifest["subsets"]["sentences"][split]["shards"]]

    folder = tmp_path_factory.mktemp("mid_epoch")
    labels = [str(write_labels(folder / f"{s}.npz", frames_of(shards(s)))) for s in ("train", "valid")]

    def config_of(root: Path) -> dict:
        config = pretraining_config(root, shards("train"), shards("valid"), labels)
        config["data"].update(num_workers=2)  # step 5 is an odd batch count: the workers swap roles on resume
        return config

    return config_of


@pytest.mark.slow
def test_sigkill_after_a_mid_epoch_checkpoint_then_resume_gives_the_same_pretraining_run(pretraining, tmp_path):
    straight, killed, start = kill_then_resume_mid_epoch(pretraining, tmp_path)
    replay = assert_same_run(straight, killed, start, resumed_at=5)
    assert {"train/loss", "val/loss"} <= {name for _, name in replay}


@pytest.mark.slow
def test_sigkill_after_a_mid_epoch_checkpoint_then_resume_gives_the_same_translation_run(unit_data, tmp_path):
    from test_reliability_translation import translation_config

    straight, killed, start = kill_then_resume_mid_epoch(lambda root: translation_config(root, unit_data), tmp_path)
    replay = assert_same_run(straight, killed, start, resumed_at=5)
    assert {"train/loss", "val/loss", "val/unit_bleu"} <= {name for _, name in replay}
