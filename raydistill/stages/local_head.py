"""A real `ray start --head` on 127.0.0.1 that its caller starts and stops itself (tests, benchmark drivers).

Why not `ray stop` / `AutoscalingCluster`: both end every Ray process on the machine (`ray stop --force`),
including other people's clusters on a shared box. This head runs under `ray start --block` in its own
session with its own temp dir and ports, all listeners on loopback (RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0 and
--node-ip-address 127.0.0.1). `stop()` sends SIGTERM to that one process (it stops what it started), then
ends, by pid, only what belongs to this head and is still alive: its descendants (noted before the SIGTERM,
checked by start time against pid reuse) and processes whose command line or working directory names its
temp dir (raylet, GCS, workers, job drivers, fake autoscaler nodes). Needs Linux /proc.

Token auth (Ray 2.60): `ray start` turns token auth on when it finds a token (RAY_AUTH_TOKEN,
RAY_AUTH_TOKEN_PATH or ~/.ray/auth_token), and `ray job submit` sends it only when RAY_AUTH_MODE=token is in
its own env. So the head's env is explicit either way: a fresh RAY_AUTH_TOKEN with RAY_AUTH_MODE=token, or
RAY_AUTH_MODE=disabled with no token variable; ~/.ray/auth_token is never read or written here. Use
`head.env` for every client (`ray job`, `ray.init` drivers) and `head.api()` for the REST API.
"""

from __future__ import annotations

import json
import os
import re
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Self

from raydistill import procfs

RAY_CLI = [sys.executable, "-m", "ray.scripts.scripts"]  # the venv's Ray, whether or not `ray` is on PATH


def free_port() -> int:
    """A TCP port free on 127.0.0.1 right now (Ray binds it moments later)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def pid_alive(pid: int, start: int) -> bool:
    """Whether `pid` still runs and is the process that started at `start` (not a reused pid, not a zombie)."""
    st = procfs.stat(pid)
    return st is not None and st[1] == start and st[2] not in ("Z", "X")


class LocalRayHead:
    """`ray start --head --block` on loopback with unique ports and its own temp dir; `stop()` ends only its own.

    temp_dir: a new or empty directory for this head (created; left in place at stop); default a fresh
    `mkdtemp` under /tmp, removed at stop (short: Ray's unix sockets live under it, 108-byte limit).
    log_path: the head's stdout+stderr (default `<temp_dir>/head.log`). env: the base environment (default
    os.environ) for the head and `ray_cli`; loopback, usage-stats and auth variables are set over it, the
    venv's bin dir is put first on PATH and RAY_ADDRESS is dropped; extra_env is applied last.
    autoscaling_config: a cluster config dict written into the temp dir with this head's GCS address (for the
    `fake_multinode` provider, which also gets RAY_FAKE_CLUSTER=1). cli_cwd: working directory of `ray_cli`.
    """

    def __init__(self, *, num_cpus: float | None = None, num_gpus: int | None = None, token_auth: bool = True,
                 include_dashboard: bool = True, autoscaling_config: dict | None = None,
                 env: Mapping[str, str] | None = None, extra_env: Mapping[str, str] | None = None,
                 temp_dir: str | Path | None = None, log_path: str | Path | None = None,
                 cli_cwd: str | Path | None = None):
        self.num_cpus, self.num_gpus = num_cpus, num_gpus
        self.include_dashboard = include_dashboard
        self.autoscaling_config = autoscaling_config
        self._given_temp_dir = Path(temp_dir) if temp_dir is not None else None
        self._given_log_path = Path(log_path) if log_path is not None else None
        self.cli_cwd = Path(cli_cwd) if cli_cwd is not None else None
        self.env = dict(os.environ if env is None else env)
        self.env.update({
            "PATH": f"{Path(sys.executable).parent}{os.pathsep}{self.env.get('PATH', '')}",
            "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0",
            "RAY_USAGE_STATS_ENABLED": "0",
        })
        self.env.pop("RAY_ADDRESS", None)
        self.env.pop("RAY_AUTH_TOKEN_PATH", None)
        if token_auth:
            self.env.update({"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": secrets.token_hex(32)})
        else:
            self.env["RAY_AUTH_MODE"] = "disabled"
            self.env.pop("RAY_AUTH_TOKEN", None)
        if autoscaling_config is not None and autoscaling_config.get("provider", {}).get("type") == "fake_multinode":
            self.env.update({"RAY_FAKE_CLUSTER": "1", "AUTOSCALER_UPDATE_INTERVAL_S": "1"})
        self.env.update(extra_env or {})
        self.temp_dir: Path | None = None
        self.log_path: Path | None = None
        self.proc: subprocess.Popen | None = None
        self.port = self.dashboard_port = 0
        self._log = None
        self._own_temp_dir = False

    @property
    def token_auth(self) -> bool:
        return self.env.get("RAY_AUTH_MODE") == "token"

    @property
    def address(self) -> str:
        """GCS address for `ray.init(address=...)` and `ray status --address`."""
        self._require_started()
        return f"127.0.0.1:{self.port}"

    @property
    def dashboard_url(self) -> str:
        """Dashboard / job REST API (`ray job submit --address=...`)."""
        self._require_started()
        if not self.include_dashboard:
            raise RuntimeError("this head was started with include_dashboard=False")
        return f"http://127.0.0.1:{self.dashboard_port}"

    def _require_started(self) -> None:
        if self.proc is None:
            raise RuntimeError("LocalRayHead not started: call start() (or use it as a context manager)")

    def _command(self) -> list[str]:
        cmd = [*RAY_CLI, "start", "--head", "--block", "--node-ip-address=127.0.0.1", f"--port={self.port}",
               f"--temp-dir={self.temp_dir}", f"--ray-client-server-port={free_port()}",
               f"--dashboard-agent-listen-port={free_port()}", f"--dashboard-agent-grpc-port={free_port()}",
               f"--runtime-env-agent-port={free_port()}", f"--metrics-export-port={free_port()}"]
        if self.num_cpus is not None:
            cmd.append(f"--num-cpus={self.num_cpus}")
        if self.num_gpus is not None:
            cmd.append(f"--num-gpus={self.num_gpus}")
        if self.include_dashboard:
            cmd += ["--include-dashboard=true", "--dashboard-host=127.0.0.1", f"--dashboard-port={self.dashboard_port}"]
        else:
            cmd.append("--include-dashboard=false")
        if self.autoscaling_config is not None:
            cfg = json.loads(json.dumps(self.autoscaling_config))
            cfg.setdefault("provider", {})["gcs_address"] = f"127.0.0.1:{self.port}"
            path = self.temp_dir / "autoscaling.json"
            path.write_text(json.dumps(cfg))
            cmd.append(f"--autoscaling-config={path}")
        return cmd

    def start(self, timeout_s: float = 120) -> Self:
        """Start the head and wait until it runs (and its dashboard answers); on failure stop it and raise
        with the log's tail."""
        if self.proc is not None:
            raise RuntimeError("LocalRayHead already started (one start per instance)")
        if self._given_temp_dir is None:
            self.temp_dir = Path(tempfile.mkdtemp(prefix="rdh", dir="/tmp"))
            self._own_temp_dir = True
        else:
            self.temp_dir = self._given_temp_dir.resolve()
            self.temp_dir.mkdir(parents=True, exist_ok=True)
            if any(self.temp_dir.iterdir()):
                raise ValueError(f"temp_dir {self.temp_dir} is not empty: each head needs its own")
        self.log_path = self._given_log_path or self.temp_dir / "head.log"
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        self.port, self.dashboard_port = free_port(), free_port()
        self._log = open(self.log_path, "w")  # noqa: SIM115 (closed in stop())
        try:
            self.proc = subprocess.Popen(self._command(), env=self.env, stdout=self._log, stderr=subprocess.STDOUT,
                                         start_new_session=True, cwd=self.temp_dir)
            self._wait_ready(timeout_s)
        except BaseException:
            self.stop()
            raise
        return self

    def _wait_ready(self, timeout_s: float) -> None:
        deadline = time.monotonic() + timeout_s
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(f"ray start exited with {self.proc.returncode} (log {self.log_path}):\n"
                                   f"{self.log_tail()}")
            if "Ray runtime started" in self.log_path.read_text(errors="replace"):
                break
            if time.monotonic() > deadline:
                raise TimeoutError(f"ray head not up after {timeout_s} s (log {self.log_path}):\n{self.log_tail()}")
            time.sleep(1)
        if not self.include_dashboard:
            return
        while True:
            try:
                self.api("/api/version", timeout=5)
                return
            except OSError:
                pass
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise TimeoutError(f"dashboard {self.dashboard_url} not answering after {timeout_s} s "
                                   f"(ray start rc {self.proc.poll()}, log {self.log_path}):\n{self.log_tail()}")
            time.sleep(1)

    def log_tail(self, n: int = 60) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-n:])
        except (OSError, AttributeError):
            return ""

    def api(self, path: str, timeout: float = 30) -> Any:
        """GET `path` of the dashboard REST API (e.g. /api/jobs/<id>) with this head's token; parsed JSON."""
        req = urllib.request.Request(self.dashboard_url + path)
        if self.token_auth:
            req.add_header("Authorization", f"Bearer {self.env['RAY_AUTH_TOKEN']}")
        with urllib.request.urlopen(req, timeout=timeout) as r:
            return json.loads(r.read())

    def ray_cli(self, *args: str, timeout: float = 120, cwd: str | Path | None = None,
                check: bool = False) -> subprocess.CompletedProcess:
        """`ray <args>` with this head's env (token included); output captured as text."""
        return subprocess.run([*RAY_CLI, *args], env=self.env, cwd=cwd or self.cli_cwd, capture_output=True,
                              text=True, timeout=timeout, check=check)

    def _names_temp_dir(self, pid: int, pattern: re.Pattern) -> bool:
        try:
            args = Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace").split("\0")
            if any(pattern.search(a) for a in args):
                return True
            return bool(pattern.match(os.readlink(f"/proc/{pid}/cwd")))
        except OSError:
            return False

    def pids(self) -> dict[int, int]:
        """This head's live processes, {pid: start time}: `ray start` and its descendants, plus any process
        whose command line or working directory is under its temp dir (this process excluded)."""
        if self.proc is None or self.temp_dir is None:
            return {}
        stats = {}
        for entry in Path("/proc").iterdir():
            if entry.name.isdigit() and int(entry.name) != os.getpid():
                st = procfs.stat(int(entry.name))
                if st is not None and st[2] not in ("Z", "X"):
                    stats[int(entry.name)] = st
        own: set[int] = set()
        if self.proc.returncode is None and self.proc.pid in stats:  # not reaped: the pid is still ours
            own.add(self.proc.pid)
            children: dict[int, list[int]] = {}
            for pid, (ppid, _, _) in stats.items():
                children.setdefault(ppid, []).append(pid)
            stack = [self.proc.pid]
            while stack:
                for child in children.get(stack.pop(), []):
                    if child not in own:
                        own.add(child)
                        stack.append(child)
        pattern = re.compile(re.escape(str(self.temp_dir)) + r"(?:/|$)")
        own.update(pid for pid in stats if pid not in own and self._names_temp_dir(pid, pattern))
        return {pid: stats[pid][1] for pid in own}

    def stop(self, grace_s: float = 20) -> None:
        """SIGTERM the head (60 s to stop what it started), wait up to grace_s for the rest, SIGKILL what is
        left of this head only; close the log, remove an own temp dir. Safe to call twice."""
        if self.proc is not None:
            known = self.pids()  # before the SIGTERM: descendants are still linked to the head
            if self.proc.poll() is None:
                self.proc.send_signal(signal.SIGTERM)
                try:
                    self.proc.wait(timeout=60)
                except subprocess.TimeoutExpired:
                    self.proc.kill()
                    self.proc.wait(timeout=30)

            def left() -> dict[int, int]:
                return {**{p: s for p, s in known.items() if pid_alive(p, s)}, **self.pids()}

            deadline = time.monotonic() + grace_s
            while left() and time.monotonic() < deadline:
                time.sleep(1)
            for pid, start in left().items():
                if pid_alive(pid, start):
                    try:
                        os.kill(pid, signal.SIGKILL)
                    except (ProcessLookupError, PermissionError):
                        pass
            deadline = time.monotonic() + 5  # SIGKILL is asynchronous: return once they are gone
            while left() and time.monotonic() < deadline:
                time.sleep(0.1)
        if self._log is not None:
            self._log.close()
            self._log = None
        if self._own_temp_dir and self.temp_dir is not None:
            shutil.rmtree(self.temp_dir, ignore_errors=True)
            self._own_temp_dir = False

    def __enter__(self) -> Self:
        return self if self.proc is not None else self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
