"""KvsServer: readiness-driven connections served by a thread pool, in one of two I/O models.

Design, ``io_model="leader-followers"`` (the default): the pool threads wait on the epoll set
themselves.

- ``serve_forever`` starts one long-running job per pool thread (``_poll_connections``); the
  pool is then dedicated to this server. Each job waits in ``epoll_wait`` on the connections'
  set; the kernel hands each readiness event to exactly one waiting thread, which claims the
  connection (``Connection.claim``: ``IDLE`` to ``BUSY`` under its lock) and serves it on the
  same thread. No hand-off through a queue, no second thread woken per request
  (``docs/protocol.md``, "Server hot paths", has what that buys). Idle connections still
  pin no thread: threads wait in the kernel, not on a connection.
- Connections are edge-triggered (``EPOLLET``) and stay armed: a request costs no
  ``epoll_ctl``. An event for a connection that is being served makes it ``AGAIN`` and its
  owner serves another turn (``connection.py`` has the state machine and the argument that
  no event is lost).
- The thread running ``serve_forever`` only accepts connections and sweeps half-sent frames
  (it closes an ``IDLE`` connection only through ``Connection.close(only_if_idle=True)``, one
  step under the connection's lock, so a pool thread cannot claim it halfway).
- ``shutdown()`` (from any thread): the accepting thread stops accepting, closes idle
  connections, lets busy ones finish the requests they have read (their owners close them
  instead of releasing them), waits for them, and ``serve_forever`` returns. An eventfd that
  is never read is made readable in the connections' set, which wakes every waiting pool
  thread for good; ``serve_forever`` returns once every one of them has left its loop.
  ``shutdown`` called on one of those threads (from an engine, say) does not wait: it would
  wait for itself. The pool and the engine belong to the caller and stay open.
- While the server runs, the pool runs nothing else: jobs spawned on it wait until then.
- Each loop runs under ``SCHED_BATCH`` by default (``scheduling="batch"``, see
  ``scheduling.py``): a woken loop does not preempt a client on its CPU. The thread's own
  policy is restored when the loop ends.
- The choice of pool matters little here (every pool runs N identical loops); it is the
  ``dispatch`` model that the pool benchmarks compare.

Design, ``io_model="dispatch"`` (readiness dispatch with one-shot epoll):

- The thread running :meth:`KvsServer.serve_forever` is the I/O thread. It owns an epoll
  set holding the listening socket, a wake-up eventfd, and every *idle* connection, each
  registered with ``EPOLLIN | EPOLLONESHOT``. It accepts new connections, and when a
  connection becomes readable it claims it and hands ``Connection.serve`` to the pool. It
  never reads a request itself and never waits for a client.
- A pool thread running ``serve`` reads what is there without blocking, executes the complete
  requests in order, writes the responses (one ``send`` per batch), and re-arms the connection
  in the epoll set (``epoll_ctl`` is safe from any thread). So an idle connection costs no
  thread at all: with N pool threads, thousands of idle clients wait in the kernel while the
  next active one is served at once. A pipelining client gets up to 16 batches per turn.
- Shutdown as above, without the eventfd: the I/O thread drains and returns.

Both models:

- Limits: ``max_connections`` (further connections are accepted and closed at once with a
  warning; out of descriptors, new ones wait in the listen backlog, see
  ``_pause_accepting``; ``kvs-server`` raises its open-file limit to fit), frame and
  key/value sizes (enforced by the protocol decoders before allocating),
  ``frame_timeout`` for a half-sent request (checked by the accepting thread on idle
  connections), ``send_timeout`` for a client that stops reading.
- The live connections, their epoll set and the shutdown flag are the
  ``registry.ConnectionRegistry``, which is all a connection sees of its server; the
  protocol of a connection is chosen from its first byte (``protocols.SessionFactory``).
  Sessions see the server through ``sessions.ServerFacts``, a read-only view.
"""

from __future__ import annotations

import errno
import logging
import os
import select
import socket
import threading
import time
from collections.abc import Iterable
from functools import partial
from types import TracebackType

from kvs.address import parse_address
from kvs.engine.base import KvsEngine
from kvs.errors import KvsError
from kvs.freethreading import share_attributes, share_module_globals
from kvs.limits import DEFAULT_MAX_KEY_BYTES, DEFAULT_MAX_VALUE_BYTES
from kvs.server.connection import IDLE, serve_all, serving_here
from kvs.server.protocols import PROTOCOLS, SessionFactory, check_protocols
from kvs.server.registry import ConnectionRegistry
from kvs.server.scheduling import SCHEDULING, thread_scheduling
from kvs.server.sessions import ServerFacts
from kvs.thread_pool.base import ThreadPool

__all__ = ["IO_MODELS", "PROTOCOLS", "KvsServer", "parse_address"]

log = logging.getLogger("kvs.server")

IO_MODELS = ("leader-followers", "dispatch")
"""How connections reach pool threads (see the module docstring); the first is the default."""
_EVENTS_PER_WAIT = 4  # leader-followers: ready connections one pool thread takes per epoll_wait
# accept() errors that pause accepting (_pause_accepting) rather than fail one connection
_OUT_OF_RESOURCES = frozenset({errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM})


class KvsServer:
    """A multithreaded kvs server over one engine and one thread pool.

    The socket is bound in the constructor (``KvsError`` when the address is in use or
    invalid), so ``address`` is known before ``serve_forever`` runs."""

    def __init__(
        self,
        engine: KvsEngine,
        pool: ThreadPool,
        addr: tuple[str, int] | str = ("127.0.0.1", 4000),
        *,
        max_connections: int = 10000,
        max_key_bytes: int = DEFAULT_MAX_KEY_BYTES,
        max_value_bytes: int = DEFAULT_MAX_VALUE_BYTES,
        frame_timeout: float = 30.0,
        send_timeout: float = 30.0,
        protocols: Iterable[str] = PROTOCOLS,
        io_model: str = IO_MODELS[0],
        scheduling: str = SCHEDULING[0],
    ) -> None:
        if isinstance(addr, str):
            addr = parse_address(addr)
        self.protocols = check_protocols(protocols)
        if io_model not in IO_MODELS:
            raise KvsError(f"unknown I/O model {io_model!r} (choose from {', '.join(IO_MODELS)})")
        self.io_model = io_model
        if scheduling not in SCHEDULING:
            raise KvsError(f"unknown scheduling mode {scheduling!r} (choose from {', '.join(SCHEDULING)})")
        self.scheduling = scheduling
        if max_connections < 1 or frame_timeout <= 0 or send_timeout <= 0:
            raise KvsError("max_connections, frame_timeout and send_timeout must be positive")
        self.engine = engine
        self.pool = pool
        self.max_connections = max_connections
        self.max_key_bytes = max_key_bytes
        self.max_value_bytes = max_value_bytes
        self.frame_timeout = frame_timeout
        self.send_timeout = send_timeout
        self.started_at = time.time()
        family = socket.AF_INET6 if ":" in addr[0] else socket.AF_INET
        self._listener = socket.socket(family, socket.SOCK_STREAM)
        try:
            self._listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            self._listener.bind(addr)
            self._listener.listen(1024)
        except OSError as exc:
            self._listener.close()
            if exc.errno == errno.EADDRINUSE:
                raise KvsError(f"cannot listen on {addr[0]}:{addr[1]}: address already in use") from None
            raise KvsError(f"cannot listen on {addr[0]}:{addr[1]}: {exc.strerror}") from None
        self._listener.setblocking(False)
        self._address: tuple[str, int] = self._listener.getsockname()[:2]
        self._epoll = select.epoll()
        self._wake_fd = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
        # leader-followers: made readable once at shutdown and never read, so that every pool
        # thread waiting on the connections' epoll set wakes up and leaves.
        self._stop_fd = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
        self._pollers = 0  # leader-followers loops still running; guarded by _drained
        self._local = threading.local()  # .poller: this thread runs a leader-followers loop
        self._io_thread: threading.Thread | None = None  # the thread running serve_forever
        # The sessions' view counts through the registry (made just below), not the server.
        registry: ConnectionRegistry
        facts = ServerFacts(
            address=self._address, max_connections=max_connections, max_key_bytes=max_key_bytes,
            max_value_bytes=max_value_bytes, io_model=io_model, pool_name=pool.name,
            pool_threads=pool.threads, engine_name=engine.name, engine_fsync=engine.fsync,
            started_at=self.started_at, connection_count=lambda: registry.count(),
            total_commands=lambda: registry.total_commands())
        registry = self._registry = ConnectionRegistry(
            self._epoll, SessionFactory(engine, facts, self.protocols),
            edge_triggered=io_model == "leader-followers", send_timeout=send_timeout)
        # Out of descriptors, accept() fails while the listener stays readable: the epoll set
        # holding the listener stops watching it until the next sweep (_pause_accepting)
        # instead of spinning. Both only touched by the accepting thread.
        self._listener_ep: select.epoll | None = None
        self._accept_paused = False
        self._accept_failures = 0  # failed accepts since the last one that worked
        self._running = threading.Event()
        self._stopped = threading.Event()
        self._stopped.set()
        self._serve_lock = threading.Lock()
        self._drained = threading.Condition()  # notified when a leader-followers loop ends
        share_attributes(self)  # pool threads read the server's attributes on every request

    # ------------------------------------------------------------------ public API
    @property
    def address(self) -> tuple[str, int]:
        """The bound ``(host, port)`` (still known after the listener is closed)."""
        return self._address

    def serve_forever(self) -> None:
        """Serve until :meth:`shutdown`; then return. Runs the I/O loop in this thread."""
        if not self._serve_lock.acquire(blocking=False):
            raise KvsError("serve_forever is already running")
        try:
            # Who runs the loop, then "not stopped", then the check: a shutdown() racing with
            # this start either is seen here or waits for _stopped; one from a signal handler
            # in this thread never waits (it would wait for itself).
            self._io_thread = threading.current_thread()
            self._stopped.clear()
            if self._registry.stopping:
                return
            self._running.set()
            if self.io_model == "dispatch":
                self._io_loop()
            else:
                self._accept_loop()
        finally:
            self._running.clear()
            self._stopped.set()
            self._serve_lock.release()

    def shutdown(self, timeout: float | None = None) -> None:
        """Stop serving (from any thread): in-flight requests are answered, connections
        closed, and ``serve_forever`` returns. Waits for that unless called from the I/O
        thread itself (e.g. from a signal handler running there) or from a thread serving a
        request (from an engine, say): those would wait for themselves."""
        self._registry.stop()
        wake_fd = self._wake_fd
        if wake_fd >= 0:
            try:
                os.eventfd_write(wake_fd, 1)
            except OSError:
                pass
        if threading.current_thread() is not self._io_thread \
                and not getattr(self._local, "poller", False) and not serving_here():
            self._stopped.wait(timeout)

    def close(self) -> None:
        """Shut down and release the listening socket."""
        self.shutdown()
        self._listener.close()
        self._epoll.close()
        # -1 first: a late shutdown() (a signal) must not write to a reused descriptor number
        wake_fd, self._wake_fd = self._wake_fd, -1
        if wake_fd >= 0:
            os.close(wake_fd)
        stop_fd, self._stop_fd = self._stop_fd, -1
        if stop_fd >= 0:
            os.close(stop_fd)

    def __enter__(self) -> KvsServer:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()

    def connection_count(self) -> int:
        """Connections open now."""
        return self._registry.count()

    def total_commands(self) -> int:
        """Requests executed so far (closed connections included)."""
        return self._registry.total_commands()

    # ------------------------------------------------------------------ the I/O thread
    def _io_loop(self) -> None:
        self._io_thread = threading.current_thread()
        ep = self._epoll
        lfd = self._listener.fileno()
        ep.register(lfd, select.EPOLLIN)
        ep.register(self._wake_fd, select.EPOLLIN)
        self._listener_ep = ep
        registry = self._registry
        conns = registry.connections
        spawn = self.pool.spawn
        fanout = max(1, self.pool.threads)
        tick = min(1.0, self.frame_timeout / 4)
        next_sweep = time.monotonic() + tick
        try:
            while not registry.stopping:
                ready = []
                for fd, events in ep.poll(tick):
                    if fd == lfd:
                        self._accept_all()
                    elif fd == self._wake_fd:
                        self._consume_wake()
                    else:
                        try:
                            conn = conns[fd]  # not conns.get: see _poll_connections
                        except KeyError:
                            continue
                        if conn.claim(events):
                            ready.append(conn)
                if ready:
                    # One job per ready connection, or, when more are ready than the pool
                    # has threads, one job per thread serving a share of them: fewer queue
                    # operations and wake-ups per request under load.
                    if len(ready) <= fanout:
                        jobs = [partial(serve_all, [conn]) for conn in ready]
                    else:
                        jobs = [partial(serve_all, ready[i::fanout]) for i in range(fanout)]
                    for n, job in enumerate(jobs):
                        try:
                            spawn(job)
                        except Exception as exc:  # the pool was shut down under us
                            log.error("cannot dispatch connections to the pool: %s", exc)
                            for unsent in jobs[n:]:  # this thread still owns their connections
                                for conn in unsent.args[0]:
                                    conn.close()
                            break
                next_sweep = self._sweep_if_due(next_sweep, tick)
        finally:
            self._drain()

    def _accept_loop(self) -> None:
        """leader-followers: start the pool's loops, then accept and sweep until shutdown."""
        io_ep = select.epoll()
        lfd = self._listener.fileno()
        io_ep.register(lfd, select.EPOLLIN)
        io_ep.register(self._wake_fd, select.EPOLLIN)
        self._listener_ep = io_ep
        self._epoll.register(self._stop_fd, select.EPOLLIN)
        tick = min(1.0, self.frame_timeout / 4)
        next_sweep = time.monotonic() + tick
        try:
            for _ in range(max(1, self.pool.threads)):
                with self._drained:
                    self._pollers += 1
                try:
                    self.pool.spawn(self._poll_connections)
                except Exception as exc:
                    with self._drained:
                        self._pollers -= 1
                    raise KvsError(f"cannot start the server's loops on the pool: {exc}") from None
            while not self._registry.stopping:
                for fd, _events in io_ep.poll(tick):
                    if fd == lfd:
                        self._accept_all()
                    else:
                        self._consume_wake()
                next_sweep = self._sweep_if_due(next_sweep, tick)
        finally:
            self._registry.stop()  # also when a spawn failed: the loops already started leave
            io_ep.close()
            os.eventfd_write(self._stop_fd, 1)
            self._drain()
            with self._drained:
                self._drained.wait_for(lambda: self._pollers == 0)

    def _poll_connections(self) -> None:
        """leader-followers pool job: wait for ready connections, serve each one here."""
        ep = self._epoll
        registry = self._registry
        conns = registry.connections
        stop_fd = self._stop_fd
        self._local.poller = True
        try:
            # SCHED_BATCH while it serves, the thread's own policy again after (scheduling.py)
            with thread_scheduling(self.scheduling):
                while not registry.stopping:
                    for fd, events in ep.poll(1.0, _EVENTS_PER_WAIT):
                        if fd == stop_fd:
                            continue
                        try:
                            # A subscript, not conns.get: on 3.13t dict.get locks the dict, and
                            # every pool thread looks up this one dict for every request.
                            conn = conns[fd]
                        except KeyError:  # closed meanwhile
                            continue
                        if conn.claim(events):
                            conn.serve(events)  # answers, then hands it back or closes
        except Exception:  # never leave the server waiting for this loop
            log.exception("a server loop failed")
        finally:
            self._local.poller = False
            with self._drained:
                self._pollers -= 1
                self._drained.notify_all()

    def _accept_all(self) -> None:
        while True:
            try:
                sock, peer_addr = self._listener.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:
                if exc.errno in _OUT_OF_RESOURCES:
                    self._pause_accepting(exc)
                else:  # a connection that failed on its way in (ECONNABORTED, ...)
                    log.debug("accept failed: %s", exc.strerror)
                return
            if self._accept_failures:
                log.info("accepting connections again (%d accepts had failed)", self._accept_failures)
                self._accept_failures = 0
            peer = f"{peer_addr[0]}:{peer_addr[1]}"
            if self._registry.count() >= self.max_connections:
                log.warning("refusing connection from %s: %d connections is the limit", peer, self.max_connections)
                sock.close()
                continue
            sock.setblocking(False)
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            self._registry.add(sock, peer)

    def _consume_wake(self) -> None:
        try:
            os.eventfd_read(self._wake_fd)
        except BlockingIOError:
            pass

    def _pause_accepting(self, exc: OSError) -> None:
        """accept() failed for want of descriptors or memory: the pending connection stays
        in the backlog and the listener stays readable, so polling it again at once would
        spin. Stop watching it until the next sweep (at most a second away), which tries
        again; the failure is logged once until an accept succeeds."""
        self._accept_failures += 1
        if self._accept_failures == 1:
            log.warning("accept failed: %s; new connections wait in the backlog until "
                        "descriptors are free (%d connections open)", exc.strerror, self._registry.count())
        if self._listener_ep is None:
            return
        try:
            self._listener_ep.modify(self._listener.fileno(), 0)
            self._accept_paused = True
        except (OSError, ValueError):
            pass

    def _sweep_if_due(self, next_sweep: float, tick: float) -> float:
        """Run :meth:`_close_stalled` (and resume a paused accept) when ``next_sweep`` has
        come; the next sweep's time."""
        now = time.monotonic()
        if now < next_sweep:
            return next_sweep
        self._close_stalled(now)
        if self._accept_paused and self._listener_ep is not None:
            self._accept_paused = False
            self._listener_ep.modify(self._listener.fileno(), select.EPOLLIN)
        return now + tick

    def _close_stalled(self, now: float) -> None:
        """Close idle connections that sent part of a request and then completed none for
        over ``frame_timeout``.

        The sweep does the bookkeeping, so a request costs its connection nothing for it: an
        ``IDLE`` connection's session is still (its last owner handed it back under the
        connection's lock, a happens-before edge to this thread reading it), and one seen
        in mid-frame is timed from that sweep on, until a sweep sees it out of the frame or
        with more commands done. So a stall is closed between ``frame_timeout`` and
        ``frame_timeout`` plus two sweep intervals after it began (the sweep interval is a
        quarter of ``frame_timeout``, at most a second). A busy connection is skipped; the
        close itself re-checks ``IDLE`` under the lock."""
        limit = self.frame_timeout
        for conn in self._registry.snapshot():
            session = conn.session
            if conn.state != IDLE or session is None:  # a hint: close() re-checks IDLE
                continue
            if not session.in_frame:
                conn.partial_since = 0.0
                continue
            commands = session.commands
            if not conn.partial_since or commands != conn.partial_commands:
                conn.partial_since = now
                conn.partial_commands = commands
            elif now - conn.partial_since > limit and conn.close(only_if_idle=True):
                log.warning("closed connection from %s: half-sent request for over %.0f s", conn.peer, limit)

    def _drain(self) -> None:
        """Shutdown: stop accepting, close idle connections, wait for busy ones to finish."""
        try:
            self._epoll.unregister(self._listener.fileno())
        except (OSError, ValueError):
            pass
        # Close the listener now: serve_forever cannot run again, so a connection waiting in
        # the backlog (or made later) must be refused, not left hanging until close().
        self._listener.close()
        registry = self._registry
        while True:
            for conn in registry.snapshot():
                # Check and close under the connection's lock: an owner in release() that saw
                # stopping False (just before shutdown) may be turning BUSY into IDLE right
                # now (unlocked, we could see BUSY, skip it, and wait forever for an IDLE
                # connection to close), and a leader-followers thread may be claiming it.
                conn.close(only_if_idle=True)
            if registry.wait_empty(1.0):
                return


share_module_globals(globals())
