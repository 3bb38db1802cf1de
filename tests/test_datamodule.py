"""The shared data pipeline: batches, bucketing, sidecars, distributed splits, corrupt samples."""

from __future__ import annotations

import logging
import math
import random
from collections import Counter

import numpy as np
import pytest
import torch
from conftest import write_set

from av2av_lightning.data.batching import AVBatch, bucket_batches, pack_by_budget
from av2av_lightning.data.datamodule import AVDataLoader, AVDataModule
from av2av_lightning.data.pipeline import AVShardDataset, resolve_shards, split_for_worker
from av2av_lightning.data.schema import SAMPLES_PER_FRAME
from av2av_lightning.data.sidecar import Sidecar, SidecarWriter

BUDGET = 100


@pytest.fixture(autouse=True)
def quiet_skips(caplog):
    caplog.set_level(logging.ERROR, logger="av2av_lightning.data.pipeline")


def eval_batches(pattern, **kwargs) -> list[AVBatch]:
    kwargs.setdefault("max_frames", BUDGET)
    return list(AVShardDataset(pattern, **kwargs))


def keys_of(batches) -> list[str]:
    return [key for batch in batches for key in batch.keys]


def write_sidecar(path, name, rate, lengths: dict[str, int], skip=()):
    """Labels whose value at label frame i is i (so alignment and crops are visible)."""
    with SidecarWriter(path, name, rate, "int16") as writer:
        for key, frames in lengths.items():
            if key not in skip:
                writer.add(key, np.arange(round(frames * rate / 25)))
    return writer.path


# ---------------------------------------------------------------------------- batches


def test_batch_shapes_dtypes_and_masks(av_shards):
    batches = eval_batches(av_shards.pattern, load_face=True)
    assert sorted(keys_of(batches)) == sorted(av_shards.keys)
    for batch in batches:
        b, t = batch.audio.shape[:2]
        assert batch.audio.shape == (b, t, 104) and batch.audio.dtype == torch.float32
        assert batch.video.shape == (b, 1, t, 88, 88) and batch.video.dtype == torch.float32
        assert batch.face.shape == (b, t, 3, 96, 96) and batch.face.min() >= 0 and batch.face.max() <= 1
        assert batch.lengths.dtype == torch.long and batch.padding_mask.dtype == torch.bool
        assert batch.padding_mask.shape == (b, t) and int(batch.lengths.max()) == t
        assert batch.wave.shape == (b, t * SAMPLES_PER_FRAME) and batch.wave.dtype == torch.float32
        assert torch.equal(batch.wave_lengths, batch.lengths * SAMPLES_PER_FRAME)
        assert batch.noisy_wave is None and torch.isinf(batch.snr_db).all()
        assert len(batch.meta) == len(batch.keys) == b and batch.num_skipped == 0
        for i, (key, meta) in enumerate(zip(batch.keys, batch.meta)):
            n = int(batch.lengths[i])
            assert meta.key == key and n == av_shards.lengths[key] == meta.num_frames
            assert not batch.padding_mask[i, :n].any() and batch.padding_mask[i, n:].all()
            assert batch.audio[i, n:].abs().sum() == 0 and batch.video[i, :, n:].abs().sum() == 0
            assert batch.wave[i, n * SAMPLES_PER_FRAME :].abs().sum() == 0
            assert batch.audio[i, :n].abs().sum(-1).min() > 0
        moved = batch.to("cpu")
        assert isinstance(moved, AVBatch) and moved.keys == batch.keys


def test_padded_size_within_budget_and_bucketing(av_shards):
    batches = eval_batches(av_shards.pattern)
    sizes = [len(b) for b in batches]
    for batch in batches:
        assert int(batch.lengths.max()) * len(batch) <= BUDGET
    # Length spread inside batches vs. random batches of the same sizes.
    lengths = list(av_shards.lengths.values())
    bucketed = np.mean([int(b.lengths.max() - b.lengths.min()) for b in batches if len(b) > 1])
    rng = random.Random(0)
    spreads = []
    for _ in range(200):
        rng.shuffle(lengths)
        start = 0
        for size in sizes:
            group = lengths[start : start + size]
            start += size
            if size > 1:
                spreads.append(max(group) - min(group))
    assert bucketed < 0.5 * np.mean(spreads)


def test_pack_by_budget_and_long_samples():
    lengths = [5, 30, 12, 50, 7, 120, 25]
    groups = pack_by_budget(lengths, 60)
    assert sorted(i for g in groups for i in g) == list(range(len(lengths)))
    for group in groups:
        longest = max(lengths[i] for i in group)
        assert longest * len(group) <= 60 or len(group) == 1
    assert [5] in groups  # the 120-frame sample is alone
    batches = list(bucket_batches(range(10), lambda x: x + 1, 20, buffer_size=4, shuffle=True, rng=random.Random(1)))
    assert sorted(x for b in batches for x in b) == list(range(10))


def test_max_sample_frames_crops_all_streams(av_shards, tmp_path):
    path = write_sidecar(tmp_path / "km", "km", 100, av_shards.lengths)
    for train in (False, True):
        dataset = AVShardDataset(
            av_shards.pattern,
            train=train,
            max_frames=BUDGET,
            max_sample_frames=12,
            batches_per_epoch=4,
            sidecars={"km": path},
            buffer_size=20,
        )
        for batch in dataset:
            assert int(batch.lengths.max()) <= 12 and batch.wave.shape[1] == 12 * SAMPLES_PER_FRAME
            labels = batch.labels["km"]
            assert labels.shape == (len(batch), 4 * batch.audio.shape[1])
            for i in range(len(batch)):
                n = int(batch.lengths[i]) * 4
                start = int(labels[i, 0])
                assert torch.equal(labels[i, :n], torch.arange(start, start + n))  # one contiguous window
                assert train or start == 0  # evaluation keeps the beginning


def test_filters_by_kind_and_language(av_shards):
    words = keys_of(eval_batches(av_shards.pattern, kinds=["word"]))
    assert words and all(av_shards.metas[k].kind == "word" for k in words)
    spanish = keys_of(eval_batches(av_shards.pattern, languages=["es"]))
    assert sorted(spanish) == sorted(k for k, m in av_shards.metas.items() if m.lang == "es")


def test_noise_augmentation_through_the_pipeline(av_shards):
    batches = eval_batches(av_shards.pattern, noise_prob=1.0, noise_snr_db=5.0, noise_types=["white"])
    for batch in batches:
        assert torch.all(batch.snr_db == 5.0)
        for i in range(len(batch)):
            n = int(batch.wave_lengths[i])
            clean, noisy = batch.wave[i, :n].double(), batch.noisy_wave[i, :n].double()
            snr = 10 * math.log10(clean.pow(2).mean() / (noisy - clean).pow(2).mean())
            assert abs(snr - 5.0) < 0.1
    again = eval_batches(av_shards.pattern, noise_prob=1.0, noise_snr_db=5.0, noise_types=["white"])
    assert all(torch.equal(a.audio, b.audio) for a, b in zip(batches, again))  # keyed by sample in evaluation


# ---------------------------------------------------------------------------- sidecars


def test_sidecar_round_trip(tmp_path):
    rng = np.random.default_rng(0)
    data = {f"k{i}": rng.integers(0, 500, size=int(rng.integers(1, 30))) for i in range(7)}
    writer = SidecarWriter(tmp_path / "labels" / "km500", "km500", 25, "int16")
    for key, values in data.items():
        writer.add(key, values)
    with pytest.raises(ValueError, match="twice"):
        writer.add("k0", data["k0"])
    path = writer.close()
    assert path.name == "km500.npz" and sorted(p.name for p in path.parent.iterdir()) == ["km500.npz"]
    loaded = Sidecar.load(path)
    assert loaded.rate == 25 and loaded.name == "km500" and loaded.dtype == np.int16 and len(loaded) == 7
    assert set(loaded) == set(data) and "k9" not in loaded
    for key, values in data.items():
        assert np.array_equal(loaded[key], values)
    with np.load(path, allow_pickle=False) as raw:
        assert set(raw.files) == {"header", "keys", "offsets", "values"}
    with SidecarWriter(tmp_path / "more.npz", "km500", 25, "int16") as more:
        more.add("extra", np.array([1, 2, 3]))
    merged = Sidecar.load([path, tmp_path / "more.npz"])
    assert len(merged) == 8 and np.array_equal(merged["extra"], [1, 2, 3])
    with pytest.raises(ValueError, match="outside"):
        SidecarWriter(tmp_path / "x", "x", 25, "int8").add("a", np.array([1000]))


def test_sidecar_join_25_and_100_hz(av_shards, tmp_path):
    skipped_key = av_shards.keys[3]
    sidecars = {
        "km25": write_sidecar(tmp_path / "km25", "km25", 25, av_shards.lengths),
        "km100": write_sidecar(tmp_path / "km100", "km100", 100, av_shards.lengths, skip={skipped_key}),
        "units": write_sidecar(tmp_path / "units", "units", 50, av_shards.lengths),
    }
    batches = eval_batches(av_shards.pattern, sidecars=sidecars)
    assert sorted(keys_of(batches)) == sorted(set(av_shards.keys) - {skipped_key})
    assert sum(b.skipped.get("no km100 label", 0) for b in batches) == 1
    for batch in batches:
        t = batch.audio.shape[1]
        for name, factor in (("km25", 1), ("km100", 4), ("units", 2)):
            labels = batch.labels[name]
            assert labels.dtype == torch.long and labels.shape == (len(batch), factor * t)
            assert torch.equal(batch.label_lengths[name], batch.lengths * factor)
            for i in range(len(batch)):
                n = int(batch.lengths[i]) * factor
                assert torch.equal(labels[i, :n], torch.arange(n))
                assert (labels[i, n:] == -100).all()


# ---------------------------------------------------------------------------- distributed


def test_train_epoch_has_fixed_length_on_every_rank(av_shards):
    dm = AVDataModule(
        train_shards=av_shards.pattern,
        max_frames=BUDGET,
        train_batches_per_epoch=5,
        num_workers=2,
        buffer_size=8,
        seed=3,
    )
    dm.setup("fit")
    seen = {}
    for rank in (0, 1):
        dm.set_distributed(rank, 2)
        loader = dm.train_dataloader()
        assert len(loader) == 5
        epochs = [[batch.keys for batch in loader] for _ in range(2)]
        assert [len(e) for e in epochs] == [5, 5]
        assert epochs[0] != epochs[1]  # a new draw every epoch
        seen[rank] = epochs[0]
    assert seen[0] != seen[1]  # ranks draw different shards


@pytest.mark.parametrize("shards", [1, 2])
def test_training_never_reads_one_shard_twice_at_once(shards, tmp_path):
    """Fewer shards than shards_in_parallel: one shard opened twice would be read in lockstep, and bucketing
    packed its copies of a sample into one batch (a shard's whole first pass came out as repeated keys)."""
    data = write_set(tmp_path, [10, 12, 14, 11, 13, 15, 9, 16] * shards, per_shard=8)
    dm = AVDataModule(
        train_shards=data.pattern, max_frames=40, train_batches_per_epoch=10, num_workers=0, buffer_size=8
    )
    dm.setup("fit")
    keys = [key for batch in dm.train_dataloader() for key in batch.keys][: 8 * shards]
    assert len(set(keys)) == len(keys) == 8 * shards  # the first cycle: every sample once


def test_split_for_worker_is_exactly_once_and_balanced():
    for shards in range(1, 9):
        for workers in range(1, 10):
            reads, per_worker = Counter(), Counter()
            for g in range(workers):
                for shard, part, parts in split_for_worker(shards, g, workers):
                    for sample in range(12):
                        if sample % parts == part:
                            reads[(shard, sample)] += 1
                            per_worker[g] += 1
            assert set(reads.values()) == {1} and len(reads) == shards * 12, (shards, workers)
            shares = [per_worker[g] for g in range(workers)]
            assert max(shares) - min(shares) <= max(1, shards % workers), (shards, workers, shares)


@pytest.mark.parametrize("num_shards", [5, 2, 1])
def test_evaluation_reads_every_sample_once_over_ranks_and_workers(av_shards, num_shards):
    paths = [str(p) for p in av_shards.paths[:num_shards]]
    expected = [k for k in av_shards.keys if int(k.split("_")[1]) < 4 * num_shards]
    dm = AVDataModule(val_shards=paths, max_frames=BUDGET, num_workers=2)
    dm.setup("validate")
    keys = []
    for rank in (0, 1):
        dm.set_distributed(rank, 2)
        keys += [key for batch in dm.val_dataloader() for key in batch.keys]
    assert sorted(keys) == sorted(expected) and len(keys) == len(set(keys))


# ---------------------------------------------------------------------------- corrupt data and errors


def test_corrupt_samples_are_skipped_and_counted(shard_writer):
    corrupt = {
        1: "truncated_flac",
        3: "bad_mp4",
        5: "missing_lip",
        7: "length_mismatch",
        9: "nan_audio",
        10: "empty_text",
    }
    shards = shard_writer([10, 12, 14, 16, 18, 20, 22, 24, 26, 28, 30, 32], per_shard=3, face=False, corrupt=corrupt)
    dm = AVDataModule(val_shards=shards.pattern, test_shards=shards.pattern, max_frames=BUDGET, num_workers=2)
    dm.setup("validate")
    batches = list(dm.val_dataloader())
    clean = [k for i, k in enumerate(shards.keys) if i not in corrupt]
    assert sorted(keys_of(batches)) == sorted(clean)
    expected = {
        "undecodable audio": 1,
        "undecodable video": 1,
        "missing field": 1,
        "length mismatch": 1,
        "non-finite audio": 1,
        "empty transcript": 1,
    }
    assert dict(dm.skipped) == expected
    assert sum(b.num_skipped for b in batches) == 6
    # Face video required but absent: every sample is a missing field, nothing crashes.
    faces = AVShardDataset(shards.pattern, max_frames=BUDGET, load_face=True)
    assert list(faces) == []


def test_skip_counts_reach_the_datamodule_in_a_trainer(shard_writer, cpu_trainer):
    import lightning as L

    shards = shard_writer([10, 12, 14, 16], per_shard=2, face=False, corrupt={2: "bad_mp4"})

    class Probe(L.LightningModule):
        def __init__(self):
            super().__init__()
            self.layer = torch.nn.Linear(104, 1)
            self.batches = 0

        def training_step(self, batch, index):
            assert isinstance(batch, AVBatch)
            self.batches += 1
            return self.layer(batch.audio).pow(2).mean()

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.1)

    dm = AVDataModule(
        train_shards=shards.pattern, max_frames=40, train_batches_per_epoch=3, num_workers=0, buffer_size=4
    )
    probe = Probe()
    trainer = cpu_trainer(max_epochs=2)
    trainer.fit(probe, dm)
    assert probe.batches == 6 and dm.skipped["undecodable video"] >= 1


@pytest.mark.parametrize("pattern", ["nowhere/train-{000000..000003}.tar", "", "nowhere/*.tar", []])
def test_missing_or_empty_shard_pattern_names_it(pattern, tmp_path):
    with pytest.raises(ValueError) as info:
        AVDataModule(train_shards=pattern).setup("fit")
    message = str(info.value)
    assert "\n" not in message and (repr(pattern) in message or not pattern)
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="holds no .tar"):
        resolve_shards(str(tmp_path / "empty"))


def test_shard_patterns_resolve(av_shards):
    assert resolve_shards(av_shards.pattern) == [str(p) for p in av_shards.paths]
    assert resolve_shards(str(av_shards.paths[0].parent)) == [str(p) for p in av_shards.paths]
    assert resolve_shards([str(p) for p in av_shards.paths[:2]]) == [str(p) for p in av_shards.paths[:2]]
    assert resolve_shards("pipe:cat x.tar") == ["pipe:cat x.tar"]
    partial = av_shards.pattern.replace("000004}", "000009}")
    with pytest.raises(ValueError, match="5 of 10 shard"):
        resolve_shards(partial)


def test_dataloader_is_a_plain_torch_dataloader(av_shards):
    dm = AVDataModule(test_shards=av_shards.pattern, num_workers=0, max_frames=BUDGET)
    loader = dm.test_dataloader()
    assert isinstance(loader, torch.utils.data.DataLoader) and isinstance(loader, AVDataLoader)
    assert loader.batch_size is None
    with pytest.raises(TypeError):
        len(loader)


def test_training_edge_cases(av_shards):
    # More workers than batches: the idle worker yields nothing, the total stays exact.
    dataset = AVShardDataset(av_shards.pattern, train=True, max_frames=BUDGET, batches_per_epoch=1, buffer_size=8)
    assert len(list(AVDataLoader(dataset, num_workers=2))) == 1
    # Filters that exclude everything fail loudly instead of resampling forever.
    hopeless = AVShardDataset(av_shards.pattern, train=True, max_frames=BUDGET, batches_per_epoch=2, languages=["de"])
    with pytest.raises(ValueError, match="no usable sample"):
        next(iter(hopeless))
    with pytest.raises(ValueError, match="batches_per_epoch"):
        AVShardDataset(av_shards.pattern, train=True)
    dm = AVDataModule(test_shards=av_shards.pattern, num_workers=0, max_frames=BUDGET)
    dm.setup("predict")
    assert sorted(k for b in dm.predict_dataloader() for k in b.keys) == sorted(av_shards.keys)
