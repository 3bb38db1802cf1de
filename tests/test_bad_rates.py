"""Bad rates: label and unit sidecars whose frame rate (or unit inventory) is not what a stage reads, and rate
arguments that are no multiple of the video rate. Media of other rates is converted on purpose; these cannot be
(a 25 Hz stream read as 50 Hz still looks like units), so each gives one line naming the file or value and what
was expected, exit code 2, no traceback (same style as tests/test_bad_input.py)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from test_bad_input import real_process_error, run_in_process
from test_face_renderer import SMALL as FACE

from av2av_lightning.data.sidecar import Sidecar, SidecarWriter, expect_ids_below, expect_rates, read_header
from av2av_lightning.models.hifigan import deduplicate

NUM_UNITS = 32
SMALL = {"embed_dim": 32, "layers": 1, "ffn_dim": 64, "heads": 2, "resnet_width": 4, "num_classes": [8]}


def write_sidecar(path: Path, lengths: dict[str, int], rate: float | None, k: int = NUM_UNITS, seed: int = 0) -> str:
    """Random ids in [0, k) for every key, ``rate / 25`` per video frame (rate None: one per frame)."""
    rng = np.random.default_rng(seed)
    with SidecarWriter(path, path.stem, rate, "int16") as writer:
        for key, frames in lengths.items():
            writer.add(key, rng.integers(0, k, size=round(frames * (rate or 25) / 25)))
    return str(path)


@pytest.fixture(scope="module")
def files(av_shards, tmp_path_factory) -> dict[str, str]:
    """Sidecars of the synthetic shards at several rates, and fit configs for the stages that read them."""
    root = tmp_path_factory.mktemp("bad_rates")
    lengths = av_shards.lengths
    paths = {
        "units25": write_sidecar(root / "units25.npz", lengths, 25),
        "units50": write_sidecar(root / "units50.npz", lengths, 50),
        "units50_k100": write_sidecar(root / "units50_k100.npz", lengths, 50, k=100),
        "km25": write_sidecar(root / "km25.npz", lengths, 25, k=8),
        "km100": write_sidecar(root / "km100.npz", lengths, 100, k=8),
    }
    aligned = Sidecar.load(paths["units25"])
    with (
        SidecarWriter(root / "dedup.npz", "units", None, "int16") as units,
        SidecarWriter(root / "durations.npz", "durations", None, "int16") as durations,
    ):
        for key in aligned:
            dedup, counts = deduplicate(torch.from_numpy(aligned[key].astype(np.int64)))
            units.add(key, dedup.numpy())
            durations.add(key, counts.numpy())
    paths.update(dedup=str(root / "dedup.npz"), durations=str(root / "durations.npz"))
    trainer = {
        "max_steps": 1,
        "accelerator": "cpu",
        "logger": False,
        "enable_checkpointing": False,
        "enable_progress_bar": False,
        "limit_val_batches": 0,
        "default_root_dir": str(root),
    }
    data = {"train_shards": av_shards.pattern, "num_workers": 0, "max_frames": 80}
    configs = {
        "vocoder": {
            "class_path": "av2av_lightning.vocoder.UnitVocoder",
            "init_args": {"vocoder": {"num_units": NUM_UNITS}, "unit_rate": 50, "segment_units": 4},
        },
        "face": {
            "class_path": "av2av_lightning.face_rendering.FaceRendering",
            "init_args": {"renderer": FACE, "unit_rate": 50},
        },
        "pretraining": {
            "class_path": "av2av_lightning.pretraining.AVHubertPretraining",
            "init_args": {"encoder": SMALL, "labels": ["km"], "label_rate": 100},
        },
    }
    sidecars = {"vocoder": {"units": paths["units50"]}, "face": {"units": paths["units50"]}, "pretraining": {}}
    for stage, model in configs.items():
        config = {"trainer": trainer, "model": model, "data": {**data, "sidecars": sidecars[stage]}}
        config["data"]["load_face"] = stage == "face"
        paths[f"{stage}_yaml"] = str(root / f"{stage}.yaml")
        Path(paths[f"{stage}_yaml"]).write_text(yaml.safe_dump(config))
    return paths


ROWS = [
    # (id, argv, words the error line must contain)
    (
        "vocoder-25hz-units-read-as-50hz",
        "fit --config {vocoder_yaml} --data.sidecars.units {units25}",
        ["units25.npz", "has 25 Hz", "the vocoder (unit_rate 50", "at 50 Hz"],
    ),
    (
        "vocoder-50hz-units-read-as-25hz",
        "fit --config {vocoder_yaml} --model.init_args.unit_rate 25",
        ["units50.npz", "has 50 Hz", "at 25 Hz"],
    ),
    (
        "vocoder-deduplicated-units-without-durations",
        "fit --config {vocoder_yaml} --data.sidecars.units {dedup}",
        ["dedup.npz", "no frame rate", "at 50 Hz"],
    ),
    (
        "vocoder-durations-with-aligned-units",
        "fit --config {vocoder_yaml} --model.init_args.durations durations --data.sidecars.durations {durations}",
        ["units50.npz", "has 50 Hz", "durations 'durations'", "no frame rate"],
    ),
    (
        "vocoder-units-of-another-k",
        "fit --config {vocoder_yaml} --data.sidecars.units {units50_k100}",
        ["units50_k100.npz", "unit ids up to 99", "the vocoder has 32 units", "another k"],
    ),
    ("vocoder-unit-rate-not-25-or-50", "fit --config {vocoder_yaml} --model.init_args.unit_rate 100", ["100"]),
    (
        "face-50hz-units-read-as-25hz",
        "fit --config {face_yaml} --model.init_args.unit_rate 25",
        ["units50.npz", "has 50 Hz", "the face renderer (unit_rate 25)", "at 25 Hz"],
    ),
    (
        "face-deduplicated-units",
        "fit --config {face_yaml} --data.sidecars.units {dedup}",
        ["dedup.npz", "no frame rate", "at 50 Hz"],
    ),
    (
        "face-units-of-another-k",
        "fit --config {face_yaml} --data.sidecars.units {units50_k100}",
        ["units50_k100.npz", "unit ids up to 99", "the face renderer has 32 units"],
    ),
    ("face-unit-rate-not-25-or-50", "fit --config {face_yaml} --model.init_args.unit_rate 30", ["unit_rate", "30"]),
    (
        "pretraining-label-rate-not-a-multiple-of-25",
        "fit --config {pretraining_yaml} --data.sidecars.km {km100} --model.init_args.label_rate 30",
        ["label_rate", "multiple of 25", "30"],
    ),
    (
        "sidecar-files-of-two-rates",
        "fit --config {vocoder_yaml} --data.sidecars.units [{units50},{units25}]",
        ["units50.npz (50 Hz", "units25.npz (25 Hz", "cannot merge"],
    ),
    (
        "pretraining-25hz-labels-read-as-100hz",
        "fit --config {pretraining_yaml} --data.sidecars.km {km25}",
        ["km25.npz", "has 25 Hz", "at 100 Hz"],
    ),
]


@pytest.mark.parametrize(("row", "command", "words"), [pytest.param(*row, id=row[0]) for row in ROWS])
def test_a_rate_that_cannot_be_converted_is_one_line_naming_it(row, command, words, files, capsys):
    argv = command.format(**files).split()
    code, lines = run_in_process(argv, capsys)
    assert code == 2
    assert len(lines) == 1 and lines[0].startswith(f"av2av {argv[0]}: error: "), lines
    for word in words:
        assert word in lines[0], (word, lines[0])


def test_the_whole_stderr_of_a_real_process_has_no_traceback(files):
    command = dict((r[0], r[1]) for r in ROWS)["vocoder-25hz-units-read-as-50hz"]
    assert "units25.npz" in real_process_error(command.format(**files))


def test_expected_rates_and_ids_pass_and_unlisted_sidecars_are_skipped(files):
    assert read_header(files["units25"])["rate"] == 25.0 and read_header(files["dedup"])["rate"] is None
    sidecars = {"units": [files["units50"], files["units50"]], "durations": files["durations"]}
    expect_rates(sidecars, {"units": 50, "durations": None, "absent": 25}, "a reader")
    expect_ids_below(sidecars, "units", NUM_UNITS, "a reader")
    with pytest.raises(ValueError, match=r"units25\.npz: sidecar 'units' has 25 Hz, but a reader reads it at 50 Hz"):
        expect_rates({"units": [files["units50"], files["units25"]]}, {"units": 50}, "a reader")
    with pytest.raises(ValueError, match="unit ids up to 31, but a reader has 8 units"):
        expect_ids_below(sidecars, "units", 8, "a reader")
