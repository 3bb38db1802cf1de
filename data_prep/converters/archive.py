"""Safe extraction of the .tar / .tar.gz / .zip archives datasets ship as.

An archive from the internet may hold members that write outside the output folder
(absolute names, ``..``, links pointing outside, or a file written through such a link)
or device files. Every member is checked before it is written, lexically and against the
real (symlink-resolved) location on disk, and a bad member stops extraction with a
``ValueError`` naming it.
"""

from __future__ import annotations

import os
import shutil
import stat
import tarfile
import zipfile
from pathlib import Path


def _inside(root: str, path: str) -> bool:
    return os.path.commonpath([root, path]) == root


def _check_path(root: str, name: str, archive: Path) -> str:
    """The destination of member ``name``, refusing absolute names, ``..`` and paths through outside links."""
    if os.path.isabs(name) or name.startswith(("/", "\\")) or (len(name) > 1 and name[1] == ":"):
        raise ValueError(f"{archive}: member {name!r} has an absolute path")
    if ".." in Path(name.replace("\\", "/")).parts:
        raise ValueError(f"{archive}: member {name!r} leaves the output folder ('..')")
    dest = os.path.join(root, name)
    if not _inside(root, os.path.realpath(dest)):
        raise ValueError(f"{archive}: member {name!r} resolves outside the output folder")
    return dest


def _check_link(root: str, dest: str, target: str, name: str, archive: Path) -> None:
    """A symlink's target, taken relative to the link's folder, must stay inside the output folder."""
    if os.path.isabs(target):
        raise ValueError(f"{archive}: member {name!r} links to absolute path {target!r}")
    resolved = os.path.realpath(os.path.join(os.path.dirname(dest), target))
    if not _inside(root, resolved) or not _inside(root, os.path.normpath(os.path.join(os.path.dirname(dest), target))):
        raise ValueError(f"{archive}: member {name!r} links outside the output folder ({target!r})")


def _extract_tar(archive: Path, root: str) -> int:
    count = 0
    with tarfile.open(archive, "r:*") as tar:
        for member in tar:
            dest = _check_path(root, member.name, archive)
            if member.isdev() or not (member.isfile() or member.isdir() or member.issym() or member.islnk()):
                raise ValueError(f"{archive}: member {member.name!r} is a device or special file")
            if member.issym():
                _check_link(root, dest, member.linkname, member.name, archive)
            if member.islnk():  # hard link targets are archive paths, relative to the root
                try:
                    _check_path(root, member.linkname, archive)
                except ValueError:
                    raise ValueError(
                        f"{archive}: member {member.name!r} hard-links outside the output folder ({member.linkname!r})"
                    ) from None
            tar.extract(member, root, set_attrs=False, filter="data")
            count += 1
    return count


def _extract_zip(archive: Path, root: str) -> int:
    count = 0
    with zipfile.ZipFile(archive) as zf:
        for info in zf.infolist():
            dest = _check_path(root, info.filename, archive)
            kind = stat.S_IFMT(info.external_attr >> 16)  # 0 when the archiver recorded no Unix type
            if kind == stat.S_IFLNK:  # zipfile writes links as plain files holding the target: check it anyway
                _check_link(root, dest, zf.read(info).decode("utf-8", "replace"), info.filename, archive)
            elif kind not in (0, stat.S_IFREG, stat.S_IFDIR):
                raise ValueError(f"{archive}: member {info.filename!r} is a device or special file")
            if info.is_dir():
                os.makedirs(dest, exist_ok=True)
            else:
                os.makedirs(os.path.dirname(dest), exist_ok=True)
                with zf.open(info) as src, open(dest, "wb") as out:
                    shutil.copyfileobj(src, out)
            count += 1
    return count


def safe_extract(archive: str | Path, out_dir: str | Path) -> int:
    """Extract a .tar(.gz/.bz2/.xz) or .zip archive into ``out_dir``; returns the number of members."""
    archive = Path(archive)
    if not archive.is_file():
        raise FileNotFoundError(f"{archive}: no such archive")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    root = os.path.realpath(out)
    if zipfile.is_zipfile(archive):
        return _extract_zip(archive, root)
    if tarfile.is_tarfile(archive):
        return _extract_tar(archive, root)
    raise ValueError(f"{archive}: not a tar or zip archive")
