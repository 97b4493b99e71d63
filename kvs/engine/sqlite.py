"""`SqliteKvsEngine`: the `KvsEngine` interface on the standard library's sqlite3, in WAL mode.

Storage
    The data directory (a `DataDir` with engine ``"sqlite"``, format 1) holds ``kvs.sqlite3``
    (plus SQLite's ``-wal`` and ``-shm`` files while open) with one table::

        kv(key BLOB PRIMARY KEY NOT NULL, value BLOB NOT NULL) WITHOUT ROWID

    Keys and values are stored as their UTF-8 bytes, not as TEXT: ``encode_text`` has to encode
    them anyway for the size check, comparisons are plain ``memcmp`` (no collation), and strings
    with embedded NUL characters stay whole (SQLite's TEXT functions stop at a NUL).

Connections and locking
    - One *writer* connection, serialised by ``_wlock``. ``set`` and ``remove`` are each one
      statement in autocommit mode (``isolation_level=None``): every write is its own
      transaction and returns only after SQLite has committed it.
    - One *reader* connection per thread that calls ``get``, kept in a ``threading.local`` and
      created on that thread's first ``get``. In WAL mode readers never block the writer nor one
      another, so gets run in parallel. Each reader statement is stepped to completion (a
      primary-key lookup returns at most one row and ``fetchone`` steps past it), so an idle
      reader holds no read transaction and never pins the WAL.
    - Every reader is also in a registry (``_readers``, guarded by ``_readers_lock``) so that
      ``close()`` can close it from another thread (hence ``check_same_thread=False``). Each
      reader has its own lock, held by its thread around each query and by whoever closes it:
      a connection is never used by two threads at once, and never used after it is closed.
      That lock is uncontended except during ``close()``, so the hot path shares nothing with
      other threads but the engine object itself.
    - A reader whose thread exits is closed at once: the thread-local also holds a sentinel
      object whose ``weakref.finalize`` callback (run by the exiting thread when its locals are
      cleared) takes the reader out of the registry and closes it. Whoever removes a reader from
      the registry under ``_readers_lock`` is the one who closes it, so it is closed exactly once.
      The callback touches neither the engine (it would keep it alive) nor ``logging`` nor
      ``threading.current_thread()`` (the thread is being torn down).

Happens-before
    - A ``set``/``remove`` that has returned has committed; any ``get`` that *starts* after that
      (in any thread: the return and the next call are ordered by whatever the caller used to
      synchronise) begins a new read transaction and sees it. Writes are totally ordered by
      ``_wlock``.
    - ``close()`` first sets ``_closed`` and empties the registry under ``_readers_lock`` (no new
      reader can register afterwards), stops the flusher, then closes each reader under its own
      lock (waiting for an in-flight ``get``), then the writer under ``_wlock`` (waiting for an
      in-flight write), then releases the directory lock. SQLite checkpoints the WAL into the
      database and deletes it when this last connection closes. A call racing with ``close()``
      either completes normally or raises ``KvsError("... closed")``; never a sqlite3 error.

Durability (the ``fsync`` option; the names are shared with ``KvStore``)
    - ``"never"`` (default): ``synchronous=NORMAL``. A commit is written to the WAL file with
      ``write()`` but not fsynced, so an acknowledged write survives the process being killed
      (kill -9) but not necessarily a power loss or kernel crash; after one, the database is
      still consistent (the WAL is checksummed) but may lack the latest writes. SQLite fsyncs
      during its checkpoints (every ~1000 WAL pages, and at ``close()``).
    - ``"always"``: ``synchronous=FULL``. The WAL is fsynced at every commit, before ``set`` or
      ``remove`` returns: an acknowledged write survives power loss.
    - ``"interval"``: ``synchronous=NORMAL`` plus a daemon thread that every ``fsync_interval``
      seconds, if anything was written since its last successful flush, takes ``_wlock`` and
      runs ``PRAGMA wal_checkpoint(FULL)`` on the writer connection. That fsyncs the WAL, copies
      it into the database file and fsyncs that. So: like ``"never"`` against a process kill,
      and against power loss every write acknowledged before a flush started is durable once
      that flush has finished, i.e. normally at most ``fsync_interval`` seconds (plus one
      flush) of acknowledged writes are lost. Writers wait for the flush (it holds ``_wlock``);
      readers do not. A failed or busy flush is logged and retried at the next tick.
"""

from __future__ import annotations

import logging
import math
import os
import sqlite3
import threading
import queue
import weakref
from collections.abc import Callable
from types import TracebackType
from typing import Any, TypeVar

from kvs.engine.base import encode_text
from kvs.engine.datadir import DataDir, fsync_dir
from kvs.errors import KeyNotFoundError, KvsError
from kvs.limits import DEFAULT_MAX_KEY_BYTES, DEFAULT_MAX_VALUE_BYTES

__all__ = ["SqliteKvsEngine", "FSYNC_MODES", "DB_FILE", "FORMAT_VERSION"]

log = logging.getLogger("kvs.engine.sqlite")

_T = TypeVar("_T")

ENGINE_NAME = "sqlite"
FORMAT_VERSION = 1
DB_FILE = "kvs.sqlite3"

FSYNC_MODES = ("never", "always", "interval")
"""Accepted values of the ``fsync`` option (see the module docstring)."""

_SYNCHRONOUS = {"never": "NORMAL", "always": "FULL", "interval": "NORMAL"}

_BUSY_TIMEOUT = 5.0
"""Seconds a connection waits for a lock held by another connection (another process that
opened the file directly, or a checkpoint) before failing with "database is locked"."""

_SQL_CREATE = "CREATE TABLE IF NOT EXISTS kv (key BLOB PRIMARY KEY NOT NULL, value BLOB NOT NULL) WITHOUT ROWID"
_SQL_GET = "SELECT value FROM kv WHERE key = ?"
_SQL_SET = "INSERT INTO kv (key, value) VALUES (?, ?) ON CONFLICT (key) DO UPDATE SET value = excluded.value"
_SQL_REMOVE = "DELETE FROM kv WHERE key = ?"
_SQL_FLUSH = "PRAGMA wal_checkpoint(FULL)"

# Primary result codes (the low byte of an extended code) and how to describe them.
_ERROR_KINDS = {
    sqlite3.SQLITE_CORRUPT: "sqlite database is damaged",
    sqlite3.SQLITE_NOTADB: "sqlite database is damaged",
    sqlite3.SQLITE_FULL: "disk is full",
    sqlite3.SQLITE_BUSY: "sqlite database is locked",
    sqlite3.SQLITE_LOCKED: "sqlite database is locked",
    sqlite3.SQLITE_IOERR: "I/O error",
    sqlite3.SQLITE_READONLY: "sqlite database is read-only",
    sqlite3.SQLITE_CANTOPEN: "cannot open sqlite database",
    sqlite3.SQLITE_PERM: "permission denied",
    sqlite3.SQLITE_NOMEM: "out of memory",
    sqlite3.SQLITE_TOOBIG: "value too big for sqlite",
}


class _Keeper:
    """The thread that creates, and at the end closes, every sqlite3 object of one engine.

    Why: on free-threaded CPython an object created by a live thread is freed only by that
    thread (biased reference counting: the last decref from another thread is queued to the
    owner, which processes its queue when it next runs Python code or exits). A prepared
    statement that is never freed keeps its connection open as a "zombie" after ``close()``
    (``sqlite3_close_v2``): file descriptors stay open and the closing WAL checkpoint is skipped.
    So connections, their cursors and their statements are all made here, and closed here.
    """

    def __init__(self, name: str) -> None:
        self.jobs: queue.SimpleQueue[Callable[[], None] | None] = queue.SimpleQueue()
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        jobs = self.jobs
        while (job := jobs.get()) is not None:
            try:
                job()
            except BaseException:  # a posted job has no caller to report to
                log.exception("kvs sqlite keeper job failed")

    def call(self, fn: Callable[[], _T]) -> _T:
        """Run ``fn`` on the keeper thread; return its result or raise its exception."""
        done = threading.Event()
        box: list[Any] = []

        def job() -> None:
            try:
                box.append((True, fn()))
            except BaseException as exc:
                box.append((False, exc))
            done.set()

        self.jobs.put(job)
        done.wait()
        ok, result = box[0]
        if not ok:
            raise result
        return result

    def stop(self) -> None:
        """Run the queued jobs, then end the thread (which also frees what it still owns)."""
        self.jobs.put(None)
        self._thread.join()


class _Reader:
    """One thread's read connection. ``lock`` is held around every use and by its closer;
    ``conn``/``cursor`` are ``None`` once closed."""

    __slots__ = ("lock", "conn", "cursor")

    def __init__(self, conn: sqlite3.Connection) -> None:
        self.lock = threading.Lock()
        self.conn: sqlite3.Connection | None = conn
        self.cursor: sqlite3.Cursor | None = conn.cursor()

    def close(self) -> None:
        """Close every connection (SQLite checkpoints the WAL as the last one closes) and
        release the data directory. Idempotent; later calls raise ``KvsError``."""
        with self._readers_lock:
            if self._closed:
                return
            self._closed = True
            readers = list(self._readers)
            self._readers.clear()
        self._flush_stop.set()
        if self._flusher is not None:
            self._flusher.join()
        with self._wlock:  # waits for an in-flight write
            writer, self._writer, self._wcur = self._writer, None, None
        try:
            self._keeper.call(lambda: self._close_connections(readers, writer))
        finally:
            del writer, readers
            self._keeper.stop()
            self._dir.close()
            log.debug("closed %s", self._db)

    @property
    def closed(self) -> bool:
        return self._closed

    def __enter__(self) -> SqliteKvsEngine:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def __repr__(self) -> str:
        state = "closed" if self._closed else "open"
        return f"<SqliteKvsEngine {str(self.path)!r} fsync={self.fsync} {state}>"
