"""MuAViC (multilingual audio-visual corpus) in its published manifest layout.

- speech recognition data: ``ROOT/{lang}/{split}.tsv`` with ``{split}.{lang}``;
- translation pairs: ``ROOT/{src}-{tgt}/`` (or nested, ``ROOT/{src}/{tgt}/``) with
  ``{split}.tsv``, ``{split}.{src}`` and ``{split}.{tgt}``.

A ``.tsv`` is AV-HuBERT's manifest: the first line is a root folder, then one line per clip
``id <TAB> video_path <TAB> audio_path <TAB> num_video_frames <TAB> num_audio_samples``;
the text files hold one line per tsv row, in the same order. Paths are tried against the
tsv's root line, the tsv's folder and ROOT, so a copied dataset still resolves. The videos
are AV-HuBERT mouth ROIs, so MuAViC samples have no face stream.

Samples go to shards with the source transcript as text; translations go beside the
shards into ``translations.jsonl``, one ``{"key": ..., "translations": {lang: text}}`` per
line (read it with `read_translations`). Speakers are not in the manifests: the id's
folder (LRS3 ids ``.../SPEAKER/NNNNN``) or its prefix before the last ``_`` (mTEDx talk
ids) stands in for one.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

from av2av_lightning.data.schema import SampleMeta
from data_prep.converters.common import (
    DEFAULT_OPTIONS,
    Converted,
    ConvertOptions,
    SampleTask,
    convert,
    make_key,
    no_samples,
)
from data_prep.converters.media import MediaSource

LAYOUT = "ROOT/{lang}/{split}.tsv + {split}.{lang}, ROOT/{src}-{tgt}/{split}.tsv + {split}.{src} + {split}.{tgt}"
TRANSLATIONS_FILE = "translations.jsonl"
SPLIT_NAMES = {"train": "train", "valid": "valid", "dev": "valid", "val": "valid", "test": "test"}
LANG = re.compile(r"^[a-z]{2,3}$")
PAIR = re.compile(r"^([a-z]{2,3})-([a-z]{2,3})$")


def read_lines(path: Path) -> list[str]:
    if not path.is_file():
        raise FileNotFoundError(f"{path}: missing text file (line-aligned with the .tsv beside it)")
    return path.read_text(encoding="utf-8").splitlines()


def read_tsv(path: Path) -> tuple[str, list[list[str]]]:
    """The root line and the rows ``[id, video, audio, frames, samples]`` of an AV-HuBERT manifest."""
    lines = path.read_text(encoding="utf-8").splitlines()
    if not lines:
        raise ValueError(f"{path}: empty manifest (expected a root folder line, then one line per clip)")
    rows = []
    for number, line in enumerate(lines[1:], start=2):
        fields = line.split("\t")
        if len(fields) != 5:
            raise ValueError(
                f"{path}:{number}: expected 5 tab-separated fields "
                f"(id, video_path, audio_path, num_video_frames, num_audio_samples), got {len(fields)}"
            )
        rows.append(fields)
    return lines[0].strip(), rows


def aligned_text(tsv: Path, count: int, lang: str) -> list[str]:
    """The ``{split}.{lang}`` lines of ``tsv``; a different line count is an error naming both files."""
    text_file = tsv.with_suffix(f".{lang}")
    lines = read_lines(text_file)
    if len(lines) != count:
        raise ValueError(
            f"{text_file} has {len(lines)} lines but {tsv} lists {count} clips (they must be line-aligned)"
        )
    return lines


def resolve(path: str, bases: list[Path]) -> Path:
    """The first existing ``base / path`` (or ``path`` itself if absolute and present)."""
    candidates = [Path(path)] if os.path.isabs(path) else []
    candidates += [base / path for base in bases]
    return next((c for c in candidates if c.exists()), candidates[0])


def speaker_of(clip_id: str) -> str:
    parts = clip_id.split("/")
    return parts[-2] if len(parts) > 1 else clip_id.rsplit("_", 1)[0]


def find_folders(root: Path) -> tuple[dict[str, Path], list[tuple[str, str, Path]]]:
    """Language folders ``{lang: path}`` and translation folders ``[(src, tgt, path)]``."""
    langs, pairs = {}, []
    for folder in sorted(p for p in root.iterdir() if p.is_dir()) if root.is_dir() else []:
        if PAIR.match(folder.name):
            pairs.append((*PAIR.match(folder.name).groups(), folder))
        elif LANG.match(folder.name):
            langs[folder.name] = folder
            pairs += [
                (folder.name, sub.name, sub)
                for sub in sorted(folder.iterdir())
                if sub.is_dir() and LANG.match(sub.name)
            ]
    return langs, [p for p in pairs if any(p[2].glob("*.tsv"))]


def _tasks_of(tsv: Path, lang: str, root: Path) -> list[SampleTask]:
    """One task per row of a manifest, text from ``{split}.{lang}``."""
    base, rows = read_tsv(tsv)
    split = SPLIT_NAMES.get(tsv.stem, tsv.stem)
    bases = [Path(base), tsv.parent, root]
    out = []
    for (clip_id, video, audio, _, _), text in zip(rows, aligned_text(tsv, len(rows), lang)):
        meta = SampleMeta(
            key=make_key("muavic", lang, split, clip_id),
            split=split,
            lang=lang,
            speaker=speaker_of(clip_id),
            text=text.strip(),
            sentence_id=clip_id,
            num_frames=0,
        )
        source = MediaSource(resolve(video, bases), resolve(audio, bases), video_is_lip=True)
        out.append(SampleTask(meta, source))
    return out


def list_samples(root: Path, langs: list[str] | None = None) -> tuple[list[SampleTask], dict[str, dict[str, str]]]:
    """All tasks of the wanted source languages and their translations ``{key: {tgt: text}}``."""
    lang_dirs, pairs = find_folders(root)
    found = sorted(set(lang_dirs) | {src for src, _, _ in pairs})
    unknown = sorted(set(langs or []) - set(found))
    if unknown:
        raise ValueError(
            f"{root}: no MuAViC data for language(s) {', '.join(unknown)} (found: {', '.join(found) or 'none'})"
        )
    wanted = set(langs or found)
    tasks: dict[str, SampleTask] = {}
    for lang, folder in lang_dirs.items():
        if lang in wanted:
            tasks.update(
                (task.meta.key, task) for tsv in sorted(folder.glob("*.tsv")) for task in _tasks_of(tsv, lang, root)
            )
    translations: dict[str, dict[str, str]] = {}
    for src, tgt, folder in pairs:
        if src not in wanted:
            continue
        for tsv in sorted(folder.glob("*.tsv")):
            pair_tasks = _tasks_of(tsv, src, root)
            for task, target in zip(pair_tasks, aligned_text(tsv, len(pair_tasks), tgt)):
                tasks.setdefault(task.meta.key, task)
                translations.setdefault(task.meta.key, {})[tgt] = target.strip()
    return list(tasks.values()), translations


def write_translations(path: Path, translations: dict[str, dict[str, str]], keys: set[str]) -> None:
    """One JSON object per written sample with translations; temporary name then rename."""
    partial = path.with_suffix(".partial")
    with open(partial, "w", encoding="utf-8") as out:
        for key in sorted(keys & set(translations)):
            out.write(json.dumps({"key": key, "translations": translations[key]}, ensure_ascii=False) + "\n")
    os.replace(partial, path)


def read_translations(path: str | Path) -> dict[str, dict[str, str]]:
    """``translations.jsonl`` -> ``{key: {lang: text}}``."""
    path = Path(path)
    if path.is_dir():
        path = path / TRANSLATIONS_FILE
    result = {}
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
            result[record["key"]] = dict(record["translations"])
        except (json.JSONDecodeError, KeyError, TypeError) as err:
            raise ValueError(
                f'{path}:{number}: expected {{"key": ..., "translations": {{lang: text}}}} ({err})'
            ) from None
    return result


def convert_muavic(
    root: str | Path, out_dir: str | Path, options: ConvertOptions = DEFAULT_OPTIONS, langs: list[str] | None = None
) -> Converted:
    root, out_dir = Path(root), Path(out_dir)
    tasks, translations = list_samples(root, langs)
    if not tasks:
        raise no_samples(root, "MuAViC", LAYOUT)
    converted = convert(tasks, out_dir, "muavic", "sentences", options, extra={"translations": TRANSLATIONS_FILE})
    write_translations(out_dir / TRANSLATIONS_FILE, translations, converted.keys)
    return converted
