"""Per-sample data added by later stages (cluster labels, units), stored beside the shards.

A sidecar is one ``.npz`` file (readable with ``np.load(path, allow_pickle=False)``) with:

- ``header``: a 0-d string array holding JSON ``{"name", "rate", "dtype", "count", "shape", "version"}``
  (and ``source``, what the values were computed from, when the writer was told);
  ``rate`` is the frame rate in Hz (25, 50, 100, ...) or ``null`` for sequences not aligned
  with the video (e.g. de-duplicated units);
- ``keys``: ``[N]`` unicode sample keys;
- ``offsets``: ``[N + 1]`` int64, sample ``i`` is ``values[offsets[i]:offsets[i+1]]``;
- ``values``: all samples concatenated along the first axis (trailing dims, if any, shared).

The writer collects everything in memory and writes once on `close` to a temporary name,
then renames (``os.replace``), so a killed job never leaves a half-written sidecar under
the real name. The source shards are never touched.

Label rates are never converted: labels at the wrong rate still look like labels and would train on
misaligned targets, so a stage names the rate it reads and `expect_rates` refuses any other.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path

import numpy as np

SIDECAR_VERSION = 1

__all__ = ["Sidecar", "SidecarWriter", "expect_ids_below", "expect_rates", "read_header"]


def _rate(rate_hz) -> float | None:
    if rate_hz is None:
        return None
    rate = float(rate_hz)
    if rate <= 0:
        raise ValueError(f"sidecar rate must be positive or None, got {rate_hz}")
    return rate


def _describe(rate: float | None) -> str:
    return "no frame rate (not frame-aligned)" if rate is None else f"{rate:g} Hz"


def _open(path: str | Path) -> tuple[Path, np.lib.npyio.NpzFile]:
    """The sidecar file (``.npz`` appended when only that exists), opened lazily and checked for its members."""
    path = Path(path)
    if not path.exists() and path.with_name(path.name + ".npz").exists():
        path = path.with_name(path.name + ".npz")
    if not path.exists():
        raise FileNotFoundError(f"{path}: no such sidecar file")
    try:
        data = np.load(path, allow_pickle=False)
    except (OSError, ValueError) as err:
        raise ValueError(f"{path}: not a sidecar .npz file ({err})") from None
    if not isinstance(data, np.lib.npyio.NpzFile):
        raise ValueError(f"{path}: not a sidecar .npz file (a plain .npy array)")
    missing = {"header", "keys", "offsets", "values"} - set(data.files)
    if missing:
        data.close()
        raise ValueError(f"{path}: not a sidecar (lacks {', '.join(sorted(missing))})")
    return path, data


def read_header(path: str | Path) -> dict:
    """A sidecar's header (name, rate, dtype, count, ...) without reading its values."""
    path, data = _open(path)
    with data:
        return json.loads(str(data["header"]))


def expect_rates(sidecars: Mapping[str, str | Path | list], rates: Mapping[str, float | None], reader: str) -> None:
    """Refuse sidecar files whose frame rate is not the one ``reader`` reads them at (None: not frame-aligned).

    Args:
        sidecars: ``name -> path or list of paths`` (a datamodule's ``sidecars``); names not listed are skipped.
        rates: ``name -> the rate expected``.
        reader: who reads them, for the message (e.g. ``"the vocoder (unit_rate 50)"``).
    """
    for name, rate in rates.items():
        for path in _paths(sidecars, name):
            found = read_header(path).get("rate")
            if found != (None if rate is None else float(rate)):
                raise ValueError(
                    f"{path}: sidecar {name!r} has {_describe(found)}, but {reader} reads it at {_describe(rate)} "
                    "(label rates are not converted)"
                )


def _paths(sidecars: Mapping[str, str | Path | list], name: str) -> list[str | Path]:
    paths = sidecars.get(name)
    return [paths] if isinstance(paths, (str, Path)) else list(paths or [])


def expect_ids_below(sidecars: Mapping[str, str | Path | list], name: str, count: int, reader: str) -> None:
    """Refuse a unit sidecar holding ids ``>= count``: units of another k than ``reader``'s table was built for."""
    for path in _paths(sidecars, name):
        values = Sidecar.load(path)._values
        top = int(values.max()) if values.size else -1
        if top >= count:
            raise ValueError(
                f"{path}: sidecar {name!r} has unit ids up to {top}, but {reader} has {count} units "
                f"(ids 0..{count - 1}): units of another k"
            )


class SidecarWriter:
    """Collect ``key -> array`` pairs and write them as one sidecar file.

    Args:
        path: output file (``.npz`` is appended when missing).
        name: what the data is (``km100``, ``units``); used in messages and batch fields.
        rate_hz: frames per second of the arrays (25, 50, 100), or None if not time-aligned.
        dtype: numpy dtype the arrays are stored in (e.g. ``int16`` for up to 32767 clusters).
        source: JSON-able description of what the values were computed from (e.g. a unit source's spec and noise),
            stored in the header as ``source``.
    """

    def __init__(
        self, path: str | Path, name: str, rate_hz: float | None, dtype="int32", source: dict | None = None
    ) -> None:
        path = Path(path)
        self.path = path if path.suffix == ".npz" else path.with_name(path.name + ".npz")
        self.name = str(name)
        self.rate = _rate(rate_hz)
        self.dtype = np.dtype(dtype)
        self.source = source
        self._keys: list[str] = []
        self._seen: set[str] = set()
        self._values: list[np.ndarray] = []
        self._trailing: tuple[int, ...] | None = None
        self._closed = False

    def add(self, key: str, values: np.ndarray) -> None:
        if self._closed:
            raise RuntimeError(f"sidecar {self.path} is already closed")
        if key in self._seen:
            raise ValueError(f"sidecar {self.name}: key {key!r} added twice")
        array = np.asarray(values)
        if array.ndim == 0:
            raise ValueError(f"sidecar {self.name}: {key} needs an array with a time axis, got a scalar")
        if array.dtype.kind in "iu" and self.dtype.kind in "iu" and array.size:
            info = np.iinfo(self.dtype)
            if array.min() < info.min or array.max() > info.max:
                raise ValueError(f"sidecar {self.name}: {key} has values outside {self.dtype}")
        trailing = tuple(array.shape[1:])
        if self._trailing is None:
            self._trailing = trailing
        elif trailing != self._trailing:
            raise ValueError(f"sidecar {self.name}: {key} has trailing shape {trailing}, others {self._trailing}")
        self._seen.add(key)
        self._keys.append(str(key))
        self._values.append(array.astype(self.dtype, copy=False))

    def update(self, items: Mapping[str, np.ndarray] | Iterable[tuple[str, np.ndarray]]) -> None:
        for key, values in items.items() if isinstance(items, Mapping) else items:
            self.add(key, values)

    def close(self) -> Path:
        """Write the file atomically and return its path. Closing twice is a no-op."""
        if self._closed:
            return self.path
        trailing = self._trailing or ()
        lengths = np.array([len(v) for v in self._values], dtype=np.int64)
        offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
        values = np.concatenate(self._values) if self._values else np.zeros((0, *trailing), dtype=self.dtype)
        header = {
            "name": self.name,
            "rate": self.rate,
            "dtype": self.dtype.str,
            "count": len(self._keys),
            "shape": list(trailing),
            "version": SIDECAR_VERSION,
        }
        if self.source is not None:
            header["source"] = self.source
        self.path.parent.mkdir(parents=True, exist_ok=True)
        partial = self.path.with_name(self.path.name + f".partial-{os.getpid()}")
        try:
            with open(partial, "wb") as handle:
                np.savez(
                    handle,
                    header=np.array(json.dumps(header)),
                    keys=np.array(self._keys, dtype=str) if self._keys else np.zeros(0, dtype="<U1"),
                    offsets=offsets,
                    values=values,
                )
            os.replace(partial, self.path)
        finally:
            if partial.exists():
                partial.unlink()
        self._closed = True
        self._values = []
        return self.path

    def __enter__(self) -> SidecarWriter:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.close()


class Sidecar(Mapping[str, np.ndarray]):
    """Read-only ``key -> array`` view of one or more sidecar files, with ``.name``, ``.rate``, ``.dtype``."""

    def __init__(
        self,
        name: str,
        rate: float | None,
        dtype: np.dtype,
        keys: np.ndarray,
        offsets: np.ndarray,
        values: np.ndarray,
        source: str = "<sidecar>",
    ) -> None:
        self.name = name
        self.rate = rate
        self.dtype = np.dtype(dtype)
        self.source = source
        self._offsets = offsets
        self._values = values
        self._index = {str(key): i for i, key in enumerate(keys.tolist())}
        if len(self._index) != len(keys):
            raise ValueError(f"{source}: duplicate keys in sidecar {name}")

    @classmethod
    def load(cls, path: str | Path | Iterable[str | Path]) -> Sidecar:
        """Load a sidecar; a list of paths (same rate and dtype) is merged into one view."""
        if not isinstance(path, (str, Path)):
            parts = [cls.load(p) for p in path]
            if not parts:
                raise ValueError("Sidecar.load got an empty list of paths")
            return cls.merge(parts)
        path, data = _open(path)
        with data:
            header = json.loads(str(data["header"]))
            keys, offsets, values = data["keys"], data["offsets"], data["values"]
        if len(offsets) != len(keys) + 1 or offsets[-1] != len(values):
            raise ValueError(f"{path}: inconsistent sidecar offsets")
        return cls(header["name"], header["rate"], np.dtype(header["dtype"]), keys, offsets, values, str(path))

    @classmethod
    def merge(cls, parts: list[Sidecar]) -> Sidecar:
        first = parts[0]
        for part in parts[1:]:
            if part.rate != first.rate or part.dtype != first.dtype:
                raise ValueError(
                    f"cannot merge sidecars {first.source} ({_describe(first.rate)}, {first.dtype}) and "
                    f"{part.source} ({_describe(part.rate)}, {part.dtype}): rate or dtype differ"
                )
        keys = np.concatenate([np.array(list(p._index), dtype=str) for p in parts])
        values = np.concatenate([p._values for p in parts])
        lengths = np.concatenate([np.diff(p._offsets) for p in parts])
        offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
        return cls(first.name, first.rate, first.dtype, keys, offsets, values, "+".join(p.source for p in parts))

    def __getitem__(self, key: str) -> np.ndarray:
        index = self._index[key]
        return self._values[self._offsets[index] : self._offsets[index + 1]]

    def __contains__(self, key: object) -> bool:
        return key in self._index

    def __iter__(self) -> Iterator[str]:
        return iter(self._index)

    def __len__(self) -> int:
        return len(self._index)

    def __repr__(self) -> str:
        return f"Sidecar(name={self.name!r}, rate={self.rate}, dtype={self.dtype}, count={len(self)}, source={self.source!r})"
