"""Real-dataset converters (LRS3, MuAViC, LRW), media reading and safe archive extraction,
each on a tiny tree in the dataset's published layout written here with PyAV."""

from __future__ import annotations

import io
import json
import tarfile
import zipfile
from collections import defaultdict
from pathlib import Path

import av
import numpy as np
import pytest
import soundfile as sf

from av2av_lightning.data.codecs import decode_audio, decode_video
from av2av_lightning.data.schema import SAMPLES_PER_FRAME, SampleMeta
from data_prep.converters.archive import safe_extract
from data_prep.converters.common import ConvertOptions
from data_prep.converters.lrs3 import convert_lrs3, parse_transcript
from data_prep.converters.lrw import convert_lrw
from data_prep.converters.media import MediaError, MediaSource, load_clip
from data_prep.converters.muavic import convert_muavic, read_translations

QUIET = ConvertOptions(max_per_shard=2, progress=False)


def write_mp4(path: Path, frames: np.ndarray, fps: int = 25, audio_rate: int | None = 16000, channels: int = 1) -> Path:
    """H.264 video of uint8 RGB frames [F,H,W,3], with an AAC track of a tone when ``audio_rate`` is set."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with av.open(str(path), mode="w") as container:
        video = container.add_stream("libx264", rate=fps)
        video.width, video.height, video.pix_fmt = frames.shape[2], frames.shape[1], "yuv420p"
        audio = None
        if audio_rate:
            audio = container.add_stream("aac", rate=audio_rate, layout="stereo" if channels == 2 else "mono")
        for frame in frames:
            container.mux(video.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")))
        container.mux(video.encode())
        if audio is not None:
            t = np.arange(int(len(frames) / fps * audio_rate)) / audio_rate
            wave = np.tile((0.3 * np.sin(2 * np.pi * 440 * t)).astype(np.float32), (channels, 1))
            for start in range(0, wave.shape[1], 1024):
                chunk = av.AudioFrame.from_ndarray(
                    np.ascontiguousarray(wave[:, start : start + 1024]), format="fltp", layout=audio.layout.name
                )
                chunk.sample_rate, chunk.pts = audio_rate, start
                container.mux(audio.encode(chunk))
            container.mux(audio.encode())
    return path


def frames_of(count: int, size: int = 64, value: int = 40) -> np.ndarray:
    return np.full((count, size, size, 3), value, dtype=np.uint8)


def read_shards(out: Path, subset: str) -> dict[str, dict]:
    """{key: {field: bytes}} of every shard of a subset."""
    records: dict[str, dict] = defaultdict(dict)
    for shard in sorted((out / subset).glob("*.tar")):
        with tarfile.open(shard) as tar:
            for member in tar:
                key, field = member.name.split(".", 1)
                records[key][field] = tar.extractfile(member).read()
    return dict(records)


def check_sample(record: dict, face: bool = True) -> SampleMeta:
    meta = SampleMeta.from_json(record["json"])
    assert len(decode_audio(record["flac"])) == meta.num_frames * SAMPLES_PER_FRAME
    assert decode_video(record["lip.mp4"]).shape == (meta.num_frames, 96, 96)
    if face:
        assert decode_video(record["face.mp4"], gray=False).shape == (meta.num_frames, 96, 96, 3)
    return meta


LRS3_TXT = "Text:  HELLO THERE WORLD\nConf:  4\n\nWORD START END ASDSCORE\nHELLO 0.10 0.30 2.1\nTHERE 0.30 0.50 1.0\n"


@pytest.fixture(scope="module")
def lrs3_root(tmp_path_factory) -> Path:
    """trainval: spk_a/00001 (25 fps, 44.1 kHz stereo), spk_b/00002 (30 fps, with a .lip.mp4); test: a 20-frame clip and a corrupt one."""
    root = tmp_path_factory.mktemp("lrs3")
    write_mp4(root / "trainval/spk_a/00001.mp4", frames_of(20), audio_rate=44100, channels=2)
    write_mp4(root / "trainval/spk_b/00002.mp4", frames_of(30), fps=30)
    write_mp4(root / "trainval/spk_b/00002.lip.mp4", frames_of(30, 48, value=200), fps=30, audio_rate=None)
    write_mp4(root / "test/spk_c/00003.mp4", frames_of(20))
    (root / "test/spk_c/00004.mp4").write_bytes(b"not an mp4 at all" * 50)
    for txt in ("trainval/spk_a/00001", "trainval/spk_b/00002", "test/spk_c/00003", "test/spk_c/00004"):
        (root / f"{txt}.txt").write_text(LRS3_TXT)
    return root


@pytest.fixture(scope="module")
def lrs3_out(lrs3_root, tmp_path_factory) -> tuple[Path, dict]:
    out = tmp_path_factory.mktemp("lrs3_out")
    return out, convert_lrs3(lrs3_root, out, QUIET).manifest


def test_lrs3_transcript_parsing(lrs3_root):
    text, words = parse_transcript(lrs3_root / "test/spk_c/00003.txt")
    assert text == "hello there world"
    assert words == [("hello", 0.1, 0.3), ("there", 0.3, 0.5)]


def test_lrs3_shards_decode_with_splits_text_and_rates(lrs3_out):
    out, manifest = lrs3_out
    records = read_shards(out, "sentences")
    metas = {key: check_sample(record) for key, record in records.items()}
    a, b = metas["lrs3-trainval-spk_a-00001"], metas["lrs3-trainval-spk_b-00002"]
    assert (a.split, b.split, metas["lrs3-test-spk_c-00003"].split) == ("train", "train", "test")
    assert a.sentence_id == "spk_a/00001" and a.speaker == "spk_a" and a.lang == "en"
    assert a.text == "hello there world" and a.words == [("hello", 0.1, 0.3), ("there", 0.3, 0.5)]
    assert a.num_frames == 20 and b.num_frames == 25  # 30 frames at 30 fps -> 1 s at 25 fps
    assert np.abs(decode_audio(records[a.key]["flac"])).max() > 0.1  # 44.1 kHz stereo tone survived
    lip_b = decode_video(records[b.key]["lip.mp4"])
    assert lip_b.mean() > 180  # the bright .lip.mp4, not a crop of the dark face video
    info = manifest["subsets"]["sentences"]
    assert info["train"]["samples"] == 2 and info["test"]["samples"] == 1
    assert info["train"]["shards"] == ["sentences/train-000000.tar"] and info["train"]["hours"] > 0
    assert manifest["fps"] == 25 and manifest["sample_rate"] == 16000 and manifest["languages"] == ["en"]


def test_lrs3_corrupt_video_is_skipped_and_counted(lrs3_root, tmp_path, caplog):
    manifest = convert_lrs3(lrs3_root, tmp_path, ConvertOptions(progress=False, face=False)).manifest
    assert "00004.mp4" in caplog.text and "skipped lrs3-test-spk_c-00004" in caplog.text
    assert manifest["skipped"]["count"] == 1
    assert manifest["skipped"]["samples"][0]["key"] == "lrs3-test-spk_c-00004"
    assert "00004.mp4" in manifest["skipped"]["samples"][0]["reason"]


def test_lrs3_valid_fraction_moves_whole_speakers(lrs3_root, tmp_path):
    manifest = convert_lrs3(
        lrs3_root, tmp_path, ConvertOptions(progress=False, face=False), valid_fraction=0.9999
    ).manifest
    assert "train" not in manifest["subsets"]["sentences"] and manifest["subsets"]["sentences"]["valid"]["samples"] == 2
    assert "face.mp4" not in next(iter(read_shards(tmp_path, "sentences").values()))


def test_reconversion_leaves_no_stale_shards(lrs3_root, tmp_path):
    convert_lrs3(lrs3_root, tmp_path, ConvertOptions(progress=False, face=False, max_per_shard=1))
    assert len(list((tmp_path / "sentences").glob("train-*.tar"))) == 2
    convert_lrs3(lrs3_root, tmp_path, ConvertOptions(progress=False, face=False, max_per_shard=2))
    assert sorted(p.name for p in (tmp_path / "sentences").glob("train-*.tar")) == ["train-000000.tar"]


def test_bbox_crop_picks_the_box(tmp_path):
    frames = frames_of(10, 120, value=20)
    frames[:, 70:110, 20:60] = 250  # the "mouth"
    video = write_mp4(tmp_path / "clip.mp4", frames)
    (tmp_path / "clip.bbox.txt").write_text("# x0 y0 x1 y1\n" + "20,70,60,110\n" * 10)
    clip = load_clip(MediaSource.beside(video))
    assert clip.lip.shape == (10, 96, 96) and clip.lip[:, 8:-8, 8:-8].mean() > 230
    assert clip.face.shape == (10, 96, 96, 3) and clip.face.mean() < 100
    assert len(clip.audio) == 10 * SAMPLES_PER_FRAME


def test_media_errors_name_the_file(tmp_path):
    video = write_mp4(tmp_path / "clip.mp4", frames_of(10))
    (tmp_path / "clip.bbox.json").write_text(json.dumps([[0, 0, 32, 32]] * 7))
    with pytest.raises(MediaError, match="7 boxes for the 10 frames"):
        load_clip(MediaSource.beside(video))
    silent = write_mp4(tmp_path / "silent.mp4", frames_of(5), audio_rate=None)
    with pytest.raises(MediaError, match="silent.mp4: no audio stream"):
        load_clip(MediaSource.beside(silent))
    with pytest.raises(MediaError, match="missing.mp4: no such file"):
        load_clip(MediaSource(tmp_path / "missing.mp4"))
    wav = tmp_path / "audio.wav"
    sf.write(wav, np.zeros(1600, dtype=np.float32), 16000)
    with pytest.raises(MediaError, match="audio.wav: no video stream"):
        load_clip(MediaSource(wav, video_is_lip=True))


def write_muavic_tsv(folder: Path, split: str, rows: list[tuple[str, str, str]]) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    tsv = folder / f"{split}.tsv"
    tsv.write_text("/nonexistent/root\n" + "".join(f"{i}\t{v}\t{a}\t25\t16000\n" for i, v, a in rows))
    return tsv


@pytest.fixture
def muavic_root(tmp_path) -> Path:
    """en recognition data (2 test clips) and an en-fr pair folder with their translations."""
    root = tmp_path / "muavic"
    for name in ("a", "b"):
        write_mp4(root / f"video/{name}.mp4", frames_of(12, 96, value=180), audio_rate=None)
        write_mp4(root / f"audio/{name}.m4a", frames_of(12), audio_rate=16000)  # audio read from its own file
    rows = [("test/spk1/00001", "video/a.mp4", "audio/a.m4a"), ("test/spk2/00002", "video/b.mp4", "audio/b.m4a")]
    write_muavic_tsv(root / "en", "test", rows)
    (root / "en/test.en").write_text("hello world\ngood morning\n")
    write_muavic_tsv(root / "en-fr", "test", rows)
    (root / "en-fr/test.en").write_text("hello world\ngood morning\n")
    (root / "en-fr/test.fr").write_text("bonjour le monde\nbonjour\n")
    return root


def test_muavic_shards_and_translation_sidecar(muavic_root, tmp_path):
    converted = convert_muavic(muavic_root, tmp_path / "out", QUIET)
    records = read_shards(tmp_path / "out", "sentences")
    metas = {key: check_sample(record, face=False) for key, record in records.items()}
    meta = metas["muavic-en-test-test_spk1_00001"]
    assert meta.text == "hello world" and meta.sentence_id == "test/spk1/00001" and meta.speaker == "spk1"
    assert meta.num_frames == 12 and decode_video(records[meta.key]["lip.mp4"]).mean() > 150
    translations = read_translations(tmp_path / "out")
    assert translations == {
        "muavic-en-test-test_spk1_00001": {"fr": "bonjour le monde"},
        "muavic-en-test-test_spk2_00002": {"fr": "bonjour"},
    }
    assert converted.manifest["translations"] == "translations.jsonl"


def test_muavic_line_mismatch_names_both_files(muavic_root, tmp_path):
    (muavic_root / "en-fr/test.fr").write_text("bonjour le monde\n")
    with pytest.raises(ValueError, match=r"test\.fr has 1 lines but .*test\.tsv lists 2"):
        convert_muavic(muavic_root, tmp_path / "out", QUIET)
    with pytest.raises(ValueError, match="no MuAViC data for language"):
        convert_muavic(muavic_root, tmp_path / "out", QUIET, langs=["de"])


def test_lrw_word_clips(tmp_path):
    root = tmp_path / "lrw"
    write_mp4(root / "ABOUT/train/ABOUT_00001.mp4", frames_of(29))
    (root / "ABOUT/train/ABOUT_00001.txt").write_text("Text: ABOUT\nConf: 5\n\nDuration: 0.52 seconds\n")
    write_mp4(root / "ABOUT/val/ABOUT_00002.mp4", frames_of(27), fps=25)
    converted = convert_lrw(root, tmp_path / "out", QUIET)
    metas = {k: check_sample(r) for k, r in read_shards(tmp_path / "out", "words").items()}
    train, valid = metas["lrw-train-ABOUT_00001"], metas["lrw-valid-ABOUT_00002"]
    assert train.kind == "word" and train.label == "about" and train.split == "train" and valid.split == "valid"
    assert train.num_frames == valid.num_frames == 29
    assert train.words == [("about", 0.32, 0.84)] and valid.words == []
    assert set(converted.manifest["subsets"]["words"]) == {"train", "valid"}


def test_archive_extraction_and_refusals(tmp_path):
    good = tmp_path / "good.tar.gz"
    with tarfile.open(good, "w:gz") as tar:
        _add(tar, "data/a.txt", b"hello")
        link = tarfile.TarInfo("data/link")
        link.type, link.linkname = tarfile.SYMTYPE, "a.txt"
        tar.addfile(link)
    assert safe_extract(good, tmp_path / "x") == 2 and (tmp_path / "x/data/a.txt").read_bytes() == b"hello"
    for name, linkname in (
        ("../evil", None),
        ("/abs/evil", None),
        ("data/esc", "../../outside"),
        ("data/abs", "/etc/passwd"),
    ):
        bad = tmp_path / "bad.tar"
        with tarfile.open(bad, "w") as tar:
            if linkname is None:
                _add(tar, name, b"x")
            else:
                link = tarfile.TarInfo(name)
                link.type, link.linkname = tarfile.SYMTYPE, linkname
                tar.addfile(link)
        with pytest.raises(ValueError, match=repr(name).replace(".", r"\.")):
            safe_extract(bad, tmp_path / "y")
    assert not (tmp_path / "evil").exists()
    archive = tmp_path / "bad.zip"
    with zipfile.ZipFile(archive, "w") as zf:
        zf.writestr("ok.txt", b"fine")
        zf.writestr("../evil.txt", b"x")
    with pytest.raises(ValueError, match="evil.txt"):
        safe_extract(archive, tmp_path / "z")
    device = tmp_path / "dev.tar"
    with tarfile.open(device, "w") as tar:
        info = tarfile.TarInfo("null")
        info.type = tarfile.CHRTYPE
        tar.addfile(info)
    with pytest.raises(ValueError, match="device"):
        safe_extract(device, tmp_path / "w")


@pytest.mark.parametrize(
    "links",
    [
        [("s1", ".", tarfile.SYMTYPE), ("s2", "s1/..", tarfile.SYMTYPE)],  # escapes only through the first link
        [("hard", "../outside", tarfile.LNKTYPE)],
    ],
)
def test_archive_refuses_link_chains_and_hard_links_outside(tmp_path, links):
    archive = tmp_path / "links.tar"
    with tarfile.open(archive, "w") as tar:
        for name, target, kind in links:
            info = tarfile.TarInfo(name)
            info.type, info.linkname = kind, target
            tar.addfile(info)
    with pytest.raises(ValueError, match=f"member '{links[-1][0]}'"):
        safe_extract(archive, tmp_path / "out")


def _add(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    tar.addfile(info, io.BytesIO(data))


def test_cli_converts_and_empty_root_is_one_line_error(lrs3_root, tmp_path, capsys):
    from av2av_lightning.cli import main

    out = tmp_path / "out"
    assert (
        main(["convert", "lrs3", str(lrs3_root), "--out", str(out), "--quiet", "--limit", "1", "--workers", "2"]) == 0
    )
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["subsets"]["sentences"]["train"]["samples"] == 1
    assert manifest["skipped"]["count"] == 0 and manifest["subsets"]["sentences"]["test"]["samples"] == 1
    capsys.readouterr()
    empty = tmp_path / "empty"
    empty.mkdir()
    assert main(["convert", "lrs3", str(empty), "--out", str(tmp_path / "o2")]) == 2
    err = capsys.readouterr().err
    assert err.strip().count("\n") == 0 and "empty" in err and "trainval" in err and "Traceback" not in err
