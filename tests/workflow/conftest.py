"""A real `ray start --head` on 127.0.0.1 that the tests start and stop themselves.

Why not `ray stop` / `AutoscalingCluster`: both kill every Ray process on the machine (`ray stop --force`),
including other people's clusters on a shared box. This head runs under `ray start --block` in its own
session with its own temp dir and ports; teardown sends SIGTERM to that one process (it stops what it
started) and then ends, by pid, any process left whose command line names this head's temp dir.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
VENV_BIN = Path(sys.executable).parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class RayHead:
    """`ray start --head --block` on loopback with unique ports and temp dir; `stop()` ends only its processes."""

    def __init__(self, num_cpus: float = 2, token_auth: bool = True, autoscaling_config: dict | None = None,
                 include_dashboard: bool = True, extra_env: dict[str, str] | None = None):
        # Short path: Ray's unix sockets live under it (108-byte limit).
        self.temp_dir = Path(tempfile.mkdtemp(prefix="rdh", dir="/tmp"))
        self.port = free_port()
        self.dashboard_port = free_port()
        self.env = dict(os.environ)
        self.env.update({
            "PATH": f"{VENV_BIN}{os.pathsep}{os.environ.get('PATH', '')}",
            "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0",
            "RAY_USAGE_STATS_ENABLED": "0",
            "HF_HUB_OFFLINE": "1",
            "TRANSFORMERS_OFFLINE": "1",
            "TOKENIZERS_PARALLELISM": "false",
        })
        self.env.pop("RAY_ADDRESS", None)
        # Ray 2.60: `ray start` turns token auth on when it finds a token (RAY_AUTH_TOKEN, RAY_AUTH_TOKEN_PATH or
        # ~/.ray/auth_token); `ray job submit` sends it only when RAY_AUTH_MODE=token is set in its own env.
        # Be explicit either way, and never touch ~/.ray/auth_token.
        if token_auth:
            self.env.update({"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": secrets.token_hex(32)})
        else:
            self.env["RAY_AUTH_MODE"] = "disabled"
            self.env.pop("RAY_AUTH_TOKEN", None)
        self.env.update(extra_env or {})
        cmd = [str(VENV_BIN / "ray"), "start", "--head", "--block", "--node-ip-address=127.0.0.1",
               f"--port={self.port}", f"--num-cpus={num_cpus}", f"--temp-dir={self.temp_dir}",
               f"--ray-client-server-port={free_port()}", f"--dashboard-agent-listen-port={free_port()}",
               f"--dashboard-agent-grpc-port={free_port()}", f"--runtime-env-agent-port={free_port()}",
               f"--metrics-export-port={free_port()}"]
        if include_dashboard:
            cmd += ["--include-dashboard=true", "--dashboard-host=127.0.0.1", f"--dashboard-port={self.dashboard_port}"]
        else:
            cmd += ["--include-dashboard=false"]
        if autoscaling_config is not None:
            cfg = json.loads(json.dumps(autoscaling_config))
            cfg.setdefault("provider", {})["gcs_address"] = f"127.0.0.1:{self.port}"
            path = self.temp_dir / "autoscaling.json"
            path.write_text(json.dumps(cfg))
            cmd.append(f"--autoscaling-config={path}")
            self.env.update({"RAY_FAKE_CLUSTER": "1", "AUTOSCALER_UPDATE_INTERVAL_S": "1"})
        self.log_path = self.temp_dir / "head.log"
        self._log = open(self.log_path, "w")  # noqa: SIM115 (closed in stop())
        self.proc = subprocess.Popen(cmd, env=self.env, stdout=self._log, stderr=subprocess.STDOUT,
                                     start_new_session=True, cwd=self.temp_dir)
        self.address = f"127.0.0.1:{self.port}"
        self.dashboard_url = f"http://127.0.0.1:{self.dashboard_port}"

    def log_tail(self, n: int = 60) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-n:])
        except OSError:
            return ""

    def wait_ready(self, timeout: float = 120) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"ray start exited with {self.proc.returncode}:\n{self.log_tail()}")
            if "Ray runtime started" in self.log_path.read_text(errors="replace"):
                break
            time.sleep(1)
        else:
            raise TimeoutError(f"ray head not up after {timeout} s:\n{self.log_tail()}")
        if "--include-dashboard=true" not in self.proc.args:
            return
        req = urllib.request.Request(f"{self.dashboard_url}/api/version")
        if self.env.get("RAY_AUTH_MODE") == "token":
            req.add_header("Authorization", f"Bearer {self.env['RAY_AUTH_TOKEN']}")
        while time.monotonic() < deadline:
            try:
                with urllib.request.urlopen(req, timeout=5) as r:
                    if r.status == 200:
                        return
            except OSError:
                pass
            time.sleep(1)
        raise TimeoutError(f"dashboard {self.dashboard_url} not answering:\n{self.log_tail()}")

    def ray_cli(self, *args: str, timeout: float = 120, cwd: Path | None = None) -> subprocess.CompletedProcess:
        return subprocess.run([str(VENV_BIN / "ray"), *args], env=self.env, cwd=cwd or REPO,
                              capture_output=True, text=True, timeout=timeout)

    def _own_pids(self) -> list[int]:
        """Processes whose command line names this head's temp dir (raylet, gcs, workers, fake nodes)."""
        needle = str(self.temp_dir)
        pids = []
        for entry in Path("/proc").iterdir():
            if not entry.name.isdigit() or int(entry.name) == os.getpid():
                continue
            try:
                cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            except OSError:
                continue
            if needle in cmdline:
                pids.append(int(entry.name))
        return pids

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=30)
        deadline = time.monotonic() + 20
        while self._own_pids() and time.monotonic() < deadline:
            time.sleep(1)
        for pid in self._own_pids():
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        self._log.close()
        shutil.rmtree(self.temp_dir, ignore_errors=True)


@pytest.fixture
def ray_head_factory():
    """Start heads with `ray_head_factory(**kwargs)`; all of them are stopped at teardown."""
    heads: list[RayHead] = []

    def make(**kwargs) -> RayHead:
        head = RayHead(**kwargs)
        heads.append(head)
        try:
            head.wait_ready()
        except BaseException:
            print(head.log_tail(), file=sys.stderr)
            raise
        return head

    yield make
    for head in heads:
        head.stop()
