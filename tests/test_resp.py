"""RESP2 parsing and encoding (kvs/resp.py): pure, no sockets."""

from __future__ import annotations

import random
import tracemalloc
from functools import partial

import pytest

from kvs import resp as resp_module
from kvs.errors import KvsError, ProtocolError
from kvs.resp import (
    EMPTY_ARRAY,
    NULL_ARRAY,
    NULL_BULK,
    OK,
    PONG,
    RespDecoder,
    RespError,
    RespProtocolError,
    RespReplyDecoder,
    array,
    bulk,
    command,
    error,
    integer,
    simple_string,
    split_inline,
)


def outcome(make_decoder, chunks) -> tuple[list, str | None, int]:
    """Everything a decoder yields for ``chunks``: (items, fatal message or None, pending)."""
    decoder = make_decoder()
    items: list = []
    for chunk in chunks:
        try:
            items.extend(decoder.feed(chunk))
        except RespProtocolError as exc:
            assert exc.fatal
            items.extend(exc.preceding)
            return items, str(exc), decoder.pending_bytes
    return items, None, decoder.pending_bytes


def random_chunks(data: bytes, rng: random.Random) -> list[bytes]:
    chunks, i = [], 0
    while i < len(data):
        n = rng.choice([1, 2, 3, 4, 7, 16, 100])
        chunks.append(data[i : i + n])
        i += n
    return chunks


def fatal(data: bytes, **limits) -> RespProtocolError:
    decoder = RespDecoder(**limits)
    with pytest.raises(RespProtocolError) as info:
        decoder.feed(data)
    assert info.value.fatal and decoder.failed is info.value
    return info.value


# --------------------------------------------------------------------------------------------
# Multibulk commands


def test_multibulk_command() -> None:
    data = b"*3\r\n$3\r\nSET\r\n$3\r\nkey\r\n$5\r\nvalue\r\n"
    assert command("SET", "key", "value") == data
    d = RespDecoder()
    assert d.feed(data) == [[b"SET", b"key", b"value"]]
    assert d.pending_bytes == 0 and not d.in_frame


@pytest.mark.parametrize("args", [
    [b"PING"], [b"GET", b""], [b"SET", b"k", b"a\r\nb\r\n"], [b"SET", "ключ".encode(), "🎉".encode()],
    [b"SET", b"\x00\xff\r", b"$3\r\n*1\r\n"], [b"x" * 5000], [b"MSET"] + [b"k%d" % i for i in range(300)],
])
def test_multibulk_round_trip_is_binary_safe(args: list[bytes]) -> None:
    assert RespDecoder().feed(command(*args)) == [args]


def test_command_encoder_accepts_str_and_int() -> None:
    assert command("INCRBY", b"k", 5) == b"*3\r\n$6\r\nINCRBY\r\n$1\r\nk\r\n$1\r\n5\r\n"


def test_empty_and_null_multibulk_are_skipped_like_redis() -> None:
    assert RespDecoder().feed(b"*0\r\n*-1\r\n*-7\r\n" + command("PING")) == [[b"PING"]]


def test_pipeline_of_many_commands_in_one_feed() -> None:
    cmds = [[b"GET", b"key:%d" % i] if i % 3 else [b"SET", b"key:%d" % i, b"v" * i] for i in range(1000)]
    data = b"".join(command(*c) for c in cmds)
    assert RespDecoder().feed(data) == cmds


def test_redis_benchmark_style_pipeline_of_16() -> None:
    data = b"".join([command("SET", "key:__rand_int__", "xxx"), command("GET", "key:__rand_int__")] * 8)
    assert RespDecoder().feed(data) == [[b"SET", b"key:__rand_int__", b"xxx"], [b"GET", b"key:__rand_int__"]] * 8


def test_returned_arguments_are_bytes_even_from_the_internal_buffer() -> None:
    data = command("SET", "k", "value")
    d = RespDecoder()
    assert d.feed(data[:7]) == []
    ((name, key, value),) = d.feed(data[7:])
    assert type(name) is bytes and type(key) is bytes and type(value) is bytes


# --------------------------------------------------------------------------------------------
# Inline commands


@pytest.mark.parametrize("line, args", [
    (b"PING", [b"PING"]),
    (b"SET a b", [b"SET", b"a", b"b"]),
    (b"  set   a\t\tb  ", [b"set", b"a", b"b"]),
    (b'SET "a b" c', [b"SET", b"a b", b"c"]),
    (b'SET k "\\x41\\x4a\\n\\r\\t\\b\\a\\\\\\"\\z"', [b"SET", b"k", b'AJ\n\r\t\b\a\\"z']),
    (b'SET k "\\x4"', [b"SET", b"k", b"x4"]),  # not a full \xHH: a plain escape of 'x'
    (b"SET k 'it\\'s \"raw\" \\n'", [b"SET", b"k", b"it's \"raw\" \\n"]),
    (b'SET k ""', [b"SET", b"k", b""]),
    (b"SET k ''", [b"SET", b"k", b""]),
    (b'a"b c"d', None),  # closing quote must be followed by a space or the end
    (b'ab"c d" e', [b"abc d", b"e"]),  # a quote starts quoting even mid-token (sdssplitargs)
    (b"a\x0bb c", [b"a\x0bb", b"c"]),  # \v separates args only between tokens, as in Redis
    (b"\x0b a", [b"a"]),
    (b"get k\x00ignored", [b"get", b"k"]),  # NUL ends the line (C string)
    (b'get "k\x00"', None),
    (b'SET "a', None),
    (b"SET 'a", None),
    (b'SET "a\\"', None),
    (b"", []),
    (b"   ", []),
])
def test_split_inline_follows_sdssplitargs(line: bytes, args: list[bytes] | None) -> None:
    assert split_inline(line) == args


def test_inline_commands_with_crlf_or_lf() -> None:
    d = RespDecoder()
    assert d.feed(b"PING\r\nSET a b\nGET a\r\n\r\n\n   \r\nget \"x y\"\r\n") == [
        [b"PING"], [b"SET", b"a", b"b"], [b"GET", b"a"], [b"get", b"x y"]]


def test_inline_and_multibulk_mix_in_one_pipeline() -> None:
    data = b"".join([b"PING\r\n", command("GET", "a"), b"SET b 2\r\n", command("PING")] * 10)
    assert RespDecoder().feed(data) == [[b"PING"], [b"GET", b"a"], [b"SET", b"b", b"2"], [b"PING"]] * 10


def test_inline_without_newline_waits() -> None:
    d = RespDecoder()
    assert d.feed(b"GET ke") == [] and d.in_frame and d.pending_bytes == 6
    assert d.feed(b"y\r") == []
    assert d.feed(b"\n") == [[b"GET", b"key"]] and d.pending_bytes == 0


# --------------------------------------------------------------------------------------------
# Chunked feeding


def sample_stream() -> tuple[bytes, list[list[bytes]]]:
    cmds = [[b"SET", b"k%d" % i, b"\r\n" * i] for i in range(20)] + [[b"GET", b"k%d" % i] for i in range(20)]
    data = b"".join(command(*c) for c in cmds)
    data += b'SET "in line" v\r\nPING\n*0\r\n'
    return data, cmds + [[b"SET", b"in line", b"v"], [b"PING"]]


def test_byte_by_byte_feeding() -> None:
    data, expected = sample_stream()
    assert outcome(RespDecoder, [data[i : i + 1] for i in range(len(data))]) == (expected, None, 0)


@pytest.mark.parametrize("seed", range(10))
def test_random_chunkings(seed: int) -> None:
    data, expected = sample_stream()
    chunks = random_chunks(data, random.Random(seed))
    assert outcome(RespDecoder, chunks) == (expected, None, 0)
    assert outcome(RespDecoder, [bytearray(c) for c in chunks]) == (expected, None, 0)
    assert outcome(RespDecoder, [memoryview(c) for c in chunks]) == (expected, None, 0)


def test_large_bulk_in_small_chunks() -> None:
    value = bytes(range(256)) * 4096  # 1 MiB
    data = command("SET", "big", value)
    d = RespDecoder()
    got = []
    for i in range(0, len(data), 4096):
        got.extend(d.feed(data[i : i + 4096]))
    assert got == [[b"SET", b"big", value]]


# --------------------------------------------------------------------------------------------
# Malformed commands: all fatal, with Redis's messages


@pytest.mark.parametrize("data, message", [
    (b"*99999999999\r\n", "Protocol error: invalid multibulk length"),
    (b"*abc\r\n", "Protocol error: invalid multibulk length"),
    (b"*\r\n", "Protocol error: invalid multibulk length"),
    (b"*01\r\n", "Protocol error: invalid multibulk length"),
    (b"*+1\r\n", "Protocol error: invalid multibulk length"),
    (b"* 1\r\n", "Protocol error: invalid multibulk length"),
    (b"*1 \r\n", "Protocol error: invalid multibulk length"),
    (b"*1_0\r\n", "Protocol error: invalid multibulk length"),
    (b"*-0\r\n", "Protocol error: invalid multibulk length"),
    (b"*1\n$4\r\nPING\r\n", "Protocol error: invalid multibulk length"),  # missing CR
    (b"*99999999999999999999999\r\n", "Protocol error: invalid multibulk length"),
    (b"*1\r\n$-5\r\n", "Protocol error: invalid bulk length"),
    (b"*1\r\n$-1\r\n", "Protocol error: invalid bulk length"),
    (b"*1\r\n$9999999999\r\n", "Protocol error: invalid bulk length"),
    (b"*1\r\n$\r\n", "Protocol error: invalid bulk length"),
    (b"*1\r\n$04\r\nPING\r\n", "Protocol error: invalid bulk length"),
    (b"*1\r\n$x\r\n", "Protocol error: invalid bulk length"),
    (b"*1\r\nPING\r\n", "Protocol error: expected '$', got 'P'"),
    (b"*2\r\n$4\r\nPING\r\n:1\r\n", "Protocol error: expected '$', got ':'"),
    (b"*1\r\n\r\n", "Protocol error: expected '$', got '\\x0d'"),
    (b"*1\r\n$4\r\nPINGxx", "Protocol error: bulk string not terminated by CRLF"),
    (b"*1\r\n$4\r\nPING\n\r", "Protocol error: bulk string not terminated by CRLF"),
    (b'SET "unbalanced\r\n', "Protocol error: unbalanced quotes in request"),
    (b"SET 'x'y\r\n", "Protocol error: unbalanced quotes in request"),
])
def test_malformed_commands_are_fatal(data: bytes, message: str) -> None:
    err = fatal(data)
    assert str(err) == message
    assert isinstance(err, ProtocolError) and isinstance(err, KvsError)
    assert error(str(err)) == b"-ERR " + message.encode() + b"\r\n"
    # decided the same whatever the chunking
    assert outcome(RespDecoder, [data[i : i + 1] for i in range(len(data))]) == ([], message, 0)


def test_limits_are_configurable() -> None:
    assert RespDecoder(max_array_len=3).feed(command("a", "b", "c")) == [[b"a", b"b", b"c"]]
    assert str(fatal(b"*4\r\n", max_array_len=3)) == "Protocol error: invalid multibulk length"
    assert RespDecoder(max_bulk_bytes=5).feed(command("12345")) == [[b"12345"]]
    assert str(fatal(b"*1\r\n$6\r\n", max_bulk_bytes=5)) == "Protocol error: invalid bulk length"
    assert RespDecoder(max_inline_bytes=8).feed(b"12345678\r\n") == [[b"12345678"]]
    assert str(fatal(b"123456789\r\n", max_inline_bytes=8)) == "Protocol error: too big inline request"


def test_too_long_lines_are_fatal_without_waiting_for_a_newline() -> None:
    assert str(fatal(b"A" * 70_000)) == "Protocol error: too big inline request"
    assert str(fatal(b"*" + b"1" * 70_000)) == "Protocol error: too big mbulk count string"
    assert str(fatal(b"*1\r\n$" + b"1" * 70_000)) == "Protocol error: too big bulk count string"
    d = RespDecoder(max_inline_bytes=10)
    assert d.feed(b"GET 123456\r") == []  # 10 bytes and a CR: may still end in CR LF
    with pytest.raises(RespProtocolError, match="too big inline request"):
        d.feed(b"7")
    assert RespDecoder(max_inline_bytes=8).feed(b"12345678\n") == [[b"12345678"]]
    assert str(fatal(b"123456789\n", max_inline_bytes=8)) == "Protocol error: too big inline request"


def test_absurd_lengths_are_rejected_from_the_header_without_allocating() -> None:
    for header in (b"*99999999999\r\n", b"*1\r\n$9999999999\r\n", b"*1\r\n$-5\r\n",
                   b"*1\r\n$" + b"9" * 20 + b"\r\n"):
        d = RespDecoder()
        tracemalloc.start()
        try:
            with pytest.raises(RespProtocolError):
                d.feed(header)
            _, peak = tracemalloc.get_traced_memory()
        finally:
            tracemalloc.stop()
        assert peak < 64 * 1024


def test_a_large_announced_bulk_is_awaited_not_preallocated() -> None:
    d = RespDecoder()
    tracemalloc.start()
    try:
        assert d.feed(b"*2\r\n$3\r\nGET\r\n$16000000\r\nabc") == []
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 64 * 1024 and d.in_frame


def test_fatal_error_keeps_the_commands_before_it_and_the_decoder_stays_failed() -> None:
    d = RespDecoder()
    with pytest.raises(RespProtocolError) as info:
        d.feed(command("GET", "a") + b"PING\r\n" + b"*1\r\n$-5\r\n" + command("GET", "b"))
    assert info.value.preceding == [[b"GET", b"a"], [b"PING"]]
    with pytest.raises(RespProtocolError):
        d.feed(command("PING"))


# --------------------------------------------------------------------------------------------
# Reply encoders


def test_reply_encoders() -> None:
    assert OK == simple_string("OK") == b"+OK\r\n"
    assert PONG == simple_string(b"PONG") == b"+PONG\r\n"
    assert simple_string("a\r\nb") == b"+a  b\r\n"
    assert error("unknown command 'FOO'") == b"-ERR unknown command 'FOO'\r\n"
    assert error("-WRONGTYPE Operation against a key") == b"-WRONGTYPE Operation against a key\r\n"
    assert error("bad", code="NOAUTH") == b"-NOAUTH bad\r\n"
    assert error("two\r\nlines") == b"-ERR two  lines\r\n"
    assert integer(0) == b":0\r\n" and integer(-42) == b":-42\r\n" and integer(10**15) == b":1000000000000000\r\n"
    assert bulk(b"abc") == b"$3\r\nabc\r\n"
    assert bulk(b"") == b"$0\r\n\r\n"
    assert bulk("é") == b"$2\r\n\xc3\xa9\r\n"
    assert bulk(b"a\r\nb") == b"$4\r\na\r\nb\r\n"
    assert bulk(None) == NULL_BULK == b"$-1\r\n"
    assert array(None) == NULL_ARRAY == b"*-1\r\n"
    assert array([]) == EMPTY_ARRAY == b"*0\r\n"
    assert array([bulk(b"a"), integer(1), array([bulk(None)])]) == b"*3\r\n$1\r\na\r\n:1\r\n*1\r\n$-1\r\n"


def test_reply_decoder_round_trips_every_type() -> None:
    data = (OK + PONG + error("boom") + integer(-7) + bulk(b"a\r\nb") + bulk(None) + bulk(b"")
            + array([bulk(b"x"), array([integer(1), array(None)]), error("-WRONGTYPE no")]) + array([]) + array(None))
    expected = ["OK", "PONG", RespError("ERR boom"), -7, b"a\r\nb", None, b"",
                [b"x", [1, None], RespError("WRONGTYPE no")], [], None]
    assert RespReplyDecoder().feed(data) == expected
    assert outcome(RespReplyDecoder, [data[i : i + 1] for i in range(len(data))]) == (expected, None, 0)
    err = RespReplyDecoder().feed(error("-WRONGTYPE no"))[0]
    assert err.code == "WRONGTYPE" and isinstance(err, KvsError)


def test_reply_decoder_big_bulk_in_chunks() -> None:
    value = b"v" * 1_000_000
    data = bulk(value) + OK
    d = RespReplyDecoder()
    got = []
    for i in range(0, len(data), 1000):
        got.extend(d.feed(data[i : i + 1000]))
    assert got == [value, "OK"] and d.pending_bytes == 0


@pytest.mark.parametrize("data, message", [
    (b"?what\r\n", "Protocol error: unknown reply type '?'"),
    (b":12a\r\n", "Protocol error: invalid integer reply"),
    (b"$-2\r\n", "Protocol error: invalid bulk length"),
    (b"$99999999999\r\n", "Protocol error: invalid bulk length"),
    (b"$3\r\nabcd\r\n", "Protocol error: bulk string not terminated by CRLF"),
    (b"*-2\r\n", "Protocol error: invalid multibulk length"),
    (b"*99999999999\r\n", "Protocol error: invalid multibulk length"),
    (b"*1\r\n" * 40 + b":1\r\n", "Protocol error: replies nested too deep"),
    (b"+" + b"x" * 70_000, "Protocol error: too big reply line"),
])
def test_reply_decoder_malformed(data: bytes, message: str) -> None:
    d = RespReplyDecoder()
    with pytest.raises(RespProtocolError) as info:
        d.feed(data)
    assert str(info.value) == message
    with pytest.raises(RespProtocolError):
        d.feed(OK)


# --------------------------------------------------------------------------------------------
# Fuzzing

ATOMS = [b"*", b"$", b"\r\n", b"\n", b"\r", b"-1", b"0", b"1", b"2", b"3", b"17", b"99999999999", b" ",
         b'"', b"'", b"\\", b"\\x41", b"SET", b"GET", b"PING", b"\x00", b"\xff", b"\x0b"]


def random_command(rng: random.Random) -> bytes:
    r = rng.random()
    if r < 0.5:
        args = [rng.randbytes(rng.randrange(0, 12)) for _ in range(rng.randrange(1, 5))]
        return command(*args)
    if r < 0.75:
        choices = [b"SET", b"GET", b"a", b'"a b"', b"'c'", b'"\\x41"', b"x\\y"]
        words = [rng.choice(choices) for _ in range(rng.randrange(1, 4))]
        return b" ".join(words) + rng.choice([b"\r\n", b"\n"])
    return b"".join(rng.choice(ATOMS) for _ in range(rng.randrange(1, 12)))


def mutate(data: bytes, rng: random.Random) -> bytes:
    b = bytearray(data)
    for _ in range(rng.randrange(1, 4)):
        r = rng.random()
        if not b:
            b.extend(rng.choice(ATOMS))
        elif r < 0.35:
            b[rng.randrange(len(b))] = rng.randrange(256)
        elif r < 0.55:
            i = rng.randrange(len(b) + 1)
            b[i:i] = rng.choice(ATOMS)
        elif r < 0.7:
            del b[rng.randrange(len(b)) :]
        elif r < 0.85:
            i = rng.randrange(len(b))
            del b[i : i + rng.randrange(1, 4)]
        else:
            i = rng.randrange(len(b))
            b[i:i] = str(rng.choice([-1, 0, 5, 2**31, 2**63, 10**30])).encode()
    return bytes(b)


@pytest.mark.parametrize("seed", range(4))
def test_fuzz_command_decoder(seed: int) -> None:
    rng = random.Random(seed)
    make = lambda: RespDecoder(max_bulk_bytes=64, max_array_len=8, max_inline_bytes=48)
    for _ in range(200):
        data = b"".join(random_command(rng) for _ in range(rng.randrange(1, 6)))
        if rng.random() < 0.5:
            data = mutate(data, rng)
        one_shot = outcome(make, [data])
        for cmd in one_shot[0]:
            assert isinstance(cmd, list) and cmd and all(type(a) is bytes for a in cmd)
        assert outcome(make, random_chunks(data, rng)) == one_shot
        assert outcome(make, [data[i : i + 1] for i in range(len(data))]) == one_shot
        # a valid command after a complete valid stream still parses
        if one_shot[1] is None and one_shot[2] == 0:
            assert make().feed(data + command("GET", "z"))[-1] == [b"GET", b"z"]


def _general_parse(data: bytes, max_bulk: int, max_array: int, max_inline: int) -> tuple[list, int | str]:
    """What the general parser alone makes of ``data``: (commands, end position or error)."""
    try:
        items, pos, _need = resp_module._parse_commands(data, 0, len(data), max_bulk, max_array, max_inline)
    except RespProtocolError as exc:
        return exc.preceding, str(exc)
    return items, pos


def test_split_fast_path_takes_what_clients_send() -> None:
    batch = b"".join(command("SET", f"key:{i:012d}", "x" * 100) + command("GET", f"key:{i:012d}") for i in range(16))
    items, pos = resp_module._split_commands(batch, 1 << 20, 1 << 20)
    assert pos == len(batch) and len(items) == 32
    assert items[0] == [b"SET", b"key:000000000000", b"x" * 100] and items[31] == [b"GET", b"key:000000000015"]
    # an argument holding CR LF, an incomplete tail: the fast path stops right before them
    tricky = command("SET", "k", "a\r\nb")
    items, pos = resp_module._split_commands(command("GET", "a") + tricky + b"*2\r\n$3\r\nGET", 1 << 20, 1 << 20)
    assert items == [[b"GET", b"a"]] and pos == len(command("GET", "a"))


@pytest.mark.parametrize("seed", range(6))
def test_split_fast_path_then_general_parser_equals_the_general_parser(seed: int) -> None:
    """The decoder's fast path (kvs.resp._split_commands) followed by the general parser from
    where it stopped gives exactly the commands, end position and error of the general
    parser alone, for valid streams (binary arguments, CR LF inside arguments, lengths at
    the limits) and damaged ones."""
    rng = random.Random(seed)
    limits = [(64, 8, 48), (1 << 20, 1 << 20, 1 << 16), (5, 2, 48)]
    atoms = [b"\r\n", b"\r", b"\n", b"*", b"$", b"0", b"1", b"2", b"3", b"16", b"-1", b"x"]
    for _ in range(400):
        parts = []
        for _ in range(rng.randrange(1, 8)):
            r = rng.random()
            if r < 0.6:
                parts.append(command(*[rng.choice([b"GET", b"SET", rng.randbytes(rng.randrange(0, 9)),
                                                   b"a\r\nb", b"\r\n", b"x" * rng.choice([63, 64, 65, 4096, 4097])])
                                       for _ in range(rng.randrange(1, 5))]))
            elif r < 0.8:
                parts.append(b"GET k\r\n")
            else:
                parts.append(b"".join(rng.choice(atoms) for _ in range(rng.randrange(1, 8))))
        data = b"".join(parts)
        if rng.random() < 0.4:
            data = mutate(data, rng)
        if rng.random() < 0.3:
            data = data[: rng.randrange(len(data) + 1)]
        for max_bulk, max_array, max_inline in limits:
            want = _general_parse(data, max_bulk, max_array, max_inline)
            fast, pos = resp_module._split_commands(data, max_bulk, max_array)
            assert data[:1] == b"*" or not fast
            rest_items, rest_end = _general_parse_from(data, pos, max_bulk, max_array, max_inline)
            assert (fast + rest_items, rest_end) == want, data


@pytest.mark.parametrize("seed", range(4))
def test_single_command_fast_path_equals_feed(seed: int) -> None:
    """RespDecoder.parse_single (the server's path for one whole GET or SET) returns exactly
    the one command that feed returns for the same bytes, leaving the decoder as feed would
    (empty), or None; valid, damaged, truncated and multi-command inputs, at several limits."""
    rng = random.Random(seed)
    limits = [(64, 8, 48), (1 << 20, 1 << 20, 1 << 16), (5, 2, 48), (4096, 3, 48)]
    argument = [b"GET", b"SET", b"get", b"", b"a\r\nb", b"\r\n", b"\r", b"\xff", b"x" * 4096, b"x" * 4097]
    taken = 0
    for _ in range(500):
        args = [rng.choice(argument + [rng.randbytes(rng.randrange(0, 9))]) for _ in range(rng.randrange(1, 5))]
        data = command(*args)
        r = rng.random()
        if r < 0.3:
            data = mutate(data, rng)
        elif r < 0.4:
            data = data[: rng.randrange(len(data) + 1)]
        elif r < 0.5:
            data += rng.choice([command("GET", "k"), b"GET k\r\n", b"*", b"\r\n"])
        for max_bulk, max_array, max_inline in limits:
            make = partial(RespDecoder, max_bulk_bytes=max_bulk, max_array_len=max_array, max_inline_bytes=max_inline)
            decoder = make()
            single = decoder.parse_single(data)
            if single is None:
                continue
            taken += 1
            assert outcome(make, [data]) == ([single], None, 0), data
            assert all(type(a) is bytes for a in single)
            assert decoder.pending_bytes == 0 and decoder.failed is None
            assert decoder.feed(command("GET", "z")) == [[b"GET", b"z"]]
    assert taken > 100  # the inputs do reach the fast path


def test_single_command_fast_path_declines_what_it_does_not_take() -> None:
    assert RespDecoder().parse_single(command("GET", "k")) == [b"GET", b"k"]
    assert RespDecoder().parse_single(command("SET", "k", "v")) == [b"SET", b"k", b"v"]
    assert RespDecoder().parse_single(command("PING")) is None  # one argument
    assert RespDecoder().parse_single(command("DEL", "a", "b", "c")) is None  # four
    assert RespDecoder().parse_single(command("GET", "k") * 2) is None  # two commands
    assert RespDecoder().parse_single(b"GET k\r\n") is None  # inline
    assert RespDecoder().parse_single(bytearray(command("GET", "k"))) is None  # not bytes
    assert RespDecoder(max_bulk_bytes=3).parse_single(command("GET", "abcd")) is None  # over the limit
    held = RespDecoder()
    assert held.feed(b"*2\r\n$3\r\nGET\r\n") == []  # a command held back: feed must finish it
    assert held.parse_single(command("GET", "k")) is None
    failed = RespDecoder()
    with pytest.raises(RespProtocolError):
        failed.feed(b"*x\r\n")
    assert failed.parse_single(command("GET", "k")) is None


def _general_parse_from(data: bytes, start: int, max_bulk: int, max_array: int,
                        max_inline: int) -> tuple[list, int | str]:
    try:
        items, pos, _need = resp_module._parse_commands(data, start, len(data), max_bulk, max_array, max_inline)
    except RespProtocolError as exc:
        return exc.preceding, str(exc)
    return items, pos


@pytest.mark.parametrize("seed", range(2))
def test_fuzz_reply_decoder(seed: int) -> None:
    rng = random.Random(seed)
    make = lambda: RespReplyDecoder(max_bulk_bytes=64, max_array_len=8, max_line_bytes=48, max_depth=4)
    for _ in range(200):
        parts = []
        for _ in range(rng.randrange(1, 5)):
            r = rng.random()
            if r < 0.2:
                parts.append(bulk(rng.randbytes(rng.randrange(10))))
            elif r < 0.35:
                parts.append(integer(rng.randrange(-1000, 1000)))
            elif r < 0.5:
                parts.append(rng.choice([OK, PONG, NULL_BULK, NULL_ARRAY, error("x y")]))
            elif r < 0.7:
                parts.append(array([bulk(b"a"), integer(3), array([OK])]))
            else:
                parts.append(b"".join(rng.choice(ATOMS + [b"+", b":", b"-"]) for _ in range(rng.randrange(1, 10))))
        data = b"".join(parts)
        if rng.random() < 0.5:
            data = mutate(data, rng)
        one_shot = outcome(make, [data])
        assert outcome(make, random_chunks(data, rng)) == one_shot
