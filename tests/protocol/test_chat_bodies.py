"""Chat bodies checked at the door: what prepare_say lets through and how."""

from __future__ import annotations

import json

import pytest
from hypothesis import given
from hypothesis import strategies as st

from ipcd.protocol import ErrorCode, RemoteProtocolError, encode_json
from ipcd.protocol.chat import parse_say, prepare_say, sanitize_text

CONTROLS = {chr(c) for c in [*range(0x20), *range(0x7F, 0xA0)]} - {"\t", "\n"}


@given(st.text())
def test_sanitize_drops_exactly_the_terminal_controls(text: str) -> None:
    assert sanitize_text(text) == "".join(c for c in text if c not in CONTROLS)


@given(st.text(st.characters(blacklist_categories=["Cs"]), max_size=200))
def test_a_say_text_comes_out_as_the_json_of_its_sanitized_self(text: str) -> None:
    say = prepare_say(encode_json({"room": "r", "text": text}), 16 * 1024)
    assert say.room == "r"
    assert json.loads(say.text_json) == sanitize_text(text)
    say.text_json.decode()  # UTF-8, not \\u escapes of every non-ASCII character
    assert len(say.text_json) <= len(json.dumps(text).encode())


@pytest.mark.parametrize(
    ("body", "code", "says"),
    [
        (b"not json", ErrorCode.BAD_REQUEST, "not UTF-8 JSON"),
        (b'{"room": "r"}', ErrorCode.BAD_REQUEST, "text must be a string"),
        (b'{"room": "-x", "text": "t"}', ErrorCode.BAD_REQUEST, "bad room name"),
        (b'{"room": "r", "text": "\\ud800"}', ErrorCode.BAD_REQUEST, "lone surrogate"),
        (encode_json({"room": "r", "text": "é" * 600}), ErrorCode.LIMIT_EXCEEDED, "over the limit of 1000"),
    ],
)
def test_a_bad_say_body_is_refused_with_its_reason(body: bytes, code: ErrorCode, says: str) -> None:
    with pytest.raises(RemoteProtocolError) as caught:
        prepare_say(body, 1000)
    assert caught.value.code == code
    assert says in caught.value.message


def test_the_room_defaults_to_the_lobby() -> None:
    assert prepare_say(b'{"text": "hi"}', 100).room == "lobby"


SAY_TEXT = st.text(
    st.sampled_from(["a", "é", '"', "\\", "\t", "\x1b", "\x7f", "\x85", "\u2028", "\ud800", "😀"])
)


def outcome(fn: object, body: bytes, limit: int) -> object:
    try:
        return fn(body, limit)  # type: ignore[operator]
    except RemoteProtocolError as exc:
        return (exc.code, exc.message)


@given(st.sampled_from(["r", "a.b-c_1", "-bad", "x" * 64, "x" * 65]), SAY_TEXT, st.integers(0, 40))
def test_the_plain_body_shortcut_gives_what_parsing_gives(room: str, text: str, limit: int) -> None:
    """Compact bodies with the room first take a shortcut that skips the
    JSON parser: for any room and text, the outcome is the parser's."""
    body = (
        b'{"room":'
        + json.dumps(room).encode()
        + b',"text":'
        + json.dumps(text, ensure_ascii=False).encode("utf-8", "surrogatepass")
        + b"}"
    )
    assert outcome(prepare_say, body, limit) == outcome(parse_say, body, limit)


MESSAGE_IDS = st.sampled_from(["a", "run:17", "x" * 64, "x" * 65, "", "has space", 'q"', "b\\s", "é", "~!#"])


@given(MESSAGE_IDS, st.sampled_from(["r", "-bad", "x" * 65]), SAY_TEXT, st.integers(0, 40))
def test_the_shortcut_with_a_message_id_gives_what_parsing_gives(
    message_id: str, room: str, text: str, limit: int
) -> None:
    """The same for a compact body with an id first (keys sorted), whatever the id."""
    body = (
        b'{"id":'
        + json.dumps(message_id, ensure_ascii=False).encode()
        + b',"room":'
        + json.dumps(room).encode()
        + b',"text":'
        + json.dumps(text, ensure_ascii=False).encode("utf-8", "surrogatepass")
        + b"}"
    )
    assert outcome(prepare_say, body, limit) == outcome(parse_say, body, limit)


def test_a_message_id_is_kept_as_ascii_bytes_and_absent_is_empty() -> None:
    assert prepare_say(b'{"id":"run:1","room":"r","text":"t"}', 10).message_id == b"run:1"
    assert prepare_say(b'{"room": "r", "text": "t", "id": "run:1"}', 10).message_id == b"run:1"
    assert prepare_say(b'{"room":"r","text":"t"}', 10).message_id == b""
