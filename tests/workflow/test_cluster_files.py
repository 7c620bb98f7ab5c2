"""cluster/ and docker/ are only ever used on machines we don't have, so check here what can be checked:
launcher YAMLs against the schema inside the installed ray package, KubeRay manifests for the fields the
CRDs require, entrypoints and Serve import paths against the real code and configs, Dockerfiles against the
repo and pyproject pins, and the job's working-dir upload against what must stay out of it.
"""

from __future__ import annotations

import copy
import importlib
import json
import re
import shlex
import tempfile
import tomllib
import zipfile
from pathlib import Path

import jsonschema
import pytest
import ray
import yaml
from ray.autoscaler._private.util import prepare_config, validate_config

from raydistill.config import load_config

REPO = Path(__file__).resolve().parents[2]
CLUSTER = REPO / "cluster"
DOCKER = REPO / "docker"
IMAGE_ROOT = "/opt/raydistill"  # WORKDIR of both images: repo files are copied there
LAUNCHERS = sorted(CLUSTER.glob("*.yaml"))
LAUNCHERS = [p for p in LAUNCHERS if p.name != "runtime_env.yaml"]
KUBERAY = sorted((CLUSTER / "kuberay").glob("*.yaml"))
NVLS_ENV = {"NCCL_NVLS_ENABLE": "0", "TORCH_SYMM_MEM_DISABLE_MULTICAST": "1", "NVSHMEM_DISABLE_NVLS": "1"}
PYPROJECT = tomllib.loads((REPO / "pyproject.toml").read_text())
VERSION = PYPROJECT["project"]["version"]
IMAGE_RE = re.compile(r"^[\w.\-/:]+/raydistill-(gpu|cpu):([\w.\-]+)$")


def _schema() -> dict:
    return json.loads((Path(ray.autoscaler.__file__).parent / "ray-schema.json").read_text())


def _load(path: Path) -> dict:
    return yaml.safe_load(path.read_text())


def _check_image(image: str) -> None:
    m = IMAGE_RE.match(image)
    assert m, f"image {image!r} is not <registry>/raydistill-(gpu|cpu):<tag>"
    assert (DOCKER / f"Dockerfile.{m.group(1)}").is_file(), f"{image}: docker/Dockerfile.{m.group(1)} missing"
    assert m.group(2) == VERSION, f"{image}: tag should be the project version {VERSION}"


def _repo_path(image_path: str) -> Path:
    assert image_path.startswith(IMAGE_ROOT + "/"), image_path
    return REPO / image_path[len(IMAGE_ROOT) + 1:]


# ------------------------------------------------------------------------------------ launcher YAMLs


def test_there_are_aws_and_gcp_launchers():
    providers = {_load(p)["provider"]["type"] for p in LAUNCHERS}
    assert {"aws", "gcp"} <= providers, providers


@pytest.mark.parametrize("path", LAUNCHERS, ids=lambda p: p.name)
def test_launcher_validates_against_ray_schema(path):
    cfg = _load(path)
    jsonschema.validate(cfg, _schema())
    # Ray's own checks (head type present, min<=max, ...) before and after it fills in provider defaults.
    validate_config(cfg)
    validate_config(prepare_config(copy.deepcopy(cfg)))


def test_schema_validation_is_live():
    """The check above would catch a typo: an unknown node-type key is rejected."""
    cfg = _load(CLUSTER / "aws.yaml")
    cfg["available_node_types"]["gpu-8xh100"]["min_worker"] = 0
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(cfg, _schema())


@pytest.mark.parametrize("path", LAUNCHERS, ids=lambda p: p.name)
def test_launcher_shape(path):
    cfg = _load(path)
    types = cfg["available_node_types"]
    head = types[cfg["head_node_type"]]
    assert head["resources"].get("CPU") == 0, "the head runs drivers and the autoscaler, not tasks"
    workers = {k: v for k, v in types.items() if k != cfg["head_node_type"]}
    gpus = {k: v["resources"].get("GPU", 0) for k, v in workers.items()}
    assert any(g == 8 for g in gpus.values()), f"no 8-GPU group for the 32B teacher: {gpus}"
    assert any(0 < g < 8 for g in gpus.values()), f"no smaller GPU group for training/serving: {gpus}"
    assert any(g == 0 and workers[k]["resources"].get("CPU", 0) > 0 for k, g in gpus.items()), "no CPU group"
    for name, node in workers.items():
        assert node.get("min_workers", 0) == 0, f"{name}: should scale from zero"
        assert node.get("max_workers", 0) >= 1, name
    assert cfg["idle_timeout_minutes"] > 0
    assert cfg["max_workers"] >= max(n["max_workers"] for n in workers.values())
    # Spot on at least the training/serving/sandbox groups.
    if cfg["provider"]["type"] == "aws":
        spot = [k for k, v in workers.items()
                if v["node_config"].get("InstanceMarketOptions", {}).get("MarketType") == "spot"]
    else:
        spot = [k for k, v in workers.items()
                if v["node_config"].get("scheduling", {}).get("provisioningModel") == "SPOT"]
        for k, v in workers.items():
            if v["resources"].get("GPU"):
                assert v["node_config"]["scheduling"]["onHostMaintenance"] == "TERMINATE", k
    assert len(spot) >= 2, f"spot groups: {spot}"


@pytest.mark.parametrize("path", LAUNCHERS, ids=lambda p: p.name)
def test_launcher_images_env_and_token(path):
    cfg = _load(path)
    docker = cfg["docker"]
    images = [docker["image"], docker["head_image"]] + [
        n["docker"]["worker_image"] for n in cfg["available_node_types"].values() if "worker_image" in n.get("docker", {})]
    for image in images:
        _check_image(image)
    assert "-cpu:" in docker["head_image"]
    opts = " ".join(docker["run_options"])
    for k, v in NVLS_ENV.items():
        assert f"--env {k}={v}" in opts, k
    assert "--env RAY_AUTH_MODE=token" in opts
    token_path = re.search(r"RAY_AUTH_TOKEN_PATH=(\S+)", opts).group(1)
    assert token_path in cfg["file_mounts"], "the token file the nodes read must be synced to them"
    assert any("--autoscaling-config" in c for c in cfg["head_start_ray_commands"])


# ---------------------------------------------------------------------------------------------- KubeRay


def _kuberay_docs() -> list[dict]:
    docs = []
    for p in KUBERAY:
        docs += [d for d in yaml.safe_load_all(p.read_text()) if d]
    return docs


def _containers(pod_template: dict) -> list[dict]:
    containers = pod_template["spec"]["containers"]
    assert containers, "pod template without containers"
    return containers


def _check_cluster_spec(spec: dict, pvcs: set[str]) -> None:
    assert spec["rayVersion"] == ray.__version__
    assert spec.get("enableInTreeAutoscaling") is True
    assert spec.get("authOptions", {}).get("mode") == "token"
    head = spec["headGroupSpec"]
    groups = spec["workerGroupSpecs"]
    templates = [head["template"]] + [g["template"] for g in groups]
    for params in [head.get("rayStartParams", {})] + [g.get("rayStartParams", {}) for g in groups]:
        assert isinstance(params, dict)
        # The CRD types rayStartParams as map[string]string: a YAML int would be rejected by the API server.
        assert all(isinstance(v, str) for v in params.values()), params
    names = [g["groupName"] for g in groups]
    assert len(set(names)) == len(names) and all(names), names
    for g in groups:
        for key in ("replicas", "minReplicas", "maxReplicas"):
            assert isinstance(g[key], int), (g["groupName"], key)
        assert 0 <= g["minReplicas"] <= g["replicas"] <= g["maxReplicas"], g["groupName"]
    for t in templates:
        for c in _containers(t):
            _check_image(c["image"])
            env = {e["name"]: e.get("value") for e in c.get("env", [])}
            assert {k: env.get(k) for k in NVLS_ENV} == NVLS_ENV, c["name"]
            limits = c.get("resources", {}).get("limits", {})
            if "nvidia.com/gpu" in limits:
                assert "-gpu:" in c["image"], "GPU pods need the GPU image"
        for vol in t["spec"].get("volumes", []):
            if "persistentVolumeClaim" in vol:
                assert vol["persistentVolumeClaim"]["claimName"] in pvcs


def test_kuberay_manifests():
    docs = _kuberay_docs()
    kinds = {d["kind"] for d in docs}
    assert {"RayJob", "RayService"} <= kinds, kinds
    pvcs = {d["metadata"]["name"] for d in docs if d["kind"] == "PersistentVolumeClaim"}
    for d in docs:
        assert d.get("apiVersion") and d.get("metadata", {}).get("name"), d.get("kind")
        if d["kind"] == "RayJob":
            assert d["apiVersion"] == "ray.io/v1"
            spec = d["spec"]
            assert isinstance(spec["entrypoint"], str) and spec["entrypoint"].strip()
            assert spec.get("shutdownAfterJobFinishes") is True
            _check_cluster_spec(spec["rayClusterSpec"], pvcs)
        elif d["kind"] == "RayService":
            assert d["apiVersion"] == "ray.io/v1"
            assert isinstance(d["spec"]["serveConfigV2"], str)
            _check_cluster_spec(d["spec"]["rayClusterConfig"], pvcs)


def test_rayjob_entrypoint_runs_the_distill_workflow_with_a_valid_config():
    job = next(d for d in _kuberay_docs() if d["kind"] == "RayJob")
    argv = shlex.split(job["spec"]["entrypoint"])
    assert argv[0] == "python" and argv[1].endswith("workflows/distill.py")
    assert _repo_path(argv[1]).is_file()
    config = _repo_path(argv[argv.index("--config") + 1])
    overrides = [a for a in argv[2:] if re.match(r"^[A-Za-z_][\w.]*=", a)]
    cfg = load_config(config, overrides)  # raises (naming the key) if the job's config would not load
    assert cfg.run_dir.startswith("/mnt/cluster_storage/"), "run_dir must be on the shared volume"


def test_rayservice_serve_config_names_a_real_app_builder():
    svc = next(d for d in _kuberay_docs() if d["kind"] == "RayService")
    serve_cfg = yaml.safe_load(svc["spec"]["serveConfigV2"])
    apps = serve_cfg["applications"]
    assert apps
    for app in apps:
        module_name, _, attr = app["import_path"].partition(":")
        assert attr, app["import_path"]
        try:
            module = importlib.import_module(module_name)
        except ModuleNotFoundError as e:
            if e.name == module_name:
                pytest.skip(f"{module_name} not written yet (serve stage)")
            raise
        assert callable(getattr(module, attr, None)), app["import_path"]
        args = app.get("args", {})
        if "config" in args:
            # The builder's args load as a config: the file exists and every override names a real key.
            cfg = load_config(_repo_path(args["config"]), list(args.get("overrides", [])))
            assert cfg.serve.host == "0.0.0.0", "the Serve proxy must listen beyond loopback in a pod"
            assert cfg.serve.engine_max_replicas > cfg.serve.engine_min_replicas, "engine replicas should autoscale"


# ---------------------------------------------------------------------------------------------- Docker


def _dockerfile_lines(path: Path) -> list[str]:
    """Instructions with line continuations joined and comments dropped."""
    text = re.sub(r"\\\n", " ", path.read_text())
    return [ln.strip() for ln in text.splitlines() if ln.strip() and not ln.strip().startswith("#")]


@pytest.mark.parametrize("kind", ["gpu", "cpu"])
def test_dockerfile_copies_existing_files_and_pins_versions(kind):
    path = DOCKER / f"Dockerfile.{kind}"
    lines = _dockerfile_lines(path)
    text = "\n".join(lines)
    assert lines[0].startswith(("FROM", "ARG")), lines[0]
    ignore = (DOCKER / f"Dockerfile.{kind}.dockerignore").read_text().splitlines()
    copies = [ln.split()[1:-1] for ln in lines if ln.startswith("COPY") and "--from" not in ln]
    assert copies
    for sources in copies:
        for src in sources:
            assert (REPO / src).exists(), f"{path.name}: COPY {src} does not exist in the repo"
            assert f"!{src}" in ignore or f"!{src}/" in ignore, f"{src} is excluded by the .dockerignore"
    ray_pin = next(r for r in PYPROJECT["project"]["optional-dependencies"]["ray"] if r.startswith("ray["))
    assert f"=={ray_pin.split('==')[1]}" in re.search(r'"ray\[[^"]*\]==[\d.]+"', text).group(0)
    assert "bubblewrap" in text, "the sandbox needs bwrap"
    for k, v in NVLS_ENV.items():
        assert re.search(rf"\b{k}={v}\b", text), k
    assert "torch==2.11.0" in text, "torch pinned to what vLLM 0.26.0 requires, on both images"
    if kind == "gpu":
        for req in PYPROJECT["project"]["optional-dependencies"]["gpu"]:
            if req.startswith(("vllm", "deepspeed")):
                assert f'"{req}"' in text, f"Dockerfile.gpu should pin {req} like pyproject"
        assert "ubuntu24.04" in text  # python3 3.12
    else:
        assert "python:3.12" in text  # same Python minor version as the GPU image


# ---------------------------------------------------------------------------------- job working dir


def test_job_working_dir_upload_is_small_and_excludes_local_state():
    from ray._private.runtime_env.packaging import _zip_files
    from ray.runtime_env import RuntimeEnv

    env = yaml.safe_load((CLUSTER / "runtime_env.yaml").read_text())
    RuntimeEnv(**env)  # a valid runtime env
    assert env["env_vars"] == NVLS_ENV, "the job's workers must get NVLink multicast off"
    # The driver leaves the job's variables to the job: merged like Ray does for a submitted job, no conflict.
    from ray.runtime_env.runtime_env import _merge_runtime_env

    from raydistill.stages.ray_init import worker_env

    job_config = json.dumps({"runtime_env": env})
    ours = worker_env({"RAY_JOB_CONFIG_JSON_ENV_VAR": job_config, "NCCL_NVLS_ENABLE": "0"})
    assert not set(ours) & set(NVLS_ENV) and ours["TOKENIZERS_PARALLELISM"] == "false"
    merged = _merge_runtime_env(RuntimeEnv(**env), RuntimeEnv(env_vars=ours), override=False)
    assert merged is not None and merged["env_vars"] == {**ours, **NVLS_ENV}
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "wd.zip"
        _zip_files(str(REPO), env["excludes"], str(out), include_gitignore=True)
        names = zipfile.ZipFile(out).namelist()
        size = out.stat().st_size
    tops = {n.split("/")[0] for n in names}
    for banned in (".venv", ".git", "runs", ".gpu", ".whl", ".pytest_cache"):
        assert banned not in tops, f"{banned}/ would be uploaded with the job"
    assert {"raydistill", "workflows", "configs"} <= tops
    assert size < 32 * 2**20, f"working dir upload is {size / 2**20:.1f} MiB"
