"""A small pool of killable worker subprocesses: a time limit per call that works off the main thread.

Why not `signal.alarm` (math-verify's default): signals only reach the main thread, and graders run in
Ray workers, Serve replicas and thread pools. Why not `concurrent.futures.ProcessPoolExecutor`: it cannot
kill the one worker that is stuck in C code (sympy bignum arithmetic) without breaking the whole pool.
Why plain subprocesses instead of `multiprocessing`: no re-import of the caller's `__main__` (a Ray
worker's or a user's script) and no change to process-global start-method/forkserver settings.

Each worker is `python -c ...` talking to its parent over two private pipes with
`multiprocessing.connection.Connection` framing (pickle). A call that runs past its limit gets its
worker SIGKILLed; the next call that needs a worker starts a fresh one. Startup (imports) is not counted
against the per-call limit. On Linux a worker also dies with its parent (PR_SET_PDEATHSIG), so a Ray
worker killed mid-comparison leaves no process burning CPU on `9^{9^{9^9}}`; since that signal follows
the *thread* that started the child, all workers are started from one long-lived spawner thread.
"""

from __future__ import annotations

import logging
import os
import queue
import subprocess
import sys
import threading
import time
import traceback
from collections.abc import Callable, Sequence
from multiprocessing.connection import Connection
from typing import Any

log = logging.getLogger(__name__)


class CallTimeout(TimeoutError):
    """The call ran past its limit; its worker was killed."""


class WorkerCrashed(RuntimeError):
    """The worker process died during the call (e.g. killed by the OOM killer or a hard crash)."""


class WorkerError(RuntimeError):
    """The function raised inside the worker; the message carries the remote type, text and traceback."""


class _Spawner:
    """One daemon thread that runs every Popen, so PR_SET_PDEATHSIG is tied to a thread that never exits."""

    def __init__(self) -> None:
        self.pid = os.getpid()
        self._q: queue.SimpleQueue = queue.SimpleQueue()
        threading.Thread(target=self._loop, name="grading-worker-spawner", daemon=True).start()

    def _loop(self) -> None:
        while True:
            fn, box, done = self._q.get()
            try:
                box.append((True, fn()))
            except BaseException as e:
                box.append((False, e))
            done.set()

    def run(self, fn: Callable[[], Any]) -> Any:
        box: list = []
        done = threading.Event()
        self._q.put((fn, box, done))
        done.wait()
        ok, value = box[0]
        if not ok:
            raise value
        return value


_spawner: _Spawner | None = None
_spawner_lock = threading.Lock()


def _spawn(fn: Callable[[], Any]) -> Any:
    global _spawner
    with _spawner_lock:
        if _spawner is None or _spawner.pid != os.getpid():
            _spawner = _Spawner()
        spawner = _spawner
    return spawner.run(fn)


class _Worker:
    def __init__(self, preload: Sequence[str], memory_limit_bytes: int | None, startup_timeout: float):
        to_child_r, to_child_w = os.pipe()
        from_child_r, from_child_w = os.pipe()
        code = (
            "import sys; sys.path[:0] = " + repr([p for p in sys.path if isinstance(p, str)]) + "; "
            "from raydistill.grading.worker_pool import _worker_main; "
            f"_worker_main({to_child_r}, {from_child_w}, {list(preload)!r}, {memory_limit_bytes!r}, {os.getpid()})"
        )
        try:
            self.proc = _spawn(lambda: subprocess.Popen(
                [sys.executable, "-c", code],
                stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                pass_fds=(to_child_r, from_child_w), close_fds=True,
                start_new_session=True,  # a Ctrl-C to the parent's process group is the parent's business
            ))
        except BaseException:
            os.close(to_child_w)
            os.close(from_child_r)
            raise
        finally:
            os.close(to_child_r)
            os.close(from_child_w)
        self.send_conn = Connection(to_child_w, readable=False)
        self.recv_conn = Connection(from_child_r, writable=False)
        if not self.recv_conn.poll(startup_timeout):
            self.kill()
            raise WorkerCrashed(f"grading worker did not start within {startup_timeout:.0f}s")
        try:
            hello = self.recv_conn.recv()
        except (EOFError, OSError) as e:
            code_ = self.proc.poll()
            self.kill()
            raise WorkerCrashed(f"grading worker exited during startup (exit code {code_})") from e
        if hello != "ready":
            self.kill()
            raise WorkerCrashed(f"grading worker failed to start: {hello}")

    def kill(self) -> None:
        try:
            self.proc.kill()
        except OSError:
            pass
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:  # pragma: no cover - a SIGKILLed process always goes
            log.error("grading worker pid %s did not exit after SIGKILL", self.proc.pid)
        for conn in (self.send_conn, self.recv_conn):
            try:
                conn.close()
            except (OSError, AttributeError):
                pass

    def stop(self) -> None:
        """Polite shutdown: closing its input pipe makes the worker leave its loop."""
        try:
            self.send_conn.close()
            self.proc.wait(timeout=2)
        except (OSError, subprocess.TimeoutExpired):
            pass
        self.kill()


class WorkerPool:
    """Up to `size` worker processes, started lazily; `call` runs one function in one of them.

    Thread-safe: each call holds one worker exclusively; more concurrent calls than `size` wait.
    """

    def __init__(self, size: int, *, preload: Sequence[str] = (), memory_limit_bytes: int | None = None,
                 startup_timeout: float = 120.0):
        """`preload`: "module" or "module:function" entries each worker imports (and calls) at startup."""
        if size < 1:
            raise ValueError(f"WorkerPool size must be >= 1, got {size}")
        self.size = size
        self.preload = tuple(preload)
        self.memory_limit_bytes = memory_limit_bytes
        self.startup_timeout = startup_timeout
        self.pid = os.getpid()
        self._slots = threading.BoundedSemaphore(size)
        self._lock = threading.Lock()
        self._idle: list[_Worker] = []
        self._closed = False
        self.kills = 0
        """How many workers were killed for running past their limit or crashing (for tests and metrics)."""

    def _take(self) -> _Worker:
        with self._lock:
            if self._closed:
                raise RuntimeError("WorkerPool is closed")
            if self._idle:
                return self._idle.pop()
        return _Worker(self.preload, self.memory_limit_bytes, self.startup_timeout)

    def _give_back(self, w: _Worker) -> None:
        with self._lock:
            if not self._closed:
                self._idle.append(w)
                return
        w.stop()

    def warm(self, n: int | None = None) -> None:
        """Start up to `n` (default `size`) workers now, so the first calls do not pay for imports."""
        n = self.size if n is None else min(n, self.size)
        with self._lock:
            missing = n - len(self._idle)
        started = [_Worker(self.preload, self.memory_limit_bytes, self.startup_timeout)
                   for _ in range(max(0, missing))]
        for w in started:
            self._give_back(w)

    def call(self, fn: Callable[..., Any], *args: Any, timeout: float | None) -> Any:
        """Run `fn(*args)` in a worker. `fn` must be a module-level function (pickled by name).

        Raises CallTimeout (worker killed), WorkerCrashed, or WorkerError (fn raised).
        """
        with self._slots:
            w = self._take()
            healthy = False
            try:
                try:
                    w.send_conn.send((fn, args))
                except (OSError, EOFError) as e:
                    raise WorkerCrashed(f"grading worker pid {w.proc.pid} is gone: {e}") from e
                t0 = time.monotonic()
                if not w.recv_conn.poll(timeout):
                    raise CallTimeout(f"{getattr(fn, '__name__', fn)} ran past {timeout}s "
                                      f"(worker pid {w.proc.pid} killed)")
                try:
                    ok, payload = w.recv_conn.recv()
                except (EOFError, OSError) as e:
                    try:
                        rc = w.proc.wait(timeout=2)
                    except subprocess.TimeoutExpired:
                        rc = None
                    raise WorkerCrashed(f"grading worker pid {w.proc.pid} died after "
                                        f"{time.monotonic() - t0:.1f}s (exit code {rc})") from e
                healthy = True
            finally:
                if healthy:
                    self._give_back(w)
                else:
                    self.kills += 1
                    w.kill()
        if not ok:
            raise WorkerError(payload)
        return payload

    def close(self) -> None:
        with self._lock:
            self._closed = True
            idle, self._idle = self._idle, []
        for w in idle:
            w.stop()

    def __len__(self) -> int:
        with self._lock:
            return len(self._idle)


def _die_with_parent(parent_pid: int) -> None:
    if sys.platform.startswith("linux"):
        import ctypes
        import signal

        try:
            ctypes.CDLL(None, use_errno=True).prctl(1, int(signal.SIGKILL), 0, 0, 0)  # PR_SET_PDEATHSIG
        except (OSError, AttributeError):
            pass
    if os.getppid() != parent_pid:  # the parent died before we got here
        os._exit(0)


def _worker_main(recv_fd: int, send_fd: int, preload: list[str], memory_limit_bytes: int | None,
                 parent_pid: int | None = None) -> None:
    """Entry point of a worker process: import, cap memory, then serve calls until the pipe closes."""
    import importlib
    import signal

    if parent_pid is not None:
        _die_with_parent(parent_pid)
    send = Connection(send_fd, readable=False)
    recv = Connection(recv_fd, writable=False)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        for entry in preload:  # "module" or "module:function" (called with no arguments)
            mod, _, func = entry.partition(":")
            m = importlib.import_module(mod)
            if func:
                getattr(m, func)()
        if memory_limit_bytes:
            import resource

            _, hard = resource.getrlimit(resource.RLIMIT_AS)
            cap = memory_limit_bytes if hard == resource.RLIM_INFINITY else min(memory_limit_bytes, hard)
            resource.setrlimit(resource.RLIMIT_AS, (cap, hard))
    except BaseException as e:  # report why, then exit
        send.send(f"{type(e).__name__}: {e}")
        return
    send.send("ready")
    while True:
        try:
            fn, args = recv.recv()
        except (EOFError, OSError):
            return
        except Exception as e:  # the call could not be unpickled here (e.g. fn not importable)
            fn, args = _raise, (e,)
        try:
            result = (True, fn(*args))
        except MemoryError:
            result = (False, "MemoryError: the worker hit its memory cap")
        except BaseException as e:
            result = (False, f"{type(e).__name__}: {e}\n{traceback.format_exc(limit=8)}")
        try:
            send.send(result)
        except (OSError, EOFError):
            return
        except Exception as e:  # an unpicklable result
            send.send((False, f"result of {getattr(fn, '__name__', fn)} cannot be sent back: {e}"))


def _raise(e: BaseException) -> None:
    raise e
