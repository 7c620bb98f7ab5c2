"""Real attack programs against the sandbox, at every isolation level this machine offers (bubblewrap where
installed, and the forced seccomp/Landlock fallback). Each must be contained, leave the host unaffected,
and leave the sandbox usable with its earlier state."""

from __future__ import annotations

import os
import socket
import subprocess
import time

import pytest
from sbhelpers import LEVELS, REAL_IMPORT, alive

from raydistill.procfs import descendants
from raydistill.sandbox import Sandbox

OS = REAL_IMPORT + "os = real_import('os')\n"


@pytest.fixture(params=LEVELS)
def level(request):
    return request.param


def make(level: str, **kw) -> Sandbox:
    kw.setdefault("step_timeout_s", 3)
    kw.setdefault("kill_grace_s", 2)
    sb = Sandbox(isolation=level, **kw)
    assert sb.isolation_level == level
    assert sb.run("canary = 'alive'").ok
    return sb


def still_usable(sb: Sandbox) -> None:
    r = sb.run("canary + '!'")
    assert r.value == "'alive!'", r
    assert sb.run("import numpy\nint(numpy.ones(3).sum())").value == "3"


def host_ok() -> None:
    assert subprocess.run(["true"], timeout=30).returncode == 0  # the host can still fork and exec


def settle(pid: int, at_most: int, timeout: float = 10.0) -> list[int]:
    """Wait until the family under `pid` shrinks to `at_most` processes (sweeps run in the background)."""
    deadline = time.monotonic() + timeout
    while True:
        procs = descendants(pid)
        if len(procs) <= at_most or time.monotonic() > deadline:
            return procs
        time.sleep(0.1)


def test_fallback_is_really_used_when_forced():
    with Sandbox(isolation="seccomp") as sb:
        info = sb.isolation
        assert info["level"] == "seccomp" and not info["namespaces"] and info["seccomp"]


def test_import_escape_via_subclasses_cannot_exec(level):
    with make(level) as sb:
        r = sb.run(OS + "print(os.system('echo pwned > /tmp/pwned_by_sandbox'))\n"
                   "try:\n    os.execv('/bin/sh', ['sh', '-c', 'true'])\nexcept OSError as e:\n    print('exec:', e)")
        assert "exec: [Errno 1]" in r.stdout, r
        assert not os.path.exists("/tmp/pwned_by_sandbox")
        sp = sb.run("sp = real_import('subprocess')\nsp.run(['id'], capture_output=True)")
        assert sp.error is not None and ("PermissionError" in sp.error or "OSError" in sp.error), sp
        still_usable(sb)
    host_ok()


def test_host_files_cannot_be_read(level, tmp_path):
    secret = tmp_path / "secret.txt"
    secret.write_text("TOP-SECRET-CONTENT")
    targets = [str(secret), "/etc/shadow", "/etc/passwd", os.path.abspath("pyproject.toml"),
               os.path.expanduser("~/.bash_history")]
    with make(level) as sb:
        r = sb.run(OS + f"for p in {targets!r}:\n"
                   "    try:\n        print(p, 'READ', open(p).read()[:40])\n"
                   "    except OSError as e:\n        print(p, 'DENIED', type(e).__name__)")
        assert r.ok, r
        assert "READ" not in r.stdout and "TOP-SECRET" not in r.stdout, r.stdout
        assert r.stdout.count("DENIED") == len(targets)
        # what Python needs stays readable (read-only)
        assert sb.run("import sympy\nlen(open(sympy.__file__).read()) > 0").value == "True"
        still_usable(sb)


def test_host_files_cannot_be_written(level, tmp_path):
    targets = [str(tmp_path / "pwned"), os.path.abspath("pwned_by_sandbox"), "/tmp/pwned_by_sandbox_2",
               "/pwned_by_sandbox", "/dev/shm/pwned_by_sandbox"]
    with make(level) as sb:
        r = sb.run(OS + "import numpy\nsite = os.path.dirname(numpy.__file__)\n"
                   f"for p in {targets!r} + [site + '/pwned.py']:\n"
                   "    try:\n        open(p, 'w').write('x')\n        print(p, 'WROTE')\n"
                   "    except OSError as e:\n        print(p, 'DENIED', type(e).__name__)\n"
                   "open('mine.txt', 'w').write('private temp dir works')\nopen('mine.txt').read()")
        # /tmp inside the sandbox is its own private temp dir (namespaces); everything else is refused
        wrote = [line.split()[0] for line in r.stdout.splitlines() if line.endswith("WROTE")]
        assert all(p.startswith("/tmp/") and not p.startswith(str(tmp_path)) for p in wrote), r.stdout
        assert r.value == "'private temp dir works'"
    for p in targets:
        assert not os.path.exists(p), p
    import numpy

    assert not os.path.exists(os.path.join(os.path.dirname(numpy.__file__), "pwned.py"))


def test_no_network_to_a_local_listener(level, tmp_path):
    srv = socket.socket()
    srv.bind(("127.0.0.1", 0))
    srv.listen(8)
    srv.settimeout(0.5)
    port = srv.getsockname()[1]
    upath = str(tmp_path / "host.sock")
    usrv = socket.socket(socket.AF_UNIX)
    usrv.bind(upath)
    usrv.listen(1)
    usrv.settimeout(0.5)
    try:
        with make(level) as sb:
            r = sb.run(REAL_IMPORT + "socket = real_import('socket')\n"
                       f"for fam, addr in [(socket.AF_INET, ('127.0.0.1', {port})), (socket.AF_UNIX, {upath!r})]:\n"
                       "    try:\n        s = socket.socket(fam)\n        s.settimeout(2)\n        s.connect(addr)\n"
                       "        s.sendall(b'exfiltrated')\n        print('CONNECTED', addr)\n"
                       "    except OSError as e:\n        print('blocked', type(e).__name__)")
            assert "CONNECTED" not in r.stdout and r.stdout.count("blocked") == 2, r
            ctypes_try = sb.run(REAL_IMPORT + "ctypes = real_import('ctypes')\n"
                                "libc = ctypes.CDLL(None)\nlibc.socket(2, 1, 0)")  # raw syscall, no Python layer
            assert ctypes_try.value == "-1", ctypes_try
            still_usable(sb)
        for s in (srv, usrv):
            with pytest.raises(OSError):  # nobody ever connected
                s.accept()
    finally:
        srv.close()
        usrv.close()


def test_host_secrets_are_not_in_the_environment(level):
    os.environ["RAYDISTILL_FAKE_API_KEY"] = "sk-test-very-secret-123"
    try:
        # a zygote config no other test uses, so this zygote starts while the secret is set
        with make(level, zygote_tmp_mb=17) as sb:
            r = sb.run(OS + "print(sorted(os.environ))\nvals = ' '.join(os.environ.values())\n"
                       "for p in ['/proc/self/environ', '/proc/1/environ']:\n"
                       "    try:\n        vals += open(p).read()\n    except OSError:\n        pass\n"
                       "'sk-test' in vals")
            assert r.value == "False", r
            assert "RAYDISTILL_FAKE_API_KEY" not in r.stdout and "RAY_" not in r.stdout
    finally:
        del os.environ["RAYDISTILL_FAKE_API_KEY"]


def test_fork_bomb_is_contained(level):
    with make(level, max_processes=16, step_timeout_s=4) as sb:
        warden = sb.isolation["warden_pid"]
        r = sb.run(OS + "while True:\n    try:\n        os.fork()\n    except OSError:\n        pass")
        assert r.error_type == "timeout", r
        host_ok()
        assert len(settle(warden, 3)) <= 3  # strays swept: only the interpreter and its snapshot remain
        still_usable(sb)
        # a bomb that finishes its step leaves sleepers behind; they cannot exceed the family budget
        r = sb.run(OS + "import time\nn = 0\nwhile True:\n    try:\n        pid = os.fork()\n"
                   "    except OSError:\n        break\n    if pid == 0:\n        time.sleep(60)\n        os._exit(0)\n"
                   "    n += 1\nn")
        assert r.ok and 0 < int(r.value) < 16, r
        assert len(descendants(warden)) <= 16 + 2
        still_usable(sb)  # the snapshot fork needs budget: strays are swept to make room
    deadline = time.monotonic() + 10
    while alive(warden) and time.monotonic() < deadline:  # SIGKILL is asynchronous
        time.sleep(0.05)
    assert not alive(warden)
    assert settle(warden, 0) == []


def test_memory_bomb_is_contained(level):
    with make(level, memory_mb=512) as sb:
        r = sb.run("x = bytearray(8 * 1024**3)")
        assert r.error_type == "MemoryError" and "512 MiB" in r.error, r
        r = sb.run("hog = []\nwhile True:\n    hog.append(bytearray(50 * 1024**2))")
        assert r.error_type == "MemoryError", r
        assert sb.run("n = len(hog)\ndel hog\nn").value.isdigit()  # state survived the MemoryError
        still_usable(sb)
    host_ok()


def test_disk_flood_is_capped(level):
    with make(level, tmp_size_mb=32, max_file_mb=8, step_timeout_s=10) as sb:
        r = sb.run("f = open('big', 'wb')\nwhile True:\n    f.write(b'x' * 2**20)")
        assert r.error_type == "OSError" and "File too large" in r.error, r
        r = sb.run("i = 0\nwhile True:\n    with open(f'f{i}', 'wb') as f:\n        f.write(b'y' * 4 * 2**20)\n"
                   "    i += 1")
        # tmpfs says ENOSPC (namespaces); the fallback's quota watcher stops the step and wipes the files
        assert r.error_type in ("OSError", "disk"), r
        assert ("No space left" in r.error) if r.error_type == "OSError" else r.restored
        still_usable(sb)


def test_print_flood_is_capped(level):
    with make(level, step_timeout_s=2, max_output_chars=10_000) as sb:
        r = sb.run("while True:\n    print('A' * 100_000)")
        assert r.error_type == "timeout" and r.stdout_truncated
        assert len(r.stdout) < 11_000, len(r.stdout)
        still_usable(sb)


def test_code_runs_niced_and_cannot_raise_its_priority(level):
    """A CPU-burning program must not take cores from the engine and host loops: every interpreter (and
    its snapshot) runs at the host's niceness + 10 and cannot lower it again."""
    base = os.getpriority(os.PRIO_PROCESS, 0)
    want = min(base + 10, 19)

    def nices(pids: list[int]) -> set[int]:
        out = set()
        for p in pids:
            try:
                out.add(os.getpriority(os.PRIO_PROCESS, p))
            except ProcessLookupError:  # an old snapshot reaped while we looked
                pass
        return out

    with make(level) as sb:
        assert sb.run("x = 1").ok
        warden = sb.isolation["warden_pid"]
        procs = [warden, *descendants(warden)]  # the interpreter, its snapshot (once registered), strays
        assert len(procs) >= 2 and nices(procs) == {want}, procs
        r = sb.run(OS + "out = []\nfor f in (lambda: os.nice(-5), lambda: os.setpriority(os.PRIO_PROCESS, 0, 0)):\n"
                   "    try:\n        f()\n        out.append('raised')\n"
                   "    except OSError as e:\n        out.append(type(e).__name__)\n"
                   "(out, os.getpriority(os.PRIO_PROCESS, 0))")
        assert "raised" not in r.value and r.value.endswith(f", {want})"), r
        assert os.getpriority(os.PRIO_PROCESS, sb.isolation["pid"]) == want
        still_usable(sb)
    with make(level, nice=0) as sb:  # the setting is honoured (0: the host's own priority)
        assert nices([sb.isolation["pid"]]) == {base}


def test_interpreters_keep_off_the_cpus_pinned_for_an_engine(level, monkeypatch):
    """In-actor sandboxes start from the teacher process, which a pinned vLLM engine confined to one CPU:
    their interpreters must use the other CPUs, not inherit that one (engines/cpu_pinning)."""
    n = os.cpu_count()
    if n < 2:
        pytest.skip("needs 2 CPUs")
    monkeypatch.setenv("RAYDISTILL_ENGINE_CPUS", str(n - 1))
    with make(level) as sb:
        r = sb.run(OS + "sorted(os.sched_getaffinity(0))")
        assert r.value == str(list(range(n - 1))), r
        assert os.sched_getaffinity(sb.isolation["pid"]) == set(range(n - 1))


def test_signal_tricks_and_killing_the_parent(level):
    with make(level) as sb:
        info = sb.isolation
        r = sb.run(OS + "out = []\n"
                   "for target in [os.getppid(), -1, 1]:\n"
                   "    try:\n        os.kill(target, 9)\n        out.append('sent')\n"
                   "    except OSError as e:\n        out.append(type(e).__name__)\nout")
        assert "sent" not in r.value, r
        assert alive(info["warden_pid"]) and alive(info["zygote_pid"])
        still_usable(sb)
        r = sb.run(OS + "signal = real_import('signal')\nfor s in (signal.SIGALRM, signal.SIGXCPU, signal.SIGTERM):\n"
                   "    signal.signal(s, signal.SIG_IGN)\nwhile True:\n    pass")
        assert r.error_type == "timeout" and r.restored, r
        r = sb.run(OS + "signal = real_import('signal')\nos.killpg(0, signal.SIGSTOP)")  # stop itself
        assert r.error_type == "timeout" and r.restored, r
        r = sb.run(OS + "os.killpg(0, 9)")  # its own process group: itself (and nothing else)
        assert r.error_type == "crash" and r.restored, r
        assert alive(info["warden_pid"])
        still_usable(sb)
    host_ok()


def test_ptrace_and_namespaces_are_denied(level):
    with make(level) as sb:
        r = sb.run(REAL_IMPORT + "ctypes = real_import('ctypes')\nos = real_import('os')\nlibc = ctypes.CDLL(None)\n"
                   "[libc.ptrace(16, os.getppid(), 0, 0), libc.unshare(0x10000000), libc.unshare(0x40000000),"
                   " libc.mount(b'none', b'/tmp', b'tmpfs', 0, None)]")
        assert r.value == "[-1, -1, -1, -1]", r
        still_usable(sb)


def test_channel_tampering_is_detected(level):
    with make(level) as sb:
        code = OS + ("import stat\n"
                     "for fd in range(3, 64):\n    try:\n        if stat.S_ISSOCK(os.fstat(fd).st_mode):\n"
                     "            os.write(fd, b'\\x7f\\xff\\xff\\xff' + b'garbage' * 100)\n"
                     "    except OSError:\n        pass\n")
        r = sb.run(code)
        assert r.error_type == "protocol" and r.restored, r
        # a forked child that writes a forged result is ignored: the real result arrives
        forged = OS + ("import stat, time\njson, struct = real_import('json'), real_import('struct')\n"
                       "def is_sock(fd):\n    try:\n        return stat.S_ISSOCK(os.fstat(fd).st_mode)\n"
                       "    except OSError:\n        return False\n"
                       "sock = [fd for fd in range(3, 64) if is_sock(fd)][0]\n"
                       "if os.fork() == 0:\n"
                       "    body = json.dumps({'op': 'result', 'stdout': 'FORGED', 'is_final': True,"
                       " 'final_answer': 'forged'}).encode()\n"
                       "    os.write(sock, struct.pack('>I', len(body)) + body)\n    os._exit(0)\n"
                       "time.sleep(0.5)\nprint('genuine')")
        r = sb.run(forged)
        assert r.ok and r.stdout == "genuine\n" and not r.is_final, r
        still_usable(sb)
