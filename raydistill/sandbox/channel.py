"""Host end of a sandbox channel: asyncio, kernel-verified sender pid on every byte, hard size caps.

SO_PASSCRED makes the kernel attach the sender's pid (translated into our pid namespace, unforgeable
without privileges the sandbox does not have) to each read. Bytes from any process other than the one
that registered on this channel are dropped, so a fork of model code that kept a copy of the socket
cannot inject or corrupt frames. Frames are JSON only, bounded by `max_frame`; descriptors sent by the
sandbox are closed and count as a protocol violation.
"""

from __future__ import annotations

import array
import asyncio
import collections
import json
import os
import socket
import struct

from raydistill.sandbox.guest.protocol import HEADER, encode

_CREDS = struct.Struct("iII")
_ANC = socket.CMSG_SPACE(_CREDS.size) + socket.CMSG_SPACE(4 * 8)
_READ = 1 << 16


class ChannelClosed(Exception):
    """The other end is gone (process exited or closed its socket)."""


class ProtocolViolation(Exception):
    """The sandbox sent something it must not (oversized/garbled frame, descriptors, message flood)."""


def make_pair() -> tuple[socket.socket, socket.socket]:
    """(host end with SO_PASSCRED set, sandbox end to hand over)."""
    host, guest = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    host.setsockopt(socket.SOL_SOCKET, socket.SO_PASSCRED, 1)
    return host, guest


class AsyncChannel:
    def __init__(self, sock: socket.socket, loop: asyncio.AbstractEventLoop, *, max_frame: int,
                 max_queue: int = 64, name: str = "sandbox"):
        self.sock = sock
        self.loop = loop
        self.max_frame = max_frame
        self.max_queue = max_queue
        self.name = name
        self.peer_pid: int | None = None
        """Pid (in the host's pid namespace) of the process that sent the first byte; only it is heard."""
        self.foreign_bytes = 0
        self._buf = bytearray()
        self._queue: collections.deque = collections.deque()
        self._waiter: asyncio.Future | None = None
        self._error: BaseException | None = None
        sock.setblocking(False)
        loop.add_reader(sock.fileno(), self._on_readable)

    # -- receiving -------------------------------------------------------------------------------------
    def _fail(self, exc: BaseException) -> None:
        if self._error is None:
            self._error = exc
        self._stop_reading()
        self._wake()

    def _stop_reading(self) -> None:
        try:
            self.loop.remove_reader(self.sock.fileno())
        except (ValueError, OSError):
            pass

    def _wake(self) -> None:
        w, self._waiter = self._waiter, None
        if w is not None and not w.done():
            w.set_result(None)

    def _on_readable(self) -> None:
        for _ in range(16):
            try:
                data, anc, flags, _ = self.sock.recvmsg(_READ, _ANC)
            except (BlockingIOError, InterruptedError):
                break
            except OSError as e:
                self._fail(ChannelClosed(f"{self.name}: {e}"))
                return
            pid = None
            for level, kind, payload in anc:
                if level != socket.SOL_SOCKET:
                    continue
                if kind == socket.SCM_CREDENTIALS and len(payload) >= _CREDS.size:
                    pid = _CREDS.unpack_from(payload)[0]
                elif kind == socket.SCM_RIGHTS:
                    fds = array.array("i")
                    fds.frombytes(payload[: len(payload) - len(payload) % 4])
                    for fd in fds:
                        os.close(fd)
                    self._fail(ProtocolViolation(f"{self.name} sent file descriptors"))
                    return
            if flags & socket.MSG_CTRUNC:
                self._fail(ProtocolViolation(f"{self.name} sent oversized ancillary data"))
                return
            if not data:
                self._fail(ChannelClosed(f"{self.name} closed the channel"))
                return
            if self.peer_pid is None and pid:
                self.peer_pid = pid
            if pid != self.peer_pid:
                self.foreign_bytes += len(data)
                continue
            self._buf += data
            if not self._parse():
                return
            if len(data) < _READ:  # drained (more data wakes us again): spare the EAGAIN read
                break
        if self._queue:
            self._wake()

    def _parse(self) -> bool:
        while len(self._buf) >= HEADER.size:
            (n,) = HEADER.unpack_from(self._buf)
            if n > self.max_frame:
                self._fail(ProtocolViolation(f"{self.name} sent a {n}-byte frame (limit {self.max_frame})"))
                return False
            if len(self._buf) < HEADER.size + n:
                break
            raw = bytes(self._buf[HEADER.size:HEADER.size + n])
            del self._buf[:HEADER.size + n]
            try:
                msg = json.loads(raw)
            except (ValueError, RecursionError):
                msg = None
            if not isinstance(msg, dict) or not isinstance(msg.get("op"), str):
                self._fail(ProtocolViolation(f"{self.name} sent a malformed frame"))
                return False
            self._queue.append(msg)
            if len(self._queue) > self.max_queue:
                self._fail(ProtocolViolation(f"{self.name} flooded the channel"))
                return False
        return True

    def peer_exited(self) -> None:
        """The peer process died: take in what it left in the socket, then fail further receives."""
        if self._error is None:
            self._on_readable()
            while self._error is None and self._has_data():
                self._on_readable()
            self._fail(ChannelClosed(f"{self.name} process exited"))

    def _has_data(self) -> bool:
        import select

        try:
            return bool(select.select([self.sock], [], [], 0)[0])
        except (OSError, ValueError):
            return False

    async def recv(self) -> dict:
        while not self._queue:
            if self._error is not None:
                raise self._error
            self._waiter = self.loop.create_future()
            await self._waiter
        return self._queue.popleft()

    # -- sending ---------------------------------------------------------------------------------------
    async def send(self, obj: dict, fds: tuple[int, ...] | list[int] = ()) -> None:
        if fds:
            obj = dict(obj, nfds=len(fds))
        data = encode(obj)
        try:
            if fds:
                while True:
                    try:
                        n = self.sock.sendmsg([data], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds))])
                        break
                    except (BlockingIOError, InterruptedError):
                        await self._writable()
                data = data[n:]
            if data:
                await self.loop.sock_sendall(self.sock, data)
        except (BrokenPipeError, ConnectionError, OSError) as e:
            raise ChannelClosed(f"{self.name}: {e}") from None

    async def _writable(self) -> None:
        fut = self.loop.create_future()
        fd = self.sock.fileno()
        self.loop.add_writer(fd, lambda: fut.done() or fut.set_result(None))
        try:
            await fut
        finally:
            self.loop.remove_writer(fd)

    def close(self) -> None:
        self._stop_reading()
        if self._error is None:
            self._error = ChannelClosed(f"{self.name} closed")
        self._wake()
        try:
            self.sock.close()
        except OSError:
            pass
