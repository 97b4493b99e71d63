"""Reproducer: the 3.13t cross-thread dict lookup cliff, and what kvs does about it.

A writer thread inserts N keys (values: fresh ints) into a dict and stays alive; another
thread looks every key up with an equal key object it made itself (as a server thread that
decoded the key from the network does). Modes:

- ``plain``: what a naive shared dict index does: the lookups take CPython's slow path.
- ``shared``: the writer marks each key and value shared (``kvs.freethreading.mark_shared_str``
  and ``mark_shared``) before inserting it (what KvStore does).
- ``intern``: keys interned with ``sys.intern`` (immortal in 3.13: never freed).

    .venv/bin/python bench/ft_pitfalls.py
"""

from __future__ import annotations

import random
import sys
import threading
import time

from kvs.freethreading import MARKING_ENABLED, mark_shared, mark_shared_str

N = 20000


def lookup_us(mode: str) -> float:
    d: dict[str, int] = {}
    ready, stop = threading.Event(), threading.Event()

    def writer() -> None:
        for i in range(N):
            k = f"key{i:08d}"
            v = (i << 40) | 12345
            if mode == "shared":
                mark_shared_str(k)
                mark_shared(v)
            elif mode == "intern":
                k = sys.intern(k)
            d[k] = v
        ready.set()
        stop.wait()

    w = threading.Thread(target=writer)
    w.start()
    ready.wait()
    result = []

    def reader() -> None:
        probe = [f"key{i:08d}" for i in range(N)]
        random.Random(1).shuffle(probe)
        start = time.perf_counter()
        for k in probe:
            assert d.get(k) is not None
        result.append((time.perf_counter() - start) / N * 1e6)

    r = threading.Thread(target=reader)
    r.start()
    r.join()
    stop.set()
    w.join()
    return result[0]


if __name__ == "__main__":
    print(f"Python {sys.version.split()[0]}, GIL enabled: {sys._is_gil_enabled()}, "
          f"kvs marking enabled: {MARKING_ENABLED}")
    for mode in ("plain", "shared", "intern"):
        print(f"{mode:8s} {lookup_us(mode):8.3f} us per lookup")
