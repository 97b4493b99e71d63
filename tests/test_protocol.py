"""The kvs binary protocol (kvs/protocol.py, docs/protocol.md): pure encoding and decoding."""

from __future__ import annotations

import random
import struct
import tracemalloc

import pytest

from kvs.errors import KvsError
from kvs.limits import DEFAULT_MAX_KEY_BYTES, DEFAULT_MAX_VALUE_BYTES
from kvs.protocol import (
    FLAG_KEY_BYTES,
    FLAG_TTL,
    FLAG_VALUE_BYTES,
    MAX_MESSAGE_BYTES,
    MAX_TTL_MS,
    NOT_FOUND_RESPONSE,
    NOT_FOUND_RESPONSE_V1,
    OK_RESPONSE,
    OK_RESPONSE_V1,
    PONG_RESPONSE,
    PONG_RESPONSE_V1,
    PROTOCOL_VERSION,
    REQUEST_HEADER_SIZE,
    REQUEST_MAGIC,
    RESPONSE_HEADER_SIZE,
    RESPONSE_MAGIC,
    TTL_FIELD_SIZE,
    FrameError,
    Op,
    ProtocolError,
    Request,
    RequestDecoder,
    Response,
    ResponseDecoder,
    Status,
    encode_error,
    encode_fatal,
    encode_get,
    encode_not_found,
    encode_ok,
    encode_ping,
    encode_pong,
    encode_remove,
    encode_request,
    encode_response,
    encode_set,
    encode_value,
    max_request_frame_bytes,
    parse_requests,
    parse_responses,
)

KEYS = ["", "a", "key:000001", "ключ", "🔑 emoji key", "tab\tnew\nline\x00nul", "é" * 100]
VALUES = ["", "v", "значение", "🎉" * 50, "x" * 10_000, "\x00\xff\u20ac"]


def raw_request(op: int, key: bytes = b"", value: bytes = b"", *, magic: int = REQUEST_MAGIC,
                version: int = PROTOCOL_VERSION, flags: int = 0, klen: int | None = None,
                vlen: int | None = None) -> bytes:
    """A request frame built by hand, any field overridable (for malformed cases)."""
    klen = len(key) if klen is None else klen
    vlen = len(value) if vlen is None else vlen
    return struct.pack(">BBBBII", magic, version, op, flags, klen, vlen) + key + value


def raw_response(status: int, payload: bytes = b"", *, magic: int = RESPONSE_MAGIC,
                 version: int = PROTOCOL_VERSION, flags: int = 0, plen: int | None = None) -> bytes:
    plen = len(payload) if plen is None else plen
    return struct.pack(">BBBBI", magic, version, status, flags, plen) + payload


def decode_all(data: bytes, **limits) -> list:
    return RequestDecoder(**limits).feed(data)


def outcome(make_decoder, chunks) -> tuple[list, str | None, int]:
    """Everything a decoder yields for ``chunks``: (items, fatal message or None, pending)."""
    decoder = make_decoder()
    items: list = []
    for chunk in chunks:
        try:
            items.extend(decoder.feed(chunk))
        except ProtocolError as exc:
            assert exc.fatal
            items.extend(exc.preceding)
            return items, str(exc), decoder.pending_bytes
    return items, None, decoder.pending_bytes


def random_chunks(data: bytes, rng: random.Random) -> list[bytes]:
    chunks, i = [], 0
    while i < len(data):
        n = rng.choice([1, 2, 3, 5, 11, 12, 13, 64, 1000])
        chunks.append(data[i : i + n])
        i += n
    return chunks


# --------------------------------------------------------------------------------------------
# Wire format


def test_frame_layout_matches_the_spec_examples() -> None:
    # version 1: the frames of kvs 0.1.0, byte for byte
    assert encode_get("a", version=1) == bytes.fromhex("CB 01 02 00 00000001 00000000 61")
    assert encode_set("k", "é", version=1) == bytes.fromhex("CB 01 03 00 00000001 00000002 6B C3A9")
    assert encode_ping(version=1) == bytes.fromhex("CB 01 01 00 00000000 00000000")
    assert encode_remove("a", version=1) == bytes.fromhex("CB 01 04 00 00000001 00000000 61")
    assert encode_value("é", version=1) == bytes.fromhex("CC 01 01 00 00000002 C3A9")
    assert encode_ok(version=1) == OK_RESPONSE_V1 == bytes.fromhex("CC 01 00 00 00000000")
    assert encode_not_found(version=1) == NOT_FOUND_RESPONSE_V1 == bytes.fromhex("CC 01 02 00 00000000")
    assert encode_pong(version=1) == PONG_RESPONSE_V1 == bytes.fromhex("CC 01 03 00 00000000")
    assert encode_error("unknown operation 0x09", version=1)[:8] == bytes.fromhex("CC 01 04 00 00000016")
    assert encode_fatal("x") == bytes.fromhex("CC 01 05 00 00000001 78")  # FATAL: always version 1
    # version 2 (the default): the same layout, the type in the flags, a TTL field after the header
    assert encode_get("a") == bytes.fromhex("CB 02 02 00 00000001 00000000 61")
    assert encode_get(b"a") == bytes.fromhex("CB 02 02 01 00000001 00000000 61")
    assert encode_set("k", "é") == bytes.fromhex("CB 02 03 00 00000001 00000002 6B C3A9")
    assert encode_set(b"k", b"\x00\xff") == bytes.fromhex("CB 02 03 03 00000001 00000002 6B 00FF")
    assert encode_set("k", b"v", ttl_ms=1500) == bytes.fromhex(
        "CB 02 03 06 00000001 00000001 00000000000005DC 6B 76")
    assert encode_remove(b"\xff") == bytes.fromhex("CB 02 04 01 00000001 00000000 FF")
    assert encode_ping() == bytes.fromhex("CB 02 01 00 00000000 00000000")
    assert encode_value("é") == bytes.fromhex("CC 02 01 00 00000002 C3A9")
    assert encode_value(b"\xff") == bytes.fromhex("CC 02 01 02 00000001 FF")
    assert encode_ok() == OK_RESPONSE == bytes.fromhex("CC 02 00 00 00000000")
    assert encode_not_found() == NOT_FOUND_RESPONSE == bytes.fromhex("CC 02 02 00 00000000")
    assert encode_pong() == PONG_RESPONSE == bytes.fromhex("CC 02 03 00 00000000")
    assert encode_error("unknown operation 0x09")[:8] == bytes.fromhex("CC 02 04 00 00000016")
    assert (FLAG_KEY_BYTES, FLAG_VALUE_BYTES, FLAG_TTL, TTL_FIELD_SIZE) == (1, 2, 4, 8)


def test_magic_bytes_cannot_start_a_resp_command() -> None:
    assert REQUEST_MAGIC >= 0x80 and RESPONSE_MAGIC >= 0x80
    for version in (1, 2):
        for frame in (encode_ping(version=version), encode_get("k", version=version),
                      encode_set("k", "v", version=version), encode_remove("k", version=version)):
            assert frame[0] == REQUEST_MAGIC
    assert REQUEST_HEADER_SIZE == 12 and RESPONSE_HEADER_SIZE == 8


# --------------------------------------------------------------------------------------------
# Round trips


@pytest.mark.parametrize("key", KEYS)
def test_get_and_remove_round_trip(key: str) -> None:
    assert decode_all(encode_get(key)) == [Request(Op.GET, key, None)]
    assert decode_all(encode_remove(key)) == [Request(Op.REMOVE, key, None)]


@pytest.mark.parametrize("value", VALUES)
@pytest.mark.parametrize("key", KEYS[:4])
def test_set_round_trip(key: str, value: str) -> None:
    (req,) = decode_all(encode_set(key, value))
    assert req == Request(Op.SET, key, value)
    assert req.op is Op.SET and req.op == 3 and req.key == key and req.value == value


def test_ping_round_trip() -> None:
    assert decode_all(encode_ping()) == [Request(Op.PING, None, None)]


BYTES = [b"", b"\x00", b"\xff\xfe", b"nul\x00in\x00the middle", bytes(range(256)), "café".encode()]


@pytest.mark.parametrize("value", BYTES + ["", "text é", "\x00"])
@pytest.mark.parametrize("key", [b"", b"\xff", b"k\x00", "k", "ключ"])
def test_v2_keys_and_values_keep_their_type(key: str | bytes, value: str | bytes) -> None:
    (req,) = decode_all(encode_set(key, value))
    assert req == Request(Op.SET, key, value, None, 2)
    assert type(req.key) is type(key) and type(req.value) is type(value)
    for op in (Op.GET, Op.REMOVE):
        (req,) = decode_all(encode_request(op, key))
        assert req == Request(op, key, None, None, 2) and type(req.key) is type(key)
    (resp,) = ResponseDecoder().feed(encode_value(value))
    assert resp == Response(Status.VALUE, value) and type(resp.value) is type(value)


def test_bytes_like_keys_and_values_are_sent_as_bytes() -> None:
    frame = encode_set(bytearray(b"k"), memoryview(b"\xff"))
    assert frame == encode_set(b"k", b"\xff")
    (req,) = decode_all(frame)
    assert type(req.key) is bytes and type(req.value) is bytes
    assert encode_value(bytearray(b"\x00")) == encode_value(b"\x00")


@pytest.mark.parametrize("ttl_ms", [1, 1500, 2**32 + 7, MAX_TTL_MS])
def test_set_with_a_ttl_round_trips(ttl_ms: int) -> None:
    frame = encode_set(b"k\xff", "v", ttl_ms=ttl_ms)
    assert len(frame) == REQUEST_HEADER_SIZE + TTL_FIELD_SIZE + 3
    assert decode_all(frame + encode_ping()) == [Request(Op.SET, b"k\xff", "v", ttl_ms, 2),
                                                 Request(Op.PING, None, None)]


def test_both_versions_decode_on_one_stream_each_request_keeping_its_version() -> None:
    data = (encode_get("a", version=1) + encode_get("a") + encode_set("k", "v", version=1)
            + encode_set("k", b"v", ttl_ms=9) + encode_remove("r", version=1) + encode_ping(version=1))
    assert [(r.op, r.version) for r in decode_all(data)] == [
        (Op.GET, 1), (Op.GET, 2), (Op.SET, 1), (Op.SET, 2), (Op.REMOVE, 1), (Op.PING, 1)]
    assert decode_all(encode_set("k", "v", version=1)) == [Request(Op.SET, "k", "v", None, 1)]


def test_version_1_value_responses_carry_text_only() -> None:
    assert encode_value(b"caf\xc3\xa9", version=1) == encode_value("café", version=1)
    with pytest.raises(KvsError, match="version 1 carries only text"):
        encode_value(b"\xff", version=1)
    # a client reads both versions' responses
    data = encode_value("v", version=1) + OK_RESPONSE_V1 + encode_value(b"\xff") + OK_RESPONSE
    assert ResponseDecoder().feed(data) == [Response(Status.VALUE, "v"), Response(Status.OK, None),
                                            Response(Status.VALUE, b"\xff"), Response(Status.OK, None)]


def test_encode_request_is_the_generic_form_of_the_helpers() -> None:
    assert encode_request(Op.SET, b"k", "v", ttl_ms=5) == encode_set(b"k", "v", ttl_ms=5)
    assert encode_request(Op.GET, "k", version=1) == encode_get("k", version=1)
    assert encode_response(Status.VALUE, b"v") == encode_value(b"v")
    assert encode_response(Status.OK, version=1) == OK_RESPONSE_V1
    assert encode_request(Op.PING) == encode_ping()
    assert encode_request(Op.GET, "k") == encode_get("k")
    assert encode_request(Op.REMOVE, "k") == encode_remove("k")
    assert encode_request(Op.SET, "k", "v") == encode_set("k", "v")
    assert encode_request(3, "k", "v") == encode_set("k", "v")


def test_max_size_key_and_value_round_trip() -> None:
    key = "k" * DEFAULT_MAX_KEY_BYTES
    value = "v" * (DEFAULT_MAX_VALUE_BYTES - 2) + "é"  # multi-byte char ends exactly at the limit
    frame = encode_set(key, value)
    assert len(frame) == max_request_frame_bytes()
    (req,) = decode_all(frame)
    assert req.key == key and req.value == value
    assert decode_all(encode_get(key)) == [Request(Op.GET, key, None)]


@pytest.mark.parametrize("value", VALUES)
def test_value_response_round_trip(value: str) -> None:
    assert ResponseDecoder().feed(encode_value(value)) == [Response(Status.VALUE, value)]


def test_every_status_round_trips() -> None:
    data = b"".join([encode_ok(), encode_value("v"), encode_not_found(), encode_pong(),
                     encode_error("boom ✗"), encode_value(""), encode_fatal("bye")])
    assert ResponseDecoder().feed(data) == [
        Response(Status.OK, None), Response(Status.VALUE, "v"), Response(Status.NOT_FOUND, None),
        Response(Status.PONG, None), Response(Status.ERROR, "boom ✗"), Response(Status.VALUE, ""),
        Response(Status.FATAL, "bye"),
    ]
    for status, value in [(Status.OK, None), (Status.VALUE, "x"), (Status.NOT_FOUND, None),
                          (Status.PONG, None), (Status.ERROR, "e"), (Status.FATAL, "f")]:
        assert ResponseDecoder().feed(encode_response(status, value)) == [Response(status, value)]


def test_max_size_value_response_round_trips() -> None:
    value = "é" * (DEFAULT_MAX_VALUE_BYTES // 2)
    assert ResponseDecoder().feed(encode_value(value)) == [Response(Status.VALUE, value)]


def test_error_messages_are_cut_at_a_character_boundary() -> None:
    (resp,) = ResponseDecoder().feed(encode_error("é" * MAX_MESSAGE_BYTES))
    assert resp.status == Status.ERROR and resp.value == "é" * (MAX_MESSAGE_BYTES // 2)
    (resp,) = ResponseDecoder().feed(encode_error("x" + "é" * MAX_MESSAGE_BYTES))
    assert resp.value == "x" + "é" * (MAX_MESSAGE_BYTES // 2 - 1)
    (resp,) = ResponseDecoder().feed(encode_error("lone \ud800 surrogate"))
    assert resp.value == "lone ? surrogate"
    (resp,) = ResponseDecoder().feed(encode_error(ProtocolError("from an exception")))
    assert resp.value == "from an exception"


# --------------------------------------------------------------------------------------------
# Encoder argument checks


def test_encoders_reject_bad_arguments() -> None:
    with pytest.raises(TypeError):
        encode_get(b"bytes", version=1)  # version 1 carries text only
    with pytest.raises(TypeError):
        encode_get(5)  # type: ignore[arg-type]
    with pytest.raises(TypeError):
        encode_set("k", 5)  # type: ignore[arg-type]
    with pytest.raises(TypeError):
        encode_set("k", None)  # type: ignore[arg-type]
    with pytest.raises(TypeError):
        encode_set("k", b"v", version=1)
    with pytest.raises(KvsError, match="version 1 has no TTL"):
        encode_set("k", "v", ttl_ms=5, version=1)
    for bad_ttl in (0, -1, MAX_TTL_MS + 1):
        with pytest.raises(KvsError, match="TTL must be"):
            encode_set("k", "v", ttl_ms=bad_ttl)
    for bad_ttl_type in (1.5, "5", True):
        with pytest.raises(TypeError):
            encode_set("k", "v", ttl_ms=bad_ttl_type)  # type: ignore[arg-type]
    with pytest.raises(ValueError):
        encode_get("k", version=3)
    with pytest.raises(ValueError):
        encode_request(Op.GET, "k", ttl_ms=5)
    with pytest.raises(KvsError, match="over the limit"):
        encode_set(b"k", b"vv", max_value_bytes=1)
    with pytest.raises(KvsError, match="UTF-8"):
        encode_get("\ud800")
    with pytest.raises(KvsError, match="over the limit"):
        encode_get("k" * (DEFAULT_MAX_KEY_BYTES + 1))
    with pytest.raises(KvsError, match="over the limit"):
        encode_set("k", "vv", max_value_bytes=1)
    with pytest.raises(ValueError):
        encode_request(Op.GET)
    with pytest.raises(ValueError):
        encode_request(Op.GET, "k", "v")
    with pytest.raises(ValueError):
        encode_request(Op.SET, "k")
    with pytest.raises(ValueError):
        encode_request(Op.PING, "k")
    with pytest.raises(ValueError):
        encode_request(9, "k")
    with pytest.raises(ValueError):
        encode_response(Status.OK, "payload")
    with pytest.raises(ValueError):
        encode_response(Status.VALUE)
    with pytest.raises(ValueError):
        encode_response(42)


# --------------------------------------------------------------------------------------------
# Incremental decoding and pipelining


def pipeline(n: int, seed: int) -> tuple[bytes, list[Request]]:
    rng = random.Random(seed)
    frames, expected = [], []
    for i in range(n):
        key = rng.choice(KEYS) + str(i)
        op = rng.choice(list(Op))
        if op == Op.PING:
            frames.append(encode_ping())
            expected.append(Request(Op.PING, None, None))
        elif op == Op.SET:
            value = rng.choice(VALUES)
            frames.append(encode_set(key, value))
            expected.append(Request(Op.SET, key, value))
        else:
            frames.append(encode_request(op, key))
            expected.append(Request(op, key, None))
    return b"".join(frames), expected


def test_pipelined_batch_decodes_in_order_in_one_feed() -> None:
    data, expected = pipeline(1000, seed=1)
    decoder = RequestDecoder()
    assert decoder.feed(data) == expected
    assert decoder.pending_bytes == 0 and not decoder.in_frame


def test_byte_by_byte_feeding_gives_the_same_requests() -> None:
    data, expected = pipeline(60, seed=2)
    decoder = RequestDecoder()
    got = []
    for i in range(len(data)):
        got.extend(decoder.feed(data[i : i + 1]))
        assert decoder.in_frame == (decoder.pending_bytes > 0)
    assert got == expected and decoder.pending_bytes == 0


@pytest.mark.parametrize("seed", range(20))
def test_random_chunkings_give_the_same_requests(seed: int) -> None:
    data, expected = pipeline(200, seed=seed)
    rng = random.Random(seed)
    chunks = random_chunks(data, rng)
    assert outcome(RequestDecoder, chunks) == (expected, None, 0)
    # bytearray and memoryview input are accepted too
    assert outcome(RequestDecoder, [bytearray(c) for c in chunks]) == (expected, None, 0)
    assert outcome(RequestDecoder, [memoryview(c) for c in chunks]) == (expected, None, 0)


def test_partial_frame_is_held_and_reported() -> None:
    frame = encode_set("key", "value")
    decoder = RequestDecoder()
    assert decoder.feed(frame[:5]) == [] and decoder.in_frame and decoder.pending_bytes == 5
    assert decoder.feed(frame[5:-1]) == [] and decoder.pending_bytes == len(frame) - 1
    assert decoder.feed(frame[-1:] + frame[:3]) == [Request(Op.SET, "key", "value")]
    assert decoder.pending_bytes == 3 and decoder.in_frame


def test_responses_byte_by_byte_and_chunked() -> None:
    data = b"".join([encode_value("é" * i) if i % 3 else encode_ok() for i in range(50)]
                    + [encode_error("e"), encode_not_found(), encode_pong()])
    expected = ResponseDecoder().feed(data)
    assert len(expected) == 53
    assert outcome(ResponseDecoder, [data[i : i + 1] for i in range(len(data))]) == (expected, None, 0)
    for seed in range(5):
        assert outcome(ResponseDecoder, random_chunks(data, random.Random(seed))) == (expected, None, 0)


def test_parse_requests_decodes_a_region_without_slicing() -> None:
    a, b, c = encode_get("a"), encode_set("b", "2"), encode_remove("c")
    buf = bytearray(b"junk" + a + b + c + b"\xcb\x01")
    items, pos = parse_requests(buf, 4, 4 + len(a) + len(b))
    assert items == [Request(Op.GET, "a", None), Request(Op.SET, "b", "2")]
    assert pos == 4 + len(a) + len(b)
    items, pos = parse_requests(buf, 4)
    assert len(items) == 3 and pos == len(buf) - 2  # trailing partial header is left over


def test_parse_responses_reports_leftover() -> None:
    data = encode_ok() + encode_value("abc")
    items, pos = parse_responses(data[:-1])
    assert items == [Response(Status.OK, None)] and pos == RESPONSE_HEADER_SIZE


# --------------------------------------------------------------------------------------------
# Malformed requests: recoverable


def v1(op: int, key: bytes = b"", value: bytes = b"", **fields: int) -> bytes:
    return raw_request(op, key, value, version=1, **fields)


def v2_ttl(op: int, ttl: int, key: bytes = b"", value: bytes = b"", flags: int = FLAG_TTL) -> bytes:
    """A version 2 frame with the TTL flag and field."""
    return (struct.pack(">BBBBIIQ", REQUEST_MAGIC, 2, op, flags, len(key), len(value), ttl) + key + value)


# Version 1 frames get the messages kvs 0.1.0 gave them, word for word.
RECOVERABLE_CASES = {
    "unknown op 0": (v1(0, b"k"), "unknown operation 0x00"),
    "unknown op 5": (v1(5, b"k"), "unknown operation 0x05"),
    "unknown op ff": (v1(0xFF), "unknown operation 0xff"),
    "flags set": (v1(Op.GET, b"k", flags=1), "reserved flags byte must be 0, got 0x01"),
    "ping with key": (v1(Op.PING, b"k"), "PING takes no key and no value"),
    "ping with value": (v1(Op.PING, b"", b"v"), "PING takes no key and no value"),
    "get with value": (v1(Op.GET, b"k", b"v"), "GET takes no value"),
    "remove with value": (v1(Op.REMOVE, b"k", b"v"), "REMOVE takes no value"),
    "key not utf-8": (v1(Op.GET, b"\xff"), "key is not valid UTF-8"),
    "key truncated char": (v1(Op.SET, b"\xc3", b"v"), "key is not valid UTF-8"),
    "key surrogate": (v1(Op.REMOVE, "\ud800".encode("utf-8", "surrogatepass")), "key is not valid UTF-8"),
    "value not utf-8": (v1(Op.SET, b"k", b"ok\x80"), "value is not valid UTF-8"),
    "value overlong": (v1(Op.SET, b"k", b"\xc0\xaf"), "value is not valid UTF-8"),
    "key over limit": (v1(Op.GET, b"k" * 17), "key is 17 bytes, over the limit of 16 bytes"),
    "value over limit": (v1(Op.SET, b"k", b"v" * 65), "value is 65 bytes, over the limit of 64 bytes"),
    "key over limit on set": (v1(Op.SET, b"k" * 20, b"v"), "key is 20 bytes, over the limit of 16 bytes"),
    # version 2
    "v2 unknown op": (raw_request(7, b"k"), "unknown operation 0x07"),
    "v2 unknown flag": (raw_request(Op.GET, b"k", flags=0x08), "unknown flags 0x08"),
    "v2 unknown flag with known ones": (raw_request(Op.SET, b"k", b"v", flags=0x83), "unknown flags 0x80"),
    "v2 ping with key": (raw_request(Op.PING, b"k"), "PING takes no key and no value"),
    "v2 ping with flags": (raw_request(Op.PING, flags=FLAG_KEY_BYTES), "PING takes no flags"),
    "v2 get with value": (raw_request(Op.GET, b"k", b"v"), "GET takes no value"),
    "v2 get with value flag": (raw_request(Op.GET, b"k", flags=FLAG_VALUE_BYTES), "GET takes no value"),
    "v2 remove with value": (raw_request(Op.REMOVE, b"k", b"v", flags=FLAG_KEY_BYTES), "REMOVE takes no value"),
    "v2 get with ttl": (v2_ttl(Op.GET, 5, b"k"), "GET takes no TTL"),
    "v2 ping with ttl": (v2_ttl(Op.PING, 5), "PING takes no flags"),
    "v2 ttl zero": (v2_ttl(Op.SET, 0, b"k", b"v"), "TTL must be 1 to"),
    "v2 ttl over max": (v2_ttl(Op.SET, MAX_TTL_MS + 1, b"k", b"v"), "TTL must be 1 to"),
    "v2 text key not utf-8": (raw_request(Op.GET, b"\xff"), "key is not valid UTF-8 (send it with the KEY_BYTES flag)"),
    "v2 text value not utf-8": (raw_request(Op.SET, b"\xff", b"\xff", flags=FLAG_KEY_BYTES),
                                "value is not valid UTF-8 (send it with the VALUE_BYTES flag)"),
    "v2 text key with ttl": (v2_ttl(Op.SET, 5, b"\xc3", b"v"), "key is not valid UTF-8"),
    "v2 key over limit": (raw_request(Op.GET, b"k" * 17, flags=FLAG_KEY_BYTES),
                          "key is 17 bytes, over the limit of 16 bytes"),
    "v2 value over limit": (v2_ttl(Op.SET, 5, b"k", b"v" * 65, flags=FLAG_TTL | FLAG_VALUE_BYTES),
                            "value is 65 bytes, over the limit of 64 bytes"),
}


@pytest.mark.parametrize("case", sorted(RECOVERABLE_CASES))
def test_recoverable_errors_take_their_place_and_the_stream_continues(case: str) -> None:
    bad, message = RECOVERABLE_CASES[case]
    version = bad[1]
    data = encode_get("before") + bad + encode_set("after", "v") + bad + encode_ping(version=1)
    limits = dict(max_key_bytes=16, max_value_bytes=64)
    items = decode_all(data, **limits)
    assert [type(item) for item in items] == [Request, FrameError, Request, FrameError, Request]
    assert items[0] == Request(Op.GET, "before", None) and items[2] == Request(Op.SET, "after", "v")
    assert items[4] == Request(Op.PING, None, None, None, 1)
    for err in (items[1], items[3]):
        assert message in str(err) and not err.fatal and err.version == version
    if version == 1:
        assert str(items[1]) == message  # exactly what 0.1.0 said
    chunked = outcome(lambda: RequestDecoder(**limits), [data[i : i + 1] for i in range(len(data))])
    assert chunked == (items, None, 0)
    # one pass over the buffer finds the same items and consumes every frame
    assert parse_requests(data, **limits) == (items, len(data))


def test_oversized_key_within_the_frame_limit_is_recoverable() -> None:
    # a 100 KiB key exceeds the key limit, but the frame is within key+value limits
    key = b"k" * (100 * 1024)
    items = decode_all(raw_request(Op.GET, key) + encode_ping())
    assert items == [ProtocolError(f"key is {len(key)} bytes, over the limit of {DEFAULT_MAX_KEY_BYTES} bytes"),
                     Request(Op.PING, None, None)]


def test_error_is_reported_once_even_with_several_problems() -> None:
    (err,) = decode_all(raw_request(9, b"\xff" * 40, b"v", flags=3), max_key_bytes=16, max_value_bytes=64)
    assert err == ProtocolError("unknown operation 0x09")


# --------------------------------------------------------------------------------------------
# Malformed requests: fatal


def feed_expect_fatal(decoder, data: bytes) -> ProtocolError:
    with pytest.raises(ProtocolError) as info:
        decoder.feed(data)
    assert info.value.fatal
    return info.value


def test_bad_magic_is_fatal_from_the_first_byte() -> None:
    for first in (b"*", b"G", b"\x00", b"\xcc", b"\xff"):
        err = feed_expect_fatal(RequestDecoder(), first)
        assert "bad magic byte" in str(err) and isinstance(err, KvsError)


def test_resp_bytes_are_rejected_as_bad_magic() -> None:
    err = feed_expect_fatal(RequestDecoder(), b"*1\r\n$4\r\nPING\r\n")
    assert str(err).startswith("bad magic byte 0x2a")


def test_unknown_version_is_fatal_from_the_second_byte() -> None:
    err = feed_expect_fatal(RequestDecoder(), bytes([REQUEST_MAGIC, 3]))
    assert str(err) == "unsupported protocol version 3 (this side speaks versions 1 and 2)"
    feed_expect_fatal(RequestDecoder(), raw_request(Op.GET, b"k", version=0))
    err = feed_expect_fatal(ResponseDecoder(), bytes([RESPONSE_MAGIC, 3]))
    assert str(err) == "unsupported protocol version 3 (this side speaks versions 1 and 2)"


def test_absurd_length_prefix_is_fatal_from_the_header_alone_without_allocating() -> None:
    header = bytes([REQUEST_MAGIC, PROTOCOL_VERSION, Op.SET, 0]) + b"\xff" * 8
    decoder = RequestDecoder()
    assert decoder.feed(header[:11]) == []  # an incomplete header: nothing to decide yet
    tracemalloc.start()
    try:
        err = feed_expect_fatal(decoder, header[11:])
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert "over the maximum frame size" in str(err)
    assert peak < 64 * 1024, f"decoder allocated {peak} bytes for a header"
    assert decoder.pending_bytes == 0


def test_frame_just_over_the_limit_is_fatal_and_at_the_limit_is_not() -> None:
    limits = dict(max_key_bytes=16, max_value_bytes=64)
    at_limit = raw_request(Op.SET, klen=16, vlen=64)[:REQUEST_HEADER_SIZE]
    assert RequestDecoder(**limits).feed(at_limit) == []
    over = raw_request(Op.SET, klen=17, vlen=64)[:REQUEST_HEADER_SIZE]
    feed_expect_fatal(RequestDecoder(**limits), over)
    # a key over its limit but a frame within the total is only recoverable (see above)
    assert RequestDecoder(**limits).feed(raw_request(Op.GET, klen=80)[:REQUEST_HEADER_SIZE]) == []


def test_a_large_announced_frame_is_not_preallocated() -> None:
    header = raw_request(Op.SET, klen=1, vlen=DEFAULT_MAX_VALUE_BYTES)[:REQUEST_HEADER_SIZE]
    decoder = RequestDecoder()
    tracemalloc.start()
    try:
        assert decoder.feed(header + b"k") == []
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 64 * 1024 and decoder.in_frame and decoder.pending_bytes == REQUEST_HEADER_SIZE + 1


def test_fatal_error_carries_the_requests_before_it_and_the_decoder_stays_failed() -> None:
    good = encode_get("a") + encode_set("b", "c")
    decoder = RequestDecoder()
    err = feed_expect_fatal(decoder, good + b"GET a\r\n" + encode_ping())
    assert err.preceding == [Request(Op.GET, "a", None), Request(Op.SET, "b", "c")]
    assert err.offset == len(good)
    assert decoder.failed is err
    feed_expect_fatal(decoder, encode_ping())  # nothing is decoded after a fatal error


def test_parse_requests_raises_fatal_with_the_offset_of_good_frames() -> None:
    good = encode_get("a") + encode_ping()
    for junk in (b"\x00", bytes([REQUEST_MAGIC, 7]), raw_request(Op.GET, klen=0xFFFFFFFF)[:12]):
        with pytest.raises(ProtocolError) as info:
            parse_requests(good + junk)
        assert info.value.fatal and info.value.offset == len(good)
        assert info.value.preceding == [Request(Op.GET, "a", None), Request(Op.PING, None, None)]
        with pytest.raises(ProtocolError) as info:
            parse_requests(good + junk, len(good))
        assert info.value.fatal and info.value.offset == 0


def test_truncated_stream_is_pending_not_an_error() -> None:
    frame = encode_set("key", "value")
    for cut in range(1, len(frame)):
        decoder = RequestDecoder()
        assert decoder.feed(frame[:cut]) == []
        assert decoder.in_frame and decoder.pending_bytes == cut


# --------------------------------------------------------------------------------------------
# Malformed responses


def test_malformed_responses() -> None:
    recoverable = (raw_response(9) + raw_response(Status.OK, flags=2, version=1) + raw_response(Status.OK, b"x")
                   + raw_response(Status.VALUE, b"\xff") + raw_response(Status.ERROR, b"\xc3")
                   + raw_response(Status.VALUE, b"\xff", flags=FLAG_VALUE_BYTES, version=1)
                   + raw_response(Status.OK, flags=FLAG_VALUE_BYTES) + raw_response(Status.VALUE, b"v", flags=1))
    expected = [
        ProtocolError("unknown status 0x09"), ProtocolError("reserved flags byte must be 0, got 0x02"),
        ProtocolError("OK response carries a 1-byte payload"), ProtocolError("VALUE payload is not valid UTF-8"),
        ProtocolError("ERROR payload is not valid UTF-8"), ProtocolError("reserved flags byte must be 0, got 0x02"),
        ProtocolError("flags 0x02 are not valid on a OK response"),
        ProtocolError("flags 0x01 are not valid on a VALUE response"),
    ]
    assert ResponseDecoder().feed(recoverable + encode_ok()) == expected + [Response(Status.OK, None)]
    # a payload over max(max value, MAX_MESSAGE_BYTES) is fatal, after what came before it
    d = ResponseDecoder(max_value_bytes=10)
    with pytest.raises(ProtocolError) as info:
        d.feed(recoverable + raw_response(Status.VALUE, plen=MAX_MESSAGE_BYTES + 1))
    assert info.value.fatal and info.value.preceding == expected
    assert str(info.value) == (f"response announces a {MAX_MESSAGE_BYTES + 1}-byte payload, "
                               f"over the maximum of {MAX_MESSAGE_BYTES} bytes")
    # a VALUE over the client's value limit but within the frame limit is recoverable
    d = ResponseDecoder(max_value_bytes=10)
    assert d.feed(raw_response(Status.VALUE, b"v" * 11) + encode_ok()) == [
        ProtocolError("value is 11 bytes, over the limit of 10 bytes"), Response(Status.OK, None)]


def test_fatal_responses() -> None:
    for data in (b"-ERR not kvs\r\n", encode_get("k"), bytes([RESPONSE_MAGIC, 9]),
                 raw_response(Status.VALUE, plen=0xFFFFFFFF)[:RESPONSE_HEADER_SIZE]):
        d = ResponseDecoder()
        feed_expect_fatal(d, data)
        assert d.failed is not None
        feed_expect_fatal(d, encode_ok())


# --------------------------------------------------------------------------------------------
# Fuzzing


def random_text(rng: random.Random, max_len: int) -> str:
    alphabet = "abcXYZ019 \t\n\x00é€🔑ключ"
    return "".join(rng.choice(alphabet) for _ in range(rng.randrange(max_len + 1)))


def random_key_or_value(rng: random.Random, max_len: int, version: int) -> str | bytes:
    if version == 2 and rng.random() < 0.5:
        return rng.randbytes(rng.randrange(max_len + 1))
    return random_text(rng, max_len)


def random_frame(rng: random.Random) -> bytes:
    kind = rng.random()
    if kind < 0.6:
        version = rng.choice([1, 2, 2])
        op = rng.choice(list(Op))
        if op == Op.PING:
            return encode_ping(version=version)
        key = random_key_or_value(rng, 12, version)
        if op == Op.SET:
            ttl = rng.choice([None, None, 1, 2**40]) if version == 2 else None
            return encode_set(key, random_key_or_value(rng, 30, version), ttl_ms=ttl, version=version)
        return encode_request(op, key, version=version)
    if kind < 0.9:  # hand-built header with random fields, plausible lengths
        key = bytes(rng.randrange(256) for _ in range(rng.randrange(20)))
        value = bytes(rng.randrange(256) for _ in range(rng.randrange(20)))
        return raw_request(rng.choice([0, 1, 2, 3, 4, 5, 255]), key, value,
                           flags=rng.choice([0, 0, 0, 1, 2, 3, 4, 6, 7, 8, 128]),
                           version=rng.choice([1, 2, 2, 2, 2, 2, 2, 2, 2, 3]),
                           magic=rng.choice([REQUEST_MAGIC] * 19 + [0x2A]))
    return bytes(rng.randrange(256) for _ in range(rng.randrange(1, 30)))  # noise


def reencode(req: Request, **limits: int) -> bytes:
    """The frame a decoded request came from: every valid frame has one encoding, so the
    decoder's inline fast paths and its general path must agree with the encoders."""
    return encode_request(req.op, req.key, req.value, ttl_ms=req.ttl_ms, version=req.version, **limits)


def mutate(data: bytes, rng: random.Random) -> bytes:
    b = bytearray(data)
    for _ in range(rng.randrange(1, 4)):
        choice = rng.random()
        if not b:
            b.extend(rng.randbytes(rng.randrange(1, 10)))
        elif choice < 0.4:
            b[rng.randrange(len(b))] = rng.randrange(256)
        elif choice < 0.55:
            i = rng.randrange(len(b))
            b[i] ^= 1 << rng.randrange(8)
        elif choice < 0.7:
            del b[rng.randrange(len(b)) :]
        elif choice < 0.85:
            i = rng.randrange(len(b) + 1)
            b[i:i] = rng.randbytes(rng.randrange(1, 8))
        else:
            i = rng.randrange(len(b))
            b[i : i + 4] = rng.choice([b"\xff\xff\xff\xff", b"\x00\x00\x00\x00", b"\x00\x00\x01\x00"])
    return bytes(b)


@pytest.mark.parametrize("seed", range(4))
def test_fuzz_request_decoder(seed: int) -> None:
    rng = random.Random(seed)
    limits = dict(max_key_bytes=24, max_value_bytes=48)
    make = lambda: RequestDecoder(**limits)
    for _ in range(150):
        frames = [random_frame(rng) for _ in range(rng.randrange(1, 6))]
        data = b"".join(frames)
        if rng.random() < 0.5:
            data = mutate(data, rng)
        one_shot = outcome(make, [data])
        for item in one_shot[0]:
            assert isinstance(item, (Request, ProtocolError))
            if isinstance(item, ProtocolError):
                assert not item.fatal
        # chunking never changes the outcome
        assert outcome(make, random_chunks(data, rng)) == one_shot
        # each request decoded from a lone frame is exactly that frame re-encoded
        for frame in frames:
            try:
                items, pos = parse_requests(frame, **limits)
            except ProtocolError:
                continue
            if len(items) == 1 and pos == len(frame) and isinstance(items[0], Request):
                assert reencode(items[0], **limits) == frame
        # one pass over the whole buffer agrees with the decoder
        if one_shot[1] is None:
            assert parse_requests(data, **limits) == (one_shot[0], len(data) - one_shot[2])
        else:
            with pytest.raises(ProtocolError):
                parse_requests(data, **limits)


@pytest.mark.parametrize("seed", range(3))
def test_fuzz_a_valid_frame_after_a_recoverable_error_still_parses(seed: int) -> None:
    rng = random.Random(1000 + seed)
    limits = dict(max_key_bytes=24, max_value_bytes=48)
    checked = 0
    for _ in range(300):
        data = mutate(random_frame(rng), rng)
        try:
            items, pos = parse_requests(data, **limits)
        except ProtocolError as exc:
            assert exc.fatal
            continue
        if pos != len(data) or not items or not isinstance(items[-1], ProtocolError):
            continue
        checked += 1
        follow = encode_set("next", "frame")
        assert RequestDecoder(**limits).feed(data + follow)[-1] == Request(Op.SET, "next", "frame")
    assert checked > 20  # the generator does produce recoverable errors


@pytest.mark.parametrize("seed", range(2))
def test_fuzz_response_decoder(seed: int) -> None:
    rng = random.Random(seed)
    for _ in range(200):
        parts = []
        for _ in range(rng.randrange(1, 6)):
            r = rng.random()
            if r < 0.5:
                parts.append(encode_value(random_text(rng, 20)))
            elif r < 0.7:
                parts.append(rng.choice([encode_ok(), encode_not_found(), encode_pong()]))
            elif r < 0.8:
                parts.append(encode_error(random_text(rng, 20)))
            else:
                parts.append(raw_response(rng.randrange(8), rng.randbytes(rng.randrange(10)),
                                          flags=rng.choice([0, 0, 1])))
        data = b"".join(parts)
        if rng.random() < 0.5:
            data = mutate(data, rng)
        make = lambda: ResponseDecoder(max_value_bytes=64)
        one_shot = outcome(make, [data])
        assert all(isinstance(i, (Response, ProtocolError)) for i in one_shot[0])
        assert outcome(make, random_chunks(data, rng)) == one_shot
