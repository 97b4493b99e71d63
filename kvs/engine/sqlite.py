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
    - One *keeper* thread per engine creates every sqlite3 object (connections, cursors, and
      the prepared statements, primed at creation: the writer's upsert and delete inside a
      rolled-back transaction, the reader's select) and closes them. Reason: on free-threaded
      CPython an object created by a thread that is still alive is freed only by that thread
      (biased reference counting: another thread's last decref is queued to the owner, which
      processes its queue when it next runs Python code or exits). A prepared statement made
      by a user thread that is blocked elsewhere when ``close()`` runs would stay alive, and
      ``sqlite3_close_v2`` would leave its connection a "zombie": descriptors open and the
      final WAL checkpoint skipped. Made and closed by the keeper, they are really closed when
      ``close()`` returns (``test_reader_connections_are_released`` checks it with reader
      threads parked elsewhere: no descriptor and no ``-wal``/``-shm`` file is left behind). Reader
      creation (once per thread) costs one round trip to the keeper.
    - A reader whose thread exits is closed soon after: the thread-local also holds a sentinel
      object whose ``weakref.finalize`` callback (run by the exiting thread when its locals are
      cleared) takes the reader out of the registry and posts its closing to the keeper.
      Whoever removes a reader from the registry under ``_readers_lock`` is the one who has it
      closed, so it is closed exactly once. The callback touches neither the engine (it would
      keep it alive) nor ``logging`` nor ``threading.current_thread()`` (the thread is being
      torn down). SQLite's unix VFS keeps a closed connection's database descriptor open while
      other connections of the process hold locks on the file (always, in WAL mode) and hands
      it to the next connection opened, so descriptors stay bounded by the peak number of
      reader threads alive at once, not by how many threads ever read.

Happens-before
    - A ``set``/``remove`` that has returned has committed; any ``get`` that *starts* after that
      (in any thread: the return and the next call are ordered by whatever the caller used to
      synchronise) begins a new read transaction and sees it. Writes are totally ordered by
      ``_wlock``.
    - ``close()`` first sets ``_closed`` and empties the registry under ``_readers_lock`` (no new
      reader can register afterwards; reader creation holds that lock while the keeper builds
      the reader, so the keeper is never stopped under it), stops the flusher, detaches the
      writer under ``_wlock`` (waiting for an in-flight write), then on the keeper closes each
      reader under its own lock (waiting for an in-flight ``get``) and the writer last, then
      stops the keeper and releases the directory lock. SQLite checkpoints the WAL into the
      database and deletes it when the last connection closes. A call racing with ``close()``
      either completes normally or raises ``KvsError("... closed")``; never a sqlite3 error.

Durability (the ``fsync`` option; the names are shared with ``KvStore``)
    - ``"never"`` (default): ``synchronous=NORMAL``. A commit is written to the WAL file with
      ``write()`` but not fsynced, so an acknowledged write survives the process being killed
      (kill -9) but not necessarily a power loss or kernel crash; after one, the database is
      still consistent (the WAL is checksummed) but may lack the latest writes. SQLite fsyncs
      during its checkpoints (every ``wal_autocheckpoint`` pages, SQLite's default, and at
      ``close()``).
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
import queue
import sqlite3
import threading
import weakref
from collections.abc import Callable, Sequence
from types import TracebackType
from typing import Any, TypeVar

from kvs.engine.base import FsyncPolicy, check_fsync_policy
from kvs.engine.datadir import DataDir, fsync_dir
from kvs.errors import KeyNotFoundError, KvsError
from kvs.limits import DEFAULT_MAX_KEY_BYTES, DEFAULT_MAX_VALUE_BYTES, encode_text

__all__ = ["SqliteKvsEngine", "DB_FILE", "FORMAT_VERSION"]

log = logging.getLogger("kvs.engine.sqlite")

_T = TypeVar("_T")

ENGINE_NAME = "sqlite"
FORMAT_VERSION = 1
DB_FILE = "kvs.sqlite3"

_SYNCHRONOUS: dict[FsyncPolicy, str] = {"never": "NORMAL", "always": "FULL", "interval": "NORMAL"}

_BUSY_TIMEOUT = 5.0
"""Seconds a connection waits for a lock held by another connection (another process that
opened the file directly, or a checkpoint) before failing with "database is locked"."""

_SQL_CREATE = "CREATE TABLE IF NOT EXISTS kv (key BLOB PRIMARY KEY NOT NULL, value BLOB NOT NULL) WITHOUT ROWID"
_SQL_GET = "SELECT value FROM kv WHERE key = ?"
_SQL_COUNT = "SELECT COUNT(*) FROM kv"
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
        results: list[_T] = []
        errors: list[BaseException] = []

        def job() -> None:
            try:
                results.append(fn())
            except BaseException as exc:
                errors.append(exc)
            done.set()

        self.jobs.put(job)
        done.wait()
        if errors:
            raise errors[0]
        return results[0]

    def stop(self) -> None:
        """Run the queued jobs, then end the thread (which also frees what it still owns)."""
        self.jobs.put(None)
        self._thread.join()


class _Reader:
    """One thread's read connection. ``lock`` is held around every use and by its closer;
    ``conn``/``cursor`` are ``None`` once closed."""

    __slots__ = ("lock", "conn", "cursor")

    def __init__(self, conn: sqlite3.Connection, cursor: sqlite3.Cursor) -> None:
        self.lock = threading.Lock()
        self.conn: sqlite3.Connection | None = conn
        self.cursor: sqlite3.Cursor | None = cursor

    def close(self) -> None:
        """Close the connection (once); errors are ignored, a reader has nothing to flush.
        Runs on the keeper thread."""
        with self.lock:
            conn, self.conn, self.cursor = self.conn, None, None
        if conn is not None:
            try:
                conn.close()
            except sqlite3.Error:
                pass


class _ThreadSentinel:
    """Lives only in a thread's locals: its finalisation means the thread has gone."""

    __slots__ = ("__weakref__",)


def _retire_reader(
    readers: set[_Reader], lock: threading.Lock, jobs: queue.SimpleQueue[Any], reader: _Reader
) -> None:
    """Finalizer of a thread's sentinel: have the keeper close the thread's reader, unless
    ``close()`` already took it. Runs in the exiting thread: must not block, log, or call
    ``threading.current_thread()``. Posting under ``lock`` orders the job before the keeper's
    stop, which ``close()`` posts only after emptying the registry under the same lock."""
    with lock:
        if reader not in readers:
            return
        readers.discard(reader)
        jobs.put(reader.close)


def _describe(exc: sqlite3.Error) -> str:
    code = getattr(exc, "sqlite_errorcode", None)
    if code is None:
        return "sqlite error"
    return _ERROR_KINDS.get(code & 0xFF, "sqlite error")


def _flush_loop(engine_ref: weakref.ref[SqliteKvsEngine], stop: threading.Event, interval: float) -> None:
    """Body of the ``fsync="interval"`` thread. Holds the engine only weakly, between ticks."""
    while not stop.wait(interval):
        engine = engine_ref()
        if engine is None:
            return
        engine._flush()
        del engine


class SqliteKvsEngine:
    """A `KvsEngine` stored in a SQLite database in WAL mode; safe to share between threads.

    Open with ``SqliteKvsEngine.open(path, fsync=..., ...)``; see the module docstring for the
    connection model, the thread-safety argument and what each ``fsync`` mode guarantees.
    Always ``close()`` it (or use ``with``): its keeper thread and connections live until then.
    """

    name = ENGINE_NAME

    @classmethod
    def open(
        cls,
        path: str | os.PathLike[str],
        *,
        fsync: FsyncPolicy = "never",
        fsync_interval: float = 1.0,
        max_key_bytes: int = DEFAULT_MAX_KEY_BYTES,
        max_value_bytes: int = DEFAULT_MAX_VALUE_BYTES,
    ) -> SqliteKvsEngine:
        """Open (creating if needed) the data directory ``path`` and lock it.

        ``KvsError`` for a bad option, a directory already open, one created by another
        engine, or a database SQLite cannot use.
        """
        return cls(
            path,
            fsync=fsync,
            fsync_interval=fsync_interval,
            max_key_bytes=max_key_bytes,
            max_value_bytes=max_value_bytes,
        )

    def __init__(
        self,
        path: str | os.PathLike[str],
        *,
        fsync: FsyncPolicy = "never",
        fsync_interval: float = 1.0,
        max_key_bytes: int = DEFAULT_MAX_KEY_BYTES,
        max_value_bytes: int = DEFAULT_MAX_VALUE_BYTES,
    ) -> None:
        fsync = check_fsync_policy(fsync)
        if (
            isinstance(fsync_interval, bool)
            or not isinstance(fsync_interval, (int, float))
            or not math.isfinite(fsync_interval)
            or fsync_interval <= 0
        ):
            raise KvsError(f"fsync_interval must be a positive number of seconds, not {fsync_interval!r}")
        for what, limit in (("max_key_bytes", max_key_bytes), ("max_value_bytes", max_value_bytes)):
            if isinstance(limit, bool) or not isinstance(limit, int) or limit <= 0:
                raise KvsError(f"{what} must be a positive int, not {limit!r}")

        self._fsync: FsyncPolicy = fsync
        self.fsync_interval = float(fsync_interval)
        self._max_key_bytes = max_key_bytes
        self._max_value_bytes = max_value_bytes
        self._closed = True  # until fully open
        self._readers: set[_Reader] = set()
        self._readers_lock = threading.Lock()
        self._local = threading.local()
        self._wlock = threading.Lock()
        self._writer: sqlite3.Connection | None = None
        self._wcur: sqlite3.Cursor | None = None
        self._writes = 0  # successful writes, under _wlock
        self._flushed = 0  # value of _writes at the last successful flush, under _wlock
        self._flush_stop = threading.Event()
        self._flusher: threading.Thread | None = None

        self._dir = DataDir(path, ENGINE_NAME, FORMAT_VERSION)
        self.path = self._dir.path
        self._db = str(self.path / DB_FILE)
        self._keeper = _Keeper(f"kvs-sqlite-keeper:{self.path}")
        try:
            self._writer, self._wcur = self._keeper.call(self._open_writer)
        except BaseException:
            self._keeper.stop()
            self._dir.close()
            raise
        self._closed = False
        if fsync == "interval":
            self._flusher = threading.Thread(
                target=_flush_loop,
                args=(weakref.ref(self), self._flush_stop, self.fsync_interval),
                name=f"kvs-sqlite-flush:{self.path}",
                daemon=True,
            )
            self._flusher.start()
        log.debug("opened %s (fsync=%s)", self._db, fsync)

    # ------------------------------------------------------------- keeper-thread helpers

    def _open_writer(self) -> tuple[sqlite3.Connection, sqlite3.Cursor]:
        """Open the writer connection, create the table, and prepare (cache) every statement
        the writer will run, so that no other thread ever creates one. On the keeper thread."""
        fresh = not os.path.exists(self._db)
        conn: sqlite3.Connection | None = None
        try:
            conn = sqlite3.connect(self._db, timeout=_BUSY_TIMEOUT, isolation_level=None, check_same_thread=False)
            (mode,) = conn.execute("PRAGMA journal_mode = WAL").fetchone()
            if str(mode).lower() != "wal":
                raise KvsError(f"data directory {self.path}: sqlite refused WAL mode (journal_mode is {mode!r})")
            conn.execute(f"PRAGMA synchronous = {_SYNCHRONOUS[self._fsync]}")
            conn.execute(_SQL_CREATE)
            cur = conn.cursor()
            cur.execute("BEGIN")
            cur.execute(_SQL_SET, (b"", b""))
            cur.executemany(_SQL_SET, [(b"", b"")])
            cur.execute(_SQL_REMOVE, (b"",))
            cur.execute("ROLLBACK")
            cur.execute("BEGIN")
            cur.execute("COMMIT")
            if self._fsync == "interval":
                cur.execute(_SQL_FLUSH).fetchall()
            if fresh:
                fsync_dir(self.path)  # the new database file's directory entry
        except BaseException as exc:
            if conn is not None:
                conn.close()
            if isinstance(exc, sqlite3.Error):
                raise self._error(exc, "open") from None
            if isinstance(exc, OSError):
                raise KvsError(f"cannot write to data directory {self.path}: {exc.strerror}") from None
            raise
        return conn, cur

    def _make_reader(self) -> _Reader:
        """A new reader connection with its statement prepared. On the keeper thread."""
        try:
            conn = sqlite3.connect(self._db, timeout=_BUSY_TIMEOUT, isolation_level=None, check_same_thread=False)
        except sqlite3.Error as exc:
            raise self._error(exc, "get") from None
        try:
            conn.execute("PRAGMA query_only = ON")
            cursor = conn.cursor()
            cursor.execute(_SQL_GET, (b"",)).fetchall()
            cursor.execute(_SQL_COUNT).fetchall()
        except sqlite3.Error as exc:
            conn.close()
            raise self._error(exc, "get") from None
        return _Reader(conn, cursor)

    def _close_connections(self, readers: list[_Reader], writer: sqlite3.Connection | None) -> None:
        """Close the readers, then the writer: SQLite checkpoints the WAL into the database
        and deletes it as the last connection closes. On the keeper thread."""
        for reader in readers:
            reader.close()
        readers.clear()
        if writer is not None:
            try:
                writer.close()
            except sqlite3.Error as exc:
                raise self._error(exc, "close") from None

    # ------------------------------------------------------------------------ helpers

    def _error(self, exc: sqlite3.Error, op: str) -> KvsError:
        return KvsError(f"data directory {self.path}: {_describe(exc)}: {exc} (during {op})")

    def _closed_error(self) -> KvsError:
        return KvsError(f"sqlite engine for data directory {self.path} is closed")

    def _attach_reader(self) -> _Reader:
        """Create (on the keeper), register and return the calling thread's reader."""
        with self._readers_lock:
            if self._closed:
                raise self._closed_error()
            # Made while holding the lock, so close() cannot stop the keeper meanwhile.
            reader = self._keeper.call(self._make_reader)
            self._readers.add(reader)
        sentinel = _ThreadSentinel()
        weakref.finalize(sentinel, _retire_reader, self._readers, self._readers_lock, self._keeper.jobs, reader)
        self._local.sentinel = sentinel
        self._local.reader = reader
        return reader

    def _flush(self) -> None:
        """Checkpoint the WAL into the database, with fsyncs (the ``fsync="interval"`` thread)."""
        with self._wlock:
            cur = self._wcur
            if cur is None or self._writes == self._flushed:
                return
            writes = self._writes
            try:
                busy, wal_frames, done = cur.execute(_SQL_FLUSH).fetchone()
            except sqlite3.Error as exc:
                log.error("%s", self._error(exc, "periodic flush"))
                return
            if busy:
                log.warning(
                    "data directory %s: periodic flush incomplete (%s of %s WAL frames, busy), will retry",
                    self.path, done, wal_frames,
                )
                return
            self._flushed = writes

    # --------------------------------------------------------------------------------- API

    def set(self, key: str, value: str) -> None:
        """Store ``value`` under ``key``; returns once committed (durability per ``fsync``)."""
        if self._closed:
            raise self._closed_error()
        kb = encode_text(key, "key", self._max_key_bytes)
        vb = encode_text(value, "value", self._max_value_bytes)
        with self._wlock:
            cur = self._wcur
            if cur is None:
                raise self._closed_error()
            try:
                cur.execute(_SQL_SET, (kb, vb))
            except sqlite3.Error as exc:
                raise self._error(exc, "set") from None
            self._writes += 1

    def set_many(self, items: Sequence[tuple[str, str]]) -> None:
        """``set`` of each ``(key, value)`` pair in order, in one transaction (one commit for
        the batch). Every pair is checked first: a bad one raises and nothing is stored."""
        if self._closed:
            raise self._closed_error()
        pairs = [(encode_text(key, "key", self._max_key_bytes), encode_text(value, "value", self._max_value_bytes))
                 for key, value in items]
        with self._wlock:
            cur = self._wcur
            if cur is None:
                raise self._closed_error()
            try:
                cur.execute("BEGIN")
                try:
                    cur.executemany(_SQL_SET, pairs)
                    cur.execute("COMMIT")
                except BaseException:
                    cur.execute("ROLLBACK")
                    raise
            except sqlite3.Error as exc:
                raise self._error(exc, "set") from None
            self._writes += len(pairs)

    def get(self, key: str) -> str | None:
        """The value stored under ``key``, or ``None``."""
        if self._closed:
            raise self._closed_error()
        kb = encode_text(key, "key", self._max_key_bytes)
        row = self._read_row(_SQL_GET, (kb,), "get")
        if row is None:
            return None
        stored = row[0]
        try:
            if not isinstance(stored, bytes):
                raise TypeError("not bytes")
            return stored.decode()
        except (UnicodeDecodeError, TypeError):
            raise KvsError(
                f"data directory {self.path}: sqlite database is damaged: a stored value is not UTF-8 bytes"
            ) from None

    def remove(self, key: str) -> None:
        """Delete ``key``; ``KeyNotFoundError`` when it is absent."""
        if self._closed:
            raise self._closed_error()
        kb = encode_text(key, "key", self._max_key_bytes)
        with self._wlock:
            cur = self._wcur
            if cur is None:
                raise self._closed_error()
            try:
                cur.execute(_SQL_REMOVE, (kb,))
            except sqlite3.Error as exc:
                raise self._error(exc, "remove") from None
            if cur.rowcount == 0:
                raise KeyNotFoundError(key)
            self._writes += 1

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
            writer = None
            self._keeper.stop()
            self._dir.close()
            log.debug("closed %s", self._db)

    def __len__(self) -> int:
        """The number of keys (a snapshot when writers are active): a count on the calling
        thread's reader connection, like ``get``."""
        if self._closed:
            raise self._closed_error()
        row = self._read_row(_SQL_COUNT, (), "len")
        return int(row[0]) if row is not None else 0

    def _read_row(self, sql: str, params: tuple[bytes, ...], what: str) -> tuple[Any, ...] | None:
        """The first row of the read-only query ``sql`` on the calling thread's reader
        connection (attached on first use); ``KvsError`` once the engine is closed."""
        try:
            reader = self._local.reader
        except AttributeError:
            reader = self._attach_reader()
        with reader.lock:
            cur = reader.cursor
            if cur is None:
                raise self._closed_error()
            try:
                row: tuple[Any, ...] | None = cur.execute(sql, params).fetchone()
            except sqlite3.Error as exc:
                raise self._error(exc, what) from None
        return row

    @property
    def fsync(self) -> FsyncPolicy:
        """The durability policy the engine was opened with (see the module docstring)."""
        return self._fsync

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
        return f"<SqliteKvsEngine {str(self.path)!r} fsync={self._fsync} {state}>"
