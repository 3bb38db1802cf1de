"""Unit translator: vocabulary, published size, decoding equivalences, tag suppression, learning a toy mapping."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import lightning as L
import numpy as np
import pytest
import torch
import yaml
from conftest import build_record
from torch.utils.data import DataLoader

from av2av_lightning.checkpoints import load_checkpoint
from av2av_lightning.data.schema import SampleMeta
from av2av_lightning.data.shards import write_shards
from av2av_lightning.data.sidecar import SidecarWriter
from av2av_lightning.data.unit_pairs import UnitPair, UnitPairDataModule, UnitPairDataset, collate_pairs, join_pairs
from av2av_lightning.models.unit_translator import (
    BOS,
    EOS,
    PAD,
    UnitTranslator,
    UnitTranslatorConfig,
    UnitVocabulary,
    pad_tokens,
)
from av2av_lightning.translation import UnitTranslation, load_translator

EXPERIMENTS = Path(__file__).resolve().parents[1] / "experiments" / "translation"


def small_translator(**overrides) -> UnitTranslator:
    torch.manual_seed(0)
    return UnitTranslator(UnitTranslatorConfig.tiny(num_units=20, **overrides)).eval()


def sources(model: UnitTranslator, lengths=(7, 3, 5), langs=("en", "es", "fr")) -> tuple[torch.Tensor, torch.Tensor]:
    rng = np.random.default_rng(0)
    rows = [model.vocab.encode_source(rng.integers(0, 20, n), lang) for n, lang in zip(lengths, langs)]
    return pad_tokens(rows)


def test_vocabulary_layout_and_encoding():
    vocab = UnitVocabulary(1000, ["en", "es", "fr", "it", "pt"])
    assert len(vocab) == 4 + 1000 + 5 + 1
    assert vocab.encode_source([0, 999], "es") == [BOS, 4, 1003, EOS, vocab.lang_id("es")]
    assert vocab.encode_target([5], "pt") == [vocab.lang_id("pt"), 9, EOS]
    assert vocab.decode([9, 4, EOS, 10]) == [5, 0]


def test_unknown_language_and_unit_outside_dictionary_are_one_line_errors():
    vocab = UnitVocabulary(50, ["en", "es"])
    with pytest.raises(ValueError, match=r"^unknown language 'de'; the translator knows en, es$"):
        vocab.encode_source([1, 2], "de")
    with pytest.raises(ValueError, match=r"^unit id 50 is outside the unit dictionary of 50 units$"):
        vocab.encode_target([1, 50], "en")
    with pytest.raises(ValueError, match=r"^unit id -1 is outside"):
        vocab.encode_source(np.array([-1]), "en")


def test_published_translator_has_the_published_parameter_count():
    with torch.device("meta"):
        model = UnitTranslator(UnitTranslatorConfig.large())
    count = sum(p.numel() for p in model.parameters())
    d, ffn, layers, vocab = 1024, 4096, 12, 1010
    attention = 4 * (d * d + d)
    encoder_layer = attention + 2 * d * ffn + ffn + d + 2 * 2 * d
    decoder_layer = encoder_layer + attention + 2 * d
    # 12 + 12 layers of D=1024, shared embeddings: about 354 M (mBART-large's 611 M less its 250k-token embeddings)
    expected = layers * (encoder_layer + decoder_layer) + vocab * d
    assert expected == pytest.approx(353.7e6, rel=0.01)
    assert count == pytest.approx(expected, rel=0.02)


def test_large_config_is_the_published_size():
    config = yaml.safe_load((EXPERIMENTS / "large.yaml").read_text())["model"]["init_args"]
    built = UnitTranslatorConfig.preset(config["preset"], **config["translator"])
    assert (built.encoder_layers, built.decoder_layers, built.dim, built.ffn_dim, built.heads) == (
        12,
        12,
        1024,
        4096,
        16,
    )
    tiny = yaml.safe_load((EXPERIMENTS / "tiny.yaml").read_text())
    UnitTranslation(**tiny["model"]["init_args"])
    assert tiny["data"]["class_path"] == "av2av_lightning.data.unit_pairs.UnitPairDataModule"


def test_beam_one_equals_greedy_and_cache_equals_recomputation():
    model = small_translator()
    src, mask = sources(model)
    tgt = ["es", "fr", "en"]
    greedy = model.greedy(src, mask, tgt, raw=True)
    assert model.beam_search(src, mask, tgt, beam_size=1, raw=True) == greedy
    assert model.greedy(src, mask, tgt, raw=True, use_cache=False) == greedy
    assert model.beam_search(src, mask, tgt, beam_size=4, raw=True) == model.beam_search(
        src, mask, tgt, beam_size=4, raw=True, use_cache=False
    )


def test_incremental_decoding_logits_equal_full_decoding():
    model = small_translator()
    src, mask = sources(model)
    state = model.encode(src, mask)
    prev = torch.randint(4, 24, (3, 6))
    full = model.decode(state, prev)
    caches = [{} for _ in model.decoder_layers]
    steps = [model.decode(state, prev[:, t : t + 1], caches, offset=t) for t in range(prev.shape[1])]
    torch.testing.assert_close(torch.cat(steps, 1), full, atol=1e-5, rtol=1e-5)


def test_decoding_starts_from_target_tag_and_never_emits_another_tag():
    model = small_translator()
    src, mask = sources(model)
    tags = model.vocab.lang_ids
    decode = model.decode

    def tag_loving_decode(*args, **kwargs):  # every language tag and special far more likely than any unit
        logits = decode(*args, **kwargs).clone()
        logits[..., tags + [BOS, PAD]] += 100.0
        return logits

    model.decode = tag_loving_decode
    tgt = ["fr", "en", "es"]
    for search in (model.greedy, lambda *a, **k: model.beam_search(*a, beam_size=3, **k)):
        for row, lang in zip(search(src, mask, tgt, raw=True), tgt):
            assert row[0] == model.vocab.lang_id(lang)
            assert not set(row[1:]) & set(tags + [BOS, PAD])
            assert len(row) > 1


def test_pairs_join_by_sentence_id_within_a_split():
    def meta(key, split, lang, sentence, kind="sentence"):
        return SampleMeta(key, split, lang, "spk", "text", sentence, 10, kind=kind)

    metas = [
        meta("a-en", "train", "en", "s1"),
        meta("a-es", "train", "es", "s1"),
        meta("a-fr", "train", "fr", "s1"),
        meta("b-en", "test", "en", "s2"),
        meta("b-es", "test_unseen", "es", "s2"),  # same sentence, other split: not a pair
        meta("w-es", "train", "es", "s1", kind="word"),
    ]
    units = {m.key: np.array([i]) for i, m in enumerate(metas)}
    del units["a-fr"]
    pairs = join_pairs(metas, units)
    assert {(p.src_key, p.tgt_key) for p in pairs} == {("a-en", "a-es"), ("a-es", "a-en")}
    assert [p.tgt_units.tolist() for p in pairs if p.src_lang == "en"] == [[1]]


def test_unit_pair_datamodule_reads_shard_metadata(tmp_path):
    rng = np.random.default_rng(0)
    records, writer = [], SidecarWriter(tmp_path / "train.units.npz", "units", None, "int16")
    for sentence in range(3):
        for lang in ("en", "es", "fr"):
            record, meta = build_record(f"s{sentence}-{lang}", 8, rng, lang=lang, face=False)
            record["json"] = replace(meta, sentence_id=f"s{sentence}").to_json()
            records.append(record)
            writer.add(meta.key, np.arange(3) + sentence)
    writer.close()
    shards = write_shards(records, len(records), tmp_path / "train", max_per_shard=4)
    datamodule = UnitPairDataModule(train_shards=[str(p) for p in shards], train_units=str(writer.path), batch_size=4)
    datamodule.setup("fit")
    assert len(datamodule.datasets["train"]) == 3 * 6
    batches = list(datamodule.train_dataloader())
    assert sum(len(b) for b in batches) == 18 and max(len(b) for b in batches) == 4
    batch = batches[0]
    assert all(s != t for s, t in zip(batch.src_langs, batch.tgt_langs))
    assert all((s == t).all() for s, t in zip(batch.src_units, batch.tgt_units))  # same sentence, same toy units
    with pytest.raises(ValueError, match="val: give both val_shards and val_units"):
        datamodule.build_dataset("val")


def toy_pairs(count: int, seed: int, permutation: np.ndarray) -> list[UnitPair]:
    """A deterministic per-unit substitution: es units are a fixed permutation of the en units of a sentence."""
    rng = np.random.default_rng(seed)
    pairs = []
    for index in range(count):
        en = rng.integers(0, len(permutation), size=rng.integers(3, 7))
        es = permutation[en]
        pairs += [UnitPair(str(index), "en", "es", en, es), UnitPair(str(index), "es", "en", es, en)]
    return pairs


@pytest.mark.slow
def test_tiny_translator_learns_a_toy_mapping_and_checkpoints_its_stage(cpu_trainer, tmp_path):
    units = 12
    permutation = np.random.default_rng(0).permutation(units)
    train = DataLoader(UnitPairDataset(toy_pairs(400, 1, permutation)), 32, shuffle=True, collate_fn=collate_pairs)
    valid = DataLoader(UnitPairDataset(toy_pairs(16, 2, permutation)), 32, collate_fn=collate_pairs)
    L.seed_everything(0)
    translator = {"num_units": units, "languages": ["en", "es"], "dim": 64, "ffn_dim": 128}
    translator |= {"encoder_layers": 1, "decoder_layers": 1, "dropout": 0.0, "attention_dropout": 0.0}
    module = UnitTranslation(translator=translator, lr=3e-3, warmup_steps=20, total_steps=600, beam_size=2)
    losses = []

    class Record(L.Callback):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            losses.append(float(outputs["loss"]))

    trainer = cpu_trainer(max_steps=600, callbacks=[Record()], num_sanity_val_steps=0, check_val_every_n_epoch=1000)
    before = trainer.validate(module, valid, verbose=False)[0]
    trainer.fit(module, train)
    after = trainer.validate(module, valid, verbose=False)[0]
    assert np.mean(losses[-20:]) < 0.5 * np.mean(losses[:20])
    # chance: a random unit per position matches 1/12 of the time, so whole-sentence exact match is ~0
    assert before["val/exact_match"] < 0.1 and after["val/exact_match"] > 0.8
    assert after["val/unit_bleu"] > 70 and after["val/unit_edit"] < 0.15
    assert after["val/unit_bleu_en-es"] > 50 and after["val/unit_bleu_es-en"] > 50

    path = tmp_path / "translator.ckpt"
    trainer.save_checkpoint(path)
    assert load_checkpoint(path)["av2av_stage"] == "translation"
    restored = load_translator(path)
    batch = next(iter(valid))
    src, mask = pad_tokens([restored.vocab.encode_source(u, s) for u, s in zip(batch.src_units, batch.src_langs)])
    assert restored.greedy(src, mask, batch.tgt_langs) == module.model.eval().greedy(src, mask, batch.tgt_langs)
