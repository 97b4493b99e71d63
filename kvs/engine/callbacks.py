"""Refusing calls back into an engine from inside ``update``'s function or a transaction.

While ``update(key, fn)`` runs ``fn`` and while the body of ``with store.transaction(keys)``
runs, the calling thread holds the engine's write locks of those keys. A call from that
thread back into the engine could wait for a lock the thread itself holds (a deadlock), or
take locks out of order; so every public method refuses it with a ``KvsError`` instead.

Why a dict and not a ``threading.local``
    The check sits on ``get``'s lock-free path. On free-threaded 3.13 an attribute of a
    ``threading.local`` costs over 100 ns to read (it goes through a per-thread dict lookup
    under a lock), a third of a cached ``get``'s budget; the truth value of a dict that is
    almost always empty costs nothing measurable. So the guard is a dict of the thread
    identities currently inside a callback: ``get`` looks at its emptiness (one load) and only
    when some thread anywhere is inside a callback asks whether it is this one.

Happens-before
    Only a thread itself adds and removes its own identity, so the answer to "am I inside"
    is exact for the asking thread; other threads may see the dict non-empty for a moment
    and then take the slower check, which answers no for them.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterator

from kvs.errors import KvsError
from kvs.freethreading import mark_shared, share_module_globals

_get_ident = threading.get_ident

REENTRY_MESSAGE = ("cannot call the store from inside update()'s function or a transaction's body "
                   "(it holds the store's write locks of those keys; use the transaction's view)")


class CallbackGuard:
    """The threads inside a callback of one engine (module docstring). ``inside`` is the
    dict to test for emptiness on hot paths; :meth:`check` is the full test."""

    __slots__ = ("inside",)

    def __init__(self) -> None:
        self.inside: dict[int, int] = {}
        mark_shared(self.inside)

    def check(self) -> None:
        """``KvsError`` if the calling thread is inside a callback of this engine."""
        if self.inside and _get_ident() in self.inside:
            raise KvsError(REENTRY_MESSAGE)

    @contextlib.contextmanager
    def calling_back(self) -> Iterator[None]:
        """The calling thread is inside a callback until the block ends. Not nestable:
        entering while inside raises (that would be a call back into the store)."""
        me = _get_ident()
        if me in self.inside:
            raise KvsError(REENTRY_MESSAGE)
        mark_shared(me)
        self.inside[me] = 1
        try:
            yield
        finally:
            del self.inside[me]


share_module_globals(globals())
