"""Repository invariants: CI runs the README's test command verbatim; the repo stays small; layering holds."""

import re
import subprocess
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def _shell_blocks(text: str) -> list[str]:
    return [b.strip() for b in re.findall(r"```(?:bash|sh|shell|console)\n(.*?)```", text, re.S)]


def test_ci_runs_readme_test_command_verbatim():
    blocks = _shell_blocks((REPO / "README.md").read_text())
    assert len(blocks) >= 2
    assert blocks[1] in (REPO / ".ci" / "run").read_text()


def test_tracked_files_stay_small():
    out = subprocess.run(["git", "ls-files", "-z"], cwd=REPO, capture_output=True, check=True).stdout
    files = [REPO / f for f in out.decode().split("\0") if f]
    total = sum(f.stat().st_size for f in files if f.exists())
    assert total < 10 * 2**20, f"tracked files are {total / 2**20:.1f} MiB; keep them under 10 MiB"


def test_core_does_not_import_ray():
    offenders = []
    for py in (REPO / "raydistill").rglob("*.py"):
        rel = py.relative_to(REPO / "raydistill").parts
        if rel[0] in ("stages", "actors"):
            continue
        if re.search(r"^\s*(import ray\b|from ray\b)", py.read_text(), re.M):
            offenders.append(str(py.relative_to(REPO)))
    assert not offenders, f"core modules must not import ray: {offenders}"


def test_project_does_not_read_shared_at_runtime():
    hits = subprocess.run(["grep", "-rIl", r"\.\./shared", "raydistill", "workflows", "configs", "pyproject.toml"],
                          cwd=REPO, capture_output=True, text=True).stdout.strip()
    assert not hits, hits
