"""Host-side handle of one sandbox process: its channel, a pidfd (kill without pid-reuse races, and an
exit notification that does not depend on the process closing its sockets), and its namespace pid."""

from __future__ import annotations

import asyncio
import os
import signal
import socket

from raydistill.sandbox.channel import AsyncChannel, ChannelClosed, ProtocolViolation


class SandboxProcessError(RuntimeError):
    """A sandbox process failed to come up or broke protocol."""


def _nspids(pid: int) -> list[int]:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("NSpid:"):
                return [int(x) for x in line.split()[1:]]
    return [pid]


class Proc:
    def __init__(self, chan: AsyncChannel, role: str):
        self.chan = chan
        self.role = role
        self.pid: int | None = None
        self.inner_pid: int | None = None
        self.nspids: list[int] = []
        self.pidfd: int | None = None
        self.exited: asyncio.Future = chan.loop.create_future()
        self.killed = False

    @classmethod
    async def accept(cls, sock: socket.socket, loop: asyncio.AbstractEventLoop, *, role: str, max_frame: int,
                     timeout: float, min_ns_depth: int = 1) -> Proc:
        """Wait for the process on the other end of `sock` to say hello, then pin it with a pidfd."""
        chan = AsyncChannel(sock, loop, max_frame=max_frame, name=role)
        p = cls(chan, role)
        try:
            async with asyncio.timeout(timeout):
                msg = await chan.recv()
            if msg.get("op") == "error":
                raise SandboxProcessError(str(msg.get("message"))[:2000])
            if msg.get("op") != "hello" or msg.get("role") != role or not chan.peer_pid:
                raise SandboxProcessError(f"unexpected first message from {role}: {str(msg)[:200]}")
            p._pin(chan.peer_pid, min_ns_depth)
            if min_ns_depth < 2:
                # No pid namespace to vouch for the pid: make the pinned process prove it holds the channel
                # (a pid reused between hello and pidfd_open would not answer).
                async with asyncio.timeout(timeout):
                    await chan.send({"op": "ping"})
                    pong = await chan.recv()
                if pong.get("op") != "pong":
                    raise SandboxProcessError(f"{role} did not answer ping: {str(pong)[:200]}")
        except TimeoutError:
            p.kill()
            p.close()
            raise SandboxProcessError(f"{role} did not start within {timeout:g} s") from None
        except (ChannelClosed, ProtocolViolation) as e:
            p.kill()
            p.close()
            raise SandboxProcessError(f"{role} failed to start: {e}") from None
        except BaseException:
            p.kill()
            p.close()
            raise
        return p

    def _pin(self, pid: int, min_ns_depth: int) -> None:
        try:
            fd = os.pidfd_open(pid)
        except OSError:
            raise SandboxProcessError(f"{self.role} (pid {pid}) exited while starting") from None
        try:
            ns = _nspids(pid)
        except OSError:
            os.close(fd)
            raise SandboxProcessError(f"{self.role} (pid {pid}) vanished while starting") from None
        if len(ns) < min_ns_depth:  # a pid reused by a host process would sit in our own namespace
            os.close(fd)
            raise SandboxProcessError(f"pid {pid} is not inside the sandbox's pid namespace")
        self.pid, self.inner_pid, self.nspids, self.pidfd = pid, ns[-1], ns, fd
        self.chan.loop.add_reader(fd, self._on_exit)

    def _on_exit(self) -> None:
        try:
            self.chan.loop.remove_reader(self.pidfd)
        except (ValueError, OSError):
            pass
        self.chan.peer_exited()  # keeps what it sent before dying, then reports the channel closed
        if not self.exited.done():
            self.exited.set_result(None)

    @property
    def alive(self) -> bool:
        return self.pidfd is not None and not self.exited.done() and not self.killed

    def kill(self) -> None:
        self.killed = True
        if self.pidfd is not None and not self.exited.done():
            try:
                signal.pidfd_send_signal(self.pidfd, signal.SIGKILL)
            except (ProcessLookupError, OSError):
                pass

    def close(self) -> None:
        self.chan.close()
        if self.pidfd is not None:
            try:
                self.chan.loop.remove_reader(self.pidfd)
            except (ValueError, OSError):
                pass
            os.close(self.pidfd)
            self.pidfd = None
        if not self.exited.done():
            self.exited.set_result(None)

    async def request(self, msg: dict, fds: tuple[int, ...] | list[int] = (), timeout: float = 30.0) -> dict:
        """Send and wait for the next message (or exit / timeout)."""
        async with asyncio.timeout(timeout):
            await self.chan.send(msg, fds)
            return await self.chan.recv()

    async def next(self, timeout: float | None) -> dict:
        """The next message; ChannelClosed once the process is gone, TimeoutError on timeout."""
        if timeout is None:
            return await self.chan.recv()
        async with asyncio.timeout(timeout):
            return await self.chan.recv()
