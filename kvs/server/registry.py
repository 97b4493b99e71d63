"""The live connections of one server, and the narrow interface they have to it.

:class:`ConnectionRegistry` is the server half of every connection: the epoll set the
connections are armed in, the descriptor-to-connection map the serving threads look ready
descriptors up in, the shutdown flag, the session factory and the command count of closed
connections. It is the :class:`~kvs.server.connection.ConnectionHost` of each connection,
so a connection never sees the server.

Who touches what: ``add`` runs on the accepting thread only; ``connections`` is looked up
by every serving thread (a subscript: on 3.13t ``dict.get`` locks the dict) and changed by
``add`` and ``forget``, single dict operations, atomic on 3.13t. ``stopping`` goes from
False to True once (``stop``); a thread that reads False just before releases a connection
the shutdown drain then closes under the connection's lock (see ``KvsServer._drain``).
"""

from __future__ import annotations

import select
import socket
import threading

from kvs.freethreading import share_attributes, share_module_globals
from kvs.server.connection import Connection
from kvs.server.protocols import SessionFactory
from kvs.server.sessions import Session

ARM_ONESHOT = select.EPOLLIN | select.EPOLLONESHOT | select.EPOLLRDHUP
"""``dispatch``: one event per arming."""
ARM_EDGE = select.EPOLLIN | select.EPOLLET | select.EPOLLRDHUP
"""``leader-followers``: stays armed; one event per new edge."""


class ConnectionRegistry:
    """The connections of one server (see the module docstring)."""

    def __init__(self, epoll: select.epoll, sessions: SessionFactory, *, edge_triggered: bool,
                 send_timeout: float) -> None:
        self.epoll = epoll
        self.sessions = sessions
        self.edge_triggered = edge_triggered
        self.arm = ARM_EDGE if edge_triggered else ARM_ONESHOT
        self.send_timeout = send_timeout
        self.stopping = False
        self.connections: dict[int, Connection] = {}
        self._commands_of_closed = 0
        self._emptied = threading.Condition()  # notified by forget once stopping
        share_attributes(self)  # serving threads read these attributes on every turn

    # ------------------------------------------------------------------ ConnectionHost
    def rearm(self, fd: int) -> None:
        self.epoll.modify(fd, self.arm)

    def forget(self, conn: Connection) -> None:
        try:
            self.epoll.unregister(conn.fd)
        except (OSError, ValueError):
            pass
        if self.connections.get(conn.fd) is conn:
            del self.connections[conn.fd]
        with self._emptied:
            self._commands_of_closed += conn.session.commands if conn.session is not None else 0
            if self.stopping:
                self._emptied.notify_all()

    def make_session(self, first_byte: int, peer: str) -> Session | None:
        return self.sessions.make_session(first_byte, peer)

    # ------------------------------------------------------------------ the server's side
    def add(self, sock: socket.socket, peer: str) -> Connection:
        """Register an accepted (non-blocking) socket as an ``IDLE`` connection, armed."""
        conn = Connection(self, sock, peer)
        self.connections[conn.fd] = conn
        self.epoll.register(conn.fd, self.arm)
        return conn

    def stop(self) -> None:
        """From now on owners close their connections instead of releasing them."""
        self.stopping = True

    def snapshot(self) -> list[Connection]:
        """The live connections now."""
        return list(self.connections.values())

    def count(self) -> int:
        """How many connections are open now."""
        return len(self.connections)

    def total_commands(self) -> int:
        """Requests executed so far (closed connections included)."""
        live = sum(c.session.commands for c in self.snapshot() if c.session is not None)
        with self._emptied:
            return self._commands_of_closed + live

    def wait_empty(self, timeout: float) -> bool:
        """Wait up to ``timeout`` seconds for the last connection to be forgotten (once
        stopping); True when none is left."""
        with self._emptied:
            return self._emptied.wait_for(lambda: not self.connections, timeout=timeout)


share_module_globals(globals())
