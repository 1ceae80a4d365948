"""Atomic file writes and JSON helpers shared by every stage that persists something."""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np


def atomic_write(path: str | os.PathLike[str], write: Callable[[Path], None]) -> None:
    """Write a file through ``write(tmp_path)`` and move it into place only once it is complete.

    An interrupted write leaves the previous file (or none), never a truncated one.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        write(tmp_path)
        # mkstemp creates files private (0600); give the final file the usual permissions.
        os.chmod(tmp_path, 0o666 & ~_umask())
        with open(tmp_path, "rb+") as handle:
            os.fsync(handle.fileno())
        os.replace(tmp_path, path)
    finally:
        tmp_path.unlink(missing_ok=True)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def write_json(path: str | os.PathLike[str], data: dict[str, Any]) -> None:
    """Atomically write ``data`` as sorted, indented JSON."""
    text = json.dumps(data, indent=2, sort_keys=True) + "\n"
    atomic_write(path, lambda tmp: tmp.write_text(text))


def write_npy(path: str | os.PathLike[str], array: Any) -> None:
    """Atomically write one array as ``.npy``."""
    atomic_write(path, lambda tmp: _through_handle(tmp, lambda h: np.save(h, array)))


def write_npz(path: str | os.PathLike[str], arrays: dict[str, Any]) -> None:
    """Atomically write named arrays as an uncompressed ``.npz``."""
    atomic_write(path, lambda tmp: _through_handle(tmp, lambda h: np.savez(h, **arrays)))


def _through_handle(path: Path, write: Callable[[Any], None]) -> None:
    # numpy appends ".npy"/".npz" to bare names; a handle keeps the temporary file's name.
    with open(path, "wb") as handle:
        write(handle)


def read_json(path: str | os.PathLike[str]) -> dict[str, Any]:
    """Read a JSON object; raise ``FileNotFoundError`` or ``ValueError`` naming the path."""
    path = Path(path)
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise ValueError(f"{path}: not valid JSON ({err})") from err
    if not isinstance(data, dict):
        raise ValueError(f"{path}: expected a JSON object, found {type(data).__name__}")
    return data


def path_inside(
    folder: str | os.PathLike[str], name: object, listed_in: str, error: type[Exception]
) -> Path:
    """Return ``folder / name`` for a file name a folder's own record lists, if it stays inside.

    Names come from files that may have been edited by someone else (``checkpoint.json``, a
    store's manifest, ``benchmark.json``): one that leaves the folder, through ``..``, as an
    absolute path or through a symbolic link, is refused, so a shared folder never makes
    diffattr read, overwrite or delete a file elsewhere.

    Args:
        folder: The folder that holds the record and its files.
        name: The relative file name as recorded.
        listed_in: Where the name was read (e.g. ``"checkpoint.json"``), for the message.
        error: The exception to raise (the caller's domain error).

    Returns:
        ``folder / name``, unresolved, for messages that show the path as the user gave it.

    Raises:
        error: ``name`` is not a non-empty string, or does not resolve to a path strictly
            inside ``folder`` once ``..`` and symbolic links are resolved.
    """
    folder = Path(folder)
    if not isinstance(name, str) or not name:
        raise error(f"{folder}: {listed_in} lists {name!r}, which is not a file name")
    path = folder / name
    root = folder.resolve()
    resolved = path.resolve()
    if resolved == root or not resolved.is_relative_to(root):
        raise error(
            f"{folder}: {listed_in} lists {name!r}, which resolves outside the folder "
            f"({resolved}); diffattr reads and deletes only files inside it"
        )
    return path


def sha256_file(path: str | os.PathLike[str]) -> str:
    """Return the hex SHA-256 of a file's bytes."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def read_format(
    path: str | os.PathLike[str], fmt: str, version: int, error: type[Exception]
) -> dict[str, Any]:
    """Read a JSON description of format ``fmt`` at ``version``, raising ``error`` if it is not.

    ``error`` gets the reason: unreadable or invalid JSON, another format, or another version.
    """
    try:
        doc = read_json(path)
    except ValueError as err:
        raise error(str(err)) from err
    problem = format_problem(doc, Path(path), fmt, version)
    if problem:
        raise error(problem)
    return doc


def format_problem(doc: dict[str, Any], path: Path, fmt: str, version: int) -> str | None:
    """Say why a JSON description is not of format ``fmt`` at ``version``; None if it is."""
    if doc.get("format") != fmt:
        return f"{path}: format is {doc.get('format')!r}, expected {fmt!r}"
    if doc.get("format_version") != version:
        return (
            f"{path}: format_version {doc.get('format_version')!r} is not supported "
            f"(this diffattr reads version {version})"
        )
    return None
