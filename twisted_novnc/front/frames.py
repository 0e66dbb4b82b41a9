"""WebSocket framing on the relay's hot path, done per chunk instead of per message.

Autobahn buffers each browser message whole and copies every payload five or six times on the
way (bench/README.md, "Profiles").  A relay needs none of that: noVNC's messages are a byte
stream to the VM.  Here a binary frame's payload is unmasked as it arrives, one copy into a
``bytearray`` unmasked in place by Autobahn's native masker (NVX), and the server's own frames
are a header written in front of the VM's bytes, never joined to them.

This module only parses and builds frames; :mod:`twisted_novnc.front.fastpath` decides which
frames take this path (binary data, masked, within the size limits) and hands everything else —
control frames, text, anything malformed — to Autobahn.
"""

from __future__ import annotations

import struct
from typing import Any

import attrs

try:  # Autobahn's NVX extension, which twisted_novnc checks for at start-up.
    from _nvx_xormasker import ffi as _ffi
    from _nvx_xormasker import lib as _lib
except ImportError:  # pragma: no cover - only without the native extension
    _ffi = _lib = None

#: The NVX implementation number for SSE2 (autobahn/nvx/_xormasker.py).
_NVX_SSE2 = 2

_SHORT = struct.Struct("!BBH")
_LONG = struct.Struct("!BBQ")

OPCODE_CONTINUATION = 0
OPCODE_TEXT = 1
OPCODE_BINARY = 2


def server_frame_header(length: int, opcode: int = OPCODE_BINARY) -> bytes:
    """The header of one unfragmented, unmasked server-to-client frame of ``length`` bytes."""
    first = 0x80 | opcode
    if length < 126:
        return bytes((first, length))
    if length < 65536:
        return _SHORT.pack(first, 126, length)
    return _LONG.pack(first, 127, length)


@attrs.define
class ClientFrameHeader:
    """A parsed client frame header; ``size`` is the header's own length in bytes."""

    fin: bool
    rsv: int
    opcode: int
    masked: bool
    length: int
    mask: bytes
    size: int


def parse_client_header(data: bytes, pos: int = 0) -> ClientFrameHeader | None:
    """The frame header starting at ``data[pos]``, or None while it is incomplete.

    Only the header's layout is read here; whether the frame is acceptable (masked, a known
    opcode, minimal length encoding, within limits) is the caller's decision.
    """
    available = len(data) - pos
    if available < 2:
        return None
    b0 = data[pos]
    b1 = data[pos + 1]
    masked = bool(b1 & 0x80)
    length = b1 & 0x7F
    size = 2
    if length == 126:
        size = 4
        if available < size:
            return None
        length = (data[pos + 2] << 8) | data[pos + 3]
    elif length == 127:
        size = 10
        if available < size:
            return None
        length = int.from_bytes(data[pos + 2 : pos + 10], "big")
    if masked:
        if available < size + 4:
            return None
        mask = bytes(data[pos + size : pos + size + 4])
        size += 4
    else:
        mask = b""
    return ClientFrameHeader(
        bool(b0 & 0x80), (b0 >> 4) & 0x7, b0 & 0x0F, masked, length, mask, size
    )


def minimal_length(header: ClientFrameHeader) -> bool:
    """Whether the length used the shortest encoding, as RFC 6455 section 5.2 requires."""
    if header.size - (4 if header.masked else 0) == 4:
        return header.length >= 126
    if header.size - (4 if header.masked else 0) == 10:
        return header.length >= 65536 and header.length < 2**63
    return True


class Unmasker:
    """Unmasks one frame's payload, chunk after chunk, each into a new ``bytearray``."""

    __slots__ = ("_mask", "_offset", "_state")

    def __init__(self, mask: bytes) -> None:
        self._mask = mask
        self._offset = 0
        if _lib is not None:
            state = _lib.nvx_xormask_new(_ffi.new("uint8_t[4]", mask))
            _lib.nvx_xormask_set_impl(state, _NVX_SSE2)
            self._state: Any = _ffi.gc(state, _lib.nvx_xormask_free)
        else:
            self._state = None

    def mask_from_here(self) -> bytes:
        """The mask as it applies from the next byte on: an :class:`Unmasker` made with it
        goes on where this one stops (a frame continued in another process)."""
        start = self._offset % 4
        return self._mask[start:] + self._mask[:start]

    def unmask(self, chunk: Any) -> bytearray:
        """The next ``len(chunk)`` bytes of the payload, unmasked (one copy, XOR in place)."""
        out = bytearray(chunk)
        if self._state is not None:
            _lib.nvx_xormask_process(self._state, _ffi.from_buffer("uint8_t[]", out), len(out))
        else:
            out = xor_python(out, self._mask, self._offset)
        self._offset += len(out)
        return out


def xor_python(data: bytearray, mask: bytes, offset: int) -> bytearray:
    """Unmasking without NVX: one big-integer XOR, a few hundred MB/s instead of GB/s."""
    n = len(data)
    start = offset % 4
    key = (mask * (n // 4 + 2))[start : start + n]
    value = int.from_bytes(data, "little") ^ int.from_bytes(key, "little")
    return bytearray(value.to_bytes(n, "little"))


def nvx_available() -> bool:
    """Whether unmasking runs in native code."""
    return _lib is not None
