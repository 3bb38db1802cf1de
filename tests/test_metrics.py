"""Metric suite, each metric checked against an independent implementation: the sacrebleu command line,
jiwer, pesq and pystoi called directly, scikit-image, a loop-by-loop SyncNet offset search; and the DDP
merge of states equal to a single process."""

from __future__ import annotations

import multiprocessing
import subprocess
import sys

import jiwer
import numpy as np
import pesq
import pystoi
import pytest
import sacrebleu
import torch
import torch.distributed as dist
from scipy.signal import resample_poly
from skimage.metrics import peak_signal_noise_ratio as sk_psnr
from skimage.metrics import structural_similarity as sk_ssim

from av2av_lightning.metrics import (
    ESTOI,
    PESQ,
    STOI,
    ASRBleu,
    CharErrorRate,
    LipSync,
    MouthMotion,
    SpeakerSimilarity,
    VideoPSNR,
    VideoSSIM,
    WordAccuracy,
    WordErrorRate,
    build_suite,
    normalize_text,
)
from av2av_lightning.metrics.lipsync import offset_distances
from data_prep.corpus.speech import VoiceSpec, synthesize

HYPS = [
    "The boy drinks a coffee (laughs), and the girl reads!",
    "Where is the child? The child drinks milk.",
    "A cat sleeps on the red chair.",
    "¿Dónde está el niño? El niño bebe café.",
    "The girl reads a book in the garden",
    "we'll see (inaudible) tomorrow, OK?",
    "Nothing matches here at all",
    "the old man walks to the market every morning",
]
REFS = [
    "The boy drinks a coffee, and the girl reads a book.",
    "Where is the child? The child drinks the milk.",
    "The cat sleeps on the red chair.",
    "¿Dónde está el niño? El niño bebe un café.",
    "The girl reads a book in the garden.",
    "We'll see you tomorrow (applause).",
    "The weather is fine today.",
    "The old man walks to the market every morning.",
]


def test_normalize_text_lowercases_and_strips_punctuation_and_parentheses():
    assert normalize_text("  Hello, (um (well)) World!  ¿Qué?  ") == "hello world qué"
    assert normalize_text("We'll see (laughs) it.") == "well see it"


def test_asr_bleu_equals_sacrebleu_command_line_and_chrf(tmp_path):
    metric = ASRBleu()
    metric.update(REFS[:3], pred_text=HYPS[:3])
    metric.update(REFS[3:], pred_text=HYPS[3:])
    result = metric.compute()
    hyps, refs = [normalize_text(t) for t in HYPS], [normalize_text(t) for t in REFS]
    (tmp_path / "hyp.txt").write_text("\n".join(hyps) + "\n", encoding="utf-8")
    (tmp_path / "ref.txt").write_text("\n".join(refs) + "\n", encoding="utf-8")
    cli = subprocess.run(
        [
            sys.executable,
            "-m",
            "sacrebleu",
            str(tmp_path / "ref.txt"),
            "-i",
            str(tmp_path / "hyp.txt"),
            "-b",
            "-w",
            "6",
        ],
        capture_output=True,
        text=True,
        check=True,
    )
    assert 0 < result["asr_bleu"].item() < 100
    assert result["asr_bleu"].item() == pytest.approx(float(cli.stdout), abs=1e-6)
    assert result["asr_bleu"].item() == sacrebleu.corpus_bleu(hyps, [refs]).score  # bit-exact, not just close
    assert result["asr_chrf"].item() == sacrebleu.corpus_chrf(hyps, [refs]).score


def test_asr_bleu_transcribes_speech_with_the_pluggable_transcriber():
    calls = []

    def transcriber(waves, lang):
        calls.append((lang, [w.dtype for w in waves], [len(w) for w in waves]))
        return [HYPS[int(w[0])] for w in waves]

    waves = [np.full(3200, i, dtype=np.float32) for i in range(len(HYPS))]
    metric = ASRBleu(transcriber=transcriber, lang="en")
    metric.update(REFS, pred_wave=waves)
    reference = ASRBleu()
    reference.update(REFS, pred_text=HYPS)
    assert metric.compute() == reference.compute()
    assert calls == [("en", [np.float32] * len(HYPS), [3200] * len(HYPS))]
    with pytest.raises(ValueError, match="pred_wave"):
        metric.update(REFS, pred_text=HYPS)


def test_wer_and_cer_equal_jiwer_on_the_corpus():
    hyps, refs = [normalize_text(t) for t in HYPS], [normalize_text(t) for t in REFS]
    wer, cer = WordErrorRate(), CharErrorRate()
    for start in range(0, len(HYPS), 3):
        wer.update(REFS[start : start + 3], pred_text=HYPS[start : start + 3])
        cer.update(REFS[start : start + 3], pred_text=HYPS[start : start + 3])
    assert wer.compute()["wer"].item() == pytest.approx(jiwer.wer(refs, hyps), abs=1e-12)
    assert cer.compute()["cer"].item() == pytest.approx(jiwer.cer(refs, hyps), abs=1e-12)
    assert 0 < wer.compute()["wer"].item() < 1


@pytest.mark.parametrize("make", [ASRBleu, WordErrorRate])
def test_text_metrics_merged_from_two_ranks_equal_one_process(make):
    single, first, second = make(), make(), make()
    single.update(REFS, pred_text=HYPS)
    first.update(REFS[:5], pred_text=HYPS[:5])
    second.update(REFS[5:], pred_text=HYPS[5:])
    first.merge_state(second)
    assert first.compute() == single.compute()


@pytest.fixture(scope="module")
def speech() -> list[np.ndarray]:
    voice = VoiceSpec(variant="m3", rate=160, pitch=50, pitch_range=50)
    texts = ["The boy drinks a coffee.", "Where is the child?", "The girl reads a book in the garden."]
    return [synthesize(text, "en", voice).wave for text in texts]


def _degrade(wave: np.ndarray, seed: int, level: float = 0.02) -> np.ndarray:
    return (wave + level * np.random.default_rng(seed).standard_normal(len(wave))).astype(np.float32)


def test_pesq_stoi_estoi_equal_the_libraries(speech):
    degraded = [_degrade(w, i) for i, w in enumerate(speech)]
    degraded[1] = np.concatenate([degraded[1], np.zeros(400, np.float32)])  # 25 ms longer: trimmed, recorded
    trimmed = [d[: len(r)] for d, r in zip(degraded, speech)]
    expected = {
        "pesq": np.mean([pesq.pesq(16000, r, d, "wb") for r, d in zip(speech, trimmed)]),
        "stoi": np.mean([pystoi.stoi(r, d, 16000) for r, d in zip(speech, trimmed)]),
        "estoi": np.mean([pystoi.stoi(r, d, 16000, extended=True) for r, d in zip(speech, trimmed)]),
    }
    for metric in (PESQ(), STOI(), ESTOI()):
        metric.update(degraded[:2], speech[:2])
        metric.update(degraded[2:], speech[2:])
        result = metric.compute()
        key = metric.key
        assert result[key].item() == pytest.approx(expected[key], abs=1e-9)
        assert (result[f"{key}_scored"], result[f"{key}_failed"], result[f"{key}_trimmed"]) == (3, 0, 1)


def test_pesq_resamples_other_rates_to_16k(speech):
    upsampled = [resample_poly(w, 2, 1).astype(np.float32) for w in speech[:1]]
    degraded = [resample_poly(_degrade(w, 0), 2, 1).astype(np.float32) for w in speech[:1]]
    metric = PESQ(sample_rate=32000)
    metric.update(degraded, upsampled)
    ref16, deg16 = (resample_poly(x[0].astype(np.float64), 1, 2).astype(np.float32) for x in (upsampled, degraded))
    assert metric.compute()["pesq"].item() == pytest.approx(pesq.pesq(16000, ref16, deg16, "wb"), abs=1e-9)


def test_unscorable_utterances_are_counted_not_dropped_or_raised(speech):
    silent = np.zeros_like(speech[0])
    too_short = speech[1][:1000]
    refs = [silent, too_short, speech[2], np.full_like(speech[0], np.nan)]
    preds = [_degrade(speech[0], 0), too_short, _degrade(speech[2], 2), speech[0]]
    for metric, score in (
        (PESQ(), pesq.pesq(16000, speech[2], preds[2], "wb")),
        (STOI(), pystoi.stoi(speech[2], preds[2], 16000)),
    ):
        metric.update(preds, refs)
        result = metric.compute()
        key = metric.key
        assert (result[f"{key}_scored"], result[f"{key}_failed"]) == (1, 3)
        assert result[key].item() == pytest.approx(score, abs=1e-9)
    nothing = PESQ()
    nothing.update([silent], [silent])
    assert torch.isnan(nothing.compute()["pesq"])


def _clips(rng: np.random.Generator, lengths: list[int], gray: bool = False) -> tuple[list, list]:
    shape = (48, 40) if gray else (48, 40, 3)
    refs = [rng.integers(0, 256, (t, *shape), dtype=np.uint8) for t in lengths]
    preds = [np.clip(r.astype(int) + rng.integers(-40, 41, r.shape), 0, 255).astype(np.uint8) for r in refs]
    return preds, refs


def _skimage_clip_mean(preds, refs, score) -> float:
    return float(
        np.mean([np.mean([score(r, p) for p, r in zip(clip_p, clip_r)]) for clip_p, clip_r in zip(preds, refs)])
    )


@pytest.mark.parametrize("gray", [False, True])
def test_psnr_ssim_equal_scikit_image_per_frame_then_per_clip(gray):
    preds, refs = _clips(np.random.default_rng(3), [2, 5, 3], gray)
    psnr, ssim = VideoPSNR(data_range=255), VideoSSIM(data_range=255)
    psnr.update(preds, refs)
    ssim.update(preds, refs)
    channel_axis = None if gray else -1
    # Gaussian 11x11 window, sigma 1.5, population covariance: the settings that match torchmetrics' SSIM maps.
    expected_ssim = _skimage_clip_mean(
        preds,
        refs,
        lambda r, p: sk_ssim(
            r,
            p,
            data_range=255,
            channel_axis=channel_axis,
            gaussian_weights=True,
            sigma=1.5,
            use_sample_covariance=False,
        ),
    )
    expected_psnr = _skimage_clip_mean(preds, refs, lambda r, p: sk_psnr(r, p, data_range=255))
    # torchmetrics keeps the data range and log base as float32 scalars: agreement to ~1e-6 dB, not bit-exact.
    assert psnr.compute()["psnr"].item() == pytest.approx(expected_psnr, abs=1e-5)
    assert ssim.compute()["ssim"].item() == pytest.approx(expected_ssim, abs=1e-9)


def test_frame_metrics_on_float_frames_trim_and_weigh_clips_equally():
    preds, refs = _clips(np.random.default_rng(4), [1, 8])
    float_preds = [torch.from_numpy(p).float() / 255 for p in preds]
    float_refs = [torch.from_numpy(r).float() / 255 for r in refs]
    float_refs[1] = torch.cat([float_refs[1], float_refs[1][:2]])  # two extra reference frames
    metric = VideoPSNR(data_range=1.0)
    metric.update(float_preds, float_refs)
    per_clip = [
        np.mean([sk_psnr(r, p, data_range=1.0) for p, r in zip(cp.numpy(), cr.numpy())])
        for cp, cr in zip(float_preds, float_refs)
    ]
    result = metric.compute()
    assert result["psnr"].item() == pytest.approx(np.mean(per_clip), abs=1e-4)  # float32 frames
    assert result["psnr_trimmed"] == 1


def test_psnr_merged_from_two_ranks_equals_one_process():
    preds, refs = _clips(np.random.default_rng(5), [3, 1, 4, 2])
    single, first, second = (VideoPSNR(data_range=255) for _ in range(3))
    single.update(preds, refs)
    first.update(preds[:1], refs[:1])
    second.update(preds[1:], refs[1:])
    first.merge_state(second)
    assert first.compute()["psnr"].item() == pytest.approx(single.compute()["psnr"].item(), abs=1e-12)


def _ddp_rank(rank: int, world: int, store: str, queue) -> None:
    """One rank of a gloo group: updates its shard of the data, then ``compute`` syncs the states."""
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world)
    try:
        preds, refs = _clips(np.random.default_rng(9), [3, 1, 4, 2, 2])
        suite = build_suite(["asr_bleu", "wer", "psnr"], data_range=255)
        suite.update(pred_text=HYPS[rank::world], ref_text=REFS[rank::world])
        suite.update(pred_video=preds[rank::world], ref_video=refs[rank::world])
        result = {key: value.item() for key, value in suite.compute().items()}
        queue.put((rank, result))
    finally:
        dist.destroy_process_group()


def test_suite_synced_over_two_gloo_ranks_equals_one_process(tmp_path):
    context = multiprocessing.get_context("fork")
    queue = context.Queue()
    ranks = [context.Process(target=_ddp_rank, args=(r, 2, tmp_path / "store", queue)) for r in range(2)]
    for process in ranks:
        process.start()
    for process in ranks:
        process.join(timeout=60)
    assert [process.exitcode for process in ranks] == [0, 0]
    results = dict(queue.get(timeout=5) for _ in ranks)
    single = build_suite(["asr_bleu", "wer", "psnr"], data_range=255)
    preds, refs = _clips(np.random.default_rng(9), [3, 1, 4, 2, 2])
    single.update(pred_text=HYPS, ref_text=REFS)
    single.update(pred_video=preds, ref_video=refs)
    expected = {key: value.item() for key, value in single.compute().items()}
    for rank in range(2):
        assert results[rank].keys() == expected.keys()
        for key, value in expected.items():
            assert results[rank][key] == pytest.approx(value, abs=1e-12), key


class OneHotExpert:
    """Fake SyncNet: each video frame and each 640-sample audio frame carries a symbol id; embeddings are
    one-hot codes of those ids (one window per frame)."""

    def __init__(self, symbols: int = 16) -> None:
        self.symbols = symbols

    def embed_video(self, frames: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.one_hot(frames.reshape(len(frames), -1)[:, 0].long(), self.symbols).float()

    def embed_audio(self, wave: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.one_hot(wave.reshape(-1, 640)[:, 0].round().long(), self.symbols).float()


def _planted_clip(
    rng: np.random.Generator, frames: int, shift: int, symbols: int = 16
) -> tuple[np.ndarray, np.ndarray]:
    """Video showing symbol sequence s; audio carrying s delayed by ``shift`` frames (advanced if negative)."""
    sequence = rng.integers(0, symbols, frames + 2 * abs(shift))
    video = sequence[abs(shift) : abs(shift) + frames]
    audio = sequence[abs(shift) - shift : abs(shift) - shift + frames]
    return np.broadcast_to(video[:, None, None], (frames, 4, 4)).copy(), np.repeat(audio, 640).astype(np.float32)


@pytest.mark.parametrize("shift", [3, -5, 0])
def test_lip_sync_finds_the_planted_shift(shift):
    frames = 100
    video, wave = _planted_clip(np.random.default_rng(6), frames, shift)
    metric = LipSync(OneHotExpert())
    metric.update([video], [wave])
    result = metric.compute()
    assert result["lse_offset"].item() == shift
    assert result["lse_d"].item() == pytest.approx(abs(shift) / frames, abs=1e-4)  # only the zero-padded edge
    assert result["lse_c"].item() > 1.0


def test_lip_sync_distances_match_a_loop_over_offsets():
    """Against SyncNet's calc_pdist written as plain loops: audio zero-padded by 15, every video window."""
    rng = np.random.default_rng(7)
    video, audio = rng.standard_normal((20, 8)), rng.standard_normal((20, 8))
    padded = np.concatenate([np.zeros((15, 8)), audio, np.zeros((15, 8))])
    expected = [
        np.mean([np.linalg.norm(video[t] - padded[t + 15 + offset] + 1e-6) for t in range(20)])
        for offset in range(-15, 16)
    ]
    got = offset_distances(torch.from_numpy(video), torch.from_numpy(audio), 15)
    np.testing.assert_allclose(got.numpy(), expected, atol=1e-9)


def test_speaker_similarity_and_word_accuracy():
    a = torch.tensor([[1.0, 0.0], [1.0, 1.0], [0.0, 2.0]])
    b = torch.tensor([[2.0, 0.0], [-1.0, -1.0], [1.0, 1.0]])
    similarity = SpeakerSimilarity()
    similarity.update(a, b)
    assert similarity.compute()["speaker_similarity"].item() == pytest.approx((1 - 1 + 2**-0.5) / 3)
    accuracy = WordAccuracy()
    accuracy.update(torch.tensor([[0.1, 0.9], [0.8, 0.2], [0.3, 0.7]]), torch.tensor([1, 1, 1]))
    accuracy.update(["boy", "girl"], ["boy", "book"])
    assert accuracy.compute()["word_accuracy"].item() == pytest.approx(3 / 5)


def test_suite_routes_named_inputs_and_transcribes_once(speech):
    calls = []

    def transcriber(waves, lang):
        calls.append(lang)
        return ["the boy drinks a coffee"] * len(waves)

    preds, refs = _clips(np.random.default_rng(8), [2, 3])
    suite = build_suite(["asr_bleu", "wer", "pesq", "stoi", "psnr", "ssim"], data_range=255, transcriber=transcriber)
    degraded = [_degrade(w, 1) for w in speech[:2]]
    suite.update(
        pred_wave=degraded,
        ref_wave=speech[:2],
        ref_text=["The boy drinks a coffee.", "Where is the child?"],
        pred_video=preds,
        ref_video=refs,
        lang="en",
    )
    result = suite.compute()
    assert calls == ["en"]
    assert {"asr_bleu", "asr_chrf", "wer", "pesq", "pesq_failed", "stoi", "psnr", "ssim"} <= set(result)
    assert result["wer"].item() == pytest.approx(
        jiwer.wer(["the boy drinks a coffee", "where is the child"], ["the boy drinks a coffee"] * 2)
    )
    assert result["pesq"].item() == pytest.approx(
        np.mean([pesq.pesq(16000, r, d, "wb") for r, d in zip(speech[:2], degraded)])
    )
    with pytest.raises(ValueError, match="no metric"):
        suite.update(pred_label=torch.tensor([1]), ref_label=torch.tensor([1]))
    with pytest.raises(ValueError, match="data_range"):
        build_suite(["psnr"])
    with pytest.raises(ValueError, match="unknown"):
        build_suite(["bleu"])


def test_ssim_refuses_frames_smaller_than_its_window():
    with pytest.raises(ValueError, match="larger than 11 pixels"):
        VideoSSIM(data_range=1.0).update([np.zeros((2, 8, 8))], [np.zeros((2, 8, 8))])


def talking_clip(openness: np.ndarray) -> np.ndarray:
    """A grey uint8 face clip [T, 96, 96, 3] whose lips box darkens by ``openness`` (0..1) in each frame."""
    frames = np.full((len(openness), 96, 96, 3), 180, np.uint8)
    frames[:, 66:74, 40:56] = (180 - 150 * openness[:, None, None, None]).astype(np.uint8)
    return frames


def test_mouth_motion_correlates_the_lips_opening_over_time():
    rng = np.random.default_rng(0)
    opening = rng.uniform(0, 1, 40)
    real = talking_clip(opening)
    noisy = np.clip(real.astype(int) + rng.integers(-20, 21, real.shape), 0, 255).astype(np.uint8)
    metric = MouthMotion()
    metric.update([noisy, talking_clip(np.roll(opening, 20)), talking_clip(np.zeros(40))], [real, real, real])
    result = metric.compute()
    expected = np.corrcoef(opening, np.roll(opening, 20))[0, 1]
    # in step (noise outside and inside the box) ~1; out of step the sequences' own correlation; still: 0, counted
    assert result["mouth_motion"].item() == pytest.approx((0.99 + expected + 0.0) / 3, abs=0.01)
    assert result["mouth_motion_still"] == 1
    with pytest.raises(ValueError, match=r"lips box \(62, 78, 36, 60\) lies outside frames of \(64, 64\) pixels"):
        MouthMotion().update([np.zeros((2, 64, 64))], [np.zeros((2, 64, 64))])
