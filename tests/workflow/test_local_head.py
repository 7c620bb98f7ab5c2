"""LocalRayHead: a real head on 127.0.0.1 that a driver can join, with loopback-only listeners and token auth,
and that `stop()` takes down completely (every process it had, checked by pid and start time)."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from raydistill.stages.local_head import LocalRayHead, pid_alive

DRIVER = textwrap.dedent("""
    import json, os, sys
    import ray

    ray.init(address=sys.argv[1], _node_ip_address="127.0.0.1", log_to_driver=False, configure_logging=False)

    @ray.remote(num_cpus=0.1)
    def where():
        return os.getpid(), ray.get_runtime_context().get_node_id()

    pid, node = ray.get(where.remote(), timeout=60)
    print("RESULT " + json.dumps({"cpus": ray.cluster_resources().get("CPU"), "nodes": len(ray.nodes()),
                                  "worker_pid": pid}), flush=True)
    ray.shutdown()
""")


def _listening_addresses(pids) -> set[str]:
    """Local addresses of the TCP sockets in LISTEN state that these processes hold."""
    inodes = set()
    for pid in pids:
        try:
            for fd in Path(f"/proc/{pid}/fd").iterdir():
                link = fd.readlink().as_posix() if fd.is_symlink() else ""
                if link.startswith("socket:["):
                    inodes.add(link[8:-1])
        except OSError:
            continue
    out = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        for line in Path(table).read_text().splitlines()[1:]:
            f = line.split()
            if f[3] == "0A" and f[9] in inodes:  # 0A: LISTEN
                out.add(f[1].rsplit(":", 1)[0])
    return out


# 127.0.0.1, ::ffff:127.0.0.1 and ::1 as /proc/net prints them
LOOPBACK = {"0100007F", "0000000000000000FFFF00000100007F", "00000000000000000000000001000000"}


def test_head_on_loopback_joins_a_driver_and_stop_leaves_nothing():
    t0 = time.monotonic()
    with LocalRayHead(num_cpus=1, num_gpus=0) as head:
        started_s = time.monotonic() - t0
        assert head.address.startswith("127.0.0.1:") and head.dashboard_url.startswith("http://127.0.0.1:")
        temp_dir = head.temp_dir
        # Token auth is on: the REST API refuses a client without the token and answers one with it.
        with pytest.raises(urllib.error.HTTPError) as denied:
            urllib.request.urlopen(f"{head.dashboard_url}/api/version", timeout=30)
        assert denied.value.code in (401, 403)
        assert "ray_version" in head.api("/api/version")

        proc = subprocess.run([sys.executable, "-c", DRIVER, head.address], env=head.env, capture_output=True,
                              text=True, timeout=120)
        lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
        assert proc.returncode == 0 and lines, f"{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}\n{head.log_tail()}"
        r = json.loads(lines[-1][len("RESULT "):])
        assert r["cpus"] == 1 and r["nodes"] == 1

        pids = head.pids()
        assert head.proc.pid in pids and len(pids) >= 3, pids  # ray start, GCS, raylet, ...
        listening = _listening_addresses(pids)
        assert listening and listening <= LOOPBACK, f"listeners beyond loopback: {listening - LOOPBACK}"
    print(f"head up in {started_s:.1f} s; {len(pids)} processes; stopped in "
          f"{time.monotonic() - t0 - started_s:.1f} s after use")
    left = [pid for pid, start in pids.items() if pid_alive(pid, start)]
    assert not left, f"still alive after stop(): {left}"
    assert not temp_dir.exists()
    head.stop()  # idempotent


def test_bad_start_raises_with_log_tail_and_cleans_up(tmp_path):
    busy = tmp_path / "busy"
    busy.mkdir()
    (busy / "x").write_text("someone else's")
    with pytest.raises(ValueError, match="not empty"):
        LocalRayHead(temp_dir=busy).start()
    assert (busy / "x").exists()

    head = LocalRayHead(num_cpus=-1, include_dashboard=False,  # Ray refuses a negative CPU count
                        temp_dir=tmp_path / "h", log_path=tmp_path / "head.log")
    with pytest.raises((RuntimeError, TimeoutError)) as err:
        head.start(timeout_s=60)
    assert str(tmp_path / "head.log") in str(err.value) and len(str(err.value).splitlines()) > 1
    assert not head.pids() and (tmp_path / "head.log").exists()
