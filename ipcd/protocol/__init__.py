"""The ipcd wire protocol, sans-IO: nothing in this package touches a socket."""

from ipcd.protocol.errors import LocalProtocolError, ProtocolError, RemoteProtocolError
from ipcd.protocol.frames import (
    DEFAULT_MAX_FRAME_SIZE,
    HEADER_SIZE,
    MAX_FDS_PER_FRAME,
    NEED_DATA,
    Frame,
    FrameDecoder,
    NeedData,
    decode_record,
    encode_frame,
    encode_header,
)
from ipcd.protocol.messages import decode_error, decode_json, encode_error, encode_json
from ipcd.protocol.ops import REPLY_BIT, ErrorCode, Op, op_name, reply_op

__all__ = [
    "DEFAULT_MAX_FRAME_SIZE",
    "HEADER_SIZE",
    "MAX_FDS_PER_FRAME",
    "NEED_DATA",
    "REPLY_BIT",
    "ErrorCode",
    "Frame",
    "FrameDecoder",
    "LocalProtocolError",
    "NeedData",
    "Op",
    "ProtocolError",
    "RemoteProtocolError",
    "decode_error",
    "decode_json",
    "decode_record",
    "encode_error",
    "encode_frame",
    "encode_header",
    "encode_json",
    "op_name",
    "reply_op",
]
