"""YCSB's core workloads as operation sequences, generated before any timing.

The request distributions follow YCSB's generators (``site.ycsb.generator`` in the YCSB
repository), vectorized with numpy:

- *zipfian* is YCSB's ``ScrambledZipfianGenerator``: a ``ZipfianGenerator`` over 10^10 + 1
  items with the zipfian constant 0.99 and YCSB's precomputed zeta(10^10, 0.99), whose draw
  is scrambled with YCSB's 64-bit FNV-1 hash modulo the record count. The popular keys are
  therefore spread over the key space, not the first ones.
- *latest* (workload D) is YCSB's ``SkewedLatestGenerator``: the newest record minus an
  (unscrambled) zipfian draw over the record count.
- *uniform*: every record equally likely.

The workloads (YCSB's ``workloads/workload[abcdf]``, plus U, the uniform read-only workload
the read-path issue is about):

====  ==========================================  ============
name  operations                                  distribution
====  ==========================================  ============
A     50% read, 50% update                        zipfian
B     95% read, 5% update                         zipfian
C     100% read                                   zipfian
D     95% read, 5% insert                         latest
F     50% read, 50% read-modify-write             zipfian
U     100% read                                   uniform
====  ==========================================  ============

Records are ``user`` + 12 digits (the record number) with 100-byte values that begin with
their key, so every read can be checked with one ``startswith``. An update or insert writes a
new 100-byte value of the same form. A read-modify-write is a read and then an update of the
same key by the client (as YCSB does it: not atomic). Several threads each get their own
sequence; in D each thread reads the latest among the loaded records and its *own* inserts,
so that every read has a value to check whatever the other threads' timing.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

ZIPFIAN_CONSTANT = 0.99
"""YCSB's ``ZipfianGenerator.ZIPFIAN_CONSTANT``."""
SCRAMBLED_ITEM_COUNT = 10_000_000_000
"""YCSB's ``ScrambledZipfianGenerator.ITEM_COUNT``: the zipfian runs over this many + 1 items."""
SCRAMBLED_ZETAN = 26.46902820178302
"""YCSB's ``ScrambledZipfianGenerator.ZETAN``: zeta(ITEM_COUNT, 0.99), precomputed there."""
FNV_OFFSET_BASIS_64 = 0xCBF29CE484222325
FNV_PRIME_64 = 1099511628211
VALUE_BYTES = 100
KEY_DIGITS = 12

READ, UPDATE, INSERT, READ_MODIFY_WRITE = 0, 1, 2, 3
"""Operation codes of a sequence."""


@dataclass(frozen=True)
class Workload:
    """One YCSB workload: operation proportions (the rest are reads) and a distribution."""

    name: str
    description: str
    update: float = 0.0
    insert: float = 0.0
    read_modify_write: float = 0.0
    distribution: str = "zipfian"  # zipfian | latest | uniform

    @property
    def read_only(self) -> bool:
        return self.update == self.insert == self.read_modify_write == 0.0


WORKLOADS: dict[str, Workload] = {w.name: w for w in (
    Workload("A", "50% read, 50% update, zipfian", update=0.5),
    Workload("B", "95% read, 5% update, zipfian", update=0.05),
    Workload("C", "100% read, zipfian"),
    Workload("D", "95% read, 5% insert, read latest", insert=0.05, distribution="latest"),
    Workload("F", "50% read, 50% read-modify-write, zipfian", read_modify_write=0.5),
    Workload("U", "100% read, uniform"),
)}


def key_of(n: int) -> str:
    """The key of record number ``n`` (YCSB's ``user`` prefix, fixed width)."""
    return f"user{n:0{KEY_DIGITS}d}"


def value_of(n: int, version: int) -> str:
    """A 100-byte value of record ``n``: its key, the version, then filler."""
    head = f"{key_of(n)}:{version}:"
    return head + "x" * (VALUE_BYTES - len(head))


def fnv_hash64(values: np.ndarray) -> np.ndarray:
    """YCSB's ``Utils.fnvhash64`` (FNV-1 over the 8 little-endian bytes, then ``Math.abs``)
    of every element, as non-negative int64."""
    v = values.astype(np.uint64)
    h = np.full(v.shape, FNV_OFFSET_BASIS_64, dtype=np.uint64)
    prime = np.uint64(FNV_PRIME_64)
    for _ in range(8):
        h ^= v & np.uint64(0xFF)
        v >>= np.uint64(8)
        h *= prime  # wraps modulo 2^64, as Java's long multiplication does
    return np.abs(h.view(np.int64))


def zeta(n: int, theta: float) -> float:
    """sum over i = 1..n of 1 / i^theta (YCSB's ``ZipfianGenerator.zetastatic``)."""
    return float(np.sum(1.0 / np.power(np.arange(1, n + 1, dtype=np.float64), theta)))


def zipfian(rng: np.random.Generator, size: int, items: int, zetan: float,
            theta: float = ZIPFIAN_CONSTANT) -> np.ndarray:
    """``size`` draws of YCSB's ``ZipfianGenerator.nextLong(items)`` with base 0: values in
    [0, items), 0 the most popular."""
    zeta2 = 1.0 + 0.5 ** theta
    alpha = 1.0 / (1.0 - theta)
    eta = (1.0 - (2.0 / items) ** (1.0 - theta)) / (1.0 - zeta2 / zetan)
    u = rng.random(size)
    uz = u * zetan
    out = (items * np.power(eta * u - eta + 1.0, alpha)).astype(np.int64)
    out[uz < 1.0 + 0.5 ** theta] = 1
    out[uz < 1.0] = 0
    return out


def scrambled_zipfian(rng: np.random.Generator, size: int, records: int) -> np.ndarray:
    """``size`` record numbers from YCSB's ``ScrambledZipfianGenerator(0, records - 1)``."""
    draws = zipfian(rng, size, SCRAMBLED_ITEM_COUNT + 1, SCRAMBLED_ZETAN)
    return fnv_hash64(draws) % records


@dataclass
class Sequence:
    """One thread's operations: ``ops[i]`` (an operation code) on record ``keys[i]``, writing
    version ``versions[i]`` where the operation writes."""

    ops: np.ndarray
    keys: np.ndarray
    versions: np.ndarray

    def __len__(self) -> int:
        return len(self.ops)

    def materialize(self, binary: bool = False) -> list[tuple[int, str | bytes, str | bytes | None]]:
        """``(op, key, value or None)`` triples, as text (or UTF-8 bytes when ``binary``).
        Call it in the thread that will run them: the objects are then owned by that thread
        (``docs/free-threading.md``)."""
        out: list[tuple[int, str | bytes, str | bytes | None]] = []
        for op, n, version in zip(self.ops.tolist(), self.keys.tolist(), self.versions.tolist(), strict=True):
            key = key_of(n)
            value = None if op == READ else value_of(n, version)
            if binary:
                out.append((op, key.encode(), None if value is None else value.encode()))
            else:
                out.append((op, key, value))
        return out


class Generator:
    """Operation sequences of the workloads over ``records`` loaded records (numbered from
    0), reproducible from ``seed``."""

    def __init__(self, records: int, seed: int = 0) -> None:
        if records < 2:
            raise ValueError("records must be at least 2")
        self.records = records
        self.seed = seed
        self._zetan: float | None = None

    def latest_zetan(self) -> float:
        """zeta(records, 0.99), for the unscrambled zipfian of read-latest (computed once)."""
        if self._zetan is None:
            self._zetan = zeta(self.records, ZIPFIAN_CONSTANT)
        return self._zetan

    def sequences(self, workload: Workload, ops: int, threads: int, round_: int = 0) -> list[Sequence]:
        """One sequence per thread, ``ops`` operations in all (split evenly). ``round_``
        varies the draws and, in D, where the inserted records are numbered (after every
        earlier round's), so that every round inserts new records."""
        per_thread = ops // threads
        out = []
        for t in range(threads):
            rng = np.random.default_rng([self.seed, ord(workload.name), threads, round_, t])
            out.append(self._sequence(rng, workload, per_thread, t, threads, round_ * ops))
        return out

    def _sequence(self, rng: np.random.Generator, w: Workload, n: int, thread: int, threads: int,
                  insert_base: int) -> Sequence:
        u = rng.random(n)
        ops = np.full(n, READ, dtype=np.int8)
        edge = w.update
        ops[u < edge] = UPDATE
        ops[(u >= edge) & (u < edge + w.insert)] = INSERT
        edge += w.insert
        ops[(u >= edge) & (u < edge + w.read_modify_write)] = READ_MODIFY_WRITE
        versions = (insert_base + np.arange(n, dtype=np.int64)) * threads + thread + 1
        if w.distribution == "uniform":
            keys = rng.integers(0, self.records, n, dtype=np.int64)
        elif w.distribution == "zipfian":
            keys = scrambled_zipfian(rng, n, self.records)
        elif w.distribution == "latest":
            keys = self._latest(rng, ops, thread, threads, insert_base)
        else:
            raise ValueError(f"unknown distribution {w.distribution!r}")
        return Sequence(ops, keys, versions)

    def _latest(self, rng: np.random.Generator, ops: np.ndarray, thread: int, threads: int,
                insert_base: int) -> np.ndarray:
        """Record numbers for read-latest: an insert takes this thread's next new record
        number; a read takes the newest record (this thread's inserts so far, then the
        loaded records from the last one down) minus a zipfian draw."""
        inserts = ops == INSERT
        before = np.cumsum(inserts) - inserts  # this thread's inserts before each operation
        new_number = self.records + insert_base + thread + threads * before
        rank = zipfian(rng, len(ops), self.records, self.latest_zetan())
        own = rank < before
        own_insert = before - 1 - rank  # the own insert that many back from the newest
        loaded = self.records - 1 - (rank - before)
        read_key = np.where(own, self.records + insert_base + thread + threads * own_insert, loaded)
        return np.where(inserts, new_number, read_key).astype(np.int64)
