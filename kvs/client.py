"""KvsClient: a blocking client of our binary protocol, with pipelining.

One client is one TCP connection and is meant for one thread at a time (give each thread
its own client; connections are cheap for the server, idle ones cost it no thread).
Every failure is a ``KvsError``: connection problems, timeouts, and errors the server
reports, with the server's message.

The client speaks protocol version 2 (``docs/protocol.md``): keys and values are ``str`` or
bytes-like, as in the engines, and a value reads back as the type it was written with; ``set``
takes a ``ttl`` in seconds. A key or value of another type is a ``TypeError`` and nothing is
sent. A kvs 0.1.0 server speaks only version 1 and closes the connection on the first
request (``KvsError`` saying so).
"""

from __future__ import annotations

import select
import socket
from types import TracebackType

from kvs.address import parse_address
from kvs.engine.values import Key, Value, ttl_deadline
from kvs.errors import KeyNotFoundError, KvsError
from kvs.freethreading import share_module_globals
from kvs.limits import DEFAULT_MAX_KEY_BYTES, DEFAULT_MAX_VALUE_BYTES
from kvs.protocol import (
    ProtocolError,
    Response,
    ResponseDecoder,
    Status,
    encode_get,
    encode_ping,
    encode_remove,
    encode_set,
)

_GET, _SET, _REMOVE, _PING = "get", "set", "remove", "ping"
Decoded = Response | ProtocolError
"""One item the response decoder yields: a response, or a malformed one's error."""
Outcome = str | bytes | KvsError | None
"""What one request came to: a value, an error, or nothing (see ``Pipeline``)."""
_READABLE = select.POLLIN | select.POLLERR | select.POLLHUP


class KvsClient:
    """A connection to a kvs server: ``KvsClient("127.0.0.1:4000")`` or
    ``KvsClient(("127.0.0.1", 4000))``. ``timeout`` bounds every wait for the server."""

    def __init__(
        self,
        addr: str | tuple[str, int],
        *,
        timeout: float | None = 30.0,
        max_key_bytes: int = DEFAULT_MAX_KEY_BYTES,
        max_value_bytes: int = DEFAULT_MAX_VALUE_BYTES,
    ) -> None:
        host, port = parse_address(addr) if isinstance(addr, str) else addr
        self.address = (host, port)
        self._limits = {"max_key_bytes": max_key_bytes}
        self._max_value = max_value_bytes
        self._decoder = ResponseDecoder(max_value_bytes=max_value_bytes)
        self._pending: list[Decoded] = []  # decoded responses not yet consumed
        try:
            self._sock = socket.create_connection((host, port), timeout=timeout)
        except OSError as exc:
            reason = exc.strerror or str(exc) or type(exc).__name__
            raise KvsError(f"cannot connect to {host}:{port}: {reason}") from None
        self._sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self._poller = select.poll()
        self._poller.register(self._sock, select.POLLIN | select.POLLOUT)
        self._closed = False

    # ------------------------------------------------------------------ commands
    def get(self, key: Key) -> str | bytes | None:
        """The value of ``key`` (``str`` or ``bytes``, the type it was written with), or
        ``None`` when the server has no such key."""
        return _result(_GET, self._call(encode_get(key, **self._limits)))

    def set(self, key: Key, value: Value, *, ttl: float | None = None) -> None:
        """Store ``value`` under ``key``; with ``ttl`` (seconds, millisecond precision), the
        key expires that long after the server stores it. ``TypeError`` for a ttl that is not
        a number, ``KvsError`` for one that is not positive and finite."""
        frame = encode_set(key, value, ttl_ms=_ttl_ms(ttl), **self._limits, max_value_bytes=self._max_value)
        _result(_SET, self._call(frame))

    def remove(self, key: Key) -> None:
        """Remove ``key``; ``KeyNotFoundError`` when the server has no such key."""
        _result(_REMOVE, self._call(encode_remove(key, **self._limits)))

    def ping(self) -> None:
        """Round trip to the server."""
        _result(_PING, self._call(encode_ping()))

    def pipeline(self) -> Pipeline:
        """Queue many requests and send them at once: ``with c.pipeline() as p: ...``,
        then ``p.results()``."""
        return Pipeline(self)

    # ------------------------------------------------------------------ plumbing
    def _call(self, frame: bytes) -> Decoded:
        return self._exchange([frame])[0]

    def _exchange(self, frames: list[bytes]) -> list[Decoded]:
        """Send ``frames`` and read one response each, interleaving writes and reads so
        that a long pipeline cannot deadlock against a server blocked on its own send."""
        if self._closed:
            raise KvsError("the client is closed")
        sock = self._sock
        want = len(frames)
        got = self._pending
        data = memoryview(b"".join(frames))
        try:
            while data:
                if got or len(data) > 65536:
                    # poll(), not select(): select() fails for descriptors >= FD_SETSIZE (1024)
                    timeout = sock.gettimeout()
                    ready = self._poller.poll(None if timeout is None else timeout * 1000)
                    if not ready:
                        raise TimeoutError("timed out")
                    events = ready[0][1]
                    if events & _READABLE:
                        self._receive(got)
                    if not events & select.POLLOUT:
                        continue
                sent = sock.send(data[:1 << 20])
                data = data[sent:]
            while len(got) < want:
                self._receive(got)
        except (OSError, ProtocolError) as exc:
            self.close()
            if isinstance(exc, ProtocolError):
                raise KvsError(f"bad response from the server: {exc}") from None
            reason = "timed out" if isinstance(exc, TimeoutError) else (exc.strerror or str(exc))
            raise KvsError(f"connection to {self.address[0]}:{self.address[1]} failed: {reason}") from None
        self._pending = got[want:]
        return got[:want]

    def _receive(self, into: list[Decoded]) -> None:
        chunk = self._sock.recv(256 * 1024)
        if not chunk:
            raise ConnectionError("the server closed the connection")
        for resp in self._decoder.feed(chunk):
            into.append(resp)

    def close(self) -> None:
        """Close the connection; idempotent."""
        if not self._closed:
            self._closed = True
            try:
                self._sock.close()
            except OSError:
                pass

    def __enter__(self) -> KvsClient:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()


def _ttl_ms(ttl: float | None) -> int | None:
    """A TTL in seconds as the wire's milliseconds, checked as the engines check it."""
    return None if ttl is None else ttl_deadline(ttl, 0)


_OLD_SERVER = "unsupported protocol version 2"


def _result(kind: str, resp: Decoded) -> str | bytes | None:
    """The value of one response to a request of ``kind``, or the error it carries raised."""
    outcome = _outcome(kind, resp)
    if isinstance(outcome, KvsError):
        raise outcome
    return outcome


def _outcome(kind: str, resp: Decoded) -> Outcome:
    if isinstance(resp, ProtocolError):  # a malformed response, skipped by the decoder
        return KvsError(f"bad response from the server: {resp}")
    status, value = resp
    if status is Status.VALUE:
        return value
    if status is Status.OK or status is Status.PONG:
        return None
    if status is Status.NOT_FOUND:
        return KeyNotFoundError() if kind == _REMOVE else None
    if status is Status.ERROR or status is Status.FATAL:
        message = str(value or "server error")
        if status is Status.FATAL and message.startswith(_OLD_SERVER):
            message = f"the server speaks only protocol version 1 (kvs 0.1.0): {message}"
        return KvsError(message)
    return KvsError(f"unexpected response status {status!r}")


class Pipeline:
    """Requests queued on a client and sent together; responses come back in order.

    ``results()`` lists one entry per request: the value for ``get`` (or ``None``), ``None``
    for ``set``/``remove``/``ping``, and, for a request that failed, the ``KvsError`` (e.g.
    ``KeyNotFoundError`` for a missing key's ``remove``) in its place, not raised."""

    def __init__(self, client: KvsClient) -> None:
        self._client = client
        self._frames: list[bytes] = []
        self._kinds: list[str] = []
        self._results: list[Outcome] | None = None

    def get(self, key: Key) -> Pipeline:
        return self._queue(_GET, encode_get(key, **self._client._limits))

    def set(self, key: Key, value: Value, *, ttl: float | None = None) -> Pipeline:
        c = self._client
        return self._queue(_SET, encode_set(key, value, ttl_ms=_ttl_ms(ttl), **c._limits, max_value_bytes=c._max_value))

    def remove(self, key: Key) -> Pipeline:
        return self._queue(_REMOVE, encode_remove(key, **self._client._limits))

    def ping(self) -> Pipeline:
        return self._queue(_PING, encode_ping())

    def _queue(self, kind: str, frame: bytes) -> Pipeline:
        if self._results is not None:
            raise KvsError("this pipeline was already executed")
        self._kinds.append(kind)
        self._frames.append(frame)
        return self

    def __len__(self) -> int:
        return len(self._frames)

    def execute(self) -> list[Outcome]:
        """Send every queued request, wait for all responses; the results (see class doc)."""
        if self._results is None:
            responses = self._client._exchange(self._frames) if self._frames else []
            self._results = [_outcome(k, r) for k, r in zip(self._kinds, responses, strict=True)]
            self._frames = []
        return self._results

    def results(self) -> list[Outcome]:
        """The results, executing the pipeline first if needed."""
        return self.execute()

    def __enter__(self) -> Pipeline:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        if exc_type is None:
            self.execute()


share_module_globals(globals())
