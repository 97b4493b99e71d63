"""The data directory: which engine and format created it, and who owns it now.

Every engine keeps its files in one directory holding:

- ``kvs-meta.json``: ``{"engine": "kvs" | "sqlite", "format": <int>}``, written atomically
  (write to a temporary file, fsync, rename, fsync the directory) when the directory is first
  used. The server's wrong-engine check and ``detect_engine`` read it.
- ``LOCK``: an advisory ``flock`` held for as long as an engine has the directory open. A second
  open, from this process or another, fails at once with a ``KvsError``. The lock belongs to the
  open file description, so it disappears with the process however that dies.
"""

from __future__ import annotations

import errno
import fcntl
import json
import os
from pathlib import Path

from kvs.errors import KvsError

META_FILE = "kvs-meta.json"
LOCK_FILE = "LOCK"


def detect_engine(path: str | os.PathLike[str]) -> str | None:
    """The name of the engine that created the data directory ``path``, or ``None``."""
    meta = _read_meta(Path(path))
    return None if meta is None else str(meta.get("engine"))


def _read_meta(path: Path) -> dict[str, object] | None:
    try:
        raw = (path / META_FILE).read_text(encoding="utf-8")
    except FileNotFoundError:
        return None
    except OSError as exc:
        raise KvsError(f"cannot read {path / META_FILE}: {exc.strerror}") from None
    try:
        meta = json.loads(raw)
        if not isinstance(meta, dict) or not isinstance(meta.get("engine"), str):
            raise ValueError("not an object with an engine name")
    except ValueError as exc:
        raise KvsError(f"{path / META_FILE} is damaged ({exc})") from None
    return meta


def fsync_dir(path: Path) -> None:
    """Make the directory's entries (creations, renames, deletions) durable."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class DataDir:
    """An open, locked data directory of one engine.

    ``DataDir(path, engine, format_version, upgradable_from)`` creates the directory if needed,
    takes the lock, then checks (or, for a fresh directory, writes) the metadata: a directory
    of ``format_version`` or of a version in ``upgradable_from`` opens (``format_version``
    then says which it holds, until the engine calls :meth:`upgraded`), anything else is
    refused. ``close()`` releases the lock.
    """

    def __init__(self, path: str | os.PathLike[str], engine: str, format_version: int,
                 upgradable_from: tuple[int, ...] = ()) -> None:
        self.path = Path(path)
        self.engine = engine
        try:
            self.path.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise KvsError(f"cannot create data directory {self.path}: {exc.strerror}") from None
        if not self.path.is_dir():
            raise KvsError(f"data directory {self.path} is not a directory")
        try:
            self._lock_fd: int | None = os.open(self.path / LOCK_FILE, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        except OSError as exc:
            raise KvsError(f"cannot open data directory {self.path}: {exc.strerror}") from None
        try:
            fcntl.flock(self._lock_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            os.close(self._lock_fd)
            self._lock_fd = None
            if exc.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                raise KvsError(f"data directory {self.path} is already open (by this or another process)") from None
            raise KvsError(f"cannot lock data directory {self.path}: {exc.strerror}") from None
        try:
            self._check_or_write_meta(format_version, upgradable_from)
        except BaseException:
            self.close()
            raise

    def _check_or_write_meta(self, format_version: int, upgradable_from: tuple[int, ...]) -> None:
        meta = _read_meta(self.path)
        if meta is None:
            self._write_meta(format_version)
            return
        if meta["engine"] != self.engine:
            raise KvsError(
                f"data directory {self.path} was created by engine '{meta['engine']}', "
                f"cannot open it with engine '{self.engine}'"
            )
        found = meta.get("format")
        if found != format_version and found not in upgradable_from:
            raise KvsError(
                f"data directory {self.path} has {self.engine} format version {found}, "
                f"this kvs reads version {format_version}"
            )
        self.format_version = found if isinstance(found, int) else format_version

    def _write_meta(self, format_version: int) -> None:
        """Write ``kvs-meta.json`` atomically (temporary file, fsync, rename, fsync the
        directory): a crash leaves the old file or the new one, never a mix."""
        tmp = self.path / (META_FILE + ".tmp")
        try:
            with open(tmp, "w", encoding="utf-8") as f:
                json.dump({"engine": self.engine, "format": format_version}, f)
                f.write("\n")
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, self.path / META_FILE)
            fsync_dir(self.path)
        except OSError as exc:
            raise KvsError(f"cannot write to data directory {self.path}: {exc.strerror}") from None
        self.format_version = format_version

    def upgraded(self, format_version: int) -> None:
        """Record that the directory now holds format ``format_version`` (an engine that
        opened it at an older version in ``upgradable_from`` calls this once it is safe: from
        then on older kvs versions refuse the directory)."""
        if format_version != self.format_version:
            self._write_meta(format_version)

    def close(self) -> None:
        """Release the lock; idempotent."""
        fd, self._lock_fd = self._lock_fd, None
        if fd is not None:
            os.close(fd)  # closing the only descriptor of the open file description unlocks it
