"""Translation under 2-process DDP (gloo on the CPU) through `av2av fit`, as `tests/test_ddp.py` runs pretraining:
equal training batches per rank, every validation pair scored by exactly one rank (19 pairs: the padded
`DistributedSampler` would score one twice), unit BLEU / edit distance / exact match synced and equal to one
process validating the same pairs with the same weights, and the first step's all-reduced gradient of the
token-normalised loss equal to one process's on the union of both ranks' batches (dropout off)."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import lightning as L
import numpy as np
import pytest
import torch
import yaml

from av2av_lightning.data.shards import write_shards
from av2av_lightning.data.sidecar import Sidecar, SidecarWriter
from av2av_lightning.data.unit_pairs import ExactlyOnceSampler, UnitPairBatch, UnitPairDataModule
from av2av_lightning.translation import UnitTranslation
from tests.test_ddp import StepRecorder

pytestmark = pytest.mark.usefixtures("one_thread")  # as each rank computes (`one_thread`)
UNITS = 12
LANGUAGES = ("en", "es", "fr")
TRANSLATOR = {"num_units": UNITS, "languages": list(LANGUAGES), "dim": 32, "ffn_dim": 64, "heads": 2}
TRANSLATOR |= {"encoder_layers": 1, "decoder_layers": 1, "dropout": 0.0, "attention_dropout": 0.0}


class TranslationRecorder(StepRecorder):
    """Also the pairs of the last validation (sentence id and direction) and the weights it ran with."""

    def __init__(self, out: str) -> None:
        super().__init__(out)
        self.record["val_pairs"] = []

    def describe_batch(self, batch) -> dict:
        return {
            "src_units": [u.tolist() for u in batch.src_units],
            "tgt_units": [u.tolist() for u in batch.tgt_units],
            "src_langs": list(batch.src_langs),
            "tgt_langs": list(batch.tgt_langs),
            "sentence_ids": list(batch.sentence_ids),
        }

    def on_validation_epoch_start(self, trainer, module) -> None:
        self.record["val_pairs"] = []
        self.record["val_weights"] = {k: v.detach().clone() for k, v in module.state_dict().items()}

    def on_validation_batch_start(self, trainer, module, batch, batch_idx, dataloader_idx=0) -> None:
        directions = [f"{s}-{t}" for s, t in zip(batch.src_langs, batch.tgt_langs)]
        self.record["val_pairs"] += [f"{i}:{d}" for i, d in zip(batch.sentence_ids, directions)]


def write_split(folder: Path, name: str, sentences: dict[str, tuple[str, ...]], rng) -> tuple[list[str], Path]:
    """Shards of the given sentences (id -> languages) and a unit sidecar: es/fr units a fixed permutation of en's."""
    # imported here: the DDP ranks import this module (for the recorder) without tests/ on the path
    from conftest import build_record

    permutation = {"en": np.arange(UNITS), "es": rng.permutation(UNITS), "fr": rng.permutation(UNITS)}
    records, writer = [], SidecarWriter(folder / f"{name}.units.npz", "units", None, "int16")
    for sentence, languages in sentences.items():
        en = rng.integers(0, UNITS, size=int(rng.integers(4, 9)))
        for lang in languages:
            record, meta = build_record(f"{name}-{sentence}-{lang}", 8, rng, lang=lang, face=False)
            record["json"] = replace(meta, sentence_id=sentence).to_json()
            records.append(record)
            writer.add(meta.key, permutation[lang][en])
    writer.close()
    shards = write_shards(records, len(records), folder / name, max_per_shard=4)
    return [str(p) for p in shards], writer.path


@pytest.fixture(scope="module")
def unit_data(tmp_path_factory) -> dict:
    """30 training pairs (5 sentences x 6 directions) and 19 validation pairs: 3 sentences x 6 directions and one
    en/es sentence whose es side has no reference units (so only es->en), scored against a separate target
    sidecar, as evaluation of V-input units against audio units reads it."""
    folder, rng = tmp_path_factory.mktemp("ddp_units"), np.random.default_rng(0)
    train_shards, train_units = write_split(folder, "train", {f"t{i}": LANGUAGES for i in range(5)}, rng)
    valid = {**{f"v{i}": LANGUAGES for i in range(3)}, "v3": ("en", "es")}
    val_shards, val_units = write_split(folder, "valid", valid, rng)
    writer = SidecarWriter(folder / "valid_targets.units.npz", "units", None, "int16")
    for key, units in Sidecar.load(val_units).items():
        if key != "valid-v3-es":
            writer.add(key, units)
    writer.close()
    return {
        "train_shards": train_shards,
        "train_units": str(train_units),
        "val_shards": val_shards,
        "val_units": str(val_units),
        "val_target_units": str(writer.path),
        "batch_size": 4,
    }


def config(unit_data: dict, out: Path, **trainer) -> dict:
    from test_ddp import ddp_trainer  # imported here: the DDP ranks import this module without tests/ on the path

    return {
        "seed_everything": 0,
        "trainer": ddp_trainer(out, **trainer),
        "model": {
            "class_path": "av2av_lightning.translation.UnitTranslation",
            "init_args": {"preset": "tiny", "translator": TRANSLATOR, "lr": 3e-3, "warmup_steps": 2, "beam_size": 2},
        },
        "data": {"class_path": "av2av_lightning.data.unit_pairs.UnitPairDataModule", "init_args": unit_data},
    }


def run(unit_data: dict, out: Path, **trainer) -> tuple[dict, list[dict]]:
    """`launch` with this file's recorder (a second ``--config`` replaces the pretraining recorder)."""
    from test_ddp import launch

    settings = config(unit_data, out, **trainer)
    callbacks = {
        "trainer": {"callbacks": [{"class_path": "tests.test_ddp_translation.TranslationRecorder", "init_args": {}}]}
    }
    callbacks["trainer"]["callbacks"][0]["init_args"]["out"] = str(out)
    (out / "recorder.yaml").write_text(yaml.safe_dump(callbacks))
    return settings, launch(settings, out, False, "--config", str(out / "recorder.yaml"))


def test_exactly_once_sampler_splits_every_index_once():
    for size in (0, 1, 5, 19):
        for world in (1, 2, 3, 8):
            parts = [list(ExactlyOnceSampler(range(size), world, rank)) for rank in range(world)]
            assert sorted(i for part in parts for i in part) == list(range(size))
            assert max(map(len, parts)) - min(map(len, parts)) <= 1
            assert [len(ExactlyOnceSampler(range(size), world, rank)) for rank in range(world)] == list(map(len, parts))


@pytest.mark.slow
def test_ddp_translation_splits_batches_and_pairs_and_syncs_metrics(unit_data, tmp_path):
    settings, ranks = run(unit_data, tmp_path, max_epochs=2)
    assert [r["rank"] for r in ranks] == [0, 1] and {r["world_size"] for r in ranks} == {2}
    assert [r["train_batches"] for r in ranks] == [[4, 4], [4, 4]]  # 30 pairs: 15 per rank, batches of 4

    data = UnitPairDataModule(**unit_data)
    expected = [
        f"{i}:{s}-{t}" for b in data.val_dataloader() for i, s, t in zip(b.sentence_ids, b.src_langs, b.tgt_langs)
    ]
    seen = ranks[0]["val_pairs"] + ranks[1]["val_pairs"]
    assert len(expected) == 19 and sorted(seen) == sorted(expected)  # none missing, none twice
    assert [len(r["val_pairs"]) for r in ranks] == [9, 10]

    # one process validating the same pairs with the weights of the DDP validation gives the same scores
    module = UnitTranslation(**settings["model"]["init_args"])
    module.load_state_dict(ranks[0]["val_weights"])
    assert all(torch.equal(ranks[0]["val_weights"][k], ranks[1]["val_weights"][k]) for k in ranks[0]["val_weights"])
    trainer = L.Trainer(accelerator="cpu", devices=1, logger=False, enable_progress_bar=False)
    single = trainer.validate(module, UnitPairDataModule(**unit_data), verbose=False)[0]
    scores = [k for k in single if k.split("/")[1].startswith(("unit_bleu", "unit_edit", "exact_match"))]
    assert {"val/unit_bleu", "val/unit_edit", "val/exact_match", "val/unit_bleu_es-en"} <= set(scores)
    for record in ranks:
        assert record["logged"]["val/loss"] == ranks[0]["logged"]["val/loss"]
        for key in scores:
            assert record["logged"][key] == pytest.approx(single[key], abs=1e-5), key


def merged(batches: list[dict]) -> UnitPairBatch:
    """One batch holding the pairs of both ranks' batches."""
    fields = {k: [v for b in batches for v in b[k]] for k in batches[0]}
    units = {k: [np.asarray(u) for u in fields[k]] for k in ("src_units", "tgt_units")}
    return UnitPairBatch(**{**fields, **units})


@pytest.mark.slow
def test_ddp_translation_gradient_equals_one_process_on_the_whole_batch(unit_data, tmp_path):
    """The summed loss over the world's target tokens (times the world size, as DDP averages gradients): the
    all-reduced gradient is that of one process's per-token loss over both ranks' pairs."""
    settings, ranks = run(unit_data, tmp_path, max_steps=1, limit_val_batches=0)
    batches = [r["first_batch"] for r in ranks]
    tokens = [sum(len(u) + 1 for u in b["tgt_units"]) for b in batches]  # predicted: the units and <eos>
    assert tokens[0] != tokens[1]  # per-rank normalisation would weigh the ranks' tokens differently

    module = UnitTranslation(**settings["model"]["init_args"])
    module.load_state_dict(ranks[0]["weights"])
    summed, stats = module.loss(merged(batches))
    assert stats["tokens"] == sum(tokens)
    (summed / stats["tokens"]).backward()
    for name, parameter in module.named_parameters():
        if name not in ranks[0]["gradients"]:
            assert parameter.grad is None or not parameter.grad.any(), name
            continue
        assert torch.equal(ranks[0]["gradients"][name], ranks[1]["gradients"][name]), name
        torch.testing.assert_close(
            ranks[0]["gradients"][name], parameter.grad, rtol=1e-4, atol=1e-6, msg=lambda m, n=name: f"{n}: {m}"
        )
