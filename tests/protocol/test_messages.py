"""Structured bodies: binary ERROR bodies and JSON-object bodies."""

from __future__ import annotations

from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from ipcd.protocol import ErrorCode, RemoteProtocolError, decode_error, decode_json, encode_error, encode_json

# -- ERROR bodies -------------------------------------------------------------


def test_error_body_is_a_big_endian_code_then_utf8() -> None:
    assert encode_error(ErrorCode.TOO_LARGE, "big") == b"\x00\x03big"
    assert encode_error(ErrorCode.INTERNAL, "é") == b"\x00\x32\xc3\xa9"


@pytest.mark.parametrize("code", list(ErrorCode))
@pytest.mark.parametrize("message", ["", "no such channel", "ünïcödé ✓ 🚀", "two\nlines", "x" * 10_000])
def test_error_round_trip(code: ErrorCode, message: str) -> None:
    assert decode_error(encode_error(code, message)) == (code, message)


@settings(max_examples=200, deadline=None)
@given(code=st.sampled_from(ErrorCode), message=st.text())
def test_error_round_trip_any_text(code: ErrorCode, message: str) -> None:
    assert decode_error(encode_error(code, message)) == (code, message)


def test_unknown_error_code_is_returned_as_an_int() -> None:
    assert decode_error(b"\xff\xfeadded later") == (0xFFFE, "added later")


def test_error_message_that_is_not_utf8_is_replaced_not_raised() -> None:
    assert decode_error(b"\x00\x01bad \xff byte") == (ErrorCode.MALFORMED, "bad \ufffd byte")


def test_error_message_with_a_lone_surrogate_is_encoded_anyway() -> None:
    assert encode_error(ErrorCode.INTERNAL, "a\udc80b") == b"\x00\x32a?b"


@pytest.mark.parametrize("body", [b"", b"\x00"])
def test_error_body_shorter_than_its_code_is_a_remote_error(body: bytes) -> None:
    with pytest.raises(RemoteProtocolError) as info:
        decode_error(body)
    assert info.value.code == ErrorCode.MALFORMED
    assert not info.value.fatal


# -- JSON bodies --------------------------------------------------------------


def test_json_round_trip() -> None:
    obj = {"workers": [{"pid": 12, "load": 0.5}], "name": "ïpcd", "ready": True, "limit": None}
    assert decode_json(encode_json(obj)) == obj


def test_json_is_compact_and_sorted() -> None:
    assert encode_json({"b": 1, "a": [1, 2], "c": {"z": 0, "y": 1}}) == b'{"a":[1,2],"b":1,"c":{"y":1,"z":0}}'


def test_json_text_is_utf8_not_escaped() -> None:
    assert encode_json({"text": "hé 😀"}) == '{"text":"hé 😀"}'.encode()
    # So a body takes its text's UTF-8 size: 2 bytes per "ü", not a 6-byte \u00fc.
    assert len(encode_json({"t": "ü" * 8000})) == len(b'{"t":""}') + 16_000


@pytest.mark.parametrize(
    "text",
    [
        "\ud800",  # a lone surrogate, as JSON "\ud800" decodes
        "a\udcffb",  # an undecodable byte of a path, as os.readlink's surrogateescape gives it
        "é and \udfff",
    ],
)
def test_json_with_a_string_without_utf8_form_is_escaped_not_raised(text: str) -> None:
    body = encode_json({"path": text, "other": "ü"})
    body.decode("ascii")  # the whole body escaped: still JSON
    assert decode_json(body) == {"path": text, "other": "ü"}


@settings(max_examples=200, deadline=None)
@given(text=st.text(alphabet=st.characters(blacklist_categories=())))  # surrogates included
def test_json_round_trip_any_code_points(text: str) -> None:
    assert decode_json(encode_json({"text": text})) == {"text": text}


def test_empty_body_is_an_empty_object() -> None:
    assert decode_json(b"") == {}


@pytest.mark.parametrize(
    "body",
    [
        b"{",
        b"not json",
        b"{'single': 'quotes'}",
        b'{"a": 1} trailing',
        b"\xff\xfe{}",  # not UTF-8
        b'{"a": "\xc3"}',  # a truncated UTF-8 sequence
        b"\xef\xbb\xbf{}",  # a UTF-8 byte order mark
        b"[" * 100_000,  # nested deeper than the parser recurses
        b'{"a": ' * 100_000,
        b'{"n": ' + b"1" * 5_000 + b"}",  # over the int digits limit of str -> int
        b" ",
    ],
    ids=lambda b: repr(b[:24]),
)
def test_body_that_is_not_json_is_a_bad_request(body: bytes) -> None:
    with pytest.raises(RemoteProtocolError) as info:
        decode_json(body)
    assert info.value.code == ErrorCode.BAD_REQUEST
    assert not info.value.fatal


@pytest.mark.parametrize("body", [b"[]", b"[1, 2]", b"1", b"1.5", b'"text"', b"null", b"true"])
def test_json_that_is_not_an_object_is_a_bad_request(body: bytes) -> None:
    with pytest.raises(RemoteProtocolError) as info:
        decode_json(body)
    assert info.value.code == ErrorCode.BAD_REQUEST
    assert not info.value.fatal


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False, allow_infinity=False) | st.text(),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(), children, max_size=4),
    max_leaves=10,
)


@settings(max_examples=100, deadline=None)
@given(obj=st.dictionaries(st.text(), json_values, max_size=4))
def test_json_round_trip_any_object(obj: dict[str, Any]) -> None:
    assert decode_json(encode_json(obj)) == obj


@pytest.mark.parametrize(
    "literal", [b"NaN", b"Infinity", b"-Infinity", b"1e999", b"-1e999", b"1E400", b"123456789e999"]
)
@pytest.mark.parametrize("where", [b'{"wait":%s}', b'{"a":[1,{"b":%s}]}', b'{"x":1,"y":%s}'])
def test_json_without_a_finite_number_is_refused_wherever_it_sits(literal: bytes, where: bytes) -> None:
    """Python's json reads NaN, Infinity and 1e999 (as inf) by default: none
    is a JSON number, and a NaN deadline never passes, so no body may hold one."""
    with pytest.raises(RemoteProtocolError) as info:
        decode_json(where % literal)
    assert info.value.code == ErrorCode.BAD_REQUEST
    assert not info.value.fatal
    assert literal.decode() in info.value.message


def test_json_keeps_tiny_and_large_finite_numbers() -> None:
    assert decode_json(b'{"a":1e-999,"b":1.7976931348623157e308,"c":-0.0}') == {
        "a": 0.0,
        "b": 1.7976931348623157e308,
        "c": -0.0,
    }


@settings(max_examples=300, deadline=None)
@given(
    body=st.binary()
    | st.text(alphabet='{}[]":,.-+eE0123456789 truefalsn\\u').map(str.encode)
    | st.integers(1, 3_000).map(lambda n: b"[" * n + b"]" * n)
)
def test_any_body_is_an_object_or_a_bad_request(body: bytes) -> None:
    code: ErrorCode | None = None
    try:
        obj = decode_json(body)
    except RemoteProtocolError as exc:
        code = exc.code
    else:
        assert isinstance(obj, dict)
    assert code in (None, ErrorCode.BAD_REQUEST)
