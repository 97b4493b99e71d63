"""Sharing objects between threads on free-threaded CPython 3.13 without its slow path.

On a free-threaded build every object is *owned* by the thread that created it: the owner
updates a cheap local reference count, every other thread an atomic *shared* count. The
lock-free read paths of dict and list (``_Py_TryIncrefCompare`` in ``pycore_object.h``) must
take a reference to the item they found; for an object owned by another live thread, whose
shared count is still zero, that attempt is refused and the read falls back to locking the
container (``docs/free-threading.md``, section 1, has the figures): a server whose pool
threads write keys that other pool threads read would live entirely on that slow path.

CPython's own answer is a flag in the shared count, ``_Py_REF_MAYBE_WEAKREF`` (bit 0), which
``_Py_TryIncRefShared`` accepts: it is what creating a weak reference sets, and what 3.14
exposes as ``PyUnstable_EnableTryIncRef``. On 3.13, where no API does, :func:`mark_shared`
sets it through ``ctypes``. The flag only says "other threads may take references to this
object"; reference counting, deallocation and merging at thread exit keep working exactly as
for an object that once had a weak reference.

The one primitive and its contract
    :func:`mark_shared` stores 1 into the object's shared count, unchecked. That is safe only
    for an object the calling thread has just created and that no other thread can reach
    yet: then no other thread can be updating that count, so the plain store cannot race,
    and the store publishing the object (a dict store, an attribute store: both end in a
    sequentially consistent atomic on 3.13t) makes the flag visible with the object. Hot
    paths inline it as ``SHARED_COUNTS[(id(obj) + SHARED_COUNT_OFFSET) >> 3] = 1`` (one
    subscript, no call); :func:`str_needs_mark` is the one definition of which strings need
    it (the others are immortal singletons), and the hot paths inline exactly its
    expression. ``tests/test_freethreading.py`` and the engine's marking tests check both.

Objects others may already reach
    :func:`share_attributes` and :func:`share_module_globals` mark objects made earlier,
    which other threads might already reach. They never store into such an object's count:
    a weak-referenceable object is flagged by CPython itself (creating a weak reference sets
    the flag with an atomic compare-and-swap), and an immutable value that is not (int,
    float, str, bytes, tuple, frozenset) is replaced by an equal copy made here
    (:func:`shared_copy`), which no other thread can reach until the attribute or global
    store publishes it. Anything else is left as it is: it stays correct, only slower.

Turning it off
    ``KVS_MARK_SHARED=0`` in the environment (read at import) turns every mark into a no-op
    and :data:`SHARED_COUNTS` into None: kvs must stay correct without marks, only slower
    (``scripts/test`` runs the engine and server tests a second time that way). On a GIL
    build, or when the object layout check below fails, marking is off too.

The object layout is checked once at import (``ob_type`` at offset 24, ``ob_ref_local`` at 12,
``ob_ref_shared`` at 16 on 64-bit 3.13t).
"""

from __future__ import annotations

import ctypes
import logging
import os
import sys
import sysconfig
import weakref
from typing import Any, TypeVar, cast

T = TypeVar("T")

log = logging.getLogger("kvs.freethreading")

FREE_THREADED = sysconfig.get_config_var("Py_GIL_DISABLED") == 1

_OB_TID = 0
_OB_REF_LOCAL = 12
SHARED_COUNT_OFFSET = 16
"""Offset of ``ob_ref_shared`` in an object header (64-bit 3.13t): the one definition."""
_OB_TYPE = 24
_IMMORTAL_LOCAL = 0xFFFFFFFF
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
    return after == before + 2 and _ssize_at(id(probe) + SHARED_COUNT_OFFSET).value == 0


LAYOUT_KNOWN = _layout_is_as_expected()
"""This interpreter's object headers are laid out as 64-bit free-threaded 3.13's."""
if FREE_THREADED and not LAYOUT_KNOWN:
    log.warning("free-threaded CPython %s: object layout not recognized; cross-thread dict "
                "lookups of kvs may take CPython's slow path", sys.version.split()[0])

MARKING_ENABLED = LAYOUT_KNOWN and os.environ.get("KVS_MARK_SHARED", "1") != "0"
"""True when marks are made: a free-threaded 3.13 with the known layout, and
``KVS_MARK_SHARED`` is not ``0``."""

SHARED_COUNTS: ctypes.Array[ctypes.c_int64] | None = (
    (ctypes.c_int64 * (1 << 44)).from_address(0) if MARKING_ENABLED else None)
"""The machine words of the address space as one ctypes array (a view at address 0, nothing
allocated), or None when marking is off. ``SHARED_COUNTS[(id(obj) + SHARED_COUNT_OFFSET) >> 3]``
is ``obj``'s shared reference count (objects are 8-byte aligned): one subscript per mark,
which is what makes marking a million index entries at ``open`` cheap."""


def mark_shared(obj: object) -> None:
    """Let other threads take references to ``obj`` lock-free: the one primitive.

    Contract (see the module docstring): ``obj`` was created by the calling thread, no other
    thread can reach it yet, and it is not immortal (small ints, one-character latin-1
    strings and interned strings are; see :func:`str_needs_mark`)."""
    if SHARED_COUNTS is not None:
        SHARED_COUNTS[(id(obj) + SHARED_COUNT_OFFSET) >> 3] = 1  # _Py_REF_MAYBE_WEAKREF


def str_needs_mark(text: str) -> bool:
    """False for the immortal singleton strings (the empty string and one-character
    latin-1 strings), which need no mark and must not get one. Hot paths inline exactly this
    expression."""
    return len(text) > 1 or (len(text) == 1 and ord(text) > 0xFF)


def mark_shared_str(text: str) -> None:
    """:func:`mark_shared` for a string just made (by ``bytes.decode``, say)."""
    if SHARED_COUNTS is not None and (len(text) > 1 or (len(text) == 1 and ord(text) > 0xFF)):
        SHARED_COUNTS[(id(text) + SHARED_COUNT_OFFSET) >> 3] = 1


def fresh_shared_int(n: int) -> int:
    """An int equal to ``n`` that other threads can read lock-free: a new object marked
    shared, or ``n`` itself when it is a (immortal) small int or marking is off."""
    if SHARED_COUNTS is None or -5 <= n <= 256:
        return n
    m = int.from_bytes(n.to_bytes((n.bit_length() + 8) // 8, "little", signed=True), "little", signed=True)
    mark_shared(m)
    return m


def _is_immortal(obj: object) -> bool:
    return _u32_at(id(obj) + _OB_REF_LOCAL).value == _IMMORTAL_LOCAL


def shared_copy(value: T) -> T:
    """An object equal to the immutable ``value`` (int, float, str, bytes, tuple or frozenset
    of such), made here and marked shared, for a value that other threads may already reach:
    it is marked before anyone else can see it, so the mark cannot race. ``value`` itself for
    an immortal object, another type, or when marking is off."""
    return cast(T, _copy_of(value))


def _copy_of(value: Any) -> Any:
    if SHARED_COUNTS is None or _is_immortal(value):
        return value
    kind = type(value)
    if kind is int:
        return fresh_shared_int(value)
    if kind is str:
        copy: Any = value.encode("utf-8", "surrogatepass").decode("utf-8", "surrogatepass")
    elif kind is bytes:
        copy = bytes(bytearray(value)) if value else value
    elif kind is float:
        copy = float.fromhex(value.hex())
    elif kind is tuple:
        if not value:
            return value
        copy = tuple([_copy_of(item) for item in value])
    elif kind is frozenset:
        copy = frozenset([_copy_of(item) for item in value])
    else:
        return value
    if copy is value or _is_immortal(copy):  # a singleton: nothing to mark
        return copy
    mark_shared(copy)
    return copy


def _flag_in_place(obj: object) -> bool:
    """Flag a weak-referenceable object through CPython's own atomic path; False if ``obj``
    is not weak-referenceable."""
    try:
        weakref.ref(obj)
    except TypeError:
        return False
    return True


def _shared_value(value: Any) -> Any:
    """``value`` flagged in place when CPython can do it atomically, else a shared copy."""
    if SHARED_COUNTS is None or _flag_in_place(value):
        return value
    return shared_copy(value)


def share_attributes(obj: object) -> None:
    """Make ``obj`` and its current attribute values cheap for other threads to read (call
    at the end of an ``__init__`` whose object other threads will read): ``obj`` and
    weak-referenceable values are flagged by CPython's atomic path, immutable values are
    replaced by shared copies (module docstring). The attributes' values stay equal."""
    if SHARED_COUNTS is None:
        return
    _flag_in_place(obj)
    names = list(getattr(obj, "__dict__", {}))
    for cls in type(obj).__mro__:
        slots = cls.__dict__.get("__slots__", ())
        names += [slots] if isinstance(slots, str) else [n for n in slots if n not in ("__weakref__", "__dict__")]
    for name in names:
        try:
            value = getattr(obj, name)
        except AttributeError:
            continue
        shared = _shared_value(value)
        if shared is not value:
            object.__setattr__(obj, name, shared)


def share_module_globals(namespace: dict[str, Any]) -> None:
    """Make a hot module's globals cheap for other threads to load. Call it as the module's
    last statement, ``share_module_globals(globals())``: every module whose functions run on
    many threads does, in that one visible way.

    Every global a function loads (``LOAD_GLOBAL``) is a lookup in the module's dict; on 3.13t
    a value made at import by a thread that is still alive (struct methods, prebuilt bytes,
    ints above 256, constant tables) sends every such load from another thread down the
    dict's locked slow path. Values are flagged or replaced by shared copies as in
    :func:`share_attributes`; a constant dict or list built at import is replaced by a copy
    whose items are shared (its own functions load it by name, so they see the copy); the
    members of classes defined in the module are flagged in place."""
    if SHARED_COUNTS is None:
        return
    module = namespace.get("__name__")
    for name, value in list(namespace.items()):
        if name.startswith("__"):  # __builtins__ and the module's own attributes stay as they are
            continue
        if isinstance(value, type):
            _flag_in_place(value)
            if value.__module__ == module:
                for member in list(vars(value).values()):
                    _flag_in_place(member)
            continue
        kind = type(value)
        if kind is dict:
            copy: Any = {shared_copy(k): _shared_value(v) for k, v in value.items()}
        elif kind is list:
            copy = [_shared_value(v) for v in value]
        else:
            copy = _shared_value(value)
        if copy is not value:
            if kind is dict or kind is list:
                mark_shared(copy)
            namespace[name] = copy


def is_shareable(obj: object) -> bool:
    """True when another thread can take a reference to ``obj`` without the slow path (the
    flag is set, the shared count is non-zero, or the object is immortal). Tests use it; on
    an interpreter whose layout is not known it answers True (nothing to tell)."""
    if not LAYOUT_KNOWN:
        return True
    if _is_immortal(obj):
        return True
    return _ssize_at(id(obj) + SHARED_COUNT_OFFSET).value != 0

