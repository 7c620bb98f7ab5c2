"""Length-prefixed JSON frames over a Unix stream socket (never pickle: the peer may be hostile).

Frame = 4-byte big-endian length + UTF-8 JSON (ASCII-escaped). File descriptors ride as SCM_RIGHTS on the
first byte of a frame whose JSON says `"nfds": N`; the receiver keeps arriving descriptors in a FIFO and
pops N when it parses that frame. The stream preserves order, so the association is exact.
"""

from __future__ import annotations

import array
import json
import socket
import struct

HEADER = struct.Struct(">I")
MAX_FDS_PER_MSG = 16


class ProtocolError(Exception):
    """The peer broke the framing (oversized frame, bad JSON, missing descriptors)."""


def encode(obj: dict) -> bytes:
    data = json.dumps(obj, ensure_ascii=True, separators=(",", ":")).encode("ascii")
    return HEADER.pack(len(data)) + data


class Channel:
    """Blocking channel (used inside the sandbox, where each process serves one request at a time)."""

    def __init__(self, fd: int, max_frame: int = 256 << 20):
        self.sock = socket.socket(fileno=fd)
        self.sock.setblocking(True)
        self.max_frame = max_frame
        self._buf = bytearray()
        self._fds: list[int] = []

    def fileno(self) -> int:
        return self.sock.fileno()

    def close(self) -> None:
        self.sock.close()

    def pending_fds(self) -> list[int]:
        """Descriptors received for frames not parsed yet."""
        return list(self._fds)

    def send(self, obj: dict, fds: tuple[int, ...] | list[int] = ()) -> None:
        if fds:
            obj = dict(obj, nfds=len(fds))
        data = encode(obj)
        if fds:
            n = self.sock.sendmsg([data], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds))])
            data = data[n:]
        if data:
            self.sock.sendall(data)

    def recv(self) -> tuple[dict, list[int]] | None:
        """Next message and its descriptors; None on EOF."""
        while True:
            if len(self._buf) >= HEADER.size:
                (n,) = HEADER.unpack_from(self._buf)
                if n > self.max_frame:
                    raise ProtocolError(f"frame of {n} bytes exceeds {self.max_frame}")
                if len(self._buf) >= HEADER.size + n:
                    data = bytes(self._buf[HEADER.size:HEADER.size + n])
                    del self._buf[:HEADER.size + n]
                    try:
                        msg = json.loads(data)
                    except ValueError as e:
                        raise ProtocolError(f"bad JSON frame: {e}") from None
                    if not isinstance(msg, dict):
                        raise ProtocolError("frame is not a JSON object")
                    want = msg.pop("nfds", 0)
                    if not isinstance(want, int) or want < 0 or want > len(self._fds):
                        raise ProtocolError(f"frame announces {want!r} descriptors, {len(self._fds)} arrived")
                    fds, self._fds = self._fds[:want], self._fds[want:]
                    return msg, fds
            data, anc, _flags, _addr = self.sock.recvmsg(1 << 16, socket.CMSG_SPACE(MAX_FDS_PER_MSG * 4))
            for level, kind, payload in anc:
                if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
                    arr = array.array("i")
                    arr.frombytes(payload[: len(payload) - len(payload) % arr.itemsize])
                    self._fds.extend(arr)
            if not data:
                return None
            self._buf += data
