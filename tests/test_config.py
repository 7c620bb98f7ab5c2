from pathlib import Path

import pytest

from raydistill.config import ConfigError, load_config, split_overrides

REPO = Path(__file__).resolve().parents[1]


def test_overrides_vs_positionals():
    ov, pos = split_overrides(["agent.max_steps=3", "What is 2+2?", "x=1", "--json", "a b=c", "1x=2"])
    assert ov == ["agent.max_steps=3", "x=1"]
    assert pos == ["What is 2+2?", "--json", "a b=c", "1x=2"]


def test_override_types_and_nesting():
    cfg = load_config(None, ["agent.sag.n=4", "agent.sag.enabled=true", "run_dir=/tmp/x", "train.lora.r=8",
                             "agent.stop=[a, b]"])
    assert cfg.agent.sag.n == 4 and cfg.agent.sag.enabled is True
    assert cfg.run_dir == "/tmp/x" and cfg.train.lora.r == 8
    assert cfg.agent.stop == ["a", "b"]


@pytest.mark.parametrize(
    "override, expected",
    [
        ("agent.sagg.n=3", ["agent.sagg", "unknown key", "allowed keys:", "sag"]),
        ("teacher.backend=foo", ["teacher.backend", "'vllm'", "'foo'"]),
        ("train.lora.r=abc", ["train.lora.r", "integer"]),
        ("agent.sag.n=0", ["agent.sag.n", "greater than or equal to 1"]),
        ("nosuchsection.x=1", ["nosuchsection", "unknown key", "run_dir"]),
    ],
)
def test_errors_name_key_and_allowed_values(override, expected):
    with pytest.raises(ConfigError) as ei:
        load_config(None, [override])
    for piece in expected:
        assert piece in str(ei.value)


def test_yaml_errors(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "missing.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("agent: [1, 2")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(bad)
    scalar = tmp_path / "scalar.yaml"
    scalar.write_text("42")
    with pytest.raises(ConfigError, match="mapping"):
        load_config(scalar)


ROOT_CONFIGS = [p for p in sorted((REPO / "configs").rglob("*.yaml")) if "applications:" not in p.read_text()]


def test_local_and_paper_configs_exist():
    names = {p.relative_to(REPO / "configs").as_posix() for p in ROOT_CONFIGS}
    assert "local.yaml" in names
    assert {f"paper/qwen2.5-{s}b.yaml" for s in ("0.5", "1.5", "3", "7")} <= names


@pytest.mark.parametrize("path", ROOT_CONFIGS, ids=lambda p: p.name)
def test_shipped_configs_validate(path):
    cfg = load_config(path)
    assert cfg.run_dir
