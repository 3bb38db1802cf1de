"""`log_media_table`: an offline W&B run receives one table of generated vs reference audio and video per call,
with the given columns and one row per sample; a CSV-only trainer gets nothing and never imports wandb."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import lightning as L
import pytest
import torch
from lightning.pytorch.loggers import WandbLogger

from av2av_lightning.data.schema import SAMPLE_RATE
from av2av_lightning.logging_utils import _cell, log_media_table

ROOT = Path(__file__).parents[1]


class MediaModule(L.LightningModule):
    """Logs two samples (waveforms and 5-frame 32x32 clips next to their references) in its validation step."""

    def __init__(self) -> None:
        super().__init__()
        self.layer = torch.nn.Linear(1, 1)
        self.received = None

    def validation_step(self, batch, batch_idx: int) -> None:
        generator = torch.Generator().manual_seed(batch_idx)
        rows = [
            {
                "key": f"clip{i}",
                "generated": torch.rand(SAMPLE_RATE // 10, generator=generator) * 2 - 1,
                "reference": torch.rand(SAMPLE_RATE // 10, generator=generator) * 2 - 1,
                "generated_video": torch.rand(5, 3, 32, 32, generator=generator),
                "reference_video": torch.rand(5, 3, 32, 32, generator=generator),
            }
            for i in range(2)
        ]
        self.received = log_media_table(self.trainer, "val/samples", rows)


def validate(logger, tmp_path) -> MediaModule:
    module = MediaModule()
    trainer = L.Trainer(accelerator="cpu", logger=logger, default_root_dir=tmp_path, enable_progress_bar=False)
    trainer.validate(module, torch.utils.data.DataLoader(torch.zeros(1, 1)), verbose=False)
    return module


def test_offline_run_receives_the_media_table(tmp_path, monkeypatch):
    import wandb

    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    logger = WandbLogger(save_dir=str(tmp_path), project="media-test")
    try:
        module = validate(logger, tmp_path)
        run_dir = logger.experiment.dir
    finally:
        wandb.finish()
    assert module.received == 1
    [table_file] = list((tmp_path / "wandb").glob("offline-run-*/files/media/table/val/samples_*.table.json"))
    assert table_file.parent.parent.parent.parent.samefile(run_dir)
    table = json.loads(table_file.read_text())
    assert table["columns"] == ["key", "generated", "reference", "generated_video", "reference_video"]
    assert len(table["data"]) == 2 and [row[0] for row in table["data"]] == ["clip0", "clip1"]
    # a run-level table file names each media cell's type (W&B keeps the media with the run's table artifact)
    assert [row[1:] for row in table["data"]] == [["Audio", "Audio", "Video", "Video"]] * 2


def test_media_cells_are_wav_audio_and_mp4_video():
    import wandb

    audio = _cell(wandb, torch.zeros(1600), "clip audio", SAMPLE_RATE, 25)
    video = _cell(wandb, torch.rand(5, 3, 32, 32), "clip video", SAMPLE_RATE, 25)
    assert isinstance(audio, wandb.Audio) and audio._path.endswith(".wav") and audio._caption == "clip audio"
    assert isinstance(video, wandb.Video) and video._path.endswith(".mp4") and Path(video._path).stat().st_size > 0
    assert _cell(wandb, "clip", "clip key", SAMPLE_RATE, 25) == "clip"


def test_media_cell_of_an_unknown_shape_is_a_one_line_error():
    import wandb

    with pytest.raises(ValueError, match=r"^media cell 'x generated': expected a waveform .* got \(2, 2\)$"):
        _cell(wandb, torch.zeros(2, 2), "x generated", SAMPLE_RATE, 25)


def test_csv_logger_gets_nothing_and_wandb_is_never_imported(tmp_path):
    """In a fresh interpreter, so an earlier import of wandb in this session does not hide one."""
    script = f"""
import sys
from lightning.pytorch.loggers import CSVLogger
from tests.test_wandb_media import validate
module = validate(CSVLogger({str(tmp_path)!r}), {str(tmp_path)!r})
assert module.received == 0, module.received
assert "wandb" not in sys.modules
"""
    result = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]


def test_nothing_without_loggers(tmp_path):
    assert validate(False, tmp_path).received == 0
