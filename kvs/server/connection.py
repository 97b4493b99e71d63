"""One client connection and its state machine: every transition of it is in this class.

A connection is in exactly one state, and **every transition takes** ``lock``:

- ``IDLE``: in the server's epoll set, owned by nobody. Whoever receives its readiness event
  makes it ``BUSY`` with :meth:`Connection.claim` (the I/O thread in the ``dispatch`` I/O
  model, a pool thread in ``leader-followers``). The accepting thread may close it
  (half-sent frame timeout, shutdown): :meth:`Connection.close` with ``only_if_idle``.
- ``BUSY``: owned by exactly one thread running :meth:`Connection.serve`. That thread alone
  reads, parses, executes and writes; then it hands the connection back with
  :meth:`Connection.release` (``IDLE``, or closed on shutdown).
- ``AGAIN`` (``leader-followers`` only): still owned as ``BUSY``, and a readiness event
  arrived meanwhile (``claim`` recorded it in ``pending``). The owner does not let go:
  ``release`` turns it back into ``BUSY`` and the owner serves another turn.
- ``CLOSED``: final (:meth:`Connection.close`, idempotent).

Threads other than the owner may *read* ``state`` without the lock only as a hint that a
locked transition re-checks (the sweep skips connections that are not ``IDLE``, then closes
with ``only_if_idle``).

One owner at a time, so requests of one connection are answered in order by one thread.
In ``dispatch`` the connection is registered ``EPOLLONESHOT``: no second event until the
owner re-arms it. In ``leader-followers`` it is registered edge-triggered (``EPOLLET``) and
stays armed, which saves an ``epoll_ctl`` per request; an edge that arrives while the
connection is owned is not lost but recorded as ``AGAIN`` under the lock, so either the
owner sees it before letting go, or the connection is ``IDLE`` by the time the event is
claimed. A turn that leaves bytes unread (``MAX_BATCHES_PER_TURN``) re-arms explicitly
(``epoll_ctl`` re-checks readiness), as no new edge would come for bytes already there.

Because the session is only touched by the owning thread, and ownership passes through the
lock (and, in ``dispatch``, through the pool's queue, itself a happens-before edge from spawn
to run), the session needs no synchronization of its own.

A connection knows its server only through :class:`ConnectionHost` (re-arm, stopping,
forget, session factory, send timeout), which ``kvs.server.registry.ConnectionRegistry``
implements.

Reads are non-blocking (``MSG_DONTWAIT``): a worker never waits for a client to send.
Writes wait for socket space up to ``send_timeout`` (a client that does not read its
responses loses its connection, it does not keep a worker forever).
"""

from __future__ import annotations

import logging
import select
import socket
import threading
from typing import Protocol

from kvs.freethreading import share_attributes, share_module_globals
from kvs.server.sessions import Session

log = logging.getLogger("kvs.server")

IDLE, BUSY, CLOSED, AGAIN = 0, 1, 2, 3
FIRST_RECV_SIZE = 16 * 1024  # a turn's first read: enough for a pipelined batch
RECV_SIZE = 256 * 1024  # reads after a full one: large values and deep pipelines
# (CPython allocates the whole size for every recv before shrinking the result, so a small
# first read is cheaper per request: docs/protocol.md, "Server hot paths".)
MAX_BATCHES_PER_TURN = 16  # then re-arm, so one busy pipeline cannot starve the others
_MSG_DONTWAIT = socket.MSG_DONTWAIT
_HANGUP = select.EPOLLRDHUP | select.EPOLLHUP | select.EPOLLERR
_SERVING = threading.local()  # .active: this thread is inside a dispatch-model serve job


class ConnectionHost(Protocol):
    """What a connection needs of its server, and nothing more."""

    @property
    def stopping(self) -> bool:
        """True once the server shuts down: owners close connections instead of releasing."""
        ...

    @property
    def edge_triggered(self) -> bool:
        """Connections stay armed between turns (``leader-followers``)."""
        ...

    @property
    def send_timeout(self) -> float:
        """Seconds a write may wait for socket space."""
        ...

    def rearm(self, fd: int) -> None:
        """Arm ``fd`` in the epoll set for its next event (``OSError``/``ValueError`` when
        that is no longer possible)."""
        ...

    def forget(self, conn: Connection) -> None:
        """``conn`` is closing: drop it from the epoll set and the live connections (called
        before its socket is closed, so its descriptor number cannot have been reused)."""
        ...

    def make_session(self, first_byte: int, peer: str) -> Session | None:
        """The protocol session for a connection whose first byte is ``first_byte``, or
        None when no enabled protocol starts so."""
        ...


def serving_here() -> bool:
    """True on a thread that is serving a connection in a ``dispatch`` pool job (a
    ``shutdown`` there must not wait for the server to finish: it would wait for itself)."""
    return getattr(_SERVING, "active", False)


def serve_all(connections: list[Connection]) -> None:
    """``dispatch`` pool job: serve claimed connections in turn (each ``serve`` handles its
    own errors)."""
    _SERVING.active = True
    try:
        for conn in connections:
            conn.serve()
    finally:
        _SERVING.active = False


class Connection:
    """A client connection: its socket, its protocol session and who owns it when."""

    __slots__ = ("host", "sock", "fd", "peer", "session", "lock", "state", "pending", "partial_since",
                 "partial_commands", "__weakref__")

    def __init__(self, host: ConnectionHost, sock: socket.socket, peer: str) -> None:
        self.host = host
        self.sock = sock
        self.fd = sock.fileno()
        self.peer = peer
        self.session: Session | None = None  # chosen from the first byte received
        self.lock = threading.Lock()
        self.state = IDLE
        self.pending = 0  # epoll events that came while AGAIN; under lock
        # Half-sent request tracking, only by the accepting thread's sweep
        # (KvsServer._close_stalled): when it first saw this connection idle in mid-frame, and
        # the session's command count then (a count that moved since means progress).
        self.partial_since = 0.0
        self.partial_commands = 0
        share_attributes(self)  # read by pool threads while this (accepting) thread lives

    # ------------------------------------------------------------------ transitions
    def claim(self, events: int = 0) -> bool:
        """IDLE to BUSY for the thread that received this connection's readiness event
        (``events``, the epoll mask). A BUSY connection becomes AGAIN and keeps ``events``
        for its owner's next turn. False unless this thread now owns the connection."""
        with self.lock:
            state = self.state
            if state == IDLE:
                self.state = BUSY
                return True
            if state == BUSY or state == AGAIN:
                self.state = AGAIN
                self.pending |= events
            return False

    def release(self, drained: bool) -> int | None:
        """The owner is done with a turn (``drained``: the socket had no more bytes): hand
        the connection back (``IDLE``, re-armed when that is needed) or close it on
        shutdown, and return None. When a readiness event came during the turn (``AGAIN``)
        the owner keeps the connection instead: the events it carried are returned, for
        another turn. Re-arming happens under the lock, after ``IDLE``: an event it causes
        finds the connection claimable."""
        host = self.host
        with self.lock:
            state = self.state
            if state == AGAIN and not host.stopping:
                self.state = BUSY
                events, self.pending = self.pending, 0
                return events
            if state != BUSY and state != AGAIN:
                return None
            if not host.stopping:
                self.state = IDLE
                if drained and host.edge_triggered:
                    return None  # still armed: the next bytes make a new edge
                try:
                    host.rearm(self.fd)
                    return None
                except (OSError, ValueError):
                    pass
        self.close()
        return None

    def close(self, only_if_idle: bool = False) -> bool:
        """To CLOSED, then forget and close the socket: from the owner, or from another
        thread when the connection is IDLE (``only_if_idle`` makes the check and the change
        one step, so no thread can claim it in between). Idempotent; True if this call
        closed it."""
        with self.lock:
            if self.state == CLOSED or (only_if_idle and self.state != IDLE):
                return False
            self.state = CLOSED
        self.host.forget(self)
        try:
            self.sock.close()
        except OSError:
            pass
        return True

    # ------------------------------------------------------------------ the owner's work
    def serve(self, events: int = 0) -> None:
        """The owner's job: answer every complete request available now, then release the
        connection; serve again while ``release`` says more has arrived."""
        while True:
            drained = self._serve_turn(events)
            if drained is None:
                return
            again = self.release(drained)
            if again is None:
                return
            events = again

    def _serve_turn(self, events: int) -> bool | None:
        """Read, execute and answer up to ``MAX_BATCHES_PER_TURN`` batches. True when the
        socket had no more bytes, False when some may be left, None once closed.

        A short read means the socket had nothing more, except for a hang-up already
        queued behind the data: its edge came with the same event (``events`` has
        ``EPOLLRDHUP``), so then reading goes on until the end of the stream is seen."""
        sock = self.sock
        session = self.session
        drained = False
        hangup = events & _HANGUP
        size = FIRST_RECV_SIZE
        try:
            for _ in range(MAX_BATCHES_PER_TURN):
                try:
                    data = sock.recv(size, _MSG_DONTWAIT)
                except (BlockingIOError, InterruptedError):
                    drained = True
                    break
                if not data:  # the peer closed its side
                    self.close()
                    return None
                if session is None:
                    session = self.session = self.host.make_session(data[0], self.peer)
                    if session is None:
                        self.close()
                        return None
                out = session.handle(data)
                if out:
                    try:
                        sent = sock.send(out)  # nearly always the whole reply at once
                    except (BlockingIOError, InterruptedError):
                        sent = 0
                    if sent < len(out):
                        self._send_all(out, sent)
                if session.closing:
                    self.close()
                    return None
                if len(data) < size and not hangup:  # a short read took everything there was
                    drained = True
                    break
                size = RECV_SIZE
        except OSError as exc:  # reset by peer, send timeout, ...
            log.debug("connection from %s ended: %s", self.peer, exc)
            self.close()
            return None
        except Exception:
            log.exception("internal error on the connection from %s", self.peer)
            self.close()
            return None
        return drained

    def _send_all(self, data: bytes, start: int = 0) -> None:
        """Send ``data[start:]``, waiting for socket space at most ``send_timeout`` at a time."""
        sock = self.sock
        timeout = self.host.send_timeout
        view = memoryview(data)[start:]
        while view:
            try:
                sent = sock.send(view)
            except (BlockingIOError, InterruptedError):
                # poll(), not select(): select() fails for descriptors >= FD_SETSIZE (1024)
                poller = select.poll()
                poller.register(sock, select.POLLOUT)
                if not poller.poll(timeout * 1000):
                    raise TimeoutError(f"client did not read its responses for {timeout} s") from None
                continue
            view = view[sent:]


share_module_globals(globals())
