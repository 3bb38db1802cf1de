"""Writing WebDataset shards with balanced sample counts, and the corpus manifest."""

from __future__ import annotations

import json
import math
import os
from collections.abc import Iterable, Sequence
from pathlib import Path

import webdataset as wds

from av2av_lightning.data.schema import AUDIO_FIELD, FACE_FIELD, LIP_FIELD, META_FIELD


def shard_sizes(num_samples: int, max_per_shard: int) -> list[int]:
    """Split `num_samples` into the fewest shards of at most `max_per_shard`, sizes differing by at most one."""
    if num_samples <= 0:
        return []
    count = math.ceil(num_samples / max_per_shard)
    base, extra = divmod(num_samples, count)
    return [base + (1 if index < extra else 0) for index in range(count)]


def write_shards(
    records: Sequence[dict] | Iterable[dict], num_samples: int, prefix: str | Path, max_per_shard: int = 200
) -> list[Path]:
    """Write WebDataset records (dicts with `__key__` and byte fields) to `{prefix}-{i:06d}.tar`.

    Each tar is written to a temporary name and renamed, so a killed writer never leaves a
    truncated shard behind a valid name.
    """
    prefix = Path(prefix)
    prefix.parent.mkdir(parents=True, exist_ok=True)
    iterator = iter(records)
    paths = []
    for index, size in enumerate(shard_sizes(num_samples, max_per_shard)):
        path = prefix.parent / f"{prefix.name}-{index:06d}.tar"
        partial = path.with_suffix(".tar.partial")
        with wds.TarWriter(str(partial), mtime=0) as sink:  # fixed mtime: reproducible shards
            for _ in range(size):
                sink.write(next(iterator))
        os.replace(partial, path)
        paths.append(path)
    return paths


def sample_record(key: str, meta_json: bytes, audio: bytes, lip: bytes, face: bytes | None = None) -> dict:
    record = {"__key__": key, META_FIELD: meta_json, AUDIO_FIELD: audio, LIP_FIELD: lip}
    if face is not None:
        record[FACE_FIELD] = face
    return record


def write_manifest(path: str | Path, manifest: dict) -> None:
    path = Path(path)
    partial = path.with_suffix(".partial")
    partial.write_text(json.dumps(manifest, indent=2, ensure_ascii=False) + "\n")
    os.replace(partial, path)


def read_manifest(path: str | Path) -> dict:
    path = Path(path)
    if path.is_dir():
        path = path / "manifest.json"
    if not path.exists():
        raise FileNotFoundError(f"{path}: no corpus manifest (build one with `av2av corpus build`)")
    return json.loads(path.read_text())
