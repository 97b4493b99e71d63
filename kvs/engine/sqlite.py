"""`SqliteKvsEngine`: the `KvsEngine` interface on the standard library's sqlite3, in WAL mode.

Storage
    The data directory (a `DataDir` with engine ``"sqlite"``, format 2) holds ``kvs.sqlite3``
    (plus SQLite's ``-wal`` and ``-shm`` files while open) with one table and two indexes::

        kv(key BLOB PRIMARY KEY NOT NULL, value BLOB NOT NULL, flags INTEGER NOT NULL,
           expires INTEGER, seq INTEGER NOT NULL) WITHOUT ROWID
        kv_seq ON kv(seq)
        kv_expires ON kv(expires) WHERE expires IS NOT NULL

    - ``key``/``value``: the bytes (``kvs.engine.values``), compared with plain ``memcmp``.
    - ``flags``: bit 0 set when the value was written as ``bytes`` (else it is UTF-8 text and
      reads back as ``str``), bit 1 set when the key was last written as ``bytes``.
    - ``expires``: the deadline in Unix milliseconds, NULL for a persistent key. A row whose
      deadline has passed is dead: every read treats it as absent until it is purged.
    - ``seq``: the scan position, given from a counter when the row is inserted and never
      changed while the key exists (writes are ``INSERT ... ON CONFLICT(key) DO UPDATE``,
      never ``REPLACE``). Unique by construction (the counter only grows, under ``_wlock``,
      starting past ``max(seq)`` at open).
    ``get`` stays one primary-key lookup; ``kv_seq`` orders ``scan`` (only ``seq`` is indexed,
    so that updates, which rewrite ``flags`` and ``expires``, do not touch it) and
    ``kv_expires`` (partial: persistent keys cost it nothing) serves the sweep and ``len``.
    The file is created with ``auto_vacuum = INCREMENTAL`` and ``clear`` runs ``PRAGMA
    incremental_vacuum`` after its commit, so the file shrinks back.

    Format 1 (0.1.0) was ``kv(key BLOB PRIMARY KEY, value BLOB) WITHOUT ROWID`` with UTF-8
    text values. It is upgraded in place at open in ONE SQLite transaction (rename the old
    table to ``kv_v1``, create the new table and indexes, copy every row as a text value with
    no expiry, ``seq`` numbering them, drop ``kv_v1``, commit): a crash leaves the old schema
    or the new one, never a mix. Then the metadata says format 2 (``DataDir.upgraded``); a
    crash between the commit and that write leaves a format-1 metadata file over a v2
    schema, which the next open recognises (it has the ``seq`` column) and finishes. After
    the upgrade a ``VACUUM`` switches the file to incremental auto-vacuum (SQLite makes a
    ``VACUUM`` crash-safe itself).

Connections and locking
    - One *writer* connection, serialised by ``_wlock``. ``set`` and ``remove`` are each one
      statement in autocommit mode (``isolation_level=None``): every write is its own
      transaction and returns only after SQLite has committed it. ``set_many``, ``update``,
      ``transaction``, ``expire*``, ``clear`` and the sweep are explicit transactions
      (``BEGIN IMMEDIATE`` ... ``COMMIT``, ``ROLLBACK`` on an exception) on it.
    - One *reader* connection per thread that calls ``get`` (or ``scan``, ``ttl``,
      ``expiry``), kept in a ``threading.local`` and created on that thread's first read. In
      WAL mode readers never block the writer nor one another, so gets run in parallel. Each
      reader statement is stepped to completion (``fetchone`` past a primary-key lookup's at
      most one row, ``fetchall`` for a scan page), so an idle reader holds no read
      transaction and never pins the WAL.
    - Every reader is also in a registry (``_readers``, guarded by ``_readers_lock``) so that
      ``close()`` can close it from another thread (hence ``check_same_thread=False``). Each
      reader has its own lock, held by its thread around each query and by whoever closes it:
      a connection is never used by two threads at once, and never used after it is closed.
      That lock is uncontended except during ``close()``, so the hot path shares nothing with
      other threads but the engine object itself.
    - One *keeper* thread per engine creates every sqlite3 object (connections, cursors, and
      the prepared statements, primed at creation: the writer's statements inside a
      rolled-back transaction, the reader's selects) and closes them. Reason: on free-threaded
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
    - Re-entry: ``update``'s function and a transaction's body run with ``_wlock`` held and
      inside ``CallbackGuard.calling_back()``; every public method checks the guard first,
      so a call back into the engine from there raises ``KvsError`` instead of deadlocking.

Counting (``len``)
    ``_rows`` is the number of rows in ``kv``, dead ones included, kept exact under ``_wlock``
    from each committed write's effect: an upsert ``RETURNING seq`` inserted a row exactly
    when the returned ``seq`` is the one it offered; a ``DELETE`` reports its row count;
    ``clear`` sets it to 0. A transaction's effect is applied only after its ``COMMIT``
    succeeded. ``len`` takes ``_wlock`` and answers ``_rows`` minus the dead rows, counted
    through ``kv_expires`` (``expires <= now``: only the dead rows are walked, not the keys).

Happens-before
    - A write that has returned has committed; any read that *starts* after that (in any
      thread: the return and the next call are ordered by whatever the caller used to
      synchronise) begins a new read transaction and sees it. Writes are totally ordered by
      ``_wlock``.
    - Transactions: the body runs between ``BEGIN IMMEDIATE`` and ``COMMIT`` on the writer,
      under ``_wlock``; its writes are staged in the view and all executed in that SQLite
      transaction just before ``COMMIT``. A reader statement runs on a WAL snapshot taken
      when it starts: it sees the WAL up to a commit frame, so either every page of the
      transaction or none. A reader that reads ``a`` then ``b`` uses two statements; if the
      first saw the new ``a`` the commit had happened before it started, so the second,
      starting later, sees it too (never the new ``a`` with the old ``b``). Crashes: SQLite's
      commit is atomic, so a transaction is entirely there or entirely absent.
    - Expiry: a row is dead from the moment ``clock() >= expires``; every read compares with
      the clock itself (``get`` in Python on the row it fetched, ``len`` and ``scan`` in the
      query or on the rows), so no reader ever sees an expired value, whatever the sweep has
      done. The sweep thread (every ``expire_sweep_interval`` seconds) and ``purge_expired``
      delete dead rows in bounded batches under ``_wlock``, each batch its own transaction;
      deleting a dead row changes nothing any reader can see.
    - Scan: a page is ``seq >= cursor ORDER BY seq LIMIT count`` in one statement; the next
      cursor is one past the last ``seq`` returned, 0 at the end. A key present during a whole
      iteration keeps its ``seq``, and the pages cover ``seq`` ranges that partition the line
      in increasing order, so it is returned exactly once; keys inserted meanwhile get larger
      ``seq``\\ s and may or may not be reached. Nothing in a scan holds a lock between calls.
    - ``close()`` first sets ``_closed`` and empties the registry under ``_readers_lock`` (no new
      reader can register afterwards; reader creation holds that lock while the keeper builds
      the reader, so the keeper is never stopped under it), stops the flusher and the sweeper,
      detaches the writer under ``_wlock`` (waiting for an in-flight write or transaction),
      then on the keeper closes each reader under its own lock (waiting for an in-flight
      ``get``) and the writer last, then stops the keeper and releases the directory lock.
      SQLite checkpoints the WAL into the database and deletes it when the last connection
      closes. A call racing with ``close()`` either completes normally or raises
      ``KvsError("... closed")``; never a sqlite3 error.

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

import contextlib
import logging
import math
import os
import queue
import sqlite3
import threading
import weakref
from collections.abc import Callable, Iterator, Sequence
from types import TracebackType
from typing import Any, TypeVar

from kvs.engine.base import FsyncPolicy, check_fsync_policy
from kvs.engine.callbacks import CallbackGuard
from kvs.engine.clock import Clock, wall_clock_ms
from kvs.engine.datadir import DataDir, fsync_dir
from kvs.engine.mapping import EngineMapping
from kvs.engine.transaction import Current, Staged, TransactionView, apply_update, declare, pairs
from kvs.engine.values import (
    check_deadline,
    key_bytes,
    remaining_seconds,
    ttl_deadline,
    value_bytes,
)
from kvs.errors import KeyNotFoundError, KvsError
from kvs.glob import compile_glob
from kvs.limits import DEFAULT_MAX_KEY_BYTES, DEFAULT_MAX_VALUE_BYTES

__all__ = ["SqliteKvsEngine", "DB_FILE", "FORMAT_VERSION"]

log = logging.getLogger("kvs.engine.sqlite")

_T = TypeVar("_T")

ENGINE_NAME = "sqlite"
FORMAT_VERSION = 2
DB_FILE = "kvs.sqlite3"

_SYNCHRONOUS: dict[FsyncPolicy, str] = {"never": "NORMAL", "always": "FULL", "interval": "NORMAL"}

_BUSY_TIMEOUT = 5.0
"""Seconds a connection waits for a lock held by another connection (another process that
opened the file directly, or a checkpoint) before failing with "database is locked"."""

_VALUE_BYTES = 1
"""``flags`` bit: the value was written as bytes."""
_KEY_BYTES = 2
"""``flags`` bit: the key was last written as bytes."""

_SWEEP_BATCH = 500
"""Dead rows deleted per sweep transaction: bounds how long one batch holds ``_wlock``."""

_MAX_CURSOR = 1 << 64
_MAX_SEQ = (1 << 63) - 1

_SQL_SCHEMA_V2 = (
    "CREATE TABLE kv (key BLOB PRIMARY KEY NOT NULL, value BLOB NOT NULL, flags INTEGER NOT NULL,"
    " expires INTEGER, seq INTEGER NOT NULL) WITHOUT ROWID",
    "CREATE INDEX kv_seq ON kv (seq)",
    "CREATE INDEX kv_expires ON kv (expires) WHERE expires IS NOT NULL",
)
_SQL_GET = "SELECT value, flags, expires FROM kv WHERE key = ?"
_SQL_SET = (
    "INSERT INTO kv (key, value, flags, expires, seq) VALUES (?, ?, ?, ?, ?) ON CONFLICT (key) DO UPDATE"
    " SET value = excluded.value, flags = excluded.flags, expires = excluded.expires RETURNING seq"
)
_SQL_REMOVE = "DELETE FROM kv WHERE key = ? RETURNING expires"
_SQL_SCAN = "SELECT seq, key, flags, expires FROM kv WHERE seq >= ? ORDER BY seq LIMIT ?"
_SQL_DEAD = "SELECT count(*) FROM kv WHERE expires <= ?"
_SQL_SWEEP = f"DELETE FROM kv WHERE key IN (SELECT key FROM kv WHERE expires <= ? LIMIT {_SWEEP_BATCH})"
_SQL_CLEAR = "DELETE FROM kv"
_SQL_MAX_SEQ = "SELECT max(seq) FROM kv"
_SQL_ROWS = "SELECT count(*) FROM kv"
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


def _sweep_loop(engine_ref: weakref.ref[SqliteKvsEngine], stop: threading.Event, interval: float) -> None:
    """Body of the expiry sweep thread: every ``interval`` seconds, purge the dead rows (in
    batches). Holds the engine only weakly, between ticks."""
    while not stop.wait(interval):
        engine = engine_ref()
        if engine is None:
            return
        try:
            engine._purge(stop)
        except KvsError as exc:
            if engine.closed:
                return
            log.error("expiry sweep: %s", exc)
        del engine


def _decode_value(stored: object, flags: int) -> str | bytes:
    """A stored value as the type it was written with; ``KvsError`` when the row is damaged."""
    if not isinstance(stored, bytes):
        raise KvsError("sqlite database is damaged: a stored value is not a BLOB")
    if flags & _VALUE_BYTES:
        return stored
    try:
        return stored.decode()
    except UnicodeDecodeError:
        raise KvsError("sqlite database is damaged: a stored text value is not UTF-8") from None



class SqliteKvsEngine(EngineMapping):
    """A `KvsEngine` stored in a SQLite database in WAL mode; safe to share between threads.

    Open with ``SqliteKvsEngine.open(path, fsync=..., clock=..., expire_sweep_interval=...)``;
    see the module docstring for the schema, the connection model, the thread-safety argument
    and what each ``fsync`` mode guarantees. Always ``close()`` it (or use ``with``): its
    threads and connections live until then.
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
        clock: Clock = wall_clock_ms,
        expire_sweep_interval: float = 0.1,
    ) -> SqliteKvsEngine:
        """Open (creating if needed, upgrading a format-1 directory) the data directory
        ``path`` and lock it.

        ``KvsError`` for a bad option, a directory already open, one created by another
        engine, or a database SQLite cannot use.
        """
        return cls(
            path,
            fsync=fsync,
            fsync_interval=fsync_interval,
            max_key_bytes=max_key_bytes,
            max_value_bytes=max_value_bytes,
            clock=clock,
            expire_sweep_interval=expire_sweep_interval,
        )

    def __init__(
        self,
        path: str | os.PathLike[str],
        *,
        fsync: FsyncPolicy = "never",
        fsync_interval: float = 1.0,
        max_key_bytes: int = DEFAULT_MAX_KEY_BYTES,
        max_value_bytes: int = DEFAULT_MAX_VALUE_BYTES,
        clock: Clock = wall_clock_ms,
        expire_sweep_interval: float = 0.1,
    ) -> None:
        fsync = check_fsync_policy(fsync)
        if (
            isinstance(fsync_interval, bool)
            or not isinstance(fsync_interval, (int, float))
            or not math.isfinite(fsync_interval)
            or fsync_interval <= 0
        ):
            raise KvsError(f"fsync_interval must be a positive number of seconds, not {fsync_interval!r}")
        if (
            isinstance(expire_sweep_interval, bool)
            or not isinstance(expire_sweep_interval, (int, float))
            or not math.isfinite(expire_sweep_interval)
            or expire_sweep_interval < 0
        ):
            raise KvsError(
                f"expire_sweep_interval must be a number of seconds >= 0, not {expire_sweep_interval!r}"
            )
        if not callable(clock):
            raise KvsError(f"clock must be a function returning Unix milliseconds, not {clock!r}")
        for what, limit in (("max_key_bytes", max_key_bytes), ("max_value_bytes", max_value_bytes)):
            if isinstance(limit, bool) or not isinstance(limit, int) or limit <= 0:
                raise KvsError(f"{what} must be a positive int, not {limit!r}")

        self._fsync: FsyncPolicy = fsync
        self.fsync_interval = float(fsync_interval)
        self.expire_sweep_interval = float(expire_sweep_interval)
        self._clock: Clock = clock
        self._max_key_bytes = max_key_bytes
        self._max_value_bytes = max_value_bytes
        self._guard = CallbackGuard()
        self._closed = True  # until fully open
        self._readers: set[_Reader] = set()
        self._readers_lock = threading.Lock()
        self._local = threading.local()
        self._wlock = threading.Lock()
        self._writer: sqlite3.Connection | None = None
        self._wcur: sqlite3.Cursor | None = None
        self._writes = 0  # successful writes, under _wlock
        self._flushed = 0  # value of _writes at the last successful flush, under _wlock
        self._rows = 0  # rows in kv, dead ones included, under _wlock
        self._next_seq = 1  # the seq the next inserted row gets, under _wlock
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []

        self._dir = DataDir(path, ENGINE_NAME, FORMAT_VERSION, upgradable_from=(1,))
        self.path = self._dir.path
        self._db = str(self.path / DB_FILE)
        self._keeper = _Keeper(f"kvs-sqlite-keeper:{self.path}")
        try:
            self._writer, self._wcur, self._rows, self._next_seq = self._keeper.call(self._open_writer)
            self._dir.upgraded(FORMAT_VERSION)
        except BaseException:
            self._keeper.call(lambda: self._close_connections([], self._writer, quiet=True))
            self._writer = self._wcur = None
            self._keeper.stop()
            self._dir.close()
            raise
        self._closed = False
        ref = weakref.ref(self)
        if fsync == "interval":
            self._start_thread(_flush_loop, (ref, self._stop, self.fsync_interval), "flush")
        if self.expire_sweep_interval > 0:
            self._start_thread(_sweep_loop, (ref, self._stop, self.expire_sweep_interval), "expire")
        log.debug("opened %s (fsync=%s)", self._db, fsync)

    def _start_thread(self, target: Callable[..., None], args: tuple[Any, ...], what: str) -> None:
        thread = threading.Thread(target=target, args=args, name=f"kvs-sqlite-{what}:{self.path}", daemon=True)
        thread.start()
        self._threads.append(thread)

    # ------------------------------------------------------------- keeper-thread helpers

    def _open_writer(self) -> tuple[sqlite3.Connection, sqlite3.Cursor, int, int]:
        """Open the writer connection, create (or upgrade) the schema, and prepare (cache)
        every statement the writer will run, so that no other thread ever creates one. Returns
        the connection, its cursor, the row count and the next ``seq``. On the keeper thread."""
        fresh = not os.path.exists(self._db)
        conn: sqlite3.Connection | None = None
        try:
            conn = sqlite3.connect(self._db, timeout=_BUSY_TIMEOUT, isolation_level=None, check_same_thread=False)
            if fresh:
                conn.execute("PRAGMA auto_vacuum = INCREMENTAL")  # before the first table exists
            (mode,) = conn.execute("PRAGMA journal_mode = WAL").fetchone()
            if str(mode).lower() != "wal":
                raise KvsError(f"data directory {self.path}: sqlite refused WAL mode (journal_mode is {mode!r})")
            conn.execute(f"PRAGMA synchronous = {_SYNCHRONOUS[self._fsync]}")
            cur = conn.cursor()
            self._ensure_schema(cur)
            ((rows,),) = cur.execute(_SQL_ROWS).fetchall()
            ((max_seq,),) = cur.execute(_SQL_MAX_SEQ).fetchall()
            cur.execute("BEGIN IMMEDIATE")
            cur.execute(_SQL_SET, (b"", b"", 0, None, 0)).fetchall()
            cur.execute(_SQL_GET, (b"",)).fetchall()
            cur.execute(_SQL_REMOVE, (b"",)).fetchall()
            cur.execute(_SQL_DEAD, (0,)).fetchall()
            cur.execute(_SQL_SWEEP, (0,))
            cur.execute(_SQL_CLEAR)
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
        return conn, cur, int(rows), int(max_seq or 0) + 1

    def _ensure_schema(self, cur: sqlite3.Cursor) -> None:
        """Create the v2 schema in a new database, or upgrade a format-1 one in place in one
        transaction (module docstring, Storage)."""
        columns = {row[1] for row in cur.execute("PRAGMA table_info(kv)").fetchall()}
        if "seq" in columns:
            return  # v2 already (possibly upgraded by an open that crashed before the metadata)
        if not columns:
            cur.execute("BEGIN IMMEDIATE")
            try:
                for sql in _SQL_SCHEMA_V2:
                    cur.execute(sql)
                cur.execute("COMMIT")
            except BaseException:
                cur.execute("ROLLBACK")
                raise
            return
        if columns != {"key", "value"} or self._dir.format_version != 1:
            raise KvsError(f"data directory {self.path}: sqlite database is damaged: unknown schema of table kv")
        self._upgrade_from_v1(cur)

    def _upgrade_from_v1(self, cur: sqlite3.Cursor) -> None:
        """Format 1 to format 2, in one SQLite transaction: a crash leaves one or the other.
        Every old value is UTF-8 text (flags 0), persistent; ``seq`` numbers the rows."""
        log.info("upgrading %s from sqlite format 1 to %s", self._db, FORMAT_VERSION)
        cur.execute("BEGIN IMMEDIATE")
        try:
            cur.execute("ALTER TABLE kv RENAME TO kv_v1")
            for sql in _SQL_SCHEMA_V2:
                cur.execute(sql)
            cur.execute(
                "INSERT INTO kv (key, value, flags, expires, seq)"
                " SELECT key, value, 0, NULL, row_number() OVER (ORDER BY key) FROM kv_v1"
            )
            cur.execute("DROP TABLE kv_v1")
            cur.execute("COMMIT")
        except BaseException:
            cur.execute("ROLLBACK")
            raise
        # Switch the file to incremental auto-vacuum (only a VACUUM can, once tables exist).
        cur.execute("PRAGMA auto_vacuum = INCREMENTAL")
        cur.execute("VACUUM")

    def _make_reader(self) -> _Reader:
        """A new reader connection with its statements prepared. On the keeper thread."""
        try:
            conn = sqlite3.connect(self._db, timeout=_BUSY_TIMEOUT, isolation_level=None, check_same_thread=False)
        except sqlite3.Error as exc:
            raise self._error(exc, "get") from None
        try:
            conn.execute("PRAGMA query_only = ON")
            cursor = conn.cursor()
            cursor.execute(_SQL_GET, (b"",)).fetchall()
            cursor.execute(_SQL_SCAN, (0, 1)).fetchall()
        except sqlite3.Error as exc:
            conn.close()
            raise self._error(exc, "get") from None
        return _Reader(conn, cursor)

    def _close_connections(self, readers: list[_Reader], writer: sqlite3.Connection | None,
                           quiet: bool = False) -> None:
        """Close the readers, then the writer: SQLite checkpoints the WAL into the database
        and deletes it as the last connection closes. On the keeper thread."""
        for reader in readers:
            reader.close()
        readers.clear()
        if writer is not None:
            try:
                writer.close()
            except sqlite3.Error as exc:
                if not quiet:
                    raise self._error(exc, "close") from None

    # ------------------------------------------------------------------------ helpers

    def _error(self, exc: sqlite3.Error, op: str) -> KvsError:
        return KvsError(f"data directory {self.path}: {_describe(exc)}: {exc} (during {op})")

    def _closed_error(self) -> KvsError:
        return KvsError(f"sqlite engine for data directory {self.path} is closed")

    def _check(self) -> None:
        """The entry check of every public method: open, and not called back from a body."""
        if self._guard.inside:
            self._guard.check()
        if self._closed:
            raise self._closed_error()

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

    def _read(self, sql: str, params: tuple[Any, ...], what: str) -> list[Any]:
        """Every row of the read-only query ``sql`` on the calling thread's reader connection
        (attached on first use), stepped to completion; ``KvsError`` once closed."""
        try:
            reader = self._local.reader
        except AttributeError:
            reader = self._attach_reader()
        with reader.lock:
            cur = reader.cursor
            if cur is None:
                raise self._closed_error()
            try:
                rows: list[Any] = cur.execute(sql, params).fetchall()
            except sqlite3.Error as exc:
                raise self._error(exc, what) from None
        return rows

    def _writer_cursor(self) -> sqlite3.Cursor:
        """The writer's cursor, under ``_wlock``; ``KvsError`` once closed."""
        cur = self._wcur
        if cur is None:
            raise self._closed_error()
        return cur

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

    def _upsert(self, cur: sqlite3.Cursor, kb: bytes, vb: bytes, flags: int, deadline: int | None) -> int:
        """Insert or update one row (keeping its ``seq``), under ``_wlock``; 1 if a row was
        inserted, else 0."""
        seq = self._next_seq
        (got,) = cur.execute(_SQL_SET, (kb, vb, flags, deadline, seq)).fetchone()
        if got == seq:
            self._next_seq = seq + 1
            return 1
        return 0

    def _purge(self, stop: threading.Event | None = None) -> int:
        """Delete every dead row, in batches of ``_SWEEP_BATCH``, each its own transaction
        (so writers wait at most one batch); the number deleted."""
        total = 0
        while stop is None or not stop.is_set():
            with self._wlock:
                cur = self._writer_cursor()
                try:
                    cur.execute(_SQL_SWEEP, (self._clock(),))
                except sqlite3.Error as exc:
                    raise self._error(exc, "expiry sweep") from None
                done = max(cur.rowcount, 0)
                self._rows -= done
                if done:
                    self._writes += 1
            total += done
            if done < _SWEEP_BATCH:
                break
        return total

    @staticmethod
    def _flags(value_is_bytes: bool, key_is_bytes: bool) -> int:
        return (_VALUE_BYTES if value_is_bytes else 0) | (_KEY_BYTES if key_is_bytes else 0)

    # --------------------------------------------------------------------------------- API

    def set(self, key: object, value: object, *, ttl: float | None = None) -> None:
        """Store ``value`` under ``key`` (clearing any expiry, or with ``ttl`` seconds);
        returns once committed (durability per ``fsync``)."""
        self._check()
        kb, key_is_bytes = key_bytes(key, self._max_key_bytes)
        vb, value_is_bytes = value_bytes(value, self._max_value_bytes)
        flags = self._flags(value_is_bytes, key_is_bytes)
        with self._wlock:
            cur = self._writer_cursor()
            deadline = None if ttl is None else ttl_deadline(ttl, self._clock())
            try:
                self._rows += self._upsert(cur, kb, vb, flags, deadline)
            except sqlite3.Error as exc:
                raise self._error(exc, "set") from None
            self._writes += 1

    def set_many(self, items: Sequence[tuple[object, object]]) -> None:
        """``set`` of each ``(key, value)`` pair in order, in one transaction (one commit for
        the batch). Every pair is checked first: a bad one raises and nothing is stored."""
        self._check()
        rows = []
        for key, value in pairs(items):
            kb, key_is_bytes = key_bytes(key, self._max_key_bytes)
            vb, value_is_bytes = value_bytes(value, self._max_value_bytes)
            rows.append((kb, vb, self._flags(value_is_bytes, key_is_bytes)))
        if not rows:
            return
        with self._wlock:
            cur = self._writer_cursor()
            next_seq = self._next_seq
            try:
                cur.execute("BEGIN IMMEDIATE")
                try:
                    added = 0
                    for kb, vb, flags in rows:
                        added += self._upsert(cur, kb, vb, flags, None)
                    cur.execute("COMMIT")
                except BaseException:
                    self._next_seq = next_seq
                    cur.execute("ROLLBACK")
                    raise
            except sqlite3.Error as exc:
                raise self._error(exc, "set") from None
            self._rows += added
            self._writes += len(rows)

    def set_batch(self, items: Sequence[tuple[object, object]]) -> None:
        """``set_many``: one SQLite transaction is already the cheapest way to store a batch."""
        self.set_many(items)

    def _lookup(self, key: object, now: int | None = None) -> tuple[bytes, int, int | None] | None:
        """The live row of ``key`` on the reader at ``now`` (default: the clock):
        ``(value, flags, expires)``, or None."""
        kb, _is_bytes = key_bytes(key, self._max_key_bytes)
        rows = self._read(_SQL_GET, (kb,), "get")
        if not rows:
            return None
        row = rows[0]
        expires = row[2]
        if expires is not None and expires <= (self._clock() if now is None else now):
            return None
        return row  # type: ignore[no-any-return]

    def get(self, key: object, default: Any = None) -> Any:
        """The value stored under ``key`` as the type it was written with, or ``default``
        when it is absent or expired. One primary-key lookup on the thread's reader, no lock
        shared with other threads (module docstring)."""
        if self._guard.inside:
            self._guard.check()
        if self._closed:
            raise self._closed_error()
        kb, _is_bytes = key_bytes(key, self._max_key_bytes)
        try:
            reader = self._local.reader
        except AttributeError:
            reader = self._attach_reader()
        with reader.lock:
            cur = reader.cursor
            if cur is None:
                raise self._closed_error()
            try:
                # fetchone steps past the at most one row, so the statement ends here.
                row = cur.execute(_SQL_GET, (kb,)).fetchone()
            except sqlite3.Error as exc:
                raise self._error(exc, "get") from None
        if row is None:
            return default
        stored, flags, expires = row
        if expires is not None and expires <= self._clock():
            return default
        if flags & _VALUE_BYTES and type(stored) is bytes:
            return stored
        try:
            return _decode_value(stored, flags)
        except KvsError as exc:
            raise KvsError(f"data directory {self.path}: {exc}") from None

    def __contains__(self, key: object) -> bool:
        self._check()
        return self._lookup(key) is not None

    def remove(self, key: object) -> None:
        """Delete ``key``; ``KeyNotFoundError`` when it is absent (or expired)."""
        self._check()
        kb, _is_bytes = key_bytes(key, self._max_key_bytes)
        with self._wlock:
            cur = self._writer_cursor()
            try:
                rows = cur.execute(_SQL_REMOVE, (kb,)).fetchall()
            except sqlite3.Error as exc:
                raise self._error(exc, "remove") from None
            if rows:
                self._rows -= 1
                self._writes += 1
                expires = rows[0][0]
                if expires is None or expires > self._clock():
                    return
        raise KeyNotFoundError(key if isinstance(key, str) else None)

    def __len__(self) -> int:
        """The number of live keys: the row count kept under ``_wlock`` minus the dead rows,
        counted through the ``expires`` index (module docstring, Counting)."""
        self._check()
        with self._wlock:
            cur = self._writer_cursor()
            try:
                ((dead,),) = cur.execute(_SQL_DEAD, (self._clock(),)).fetchall()
            except sqlite3.Error as exc:
                raise self._error(exc, "len") from None
            return self._rows - int(dead)

    def clear(self) -> None:
        """Remove every key in one statement (SQLite truncates the table), durably per
        ``fsync``; then give the freed pages back to the file system."""
        self._check()
        with self._wlock:
            cur = self._writer_cursor()
            try:
                cur.execute(_SQL_CLEAR)
                self._rows = 0
                self._writes += 1
                cur.execute("PRAGMA incremental_vacuum").fetchall()
            except sqlite3.Error as exc:
                raise self._error(exc, "clear") from None

    def scan(self, cursor: int = 0, *, match: str | bytes | None = None,
             count: int = 10) -> tuple[int, list[Any]]:
        """One step of a Redis SCAN (module docstring, Happens-before: scan)."""
        self._check()
        if isinstance(cursor, bool) or not isinstance(cursor, int) or not 0 <= cursor < _MAX_CURSOR:
            raise KvsError(f"scan cursor must be an int from 0 below 2**64, not {cursor!r}")
        if isinstance(count, bool) or not isinstance(count, int) or count < 1:
            raise KvsError(f"scan count must be an int >= 1, not {count!r}")
        matches = None if match is None else compile_glob(match)
        if cursor > _MAX_SEQ:
            return 0, []
        rows = self._read(_SQL_SCAN, (cursor, min(count, _MAX_SEQ)), "scan")
        now = self._clock()
        keys: list[Any] = []
        for _seq, kb, flags, expires in rows:
            if expires is not None and expires <= now:
                continue
            if matches is not None and not matches(kb):
                continue
            keys.append(kb if flags & _KEY_BYTES else kb.decode("utf-8", "surrogateescape"))
        if len(rows) < count:
            return 0, keys
        return rows[-1][0] + 1, keys

    # ------------------------------------------------------------------ transactions

    def _tx_load(self, ikey: str) -> Current | None:
        """The committed row of ``ikey`` (expired or not), read through the writer inside the
        open transaction (so under ``_wlock``)."""
        cur = self._writer_cursor()
        kb = ikey.encode("utf-8", "surrogateescape")
        try:
            rows = cur.execute(_SQL_GET, (kb,)).fetchall()
        except sqlite3.Error as exc:
            raise self._error(exc, "transaction") from None
        if not rows:
            return None
        vb, flags, expires = rows[0]
        return Current(_decode_value(vb, flags), expires, bool(flags & _KEY_BYTES))

    def _commit_staged(self, cur: sqlite3.Cursor, staged: dict[str, Staged]) -> int:
        """Write the view's staged changes inside the open transaction; the change of the
        row count (applied by the caller once committed)."""
        delta = 0
        for item in staged.values():
            if item.value is None:
                delta -= len(cur.execute(_SQL_REMOVE, (item.key,)).fetchall())
            else:
                flags = self._flags(isinstance(item.value, bytes), item.key_is_bytes)
                delta += self._upsert(cur, item.key, item.value_bytes, flags, item.deadline)
        return delta

    @contextlib.contextmanager
    def transaction(self, keys: object) -> Iterator[TransactionView]:
        """A transaction over the declared ``keys`` (``kvs.engine.transaction``): the body
        runs inside ``BEGIN IMMEDIATE`` on the writer, under ``_wlock``; its staged writes
        commit in that SQLite transaction on a normal exit, and nothing is written on an
        exception (``ROLLBACK``)."""
        self._check()
        declared = declare(keys, self._max_key_bytes)  # type: ignore[arg-type]  # checked there
        with self._wlock:
            cur = self._writer_cursor()
            next_seq = self._next_seq
            try:
                cur.execute("BEGIN IMMEDIATE")
            except sqlite3.Error as exc:
                raise self._error(exc, "transaction") from None
            view = TransactionView(self, declared, self._clock, self._max_key_bytes, self._max_value_bytes)
            try:
                with self._guard.calling_back():
                    yield view
                view.close()
                delta = self._commit_staged(cur, view.staged) if view.staged else 0
                cur.execute("COMMIT")
            except BaseException as exc:
                view.close()
                self._next_seq = next_seq
                try:
                    cur.execute("ROLLBACK")
                except sqlite3.Error:
                    pass
                if isinstance(exc, sqlite3.Error):
                    raise self._error(exc, "transaction") from None
                raise
            self._rows += delta
            if view.staged:
                self._writes += 1

    def update(  # type: ignore[override]  # not MutableMapping.update (kvs.engine.mapping)
        self, key: object, fn: Callable[[str | bytes | None], object]
    ) -> str | bytes | None:
        """Atomic read-modify-write (``kvs.engine.transaction``): the new value, or None."""
        if not callable(fn):
            apply_update(fn, None)  # raises the TypeError
        with self.transaction([key]) as tx:
            return tx.update(key, fn)

    def expire_at(self, key: object, unix_ms: int | None) -> bool:
        """Set ``key``'s deadline (a past one deletes it), or none; False if absent."""
        self._check()
        check_deadline(unix_ms)
        with self.transaction([key]) as tx:
            return tx.expire_at(key, unix_ms)

    def expire(self, key: object, ttl: float | None) -> bool:
        """Give ``key`` a TTL of ``ttl`` seconds, or none; False if absent."""
        self._check()
        if ttl is not None:
            ttl_deadline(ttl, 0)  # type and range checks before taking any lock
        with self.transaction([key]) as tx:
            return tx.expire(key, ttl)

    def expiry(self, key: object) -> int | None:
        """``key``'s deadline in Unix milliseconds, None if persistent;
        ``KeyNotFoundError`` if absent."""
        self._check()
        row = self._lookup(key)
        if row is None:
            raise KeyNotFoundError(key if isinstance(key, str) else None)
        return row[2]

    def ttl(self, key: object) -> float | None:
        """Seconds until ``key`` expires, None if persistent; ``KeyNotFoundError`` if absent."""
        self._check()
        now = self._clock()  # one reading: a key judged live has a positive ttl
        row = self._lookup(key, now)
        if row is None:
            raise KeyNotFoundError(key if isinstance(key, str) else None)
        return remaining_seconds(row[2], now)

    def purge_expired(self) -> int:
        """Run one expiry sweep now: delete every key whose deadline has passed; how many."""
        self._check()
        return self._purge()

    def close(self) -> None:
        """Stop the threads, close every connection (SQLite checkpoints the WAL as the last
        one closes) and release the data directory. Idempotent; later calls raise ``KvsError``."""
        if self._guard.inside:
            self._guard.check()
        with self._readers_lock:
            if self._closed:
                return
            self._closed = True
            readers = list(self._readers)
            self._readers.clear()
        self._stop.set()
        for thread in self._threads:
            if thread is not threading.current_thread():
                thread.join()
        with self._wlock:  # waits for an in-flight write
            writer, self._writer, self._wcur = self._writer, None, None
        try:
            self._keeper.call(lambda: self._close_connections(readers, writer))
        finally:
            writer = None
            self._keeper.stop()
            self._dir.close()
            log.debug("closed %s", self._db)

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
