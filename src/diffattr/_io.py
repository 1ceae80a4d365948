"""Atomic file writes and JSON helpers shared by every stage that persists something."""

from __future__ import annotations

import hashlib
import json
import os
import shlex
import socket
import sys
import tempfile
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from itertools import takewhile
from pathlib import Path
from typing import Any

import numpy as np

from diffattr.errors import OutputError

try:
    import fcntl
except ImportError:  # Windows: output_lock degrades to a warning
    fcntl = None  # type: ignore[assignment]

#: The file in an output directory that :func:`output_lock` locks; it names the last holder.
LOCK_FILE = ".diffattr.lock"


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


def check_output(path: str | os.PathLike[str], *, file: bool = False) -> Path:
    """Refuse an output that cannot be written, before any work is spent on it.

    A directory output must be a directory or not exist yet; a file output must not be a
    directory. The nearest existing folder on the way must take a new file (a temporary one,
    removed at once), so a missing permission or a file in the way is found now rather than
    after training or featurisation.

    Args:
        path: The output directory, or with ``file`` the output file.
        file: ``path`` is a file to write, not a directory.

    Returns:
        ``path`` as a Path.

    Raises:
        OutputError: The message names the path and the problem.
    """
    path = Path(path)
    if file and path.is_dir():
        raise OutputError(f"{path} is a directory; give a file name")
    folder = (path.parent if file else path).absolute()
    existing = next(p for p in (folder, *folder.parents) if p.exists())
    if not existing.is_dir():
        if existing == folder and not file:
            raise OutputError(f"{path} exists and is not a directory")
        raise OutputError(f"{path} cannot be created: {existing} is not a directory")
    try:
        with tempfile.TemporaryFile(dir=existing):
            pass
    except OSError as err:
        raise OutputError(f"{path} cannot be written: {existing}: {err.strerror or err}") from err
    return path


@contextmanager
def output_lock(directory: str | os.PathLike[str]) -> Iterator[Path]:
    """Hold an exclusive lock on an output directory while the block writes into it.

    Two processes writing one directory would mix or silently replace each other's files, so
    the second is refused, with a message naming the holder's pid, host and command (recorded
    in the directory's :data:`LOCK_FILE` while it is held). The lock is an advisory ``flock``,
    which the kernel releases when its holder exits, however it exits: a run killed with
    ``kill -9`` leaves its lock file but no lock, and rerunning it resumes. The lock file is
    removed at the end, and so are the folders the call created if the block left them empty,
    so a command that fails before writing leaves nothing behind. Without ``fcntl`` (Windows)
    the block runs unlocked, with a warning.

    Args:
        directory: The output directory; checked with :func:`check_output` and created.

    Yields:
        ``directory`` as a Path.

    Raises:
        OutputError: The directory cannot be written, or another process holds its lock.
    """
    directory = check_output(directory)
    absolute = directory.absolute()
    created = list(takewhile(lambda p: not p.exists(), (absolute, *absolute.parents)))
    try:
        if fcntl is None:
            directory.mkdir(parents=True, exist_ok=True)
            warnings.warn(
                f"file locks are not available on this platform: nothing stops another "
                f"diffattr process from writing {directory} at the same time",
                RuntimeWarning,
                stacklevel=3,
            )
            yield directory
        else:
            descriptor = _lock(directory / LOCK_FILE)
            try:
                yield directory
            finally:
                # Removed while still locked: a process that opened it meanwhile finds it gone
                # once it gets the lock, and starts over (see _lock).
                (directory / LOCK_FILE).unlink(missing_ok=True)
                os.close(descriptor)
    finally:
        for folder in created:  # deepest first; the first one not empty ends it
            try:
                folder.rmdir()
            except OSError:
                break


def _lock(path: Path) -> int:
    """Create, lock and return a descriptor of the lock file ``path``, recording this process."""
    while True:
        path.parent.mkdir(parents=True, exist_ok=True)
        try:
            descriptor = os.open(path, os.O_RDWR | os.O_CREAT, 0o666)
        except FileNotFoundError:  # a holder that left the folder empty has just removed it
            continue
        try:
            fcntl.flock(descriptor, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _lock_holder(descriptor)
            os.close(descriptor)
            raise OutputError(
                f"{path.parent} is being written by another diffattr process ({holder}); "
                "wait for it to finish or choose another output"
            ) from None
        try:
            current = os.stat(path)
        except FileNotFoundError:
            current = None
        if current is not None and os.path.samestat(os.fstat(descriptor), current):
            command = shlex.join([Path(sys.argv[0]).name, *sys.argv[1:]])
            record = {"pid": os.getpid(), "host": socket.gethostname(), "command": command}
            os.ftruncate(descriptor, 0)
            os.pwrite(descriptor, json.dumps(record).encode(), 0)
            return descriptor
        # The holder removed the file between our open and our lock: this lock guards a file
        # nobody else will open, so take the one that is there now.
        os.close(descriptor)


def _lock_holder(descriptor: int) -> str:
    """Describe the process that holds a lock file, from the record it wrote."""
    try:
        holder = json.loads(os.pread(descriptor, 1 << 16, 0))
        return f"pid {holder['pid']} on {holder['host']}: {holder['command']}"
    except (ValueError, KeyError, TypeError):
        # The holder has just taken the lock and not written its record yet.
        return "its record is not written yet"
