"""Sharing objects between threads on free-threaded CPython 3.13 without its slow path.

On a free-threaded build every object is *owned* by the thread that created it: the owner
updates a cheap local reference count, every other thread an atomic *shared* count. The
lock-free read paths of dict and list (``_Py_TryIncrefCompare`` in ``pycore_object.h``) must
take a reference to the item they found; for an object owned by another live thread, whose
shared count is still zero, that attempt is refused and the read falls back to locking the
container. For a dict lookup we measured ~27 us instead of ~0.4 us on this machine
(``docs/free-threading.md``): a server whose pool threads write keys that other pool threads
read lives entirely on that slow path.

CPython's own answer is a flag in the shared count, ``_Py_REF_MAYBE_WEAKREF`` (bit 0), which
``_Py_TryIncRefShared`` accepts: it is what creating a weak reference sets, and what 3.14
exposes as ``PyUnstable_EnableTryIncRef``. :func:`share_fresh` sets it on 3.13, where no API
does, through ``ctypes``. The flag only says "other threads may take references to this
object"; reference counting, deallocation and merging at thread exit keep working exactly as
for an object that once had a weak reference.

Safety contract (caller's duty): the object was created by the calling thread and no other
thread can reach it yet. Then no other thread can be updating its shared count, so the plain
store below cannot race. After the object is published (e.g. inserted into a shared dict
under a lock or by an atomic dict store) the flag is visible to every reader with it.

The object layout is checked once at import (``ob_type`` at offset 24, ``ob_ref_local`` at 12,
``ob_ref_shared`` at 16 on 64-bit 3.13t); if the check fails, or on a GIL build, sharing is
a no-op and :data:`SHARING_ENABLED` is False.
"""

from __future__ import annotations

import ctypes
import logging
import sys
import sysconfig
import weakref
from collections.abc import Iterable

log = logging.getLogger("kvs.freethreading")

FREE_THREADED = sysconfig.get_config_var("Py_GIL_DISABLED") == 1

_OB_TID = 0
_OB_REF_LOCAL = 12
_OB_REF_SHARED = 16
_OB_TYPE = 24
_ssize_at = ctypes.c_ssize_t.from_address
_u32_at = ctypes.c_uint32.from_address


def _layout_is_as_expected() -> bool:
    """True when this interpreter lays objects out as 64-bit free-threaded CPython 3.13 does."""
    if not FREE_THREADED or sys.version_info[:2] != (3, 13) or ctypes.sizeof(ctypes.c_void_p) != 8:
        return False

    class Probe:
        pass

    probe = Probe()
    if ctypes.c_void_p.from_address(id(probe) + _OB_TYPE).value != id(Probe):
        return False
    before = _u32_at(id(probe) + _OB_REF_LOCAL).value
    extra = [probe, probe]
    after = _u32_at(id(probe) + _OB_REF_LOCAL).value
    del extra
    return after == before + 2 and _ssize_at(id(probe) + _OB_REF_SHARED).value == 0


SHARING_ENABLED = _layout_is_as_expected()
if FREE_THREADED and not SHARING_ENABLED:
    log.warning("free-threaded CPython %s: object layout not recognized; cross-thread dict "
                "lookups of kvs may take CPython's slow path", sys.version.split()[0])

# The machine words of the address space as one ctypes array (nothing is allocated: it is a
# view at address 0). ``_WORDS[(id(obj) + 16) >> 3]`` is ``obj``'s shared reference count
# (objects are 8-byte aligned): one subscript instead of a new ctypes object per access,
# which is what makes marking a million index entries at ``open`` cheap.
_WORDS = (ctypes.c_int64 * (1 << 44)).from_address(0) if SHARING_ENABLED else None


def share_fresh(obj: object) -> None:
    """Let other threads take references to ``obj`` lock-free (see the module docstring).

    ``obj`` must have been created by the calling thread, must not be reachable by any other
    thread yet, and must not be immortal (small ints, one-character latin-1 strings and
    interned strings are: they need no flag). Costs about 0.15 us."""
    if _WORDS is not None:
        i = (id(obj) + _OB_REF_SHARED) >> 3
        if _WORDS[i] == 0:
            _WORDS[i] = 1  # _Py_REF_MAYBE_WEAKREF


def shared_count_view() -> "ctypes.Array[ctypes.c_int64] | None":
    """For hot paths over objects the caller has just created (``open`` building the index,
    the store's writes and value cache): the word array, or None when sharing is disabled.
    The caller stores 1 at ``[(id(obj) + 16) >> 3]`` for each new, non-immortal object, under
    the contract of :func:`share_fresh` (a brand-new object's shared count is 0, so no check
    is needed)."""
    return _WORDS


def share_fresh_str(text: str) -> None:
    """:func:`share_fresh` for a string just made by ``bytes.decode``: skips the immortal
    singletons (the empty string and one-character latin-1 strings)."""
    if len(text) > 1 or (text and ord(text) > 0xFF):
        share_fresh(text)


def is_shareable(obj: object) -> bool:
    """True when another thread can take a reference to ``obj`` without the slow path
    (the flag is set, the shared count is non-zero, or the object is immortal). Tests use it."""
    if not SHARING_ENABLED:
        return True
    if _u32_at(id(obj) + _OB_REF_LOCAL).value == 0xFFFFFFFF:
        return True
    return _ssize_at(id(obj) + _OB_REF_SHARED).value != 0


def fresh_shared_int(n: int) -> int:
    """An int equal to ``n`` that other threads can read lock-free: a new object marked
    shareable, or ``n`` itself when it is a (immortal) small int."""
    if -5 <= n <= 256:
        return n
    m = int.from_bytes(n.to_bytes(16, "little", signed=True), "little", signed=True)
    share_fresh(m)
    return m


def _owned_here_and_unshared(obj: object) -> bool:
    """True when ``obj`` is not immortal, is owned by the calling thread, and no other thread
    has taken a counted reference to it (its shared count is zero)."""
    addr = id(obj)
    if _u32_at(addr + _OB_REF_LOCAL).value == 0xFFFFFFFF:
        return False
    probe = object()  # owned by this thread: its ob_tid is ours
    mine = ctypes.c_size_t.from_address(id(probe) + _OB_TID).value
    return ctypes.c_size_t.from_address(addr + _OB_TID).value == mine and _ssize_at(addr + _OB_REF_SHARED).value == 0


def share(obj: object) -> None:
    """Let other threads take references to ``obj`` lock-free, whoever may already hold it.

    For a weak-referenceable object this asks CPython itself: creating a weak reference sets
    the flag with an atomic compare-and-swap (``_PyObject_SetMaybeWeakref``). Other objects
    are left alone (use :func:`share_fresh` for those you just created)."""
    if SHARING_ENABLED:
        try:
            weakref.ref(obj)
        except TypeError:
            pass


def share_new(obj: object) -> None:
    """:func:`share` for an object the calling thread just created and has not published:
    weak-referenceable or not, it gets the flag (immortal objects need none)."""
    if SHARING_ENABLED:
        try:
            weakref.ref(obj)
        except TypeError:
            if _owned_here_and_unshared(obj):
                share_fresh(obj)


def share_constants(container: dict | list | tuple, *, recurse: bool = True) -> None:
    """Mark a module-level constant container built at import, and its items, shareable.

    A dict built at import by a thread that stays alive (the main thread, usually) and read
    by other threads sends every lookup whose stored key or value is not immortal down
    CPython 3.13t's locked slow path. Call this right after building it, before any other
    thread can see it. Items owned by another thread, or already referenced by one, are
    skipped (they cannot be marked safely)."""
    if not SHARING_ENABLED:
        return
    items: Iterable[object] = container.items() if isinstance(container, dict) else container
    if _owned_here_and_unshared(container):
        share_fresh(container)
    for item in items:
        for obj in (item if isinstance(container, dict) else (item,)):
            if _owned_here_and_unshared(obj):
                share_fresh(obj)
            if recurse and isinstance(obj, (dict, list, tuple)):
                share_constants(obj, recurse=False)


def _share_owned(obj: object) -> None:
    try:
        weakref.ref(obj)  # atomic, by CPython itself
    except TypeError:
        if _owned_here_and_unshared(obj):
            share_fresh(obj)


def share_module_globals(namespace: dict[str, object]) -> None:
    """Call as the last statement of a module read by many threads: ``share_module_globals(globals())``.

    Every global a function loads (``LOAD_GLOBAL``) is a lookup in the module's dict; on 3.13t
    a value made at import by a thread that is still alive (struct methods, prebuilt bytes,
    ints above 256, enum members, constant tables) sends every such load from another thread
    down the dict's locked slow path, and all worker threads then queue on that one dict's
    lock. This marks the module's values, the members of classes defined in it, and the items
    of its constant containers. Runs once per import, before other threads can use the
    module's new objects (they wait on the import lock)."""
    if not SHARING_ENABLED:
        return
    module = namespace.get("__name__")
    for value in list(namespace.values()):
        _share_owned(value)
        if isinstance(value, type) and getattr(value, "__module__", None) == module:
            for member in list(vars(value).values()):
                _share_owned(member)
        elif isinstance(value, (dict, list, tuple)):
            share_constants(value)


def share_attributes(obj: object) -> None:
    """Mark ``obj`` and its current attribute values shareable (call at the end of an
    ``__init__`` whose object other threads will read). Values other threads already hold
    are marked only through CPython's atomic weak-reference path."""
    if not SHARING_ENABLED:
        return
    _share_owned(obj)
    values = list(getattr(obj, "__dict__", {}).values())
    for cls in type(obj).__mro__:
        for name in getattr(cls, "__slots__", ()):
            if name not in ("__weakref__", "__dict__"):
                try:
                    values.append(getattr(obj, name))
                except AttributeError:
                    pass
    for value in values:
        _share_owned(value)
