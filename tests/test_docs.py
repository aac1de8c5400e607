"""The protocol document names every op and error code the code defines,
with the same number: a client written from the doc alone must not meet a
code the doc does not know."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from ipcd.protocol import ErrorCode, Op

PROTOCOL = (Path(__file__).resolve().parent.parent / "docs" / "protocol.md").read_text()


@pytest.mark.parametrize("code", list(ErrorCode), ids=lambda c: c.name)
def test_every_error_code_has_a_row(code: ErrorCode) -> None:
    row = re.compile(rf"^\|\s*{code.value}\s*\|\s*`{code.name}`\s*\|", re.MULTILINE)
    assert row.search(PROTOCOL), f"docs/protocol.md section 6 lacks the row of {code.name} ({code.value})"


@pytest.mark.parametrize("op", list(Op), ids=lambda o: o.name)
def test_every_op_has_a_row(op: Op) -> None:
    row = re.compile(rf"^\|\s*`0x{op.value:02X}`\s*\|\s*`{op.name}`", re.MULTILINE)
    # Reply ops of chat and hand-off are named inside their request's row.
    named_in_reply_column = f"`{op.name}` (`0x{op.value:02X}`)" in PROTOCOL
    assert row.search(PROTOCOL) or named_in_reply_column, f"docs/protocol.md lacks {op.name}"
