"""The ycsb suite's operation sequences follow YCSB's generators (bench/ycsb_workloads.py)."""

from __future__ import annotations

import collections

import numpy as np
import pytest

from bench import ycsb_workloads as yw

pytestmark = pytest.mark.timeout(60)


def fnv_reference(value: int) -> int:
    """YCSB's Utils.fnvhash64, written out on Python ints (Java's long arithmetic)."""
    h = yw.FNV_OFFSET_BASIS_64
    for _ in range(8):
        h ^= value & 0xFF
        value >>= 8
        h = (h * yw.FNV_PRIME_64) & 0xFFFFFFFFFFFFFFFF
    signed = h - (1 << 64) if h >= 1 << 63 else h
    return abs(signed)


def test_fnv_hash_matches_the_scalar_definition() -> None:
    values = [0, 1, 2, 255, 256, 12345678901, yw.SCRAMBLED_ITEM_COUNT]
    assert yw.fnv_hash64(np.array(values, dtype=np.int64)).tolist() == [fnv_reference(v) for v in values]


def test_zipfian_is_skewed_towards_small_ranks() -> None:
    rng = np.random.default_rng(1)
    items = 10_000
    draws = yw.zipfian(rng, 200_000, items, yw.zeta(items, yw.ZIPFIAN_CONSTANT))
    assert draws.min() >= 0 and draws.max() < items
    counts = np.bincount(draws, minlength=items)
    # P(rank 0) = 1 / zeta(n, 0.99) and P(rank 1) = 2^-0.99 / zeta(n, 0.99).
    z = yw.zeta(items, yw.ZIPFIAN_CONSTANT)
    assert counts[0] / len(draws) == pytest.approx(1 / z, rel=0.05)
    assert counts[1] / len(draws) == pytest.approx(2 ** -0.99 / z, rel=0.05)
    assert counts[:10].sum() > counts[-5000:].sum()


def test_scrambled_zipfian_spreads_the_popular_keys() -> None:
    rng = np.random.default_rng(2)
    records = 100_000
    keys = yw.scrambled_zipfian(rng, 200_000, records)
    assert keys.min() >= 0 and keys.max() < records
    popular = [k for k, _ in collections.Counter(keys.tolist()).most_common(10)]
    assert max(popular) > records // 10  # not the first keys: scrambled by the hash
    assert collections.Counter(keys.tolist()).most_common(1)[0][1] > 200_000 / records * 100


@pytest.mark.parametrize("name", list(yw.WORKLOADS))
def test_operation_mix_and_key_range(name: str) -> None:
    w = yw.WORKLOADS[name]
    gen = yw.Generator(50_000, seed=3)
    seqs = gen.sequences(w, 40_000, 2)
    assert [len(s) for s in seqs] == [20_000, 20_000]
    for s in seqs:
        ops = s.ops
        assert (ops == yw.UPDATE).mean() == pytest.approx(w.update, abs=0.015)
        assert (ops == yw.INSERT).mean() == pytest.approx(w.insert, abs=0.015)
        assert (ops == yw.READ_MODIFY_WRITE).mean() == pytest.approx(w.read_modify_write, abs=0.015)
        if w.insert == 0:
            assert s.keys.min() >= 0 and s.keys.max() < gen.records
    assert gen.sequences(w, 40_000, 2)[0].keys.tolist() == seqs[0].keys.tolist()  # reproducible
    assert gen.sequences(w, 40_000, 2, round_=1)[0].keys.tolist() != seqs[0].keys.tolist()


def test_read_latest_reads_only_records_that_exist_for_its_thread() -> None:
    """Every D read is of a loaded record or of an insert the same thread made before it;
    inserts are new records, distinct across threads and rounds; reads favour the newest."""
    gen = yw.Generator(10_000, seed=4)
    inserted_everywhere: set[int] = set()
    for round_ in range(2):
        for seq in gen.sequences(yw.WORKLOADS["D"], 20_000, 2, round_=round_):
            own: set[int] = set()
            newest_reads = 0
            for op, key in zip(seq.ops.tolist(), seq.keys.tolist(), strict=True):
                if op == yw.INSERT:
                    assert key >= gen.records and key not in inserted_everywhere
                    own.add(key)
                    inserted_everywhere.add(key)
                else:
                    assert key < gen.records or key in own, key
                    newest_reads += key >= gen.records - 100 or key in own
            assert newest_reads > 0.3 * len(seq)


def test_materialized_values_begin_with_their_key() -> None:
    seq = yw.Generator(1_000).sequences(yw.WORKLOADS["A"], 500, 1)[0]
    for op, key, value in seq.materialize():
        assert isinstance(key, str) and len(key) == 16 and key.startswith("user")
        if op == yw.READ:
            assert value is None
        else:
            assert isinstance(value, str) and len(value) == yw.VALUE_BYTES and value.startswith(key)
    for _op, key, value in seq.materialize(binary=True):
        assert isinstance(key, bytes) and (value is None or value.startswith(key))
