"""The kvs server: connections on an epoll set, served by the threads of a thread pool.

In the default I/O model, ``leader-followers``, every pool thread waits on the epoll set
itself and serves, on that same thread, the connection whose readiness event the kernel
handed it; in ``dispatch``, one I/O thread waits and hands ready connections to the pool's
queue. ``server.py`` describes both; ``connection.py`` the connection state machine.
"""

from kvs.server.server import KvsServer, parse_address

__all__ = ["KvsServer", "parse_address"]
